//! Normalization fusions: LayerNorm written out, RMSNorm, and residual Add + LayerNorm.
//!
//! Matches, in the canonical forms of `passes::canonical` (`x·x` is `Pow(x, 2)`,
//! `Reciprocal(v)` is `Div(1, v)`, tf2onnx's GlobalAveragePool of a sequence is a ReduceMean):
//! - LayerNorm as exporters write it before opset 17: `d = x - ReduceMean(x)`,
//!   `v = ReduceMean(d²)`, `y = d / √(v + ε)` (or `d · 1/√(v + ε)`), then `· γ` and `+ β`
//!   (β optional); over the last axis, or over the channels (axis 1) of `[N, C, …]` with
//!   `[C, 1, …]` parameters (ConvNeXt's and SAM's channels-first LayerNorm); at opset 11 too,
//!   once `opset` can raise the model; in a float16 or
//!   bfloat16 model as torch's legacy exporter writes it, `x - mean` cast to float32 before
//!   the variance and the quotient cast back before `· γ`;
//! - tf2onnx's (Keras LayerNormalization, batch-norm style): the same mean and variance,
//!   `s = γ / √(v + ε)`, `y = x·s + (β − mean·s)`;
//! - RMSNorm (T5): `x · 1/√(ReduceMean(x²) + ε) · γ`, or `x / √(…)`; in a float16 or
//!   bfloat16 model x cast to float32 first and the product cast back before `· γ` (T5's
//!   `hidden_states.to(torch.float32)`);
//! - `LayerNormalization(a + b)` where `a` and `b` are activations of the same shape (a
//!   residual connection), optionally `a = m + bias` with a 1-D constant bias.
//!
//! Produces: `LayerNormalization` (opset 17) for both targets, raising the opset import (a
//! channels-first one between two Transposes that move the channels last and back: the same
//! mean and variance of each position's channels, 1.8× faster than written out in ONNX Runtime
//! 1.32 on `[1, 96, 56, 56]`);
//! `RMSNormalization` (opset 23) for `Target::Onnx`, raising the import, and for `Target::Ort`
//! only in a model at opset 23 already (`build_rms_norm` says why); for `Target::Ort`, the
//! residual Adds as one `Sum` (see `build_residual_sum` for why not `com.microsoft`
//! SkipLayerNormalization). A normalization whose model cannot be raised far enough stays
//! written out, in the canonical form ONNX Runtime fuses when it loads the model.
//! Safe because: every reduction must be over the last axis only (`axes` is `[-1]` or
//! `[rank-1]` with the rank known), or both over axis 1 only with γ and β `[C, 1, …]` of x's
//! rank less one (broadcast along the channels, as the fused operator applies them after the
//! Transpose), with `keepdims` set, ε is a scalar constant, γ and β are 1-D (last axis)
//! constants of x's element type, the Casts of an fp16-safe export must widen x's float16 or
//! bfloat16 to float32 and narrow back to it (the fused operator computes in float32 inside,
//! `stash_type` 1; the written mean of a half LayerNorm is rounded to half, the fused one
//! not), a squared deviation must be the square of the same `d`, the mean tf2onnx
//! subtracts must be the mean its variance is taken around, and RMSNorm (no mean
//! subtraction) cannot match the LayerNorm pattern, which requires the `x - mean` node. A
//! chain reducing over any other axis is left alone (ONNX Runtime's own optimizer fuses it
//! and changes the result). tf2onnx's `x·s + (β − mean·s)` is `(x − mean)·s + β` rounded
//! differently: it loses digits to cancellation when |mean| ≫ the deviation, which the fused
//! operator does not.

use super::pattern::{
    add, any, constant, constant_where, div, either, int_attr_is, mul, op, pow, scalar, sub, unary,
    value, Match, Pat,
};
use super::{Built, Declined, Fusion, Rewrite, Rule, Target};
use crate::ir::{attr, DataType, DataTypeExt, PValue, Tensor, ValueId};

