//! `window-bias`: a bias added to scores whose batch is split in two for the add and merged
//! back, as Swin masks its shifted windows:
//! `Reshape(Reshape(s, [A, K, r…]) + m, s's shape)` with `s` `[A·K, r…]` and `m`
//! `[1, K | 1, r′…]` (each `r′` 1 or the `r` under it) → `s + b`, where `b` is `m` without its
//! leading 1, tiled `A` times along the batch when it has `K` rows (`Tile(m′, [A, 1…])`), or
//! as it is when it has one. Row `a·K + k` of `s` is row `(a, k)` of the split, which the add
//! gave `m[0, k]` (or `m[0, 0]`): the tiled `b` gives it the same. Exact: the same sums, of
//! the same operands; only where the recorded shapes prove the split, the add (no operand
//! grows the split shape) and the merge back to `s`'s shape. The attention fusions then see
//! the scores plus a bias (`fuse::attention`).

use crate::ir::shape::same_shape;
use crate::ir::{Dim, Model, NodeId, Patch};
use crate::passes::matching::{input_producer, only_feeds};

use super::{onnx_node, shape_constant, SLICE_INPUTS_OPSET};

pub fn window_bias(m: &Model, id: NodeId) -> Option<Patch> {
    let g = &m.graph;
    if m.opset("").unwrap_or(0) < SLICE_INPUTS_OPSET {
        return None;
    }
    let merge = onnx_node(g, id, "Reshape", 2)?;
    let (add_id, add) = input_producer(g, merge, 0, "Add")?;
    let ((split_id, split), bias) = [(0, 1), (1, 0)].into_iter().find_map(|(s, b)| {
        let split = input_producer(g, add, s, "Reshape")?;
        Some((split, add.input(b)?))
    })?;
    if !only_feeds(g, add_id, id) || !only_feeds(g, split_id, add_id) {
        return None;
    }
    let s = split.input(0)?;
    let s_dims = g.dims_of(s)?;
    let split_dims = g.dims_of(split.output(0)?)?;
    let bias_dims = g.dims_of(bias)?;
    let rows = split_rows(&s_dims, &split_dims)?;
    let bias_rows = bias_rows(&bias_dims, &split_dims, rows)?;
    let proven = same_shape(&g.dims_of(add.output(0)?)?, &split_dims)
        && same_shape(&g.dims_of(merge.output(0)?)?, &s_dims)
        && g.value_type(s)?.elem == g.value_type(bias)?.elem;
    if !proven {
        return None;
    }
    let mut patch = Patch::new("window-bias");
    // `m` without its leading 1: `[K | 1, r′…]`.
    let known: Vec<i64> = bias_dims[1..]
        .iter()
        .map(Dim::value)
        .collect::<Option<_>>()?;
    let shape = shape_constant(&mut patch, "window_bias_shape", &known)?;
    let mut b = patch.op("Reshape", "", &[bias.into(), shape], vec![]);
    if bias_rows == rows {
        // A = s's batch / K, then `[A, 1, …]` repeats.
        let s_shape = patch.op("Shape", "", &[s.into()], vec![]);
        let zero = shape_constant(&mut patch, "window_bias_zero", &[0])?;
        let one = shape_constant(&mut patch, "window_bias_one", &[1])?;
        let batch = patch.op("Slice", "", &[s_shape, zero, one], vec![]);
        let k = shape_constant(&mut patch, "window_bias_rows", &[rows])?;
        let windows = patch.op("Div", "", &[batch, k], vec![]);
        let ones = shape_constant(&mut patch, "window_bias_ones", &vec![1; known.len() - 1])?;
        let repeats = patch.op(
            "Concat",
            "",
            &[windows, ones],
            vec![crate::ir::attr::int("axis", 0)],
        );
        b = patch.op("Tile", "", &[b, repeats], vec![]);
    }
    patch
        .remove_node(id)
        .remove_node(add_id)
        .remove_node(split_id)
        .add_node_proto(
            add.proto.clone(),
            &[Some(s.into()), Some(b)],
            &[merge.output(0)?.into()],
        );
    Some(patch)
}

/// `K` when `split` is `s` `[A·K, r…]` with its first axis split into `[A, K]`.
fn split_rows(s: &[Dim], split: &[Dim]) -> Option<i64> {
    let [a, k, rest @ ..] = split else {
        return None;
    };
    let rows = k.value().filter(|&k| k > 1)?;
    (s.len() == split.len() - 1 && a.mul(k).same(&s[0]) && same_shape(rest, &s[1..]))
        .then_some(rows)
}

/// The rows (`K` or 1) of a bias `[1, K | 1, r′…]` that adds to `split` `[A, K, r…]` without
/// growing it.
fn bias_rows(bias: &[Dim], split: &[Dim], rows: i64) -> Option<i64> {
    let [one, k, rest @ ..] = bias else {
        return None;
    };
    let fits = bias.len() == split.len()
        && one.value() == Some(1)
        && rest
            .iter()
            .zip(&split[2..])
            .all(|(b, r)| b.value() == Some(1) || b.same(r));
    let k = k.value()?;
    (fits && (k == rows || k == 1)).then_some(k)
}
