//! Patches: the one way passes change a graph.
//!
//! A pass inspects the graph and proposes a `Patch` (remove these nodes, add these, make
//! readers of that value read this one instead, add or drop initializers); `Graph::apply`
//! checks the whole patch against the graph before touching anything, then applies it. This
//! is tract's patch model: matching code never edits edges, so a half-applied rewrite or a
//! dangling reader cannot happen, and every rewrite is counted under the patch's `kind`.
//!
//! A patch may let a new node produce a value that a removed node produced
//! (`PValue::Old`): the value keeps its name, its `value_info` and its readers, which is
//! how a fusion replaces a chain without renaming the chain's output. Likewise an initializer
//! can take over such a value (`replace_with_initializer`), which is how constant folding
//! replaces a computation by its result.

use std::collections::{HashMap, HashSet};

use super::graph::{Graph, Node, NodeId, OrderKey, Use, ValueId};
use super::shape::{Dim, ValueType};
use super::tensor::Tensor;
use crate::error::{Error, Result};
use crate::proto::{AttributeProto, NodeProto};

/// A value a patch refers to: one already in the graph, or the `n`-th one the patch creates.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum PValue {
    Old(ValueId),
    New(usize),
}

impl From<ValueId> for PValue {
    fn from(v: ValueId) -> PValue {
        PValue::Old(v)
    }
}

#[derive(Clone, Debug)]
struct NewValue {
    hint: String,
    initializer: Option<Tensor>,
}

#[derive(Clone, Debug)]
struct NewNode {
    proto: NodeProto,
    inputs: Vec<Option<PValue>>,
    outputs: Vec<Option<PValue>>,
}

fn node_proto(op_type: &str, domain: &str, attributes: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op_type.to_string()),
        domain: (!domain.is_empty()).then(|| domain.to_string()),
        attribute: attributes,
        ..Default::default()
    }
}

/// A proposed rewrite of one graph. Build it with the methods below, then `Graph::apply` it.
#[derive(Clone, Debug)]
pub struct Patch {
    /// What kind of rewrite this is, counted in the pass statistics (`"dead-node"`, `"gelu"`).
    pub kind: &'static str,
    anchor: Option<NodeId>,
    values: Vec<NewValue>,
    nodes: Vec<NewNode>,
    remove: Vec<NodeId>,
    redirects: Vec<(ValueId, PValue)>,
    rewired: Vec<(NodeId, usize, PValue)>,
    drop_initializers: Vec<ValueId>,
    initialized: Vec<(ValueId, Tensor)>,
    replaced_initializers: Vec<(ValueId, Tensor)>,
    declared_elem_types: Vec<(ValueId, i32)>,
    attributes: Vec<(NodeId, AttributeProto)>,
}

impl Patch {
    pub fn new(kind: &'static str) -> Patch {
        Patch {
            kind,
            anchor: None,
            values: Vec::new(),
            nodes: Vec::new(),
            remove: Vec::new(),
            redirects: Vec::new(),
            rewired: Vec::new(),
            drop_initializers: Vec::new(),
            initialized: Vec::new(),
            replaced_initializers: Vec::new(),
            declared_elem_types: Vec::new(),
            attributes: Vec::new(),
        }
    }

    /// Places new nodes where `node` is in the written file (default: the earliest removed node).
    pub fn anchor_at(&mut self, node: NodeId) -> &mut Self {
        self.anchor = Some(node);
        self
    }

    /// A new intermediate value; its final name starts with `hint`.
    pub fn new_value(&mut self, hint: &str) -> PValue {
        self.values.push(NewValue {
            hint: hint.to_string(),
            initializer: None,
        });
        PValue::New(self.values.len() - 1)
    }

    /// A new initializer holding `tensor`; its final name starts with `hint`.
    pub fn new_initializer(&mut self, hint: &str, tensor: Tensor) -> PValue {
        self.values.push(NewValue {
            hint: hint.to_string(),
            initializer: Some(tensor),
        });
        PValue::New(self.values.len() - 1)
    }

    /// Adds a node of `op_type` in `domain` (`""` for ONNX) writing `outputs`.
    pub fn add_node(
        &mut self,
        op_type: &str,
        domain: &str,
        inputs: &[Option<PValue>],
        outputs: &[PValue],
        attributes: Vec<AttributeProto>,
    ) -> &mut Self {
        self.add_node_proto(node_proto(op_type, domain, attributes), inputs, outputs)
    }

    /// Like `add_node`, with optional outputs left unnamed (`None`).
    pub fn add_node_with_optional_outputs(
        &mut self,
        op_type: &str,
        domain: &str,
        inputs: &[Option<PValue>],
        outputs: &[Option<PValue>],
        attributes: Vec<AttributeProto>,
    ) -> &mut Self {
        self.push_node(
            node_proto(op_type, domain, attributes),
            inputs,
            outputs.to_vec(),
        )
    }

