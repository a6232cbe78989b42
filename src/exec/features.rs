//! Per-feature activation statistics: the model run in tract on calibration batches, each
//! requested value reduced over every position to one number per feature (its last axis).
//!
//! Pruning ranks units and weights by the mean square of what they read or write; SmoothQuant
//! sizes its per-channel scales by the largest |x| of each channel.

use std::collections::HashMap;

use super::{Batch, Engine, ExecError};
use crate::ir::{Model, ValueId};

/// One number per feature (last axis) of each value.
pub type FeatureStats = HashMap<ValueId, Vec<f64>>;

/// The mean square of each feature of `values` over `batches`, every position counted.
pub fn feature_energy(
    model: &Model,
    values: &[ValueId],
    batches: &[Batch],
) -> Result<FeatureStats, ExecError> {
    let (sums, positions) = reduce(model, values, batches, |acc, x| acc + x * x)?;
    Ok(values
        .iter()
        .zip(sums)
        .zip(positions)
        .map(|((&v, sum), n)| (v, sum.into_iter().map(|s| s / n.max(1) as f64).collect()))
        .collect())
}

/// The largest |x| of each feature of `values` over `batches`.
pub fn feature_abs_max(
    model: &Model,
    values: &[ValueId],
    batches: &[Batch],
) -> Result<FeatureStats, ExecError> {
    let (maxima, _) = reduce(model, values, batches, |acc, x| acc.max(x.abs()))?;
    Ok(values.iter().copied().zip(maxima).collect())
}

/// Folds every finite element of each of `values` into its feature's accumulator (starting
/// at 0) with `fold`; returns the accumulators and the positions each value had.
fn reduce(
    model: &Model,
    values: &[ValueId],
    batches: &[Batch],
    fold: impl Fn(f64, f64) -> f64,
) -> Result<(Vec<Vec<f64>>, Vec<usize>), ExecError> {
    if batches.is_empty() {
        return Err(ExecError::Input("no calibration batches".into()));
    }
    let names: Vec<String> = values
        .iter()
        .map(|&v| model.graph.value_name(v).to_string())
        .collect();
    let mut accumulators: Vec<Vec<f64>> = vec![Vec::new(); values.len()];
    let mut positions = vec![0usize; values.len()];
    super::for_each_batch(model, Engine::Auto, &names, batches, |run, outputs| {
        if run.index == 0 {
            // A start, or a start over in another engine (`for_each_batch`).
            accumulators.iter_mut().for_each(Vec::clear);
            positions.fill(0);
        }
        for (i, (name, t)) in outputs.iter().enumerate() {
            let bad = |e: anyhow::Error| ExecError::Input(format!("value `{name}`: {e}"));
            let t = t.cast_to::<f32>().map_err(bad)?;
            let view = t.to_plain_array_view::<f32>().map_err(bad)?;
            let width = view.shape().last().copied().unwrap_or(1).max(1);
            let acc = &mut accumulators[i];
            acc.resize(width, 0.0);
            if acc.len() != width {
                return Err(ExecError::Input(format!("value `{name}` changed width")));
            }
            for (k, &x) in view.iter().enumerate() {
                if x.is_finite() {
                    acc[k % width] = fold(acc[k % width], f64::from(x));
                }
            }
            positions[i] += view.len() / width;
        }
        Ok(())
    })?;
    Ok((accumulators, positions))
}
