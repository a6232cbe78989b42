//! The branches of `If` nodes, optimized as models of their own.
//!
//! Matches: an `If` of the main graph whose branches compute with the main graph's values:
//! Optimum's merged decoders (`decoder_model_merged.onnx`, what it writes for T5, BART,
//! Whisper, Marian… and what transformers.js ships) hold the whole decoder twice, with and
//! without its cache, in the two branches of one `If`, reading the weights from the main graph.
//! Produces: each branch as the optimization pipeline (for the same target, this pass left out)
//! leaves it when it runs on the branch as a model: its fusions, folds and clean-ups, inside
//! the branch. Initializers the rewritten branch makes (a packed QKV weight) move to the main
//! graph, once for both branches when they are the same tensor, under names no scope uses.
//! The branch keeps the model's opset of the default domain (`Model::opset_pinned`): a fusion
//! whose operator needs a newer one (the standard `Attention` for `--target onnx` and for
//! grouped-query heads, below opset 23) declines there, since the main graph and the other
//! branch would have to follow; the rest of the pipeline goes on. `rewrite_branches` does the same with any rewrite of a
//! model: the pipeline converts the branches with the quantizers that need no batches
//! (`pipeline::convert_branches`).
//!
//! Safe because: a branch is a graph that reads values of the enclosing scope by name. As a
//! model, it reads the same values: the main graph's initializers it reads become its own
//! initializers, every other value it reads becomes an input with the main graph's type of
//! that value, and its outputs are the branch's outputs, which the pipeline keeps. Put back,
//! an initializer still the main graph's (same name, same bytes) is read from the main graph
//! again, and every name the branch defines that the main graph also defines is renamed
//! inside the branch (ONNX forbids a subgraph to shadow an outer name).

use std::collections::{HashMap, HashSet};

use super::{Pass, Rewrites};
use crate::error::Result;
use crate::ir::{free_names, Model, NodeId, Tensor};
use crate::optimize::OptimizeOptions;
use crate::proto::{AttributeProto, GraphProto, ModelProto, ValueInfoProto};

/// The fewest nodes of a branch `BranchesOf` selects: a branch of a few nodes (a Constant, an
/// Identity) has nothing to rewrite.
const MIN_BRANCH_NODES: usize = 16;

pub struct BranchOptimization {
    pub options: OptimizeOptions,
}

impl Pass for BranchOptimization {
    fn name(&self) -> &'static str {
        "optimize-branches"
    }

    fn run(&self, model: &mut Model) -> Result<Rewrites> {
        let passes = crate::optimize::selected(&self.options)?.without(&[self.name().into()])?;
        rewrite_branches(model, BranchesOf::AnyKind, &|branch| {
            let report = passes.run(branch)?;
            let mut done = Rewrites::default();
            // Types recorded again are no rewrite: a branch's anonymous dims are recorded
            // anew each time it stands as a model.
            for stats in report.passes.iter().filter(|s| s.pass != "shape-inference") {
                done.merge(&stats.rewrites);
            }
            Ok(done)
        })
    }
}

/// Which branches `rewrite_branches` rewrites, of those with `MIN_BRANCH_NODES` nodes or more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchesOf {
    /// All of them.
    AnyKind,
    /// Those with a product (MatMul, Gemm, Conv): a decoder's, which conversions are for,
    /// not a helper computation such as DeBERTa's relative positions, whose float
    /// arithmetic (log buckets) float16 could move for no gain.
    Products,
}

impl BranchesOf {
    fn selects(self, branch: &GraphProto) -> bool {
        let product = |n: &crate::proto::NodeProto| {
            matches!(n.op_type(), "MatMul" | "Gemm" | "Conv") && n.domain().is_empty()
        };
        let kind = self == BranchesOf::AnyKind || branch.node.iter().any(product);
        branch.node.len() >= MIN_BRANCH_NODES && kind
    }
}

