//! Rotary position embedding (RoPE) fusion.
//!
//! Matches HF's `rotate_half` RoPE as torch's dynamo (opset 20) and legacy exporters write it
//! for Llama, Qwen2/3, Mistral, Phi-3 and Gemma:
//! `y = x·cos + Concat(−x[..., h:], x[..., :h])·sin` with `x` of `[batch, heads, seq, head]`
//! and `h = head/2` (the halves as Slices of constant bounds over the last axis), where
//! `cos = Unsqueeze(Cos(e), [1])` (and `sin` likewise), optionally `Cos(e)·s` with the same
//! scalar `s` on both (HF's `attention_scaling`, written out by the legacy exporter),
//! `e = Concat(f, f)` over the last axis and `f = Cast(positions)·inv_freq`: integer positions
//! `[batch | 1, seq, 1]` times a constant of `h` frequencies.
//!
//! Produces, for `x`: `com.microsoft::RotaryEmbedding` (`Target::Ort`) or the standard
//! `RotaryEmbedding` (`Target::Onnx`, only in a model at opset 23 already: the opset-23
//! exporters write it themselves), with `position_ids` and the `[rows, h]` caches computed in
//! the graph from the positions the model was given: rows `min..=max` of them (and as many
//! as the sequence has tokens at least, as ONNX Runtime's kernels want), positions
//! shifted by the min and expanded to `x`'s batch (the operators' contract, `ops::rotary`).
//! The model's inputs and outputs do not change. The cos/sin chains stay for their other
//! readers and are removed as dead code once every RoPE is fused.
//!
//! Safe because: every bound is checked (the two halves of the last axis, steps 1, the
//! Concat and the Unsqueeze axes), both tables must come from the same `e` and the same scale,
//! `f` must be a product of integer positions (Cast to `x`'s float type, so the cast back to
//! int64 is exact) with one frequency per rotated pair, and the fused operators compute the
//! same products (`x₁·cos − x₂·sin`, `x₂·cos + x₁·sin`) on the same float32 angles: each cache
//! row is `Cast(p)·inv_freq` for the same integer `p`. Interleaved and partial rotary are not
//! matched (no exporter in the corpus writes them).

use super::pattern::{any, constant, constant_where, either, mul, op, unary, value, Match, Pat};
use super::{Built, Declined, Fusion, Rewrite, Rule, Target};
use crate::ir::{attr, DataType, DataTypeExt, PValue, Tensor, ValueId};
use crate::ops::rotary::{rotary_inputs, ROTARY_OPSET};
use crate::ops::MS_DOMAIN;

/// Shape with `start`/`end` attributes.
const SHAPE_SLICE_OPSET: i64 = 15;

pub struct RotaryFusion {
    pub target: Target,
}

impl Fusion for RotaryFusion {
    const NAME: &'static str = "fuse-rotary";

    fn rules() -> Vec<Rule> {
        vec![Rule {
            kind: "rotary-embedding",
            pattern: rope(),
            build: build_rotary,
        }]
    }

    fn target(&self) -> Target {
        self.target
    }
}

/// `Slice(x, starts, ends, axes[, steps])`, the node bound to `node`.
fn slice_of_x(node: &'static str) -> Pat {
    either([
        op("Slice", [value("x"), any(), any(), any()]).node(node),
        op("Slice", [value("x"), any(), any(), any(), any()]).node(node),
    ])
}

/// `x·cos + Concat(−x[..., h:], x[..., :h])·sin`.
fn rope() -> Pat {
    let rotated = op(
        "Concat",
        [unary("Neg", slice_of_x("high")), slice_of_x("low")],
    )
    .node("concat");
    super::pattern::add(mul(value("x"), value("cos")), mul(rotated, value("sin")))
}

fn is_scalar(t: &Tensor) -> bool {
    t.numel() == 1 && t.dtype().is_float()
}

/// `Unsqueeze(trig(Concat(f, f)) [· scale], axes)` with `f = Cast(positions) · inv_freq`.
fn table(trig: &'static str) -> Pat {
    let freqs = mul(
        op("Cast", [value("positions")]).named("positions_float"),
        constant("inv_freq"),
    )
    .named("freqs");
    let angles = op("Concat", [freqs, value("freqs")])
        .named("angles")
        .node("angles_concat");
    let values = either([
        unary(trig, angles.clone()),
        mul(unary(trig, angles), constant_where("scale", is_scalar)),
    ]);
    op("Unsqueeze", [values, constant("unsqueeze_axes")])
}