    /// Adds a node that is `proto` (op, attributes, name, doc string, metadata) reading
    /// `inputs` and writing `outputs`; the proto's own input and output names are ignored.
    /// This is how a rewrite that rewires a node keeps what the exporter recorded about it.
    pub fn add_node_proto(
        &mut self,
        mut proto: NodeProto,
        inputs: &[Option<PValue>],
        outputs: &[PValue],
    ) -> &mut Self {
        proto.input.clear();
        proto.output.clear();
        self.push_node(proto, inputs, outputs.iter().copied().map(Some).collect())
    }

    /// Like `add_node_proto`, with optional outputs left unnamed (`None`).
    pub fn add_node_proto_with_optional_outputs(
        &mut self,
        mut proto: NodeProto,
        inputs: &[Option<PValue>],
        outputs: &[Option<PValue>],
    ) -> &mut Self {
        proto.input.clear();
        proto.output.clear();
        self.push_node(proto, inputs, outputs.to_vec())
    }

    fn push_node(
        &mut self,
        proto: NodeProto,
        inputs: &[Option<PValue>],
        outputs: Vec<Option<PValue>>,
    ) -> &mut Self {
        self.nodes.push(NewNode {
            proto,
            inputs: inputs.to_vec(),
            outputs,
        });
        self
    }

    /// Adds a single-output node and returns its (new) output value.
    pub fn op(
        &mut self,
        op_type: &str,
        domain: &str,
        inputs: &[PValue],
        attributes: Vec<AttributeProto>,
    ) -> PValue {
        let out = self.new_value(op_type);
        let inputs: Vec<Option<PValue>> = inputs.iter().copied().map(Some).collect();
        self.add_node(op_type, domain, &inputs, &[out], attributes);
        out
    }

    pub fn remove_node(&mut self, node: NodeId) -> &mut Self {
        if !self.remove.contains(&node) {
            self.remove.push(node);
        }
        self
    }

    /// The nodes the patch removes so far.
    pub fn removed_nodes(&self) -> &[NodeId] {
        &self.remove
    }

    /// Readers of `old` (node inputs and graph outputs) read `new` instead. A graph output
    /// keeps its name: `new` takes it over.
    pub fn replace_uses(&mut self, old: ValueId, new: PValue) -> &mut Self {
        self.redirects.push((old, new));
        self
    }

    /// Input `slot` of `node`, a node the patch keeps, reads `new` instead; every other
    /// reader of the value it read keeps it. This is how one reader of a value moves (to a
    /// quantized copy, say) while the others stay.
    pub fn replace_input(&mut self, node: NodeId, slot: usize, new: PValue) -> &mut Self {
        self.rewired.push((node, slot, new));
        self
    }

    /// Removes an initializer that nothing reads once the patch is applied (its readers are
    /// removed or redirected by the same patch).
    pub fn drop_initializer(&mut self, v: ValueId) -> &mut Self {
        self.drop_initializers.push(v);
        self
    }

    /// Makes `v`, whose producer the patch removes, an initializer holding `tensor`: the
    /// value keeps its name, its `value_info`, its readers and its place among the graph
    /// outputs. This is how a computed constant replaces its computation.
    pub fn replace_with_initializer(&mut self, v: ValueId, tensor: Tensor) -> &mut Self {
        self.initialized.push((v, tensor));
        self
    }

    /// Gives initializer `v` a new tensor (the same value in another element type, say): it
    /// keeps its name, its readers and its place among the initializers.
    pub fn replace_initializer(&mut self, v: ValueId, tensor: Tensor) -> &mut Self {
        self.replaced_initializers.push((v, tensor));
        self
    }

    /// Input `slot` of `node` in `g` reads `tensor` instead of its constant: that initializer
    /// takes the new tensor in place when `node` is its only reader, else a new initializer
    /// named after it with `suffix` feeds `node` alone (the other readers keep the old value).
    /// An empty slot stays empty.
    pub fn set_constant_input(
        &mut self,
        g: &Graph,
        node: NodeId,
        slot: usize,
        tensor: Tensor,
        suffix: &str,
    ) -> &mut Self {
        let Some(v) = g.node(node).input(slot) else {
            return self;
        };
        if g.initializer(v).is_some() && g.uses(v).len() == 1 {
            self.replace_initializer(v, tensor)
        } else {
            let copy = self.new_initializer(&format!("{}{suffix}", g.value_name(v)), tensor);
            self.replace_input(node, slot, copy)
        }
    }

    /// Declares graph input or output `v` with the element type `elem` (its shape stays).
    pub fn declare_elem_type(&mut self, v: ValueId, elem: i32) -> &mut Self {
        self.declared_elem_types.push((v, elem));
        self
    }