/// Rewrites every branch of the `If` nodes of the main graph that `only` selects as `rewrite`
/// rewrites a model (see the module doc: the branch stands as a model, and goes back
/// with its new tensors hoisted and its names kept apart from the main graph's). A branch that
/// does not stand as a model, that `rewrite` refuses or leaves unchanged, or that comes back
/// needing another opset of the default domain stays as it was. Returns what `rewrite` did,
/// and `branch` once per `If` rewritten.
pub fn rewrite_branches(
    model: &mut Model,
    only: BranchesOf,
    rewrite: &dyn Fn(&mut Model) -> Result<Rewrites>,
) -> Result<Rewrites> {
    let mut rewrites = Rewrites::default();
    let ifs = if_nodes(model);
    if ifs.is_empty() {
        return Ok(rewrites);
    }
    // The types of the values branches read; rewriting one `If` adds initializers only.
    let types = crate::passes::shape::infer(model).types;
    for id in ifs {
        let attributes = model.graph.node(id).proto.attribute.clone();
        let mut hoisted = Hoisted::default();
        let mut rewritten = Vec::with_capacity(attributes.len());
        let mut changed = false;
        for a in attributes {
            let done = match a.g.as_ref().filter(|g| only.selects(g)) {
                Some(branch) => rewritten_branch(model, &types, branch, rewrite, &mut hoisted)?,
                None => None,
            };
            match done {
                Some((branch, done)) => {
                    changed = true;
                    rewrites.merge(&done);
                    rewritten.push(AttributeProto {
                        g: Some(branch),
                        ..a
                    });
                }
                None => rewritten.push(a),
            }
        }
        if !changed {
            continue;
        }
        // Names the branches define that the main graph now defines too are renamed inside
        // them: a subgraph may not shadow an outer name.
        let outer = &model.graph;
        let hoisted_names: HashSet<&str> =
            hoisted.tensors.iter().map(|(n, _)| n.as_str()).collect();
        let clash = |n: &str| outer.find_value(n).is_some() || hoisted_names.contains(n);
        for a in rewritten.iter_mut() {
            if let Some(branch) = a.g.as_mut() {
                unshadow(branch, &clash);
            }
        }
        for (name, tensor) in hoisted.tensors {
            let v = model.graph.intern(&name);
            model.graph.set_initializer(v, tensor);
        }
        model.graph.replace_subgraphs(id, rewritten)?;
        rewrites.add("branch", 1);
    }
    Ok(rewrites)
}

/// Whether an `If` of the main graph holds a branch `BranchesOf::Products` selects: the
/// model's computation is in there (an Optimum merged decoder).
pub fn computes_in_branches(model: &Model) -> bool {
    if_nodes(model).into_iter().any(|id| {
        let attributes = &model.graph.node(id).proto.attribute;
        attributes
            .iter()
            .filter_map(|a| a.g.as_ref())
            .any(|g| BranchesOf::Products.selects(g))
    })
}

/// The `If` nodes of the main graph.
fn if_nodes(model: &Model) -> Vec<NodeId> {
    let g = &model.graph;
    let ifs = g
        .nodes()
        .filter(|(_, n)| n.op_type() == "If" && n.domain().is_empty());
    ifs.map(|(id, _)| id).collect()
}

/// Initializers the rewritten branches of one `If` read from the main graph: new names, and
/// the name each distinct tensor got (so that both branches share one copy).
#[derive(Default)]
struct Hoisted {
    tensors: Vec<(String, Tensor)>,
    by_content: HashMap<u64, Vec<usize>>,
}

impl Hoisted {
    /// The main-graph name of `tensor`: the one an identical tensor got already, else a new
    /// one starting with `hint` that `taken` does not hold.
    fn name_of(&mut self, hint: &str, tensor: Tensor, taken: &dyn Fn(&str) -> bool) -> String {
        let key = content_key(&tensor);
        let same = self.by_content.get(&key).and_then(|at| {
            at.iter()
                .find(|&&i| same_tensor(&self.tensors[i].1, &tensor))
        });
        if let Some(&i) = same {
            return self.tensors[i].0.clone();
        }
        let ours: HashSet<&str> = self.tensors.iter().map(|(n, _)| n.as_str()).collect();
        let free = |n: &str| !taken(n) && !ours.contains(n);
        let name = std::iter::once(hint.to_string())
            .chain((1..).map(|i| format!("{hint}_{i}")))
            .find(|n| free(n))
            .unwrap_or_default();
        self.by_content
            .entry(key)
            .or_default()
            .push(self.tensors.len());
        self.tensors.push((name.clone(), tensor));
        name
    }
}

