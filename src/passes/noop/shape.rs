//! Shape-only nodes that change nothing, and pairs of them that one node does.
//!
//! - `reshape-noop`: `Reshape(x, shape)` whose output shape is provably `x`'s: both recorded
//!   (`Graph::value_type`) and equal dim by dim (sizes, or the same symbol), or `x`'s recorded
//!   shape and a constant `shape` that resolves to it (`0` copies a dim, `-1` is inferred).
//!   Reshape keeps the element order, so the same shape means the same tensor.
//! - `reshape-chain`: `Reshape(Reshape(x, s1), s2)` → `Reshape(x, s2)` when nothing else reads
//!   the first and `s2` copies no dim from its input (no `0`, or `allowzero=1`): the result then
//!   depends only on the elements in order and their count, which `x` and the first result share.
//! - `squeeze-unsqueeze`, `unsqueeze-squeeze`: `Unsqueeze(Squeeze(x, axes), axes)` and
//!   `Squeeze(Unsqueeze(x, axes), axes)` are `x`: the second puts back (or takes away) exactly
//!   the size-1 axes the first took away (or put in). Both read the axes against the rank of
//!   the same tensor, so equal lists mean equal axes, negative ones included.
//! - `expand-noop`: `Expand(x, shape)` whose result has `x`'s shape: recorded and equal, or a
//!   constant `shape` no longer than `x`'s rank whose every entry is 1 or `x`'s size there.
//! - `slice-noop`: `Slice(x, starts, ends, axes, steps)` with every step 1 that keeps each axis
//!   whole: every start 0 and every end `i64::MAX` or at least the axis' size, or the result's
//!   recorded shape `x`'s (with steps of 1, a slice as long as its axis starts at 0). torch
//!   2.6's dynamo export writes `position_ids[:, None, :]` as such Slices around an Unsqueeze.
//! - `pad-zeros`: `Pad(x, pads)` whose pads are all zero (the constant input, or the attribute
//!   before opset 11): nothing is added or cropped on any axis, whatever the mode and value
//!   (Swin pads its windows by `(size − H % size) % size`, zero for the shapes it was made for).

use super::super::matching::{bypass, const_ints, input_producer, only_feeds, op_node, rewire};
use crate::ir::shape::same_shape;
use crate::ir::{attr, Dim, Graph, Node, NodeId, Patch};

pub fn reshape_noop(g: &Graph, id: NodeId) -> Option<Patch> {
    let node = op_node(g, id, "Reshape")?;
    let (x, out) = (node.input(0)?, node.output(0)?);
    let input = g.dims_of(x)?;
    let proven = g.dims_of(out).is_some_and(|d| same_shape(&d, &input))
        || reshape_target(g, node, &input).is_some_and(|d| same_shape(&d, &input));
    if !proven {
        return None;
    }
    bypass(g, "reshape-noop", id, out, x)
}

pub fn reshape_chain(g: &Graph, id: NodeId) -> Option<Patch> {
    let second = op_node(g, id, "Reshape")?;
    let (first_id, first) = input_producer(g, second, 0, "Reshape")?;
    let shape = second.input(1)?;
    let copies_dims = !allows_zero(second) && const_ints(g, shape).is_none_or(|s| s.contains(&0));
    if copies_dims || !only_feeds(g, first_id, id) {
        return None;
    }
    let inputs = [Some(first.input(0)?), Some(shape)];
    let mut patch = rewire(
        "reshape-chain",
        id,
        second.proto.clone(),
        &inputs,
        second.output(0)?,
    );
    patch.remove_node(first_id);
    Some(patch)
}

pub fn squeeze_pair(g: &Graph, id: NodeId) -> Option<Patch> {
    let second = g.node(id);
    let (first_op, kind) = if second.is("Unsqueeze") {
        ("Squeeze", "squeeze-unsqueeze")
    } else if second.is("Squeeze") {
        ("Unsqueeze", "unsqueeze-squeeze")
    } else {
        return None;
    };
    let (first_id, first) = input_producer(g, second, 0, first_op)?;
    if sorted_axes(g, first)? != sorted_axes(g, second)? {
        return None;
    }
    let mut patch = bypass(g, kind, id, second.output(0)?, first.input(0)?)?;
    if only_feeds(g, first_id, id) {
        patch.remove_node(first_id);
    }
    Some(patch)
}

