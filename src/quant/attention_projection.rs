//! Unpacking the Q/K/V projection of ONNX Runtime's fused `Attention` before quantizing for
//! ONNX Runtime, so that the projection — a quarter of a BERT layer's multiply-adds — runs in
//! integers like every other MatMul instead of staying float behind a weight-only
//! DequantizeLinear.
//!
//! Matches `com.microsoft` `Attention(x, W, b?, -, -, attention_bias?)` with a float 2-D
//! initializer `W [hidden, 3·hidden]`, `num_heads` dividing the hidden size, no mask index,
//! no past, not unidirectional, no rotary embedding, no `qkv_hidden_sizes`, and only its
//! first output read (the forms the attention fusion writes for encoders).
//! Produces `MatMul(x, W)`, `Split` in three equal parts along the last axis, and
//! `com.microsoft` `MultiHeadAttention(q, k, v, bias = b, attention_bias)` with the same
//! `num_heads` and `scale`; the quantizers then treat the MatMul as any other.
//! Why: ONNX Runtime runs a weight-only Attention by dequantizing its packed weight on every
//! call and multiplying in float with a weight it cannot prepack (measured on
//! all-MiniLM-L6-v2 at 8×128 tokens, two threads: DequantizeLinear alone took 4.6 ms of
//! 67 ms of kernel time), while `quantize_dynamic`'s unfused graph quantizes the projection.
//! Safe because `Attention` is defined as exactly this: `x·W + b` split into Q, K and V,
//! then multi-head attention over them with the same heads, scale and additive bias (ONNX
//! Runtime's contrib operator documentation; MultiHeadAttention adds `bias` to Q, K and V
//! before attending). The tract bridge runs both forms (`exec::lower`), and the tests hold
//! the unpacked model to the packed one.

use crate::error::Result;
use crate::ir::{attr, DataType, Model, Node, NodeId, PValue, Patch, Tensor};
use crate::passes::fuse::MS_DOMAIN;
use crate::passes::{opset, Rewrites};
use crate::quant::qdq::Selection;

/// Split's sizes as an input: opset 13.
const SPLIT_SIZES_OPSET: i64 = 13;

/// Rewrites every matching `Attention` of `model` that `selection` does not exclude (an
/// excluded Attention stays as it is, float); the rewrites count as `unpack-attention`.
pub fn unpack_attention_projections(model: &mut Model, selection: &Selection) -> Result<Rewrites> {
    let patches: Vec<Patch> = model
        .graph
        .nodes()
        .filter(|(_, node)| !selection.excludes(node))
        .filter_map(|(id, node)| unpacked(model, id, node))
        .collect();
    let mut rewrites = Rewrites::default();
    if patches.is_empty() {
        return Ok(rewrites);
    }
    opset::raise(model, SPLIT_SIZES_OPSET)?;
    for patch in patches {
        rewrites.apply(model, patch)?;
    }
    Ok(rewrites)
}

/// The hidden size of a packed Attention this pass can unpack: `W` a float `[hidden,
/// 3·hidden]` initializer with `num_heads` dividing `hidden`, and none of the inputs,
/// outputs or attributes `MultiHeadAttention` would read differently.
fn unpackable_hidden_size(model: &Model, node: &Node) -> Option<i64> {
    let g = &model.graph;
    let int = |name| attr::get_int(&node.proto, name).unwrap_or(0);
    let plain = node.domain() == MS_DOMAIN
        && node.op_type() == "Attention"
        && [3, 4, 6].iter().all(|&s| node.input(s).is_none())
        && int("unidirectional") == 0
        && int("do_rotary") == 0
        && attr::get(&node.proto, "qkv_hidden_sizes").is_none()
        && node.outputs.iter().skip(1).all(Option::is_none);
    let weight = g.initializer(node.input(1)?)?;
    let num_heads = int("num_heads");
    let (&[hidden, width], DataType::Float) = (weight.dims(), weight.dtype()) else {
        return None;
    };
    (plain && num_heads > 0 && width == 3 * hidden && hidden % num_heads == 0).then_some(hidden)
}

fn unpacked(model: &Model, id: NodeId, node: &Node) -> Option<Patch> {
    let hidden = unpackable_hidden_size(model, node)?;
    let out = node.output(0)?;
    let name = model.graph.value_name(out).to_string();
    let mut patch = Patch::new("unpack-attention");
    patch.anchor_at(id);
    let qkv = patch.new_value(&format!("{name}.qkv"));
    patch.add_node_proto(
        step(node.name(), "qkv_projection", "MatMul"),
        &[Some(node.input(0)?.into()), Some(node.input(1)?.into())],
        &[qkv],
    );
    let sizes = Tensor::from_i64("", &[3], &[hidden; 3]).ok()?;
    let sizes = patch.new_initializer(&format!("{name}.qkv_sizes"), sizes);
    let (q, k, v) = (
        patch.new_value(&format!("{name}.q")),
        patch.new_value(&format!("{name}.k")),
        patch.new_value(&format!("{name}.v")),
    );
    let mut split = step(node.name(), "qkv_split", "Split");
    split.attribute.push(attr::int("axis", -1));
    patch.add_node_proto(split, &[Some(qkv), Some(sizes)], &[q, k, v]);
    // The Attention's own proto (name, doc string, metadata), as the operator that keeps
    // its heads, scale and mask filter value.
    let mut attention = node.proto.clone();
    attention.op_type = Some("MultiHeadAttention".to_string());
    attention
        .attribute
        .retain(|a| matches!(a.name(), "num_heads" | "scale" | "mask_filter_value"));
    let slot = |s: usize| node.input(s).map(PValue::from);
    patch.add_node_proto(
        attention,
        &[Some(q), Some(k), Some(v), slot(2), None, slot(5)],
        &[PValue::Old(out)],
    );
    patch.remove_node(id);
    Some(patch)
}

/// A standard-operator prototype named after the Attention it comes from
/// (`<attention>/<suffix>`; unnamed when the Attention is), so that `--exclude` and the report
/// can name the projection.
fn step(attention: &str, suffix: &str, op_type: &str) -> crate::proto::NodeProto {
    crate::proto::NodeProto {
        name: (!attention.is_empty()).then(|| format!("{attention}/{suffix}")),
        op_type: Some(op_type.to_string()),
        ..Default::default()
    }
}