    /// Gives `node`, a node the patch keeps, the attribute `a` (replacing the one of the same
    /// name, if any): a head count after pruning, say.
    pub fn set_attribute(&mut self, node: NodeId, a: AttributeProto) -> &mut Self {
        self.attributes.push((node, a));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
            && self.remove.is_empty()
            && self.redirects.is_empty()
            && self.rewired.is_empty()
            && self.drop_initializers.is_empty()
            && self.values.is_empty()
            && self.initialized.is_empty()
            && self.replaced_initializers.is_empty()
            && self.declared_elem_types.is_empty()
            && self.attributes.is_empty()
    }
}

impl Graph {
    /// Checks `patch` against the graph, then applies it whole. On error nothing is changed.
    pub fn apply(&mut self, patch: Patch) -> Result<()> {
        self.check_patch(&patch)?;
        let anchor = self.patch_anchor(&patch);

        for &n in &patch.remove {
            self.remove_node(n);
        }
        for (v, mut t) in patch.initialized {
            t.set_name(self.value_name(v));
            self.set_initializer(v, t);
        }
        let new_ids: Vec<ValueId> = patch
            .values
            .into_iter()
            .map(|nv| {
                let id = self.fresh_value(&nv.hint);
                if let Some(mut t) = nv.initializer {
                    t.set_name(self.value_name(id));
                    self.set_initializer(id, t);
                }
                id
            })
            .collect();
        let resolve = |p: PValue| match p {
            PValue::Old(v) => v,
            PValue::New(i) => new_ids[i],
        };
        for new in patch.nodes {
            let mut proto = new.proto;
            if proto.name.is_none() {
                proto.name = Some(self.fresh_node_name(proto.op_type()));
            }
            let order = self.order_after(anchor);
            self.add_node(Node {
                proto,
                inputs: new.inputs.iter().map(|p| p.map(resolve)).collect(),
                outputs: new.outputs.iter().map(|p| p.map(resolve)).collect(),
                captured: Vec::new(),
                order,
            })?;
        }
        for (node, slot, new) in patch.rewired {
            self.set_input(node, slot, Some(resolve(new)));
        }
        for (old, new) in patch.redirects {
            // A value the patch made, replacing one it removed, takes over the removed
            // value's name and type: the rewritten graph reads like the original.
            let inherit = matches!(new, PValue::New(_)) && self.value(old).removed;
            self.redirect(old, resolve(new), inherit)?;
        }
        for v in patch.drop_initializers {
            self.take_initializer(v);
        }
        for (v, mut t) in patch.replaced_initializers {
            t.set_name(self.value_name(v));
            let shape = t.dims().iter().map(|&d| Dim::known(d)).collect();
            let tensor_type = ValueType::new(t.dtype() as i32, shape);
            self.set_initializer(v, t);
            // A value_info entry (or input declaration) of the initializer must not
            // contradict its new type or shape.
            self.declare_type(v, &tensor_type);
        }
        for (v, elem) in patch.declared_elem_types {
            self.declare_elem_type(v, elem);
        }
        for (node, a) in patch.attributes {
            self.set_attribute(node, a);
        }
        Ok(())
    }

    fn patch_anchor(&mut self, patch: &Patch) -> OrderKey {
        let anchored = patch.anchor.or_else(|| {
            patch
                .remove
                .iter()
                .copied()
                .min_by_key(|&n| self.node(n).order)
        });
        match anchored {
            Some(n) => self.node(n).order,
            None => self.next_order(),
        }
    }

