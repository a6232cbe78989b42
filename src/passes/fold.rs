//! Constant folding.
//!
//! Matches: nodes whose inputs are all constants (initializers that are not graph inputs,
//! `Constant` node outputs, and values folded in the same run), and small integer values
//! (rank 0 or 1) whose every element shape inference knows although they are computed from
//! graph inputs: `Shape` and `Size` of a value of static shape, and the shape chains built
//! on them (a head size sliced off `Concat(Shape(x)[0:2], [4, 16])`, which the SDPA export
//! scales attention by).
//! Produces: each value that the rest of the graph (or a graph output) reads from this
//! constant region becomes an initializer holding its value, under its own name; the region's
//! nodes go, and so do the constants that only they read.
//! How: the region is evaluated at once in tract, as a small model holding just its nodes,
//! their constant inputs as initializers and every value they compute as an output, run once
//! with no inputs. If tract refuses that model, the nodes are run one by one and those it
//! cannot run stay, with whatever depends on them: an error from tract means "do not fold".
//! Never inflates the file: the results are kept only if their bytes do not exceed those of
//! the constants that die with them (results sharing a dead constant are weighed together;
//! results of at most `TINY` bytes always pass). Where results are too big, the node
//! computing the biggest stays and its inputs are weighed instead: so an Expand or a
//! ConstantOfShape of a small constant into a big tensor stays, and so does a Transpose of a
//! weight that other nodes still read (a node whose result could never be kept this way is not
//! even evaluated: `Region::drop_unpayable`).
//! Safe because: a deterministic operator given constant inputs computes the same value on
//! every run; a result whose element type or static dims disagree with the recorded type is
//! not used. Integer, bool and data-movement results are exact; float arithmetic is exact up
//! to rounding: tract's plain evaluation may round differently from the kernels a runtime
//! (tract included) uses, by a few units in the last place (see the node tests in
//! `tests/conformance.rs`).
//! Left alone: random generators and Dropout in training (`matching::is_deterministic`),
//! nodes holding subgraphs, operators of other domains (tract ignores domains: see
//! `exec::support`), calls of model-local functions, and nodes without inputs (`Constant`
//! nodes stay as they are).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::matching::{has_subgraph, is_deterministic};
use super::{Pass, Rewrites};
use crate::error::Result;
use crate::exec::{self, Batch, ExecError, Runner};
use crate::ir::{DataType, Dim, Graph, Model, Node, NodeId, Patch, Tensor, ValueId};
use crate::passes::shape::Inference;
use crate::proto::{GraphProto, ModelProto, ValueInfoProto};

/// Results of at most this many bytes are always worth folding: each replaces at least a
/// node, which takes more room in the file than the few values it computes.
const TINY: usize = 64;

pub struct ConstantFolding;

impl Pass for ConstantFolding {
    fn name(&self) -> &'static str {
        "fold"
    }

    fn run(&self, model: &mut Model) -> Result<Rewrites> {
        let mut rewrites = Rewrites::default();
        let region = Region::find(model)?;
        if region.nodes.is_empty() {
            return Ok(rewrites);
        }
        let values = region.evaluate(model);
        let g = &model.graph;
        let evaluated = region.evaluated(g, &values);
        let plan = Plan::within_budget(g, &evaluated, &values, &region.inferred);
        if plan.removed.is_empty() {
            return Ok(rewrites);
        }
        let mut patch = Patch::new("fold");
        for &n in &plan.removed {
            patch.remove_node(n);
        }
        for &v in &plan.dead_constants {
            match g.producer(v) {
                Some(constant_node) => patch.remove_node(constant_node),
                None => patch.drop_initializer(v),
            };
        }
        for &v in &plan.results {
            if let Some(t) = values.get(&v) {
                patch.replace_with_initializer(v, t.clone());
            }
        }
        let inferred = plan
            .removed
            .iter()
            .filter(|&&n| region.inferred.contains(&n))
            .count();
        model.graph.apply(patch)?;
        rewrites.add("fold", plan.removed.len() - inferred);
        rewrites.add("fold-shape", inferred);
        Ok(rewrites)
    }
}

/// The nodes that compute constants, in written order.
struct Region {
    nodes: Vec<NodeId>,
    /// Nodes whose value comes from shape inference (see `inferred_value`), not from tract.
    inferred: HashSet<NodeId>,
    /// Their values.
    inferred_values: HashMap<ValueId, Tensor>,
}

