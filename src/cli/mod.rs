//! The `onnxopt` command: parses arguments, calls the library, prints. Nothing else.
//!
//! Exit codes: 0 success; 1 an error (bad input, I/O), with a one-line reason on stderr;
//! 2 bad arguments; 3 a validation that failed or could not be done (nothing is written).

mod args;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;

use args::{Cli, Command, InputArgs, Int8WeightsArg, OptimizeArgs, QuantArgs, ToleranceArgs};
use onnxopt::exec::{self, Batch, GenerateOptions, InputSource, ValidateOptions};
use onnxopt::io::{self, ExternalData};
use onnxopt::ir::Model;
use onnxopt::pipeline::{self, Mode, Outcome, PipelineError, Tolerances};
use onnxopt::quant::{
    self,
    qdq::{ProductWeights, QdqOptions, Selection, Selector},
    StaticOptions,
};
use onnxopt::report::{ModelStats, Report};

/// A validation that failed or could not run: exit code 3.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ValidationFailed(String);

thread_local! {
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// The `onnxopt` binary: the command line of this process.
pub fn main() -> ExitCode {
    ExitCode::from(main_with_args(std::env::args_os()))
}

/// Runs the command line on `args` (the program name first) and returns its exit code; the
/// Python package's console script calls this in its own process.
pub fn main_with_args<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // Usage errors (2), and --help and --version (0).
            let _ = e.print();
            return u8::try_from(e.exit_code()).unwrap_or(2);
        }
    };
    // tract panics on some malformed models; `exec` catches those and reports them as
    // errors, so the default hook's message would be noise. The hook keeps the message (with
    // its location) for the one case that is not caught: a bug of ours.
    std::panic::set_hook(Box::new(|info| {
        LAST_PANIC.with(|p| *p.borrow_mut() = info.to_string());
    }));
    let code = match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<ValidationFailed>().is_some() {
                3
            } else {
                1
            }
        }
        Err(_) => {
            let msg = LAST_PANIC.with(|p| p.borrow().clone());
            eprintln!("internal error: {msg} (this is a bug in onnxopt; please report it)");
            101
        }
    };
    // A host process (Python) outlives this call: flush what is buffered now.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    code
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Optimize(args) => optimize(*args),
        Command::Inspect { model, json } => {
            let info = onnxopt::inspect::inspect(&load(&model)?);
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&info)?))
            } else {
                emit(&info.to_string())
            }
        }
        Command::Dump { model } => {
            let proto = load(&model)?.to_proto()?;
            emit(&onnxopt::ir::dump::dump_model(&proto))
        }
        Command::Validate {
            reference,
            candidate,
            inputs,
            tolerance,
            report,
            engine,
        } => {
            let (a, b) = (load(&reference)?, load(&candidate)?);
            let mut r = Report::new();
            let (inputs, generate) = input_source(&inputs);
            let options = ValidateOptions {
                inputs,
                generate,
                kl_temperature: tolerance.kl_temperature,
                logits: tolerance.logits.clone(),
                perplexity: tolerance.perplexity,
                tolerance: tolerances(&tolerance).limits(&a, false),
                engine: engine.engine(),
            };
            r.validation = Some(validate(&a, &b, &options)?);
            emit(&r.to_string())?;
            write_report(&r, report.as_deref())?;
            check_passed(&r)
        }
        Command::Run {
            model,
            inputs,
            output_dir,
            engine,
        } => run_model(&model, &inputs, &output_dir, engine.engine()),
    }
}

/// Writes to stdout; a closed pipe (`onnxopt dump m.onnx | head`) is not an error.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to stdout"),
    }
}

fn load(path: &Path) -> Result<Model> {
    io::load(path).with_context(|| format!("cannot load `{}`", path.display()))
}