/// What the cos and sin tables share: the angles' positions, frequencies and scale.
struct Table {
    angles: ValueId,
    positions_float: ValueId,
    inv_freq: Vec<f32>,
    scale: Option<f64>,
}

fn read_table(m: &Match, rw: &Rewrite, name: &'static str, trig: &'static str) -> Option<Table> {
    let g = rw.graph;
    let found = table(trig).matches(g, m.value(name)?);
    let t = found.first()?;
    let axes = g.constant(t.value("unsqueeze_axes")?)?.to_i64_vec().ok()?;
    let concat = g.node(t.node("angles_concat")?);
    let concat_axis = attr::get_int(&concat.proto, "axis")?;
    let angles = t.value("angles")?;
    let rank = g.value_type(angles)?.rank()?;
    if axes != [1] || rank != 3 || !(concat_axis == -1 || concat_axis == 2) {
        return None;
    }
    let scale = match t.value("scale") {
        Some(s) => Some(g.constant(s)?.scalar_f64()?),
        None => None,
    };
    let inv_freq = g.constant(t.value("inv_freq")?)?;
    let dims = inv_freq.dims();
    if !dims.iter().rev().skip(1).all(|&d| d == 1) {
        return None;
    }
    Some(Table {
        angles,
        positions_float: t.value("positions_float")?,
        inv_freq: inv_freq.to_f32_vec().ok()?,
        scale,
    })
}

/// `Slice` over the last axis of a rank-4 value from `start` to `end` (or past it when
/// `open_end`: the exporters write i64::MAX), with step 1.
fn is_half(
    rw: &Rewrite,
    m: &Match,
    node: &'static str,
    start: i64,
    end: i64,
    open_end: bool,
) -> bool {
    let g = rw.graph;
    let Some(n) = m.node(node).map(|id| g.node(id)) else {
        return false;
    };
    let ints = |slot: usize| -> Option<Vec<i64>> {
        match n.input(slot) {
            Some(v) => g.constant(v)?.to_i64_vec().ok(),
            None => Some(vec![1]),
        }
    };
    let (Some(starts), Some(ends), Some(axes), Some(steps)) = (ints(1), ints(2), ints(3), ints(4))
    else {
        return false;
    };
    let end_ok = match ends[..] {
        [e] => e == end || (open_end && e > end),
        _ => false,
    };
    starts == [start] && end_ok && (axes == [-1] || axes == [3]) && steps == [1]
}

fn int64_constant(rw: &mut Rewrite, hint: &str, dims: &[i64], values: &[i64]) -> Option<PValue> {
    Some(rw.constant(hint, Tensor::from_i64(hint, dims, values).ok()?))
}

fn build_rotary(m: &Match, rw: &mut Rewrite) -> Built {
    if rw.target == Target::Onnx {
        rw.require_opset(ROTARY_OPSET)?;
    }
    rotary(m, rw).ok_or_else(|| {
        Declined::NotProven(
            "the rotate_half halves, the cos/sin tables from inv_freq and the positions, or \
             the head layout"
                .into(),
        )
    })
}