impl Region {
    /// The constant region of the model, cut down to the nodes whose results are read
    /// outside it (the rest is dead code, for DCE).
    fn find(model: &Model) -> Result<Region> {
        let g = &model.graph;
        let inference = crate::passes::shape::infer(model);
        let mut constant: HashSet<ValueId> = HashSet::new();
        let mut region = Region {
            nodes: Vec::new(),
            inferred: HashSet::new(),
            inferred_values: HashMap::new(),
        };
        for id in g.topological_order()? {
            let node = g.node(id);
            let outputs = node.outputs.iter().flatten().copied();
            let leaf = |v| constant.contains(&v) || is_leaf(g, v);
            let inferred = match foldable(model, node, &leaf) {
                true => None,
                false => inferred_value(model, &inference, node),
            };
            if let Some((out, t)) = inferred {
                region.inferred.insert(id);
                region.inferred_values.insert(out, t);
                region.nodes.push(id);
                constant.insert(out);
            } else if foldable(model, node, &|v| constant.contains(&v) || is_leaf(g, v)) {
                region.nodes.push(id);
                constant.extend(outputs);
            }
        }
        region.keep_needed(g);
        region.drop_unpayable(g, &inference);
        Ok(region)
    }

    /// Drops the nodes whose result `Plan::within_budget` would never keep, before they are
    /// evaluated: nodes read only outside the region, whose inputs are all constants that
    /// something outside the region reads too (so none dies to pay for the result), and whose
    /// result is known to exceed `TINY` bytes. Evaluating one would copy its inputs into tract
    /// for nothing, on every round: the Transpose of a decoder's tied embedding table (a
    /// gigabyte in a 1B model) that its LM head reads.
    fn drop_unpayable(&mut self, g: &Graph, inference: &Inference) {
        let inside: HashSet<NodeId> = self.nodes.iter().copied().collect();
        let read_outside =
            |v: ValueId| g.is_graph_output(v) || g.uses(v).iter().any(|(r, _)| !inside.contains(r));
        let known_bytes = |v: ValueId| {
            let t = inference.types.get(&v)?;
            let n = crate::ir::tensor::element_count(&t.static_shape()?)?;
            crate::ir::tensor::raw_byte_len(DataType::try_from(t.elem).ok()?, n)
        };
        let unpayable = |n: NodeId| {
            let node = g.node(n);
            let outputs: Vec<ValueId> = node.outputs.iter().flatten().copied().collect();
            !self.inferred.contains(&n)
                && node.inputs.iter().flatten().next().is_some()
                && node
                    .inputs
                    .iter()
                    .flatten()
                    .all(|&v| is_leaf(g, v) && read_outside(v))
                && outputs.iter().all(|&v| {
                    g.uses(v).iter().all(|(r, _)| !inside.contains(r))
                        && known_bytes(v).is_some_and(|b| b > TINY)
                })
        };
        let dropped: HashSet<NodeId> = self
            .nodes
            .iter()
            .copied()
            .filter(|&n| unpayable(n))
            .collect();
        self.nodes.retain(|n| !dropped.contains(n));
    }

    /// Drops the nodes none of whose results reaches a reader outside the region.
    fn keep_needed(&mut self, g: &Graph) {
        let inside: HashSet<NodeId> = self.nodes.iter().copied().collect();
        let mut needed: HashSet<NodeId> = HashSet::new();
        let mut stack: Vec<NodeId> = self
            .nodes
            .iter()
            .copied()
            .filter(|&n| !results_of(g, n, &inside).is_empty())
            .collect();
        while let Some(n) = stack.pop() {
            if !needed.insert(n) || self.inferred.contains(&n) {
                continue;
            }
            stack.extend(
                g.node(n)
                    .inputs
                    .iter()
                    .flatten()
                    .filter_map(|&v| g.producer(v))
                    .filter(|p| inside.contains(p)),
            );
        }
        self.nodes.retain(|n| needed.contains(n));
    }

    /// The value of everything the region computes that tract (or a recorded type) gives.
    fn evaluate(&self, model: &Model) -> HashMap<ValueId, Tensor> {
        let mut values = self.inferred_values.clone();
        let in_tract: Vec<NodeId> = self
            .nodes
            .iter()
            .copied()
            .filter(|n| !self.inferred.contains(n))
            .collect();
        if in_tract.is_empty() {
            return values;
        }
        match run_in_tract(model, &in_tract, &values) {
            Ok(computed) => values.extend(computed),
            // One node tract cannot run spoils the whole model: find which, one by one.
            Err(_) => {
                for &n in &in_tract {
                    let inputs_known = model
                        .graph
                        .node(n)
                        .inputs
                        .iter()
                        .flatten()
                        .all(|v| values.contains_key(v) || is_leaf(&model.graph, *v));
                    if inputs_known {
                        if let Ok(computed) = run_in_tract(model, &[n], &values) {
                            values.extend(computed);
                        }
                    }
                }
            }
        }
        values
    }

