//! Padding: which positions of an observed value hold real tokens.
//!
//! Calibration batches of text come padded (to the batch's longest row, or to a fixed
//! length), and at padded positions (attention mask 0) a transformer's activations are
//! garbage that nothing downstream reads. Counted in a range they stretch it: on
//! all-MiniLM-L6-v2 calibrated on sentences padded to 128 tokens, nine positions in ten are
//! padding. Statistics that size quantization skip them where the layout is proven.
//!
//! A value is indexed by a mask when its first two axes are the mask's `[batch, sequence]`:
//! shape inference gives both the same symbolic dims (`batch`, `sequence`), or, for a model
//! exported with fixed shapes, the same sizes with the sequence size nowhere among the
//! value's later axes (a `[batch, heads, sequence, …]` tensor whose head count happens to
//! equal the sequence length would otherwise pass). Anything else, attention scores `[batch,
//! heads, sequence, sequence]`, flattened `[batch·sequence, hidden]` rows, values of unknown
//! shape, keeps every position. A mask is a 2-D integer or boolean graph input named like one
//! (`attention_mask`, `input_mask`), where non-zero keeps a position; PyTorch's
//! `*_padding_mask`, where true marks padding, is not one.

use tract_onnx::prelude::{tract_ndarray::ArrayViewD, Tensor};

use crate::ir::{DataType, Dim, Model};
use crate::passes::shape;

/// For each of `names`, the graph input masking its first two axes (see the module doc), if
/// one is proven to.
pub fn masks_indexing(model: &Model, names: &[String]) -> Vec<Option<String>> {
    let g = &model.graph;
    let inference = shape::infer(model);
    let masks: Vec<(&str, &[Dim])> = g
        .inputs
        .iter()
        .filter(|p| g.initializer(p.value).is_none())
        .filter_map(|p| {
            let name = g.value_name(p.value);
            let lower = name.to_ascii_lowercase();
            let t = inference.types.get(&p.value)?;
            let integer = [DataType::Int64, DataType::Int32, DataType::Bool]
                .iter()
                .any(|&d| d as i32 == t.elem);
            let dims = t.shape.as_deref().filter(|d| d.len() == 2)?;
            (integer && lower.contains("mask") && !lower.contains("padding"))
                .then_some((name, dims))
        })
        .collect();
    names
        .iter()
        .map(|name| {
            let dims = inference.shape(g.find_value(name)?)?;
            let (mask, _) = masks.iter().find(|(_, mask)| leads_with(dims, mask))?;
            Some(mask.to_string())
        })
        .collect()
}

/// True when `dims` provably start with the mask's `[batch, sequence]`.
fn leads_with(dims: &[Dim], mask: &[Dim]) -> bool {
    let [batch, sequence] = mask else {
        return false;
    };
    let [b, s, rest @ ..] = dims else {
        return false;
    };
    if !(b.same(batch) && s.same(sequence)) {
        return false;
    }
    // A known sequence size proves nothing when a later axis has it too (see the module doc).
    sequence.value().is_none() || !rest.iter().any(|d| d.same(sequence))
}

/// The values of `x` at the positions `mask` keeps (its non-zero `[batch, sequence]`
/// entries), each position's trailing axes whole; `None` when `x` does not start with the
/// mask's shape in this run, the mask cannot be read, or it keeps no position, so that the
/// caller observes every value instead.
pub fn unpadded(x: &ArrayViewD<f32>, mask: &Tensor) -> Option<Vec<f32>> {
    let mask = super::compare::as_i64(mask).ok()?;
    let shape = x.shape();
    let (rows, inner) = match shape {
        [b, s, rest @ ..] => (b * s, rest.iter().product::<usize>()),
        _ => return None,
    };
    let kept = mask.iter().filter(|&&m| m != 0).count();
    if rows != mask.len() || kept == 0 {
        return None;
    }
    let mut values = Vec::with_capacity(kept * inner);
    let all: Vec<f32>;
    let flat = match x.as_slice() {
        Some(flat) => flat,
        None => {
            all = x.iter().copied().collect();
            &all
        }
    };
    for (row, _) in flat
        .chunks_exact(inner.max(1))
        .zip(&mask)
        .filter(|(_, &m)| m != 0)
    {
        values.extend_from_slice(row);
    }
    Some(values)
}