const LAYER_NORM_OPSET: i64 = 17;
const RMS_NORM_OPSET: i64 = 23;

pub struct LayerNormFusion {
    pub target: Target,
}

impl Fusion for LayerNormFusion {
    const NAME: &'static str = "fuse-layernorm";

    fn rules() -> Vec<Rule> {
        vec![
            Rule {
                kind: "layer-norm",
                pattern: layer_norm(),
                build: build_layer_norm,
            },
            Rule {
                kind: "layer-norm-tf",
                pattern: layer_norm_tf(),
                build: build_layer_norm,
            },
            Rule {
                kind: "rms-norm",
                pattern: rms_norm(),
                build: build_rms_norm,
            },
            Rule {
                kind: "residual-sum",
                pattern: residual_layer_norm(),
                build: build_residual_sum,
            },
        ]
    }

    fn target(&self) -> Target {
        self.target
    }
}

/// `ReduceMean(input)` over axes given as an attribute (before opset 18) or as a constant
/// input; the node is bound to `node` so the builder can check the axes.
fn reduce_mean(input: Pat, node: &'static str, axes: &'static str) -> Pat {
    let keepdims = |a: Option<&crate::proto::AttributeProto>| int_attr_is(a, 1, 1);
    either([
        op("ReduceMean", [input.clone()])
            .node(node)
            .attr("keepdims", keepdims),
        op("ReduceMean", [input, constant(axes)])
            .node(node)
            .attr("keepdims", keepdims),
    ])
}

fn is_scalar(t: &Tensor) -> bool {
    t.numel() == 1 && t.dtype().is_float()
}

fn is_vector(t: &Tensor) -> bool {
    t.dims().len() == 1 && t.dtype().is_float()
}

/// `√(v + ε)` with ε bound to `eps`.
fn std_dev(variance: Pat) -> Pat {
    unary("Sqrt", add(variance, constant_where("eps", is_scalar)))
}

/// `numerator / denominator` in the ways exporters write it.
fn divided_by(numerator: Pat, denominator: Pat) -> Pat {
    either([
        div(numerator.clone(), denominator.clone()),
        mul(numerator, div(scalar(1.0), denominator)),
    ])
}

/// `[C, 1, …, 1]`: parameters of a channels-first normalization.
fn is_channel_vector(t: &Tensor) -> bool {
    matches!(t.dims(), [_, ones @ ..] if !ones.is_empty() && ones.iter().all(|&d| d == 1))
        && t.dtype().is_float()
}

/// `normalized · γ (+ β)`, γ and β 1-D.
fn scaled(normalized: Pat) -> Pat {
    scaled_by(normalized, is_vector)
}

/// `normalized · γ (+ β)`, γ and β constants that satisfy `params`.
fn scaled_by(normalized: Pat, params: fn(&Tensor) -> bool) -> Pat {
    let times_gamma = mul(
        normalized.named("normalized"),
        constant_where("gamma", params),
    )
    .node("times_gamma");
    either([
        add(times_gamma.clone(), constant_where("beta", params)),
        times_gamma,
    ])
}

/// 1-D parameters, or `[C, 1, …]` ones (a channels-first LayerNorm's).
fn is_layer_norm_params(t: &Tensor) -> bool {
    is_vector(t) || is_channel_vector(t)
}

/// `v`, or `Cast(v)`: the widening to float32 of an fp16/bf16-safe export (torch's legacy
/// exporter casts `x - mean` of a half model to float before the variance; T5's RMSNorm casts
/// x); `build_*` checks the types.
fn widened(v: Pat) -> Pat {
    either([op("Cast", [v.clone()]).node("widen"), v])
}

/// `v`, or `Cast(v)` back to the input's type (after the division, before γ and β).
fn narrowed(v: Pat) -> Pat {
    either([op("Cast", [v.clone()]).node("narrow"), v])
}

