//! Attention fusion.
//!
//! Matches the attention core as today's exporters write it, for BERT, DistilBERT, RoBERTa,
//! BART and T5 encoders, ViT and GPT-2 (with and without past key/values):
//!
//! ```text
//! Qh = Transpose[0,2,1,3](Reshape(q, [B,S,N,H]))            (· scale)
//! Kᵀ = Transpose[0,2,3,1](Reshape(k, [B,T,N,H]))            legacy exporter
//!    | Transpose[0,1,3,2](Kh)                                past key/values
//!    | Reshape(Transpose[0,2,1](Reshape(Kh, [B·N,T,H])), [B,N,H,T])   dynamo exporter
//!      where Kh = heads(k), or Concat(past_k, heads(k), axis 2),
//!      or a [B,N,T,H] value (the encoder's cached K/V of cross-attention)  (· scale)
//! P  = Softmax(S + bias (+ bias2) | Where(masked, fill, S) | S)   with S = Qh·Kᵀ (· or / scale)
//!      then Where(IsNaN(P), 0, P) (SDPA); MPNet adds its relative position bias and the
//!      padding mask one after the other; Softmax's axis is the last, or not set from opset 13
//! y  = Reshape(Transpose[0,2,1,3](P · Vh), [B,S,N·H])   (an identity Reshape may follow P · Vh)
//! ```
//!
//! Also (see each pattern's doc): heads merged into the batch (`attention-3d`), the standard
//! `Attention` op (`attention-op`), and `torch.nn.MultiheadAttention`'s sequence-first layout
//! (`attention-seq-first`, fused on Q, K and V transposed batch first), and the grouped-query
//! attention of decoder LLMs on rotated heads and a cache (`attention-grouped`, `grouped.rs`),
//! and multi-query attention with the query heads folded into the rows (`attention-query-rows`,
//! GPT-BigCode, `query_rows.rs`); the standard `Attention` these leave on 4-D heads then takes
//! the heads' split and merge inside (`attention-flat-heads`, `flat_heads.rs`). For ONNX
//! Runtime, the standard `Attention` finally takes its scale on the query
//! (`attention-unit-scale`, `unit_scale.rs`: its kernel decodes faster at scale 1), and its
//! query, key and value projections become one product (`attention-packed-projections`,
//! `packed_projections.rs`).
//!
//! The additive bias carries everything masks do (padding as `Where(mask, 0, -inf)`, GPT-2's
//! causal mask folded into it, T5's relative position bias), so no mask form is special. A
//! fill written over masked scores (`Where(masked, fill, S)` with a fill of -inf or at most
//! -10000) is the bias `Where(masked, fill, 0)`: `S + fill` rounds to `fill` for finfo's
//! minimum and -inf, and for -10000 both give weights that underflow to 0 (rows whose every
//! key is masked aside, as below).
//! The number of heads and the head size come from the types of the Reshape outputs.
//!
//! Produces:
//! - `Target::Ort`: `com.microsoft` Attention with the Q, K and V weights packed into one
//!   matrix (one GEMM) when the three projections are `x·W (+ b)` of the same `x`, or come
//!   from one projection split in three (GPT-2); else MultiHeadAttention on the projected
//!   Q, K, V, with past and present key/values when the model has them;
//! - `Target::Onnx`: the standard `Attention` (opset 23, raising the import) on 3-D Q, K, V.
//!
//! The scale attribute is always written: the product of the scales found (1 when none, as
//! in T5). Safe because: the heads layout is checked from types (every Reshape must split
//! only the last dim into N×H, the dynamo Kᵀ detour must merge and split exactly B and N),
//! scales are scalar constants, every intermediate value must be read only inside the match
//! (present key/values are replaced by the fused operator's outputs), and the replacement
//! computes softmax(Q·Kᵀ·scale + bias)·V per head. One difference remains: a query row whose
//! every key is masked with -inf gives zeros in the SDPA export (the IsNaN→Where) and NaN or
//! a uniform average in the fused operators; such rows are padding of an all-padding input.

use super::pattern::{
    add, any, constant_where, div, either, mul, op, perm_is, scalar, unary, value, Match, Pat,
};
use super::{Built, Declined, Fusion, Rewrite, Rule, Target, MS_DOMAIN};
use crate::ir::shape::{broadcast_shapes, same_shape};
use crate::ir::{attr, DataType, DataTypeExt, Dim, Graph, NodeId, PValue, Tensor, ValueId};
use crate::ops::attention::{BiasFit, BiasShape};
use crate::ops::weights::plain_gemm_trans_b;
use crate::proto::AttributeProto;

mod flat_heads;
mod grouped;
mod packed_projections;
mod query_rows;
mod unit_scale;

const ATTENTION_OPSET: i64 = 23;
/// The largest fill `is_mask_fill` takes for a masked score: -10000, what BERT-era exports
/// add; every larger mask constant seen is finfo's minimum or -inf.
const MASK_FILL_AT_MOST: f64 = -1e4;

pub struct AttentionFusion {
    pub target: Target,
}

impl Fusion for AttentionFusion {
    const NAME: &'static str = "fuse-attention";

    fn rules() -> Vec<Rule> {
        vec![
            Rule {
                kind: "attention",
                pattern: attention(),
                build: build_attention,
            },
            Rule {
                kind: "attention-3d",
                pattern: merged_heads_attention(),
                build: build_attention,
            },
            Rule {
                kind: "attention-op",
                pattern: standard_attention_op(),
                build: build_attention,
            },
            Rule {
                kind: "attention-seq-first",
                pattern: sequence_first_attention(),
                build: build_sequence_first,
            },
            Rule {
                kind: "attention-grouped",
                pattern: grouped::written_out(),
                build: grouped::build_grouped,
            },
            Rule {
                kind: "attention-grouped-op",
                pattern: grouped::standard_op(),
                build: grouped::build_grouped,
            },
            Rule {
                kind: "attention-query-rows",
                pattern: query_rows::folded_rows(),
                build: query_rows::build_folded,
            },
            Rule {
                kind: "attention-flat-heads",
                pattern: flat_heads::moved_heads(),
                build: flat_heads::build_moved_heads,
            },
            Rule {
                kind: "attention-unit-scale",
                pattern: unit_scale::scaled_attention(),
                build: unit_scale::build_unit_scale,
            },
            Rule {
                kind: "attention-packed-projections",
                pattern: packed_projections::projection(),
                build: packed_projections::build_packed,
            },
        ]
    }

    fn target(&self) -> Target {
        self.target
    }
}

type Checked<T> = std::result::Result<T, Declined>;

// ---- the pattern ---------------------------------------------------------------------------

fn transpose(input: Pat, perm: fn(Option<&AttributeProto>) -> bool) -> Pat {
    op("Transpose", [input]).attr("perm", perm)
}

