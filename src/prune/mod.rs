//! Pruning: magnitude and N:M sparsity written into the weights, and structured pruning of
//! attention heads and FFN neurons that shrinks the weight matrices themselves.
//!
//! Structured pruning runs first (it removes rows and columns), then the unstructured kinds
//! zero what is left. Neither is exact: pruning without fine-tuning changes the outputs, so
//! callers validate afterwards like after any pass, and the report says what was cut.

pub mod mask;
pub mod structured;
pub mod weights;

use crate::error::{Error, Result};
use crate::exec::features::feature_energy;
use crate::exec::Batch;
use crate::ir::{Model, Patch, Tensor, ValueId};
use crate::ops::weights::features_last_axis;
use crate::passes::cse::CommonSubexpressions;
use crate::passes::dce::DeadCodeElimination;
use crate::passes::shape::ShapeInference;
use crate::passes::{Pass, Rewrites};
use mask::{AxisLayout, Mask};
use structured::StructuredReport;
use weights::{prunable_weights, PrunableWeight, Skipped};

/// Which weights magnitude pruning ranks together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Each weight loses the same fraction of its own values.
    Layer,
    /// One threshold over all prunable weights: layers with many small weights lose more.
    Global,
}

/// Zeros written into the weights (the shapes stay).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum Unstructured {
    /// Zero this fraction of the smallest-magnitude weights.
    Magnitude { sparsity: f64, scope: Scope },
    /// Keep the `n` largest of every `m` consecutive weights along the reduction axis.
    NOfM { n: usize, m: usize },
}

impl Unstructured {
    /// Parses `0.3` (magnitude, with `scope`) or `2:4` (N:M).
    pub fn parse(text: &str, scope: Scope) -> Result<Unstructured> {
        let bad = |why: &str| Error::InvalidArgument(format!("--prune `{text}`: {why}"));
        if let Some((n, m)) = text.split_once(':') {
            let (n, m) = (n.trim().parse::<usize>(), m.trim().parse::<usize>());
            return match (n, m) {
                (Ok(n), Ok(m)) if n >= 1 && n < m => Ok(Unstructured::NOfM { n, m }),
                _ => Err(bad("expected N:M with 1 ≤ N < M, such as 2:4")),
            };
        }
        match text.trim().parse::<f64>() {
            Ok(s) if (0.0..1.0).contains(&s) => Ok(Unstructured::Magnitude { sparsity: s, scope }),
            _ => Err(bad(
                "expected a sparsity in [0, 1) such as 0.3, or N:M such as 2:4",
            )),
        }
    }
}

/// What ranked the pruned weights or units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Importance {
    /// The weights alone (magnitudes, norms).
    #[default]
    Weights,
    /// Activations on calibration batches, times the weights that read them.
    Activations { batches: usize },
}

/// What to prune.
#[derive(Clone, Debug, Default)]
pub struct PruneOptions {
    pub unstructured: Option<Unstructured>,
    /// Fraction of each attention block's heads to remove.
    pub heads: Option<f64>,
    /// Fraction of each FFN block's neurons to remove.
    pub ffn: Option<f64>,
    /// Batches whose activations rank heads, neurons and weights; empty: the weights do.
    pub calibration: Vec<Batch>,
    /// Magnitude pruning also zeroes embedding tables (read by Gather).
    pub embeddings: bool,
}

impl PruneOptions {
    pub fn is_empty(&self) -> bool {
        self.unstructured.is_none() && self.heads.is_none() && self.ffn.is_none()
    }
}

/// The sparsity of one weight after pruning.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct WeightSparsity {
    pub weight: String,
    pub dims: Vec<i64>,
    /// Zeros the weight held before pruning.
    pub zeros_before: usize,
    pub zeros: usize,
    pub sparsity: f64,
}