/// A float `x` at the positions `mask` keeps, as float32 `[kept positions, trailing axes…]`
/// (see `unpadded`); `None` for another element type, or where `unpadded` keeps every value.
pub fn kept_positions(x: &Tensor, mask: &Tensor) -> Option<Tensor> {
    if !x.datum_type().is_float() {
        return None;
    }
    let float = x.cast_to::<f32>().ok()?;
    let values = unpadded(&float.to_plain_array_view::<f32>().ok()?, mask)?;
    let trailing = x.shape().get(2..)?;
    let kept = values.len() / trailing.iter().product::<usize>().max(1);
    let shape: Vec<usize> = std::iter::once(kept)
        .chain(trailing.iter().copied())
        .collect();
    Tensor::from_shape(&shape, &values).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::tract_ndarray::{arr2, Array3};

    fn dims(spec: &[&str]) -> Vec<Dim> {
        spec.iter()
            .map(|d| d.parse().map(Dim::known).unwrap_or_else(|_| Dim::symbol(d)))
            .collect()
    }

    #[test]
    fn a_value_is_indexed_by_the_mask_only_when_its_layout_is_proven() {
        let symbolic = dims(&["batch", "sequence"]);
        assert!(leads_with(&dims(&["batch", "sequence", "384"]), &symbolic));
        assert!(!leads_with(
            &dims(&["batch", "12", "sequence", "sequence"]),
            &symbolic
        ));
        assert!(!leads_with(&dims(&["sequence", "batch", "384"]), &symbolic));
        assert!(!leads_with(
            &[Dim::Unknown, Dim::Unknown],
            &[Dim::Unknown, Dim::Unknown]
        ));
        let fixed = dims(&["1", "12"]);
        assert!(leads_with(&dims(&["1", "12", "384"]), &fixed));
        // 12 heads over 12 tokens: the heads axis is not the sequence.
        assert!(!leads_with(&dims(&["1", "12", "12", "32"]), &fixed));
    }

    #[test]
    fn padded_rows_are_left_out() {
        let x = Array3::from_shape_fn((2, 3, 2), |(b, s, f)| (b * 100 + s * 10 + f) as f32);
        let mask = Tensor::from(arr2(&[[1i64, 1, 0], [1, 0, 0]]));
        let kept = unpadded(&x.view().into_dyn(), &mask).unwrap();
        assert_eq!(kept, [0.0, 1.0, 10.0, 11.0, 100.0, 101.0]);
        // Another shape than the mask's in this run, or no position kept: every value.
        let other = Tensor::from(arr2(&[[1i64, 1], [1, 0]]));
        assert_eq!(unpadded(&x.view().into_dyn(), &other), None);
        let none = Tensor::from(arr2(&[[0i64, 0, 0], [0, 0, 0]]));
        assert_eq!(unpadded(&x.view().into_dyn(), &none), None);
    }

    #[test]
    fn kept_positions_are_rows_of_the_trailing_axes() {
        let x = Tensor::from(Array3::from_shape_fn((2, 3, 2), |(b, s, f)| {
            (b * 100 + s * 10 + f) as f32
        }));
        let mask = Tensor::from(arr2(&[[1i64, 1, 0], [0, 1, 0]]));
        let kept = kept_positions(&x, &mask).unwrap();
        assert_eq!(kept.shape(), [3, 2]);
        assert_eq!(
            kept.to_plain_array_view::<f32>()
                .unwrap()
                .as_slice()
                .unwrap(),
            [0.0, 1.0, 10.0, 11.0, 110.0, 111.0]
        );
        // Integer outputs are compared whole.
        let ids = Tensor::from(arr2(&[[1i64, 2, 3], [4, 5, 6]]));
        assert!(kept_positions(&ids, &mask).is_none());
    }
}
