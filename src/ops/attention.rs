//! The attention operators onnxopt emits, and what each runtime accepts of their inputs.
//!
//! Three operators carry the additive attention bias (the mask, T5's relative positions):
//! `com.microsoft::Attention` and `com.microsoft::MultiHeadAttention` as `attention_bias`,
//! ONNX's `Attention` (opset 23) as `attn_mask`. Exporters write that bias in whatever shape
//! broadcasts against the scores `[batch, heads, q_len, total]` — the classic BERT mask is
//! `[batch, 1, 1, total]` — but the kernels are stricter than broadcasting:
//!
//! - ONNX Runtime's contrib kernels (`CheckAttentionBias` in its attention helpers) take
//!   `[batch | 1, heads | 1, q_len, total]`: dims 0 and 1 may broadcast, dims 2 and 3 must
//!   be the query length and the total key length ("Input 'attention_bias' dimension 2
//!   should be same as sequence_length, got 1").
//! - ONNX Runtime's kernel for the standard `Attention` wants `attn_mask`'s last two dims to
//!   be the query and key lengths too ("inconsistent q_sequence_length (between attn_mask
//!   and Q)"), and so does tract's (`FlashSDPA: incompatible shapes`), although the
//!   standard allows any broadcastable mask.
//!
//! The standard `Attention`'s `softcap` (Gemma-2's `tanh(S / cap) · cap`) comes before the
//! mask in the standard, in its reference and in ONNX Runtime 1.32's CPU kernel (measured
//! against numpy with a causal and a padding mask of float32's lowest: 4.8e-7), and from
//! ONNX Runtime 1.27 on; 1.23 to 1.26 add the mask first, so a masked score is capped to
//! `-cap` instead of staying masked, and keeps a weight `e^(-cap - s)` of a kept score `s`'s:
//! at Gemma-2's cap of 50, nothing float32 shows (the tiny wild Gemma-2 with its cap set to
//! 50: 5.4e-7 from the original in 1.25.1 and 1.26.0, padded batches included); at the tiny
//! model's own cap of 0.05, logits 0.9 off. tract 0.23 refuses it, so `lower_softcap` writes
//! it out for tract.
//!
//! So a fusion hands these operators a bias whose last two dims are `q_len` and `total`:
//! as proven from the inferred shapes, or by expanding a bias that broadcasts there (the
//! classic BERT mask `[batch, 1, 1, seq]`, see `BiasFit::Expand`). A bias whose head dim is
//! not proven to be 1 or the score's, or whose batch is a known size other than 1 and the
//! batch's, keeps the block unfused.

use crate::ir::{attr, DataType, Dim, Graph, Node, NodeId, PValue, Patch, Tensor, ValueId};

/// The one bias form every attention kernel onnxopt emits for accepts:
/// `[batch | 1, heads | 1, q_len, total]`.
#[derive(Debug)]
pub struct BiasShape<'a> {
    pub batch: &'a Dim,
    pub heads: i64,
    pub q_len: &'a Dim,
    pub total: &'a Dim,
}

/// How a bias of some shape meets the contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BiasFit {
    /// Already `[batch | 1, heads | 1, q_len, total]`.
    Fits,
    /// `[batch | 1, heads | 1, rows, cols]` where `rows` (`cols`) is not proven to be
    /// `q_len` (`total`): a padding mask `[batch, 1, 1, total]` broadcast over the query
    /// rows, a causal mask sliced off a `[1, 1, max, max]` buffer by lengths computed at run
    /// time (GPT-2 before transformers 4.3x). In the original graph the bias is added to (or
    /// selects among) the scores `[batch, heads, q_len, total]`, so in any run it broadcasts
    /// to them: each such dim is 1 or the score's. Expanding it to exactly `q_len` and
    /// `total` is then the same tensor the original broadcast to, in the form the kernels
    /// take.
    Expand { rows: bool, cols: bool },
    /// Neither: why, for the report.
    Refused(String),
}

