//! Activation statistics for structured pruning: the mean square of every feature of the
//! values whose features are the units (attention outputs, FFN hidden states), measured by
//! running the model in tract on the user's calibration batches.
//!
//! A unit's contribution to what follows is its activation times the weights that read it;
//! weight norms alone miss units that are large in the weights but rarely active, which
//! calibration data shows.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::exec::{Batch, Runner};
use crate::ir::{Model, ValueId};

/// Mean square of each feature (last axis) of a value, over every position of every batch.
pub type FeatureEnergy = HashMap<ValueId, Vec<f64>>;

/// The feature energy of `values` (each with features on its last axis) over `batches`.
pub fn feature_energy(
    model: &Model,
    values: &[ValueId],
    batches: &[Batch],
) -> Result<FeatureEnergy> {
    let failed = |e: crate::exec::ExecError| Error::Pruning(format!("calibration run: {e}"));
    if batches.is_empty() {
        return Err(Error::Pruning("no calibration batches".into()));
    }
    let names: Vec<String> = values
        .iter()
        .map(|&v| model.graph.value_name(v).to_string())
        .collect();
    let mut runner = Runner::with_outputs(model, &names).map_err(failed)?;
    let mut sums: Vec<Vec<f64>> = vec![Vec::new(); values.len()];
    let mut rows = vec![0usize; values.len()];
    for batch in batches {
        for (i, (name, t)) in runner.run(batch).map_err(failed)?.iter().enumerate() {
            let bad = |e: anyhow::Error| Error::Pruning(format!("activation `{name}`: {e}"));
            let t = t.cast_to::<f32>().map_err(bad)?;
            let view = t.to_plain_array_view::<f32>().map_err(bad)?;
            let width = view.shape().last().copied().unwrap_or(1).max(1);
            let sum = &mut sums[i];
            sum.resize(width, 0.0);
            if sum.len() != width {
                return Err(Error::Pruning(format!("activation `{name}` changed width")));
            }
            for (k, &x) in view.iter().enumerate() {
                if x.is_finite() {
                    sum[k % width] += f64::from(x) * f64::from(x);
                }
            }
            rows[i] += view.len() / width;
        }
    }
    Ok(values
        .iter()
        .zip(sums)
        .zip(rows)
        .map(|((&v, sum), rows)| (v, sum.into_iter().map(|s| s / rows.max(1) as f64).collect()))
        .collect())
}
