//! Questions the clean-up passes ask of nodes and values, answered in one place so that every
//! pass answers them the same way: can the readers of a value move to another value, does a
//! node compute the same thing every time, which integers does a constant input hold. And the
//! walk that the node-by-node passes share (`rewrite_each`).

use super::Rewrites;
use crate::error::Result;
use crate::ir::{attr, Graph, Model, Node, NodeId, PValue, Patch, Use, ValueId};
use crate::proto::NodeProto;

/// Visits the nodes in written order and applies the patch `rewrite` proposes for each, at
/// once: a later node is looked at in the graph as the earlier rewrites left it, so a chain
/// shortens from its start within one run.
pub fn rewrite_each(
    model: &mut Model,
    mut rewrite: impl FnMut(&Model, NodeId) -> Option<Patch>,
) -> Result<Rewrites> {
    let mut rewrites = Rewrites::default();
    for id in model.graph.topological_order()? {
        // An earlier rewrite may have removed this node (the first of a pair it merged).
        if !model.graph.contains_node(id) {
            continue;
        }
        if let Some(patch) = rewrite(model, id) {
            rewrites.apply(model, patch)?;
        }
    }
    Ok(rewrites)
}

/// ONNX operators whose results are drawn at random: two of them with the same inputs
/// differ, and their value is never a constant.
const RANDOM_OPS: &[&str] = &[
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
];

/// The last dim of `v`, where shape inference found it static.
pub fn last_dim(g: &Graph, v: ValueId) -> Option<i64> {
    g.value_type(v)?.shape?.last()?.value()
}

/// True for the operator sets whose definitions we know (the default domain and
/// `ai.onnx.ml`); a node of another domain may be anything, stateful or random included.
pub fn is_onnx(node: &Node) -> bool {
    matches!(node.domain(), "" | "ai.onnx.ml")
}

/// True when `node` is an ONNX operator that gives the same outputs whenever it sees the
/// same inputs: every one except the random generators and Dropout in training mode.
pub fn is_deterministic(model: &Model, node: &Node) -> bool {
    if !is_onnx(node) {
        return false;
    }
    if node.is("Dropout") {
        return dropout_is_inference(model, node);
    }
    !(node.domain().is_empty() && RANDOM_OPS.contains(&node.op_type()))
}

/// True when a Dropout node copies its input: from opset 12 its `training_mode` input is
/// absent or a constant false; opsets 7 to 11 have no training switch (a runtime running a
/// model for inference runs them as the identity); opsets 1 to 6 say so with `is_test=1`.
pub fn dropout_is_inference(model: &Model, node: &Node) -> bool {
    if model.opset("").is_some_and(|v| v < 7) {
        return attr::get_int(&node.proto, "is_test") == Some(1);
    }
    match node.input(2) {
        None => true,
        Some(mode) => const_ints(&model.graph, mode).is_some_and(|v| v == [0]),
    }
}

/// True when `node` holds a subgraph (If, Loop, Scan) or reads values by name from one.
pub fn has_subgraph(node: &Node) -> bool {
    !node.captured.is_empty() || holds_subgraph(&node.proto)
}

/// True when `proto` has a graph attribute (If, Loop, Scan).
pub fn holds_subgraph(proto: &NodeProto) -> bool {
    proto
        .attribute
        .iter()
        .any(|a| a.g.is_some() || !a.graphs.is_empty())
}

/// The integers a constant value holds (an initializer that is not a graph input, or a
/// `Constant` node's output), when it has an integer or bool type.
pub fn const_ints(g: &Graph, v: ValueId) -> Option<Vec<i64>> {
    g.constant(v)?.to_i64_vec().ok()
}

fn read_by_subgraph(g: &Graph, v: ValueId) -> bool {
    g.uses(v).iter().any(|(_, u)| *u == Use::Captured)
}

/// True when `Patch::replace_uses(old, new)` moves every reader of `old` to `new` and leaves
/// nothing of `old` behind. Not so when a subgraph reads `old` by name, nor when `old` is a
/// graph output and `new` cannot take its name: `new` is read by name from a subgraph, or is
/// already a name the user sees (a graph input or output, an initializer), where the patch
/// has to write an Identity to keep both names, which is no simplification.
pub fn can_redirect(g: &Graph, old: ValueId, new: ValueId) -> bool {
    if read_by_subgraph(g, old) {
        return false;
    }
    if !g.is_graph_output(old) {
        return true;
    }
    !(read_by_subgraph(g, new)
        || g.is_graph_input(new)
        || g.is_graph_output(new)
        || g.initializer(new).is_some())
}