    /// The nodes whose every output got a value that fits its recorded type, and whose
    /// inputs come from such nodes or from constants.
    fn evaluated(&self, g: &Graph, values: &HashMap<ValueId, Tensor>) -> Vec<NodeId> {
        let mut good: HashSet<ValueId> = HashSet::new();
        let mut nodes = Vec::new();
        for &n in &self.nodes {
            let node = g.node(n);
            let inputs_good = self.inferred.contains(&n)
                || node
                    .inputs
                    .iter()
                    .flatten()
                    .all(|v| good.contains(v) || is_leaf(g, *v));
            let outputs_good = node
                .outputs
                .iter()
                .flatten()
                .all(|v| values.get(v).is_some_and(|t| fits_recorded_type(g, *v, t)));
            if inputs_good && outputs_good {
                good.extend(node.outputs.iter().flatten());
                nodes.push(n);
            }
        }
        nodes
    }
}

/// True when `node` can be evaluated once its inputs are: a deterministic ONNX operator
/// with at least one input, all of them constant, no subgraph, and not a local function.
fn foldable(model: &Model, node: &Node, is_constant: &dyn Fn(ValueId) -> bool) -> bool {
    let calls_local_function = model
        .envelope
        .functions
        .iter()
        .any(|f| f.name() == node.op_type() && f.domain() == node.domain());
    let mut inputs = node.inputs.iter().flatten().peekable();
    inputs.peek().is_some()
        && !node.is("Constant")
        && is_deterministic(model, node)
        && !has_subgraph(node)
        && !calls_local_function
        && inputs.all(|&v| is_constant(v))
}

/// True for a constant that needs no computing: an initializer that is not a graph input,
/// or the output of a `Constant` node whose value can be read.
fn is_leaf(g: &Graph, v: ValueId) -> bool {
    match g.producer(v) {
        None => g.initializer(v).is_some() && !g.is_graph_input(v),
        Some(n) => g.node(n).is("Constant") && g.constant(v).is_some(),
    }
}

fn leaf_bytes(g: &Graph, v: ValueId) -> usize {
    match g.initializer(v) {
        Some(t) => t.byte_len(),
        None => g.constant(v).map_or(0, |t| t.byte_len()),
    }
}

/// The value of `node`'s one output when shape inference knows every element of it: an
/// int64 or int32 tensor of rank 0 or 1 (a shape, a dim, a head size), computed by a
/// deterministic ONNX operator. Exact, as inference only knows values it derived exactly.
fn inferred_value(model: &Model, inference: &Inference, node: &Node) -> Option<(ValueId, Tensor)> {
    let g = &model.graph;
    let computes = !node.is("Constant") && is_deterministic(model, node) && !has_subgraph(node);
    let [Some(out)] = node.outputs.as_slice() else {
        return None;
    };
    if !computes || !node.domain().is_empty() {
        return None;
    }
    let t = inference.types.get(out)?;
    let elements: Vec<i64> = inference
        .value(*out)?
        .iter()
        .map(Dim::value)
        .collect::<Option<_>>()?;
    let dims: Vec<i64> = match t.shape.as_deref()? {
        [] if elements.len() == 1 => vec![],
        [d] if d.value() == Some(elements.len() as i64) => vec![elements.len() as i64],
        _ => return None,
    };
    let name = g.value_name(*out);
    let tensor = match DataType::try_from(t.elem).ok()? {
        DataType::Int64 => Tensor::from_i64(name, &dims, &elements).ok()?,
        DataType::Int32 => {
            let narrow: Vec<i32> = elements
                .iter()
                .map(|&e| i32::try_from(e).ok())
                .collect::<Option<_>>()?;
            let raw: Vec<u8> = narrow.iter().flat_map(|v| v.to_le_bytes()).collect();
            Tensor::from_raw(name, DataType::Int32, &dims, raw.into()).ok()?
        }
        _ => return None,
    };
    Some((*out, tensor))
}

