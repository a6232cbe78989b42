//! `onnxopt._onnxopt`: the extension module under the `onnxopt` Python package.
//!
//! The package's Python code (`python/onnxopt/`) is the public API: it documents the
//! arguments, turns a `ModelProto` into bytes and any iterable of batches into a list, adapts
//! progress bars, and raises the public exception classes. This module does the work: it
//! loads models (from a path, mapped, or from `bytes`, without a copy), builds
//! `pipeline::Options` as the command line does, runs the pipeline, validation and the
//! command line itself with the GIL released, and reports failures as
//! `Failure(kind, message, report_json, report_text)` for the Python side to raise.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use numpy::{
    PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods,
};
use prost::Message;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict, PyList};
use tract_onnx::prelude::Tensor;

use onnxopt::exec::{self, GenerateOptions, InputSource, NamedArrays, ValidateOptions};
use onnxopt::io::{self, ExternalData};
use onnxopt::ir::Model;
use onnxopt::ops::nbits::Bits;
use onnxopt::passes::fuse::Target;
use onnxopt::pipeline::{self, Mode, PipelineError, Tolerances};
use onnxopt::prune::{PruneOptions, Scope, Unstructured};
use onnxopt::quant::dynamic::DynamicOptions;
use onnxopt::quant::fp16::Fp16Options;
use onnxopt::quant::qdq::{ProductWeights, QdqOptions, Selection, Selector};
use onnxopt::quant::smooth::default_alpha;
use onnxopt::quant::weight_only::gptq::GptqOptions;
use onnxopt::quant::weight_only::{WeightMethod, WeightOnlyOptions};
use onnxopt::quant::{QuantTarget, RangeMethod, StaticOptions};
use onnxopt::report::{ModelStats, Report};

pyo3::create_exception!(
    _onnxopt,
    Failure,
    PyException,
    "A failure of onnxopt: (kind, message, report_json, report_text); the package raises \
     the public class of its kind."
);

/// What a failure is, for the public exception class the Python side raises.
#[derive(Clone, Copy)]
enum Kind {
    /// The model is not a usable ONNX model.
    InvalidModel,
    /// An argument or the data given is wrong.
    InvalidArgument,
    /// The outputs break the tolerance, or could not be compared (exit code 3 in the CLI).
    Validation,
    /// No engine here runs a model faithfully.
    Unsupported,
    /// Reading or writing a file.
    Io,
    /// Anything else.
    Other,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::InvalidModel => "invalid_model",
            Kind::InvalidArgument => "invalid_argument",
            Kind::Validation => "validation",
            Kind::Unsupported => "unsupported",
            Kind::Io => "io",
            Kind::Other => "error",
        }
    }

    fn of(e: &onnxopt::Error) -> Kind {
        use onnxopt::Error as E;
        match e {
            E::Io { .. } => Kind::Io,
            E::InvalidArgument(_) => Kind::InvalidArgument,
            E::Patch(_) | E::Quantization(_) | E::Pruning(_) => Kind::Other,
            E::EmptyFile { .. }
            | E::Decode(_)
            | E::NotAModel(_)
            | E::InvalidModel(_)
            | E::InvalidTensor { .. }
            | E::ExternalData { .. }
            | E::UndefinedInput { .. }
            | E::DuplicateProducer(_)
            | E::Cycle(_)
            | E::UndefinedOutput(_) => Kind::InvalidModel,
        }
    }
}

/// A failure on its way to Python.
struct Fail {
    kind: Kind,
    message: String,
    report: Option<Box<Report>>,
}

impl Fail {
    fn new(kind: Kind, message: impl Into<String>) -> Fail {
        Fail {
            kind,
            message: message.into(),
            report: None,
        }
    }

    fn arg(message: impl Into<String>) -> Fail {
        Fail::new(Kind::InvalidArgument, message)
    }
}

impl From<Fail> for PyErr {
    fn from(f: Fail) -> PyErr {
        let json = f.report.as_ref().map(|r| r.to_json());
        let text = f.report.as_ref().map(|r| r.to_string());
        Failure::new_err((f.kind.name(), f.message, json, text))
    }
}

