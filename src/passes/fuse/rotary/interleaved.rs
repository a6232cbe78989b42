//! Interleaved RoPE: adjacent channel pairs rotated (GPT-J, CodeGen).
//!
//! Matches HF's `rotate_every_two` as the legacy exporter, Optimum and dynamo write it
//! (transformers 4.36–4.52): `y = x·cos + Reshape(Concat(Unsqueeze(−x[..., 1::2], -1),
//! Unsqueeze(x[..., ::2], -1), axis -1), x's shape)·sin`, with `x` of `[batch, seq, heads, rot]`
//! (GPT-J and CodeGen rotate before they move the heads) or `[batch, heads, seq, rot]`, and each
//! table `repeat_interleave(t, 2, -1)`: `Reshape(Tile | Expand(Unsqueeze(Unsqueeze(t, [2 | 1]),
//! [-1]), …), …)` of `t`, one part of a `Split` over the last axis of constant rows picked by
//! integer positions: `GatherElements(Tile(table[1, rows, w]) | table, Tile |
//! Expand(Unsqueeze(positions, -1), …), axis 1)` (GPT-J's `torch.gather(embed_positions, 1,
//! position_ids[..., None].repeat(…))`), `Gather(table[rows, w], positions)` or
//! `GatherND(table[rows, w], Unsqueeze(positions, -1))` (CodeGen's
//! `embed_positions[position_ids]`, legacy exporter and dynamo).
//!
//! Produces `RotaryEmbedding` with `interleaved = 1` (either domain, as the rotate-half rule),
//! its caches the table columns each part reads and the positions as ids; a
//! `[batch, seq, heads, rot]` input goes in as `[batch, seq, heads·rot]` with `num_heads`, the
//! operators' other layout (a Reshape each way, which moves no data).
//!
//! Safe because: the pairs are checked on the inferred shapes (the Concat stacks two lanes of
//! `rot/2` along a new last axis, the Reshape merges them back into x's shape) and on the
//! Slices' bounds (starts 1 and 0, step 2, over the last axis, to its end); each table's
//! repetition likewise (a new last axis of 1 doubled, merged: every value twice in a row). So
//! `y[2i] = x[2i]·c_i − x[2i+1]·s_i` and `y[2i+1] = x[2i+1]·c_i + x[2i]·s_i`, the operators'
//! interleaved rotation, on the same float32 table values. The rows picked are the positions'
//! (a GatherElements' index is the positions repeated along a new last axis, axes and shapes
//! checked; its data the table, tiled along the batch only; a GatherND's index is the positions
//! along a new last axis, with no batch dims), so cache row `p` is the table's row `p`,
//! restricted to that part's columns. A position past the table both refuse; a negative one,
//! which the Gathers count from the end, the fused operator refuses (as the rotate-half rule's
//! cached tables).

use super::{contrib_operator, int64_constant, position_ids, rotary_node, slices_last_axis};
use crate::ir::shape::same_shape;
use crate::ir::{attr, DataType, Dim, Graph, Tensor, ValueId};
use crate::ops::rotary::rotary_inputs;
use crate::passes::fuse::pattern::{add, any, constant, either, int_attr_is, mul, op, unary};
use crate::passes::fuse::pattern::{value, Match, Pat};
use crate::passes::fuse::Rewrite;

/// `x·cos + Reshape(Concat(Unsqueeze(−x[..., 1::2]), Unsqueeze(x[..., ::2])), …)·sin`.
pub(super) fn rope_interleaved() -> Pat {
    let strided = |node| op("Slice", [value("x"), any(), any(), any(), any()]).node(node);
    let pairs = op(
        "Concat",
        [
            op(
                "Unsqueeze",
                [unary("Neg", strided("odd")), constant("odd_axes")],
            ),
            op("Unsqueeze", [strided("even"), constant("even_axes")]),
        ],
    )
    .node("pairs");
    let rotated = op("Reshape", [pairs, any()]).named("rotated");
    add(mul(value("x"), value("cos")), mul(rotated, value("sin")))
}

/// `repeat_interleave(part, 2, -1)` after `part[:, :, None]` (or `[:, None]`):
/// `Reshape(Tile | Expand(Unsqueeze(Unsqueeze(part, head_axes), lane_axes), …), …)`.
fn repeated() -> Pat {
    let with_head = op("Unsqueeze", [value("part"), constant("head_axes")]).named("with_head");
    let lane = op("Unsqueeze", [with_head, constant("lane_axes")]).named("lane");
    let doubled = either([
        op("Tile", [lane.clone(), any()]),
        op("Expand", [lane, any()]),
    ])
    .named("doubled");
    op("Reshape", [doubled, any()])
}

