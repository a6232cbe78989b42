//! Multi-query attention with the query heads folded into the rows (GPT-BigCode: StarCoder,
//! SantaCoder, Granite-Code), as the legacy and dynamo exporters write transformers' eager
//! attention:
//!
//! ```text
//! S = Reshape(q [B, S, N·H], [B, S·N, H]) · Transpose(k [B, T, H], [0, 2, 1])   (· scale)
//! P = Softmax(Reshape(S, [B, S, N, T]) (masked by a fill) (+ bias))
//! y = Reshape(Reshape(P, [B, S·N, T]) · v [B, T, H], [B, S, N·H])
//! ```
//!
//! Produces the standard `Attention` (opset 23, raising the import) for both targets, on 4-D
//! heads: `Q = Transpose(Reshape(q, [0, 0, N, H]), [0, 2, 1, 3])`, `K = Unsqueeze(k, 1)` and
//! `V = Unsqueeze(v, 1)` (one key/value head, which the operator repeats for every query
//! head), the mask moved from the scores' `[B, S, N, T]` to `[B, N, S, T]`, and the context
//! moved back: `Reshape(Transpose(y, [0, 2, 1, 3]), [0, 0, N·H])`.
//!
//! Safe because: row `s·N + n` of the folded query is head `n` of token `s` (a Reshape keeps
//! the element order), and every Reshape's dims are checked from types (the fold and the
//! unfolds split or merge exactly S and N, and keep B, T and H), so score `[b, s, n, t]` is
//! `Q[b, n, s]·K[b, t]·scale` and the context row `s·N + n` is head `n` of token `s` again;
//! the mask and the fill are the grouped rule's (`lowest_as_masked` included).

use super::grouped::lowest_as_masked;
use super::*;

/// The folded form, matched from its last Reshape.
pub(super) fn folded_rows() -> Pat {
    let rows = op("Reshape", [value("q"), any()]).named("q_rows");
    let k_t = transpose(value("k"), |a| perm_is(a, &[0, 2, 1]));
    let scores = maybe_scaled(op("MatMul", [rows, k_t]), "s_scale", "s_div");
    let masked = masked(op("Reshape", [scores, any()]).named("scores4"));
    let probs = op(
        "Softmax",
        [either([add(masked.clone(), value("bias")), masked])],
    )
    .attr("axis", last_of_4)
    .anchor()
    .named("probs");
    let context = op("MatMul", [op("Reshape", [probs, any()]), value("v")]).named("context3");
    op("Reshape", [context, any()]).named("out")
}

/// The layout the types prove: `[B, S, N·H]` queries folded to `[B, S·N, H]`, one `[B, T, H]`
/// key/value head, scores unfolded to `[B, S, N, T]`, the context folded back.
fn check_folded(m: &Match, g: &Graph) -> Checked<Layout> {
    let (q, k, v) = (m.get("q")?, m.get("k")?, m.get("v")?);
    let [q, rows, k, v, scores, context, out] = [
        q,
        m.get("q_rows")?,
        k,
        v,
        m.get("scores4")?,
        m.get("context3")?,
        m.get("out")?,
    ]
    .map(|x| dims(g, x));
    let (q, rows, k, v, scores, context, out) = (q?, rows?, k?, v?, scores?, context?, out?);
    let proven = match (
        &q[..],
        &rows[..],
        &k[..],
        &v[..],
        &scores[..],
        &context[..],
        &out[..],
    ) {
        (
            [b, s, width],
            [rb, rows, h],
            [kb, t, kh],
            [vb, vt, vh],
            [sb, ss, n, st],
            [cb, crows, ch],
            [ob, os, ow],
        ) => {
            let (n, h, width) = (n.value(), h.value(), width.value());
            let folded = |d: &Dim| n.is_some_and(|n| d.same(&s.mul(&Dim::known(n))));
            let batch = [rb, kb, vb, sb, cb, ob].iter().all(|d| d.same(b));
            let sizes = matches!((n, h, width), (Some(n), Some(h), Some(w)) if n * h == w)
                && [kh, vh, ch].iter().all(|d| d.value() == h)
                && ow.value() == width;
            let lengths = ss.same(s) && os.same(s) && vt.same(t) && st.same(t);
            if batch && sizes && lengths && folded(rows) && folded(crows) {
                n.zip(h)
                    .map(|(n, h)| (b.clone(), s.clone(), t.clone(), n, h))
            } else {
                None
            }
        }
        _ => None,
    };
    let Some((batch, q_len, total, heads, head_size)) = proven else {
        return Err(Declined::NotProven(format!(
            "{} is folded to {} query rows of one head, unfolded to {} and back to {}",
            shown(g, m.get("q")?),
            shown(g, m.get("q_rows")?),
            shown(g, m.get("scores4")?),
            shown(g, m.get("out")?)
        )));
    };
    Ok(Layout {
        heads,
        head_size,
        batch,
        q_len,
        total,
        bnsh: true,
    })
}

pub(super) fn build_folded(m: &Match, rw: &mut Rewrite) -> Built {
    let g = rw.graph;
    softmax_axis(m, g, rw.opset)?;
    let layout = check_folded(m, g)?;
    rw.require_opset(ATTENTION_OPSET)?;
    let scale = scale_of(m, g, &layout)?;
    let (q, k, v) = (m.get("q")?, m.get("k")?, m.get("v")?);
    // The mask comes in the unfolded scores' layout [B, S, N, T]: moved to [B, N, S, T].
    let bias = match bias_of(m, rw)? {
        Some((bias, bias_dims)) => match &bias_dims[..] {
            [b, s, n, t] => {
                let perm = vec![attr::ints("perm", &[0, 2, 1, 3])];
                let moved = rw.op("Transpose", "", &[bias], perm);
                Some((moved, vec![b.clone(), n.clone(), s.clone(), t.clone()]))
            }
            _ => {
                return Err(Declined::NotProven(format!(
                    "the mask has rank {}, not the scores' 4",
                    bias_dims.len()
                )))
            }
        },
        None => None,
    };
    let bias = fitted_bias(bias, &layout, rw, (q, 1), &[(k, 1)])?;
    let bias = bias.map(|b| lowest_as_masked(rw, b)).transpose()?;
    let (heads, head_size) = (layout.heads, layout.head_size);
    let split = rw.ints("heads", &[0, 0, heads, head_size])?;
    let q = rw.op("Reshape", "", &[q.into(), split], vec![]);
    let heads_first = vec![attr::ints("perm", &[0, 2, 1, 3])];
    let q = rw.op("Transpose", "", &[q], heads_first.clone());
    let head_axis = rw.ints("head_axis", &[1])?;
    let k = rw.op("Unsqueeze", "", &[k.into(), head_axis], vec![]);
    let v = rw.op("Unsqueeze", "", &[v.into(), head_axis], vec![]);
    let inputs = [Some(q), Some(k), Some(v), bias];
    let outs = rw.op_with_outputs(
        "Attention",
        "",
        trim(&inputs),
        &[true],
        vec![attr::float("scale", scale)],
    );
    let y = outs[0].ok_or(Declined::Missing("output"))?;
    let y = rw.op("Transpose", "", &[y], heads_first);
    let merged = rw.ints("merged", &[0, 0, heads * head_size])?;
    let y = rw.op("Reshape", "", &[y, merged], vec![]);
    rw.replace(m.get("out")?, y);
    Ok(())
}