fn layer_norm() -> Pat {
    let mean = reduce_mean(value("x"), "mean", "mean_axes").anchor();
    let d = sub(value("x"), mean).named("d");
    let variance = reduce_mean(
        pow(widened(value("d")), scalar(2.0)),
        "variance",
        "variance_axes",
    );
    scaled_by(
        narrowed(divided_by(widened(d), std_dev(variance))),
        is_layer_norm_params,
    )
}

/// tf2onnx's LayerNorm: `s = γ · 1/√(v + ε)`, `x·s + (β − mean·s)`.
fn layer_norm_tf() -> Pat {
    let mean = reduce_mean(value("x"), "mean", "mean_axes")
        .anchor()
        .named("mean");
    let d = sub(value("x"), mean).named("d");
    let variance = reduce_mean(pow(d, scalar(2.0)), "variance", "variance_axes");
    let s = mul(
        div(scalar(1.0), std_dev(variance)),
        constant_where("gamma", is_vector),
    )
    .named("s");
    add(
        mul(value("x"), s),
        sub(
            constant_where("beta", is_vector),
            mul(value("mean"), value("s")),
        ),
    )
}

fn rms_norm() -> Pat {
    let mean_square = reduce_mean(
        pow(widened(value("x")), scalar(2.0)),
        "variance",
        "variance_axes",
    )
    .anchor();
    scaled(narrowed(divided_by(
        widened(value("x")),
        std_dev(mean_square),
    )))
}

fn residual_layer_norm() -> Pat {
    let sum = either([
        add(
            add(value("a"), constant_where("bias", is_vector)).named("biased"),
            value("b"),
        ),
        add(value("a"), value("b")),
    ])
    .named("sum");
    either([
        op(
            "LayerNormalization",
            [sum.clone(), value("gamma"), value("beta")],
        )
        .node("ln"),
        op("LayerNormalization", [sum, value("gamma")]).node("ln"),
    ])
}

/// The ReduceMean bound to `node` must reduce over the last axis of `x` only.
fn reduces_last_axis(m: &Match, rw: &Rewrite, node: &'static str, axes: &'static str) -> Built {
    let id = m.node(node).ok_or(Declined::Missing(node))?;
    let not_last = || Declined::NotProven(format!("the {node} ReduceMean is over the last axis"));
    let g = rw.graph;
    let axes = reduced_axes(m, rw, node, axes).ok_or_else(not_last)?;
    let rank = g
        .node(id)
        .input(0)
        .and_then(|v| g.value_type(v))
        .and_then(|t| t.rank());
    let last = match axes.as_slice() {
        [-1] => true,
        [a] => rank.is_some_and(|r| *a == r as i64 - 1),
        _ => false,
    };
    last.then_some(()).ok_or_else(not_last)
}

/// The match's types must let one operator replace it: γ and β have x's element type,
/// and either no Cast was matched, or x is float16/bfloat16, widened to float32 (`widen`) and
/// narrowed back to its own type (`narrow`), as the normalization operators compute
/// internally (`stash_type` 1, their default).
fn types_fit(m: &Match, rw: &Rewrite) -> Built {
    let g = rw.graph;
    let elem = |v: Option<ValueId>| v.and_then(|v| g.value_type(v)).map(|t| t.elem);
    let x = elem(m.value("x"));
    let params_fit = [m.value("gamma"), m.value("beta")]
        .into_iter()
        .flatten()
        .all(|p| elem(Some(p)) == x && x.is_some());
    let to = |name| {
        m.node(name)
            .and_then(|n| attr::get_int(&g.node(n).proto, "to"))
    };
    let half = [DataType::Float16 as i64, DataType::Bfloat16 as i64];
    let casts_fit = match (to("widen"), to("narrow")) {
        (None, None) => m.node("widen").is_none() && m.node("narrow").is_none(),
        (Some(w), Some(n)) => {
            w == DataType::Float as i64
                && x.is_some_and(|x| half.contains(&(x as i64)) && n == x as i64)
        }
        _ => false,
    };
    (params_fit && casts_fit).then_some(()).ok_or_else(|| {
        Declined::NotProven("γ and β in x's type, any Casts from half to float32 and back".into())
    })
}

