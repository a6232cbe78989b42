//! Lowering ONNX Runtime contrib operators that tract cannot run faithfully into standard
//! operators that it can, before a model goes to tract (and two standard forms that tract
//! 0.23 refuses).
//!
//! tract resolves operators by name and would read `com.microsoft::Attention` as the standard
//! `Attention`, a different operator. These lowerings implement ONNX Runtime's documented
//! semantics for the forms listed below (the ones onnxopt's fusions emit); a node outside
//! them is left as it is and then refused by `support`, so it is never run wrongly.
//!
//! - `Attention(x, W, b?, attention_bias?)` (W constant, or dequantized from a constant) with
//!   `num_heads`, optional `scale`, no mask index, no past, not unidirectional: `x·W + b`,
//!   split in three along the last axis, then the standard 3-D `Attention`.
//! - `MultiHeadAttention(q, k, v, bias?, attention_bias?, past_key?, past_value?)` on 3-D
//!   inputs with `num_heads`, `scale` when there is no bias, a constant `[3·hidden]` bias,
//!   no key padding mask, not unidirectional: the bias's thirds added to q, k and v, then the
//!   standard 3-D `Attention` with the same past and present key/values.
//! - `Gemm(A, B, C?)` with a float16 weight B, alpha and beta 1, A not transposed:
//!   `MatMul(A, B or Bᵀ) + C` (tract 0.23 mistypes a float16 Gemm; see `float16_gemm`).
//! - `CumSum(x, axis)` of int64 `x`: summed in float64 and cast back (tract 0.23 cannot sum
//!   int64; see `int64_cumsum`).

use crate::error::Result;
use crate::ir::{attr, Graph, Model, Node, NodeId, PValue, Patch, Tensor, ValueId};
use crate::passes::fuse::MS_DOMAIN;
use crate::passes::matching;

