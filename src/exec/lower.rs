//! Lowering, before a model goes to tract, what tract cannot run as it is:
//!
//! - ONNX Runtime contrib operators that tract would misread (it resolves operators by name
//!   and would read `com.microsoft::Attention` as the standard `Attention`): the lowerings
//!   of `ops::attention` and `ops::rotary`, for the forms onnxopt's fusions emit; a node outside them is left
//!   as it is and then refused by `support`, so it is never run wrongly.
//! - a standard `RotaryEmbedding` with position ids: see `ops::rotary`.
//! - `Gemm(A, B, C?)` with a float16 weight B, alpha and beta 1, A not transposed:
//!   `MatMul(A, B or Bᵀ) + C` (tract 0.23 mistypes a float16 Gemm; see `float16_gemm`).
//! - `CumSum(x, axis)` of int64 `x`: summed in float64 and cast back (tract 0.23 cannot sum
//!   int64; see `int64_cumsum`).

use crate::error::Result;
use crate::ir::{attr, Model, Node, NodeId, PValue, Patch};
use crate::ops::weights::plain_gemm_trans_b;
use crate::ops::{attention, rotary, MS_DOMAIN};

/// Lowers every contrib node of `model` that has a lowering, float16 Gemms and int64 sums.
pub fn lower_contrib_ops(model: &mut Model) -> Result<()> {
    let nodes: Vec<NodeId> = model
        .graph
        .nodes()
        .filter(|(_, n)| {
            n.domain() == MS_DOMAIN || n.is("Gemm") || n.is("CumSum") || n.is("RotaryEmbedding")
        })
        .map(|(id, _)| id)
        .collect();
    for id in nodes {
        let node = model.graph.node(id).clone();
        let patch = match (node.domain(), node.op_type()) {
            (MS_DOMAIN, "Attention") => attention::lower_packed(&model.graph, id, &node),
            (MS_DOMAIN, "MultiHeadAttention") => {
                attention::lower_multi_head(&model.graph, id, &node)
            }
            (MS_DOMAIN | "", "RotaryEmbedding") => rotary::lower_for_tract(&model.graph, id, &node),
            ("", "Gemm") => float16_gemm(model, id, &node),
            ("", "CumSum") => int64_cumsum(model, id, &node),
            _ => None,
        };
        if let Some(patch) = patch {
            model.graph.apply(patch)?;
        }
    }
    Ok(())
}

/// `Gemm(A, B, C)` with a float16 weight B, alpha and beta 1 and A not transposed, as
/// `MatMul(A, B or Bᵀ) + C`: tract 0.23's Gemm expansion types its result float32 whatever
/// its inputs, and refuses the float16 model.
fn float16_gemm(model: &Model, id: NodeId, node: &Node) -> Option<Patch> {
    let g = &model.graph;
    let b = node.input(1)?;
    let float16_weight = g
        .initializer(b)
        .is_some_and(|t| t.dtype() == crate::ir::DataType::Float16 && t.dims().len() == 2);
    let transposed = plain_gemm_trans_b(node)?;
    if !float16_weight {
        return None;
    }
    let mut patch = Patch::new("lower-gemm");
    let mut weight: PValue = b.into();
    if transposed {
        weight = patch.op(
            "Transpose",
            "",
            &[weight],
            vec![attr::ints("perm", &[1, 0])],
        );
    }
    let out = node.output(0)?;
    match node.input(2) {
        None => {
            patch.add_node(
                "MatMul",
                "",
                &[Some(node.input(0)?.into()), Some(weight)],
                &[PValue::Old(out)],
                vec![],
            );
        }
        Some(c) => {
            let product = patch.op("MatMul", "", &[node.input(0)?.into(), weight], vec![]);
            patch.add_node(
                "Add",
                "",
                &[Some(product), Some(c.into())],
                &[PValue::Old(out)],
                vec![],
            );
        }
    }
    patch.remove_node(id);
    Some(patch)
}

/// `CumSum(x, axis)` of an int64 `x` as `Cast(CumSum(Cast(x, double), axis), int64)`.
/// tract reads every ONNX cast to int64 as a cast to its symbolic-dimension type, which its
/// CumSum cannot sum ("TDim is not a number"): the position ids of RoBERTa's dynamo export
/// (`CumSum(Cast(mask, int64))`) stopped validation and calibration of that model. A float64
/// sum is exact while the sums stay below 2^53 in magnitude (position ids count tokens).
fn int64_cumsum(model: &Model, id: NodeId, node: &Node) -> Option<Patch> {
    let g = &model.graph;
    let data = node.input(0)?;
    let int64 = crate::ir::DataType::Int64 as i32;
    let from_cast_to_int64 = g
        .producer(data)
        .map(|p| g.node(p))
        .is_some_and(|p| p.is("Cast") && attr::get_int(&p.proto, "to") == Some(int64.into()));
    let typed_int64 = g.value_type(data).is_some_and(|t| t.elem == int64);
    if !(from_cast_to_int64 || typed_int64) {
        return None;
    }
    let double = crate::ir::DataType::Double as i64;
    let mut patch = Patch::new("lower-cumsum");
    let wide = patch.op("Cast", "", &[data.into()], vec![attr::int("to", double)]);
    let sum = patch.op(
        "CumSum",
        "",
        &[wide, node.input(1)?.into()],
        node.proto.attribute.clone(),
    );
    patch.add_node(
        "Cast",
        "",
        &[Some(sum)],
        &[PValue::Old(node.output(0)?)],
        vec![attr::int("to", int64.into())],
    );
    patch.remove_node(id);
    Some(patch)
}