/// True unless `v`'s recorded type says another element type or other static dims than `t`
/// has: then tract computed something else than the model means, and it is not used.
fn fits_recorded_type(g: &Graph, v: ValueId, t: &Tensor) -> bool {
    let Some(recorded) = g.value_type(v) else {
        return true;
    };
    let elem_fits = recorded.elem == 0 || recorded.elem == t.proto().data_type();
    let dims_fit = recorded.shape.is_none_or(|dims| {
        dims.len() == t.dims().len()
            && dims
                .iter()
                .zip(t.dims())
                .all(|(d, &n)| d.value().is_none_or(|v| v == n))
    });
    elem_fits && dims_fit
}

/// Runs `nodes` (in written order) in tract, their inputs taken from `known` or from the
/// graph's constants, and returns the value of every output.
fn run_in_tract(
    model: &Model,
    nodes: &[NodeId],
    known: &HashMap<ValueId, Tensor>,
) -> std::result::Result<HashMap<ValueId, Tensor>, ExecError> {
    let g = &model.graph;
    let inside: HashSet<ValueId> = nodes
        .iter()
        .flat_map(|&n| g.node(n).outputs.iter().flatten().copied())
        .collect();
    let name = |v: Option<ValueId>| v.map(|v| g.value_name(v).to_string()).unwrap_or_default();
    let mut graph = GraphProto {
        name: Some("constants".into()),
        ..Default::default()
    };
    let mut fed: HashSet<ValueId> = HashSet::new();
    let mut outputs: Vec<ValueId> = Vec::new();
    for &n in nodes {
        let node = g.node(n);
        for &v in node.inputs.iter().flatten() {
            if inside.contains(&v) || !fed.insert(v) {
                continue;
            }
            let mut t = match known.get(&v) {
                Some(t) => t.clone(),
                None => g.constant(v).ok_or_else(|| {
                    ExecError::Input(format!("`{}` is not a constant", g.value_name(v)))
                })?,
            };
            t.set_name(g.value_name(v));
            graph.initializer.push(t.into_proto());
        }
        let mut proto = node.proto.clone();
        proto.input = node.inputs.iter().map(|&v| name(v)).collect();
        proto.output = node.outputs.iter().map(|&v| name(v)).collect();
        graph.node.push(proto);
        for &v in node.outputs.iter().flatten() {
            outputs.push(v);
            graph.output.push(ValueInfoProto {
                name: Some(g.value_name(v).to_string()),
                ..Default::default()
            });
        }
    }
    let constants = Model::from_proto(ModelProto {
        ir_version: model.envelope.ir_version,
        opset_import: model.envelope.opset_import.clone(),
        graph: Some(graph),
        ..Default::default()
    })?;
    let no_inputs = Batch {
        name: "constants".into(),
        tensors: Vec::new(),
    };
    let results = Runner::new(&constants)?.run(&no_inputs)?;
    outputs
        .into_iter()
        .zip(results)
        .map(|(v, (name, t))| Ok((v, exec::from_tract(&name, &t)?)))
        .collect()
}

/// The outputs of `node` that something outside `inside` reads, or that are graph outputs.
fn results_of(g: &Graph, node: NodeId, inside: &HashSet<NodeId>) -> Vec<ValueId> {
    g.node(node)
        .outputs
        .iter()
        .flatten()
        .copied()
        .filter(|&v| g.is_graph_output(v) || g.uses(v).iter().any(|(r, _)| !inside.contains(r)))
        .collect()
}

/// What one fold removes and what it writes instead.
struct Plan {
    removed: Vec<NodeId>,
    /// Values that become initializers.
    results: Vec<ValueId>,
    /// Initializers and `Constant` outputs that only removed nodes read.
    dead_constants: Vec<ValueId>,
}