    /// Every check that can fail, done before anything changes.
    pub fn check_patch(&self, patch: &Patch) -> Result<()> {
        let fail = |msg: String| Err(Error::Patch(format!("{}: {msg}", patch.kind)));
        let removed: HashSet<NodeId> = patch.remove.iter().copied().collect();
        for &n in &patch.remove {
            if !self.contains_node(n) {
                return fail(format!("node {n:?} does not exist"));
            }
        }
        // Values whose producer goes away, and which of them the patch produces again.
        let freed: HashSet<ValueId> = patch
            .remove
            .iter()
            .flat_map(|&n| self.node(n).outputs.iter().flatten().copied())
            .collect();
        let mut reproduced = HashSet::new();
        let taken_over = patch.nodes.iter().flat_map(|node| {
            node.outputs.iter().flatten().filter_map(|out| match *out {
                PValue::Old(v) => Some(v),
                PValue::New(_) => None,
            })
        });
        for v in taken_over.chain(patch.initialized.iter().map(|(v, _)| *v)) {
            if !freed.contains(&v) || !reproduced.insert(v) {
                return fail(format!("`{}` already has a producer", self.value_name(v)));
            }
        }
        // Each new value has exactly one source: a new node's output or its initializer.
        let mut written = vec![false; patch.values.len()];
        for (i, nv) in patch.values.iter().enumerate() {
            written[i] = nv.initializer.is_some();
        }
        let new_outputs = patch.nodes.iter().flat_map(|n| n.outputs.iter().flatten());
        for out in new_outputs {
            if let PValue::New(i) = *out {
                match written.get_mut(i) {
                    None => return fail(format!("unknown new value {i}")),
                    Some(true) => return fail(format!("new value {i} is written twice")),
                    Some(w) => *w = true,
                }
            }
        }
        let mut redirected: HashSet<ValueId> = HashSet::new();
        for (old, _) in &patch.redirects {
            if !redirected.insert(*old) {
                return fail(format!("`{}` is redirected twice", self.value_name(*old)));
            }
        }
        let dangling = |v: ValueId| freed.contains(&v) && !reproduced.contains(&v);
        let check_source = |p: &PValue, what: &str| match *p {
            PValue::Old(v) if dangling(v) => fail(format!(
                "{what} `{}` whose producer the patch removes",
                self.value_name(v)
            )),
            PValue::New(i) if i >= patch.values.len() => fail(format!("unknown new value {i}")),
            PValue::New(i) if !written[i] => fail(format!("{what} new value {i}, never written")),
            _ => Ok(()),
        };
        for node in &patch.nodes {
            for input in node.inputs.iter().flatten() {
                check_source(input, "a new node reads")?;
            }
        }
        for (v, _) in &patch.replaced_initializers {
            if self.initializer(*v).is_none() {
                return fail(format!("`{}` is not an initializer", self.value_name(*v)));
            }
        }
        for (v, _) in &patch.declared_elem_types {
            if !self.is_graph_input(*v) && !self.is_graph_output(*v) {
                return fail(format!(
                    "`{}` is not a graph input or output",
                    self.value_name(*v)
                ));
            }
        }
        for (node, _) in &patch.attributes {
            if removed.contains(node) || !self.contains_node(*node) {
                return fail(format!("node {node:?} given an attribute does not stay"));
            }
        }
        for (node, slot, new) in &patch.rewired {
            check_source(new, "a rewired input reads")?;
            if removed.contains(node) || !self.contains_node(*node) {
                return fail(format!("rewired node {node:?} does not stay in the graph"));
            }
            if self.node(*node).input(*slot).is_none() {
                return fail(format!(
                    "`{}` has no input {slot} to rewire",
                    self.node_label(*node)
                ));
            }
        }
        let captured = |v: ValueId| self.uses(v).iter().any(|(_, u)| *u == Use::Captured);
        for (old, new) in &patch.redirects {
            check_source(new, "a redirect points at")?;
            if captured(*old) {
                return fail(format!(
                    "`{}` is read by name inside a subgraph",
                    self.value_name(*old)
                ));
            }
            // What `redirect` does with the name of a graph output (or of a removed value
            // that a new one replaces), checked here so that it cannot fail half-way.
            let inherit = matches!(new, PValue::New(_)) && freed.contains(old);
            if !self.is_graph_output(*old) && !inherit {
                continue;
            }
            let new_has_own_name = match *new {
                PValue::Old(v) => {
                    self.is_graph_input(v)
                        || self.is_graph_output(v)
                        || self.initializer(v).is_some()
                }
                PValue::New(i) => patch.values[i].initializer.is_some(),
            };
            let keeps_producer =
                (self.producer(*old).is_some() && !freed.contains(old)) || reproduced.contains(old);
            if new_has_own_name && self.is_graph_output(*old) && keeps_producer {
                return fail(format!(
                    "graph output `{}` would be written twice: it keeps its producer",
                    self.value_name(*old)
                ));
            }
            if let PValue::Old(v) = *new {
                if !new_has_own_name && captured(v) {
                    return fail(format!(
                        "`{}` would take the name `{}`, but a subgraph reads it by name",
                        self.value_name(v),
                        self.value_name(*old)
                    ));
                }
            }
        }
        // A reader whose input the patch rewires away no longer reads the value.
        let moved = |r: &NodeId, u: &Use| {
            let Use::Input(slot) = *u else { return false };
            patch
                .rewired
                .iter()
                .any(|(node, s, _)| node == r && *s == slot)
        };
        for &v in &freed {
            if reproduced.contains(&v) || redirected.contains(&v) {
                continue;
            }
            if self.is_graph_output(v) {
                return fail(format!(
                    "graph output `{}` would lose its producer",
                    self.value_name(v)
                ));
            }
            let still_read = self
                .uses(v)
                .iter()
                .find(|(r, u)| !removed.contains(r) && !moved(r, u));
            if let Some((reader, _)) = still_read {
                return fail(format!(
                    "`{}` is still read by `{}`",
                    self.value_name(v),
                    self.node_label(*reader)
                ));
            }
        }
        if let Some(node) = self.cycle_through(patch, &removed) {
            return fail(format!("it would make a cycle through `{node}`"));
        }
        for &v in &patch.drop_initializers {
            if self.initializer(v).is_none() {
                return fail(format!("`{}` is not an initializer", self.value_name(v)));
            }
            let still_read = !redirected.contains(&v)
                && self
                    .uses(v)
                    .iter()
                    .any(|(r, u)| !removed.contains(r) && !moved(r, u));
            if still_read || self.is_graph_output(v) {
                return fail(format!(
                    "initializer `{}` is still read",
                    self.value_name(v)
                ));
            }
        }
        Ok(())
    }

