//! Per-layer sensitivity and automatic exclusion (`--auto-exclude`): which quantized layers
//! cost the most accuracy, and how many of them must stay float for the result to keep the
//! user's tolerance.
//!
//! Calibrates once; then quantizes one layer at a time (every other layer excluded) and
//! measures each single-layer model against the float one on the validation batches (the
//! lowest cosine over the outputs, then the largest absolute error). Finally it quantizes
//! everything, and while the tolerance breaks, keeps the next most sensitive layer float.
//! Safe because it only ever chooses what `insert_qdq` quantizes; every model it keeps has been
//! validated against the float model on batches calibration did not see.

use crate::error::{Error, Result};
use crate::exec::{Batch, Engine, Reference, Tolerance, ValidateOptions, Validation};
use crate::ir::Model;
use crate::passes::Rewrites;
use crate::quant::qdq::{self, QdqOptions, QdqOutcome, Selector};
use crate::quant::{calibrate, quantize_static, QuantReport, Ranges, StaticOptions};

/// What quantizing one layer alone did to the outputs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerSensitivity {
    pub node: String,
    /// The lowest cosine similarity over the outputs.
    pub cosine: f64,
    /// The largest absolute error over the outputs.
    pub max_abs: f64,
}

/// The outcome of `--auto-exclude`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AutoExclusion {
    /// Every quantized layer, most sensitive first.
    pub sensitivities: Vec<LayerSensitivity>,
    /// The layers kept float, most sensitive first.
    pub excluded: Vec<String>,
    /// Whether the final model keeps the tolerance (false: every layer was tried).
    pub passed: bool,
}

/// Static INT8 as `quantize_static`, keeping the most sensitive layers float until the
/// quantized model keeps `tolerance` on `validation`; the report's `auto_exclusion` says what
/// was measured and kept float. `on_step(what, done, total)` reports progress.
pub fn quantize_static_auto_exclude(
    model: &mut Model,
    calibration_batches: &[Batch],
    validation: &[Batch],
    options: &StaticOptions,
    tolerance: &Tolerance,
    on_step: &(dyn Fn(&str, usize, usize) + Sync),
) -> Result<QuantReport> {
    if tolerance.max_abs.is_none() && tolerance.min_cosine.is_none() && tolerance.max_kl.is_none() {
        return Err(Error::Quantization(
            "--auto-exclude needs a tolerance to keep (--max-error, --min-cosine or --max-kl)"
                .into(),
        ));
    }
    if !qdq::quantization_ops(model).is_empty() {
        // Nothing to choose: the model is left as it is, as `quantize_static` leaves it.
        return quantize_static(model, calibration_batches, options, &|_, _| {});
    }
    let (unpacked, smoothing) = super::prepare_float(
        model,
        calibration_batches,
        &options.qdq,
        options.smooth_quant,
    )?;
    let float = model.clone();
    let names = qdq::activations_to_calibrate(&float, &options.qdq);
    let calibration = calibrate::calibrate(
        &float,
        &names,
        calibration_batches,
        options.method,
        &|done, total| on_step("calibrating", done, total),
    )?;
    // What calibration saw nothing of stays float in every candidate.
    let kept = StaticOptions {
        qdq: super::keeping_unobserved_float(&float, &options.qdq, &calibration.unobserved)?,
        ..options.clone()
    };
    let options = &kept;
    let layers = qdq::quantized_layers(&float, &options.qdq);
    let cannot_validate = |e| Error::Quantization(format!("cannot validate: {e}"));
    // The float model's outputs, once for every candidate.
    // Both sides in one engine: the quantized models are compared by their quantization
    // error, which a second engine's rounding must not add to.
    let engine = Engine::Auto.choose(&[&float]);
    let expected =
        Reference::run(&float, validation.to_vec(), engine, &|_, _| {}).map_err(cannot_validate)?;
    let compare = |quantized: &Model, tolerance: Tolerance| -> Result<Validation> {
        let options = ValidateOptions {
            tolerance,
            ..Default::default()
        };
        expected
            .compare(quantized, engine, &options, &|_, _| {})
            .map_err(cannot_validate)
    };
    let mut sensitivities = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let others: Vec<String> = layers.iter().filter(|l| *l != layer).cloned().collect();
        let (alone, _) = quantized(&float, &calibration.ranges, options, &others)?;
        let v = compare(&alone, Tolerance::default())?;
        sensitivities.push(LayerSensitivity {
            node: layer.clone(),
            cosine: v.outputs.iter().map(|d| d.cosine).fold(1.0, f64::min),
            max_abs: v.outputs.iter().map(|d| d.max_abs).fold(0.0, f64::max),
        });
        on_step("measuring layers", i + 1, layers.len());
    }
    sensitivities.sort_by(|a, b| {
        a.cosine
            .total_cmp(&b.cosine)
            .then(b.max_abs.total_cmp(&a.max_abs))
    });
    let mut excluded: Vec<String> = Vec::new();
    let (rewrites, passed) = loop {
        let (candidate, rewrites) = quantized(&float, &calibration.ranges, options, &excluded)?;
        let passed = compare(&candidate, tolerance.clone())?.passed();
        on_step("excluding layers", excluded.len(), sensitivities.len());
        match sensitivities.get(excluded.len()) {
            Some(next) if !passed => excluded.push(next.node.clone()),
            _ => {
                *model = candidate;
                let mut rewrites = rewrites;
                rewrites.merge(&unpacked);
                break (rewrites, passed);
            }
        }
    };
    Ok(QuantReport {
        mode: "static-int8",
        target: options.qdq.target,
        calibration: Some(calibration),
        rewrites,
        already_quantized: Vec::new(),
        auto_exclusion: Some(AutoExclusion {
            sensitivities,
            excluded,
            passed,
        }),
        smoothing,
        weight_only: None,
        product_weights: Some(options.qdq.product_weights),
    })
}

fn with_excluded(options: &StaticOptions, excluded: &[String]) -> QdqOptions {
    let mut qdq = options.qdq.clone();
    qdq.selection
        .exclude
        .extend(excluded.iter().cloned().map(Selector::Name));
    qdq
}

/// `float` quantized with `ranges`, the layers `excluded` kept float, and the rewrites.
fn quantized(
    float: &Model,
    ranges: &Ranges,
    options: &StaticOptions,
    excluded: &[String],
) -> Result<(Model, Rewrites)> {
    let mut model = float.clone();
    let rewrites = match qdq::insert_qdq(&mut model, ranges, &with_excluded(options, excluded))? {
        QdqOutcome::Quantized(r) => r,
        QdqOutcome::AlreadyQuantized { .. } => Rewrites::default(),
    };
    Ok((model, rewrites))
}
