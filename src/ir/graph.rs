//! The graph IR: a petgraph `StableDiGraph` whose nodes are operators and whose edges are
//! values flowing from a producer to one input slot of a consumer, plus a value table.
//!
//! Every value (graph input, initializer, node output) has a `ValueId`; nodes refer to values
//! by id, never by name, so renaming or redirecting a value is one table update. Each value
//! knows its producer and all of its uses, and the petgraph edges mirror the producer→consumer
//! relation, so passes get `consumers(v)` in O(uses) and petgraph's algorithms (topological
//! order, cycle detection) work on the real dependency graph. All of that is kept consistent
//! by the handful of mutating methods here; passes do not mutate the graph directly but hand a
//! `Patch` to `Graph::apply` (see `patch.rs`).
//!
//! Node indices (`NodeId`) are petgraph's stable indices, which petgraph reuses after a
//! removal; each node also carries an `OrderKey` that is never reused and fixes where it is
//! written in the output, so saving is deterministic and an untouched graph keeps its order.

use std::collections::{BinaryHeap, HashMap, HashSet};

use petgraph::stable_graph::StableDiGraph;
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use super::shape::{Dim, ValueType};
use super::tensor::Tensor;
use crate::error::{Error, Result};
use crate::proto::{AttributeProto, GraphProto, NodeProto, SparseTensorProto, ValueInfoProto};

pub type NodeId = petgraph::stable_graph::NodeIndex<u32>;

/// Index of a value in its graph's value table.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(u32);

impl ValueId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// How a node reads a value.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Use {
    /// Input slot `i` of the node.
    Input(usize),
    /// Read by name from inside one of the node's subgraph attributes (If/Loop/Scan bodies).
    /// Such a value cannot be renamed or redirected without rewriting the subgraph.
    Captured,
}

/// Edge weight: the value that flows and where the consumer reads it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub value: ValueId,
    pub slot: Use,
}

/// Where a node goes in the written file: nodes are emitted in topological order, ties broken
/// by this key. Loaded nodes get `(position, 0)`; a node created by a patch takes the major
/// key of the node it replaces and a fresh minor key, so it lands where the old one was.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrderKey {
    pub major: u64,
    pub minor: u64,
}

#[derive(Clone, Debug)]
pub struct Node {
    /// Everything of the `NodeProto` except its input and output names: op_type, domain,
    /// name, attributes, doc string, metadata. Kept as the proto so nothing is lost.
    pub proto: NodeProto,
    pub inputs: Vec<Option<ValueId>>,
    pub outputs: Vec<Option<ValueId>>,
    /// Outer values read by name from the node's subgraph attributes.
    pub captured: Vec<ValueId>,
    pub order: OrderKey,
}

impl Node {
    pub fn op_type(&self) -> &str {
        self.proto.op_type()
    }

    /// The operator's domain, with the default domain spelled `""` however the file spelled it.
    pub fn domain(&self) -> &str {
        match self.proto.domain() {
            "ai.onnx" => "",
            d => d,
        }
    }

    pub fn name(&self) -> &str {
        self.proto.name()
    }

    /// True when the node is `op_type` of the default ONNX domain.
    pub fn is(&self, op_type: &str) -> bool {
        self.op_type() == op_type && self.domain().is_empty()
    }

    pub fn input(&self, slot: usize) -> Option<ValueId> {
        self.inputs.get(slot).copied().flatten()
    }

    pub fn output(&self, slot: usize) -> Option<ValueId> {
        self.outputs.get(slot).copied().flatten()
    }
}

/// A graph input or output: the value and its declaration (type, doc string) as written.
#[derive(Clone, Debug)]
pub struct Port {
    pub value: ValueId,
    pub decl: ValueInfoProto,
}

