//! `index-slice`: one index picked along the leading axis by `GatherND`, as torch's dynamo
//! exporter writes Falcon's `fused_qkv[..., -2, :]` (the axis moved first by a Transpose, the
//! pick, the axes moved back):
//! `GatherND(Transpose(x, p), [[i]])` → `Transpose(Slice(x, i, i + 1, axis p[0]), p)`, and
//! `GatherND(x, [[i]])` → `Slice(x, i, i + 1, axis 0)` where no Transpose feeds it. The
//! Transposes around the pick then compose into one (`noop::transpose`), which leaves a key
//! head split from its projection as every other exporter writes it
//! (`Transpose(Slice(Reshape(x)))`) for the attention fusions.
//!
//! Exact: `GatherND` with `batch_dims` 0 and indices `[[i]]` (one index tuple of length 1)
//! returns `x[i:i+1]` (its output shape is the indices' `[1]` followed by x's other axes), a
//! negative `i` counting from the end in both operators (`-1` slices to the end); slicing
//! axis 0 of `Transpose(x, p)` is slicing axis `p[0]` of x before the same Transpose. The new
//! Transpose takes the pick's place; the old one stays for its other readers.

use crate::ir::{attr, Model, NodeId, Patch, Tensor};
use crate::passes::matching::input_producer;

use super::{onnx_node, SLICE_INPUTS_OPSET};

pub fn index_slice(m: &Model, id: NodeId) -> Option<Patch> {
    let g = &m.graph;
    if m.opset("").unwrap_or(0) < SLICE_INPUTS_OPSET {
        return None;
    }
    let pick = onnx_node(g, id, "GatherND", 2)?;
    if attr::get_int(&pick.proto, "batch_dims").is_some_and(|b| b != 0) {
        return None;
    }
    let indices = g.constant(pick.input(1)?)?;
    if indices.dims() != [1, 1] {
        return None;
    }
    let i = *indices.to_i64_vec().ok()?.first()?;
    let end = if i == -1 { i64::MAX } else { i + 1 };
    let (data, moved) = match input_producer(g, pick, 0, "Transpose") {
        Some((_, transpose)) => {
            let perm = attr::get_ints(&transpose.proto, "perm")?.to_vec();
            (transpose.input(0)?, Some(perm))
        }
        None => (pick.input(0)?, None),
    };
    let axis = moved.as_ref().map_or(Some(0), |p| p.first().copied())?;
    let out = pick.output(0)?;
    let name = g.value_name(out).to_string();
    let mut patch = Patch::new("index-slice");
    let mut bound = |suffix: &str, v: i64| {
        let hint = format!("{name}_{suffix}");
        let t = Tensor::from_i64(&hint, &[1], &[v]).ok()?;
        Some(patch.new_initializer(&hint, t))
    };
    let (starts, ends, axes) = (bound("start", i)?, bound("end", end)?, bound("axis", axis)?);
    let sliced = match moved {
        Some(_) => patch.new_value(&format!("{name}_sliced")),
        None => out.into(),
    };
    let bounds = [Some(data.into()), Some(starts), Some(ends), Some(axes)];
    patch
        .remove_node(id)
        .add_node("Slice", "", &bounds, &[sliced], vec![]);
    if let Some(perm) = moved {
        let perm = vec![attr::ints("perm", &perm)];
        patch.add_node("Transpose", "", &[Some(sliced)], &[out.into()], perm);
    }
    Some(patch)
}