/// Rows of a constant table picked by positions `[batch | 1, seq]`: by GatherElements (GPT-J),
/// Gather (CodeGen through the legacy exporter) or GatherND (CodeGen through dynamo), the
/// node bound to `picker`.
fn picked_rows() -> Pat {
    let index = op("Unsqueeze", [value("positions"), constant("index_axes")]);
    let repeated_index = either([
        op("Tile", [index.clone(), any()]),
        op("Expand", [index.clone(), any()]),
    ]);
    let data = either([
        op("Tile", [constant("table"), any()]).named("tiled"),
        constant("table"),
    ]);
    either([
        op("GatherElements", [data, repeated_index])
            .attr("axis", |a| int_attr_is(a, 1, 0))
            .node("picker"),
        op("Gather", [constant("table"), value("positions")])
            .attr("axis", |a| int_attr_is(a, 0, 0))
            .node("picker"),
        op("GatherND", [constant("table"), index])
            .attr("batch_dims", |a| int_attr_is(a, 0, 0))
            .node("picker"),
    ])
}

/// Where the heads are in `x`, read from the axis the tables gain for them.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// `[batch, seq, heads, rot]`: tables `[batch | 1, seq, 1, rot]`.
    SeqHeads,
    /// `[batch, heads, seq, rot]`: tables `[batch | 1, 1, seq, rot]`.
    HeadsSeq,
}

/// One table operand: the columns of a constant table it repeats, picked by `positions`.
struct Part {
    layout: Layout,
    positions: ValueId,
    /// `[rows, rot/2]`: the table's rows, this part's columns.
    cache: Tensor,
}

fn ints(g: &Graph, v: ValueId) -> Option<Vec<i64>> {
    g.constant(v)?.to_i64_vec().ok()
}

/// `a` is `b` with `last` appended.
fn extends(a: &[Dim], b: &[Dim], last: i64) -> bool {
    a.len() == b.len() + 1
        && a.iter().zip(b).all(|(x, y)| x.same(y))
        && a.last().and_then(Dim::value) == Some(last)
}

/// The part a table operand (`cos` or `sin` of the match) repeats, for `x` of `rot` channels.
fn read_part(m: &Match, rw: &Rewrite, name: &'static str, rot: i64) -> Option<Part> {
    let g = rw.graph;
    let found = repeated().matches(g, m.value(name)?);
    let t = found.first()?;
    let (part, with_head, lane) = (t.value("part")?, t.value("with_head")?, t.value("lane")?);
    let layout = match ints(g, t.value("head_axes")?)?[..] {
        [2] | [-2] => Layout::SeqHeads,
        [1] | [-3] => Layout::HeadsSeq,
        _ => return None,
    };
    let part_dims = g.dims_of(part)?;
    let head_dims = g.dims_of(with_head)?;
    let lane_dims = g.dims_of(lane)?;
    let repeated_dims = g.dims_of(m.value(name)?)?;
    let [_, _, width] = &part_dims[..] else {
        return None;
    };
    // Every value twice in a row: a new last axis of 1, doubled, merged into the one before.
    let doubled_ok = matches!(ints(g, t.value("lane_axes")?)?[..], [4] | [-1])
        && extends(&lane_dims, &head_dims, 1)
        && extends(&g.dims_of(t.value("doubled")?)?, &head_dims, 2)
        && repeated_dims.len() == 4
        && repeated_dims[..3]
            .iter()
            .zip(&head_dims)
            .all(|(a, b)| a.same(b))
        && repeated_dims[3].value() == Some(rot)
        && width.value() == Some(rot / 2);
    if !doubled_ok {
        return None;
    }
    let (split_id, slot) = g.value(part).producer?;
    let split = g.node(split_id);
    let axis = attr::get_int(&split.proto, "axis").unwrap_or(0);
    if !split.is("Split") || !(axis == -1 || axis == 2) {
        return None;
    }
    let rows = split.input(0)?;
    let (positions, table) = read_rows(rw, rows)?;
    // The part's columns: the Split's sizes (an input from opset 13, an attribute before,
    // else equal parts).
    let row_width = g.dims_of(rows)?.last()?.value()?;
    let sizes = match (split.input(1), attr::get_ints(&split.proto, "split")) {
        (Some(v), _) => ints(g, v)?,
        (None, Some(sizes)) => sizes.to_vec(),
        (None, None) => vec![row_width / split.outputs.len() as i64; split.outputs.len()],
    };
    if sizes.iter().sum::<i64>() != row_width {
        return None;
    }
    let start = sizes.get(..slot)?.iter().sum::<i64>() as usize;
    let half = (rot / 2) as usize;
    if sizes.get(slot) != Some(&(half as i64)) {
        return None;
    }
    let values = table.to_f32_vec().ok()?;
    let cache: Vec<f32> = values
        .chunks(row_width as usize)
        .flat_map(|row| row[start..start + half].iter().copied())
        .collect();
    let table_rows = (values.len() / row_width as usize) as i64;
    let cache = Tensor::from_f32("rotary_cache", &[table_rows, half as i64], &cache).ok()?;
    Some(Part {
        layout,
        positions,
        cache,
    })
}

