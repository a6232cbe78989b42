//! The whole of `onnxopt optimize`, as a library call: options in, the optimized model and
//! its report out. The command line and the Python binding are two thin callers of it.
//!
//! The order of the steps, and why:
//! 1. the pass pipeline (`optimize`): fusions first, so that what follows sees fused blocks;
//! 2. pruning, on the fused model, before any quantization, so that calibration sees the
//!    pruned weights (`--prune 2:4 --int8` calibrates the pruned model);
//! 3. one of dynamic INT8, FP16, static INT8 or weight-only 4/8 bits (they exclude each other);
//! 4. validation of the result against the input model, on batches calibration did not see
//!    (the last fifth of the calibration batches given, or the `inputs`), when asked for or
//!    when a step was lossy — a lossy run gates only on the tolerances given;
//!    (`check: false` waives a lossy step's validation when no limit was given: the output is
//!    then written unvalidated, for a model no engine here can run);
//! 5. otherwise the output check: both models run on small generated inputs (two rows, the
//!    second padded, so that a mask read the wrong way shows) and the output must match the
//!    input's within a float tolerance. A rewrite that breaks a model the passes did not
//!    foresee is caught here: the pipeline then retries with each fusion left out in turn and
//!    keeps the first result that passes, saying which fusion it left out and why; if none
//!    passes, nothing is returned for writing.
//!
//! Nothing here writes files: the caller saves `Outcome::model` (or does not, on error).

use crate::error::Error;
use crate::exec::{
    self, Batch, Engine, ExecError, GenerateOptions, InputSource, Tolerance, ValidateOptions,
    Validation,
};
use crate::ir::Model;
use crate::optimize::OptimizeOptions;
use crate::passes::dce::DeadCodeElimination;
use crate::passes::fuse::embed_layernorm::EmbedLayerNormFusion;
use crate::passes::fuse::Fusion;
use crate::passes::{Pass, Rewrites};
use crate::prune::PruneOptions;
use crate::quant::weight_only::{WeightMethod, WeightOnlyOptions};
use crate::quant::{self, dynamic::DynamicOptions, fp16::Fp16Options, StaticOptions};
use crate::report::{Check, CheckOutcome, Report};

/// The lossy step, if any.
#[derive(Clone, Debug, Default)]
pub enum Mode {
    /// Float32 as read: only lossless rewrites.
    #[default]
    Float,
    /// Static INT8: calibrated Q/DQ (`auto_exclude`: keep the most sensitive layers float
    /// until the tolerance holds).
    Static {
        options: StaticOptions,
        auto_exclude: bool,
    },
    /// Dynamic INT8.
    Dynamic(DynamicOptions),
    /// Weight-only 4 or 8 bits (round-to-nearest, or GPTQ on the calibration batches).
    WeightOnly(WeightOnlyOptions),
    Fp16(Fp16Options),
}

impl Options {
    /// The optimization this run does: for a mode that converts the embedding tables (INT8
    /// per row, float16), without the EmbedLayerNormalization fusion, whose kernel takes the
    /// tables whole in float32 (`ops::embed_layer_norm`): they would stay float32, and the
    /// output grow by them.
    fn optimize_options(&self) -> OptimizeOptions {
        let mut optimize = self.optimize.clone();
        let converts_tables = matches!(
            self.mode,
            Mode::Static { .. } | Mode::Dynamic(_) | Mode::Fp16(_)
        );
        let name = EmbedLayerNormFusion::NAME;
        let selected = optimize.passes.is_empty() || optimize.passes.iter().any(|p| p == name);
        if converts_tables && selected && !optimize.skip.iter().any(|p| p == name) {
            optimize.skip.push(name.to_string());
        }
        optimize
    }
}