/// ε, a constant of one float (`is_scalar` checked it).
fn epsilon(m: &Match, rw: &Rewrite) -> std::result::Result<f32, Declined> {
    let eps = rw.constant_of(m.get("eps")?)?;
    Ok(eps.scalar_f64().unwrap_or_default() as f32)
}

/// The axes of the ReduceMean bound to `node`: its constant input, or its attribute.
fn reduced_axes(
    m: &Match,
    rw: &Rewrite,
    node: &'static str,
    axes: &'static str,
) -> Option<Vec<i64>> {
    match m.value(axes) {
        Some(v) => rw.graph.constant(v)?.to_i64_vec().ok(),
        None => attr::get_ints(&rw.graph.node(m.node(node)?).proto, "axes").map(<[i64]>::to_vec),
    }
}

/// For a LayerNorm over the channels (axis 1) of `x` `[N, C, …]`, with γ and β `[C, 1, …]` of
/// x's rank less one: the rank. `None` for any other LayerNorm.
fn channels_first(m: &Match, rw: &Rewrite) -> Option<usize> {
    let g = rw.graph;
    let x_dims = g.value_type(m.value("x")?)?.shape?;
    let rank = x_dims.len();
    let channels = x_dims.get(1)?.value()?;
    let over_channels = [("mean", "mean_axes"), ("variance", "variance_axes")]
        .into_iter()
        .all(|(node, axes)| reduced_axes(m, rw, node, axes).as_deref() == Some(&[1][..]));
    let params_fit = [m.value("gamma"), m.value("beta")]
        .into_iter()
        .flatten()
        .all(|p| {
            g.constant(p).is_some_and(|t| {
                is_channel_vector(&t) && t.dims().len() == rank - 1 && t.dims()[0] == channels
            })
        });
    (rank >= 3 && over_channels && params_fit).then_some(rank)
}

/// The channels-first LayerNorm of the match: `Transpose(LayerNormalization(Transpose(x)))`,
/// the channels moved last and back, γ and β as `[C]`.
fn build_channels_first(m: &Match, rw: &mut Rewrite, rank: usize, epsilon: f32) -> Built {
    let x = m.get("x")?;
    let to_last: Vec<i64> = std::iter::once(0)
        .chain(2..rank as i64)
        .chain(std::iter::once(1))
        .collect();
    let back: Vec<i64> = std::iter::once(0)
        .chain(std::iter::once(rank as i64 - 1))
        .chain(1..rank as i64 - 1)
        .collect();
    let moved = rw.op(
        "Transpose",
        "",
        &[x.into()],
        vec![attr::ints("perm", &to_last)],
    );
    let mut inputs = vec![moved];
    for name in ["gamma", "beta"] {
        let Some(p) = m.value(name) else { continue };
        let t = rw.constant_of(p)?;
        let bytes = t.raw_bytes().ok_or(Declined::NotConstant(name.into()))?;
        let flat = Tensor::from_raw(name, t.dtype(), &t.dims()[..1], bytes.into_owned().into())
            .map_err(|e| Declined::NotProven(e.to_string()))?;
        inputs.push(rw.constant(name, flat));
    }
    let normalized = rw.op(
        "LayerNormalization",
        "",
        &inputs,
        vec![attr::int("axis", -1), attr::float("epsilon", epsilon)],
    );
    let out = rw.op(
        "Transpose",
        "",
        &[normalized],
        vec![attr::ints("perm", &back)],
    );
    let root = rw.root_of(m)?;
    rw.replace(root, out);
    Ok(())
}