/// What pruning did, for the report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PruneReport {
    pub unstructured: Option<Unstructured>,
    /// What ranked the weights unstructured pruning zeroed.
    pub unstructured_importance: Importance,
    /// Every weight unstructured pruning touched.
    pub weights: Vec<WeightSparsity>,
    /// Zeros over all values of the touched weights.
    pub sparsity: f64,
    /// Weights left alone, and why.
    pub skipped: Vec<Skipped>,
    pub structured: StructuredReport,
    /// Float parameters in the initializers, before and after.
    pub parameters_before: usize,
    pub parameters_after: usize,
    pub rewrites: Rewrites,
}

/// Prunes `model` as `options` say; returns what it did.
pub fn prune(model: &mut Model, options: &PruneOptions) -> Result<PruneReport> {
    let mut report = PruneReport {
        unstructured: options.unstructured,
        parameters_before: float_parameters(model),
        ..Default::default()
    };
    if options.heads.is_some() || options.ffn.is_some() {
        // Shrinking needs every value's shape; the cut changes them, so types are recorded
        // anew afterwards (stale value_info would contradict the smaller weights).
        ShapeInference.run(model)?;
        report.structured = structured::prune_structured(model, options, &mut report.rewrites)?;
        ShapeInference.run(model)?;
    }
    if let Some(kind) = options.unstructured {
        let (weights, skipped) = prunable_weights(&model.graph, options.embeddings);
        report.skipped = skipped;
        report.unstructured_importance = importance(&options.calibration);
        prune_unstructured(model, &weights, kind, &options.calibration, &mut report)?;
    }
    // Each block's cut copied the shape constants it shares with others: merge the copies.
    report.rewrites.merge(&CommonSubexpressions.run(model)?);
    report.rewrites.merge(&DeadCodeElimination.run(model)?);
    report.parameters_after = float_parameters(model);
    Ok(report)
}

fn float_parameters(model: &Model) -> usize {
    model
        .graph
        .initializers()
        .filter(|(_, t)| t.dtype() == crate::ir::DataType::Float)
        .map(|(_, t)| t.numel())
        .sum()
}

fn calibration_run(e: crate::exec::ExecError) -> Error {
    Error::Pruning(format!("calibration run: {e}"))
}

fn importance(calibration: &[Batch]) -> Importance {
    match calibration.len() {
        0 => Importance::Weights,
        batches => Importance::Activations { batches },
    }
}

fn prune_unstructured(
    model: &mut Model,
    weights: &[PrunableWeight],
    kind: Unstructured,
    calibration: &[Batch],
    report: &mut PruneReport,
) -> Result<()> {
    let g = &model.graph;
    let mut values: Vec<Vec<f32>> = Vec::with_capacity(weights.len());
    // Each weight to prune with its dims.
    let mut eligible: Vec<(&PrunableWeight, Vec<usize>)> = Vec::with_capacity(weights.len());
    for w in weights {
        let Some(t) = g.initializer(w.value) else {
            continue;
        };
        let dims: Vec<usize> = t.dims().iter().map(|&d| d as usize).collect();
        if let Unstructured::NOfM { m, .. } = kind {
            let reason = match w.reduction_axis {
                None => Some("an embedding table has no reduction axis to group".to_string()),
                Some(axis) if !dims[axis].is_multiple_of(m) => Some(format!(
                    "its reduction length {} does not divide by {m}",
                    dims[axis]
                )),
                Some(_) => None,
            };
            if let Some(reason) = reason {
                let weight = g.value_name(w.value).to_string();
                report.skipped.push(Skipped { weight, reason });
                continue;
            }
        }
        values.push(t.to_f32_vec()?);
        eligible.push((w, dims));
    }
    // The masks rank |w|, or |w|·‖x‖ with calibration data.
    let scores = if calibration.is_empty() {
        None
    } else {
        Some(activation_scores(model, &eligible, &values, calibration)?)
    };
    let ranked = scores.as_ref().unwrap_or(&values);
    let masks: Vec<Mask> = match kind {
        Unstructured::Magnitude { sparsity, scope } => match scope {
            Scope::Global => {
                let slices: Vec<&[f32]> = ranked.iter().map(Vec::as_slice).collect();
                mask::smallest_magnitudes(&slices, sparsity)
            }
            Scope::Layer => ranked
                .iter()
                .map(|v| mask::smallest_magnitudes(&[v], sparsity).remove(0))
                .collect(),
        },
        Unstructured::NOfM { n, m } => eligible
            .iter()
            .zip(ranked)
            .map(|((w, dims), v)| {
                let layout = AxisLayout::new(dims, w.reduction_axis.unwrap_or(0));
                mask::n_of_m(v, layout, n, m)
            })
            .collect(),
    };
    drop(scores);
    let rewrite_kind = match kind {
        Unstructured::Magnitude { .. } => "magnitude-pruned-weight",
        Unstructured::NOfM { .. } => "n-of-m-pruned-weight",
    };
    let (mut zeros, mut total) = (0usize, 0usize);
    for (((w, dims), mut v), m) in eligible.into_iter().zip(values).zip(masks) {
        let zeros_before = v.iter().filter(|&&x| x == 0.0).count();
        mask::apply(&mut v, &m);
        let after = v.iter().filter(|&&x| x == 0.0).count();
        let name = model.graph.value_name(w.value).to_string();
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        zeros += after;
        total += v.len();
        report.weights.push(WeightSparsity {
            weight: name.clone(),
            dims: dims.clone(),
            zeros_before,
            zeros: after,
            sparsity: after as f64 / v.len().max(1) as f64,
        });
        if after > zeros_before {
            let mut patch = Patch::new(rewrite_kind);
            patch.replace_initializer(w.value, Tensor::from_f32(&name, &dims, &v)?);
            report.rewrites.apply(model, patch)?;
        }
    }
    report.sparsity = zeros as f64 / total.max(1) as f64;
    Ok(())
}