/// `Transpose[0,2,1,3](Reshape(src))`: [B,S,N·H] → [B,N,S,H].
fn heads(src: &'static str, reshape: &'static str) -> Pat {
    transpose(op("Reshape", [value(src), any()]).named(reshape), |a| {
        perm_is(a, &[0, 2, 1, 3])
    })
}

/// The query's heads, the query perhaps scaled before the split (CLIP, Whisper: `q · s`) or
/// between the split and the transposition (tf2onnx's DistilBERT: `Reshape(q) · s`).
fn query_heads() -> Pat {
    let query = either([
        mul(value("q"), constant_where("q_pre", is_scalar)),
        value("q"),
    ]);
    let split = op("Reshape", [query, any()]).named("q_reshape");
    let split = either([
        mul(split.clone(), constant_where("q_pre", is_scalar)),
        split,
    ]);
    transpose(split, |a| perm_is(a, &[0, 2, 1, 3]))
}

/// Heads, optionally after the past ones: `Concat(past, heads, axis=2)`; or a value already
/// in the heads layout `[B, N, T, H]` (cross-attention over the encoder's cached K/V, fed as
/// graph inputs), bound to `bnsh`.
fn with_past(
    src: &'static str,
    reshape: &'static str,
    past: &'static str,
    total: &'static str,
    bnsh: &'static str,
) -> Pat {
    either([
        op("Concat", [value(past), heads(src, reshape)])
            .attr("axis", |a| a.is_some_and(|a| a.i() == 2 || a.i() == -2))
            .named(total),
        heads(src, reshape),
        value(bnsh),
    ])
}

/// A scalar constant that masks a score out: -inf, or a value no score comes near (finfo's
/// minimum, -10000 in older exports).
fn is_mask_fill(t: &Tensor) -> bool {
    is_scalar(t) && t.scalar_f64().is_some_and(|v| v <= MASK_FILL_AT_MOST)
}

fn is_scalar(t: &Tensor) -> bool {
    t.numel() == 1 && t.dtype().is_float()
}

/// `p · c` with a scalar constant `c` bound to `name`, `p / c` with `c` bound to `divisor`,
/// or `p` itself.
fn maybe_scaled(p: Pat, name: &'static str, divisor: &'static str) -> Pat {
    either([
        mul(p.clone(), constant_where(name, is_scalar)),
        div(p.clone(), constant_where(divisor, is_scalar)),
        p,
    ])
}

/// Softmax over the last of 4 axes: -1 or 3, or not set (-1 from opset 13; `softmax_axis`
/// refuses it before).
fn last_of_4(a: Option<&AttributeProto>) -> bool {
    a.is_none_or(|a| a.i() == -1 || a.i() == 3)
}

/// A Softmax without `axis` normalizes over the last axis from opset 13; before, over every
/// axis from 1 on, flattened.
fn softmax_axis(m: &Match, g: &Graph, opset: i64) -> Checked<()> {
    let Some(probs) = m.value("probs") else {
        return Ok(());
    };
    let softmax = g.node(producer(g, probs)?);
    match attr::get(&softmax.proto, "axis").is_none() && opset < 13 {
        true => Err(Declined::Mismatch(format!(
            "Softmax `{}` has no axis: at opset {opset} it normalizes over the flattened axes 1..",
            softmax.name()
        ))),
        false => Ok(()),
    }
}

/// The probabilities `probs` (bound to "probs"), or `Where(IsNaN(probs), 0, probs)` (bound to
/// "cleaned"): torch's SDPA export zeroes a query row whose every key is masked with -inf.
fn nan_cleaned(probs: Pat) -> Pat {
    either([
        op(
            "Where",
            [unary("IsNaN", probs.clone()), scalar(0.0), value("probs")],
        )
        .named("cleaned"),
        probs,
    ])
}

fn attention() -> Pat {
    let k_heads = with_past("k", "k_reshape", "past_k", "k_total", "k_bnsh");
    let k_transposed = either([
        transpose(op("Reshape", [value("k"), any()]).named("k_reshape"), |a| {
            perm_is(a, &[0, 2, 3, 1])
        }),
        transpose(k_heads.clone(), |a| perm_is(a, &[0, 1, 3, 2])),
        op(
            "Reshape",
            [
                transpose(op("Reshape", [k_heads, any()]).named("k_flat"), |a| {
                    perm_is(a, &[0, 2, 1])
                }),
                any(),
            ],
        ),
    ])
    .named("k_t");
    let scores = op(
        "MatMul",
        [
            maybe_scaled(query_heads(), "q_scale", "q_div"),
            maybe_scaled(k_transposed, "k_scale", "k_div"),
        ],
    );
    let scaled_scores = either([
        mul(scores.clone(), constant_where("s_scale", is_scalar)),
        div(scores.clone(), constant_where("s_div", is_scalar)),
        scores,
    ]);
    let masked = masked(scaled_scores.clone());
    // One bias, or two (MPNet: its relative position bias, then the padding mask); or a bias
    // and then the fill (MPT: ALiBi, then its masks), which is the same sum: where the fill is
    // written, `S + bias + fill` rounds to the fill as `S + fill` does.
    let once = add(masked.clone(), value("bias"));
    let filled_after = filled(add(scaled_scores, value("bias")));
    let biased = either([
        add(once.clone(), value("bias2")),
        once,
        masked,
        filled_after,
    ]);
    let probs = op("Softmax", [biased])
        .attr("axis", last_of_4)
        .anchor()
        .named("probs");
    let cleaned = nan_cleaned(probs);
    let context = op(
        "MatMul",
        [
            cleaned,
            with_past("v", "v_reshape", "past_v", "v_total", "v_bnsh"),
        ],
    )
    .named("context");
    let context = either([
        op("Reshape", [context.clone(), any()]).named("context_reshape"),
        context,
    ]);
    op(
        "Reshape",
        [
            transpose(context, |a| perm_is(a, &[0, 2, 1, 3])).named("context_t"),
            any(),
        ],
    )
}

/// Scores masked by a fill or not: replaced by it where masked (DistilBERT: `Where(mask == 0,
/// finfo.min, scores)`), kept where allowed (GPT-2's causal `Where(causal, scores,
/// finfo.min)`), or as they are. `bias_of` turns the fill into a bias.
fn masked(scores: Pat) -> Pat {
    either([filled(scores.clone()), scores])
}

/// Scores masked by a fill, in either of `masked`'s two forms.
fn filled(scores: Pat) -> Pat {
    let filled = op(
        "Where",
        [
            value("fill_where"),
            constant_where("fill", is_mask_fill),
            scores.clone(),
        ],
    );
    let kept = op(
        "Where",
        [
            value("keep_where"),
            scores.clone(),
            constant_where("fill", is_mask_fill),
        ],
    );
    either([filled, kept])
}