/// Lowers every contrib node of `model` that has a lowering, float16 Gemms and int64 sums.
pub fn lower_contrib_ops(model: &mut Model) -> Result<()> {
    let nodes: Vec<NodeId> = model
        .graph
        .nodes()
        .filter(|(_, n)| n.domain() == MS_DOMAIN || n.is("Gemm") || n.is("CumSum"))
        .map(|(id, _)| id)
        .collect();
    for id in nodes {
        let node = model.graph.node(id).clone();
        let patch = match (node.domain(), node.op_type()) {
            (MS_DOMAIN, "Attention") => packed_attention(model, id, &node),
            (MS_DOMAIN, "MultiHeadAttention") => multi_head_attention(model, id, &node),
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
    let transposed = matching::plain_gemm_trans_b(node)?;
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

fn int_attr(node: &Node, name: &str) -> i64 {
    attr::get_int(&node.proto, name).unwrap_or(0)
}

fn absent(node: &Node, slots: &[usize]) -> bool {
    slots.iter().all(|&s| node.input(s).is_none())
}

fn standard_attention(
    patch: &mut Patch,
    inputs: &[Option<PValue>],
    outputs: &[Option<PValue>],
    num_heads: i64,
    scale: f32,
) {
    patch.add_node_with_optional_outputs(
        "Attention",
        "",
        inputs,
        outputs,
        vec![
            attr::int("q_num_heads", num_heads),
            attr::int("kv_num_heads", num_heads),
            attr::float("scale", scale),
        ],
    );
}

/// The dims of a constant weight, or of the constant a DequantizeLinear dequantizes (a weight
/// quantized to int8 keeps its dims).
fn weight_dims(g: &Graph, w: ValueId) -> Option<Vec<i64>> {
    if let Some(t) = g.constant(w) {
        return Some(t.dims().to_vec());
    }
    let dq = g.node(g.producer(w)?);
    if !dq.is("DequantizeLinear") {
        return None;
    }
    g.constant(dq.input(0)?).map(|t| t.dims().to_vec())
}

fn packed_attention(model: &Model, id: NodeId, node: &Node) -> Option<Patch> {
    let g = &model.graph;
    let supported = absent(node, &[3, 4, 6])
        && int_attr(node, "unidirectional") == 0
        && int_attr(node, "do_rotary") == 0
        && attr::get(&node.proto, "qkv_hidden_sizes").is_none()
        && node.outputs.iter().skip(1).all(Option::is_none);
    if !supported {
        return None;
    }
    let num_heads = int_attr(node, "num_heads");
    let dims = weight_dims(g, node.input(1)?)?;
    let width = *dims.get(1)?;
    if num_heads <= 0 || dims.len() != 2 || width % (3 * num_heads) != 0 {
        return None;
    }
    let hidden = width / 3;
    let scale = attr::get_float(&node.proto, "scale")
        .unwrap_or_else(|| 1.0 / ((hidden / num_heads) as f32).sqrt());

    let mut patch = Patch::new("lower-attention");
    let mut qkv = patch.op(
        "MatMul",
        "",
        &[node.input(0)?.into(), node.input(1)?.into()],
        vec![],
    );
    if let Some(b) = node.input(2) {
        qkv = patch.op("Add", "", &[qkv, b.into()], vec![]);
    }
    let sizes = Tensor::from_i64("split", &[3], &[hidden; 3]).ok()?;
    let sizes = patch.new_initializer("split", sizes);
    let (q, k, v) = (
        patch.new_value("q"),
        patch.new_value("k"),
        patch.new_value("v"),
    );
    patch.add_node(
        "Split",
        "",
        &[Some(qkv), Some(sizes)],
        &[q, k, v],
        vec![attr::int("axis", -1)],
    );
    let inputs = [Some(q), Some(k), Some(v), node.input(5).map(PValue::from)];
    standard_attention(
        &mut patch,
        &inputs,
        &[Some(node.output(0)?.into())],
        num_heads,
        scale,
    );
    patch.remove_node(id);
    Some(patch)
}

fn multi_head_attention(model: &Model, id: NodeId, node: &Node) -> Option<Patch> {
    let supported = absent(node, &[4, 8, 9])
        && node.input(1).is_some()
        && node.input(2).is_some()
        && node.input(6).is_some() == node.input(7).is_some()
        && int_attr(node, "unidirectional") == 0
        && node.output(3).is_none();
    let num_heads = int_attr(node, "num_heads");
    if !supported || num_heads <= 0 {
        return None;
    }
    let mut patch = Patch::new("lower-multi-head-attention");
    let slot = |s: usize| node.input(s).map(PValue::from);
    let (mut q, mut k, mut v) = (slot(0)?, slot(1)?, slot(2)?);
    let scale = match node.input(3) {
        None => attr::get_float(&node.proto, "scale")?,
        Some(bias) => {
            let bias = model.graph.constant(bias)?;
            let width = *bias.dims().first()?;
            if bias.dims().len() != 1 || width % (3 * num_heads) != 0 {
                return None;
            }
            let hidden = width / 3;
            let sizes = Tensor::from_i64("split", &[3], &[hidden; 3]).ok()?;
            let sizes = patch.new_initializer("split", sizes);
            let thirds = [
                patch.new_value("bias_q"),
                patch.new_value("bias_k"),
                patch.new_value("bias_v"),
            ];
            patch.add_node(
                "Split",
                "",
                &[node.input(3).map(PValue::from), Some(sizes)],
                &thirds,
                vec![attr::int("axis", 0)],
            );
            q = patch.op("Add", "", &[q, thirds[0]], vec![]);
            k = patch.op("Add", "", &[k, thirds[1]], vec![]);
            v = patch.op("Add", "", &[v, thirds[2]], vec![]);
            attr::get_float(&node.proto, "scale")
                .unwrap_or_else(|| 1.0 / ((hidden / num_heads) as f32).sqrt())
        }
    };
    let inputs = [Some(q), Some(k), Some(v), slot(5), slot(6), slot(7)];
    let outputs: Vec<Option<PValue>> = (0..3).map(|s| node.output(s).map(PValue::from)).collect();
    patch.remove_node(id);
    standard_attention(&mut patch, &inputs, &outputs, num_heads, scale);
    Some(patch)
}
