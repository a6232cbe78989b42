//! Rotary position embedding (RoPE) fusion.
//!
//! Matches HF's `rotate_half` RoPE as torch's dynamo (opset 20) and legacy exporters write it
//! for Llama, Qwen2/3, Mistral, Phi-3 and Gemma:
//! `y = x·cos + Concat(−x[..., h:], x[..., :h])·sin` with `x` of `[batch, heads, seq, head]`
//! and `h = head/2` (the halves as Slices of constant bounds over the last axis), where the
//! tables come in one of two forms:
//! - computed: `cos = Unsqueeze(Cos(e), [1])` (and `sin` likewise), optionally `Cos(e)·s`
//!   with the same scalar `s` on both (HF's `attention_scaling`, written out by the legacy
//!   exporter), `e = Concat(f, f)` over the last axis and `f` the angles of integer positions:
//!   `Cast(positions)·inv_freq` with positions `[batch | 1, seq, 1]` and a constant of `h`
//!   frequencies (transformers ≥ 4.48 through dynamo), or
//!   `Transpose(Expand(inv_freq[1, h, 1])·Cast(positions[batch, 1, seq]), [0, 2, 1])` (the
//!   Expand folded away when the positions' batch is 1, or folded into a `[batch, h, 1]`
//!   constant of equal rows where the export fixed the batch, as torch 2.6's does)
//!   (transformers 4.38–4.47's `inv_freq_expanded @ position_ids_expanded`, through the legacy
//!   exporter and Optimum);
//! - cached: `cos = Unsqueeze(Gather(Slice(cos_table, 0, n, axis 0) | cos_table,
//!   position_ids), [1])` with a constant `[rows, head]` table whose two halves are equal (transformers ≤ 4.37's
//!   `cos_cached[:seq_len][position_ids]`, and Qwen2 until 4.45);
//! - sliced: `cos = Slice(cos_table, 0, n, axis 2)` of a constant `[1, 1, rows, head]` table
//!   whose two halves are equal, with no positions at all (ESM-2's cached tables, which the
//!   legacy exporter bakes in from the export's own length: token `i` reads row `i`).
//!
//! Produces, for `x`: `com.microsoft::RotaryEmbedding` (`Target::Ort`) or the standard
//! `RotaryEmbedding` (`Target::Onnx`, only in a model at opset 23 already: the opset-23
//! exporters write it themselves), with `position_ids` and `[rows, h]` caches. Computed
//! tables: the caches are computed in the graph from the positions the model was given, one
//! row per token (the positions flattened), and the ids number the tokens, expanded to `x`'s
//! batch (the operators' contract, `ops::rotary`). Cached tables: the caches are the tables'
//! first halves and the positions are the Gather's indices. Sliced tables: the same caches,
//! and the ids `Expand(Range(0, n′), [batch, seq])` for the sliced length `n′`, which is
//! what the original's broadcast of its `[1, 1, n′, head]` rows against `x` reads (row `i`
//! for token `i` when `n′ = seq`, row 0 for every token when `n′ = 1`; any other length both
//! refuse). The model's inputs and outputs
//! do not change. The cos/sin chains stay for their other readers and are removed as dead
//! code once every RoPE is fused.
//!
//! Safe because: every bound is checked (the two halves of the last axis, steps 1, the
//! Concat and the Unsqueeze axes), both tables must come from the same `e` and the same scale
//! (or the same positions), `f` must be a product of integer positions (Cast to `x`'s float
//! type, so the cast back to int64 is exact) with one frequency per rotated pair (a product
//! of one term, which a MatMul computes exactly), and the fused operators compute the same
//! products (`x₁·cos − x₂·sin`, `x₂·cos + x₁·sin`) on the same float32 angles: each cache
//! row is `Cast(p)·inv_freq` for the same integer `p`, or the table row the Gather read. A
//! cached table's Slice only bounds which positions the original accepts: a position it
//! refuses (past the slice) the fused operator reads from the full table, and one past the
//! table both refuse. Negative positions (which Gather counts from the end) the fused
//! operator refuses. Partial rotary (Phi-2, Phi-3.5, GPT-NeoX: the first part of each head
//! rotated, the rest concatenated after) fuses on its rotated slice, which is `x`.
//!
//! Interleaved pairs (GPT-J, CodeGen: `x[..., ::2]`, `x[..., 1::2]`) are the second rule,
//! `interleaved`.