    /// A node on a cycle of the patched graph, if the patch would make one. The graph is
    /// acyclic before and removing nodes makes no cycle, so a cycle runs through a new node,
    /// a rewired input or a redirected read: a depth-first walk up from those, over the edges
    /// the patched graph would have, finds it. (A fusion whose mask is computed from the
    /// shape of a value the fused node now produces, as Optimum's Whisper decoder slices its
    /// causal mask to the length of the present key, would otherwise feed itself.)
    fn cycle_through(&self, patch: &Patch, removed: &HashSet<NodeId>) -> Option<String> {
        #[derive(Copy, Clone, PartialEq, Eq, Hash)]
        enum Vertex {
            Old(NodeId),
            New(usize),
        }
        let redirects: HashMap<ValueId, PValue> = patch.redirects.iter().copied().collect();
        let rewired: HashMap<(NodeId, usize), PValue> = patch
            .rewired
            .iter()
            .map(|&(node, slot, new)| ((node, slot), new))
            .collect();
        let mut writer: HashMap<PValue, usize> = HashMap::new();
        for (i, node) in patch.nodes.iter().enumerate() {
            for out in node.outputs.iter().flatten() {
                writer.insert(*out, i);
            }
        }
        // Where a read of `p` lands once redirects are applied (they run last in `apply`).
        let resolve = |mut p: PValue| {
            for _ in 0..=redirects.len() {
                match p {
                    PValue::Old(v) if redirects.contains_key(&v) => p = redirects[&v],
                    _ => break,
                }
            }
            p
        };
        let producer = |p: PValue| -> Option<Vertex> {
            if let Some(&i) = writer.get(&p) {
                return Some(Vertex::New(i));
            }
            match p {
                PValue::Old(v) => self
                    .producer(v)
                    .filter(|n| !removed.contains(n))
                    .map(Vertex::Old),
                PValue::New(_) => None,
            }
        };
        let preds = |at: Vertex| -> Vec<Vertex> {
            let reads: Vec<PValue> = match at {
                Vertex::New(i) => patch.nodes[i].inputs.iter().flatten().copied().collect(),
                Vertex::Old(n) => {
                    let node = self.node(n);
                    let slots = node.inputs.iter().enumerate().filter_map(|(slot, v)| {
                        rewired.get(&(n, slot)).copied().or(v.map(PValue::Old))
                    });
                    slots
                        .chain(node.captured.iter().map(|&v| PValue::Old(v)))
                        .collect()
                }
            };
            reads
                .into_iter()
                .filter_map(|p| producer(resolve(p)))
                .collect()
        };
        let mut starts: Vec<Vertex> = (0..patch.nodes.len()).map(Vertex::New).collect();
        starts.extend(patch.rewired.iter().map(|&(n, _, _)| Vertex::Old(n)));
        for old in redirects.keys() {
            let readers = self.uses(*old).iter().map(|&(r, _)| r);
            starts.extend(readers.filter(|r| !removed.contains(r)).map(Vertex::Old));
        }
        // Iterative three-colour walk: on the stack (false) or finished (true).
        let mut state: HashMap<Vertex, bool> = HashMap::new();
        for start in starts {
            if state.contains_key(&start) {
                continue;
            }
            state.insert(start, false);
            let mut stack = vec![(start, preds(start), 0usize)];
            while let Some((at, next, i)) = stack.last_mut() {
                let Some(&pred) = next.get(*i) else {
                    state.insert(*at, true);
                    stack.pop();
                    continue;
                };
                *i += 1;
                match state.get(&pred) {
                    Some(false) => {
                        return Some(match pred {
                            Vertex::Old(n) => self.node_label(n),
                            Vertex::New(i) => patch.nodes[i].proto.op_type().to_string(),
                        })
                    }
                    Some(true) => {}
                    None => {
                        state.insert(pred, false);
                        stack.push((pred, preds(pred), 0));
                    }
                }
            }
        }
        None
    }