pub fn expand_noop(g: &Graph, id: NodeId) -> Option<Patch> {
    let node = op_node(g, id, "Expand")?;
    let (x, out) = (node.input(0)?, node.output(0)?);
    let input = g.dims_of(x)?;
    let broadcast_keeps_shape = |shape: Vec<i64>| {
        shape.len() <= input.len()
            && shape
                .iter()
                .rev()
                .zip(input.iter().rev())
                .all(|(&s, d)| s == 1 || d.value() == Some(s))
    };
    let proven = g.dims_of(out).is_some_and(|d| same_shape(&d, &input))
        || const_ints(g, node.input(1)?).is_some_and(broadcast_keeps_shape);
    if !proven {
        return None;
    }
    bypass(g, "expand-noop", id, out, x)
}

pub fn slice_noop(g: &Graph, id: NodeId) -> Option<Patch> {
    let node = op_node(g, id, "Slice")?;
    let (x, out) = (node.input(0)?, node.output(0)?);
    // Opset 10 on: bounds as inputs (the attribute form before it is left alone).
    let (starts, ends) = (
        const_ints(g, node.input(1)?)?,
        const_ints(g, node.input(2)?)?,
    );
    let steps_one = match node.input(4) {
        Some(steps) => const_ints(g, steps)?.iter().all(|&s| s == 1),
        None => true,
    };
    if !steps_one || starts.len() != ends.len() {
        return None;
    }
    let input = g.dims_of(x)?;
    let rank = input.len() as i64;
    let axes = match node.input(3) {
        Some(axes) => const_ints(g, axes)?,
        None => (0..starts.len() as i64).collect(),
    };
    let whole = |(&axis, (&start, &end)): (&i64, (&i64, &i64))| {
        let axis = if axis < 0 { axis + rank } else { axis };
        let size = usize::try_from(axis).ok().and_then(|a| input.get(a));
        start == 0 && (end == i64::MAX || size.and_then(Dim::value).is_some_and(|n| end >= n))
    };
    let proven = axes.len() == starts.len()
        && (axes.iter().zip(starts.iter().zip(&ends)).all(whole)
            || g.dims_of(out).is_some_and(|d| same_shape(&d, &input)));
    if !proven {
        return None;
    }
    bypass(g, "slice-noop", id, out, x)
}

pub fn pad_zeros(g: &Graph, id: NodeId) -> Option<Patch> {
    let node = op_node(g, id, "Pad")?;
    let pads = match node.input(1) {
        Some(pads) => const_ints(g, pads)?,
        None => attr::get_ints(&node.proto, "pads")?.to_vec(),
    };
    if pads.iter().any(|&p| p != 0) {
        return None;
    }
    bypass(g, "pad-zeros", id, node.output(0)?, node.input(0)?)
}

fn allows_zero(reshape: &Node) -> bool {
    attr::get_int(&reshape.proto, "allowzero") == Some(1)
}

/// The output dims of a Reshape of a tensor of dims `input` to its constant `shape` input:
/// `0` copies the input's dim (unless `allowzero=1`), one `-1` takes what the others leave
/// of the element count.
fn reshape_target(g: &Graph, reshape: &Node, input: &[Dim]) -> Option<Vec<Dim>> {
    let shape = const_ints(g, reshape.input(1)?)?;
    let copy_zeros = !allows_zero(reshape);
    let mut out = Vec::with_capacity(shape.len());
    let mut inferred = None;
    for (i, &s) in shape.iter().enumerate() {
        out.push(match s {
            -1 if inferred.is_none() => {
                inferred = Some(i);
                Dim::known(1)
            }
            0 if copy_zeros => input.get(i)?.clone(),
            s if s >= 0 => Dim::known(s),
            _ => return None,
        });
    }
    if let Some(i) = inferred {
        out[i] = product(input).div(&product(&out))?;
    }
    Some(out)
}

fn product(dims: &[Dim]) -> Dim {
    dims.iter().fold(Dim::known(1), |acc, d| acc.mul(d))
}

/// The axes of a Squeeze or Unsqueeze (the `axes` attribute before opset 13, a constant
/// input after), sorted; `None` when they are not known (a Squeeze without axes drops every
/// size-1 axis, which needs the shape).
fn sorted_axes(g: &Graph, node: &Node) -> Option<Vec<i64>> {
    let mut axes = match attr::get_ints(&node.proto, "axes") {
        Some(a) => a.to_vec(),
        None => const_ints(g, node.input(1)?)?,
    };
    axes.sort_unstable();
    Some(axes)
}

#[cfg(test)]
mod tests {
    use super::super::kinds as rewrites;
    use crate::ir::testing::{builder, ops, written, Builder};
    use crate::ir::{attr, DataType, Model, Tensor};