/// Limits given by the user; a lossless run checks against the defaults where none is given.
#[derive(Clone, Debug, Default)]
pub struct Tolerances {
    pub max_error: Option<f64>,
    pub min_cosine: Option<f64>,
    pub max_kl: Option<f64>,
    /// Softmax temperature of the KL divergence.
    pub kl_temperature: f64,
    /// Outputs compared as logits (default: outputs named like logits).
    pub logits: Vec<String>,
    /// Report both models' next-token perplexity on the validation batches.
    pub perplexity: bool,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub optimize: OptimizeOptions,
    pub prune: PruneOptions,
    pub mode: Mode,
    /// Calibration batches (a folder, arrays, or generated); lent to pruning too.
    pub calibration: Option<InputSource>,
    /// Validation batches; with `InputSource::Generated`, the last fifth of the calibration
    /// batches given (a folder or arrays) is used instead.
    pub inputs: InputSource,
    /// How generated batches are made (dims, value ranges, seed).
    pub generate: GenerateOptions,
    /// Validate even a lossless run, on `inputs`.
    pub validate: bool,
    pub tolerances: Tolerances,
    /// Run the output check when nothing else validates the output; false also waives the
    /// validation of a lossy step that has no limit to keep.
    pub check: bool,
    /// The engine validation and the output check run models in.
    pub engine: Engine,
    /// Name each block the fusions left unfused, with the reason (`Report::unfused`).
    pub explain: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            optimize: OptimizeOptions::default(),
            prune: PruneOptions::default(),
            mode: Mode::Float,
            calibration: None,
            inputs: InputSource::Generated(2),
            generate: GenerateOptions::default(),
            validate: false,
            tolerances: Tolerances {
                kl_temperature: 1.0,
                ..Default::default()
            },
            check: true,
            engine: Engine::Auto,
            explain: false,
        }
    }
}

impl Options {
    fn lossy(&self) -> bool {
        !self.prune.is_empty() || !matches!(self.mode, Mode::Float)
    }
}

/// The result: the model to write and the report to show.
#[derive(Debug)]
pub struct Outcome {
    pub model: Model,
    pub report: Report,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A step failed (a pass, calibration, quantization); `what` names the step.
    #[error("{what}")]
    Step {
        what: &'static str,
        #[source]
        source: Error,
    },
    /// The result must not be written: validation failed or could not be done, or the
    /// output check failed. The report says what was measured. `unsupported`: validation
    /// could not be done because no engine here runs a model faithfully (an operator tract
    /// does not run as its domain defines it, and no ONNX Runtime to run it).
    #[error("{reason}")]
    NotWritten {
        reason: String,
        report: Box<Report>,
        unsupported: bool,
    },
}

/// Progress: a stage (`"calibrating"`, `"validating"`, `"checking"`), and how far it got.
pub type Progress<'a> = &'a (dyn Fn(&str, usize, usize) + Sync);

/// Defaults of a lossless validation (the output check and `--validate` without limits):
/// the max abs error relative to each output's scale, and the cosine.
pub const LOSSLESS_MAX_ERROR: f64 = 1e-4;
pub const LOSSLESS_MIN_COSINE: f64 = 0.9999;
/// The output check's error bound (relative to each output's scale) for a float16 model.
pub const FLOAT16_MAX_ERROR: f64 = 1e-2;
/// The output check's cosine for a model that already quantizes its activations.
pub const QUANTIZED_MIN_COSINE: f64 = 0.999;

/// Seeds of generated calibration batches differ from those of generated validation batches
/// by this, so that validation never reruns the calibration inputs.
const CALIBRATION_SEED_SALT: u64 = 0xca11_b4a7_e000_0000;

/// Generated batches that measure the channels for dynamic INT8's smoothing when the user
/// gives no calibration data.
const SMOOTHING_BATCHES: usize = 8;

/// The output check's inputs: two rows of this length.
const CHECK_ROWS: usize = 2;
const CHECK_LENGTH: usize = 8;

/// Runs the pipeline on `model` (see the module doc).
pub fn run(model: Model, options: &Options, progress: Progress) -> Result<Outcome, PipelineError> {
    let mut outcome = run_steps(model, options, progress)?;
    if options.explain {
        outcome.report.unfused = crate::optimize::explain(&outcome.model, &options.optimize)
            .map_err(|source| PipelineError::Step {
                what: "explaining the fusions",
                source,
            })?;
    }
    Ok(outcome)
}

