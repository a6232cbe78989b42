//! Raising the default-domain opset import, for fusions whose replacement exists only in a
//! newer opset (LayerNormalization 17, Gelu 20, RMSNormalization and Attention 23).
//!
//! Matches: a model importing ONNX opset 9 or later.
//! Produces: the same model importing the requested opset, with the operators whose
//! signature changed in between rewritten (the adapters of onnx's version converter):
//! - at 10, Slice takes `starts`, `ends` and `axes`, and TopK its `k`, as inputs;
//! - at 11, Clip takes `min` and `max`, and Pad its `pads` and constant `value`, as inputs
//!   (of the data's float type; a Pad of integers by a value other than 0, or a Clip or Pad
//!   of a type onnxopt does not know, keeps the model at its opset);
//! - at 12, Dropout takes `ratio` as an input instead of an attribute;
//! - at 13, Squeeze, Unsqueeze and ReduceSum take `axes`, and Split its `split`, as an input;
//!   Softmax, LogSoftmax and Hardmax normalize over their one `axis` instead of over the
//!   input flattened from `axis` on (and `axis` defaults to -1, no longer 1);
//! - at 18, the other Reduce operators take `axes` as an input, and a Split without `split`
//!   says how many parts it makes (`num_outputs`).
//!
//! The IR version is raised to the lowest one that defines the opset, never lowered.
//!
//! Safe because: the rewritten operators compute what they computed (the same axes, sizes and
//! ratio, now read from a constant input), a Softmax-family node is raised only when its
//! axis is the last one of an input of known rank (where the flattened and the one-axis
//! forms are the same function; any other keeps the model at its opset), and between opsets
//! 11 and 23 the other operators only gained element types or attributes whose defaults keep
//! the old behaviour, except the few listed in `CHANGED_MEANING`, whose presence stops the
//! raise, as do, below 11, Upsample, Resize and Scatter (replaced or changed at 10 and 11),
//! subgraphs holding an operator the raise would rewrite (the rewrites here do not reach into
//! subgraphs), and opsets below 9 (broadcasting and Upsample's scales changed at 7 to 9).

use crate::error::{Error, Result};
use crate::ir::{attr, DataType, Model, Node, NodeId, Patch, Tensor};
use crate::proto::NodeProto;

/// The newest opset this module raises to.
pub const NEWEST: i64 = 23;
/// Operators whose meaning (not only types or optional attributes) changed between 13 and 23.
const CHANGED_MEANING: &[&str] = &["RoiAlign", "DFT", "GroupNormalization"];
/// The lowest opset raised from.
const OLDEST: i64 = 9;
/// Operators replaced or changed in meaning at opsets 10 and 11, which stop a raise from
/// below 11.
const CHANGED_BY_11: &[&str] = &["Upsample", "Resize", "Scatter"];
/// Operators that take `axes` as an input from opset 13.
const AXES_13: &[&str] = &["Squeeze", "Unsqueeze", "ReduceSum"];
/// Operators that normalize over one axis from opset 13, over the flattened trailing
/// dimensions before.
const SOFTMAX_13: &[&str] = &["Softmax", "LogSoftmax", "Hardmax"];
/// Reduce operators that take `axes` as an input from opset 18.
const REDUCE_AXES_18: &[&str] = &[
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
];

/// The highest default-domain opset `model` can be raised to (its own when it cannot, or
/// when its opset is pinned).
pub fn highest_reachable(model: &Model) -> i64 {
    let now = model.opset("").unwrap_or(0);
    let g = &model.graph;
    let blocked = model.opset_pinned
        || now < OLDEST
        || g.nodes()
            .any(|(_, n)| n.domain().is_empty() && CHANGED_MEANING.contains(&n.op_type()))
        || g.nodes().any(|(_, n)| {
            let mut inner = Vec::new();
            subgraph_ops(&n.proto, &mut inner);
            inner.iter().any(|op| rewritten_or_changed(op, now))
        })
        || (now < 11
            && g.nodes().any(|(_, n)| {
                n.domain().is_empty()
                    && (CHANGED_BY_11.contains(&n.op_type()) || !attributes_movable(model, n))
            }))
        || (now < 13
            && g.nodes().any(|(_, n)| {
                n.domain().is_empty()
                    && SOFTMAX_13.contains(&n.op_type())
                    && !normalizes_last_axis(model, n)
            }));
    if blocked {
        now
    } else {
        now.max(NEWEST)
    }
}