/// `e` and its causes, one line, as the command line prints an error (anyhow's `{:#}`).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A model given by path (`str` or `os.PathLike`) or as `bytes`/`bytearray`.
enum ModelArg {
    Path(PathBuf),
    Bytes(PyBackedBytes),
}

impl ModelArg {
    fn extract(model: &Bound<'_, PyAny>) -> PyResult<ModelArg> {
        if let Ok(bytes) = model.extract::<PyBackedBytes>() {
            return Ok(ModelArg::Bytes(bytes));
        }
        match model.extract::<PathBuf>() {
            Ok(path) => Ok(ModelArg::Path(path)),
            Err(_) => Err(Fail::arg(format!(
                "a model is a path, bytes or an onnx.ModelProto, not {}",
                model.get_type().name()?
            ))
            .into()),
        }
    }

    /// The path the report shows.
    fn label(&self) -> String {
        match self {
            ModelArg::Path(p) => p.display().to_string(),
            ModelArg::Bytes(_) => "<bytes>".into(),
        }
    }

    /// Loads the model: a file is mapped, `bytes` are decoded in place (the model's weights
    /// stay slices of the Python object, which it keeps alive). External data of a model
    /// given as bytes is looked up in the current folder. Errors read as the command
    /// line's (`cannot load `PATH`: …`).
    fn load(self) -> Result<Model, Fail> {
        let (label, result) = match self {
            ModelArg::Path(path) => (format!("`{}`", path.display()), io::load(&path)),
            ModelArg::Bytes(bytes) => (
                "the model bytes".to_string(),
                io::load_bytes(bytes::Bytes::from_owner(bytes), Path::new(".")),
            ),
        };
        result.map_err(|e| Fail::new(Kind::of(&e), format!("cannot load {label}: {}", chain(&e))))
    }
}

/// Calls the Python progress callback `(stage, done, total)`. The first exception it raises
/// (or a KeyboardInterrupt seen while it runs) stops further calls and is raised when the
/// work is done.
struct Progress {
    callback: Option<Py<PyAny>>,
    error: Mutex<Option<PyErr>>,
}

impl Progress {
    fn new(callback: Option<Py<PyAny>>) -> Progress {
        Progress {
            callback,
            error: Mutex::new(None),
        }
    }

    fn report(&self, stage: &str, done: usize, total: usize) {
        let Some(callback) = &self.callback else {
            return;
        };
        let mut error = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if error.is_some() {
            return;
        }
        Python::attach(|py| {
            let called = py
                .check_signals()
                .and_then(|()| callback.call1(py, (stage, done, total)).map(drop));
            if let Err(e) = called {
                *error = Some(e);
            }
        });
    }