/// The attention core with the heads merged into the batch, as the eager attention of CLIP,
/// Whisper and BART in transformers ≤ 4.4x writes it: Q, K and V reshaped from
/// `[B, N, ·, H]` to `[B·N, ·, H]`, 3-D products, masks added to the scores reshaped to
/// `[B, N, S, T]` and back (CLIP's text tower adds two, a causal and a padding one), and
/// the context reshaped back to `[B, N, S, H]`.
fn merged_heads_attention() -> Pat {
    let merged = |heads: Pat, name: &'static str| op("Reshape", [heads, any()]).named(name);
    let k_heads = with_past("k", "k_reshape", "past_k", "k_total", "k_bnsh");
    let v_heads = with_past("v", "v_reshape", "past_v", "v_total", "v_bnsh");
    let k_t = transpose(merged(k_heads, "k3"), |a| perm_is(a, &[0, 2, 1]));
    // Q scaled in 4-D (BART from transformers 4.4x on) or in 3-D.
    let q_heads = maybe_scaled(query_heads(), "q_heads_scale", "q_heads_div");
    let scores = op(
        "MatMul",
        [maybe_scaled(merged(q_heads, "q3"), "q_scale", "q_div"), k_t],
    )
    .named("scores3");
    // A bias added to the scores in 4-D: Reshape(Reshape(S, [B,N,S,T]) + bias, [B·N,S,T]).
    let add_4d = |x: Pat, bias: &'static str, at: &'static str| {
        op(
            "Reshape",
            [add(op("Reshape", [x, any()]).named(at), value(bias)), any()],
        )
    };
    let once = add_4d(scores.clone(), "bias", "scores4");
    let twice = add_4d(once.clone(), "bias2", "scores4_2");
    let probs = op("Softmax", [either([twice, once, scores])])
        .attr("axis", |a| a.is_none_or(|a| a.i() == -1 || a.i() == 2))
        .anchor()
        .named("probs");
    let context = op("MatMul", [probs, merged(v_heads, "v3")]).named("context3");
    let context = op("Reshape", [context, any()]).named("context4");
    op(
        "Reshape",
        [
            transpose(context, |a| perm_is(a, &[0, 2, 1, 3])).named("context_t"),
            any(),
        ],
    )
}

/// `Attention(q, k, v (, attn_mask))` bound to "attention_op": the standard operator as torch
/// writes SDPA, with no causal flag, no soft cap, 4-D heads (no head counts) and one output.
fn plain_attention_op(q: Pat, k: Pat, v: Pat) -> Pat {
    let zero = |a: Option<&AttributeProto>| a.is_none_or(|a| a.i() == 0);
    let core = |inputs: Vec<Pat>| {
        op("Attention", inputs)
            .attr("is_causal", zero)
            .attr("softcap", |a| a.is_none_or(|a| a.f() == 0.0))
            .attr("q_num_heads", |a| a.is_none())
            .named("attention_op")
    };
    either([
        core(vec![q.clone(), k.clone(), v.clone()]),
        core(vec![q, k, v, value("attn_mask")]),
    ])
}

/// The standard `Attention` (opset 23) on heads, as torch's dynamo exporter writes SDPA at
/// opset 23: `Reshape(Transpose[0,2,1,3](Attention(Qh, Kh, Vh, mask?)), [B,S,N·H])`, with
/// Kh/Vh as `with_past` takes them, no causal flag, no soft cap and no extra outputs. For
/// ONNX Runtime it becomes MultiHeadAttention like the written-out form (its kernel is the
/// one the written-out form gets too); for other runtimes it stays as it is.
fn standard_attention_op() -> Pat {
    let k = with_past("k", "k_reshape", "past_k", "k_total", "k_bnsh");
    let v = with_past("v", "v_reshape", "past_v", "v_total", "v_bnsh");
    let core = plain_attention_op(query_heads(), k, v);
    op(
        "Reshape",
        [
            transpose(core, |a| perm_is(a, &[0, 2, 1, 3])).named("context_t"),
            any(),
        ],
    )
}

/// `torch.nn.MultiheadAttention` (SigLIP's pooling head: a learned probe query attending to
/// the tokens), sequence first: Q, K and V `[L, B, N·H]` reshaped to `[L, B·N, H]`, the heads
/// brought first for 3-D products, and the context `[B·N, L, H]` brought back to
/// `[L, B·N, H]` and reshaped to `[L·B, N·H]` or `[L, B, N·H]`.
fn sequence_first_attention() -> Pat {
    let split =
        |src: &'static str, name: &'static str| op("Reshape", [value(src), any()]).named(name);
    let q = transpose(split("q", "q_split"), |a| perm_is(a, &[1, 0, 2]));
    let k_t = transpose(split("k", "k_split"), |a| perm_is(a, &[1, 2, 0]));
    let v = transpose(split("v", "v_split"), |a| perm_is(a, &[1, 0, 2]));
    let scores = op("MatMul", [maybe_scaled(q, "q_scale", "q_div"), k_t]);
    let probs = op("Softmax", [maybe_scaled(scores, "s_scale", "s_div")])
        .attr("axis", |a| a.is_none_or(|a| a.i() == -1 || a.i() == 2))
        .anchor()
        .named("probs");
    let context = op("MatMul", [probs, v]);
    op(
        "Reshape",
        [
            transpose(context, |a| perm_is(a, &[1, 0, 2])).named("context_t"),
            any(),
        ],
    )
}

// ---- checks on types ----------------------------------------------------------------------

fn dims(g: &Graph, v: ValueId) -> Checked<Vec<Dim>> {
    g.value_type(v)
        .and_then(|t| t.shape)
        .ok_or_else(|| Declined::NotProven(format!("the shape of {}", g.value_name(v))))
}

/// `name [d0, d1, …]`, for a reason.
fn shown(g: &Graph, v: ValueId) -> String {
    match dims(g, v) {
        Ok(d) => {
            let d: Vec<String> = d.iter().map(Dim::to_string).collect();
            format!("{} [{}]", g.value_name(v), d.join(", "))
        }
        Err(_) => format!("{} (no shape)", g.value_name(v)),
    }
}

/// The producer of a value the pattern matched as an operator's output.
fn producer(g: &Graph, v: ValueId) -> Checked<NodeId> {
    g.producer(v).ok_or(Declined::Missing("producer"))
}

/// The `[B, S]` dims, head count and head size of a `Reshape(src) = [B, S, N, H]` that splits
/// only the last dim of a `[B, S, N·H]` value.
fn split_heads(g: &Graph, src: ValueId, reshaped: ValueId) -> Checked<(Vec<Dim>, i64, i64)> {
    let (s, r) = (dims(g, src)?, dims(g, reshaped)?);
    let nh = r
        .get(2)
        .zip(r.get(3))
        .and_then(|(n, h)| n.value().zip(h.value()));
    let fits = |(n, h): (i64, i64)| {
        s.len() == 3
            && r.len() == 4
            && s[0].same(&r[0])
            && s[1].same(&r[1])
            && s[2].value() == Some(n * h)
    };
    match nh.filter(|&nh| fits(nh)) {
        Some((n, h)) => Ok((s[..2].to_vec(), n, h)),
        None => Err(Declined::NotProven(format!(
            "{} splits only the last dim of {} into heads",
            shown(g, reshaped),
            shown(g, src)
        ))),
    }
}