/// The default-domain operators of the subgraphs of `node` (If branches, Loop and Scan
/// bodies), at any depth.
fn subgraph_ops<'a>(node: &'a NodeProto, ops: &mut Vec<&'a str>) {
    let graphs = node
        .attribute
        .iter()
        .flat_map(|a| a.g.iter().chain(&a.graphs));
    for inner in graphs.flat_map(|g| &g.node) {
        if inner.domain().is_empty() || inner.domain() == "ai.onnx" {
            ops.push(inner.op_type());
        }
        subgraph_ops(inner, ops);
    }
}

/// True when raising from opset `from` would rewrite operator `op` or change its meaning:
/// such an operator inside a subgraph (which the rewrites here do not reach) stops the raise.
fn rewritten_or_changed(op: &str, from: i64) -> bool {
    CHANGED_MEANING.contains(&op)
        || REDUCE_AXES_18.contains(&op)
        || op == "Split"
        || (from < 11
            && (CHANGED_BY_11.contains(&op) || ["Slice", "TopK", "Clip", "Pad"].contains(&op)))
        || (from < 13 && (AXES_13.contains(&op) || SOFTMAX_13.contains(&op) || op == "Dropout"))
}

/// Whether the float attributes Clip and Pad move to inputs at opset 11 can be written as
/// constants of the data's type: a float type onnxopt knows, or, for a Pad, any type when the
/// value is 0 (its default, left out).
fn attributes_movable(model: &Model, n: &Node) -> bool {
    let float_data = || {
        data_type(model, n)
            .is_some_and(|t| matches!(t, DataType::Float | DataType::Float16 | DataType::Double))
    };
    match n.op_type() {
        "Clip" => {
            ["min", "max"]
                .iter()
                .all(|a| attr::get(&n.proto, a).is_none())
                || float_data()
        }
        "Pad" => attr::get_float(&n.proto, "value").unwrap_or(0.0) == 0.0 || float_data(),
        _ => true,
    }
}

/// The element type of node `n`'s data input (its first), when recorded.
fn data_type(model: &Model, n: &Node) -> Option<DataType> {
    let t = model.graph.value_type(n.input(0)?)?;
    DataType::try_from(t.elem).ok()
}

/// True when a Softmax-family node of opset < 13 normalizes over the last axis of its input
/// (rank known): there the old form (over the input flattened from `axis`) and the new one
/// (over `axis` alone) are the same.
fn normalizes_last_axis(model: &Model, n: &Node) -> bool {
    let g = &model.graph;
    let axis = attr::get_int(&n.proto, "axis").unwrap_or(1);
    let rank = n
        .input(0)
        .and_then(|v| g.value_type(v))
        .and_then(|t| t.rank());
    rank.is_some_and(|r| axis == -1 || axis == r as i64 - 1)
}

/// The lowest IR version that defines ONNX opset `opset` (onnx's `VERSION_TABLE`).
fn ir_version_for(opset: i64) -> i64 {
    match opset {
        ..=18 => 8,
        19..=20 => 9,
        21..=22 => 10,
        _ => 11,
    }
}

/// Raises the default-domain import to `to`, rewriting what changed on the way.
pub fn raise(model: &mut Model, to: i64) -> Result<()> {
    let from = model.opset("").unwrap_or(0);
    if to <= from {
        return Ok(());
    }
    if to > highest_reachable(model) {
        return Err(Error::InvalidModel(format!(
            "cannot raise the ONNX opset from {from} to {to}"
        )));
    }
    if from < 10 && to >= 10 {
        move_attributes_to_inputs(model, &["Slice"], &["starts", "ends", "axes"], ints_input)?;
        move_attributes_to_inputs(model, &["TopK"], &["k"], ints_input)?;
    }
    if from < 11 && to >= 11 {
        move_attributes_to_inputs(model, &["Clip"], &["min", "max"], float_of_data)?;
        move_attributes_to_inputs(model, &["Pad"], &["pads", "value"], |m, moved, ints| {
            match moved.name {
                "pads" => ints_input(m, moved, ints),
                // 0, the default, needs no input (and may pad integers).
                _ if attr::get_float(&moved.node.proto, "value") == Some(0.0) => Ok(None),
                _ => float_of_data(m, moved, ints),
            }
        })?;
    }
    if from < 12 && to >= 12 {
        move_attributes_to_inputs(model, &["Dropout"], &["ratio"], dropout_ratio)?;
    }
    if from < 13 && to >= 13 {
        move_attributes_to_inputs(model, AXES_13, &["axes"], ints_input)?;
        move_attributes_to_inputs(model, &["Split"], &["split"], ints_input)?;
        pin_softmax_axis(model)?;
    }
    if from < 18 && to >= 18 {
        move_attributes_to_inputs(model, REDUCE_AXES_18, &["axes"], ints_input)?;
        count_split_outputs(model)?;
    }
    model.require_opset("", to);
    let ir = ir_version_for(to);
    if model.ir_version() < ir {
        model.envelope.ir_version = Some(ir);
    }
    Ok(())
}