fn build_layer_norm(m: &Match, rw: &mut Rewrite) -> Built {
    types_fit(m, rw)?;
    if let Some(rank) = channels_first(m, rw) {
        rw.require_opset(LAYER_NORM_OPSET)?;
        let epsilon = epsilon(m, rw)?;
        return build_channels_first(m, rw, rank, epsilon);
    }
    reduces_last_axis(m, rw, "mean", "mean_axes")?;
    reduces_last_axis(m, rw, "variance", "variance_axes")?;
    let vectors = [m.value("gamma"), m.value("beta")]
        .into_iter()
        .flatten()
        .all(|p| rw.graph.constant(p).is_some_and(|t| is_vector(&t)));
    if !vectors {
        return Err(Declined::NotProven(
            "γ and β 1-D for a LayerNorm over the last axis".into(),
        ));
    }
    rw.require_opset(LAYER_NORM_OPSET)?;
    let epsilon = epsilon(m, rw)?;
    let x = m.get("x")?;
    // The LayerNormalization of x that `tail` (`· γ (+ β)`) ends with replaces the tail's root.
    let replace_tail = |rw: &mut Rewrite, tail: &Match| -> Built {
        let mut inputs: Vec<PValue> = vec![x.into(), tail.get("gamma")?.into()];
        inputs.extend(tail.value("beta").map(PValue::from));
        let out = rw.op(
            "LayerNormalization",
            "",
            &inputs,
            vec![attr::int("axis", -1), attr::float("epsilon", epsilon)],
        );
        let root = rw.root_of(tail)?;
        rw.replace(root, out);
        Ok(())
    };
    replace_tail(rw, m)?;
    // GPT-NeoX normalizes one input twice (its parallel attention and MLP), with the same ε:
    // CSE leaves one normalization read by two `· γ (+ β)` tails. Each tail gets its own
    // LayerNormalization; any other reader keeps the match open, and the driver declines it.
    for tail in sibling_tails(m, rw) {
        for &node in tail.nodes() {
            rw.absorb(node);
        }
        replace_tail(rw, &tail)?;
    }
    Ok(())
}

/// The other `normalized · γ' (+ β')` tails (γ', β' of x's type) reading the normalization
/// the match computes.
fn sibling_tails(m: &Match, rw: &Rewrite) -> Vec<Match> {
    let g = rw.graph;
    let (Some(normalized), Some(own)) = (m.value("normalized"), m.node("times_gamma")) else {
        return Vec::new();
    };
    let x = m.value("x").and_then(|x| g.value_type(x)).map(|t| t.elem);
    let tail = |v: ValueId| {
        scaled(any()).matches(g, v).into_iter().find(|t| {
            t.value("normalized") == Some(normalized)
                && [t.value("gamma"), t.value("beta")]
                    .into_iter()
                    .flatten()
                    .all(|p| g.value_type(p).map(|t| t.elem) == x)
        })
    };
    g.uses(normalized)
        .iter()
        .filter(|(reader, _)| *reader != own && g.node(*reader).is("Mul"))
        .filter_map(|(reader, _)| {
            let product = g.node(*reader).output(0)?;
            // The longest tail: through the Add of β when the product's only reader is one.
            let with_beta = match g.uses(product) {
                [(add, _)] if g.node(*add).is("Add") => g.node(*add).output(0).and_then(tail),
                _ => None,
            };
            with_beta.or_else(|| tail(product))
        })
        .collect()
}