fn optimize(args: OptimizeArgs) -> Result<()> {
    if same_file(&args.input, &args.output) && !args.in_place {
        bail!(
            "`{}` is the input: pass --in-place to replace it",
            args.output.display()
        );
    }
    let model = load(&args.input)?;
    let input = stats(&model, &args.input);
    let options = pipeline_options(&args)?;
    let bar = progress("");
    let on_progress = |what: &str, done: usize, total: usize| {
        bar.set_message(what.to_string());
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let outcome = pipeline::run(model, &options, &on_progress);
    bar.finish_and_clear();
    let Outcome { model, mut report } = match outcome {
        Ok(outcome) => outcome,
        Err(PipelineError::NotWritten {
            reason, mut report, ..
        }) => {
            report.input = Some(input);
            emit(&report.to_string())?;
            write_report(&report, args.report.as_deref())?;
            return Err(anyhow::Error::from(ValidationFailed(reason))
                .context(format!("`{}` was not written", args.output.display())));
        }
        Err(e) => return Err(e.into()),
    };
    report.input = Some(input);
    let external = if args.external_data {
        ExternalData::Always
    } else if args.no_external_data {
        ExternalData::Never
    } else {
        ExternalData::Auto
    };
    let saved = io::save(&model, &args.output, external)
        .with_context(|| format!("cannot write `{}`", args.output.display()))?;
    report.output = Some(saved);
    emit(&report.to_string())?;
    if args.explain {
        emit(&report.unfused_text())?;
    }
    write_report(&report, args.report.as_deref())
}

/// The pipeline's options from the command line.
fn pipeline_options(args: &OptimizeArgs) -> Result<pipeline::Options> {
    let (inputs, generate) = input_source(&args.inputs);
    let q = &args.quant;
    let product_weights = ProductWeights::chosen_or_default(
        q.int8_weights.map(Int8WeightsArg::codes),
        q.int8,
        args.target.quant(),
    );
    let qdq = || -> Result<QdqOptions> {
        Ok(QdqOptions {
            target: args.target.quant(),
            selection: selection(q)?,
            product_weights,
        })
    };
    let mode = if q.int8 {
        Mode::Static {
            options: StaticOptions {
                qdq: qdq()?,
                method: q.method(),
                smooth_quant: q.smoothing(args.target.quant()),
            },
            auto_exclude: q.auto_exclude,
        }
    } else if q.int8_dynamic {
        Mode::Dynamic(quant::dynamic::DynamicOptions {
            qdq: qdq()?,
            smooth_quant: q.smoothing(args.target.quant()),
        })
    } else if let Some(bits) = q.weight_bits() {
        Mode::WeightOnly(quant::weight_only::WeightOnlyOptions {
            bits,
            block_size: q.block_size,
            symmetric: q.symmetric,
            method: q.weights_method.method(),
            gptq: quant::weight_only::gptq::GptqOptions {
                act_order: !q.no_act_order,
                damping: q.gptq_damping,
            },
            lm_head: q.lm_head,
            accuracy_level: q.accuracy_level,
            target: args.target.fusion(),
            selection: selection(q)?,
            engine: args.engine.engine(),
        })
    } else if q.fp16 {
        Mode::Fp16(quant::fp16::Fp16Options {
            keep_io_types: q.keep_io_types,
        })
    } else {
        Mode::Float
    };
    let calibration = match (&q.calib, q.calib_random) {
        (Some(dir), _) => Some(InputSource::Dir(dir.clone())),
        (None, Some(n)) => Some(InputSource::Generated(n)),
        (None, None) => None,
    };
    Ok(pipeline::Options {
        optimize: onnxopt::optimize::OptimizeOptions {
            target: args.target.fusion(),
            passes: args.passes.clone(),
            skip: Vec::new(),
        },
        prune: args.prune.options()?,
        mode,
        calibration,
        inputs,
        generate,
        validate: args.validate,
        tolerances: tolerances(&args.tolerance),
        check: !args.no_check,
        engine: args.engine.engine(),
        // Shown with --explain, always in the JSON report.
        explain: args.explain || args.report.is_some(),
    })
}

fn stats(model: &Model, path: &Path) -> ModelStats {
    ModelStats {
        path: path.display().to_string(),
        file_bytes: model.source.as_ref().map_or(0, |s| s.file_bytes),
        nodes: model.graph.node_count(),
    }
}

/// True when `output` names the same file as `input` (which exists), links included.
fn same_file(input: &Path, output: &Path) -> bool {
    let Ok(input) = input.canonicalize() else {
        return false;
    };
    if let Ok(output) = output.canonicalize() {
        return output == input;
    }
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match (parent.canonicalize(), output.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name) == input,
        _ => false,
    }
}