fn scale_of(m: &Match, g: &Graph, layout: &Layout) -> Checked<f32> {
    let value = |name| -> Checked<Option<f64>> {
        match m.value(name) {
            // The pattern checked a scalar float constant.
            Some(v) => Ok(g.constant(v).and_then(|t| t.scalar_f64())),
            None => Ok(None),
        }
    };
    let mut scale = 1.0;
    if let Some(op) = m.value("attention_op") {
        // The standard op's own scale, 1/√H by default.
        let node = g.node(producer(g, op)?);
        let default = 1.0 / (layout.head_size as f64).sqrt();
        scale = attr::get_float(&node.proto, "scale").map_or(default, f64::from);
    }
    for name in [
        "q_pre",
        "q_heads_scale",
        "q_scale",
        "k_scale",
        "s_scale",
        "bias_scale",
    ] {
        scale *= value(name)?.unwrap_or(1.0);
    }
    for name in ["q_heads_div", "q_div", "k_div", "s_div"] {
        scale /= value(name)?.unwrap_or(1.0);
    }
    Ok(scale as f32)
}

/// What the checks prove of a match: the head count and the dims the fused operator's
/// contracts are stated in (`ops::attention`).
struct Layout {
    heads: i64,
    head_size: i64,
    batch: Dim,
    q_len: Dim,
    /// The key length, past included.
    total: Dim,
    /// K and V are `[B, N, T, H]` values already (cross-attention over cached K/V).
    bnsh: bool,
}

/// The checks the pattern cannot express: layouts from types, consistent head counts, past
/// key/values in pairs, the dynamo Kᵀ detour, an identity context Reshape.
fn check_heads(m: &Match, g: &Graph) -> Checked<Layout> {
    let (q_bs, n, h) = split_heads(g, m.get("q")?, m.get("q_reshape")?)?;
    // (batch, length, heads, head size) of K or V, split from 3-D or given as [B, N, T, H].
    let kv = |src, reshape, bnsh| -> Checked<(Dim, Dim, i64, i64)> {
        match m.value(bnsh) {
            Some(v) => match dims(g, v)?.as_slice() {
                [b, nn, t, hh] if nn.value().is_some() && hh.value().is_some() => Ok((
                    b.clone(),
                    t.clone(),
                    nn.value().unwrap_or_default(),
                    hh.value().unwrap_or_default(),
                )),
                _ => Err(Declined::NotProven(format!(
                    "{} is [batch, heads, length, head size]",
                    shown(g, v)
                ))),
            },
            None => {
                let (bs, nn, hh) = split_heads(g, m.get(src)?, m.get(reshape)?)?;
                Ok((bs[0].clone(), bs[1].clone(), nn, hh))
            }
        }
    };
    let (k_batch, k_len, kn, kh) = kv("k", "k_reshape", "k_bnsh")?;
    let (_, v_len, vn, vh) = kv("v", "v_reshape", "v_bnsh")?;
    if (kn, kh, vn, vh) != (n, h, n, h) {
        return Err(Declined::Mismatch(format!(
            "heads × head size: Q {n}×{h}, K {kn}×{kh}, V {vn}×{vh}"
        )));
    }
    if !q_bs[0].same(&k_batch) || !k_len.same(&v_len) {
        return Err(Declined::NotProven(format!(
            "Q's batch {} is K's {k_batch}, and K's length {k_len} is V's {v_len}",
            q_bs[0]
        )));
    }
    let bnsh = m.value("k_bnsh").is_some();
    let past = m.value("past_k").is_some();
    if bnsh != m.value("v_bnsh").is_some()
        || (bnsh && past)
        || m.value("k_total").is_some() != m.value("v_total").is_some()
        || past != m.value("past_v").is_some()
    {
        return Err(Declined::Mismatch(
            "K and V do not come in the same form (past, cached, projected)".into(),
        ));
    }
    let mut total = k_len;
    for p in ["past_k", "past_v"] {
        if let Some(p) = m.value(p) {
            let d = dims(g, p)?;
            if d.len() != 4 || d[1].value() != Some(n) || d[3].value() != Some(h) {
                return Err(Declined::NotProven(format!(
                    "the past {} is [batch, {n}, past, {h}]",
                    shown(g, p)
                )));
            }
            if Some(p) == m.value("past_k") {
                total = d[2].add(&total);
            }
        }
    }
    if m.value("k_flat").is_some() {
        check_dynamo_kt(m, g)?;
    }
    if let Some(r) = m.value("context_reshape") {
        let context = m.get("context")?;
        let (before, after) = (dims(g, context)?, dims(g, r)?);
        if !same_shape(&before, &after) {
            return Err(Declined::NotProven(format!(
                "the Reshape {} of the context {} changes nothing",
                shown(g, r),
                shown(g, context)
            )));
        }
    }
    if m.value("q3").is_some() {
        check_merged(m, g, n, &q_bs[1], &total)?;
    }
    Ok(Layout {
        heads: n,
        head_size: h,
        batch: q_bs[0].clone(),
        q_len: q_bs[1].clone(),
        total,
        bnsh,
    })
}

/// The dynamo exporter's Kᵀ: K's heads `[B, N, T, H]` reshaped to `[B·N, T, H]`, transposed,
/// and reshaped back to `[B, N, H, T]`, merging and splitting exactly B and N.
fn check_dynamo_kt(m: &Match, g: &Graph) -> Checked<()> {
    let flat = m.get("k_flat")?;
    let heads_of = g.node(producer(g, flat)?).input(0);
    let heads_of = heads_of.ok_or(Declined::Missing("k_flat"))?;
    let heads = dims(g, heads_of)?;
    let (f, t) = (dims(g, flat)?, dims(g, m.get("k_t")?)?);
    let fits = match heads.as_slice() {
        [b, nn, tt, hh] => {
            let merged = f.len() == 3 && f[0].same(&b.mul(nn)) && f[1].same(tt) && f[2].same(hh);
            let split =
                t.len() == 4 && t[0].same(b) && t[1].same(nn) && t[2].same(hh) && t[3].same(tt);
            merged && split
        }
        _ => false,
    };
    if !fits {
        return Err(Declined::NotProven(format!(
            "Kᵀ {} → {} → {} merges and splits batch and heads only",
            shown(g, heads_of),
            shown(g, flat),
            shown(g, m.get("k_t")?)
        )));
    }
    Ok(())
}