fn run_steps(
    model: Model,
    options: &Options,
    progress: Progress,
) -> Result<Outcome, PipelineError> {
    let original = model.clone();
    let mut report = Report::new();
    report.warnings.extend(model.repairs.iter().cloned());
    if let Some(src) = &model.source {
        if src.unknown_field_bytes > 0 {
            report.warnings.push(format!(
                "{} bytes of the input hold fields unknown to ONNX 1.23; they are not written",
                src.unknown_field_bytes
            ));
        }
    }
    let (model, held_back) = transform(model, options, &mut report, progress)?;
    // A lossy step validates unless the user waived it (`check: false`) and gave no limit
    // to keep: then the output is written unvalidated, and the report says so.
    let gated = options.tolerances.any_given();
    let validated = options.validate || (options.lossy() && (options.check || gated));
    if validated {
        let validation = validate(&original, &model, options, held_back, &mut report, progress)?;
        report.validation = Some(validation);
        return Ok(Outcome { model, report });
    }
    if !options.check {
        if options.lossy() {
            report
                .warnings
                .push("the output was not validated (--no-check): its errors are not known".into());
        }
        report.check = Some(Check::skipped());
        return Ok(Outcome { model, report });
    }
    check_or_fall_back(original, model, options, report, progress)
}

/// Steps 1–3 of the module doc. Returns the model and the calibration batches held back for
/// validation, if any.
fn transform(
    mut model: Model,
    options: &Options,
    report: &mut Report,
    progress: Progress,
) -> Result<(Model, Option<Vec<Batch>>), PipelineError> {
    let step = |what| move |source| PipelineError::Step { what, source };
    report.target = Some(options.optimize.target);
    let quantizes_activations = matches!(options.mode, Mode::Static { .. } | Mode::Dynamic(_));
    if quantizes_activations && quant::upcast::is_float16(&model) {
        quant::upcast::upcast_float16(&mut model).map_err(step("float32 conversion failed"))?;
        report.warnings.push(FLOAT16_UPCAST_WARNING.into());
    }
    report.passes = Some(
        crate::optimize(&mut model, &options.optimize_options())
            .map_err(step("optimization failed"))?,
    );
    let smooth_dynamic = matches!(&options.mode, Mode::Dynamic(d) if d.smooth_quant.is_some());
    let gptq = matches!(&options.mode, Mode::WeightOnly(o) if o.method == WeightMethod::Gptq);
    let wants_calibration = matches!(options.mode, Mode::Static { .. })
        || gptq
        || smooth_dynamic
        || (!options.prune.is_empty() && options.calibration.is_some());
    let (mut calibration, held_back) = if wants_calibration {
        calibration_batches(&model, options, report).map_err(step("calibration data"))?
    } else {
        (Vec::new(), None)
    };
    if !options.prune.is_empty() {
        // Lent to pruning, and taken back for quantization.
        let mut pruning = options.prune.clone();
        pruning.calibration = std::mem::take(&mut calibration);
        let result = crate::prune::prune(&mut model, &pruning);
        calibration = pruning.calibration;
        report.pruning = Some(result.map_err(step("pruning failed"))?);
    }
    let mut quantized = match &options.mode {
        Mode::Float => None,
        Mode::Dynamic(dynamic) => Some(
            quant::dynamic::quantize_dynamic(&mut model, &calibration, dynamic)
                .map_err(step("quantization failed"))?,
        ),
        Mode::WeightOnly(weight_only) => {
            let on_weight = |done, total| progress("quantizing", done, total);
            Some(
                quant::weight_only::quantize_weights(
                    &mut model,
                    &calibration,
                    weight_only,
                    &on_weight,
                )
                .map_err(step("quantization failed"))?,
            )
        }
        Mode::Fp16(fp16) => Some(
            quant::fp16::convert_fp16(&mut model, fp16).map_err(step("FP16 conversion failed"))?,
        ),
        Mode::Static {
            options: quant_options,
            auto_exclude,
        } => {
            let on_batch = |done, total| progress("calibrating", done, total);
            let result = if *auto_exclude {
                let (source, generate) = validation_inputs(options, held_back.clone());
                let validation = exec::batches_for(&model, &source, &generate)
                    .map_err(|e| exec_step("the validation batches", e))?;
                let tolerance = validate_options(options, &model, source, generate).tolerance;
                quant::sensitivity::quantize_static_auto_exclude(
                    &mut model,
                    &calibration,
                    &validation,
                    quant_options,
                    &tolerance,
                    progress,
                )
            } else {
                quant::quantize_static(&mut model, &calibration, quant_options, &on_batch)
            };
            Some(result.map_err(step("quantization failed"))?)
        }
    };
    if let Some(quantized) = &mut quantized {
        match convert_branches(&mut model, &options.mode).map_err(step("quantization failed"))? {
            Some((in_branches, weights)) => {
                quantized.rewrites.merge(&in_branches);
                if let Some(main) = &mut quantized.weight_only {
                    weights.iter().for_each(|w| main.absorb(w));
                }
            }
            None if crate::passes::branches::computes_in_branches(&model) => {
                report.warnings.push(BRANCHES_WARNING.into())
            }
            None => {}
        }
    }
    report.quantization = quantized;
    Ok((model, held_back))
}

