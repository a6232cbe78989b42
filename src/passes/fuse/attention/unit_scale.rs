//! For ONNX Runtime: the scale of an attention with a KV cache moved onto its query,
//!
//! ```text
//! Attention(Q, K, V, …, scale = s)   →   Attention(Q·s, K, V, …, scale = 1)
//! ```
//!
//! for the standard `Attention` and for `com.microsoft` MultiHeadAttention without a bias
//! input (the kernel would add it to the query after the Mul). Only with a cache (`past_key`:
//! a graph that decodes one token at a time), and the standard one only in a form no other
//! rule rewrites: the 3-D form (`q_num_heads` set, what `attention-flat-heads`
//! writes), a soft-capped one, or 4-D heads whose query is a partial rotation's Concat of its
//! rotated and passed-through parts (Phi-2, StableLM, GPT-NeoX), which `attention-flat-heads`
//! does not take; the grouped rules take at most four inputs, so never a cached Attention.
//! (Not any other 4-D Attention: the flat-heads rule may take it once the fusions after this
//! one, a head's RMSNorm, have run.)
//!
//! Why: ONNX Runtime's CPU kernel computes each query head's scores as a GEMM with
//! `alpha = scale`, and MLAS runs a one-row product (a decoding step) through its
//! matrix-vector kernel only at `alpha = 1`; at any other scale it packs the head's keys
//! first, for every query head (MultiHeadAttention's kernel the same: 312 → 294 µs a node at
//! 12 heads of 64 after 512 tokens). On SmolLM2-135M's layer (9 query, 3 key/value heads of 64,
//! 512 cached positions, ONNX Runtime 1.32, 2 threads) the node takes 144 µs at scale 1
//! against 181 µs, and the whole decoding step 0.7–1.3 ms less in four runs (of 28–29 ms,
//! `scripts/llm/decode_latency.py`); the Mul over one token's query costs about half a
//! microsecond. A prompt's many rows run
//! the packed GEMM either way, so an Attention without a cache keeps its scale.
//!
//! Safe because the scores are `(Q·Kᵀ)·s = (Q·s)·Kᵀ` up to rounding (exactly for the powers
//! of two `1/√H` is at head sizes 4ᵏ), the soft cap and the mask apply to those scores as
//! before, and the default scale (`1/√H`: the attribute absent, or MultiHeadAttention's 0) is
//! written out from the head size the types give. The Mul takes the query's element type.

use super::*;
use crate::passes::fuse::pattern::absent;

/// A standard Attention or a `com.microsoft` MultiHeadAttention with a KV cache, whose scale is
/// not 1 (absent, or MultiHeadAttention's 0: 1/√H). The standard one: Q, K, V, a mask or
/// none, past key and value (and `nonpad_kv_seqlen`); MultiHeadAttention: Q, K, V, no bias (its
/// kernel adds the bias to the query, after any Mul) and no key padding mask, an attention
/// bias or none, past key and value.
pub(super) fn scaled_attention() -> Pat {
    let scale_not_one = |a: Option<&AttributeProto>| a.is_none_or(|a| a.f() != 1.0);
    let cached = |op_type: &'static str, inputs: Vec<Pat>| {
        op(op_type, inputs)
            .attr("scale", scale_not_one)
            .node("attention")
    };
    let optional = || either([any(), absent()]);
    let qkv = || vec![value("q"), any(), any()];
    let standard = [qkv(), vec![optional(), any(), any()]].concat();
    let multi_head = [qkv(), vec![absent(), absent(), optional(), any(), any()]].concat();
    either([
        cached("Attention", standard.clone()),
        cached("Attention", [standard, vec![any()]].concat()),
        cached("MultiHeadAttention", multi_head).domain(MS_DOMAIN),
    ])
}

pub(super) fn build_unit_scale(m: &Match, rw: &mut Rewrite) -> Built {
    rw.require_ort()?;
    let g = rw.graph;
    let attention = m.node("attention").ok_or(Declined::Missing("attention"))?;
    let node = g.node(attention);
    let standard = node.domain().is_empty();
    let heads = match standard {
        true => attr::get_int(&node.proto, "q_num_heads"),
        false => attr::get_int(&node.proto, "num_heads"),
    };
    let q = m.get("q")?;
    if standard {
        let flat = heads.is_some();
        let capped = attr::get_float(&node.proto, "softcap").is_some_and(|c| c != 0.0);
        let partly_rotated = g.producer(q).is_some_and(|p| g.node(p).is("Concat"));
        if !(flat || capped || partly_rotated) {
            return Err(Declined::Mismatch(
                "4-D heads: the flat-heads rule may yet move them inside".into(),
            ));
        }
    }
    // MultiHeadAttention's 0 is its default, as an absent scale is the standard's.
    let scale = match attr::get_float(&node.proto, "scale").filter(|&s| s != 0.0) {
        Some(s) => s,
        None => default_scale(g, q, heads)?,
    };
    let elem = g
        .value_type(q)
        .and_then(|t| DataType::try_from(t.elem).ok())
        .filter(|dt| dt.is_float())
        .ok_or_else(|| Declined::NotProven(format!("{} is a float tensor", shown(g, q))))?;
    let factor = Tensor::from_f32_as("query_scale", elem, &[], &[scale])
        .map_err(|e| Declined::Refused(e.to_string()))?;
    let factor = rw.constant("query_scale", factor);
    let scaled = rw.op("Mul", "", &[q.into(), factor], vec![]);
    let mut inputs: Vec<Option<PValue>> = node.inputs.iter().map(|i| i.map(PValue::from)).collect();
    inputs[0] = Some(scaled);
    let wanted: Vec<bool> = (0..node.outputs.len())
        .map(|slot| node.output(slot).is_some())
        .collect();
    let mut attributes: Vec<AttributeProto> = node
        .proto
        .attribute
        .iter()
        .filter(|a| a.name() != "scale")
        .cloned()
        .collect();
    attributes.push(attr::float("scale", 1.0));
    let (op_type, domain) = (node.op_type().to_string(), node.domain().to_string());
    let outs = rw.op_with_outputs(&op_type, &domain, &inputs, &wanted, attributes);
    rw.replace_outputs(attention, &outs, 0);
    Ok(())
}

/// The default scale, `1/√H`: H the last dim of a 4-D query, or its width over the query's
/// heads in the 3-D form (`q_num_heads`, MultiHeadAttention's `num_heads`).
fn default_scale(g: &Graph, q: ValueId, q_heads: Option<i64>) -> Checked<f32> {
    let q_dims = dims(g, q)?;
    let head_size = match (q_dims.as_slice(), q_heads) {
        ([_, _, width], Some(heads)) if heads > 0 => {
            width.value().filter(|w| w % heads == 0).map(|w| w / heads)
        }
        ([_, _, _, h], None) => h.value(),
        _ => None,
    };
    match head_size {
        Some(h) if h > 0 => Ok(1.0 / (h as f32).sqrt()),
        _ => Err(Declined::NotProven(format!(
            "{} has a known head size",
            shown(g, q)
        ))),
    }
}
