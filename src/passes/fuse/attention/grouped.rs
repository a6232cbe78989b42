//! Grouped-query attention of decoder LLMs (Llama, Qwen, Mistral, Phi-3, Gemma), on heads the
//! graph has already split and rotated.
//!
//! Matches, as torch's dynamo exporter writes Hugging Face's attention (SDPA decomposed at
//! opset 18–20, the standard `Attention` at opset 23) and its legacy exporter writes it:
//!
//! ```text
//! Kt = Concat(past_k, Kn, axis 2) | Kn          (the cache; Kt is the `present` output)
//! Kr = Reshape(Expand(Unsqueeze(Kt, 2), [B, Nkv, r, T, H]), [B, Nkv·r, T, H]) | Kt
//!                                                (repeat_kv: each key head r times; or one
//!                                                head the MatMuls broadcast: multi-query)
//! y  = Softmax(Q·Krᵀ (· scales) (masked by a fill) (+ bias)) · Vr
//!                                                then Where(IsNaN(P), 0, P) after the Softmax
//!    | Softmax((Q·Krᵀ + bias) · scale) · Vr       (CodeGen scales after the mask)
//!    | Softmax(tanh(Q·Krᵀ·s / cap)·cap + bias)·Vr (Gemma-2's soft cap: the operator's `softcap`,
//!                                                which ONNX Runtime 1.32 applies before the
//!                                                mask as the standard says, measured)
//!    | Attention(Q, Kr, Vr (, mask))             the opset-23 export
//! ```
//!
//! where Q `[B, Nq, S, H]` is any value (RotaryEmbedding's output, a q-norm's; when no heads
//! are repeated, not a Q split from its projection in place, the form the `attention` rule
//! fuses into MultiHeadAttention for ONNX Runtime without opset 23), Kᵀ is the
//! Transpose of the last two axes, the dynamo exporter's detour through `[B·N, T, H]`, or
//! (GPT-J through dynamo, CodeGen: keys rotated before their heads move, no cache or repeat)
//! one `Transpose[0,2,3,1]` of `[B, T, N, H]` keys, which the fused operator takes moved to
//! `[B, N, T, H]`; V is written like K. A scale applied after the mask scales the mask too in
//! the fused form (`(S + b)·s = S·s + b·s`, exact for the powers of two of `1/√H` at head
//! sizes 4ᵏ, within rounding otherwise).
//!
//! Produces, for both targets, the standard `Attention` (opset 23, raising the import) on the
//! 4-D heads: `Attention(Q, Kn, Vn, bias, past_k, past_v) → y, present_k, present_v`, whose
//! own GQA repeats each of the `Nkv` key/value heads for `Nq / Nkv` consecutive query heads,
//! exactly what repeat_kv wrote, and whose presents are the concatenations the graph returned.
//! ONNX Runtime runs it from 1.23.1 on (checked on a 4-over-2-head block with and without a
//! past and a mask: 1.22 cannot load opset 23; 1.23.0 loads it but pairs the grouped heads
//! wrongly, max error 3.1; 1.23.1, 1.23.2, 1.24.4, 1.25.1 and 1.32 agree with the standard
//! to 2.4e-7). No `com.microsoft` operator takes grouped heads and a cache with the caller's
//! mask as it is: GroupQueryAttention reads sequence lengths instead of the mask, which
//! changes left-padded batches. Where the heads are split from `[B, S, N·H]` rows and merged
//! back after it, the `attention-flat-heads` rule then moves the split inside the operator
//! (`flat_heads.rs`).
//!
//! Safe because: the heads layout, the repeat (`Unsqueeze` at axis 2, `Expand` along that axis
//! only, `Reshape` merging axes 1 and 2 only) and the cache's concatenation axis are checked
//! from types; scales are scalar constants; the bias takes the contract of `ops::attention`;
//! every intermediate is read only inside the match (or by Shapes that only size the match's
//! own Reshapes). Rows whose every key is masked (the queries of left padding): the SDPA
//! export gives them zeros (its `IsNaN` clean-up); ONNX Runtime's CPU kernel gives zeros too,
//! but the standard's reference and tract give NaN, which the next layer would carry into
//! every row, so the clean-up stays on the fused output for both targets. Rows masked whole
//! with float32's lowest (transformers' `finfo.min` masks) average the values in the graph;
//! ONNX Runtime's kernel would give zeros, so the mask's lowest becomes -1e30, the same
//! arithmetic (`lowest_as_masked`). A mask in a type other than float32 stays unfused.

use super::*;
use crate::passes::fuse::pattern::Name;