fn selection(args: &QuantArgs) -> Result<Selection> {
    let parse = |texts: &[String]| -> Result<Vec<Selector>> {
        texts
            .iter()
            .map(|t| Selector::parse(t).map_err(anyhow::Error::from))
            .collect()
    };
    Ok(Selection {
        include: parse(&args.include)?,
        exclude: parse(&args.exclude)?,
    })
}

fn input_source(inputs: &InputArgs) -> (InputSource, GenerateOptions) {
    let source = match &inputs.inputs {
        Some(dir) => InputSource::Dir(dir.clone()),
        None => InputSource::Generated(inputs.batches),
    };
    let generate = GenerateOptions {
        dims: inputs.dims.iter().cloned().collect(),
        ranges: inputs.ranges.iter().cloned().collect(),
        seed: inputs.seed,
        ..Default::default()
    };
    (source, generate)
}

fn tolerances(t: &ToleranceArgs) -> Tolerances {
    Tolerances {
        max_error: t.max_error,
        min_cosine: t.min_cosine,
        max_kl: t.max_kl,
        kl_temperature: t.kl_temperature,
        logits: t.logits.clone(),
        perplexity: t.perplexity,
    }
}

fn validate(a: &Model, b: &Model, options: &ValidateOptions) -> Result<exec::Validation> {
    let bar = progress("validating");
    let result = exec::validate(a, b, options, &|done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    result.map_err(|e| ValidationFailed(format!("cannot validate: {e}")).into())
}

fn check_passed(report: &Report) -> Result<()> {
    match &report.validation {
        Some(v) if !v.passed() => Err(ValidationFailed(format!(
            "outputs differ beyond the tolerance: {}",
            v.violations.join("; ")
        ))
        .into()),
        _ => Ok(()),
    }
}

fn write_report(report: &Report, path: Option<&Path>) -> Result<()> {
    if let Some(path) = path {
        std::fs::write(path, report.to_json())
            .with_context(|| format!("cannot write the report `{}`", path.display()))?;
    }
    Ok(())
}

/// A progress bar on stderr; hidden when stderr is not a terminal.
fn progress(what: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
    {
        bar.set_style(style);
    }
    bar.set_message(what);
    bar
}

fn run_model(
    path: &Path,
    inputs: &InputArgs,
    output_dir: &Path,
    engine: exec::Engine,
) -> Result<()> {
    let model = load(path)?;
    let (source, generate) = input_source(inputs);
    let batches: Vec<Batch> = exec::batches_for(&model, &source, &generate)?;
    let mut runner = exec::EngineRunner::new(engine.choose(&[&model]), &model)?;
    std::fs::create_dir_all(output_dir)
        .with_context(|| format!("cannot create `{}`", output_dir.display()))?;
    let bar = progress("running");
    bar.set_length(batches.len() as u64);
    for batch in &batches {
        for (name, tensor) in runner.run(batch)? {
            let file = output_dir.join(format!("{}.{}.npy", batch.name, file_safe(&name)));
            write_npy(&file, &tensor)
                .with_context(|| format!("cannot write `{}`", file.display()))?;
            emit(&format!("{}\n", file.display()))?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn write_npy(path: &PathBuf, t: &tract_onnx::prelude::Tensor) -> Result<()> {
    use ndarray_npy::WriteNpyExt;
    use tract_onnx::prelude::DatumType;
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    match t.datum_type() {
        DatumType::I64 | DatumType::I32 | DatumType::I16 | DatumType::I8 | DatumType::U8 => t
            .cast_to::<i64>()?
            .to_plain_array_view::<i64>()?
            .write_npy(file)?,
        DatumType::Bool => t.to_plain_array_view::<bool>()?.write_npy(file)?,
        DatumType::F64 => t.to_plain_array_view::<f64>()?.write_npy(file)?,
        _ => t
            .cast_to::<f32>()?
            .to_plain_array_view::<f32>()?
            .write_npy(file)?,
    }
    Ok(())
}