    /// Makes every reader of `old` read `new`. A graph output on `old` moves to `new` and
    /// keeps its name; with `inherit`, `new` takes `old`'s name and recorded type anyway.
    fn redirect(&mut self, old: ValueId, new: ValueId, inherit: bool) -> Result<()> {
        if old == new {
            return Ok(());
        }
        let readers: Vec<(NodeId, Use)> = self.uses(old).to_vec();
        for (node, use_) in readers {
            if let Use::Input(slot) = use_ {
                self.set_input(node, slot, Some(new));
            }
        }
        let is_output = self.is_graph_output(old);
        if !is_output && !inherit {
            return Ok(());
        }
        let new_is_port_or_init = self.is_graph_input(new)
            || self.is_graph_output(new)
            || self.initializer(new).is_some();
        if new_is_port_or_init {
            // `new` has a name the user sees already: keep both names with an Identity.
            return match is_output {
                true => self.reproduce_with_identity(old, new),
                false => Ok(()),
            };
        }
        self.swap_names(old, new)?;
        if let Some(info) = self.value(old).info.clone() {
            if self.value(new).info.is_none() {
                self.set_value_info(new, info);
            }
        }
        for port in &mut self.outputs {
            if port.value == old {
                port.value = new;
            }
        }
        Ok(())
    }