/// `Reshape(Expand(Unsqueeze(kv), ·), ·)`: Hugging Face's `repeat_kv`.
fn repeated(kv: Pat, names: [Name; 3]) -> Pat {
    let [unsqueezed, expanded, repeat] = names;
    let unsqueeze = op("Unsqueeze", [kv, any()]).named(unsqueezed);
    let expand = op("Expand", [unsqueeze, any()]).named(expanded);
    op("Reshape", [expand, any()]).named(repeat)
}

/// Whether `v` is `repeat_kv`'s output: heads the `attention-grouped` rule takes unrepeated.
pub(super) fn repeats_heads(g: &Graph, v: ValueId) -> bool {
    !repeated(any(), K_REPEAT).matches(g, v).is_empty()
}

/// Keys or values: the new heads, after the cached ones or not, repeated or not.
fn grouped(new: Name, past: Name, total: Name, repeat: [Name; 3]) -> Pat {
    let cached = either([
        op("Concat", [value(past), value(new)])
            .attr("axis", |a| a.is_some_and(|a| a.i() == 2 || a.i() == -2))
            .named(total),
        value(new),
    ]);
    either([repeated(cached.clone(), repeat), cached])
}

const K_REPEAT: [Name; 3] = ["k_unsqueezed", "k_expanded", "k_repeat"];
const V_REPEAT: [Name; 3] = ["v_unsqueezed", "v_expanded", "v_repeat"];

fn keys() -> Pat {
    grouped("k", "past_k", "k_total", K_REPEAT)
}

fn values() -> Pat {
    grouped("v", "past_v", "v_total", V_REPEAT)
}