/// The additive bias of the match, if any, with its dims: the sum of the ones the graph
/// adds and of the one a fill over masked scores stands for, `Where(masked, fill, 0)` or
/// `Where(kept, 0, fill)` (see the module doc).
fn bias_of(m: &Match, rw: &mut Rewrite) -> Checked<Option<(PValue, Vec<Dim>)>> {
    let g = rw.graph;
    let mut parts: Vec<(PValue, Vec<Dim>)> = Vec::new();
    let fill_where = [("fill_where", true), ("keep_where", false)]
        .into_iter()
        .find_map(|(name, masked)| Some((m.value(name)?, masked)));
    let zero =
        || Tensor::from_f32("zero", &[], &[0.0]).map_err(|e| Declined::Refused(e.to_string()));
    if let Some((condition, masked)) = fill_where {
        rw.keep_alive(condition);
        let fill = m.get("fill")?;
        if rw.constant_of(fill)?.dtype() != DataType::Float {
            return Err(Declined::Mismatch(format!(
                "the mask fill {} is not float32",
                g.value_name(fill)
            )));
        }
        let zero = rw.constant("zero", zero()?);
        let (then, otherwise) = match masked {
            true => (fill.into(), zero),
            false => (zero, fill.into()),
        };
        let bias = rw.op("Where", "", &[condition.into(), then, otherwise], vec![]);
        parts.push((bias, dims(g, condition)?));
    }
    for name in ["bias", "bias2"] {
        if let Some(bias) = m.value(name) {
            rw.keep_alive(bias);
            parts.push(with_rank_4(rw, bias)?);
        }
    }
    if let Some(mask) = m.value("attn_mask") {
        rw.keep_alive(mask);
        // The standard op's mask: additive when float; when boolean, true where a key is
        // attended, which the op itself reads as 0 there and -inf elsewhere.
        let mask_dims = dims(g, mask)?;
        let elem = g.value_type(mask).map(|t| t.elem);
        let bias = match elem {
            Some(e) if e == DataType::Float as i32 => mask.into(),
            Some(e) if e == DataType::Bool as i32 => {
                let zero = rw.constant("zero", zero()?);
                let never = Tensor::from_f32("never", &[], &[f32::NEG_INFINITY])
                    .map_err(|e| Declined::Refused(e.to_string()))?;
                let never = rw.constant("never", never);
                rw.op("Where", "", &[mask.into(), zero, never], vec![])
            }
            _ => {
                return Err(Declined::Mismatch(format!(
                    "the mask {} is neither float32 nor bool",
                    g.value_name(mask)
                )))
            }
        };
        parts.push((bias, mask_dims));
    }
    // Several masks (causal and padding) add up, in the order the graph added them.
    let mut parts = parts.into_iter();
    let Some(first) = parts.next() else {
        return Ok(None);
    };
    let (sum, sum_dims) = parts.fold(first, |(sum, sum_dims), (bias, bias_dims)| {
        let both = broadcast_shapes(&sum_dims, &bias_dims);
        (rw.op("Add", "", &[sum, bias], vec![]), both)
    });
    // Scores scaled after the masks were added, `(S + bias)·s`: the fused operator scales S
    // alone, so the bias takes the scale too.
    let sum = match m.value("bias_scale") {
        Some(scale) => rw.op("Mul", "", &[sum, scale.into()], vec![]),
        None => sum,
    };
    Ok(Some((sum, sum_dims)))
}

/// A bias of rank below 4 with the leading axes of 1 it broadcasts with (MPT's ALiBi is
/// `[heads, 1, total]`), as the kernels take it; a bias of rank 4 as it is.
fn with_rank_4(rw: &mut Rewrite, bias: ValueId) -> Checked<(PValue, Vec<Dim>)> {
    let bias_dims = dims(rw.graph, bias)?;
    let missing = 4usize.saturating_sub(bias_dims.len());
    if missing == 0 {
        return Ok((bias.into(), bias_dims));
    }
    let leading: Vec<i64> = (0..missing as i64).collect();
    let unsqueezed = if rw.opset >= 13 {
        let axes = rw.ints("leading_axes", &leading)?;
        rw.op("Unsqueeze", "", &[bias.into(), axes], vec![])
    } else {
        let axes = attr::ints("axes", &leading);
        rw.op("Unsqueeze", "", &[bias.into()], vec![axes])
    };
    let mut all = vec![Dim::known(1); missing];
    all.extend(bias_dims);
    Ok((unsqueezed, all))
}

/// The merged-heads form (`merged_heads_attention`): every `[B·N, ·, ·]` value must merge
/// exactly B and N of the `[B, N, ·, ·]` one it reshapes or is reshaped to, with the same
/// last two dims, and the scores the masks are added to must be `[B, N, S, T]`.
fn check_merged(m: &Match, g: &Graph, n: i64, q_len: &Dim, total: &Dim) -> Checked<()> {
    let heads_dims = |v: ValueId| -> Checked<Vec<Dim>> {
        let d = dims(g, v)?;
        match d.len() == 4 && d[1].value() == Some(n) {
            true => Ok(d),
            false => Err(Declined::NotProven(format!(
                "{} is [batch, {n}, ·, ·]",
                shown(g, v)
            ))),
        }
    };
    let not_merged = |merged: ValueId, split: ValueId| {
        Declined::NotProven(format!(
            "{} is {} with batch and heads merged",
            shown(g, merged),
            shown(g, split)
        ))
    };
    // `merged` ([B·N, x, y]) is `split` ([B, N, x, y]) with B and N merged.
    let merges = |merged: &[Dim], split: &[Dim]| {
        merged.len() == 3
            && split.len() == 4
            && merged[0].same(&split[0].mul(&split[1]))
            && merged[1].same(&split[2])
            && merged[2].same(&split[3])
    };
    for merged in ["q3", "k3", "v3"] {
        let merged = m.get(merged)?;
        let heads = g.node(producer(g, merged)?).input(0);
        let heads = heads.ok_or(Declined::Missing("heads"))?;
        if !merges(&dims(g, merged)?, &heads_dims(heads)?) {
            return Err(not_merged(merged, heads));
        }
    }
    let (scores3, context3, context4) = (m.get("scores3")?, m.get("context3")?, m.get("context4")?);
    let scores = dims(g, scores3)?;
    let context = heads_dims(context4)?;
    if !merges(&dims(g, context3)?, &context) {
        return Err(not_merged(context3, context4));
    }
    if !context[2].same(q_len)
        || scores.len() != 3
        || !scores[1].same(q_len)
        || !scores[2].same(total)
    {
        return Err(Declined::NotProven(format!(
            "the scores {} are [batch·heads, {q_len}, {total}]",
            shown(g, scores3)
        )));
    }
    for at in ["scores4", "scores4_2"] {
        if let Some(v) = m.value(at) {
            if !merges(&scores, &heads_dims(v)?) {
                return Err(not_merged(scores3, v));
            }
        }
    }
    Ok(())
}