    /// The exception the callback raised, if any.
    fn finish(self) -> PyResult<()> {
        match self.error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Batches given from Python: a folder (`str`/`os.PathLike`), or a list of `(name, dict)`
/// with NumPy arrays by input name (the package turns any iterable or reader into it).
fn input_source(data: &Bound<'_, PyAny>, what: &str) -> PyResult<InputSource> {
    if let Ok(list) = data.cast::<PyList>() {
        let mut batches = Vec::with_capacity(list.len());
        for item in list.iter() {
            let (name, arrays): (String, Bound<'_, PyDict>) = item.extract()?;
            let mut named = Vec::with_capacity(arrays.len());
            for (key, value) in arrays.iter() {
                let input: String = key.extract()?;
                let tensor = tensor_from_array(&value).map_err(|why| {
                    Fail::arg(format!("{what}: batch `{name}`, array `{input}`: {why}"))
                })?;
                named.push((input, tensor));
            }
            batches.push(NamedArrays {
                name,
                arrays: named,
            });
        }
        return Ok(InputSource::Arrays(batches));
    }
    match data.extract::<PathBuf>() {
        Ok(dir) => Ok(InputSource::Dir(dir)),
        Err(_) => Err(Fail::arg(format!(
            "{what}: expected a folder or batches (dicts of arrays by input name), not {}",
            data.get_type().name()?
        ))
        .into()),
    }
}

/// A NumPy array as a tract tensor (one copy, in standard layout).
fn tensor_from_array(value: &Bound<'_, PyAny>) -> Result<Tensor, String> {
    let py = value.py();
    let array = value
        .cast::<PyUntypedArray>()
        .map_err(|_| format!("not a NumPy array ({})", type_name(value)))?;
    let dtype = array.dtype();
    macro_rules! convert {
        ($($t:ty),*) => {
            $(
                if dtype.is_equiv_to(&numpy::dtype::<$t>(py)) {
                    let typed = value.cast::<PyArrayDyn<$t>>().map_err(|e| e.to_string())?;
                    let readonly = typed.try_readonly().map_err(|e| e.to_string())?;
                    let owned = readonly.as_array().as_standard_layout().into_owned();
                    return Ok(Tensor::from(owned));
                }
            )*
        };
    }
    convert!(
        f32,
        f64,
        half::f16,
        i64,
        i32,
        i16,
        i8,
        u64,
        u32,
        u16,
        u8,
        bool
    );
    Err(format!("arrays of {dtype} cannot be fed to a model"))
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default()
}

fn target(name: &str) -> Result<(Target, QuantTarget), Fail> {
    // A standard-operator runtime gets TensorRT's quantization rules, as on the command line.
    match name {
        "ort" => Ok((Target::Ort, QuantTarget::Ort)),
        "onnx" => Ok((Target::Onnx, QuantTarget::Trt)),
        "trt" => Ok((Target::Onnx, QuantTarget::Trt)),
        other => Err(Fail::arg(format!(
            "target={other:?}: expected \"ort\", \"onnx\" or \"trt\""
        ))),
    }
}

fn engine(name: &str) -> Result<exec::Engine, Fail> {
    match name {
        "auto" => Ok(exec::Engine::Auto),
        "tract" => Ok(exec::Engine::Tract),
        "ort" => Ok(exec::Engine::Ort),
        other => Err(Fail::arg(format!(
            "engine={other:?}: expected \"auto\", \"tract\" or \"ort\""
        ))),
    }
}

fn range_method(name: &str, percentile: f64) -> Result<RangeMethod, Fail> {
    match name {
        "mse" => Ok(RangeMethod::Mse),
        "minmax" => Ok(RangeMethod::MinMax),
        "percentile" => Ok(RangeMethod::Percentile(percentile)),
        "entropy" => Ok(RangeMethod::Entropy),
        other => Err(Fail::arg(format!(
            "calib_method={other:?}: expected \"mse\", \"minmax\", \"percentile\" or \"entropy\""
        ))),
    }
}

fn selectors(texts: &[String]) -> Result<Vec<Selector>, Fail> {
    texts
        .iter()
        .map(|t| Selector::parse(t).map_err(|e| Fail::arg(chain(&e))))
        .collect()
}

fn fraction(name: &str, f: Option<f64>) -> Result<Option<f64>, Fail> {
    match f {
        Some(f) if !(0.0..1.0).contains(&f) => Err(Fail::arg(format!(
            "{name}={f}: expected a fraction in [0, 1)"
        ))),
        other => Ok(other),
    }
}

/// Where inputs come from, and how generated ones are made (`--inputs`, `--batches`,
/// `--dim`, `--input-range`, `--seed`).
fn inputs_and_generate(
    inputs: Option<&Bound<'_, PyAny>>,
    batches: usize,
    dims: Option<std::collections::HashMap<String, usize>>,
    input_ranges: Option<std::collections::HashMap<String, (f64, f64)>>,
    seed: u64,
) -> PyResult<(InputSource, GenerateOptions)> {
    let source = match inputs {
        Some(data) => input_source(data, "inputs")?,
        None => InputSource::Generated(batches),
    };
    let generate = GenerateOptions {
        dims: dims.unwrap_or_default(),
        ranges: input_ranges.unwrap_or_default(),
        seed,
        ..Default::default()
    };
    Ok((source, generate))
}

/// The result of `optimize`: the report as JSON and as text, and the model's bytes when no
/// output path was given.
type Optimized = (String, String, Option<Py<PyBytes>>);

/// The pipeline of `onnxopt optimize` (see the package's `optimize` for the arguments). Runs
/// with the GIL released.
#[pyfunction]
#[pyo3(signature = (
    model, output=None, *, target="ort", passes=vec![], validate=false, check=true,
    int8=false, int8_dynamic=false, fp16=false, keep_io_types=false, int8_weights=None,
    weights=None, block_size=onnxopt::quant::weight_only::DEFAULT_BLOCK_SIZE, symmetric=false,
    weights_method="gptq", act_order=true,
    gptq_damping=onnxopt::quant::weight_only::gptq::DAMPING,
    accuracy_level=onnxopt::quant::weight_only::DEFAULT_ACCURACY_LEVEL, lm_head=false,
    calib=None, calib_random=None, calib_method="mse", percentile=None, auto_exclude=false,
    smooth_quant=None, no_smooth_quant=false, include=vec![], exclude=vec![],
    prune=None, prune_scope="layer", prune_embeddings=false, prune_heads=None, prune_ffn=None,
    inputs=None, batches=2, dims=None, input_ranges=None, seed=0,
    max_error=None, min_cosine=None, max_kl=None, kl_temperature=1.0, logits=vec![],
    perplexity=false, engine="auto", external_data=None, progress=None
))]
#[allow(clippy::too_many_arguments)]
fn optimize(
    py: Python<'_>,
    model: &Bound<'_, PyAny>,
    output: Option<PathBuf>,
    target: &str,
    passes: Vec<String>,
    validate: bool,
    check: bool,
    int8: bool,
    int8_dynamic: bool,
    fp16: bool,
    keep_io_types: bool,
    int8_weights: Option<&str>,
    weights: Option<&str>,
    block_size: usize,
    symmetric: bool,
    weights_method: &str,
    act_order: bool,
    gptq_damping: f64,
    accuracy_level: i64,
    lm_head: bool,
    calib: Option<&Bound<'_, PyAny>>,
    calib_random: Option<usize>,
    calib_method: &str,
    percentile: Option<f64>,
    auto_exclude: bool,
    smooth_quant: Option<f64>,
    no_smooth_quant: bool,
    include: Vec<String>,
    exclude: Vec<String>,
    prune: Option<String>,
    prune_scope: &str,
    prune_embeddings: bool,
    prune_heads: Option<f64>,
    prune_ffn: Option<f64>,
    inputs: Option<&Bound<'_, PyAny>>,
    batches: usize,
    dims: Option<std::collections::HashMap<String, usize>>,
    input_ranges: Option<std::collections::HashMap<String, (f64, f64)>>,
    seed: u64,
    max_error: Option<f64>,
    min_cosine: Option<f64>,
    max_kl: Option<f64>,
    kl_temperature: f64,
    logits: Vec<String>,
    perplexity: bool,
    engine: &str,
    external_data: Option<bool>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Optimized> {
    let model = ModelArg::extract(model)?;
    let (fusion_target, quant_target) = self::target(target)?;
    let chosen = match int8_weights {
        None => None,
        Some("int7") => Some(ProductWeights::Int7),
        Some("int8") => Some(ProductWeights::Int8),
        Some("uint8") => Some(ProductWeights::Uint8),
        Some(other) => {
            return Err(Fail::arg(format!(
                "int8_weights={other:?}: expected \"int7\", \"int8\" or \"uint8\""
            ))
            .into())
        }
    };
    let product_weights = ProductWeights::chosen_or_default(chosen, int8, quant_target);
    let qdq = QdqOptions {
        target: quant_target,
        selection: Selection {
            include: selectors(&include)?,
            exclude: selectors(&exclude)?,
        },
        product_weights,
    };
    let weight_bits = match weights {
        None => None,
        Some("int4") => Some(Bits::Four),
        Some("int8") => Some(Bits::Eight),
        Some(other) => {
            return Err(
                Fail::arg(format!("weights={other:?}: expected \"int4\" or \"int8\"")).into(),
            )
        }
    };
    if weight_bits.is_some() && (int8 || int8_dynamic || fp16) {
        return Err(Fail::arg(
            "weights= quantizes weights only: it excludes int8, int8_dynamic and fp16",
        )
        .into());
    }
    // SmoothQuant's strength: as given, else the default of the mode (dynamic or not).
    let smoothing = |dynamic: bool| match smooth_quant {
        Some(alpha) => Some(alpha),
        None if no_smooth_quant => None,
        None => default_alpha(quant_target, dynamic),
    };
    let mode = if let Some(bits) = weight_bits {
        Mode::WeightOnly(WeightOnlyOptions {
            bits,
            block_size,
            symmetric,
            method: match weights_method {
                "gptq" => WeightMethod::Gptq,
                "rtn" => WeightMethod::Rtn,
                other => {
                    return Err(Fail::arg(format!(
                        "weights_method={other:?}: expected \"gptq\" or \"rtn\""
                    ))
                    .into())
                }
            },
            gptq: GptqOptions {
                act_order,
                damping: gptq_damping,
            },
            lm_head,
            accuracy_level,
            target: fusion_target,
            selection: qdq.selection.clone(),
            engine: self::engine(engine)?,
        })
    } else if int8 {
        Mode::Static {
            options: StaticOptions {
                qdq,
                method: range_method(
                    calib_method,
                    percentile.unwrap_or(onnxopt::quant::calibrate::DEFAULT_PERCENTILE),
                )?,
                smooth_quant: smoothing(false),
            },
            auto_exclude,
        }
    } else if int8_dynamic {
        Mode::Dynamic(DynamicOptions {
            qdq,
            smooth_quant: smoothing(true),
        })
    } else if fp16 {
        Mode::Fp16(Fp16Options { keep_io_types })
    } else {
        Mode::Float
    };
    let calibration = match (calib, calib_random) {
        (Some(data), _) => Some(input_source(data, "calib")?),
        (None, Some(n)) => Some(InputSource::Generated(n)),
        (None, None) => None,
    };
    let scope = match prune_scope {
        "layer" => Scope::Layer,
        "global" => Scope::Global,
        other => {
            return Err(Fail::arg(format!(
                "prune_scope={other:?}: expected \"layer\" or \"global\""
            ))
            .into())
        }
    };
    let prune = PruneOptions {
        unstructured: prune
            .as_deref()
            .map(|t| Unstructured::parse(t, scope))
            .transpose()
            .map_err(|e| Fail::new(Kind::of(&e), chain(&e)))?,
        heads: fraction("prune_heads", prune_heads)?,
        ffn: fraction("prune_ffn", prune_ffn)?,
        calibration: Vec::new(),
        embeddings: prune_embeddings,
    };
    let (inputs, generate) = inputs_and_generate(inputs, batches, dims, input_ranges, seed)?;
    let options = pipeline::Options {
        optimize: onnxopt::optimize::OptimizeOptions {
            target: fusion_target,
            passes,
            skip: Vec::new(),
        },
        prune,
        mode,
        calibration,
        inputs,
        generate,
        validate,
        // The report holds the facts of the command line's --report JSON, which always
        // lists the blocks left unfused.
        explain: true,
        tolerances: Tolerances {
            max_error,
            min_cosine,
            max_kl,
            kl_temperature,
            logits,
            perplexity,
        },
        check,
        engine: self::engine(engine)?,
    };
    let external = match external_data {
        None => ExternalData::Auto,
        Some(true) => ExternalData::Always,
        Some(false) => ExternalData::Never,
    };
    let progress = Progress::new(progress);
    let result =
        py.detach(|| run_optimize(model, output.as_deref(), &options, external, &progress));
    progress.finish()?;
    let (report, model) = result?;
    let bytes = match model {
        None => None,
        Some(model) => Some(model_bytes(py, &model)?),
    };
    Ok((report.to_json(), report.to_string(), bytes))
}

/// Loads, optimizes and, given a path, saves; returns the report and, without a path, the
/// model.
fn run_optimize(
    model: ModelArg,
    output: Option<&Path>,
    options: &pipeline::Options,
    external: ExternalData,
    progress: &Progress,
) -> Result<(Report, Option<Model>), Fail> {
    let label = model.label();
    let model = model.load()?;
    let input = ModelStats {
        path: label,
        file_bytes: model.source.as_ref().map_or(0, |s| s.file_bytes),
        nodes: model.graph.node_count(),
    };
    let on_progress = |stage: &str, done, total| progress.report(stage, done, total);
    let outcome = match pipeline::run(model, options, &on_progress) {
        Ok(outcome) => outcome,
        Err(PipelineError::NotWritten {
            reason,
            mut report,
            unsupported,
        }) => {
            report.input = Some(input);
            let message = match output {
                Some(path) => format!("`{}` was not written: {reason}", path.display()),
                None => reason,
            };
            let kind = if unsupported {
                Kind::Unsupported
            } else {
                Kind::Validation
            };
            return Err(Fail {
                kind,
                message,
                report: Some(report),
            });
        }
        Err(e) => {
            let kind = match &e {
                PipelineError::Step { source, .. } => Kind::of(source),
                PipelineError::NotWritten { .. } => Kind::Validation,
            };
            return Err(Fail::new(kind, chain(&e)));
        }
    };
    let mut report = outcome.report;
    report.input = Some(input);
    let Some(path) = output else {
        return Ok((report, Some(outcome.model)));
    };
    let saved = io::save(&outcome.model, path, external).map_err(|e| {
        Fail::new(
            Kind::of(&e),
            format!("cannot write `{}`: {}", path.display(), chain(&e)),
        )
    })?;
    report.output = Some(saved);
    Ok((report, None))
}

/// The model encoded straight into a Python `bytes` object, as `io::save` writes a file
/// without external data.
fn model_bytes(py: Python<'_>, model: &Model) -> PyResult<Py<PyBytes>> {
    let proto = model
        .to_proto()
        .map_err(|e| Fail::new(Kind::of(&e), chain(&e)))?;
    let len = proto.encoded_len();
    if len as u64 > io::PROTOBUF_LIMIT {
        return Err(Fail::arg(format!(
            "the model is {len} bytes, over protobuf's 2 GB limit: give an output path, to \
             write it with external data"
        ))
        .into());
    }
    let bytes = PyBytes::new_with(py, len, |mut buf: &mut [u8]| {
        proto
            .encode(&mut buf)
            .map_err(|e| Fail::new(Kind::Other, e.to_string()).into())
    })?;
    Ok(bytes.unbind())
}

/// Runs two models on the same inputs and compares every output (`onnxopt validate`).
/// Returns the report as JSON and as text; outputs beyond the tolerance are a `validation`
/// failure carrying the report, as the command line's exit code 3.
#[pyfunction]
#[pyo3(signature = (
    reference, candidate, *, inputs=None, batches=2, dims=None, input_ranges=None, seed=0,
    max_error=None, min_cosine=None, max_kl=None, kl_temperature=1.0, logits=vec![],
    perplexity=false, engine="auto", progress=None
))]
#[allow(clippy::too_many_arguments)]
fn validate(
    py: Python<'_>,
    reference: &Bound<'_, PyAny>,
    candidate: &Bound<'_, PyAny>,
    inputs: Option<&Bound<'_, PyAny>>,
    batches: usize,
    dims: Option<std::collections::HashMap<String, usize>>,
    input_ranges: Option<std::collections::HashMap<String, (f64, f64)>>,
    seed: u64,
    max_error: Option<f64>,
    min_cosine: Option<f64>,
    max_kl: Option<f64>,
    kl_temperature: f64,
    logits: Vec<String>,
    perplexity: bool,
    engine: &str,
    progress: Option<Py<PyAny>>,
) -> PyResult<(String, String)> {
    let (reference, candidate) = (ModelArg::extract(reference)?, ModelArg::extract(candidate)?);
    let (inputs, generate) = inputs_and_generate(inputs, batches, dims, input_ranges, seed)?;
    let tolerances = Tolerances {
        max_error,
        min_cosine,
        max_kl,
        kl_temperature,
        logits,
        perplexity,
    };
    let engine = self::engine(engine)?;
    let progress = Progress::new(progress);
    let result = py.detach(|| -> Result<Report, Fail> {
        let (a, b) = (reference.load()?, candidate.load()?);
        let options = ValidateOptions {
            inputs,
            generate,
            kl_temperature: tolerances.kl_temperature,
            logits: tolerances.logits.clone(),
            perplexity: tolerances.perplexity,
            tolerance: tolerances.limits(&a, false),
            engine,
        };
        let on_batch = |done, total| progress.report("validating", done, total);
        let validation = exec::validate(&a, &b, &options, &on_batch).map_err(|e| {
            let kind = match &e {
                exec::ExecError::Unsupported(_) | exec::ExecError::OrtUnavailable(_) => {
                    Kind::Unsupported
                }
                exec::ExecError::Input(_) => Kind::InvalidArgument,
                _ => Kind::Validation,
            };
            // As the command line words it: the error itself, not its causes.
            Fail::new(kind, format!("cannot validate: {e}"))
        })?;
        let mut report = Report::new();
        let violations = validation.violations.clone();
        report.validation = Some(validation);
        if violations.is_empty() {
            Ok(report)
        } else {
            Err(Fail {
                kind: Kind::Validation,
                message: format!(
                    "outputs differ beyond the tolerance: {}",
                    violations.join("; ")
                ),
                report: Some(Box::new(report)),
            })
        }
    });
    progress.finish()?;
    let report = result?;
    Ok((report.to_json(), report.to_string()))
}