mod interleaved;

use super::pattern::{
    any, constant, constant_where, either, int_attr_is, mul, op, perm_is, unary, value, Match, Pat,
};
use super::{Built, Declined, Fusion, Rewrite, Rule, Target};
use crate::ir::{attr, DataType, DataTypeExt, Dim, Graph, Node, PValue, Tensor, ValueId};
use crate::ops::rotary::{rotary_inputs, ROTARY_OPSET};
use crate::ops::MS_DOMAIN;
use crate::proto::AttributeProto;

pub struct RotaryFusion {
    pub target: Target,
}

impl Fusion for RotaryFusion {
    const NAME: &'static str = "fuse-rotary";

    fn rules() -> Vec<Rule> {
        vec![
            Rule {
                kind: "rotary-embedding",
                pattern: rope(),
                build: build_rotary,
            },
            Rule {
                kind: "rotary-embedding-interleaved",
                pattern: interleaved::rope_interleaved(),
                build: build_interleaved,
            },
        ]
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

/// The angles `f` of integer positions: `Cast(positions) · inv_freq` (positions
/// `[batch, seq, 1]`), or `Transpose(Expand(inv_freq) · Cast(positions), [0, 2, 1])`
/// (positions `[batch, 1, seq]`, a product of one term per element).
fn freqs() -> Pat {
    let positions_float = || op("Cast", [value("positions")]).named("positions_float");
    // The Expand to the positions' batch is folded away where that batch is a constant 1.
    let by_matmul = op(
        "MatMul",
        [
            either([
                op("Expand", [constant("inv_freq"), any()]),
                constant("inv_freq"),
            ]),
            positions_float(),
        ],
    );
    either([
        mul(positions_float(), constant("inv_freq")),
        op("Transpose", [by_matmul]).attr("perm", |a| perm_is(a, &[0, 2, 1])),
    ])
    .named("freqs")
}

/// `Unsqueeze(trig(Concat(f, f)) [· scale], axes)`, or
/// `Unsqueeze(Gather(Slice(table, …) | table, positions), axes)`.
fn table(trig: &'static str) -> Pat {
    let angles = op("Concat", [freqs(), value("freqs")])
        .named("angles")
        .node("angles_concat");
    let computed = either([
        unary(trig, angles.clone()),
        mul(unary(trig, angles), constant_where("scale", is_scalar)),
    ]);
    let rows = either([
        op("Slice", [constant("table"), any(), any(), any()]).node("table_slice"),
        op("Slice", [constant("table"), any(), any(), any(), any()]).node("table_slice"),
        constant("table"),
    ]);
    let cached = op("Gather", [rows, value("positions")])
        .attr("axis", |a| int_attr_is(a, 0, 0))
        .named("gathered");
    let sliced = either([
        op(
            "Slice",
            [constant("table"), any(), value("rows_end"), any()],
        ),
        op(
            "Slice",
            [constant("table"), any(), value("rows_end"), any(), any()],
        ),
    ])
    .named("sliced")
    .node("table_slice");
    either([
        op(
            "Unsqueeze",
            [either([computed, cached]), constant("unsqueeze_axes")],
        ),
        sliced,
    ])
}

/// Where a pair of tables comes from.
enum Source {
    /// Computed from the positions: what the cos and sin tables share is their angles,
    /// positions, frequencies and scale.
    Computed {
        angles: ValueId,
        positions_float: ValueId,
        /// The axis of `positions_float` that is 1 (2 for `[batch, seq, 1]`, 1 for
        /// `[batch, 1, seq]`).
        unit_axis: usize,
        inv_freq: Vec<f32>,
        scale: Option<f64>,
    },
    /// Rows of a constant `[rows, head]` table picked by integer positions `[batch | 1, seq]`.
    Cached { table: ValueId, positions: ValueId },
    /// The first rows of a constant `[1, 1, rows, head]` table, up to `rows_end`: `sliced`
    /// `[1, 1, n′, head]`.
    Sliced {
        table: ValueId,
        sliced: ValueId,
        rows_end: ValueId,
    },
}

fn read_table(m: &Match, rw: &Rewrite, name: &'static str, trig: &'static str) -> Option<Source> {
    let g = rw.graph;
    let found = table(trig).matches(g, m.value(name)?);
    let t = found.first()?;
    if t.value("sliced").is_some() {
        return read_sliced(t, rw);
    }
    let axes = g.constant(t.value("unsqueeze_axes")?)?.to_i64_vec().ok()?;
    if axes != [1] {
        return None;
    }
    if t.value("gathered").is_some() {
        return read_cached(t, rw);
    }
    let concat = g.node(t.node("angles_concat")?);
    let concat_axis = attr::get_int(&concat.proto, "axis")?;
    let angles = t.value("angles")?;
    let rank = g.value_type(angles)?.rank()?;
    if rank != 3 || !(concat_axis == -1 || concat_axis == 2) {
        return None;
    }
    let scale = match t.value("scale") {
        Some(s) => Some(g.constant(s)?.scalar_f64()?),
        None => None,
    };
    let inv_freq = g.constant(t.value("inv_freq")?)?;
    let positions_float = t.value("positions_float")?;
    let freqs_node = g.node(g.producer(t.value("freqs")?)?);
    // Mul: frequencies along the last axis ([h] or [1, …, h]); MatMul: along the rows of a
    // [1, h, 1] (or [h, 1]) column.
    let (dims, unit_axis) = if freqs_node.is("Transpose") {
        (inv_freq.dims().strip_suffix(&[1])?, 1)
    } else {
        (inv_freq.dims(), 2)
    };
    // One frequency per rotated pair; a constant already expanded along a batch (torch 2.6's
    // export folds the Expand where it fixed the batch) repeats the same row.
    let half = usize::try_from(*dims.last()?).ok()?;
    let values = inv_freq.to_f32_vec().ok()?;
    let row = values.get(..half)?;
    if half == 0 || !values.chunks(half).all(|r| r == row) {
        return None;
    }
    Some(Source::Computed {
        angles,
        positions_float,
        unit_axis,
        inv_freq: row.to_vec(),
        scale,
    })
}

/// A cached table: a Slice (if any) keeps rows from 0 along axis 0, with step 1.
fn read_cached(t: &Match, rw: &Rewrite) -> Option<Source> {
    if t.node("table_slice").is_some() && !slices_rows_from_zero(t, rw, &[0])? {
        return None;
    }
    Some(Source::Cached {
        table: t.value("table")?,
        positions: t.value("positions")?,
    })
}

/// A sliced table: `[1, 1, rows, head]`, its rows kept from 0 along axis 2, with step 1.
fn read_sliced(t: &Match, rw: &Rewrite) -> Option<Source> {
    let table = t.value("table")?;
    let leading_ones = matches!(rw.graph.constant(table)?.dims(), [1, 1, _, _]);
    if !leading_ones || !slices_rows_from_zero(t, rw, &[2, -2])? {
        return None;
    }
    Some(Source::Sliced {
        table,
        sliced: t.value("sliced")?,
        rows_end: t.value("rows_end")?,
    })
}

/// Input `slot` of Slice node `slice` as constant ints, `[1]` where it is left out (the
/// steps' default).
fn slice_ints(g: &Graph, slice: &Node, slot: usize) -> Option<Vec<i64>> {
    match slice.input(slot) {
        Some(v) => g.constant(v)?.to_i64_vec().ok(),
        None => Some(vec![1]),
    }
}

/// Whether the match's `table_slice` starts at 0 with step 1 along one of `axes`.
fn slices_rows_from_zero(t: &Match, rw: &Rewrite, axes: &[i64]) -> Option<bool> {
    let g = rw.graph;
    let slice = g.node(t.node("table_slice")?);
    let ints = |slot| slice_ints(g, slice, slot);
    let (starts, sliced_axes, steps) = (ints(1)?, ints(3)?, ints(4)?);
    Some(starts == [0] && steps == [1] && matches!(sliced_axes[..], [a] if axes.contains(&a)))
}

/// `Slice` node `node` of the match over the last axis of a rank-4 value from `start` with
/// step `step`, up to `end` (or past it when `open_end`: the exporters write i64::MAX).
fn slices_last_axis(
    rw: &Rewrite,
    m: &Match,
    node: &'static str,
    (start, end, step): (i64, i64, i64),
    open_end: bool,
) -> bool {
    let g = rw.graph;
    let Some(n) = m.node(node).map(|id| g.node(id)) else {
        return false;
    };
    let ints = |slot| slice_ints(g, n, slot);
    let (Some(starts), Some(ends), Some(axes), Some(steps)) = (ints(1), ints(2), ints(3), ints(4))
    else {
        return false;
    };
    let end_ok = match ends[..] {
        [e] => e == end || (open_end && e > end),
        _ => false,
    };
    starts == [start] && end_ok && (axes == [-1] || axes == [3]) && steps == [step]
}

fn int64_constant(rw: &mut Rewrite, hint: &str, dims: &[i64], values: &[i64]) -> Option<PValue> {
    Some(rw.constant(hint, Tensor::from_i64(hint, dims, values).ok()?))
}

/// The opset from which Squeeze and Unsqueeze take their axes as an input, as the caches
/// and ids are built.
const AXES_INPUT_OPSET: i64 = 13;

/// The opset the fused form needs: the standard operator's, or for the contrib operator the
/// one its caches and ids are built in.
fn require_rotary_opset(rw: &mut Rewrite) -> Built {
    rw.require_opset(match rw.target {
        Target::Onnx => ROTARY_OPSET,
        Target::Ort => AXES_INPUT_OPSET,
    })
}

/// Whether the target's RotaryEmbedding is the contrib operator, `None` where the target has
/// none in this model (the standard one needs a model at opset 23 already).
fn contrib_operator(rw: &Rewrite) -> Option<bool> {
    match rw.target {
        Target::Ort => Some(true),
        Target::Onnx if rw.opset >= ROTARY_OPSET => Some(false),
        Target::Onnx => None,
    }
}

/// A RotaryEmbedding node of the target's domain.
fn rotary_node(
    rw: &mut Rewrite,
    contrib: bool,
    inputs: [PValue; 4],
    attributes: Vec<AttributeProto>,
) -> PValue {
    let domain = if contrib { MS_DOMAIN } else { "" };
    rw.op("RotaryEmbedding", domain, &inputs, attributes)
}

fn build_rotary(m: &Match, rw: &mut Rewrite) -> Built {
    require_rotary_opset(rw)?;
    rotary(m, rw).ok_or_else(|| {
        Declined::NotProven(
            "the rotate_half halves, the cos/sin tables from inv_freq and the positions, or \
             the head layout"
                .into(),
        )
    })
}

fn build_interleaved(m: &Match, rw: &mut Rewrite) -> Built {
    require_rotary_opset(rw)?;
    interleaved::interleaved(m, rw).ok_or_else(|| {
        Declined::NotProven(
            "the interleaved pairs, the repeated table parts of constant rows picked by the \
             positions, or the head layout"
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
    let [_, _heads, seq, head] = &x_dims[..] else {
        return None;
    };
    let head = head.value()?;
    let half = head / 2;
    if head % 2 != 0 {
        return None;
    }
    let concat_axis = attr::get_int(&g.node(m.node("concat")?).proto, "axis")?;
    if !(concat_axis == -1 || concat_axis == 3)
        || !slices_last_axis(rw, m, "low", (0, half, 1), false)
        || !slices_last_axis(rw, m, "high", (half, head, 1), true)
    {
        return None;
    }
    let contrib = contrib_operator(rw)?;
    let tables = (
        read_table(m, rw, "cos", "Cos")?,
        read_table(m, rw, "sin", "Sin")?,
    );
    let (ids, caches) = match tables {
        (
            Source::Computed {
                angles,
                positions_float,
                unit_axis,
                inv_freq,
                scale,
            },
            Source::Computed {
                angles: sin_angles,
                scale: sin_scale,
                ..
            },
        ) if angles == sin_angles && scale == sin_scale && inv_freq.len() as i64 == half => {
            computed_caches(rw, x, seq, positions_float, unit_axis, &inv_freq, scale)?
        }
        (
            Source::Cached { table, positions },
            Source::Cached {
                table: sin_table,
                positions: sin_positions,
            },
        ) if positions == sin_positions => {
            let ids = position_ids(rw, x, seq, positions)?;
            (ids, half_caches(rw, x, [table, sin_table])?)
        }
        (
            Source::Sliced {
                table,
                sliced,
                rows_end,
            },
            Source::Sliced {
                table: sin_table,
                rows_end: sin_rows_end,
                ..
            },
        ) if rows_end == sin_rows_end => {
            let ids = sliced_ids(rw, x, sliced)?;
            (ids, half_caches(rw, x, [table, sin_table])?)
        }
        _ => return None,
    };
    let inputs = rotary_inputs(contrib, x.into(), ids, caches[0], caches[1]);
    let out = rotary_node(rw, contrib, inputs, vec![]);
    let root = g.node(*m.nodes().first()?).output(0)?;
    rw.replace(root, out);
    Some(())
}

/// `ids`, int64 positions `[batch | 1, seq]`, expanded to `x`'s batch where they have one
/// row for all (the operators refuse a broadcast, `ops::rotary`).
fn to_batch(rw: &mut Rewrite, x: ValueId, ids: PValue, ids_batch: &Dim) -> Option<PValue> {
    let x_batch = rw.graph.value_type(x)?.shape?.first()?.clone();
    if ids_batch.same(&x_batch) {
        return Some(ids);
    }
    if ids_batch.value() != Some(1) {
        return None;
    }
    let x_batch = rw.dim_of(x.into(), 0).ok()?;
    let one_1d = int64_constant(rw, "rotary_one_1d", &[1], &[1])?;
    let shape = rw.op("Concat", "", &[x_batch, one_1d], vec![attr::int("axis", 0)]);
    Some(rw.op("Expand", "", &[ids, shape], vec![]))
}

/// Position ids and caches for computed tables: one cache row per token (the positions
/// flattened), the ids numbering the tokens.
fn computed_caches(
    rw: &mut Rewrite,
    x: ValueId,
    seq: &Dim,
    positions_float: ValueId,
    unit_axis: usize,
    inv_freq: &[f32],
    scale: Option<f64>,
) -> Option<(PValue, [PValue; 2])> {
    let g = rw.graph;
    let x_type = g.value_type(x)?;
    // Integer positions `[batch | 1, seq, 1]` or `[batch | 1, 1, seq]`, cast to x's float
    // type.
    let float_type = g.value_type(positions_float)?;
    let cast = g.node(g.producer(positions_float)?);
    let int_type = g.value_type(cast.input(0)?)?;
    let integer = [DataType::Int64 as i32, DataType::Int32 as i32].contains(&int_type.elem);
    let positions_dims = float_type.shape?;
    let [p_batch, rest @ ..] = &positions_dims[..] else {
        return None;
    };
    let (p_seq, one) = match (unit_axis, rest) {
        (2, [p_seq, one]) | (1, [one, p_seq]) => (p_seq, one),
        _ => return None,
    };
    if !integer || float_type.elem != x_type.elem || one.value() != Some(1) || !p_seq.same(seq) {
        return None;
    }
    let half = inv_freq.len() as i64;

    // One cache row per token: row i holds the angles of the i-th of the positions as the
    // model gave them (flattened), and the ids number the tokens 0..n. Each row is then
    // Cast(p)·inv_freq for the model's own p, there are at least as many rows as x has
    // tokens (ONNX Runtime's kernels refuse fewer: "Updating cos_cache and sin_cache in
    // RotaryEmbedding is not currently supported"), and no size depends on the positions'
    // values (tract cannot size a Range that does). Every layer reads the same positions, so
    // once CSE has run all layers share one cache.
    let rows_by_one = int64_constant(rw, "rotary_rows_by_one", &[2], &[-1, 1])?;
    let flat = rw.op(
        "Reshape",
        "",
        &[positions_float.into(), rows_by_one],
        vec![],
    );
    let count = rw.dim_of(flat, 0).ok()?;
    let first_axis = int64_constant(rw, "rotary_first_axis", &[1], &[0])?;
    let count = rw.op("Squeeze", "", &[count, first_axis], vec![]);
    let zero = int64_constant(rw, "rotary_zero", &[], &[0])?;
    let one = int64_constant(rw, "rotary_one", &[], &[1])?;
    let tokens = rw.op("Range", "", &[zero, count, one], vec![]);
    let positions_shape = rw.op("Shape", "", &[positions_float.into()], vec![]);
    let ids = rw.op("Reshape", "", &[tokens, positions_shape], vec![]);
    let unit = int64_constant(rw, "rotary_unit_axis", &[1], &[unit_axis as i64])?;
    let ids = rw.op("Squeeze", "", &[ids, unit], vec![]);
    let ids = to_batch(rw, x, ids, p_batch)?;
    let freq = rw.constant(
        "rotary_inv_freq",
        Tensor::from_f32("rotary_inv_freq", &[half], inv_freq).ok()?,
    );
    let angles = rw.op("Mul", "", &[flat, freq], vec![]);
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
    Some((ids, caches))
}

/// The ids of sliced tables `[1, 1, n′, head]` for `x` `[batch, heads, seq, head]`: the rows
/// `0..n′` broadcast to `[batch, seq]` as the original broadcasts them against `x`.
fn sliced_ids(rw: &mut Rewrite, x: ValueId, sliced: ValueId) -> Option<PValue> {
    let rows = rw.dim_of(sliced.into(), 2).ok()?;
    let first_axis = int64_constant(rw, "rotary_first_axis", &[1], &[0])?;
    let rows = rw.op("Squeeze", "", &[rows, first_axis], vec![]);
    let zero = int64_constant(rw, "rotary_zero", &[], &[0])?;
    let one = int64_constant(rw, "rotary_one", &[], &[1])?;
    let tokens = rw.op("Range", "", &[zero, rows, one], vec![]);
    let batch = rw.dim_of(x.into(), 0).ok()?;
    let seq = rw.dim_of(x.into(), 2).ok()?;
    let shape = rw.op("Concat", "", &[batch, seq], vec![attr::int("axis", 0)]);
    Some(rw.op("Expand", "", &[tokens, shape], vec![]))
}

/// The caches of constant tables (`[rows, head]`, or `[1, 1, rows, head]`): each table's first
/// half, which must equal its second (`Concat(f, f)` before the trig) so that rows of `h`
/// give what the rows of `head` gave.
fn half_caches(rw: &mut Rewrite, x: ValueId, tables: [ValueId; 2]) -> Option<[PValue; 2]> {
    let g = rw.graph;
    let x_type = g.value_type(x)?;
    let head = x_type.shape.as_ref()?.last()?.value()?;
    if x_type.elem != DataType::Float as i32 {
        return None;
    }
    let mut caches = Vec::with_capacity(2);
    for (table, name) in tables
        .into_iter()
        .zip(["rotary_cos_cache", "rotary_sin_cache"])
    {
        let table = g.constant(table)?;
        let (rows, width) = match table.dims() {
            [rows, width] | [1, 1, rows, width] => (rows, width),
            _ => return None,
        };
        if *width != head || table.dtype() != DataType::Float {
            return None;
        }
        let values = table.to_f32_vec().ok()?;
        let half = (head / 2) as usize;
        let mut first = Vec::with_capacity(values.len() / 2);
        for row in values.chunks(head as usize) {
            let (low, high) = row.split_at(half);
            if low != high {
                return None;
            }
            first.extend_from_slice(low);
        }
        let cache = Tensor::from_f32(name, &[*rows, head / 2], &first).ok()?;
        caches.push(rw.constant(name, cache));
    }
    Some([caches[0], caches[1]])
}

/// Integer `positions` `[batch | 1, seq]`, with `seq` x's, as the operators' ids: int64 (cast
/// from int32), expanded to x's batch (`to_batch`).
fn position_ids(rw: &mut Rewrite, x: ValueId, seq: &Dim, positions: ValueId) -> Option<PValue> {
    let ids_type = rw.graph.value_type(positions)?;
    let ids_dims = ids_type.shape?;
    let [ids_batch, ids_seq] = &ids_dims[..] else {
        return None;
    };
    let integer = [DataType::Int64 as i32, DataType::Int32 as i32].contains(&ids_type.elem);
    if !integer || !ids_seq.same(seq) {
        return None;
    }
    let ids = if ids_type.elem == DataType::Int64 as i32 {
        positions.into()
    } else {
        let int64 = attr::int("to", DataType::Int64 as i64);
        rw.op("Cast", "", &[positions.into()], vec![int64])
    };
    to_batch(rw, x, ids, ids_batch)
}