/// The RotaryEmbedding replacing the match, `None` where a part does not have the form the
/// operator computes.
fn rotary(m: &Match, rw: &mut Rewrite) -> Option<()> {
    let g = rw.graph;
    let x = m.value("x")?;
    let x_type = g.value_type(x)?;
    let x_dims = x_type.shape.clone()?;
    let [batch, _heads, seq, head] = &x_dims[..] else {
        return None;
    };
    let head = head.value()?;
    let half = head / 2;
    if head % 2 != 0 || rw.opset < SHAPE_SLICE_OPSET {
        return None;
    }
    let concat_axis = attr::get_int(&g.node(m.node("concat")?).proto, "axis")?;
    if !(concat_axis == -1 || concat_axis == 3)
        || !is_half(rw, m, "low", 0, half, false)
        || !is_half(rw, m, "high", half, head, true)
    {
        return None;
    }
    let cos = read_table(m, rw, "cos", "Cos")?;
    let sin = read_table(m, rw, "sin", "Sin")?;
    let same_scale = match (cos.scale, sin.scale) {
        (None, None) => true,
        (Some(a), Some(b)) => a == b,
        _ => false,
    };
    if cos.angles != sin.angles || !same_scale || cos.inv_freq.len() as i64 != half {
        return None;
    }
    // Integer positions `[batch | 1, seq, 1]`, cast to x's float type.
    let float_type = g.value_type(cos.positions_float)?;
    let cast = g.node(g.producer(cos.positions_float)?);
    let int_type = g.value_type(cast.input(0)?)?;
    let integer = [DataType::Int64 as i32, DataType::Int32 as i32].contains(&int_type.elem);
    let positions_dims = float_type.shape?;
    let [p_batch, p_seq, one] = &positions_dims[..] else {
        return None;
    };
    let angles_type = g.value_type(cos.angles)?;
    if !integer
        || float_type.elem != x_type.elem
        || angles_type.elem != x_type.elem
        || one.value() != Some(1)
        || !p_seq.same(seq)
    {
        return None;
    }
    let expand_batch = if p_batch.same(batch) {
        false
    } else if p_batch.value() == Some(1) {
        true
    } else {
        return None;
    };
    let contrib = match rw.target {
        Target::Ort => true,
        Target::Onnx if rw.opset >= ROTARY_OPSET => false,
        Target::Onnx => return None,
    };
    let (scale, inv_freq) = (cos.scale, cos.inv_freq);
    let positions_float = cos.positions_float;

    // position_ids: [batch | 1, seq] int64, shifted by their min.
    let int64 = attr::int("to", DataType::Int64 as i64);
    let positions = rw.op("Cast", "", &[positions_float.into()], vec![int64]);
    let last_axis = int64_constant(rw, "rotary_last_axis", &[1], &[2])?;
    let positions = rw.op("Squeeze", "", &[positions, last_axis], vec![]);
    let keep_none = || vec![attr::int("keepdims", 0)];
    let low = rw.op("ReduceMin", "", &[positions], keep_none());
    let high = rw.op("ReduceMax", "", &[positions], keep_none());
    let one = int64_constant(rw, "rotary_one", &[], &[1])?;
    let mut ids = rw.op("Sub", "", &[positions, low], vec![]);
    if expand_batch {
        let x_batch = rw.op(
            "Shape",
            "",
            &[x.into()],
            vec![attr::int("start", 0), attr::int("end", 1)],
        );
        let one_1d = int64_constant(rw, "rotary_one_1d", &[1], &[1])?;
        let shape = rw.op("Concat", "", &[x_batch, one_1d], vec![attr::int("axis", 0)]);
        ids = rw.op("Expand", "", &[ids, shape], vec![]);
    }
    // The caches: rows low..=high, each Cast(p)·inv_freq as the model computes it, and at
    // least as many rows as x has tokens: ONNX Runtime's kernels refuse fewer ("Updating
    // cos_cache and sin_cache in RotaryEmbedding is not currently supported") whatever the
    // positions, e.g. repeated ones. Rows past `high` are never read.
    let past_high = rw.op("Add", "", &[high, one], vec![]);
    let tokens = rw.op(
        "Shape",
        "",
        &[x.into()],
        vec![attr::int("start", 2), attr::int("end", 3)],
    );
    let first_axis = int64_constant(rw, "rotary_first_axis", &[1], &[0])?;
    let tokens = rw.op("Squeeze", "", &[tokens, first_axis], vec![]);
    let low_plus_tokens = rw.op("Add", "", &[low, tokens], vec![]);
    let end = rw.op("Max", "", &[past_high, low_plus_tokens], vec![]);
    let rows = rw.op("Range", "", &[low, end, one], vec![]);
    let rows = rw.op(
        "Cast",
        "",
        &[rows],
        vec![attr::int("to", x_type.elem.into())],
    );
    let column = int64_constant(rw, "rotary_column", &[1], &[1])?;
    let rows = rw.op("Unsqueeze", "", &[rows, column], vec![]);
    let freq = rw.constant(
        "rotary_inv_freq",
        Tensor::from_f32("rotary_inv_freq", &[half], &inv_freq).ok()?,
    );
    let angles = rw.op("Mul", "", &[rows, freq], vec![]);
    let mut caches = [
        rw.op("Cos", "", &[angles], vec![]),
        rw.op("Sin", "", &[angles], vec![]),
    ];
    if let Some(s) = scale {
        let s = rw.constant(
            "rotary_scale",
            Tensor::from_f32("rotary_scale", &[], &[s as f32]).ok()?,
        );
        for cache in &mut caches {
            *cache = rw.op("Mul", "", &[*cache, s], vec![]);
        }
    }
    let inputs = rotary_inputs(contrib, x.into(), ids, caches[0], caches[1]);
    let out = if contrib {
        rw.op("RotaryEmbedding", MS_DOMAIN, &inputs, vec![])
    } else {
        rw.op("RotaryEmbedding", "", &inputs, vec![])
    };
    let root = g.node(*m.nodes().first()?).output(0)?;
    rw.replace(root, out);
    Some(())
}