/// The bias as the fused operator must receive it (see `ops::attention`): as it is, or
/// expanded to the query length (dim `rows_of.1` of `rows_of.0`, a value the rewrite keeps) and the key
/// length (the sum of the dims `keys` names, values the rewrite keeps: the past's and the new
/// keys') where its dims are not proven to be those; `None` when its batch or head dim is not
/// proven.
fn fitted_bias(
    bias: Option<(PValue, Vec<Dim>)>,
    layout: &Layout,
    rw: &mut Rewrite,
    rows_of: (ValueId, i64),
    keys: &[(ValueId, i64)],
) -> Checked<Option<PValue>> {
    let Some((bias, bias_dims)) = bias else {
        return Ok(None);
    };
    let contract = BiasShape {
        batch: &layout.batch,
        heads: layout.heads,
        q_len: &layout.q_len,
        total: &layout.total,
    };
    let (rows, cols) = match contract.fit(&bias_dims) {
        BiasFit::Fits => return Ok(Some(bias)),
        BiasFit::Refused(why) => {
            return Err(Declined::Contract {
                op: "attention bias",
                why,
            })
        }
        BiasFit::Expand { rows, cols } => (rows, cols),
    };
    // Expand(bias, [1, 1, q_len or 1, total or 1]), the lengths read at run time (Gather of
    // Shape rather than Shape's start/end, which needs opset 15).
    let dim_of = |rw: &mut Rewrite, v: ValueId, axis: i64| -> Checked<PValue> {
        let shape = rw.op("Shape", "", &[v.into()], vec![]);
        let axis = rw.ints("axis", &[axis])?;
        Ok(rw.op("Gather", "", &[shape, axis], vec![attr::int("axis", 0)]))
    };
    let one = |rw: &mut Rewrite| rw.ints("one", &[1]);
    let rows = match rows {
        true => dim_of(rw, rows_of.0, rows_of.1)?,
        false => one(rw)?,
    };
    let cols = match cols {
        true => {
            let mut total = None;
            for &(v, axis) in keys {
                let dim = dim_of(rw, v, axis)?;
                total = Some(match total {
                    None => dim,
                    Some(sum) => rw.op("Add", "", &[sum, dim], vec![]),
                });
            }
            total.ok_or(Declined::Missing("k"))?
        }
        false => one(rw)?,
    };
    let ones = rw.ints("ones", &[1, 1])?;
    let target = rw.op(
        "Concat",
        "",
        &[ones, rows, cols],
        vec![attr::int("axis", 0)],
    );
    Ok(Some(rw.op("Expand", "", &[bias, target], vec![])))
}

// ---- the builders -------------------------------------------------------------------------

fn build_attention(m: &Match, rw: &mut Rewrite) -> Built {
    let g = rw.graph;
    // The standard op is already what other runtimes are given.
    if m.value("attention_op").is_some() && rw.target == Target::Onnx {
        return Err(Declined::Mismatch(
            "the standard Attention is this target's form already".into(),
        ));
    }
    softmax_axis(m, g, rw.opset)?;
    let layout = check_heads(m, g)?;
    let n = layout.heads;
    let scale = scale_of(m, g, &layout)?;
    let root_out = rw.root_of(m)?;
    let root = producer(g, root_out)?;
    let q = m.get("q")?;
    // K and V: the 3-D projections, or the [B, N, T, H] values of cross-attention.
    let (k, v) = match layout.bnsh {
        true => (m.get("k_bnsh")?, m.get("v_bnsh")?),
        false => (m.get("k")?, m.get("v")?),
    };
    // Grouped heads repeated for MultiHeadAttention would stay materialized, their cache
    // concatenated outside: the grouped rule gives them to the standard Attention unrepeated.
    if layout.bnsh && (grouped::repeats_heads(g, k) || grouped::repeats_heads(g, v)) {
        return Err(Declined::Mismatch(
            "the keys and values repeat grouped heads: attention-grouped's form".into(),
        ));
    }
    let past = m.value("past_k").zip(m.value("past_v"));
    let presents = [m.value("k_total"), m.value("v_total")];
    let bias = bias_of(m, rw)?;
    // Where the key length is read at run time: the past's and the new keys' lengths.
    let mut key_lengths = vec![(k, if layout.bnsh { 2 } else { 1 })];
    if let Some((past_k, _)) = past {
        key_lengths.push((past_k, 2));
    }

    let (out, present_values) = match rw.target {
        Target::Ort => {
            let packed = if past.is_none() && !layout.bnsh {
                packed_qkv(g, q, k, v)
            } else {
                None
            };
            match packed {
                Some(p) => {
                    let bias = fitted_bias(bias, &layout, rw, (p.input, 1), &[(p.input, 1)])?;
                    for node in &p.absorbed {
                        rw.absorb(*node);
                    }
                    // Named after the attention output, so each layer's weights say whose they are.
                    let name = g.value_name(root_out);
                    let weights = rw.constant(&format!("{name}.qkv_weight"), p.weights);
                    let bias_qkv = p.bias.map(|b| rw.constant(&format!("{name}.qkv_bias"), b));
                    let inputs = [
                        Some(p.input.into()),
                        Some(weights),
                        bias_qkv,
                        None,
                        None,
                        bias,
                    ];
                    let outs = rw.op_with_outputs(
                        "Attention",
                        MS_DOMAIN,
                        trim(&inputs),
                        &[true],
                        vec![attr::int("num_heads", n), attr::float("scale", scale)],
                    );
                    (outs[0].ok_or(Declined::Missing("output"))?, vec![])
                }
                None => {
                    let bias = fitted_bias(bias, &layout, rw, (q, 1), &key_lengths)?;
                    let past = past.map(|(pk, pv)| (pk.into(), pv.into()));
                    let wanted = [presents[0].is_some(), presents[1].is_some()];
                    let qkv = [q.into(), k.into(), v.into()];
                    unpacked(rw, n, scale, qkv, bias, past, wanted)?
                }
            }
        }
        Target::Onnx if layout.bnsh => {
            // ONNX Attention takes Q, K and V all 3-D or all 4-D: over the encoder's cached
            // [B, N, T, H] keys and values, Q is split into its heads and the output's heads
            // joined again.
            if past.is_some() || presents.iter().any(Option::is_some) {
                return Err(Declined::NoOperator(rw.target.name()));
            }
            rw.require_opset(ATTENTION_OPSET)?;
            let bias = fitted_bias(bias, &layout, rw, (q, 1), &key_lengths)?;
            let to_heads = rw.ints("heads", &[0, 0, n, layout.head_size])?;
            let joined = rw.ints("joined", &[0, 0, n * layout.head_size])?;
            let swap = || vec![attr::ints("perm", &[0, 2, 1, 3])];
            let q_split = rw.op("Reshape", "", &[q.into(), to_heads], vec![]);
            let q_heads = rw.op("Transpose", "", &[q_split], swap());
            let qkv = [q_heads, k.into(), v.into()];
            let (heads_out, _) = unpacked(rw, n, scale, qkv, bias, None, [false, false])?;
            let out = rw.op("Transpose", "", &[heads_out], swap());
            (rw.op("Reshape", "", &[out, joined], vec![]), vec![])
        }
        Target::Onnx => {
            rw.require_opset(ATTENTION_OPSET)?;
            let bias = fitted_bias(bias, &layout, rw, (q, 1), &key_lengths)?;
            let past = past.map(|(pk, pv)| (pk.into(), pv.into()));
            let wanted = [presents[0].is_some(), presents[1].is_some()];
            unpacked(
                rw,
                n,
                scale,
                [q.into(), k.into(), v.into()],
                bias,
                past,
                wanted,
            )?
        }
    };

    // The fused output is [B, S, N·H]; the graph may want it flattened (GPT-2's Gemm).
    let root_rank = dims(g, root_out).ok().map(|d| d.len());
    let out = match root_rank {
        Some(3) => out,
        _ => {
            let shape = g.node(root).input(1).ok_or(Declined::Missing("shape"))?;
            rw.op("Reshape", "", &[out, shape.into()], vec![])
        }
    };
    rw.replace(root_out, out);
    // The context in [B, S, N, H], before the heads are joined, read outside the block (a
    // Shape of it that shape inference could not rebuild from the inputs): the fused output
    // split into heads again, a view of it.
    let context_t = m.get("context_t")?;
    let read_outside = g
        .uses(context_t)
        .iter()
        .any(|(r, _)| !m.nodes().contains(r));
    if read_outside {
        let split = rw.ints("heads", &[0, 0, n, layout.head_size])?;
        let heads = rw.op("Reshape", "", &[out, split], vec![]);
        rw.replace(context_t, heads);
    }
    for (old, new) in presents.iter().zip(present_values) {
        if let (Some(old), Some(new)) = (old, new) {
            rw.replace(*old, new);
        }
    }
    Ok(())
}