impl BiasShape<'_> {
    /// Where a bias of `dims` stands against the contract.
    pub fn fit(&self, dims: &[Dim]) -> BiasFit {
        let [b, n, rows, cols] = dims else {
            return BiasFit::Refused(format!("the bias has rank {}, not 4", dims.len()));
        };
        let is_one = |d: &Dim| d.value() == Some(1);
        // Two symbolic batches (tf2onnx names the mask's batch apart from the tokens'): the
        // kernels take a bias batch of 1 or the batch and refuse any other at run time
        // ("attention_bias dimension 0 should be batch_size or 1"), so a run gives the
        // original's answer or an error, never another answer; the original fails on such
        // a batch too (its residual Add cannot broadcast the mask's batch against the
        // tokens').
        let symbolic = |d: &Dim| d.value().is_none() && !matches!(d, Dim::Unknown);
        let both_symbolic = symbolic(b) && symbolic(self.batch);
        if !(is_one(b) || b.same(self.batch) || both_symbolic) {
            return BiasFit::Refused(format!(
                "bias dim 0 is {b}: not proven to be 1 or the batch {}",
                self.batch
            ));
        }
        if !(is_one(n) || n.value() == Some(self.heads)) {
            return BiasFit::Refused(format!(
                "bias dim 1 is {n}: not proven to be 1 or the {} heads",
                self.heads
            ));
        }
        let (rows, cols) = (!rows.same(self.q_len), !cols.same(self.total));
        match rows || cols {
            false => BiasFit::Fits,
            true => BiasFit::Expand { rows, cols },
        }
    }
}

// ---- how tract runs them ------------------------------------------------------------------
//
// tract would read `com.microsoft::Attention` as the standard `Attention`, a different
// operator; these lowerings implement ONNX Runtime's documented semantics with standard
// operators, for the forms the fusions emit (`exec::lower` applies them before a model goes
// to tract). `tests/engines.rs` runs them against ONNX Runtime's kernels on every corpus
// model.

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

/// Why tract cannot run the standard `Attention` node `node` of `g` as written, if its
/// inferred types show it cannot: tract 0.23's SDPA takes no boolean mask ("FlashSDPA: Mask
/// must be floating point", at codegen), and a float mask whose query dim broadcasts
/// (`[batch, 1, 1, total]`) fails with "incompatible shapes"; masks of the full
/// `[.., q_len, total]` shape, a 2-D `[q_len, total]` one and none run (tract 0.23.9). An
/// untyped mask (the lowerings' own, built to the full shape) is taken as runnable.
pub fn tract_refuses_standard(g: &Graph, node: &Node) -> Option<&'static str> {
    let mask = g.value_type(node.input(3)?)?;
    if mask.elem == DataType::Bool as i32 {
        return Some("a boolean mask (tract takes float masks only)");
    }
    let query_dim = |t: &crate::ir::ValueType| -> Option<Dim> {
        let dims = t.shape.as_ref()?;
        Some(dims.get(dims.len().checked_sub(2)?)?.clone())
    };
    let query = g.value_type(node.input(0)?).and_then(|t| query_dim(&t));
    let one = Dim::known(1);
    match (query_dim(&mask), query) {
        (Some(m), Some(q)) if m == one && q != one => {
            Some("a mask broadcast over the queries (tract needs their length there)")
        }
        _ => None,
    }
}

