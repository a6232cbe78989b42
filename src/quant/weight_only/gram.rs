//! What a low-bit weight's calibrated quantization needs to know of the activations it
//! multiplies: the Gram matrix `XᵀX` of its input X `[rows, K]` over the calibration batches.
//! The output error of a weight change D `[K, N]` on those rows is `tr(Dᵀ·XᵀX·D)`, so the Gram
//! matrix is all `gptq` reads, and its size (K² floats) does not grow with the batches.
//!
//! One run per batch returns every requested input at once (extra outputs of the same run,
//! through `exec::for_each_batch`, as calibration gathers its activations); each is folded
//! into its Gram matrix and dropped. Positions a right-padded batch masks out
//! (its rank-2 `attention_mask` is 0 there) are left out: padding tokens are not text.

use std::collections::HashMap;

use tract_onnx::prelude::Tensor;
use tract_onnx::tract_hir::internal::tract_ndarray::{linalg::general_mat_mul, Array2, ArrayView2};

use crate::exec::{for_each_batch, Batch, Engine, ExecError};
use crate::ir::{Model, ValueId};

/// `XᵀX` of one MatMul input over the calibration rows.
#[derive(Clone, Debug)]
pub struct Gram {
    /// `[K, K]`.
    pub matrix: Array2<f32>,
    /// The rows summed.
    pub rows: usize,
}

/// The Gram matrix of each of `values` (MatMul inputs, features last) over `batches`, run in
/// the engine `engine` picks for `model`.
pub fn collect(
    model: &Model,
    values: &[ValueId],
    batches: &[Batch],
    engine: Engine,
) -> Result<HashMap<ValueId, Gram>, ExecError> {
    if batches.is_empty() {
        return Err(ExecError::Input("no calibration batches".into()));
    }
    let g = &model.graph;
    let (inputs, computed): (Vec<ValueId>, Vec<ValueId>) =
        values.iter().partition(|&&v| g.is_graph_input(v));
    let names: Vec<String> = computed
        .iter()
        .map(|&v| g.value_name(v).to_string())
        .collect();
    let mut grams: HashMap<ValueId, Gram> = HashMap::new();
    for_each_batch(model, engine, &names, batches, |run, outputs| {
        if run.index == 0 {
            // A start, or a start over in another engine (`for_each_batch`).
            grams.clear();
        }
        let batch = run.batch;
        let mask = attention_mask(batch);
        for (&v, (name, t)) in computed.iter().zip(&outputs) {
            fold(&mut grams, v, name, t, mask.as_deref())?;
        }
        for &v in &inputs {
            let name = g.value_name(v);
            if let Some(t) = batch.tensor(name) {
                fold(&mut grams, v, name, t, mask.as_deref())?;
            }
        }
        Ok::<_, ExecError>(())
    })?;
    Ok(grams)
}

/// The batch's rank-2 attention mask as one flag per position, if it has one.
fn attention_mask(batch: &Batch) -> Option<Vec<bool>> {
    let (_, t) = batch
        .tensors
        .iter()
        .find(|(name, t)| name.contains("attention_mask") && t.rank() == 2)?;
    let t = t.cast_to::<f32>().ok()?;
    let view = t.to_plain_array_view::<f32>().ok()?;
    Some(view.iter().map(|&m| m != 0.0).collect())
}

/// Adds the rows of `t` (features last) that `mask` keeps to the Gram matrix of `v`.
fn fold(
    grams: &mut HashMap<ValueId, Gram>,
    v: ValueId,
    name: &str,
    t: &Tensor,
    mask: Option<&[bool]>,
) -> Result<(), ExecError> {
    let bad = |e: anyhow::Error| ExecError::Input(format!("value `{name}`: {e}"));
    let t = t.cast_to::<f32>().map_err(bad)?;
    let view = t.to_plain_array_view::<f32>().map_err(bad)?;
    let k = view.shape().last().copied().unwrap_or(1).max(1);
    let values = view
        .as_slice()
        .ok_or_else(|| ExecError::Input(format!("value `{name}` is not contiguous")))?;
    let rows = values.len() / k;
    let kept: Vec<f32>;
    let x = match mask.filter(|m| m.len() == rows) {
        Some(mask) => {
            kept = values
                .chunks(k)
                .zip(mask)
                .filter(|(row, &keep)| keep && row.iter().all(|x| x.is_finite()))
                .flat_map(|(row, _)| row.iter().copied())
                .collect();
            &kept[..]
        }
        None => values,
    };
    let x = ArrayView2::from_shape((x.len() / k, k), x)
        .map_err(|e| ExecError::Input(format!("value `{name}`: {e}")))?;
    let gram = grams.entry(v).or_insert_with(|| Gram {
        matrix: Array2::zeros((k, k)),
        rows: 0,
    });
    if gram.matrix.nrows() != k {
        return Err(ExecError::Input(format!("value `{name}` changed width")));
    }
    general_mat_mul(1.0, &x.t(), &x, 1.0, &mut gram.matrix);
    gram.rows += x.nrows();
    Ok(())
}