/// Converts the branches of the main graph's `If` nodes (an Optimum merged decoder computes
/// in there) as `mode` converted the main graph, each branch as a model of its own
/// (`passes::branches::rewrite_branches`), for the modes that need no batches of the branch's
/// values: dynamic INT8 (without smoothing), round-to-nearest weights, and float16 with
/// Casts at the branch's edges (the values it reads from the main graph and its outputs stay
/// float32, as the main graph has them). Returns the rewrites, and the weight-only reports of
/// the branches; `None` for the other modes (static INT8, GPTQ), which leave the branches as
/// they are.
fn convert_branches(
    model: &mut Model,
    mode: &Mode,
) -> crate::Result<Option<(Rewrites, Vec<quant::weight_only::WeightOnlyReport>)>> {
    use crate::passes::branches::{rewrite_branches, BranchesOf::Products};
    let weights = std::cell::RefCell::new(Vec::new());
    let in_branches = match mode {
        Mode::Dynamic(dynamic) => {
            let unsmoothed = DynamicOptions {
                smooth_quant: None,
                ..dynamic.clone()
            };
            rewrite_branches(model, Products, &|branch| {
                Ok(quant::dynamic::quantize_dynamic(branch, &[], &unsmoothed)?.rewrites)
            })?
        }
        Mode::WeightOnly(weight_only) if weight_only.method == WeightMethod::Rtn => {
            rewrite_branches(model, Products, &|branch| {
                let quiet = |_, _| {};
                let done = quant::weight_only::quantize_weights(branch, &[], weight_only, &quiet)?;
                weights.borrow_mut().extend(done.weight_only);
                Ok(done.rewrites)
            })?
        }
        Mode::Fp16(_) => {
            let edges_float32 = Fp16Options {
                keep_io_types: true,
            };
            rewrite_branches(model, Products, &|branch| {
                Ok(quant::fp16::convert_fp16(branch, &edges_float32)?.rewrites)
            })?
        }
        _ => return Ok(None),
    };
    if in_branches.total() > 0 {
        // The float weights the branches read before, if nothing else reads them.
        DeadCodeElimination.run(model)?;
    }
    Ok(Some((in_branches, weights.into_inner())))
}

fn exec_step(what: &str, e: ExecError) -> PipelineError {
    PipelineError::Step {
        what: "cannot read the batches",
        source: Error::InvalidArgument(format!("{what}: {e}")),
    }
}

