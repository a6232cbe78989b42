//! The standard `Attention` on heads the graph splits before it and merges after it, as the
//! grouped rule fuses decoder LLMs (and torch's opset-23 export writes SDPA):
//!
//! ```text
//! Qh = RotaryEmbedding(Q4) | Q4,   Q4 = Transpose[0,2,1,3](q4)            q4 [B, S, Nq, H]
//!                                 | RMSNormalization(Transpose[0,2,1,3](q4), w)  (Gemma-3)
//! Kh, Vh likewise (Vh never normalized or rotated)                         [B, S, Nkv, H]
//! y  = Reshape(Transpose[0,2,1,3](Attention(Qh, Kh, Vh, mask?, past_k?, past_v?)
//!                                 (then Where(IsNaN(·), 0, ·))), [B, S, Nq·Hv])
//! ```
//!
//! Produces the operator's 3-D form, with the heads moved inside it: `q_num_heads`/
//! `kv_num_heads` on `[B, S, N·H]` inputs and output (`q4` flattened: its producer's input
//! when that is a Reshape splitting only the last dim of a `[B, S, N·H]` value, else
//! `Reshape(q4, [0, 0, N·H])`, which moves no data; a head's norm is applied to `q4` before
//! that Reshape), and RotaryEmbedding with `num_heads` on the same `[B, S, N·H]` rows. The cache inputs and the presents keep their 4-D layout.
//! SmolLM2-135M loses 240 of its 831 nodes (four head moves and four Reshapes per layer):
//! in ONNX Runtime 1.32 its 512-token prefill takes 2–3% less time; a decoding step, whose
//! moves are of one token, the same within noise.
//!
//! Safe because: the standard defines the 3-D form as the 4-D one on `Reshape(x, [B, S, N,
//! H])` moved heads first, and the output as the 4-D output moved back and merged, exactly
//! the nodes removed; both RotaryEmbedding operators define the 3-D input the same way; the
//! NaN clean-up is elementwise, so it reads the merged output the same; a norm over the
//! last axis (the head size) normalizes the same rows before the move as after it. Dims are checked
//! from types (each split keeps B and S and has known N and H; the merge gives `[B, S,
//! Nq·Hv]`). A soft-capped Attention keeps 4-D heads: tract's lowering of `softcap`
//! (`ops::attention::lower_softcap`) takes those. ONNX Runtime 1.23.2, 1.24.4, 1.25.1 and
//! 1.32 run the 3-D form of every `testdata/llm` model with a cache and without with the
//! original's outputs (`scripts/ort_check.py`), as tract does those at opset 20.

use super::grouped::nan_as_zero;
use super::*;
use crate::passes::fuse::pattern::{absent, Name};
use crate::passes::fuse::MS_DOMAIN;

/// `Transpose[0,2,1,3](split)`, `split` bound to `split_name`: heads moved first.
fn moved(split_name: Name) -> Pat {
    transpose(value(split_name), |a| perm_is(a, &[0, 2, 1, 3]))
}

/// Moved heads, each head normalized (Gemma-3's q/k norms: RMSNormalization over the head
/// size, its node bound to `norm`) or not, then rotated by either RotaryEmbedding (its node
/// bound to `rotary`; the standard one's position ids are optional) or not.
fn maybe_rotated(split_name: Name, norm: Name, rotary: Name) -> Pat {
    let normed = op("RMSNormalization", [moved(split_name), any()])
        .attr("axis", |a| a.is_none_or(|a| a.i() == -1 || a.i() == 3))
        .node(norm);
    let heads = either([normed, moved(split_name)]);
    let rotated = |domain: &'static str, inputs: usize| {
        let mut pats = vec![heads.clone()];
        pats.extend((1..inputs).map(|_| any()));
        op("RotaryEmbedding", pats).domain(domain).node(rotary)
    };
    either([
        rotated(MS_DOMAIN, 4),
        rotated("", 4),
        rotated("", 3),
        heads.clone(),
    ])
}

/// The standard `Attention` on 4-D heads (no head counts), with 3 to 6 inputs.
fn attention_on_heads() -> Pat {
    let q = maybe_rotated("q_split", "q_norm", "q_rotary");
    let k = maybe_rotated("k_split", "k_norm", "k_rotary");
    let v = moved("v_split");
    let optional = || either([any(), absent()]);
    let arities = (3..=6).map(|n| {
        let mut inputs = vec![q.clone(), k.clone(), v.clone()];
        inputs.extend((3..n).map(|_| optional()));
        op("Attention", inputs)
            .attr("q_num_heads", |a| a.is_none())
            .node("attention")
    });
    either(arities)
}

/// The whole form, rooted at the merge Reshape.
pub(super) fn moved_heads() -> Pat {
    let attended = attention_on_heads().named("attended");
    let cleaned = op(
        "Where",
        [
            unary("IsNaN", attended.clone()),
            scalar(0.0),
            value("attended"),
        ],
    )
    .named("cleaned");
    let merged = transpose(either([cleaned, attended]), |a| perm_is(a, &[0, 2, 1, 3]));
    op("Reshape", [merged.named("context_t"), any()])
}