/// `onnxopt inspect MODEL --json`, as a JSON string.
#[pyfunction]
fn inspect(py: Python<'_>, model: &Bound<'_, PyAny>) -> PyResult<String> {
    let model = ModelArg::extract(model)?;
    let info = py.detach(|| model.load().map(|m| onnxopt::inspect::inspect(&m)))?;
    serde_json::to_string(&info).map_err(|e| Fail::new(Kind::Other, e.to_string()).into())
}

/// `onnxopt dump MODEL`.
#[pyfunction]
fn dump(py: Python<'_>, model: &Bound<'_, PyAny>) -> PyResult<String> {
    let model = ModelArg::extract(model)?;
    let text = py.detach(|| -> Result<String, Fail> {
        let proto = model
            .load()?
            .to_proto()
            .map_err(|e| Fail::new(Kind::of(&e), chain(&e)))?;
        Ok(onnxopt::ir::dump::dump_model(&proto))
    })?;
    Ok(text)
}

/// The `onnxopt` command line on `argv` (the program name first), in this process, with the
/// GIL released; returns the exit code.
#[pyfunction]
fn cli_main(py: Python<'_>, argv: Vec<OsString>) -> u8 {
    py.detach(|| onnxopt::cli::main_with_args(argv))
}

/// tract panics on some malformed models; `exec` catches those panics and reports them as
/// errors (as the command line does), so their message would be noise on the caller's
/// stderr. Other panics are bugs, and keep the default report. The hook is this extension's
/// own: a cdylib carries its own copy of Rust's runtime.
fn quiet_tract_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_tract = info
            .location()
            .is_some_and(|l| l.file().contains("/tract-"));
        if !in_tract {
            default(info);
        }
    }));
}

#[pymodule]
fn _onnxopt(m: &Bound<'_, PyModule>) -> PyResult<()> {
    quiet_tract_panics();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("ONNXOPT_VERSION", Report::new().onnxopt_version)?;
    m.add(
        "DEFAULT_PERCENTILE",
        onnxopt::quant::calibrate::DEFAULT_PERCENTILE,
    )?;
    m.add("Failure", m.py().get_type::<Failure>())?;
    m.add_function(wrap_pyfunction!(optimize, m)?)?;
    m.add_function(wrap_pyfunction!(validate, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(dump, m)?)?;
    m.add_function(wrap_pyfunction!(cli_main, m)?)?;
    Ok(())
}