/// The batches to calibrate on and, when they are the user's (a folder or arrays) and no
/// `inputs` are given, the ones held back for validation (the last fifth, at least one).
fn calibration_batches(
    model: &Model,
    options: &Options,
    report: &mut Report,
) -> crate::Result<(Vec<Batch>, Option<Vec<Batch>>)> {
    let mut generate = options.generate.clone();
    let source = match &options.calibration {
        Some(InputSource::Generated(n)) => {
            generate.seed ^= CALIBRATION_SEED_SALT;
            InputSource::Generated(*n)
        }
        Some(other) => other.clone(),
        None if matches!(options.mode, Mode::Static { .. }) => {
            return Err(Error::InvalidArgument(
                "--int8 needs calibration data: --calib DIR or --calib-random N".into(),
            ))
        }
        None if matches!(options.mode, Mode::WeightOnly(_)) => return Err(Error::InvalidArgument(
            "--weights calibrates GPTQ: --calib DIR or --calib-random N, or --weights-method rtn"
                .into(),
        )),
        None => {
            // Dynamic INT8's smoothing, without data from the user. The channels' maxima
            // after a normalization owe more to its γ and β than to the text: generated
            // token ids give nearly the ranges real sentences give.
            generate.seed ^= CALIBRATION_SEED_SALT;
            InputSource::Generated(SMOOTHING_BATCHES)
        }
    };
    if matches!(source, InputSource::Generated(_)) {
        // Generated batches the model cannot run would stop calibration: probe one first.
        let probe = validate_options(options, model, InputSource::Generated(1), generate.clone());
        if runs_on_generated_inputs(model, &probe).is_err() {
            if let Some(one_token) = one_token_inputs(model, &probe) {
                report.warnings.push(ONE_TOKEN_CALIBRATION_WARNING.into());
                generate = one_token.generate;
            }
        }
    }
    let mut batches = exec::batches_for(model, &source, &generate)
        .map_err(|e| Error::InvalidArgument(format!("cannot read the calibration batches: {e}")))?;
    let given = matches!(
        options.calibration,
        Some(InputSource::Dir(_) | InputSource::Arrays(_))
    );
    let own_inputs = !matches!(options.inputs, InputSource::Generated(_));
    if !given || own_inputs {
        return Ok((batches, None));
    }
    if batches.len() < 2 {
        report
            .warnings
            .push("one calibration batch: validation runs on the batch calibration saw".into());
        return Ok((batches.clone(), Some(batches)));
    }
    let held_back = batches.split_off(batches.len() - (batches.len() / 5).max(1));
    Ok((batches, Some(held_back)))
}

/// Where validation's batches come from: the `inputs`, else the batches calibration held
/// back, else generated ones.
fn validation_inputs(
    options: &Options,
    held_back: Option<Vec<Batch>>,
) -> (InputSource, GenerateOptions) {
    let source = match (&options.inputs, held_back) {
        (InputSource::Generated(_), Some(held_back)) => InputSource::Batches(held_back),
        (inputs, _) => inputs.clone(),
    };
    (source, options.generate.clone())
}

/// Validation options: the limits given; where none is given, a lossless run keeps the
/// output check's limits for `original` and a lossy one has none.
fn validate_options(
    options: &Options,
    original: &Model,
    inputs: InputSource,
    generate: GenerateOptions,
) -> ValidateOptions {
    let t = &options.tolerances;
    ValidateOptions {
        inputs,
        generate,
        kl_temperature: t.kl_temperature,
        logits: t.logits.clone(),
        perplexity: t.perplexity,
        tolerance: t.limits(original, options.lossy()),
        engine: options.engine,
    }
}

impl Tolerances {
    /// True when the user gave a limit to keep.
    pub fn any_given(&self) -> bool {
        self.max_error.is_some() || self.min_cosine.is_some() || self.max_kl.is_some()
    }

    /// The limits to hold a model to against `reference`: those given; where none is given,
    /// those of a lossless rewrite of `reference` (see `check_tolerance`), or none at all
    /// for a lossy one (the report then states the errors without judging them).
    pub fn limits(&self, reference: &Model, lossy: bool) -> Tolerance {
        if self.any_given() || lossy {
            Tolerance {
                max_abs: self.max_error,
                max_abs_scaled: None,
                min_cosine: self.min_cosine,
                max_kl: self.max_kl,
            }
        } else {
            check_tolerance(reference)
        }
    }
}