/// (B, S, N, H) of a `[B, S, N, H]` split with known N and H.
fn split_dims(g: &Graph, split: ValueId) -> Checked<(Dim, Dim, i64, i64)> {
    match dims(g, split)?.as_slice() {
        [b, s, n, h] => match (n.value(), h.value()) {
            (Some(n), Some(h)) => Ok((b.clone(), s.clone(), n, h)),
            _ => Err(Declined::NotProven(format!(
                "{} has a known head count and head size",
                shown(g, split)
            ))),
        },
        _ => Err(Declined::NotProven(format!(
            "{} is [batch, length, heads, head size]",
            shown(g, split)
        ))),
    }
}

/// `split` as `[B, S, N·H]` rows: the value a Reshape split (when it split only the last
/// dim), else the split merged back (`merged_rows`).
fn flattened(rw: &mut Rewrite, split: ValueId, (n, h): (i64, i64)) -> Checked<PValue> {
    let g = rw.graph;
    let reshaped_from = g
        .producer(split)
        .map(|p| g.node(p))
        .filter(|p| p.is("Reshape"))
        .and_then(|p| p.input(0))
        .filter(|&src| split_heads(g, src, split).is_ok());
    match reshaped_from {
        Some(src) => Ok(src.into()),
        None => merged_rows(rw, split.into(), n * h),
    }
}

/// RMSNormalization `norm` of each head, applied to the `[B, S, N, H]` split before its
/// move (the same rows of H normalized): the normalized heads, still split.
fn normed(rw: &mut Rewrite, norm: NodeId, split: ValueId) -> Checked<PValue> {
    let node = rw.graph.node(norm);
    let scale = node.input(1).ok_or(Declined::Missing("norm scale"))?;
    let attributes = node.proto.attribute.clone();
    Ok(rw.op(
        "RMSNormalization",
        "",
        &[split.into(), scale.into()],
        attributes,
    ))
}

/// `[B, S, N, H]` heads merged into `[B, S, width]` rows by a Reshape (no data moves).
fn merged_rows(rw: &mut Rewrite, heads: PValue, width: i64) -> Checked<PValue> {
    let rows = rw.ints("rows", &[0, 0, width])?;
    Ok(rw.op("Reshape", "", &[heads, rows], vec![]))
}

/// RotaryEmbedding `rotary`, rebuilt on `[B, S, N·H]` rows with `num_heads`. It may set
/// `interleaved`, and `num_heads` (which 4-D heads do not need; torch's opset-23 export writes
/// it) when that is the split's: a partial rotation (`rotary_embedding_dim`) stays on heads.
fn rotated_rows(rw: &mut Rewrite, rotary: NodeId, rows: PValue, heads: i64) -> Checked<PValue> {
    let node = rw.graph.node(rotary);
    let carried = |a: &AttributeProto| match a.name() {
        "interleaved" => true,
        "num_heads" => a.i() == heads,
        _ => false,
    };
    if let Some(a) = node.proto.attribute.iter().find(|a| !carried(a)) {
        return Err(Declined::Mismatch(format!(
            "RotaryEmbedding `{}` sets {} (the split has {heads} heads)",
            node.name(),
            crate::ir::dump::attribute_text(a)
        )));
    }
    let mut attributes: Vec<AttributeProto> = node
        .proto
        .attribute
        .iter()
        .filter(|a| a.name() == "interleaved")
        .cloned()
        .collect();
    attributes.push(attr::int("num_heads", heads));
    let mut inputs: Vec<PValue> = vec![rows];
    for slot in 1..node.inputs.len() {
        inputs.push(
            node.input(slot)
                .ok_or(Declined::Missing("rotary input"))?
                .into(),
        );
    }
    let domain = node.domain().to_string();
    Ok(rw.op("RotaryEmbedding", &domain, &inputs, attributes))
}