/// What an attribute moved to an input holds: `make(model, node, ints)` builds the constant
/// from the attribute's ints (an int attribute as one int; none for a float attribute, which
/// the builder reads itself through `float_of_data`'s node argument), or none for an input
/// left empty.
type MakeInput = fn(&Model, &MovedAttribute, &[i64]) -> Result<Option<Tensor>>;

/// The node and attribute an input is being made for.
struct MovedAttribute<'a> {
    node: &'a Node,
    name: &'a str,
}

/// Each default-domain node of `ops` that sets any of the attributes `names`: they become
/// its inputs 1, 2, … in that order (after its data input; an attribute left out is an empty
/// input, or none at the end), made by `make`.
fn move_attributes_to_inputs(
    model: &mut Model,
    ops: &[&str],
    names: &[&str],
    make: MakeInput,
) -> Result<()> {
    let targets: Vec<NodeId> = model
        .graph
        .nodes()
        .filter(|(_, n)| n.domain().is_empty() && ops.contains(&n.op_type()))
        .filter(|(_, n)| names.iter().any(|name| attr::get(&n.proto, name).is_some()))
        .map(|(id, _)| id)
        .collect();
    for id in targets {
        let node = model.graph.node(id).clone();
        let mut patch = Patch::new("opset-attribute-to-input");
        let mut inputs: Vec<_> = node
            .inputs
            .iter()
            .take(1)
            .map(|v| v.map(Into::into))
            .collect();
        for name in names {
            let moved = MovedAttribute { node: &node, name };
            let ints: Vec<i64> = match attr::get(&node.proto, name) {
                None => {
                    inputs.push(None);
                    continue;
                }
                Some(a) if !a.ints.is_empty() => a.ints.clone(),
                Some(a) if a.i.is_some() => vec![a.i()],
                Some(_) => Vec::new(),
            };
            let tensor = make(model, &moved, &ints)?;
            inputs.push(tensor.map(|t| patch.new_initializer(name, t)));
        }
        while inputs.last().is_some_and(Option::is_none) {
            inputs.pop();
        }
        let outputs: Vec<_> = node.outputs.iter().flatten().map(|&v| v.into()).collect();
        let mut proto = node.proto.clone();
        proto.attribute.retain(|a| !names.contains(&a.name()));
        patch
            .remove_node(id)
            .add_node_proto(proto, &inputs, &outputs);
        model.graph.apply(patch)?;
    }
    Ok(())
}

/// An int or ints attribute as a 1-D int64 input.
fn ints_input(_: &Model, moved: &MovedAttribute, ints: &[i64]) -> Result<Option<Tensor>> {
    Ok(Some(Tensor::from_i64(
        moved.name,
        &[ints.len() as i64],
        ints,
    )?))
}

/// A float attribute as a scalar of the node's data type (`attributes_movable` checked it is
/// a float type, or that a Pad's value is 0, which is then left out).
fn float_of_data(model: &Model, moved: &MovedAttribute, _: &[i64]) -> Result<Option<Tensor>> {
    let value = attr::get_float(&moved.node.proto, moved.name).unwrap_or(0.0);
    let elem = data_type(model, moved.node).unwrap_or(DataType::Float);
    Ok(Some(Tensor::from_f32_as(moved.name, elem, &[], &[value])?))
}