#[derive(Clone, Debug)]
pub struct Value {
    pub name: String,
    /// The node and output slot that produce it; `None` for graph inputs and initializers.
    pub producer: Option<(NodeId, usize)>,
    uses: Vec<(NodeId, Use)>,
    /// The graph's `value_info` entry for this value, if it had one.
    pub info: Option<ValueInfoProto>,
    pub initializer: Option<Tensor>,
    /// Defined by a `sparse_initializer` (kept verbatim in `Graph::sparse_initializers`).
    pub sparse: bool,
    /// Its producer was removed and nothing replaced it: it no longer exists in the model.
    pub removed: bool,
}

impl Value {
    pub fn uses(&self) -> &[(NodeId, Use)] {
        &self.uses
    }
}

#[derive(Clone, Debug)]
pub struct Graph {
    dag: StableDiGraph<Node, Flow>,
    values: Vec<Value>,
    by_name: HashMap<String, ValueId>,
    node_names: HashSet<String>,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
    /// Initializers in the order they will be written.
    initializer_order: Vec<ValueId>,
    /// Values that get a `value_info` entry, in the order they will be written.
    value_info_order: Vec<ValueId>,
    pub sparse_initializers: Vec<SparseTensorProto>,
    /// The rest of the `GraphProto`: name, doc string, quantization annotations, metadata.
    pub rest: GraphProto,
    next_minor: u64,
    next_major: u64,
}

impl Graph {
    pub(crate) fn empty(rest: GraphProto) -> Graph {
        Graph {
            dag: StableDiGraph::default(),
            values: Vec::new(),
            by_name: HashMap::new(),
            node_names: HashSet::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            initializer_order: Vec::new(),
            value_info_order: Vec::new(),
            sparse_initializers: Vec::new(),
            rest,
            next_minor: 1,
            next_major: 0,
        }
    }

    // ---- reading -------------------------------------------------------------------------

    pub fn node(&self, id: NodeId) -> &Node {
        &self.dag[id]
    }

    /// Edits a node in place, bypassing `Patch`: for tests that build odd graphs only.
    #[cfg(test)]
    pub(crate) fn node_mut_proto(&mut self, id: NodeId) -> &mut NodeProto {
        &mut self.dag[id].proto
    }

    /// Sets attribute `a` of `node`, replacing one of the same name (`Patch::set_attribute`).
    pub(crate) fn set_attribute(&mut self, node: NodeId, a: crate::proto::AttributeProto) {
        let attributes = &mut self.dag[node].proto.attribute;
        match attributes.iter_mut().find(|x| x.name == a.name) {
            Some(x) => *x = a,
            None => attributes.push(a),
        }
    }

    pub fn contains_node(&self, id: NodeId) -> bool {
        self.dag.contains_node(id)
    }

    pub fn node_count(&self) -> usize {
        self.dag.node_count()
    }