    const F32: DataType = DataType::Float;

    fn ints(values: &[i64]) -> Tensor {
        Tensor::from_i64("", &[values.len() as i64], values).unwrap()
    }

    /// x: [batch, sequence, 64] → `op`(x, s) → y → Neg → z.
    fn one_node(op: &str, shape: &[i64]) -> Builder {
        builder()
            .input("x", F32, &["batch", "sequence", "64"])
            .output("z", F32, &["?", "?", "?"])
            .constant("s", ints(shape))
            .node(op, &["x", "s"], &["y"], vec![])
            .node("Neg", &["y"], &["z"], vec![])
    }

    /// Like `one_node`, with a shape that is a graph input: only recorded types tell.
    fn computed_shape(op: &str, out: &[&str]) -> Model {
        builder()
            .input("x", F32, &["batch", "sequence", "64"])
            .input("s", DataType::Int64, &["3"])
            .output("z", F32, &["?", "?", "?"])
            .typed("y", F32, out)
            .node(op, &["x", "s"], &["y"], vec![])
            .node("Neg", &["y"], &["z"], vec![])
            .build()
    }

    #[test]
    fn a_reshape_or_expand_to_the_recorded_input_shape_goes() {
        for (op, kind) in [("Reshape", "reshape-noop"), ("Expand", "expand-noop")] {
            let mut m = computed_shape(op, &["batch", "sequence", "64"]);
            assert_eq!(rewrites(&mut m), [kind]);
            assert_eq!(written(&m).node.last().unwrap().input, ["x"]);
            // Different symbols are not known to be equal.
            let mut m = computed_shape(op, &["batch", "other", "64"]);
            assert!(rewrites(&mut m).is_empty());
            let mut m = computed_shape(op, &["batch", "sequence", "?"]);
            assert!(rewrites(&mut m).is_empty());
        }
    }

    /// x: [batch, sequence, 64] → Slice(x, starts, ends, axes, steps?) → y → Neg → z.
    fn slice(starts: &[i64], ends: &[i64], axes: &[i64], steps: Option<&[i64]>) -> Model {
        let mut ins = vec!["x", "starts", "ends", "axes"];
        let mut b = builder()
            .input("x", F32, &["batch", "sequence", "64"])
            .output("z", F32, &["?", "?", "?"])
            .constant("starts", ints(starts))
            .constant("ends", ints(ends))
            .constant("axes", ints(axes));
        if let Some(steps) = steps {
            b = b.constant("steps", ints(steps));
            ins.push("steps");
        }
        b.node("Slice", &ins, &["y"], vec![])
            .node("Neg", &["y"], &["z"], vec![])
            .build()
    }

    #[test]
    fn a_slice_keeping_every_axis_whole_goes() {
        let max = i64::MAX;
        for (starts, ends, axes, steps) in [
            (&[0][..], &[max][..], &[1][..], None),
            (&[0, 0], &[max, 64], &[0, -1], Some(&[1, 1][..])),
            (&[0], &[100], &[2], None),
        ] {
            let mut m = slice(starts, ends, axes, steps);
            assert_eq!(rewrites(&mut m), ["slice-noop"], "{ends:?} {axes:?}");
            assert_eq!(written(&m).node.last().unwrap().input, ["x"]);
        }
        for (starts, ends, axes, steps) in [
            (&[1][..], &[max][..], &[1][..], None),
            (&[0], &[63], &[2], None),
            (&[0], &[1000], &[1], None),
            (&[0], &[max], &[1], Some(&[2][..])),
            (&[-1], &[-max], &[2], Some(&[-1][..])),
        ] {
            let mut m = slice(starts, ends, axes, steps);
            assert!(rewrites(&mut m).is_empty(), "{starts:?} {ends:?} {axes:?}");
        }
    }

    #[test]
    fn a_reshape_to_a_constant_that_resolves_to_the_input_shape_goes() {
        for shape in [&[0, 0, 64][..], &[0, 0, -1], &[0, -1, 64]] {
            let mut m = one_node("Reshape", shape).build();
            assert_eq!(rewrites(&mut m), ["reshape-noop"], "{shape:?}");
        }
    }