    fn reproduce_with_identity(&mut self, output: ValueId, source: ValueId) -> Result<()> {
        if self.producer(output).is_some() {
            return Err(Error::Patch(format!(
                "graph output `{}` is still produced",
                self.value_name(output)
            )));
        }
        let order = self.next_order();
        let name = self.fresh_node_name("Identity");
        self.add_node(Node {
            proto: NodeProto {
                op_type: Some("Identity".into()),
                name: Some(name),
                ..Default::default()
            },
            inputs: vec![Some(source)],
            outputs: vec![Some(output)],
            captured: Vec::new(),
            order,
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{model, ops};
    use super::*;
    use crate::ir::attr;

    /// x → Neg → a → Neg → y: the two Negs cancel.
    fn double_negation() -> crate::ir::Model {
        model(
            &["x"],
            &["y"],
            &[],
            &[("Neg", &["x"], &["a"]), ("Neg", &["a"], &["y"])],
        )
    }

    #[test]
    fn a_new_node_can_take_over_a_removed_nodes_output() {
        let mut m = double_negation();
        let g = &m.graph;
        let (x, y) = (g.find_value("x").unwrap(), g.find_value("y").unwrap());
        let first = g.producer(g.find_value("a").unwrap()).unwrap();
        let second = g.producer(y).unwrap();
        let mut p = Patch::new("test");
        p.remove_node(first).remove_node(second);
        p.add_node("Identity", "", &[Some(x.into())], &[y.into()], vec![]);
        m.graph.apply(p).unwrap();
        assert_eq!(ops(&m), ["Identity"]);
        let out = m.graph.outputs[0].value;
        assert_eq!(m.graph.value_name(out), "y");
        assert!(m.graph.value(m.graph.find_value("a").unwrap()).removed);
    }

    /// x → Neg → a → Shape → s, y = Add(a, s-as-float): a patch that replaces the first Neg
    /// by a node reading `s` (computed from its own output) would feed itself.
    #[test]
    fn a_patch_that_would_make_a_cycle_is_refused_whole() {
        let mut m = model(
            &["x"],
            &["y"],
            &[],
            &[
                ("Neg", &["x"], &["a"]),
                ("Shape", &["a"], &["s"]),
                ("Cast", &["s"], &["f"]),
                ("Add", &["a", "f"], &["y"]),
            ],
        );
        let g = &m.graph;
        let (x, f) = (g.find_value("x").unwrap(), g.find_value("f").unwrap());
        let a = g.find_value("a").unwrap();
        let neg = g.producer(a).unwrap();
        let mut p = Patch::new("test");
        p.remove_node(neg);
        p.add_node(
            "Sub",
            "",
            &[Some(x.into()), Some(f.into())],
            &[a.into()],
            vec![],
        );
        let err = m.graph.apply(p).unwrap_err().to_string();
        assert!(err.contains("would make a cycle"), "{err}");
        assert_eq!(ops(&m), ["Neg", "Shape", "Cast", "Add"]);
        m.graph.check_invariants().unwrap();
    }

    #[test]
    fn redirecting_a_graph_output_keeps_its_name() {
        let mut m = double_negation();
        let g = &m.graph;
        let y = g.find_value("y").unwrap();
        let second = g.producer(y).unwrap();
        let mut p = Patch::new("test");
        let relu = p.op("Relu", "", &[g.find_value("a").unwrap().into()], vec![]);
        p.remove_node(second).replace_uses(y, relu);
        m.graph.apply(p).unwrap();
        let out = m.graph.outputs[0].value;
        assert_eq!(m.graph.value_name(out), "y");
        assert_eq!(ops(&m), ["Neg", "Relu"]);
    }

    #[test]
    fn a_new_value_replacing_a_removed_one_inherits_its_name() {
        // x → Neg → a → Neg → y; the first Neg becomes a Relu whose output is named `a`.
        let mut m = double_negation();
        let g = &m.graph;
        let a = g.find_value("a").unwrap();
        let first = g.producer(a).unwrap();
        let mut p = Patch::new("test");
        let relu = p.op("Relu", "", &[g.find_value("x").unwrap().into()], vec![]);
        p.remove_node(first).replace_uses(a, relu);
        m.graph.apply(p).unwrap();
        let g = m.to_proto().unwrap().graph.unwrap();
        assert_eq!(g.node[0].output, ["a"]);
        assert_eq!(g.node[1].input, ["a"]);
    }

    /// Applies `p`, which must fail with `expected` in its message and leave `m` unchanged.
    fn refused_whole(m: &mut crate::ir::Model, p: Patch, expected: &str) {
        let before = m.to_proto().unwrap();
        let err = m.graph.apply(p).unwrap_err().to_string();
        assert!(err.contains(expected), "{err}");
        assert_eq!(m.to_proto().unwrap(), before);
        m.graph.check_invariants().unwrap();
    }

    #[test]
    fn two_new_nodes_writing_one_value_change_nothing() {
        let mut m = double_negation();
        let g = &m.graph;
        let (x, y) = (g.find_value("x").unwrap(), g.find_value("y").unwrap());
        let second = g.producer(y).unwrap();
        let mut p = Patch::new("bad");
        let out = p.new_value("twice");
        p.add_node("Relu", "", &[Some(x.into())], &[out], vec![]);
        p.add_node("Abs", "", &[Some(x.into())], &[out], vec![]);
        p.remove_node(second).replace_uses(y, out);
        refused_whole(&mut m, p, "new value 0 is written twice");

        // Two new nodes taking over one removed value.
        let mut p = Patch::new("bad");
        p.remove_node(second);
        p.add_node("Relu", "", &[Some(x.into())], &[y.into()], vec![]);
        p.add_node("Abs", "", &[Some(x.into())], &[y.into()], vec![]);
        refused_whole(&mut m, p, "`y` already has a producer");
    }

    #[test]
    fn redirecting_a_graph_output_whose_producer_stays_changes_nothing() {
        // y is a graph output and keeps its producer: pointing its readers at an initializer
        // would need a second writer of `y`.
        let mut m = double_negation();
        let y = m.graph.find_value("y").unwrap();
        let mut p = Patch::new("bad");
        let zero = p.new_initializer(
            "zero",
            crate::ir::Tensor::from_f32("", &[], &[0.0]).unwrap(),
        );
        p.replace_uses(y, zero);
        refused_whole(&mut m, p, "graph output `y` would be written twice");
    }

    #[test]
    fn reading_a_new_value_nothing_writes_changes_nothing() {
        let mut m = double_negation();
        let y = m.graph.find_value("y").unwrap();
        let second = m.graph.producer(y).unwrap();
        let mut p = Patch::new("bad");
        let never = p.new_value("never");
        let relu = p.op("Relu", "", &[never], vec![]);
        p.remove_node(second).replace_uses(y, relu);
        refused_whole(&mut m, p, "never written");
    }

    #[test]
    fn an_attribute_is_set_on_a_kept_node_only() {
        let mut m = double_negation();
        let a = m.graph.find_value("a").unwrap();
        let first = m.graph.producer(a).unwrap();
        let mut p = Patch::new("attr");
        p.set_attribute(first, attr::int("k", 2));
        m.graph.apply(p).unwrap();
        assert_eq!(attr::get_int(&m.graph.node(first).proto, "k"), Some(2));
        let mut p = Patch::new("attr");
        p.set_attribute(first, attr::int("k", 3));
        m.graph.apply(p).unwrap();
        assert_eq!(
            m.graph.node(first).proto.attribute.len(),
            1,
            "replaced, not added"
        );
        assert_eq!(attr::get_int(&m.graph.node(first).proto, "k"), Some(3));

        let mut p = Patch::new("bad");
        let x = m.graph.find_value("x").unwrap();
        p.remove_node(first).replace_uses(a, x.into());
        p.set_attribute(first, attr::int("k", 4));
        refused_whole(&mut m, p, "does not stay");
    }

    #[test]
    fn a_patch_that_leaves_a_reader_dangling_changes_nothing() {
        let mut m = double_negation();
        let first = m.graph.producer(m.graph.find_value("a").unwrap()).unwrap();
        let before = m.to_proto().unwrap();
        let mut p = Patch::new("bad");
        p.remove_node(first);
        let err = m.graph.apply(p).unwrap_err().to_string();
        assert!(err.contains("`a` is still read"), "{err}");
        assert_eq!(m.to_proto().unwrap(), before);
    }

    #[test]
    fn new_initializers_and_attributes_are_written() {
        let mut m = double_negation();
        let y = m.graph.find_value("y").unwrap();
        let second = m.graph.producer(y).unwrap();
        let a = m.graph.find_value("a").unwrap();
        let mut p = Patch::new("test");
        let half = p.new_initializer(
            "half",
            crate::ir::Tensor::from_f32("", &[], &[0.5]).unwrap(),
        );
        let mul = p.op("Mul", "", &[a.into(), half], vec![attr::int("unused", 1)]);
        p.remove_node(second).replace_uses(y, mul);
        m.graph.apply(p).unwrap();
        let proto = m.to_proto().unwrap();
        let g = proto.graph.unwrap();
        assert_eq!(g.initializer[0].name(), "half");
        assert_eq!(g.node[1].input, ["a", "half"]);
        assert_eq!(g.node[1].output, ["y"]);
        assert_eq!(g.node[1].attribute[0].name(), "unused");
    }

    #[test]
    fn an_initializer_can_take_over_a_removed_nodes_output() {
        let mut m = double_negation();
        let a = m.graph.find_value("a").unwrap();
        let first = m.graph.producer(a).unwrap();
        let mut p = Patch::new("test");
        let folded = crate::ir::Tensor::from_f32("ignored", &[], &[2.0]).unwrap();
        p.remove_node(first).replace_with_initializer(a, folded);
        m.graph.apply(p).unwrap();
        assert_eq!(ops(&m), ["Neg"]);
        let g = m.to_proto().unwrap().graph.unwrap();
        assert_eq!(g.initializer[0].name(), "a", "the value keeps its name");
        assert_eq!(g.node[0].input, ["a"]);

        // A value whose producer stays cannot become an initializer.
        let y = m.graph.find_value("y").unwrap();
        let mut p = Patch::new("bad");
        p.replace_with_initializer(y, crate::ir::Tensor::from_f32("", &[], &[0.0]).unwrap());
        let err = m.graph.apply(p).unwrap_err().to_string();
        assert!(err.contains("`y` already has a producer"), "{err}");
    }

    #[test]
    fn a_redirected_initializer_can_be_dropped_in_the_same_patch() {
        let mut m = model(
            &["x"],
            &["y"],
            &["w", "w2"],
            &[("Mul", &["x", "w"], &["a"]), ("Mul", &["a", "w2"], &["y"])],
        );
        let (w, w2) = (
            m.graph.find_value("w").unwrap(),
            m.graph.find_value("w2").unwrap(),
        );
        let mut p = Patch::new("test");
        p.replace_uses(w2, w.into()).drop_initializer(w2);
        m.graph.apply(p).unwrap();
        let g = m.to_proto().unwrap().graph.unwrap();
        assert_eq!(g.initializer.len(), 1);
        assert_eq!(g.node[1].input, ["a", "w"]);

        // Without the redirect it is still read: refused.
        let mut p = Patch::new("bad");
        p.drop_initializer(w);
        assert!(m.graph.apply(p).is_err());
    }

    #[test]
    fn one_input_slot_can_be_rewired_alone() {
        // x → Add(x, x) → y: only the second slot moves to Neg(x).
        let mut m = model(&["x"], &["y"], &[], &[("Add", &["x", "x"], &["y"])]);
        let x = m.graph.find_value("x").unwrap();
        let add = m.graph.producer(m.graph.find_value("y").unwrap()).unwrap();
        let mut p = Patch::new("test");
        let neg = p.op("Neg", "", &[x.into()], vec![]);
        p.replace_input(add, 1, neg);
        m.graph.apply(p).unwrap();
        let g = m.to_proto().unwrap().graph.unwrap();
        assert_eq!(g.node[1].input, ["x", "Neg"]);
        assert_eq!(m.graph.uses(x).len(), 2, "the Add's first slot and the Neg");

        // A slot the node does not have, or a node the patch removes, is refused.
        let mut p = Patch::new("bad");
        p.replace_input(add, 2, x.into());
        assert!(m.graph.apply(p).is_err());
        let mut p = Patch::new("bad");
        p.remove_node(add).replace_input(add, 0, x.into());
        assert!(m.graph.apply(p).is_err());
    }

    #[test]
    fn a_node_added_from_a_proto_keeps_its_name_and_attributes() {
        let mut m = double_negation();
        let y = m.graph.find_value("y").unwrap();
        let x = m.graph.find_value("x").unwrap();
        let second = m.graph.producer(y).unwrap();
        let mut proto = m.graph.node(second).proto.clone();
        proto.attribute.push(attr::int("kept", 3));
        let mut p = Patch::new("test");
        p.remove_node(second)
            .add_node_proto(proto, &[Some(x.into())], &[y.into()]);
        m.graph.apply(p).unwrap();
        let g = m.to_proto().unwrap().graph.unwrap();
        let rewired = g.node.iter().find(|n| n.output == ["y"]).unwrap();
        assert_eq!(rewired.name(), "Neg_y");
        assert_eq!(rewired.input, ["x"]);
        assert_eq!(rewired.attribute[0].name(), "kept");
    }
}