/// The limits the output check holds a lossless result to, for the input `model`: float
/// rounding of the rewritten operators, scaled to each output's magnitude. A model that
/// already quantizes its activations (DynamicQuantizeLinear, QuantizeLinear) is compared by
/// cosine only: a rewrite that moves a value by one float ulp can move a quantizer's input
/// across a rounding tie, and layers of quantization spread that one step (a T5 decoder
/// with ONNX Runtime's dynamic quantization: logits 4 apart in tract, and 2 apart in ONNX
/// Runtime running the input model with and without its own fusions).
/// A model that computes in float16 is held to float16's rounding (2⁻¹¹ relative) instead.
fn check_tolerance(model: &Model) -> Tolerance {
    if !quant::qdq::quantization_ops(model).is_empty() {
        return Tolerance {
            min_cosine: Some(QUANTIZED_MIN_COSINE),
            ..Default::default()
        };
    }
    let float16 = model
        .graph
        .initializers()
        .any(|(_, t)| t.dtype() == crate::ir::DataType::Float16);
    Tolerance {
        max_abs_scaled: Some(if float16 {
            FLOAT16_MAX_ERROR
        } else {
            LOSSLESS_MAX_ERROR
        }),
        min_cosine: Some(LOSSLESS_MIN_COSINE),
        ..Default::default()
    }
}

/// Step 4: validation, which must run and keep the tolerance for the result to be written.
fn validate(
    original: &Model,
    model: &Model,
    options: &Options,
    held_back: Option<Vec<Batch>>,
    report: &mut Report,
    progress: Progress,
) -> Result<Validation, PipelineError> {
    let (source, generate) = validation_inputs(options, held_back);
    let generated = matches!(source, InputSource::Generated(_));
    let validate_options = validate_options(options, original, source, generate);
    let on_batch = |done, total| progress("validating", done, total);
    let mut validation = exec::validate(original, model, &validate_options, &on_batch);
    if validation.is_err() && runs_on_generated_inputs(original, &validate_options).is_err() {
        if let Some(one_token) = one_token_inputs(original, &validate_options) {
            report.warnings.push(ONE_TOKEN_WARNING.into());
            validation = exec::validate(original, model, &one_token, &on_batch);
        }
    }
    match validation {
        Ok(v) if v.passed() => Ok(v),
        Ok(v) => {
            let reason = format!(
                "outputs differ beyond the tolerance: {}",
                v.violations.join("; ")
            );
            report.validation = Some(v);
            Err(not_written(reason, report, false))
        }
        Err(e) => {
            let remedy = match (&e, exec::ort::available()) {
                (ExecError::Unsupported(_), Err(_)) => {
                    "; ONNX Runtime runs it (pip install onnxruntime, or $ONNXOPT_ORT_LIB), \
                     or --no-check writes the output without validation"
                }
                // Generated inputs may not fit the model (a channel count, a mask longer
                // than the tokens) where its dims' names do not say so.
                (ExecError::Unsupported(_), Ok(_)) => "",
                _ if generated => {
                    "; it ran on generated inputs: give batches it runs on (--inputs DIR), \
                     or the sizes of its dims (--dim NAME=N)"
                }
                _ => "",
            };
            let unsupported = matches!(e, ExecError::Unsupported(_) | ExecError::OrtUnavailable(_));
            Err(not_written(
                format!("cannot validate: {e}{remedy}"),
                report,
                unsupported,
            ))
        }
    }
}

fn not_written(reason: String, report: &Report, unsupported: bool) -> PipelineError {
    PipelineError::NotWritten {
        reason,
        report: Box::new(report.clone()),
        unsupported,
    }
}

/// The output check's options for the input `model`: two generated rows of `CHECK_LENGTH`
/// tokens (unless the caller set the dims), the second padded, within `check_tolerance`.
fn check_options(options: &Options, model: &Model) -> ValidateOptions {
    let mut generate = options.generate.clone();
    generate.default_batch = CHECK_ROWS;
    generate.default_length = CHECK_LENGTH;
    generate.pad_masks = true;
    validate_options(options, model, InputSource::Generated(1), generate)
}

/// Step 5 of the module doc.
fn check_or_fall_back(
    original: Model,
    model: Model,
    options: &Options,
    report: Report,
    progress: Progress,
) -> Result<Outcome, PipelineError> {
    let check_options = check_options(options, &original);
    check_on(original, model, options, report, progress, check_options)
}