/// The target's attention operator on Q, K and V as they are (3-D; K and V `[B, N, T, H]`
/// with a 3-D Q for ONNX Runtime, all three 4-D for the standard operator), with the bias
/// and past given: its output and the present K and V `wanted`.
fn unpacked(
    rw: &mut Rewrite,
    heads: i64,
    scale: f32,
    [q, k, v]: [PValue; 3],
    bias: Option<PValue>,
    past: Option<(PValue, PValue)>,
    wanted: [bool; 2],
) -> Checked<(PValue, Vec<Option<PValue>>)> {
    let (past_k, past_v) = (past.map(|p| p.0), past.map(|p| p.1));
    let wanted = [true, wanted[0], wanted[1]];
    let outs = match rw.target {
        Target::Ort => {
            let inputs = [Some(q), Some(k), Some(v), None, None, bias, past_k, past_v];
            rw.op_with_outputs(
                "MultiHeadAttention",
                MS_DOMAIN,
                trim(&inputs),
                &wanted,
                vec![attr::int("num_heads", heads), attr::float("scale", scale)],
            )
        }
        Target::Onnx => {
            let inputs = [Some(q), Some(k), Some(v), bias, past_k, past_v];
            rw.op_with_outputs(
                "Attention",
                "",
                trim(&inputs),
                &wanted,
                vec![
                    attr::int("q_num_heads", heads),
                    attr::int("kv_num_heads", heads),
                    attr::float("scale", scale),
                ],
            )
        }
    };
    let out = outs[0].ok_or(Declined::Missing("output"))?;
    Ok((out, outs[1..].to_vec()))
}

/// `sequence_first_attention` as the target's attention operator on Q, K and V brought batch
/// first, its output brought back and reshaped as the block's output was.
fn build_sequence_first(m: &Match, rw: &mut Rewrite) -> Built {
    let g = rw.graph;
    let root_out = rw.root_of(m)?;
    softmax_axis(m, g, rw.opset)?;
    let layout = check_sequence_first(m, g, root_out)?;
    let scale = scale_of(m, g, &layout)?;
    if rw.target == Target::Onnx {
        rw.require_opset(ATTENTION_OPSET)?;
    }
    let swap = || vec![attr::ints("perm", &[1, 0, 2])];
    let mut batch_first = |name| -> Checked<PValue> {
        let v = m.get(name)?;
        Ok(rw.op("Transpose", "", &[v.into()], swap()))
    };
    let qkv = [batch_first("q")?, batch_first("k")?, batch_first("v")?];
    let (out, _) = unpacked(rw, layout.heads, scale, qkv, None, None, [false, false])?;
    let sequence_first = rw.op("Transpose", "", &[out], swap());
    let shape = g.node(producer(g, root_out)?).input(1);
    let shape = shape.ok_or(Declined::Missing("shape"))?;
    let out = rw.op("Reshape", "", &[sequence_first, shape.into()], vec![]);
    rw.replace(root_out, out);
    Ok(())
}