/// RMSNorm as ONNX `RMSNormalization` (opset 23).
///
/// For ONNX Runtime only where the model is at opset 23 already: releases before 1.22 cannot
/// load an opset-23 model, and no other RMSNorm operator loads both in ONNX Runtime and in
/// `onnx.checker` (checked with ONNX Runtime 1.32 and onnx 1.23.2, opsets 11 to 17: ONNX
/// Runtime's own `SimplifiedLayerNormalization` lives in the default domain, where the checker
/// refuses it at every opset, and ONNX Runtime refuses it in `com.microsoft`). Below opset 23
/// the RMSNorm stays written out, in the canonical form (`Pow(x, 2)`, `Div(1, ·)`) that ONNX
/// Runtime's SimplifiedLayerNormFusion turns into SimplifiedLayerNormalization when it loads
/// the model, every release since 1.x: the same kernel as if we had written it. Nor
/// `com.microsoft` SkipSimplifiedLayerNormalization for a residual Add + RMSNorm (which both
/// load): ONNX Runtime 1.32 runs it slower than Add + SimplifiedLayerNormalization (one
/// thread, twelve residual RMSNorms, median of 60 interleaved runs: 0.66 against 0.37 ms at
/// 1×128×512, 0.09 against 0.05 ms at 1×16×512, 1.03 against 0.60 ms at 2×64×768, 18.0
/// against 17.2 ms at 8×128×768; only 4×128×768 favoured it, 8.7 against 9.8 ms).
fn build_rms_norm(m: &Match, rw: &mut Rewrite) -> Built {
    if m.value("beta").is_some() {
        return Err(Declined::Mismatch("an RMSNorm has no β".into()));
    }
    types_fit(m, rw)?;
    reduces_last_axis(m, rw, "variance", "variance_axes")?;
    if rw.target == Target::Ort && rw.opset < RMS_NORM_OPSET {
        // Written out, ONNX Runtime fuses it when it loads the model (see above).
        return Err(Declined::LeftToRuntime(
            "below opset 23 ONNX Runtime fuses it into SimplifiedLayerNormalization when it \
             loads the model",
        ));
    }
    rw.require_opset(RMS_NORM_OPSET)?;
    let epsilon = epsilon(m, rw)?;
    let out = rw.op(
        "RMSNormalization",
        "",
        &[m.get("x")?.into(), m.get("gamma")?.into()],
        vec![attr::int("axis", -1), attr::float("epsilon", epsilon)],
    );
    let root = rw.root_of(m)?;
    rw.replace(root, out);
    Ok(())
}

/// Residual Add (+ bias) + LayerNormalization, ONNX Runtime only: the Adds become one `Sum`
/// read by the same LayerNormalization, and by whatever else read the residual sum.
///
/// Why not `com.microsoft` SkipLayerNormalization: ONNX Runtime's CPU kernel for it (1.32)
/// is a scalar loop, while its LayerNormalization and Sum are vectorized. On all-MiniLM-L6-v2
/// at 8×128 tokens, two threads (`scripts/ort_profile.py`): 1.34 ms a SkipLayerNormalization
/// (in ONNX Runtime's own fusion of its `quantize_dynamic` output), 0.49 ms a Sum +
/// LayerNormalization pair (in ours); twelve of them are 10% of the float model's latency.
/// `Sum` rather than `Add`, because ONNX
/// Runtime's own SkipLayerNormFusion turns `Add` + LayerNormalization back into the scalar
/// kernel when it loads the model (it matches `Add` only).
/// Safe because `Sum` is the same additions (`a + bias + b`, in that order) with the same
/// broadcasting, and the LayerNormalization keeps its attributes.
fn build_residual_sum(m: &Match, rw: &mut Rewrite) -> Built {
    rw.require_ort()?;
    let g = rw.graph;
    let ln = g.node(m.node("ln").ok_or(Declined::Missing("ln"))?);
    let (a, b) = (m.get("a")?, m.get("b")?);
    if g.constant(a).is_some() || g.constant(b).is_some() {
        return Err(Declined::Mismatch(
            "a constant summand is a bias, not a residual".into(),
        ));
    }
    let summands: Vec<PValue> = [Some(a), m.value("bias"), Some(b)]
        .into_iter()
        .flatten()
        .map(PValue::from)
        .collect();
    let total = rw.op("Sum", "", &summands, vec![]);
    let scale_and_shift = ln.inputs.iter().skip(1).flatten().map(|&v| PValue::from(v));
    let normalized = rw.op(
        "LayerNormalization",
        "",
        &std::iter::once(total)
            .chain(scale_and_shift)
            .collect::<Vec<_>>(),
        ln.proto.attribute.clone(),
    );
    rw.replace(rw.root_of(m)?, normalized);
    rw.replace(m.get("sum")?, total);
    Ok(())
}