impl Plan {
    /// Folds as much of `evaluated` as the size budget allows (see the module doc).
    fn within_budget(
        g: &Graph,
        evaluated: &[NodeId],
        values: &HashMap<ValueId, Tensor>,
        inferred: &HashSet<NodeId>,
    ) -> Plan {
        let bytes = |v: &ValueId| values.get(v).map_or(0, Tensor::byte_len);
        let mut kept: HashSet<NodeId> = HashSet::new();
        loop {
            let removed: Vec<NodeId> = evaluated
                .iter()
                .copied()
                .filter(|n| !kept.contains(n))
                .collect();
            let removed_set: HashSet<NodeId> = removed.iter().copied().collect();
            let results: Vec<ValueId> = removed
                .iter()
                .flat_map(|&n| results_of(g, n, &removed_set))
                .collect();
            let dead_constants = dead_constants(g, &removed);
            let dead: HashSet<ValueId> = dead_constants.iter().copied().collect();
            // Group the results that share a dead constant, and weigh each group.
            let mut group_of: Vec<usize> = (0..results.len()).collect();
            let mut owner: HashMap<ValueId, usize> = HashMap::new();
            for (i, &v) in results.iter().enumerate() {
                for leaf in cone_leaves(g, v, &removed_set, inferred) {
                    if !dead.contains(&leaf) {
                        continue;
                    }
                    match owner.get(&leaf) {
                        Some(&j) => union(&mut group_of, i, j),
                        None => {
                            owner.insert(leaf, i);
                        }
                    }
                }
            }
            // Groups are keyed by their first result, so the first group over budget is
            // the same on every run.
            let mut freed: HashMap<usize, usize> = HashMap::new();
            for (leaf, &i) in &owner {
                *freed.entry(find(&mut group_of, i)).or_default() += leaf_bytes(g, *leaf);
            }
            let mut written: BTreeMap<usize, (usize, Option<ValueId>)> = BTreeMap::new();
            for (i, v) in results.iter().enumerate() {
                if bytes(v) <= TINY {
                    continue;
                }
                let entry = written.entry(find(&mut group_of, i)).or_default();
                entry.0 += bytes(v);
                if entry.1.is_none_or(|biggest| bytes(v) > bytes(&biggest)) {
                    entry.1 = Some(*v);
                }
            }
            let over = written.iter().find_map(|(group, (total, biggest))| {
                (*total > freed.get(group).copied().unwrap_or(0)).then_some(*biggest)
            });
            match over.flatten().and_then(|v| g.producer(v)) {
                Some(producer) => {
                    kept.insert(producer);
                }
                None => {
                    return Plan {
                        removed,
                        results,
                        dead_constants,
                    }
                }
            }
        }
    }
}

/// Constants read only by `removed` nodes (and not graph outputs), in a stable order.
fn dead_constants(g: &Graph, removed: &[NodeId]) -> Vec<ValueId> {
    let removed_set: HashSet<NodeId> = removed.iter().copied().collect();
    let mut seen = HashSet::new();
    removed
        .iter()
        .flat_map(|&n| g.node(n).inputs.iter().flatten().copied())
        .filter(|&v| seen.insert(v) && is_leaf(g, v) && !g.is_graph_output(v))
        .filter(|&v| g.uses(v).iter().all(|(r, _)| removed_set.contains(r)))
        .collect()
}

/// The constants that the computation of `v` reads, through `removed` nodes.
fn cone_leaves(
    g: &Graph,
    v: ValueId,
    removed: &HashSet<NodeId>,
    inferred: &HashSet<NodeId>,
) -> HashSet<ValueId> {
    let mut leaves = HashSet::new();
    let mut seen = HashSet::new();
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        match g.producer(v).filter(|n| removed.contains(n)) {
            // A Shape folded from a type reads no constant: its input is computed.
            Some(n) if inferred.contains(&n) => {}
            Some(n) => stack.extend(g.node(n).inputs.iter().flatten()),
            None if is_leaf(g, v) => {
                leaves.insert(v);
            }
            None => {}
        }
    }
    leaves
}

fn find(parent: &mut [usize], i: usize) -> usize {
    let mut root = i;
    while parent[root] != root {
        root = parent[root];
    }
    let mut i = i;
    while parent[i] != root {
        let next = parent[i];
        parent[i] = root;
        i = next;
    }
    root
}