/// `check_or_fall_back` on the generated inputs `check_options` makes.
fn check_on(
    original: Model,
    model: Model,
    options: &Options,
    mut report: Report,
    progress: Progress,
    check_options: ValidateOptions,
) -> Result<Outcome, PipelineError> {
    let on_batch = |done, total| progress("checking", done, total);
    let check = |candidate: &Model| -> Result<Validation, String> {
        match exec::validate(&original, candidate, &check_options, &on_batch) {
            Ok(v) if v.passed() => Ok(v),
            Ok(v) => Err(format!("outputs differ: {}", v.violations.join("; "))),
            Err(e) => Err(format!("the output does not run: {e}")),
        }
    };
    let failure = match check(&model) {
        Ok(v) => {
            report.check = Some(Check::passed(v));
            return Ok(Outcome { model, report });
        }
        Err(failure) => failure,
    };
    if let Err(why) = runs_on_generated_inputs(&original, &check_options) {
        if let Some(one_token) = one_token_inputs(&original, &check_options) {
            report.warnings.push(ONE_TOKEN_WARNING.into());
            return check_on(original, model, options, report, progress, one_token);
        }
        // Without the input model's outputs there is nothing to compare with: say so, and
        // write what the passes made (nothing showed it wrong).
        report.check = Some(Check::not_done(format!(
            "the input model does not run on generated inputs: {why}"
        )));
        return Ok(Outcome { model, report });
    }
    if let Some(outcome) = without_a_fusion(
        &original,
        options,
        &failure,
        &report.warnings,
        progress,
        &check,
    ) {
        return Ok(outcome);
    }
    report.check = Some(Check {
        outcome: CheckOutcome::Failed(failure.clone()),
    });
    Err(not_written(
        format!("the optimized model failed the output check: {failure}"),
        &report,
        false,
    ))
}

/// The pipeline's result on `original` with one fusion left out, for each fusion in turn,
/// then with all of them left out: the first that `check` passes, with a warning that says
/// which fusion was left out and the `failure` it caused. `None` when none passes.
fn without_a_fusion(
    original: &Model,
    options: &Options,
    failure: &str,
    warnings: &[String],
    progress: Progress,
    check: &dyn Fn(&Model) -> Result<Validation, String>,
) -> Option<Outcome> {
    let fusions: Vec<&'static str> = crate::optimize::pipeline(&options.optimize)
        .names()
        .into_iter()
        .filter(|n| n.starts_with("fuse-"))
        .collect();
    let mut attempts: Vec<Vec<&'static str>> = fusions.iter().map(|&f| vec![f]).collect();
    if fusions.len() > 1 {
        attempts.push(fusions.clone());
    }
    for left_out in attempts {
        let mut retry = options.clone();
        retry.optimize.skip = left_out.iter().map(|s| s.to_string()).collect();
        let mut report = Report::new();
        let Ok((candidate, _)) = transform(original.clone(), &retry, &mut report, progress) else {
            continue;
        };
        if let Ok(v) = check(&candidate) {
            report.warnings = warnings.to_vec();
            report.warnings.push(format!(
                "{} left out: with it the output failed the check ({failure})",
                left_out.join(", ")
            ));
            report.check = Some(Check::passed(v));
            return Some(Outcome {
                model: candidate,
                report,
            });
        }
    }
    None
}

/// Whether `model` runs on the check's generated inputs, in some engine.
fn runs_on_generated_inputs(model: &Model, check: &ValidateOptions) -> Result<(), ExecError> {
    let batches = exec::batches_for(model, &check.inputs, &check.generate)?;
    let first = check.engine.choose(&[model]);
    let engines = std::iter::once(first).chain(check.engine.second_opinion());
    let mut last = None;
    for engine in engines {
        match exec::Reference::run(model, batches.clone(), engine, &|_, _| {}) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("one engine at least"))
}

const FLOAT16_UPCAST_WARNING: &str = "the model computes in float16: the output computes in \
    float32 around its INT8 products (activation quantization is float32); its inputs and \
    outputs keep their types";

const BRANCHES_WARNING: &str = "the model computes inside the branches of an If (an Optimum \
    merged decoder, `decoder_model_merged.onnx`), which static INT8 and GPTQ leave in float32 \
    as they are (their calibration runs the main graph only): --int8-dynamic, --weights with \
    --weights-method rtn and --fp16 convert them; or export the decoder unmerged \
    (optimum-cli's --no-post-process)";