/// The positions and the constant table of rows `rows` `[batch | 1, seq, width]` picks.
fn read_rows(rw: &Rewrite, rows: ValueId) -> Option<(ValueId, Tensor)> {
    let g = rw.graph;
    let found = picked_rows().matches(g, rows);
    let r = found.first()?;
    let positions = r.value("positions")?;
    let table = g.constant(r.value("table")?)?;
    let position_dims = g.dims_of(positions)?;
    let row_dims = g.dims_of(rows)?;
    let [p_batch, p_seq] = &position_dims[..] else {
        return None;
    };
    let [r_batch, r_seq, width] = &row_dims[..] else {
        return None;
    };
    let width = width.value()?;
    // GatherElements reads a `[1, rows, width]` table, Gather and GatherND a `[rows, width]`
    // one.
    let elements = g.node(r.node("picker")?).is("GatherElements");
    let table_ok = match (table.dims(), elements) {
        ([1, _, w], true) | ([_, w], false) => *w == width,
        _ => false,
    };
    // GatherElements and GatherND: the index is the positions along a new last axis (which
    // GatherElements repeats); GatherElements' data is the table tiled along the batch only.
    let index_ok = match r.value("index_axes") {
        Some(axes) => matches!(ints(g, axes)?[..], [2] | [-1]),
        None => true,
    };
    let tiled_ok = match r.value("tiled") {
        Some(tiled) => {
            let tiled_dims = g.dims_of(tiled)?;
            tiled_dims.len() == 3
                && tiled_dims[1..]
                    .iter()
                    .zip(&table.dims()[1..])
                    .all(|(d, &n)| d.value() == Some(n))
        }
        None => true,
    };
    // The positions' type `position_ids` checks.
    let float_table = table.dtype() == DataType::Float;
    (table_ok && index_ok && tiled_ok && float_table && r_batch.same(p_batch) && r_seq.same(p_seq))
        .then_some((positions, table))
}

/// The pairs of the match: `x`'s last axis split into lanes of odd and even channels, stacked
/// and merged back.
fn pairs_ok(m: &Match, rw: &Rewrite, x_dims: &[Dim], rot: i64) -> Option<bool> {
    let g = rw.graph;
    let pairs = g.node(m.node("pairs")?);
    let concat_axis = attr::get_int(&pairs.proto, "axis")?;
    let lanes_ok = [m.value("odd_axes")?, m.value("even_axes")?]
        .into_iter()
        .all(|v| matches!(ints(g, v).as_deref(), Some([4] | [-1])));
    let mut stacked = x_dims[..3].to_vec();
    stacked.push(Dim::known(rot / 2));
    let rotated = g.dims_of(m.value("rotated")?)?;
    Some(
        (concat_axis == -1 || concat_axis == 4)
            && lanes_ok
            && extends(&g.dims_of(pairs.output(0)?)?, &stacked, 2)
            && same_shape(&rotated, x_dims)
            && slices_last_axis(rw, m, "odd", (1, rot, 2), true)
            && slices_last_axis(rw, m, "even", (0, rot, 2), true),
    )
}

/// The interleaved RotaryEmbedding replacing the match, `None` where a part does not have the
/// form the operator computes.
pub(super) fn interleaved(m: &Match, rw: &mut Rewrite) -> Option<()> {
    let g = rw.graph;
    let x = m.value("x")?;
    let x_type = g.value_type(x)?;
    let x_dims = x_type.shape.clone()?;
    let [_, _, _, rot] = &x_dims[..] else {
        return None;
    };
    let rot = rot.value()?;
    if rot % 2 != 0 || x_type.elem != DataType::Float as i32 || !pairs_ok(m, rw, &x_dims, rot)? {
        return None;
    }
    let contrib = contrib_operator(rw)?;
    let cos = read_part(m, rw, "cos", rot)?;
    let sin = read_part(m, rw, "sin", rot)?;
    if cos.positions != sin.positions || cos.layout != sin.layout {
        return None;
    }
    let (seq, heads) = match cos.layout {
        Layout::SeqHeads => (&x_dims[1], Some(x_dims[2].value()?)),
        Layout::HeadsSeq => (&x_dims[2], None),
    };
    let ids = position_ids(rw, x, seq, cos.positions)?;
    let caches = [
        rw.constant("rotary_cos_cache", cos.cache),
        rw.constant("rotary_sin_cache", sin.cache),
    ];
    let mut attributes = vec![attr::int("interleaved", 1)];
    let input = match heads {
        Some(heads) => {
            attributes.push(attr::int("num_heads", heads));
            let hidden = int64_constant(rw, "rotary_hidden", &[3], &[0, 0, -1])?;
            rw.op("Reshape", "", &[x.into(), hidden], vec![])
        }
        None => x.into(),
    };
    let inputs = rotary_inputs(contrib, input, ids, caches[0], caches[1]);
    let mut out = rotary_node(rw, contrib, inputs, attributes);
    if let Some(heads) = heads {
        let split = int64_constant(rw, "rotary_heads", &[4], &[0, 0, heads, rot])?;
        out = rw.op("Reshape", "", &[out, split], vec![]);
    }
    let root = g.node(*m.nodes().first()?).output(0)?;
    rw.replace(root, out);
    Some(())
}