/// Each weight scored `|w|·√E[x_k²]`, `x_k` the input feature it multiplies, averaged over
/// the calibration batches (Wanda's score: a small weight on a large activation matters more
/// than its magnitude says). A weight whose readers do not all compute `x·W` from one `x`
/// with features last (a transposed Gemm input, a Conv, an embedding table) keeps `|w|`.
fn activation_scores(
    model: &Model,
    weights: &[(&PrunableWeight, Vec<usize>)],
    values: &[Vec<f32>],
    calibration: &[Batch],
) -> Result<Vec<Vec<f32>>> {
    let g = &model.graph;
    let multiplied = |w: &PrunableWeight, rank: usize| -> Option<ValueId> {
        w.reduction_axis?;
        let mut inputs = g.uses(w.value).iter().map(|&(reader, _)| {
            let node = g.node(reader);
            features_last_axis(node, rank).and_then(|_| node.input(0))
        });
        let first = inputs.next()??;
        inputs.all(|x| x == Some(first)).then_some(first)
    };
    let inputs: Vec<Option<ValueId>> = weights
        .iter()
        .map(|(w, dims)| multiplied(w, dims.len()))
        .collect();
    let mut distinct: Vec<ValueId> = inputs.iter().flatten().copied().collect();
    distinct.sort();
    distinct.dedup();
    distinct.retain(|&x| g.value_type(x).and_then(|t| t.shape).is_some());
    let energy = feature_energy(model, &distinct, calibration).map_err(calibration_run)?;
    let scores = weights
        .iter()
        .zip(values)
        .zip(&inputs)
        .map(|(((w, dims), v), x)| {
            let axis = w.reduction_axis.unwrap_or(0);
            let features = x
                .and_then(|x| energy.get(&x))
                .filter(|e| Some(&e.len()) == dims.get(axis));
            match features {
                Some(e) => {
                    let layout = AxisLayout::new(dims, axis);
                    let rms: Vec<f32> = e.iter().map(|e| e.sqrt() as f32).collect();
                    v.iter()
                        .enumerate()
                        .map(|(i, w)| w.abs() * rms[(i / layout.stride) % layout.len])
                        .collect()
                }
                None => v.iter().map(|w| w.abs()).collect(),
            }
        })
        .collect();
    Ok(scores)
}