    /// Node ids in no particular order; use `topological_order` where order matters.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.dag.node_indices()
    }

    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> + '_ {
        self.dag.node_indices().map(move |id| (id, &self.dag[id]))
    }

    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.index()]
    }

    pub fn value_name(&self, id: ValueId) -> &str {
        &self.values[id.index()].name
    }

    pub fn find_value(&self, name: &str) -> Option<ValueId> {
        self.by_name.get(name).copied()
    }

    pub fn value_ids(&self) -> impl Iterator<Item = ValueId> {
        (0..self.values.len() as u32).map(ValueId)
    }

    /// The node that produces `v`, if a node does.
    pub fn producer(&self, v: ValueId) -> Option<NodeId> {
        self.value(v).producer.map(|(n, _)| n)
    }

    /// Every (node, use) that reads `v`.
    pub fn uses(&self, v: ValueId) -> &[(NodeId, Use)] {
        &self.value(v).uses
    }

    /// The recorded dims of `v`, when its rank is known.
    pub fn dims_of(&self, v: ValueId) -> Option<Vec<Dim>> {
        self.value_type(v)?.shape
    }

    /// The names of the graph's outputs, in order.
    pub fn output_names(&self) -> Vec<String> {
        self.outputs
            .iter()
            .map(|p| self.value_name(p.value).to_string())
            .collect()
    }

    pub fn is_graph_output(&self, v: ValueId) -> bool {
        self.outputs.iter().any(|p| p.value == v)
    }

    pub fn is_graph_input(&self, v: ValueId) -> bool {
        self.inputs.iter().any(|p| p.value == v)
    }

    pub fn initializer(&self, v: ValueId) -> Option<&Tensor> {
        self.value(v).initializer.as_ref()
    }

    /// Initializers in file order.
    pub fn initializers(&self) -> impl Iterator<Item = (ValueId, &Tensor)> + '_ {
        self.initializer_order
            .iter()
            .filter_map(move |&v| self.value(v).initializer.as_ref().map(|t| (v, t)))
    }

    /// The bytes the initializers' data take (the weights a runner loads).
    pub fn initializer_bytes(&self) -> usize {
        self.initializers().map(|(_, t)| t.byte_len()).sum()
    }

    pub(crate) fn value_info_order(&self) -> &[ValueId] {
        &self.value_info_order
    }

    /// The recorded type of `v`: from its initializer, its `value_info` entry, or its graph
    /// input or output declaration.
    pub fn value_type(&self, v: ValueId) -> Option<ValueType> {
        let value = self.value(v);
        if let Some(t) = &value.initializer {
            return Some(ValueType::new(
                t.proto().data_type(),
                t.dims().iter().map(|&d| Dim::known(d)).collect(),
            ));
        }
        let declared = self
            .inputs
            .iter()
            .chain(&self.outputs)
            .find(|p| p.value == v)
            .map(|p| &p.decl);
        value
            .info
            .as_ref()
            .or(declared)
            .and_then(|info| info.r#type.as_ref())
            .and_then(ValueType::from_type_proto)
    }

    /// Records `t` as the type of `v` in its `value_info` entry (created if missing); graph
    /// inputs, outputs and initializers keep their declarations.
    /// A type without an element type is not recorded (ONNX Runtime refuses `elem_type 0`).
    pub fn set_value_type(&mut self, v: ValueId, t: &ValueType) {
        let declared = self.initializer(v).is_some() || self.is_graph_input(v);
        if t.elem == 0 || declared || self.is_graph_output(v) {
            return;
        }
        let mut info = self.value(v).info.clone().unwrap_or_default();
        info.name = Some(self.value_name(v).to_string());
        info.r#type = Some(t.to_type_proto());
        self.set_value_info(v, info);
    }

    /// The value of `v` when it is a constant: an initializer (that is not also a graph input,
    /// which a caller may override) or the output of a `Constant` node.
    pub fn constant(&self, v: ValueId) -> Option<Tensor> {
        if let Some(t) = self.initializer(v) {
            return (!self.is_graph_input(v)).then(|| t.clone());
        }
        let node = self.node(self.producer(v)?);
        if !node.is("Constant") {
            return None;
        }
        constant_node_value(&node.proto, self.value_name(v))
    }

    /// Checks that the graph's tables agree with one another and with petgraph's edges:
    /// every value has one name and at most one producer, each node's inputs and outputs
    /// are recorded on their values and mirrored by one edge each, every value read or
    /// written out exists, and the graph has no cycle. Patches keep these true; the pass
    /// manager checks them after every pass so that a bad rewrite is caught at its pass,
    /// never written out.
    pub fn check_invariants(&self) -> Result<()> {
        let broken = |msg: String| Err(Error::Patch(format!("broken graph: {msg}")));
        for (id, v) in self.values.iter().enumerate() {
            if self.by_name.get(&v.name) != Some(&ValueId(id as u32)) {
                return broken(format!("`{}` is not found by its name", v.name));
            }
        }
        if self.by_name.len() != self.values.len() {
            return broken("the name table and the value table differ".into());
        }
        let exists = |v: ValueId| {
            let value = self.value(v);
            !value.removed
                && (value.producer.is_some()
                    || value.initializer.is_some()
                    || value.sparse
                    || self.is_graph_input(v))
        };
        let mut edges = 0;
        for (id, node) in self.nodes() {
            for (slot, v) in node.outputs.iter().enumerate() {
                if let Some(v) = v {
                    if self.value(*v).producer != Some((id, slot)) {
                        return broken(format!(
                            "`{}` does not know `{}` produces it",
                            self.value_name(*v),
                            self.node_label(id)
                        ));
                    }
                }
            }
            let reads = node
                .inputs
                .iter()
                .enumerate()
                .filter_map(|(slot, v)| v.map(|v| (v, Use::Input(slot))))
                .chain(node.captured.iter().map(|&v| (v, Use::Captured)));
            for (v, use_) in reads {
                if !self.value(v).uses.contains(&(id, use_)) {
                    return broken(format!(
                        "`{}` does not know `{}` reads it",
                        self.value_name(v),
                        self.node_label(id)
                    ));
                }
                if !exists(v) {
                    return broken(format!(
                        "`{}` reads `{}`, which nothing writes",
                        self.node_label(id),
                        self.value_name(v)
                    ));
                }
                if self.value(v).producer.is_some() {
                    edges += 1;
                }
            }
        }
        let ordered: HashSet<ValueId> = self.initializer_order.iter().copied().collect();
        if ordered.len() != self.initializer_order.len() {
            return broken("an initializer is listed twice".into());
        }
        for (i, v) in self.values.iter().enumerate() {
            let me = Some(ValueId(i as u32));
            if let Some((p, slot)) = v.producer {
                if !self.contains_node(p) || self.node(p).outputs.get(slot).copied().flatten() != me
                {
                    return broken(format!(
                        "`{}` names a producer that does not write it",
                        v.name
                    ));
                }
            }
            for &(n, use_) in &v.uses {
                let recorded = self.contains_node(n)
                    && match use_ {
                        Use::Input(slot) => self.node(n).inputs.get(slot).copied().flatten() == me,
                        Use::Captured => me.is_some_and(|me| self.node(n).captured.contains(&me)),
                    };
                if !recorded {
                    return broken(format!("`{}` names a reader that does not read it", v.name));
                }
            }
            if v.initializer.is_some() != ordered.contains(&ValueId(i as u32)) {
                return broken(format!(
                    "initializer `{}` is not in the written order",
                    v.name
                ));
            }
        }
        if edges != self.dag.edge_count() {
            return broken(format!(
                "{} edges for {edges} reads of produced values",
                self.dag.edge_count()
            ));
        }
        for port in &self.outputs {
            if !exists(port.value) {
                return broken(format!(
                    "graph output `{}` is not written",
                    self.value_name(port.value)
                ));
            }
        }
        self.topological_order()?;
        Ok(())
    }

    /// Nodes in the order they are written: topological, ties broken by `OrderKey`.
    /// Fails on a cycle, naming a node on it.
    pub fn topological_order(&self) -> Result<Vec<NodeId>> {
        let mut pending: HashMap<NodeId, usize> = self
            .dag
            .node_indices()
            .map(|n| (n, self.dag.edges_directed(n, Direction::Incoming).count()))
            .collect();
        let mut ready: BinaryHeap<std::cmp::Reverse<(OrderKey, NodeId)>> = pending
            .iter()
            .filter(|(_, &deg)| deg == 0)
            .map(|(&n, _)| std::cmp::Reverse((self.dag[n].order, n)))
            .collect();
        let mut order = Vec::with_capacity(self.dag.node_count());
        while let Some(std::cmp::Reverse((_, n))) = ready.pop() {
            order.push(n);
            for e in self.dag.edges_directed(n, Direction::Outgoing) {
                let deg = pending.entry(e.target()).or_default();
                *deg -= 1;
                if *deg == 0 {
                    ready.push(std::cmp::Reverse((self.dag[e.target()].order, e.target())));
                }
            }
        }
        if order.len() != self.dag.node_count() {
            let stuck = pending
                .iter()
                .filter(|(_, &d)| d > 0)
                .map(|(&n, _)| n)
                .min_by_key(|&n| self.dag[n].order)
                .map(|n| self.node_label(n))
                .unwrap_or_default();
            return Err(Error::Cycle(stuck));
        }
        Ok(order)
    }

    /// A readable handle for a node in messages: its name, or its op type and first output.
    pub fn node_label(&self, n: NodeId) -> String {
        let node = &self.dag[n];
        if !node.name().is_empty() {
            return node.name().to_string();
        }
        match node.output(0) {
            Some(v) => format!("{} -> {}", node.op_type(), self.value_name(v)),
            None => node.op_type().to_string(),
        }
    }

    /// The petgraph graph itself, for algorithms that want it (read-only).
    pub fn dag(&self) -> &StableDiGraph<Node, Flow> {
        &self.dag
    }

    // ---- building and mutating ------------------------------------------------------------
    // These keep producers, uses and edges consistent. They are crate-private: passes go
    // through `Patch`, loaders through `convert`.

    /// The value named `name`, created if it does not exist yet.
    pub(crate) fn intern(&mut self, name: &str) -> ValueId {
        if let Some(&id) = self.by_name.get(name) {
            return id;
        }
        let id = ValueId(self.values.len() as u32);
        self.values.push(Value {
            name: name.to_string(),
            producer: None,
            uses: Vec::new(),
            info: None,
            initializer: None,
            sparse: false,
            removed: false,
        });
        self.by_name.insert(name.to_string(), id);
        id
    }

    /// A new value whose name starts with `hint` and is used by no other value.
    pub(crate) fn fresh_value(&mut self, hint: &str) -> ValueId {
        let name = unique_name(hint, |n| self.by_name.contains_key(n));
        self.intern(&name)
    }

    /// A node name starting with `hint` that no node uses yet.
    pub(crate) fn fresh_node_name(&self, hint: &str) -> String {
        unique_name(hint, |n| self.node_names.contains(n))
    }

    pub(crate) fn set_initializer(&mut self, v: ValueId, tensor: Tensor) {
        let value = &mut self.values[v.index()];
        if value.initializer.is_none() {
            self.initializer_order.push(v);
        }
        value.initializer = Some(tensor);
        value.removed = false;
    }

    /// Sets the element type in the declarations of graph input or output `v`, and in its
    /// `value_info` entry if it has one.
    pub(crate) fn declare_elem_type(&mut self, v: ValueId, elem: i32) {
        for port in self.inputs.iter_mut().chain(self.outputs.iter_mut()) {
            if port.value == v {
                set_elem_type(&mut port.decl, elem);
            }
        }
        if let Some(info) = &mut self.values[v.index()].info {
            set_elem_type(info, elem);
        }
    }

    /// Gives `v`'s `value_info` entry, if it has one, the type `t`; a graph input or output
    /// that is `v` takes `t`'s element type (its declared shape stays, possibly symbolic).
    pub(crate) fn declare_type(&mut self, v: ValueId, t: &ValueType) {
        self.declare_elem_type(v, t.elem);
        if let Some(info) = &mut self.values[v.index()].info {
            info.r#type = Some(t.to_type_proto());
        }
    }

    pub(crate) fn take_initializer(&mut self, v: ValueId) -> Option<Tensor> {
        let t = self.values[v.index()].initializer.take();
        if t.is_some() {
            self.initializer_order.retain(|&x| x != v);
            if !self.is_graph_input(v) {
                self.values[v.index()].removed = true;
            }
        }
        t
    }

    pub(crate) fn mark_sparse(&mut self, v: ValueId) {
        self.values[v.index()].sparse = true;
    }

    pub(crate) fn set_value_info(&mut self, v: ValueId, info: ValueInfoProto) {
        if self.values[v.index()].info.is_none() {
            self.value_info_order.push(v);
        }
        self.values[v.index()].info = Some(info);
    }

    /// Next major order key, for nodes that are appended rather than anchored.
    pub(crate) fn next_order(&mut self) -> OrderKey {
        let key = OrderKey {
            major: self.next_major,
            minor: 0,
        };
        self.next_major += 1;
        key
    }

    /// An order key that sorts just after `anchor` (and after earlier keys made from it).
    pub(crate) fn order_after(&mut self, anchor: OrderKey) -> OrderKey {
        self.next_minor += 1;
        OrderKey {
            major: anchor.major,
            minor: self.next_minor,
        }
    }

    /// Adds a node. Its outputs must not be produced yet; its inputs and captured values
    /// must exist (or be produced later, while loading).
    pub(crate) fn add_node(&mut self, node: Node) -> Result<NodeId> {
        for v in node.outputs.iter().flatten() {
            let value = &self.values[v.index()];
            if value.producer.is_some() || value.initializer.is_some() || self.is_graph_input(*v) {
                return Err(Error::DuplicateProducer(value.name.clone()));
            }
        }
        if !node.name().is_empty() {
            self.node_names.insert(node.name().to_string());
        }
        let inputs: Vec<(usize, ValueId)> = node
            .inputs
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i, v)))
            .collect();
        let outputs: Vec<(usize, ValueId)> = node
            .outputs
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i, v)))
            .collect();
        let captured = node.captured.clone();
        self.next_major = self.next_major.max(node.order.major + 1);
        let id = self.dag.add_node(node);
        for (slot, v) in outputs {
            let value = &mut self.values[v.index()];
            value.producer = Some((id, slot));
            value.removed = false;
            // Consumers added before their producer (out-of-order files) get their edges now.
            let consumers: Vec<(NodeId, Use)> = value.uses.clone();
            for (consumer, use_) in consumers {
                self.dag.add_edge(
                    id,
                    consumer,
                    Flow {
                        value: v,
                        slot: use_,
                    },
                );
            }
        }
        for (slot, v) in inputs {
            self.attach_use(id, v, Use::Input(slot));
        }
        for v in captured {
            self.attach_use(id, v, Use::Captured);
        }
        Ok(id)
    }

    fn attach_use(&mut self, node: NodeId, v: ValueId, use_: Use) {
        self.values[v.index()].uses.push((node, use_));
        if let Some((producer, _)) = self.values[v.index()].producer {
            self.dag.add_edge(
                producer,
                node,
                Flow {
                    value: v,
                    slot: use_,
                },
            );
        }
    }

    fn detach_use(&mut self, node: NodeId, v: ValueId, use_: Use) {
        let uses = &mut self.values[v.index()].uses;
        if let Some(pos) = uses.iter().position(|&u| u == (node, use_)) {
            uses.swap_remove(pos);
        }
        if let Some((producer, _)) = self.values[v.index()].producer {
            let edge = self
                .dag
                .edges_connecting(producer, node)
                .find(|e| {
                    *e.weight()
                        == Flow {
                            value: v,
                            slot: use_,
                        }
                })
                .map(|e| e.id());
            if let Some(e) = edge {
                self.dag.remove_edge(e);
            }
        }
    }

    /// Removes a node. Its outputs lose their producer and are marked removed; readers of
    /// those outputs must have been redirected first (`Patch` checks this).
    pub(crate) fn remove_node(&mut self, id: NodeId) -> Option<Node> {
        let node = self.dag.node_weight(id)?.clone();
        for (slot, v) in node.inputs.iter().enumerate() {
            if let Some(v) = v {
                self.detach_use(id, *v, Use::Input(slot));
            }
        }
        for v in &node.captured {
            self.detach_use(id, *v, Use::Captured);
        }
        for v in node.outputs.iter().flatten() {
            let value = &mut self.values[v.index()];
            value.producer = None;
            value.removed = true;
        }
        if !node.name().is_empty() {
            self.node_names.remove(node.name());
        }
        self.dag.remove_node(id)
    }

    /// Replaces the attributes of `node` (an `If` whose branches were rewritten) and reads
    /// again which values of this graph its subgraphs capture; each must exist here.
    pub(crate) fn replace_subgraphs(
        &mut self,
        node: NodeId,
        attributes: Vec<AttributeProto>,
    ) -> Result<()> {
        let mut captured = Vec::new();
        for name in super::convert::captured_names(&attributes) {
            let v = self.find_value(&name).ok_or_else(|| {
                Error::Patch(format!(
                    "a rewritten subgraph reads `{name}`, which is not here"
                ))
            })?;
            captured.push(v);
        }
        for v in std::mem::take(&mut self.dag[node].captured) {
            self.detach_use(node, v, Use::Captured);
        }
        self.dag[node].proto.attribute = attributes;
        for &v in &captured {
            self.attach_use(node, v, Use::Captured);
        }
        self.dag[node].captured = captured;
        Ok(())
    }

    /// Points input `slot` of `node` at `value`.
    pub(crate) fn set_input(&mut self, node: NodeId, slot: usize, value: Option<ValueId>) {
        if let Some(old) = self.dag[node].input(slot) {
            self.detach_use(node, old, Use::Input(slot));
        }
        let inputs = &mut self.dag[node].inputs;
        if inputs.len() <= slot {
            inputs.resize(slot + 1, None);
        }
        inputs[slot] = value;
        if let Some(v) = value {
            self.attach_use(node, v, Use::Input(slot));
        }
    }

    /// Gives `v` a new name. Refused when a subgraph reads it by name.
    pub(crate) fn rename_value(&mut self, v: ValueId, name: &str) -> Result<()> {
        if self.values[v.index()]
            .uses
            .iter()
            .any(|(_, u)| *u == Use::Captured)
        {
            return Err(Error::Patch(format!(
                "cannot rename `{}`: a subgraph reads it by name",
                self.values[v.index()].name
            )));
        }
        if self.by_name.contains_key(name) {
            return Err(Error::Patch(format!("value name `{name}` is taken")));
        }
        let old = std::mem::replace(&mut self.values[v.index()].name, name.to_string());
        self.by_name.remove(&old);
        self.by_name.insert(name.to_string(), v);
        Ok(())
    }

    /// Moves the name of `from` to `to` and gives `from` a fresh name: used when `to`
    /// replaces `from` as a graph output, whose name the user's code depends on.
    pub(crate) fn swap_names(&mut self, from: ValueId, to: ValueId) -> Result<()> {
        let name = self.values[from.index()].name.clone();
        let parked = unique_name(&format!("{name}_replaced"), |n| {
            self.by_name.contains_key(n)
        });
        self.rename_value(from, &parked)?;
        self.rename_value(to, &name)
    }
}

