//! Common subexpression elimination.
//!
//! Matches: two nodes of the same deterministic ONNX operator (same op type, domain and
//! attributes, compared as encoded `AttributeProto`s; the same outputs present) that read the
//! same inputs; and two constants (initializers and `Constant` nodes) of the same element
//! type, dims and bytes.
//! Produces: the one written first stays (initializers are written before nodes); the readers
//! of the other read it instead, and the other goes.
//! Safe because: ONNX operators are functions of their inputs and attributes, except the
//! random generators and Dropout in training mode, which are left alone
//! (`matching::is_deterministic`), as are nodes holding subgraphs and operators of other
//! domains, whose definitions we do not know. Initializers that are graph inputs (a caller may
//! feed another value) or graph outputs are never merged.
//! How: nodes are visited in written order (`matching::rewrite_each`), each looked up by its
//! key in a hash map of the ones seen; a duplicate is removed at once, so its readers' keys
//! already name the node kept and a duplicated chain merges in one run. Constants are grouped by type and dims, hashed
//! (their first `HASHED_PREFIX` bytes) only where a group has more than one, and compared byte
//! for byte only on a hash match.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use prost::Message;

use super::matching::{can_redirect, has_subgraph, is_deterministic, rewrite_each};
use super::{Pass, Rewrites};
use crate::error::Result;
use crate::ir::{Graph, Model, NodeId, Patch, Source, Tensor, ValueId};

/// How much of a constant is hashed. Weights of one shape differ from their first values on,
/// so a prefix tells them apart without reading every weight of the model (gigabytes of pages
/// made resident, on every round, for a decoder LLM whose layers all have the same shapes);
/// constants whose prefixes match are still compared in full.
const HASHED_PREFIX: usize = 4096;

pub struct CommonSubexpressions;

impl Pass for CommonSubexpressions {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn run(&self, model: &mut Model) -> Result<Rewrites> {
        let mut rewrites = Rewrites::default();
        let order = model.graph.topological_order()?;
        for (duplicate, kept) in duplicate_constants(&model.graph, &order, model.source.as_ref()) {
            let mut patch = match model.graph.producer(duplicate) {
                Some(node) => {
                    let mut p = Patch::new("duplicate-constant");
                    p.remove_node(node);
                    p
                }
                None => {
                    let mut p = Patch::new("duplicate-initializer");
                    p.drop_initializer(duplicate);
                    p
                }
            };
            patch.replace_uses(duplicate, kept.into());
            rewrites.apply(model, patch)?;
        }
        let mut seen: HashMap<NodeKey, NodeId> = HashMap::new();
        let merges = rewrite_each(model, |m, id| {
            let key = NodeKey::of(m, id)?;
            match seen.get(&key) {
                Some(&kept) => merge(&m.graph, id, kept),
                None => {
                    seen.insert(key, id);
                    None
                }
            }
        })?;
        rewrites.merge(&merges);
        Ok(rewrites)
    }
}

/// What makes two nodes compute the same thing.
#[derive(PartialEq, Eq, Hash)]
struct NodeKey {
    domain: String,
    op_type: String,
    /// Encoded attributes, sorted by name (their order in the file means nothing).
    attributes: Vec<(String, Vec<u8>)>,
    /// Inputs, without trailing omitted ones (an omitted optional input is the same as an
    /// absent one).
    inputs: Vec<Option<ValueId>>,
    /// Which outputs are present: a node can stand in only for one that writes no more.
    outputs: Vec<bool>,
}

impl NodeKey {
    fn of(model: &Model, id: NodeId) -> Option<NodeKey> {
        let node = model.graph.node(id);
        if !is_deterministic(model, node) || has_subgraph(node) || node.outputs.is_empty() {
            return None;
        }
        let mut attributes: Vec<(String, Vec<u8>)> = node
            .proto
            .attribute
            .iter()
            .map(|a| (a.name().to_string(), a.encode_to_vec()))
            .collect();
        attributes.sort();
        let mut inputs = node.inputs.clone();
        while inputs.last() == Some(&None) {
            inputs.pop();
        }
        Some(NodeKey {
            domain: node.domain().to_string(),
            op_type: node.op_type().to_string(),
            attributes,
            inputs,
            outputs: node.outputs.iter().map(Option::is_some).collect(),
        })
    }
}