/// `com.microsoft::Attention(x, W, b?, attention_bias?)` (W constant, or dequantized from a
/// constant) with `num_heads`, optional `scale`, no mask index, no past, not unidirectional:
/// `x·W + b`, split in three along the last axis, then the standard 3-D `Attention`. Any
/// other form: `None` (tract then refuses the node, see `exec::support`).
pub fn lower_packed(g: &Graph, id: NodeId, node: &Node) -> Option<Patch> {
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

/// `com.microsoft::MultiHeadAttention(q, k, v, bias?, attention_bias?, past_key?,
/// past_value?)` on 3-D inputs with `num_heads`, `scale` when there is no bias, a constant
/// `[3·hidden]` bias, no key padding mask, not unidirectional: the bias's thirds added to q,
/// k and v, then the standard 3-D `Attention` with the same past and present key/values.
/// Also with k and v in the heads layout `[B, N, T, H]` (no bias, no past), as
/// cross-attention over cached K/V gives them.
pub fn lower_multi_head(g: &Graph, id: NodeId, node: &Node) -> Option<Patch> {
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
            let bias = g.constant(bias)?;
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
    // Key and value given in the heads layout [B, N, T, H] (cross-attention over cached K/V,
    // no bias, no past): back to [B, T, N·H], as the standard 3-D Attention reads them.
    let rank = |v: Option<ValueId>| v.and_then(|v| g.value_type(v)?.rank());
    if rank(node.input(1)) == Some(4) {
        if rank(node.input(2)) != Some(4) || node.input(3).is_some() || node.input(6).is_some() {
            return None;
        }
        let flat = Tensor::from_i64("flat", &[3], &[0, 0, -1]).ok()?;
        let flat = patch.new_initializer("flat", flat);
        let mut to_3d = |x: PValue| {
            let t = patch.op(
                "Transpose",
                "",
                &[x],
                vec![attr::ints("perm", &[0, 2, 1, 3])],
            );
            patch.op("Reshape", "", &[t, flat], vec![])
        };
        (k, v) = (to_3d(k), to_3d(v));
    }
    let inputs = [Some(q), Some(k), Some(v), slot(5), slot(6), slot(7)];
    let outputs: Vec<Option<PValue>> = (0..3).map(|s| node.output(s).map(PValue::from)).collect();
    patch.remove_node(id);
    standard_attention(&mut patch, &inputs, &outputs, num_heads, scale);
    Some(patch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_padding_mask_is_expanded_over_the_query_rows() {
        let (b, s) = (Dim::symbol("batch"), Dim::symbol("sequence"));
        let shape = BiasShape {
            batch: &b,
            heads: 4,
            q_len: &s,
            total: &s,
        };
        let one = Dim::known(1);
        assert_eq!(
            shape.fit(&[b.clone(), one.clone(), one.clone(), s.clone()]),
            BiasFit::Expand {
                rows: true,
                cols: false
            }
        );
        assert_eq!(
            shape.fit(&[one.clone(), Dim::known(4), s.clone(), s.clone()]),
            BiasFit::Fits
        );
        // One query row (a decode step) needs no expansion.
        let decode = BiasShape {
            q_len: &one,
            ..shape
        };
        assert_eq!(
            decode.fit(&[b.clone(), one.clone(), one.clone(), s.clone()]),
            BiasFit::Fits
        );
        // GPT-2's causal slice: neither dim proven.
        assert_eq!(
            shape.fit(&[one.clone(), one.clone(), Dim::Unknown, Dim::Unknown]),
            BiasFit::Expand {
                rows: true,
                cols: true
            }
        );
    }

    #[test]
    fn a_bias_whose_batch_or_heads_are_not_proven_is_refused_with_the_reason() {
        let (b, s) = (Dim::symbol("batch"), Dim::symbol("sequence"));
        let shape = BiasShape {
            batch: &b,
            heads: 4,
            q_len: &s,
            total: &s,
        };
        let BiasFit::Refused(why) = shape.fit(&[b.clone(), Dim::known(2), s.clone(), s.clone()])
        else {
            panic!("2 heads of 4 must be refused");
        };
        assert!(why.contains("4 heads"), "{why}");
        let BiasFit::Refused(why) = shape.fit(&[Dim::Unknown, Dim::known(1), s.clone(), s.clone()])
        else {
            panic!("an unknown batch must be refused");
        };
        assert!(why.contains("dim 0"), "{why}");
        let BiasFit::Refused(why) =
            shape.fit(&[Dim::known(2), Dim::known(1), s.clone(), s.clone()])
        else {
            panic!("a batch of 2 against a symbolic one must be refused");
        };
        assert!(why.contains("dim 0"), "{why}");
        let mask_batch = Dim::symbol("unk__312");
        assert_eq!(
            shape.fit(&[mask_batch, Dim::known(1), s.clone(), s.clone()]),
            BiasFit::Fits,
            "a batch named apart is the kernels' to check"
        );
        assert!(matches!(
            shape.fit(&[s.clone(), s.clone()]),
            BiasFit::Refused(_)
        ));
    }
}

/// Where an attention operator reads its KV cache, and the heads that cache and its query
/// hold: what sizes its past key and value must have (`exec::inputs` generates them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLayout {
    /// The input slots of the past key and value, `[batch, cache_heads, past, head_size]`.
    pub past_slots: [usize; 2],
    pub cache_heads: usize,
    /// The heads the query's last dim holds, `query_heads × head_size`: with key and value
    /// packed into the query, theirs too.
    pub query_heads: usize,
}

/// The cache layout of `node` in `g`: ONNX Runtime's GroupQueryAttention (past at 3 and 4,
/// `kv_num_heads` heads; a query without separate key and value packs `num_heads + 2 ×
/// kv_num_heads` heads) and MultiHeadAttention (past at 6 and 7, `num_heads` heads). `None`
/// for any other node.
pub fn cache_layout(node: &Node) -> Option<CacheLayout> {
    if node.domain() != crate::ops::MS_DOMAIN {
        return None;
    }
    let count = |name: &str| {
        attr::get_int(&node.proto, name)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
    };
    let heads = count("num_heads")?;
    match node.op_type() {
        "GroupQueryAttention" => {
            let kv_heads = count("kv_num_heads")?;
            let packed = node.input(1).is_none();
            Some(CacheLayout {
                past_slots: [3, 4],
                cache_heads: kv_heads,
                query_heads: if packed { heads + 2 * kv_heads } else { heads },
            })
        }
        "MultiHeadAttention" => Some(CacheLayout {
            past_slots: [6, 7],
            cache_heads: heads,
            query_heads: heads,
        }),
        _ => None,
    }
}

/// The standard 4-D `Attention` with a `softcap` (Gemma-2's capped scores), which tract 0.23
/// refuses, written out for it: `Softmax(tanh(Q·Kᵀ·scale / cap)·cap + mask)·V`, over the keys
/// and values after their past and, for grouped heads, each key/value head repeated for its
/// query heads (the operator's GQA); the presents are the concatenations. Only the form the
/// grouped fusion writes: `scale` and `softcap` alone, 4-D Q, K and V with known heads and
/// head size, a float mask or none, no `nonpad_kv_seqlen`, at most three outputs.
pub fn lower_softcap(g: &Graph, id: NodeId, node: &Node) -> Option<Patch> {
    let cap = attr::get_float(&node.proto, "softcap")?;
    let known = |a: &crate::proto::AttributeProto| ["scale", "softcap"].contains(&a.name());
    if cap <= 0.0
        || !node.proto.attribute.iter().all(known)
        || node.inputs.len() > 6
        || node.output(3).is_some()
    {
        return None;
    }
    let heads_of = |v: ValueId| -> Option<(i64, i64)> {
        match g.value_type(v)?.shape?.as_slice() {
            [_, n, _, h] => Some((n.value()?, h.value()?)),
            _ => None,
        }
    };
    let (q, k, v) = (node.input(0)?, node.input(1)?, node.input(2)?);
    let (q_heads, head) = heads_of(q)?;
    let (kv_heads, _) = heads_of(k)?;
    if kv_heads == 0 || q_heads % kv_heads != 0 {
        return None;
    }
    let mask = node.input(3);
    if mask.is_some_and(|m| g.value_type(m).map(|t| t.elem) != Some(DataType::Float as i32)) {
        return None;
    }
    let scale = attr::get_float(&node.proto, "scale").unwrap_or(1.0 / (head as f32).sqrt());
    let mut patch = Patch::new("lower-softcapped-attention");
    let scalar = |patch: &mut Patch, name: &str, x: f32| {
        Some(patch.new_initializer(name, Tensor::from_f32(name, &[], &[x]).ok()?))
    };
    let ints = |patch: &mut Patch, name: &str, values: &[i64]| {
        let tensor = Tensor::from_i64(name, &[values.len() as i64], values).ok()?;
        Some(patch.new_initializer(name, tensor))
    };
    // Keys and values after their past (the presents), repeated for grouped heads: each
    // head r times along a new axis 2, merged into the heads.
    let repeats = q_heads / kv_heads;
    let repeat = match repeats {
        1 => None,
        _ => Some((
            ints(&mut patch, "repeat_axis", &[2])?,
            ints(&mut patch, "repeats", &[1, 1, repeats, 1, 1])?,
            ints(&mut patch, "repeated_heads", &[0, q_heads, -1, head])?,
        )),
    };
    let mut all = Vec::with_capacity(2);
    for (new, past, present) in [(k, 4, 1), (v, 5, 2)] {
        let total = match node.input(past) {
            Some(past) => patch.op(
                "Concat",
                "",
                &[past.into(), new.into()],
                vec![attr::int("axis", 2)],
            ),
            None => new.into(),
        };
        if let Some(present) = node.output(present) {
            patch.replace_uses(present, total);
        }
        let total = match repeat {
            None => total,
            Some((axis, times, heads)) => {
                let unsqueezed = patch.op("Unsqueeze", "", &[total, axis], vec![]);
                let expanded = patch.op("Expand", "", &[unsqueezed, times], vec![]);
                patch.op("Reshape", "", &[expanded, heads], vec![])
            }
        };
        all.push(total);
    }
    let keys_t = patch.op(
        "Transpose",
        "",
        &[all[0]],
        vec![attr::ints("perm", &[0, 1, 3, 2])],
    );
    let scores = patch.op("MatMul", "", &[q.into(), keys_t], vec![]);
    let scale = scalar(&mut patch, "scale", scale)?;
    let scores = patch.op("Mul", "", &[scores, scale], vec![]);
    let inverse = scalar(&mut patch, "cap_inverse", 1.0 / cap)?;
    let cap = scalar(&mut patch, "softcap", cap)?;
    let scores = patch.op("Mul", "", &[scores, inverse], vec![]);
    let scores = patch.op("Tanh", "", &[scores], vec![]);
    let mut scores = patch.op("Mul", "", &[scores, cap], vec![]);
    if let Some(mask) = mask {
        scores = patch.op("Add", "", &[scores, mask.into()], vec![]);
    }
    let probs = patch.op("Softmax", "", &[scores], vec![attr::int("axis", -1)]);
    let y = patch.op("MatMul", "", &[probs, all[1]], vec![]);
    patch.replace_uses(node.output(0)?, y);
    patch.remove_node(id);
    Some(patch)
}