/// Dropout's `ratio` attribute (opset 10) as its second input (opset 12), a float32 scalar.
fn dropout_ratio(_: &Model, moved: &MovedAttribute, _: &[i64]) -> Result<Option<Tensor>> {
    if moved.node.inputs.len() > 1 {
        return Err(Error::InvalidModel(
            "a Dropout with inputs past the first".into(),
        ));
    }
    let ratio = attr::get_float(&moved.node.proto, "ratio").unwrap_or(0.5);
    Ok(Some(Tensor::from_f32("ratio", &[], &[ratio])?))
}

/// Writes out the axis of each Softmax-family node (its default moves from 1 to -1 at opset
/// 13); `highest_reachable` has checked that it is the last one.
fn pin_softmax_axis(model: &mut Model) -> Result<()> {
    let targets: Vec<_> = model
        .graph
        .nodes()
        .filter(|(_, n)| n.domain().is_empty() && SOFTMAX_13.contains(&n.op_type()))
        .filter(|(_, n)| attr::get(&n.proto, "axis").is_none())
        .map(|(id, _)| id)
        .collect();
    for id in targets {
        let mut patch = Patch::new("opset-softmax-axis");
        patch.set_attribute(id, attr::int("axis", 1));
        model.graph.apply(patch)?;
    }
    Ok(())
}