fn union(parent: &mut [usize], a: usize, b: usize) {
    let (ra, rb) = (find(parent, a), find(parent, b));
    parent[ra.max(rb)] = ra.min(rb);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::attr;
    use crate::ir::testing::{builder, ops, written, Builder};
    use crate::ir::DataType;

    const F32: DataType = DataType::Float;

    fn f32s(name: &str, dims: &[i64], values: &[f32]) -> Tensor {
        Tensor::from_f32(name, dims, values).unwrap()
    }

    fn i64s(values: &[i64]) -> Tensor {
        Tensor::from_i64("", &[values.len() as i64], values).unwrap()
    }

    fn initializer(m: &Model, name: &str) -> Tensor {
        let g = &m.graph;
        g.initializer(g.find_value(name).unwrap())
            .unwrap_or_else(|| panic!("`{name}` is no initializer"))
            .clone()
    }

    #[test]
    fn a_constant_chain_becomes_one_initializer_under_its_name() {
        let mut m = builder()
            .input("x", F32, &["2"])
            .output("y", F32, &["2"])
            .constant("a", f32s("", &[2], &[1.0, 2.0]))
            .init(f32s("b", &[2], &[3.0, 4.0]))
            .node("Add", &["a", "b"], &["c"], vec![])
            .node("Neg", &["c"], &["d"], vec![])
            .node("Mul", &["x", "d"], &["y"], vec![])
            .build();
        let rewrites = ConstantFolding.run(&mut m).unwrap();
        assert_eq!(rewrites.0.get("fold"), Some(&2));
        assert_eq!(ops(&m), ["Mul"]);
        assert_eq!(initializer(&m, "d").to_f32_vec().unwrap(), [-4.0, -6.0]);
        let g = written(&m);
        assert_eq!(g.initializer.len(), 1, "a and b died with the chain");
        assert_eq!(g.node[0].input, ["x", "d"]);
        assert_eq!(ConstantFolding.run(&mut m).unwrap().total(), 0);
    }

    /// x: f32[2, 3] → Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 1)), [-1])).
    fn shape_plumbing(x_dims: &[&str]) -> Model {
        builder()
            .input("x", F32, x_dims)
            .output("y", F32, &["?", "?"])
            .constant("one", Tensor::from_i64("", &[], &[1]).unwrap())
            .constant("zero", i64s(&[0]))
            .constant("minus_one", i64s(&[-1]))
            .node("Shape", &["x"], &["s"], vec![])
            .node("Gather", &["s", "one"], &["d"], vec![attr::int("axis", 0)])
            .node("Unsqueeze", &["d", "zero"], &["u"], vec![])
            .node(
                "Concat",
                &["u", "minus_one"],
                &["shape"],
                vec![attr::int("axis", 0)],
            )
            .node("Reshape", &["x", "shape"], &["y"], vec![])
            .build()
    }

    #[test]
    fn shape_of_a_static_type_folds_with_what_follows() {
        let mut m = shape_plumbing(&["2", "3"]);
        let rewrites = ConstantFolding.run(&mut m).unwrap();
        assert_eq!(rewrites.0.get("fold-shape"), Some(&1));
        assert_eq!(rewrites.0.get("fold"), Some(&3));
        assert_eq!(ops(&m), ["Reshape"]);
        let shape = initializer(&m, "shape");
        assert_eq!(shape.dtype(), DataType::Int64);
        assert_eq!(shape.to_i64_vec().unwrap(), [3, -1]);
        // A symbolic batch: the dim read is still known, so the shape folds (the Shape node
        // is left to dead-code elimination).
        let mut m = shape_plumbing(&["batch", "3"]);
        assert!(ConstantFolding.run(&mut m).unwrap().total() > 0);
        assert_eq!(initializer(&m, "shape").to_i64_vec().unwrap(), [3, -1]);
        assert_eq!(ops(&m), ["Shape", "Reshape"]);
        // The dim read symbolic: nothing is constant.
        let mut m = shape_plumbing(&["2", "n"]);
        assert_eq!(ConstantFolding.run(&mut m).unwrap().total(), 0);
    }

    #[test]
    fn shape_start_and_end_slice_the_dims() {
        let m = builder()
            .opset(15)
            .input("x", F32, &["2", "3", "4"])
            .output("s", DataType::Int64, &["?"])
            .output("n", DataType::Int64, &[])
            .node("Shape", &["x"], &["s"], vec![attr::int("start", -2)])
            .node("Size", &["x"], &["n"], vec![])
            .build();
        let g = &m.graph;
        let inference = crate::passes::shape::infer(&m);
        let node = |out: &str| g.node(g.producer(g.find_value(out).unwrap()).unwrap());
        let (_, s) = inferred_value(&m, &inference, node("s")).unwrap();
        assert_eq!(s.to_i64_vec().unwrap(), [3, 4]);
        let (_, n) = inferred_value(&m, &inference, node("n")).unwrap();
        assert_eq!((n.dims(), n.to_i64_vec().unwrap()), (&[][..], vec![24]));
    }

    #[test]
    fn a_static_dim_computed_from_a_dynamic_shape_folds() {
        // The SDPA export's head size: the last element of Shape(x) for x [batch, 4, 16].
        let mut m = builder()
            .input("x", F32, &["batch", "4", "16"])
            .output("y", F32, &["1"])
            .init(Tensor::from_i64("last", &[1], &[-1]).unwrap())
            .init(Tensor::from_i64("end", &[1], &[i64::MAX]).unwrap())
            .node("Shape", &["x"], &["s"], vec![])
            .node("Slice", &["s", "last", "end"], &["h"], vec![])
            .node("Cast", &["h"], &["y"], vec![attr::int("to", 1)])
            .build();
        let rewrites = ConstantFolding.run(&mut m).unwrap();
        assert!(rewrites.0.contains_key("fold-shape"), "{rewrites}");
        assert_eq!(
            ops(&m),
            ["Shape"],
            "the dead Shape is left to dead-code elimination"
        );
        let y = initializer(&m, "y");
        assert_eq!(y.to_f32_vec().unwrap(), [16.0]);
    }

    #[test]
    fn an_int64_cast_to_int64_keeps_its_64_bits() {
        // torch 2.6's dynamo export: Slice(x, 0, Cast(i64::MAX, int64)), "to the end".
        for v in [i64::MAX, 1 << 31, i64::MIN] {
            let mut m = builder()
                .input("x", F32, &["n"])
                .output("y", F32, &["?"])
                .init(Tensor::from_i64("start", &[1], &[0]).unwrap())
                .init(Tensor::from_i64("end", &[1], &[v]).unwrap())
                .node("Cast", &["end"], &["end64"], vec![attr::int("to", 7)])
                .node("Slice", &["x", "start", "end64"], &["y"], vec![])
                .build();
            ConstantFolding.run(&mut m).unwrap();
            assert_eq!(initializer(&m, "end64").to_i64_vec().unwrap(), [v]);
        }
    }

    /// x + `op`(one, shape): a broadcast of a small constant.
    fn broadcast(op: &str) -> Builder {
        let ins: &[&str] = if op == "Expand" {
            &["one", "shape"]
        } else {
            &["shape"]
        };
        builder()
            .input("x", F32, &["1000"])
            .output("y", F32, &["1000"])
            .constant("one", f32s("", &[1], &[1.0]))
            .constant("shape", i64s(&[1000]))
            .node(op, ins, &["big"], vec![])
            .node("Add", &["x", "big"], &["y"], vec![])
    }

    #[test]
    fn folding_never_inflates_the_file() {
        for op in ["Expand", "ConstantOfShape"] {
            let mut m = broadcast(op).build();
            assert_eq!(ConstantFolding.run(&mut m).unwrap().total(), 0, "{op}");
            assert_eq!(ops(&m).len(), 4, "{op}");
        }
    }

    #[test]
    fn a_big_intermediate_with_a_small_result_folds() {
        let mut m = builder()
            .input("x", F32, &["1"])
            .output("y", F32, &["1"])
            .constant("one", f32s("", &[1], &[1.0]))
            .constant("shape", i64s(&[1000]))
            .node("Expand", &["one", "shape"], &["big"], vec![])
            .node(
                "ReduceSum",
                &["big"],
                &["sum"],
                vec![attr::int("keepdims", 0)],
            )
            .node("Add", &["x", "sum"], &["y"], vec![])
            .build();
        assert_eq!(ConstantFolding.run(&mut m).unwrap().0.get("fold"), Some(&2));
        assert_eq!(ops(&m), ["Add"]);
        assert_eq!(initializer(&m, "sum").to_f32_vec().unwrap(), [1000.0]);
    }

    fn transposed_weight(also_read_directly: bool) -> Model {
        let w: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let b = builder()
            .input("x", F32, &["16", "16"])
            .output("y", F32, &["16", "16"])
            .init(f32s("w", &[16, 16], &w))
            .node(
                "Transpose",
                &["w"],
                &["wt"],
                vec![attr::ints("perm", &[1, 0])],
            );
        if also_read_directly {
            b.node("MatMul", &["x", "wt"], &["a"], vec![])
                .node("MatMul", &["x", "w"], &["b"], vec![])
                .node("Add", &["a", "b"], &["y"], vec![])
                .build()
        } else {
            b.node("MatMul", &["x", "wt"], &["y"], vec![]).build()
        }
    }

    #[test]
    fn a_weight_is_transposed_only_when_the_original_dies() {
        let mut m = transposed_weight(true);
        assert_eq!(ConstantFolding.run(&mut m).unwrap().total(), 0);
        let mut m = transposed_weight(false);
        assert_eq!(ConstantFolding.run(&mut m).unwrap().total(), 1);
        let g = written(&m);
        let names: Vec<&str> = g.initializer.iter().map(|t| t.name()).collect();
        assert_eq!(names, ["wt"]);
        assert_eq!(
            initializer(&m, "wt").to_f32_vec().unwrap()[..3],
            [0.0, 16.0, 32.0]
        );
    }

    #[test]
    fn a_result_no_dying_constant_pays_for_is_not_evaluated() {
        // The tied-embedding shape: the LM head reads the table the Gather reads, transposed.
        let m = transposed_weight(true);
        assert!(Region::find(&m).unwrap().nodes.is_empty());
        let m = transposed_weight(false);
        assert_eq!(Region::find(&m).unwrap().nodes.len(), 1);
    }

    #[test]
    fn what_tract_cannot_run_stays_and_the_rest_folds() {
        let mut m = builder()
            .input("x", F32, &["2"])
            .output("y", F32, &["2"])
            .output("z", F32, &["2"])
            .constant("a", f32s("", &[2], &[1.0, 2.0]))
            .node("NoSuchOp", &["a"], &["b"], vec![])
            .node("Neg", &["b"], &["nb"], vec![])
            .node("Add", &["a", "a"], &["c"], vec![])
            .node("Mul", &["x", "nb"], &["y"], vec![])
            .node("Mul", &["x", "c"], &["z"], vec![])
            .build();
        let rewrites = ConstantFolding.run(&mut m).unwrap();
        assert_eq!(rewrites.0.get("fold"), Some(&1));
        assert_eq!(ops(&m), ["Constant", "NoSuchOp", "Neg", "Mul", "Mul"]);
        assert_eq!(initializer(&m, "c").to_f32_vec().unwrap(), [2.0, 4.0]);
    }

    #[test]
    fn a_result_that_disagrees_with_its_recorded_type_is_not_used() {
        let chain = |recorded: DataType, dims: &[&str]| {
            builder()
                .input("x", F32, &["2"])
                .output("y", F32, &["2"])
                .typed("n", recorded, dims)
                .constant("a", f32s("", &[2], &[1.0, 2.0]))
                .node("Neg", &["a"], &["n"], vec![])
                .node("Mul", &["x", "n"], &["y"], vec![])
                .build()
        };
        assert_eq!(
            ConstantFolding
                .run(&mut chain(F32, &["2"]))
                .unwrap()
                .total(),
            1
        );
        assert_eq!(
            ConstantFolding
                .run(&mut chain(F32, &["n"]))
                .unwrap()
                .total(),
            1
        );
        assert_eq!(
            ConstantFolding
                .run(&mut chain(DataType::Int32, &["2"]))
                .unwrap()
                .total(),
            0
        );
        assert_eq!(
            ConstantFolding
                .run(&mut chain(F32, &["3"]))
                .unwrap()
                .total(),
            0
        );
    }

    #[test]
    fn random_draws_are_not_constants() {
        let mut m = builder()
            .input("x", F32, &["2"])
            .output("y", F32, &["2"])
            .constant("a", f32s("", &[2], &[1.0, 2.0]))
            .node("RandomUniformLike", &["a"], &["r"], vec![])
            .node("Mul", &["x", "r"], &["y"], vec![])
            .build();
        assert_eq!(ConstantFolding.run(&mut m).unwrap().total(), 0);
    }

    #[test]
    fn a_constant_graph_output_becomes_an_initializer_output() {
        let mut m = builder()
            .input("x", F32, &["2"])
            .output("y", F32, &["2"])
            .output("k", F32, &["2"])
            .constant("a", f32s("", &[2], &[1.0, 2.0]))
            .node("Neg", &["a"], &["k"], vec![])
            .node("Mul", &["x", "k"], &["y"], vec![])
            .build();
        assert_eq!(ConstantFolding.run(&mut m).unwrap().total(), 1);
        let g = written(&m);
        assert_eq!(g.output[1].name(), "k");
        assert_eq!(g.initializer[0].name(), "k");
        let mut runner = Runner::new(&m).unwrap();
        let x = tract_onnx::prelude::Tensor::from(
            tract_onnx::tract_hir::internal::tract_ndarray::arr1(&[3.0f32, 1.0]),
        );
        let out = runner
            .run(&Batch {
                name: "b".into(),
                tensors: vec![("x".into(), x)],
            })
            .unwrap();
        let as_vec = |t: &tract_onnx::prelude::Tensor| -> Vec<f32> {
            t.to_plain_array_view::<f32>()
                .unwrap()
                .iter()
                .copied()
                .collect()
        };
        assert_eq!(as_vec(&out[0].1), [-3.0, -2.0]);
        assert_eq!(as_vec(&out[1].1), [-1.0, -2.0]);
    }
}