fn content_key(t: &Tensor) -> u64 {
    let bytes = t.raw_bytes().unwrap_or_default();
    crate::ir::dump::fnv1a(&bytes) ^ (t.dtype() as u64).rotate_left(32)
}

fn same_tensor(a: &Tensor, b: &Tensor) -> bool {
    a.dtype() == b.dtype() && a.dims() == b.dims() && a.raw_bytes() == b.raw_bytes()
}

/// `branch` rewritten by `rewrite`, ready to go back into the `If`, and what `rewrite`
/// did; `None` when it did nothing, needed another opset, or could not run. `types`: the
/// main graph's, for the values the branch reads.
fn rewritten_branch(
    model: &mut Model,
    types: &HashMap<crate::ir::ValueId, crate::ir::ValueType>,
    branch: &GraphProto,
    rewrite: &dyn Fn(&mut Model) -> Result<Rewrites>,
    hoisted: &mut Hoisted,
) -> Result<Option<(GraphProto, Rewrites)>> {
    let outer = &model.graph;
    let read = free_names(branch);
    let mut standalone = branch.clone();
    let mut from_outer: HashMap<String, Tensor> = HashMap::new();
    for name in &read {
        let Some(v) = outer.find_value(name) else {
            continue;
        };
        match outer.initializer(v) {
            Some(t) => {
                let mut p = t.proto().clone();
                p.name = Some(name.clone());
                standalone.initializer.push(p);
                from_outer.insert(name.clone(), t.clone());
            }
            None => standalone.input.push(ValueInfoProto {
                name: Some(name.clone()),
                r#type: types
                    .get(&v)
                    .map(|t| t.without_anonymous_dims().to_type_proto()),
                ..Default::default()
            }),
        }
    }
    let proto = ModelProto {
        graph: Some(standalone),
        ..model.envelope.clone()
    };
    // A branch that does not stand as a model (or that `rewrite` refuses) stays as it
    // was: the main graph and the other branch are rewritten all the same.
    let Ok(mut inner) = Model::from_proto(proto) else {
        return Ok(None);
    };
    inner.opset_pinned = true;
    let Ok(done) = rewrite(&mut inner) else {
        return Ok(None);
    };
    if done.total() == 0 || inner.opset("") != model.opset("") {
        return Ok(None);
    }
    for import in &inner.envelope.opset_import {
        if model.opset(import.domain()).is_none() {
            model.envelope.opset_import.push(import.clone());
        }
    }
    let mut rewritten = inner.to_proto()?.graph.unwrap_or_default();
    rewritten.input.clear();
    let outer = &model.graph;
    let initializers = std::mem::take(&mut rewritten.initializer);
    let mut within = HashSet::new();
    names_in(&rewritten, &mut within);
    names_in(branch, &mut within);
    let taken = |n: &str| outer.find_value(n).is_some() || within.contains(n);
    let mut renames: HashMap<String, String> = HashMap::new();
    for p in initializers {
        let name = p.name().to_string();
        let tensor = Tensor::from_proto(p)?;
        if from_outer
            .get(&name)
            .is_some_and(|t| same_tensor(t, &tensor))
        {
            continue;
        }
        let main_name = hoisted.name_of(&name, tensor, &taken);
        if main_name != name {
            renames.insert(name, main_name);
        }
    }
    rename(&mut rewritten, &renames);
    Ok(Some((rewritten, done)))
}

/// Renames, inside `g`, each value it defines (a node's output, an initializer) whose name
/// `clash` says the enclosing scope defines.
fn unshadow(g: &mut GraphProto, clash: &dyn Fn(&str) -> bool) {
    let outputs = g.node.iter().flat_map(|n| n.output.iter().cloned());
    let initializers = g.initializer.iter().map(|t| t.name().to_string());
    let defined: Vec<String> = outputs.chain(initializers).collect();
    let mut used = HashSet::new();
    names_in(g, &mut used);
    let mut renames = HashMap::new();
    for name in defined.iter().filter(|n| !n.is_empty() && clash(n)) {
        let fresh = (1..)
            .map(|i| format!("{name}_branch{i}"))
            .find(|n| !clash(n) && !used.contains(n))
            .unwrap_or_default();
        used.insert(fresh.clone());
        renames.insert(name.clone(), fresh);
    }
    rename(g, &renames);
}