pub(super) fn build_moved_heads(m: &Match, rw: &mut Rewrite) -> Built {
    let g = rw.graph;
    let attention = m.node("attention").ok_or(Declined::Missing("attention"))?;
    let node = g.node(attention);
    if attr::get_float(&node.proto, "softcap").is_some_and(|c| c != 0.0) {
        return Err(Declined::Contract {
            op: "Attention",
            why: "a soft cap keeps 4-D heads (tract's lowering takes those)".into(),
        });
    }
    if node.output(3).is_some() {
        return Err(Declined::Mismatch(
            "the Attention returns its scores (output 3)".into(),
        ));
    }
    let (qb, qs, q_heads, head) = split_dims(g, m.get("q_split")?)?;
    let (kb, ks, kv_heads, kh) = split_dims(g, m.get("k_split")?)?;
    let (vb, vs, vn, v_head) = split_dims(g, m.get("v_split")?)?;
    let root = rw.root_of(m)?;
    let merged = dims(g, root)?;
    let merges = matches!(merged.as_slice(),
        [b, s, w] if b.same(&qb) && s.same(&qs) && w.value() == Some(q_heads * v_head));
    if !(kb.same(&qb) && vb.same(&qb) && vs.same(&ks) && vn == kv_heads && kh == head && merges) {
        return Err(Declined::NotProven(format!(
            "{}, {} and {} are the heads of one batch, merged into {}",
            shown(g, m.get("q_split")?),
            shown(g, m.get("k_split")?),
            shown(g, m.get("v_split")?),
            shown(g, root)
        )));
    }
    let mut rows = Vec::with_capacity(3);
    for (split, norm, rotary, heads, size) in [
        ("q_split", "q_norm", "q_rotary", q_heads, head),
        ("k_split", "k_norm", "k_rotary", kv_heads, head),
        ("v_split", "", "", kv_heads, v_head),
    ] {
        let split = m.get(split)?;
        let flat = match m.node(norm) {
            Some(norm) => {
                let heads_normed = normed(rw, norm, split)?;
                merged_rows(rw, heads_normed, heads * size)?
            }
            None => flattened(rw, split, (heads, size))?,
        };
        rows.push(match m.node(rotary) {
            Some(rotary) => rotated_rows(rw, rotary, flat, heads)?,
            None => flat,
        });
    }
    let mut inputs: Vec<Option<PValue>> = rows.into_iter().map(Some).collect();
    inputs.extend(node.inputs[3..].iter().map(|i| i.map(PValue::from)));
    let wanted: Vec<bool> = (0..3).map(|slot| node.output(slot).is_some()).collect();
    let mut attributes = node.proto.attribute.clone();
    attributes.push(attr::int("q_num_heads", q_heads));
    attributes.push(attr::int("kv_num_heads", kv_heads));
    let outs = rw.op_with_outputs("Attention", "", &inputs, &wanted, attributes);
    let mut out = outs[0].ok_or(Declined::Missing("output"))?;
    if m.value("cleaned").is_some() {
        out = nan_as_zero(rw, out)?;
    }
    rw.replace(root, out);
    // Output 0 went to the merge's readers above (through the NaN clean-up, if any).
    rw.replace_outputs(attention, &outs, 1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::ir::attr;
    use crate::ir::testing::builder;
    use crate::passes::fuse::attention::AttentionFusion;
    use crate::passes::fuse::Target;
    use crate::passes::shape::ShapeInference;
    use crate::passes::Pass;
    use crate::proto::tensor_proto::DataType::Float;

    /// A cached Attention without a mask (`""` in slot 3, as a causal export may leave it):
    /// the optional mask is matched absent and stays absent on the 3-D Attention.
    #[test]
    fn a_cached_attention_without_a_mask_takes_flat_heads() {
        let perm = || vec![attr::ints("perm", &[0, 2, 1, 3])];
        let mut b = builder()
            .opset(23)
            .input("q_split", Float, &["1", "s", "4", "8"])
            .input("past_key", Float, &["1", "2", "p", "8"])
            .input("past_value", Float, &["1", "2", "p", "8"]);
        for (split, heads) in [("k_split", "2"), ("v_split", "2")] {
            b = b.input(split, Float, &["1", "s", heads, "8"]);
        }
        for (split, moved) in [("q_split", "qh"), ("k_split", "kh"), ("v_split", "vh")] {
            b = b.node("Transpose", &[split], &[moved], perm());
        }
        let shape = crate::ir::Tensor::from_i64("merged_shape", &[3], &[0, 0, 32]).unwrap();
        let mut model = b
            .init(shape)
            .node(
                "Attention",
                &["qh", "kh", "vh", "", "past_key", "past_value"],
                &["attended", "present_key", "present_value"],
                vec![attr::int("is_causal", 1)],
            )
            .node("Transpose", &["attended"], &["context_t"], perm())
            .node("Reshape", &["context_t", "merged_shape"], &["y"], vec![])
            .output("y", Float, &["1", "s", "32"])
            .output("present_key", Float, &["1", "2", "?", "8"])
            .output("present_value", Float, &["1", "2", "?", "8"])
            .build();
        ShapeInference.run(&mut model).unwrap();
        let target = Target::Onnx;
        AttentionFusion { target }.run(&mut model).unwrap();
        let g = &model.graph;
        let (_, attention) = g.nodes().find(|(_, n)| n.is("Attention")).unwrap();
        assert_eq!(attr::get_int(&attention.proto, "q_num_heads"), Some(4));
        assert_eq!(attention.inputs.len(), 6);
        assert!(attention.inputs[3].is_none(), "no mask is made up");
        assert!(!g.nodes().any(|(_, n)| n.is("Transpose")));
    }
}