/// The written-out form: `Softmax(Q·Kᵀ·s + bias)·V`.
pub(super) fn written_out() -> Pat {
    let k_t = either([
        transpose(keys(), |a| perm_is(a, &[0, 1, 3, 2])),
        // GPT-J (dynamo) and CodeGen rotate the keys before moving their heads: one Transpose
        // from `[B, T, N, H]`.
        transpose(value("k_seq_first"), |a| perm_is(a, &[0, 2, 3, 1])),
        op(
            "Reshape",
            [
                transpose(op("Reshape", [keys(), any()]).named("k_flat"), |a| {
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
            maybe_scaled(value("q"), "q_scale", "q_div"),
            maybe_scaled(k_t, "k_scale", "k_div"),
        ],
    );
    // GPT-J masks its causal positions with a fill (`passes::canonical` moves its scale
    // inside the Where), then adds the padding mask.
    let scores = maybe_scaled(scores, "s_scale", "s_div");
    // Gemma-2 caps its scores: `tanh(S / cap) · cap`, before the mask.
    let capped = mul(
        unary(
            "Tanh",
            mul(scores.clone(), constant_where("cap_inverse", is_scalar)),
        ),
        constant_where("softcap", is_scalar),
    );
    let scores = masked(either([capped, scores]));
    // CodeGen scales its scores after adding the mask.
    let scaled_after = mul(
        add(scores.clone(), value("bias")),
        constant_where("bias_scale", is_scalar),
    );
    let probs = op(
        "Softmax",
        [either([
            scaled_after,
            add(scores.clone(), value("bias")),
            scores,
        ])],
    )
    .attr("axis", last_of_4)
    .anchor()
    .named("probs");
    let cleaned = nan_cleaned(probs);
    op("MatMul", [cleaned, values()]).named("context")
}

/// The opset-23 export: the standard `Attention` on repeated heads and the concatenated cache,
/// no causal flag, no soft cap, one output. Not an anchor: it is an attention operator
/// already, so `--explain` has nothing to say of it when it stays.
pub(super) fn standard_op() -> Pat {
    plain_attention_op(value("q"), keys(), values())
}

/// `[B, N, T, H]` with N and H known: (B, N, T, H).
fn heads_of(g: &Graph, v: ValueId) -> Checked<(Dim, i64, Dim, i64)> {
    heads_in(g, v, false)
}

/// (B, N, T, H) of `v`, `[B, N, T, H]`, or `[B, T, N, H]` when `seq_first`, with N and H
/// known.
fn heads_in(g: &Graph, v: ValueId, seq_first: bool) -> Checked<(Dim, i64, Dim, i64)> {
    let layout = match seq_first {
        true => "[batch, length, heads, head size]",
        false => "[batch, heads, length, head size]",
    };
    let found = match dims(g, v)?.as_slice() {
        [b, n, t, h] if !seq_first => Some((b.clone(), n.value(), t.clone(), h.value())),
        [b, t, n, h] => Some((b.clone(), n.value(), t.clone(), h.value())),
        _ => None,
    };
    match found {
        Some((b, Some(n), t, Some(h))) => Ok((b, n, t, h)),
        _ => Err(Declined::NotProven(format!(
            "{} is {layout} with a known head count and head size",
            shown(g, v)
        ))),
    }
}

/// Keys or values as the fused operator takes them: `[B, Nkv, T, H]` new heads, a past of the
/// same heads, and a repeat that turns `Nkv` heads into `q_heads` by repeating each one.
/// Returns (batch, heads, total length, head size) of the heads before the repeat.
fn check_kv(
    m: &Match,
    g: &Graph,
    [new, past, total]: [Name; 3],
    [unsqueezed, expanded, repeat]: [Name; 3],
    q_heads: i64,
) -> Checked<(Dim, i64, Dim, i64)> {
    let (batch, n, new_len, h) = heads_of(g, m.get(new)?)?;
    let mut length = new_len;
    if let Some(past) = m.value(past) {
        // Concat proves the batch at run time; the heads must be known to be the same.
        let (_, pn, past_len, ph) = heads_of(g, past)?;
        if (pn, ph) != (n, h) {
            return Err(Declined::NotProven(format!(
                "the past {} has the heads of {}",
                shown(g, past),
                shown(g, m.get(new)?)
            )));
        }
        length = past_len.add(&length);
    }
    let cached = m.value(total).map_or_else(|| m.get(new), Ok)?;
    let Some(repeat) = m.value(repeat) else {
        // One key/value head (multi-query attention: Falcon) is broadcast by the MatMuls to
        // every query head, as the fused operator repeats it.
        return match n == q_heads || n == 1 {
            true => Ok((batch, n, length, h)),
            false => Err(Declined::Mismatch(format!(
                "{} has {n} heads, the query {q_heads}, and nothing repeats them",
                shown(g, cached)
            ))),
        };
    };
    // Unsqueeze at axis 2, Expand along that axis only, Reshape merging axes 1 and 2 only.
    // The cache is `length` long, whatever the file declares for it as a graph output
    // (Optimum declares `past_sequence_length + 1`, a one-token step's). The Expand may
    // broadcast the length with one computed elsewhere (the mask's: Optimum and the legacy
    // exporter build the repeat's shape from it), and the Reshape take that one: a run of
    // the original then has them equal, or a cache of one position repeated to the mask's
    // length, whose mask the fused operator refuses at run time (`fitted_bias` expands it
    // to the cache's length), so the fused form gives the original's answer or an error.
    let mut c = dims(g, cached)?;
    if let Some(t) = c.get_mut(2) {
        *t = length.clone();
    }
    let (c, u, e, r) = (
        c,
        dims(g, m.get(unsqueezed)?)?,
        dims(g, m.get(expanded)?)?,
        dims(g, repeat)?,
    );
    let times = e.get(2).and_then(Dim::value);
    let fits = match (
        c.as_slice(),
        u.as_slice(),
        e.as_slice(),
        r.as_slice(),
        times,
    ) {
        (
            [cb, cn, ct, ch],
            [ub, un, one, ut, uh],
            [eb, en, _, et, eh],
            [rb, rn, rt, rh],
            Some(t),
        ) => {
            let unsqueezed_at_2 =
                ub.same(cb) && un.same(cn) && one.value() == Some(1) && ut.same(ct) && uh.same(ch);
            let expanded_at_2 = eb.same(cb) && en.same(cn) && et.is_broadcast_of(ct) && eh.same(ch);
            let merged = rb.same(cb)
                && rn.value() == Some(n * t)
                && (rt.same(ct) || et.is_broadcast_of(rt))
                && rh.same(ch)
                && n * t == q_heads;
            unsqueezed_at_2 && expanded_at_2 && merged
        }
        _ => false,
    };
    match fits {
        true => Ok((batch, n, length, h)),
        false => Err(Declined::NotProven(format!(
            "{} → {} → {} → {} repeats each of the heads for the query's {q_heads}",
            shown(g, cached),
            shown(g, m.get(unsqueezed)?),
            shown(g, m.get(expanded)?),
            shown(g, repeat)
        ))),
    }
}

/// Keys `[B, T, N, H]` (`k_seq_first`): (B, N, T, H), with as many heads as the query (no
/// repeat or cache is matched in this layout).
fn seq_first_keys(g: &Graph, k: ValueId, q_heads: i64) -> Checked<(Dim, i64, Dim, i64)> {
    let (b, n, t, h) = heads_in(g, k, true)?;
    match n == q_heads {
        true => Ok((b, n, t, h)),
        false => Err(Declined::Mismatch(format!(
            "{} has {n} heads, the query {q_heads}",
            shown(g, k)
        ))),
    }
}

/// The query's layout, once the key/value heads are proven to serve it.
fn check_grouped(m: &Match, g: &Graph) -> Checked<Layout> {
    let (batch, q_heads, q_len, head_size) = heads_of(g, m.get("q")?)?;
    let k_names = ["k", "past_k", "k_total"];
    let (kb, kv_heads, total, kh) = match m.value("k_seq_first") {
        Some(k) => seq_first_keys(g, k, q_heads)?,
        None => check_kv(m, g, k_names, K_REPEAT, q_heads)?,
    };
    let v_names = ["v", "past_v", "v_total"];
    let (vb, vn, _, _) = check_kv(m, g, v_names, V_REPEAT, q_heads)?;
    if kh != head_size || vn != kv_heads {
        return Err(Declined::Mismatch(format!(
            "heads × head size: Q {q_heads}×{head_size}, K {kv_heads}×{kh}, V {vn} heads"
        )));
    }
    // The lengths need no proof: `P · V` contracts the scores' last dim (K's length) with V's
    // length, so the original runs only where they are equal, as the fused operator does.
    // The batch does: MatMul would broadcast a batch of 1 that the fused operator refuses.
    if !kb.same(&batch) || !vb.same(&batch) {
        return Err(Declined::NotProven(format!(
            "Q, K and V have the batch {batch}"
        )));
    }
    if m.value("past_k").is_some() != m.value("past_v").is_some() {
        return Err(Declined::Mismatch("K and V do not both have a past".into()));
    }
    if m.value("k_flat").is_some() {
        check_dynamo_kt(m, g)?;
    }
    Ok(Layout {
        heads: q_heads,
        head_size,
        batch,
        q_len,
        total,
        bnsh: true,
    })
}

/// The cap of capped scores, `tanh(S · c⁻¹) · c`: the two constants must be inverses (within
/// float32 rounding: the graph's `S / c` became `S · (1/c)` in `passes::canonical`) and `c`
/// positive.
fn softcap_of(m: &Match, g: &Graph) -> Checked<Option<f32>> {
    let (Some(inverse), Some(cap)) = (m.value("cap_inverse"), m.value("softcap")) else {
        return Ok(None);
    };
    let scalar = |v: ValueId| g.constant(v).and_then(|t| t.scalar_f64());
    match (scalar(inverse), scalar(cap)) {
        (Some(i), Some(c)) if c > 0.0 && (i * c - 1.0).abs() < 1e-6 => Ok(Some(c as f32)),
        _ => Err(Declined::Mismatch(format!(
            "the scores are capped by tanh(S · {}) · {}: not a cap and its inverse",
            shown(g, inverse),
            shown(g, cap)
        ))),
    }
}

/// What the mask adds to a masked score for ONNX Runtime (see `lowest_as_masked`).
const MASKED: f32 = -1e30;

/// The mask with float32's lowest written as `MASKED`, for ONNX Runtime whatever the target:
/// its kernel for the standard Attention (1.32) reads the lowest as -inf, so a query row masked with it whole (left padding, as
/// transformers' `finfo.min` masks write it) comes out as zeros, where the graph's Softmax
/// gives the average of the values (every score plus the lowest rounds to the lowest, the
/// row is uniform). `MASKED` keeps the graph's arithmetic: a score below 3.8e22 in magnitude
/// plus -1e30 rounds to -1e30 (the row stays uniform), and `exp(-1e30 - max)` is 0 as
/// `exp(lowest - max)` is; -inf and every other value pass through unchanged.
pub(super) fn lowest_as_masked(rw: &mut Rewrite, bias: PValue) -> Checked<PValue> {
    let scalar = |name: &str, v: f32| {
        Tensor::from_f32(name, &[], &[v]).map_err(|e| Declined::Refused(e.to_string()))
    };
    let lowest = rw.constant("lowest", scalar("lowest", f32::MIN)?);
    let masked = rw.constant("masked", scalar("masked", MASKED)?);
    let is_lowest = rw.op("Equal", "", &[bias, lowest], vec![]);
    Ok(rw.op("Where", "", &[is_lowest, masked, bias], vec![]))
}

/// `Where(IsNaN(y), 0, y)`: the SDPA export's clean-up of rows whose every key is masked,
/// kept on the fused output (see the module doc).
pub(super) fn nan_as_zero(rw: &mut Rewrite, y: PValue) -> Checked<PValue> {
    let nan = rw.op("IsNaN", "", &[y], vec![]);
    let zero =
        Tensor::from_f32("zero", &[], &[0.0]).map_err(|e| Declined::Refused(e.to_string()))?;
    let zero = rw.constant("zero", zero);
    Ok(rw.op("Where", "", &[nan, zero, y], vec![]))
}

pub(super) fn build_grouped(m: &Match, rw: &mut Rewrite) -> Built {
    let g = rw.graph;
    softmax_axis(m, g, rw.opset)?;
    let layout = check_grouped(m, g)?;
    let standard = m.value("attention_op").is_some();
    let past = m.value("past_k").zip(m.value("past_v"));
    let repeated = m.value("k_repeat").is_some() || m.value("v_repeat").is_some();
    if standard && past.is_none() && !repeated {
        return Err(Declined::Mismatch(
            "the standard Attention without repeated heads or a cache is the fused form".into(),
        ));
    }
    let split_from_projection = !query_heads().matches(g, m.get("q")?).is_empty();
    if !repeated && split_from_projection {
        // The `attention` rule's form: ONNX Runtime gets MultiHeadAttention from it, which
        // needs no opset 23.
        return Err(Declined::Mismatch(
            "no heads are repeated and the query is split from its projection here: the \
             `attention` rule's block"
                .into(),
        ));
    }
    let cleaned = m.value("cleaned").is_some();
    rw.require_opset(ATTENTION_OPSET)?;
    let scale = scale_of(m, g, &layout)?;
    let q = m.get("q")?;
    let v = m.get("v")?;
    // Keys with their length axis, and as the operator takes them, `[B, N, T, H]`.
    let (k, key_length_axis) = match m.value("k_seq_first") {
        Some(k) => (k, 1),
        None => (m.get("k")?, 2),
    };
    let mut key_lengths = vec![(k, key_length_axis)];
    if let Some((past_k, _)) = past {
        key_lengths.push((past_k, 2));
    }
    if let Some(mask) = m.value("bias") {
        let float32 = g
            .value_type(mask)
            .is_some_and(|t| t.elem == DataType::Float as i32);
        if !float32 {
            return Err(Declined::Mismatch(format!(
                "the mask {} is not float32 (see `lowest_as_masked`)",
                shown(g, mask)
            )));
        }
    }
    // The opset-23 export's boolean mask stays boolean: the fused operator reads it as the
    // exported one did, in every ONNX Runtime version. As a float -inf bias (what the
    // standard says false means), a row masked whole (the queries of left padding) is NaN
    // in ONNX Runtime 1.24 and 1.25 where the export's boolean one is not, and the next
    // layer carries that NaN into every row (measured on the opset-23 LLM corpus).
    let boolean_mask = m
        .value("attn_mask")
        .filter(|&mask| g.value_type(mask).map(|t| t.elem) == Some(DataType::Bool as i32));
    let bias = match boolean_mask {
        Some(mask) => {
            rw.keep_alive(mask);
            Some((mask.into(), dims(g, mask)?))
        }
        None => bias_of(m, rw)?,
    };
    let bias = fitted_bias(bias, &layout, rw, (q, 2), &key_lengths)?;
    let bias = match bias {
        Some(bias) if !standard => Some(lowest_as_masked(rw, bias)?),
        bias => bias,
    };
    let heads_first = match m.value("k_seq_first") {
        Some(_) => rw.op(
            "Transpose",
            "",
            &[k.into()],
            vec![attr::ints("perm", &[0, 2, 1, 3])],
        ),
        None => k.into(),
    };
    let presents = [m.value("k_total"), m.value("v_total")];
    let inputs = [
        Some(q.into()),
        Some(heads_first),
        Some(v.into()),
        bias,
        past.map(|p| p.0.into()),
        past.map(|p| p.1.into()),
    ];
    let wanted = [true, presents[0].is_some(), presents[1].is_some()];
    let mut attributes = vec![attr::float("scale", scale)];
    if let Some(cap) = softcap_of(m, g)? {
        attributes.push(attr::float("softcap", cap));
    }
    let outs = rw.op_with_outputs("Attention", "", trim(&inputs), &wanted, attributes);
    let mut out = outs[0].ok_or(Declined::Missing("output"))?;
    if cleaned {
        out = nan_as_zero(rw, out)?;
    }
    rw.replace(rw.root_of(m)?, out);
    for (old, new) in presents.iter().zip(&outs[1..]) {
        if let (Some(old), Some(new)) = (old, new) {
            rw.replace(*old, *new);
        }
    }
    Ok(())
}
