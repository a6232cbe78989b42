//! `sequence-split`: `SplitToSequence(x, split, axis)` whose every reader picks one piece by a
//! constant position (`SequenceAt(seq, i)`) → `Split(x, sizes, axis)`, each pick reading the
//! piece it named. onnxscript writes `torch.split` and the `getitem` of its pieces that way
//! (torch 2.5–2.6's dynamo export of GPT-2 splits its packed QKV projection in three); the
//! sequence hid the pieces from the fusions, and FP16 conversion, which needs every value's
//! element type, refused the model.
//!
//! Exact: `SplitToSequence` with a scalar `split` cuts `x` along `axis` into pieces of that
//! size (the last one shorter when the length is not a multiple), with a 1-D `split` into
//! pieces of those sizes; `Split` with the same sizes returns the same pieces as separate
//! values, and `SequenceAt(seq, i)` is piece `i` (counted from the end when negative). The
//! sizes need the axis' length known, and a constant `split`; a sequence that is a graph
//! output or read by anything but such picks stays.

use crate::ir::{attr, Model, NodeId, Patch, Tensor};

/// The opset from which Split takes its sizes as an input rather than an attribute.
const SPLIT_SIZES_INPUT_OPSET: i64 = 13;

pub fn sequence_split(m: &Model, id: NodeId) -> Option<Patch> {
    let g = &m.graph;
    let node = g.node(id);
    if !(node.domain().is_empty() && node.is("SplitToSequence")) {
        return None;
    }
    let (x, seq) = (node.input(0)?, node.output(0)?);
    if g.is_graph_output(seq) {
        return None;
    }
    let dims = g.value_type(x)?.shape?;
    let rank = dims.len() as i64;
    let axis = attr::get_int(&node.proto, "axis").unwrap_or(0);
    let axis = if axis < 0 { axis + rank } else { axis };
    let len = dims.get(usize::try_from(axis).ok()?)?.value()?;
    let split = g.constant(node.input(1)?)?;
    let sizes: Vec<i64> = match split.dims() {
        [] => {
            let size = split.to_i64_vec().ok()?[0];
            if size <= 0 {
                return None;
            }
            (0..len)
                .step_by(usize::try_from(size).ok()?)
                .map(|start| size.min(len - start))
                .collect()
        }
        [_] => split.to_i64_vec().ok()?,
        _ => return None,
    };
    if sizes.is_empty() || sizes.iter().any(|&s| s < 0) || sizes.iter().sum::<i64>() != len {
        return None;
    }
    let n = sizes.len() as i64;
    // Each reader: a pick of one piece by a constant position.
    let mut picks = Vec::new();
    for &(reader, _) in g.uses(seq) {
        let at = g.node(reader);
        if !(at.domain().is_empty() && at.is("SequenceAt") && at.input(0) == Some(seq)) {
            return None;
        }
        let position = g.constant(at.input(1)?)?.to_i64_vec().ok()?;
        let &[i] = position.as_slice() else {
            return None;
        };
        let i = if i < 0 { i + n } else { i };
        if !(0..n).contains(&i) {
            return None;
        }
        picks.push((reader, i as usize, at.output(0)?));
    }
    let name = g.value_name(seq).to_string();
    let mut patch = Patch::new("sequence-split");
    let pieces: Vec<_> = (0..sizes.len())
        .map(|i| patch.new_value(&format!("{name}_{i}")))
        .collect();
    let mut inputs = vec![Some(x.into())];
    let mut attributes = vec![attr::int("axis", axis)];
    if m.opset("").unwrap_or(0) >= SPLIT_SIZES_INPUT_OPSET {
        let hint = format!("{name}_sizes");
        let t = Tensor::from_i64(&hint, &[n], &sizes).ok()?;
        inputs.push(Some(patch.new_initializer(&hint, t)));
    } else {
        attributes.push(attr::ints("split", &sizes));
    }
    patch
        .remove_node(id)
        .add_node("Split", "", &inputs, &pieces, attributes);
    for (reader, i, out) in picks {
        patch.remove_node(reader).replace_uses(out, pieces[i]);
    }
    Some(patch)
}