/// Q, K and V `[L|T, B, N·H]` split to `[L|T, B·N, H]` with the same heads, and the output
/// `root` `[L·B, N·H]` or `[L, B, N·H]`.
fn check_sequence_first(m: &Match, g: &Graph, root: ValueId) -> Checked<Layout> {
    // (length, batch, heads, head size) of a `[len, B, N·H]` value split to `[len, B·N, H]`.
    let split = |src: &'static str, split: &'static str| -> Checked<(Dim, Dim, i64, i64)> {
        let (src, split) = (m.get(src)?, m.get(split)?);
        let (s, r) = (dims(g, src)?, dims(g, split)?);
        let fits = match (s.as_slice(), r.as_slice()) {
            ([len, b, e], [len2, bn, h]) => {
                let n = bn.div(b).and_then(|n| n.value());
                match (n, h.value(), e.value()) {
                    (Some(n), Some(h), Some(e)) if len.same(len2) && n * h == e => {
                        Some((len.clone(), b.clone(), n, h))
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        fits.ok_or_else(|| {
            Declined::NotProven(format!(
                "{} splits {} into heads, batch first",
                shown(g, split),
                shown(g, src)
            ))
        })
    };
    let (q_len, batch, n, h) = split("q", "q_split")?;
    let (k_len, k_batch, kn, kh) = split("k", "k_split")?;
    let (v_len, v_batch, vn, vh) = split("v", "v_split")?;
    if (kn, kh, vn, vh) != (n, h, n, h) {
        return Err(Declined::Mismatch(format!(
            "heads × head size: Q {n}×{h}, K {kn}×{kh}, V {vn}×{vh}"
        )));
    }
    if !batch.same(&k_batch) || !batch.same(&v_batch) || !k_len.same(&v_len) {
        return Err(Declined::NotProven(format!(
            "Q, K and V have the batch {batch}, and K's length {k_len} is V's {v_len}"
        )));
    }
    let out = dims(g, root)?;
    let e = Dim::known(n * h);
    let fits = match out.as_slice() {
        [lb, ee] => lb.same(&q_len.mul(&batch)) && ee.same(&e),
        [l, b, ee] => l.same(&q_len) && b.same(&batch) && ee.same(&e),
        _ => false,
    };
    if !fits {
        return Err(Declined::NotProven(format!(
            "the output {} is [{q_len}·{batch}, {e}] or [{q_len}, {batch}, {e}]",
            shown(g, root)
        )));
    }
    Ok(Layout {
        heads: n,
        head_size: h,
        batch,
        q_len,
        total: k_len,
        bnsh: false,
    })
}

fn trim<T>(inputs: &[Option<T>]) -> &[Option<T>] {
    let len = inputs
        .iter()
        .rposition(Option::is_some)
        .map_or(0, |i| i + 1);
    &inputs[..len]
}

/// Q, K and V projections merged into one: `x · [Wq | Wk | Wv] + [bq | bk | bv]`.
struct PackedQkv {
    input: ValueId,
    weights: Tensor,
    bias: Option<Tensor>,
    absorbed: Vec<NodeId>,
}

/// `x · W (+ b)` with constant W [in, out] and b [out]: (x, W, b, the nodes).
fn linear(g: &Graph, v: ValueId) -> Option<(ValueId, Tensor, Option<Tensor>, Vec<NodeId>)> {
    let node_id = g.producer(v)?;
    let node = g.node(node_id);
    let (matmul_out, bias) = if node.is("Add") {
        let (a, b) = (node.input(0)?, node.input(1)?);
        match (g.constant(a), g.constant(b)) {
            (None, Some(bias)) => (a, Some(bias)),
            (Some(bias), None) => (b, Some(bias)),
            _ => return None,
        }
    } else {
        (v, None)
    };
    let mm_id = g.producer(matmul_out)?;
    let mm = g.node(mm_id);
    if !mm.is("MatMul") {
        return None;
    }
    let weights = g.constant(mm.input(1)?)?;
    if weights.dims().len() != 2 || !weights.dtype().is_float() {
        return None;
    }
    if let Some(b) = &bias {
        if b.dims() != [weights.dims()[1]] {
            return None;
        }
    }
    let mut nodes = vec![mm_id];
    if bias.is_some() {
        nodes.push(node_id);
    }
    Some((mm.input(0)?, weights, bias, nodes))
}

fn packed_qkv(g: &Graph, q: ValueId, k: ValueId, v: ValueId) -> Option<PackedQkv> {
    separate_projections(g, q, k, v).or_else(|| split_projection(g, q, k, v))
}

/// Three `x · W + b` of the same x (BERT, ViT, T5 without biases).
fn separate_projections(g: &Graph, q: ValueId, k: ValueId, v: ValueId) -> Option<PackedQkv> {
    let (xq, wq, bq, nq) = linear(g, q)?;
    let (xk, wk, bk, nk) = linear(g, k)?;
    let (xv, wv, bv, nv) = linear(g, v)?;
    if xq != xk || xk != xv || wq.dims() != wk.dims() || wk.dims() != wv.dims() {
        return None;
    }
    let weights = concat_columns(&[&wq, &wk, &wv])?;
    let bias = match (bq, bk, bv) {
        (Some(bq), Some(bk), Some(bv)) => Some(concat_vectors(&[&bq, &bk, &bv])?),
        (None, None, None) => None,
        _ => return None,
    };
    Some(PackedQkv {
        input: xq,
        weights,
        bias,
        absorbed: [nq, nk, nv].concat(),
    })
}

/// One projection split three ways along the last axis (GPT-2's Conv1D):
/// `Split(Reshape(Gemm(Reshape(x, [B·S, in]), W, b), [B, S, 3·out]))` → q, k, v.
fn split_projection(g: &Graph, q: ValueId, k: ValueId, v: ValueId) -> Option<PackedQkv> {
    let split_id = g.producer(q)?;
    let split = g.node(split_id);
    let outputs: Vec<ValueId> = split.outputs.iter().flatten().copied().collect();
    if !split.is("Split") || outputs != [q, k, v] {
        return None;
    }
    let joined = split.input(0)?;
    let joined_dims = dims(g, joined).ok()?;
    let axis = attr::get_int(&split.proto, "axis").unwrap_or(0);
    if joined_dims.len() != 3 || !(axis == 2 || axis == -1) {
        return None;
    }
    let width = joined_dims[2].value()?;
    // Equal thirds: from num_outputs, or an explicit split input or attribute.
    let sizes: Vec<i64> = match split.input(1) {
        Some(s) => g.constant(s)?.to_i64_vec().ok()?,
        None => attr::get_ints(&split.proto, "split")
            .map(<[i64]>::to_vec)
            .unwrap_or_default(),
    };
    if !(sizes.is_empty() || sizes == [width / 3; 3]) || width % 3 != 0 {
        return None;
    }
    let unflatten_id = g.producer(joined)?;
    let unflatten = g.node(unflatten_id);
    let gemm_id = g.producer(unflatten.input(0)?)?;
    let gemm = g.node(gemm_id);
    if !unflatten.is("Reshape") || !gemm.is("Gemm") {
        return None;
    }
    let plain_gemm = plain_gemm_trans_b(gemm) == Some(false);
    let weights = g.constant(gemm.input(1)?)?;
    let bias = gemm.input(2).map(|b| g.constant(b)).unwrap_or(None);
    if !plain_gemm || weights.dims().len() != 2 || weights.dims()[1] != width {
        return None;
    }
    if let Some(b) = &bias {
        if b.dims() != [width] {
            return None;
        }
    }
    let flatten_id = g.producer(gemm.input(0)?)?;
    let flatten = g.node(flatten_id);
    let x = flatten.input(0)?;
    let x_dims = dims(g, x).ok()?;
    // x must be [B, S, in] with the same B, S as the split halves.
    if !flatten.is("Reshape")
        || x_dims.len() != 3
        || !x_dims[0].same(&joined_dims[0])
        || !x_dims[1].same(&joined_dims[1])
        || x_dims[2].value() != Some(weights.dims()[0])
    {
        return None;
    }
    Some(PackedQkv {
        input: x,
        weights,
        bias,
        absorbed: vec![split_id, unflatten_id, gemm_id, flatten_id],
    })
}

/// `[a | b | c]`: 2-D float32 matrices with equal rows, joined along columns.
fn concat_columns(parts: &[&Tensor]) -> Option<Tensor> {
    let rows = parts[0].dims()[0];
    let mut columns = Vec::new();
    let mut values: Vec<Vec<f32>> = Vec::new();
    for p in parts {
        if p.dims()[0] != rows || p.dtype() != DataType::Float {
            return None;
        }
        columns.push(p.dims()[1] as usize);
        values.push(p.to_f32_vec().ok()?);
    }
    let total: usize = columns.iter().sum();
    let mut out = Vec::with_capacity(rows as usize * total);
    for r in 0..rows as usize {
        for (vals, &c) in values.iter().zip(&columns) {
            out.extend_from_slice(&vals[r * c..(r + 1) * c]);
        }
    }
    Tensor::from_f32("qkv_weight", &[rows, total as i64], &out).ok()
}

fn concat_vectors(parts: &[&Tensor]) -> Option<Tensor> {
    let mut out = Vec::new();
    for p in parts {
        if p.dtype() != DataType::Float {
            return None;
        }
        out.extend(p.to_f32_vec().ok()?);
    }
    Tensor::from_f32("qkv_bias", &[out.len() as i64], &out).ok()
}