/// Every name `g` and its subgraphs define or read.
fn names_in(g: &GraphProto, names: &mut HashSet<String>) {
    let infos = g.input.iter().chain(&g.output).chain(&g.value_info);
    names.extend(infos.map(|i| i.name().to_string()));
    names.extend(g.initializer.iter().map(|t| t.name().to_string()));
    for node in &g.node {
        names.extend(node.input.iter().chain(&node.output).cloned());
        for a in &node.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                names_in(sub, names);
            }
        }
    }
}

/// Renames values of `g` as `renames` says: node inputs and outputs, initializers, graph
/// outputs, value_info, and what its nodes' subgraphs read by those names (a name `g`
/// defines, so no subgraph defines it again).
fn rename(g: &mut GraphProto, renames: &HashMap<String, String>) {
    if renames.is_empty() {
        return;
    }
    let renamed = |n: &mut String| {
        if let Some(new) = renames.get(n.as_str()) {
            *n = new.clone();
        }
    };
    for node in g.node.iter_mut() {
        node.input.iter_mut().for_each(renamed);
        node.output.iter_mut().for_each(renamed);
        for a in node.attribute.iter_mut() {
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                rename(sub, renames);
            }
        }
    }
    for t in g.initializer.iter_mut() {
        if let Some(name) = t.name.as_mut() {
            renamed(name);
        }
    }
    for info in g.output.iter_mut().chain(g.value_info.iter_mut()) {
        if let Some(name) = info.name.as_mut() {
            renamed(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::NodeProto;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn graph(nodes: Vec<NodeProto>) -> GraphProto {
        GraphProto {
            node: nodes,
            ..Default::default()
        }
    }

    /// `g`: `x = Relu(a)`, then an `If` whose branch reads `x` by name.
    fn reading_by_name() -> GraphProto {
        let mut if_node = node("If", &["c"], &["y"]);
        if_node.attribute.push(AttributeProto {
            name: Some("then_branch".into()),
            g: Some(graph(vec![node("Identity", &["x"], &["z"])])),
            ..Default::default()
        });
        graph(vec![node("Relu", &["a"], &["x"]), if_node])
    }

    #[test]
    fn a_rename_reaches_what_nested_subgraphs_read() {
        let mut g = reading_by_name();
        rename(
            &mut g,
            &HashMap::from([("x".to_string(), "x2".to_string())]),
        );
        assert_eq!(g.node[0].output, ["x2"]);
        let nested = g.node[1].attribute[0].g.as_ref().unwrap();
        assert_eq!(nested.node[0].input, ["x2"]);
    }

    #[test]
    fn names_the_enclosing_scope_defines_are_renamed_apart() {
        let mut g = reading_by_name();
        // The enclosing scope defines `x` and `x_branch1`: the branch's `x` becomes a third
        // name, which its nested subgraph reads; `y` (no clash) stays.
        let clash = |n: &str| n == "x" || n == "x_branch1";
        unshadow(&mut g, &clash);
        assert_eq!(g.node[0].output, ["x_branch2"]);
        assert_eq!(g.node[1].output, ["y"]);
        let nested = g.node[1].attribute[0].g.as_ref().unwrap();
        assert_eq!(nested.node[0].input, ["x_branch2"]);
    }

    #[test]
    fn a_tensor_both_branches_make_is_hoisted_once() {
        let mut hoisted = Hoisted::default();
        let t = |v: f32| Tensor::from_f32("w", &[2], &[v, 1.0]).unwrap();
        let taken = |n: &str| n == "w";
        let first = hoisted.name_of("w", t(0.5), &taken);
        let again = hoisted.name_of("w", t(0.5), &taken);
        let other = hoisted.name_of("w", t(2.0), &taken);
        assert_eq!(first, "w_1");
        assert_eq!(again, first, "the same bytes, the same name");
        assert_eq!(other, "w_2");
        assert_eq!(hoisted.tensors.len(), 2);
    }
}