/// A patch that removes `node` and lets the readers of its output `out` read `src`, for a
/// node that computes nothing (its output equals `src`); `None` where `can_redirect` says no.
/// The node's other outputs, if any, must have no readers.
pub fn bypass(
    g: &Graph,
    kind: &'static str,
    node: NodeId,
    out: ValueId,
    src: ValueId,
) -> Option<Patch> {
    if !can_redirect(g, out, src) {
        return None;
    }
    let mut patch = Patch::new(kind);
    patch.remove_node(node).replace_uses(out, src.into());
    Some(patch)
}

/// A patch that replaces the single-output `node` by `proto` (its copy, perhaps with other
/// attributes) reading `inputs`; the output keeps its name, type and readers.
pub fn rewire(
    kind: &'static str,
    node: NodeId,
    proto: NodeProto,
    inputs: &[Option<ValueId>],
    out: ValueId,
) -> Patch {
    let inputs: Vec<Option<PValue>> = inputs.iter().map(|v| v.map(PValue::from)).collect();
    let mut patch = Patch::new(kind);
    patch
        .remove_node(node)
        .add_node_proto(proto, &inputs, &[out.into()]);
    patch
}

/// True when nothing but `reader` reads any output of `node` (and none is a graph output):
/// once `reader` stops reading it, `node` is dead and the same patch can remove it.
pub fn only_feeds(g: &Graph, node: NodeId, reader: NodeId) -> bool {
    g.node(node).outputs.iter().flatten().all(|&v| {
        !g.is_graph_output(v)
            && g.uses(v)
                .iter()
                .all(|(r, u)| *r == reader && *u != Use::Captured)
    })
}

/// Node `id`, when it is the ONNX operator `op_type`.
pub fn op_node<'g>(g: &'g Graph, id: NodeId, op_type: &str) -> Option<&'g Node> {
    let node = g.node(id);
    node.is(op_type).then_some(node)
}

/// The node producing input `slot` of `node`, when it is the ONNX operator `op_type`.
pub fn input_producer<'g>(
    g: &'g Graph,
    node: &Node,
    slot: usize,
    op_type: &str,
) -> Option<(NodeId, &'g Node)> {
    let id = g.producer(node.input(slot)?)?;
    Some((id, op_node(g, id, op_type)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::testing::model;

    #[test]
    fn a_graph_output_can_move_only_to_a_value_that_can_take_its_name() {
        let m = model(
            &["x"],
            &["y", "z"],
            &["w"],
            &[
                ("Relu", &["x"], &["a"]),
                ("Neg", &["a"], &["y"]),
                ("Neg", &["w"], &["z"]),
            ],
        );
        let g = &m.graph;
        let v = |n: &str| g.find_value(n).unwrap();
        assert!(can_redirect(g, v("y"), v("a")));
        assert!(
            !can_redirect(g, v("y"), v("x")),
            "a graph input keeps its name"
        );
        assert!(
            !can_redirect(g, v("y"), v("z")),
            "another output keeps its name"
        );
        assert!(
            !can_redirect(g, v("z"), v("w")),
            "an initializer keeps its name"
        );
        assert!(
            can_redirect(g, v("a"), v("x")),
            "not an output: anything goes"
        );
    }

    #[test]
    fn random_ops_and_foreign_domains_are_not_deterministic() {
        let mut m = model(
            &["x"],
            &["a", "b"],
            &[],
            &[
                ("RandomNormalLike", &["x"], &["a"]),
                ("Relu", &["x"], &["b"]),
            ],
        );
        let ids: Vec<NodeId> = m.graph.node_ids().collect();
        let verdict = |m: &Model, id| is_deterministic(m, m.graph.node(id));
        let (random, relu) = if m.graph.node(ids[0]).is("Relu") {
            (ids[1], ids[0])
        } else {
            (ids[0], ids[1])
        };
        assert!(!verdict(&m, random));
        assert!(verdict(&m, relu));
        m.graph.node_mut_proto(relu).domain = Some("my.ops".into());
        assert!(!verdict(&m, relu));
    }
}