/// A Split without sizes splits into equal parts; from opset 18 it must say how many
/// (`num_outputs`).
fn count_split_outputs(model: &mut Model) -> Result<()> {
    let targets: Vec<_> = model
        .graph
        .nodes()
        .filter(|(_, n)| n.domain().is_empty() && n.is("Split"))
        .filter(|(_, n)| n.input(1).is_none() && attr::get(&n.proto, "num_outputs").is_none())
        .map(|(id, n)| (id, n.outputs.len() as i64))
        .collect();
    for (id, parts) in targets {
        let mut patch = Patch::new("opset-split-outputs");
        patch.set_attribute(id, attr::int("num_outputs", parts));
        model.graph.apply(patch)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::testing::{model_proto, ops};
    use crate::ir::Model;

    #[test]
    fn reduce_axes_become_an_input_past_opset_18() {
        let mut p = model_proto(&["x"], &["y"], &[], &[("ReduceMean", &["x"], &["y"])]);
        let g = p.graph.as_mut().unwrap();
        g.node[0].attribute = vec![attr::ints("axes", &[-1]), attr::int("keepdims", 1)];
        let mut m = Model::from_proto(p).unwrap();
        raise(&mut m, 20).unwrap();
        assert_eq!(m.opset(""), Some(20));
        assert_eq!(m.ir_version(), 9);
        assert_eq!(ops(&m), ["ReduceMean"]);
        let g = m.to_proto().unwrap().graph.unwrap();
        assert_eq!(g.node[0].input.len(), 2);
        assert_eq!(g.node[0].attribute.len(), 1, "keepdims stays, axes moves");
        assert_eq!(g.node[0].output, ["y"]);
        assert_eq!(g.initializer[0].dims, [1]);
    }

    #[test]
    fn operators_whose_meaning_changed_block_the_raise() {
        let m = Model::from_proto(model_proto(
            &["x", "s", "b"],
            &["y"],
            &[],
            &[("GroupNormalization", &["x", "s", "b"], &["y"])],
        ))
        .unwrap();
        assert_eq!(highest_reachable(&m), 17);
        let mut m = m;
        assert!(raise(&mut m, 20).is_err());
    }
    /// A model at opset 11 (what the legacy exporter writes by default).
    fn at_opset_11(
        nodes: &[crate::ir::testing::NodeSpec],
        attrs: &[Vec<crate::proto::AttributeProto>],
    ) -> Model {
        at_opset(11, nodes, attrs)
    }

    fn at_opset(
        opset: i64,
        nodes: &[crate::ir::testing::NodeSpec],
        attrs: &[Vec<crate::proto::AttributeProto>],
    ) -> Model {
        let mut p = model_proto(&["x"], &["y"], &[], nodes);
        p.opset_import[0].version = Some(opset);
        p.ir_version = Some(6);
        let g = p.graph.as_mut().unwrap();
        for (n, a) in g.node.iter_mut().zip(attrs) {
            n.attribute = a.clone();
        }
        Model::from_proto(p).unwrap()
    }

    fn with_rank(m: &mut Model, name: &str, rank: usize) {
        use crate::ir::{Dim, ValueType};
        let v = m.graph.find_value(name).unwrap();
        m.graph
            .set_value_type(v, &ValueType::new(1, vec![Dim::symbol("n"); rank]));
    }

    #[test]
    fn opset_11_axes_splits_and_ratios_become_inputs() {
        let mut m = at_opset_11(
            &[
                ("Unsqueeze", &["x"], &["u"]),
                ("Squeeze", &["u"], &["s"]),
                ("ReduceSum", &["s"], &["r"]),
                ("Dropout", &["r"], &["d"]),
                ("Split", &["d"], &["y", "z"]),
            ],
            &[
                vec![attr::ints("axes", &[0])],
                vec![attr::ints("axes", &[0])],
                vec![attr::ints("axes", &[-1]), attr::int("keepdims", 1)],
                vec![attr::float("ratio", 0.1)],
                vec![attr::int("axis", -1), attr::ints("split", &[3, 5])],
            ],
        );
        assert_eq!(highest_reachable(&m), NEWEST);
        raise(&mut m, 17).unwrap();
        assert_eq!((m.opset(""), m.ir_version()), (Some(17), 8));
        let g = m.to_proto().unwrap().graph.unwrap();
        for n in &g.node {
            assert_eq!(n.input.len(), 2, "{}: {:?}", n.op_type(), n.input);
        }
        let names: Vec<Vec<&str>> = g
            .node
            .iter()
            .map(|n| n.attribute.iter().map(|a| a.name()).collect())
            .collect();
        assert_eq!(
            names,
            [vec![], vec![], vec!["keepdims"], vec![], vec!["axis"]]
        );
        let split = g
            .initializer
            .iter()
            .find(|t| t.name().starts_with("split"))
            .unwrap();
        assert_eq!(split.dims, [2]);
        let ratio = g
            .initializer
            .iter()
            .find(|t| t.name().starts_with("ratio"))
            .unwrap();
        assert_eq!(ratio.dims, [0i64; 0]);
    }

    /// torch's default before 1.12: Slice and TopK (10), Clip and Pad (11) with attributes.
    #[test]
    fn opset_9_attributes_become_inputs() {
        let nodes: &[crate::ir::testing::NodeSpec] = &[
            ("Slice", &["x"], &["s"]),
            ("Clip", &["s"], &["c"]),
            ("Pad", &["c"], &["p"]),
            ("Pad", &["p"], &["q"]),
            ("TopK", &["q"], &["y", "i"]),
        ];
        let attrs = [
            vec![attr::ints("starts", &[1]), attr::ints("ends", &[4])],
            vec![attr::float("max", 6.0)],
            vec![attr::ints("pads", &[0, 1, 0, 1]), attr::float("value", 0.5)],
            vec![attr::ints("pads", &[1, 0, 1, 0])],
            vec![attr::int("k", 2), attr::int("axis", -1)],
        ];
        let mut m = at_opset(9, nodes, &attrs);
        for v in ["s", "c"] {
            let v = m.graph.find_value(v).unwrap();
            m.graph
                .set_value_type(v, &crate::ir::ValueType::new(1, vec![]));
        }
        assert_eq!(highest_reachable(&m), NEWEST);
        raise(&mut m, 17).unwrap();
        let g = m.to_proto().unwrap().graph.unwrap();
        let inputs: Vec<Vec<&str>> = g
            .node
            .iter()
            .map(|n| {
                n.input
                    .iter()
                    .map(|i| i.split('_').next().unwrap())
                    .collect()
            })
            .collect();
        assert_eq!(
            inputs,
            [
                vec!["x", "starts", "ends"],
                vec!["s", "", "max"],
                vec!["c", "pads", "value"],
                vec!["p", "pads"],
                vec!["q", "k"],
            ]
        );
        let attributes: Vec<usize> = g.node.iter().map(|n| n.attribute.len()).collect();
        assert_eq!(attributes, [0, 0, 0, 0, 1], "TopK keeps its axis");
    }

    /// Upsample (replaced at 10), Resize (changed at 11), a Pad of an unknown type by a value
    /// other than 0, and opsets below 9 keep the model where it is.
    #[test]
    fn what_changed_below_opset_11_blocks_the_raise() {
        for op in ["Upsample", "Resize", "Scatter"] {
            let m = at_opset(9, &[(op, &["x"], &["y"])], &[vec![]]);
            assert_eq!(highest_reachable(&m), 9, "{op}");
        }
        let int64 = DataType::Int64 as i64;
        let mut padded = at_opset(
            10,
            &[("Cast", &["x"], &["c"]), ("Pad", &["c"], &["y"])],
            &[
                vec![attr::int("to", int64)],
                vec![attr::float("value", 1.0)],
            ],
        );
        let c = padded.graph.find_value("c").unwrap();
        let ints = crate::ir::ValueType::new(int64 as i32, vec![]);
        padded.graph.set_value_type(c, &ints);
        assert_eq!(highest_reachable(&padded), 10);
        let old = at_opset(8, &[("Relu", &["x"], &["y"])], &[vec![]]);
        assert_eq!(highest_reachable(&old), 8);
        assert_eq!(
            highest_reachable(&at_opset(10, &[("Relu", &["x"], &["y"])], &[vec![]])),
            NEWEST
        );
    }

    #[test]
    fn a_split_without_sizes_counts_its_parts_at_opset_18() {
        let mut m = at_opset_11(&[("Split", &["x"], &["y", "z", "w"])], &[vec![]]);
        raise(&mut m, 18).unwrap();
        let g = m.to_proto().unwrap().graph.unwrap();
        assert_eq!(g.node[0].input.len(), 1);
        assert_eq!(attr::get_int(&g.node[0], "num_outputs"), Some(3));
    }

    #[test]
    fn opset_11_softmax_is_raised_only_over_its_last_axis() {
        let softmax = |axis: Option<i64>, rank: usize| {
            let a: Vec<_> = axis.map(|a| attr::int("axis", a)).into_iter().collect();
            let mut m = at_opset_11(
                &[("Identity", &["x"], &["t"]), ("Softmax", &["t"], &["y"])],
                &[vec![], a],
            );
            with_rank(&mut m, "t", rank);
            m
        };
        assert_eq!(highest_reachable(&softmax(Some(3), 4)), NEWEST);
        assert_eq!(highest_reachable(&softmax(Some(-1), 3)), NEWEST);
        assert_eq!(highest_reachable(&softmax(Some(1), 3)), 11);
        assert_eq!(
            highest_reachable(&softmax(None, 3)),
            11,
            "the default axis was 1"
        );
        let mut m = softmax(None, 2);
        raise(&mut m, 13).unwrap();
        let g = m.to_proto().unwrap().graph.unwrap();
        assert_eq!(
            attr::get_int(&g.node[1], "axis"),
            Some(1),
            "the old default, written"
        );
        let mut unknown = at_opset_11(
            &[("Softmax", &["x"], &["y"])],
            &[vec![attr::int("axis", 2)]],
        );
        assert_eq!(highest_reachable(&unknown), 11, "rank unknown");
        assert!(raise(&mut unknown, 17).is_err());
    }
    #[test]
    fn a_subgraph_stops_the_raise_only_when_it_holds_an_operator_the_raise_rewrites() {
        use crate::proto::attribute_proto::AttributeType;
        use crate::proto::{AttributeProto, GraphProto};
        let with_branch = |op: &str| {
            let mut p = model_proto(&["c", "x"], &["y"], &[], &[("If", &["c"], &["y"])]);
            let inner = model_proto(&["x"], &["z"], &[], &[(op, &["x"], &["z"])]);
            let branch = |name: &str| AttributeProto {
                name: Some(name.into()),
                r#type: Some(AttributeType::Graph as i32),
                g: Some(GraphProto {
                    input: vec![],
                    ..inner.graph.clone().unwrap()
                }),
                ..Default::default()
            };
            p.graph.as_mut().unwrap().node[0].attribute =
                vec![branch("then_branch"), branch("else_branch")];
            Model::from_proto(p).unwrap()
        };
        assert_eq!(highest_reachable(&with_branch("Identity")), NEWEST);
        assert_eq!(highest_reachable(&with_branch("ReduceMean")), 17);
        assert_eq!(highest_reachable(&with_branch("Split")), 17);
    }
}