    #[test]
    fn a_reshape_to_another_shape_stays() {
        for shape in [&[0, -1][..], &[0, 0, 8, 8], &[0, 0, 32], &[-1, 64, 0]] {
            let mut m = one_node("Reshape", shape).build();
            assert!(rewrites(&mut m).is_empty(), "{shape:?}");
        }
        // With allowzero a 0 is a size, not a copy.
        let mut m = one_node("Reshape", &[0, 0, 64]).build();
        let id = m
            .graph
            .node_ids()
            .find(|&n| m.graph.node(n).is("Reshape"))
            .unwrap();
        m.graph
            .node_mut_proto(id)
            .attribute
            .push(attr::int("allowzero", 1));
        assert!(rewrites(&mut m).is_empty());
    }

    fn two_reshapes(second_shape: &[i64]) -> Model {
        builder()
            .input("x", F32, &["2", "3", "4"])
            .output("z", F32, &["?", "?"])
            .constant("s1", ints(&[6, 4]))
            .constant("s2", ints(second_shape))
            .node("Reshape", &["x", "s1"], &["a"], vec![])
            .node("Reshape", &["a", "s2"], &["y"], vec![])
            .node("Neg", &["y"], &["z"], vec![])
            .build()
    }

    #[test]
    fn a_reshape_of_a_reshape_reads_the_original() {
        let mut m = two_reshapes(&[4, -1]);
        assert_eq!(rewrites(&mut m), ["reshape-chain"]);
        assert_eq!(ops(&m), ["Constant", "Constant", "Reshape", "Neg"]);
        let reshape = written(&m).node[2].clone();
        assert_eq!(reshape.input, ["x", "s2"]);
        // A 0 copies a dim of the first result, which x does not have.
        assert!(rewrites(&mut two_reshapes(&[0, -1])).is_empty());
    }

    fn squeeze_pair(first: &str, second: &str, a1: &[i64], a2: &[i64]) -> Model {
        builder()
            .input("x", F32, &["2", "1", "3"])
            .output("z", F32, &["?", "?", "?"])
            .constant("a1", ints(a1))
            .constant("a2", ints(a2))
            .node(first, &["x", "a1"], &["a"], vec![])
            .node(second, &["a", "a2"], &["y"], vec![])
            .node("Neg", &["y"], &["z"], vec![])
            .build()
    }

    #[test]
    fn squeeze_and_unsqueeze_of_the_same_axes_cancel() {
        let mut m = squeeze_pair("Squeeze", "Unsqueeze", &[1], &[1]);
        assert_eq!(rewrites(&mut m), ["squeeze-unsqueeze"]);
        assert_eq!(written(&m).node.last().unwrap().input, ["x"]);
        let mut m = squeeze_pair("Unsqueeze", "Squeeze", &[0, -1], &[-1, 0]);
        assert_eq!(rewrites(&mut m), ["unsqueeze-squeeze"]);
        assert!(rewrites(&mut squeeze_pair("Squeeze", "Unsqueeze", &[1], &[0])).is_empty());
        // Before opset 13 the axes are an attribute.
        let mut m = builder()
            .opset(11)
            .input("x", F32, &["2", "3"])
            .output("z", F32, &["?", "?"])
            .node("Unsqueeze", &["x"], &["a"], vec![attr::ints("axes", &[0])])
            .node("Squeeze", &["a"], &["y"], vec![attr::ints("axes", &[0])])
            .node("Neg", &["y"], &["z"], vec![])
            .build();
        assert_eq!(rewrites(&mut m), ["unsqueeze-squeeze"]);
        assert_eq!(ops(&m), ["Neg"]);
    }

    #[test]
    fn an_expand_to_the_input_shape_goes_and_a_broadcast_stays() {
        for shape in [&[1, 64][..], &[1], &[1, 1, 64]] {
            let mut m = one_node("Expand", shape).build();
            assert_eq!(rewrites(&mut m), ["expand-noop"], "{shape:?}");
        }
        for shape in [&[2, 64][..], &[1, 1, 1, 64], &[32]] {
            let mut m = one_node("Expand", shape).build();
            assert!(rewrites(&mut m).is_empty(), "{shape:?}");
        }
    }

    #[test]
    fn a_pad_by_zeros_goes_and_any_other_stays() {
        let mut m = one_node("Pad", &[0, 0, 0, 0, 0, 0]).build();
        assert_eq!(rewrites(&mut m), ["pad-zeros"]);
        assert!(!ops(&m).contains(&"Pad".to_string()));
        for pads in [&[0, 0, 0, 0, 0, 1][..], &[0, 0, -1, 0, 0, 0]] {
            let mut m = one_node("Pad", pads).build();
            assert!(rewrites(&mut m).is_empty(), "{pads:?}");
        }
    }
}
