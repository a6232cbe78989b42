//! Applying a structured cut: constants sliced (copied where something else reads them),
//! computed values narrowed by a Gather, Reshape shapes and Split sizes rewritten, head-count
//! attributes set, all in one patch per block.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::ir::tensor::raw_byte_len;
use crate::ir::{attr, Graph, Model, NodeId, PValue, Patch, Tensor, ValueId};
use crate::passes::{matching, Rewrites};
use crate::proto::NodeProto;

use super::shape_concat;

/// A constant input to cut: input `slot` of `node` keeps only the indices `keep` along `axis`.
#[derive(Clone, Debug)]
pub(super) struct Slice {
    pub(super) node: NodeId,
    pub(super) slot: usize,
    pub(super) axis: usize,
    pub(super) keep: Vec<usize>,
}

/// Reshape `node`'s target shape gets `value` as its entry `from_end` places from the end
/// (1: the last, a feature count; 2: a head count before the head size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct ShapeEntry {
    pub(super) node: NodeId,
    pub(super) from_end: usize,
    pub(super) value: usize,
}

impl ShapeEntry {
    pub(super) fn last(node: NodeId, value: usize) -> ShapeEntry {
        ShapeEntry {
            node,
            from_end: 1,
            value,
        }
    }
}

/// Everything one block's cut changes.
pub(super) struct Cut {
    pub(super) kind: &'static str,
    /// Constants sliced; computed values (a per-head attention bias) narrowed by a Gather.
    pub(super) slices: Vec<Slice>,
    /// Reshape target shapes (input 1) to rewrite.
    pub(super) reshapes: Vec<ShapeEntry>,
    /// Inputs that become this int64 vector (a Split's section sizes).
    pub(super) int_inputs: Vec<(NodeId, usize, Vec<i64>)>,
    pub(super) attrs: Vec<(NodeId, &'static str, i64)>,
}

/// `t` keeping only the indices `keep` along `axis`.
fn slice_tensor(t: &Tensor, axis: usize, keep: &[usize]) -> Result<Tensor> {
    let dims: Vec<usize> = t.dims().iter().map(|&d| d as usize).collect();
    let elem = raw_byte_len(t.dtype(), 1)
        .filter(|&e| raw_byte_len(t.dtype(), t.numel()) == Some(e * t.numel()))
        .ok_or_else(|| Error::invalid_tensor(t.name(), "cannot slice this element type"))?;
    let bytes = t
        .raw_bytes()
        .ok_or_else(|| Error::invalid_tensor(t.name(), "cannot read its data"))?;
    let layout = crate::prune::mask::AxisLayout::new(&dims, axis);
    let run = layout.stride * elem;
    let mut out = Vec::with_capacity(layout.outer * keep.len() * run);
    for o in 0..layout.outer {
        for &k in keep {
            let start = (o * layout.len + k) * run;
            out.extend_from_slice(&bytes[start..start + run]);
        }
    }
    let mut new_dims: Vec<i64> = t.dims().to_vec();
    new_dims[axis] = keep.len() as i64;
    Tensor::from_raw(t.name(), t.dtype(), &new_dims, bytes::Bytes::from(out))
}

pub(super) fn apply(model: &mut Model, cut: Cut, rewrites: &mut Rewrites) -> Result<()> {
    let g = &model.graph;
    let mut patch = Patch::new(cut.kind);
    for s in &cut.slices {
        let v = g
            .node(s.node)
            .input(s.slot)
            .ok_or_else(|| missing("an input"))?;
        match g.constant(v) {
            Some(t) => {
                let sliced = slice_tensor(&t, s.axis, &s.keep)?;
                patch.set_constant_input(g, s.node, s.slot, sliced, ".pruned");
            }
            None => {
                let keep: Vec<i64> = s.keep.iter().map(|&k| k as i64).collect();
                let name = format!("{}.kept", g.value_name(v));
                let indices = Tensor::from_i64(&name, &[keep.len() as i64], &keep)?;
                let indices = patch.new_initializer(&name, indices);
                let axis = vec![attr::int("axis", s.axis as i64)];
                let kept = patch.op("Gather", "", &[PValue::from(v), indices], axis);
                patch.replace_input(s.node, s.slot, kept);
            }
        }
    }
    for (node, slot, ints) in &cut.int_inputs {
        let v = g
            .node(*node)
            .input(*slot)
            .ok_or_else(|| missing("an input"))?;
        let t = Tensor::from_i64(g.value_name(v), &[ints.len() as i64], ints)?;
        patch.set_constant_input(g, *node, *slot, t, ".pruned");
    }
    // One new shape per shape value and edit: other Reshapes may read the original.
    let mut shapes: HashMap<(ValueId, usize, usize), PValue> = HashMap::new();
    for e in &cut.reshapes {
        let v = g
            .node(e.node)
            .input(1)
            .ok_or_else(|| missing("a Reshape shape"))?;
        if g.constant(v).is_some() {
            patch.set_constant_input(g, e.node, 1, with_entry(g, v, *e)?, ".pruned");
            continue;
        }
        let key = (v, e.from_end, e.value);
        let shape = match shapes.get(&key) {
            Some(&shape) => shape,
            None => {
                let shape = computed_with_entry(g, &mut patch, v, *e)?;
                *shapes.entry(key).or_insert(shape)
            }
        };
        patch.replace_input(e.node, 1, shape);
    }
    for (node, name, value) in cut.attrs {
        patch.set_attribute(node, attr::int(name, value));
    }
    rewrites.apply(model, patch)?;
    Ok(())
}

fn missing(what: &str) -> Error {
    Error::Patch(format!("pruning: {what} is not there"))
}

/// Constant int vector `v` with entry `e.from_end` from its end set to `e.value`.
fn with_entry(g: &Graph, v: ValueId, e: ShapeEntry) -> Result<Tensor> {
    let mut ints = matching::const_ints(g, v).ok_or_else(|| missing(g.value_name(v)))?;
    let i = ints
        .len()
        .checked_sub(e.from_end)
        .ok_or_else(|| missing("the shape entry"))?;
    ints[i] = e.value as i64;
    Tensor::from_i64(g.value_name(v), &[ints.len() as i64], &ints)
}

/// A new value holding computed shape `v` with entry `e.from_end` from its end set to
/// `e.value`: its Concat again with the constant last piece rewritten where that piece holds
/// the entry, else `Concat(Slice(v, 0, -k), [value], Slice(v, 1 - k))` (k = `from_end`).
fn computed_with_entry(g: &Graph, patch: &mut Patch, v: ValueId, e: ShapeEntry) -> Result<PValue> {
    let in_last_piece = shape_concat(g, v).filter(|&(_, piece)| {
        matching::const_ints(g, piece).is_some_and(|ints| ints.len() >= e.from_end)
    });
    if let Some((concat, piece)) = in_last_piece {
        let node = g.node(concat);
        let piece = patch.new_initializer(g.value_name(piece), with_entry(g, piece, e)?);
        let mut inputs: Vec<Option<PValue>> =
            node.inputs.iter().map(|i| i.map(PValue::from)).collect();
        if let Some(l) = inputs.last_mut() {
            *l = Some(piece);
        }
        let shape = patch.new_value(g.value_name(v));
        // Unnamed, so the patch gives it a fresh name.
        let proto = NodeProto {
            name: None,
            ..node.proto.clone()
        };
        patch.add_node_proto(proto, &inputs, &[shape]);
        return Ok(shape);
    }
    let k = e.from_end as i64;
    let slice_of_v = |patch: &mut Patch, from: i64, to: i64| -> Result<PValue> {
        let from = patch.new_initializer("start", Tensor::from_i64("start", &[1], &[from])?);
        let to = patch.new_initializer("end", Tensor::from_i64("end", &[1], &[to])?);
        Ok(patch.op("Slice", "", &[PValue::from(v), from, to], Vec::new()))
    };
    let leading = slice_of_v(patch, 0, -k)?;
    let entry = Tensor::from_i64("entry", &[1], &[e.value as i64])?;
    let mut pieces = vec![leading, patch.new_initializer("entry", entry)];
    if k > 1 {
        pieces.push(slice_of_v(patch, 1 - k, i64::MAX)?);
    }
    Ok(patch.op("Concat", "", &pieces, vec![attr::int("axis", 0)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slicing_keeps_the_chosen_indices_along_the_axis() -> Result<()> {
        let t = Tensor::from_f32("w", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?;
        let columns = slice_tensor(&t, 1, &[0, 2])?;
        assert_eq!(columns.dims(), [2, 2]);
        assert_eq!(columns.to_f32_vec()?, [1.0, 3.0, 4.0, 6.0]);
        let rows = slice_tensor(&t, 0, &[1])?;
        assert_eq!(rows.to_f32_vec()?, [4.0, 5.0, 6.0]);
        Ok(())
    }
}