const ONE_TOKEN_WARNING: &str = "the input model does not run on generated inputs of the \
    default lengths: checked on one token (every free dim but the batch at 1); --inputs DIR \
    checks on batches of your own";

const ONE_TOKEN_CALIBRATION_WARNING: &str = "the model does not run on generated inputs of \
    the default lengths: calibrated on generated single tokens (every free dim but the batch \
    at 1); --calib DIR calibrates on batches of your own";

/// The generated inputs of `check` with every free dim but the batch at 1 (one new token),
/// when `model` runs on those: for a model that does not run on the default lengths. Exported
/// decoders with a cache often take one token only: Optimum names GPT-2's mask
/// `past_sequence_length + 1` beside tokens of `sequence_length`, and fixes Whisper's
/// `input_ids` to `[batch, 1]`. Callers ask only once the input model itself failed, so a
/// candidate that fails where the original runs is never handed other inputs.
fn one_token_inputs(model: &Model, check: &ValidateOptions) -> Option<ValidateOptions> {
    if !matches!(check.inputs, InputSource::Generated(_)) || check.generate.default_length == 1 {
        return None;
    }
    let mut one_token = check.clone();
    one_token.generate.default_length = 1;
    runs_on_generated_inputs(model, &one_token)
        .is_ok()
        .then_some(one_token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bert_tiny() -> Model {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/bert-tiny.ts.onnx");
        crate::io::load(&path).unwrap()
    }

    #[test]
    fn embeddings_stay_unfused_where_their_tables_are_converted() {
        let fused = |mode: Mode, passes: &[&str]| {
            let mut options = Options {
                mode,
                ..Default::default()
            };
            options.optimize.passes = passes.iter().map(|p| p.to_string()).collect();
            let mut model = bert_tiny();
            crate::optimize(&mut model, &options.optimize_options()).unwrap();
            let fused = model
                .graph
                .nodes()
                .any(|(_, n)| n.op_type() == "EmbedLayerNormalization");
            fused
        };
        let fp16 = || Mode::Fp16(Fp16Options::default());
        assert!(fused(Mode::Float, &[]));
        assert!(!fused(fp16(), &[]));
        // A selection without the fusion is no error.
        assert!(!fused(fp16(), &["shape-inference", "fuse-layernorm"]));
    }

    #[test]
    fn a_fusion_whose_output_fails_the_check_is_left_out() {
        let original = bert_tiny();
        let options = Options::default();
        let passing = exec::validate(
            &original,
            &original,
            &ValidateOptions {
                engine: Engine::Tract,
                ..check_options(&options, &original)
            },
            &|_, _| {},
        )
        .unwrap();
        // A check that refuses any fused attention, as if its kernel refused the inputs.
        let check = |m: &Model| -> Result<Validation, String> {
            let attention = m.graph.nodes().any(|(_, n)| n.op_type() == "Attention");
            match attention {
                true => Err("Attention refused its bias".into()),
                false => Ok(passing.clone()),
            }
        };
        let outcome = without_a_fusion(
            &original,
            &options,
            "Attention refused its bias",
            &["earlier".into()],
            &|_, _, _| {},
            &check,
        )
        .expect("a result without the attention fusion");
        assert!(!outcome
            .model
            .graph
            .nodes()
            .any(|(_, n)| n.op_type() == "Attention"));
        // The other fusions still ran.
        assert!(outcome
            .model
            .graph
            .nodes()
            .any(|(_, n)| n.op_type() == "BiasGelu"));
        assert_eq!(outcome.report.warnings[0], "earlier");
        assert!(
            outcome.report.warnings[1].starts_with("fuse-attention left out"),
            "{:?}",
            outcome.report.warnings
        );
        // A check nothing passes: no result.
        let never = |_: &Model| -> Result<Validation, String> { Err("no".into()) };
        let none = without_a_fusion(&original, &options, "no", &[], &|_, _, _| {}, &never);
        assert!(none.is_none());
    }
}