/// The patch that removes `duplicate` in favour of `kept`, whose key is the same.
fn merge(g: &Graph, duplicate: NodeId, kept: NodeId) -> Option<Patch> {
    let pairs: Vec<(ValueId, ValueId)> = g
        .node(duplicate)
        .outputs
        .iter()
        .zip(&g.node(kept).outputs)
        .filter_map(|(d, k)| Some(((*d)?, (*k)?)))
        .collect();
    if !pairs.iter().all(|&(d, k)| can_redirect(g, d, k)) {
        return None;
    }
    let mut patch = Patch::new("cse-node");
    patch.remove_node(duplicate);
    for (d, k) in pairs {
        patch.replace_uses(d, k.into());
    }
    Some(patch)
}

/// Constants whose value an earlier constant already holds, as (duplicate, kept) pairs. The
/// kept one is written first: initializers (written before nodes) in file order, then
/// `Constant` nodes in `order`. The pages of `source`'s files each hashed prefix was read from
/// are handed back at once: the page cache may map far more than the prefix on one read.
fn duplicate_constants(
    g: &Graph,
    order: &[NodeId],
    source: Option<&Source>,
) -> Vec<(ValueId, ValueId)> {
    let candidates = g
        .initializers()
        .map(|(v, _)| v)
        .chain(order.iter().filter_map(|&n| {
            let node = g.node(n);
            node.is("Constant").then(|| node.output(0)).flatten()
        }))
        .filter(|&v| !g.is_graph_output(v))
        .filter_map(|v| Some((v, g.constant(v)?)))
        .filter(|(_, t)| t.raw_bytes().is_some());
    let constants: Vec<(ValueId, Tensor)> = candidates.collect();
    // Indices of the constants of each (element type, dims), groups in order of appearance.
    let mut group_of_type: HashMap<(i32, &[i64]), usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, (_, t)) in constants.iter().enumerate() {
        let next = groups.len();
        let slot = *group_of_type
            .entry((t.proto().data_type(), t.dims()))
            .or_insert(next);
        if slot == next {
            groups.push(Vec::new());
        }
        groups[slot].push(i);
    }
    let mut duplicates = Vec::new();
    for group in groups.iter().filter(|group| group.len() > 1) {
        // Kept constants by the hash of their bytes; equal bytes are confirmed one by one.
        let mut kept: HashMap<u64, Vec<usize>> = HashMap::new();
        for &i in group {
            let (v, t) = &constants[i];
            let bytes = t.raw_bytes().unwrap_or_default();
            let mut hasher = std::hash::DefaultHasher::new();
            let prefix = &bytes[..bytes.len().min(HASHED_PREFIX)];
            prefix.hash(&mut hasher);
            if let Some(source) = source {
                source.release_pages_of(prefix);
            }
            let same_hash = kept.entry(hasher.finish()).or_default();
            let original = same_hash
                .iter()
                .map(|&k| &constants[k])
                .find(|(_, k)| k.raw_bytes().unwrap_or_default() == bytes);
            match original {
                Some(&(k, _)) if can_redirect(g, *v, k) => duplicates.push((*v, k)),
                Some(_) => {}
                None => same_hash.push(i),
            }
        }
    }
    duplicates
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::testing::{builder, model, ops, written};
    use crate::ir::{attr, DataType};

    fn f32s(name: &str, values: &[f32]) -> Tensor {
        Tensor::from_f32(name, &[values.len() as i64], values).unwrap()
    }

    #[test]
    fn a_duplicated_chain_merges_in_one_run() {
        let mut m = model(
            &["x"],
            &["y"],
            &[],
            &[
                ("Relu", &["x"], &["a1"]),
                ("Relu", &["x"], &["a2"]),
                ("Neg", &["a1"], &["b1"]),
                ("Neg", &["a2"], &["b2"]),
                ("Add", &["b1", "b2"], &["y"]),
            ],
        );
        let rewrites = CommonSubexpressions.run(&mut m).unwrap();
        assert_eq!(rewrites.0.get("cse-node"), Some(&2));
        assert_eq!(ops(&m), ["Relu", "Neg", "Add"]);
        assert_eq!(written(&m).node[2].input, ["b1", "b1"]);
        assert_eq!(CommonSubexpressions.run(&mut m).unwrap().total(), 0);
    }

    #[test]
    fn different_attributes_or_inputs_are_not_merged() {
        let softmax = |axis| vec![attr::int("axis", axis)];
        let mut m = builder()
            .input("x", DataType::Float, &["2", "2"])
            .input("z", DataType::Float, &["2", "2"])
            .output("y", DataType::Float, &["2", "2"])
            .node("Softmax", &["x"], &["a"], softmax(0))
            .node("Softmax", &["x"], &["b"], softmax(1))
            .node("Softmax", &["z"], &["c"], softmax(1))
            .node("Sum", &["a", "b", "c"], &["y"], vec![])
            .build();
        assert_eq!(CommonSubexpressions.run(&mut m).unwrap().total(), 0);
        assert_eq!(ops(&m).len(), 4);
    }

    #[test]
    fn attribute_order_does_not_matter() {
        let mut m = builder()
            .input("x", DataType::Float, &["2", "3"])
            .input("w", DataType::Float, &["3", "3"])
            .output("y", DataType::Float, &["2", "3"])
            .node(
                "Gemm",
                &["x", "w"],
                &["a"],
                vec![attr::float("alpha", 2.0), attr::int("transB", 1)],
            )
            .node(
                "Gemm",
                &["x", "w"],
                &["b"],
                vec![attr::int("transB", 1), attr::float("alpha", 2.0)],
            )
            .node("Add", &["a", "b"], &["y"], vec![])
            .build();
        assert_eq!(CommonSubexpressions.run(&mut m).unwrap().total(), 1);
    }

    #[test]
    fn random_draws_are_never_merged() {
        let mut m = model(
            &["x"],
            &["y"],
            &[],
            &[
                ("RandomNormalLike", &["x"], &["a"]),
                ("RandomNormalLike", &["x"], &["b"]),
                ("Add", &["a", "b"], &["y"]),
            ],
        );
        assert_eq!(CommonSubexpressions.run(&mut m).unwrap().total(), 0);
    }

    #[test]
    fn a_duplicate_producing_a_graph_output_hands_over_its_name() {
        let mut m = model(
            &["x"],
            &["y", "z"],
            &[],
            &[
                ("Relu", &["x"], &["a"]),
                ("Neg", &["a"], &["z"]),
                ("Relu", &["x"], &["y"]),
            ],
        );
        assert_eq!(CommonSubexpressions.run(&mut m).unwrap().total(), 1);
        let g = written(&m);
        assert_eq!(ops(&m), ["Relu", "Neg"]);
        assert_eq!(g.node[0].output, ["y"]);
        assert_eq!(g.node[1].input, ["y"]);
    }

    #[test]
    fn equal_constants_merge_and_the_first_name_stays() {
        let mut m = builder()
            .input("x", DataType::Float, &["2"])
            .input("w_in", DataType::Float, &["2"])
            .output("y", DataType::Float, &["2"])
            .output("w_out", DataType::Float, &["2"])
            .init(f32s("w", &[1.0, 2.0]))
            .init(f32s("w_copy", &[1.0, 2.0]))
            .init(f32s("w_in", &[1.0, 2.0]))
            .init(f32s("w_out", &[1.0, 2.0]))
            .init(f32s("other", &[1.0, 3.0]))
            .constant("c", f32s("", &[1.0, 2.0]))
            .constant(
                "i",
                Tensor::from_i64("", &[1], &[0x4000_0000_3f80_0000]).unwrap(),
            )
            .node(
                "Sum",
                &["x", "w", "w_copy", "w_in", "other", "c", "i"],
                &["y"],
                vec![],
            )
            .build();
        let rewrites = CommonSubexpressions.run(&mut m).unwrap();
        assert_eq!(rewrites.0.get("duplicate-initializer"), Some(&1));
        assert_eq!(rewrites.0.get("duplicate-constant"), Some(&1));
        let g = written(&m);
        let inits: Vec<&str> = g.initializer.iter().map(|t| t.name()).collect();
        assert_eq!(
            inits,
            ["w", "w_in", "w_out", "other"],
            "inputs and outputs stay"
        );
        let sum = g.node.iter().find(|n| n.op_type() == "Sum").unwrap();
        assert_eq!(sum.input, ["x", "w", "w", "w_in", "other", "w", "i"]);
    }

    #[test]
    fn constants_equal_in_their_hashed_prefix_only_are_not_merged() {
        let n = HASHED_PREFIX; // floats: four times the prefix
        let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut b = a.clone();
        b[n - 1] = -1.0;
        let mut m = builder()
            .input("x", DataType::Float, &[&n.to_string()])
            .output("y", DataType::Float, &[&n.to_string()])
            .init(f32s("a", &a))
            .init(f32s("b", &b))
            .init(f32s("a_copy", &a))
            .node("Sum", &["x", "a", "b", "a_copy"], &["y"], vec![])
            .build();
        let rewrites = CommonSubexpressions.run(&mut m).unwrap();
        assert_eq!(rewrites.0.get("duplicate-initializer"), Some(&1));
        let g = written(&m);
        assert_eq!(g.node[0].input, ["x", "a", "b", "a"]);
    }
}