/// The tensor a `Constant` node produces, from whichever of its attributes is set.
fn constant_node_value(node: &NodeProto, name: &str) -> Option<Tensor> {
    let a = node.attribute.first()?;
    let tensor = match a.name() {
        "value" => Tensor::from_proto(a.t.clone()?),
        "value_float" => Tensor::from_f32(name, &[], &[a.f?]),
        "value_floats" => Tensor::from_f32(name, &[a.floats.len() as i64], &a.floats),
        "value_int" => Tensor::from_i64(name, &[], &[a.i?]),
        "value_ints" => Tensor::from_i64(name, &[a.ints.len() as i64], &a.ints),
        _ => return None,
    };
    tensor.ok()
}

fn set_elem_type(info: &mut ValueInfoProto, elem: i32) {
    use crate::proto::type_proto::{Tensor as TensorType, Value as Type};
    let ty = info.r#type.get_or_insert_with(Default::default);
    match &mut ty.value {
        Some(Type::TensorType(t)) => t.elem_type = Some(elem),
        _ => {
            ty.value = Some(Type::TensorType(TensorType {
                elem_type: Some(elem),
                shape: None,
            }))
        }
    }
}

/// `hint` if `taken` says it is free, else `hint_1`, `hint_2`, …
fn unique_name(hint: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(hint) {
        return hint.to_string();
    }
    (1..)
        .map(|i| format!("{hint}_{i}"))
        .find(|n| !taken(n))
        .unwrap_or_else(|| hint.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{model, model_proto, ops};
    use super::*;
    use crate::ir::Model;

    #[test]
    fn nodes_listed_out_of_order_load_and_are_written_in_order() {
        let m = model(
            &["x"],
            &["z"],
            &[],
            &[("Neg", &["y"], &["z"]), ("Relu", &["x"], &["y"])],
        );
        assert_eq!(ops(&m), ["Relu", "Neg"]);
    }

    #[test]
    fn an_untouched_graph_keeps_its_node_order() {
        let m = model(
            &["x"],
            &["a", "b"],
            &[],
            &[("Neg", &["x"], &["b"]), ("Relu", &["x"], &["a"])],
        );
        assert_eq!(ops(&m), ["Neg", "Relu"]);
    }

    #[test]
    fn uses_and_producers_are_tracked() {
        let m = model(
            &["x"],
            &["y"],
            &["w"],
            &[("Mul", &["x", "w"], &["m"]), ("Add", &["m", "m"], &["y"])],
        );
        let g = &m.graph;
        let mv = g.find_value("m").unwrap();
        let add = g.producer(g.find_value("y").unwrap()).unwrap();
        assert_eq!(g.uses(mv), &[(add, Use::Input(0)), (add, Use::Input(1))]);
        assert_eq!(
            g.dag()
                .edges_connecting(g.producer(mv).unwrap(), add)
                .count(),
            2
        );
        assert!(g.initializer(g.find_value("w").unwrap()).is_some());
        assert_eq!(g.producer(g.find_value("x").unwrap()), None);
    }

    #[test]
    fn cycles_and_double_producers_are_refused() {
        let cyclic = model_proto(
            &["x"],
            &["y"],
            &[],
            &[
                ("Relu", &["b"], &["a"]),
                ("Relu", &["a"], &["b"]),
                ("Relu", &["x"], &["y"]),
            ],
        );
        assert!(matches!(Model::from_proto(cyclic), Err(Error::Cycle(_))));
        let twice = model_proto(
            &["x"],
            &["y"],
            &[],
            &[("Relu", &["x"], &["y"]), ("Neg", &["x"], &["y"])],
        );
        assert!(matches!(Model::from_proto(twice), Err(Error::DuplicateProducer(n)) if n == "y"));
    }

    #[test]
    fn values_written_by_several_constants_keep_the_last_as_onnx_runtime_does() {
        use crate::ir::testing::{builder, written};
        use crate::ir::{DataType, Tensor};
        let c = |v: f32| Tensor::from_f32("c", &[], &[v]).unwrap();
        let same = builder()
            .input("x", DataType::Float, &["2"])
            .output("y", DataType::Float, &["2"])
            .constant("c", c(2.0))
            .constant("c", c(2.0))
            .node("Mul", &["x", "c"], &["y"], vec![])
            .build();
        assert_eq!(written(&same).node.len(), 2);
        assert_eq!(
            same.repairs,
            ["value `c` was written by 2 Constant nodes (identical; one is kept)"]
        );
        let different = builder()
            .input("x", DataType::Float, &["2"])
            .output("y", DataType::Float, &["2"])
            .init(c(1.0))
            .constant("c", c(2.0))
            .node("Mul", &["x", "c"], &["y"], vec![])
            .constant("c", c(3.0))
            .build();
        let c = different.graph.find_value("c").unwrap();
        assert_eq!(different.graph.constant(c).unwrap().scalar_f64(), Some(3.0));
        assert!(different.graph.initializer(c).is_none());
        assert!(different.repairs[0].contains("an initializer and 2 Constant nodes"));
        different.graph.check_invariants().unwrap();
    }

    #[test]
    fn fresh_names_do_not_collide() {
        let mut m = model(&["x"], &["y"], &[], &[("Relu", &["x"], &["y"])]);
        let a = m.graph.fresh_value("y");
        let b = m.graph.fresh_value("y");
        assert_eq!(m.graph.value_name(a), "y_1");
        assert_eq!(m.graph.value_name(b), "y_2");
    }
}
