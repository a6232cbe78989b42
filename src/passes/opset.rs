//! Raising the default-domain opset import, for fusions whose replacement exists only in a
//! newer opset (LayerNormalization 17, Gelu 20, RMSNormalization and Attention 23).
//!
//! Matches: a model importing ONNX opset 13 or later.
//! Produces: the same model importing the requested opset, with the operators whose
//! signature changed in between rewritten: from opset 18 the Reduce operators (except
//! ReduceSum, which moved at 13) take `axes` as an input instead of an attribute. The IR
//! version is raised to the lowest one that defines the opset, never lowered.
//! Safe because: between opsets 13 and 23 the other operators only gained element types or
//! attributes whose defaults keep the old behaviour, except the few listed in
//! `CHANGED_MEANING`, whose presence stops the raise.

use crate::error::{Error, Result};
use crate::ir::{attr, Model, Patch, Tensor};

/// The newest opset this module raises to.
pub const NEWEST: i64 = 23;
/// Operators whose meaning (not only types or optional attributes) changed between 13 and 23.
const CHANGED_MEANING: &[&str] = &["RoiAlign", "DFT", "GroupNormalization"];
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

/// The highest default-domain opset `model` can be raised to (its own when it cannot).
pub fn highest_reachable(model: &Model) -> i64 {
    let now = model.opset("").unwrap_or(0);
    let blocked = now < 13
        || model
            .graph
            .nodes()
            .any(|(_, n)| n.domain().is_empty() && CHANGED_MEANING.contains(&n.op_type()))
        || model.graph.nodes().any(|(_, n)| {
            n.proto
                .attribute
                .iter()
                .any(|a| a.g.is_some() || !a.graphs.is_empty())
        });
    if blocked {
        now
    } else {
        now.max(NEWEST)
    }
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
    if from < 18 && to >= 18 {
        move_reduce_axes_to_inputs(model)?;
    }
    model.require_opset("", to);
    let ir = ir_version_for(to);
    if model.ir_version() < ir {
        model.envelope.ir_version = Some(ir);
    }
    Ok(())
}

fn move_reduce_axes_to_inputs(model: &mut Model) -> Result<()> {
    let g = &model.graph;
    let targets: Vec<_> = g
        .nodes()
        .filter(|(_, n)| n.domain().is_empty() && REDUCE_AXES_18.contains(&n.op_type()))
        .filter(|(_, n)| attr::get(&n.proto, "axes").is_some())
        .map(|(id, _)| id)
        .collect();
    for id in targets {
        let node = model.graph.node(id).clone();
        let axes = attr::get_ints(&node.proto, "axes")
            .unwrap_or_default()
            .to_vec();
        let mut patch = Patch::new("opset-reduce-axes");
        let axes_value = patch.new_initializer(
            "axes",
            Tensor::from_i64("axes", &[axes.len() as i64], &axes)?,
        );
        let mut inputs: Vec<_> = node.inputs.iter().map(|v| v.map(Into::into)).collect();
        inputs.truncate(1);
        inputs.push(Some(axes_value));
        let outputs: Vec<_> = node.outputs.iter().flatten().map(|&v| v.into()).collect();
        let attributes = node
            .proto
            .attribute
            .iter()
            .filter(|a| a.name() != "axes")
            .cloned()
            .collect();
        patch
            .remove_node(id)
            .add_node(node.op_type(), "", &inputs, &outputs, attributes);
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
}
