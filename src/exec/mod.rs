//! Running models in tract, and comparing two models on the same inputs.
//!
//! The bridge owns what tract needs to run exported transformers: the model goes over as
//! bytes (tract has its own proto types), without `value_info` (dynamo exports carry
//! symbolic shapes for intermediates that clash with concrete input shapes) and with input
//! shapes fixed from the actual inputs (legacy exports fail shape analysis otherwise); a plan
//! is built per input shape and cached. Every node is first checked against
//! `support`, because tract ignores operator domains. A panic inside tract becomes an
//! `ExecError`, never a crash. `Runner::with_outputs` returns intermediate values too, which
//! calibration uses to observe every tensor in one run. `ort::OrtRunner` runs models in
//! ONNX Runtime instead, with the same surface.

mod allocator;
pub mod compare;
pub mod engine;
pub mod features;
pub mod inputs;
pub mod lower;
pub mod ort;
pub mod padding;
pub mod perplexity;
pub mod rng;
mod rows;
pub mod support;
mod warm;

use rayon::prelude::*;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;

use prost::Message;
use tract_onnx::prelude::{
    InferenceFact, InferenceModel, InferenceModelExt, IntoTensor, OutletId, TValue, TVec, Tensor,
    TypedRunnableModel,
};

use crate::ir::{Model, Source};
pub use allocator::{map_large_blocks, return_freed_memory};
pub use compare::{OutputDiff, Tolerance};
pub use engine::{for_each_batch, Engine, EngineKind, EngineRunner};
pub use inputs::{Batch, GenerateOptions, InputSpec, NamedArrays};
pub use ort::{OrtOptions, OrtRunner};
pub use rows::Run;
pub use support::Unsupported;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot be run faithfully: {0}")]
    Unsupported(Unsupported),
    #[error("tract cannot run the model: {0}")]
    Tract(String),
    #[error("tract panicked: {0}")]
    Panic(String),
    #[error("ONNX Runtime is not available: {0}")]
    OrtUnavailable(String),
    #[error("ONNX Runtime cannot run the model: {0}")]
    Ort(String),
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Model(#[from] crate::Error),
}

/// Runs `f`, turning a panic (tract asserts on some malformed models) into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, ExecError>) -> Result<T, ExecError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(ExecError::Panic(msg))
    })
}

fn tract_err(e: impl std::fmt::Display) -> ExecError {
    // `{:#}` prints the whole context chain on one line: the cause is usually at its end.
    ExecError::Tract(format!("{e:#}"))
}

/// Hands tract the initializers whose bytes still lie in a file the model was read from as
/// external data at their place in that file: tract reads them itself, so the weights are
/// not first copied into the bytes tract parses (a 440 MB model would otherwise be held
/// three times while loading). Returns the folder the locations are relative to.
fn point_at_source_files(
    proto: &mut crate::proto::ModelProto,
    source: Option<&Source>,
) -> Option<PathBuf> {
    use crate::proto::tensor_proto::DataLocation;
    use crate::proto::StringStringEntryProto;
    let source = source?;
    let graph = proto.graph.as_mut()?;
    let entry = |k: &str, v: String| StringStringEntryProto {
        key: Some(k.to_string()),
        value: Some(v),
    };
    let mut any = false;
    for t in &mut graph.initializer {
        let Some(raw) = &t.raw_data else {
            continue;
        };
        if raw.len() < crate::io::EXTERNAL_THRESHOLD {
            continue;
        }
        let found = source
            .mappings
            .iter()
            .find_map(|m| m.offset_of(raw).map(|offset| (m, offset)));
        let Some((mapping, offset)) = found else {
            continue;
        };
        t.external_data = vec![
            entry("location", mapping.location.clone()),
            entry("offset", offset.to_string()),
            entry("length", raw.len().to_string()),
        ];
        t.data_location = Some(DataLocation::External as i32);
        t.raw_data = None;
        any = true;
    }
    any.then(|| source.dir.clone())
}

/// Converts a tensor of the IR to a tract tensor, through tract's own tensor loader.
pub fn to_tract(t: &crate::ir::Tensor) -> Result<Tensor, ExecError> {
    let raw = t.clone().into_raw_form();
    let p = raw.proto();
    let pb = tract_onnx::pb::TensorProto {
        dims: p.dims.clone(),
        data_type: p.data_type(),
        raw_data: p
            .raw_data
            .as_deref()
            .map(<[u8]>::to_vec)
            .unwrap_or_default(),
        string_data: p.string_data.iter().map(|s| s.to_vec()).collect(),
        ..Default::default()
    };
    guarded(|| {
        tract_onnx::tensor::load_tensor(&tract_onnx::data_resolver::MmapDataResolver, &pb, None)
            .map_err(tract_err)
    })
}

/// Converts a tract tensor to a tensor of the IR named `name`, with the ONNX element type
/// of its datum type (tract's symbolic dims, `TDim`, become int64 as in `Shape`'s output).
/// Types ONNX has no plain counterpart for (strings, blobs, quantized) are refused.
pub fn from_tract(name: &str, t: &Tensor) -> Result<crate::ir::Tensor, ExecError> {
    use crate::ir::DataType;
    use tract_onnx::prelude::DatumType;
    if cfg!(target_endian = "big") {
        // `as_bytes` is in the machine's order; ONNX raw data is little-endian.
        return Err(ExecError::Tract(
            "big-endian hosts are not supported".into(),
        ));
    }
    let t = onnx_typed(t.clone())?;
    let dtype = match t.datum_type() {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::Uint8,
        DatumType::U16 => DataType::Uint16,
        DatumType::U32 => DataType::Uint32,
        DatumType::U64 => DataType::Uint64,
        DatumType::I8 => DataType::Int8,
        DatumType::I16 => DataType::Int16,
        DatumType::I32 => DataType::Int32,
        DatumType::I64 => DataType::Int64,
        DatumType::F16 => DataType::Float16,
        DatumType::F32 => DataType::Float,
        DatumType::F64 => DataType::Double,
        other => {
            return Err(ExecError::Tract(format!(
                "`{name}` is {other:?}, which has no ONNX tensor type"
            )))
        }
    };
    let dims: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    let data = guarded(|| Ok(bytes::Bytes::copy_from_slice(t.as_bytes())))?;
    Ok(crate::ir::Tensor::from_raw(name, dtype, &dims, data)?)
}

/// A model loaded into tract, ready to run on batches of any shape.
///
/// No parsed model is kept for the shapes to come: tract's plan packs the weights of every
/// MatMul into a layout of its own, so a parsed model kept beside the plans would hold a
/// second, unpacked copy of every weight (a 440 MB model would take 880 MB in tract). The
/// plans for all the shapes a caller announces (`prepare`) are compiled from one parse,
/// the one made on loading at first; a shape seen later parses the model again.
pub struct Runner {
    /// The model as tract reads it (contrib operators lowered); its tensors share their
    /// bytes with the caller's model.
    model: Model,
    /// The parse made on loading, until the first plans take it.
    spare: Option<InferenceModel>,
    outlets: HashMap<String, OutletId>,
    inputs: Vec<InputSpec>,
    outputs: Vec<String>,
    plans: HashMap<Vec<Vec<usize>>, Arc<TypedRunnableModel>>,
}

impl Runner {
    /// Loads `model`, returning its graph outputs when run.
    pub fn new(model: &Model) -> Result<Runner, ExecError> {
        Runner::with_outputs(model, &model.graph.output_names())
    }

    /// Loads `model`, returning the named values (graph outputs or intermediates) when run.
    pub fn with_outputs(model: &Model, outputs: &[String]) -> Result<Runner, ExecError> {
        let mut lowered = model.clone();
        lower::lower_contrib_ops(&mut lowered)?;
        if let Some(u) = support::first_unsupported(&lowered) {
            return Err(ExecError::Unsupported(u));
        }
        let inputs = inputs::input_specs(&lowered)?;
        let (parsed, outlets) = parse(&lowered)?;
        if let Some(missing) = outputs.iter().find(|o| !outlets.contains_key(*o)) {
            return Err(ExecError::Input(format!(
                "the model has no value `{missing}`"
            )));
        }
        Ok(Runner {
            model: lowered,
            spare: Some(parsed),
            outlets,
            inputs,
            outputs: outputs.to_vec(),
            plans: HashMap::new(),
        })
    }

    pub fn inputs(&self) -> &[InputSpec] {
        &self.inputs
    }

    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// Runs one batch; returns the requested values in order.
    pub fn run(&mut self, batch: &Batch) -> Result<Vec<(String, Tensor)>, ExecError> {
        self.prepare(std::slice::from_ref(batch))?;
        execute(&self.plan_for(batch)?, &self.outputs, batch)
    }

    /// Runs `batches` at the same time, one per thread (tract runs each on one core);
    /// returns each batch's values, in order. Callers bound memory by the chunk they pass.
    pub fn run_parallel(
        &mut self,
        batches: &[Batch],
    ) -> Result<Vec<Vec<(String, Tensor)>>, ExecError> {
        self.prepare(batches)?;
        let plans = batches
            .iter()
            .map(|b| self.plan_for(b))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = &self.outputs;
        batches
            .par_iter()
            .zip(plans)
            .map(|(batch, plan)| execute(&plan, outputs, batch))
            .collect()
    }

    /// Compiles a plan for each input shape among `batches` not compiled yet, all at the same
    /// time (compiling costs about as much as running) and from one parse, which the plans
    /// share until the last one takes it: no unpacked copy of the weights outlives the
    /// compiling. Callers that know all their batches before running them call it first, so
    /// that the model is parsed once.
    pub fn prepare(&mut self, batches: &[Batch]) -> Result<(), ExecError> {
        let mut missing: HashMap<Vec<Vec<usize>>, &Batch> = HashMap::new();
        for b in batches {
            self.check_inputs(b)?;
            let key = shape_key(b);
            if !self.plans.contains_key(&key) {
                missing.entry(key).or_insert(b);
            }
        }
        let missing: Vec<&Batch> = missing.into_values().collect();
        let Some((last, others)) = missing.split_last() else {
            return Ok(());
        };
        let parsed = match self.spare.take() {
            Some(parsed) => parsed,
            None => parse(&self.model)?.0,
        };
        let mut jobs: Vec<(&Batch, InferenceModel)> =
            others.iter().map(|&b| (b, parsed.clone())).collect();
        jobs.push((last, parsed));
        let outlets: Vec<OutletId> = self.outputs.iter().map(|o| self.outlets[o]).collect();
        let compiled = jobs
            .into_par_iter()
            .map(|(b, parsed)| Ok((shape_key(b), compile(parsed, &outlets, b)?)))
            .collect::<Result<Vec<_>, ExecError>>()?;
        return_freed_memory();
        self.plans.extend(compiled);
        Ok(())
    }

    /// The plan `prepare` compiled for `batch`'s input shapes.
    fn plan_for(&self, batch: &Batch) -> Result<Arc<TypedRunnableModel>, ExecError> {
        self.plans
            .get(&shape_key(batch))
            .cloned()
            .ok_or_else(|| ExecError::Tract("no plan was compiled".into()))
    }

    /// An error unless `batch` holds the model's inputs, in order.
    fn check_inputs(&self, batch: &Batch) -> Result<(), ExecError> {
        check_batch(&self.inputs, batch)
    }
}

/// An error unless `batch` holds the inputs `inputs` (a model's), in order, with every token
/// id within the table it indexes.
fn check_batch(inputs: &[InputSpec], batch: &Batch) -> Result<(), ExecError> {
    if batch.tensors.len() != inputs.len()
        || batch
            .tensors
            .iter()
            .zip(inputs)
            .any(|((name, _), spec)| *name != spec.name)
    {
        let want: Vec<&str> = inputs.iter().map(|s| s.name.as_str()).collect();
        let got: Vec<&str> = batch.tensors.iter().map(|(n, _)| n.as_str()).collect();
        return Err(ExecError::Input(format!(
            "batch `{}` has inputs {got:?}, the model wants {want:?}",
            batch.name
        )));
    }
    for ((name, tensor), spec) in batch.tensors.iter().zip(inputs) {
        if let Some((_, last_row)) = spec.inferred_range {
            check_indices(&batch.name, name, tensor, last_row + 1)?;
        }
    }
    Ok(())
}

/// An error unless every value of `tensor`, an input that indexes a table of `rows` rows
/// (token ids into an embedding), is a row of it (ONNX's Gather counts negative indices from
/// the end). Checked before tract runs, which panics deep inside its Gather otherwise; ids
/// from another tokenizer or vocabulary are the usual cause.
fn check_indices(batch: &str, name: &str, tensor: &Tensor, rows: i64) -> Result<(), ExecError> {
    let Ok(values) = tensor.cast_to::<i64>() else {
        return Ok(());
    };
    let Ok(values) = values.to_plain_array_view::<i64>() else {
        return Ok(());
    };
    match values
        .iter()
        .enumerate()
        .find(|(_, v)| !(-rows..rows).contains(*v))
    {
        None => Ok(()),
        Some((at, value)) => Err(ExecError::Input(format!(
            "batch `{batch}`: input `{name}` holds {value} (element {at}), but it indexes a \
             table of {rows} rows: were these inputs made for this model (its tokenizer, its \
             vocabulary)?"
        ))),
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        // The plans and the spare parse hold nearly all of tract's memory.
        self.plans.clear();
        self.spare = None;
        return_freed_memory();
    }
}

/// The plan of `parsed` for `batch`'s input shapes, returning `outlets`.
fn compile(
    mut parsed: InferenceModel,
    outlets: &[OutletId],
    batch: &Batch,
) -> Result<Arc<TypedRunnableModel>, ExecError> {
    guarded(|| {
        for (i, (_, t)) in batch.tensors.iter().enumerate() {
            parsed
                .set_input_fact(i, InferenceFact::dt_shape(t.datum_type(), t.shape()))
                .map_err(tract_err)?;
        }
        parsed.select_output_outlets(outlets).map_err(tract_err)?;
        let typed = parsed.into_optimized().map_err(tract_err)?;
        tract_onnx::prelude::IntoRunnable::into_runnable(typed).map_err(tract_err)
    })
}

/// Parses `model` (contrib operators already lowered) into tract, with the names of its
/// values. tract reads the weights that are still slices of the model's files from the files
/// themselves, into a copy of its own: the pages of those files this process holds are handed
/// back first, so that a weight is not resident twice.
fn parse(model: &Model) -> Result<(InferenceModel, HashMap<String, OutletId>), ExecError> {
    let mut proto = model.to_proto()?;
    if let Some(g) = &mut proto.graph {
        g.value_info.clear();
    }
    // tract reads some typed fields from the wrong place (uint32 from int32_data):
    // hand it every tensor in raw form, the layout readers agree on.
    crate::io::walk::model_tensors(&mut proto, &mut |t| {
        *t = crate::ir::Tensor::from_proto(std::mem::take(t))?
            .into_raw_form()
            .into_proto();
        Ok(())
    })?;
    let model_dir = point_at_source_files(&mut proto, model.source.as_ref());
    let bytes = proto.encode_to_vec();
    drop(proto);
    if let Some(source) = &model.source {
        source.release_resident_pages();
    }
    // tract decodes into its own proto types, copying the weights held inline (those passes
    // made): drop the encoded form before tract copies them once more into its tensors.
    let pb = guarded(|| tract_onnx::pb::ModelProto::decode(&bytes[..]).map_err(tract_err))?;
    drop(bytes);
    guarded(|| {
        let mut framework = tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .with_ignore_value_info(true);
        // Plain reads: weights tract reads from the file do not also become resident
        // pages of a second mapping.
        framework.provider = Arc::new(tract_onnx::data_resolver::FopenDataResolver);
        let dir = model_dir.as_deref().and_then(|d| d.to_str());
        let result = framework.parse(&pb, dir).map_err(tract_err)?;
        if !result.unresolved_inputs.is_empty() {
            return Err(ExecError::Tract(format!(
                "unresolved inputs {:?}",
                result.unresolved_inputs
            )));
        }
        Ok((result.model, result.outlets_by_name))
    })
}

/// What a plan is compiled for: the input shapes.
fn shape_key(batch: &Batch) -> Vec<Vec<usize>> {
    batch
        .tensors
        .iter()
        .map(|(_, t)| t.shape().to_vec())
        .collect()
}

/// Runs `plan` on `batch`, naming its results `outputs`.
fn execute(
    plan: &Arc<TypedRunnableModel>,
    outputs: &[String],
    batch: &Batch,
) -> Result<Vec<(String, Tensor)>, ExecError> {
    let values: TVec<TValue> = batch
        .tensors
        .iter()
        .map(|(_, t)| t.clone().into())
        .collect();
    let results = guarded(|| plan.run(values).map_err(tract_err))?;
    outputs
        .iter()
        .cloned()
        .zip(results)
        .map(|(name, v)| Ok((name, onnx_typed(v.into_tensor())?)))
        .collect()
}

/// tract computes `Shape` and `Size` as symbolic dims (`TDim`); ONNX says int64.
fn onnx_typed(t: Tensor) -> Result<Tensor, ExecError> {
    if t.datum_type() == tract_onnx::prelude::DatumType::TDim {
        return Ok(t.cast_to::<i64>().map_err(tract_err)?.into_owned());
    }
    Ok(t)
}

/// Where validation inputs come from.
#[derive(Clone, Debug)]
pub enum InputSource {
    /// A directory of `.npy`/`.npz` batches.
    Dir(PathBuf),
    /// This many generated batches.
    Generated(usize),
    /// Batches already read (those a calibration held back).
    Batches(Vec<Batch>),
    /// The caller's batches as arrays by input name (NumPy arrays from the Python binding),
    /// checked and put in input order like a folder's.
    Arrays(Vec<NamedArrays>),
}

#[derive(Clone, Debug)]
pub struct ValidateOptions {
    pub inputs: InputSource,
    pub generate: GenerateOptions,
    /// Softmax temperature of the KL divergence.
    pub kl_temperature: f64,
    /// Outputs compared as logits (with KL divergence). Empty: outputs whose name contains
    /// "logits".
    pub logits: Vec<String>,
    /// Score both models' next-token predictions of the batches' `input_ids` (causal language
    /// models; see `perplexity`).
    pub perplexity: bool,
    pub tolerance: Tolerance,
    /// The engine both models run in.
    pub engine: Engine,
}

impl Default for ValidateOptions {
    fn default() -> Self {
        ValidateOptions {
            inputs: InputSource::Generated(2),
            generate: GenerateOptions::default(),
            kl_temperature: 1.0,
            logits: Vec::new(),
            perplexity: false,
            tolerance: Tolerance::default(),
            engine: Engine::default(),
        }
    }
}

/// The outcome of comparing a candidate model with a reference on the same inputs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Validation {
    /// The engine the reference ran in.
    pub reference_engine: EngineKind,
    /// The engine the candidate ran in.
    pub engine: EngineKind,
    /// What the first engine tried said, when another one had to decide.
    pub second_opinion: Option<String>,
    pub batches: Vec<String>,
    /// Worst error per output over all batches.
    pub outputs: Vec<OutputDiff>,
    pub tolerance: Tolerance,
    /// Each way the outputs break the tolerance; empty when they keep it.
    pub violations: Vec<String>,
    /// Next-token perplexity of both models, when asked and the model fits.
    pub perplexity: Option<Perplexity>,
}

/// The next-token perplexity of the reference and of the candidate on the same tokens, from
/// the first logits output (`perplexity::next_tokens`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Perplexity {
    pub output: String,
    pub tokens: usize,
    pub reference: f64,
    pub candidate: f64,
}

impl Validation {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Reads or makes the batches `source` asks for, for the inputs of `model`.
pub fn batches_for(
    model: &Model,
    source: &InputSource,
    generate: &GenerateOptions,
) -> Result<Vec<Batch>, ExecError> {
    let specs = inputs::input_specs(model)?;
    match source {
        InputSource::Dir(dir) => inputs::load_batches(dir, &specs),
        InputSource::Generated(n) => inputs::generate(&specs, generate, *n),
        InputSource::Batches(batches) => Ok(batches.clone()),
        InputSource::Arrays(arrays) => inputs::batches_from_arrays(arrays, &specs),
    }
}

/// Runs `reference` and `candidate` on the same batches and compares every output.
/// `on_batch` is called after each batch of each model (for a progress bar).
/// They run in the engines `options.engine` chooses for the pair (`Engine::choose_pair`);
/// with `Engine::Auto`, when tract fails to run either model or finds them apart, ONNX
/// Runtime (if there) runs both and decides: its kernels are the ones the models are written
/// for, where tract runs our lowerings or has a gap of its own. Generated batches of a
/// decoder with a KV cache carry the reference's own past (`warm`).
pub fn validate(
    reference: &Model,
    candidate: &Model,
    options: &ValidateOptions,
    on_batch: &dyn Fn(usize, usize),
) -> Result<Validation, ExecError> {
    let engines = options.engine.choose_pair(reference, candidate);
    let batches = batches_for(reference, &options.inputs, &options.generate)?;
    let batches = match options.inputs {
        InputSource::Generated(_) => warm::with_own_past(reference, batches, engines.0),
        _ => batches,
    };
    let run_in = |(ours, theirs): (EngineKind, EngineKind)| {
        let n = batches.len();
        let expected = Reference::run(reference, batches.clone(), ours, &|done, _| {
            on_batch(done, 2 * n)
        })?;
        expected.compare(candidate, theirs, options, &|done, _| {
            on_batch(n + done, 2 * n)
        })
    };
    let first_result = run_in(engines);
    let first_said = match &first_result {
        Ok(v) if v.passed() => return first_result,
        Err(ExecError::Input(_) | ExecError::Model(_)) => return first_result,
        Ok(v) => format!("tract found: {}", v.violations.join("; ")),
        Err(e) => format!("tract could not run them: {e}"),
    };
    let tract_ran = engines.0 == EngineKind::Tract || engines.1 == EngineKind::Tract;
    match options.engine.second_opinion() {
        Some(ort) if tract_ran => {
            let mut v = run_in((ort, ort))?;
            v.second_opinion = Some(first_said);
            Ok(v)
        }
        _ => first_result,
    }
}

/// A reference model's outputs on a set of batches, computed once and compared with as many
/// candidates as needed. The outputs are small next to a model's weights; keeping them, not
/// the reference's runner, means one model in tract at a time.
pub struct Reference {
    engine: EngineKind,
    batches: Vec<Batch>,
    inputs: Vec<InputSpec>,
    outputs: Vec<Vec<(String, Tensor)>>,
    /// The outputs whose first two axes an attention mask input indexes, by output name:
    /// they are compared at the positions the batch's mask keeps (`padding`). At padded
    /// positions a model computes values nothing reads (pooling and losses mask them out),
    /// and a quantized model, calibrated on real positions, moves them far more than it moves
    /// the rest.
    masked_by: HashMap<String, String>,
}

impl Reference {
    /// Runs `reference` in `engine` on `batches`; `on_batch(done, total)` after each.
    pub fn run(
        reference: &Model,
        batches: Vec<Batch>,
        engine: EngineKind,
        on_batch: &dyn Fn(usize, usize),
    ) -> Result<Reference, ExecError> {
        let mut runner = EngineRunner::new(engine, reference)?;
        runner.prepare(&batches)?;
        let mut outputs = Vec::with_capacity(batches.len());
        for chunk in batches.chunks(parallel_batches()) {
            outputs.extend(runner.run_parallel(chunk)?);
            on_batch(outputs.len(), batches.len());
        }
        let names = reference.graph.output_names();
        let masked_by = names
            .iter()
            .zip(padding::masks_indexing(reference, &names))
            .filter_map(|(output, mask)| Some((output.clone(), mask?)))
            .collect();
        Ok(Reference {
            engine,
            batches,
            inputs: runner.inputs().to_vec(),
            outputs,
            masked_by,
        })
    }

    /// Runs `candidate` in `engine` on the reference's batches and compares every output, by
    /// the tolerance, logits and temperature of `options` (its inputs are the reference's).
    pub fn compare(
        &self,
        candidate: &Model,
        engine: EngineKind,
        options: &ValidateOptions,
        on_batch: &dyn Fn(usize, usize),
    ) -> Result<Validation, ExecError> {
        let mut b = EngineRunner::new(engine, candidate)?;
        // The same inputs, in the same order; a float input may have another float type (an
        // FP16 model), and gets the reference's values cast to it.
        let same_inputs = self.inputs.len() == b.inputs().len()
            && self.inputs.iter().zip(b.inputs()).all(|(x, y)| {
                x.name == y.name
                    && (x.dtype == y.dtype || (x.dtype.is_float() && y.dtype.is_float()))
            });
        if !same_inputs {
            return Err(ExecError::Input(
                "the two models do not take the same inputs".into(),
            ));
        }
        let candidate_types: Vec<_> = b.inputs().iter().map(|s| s.dtype).collect();
        let candidate_batch = |batch: &Batch| -> Result<Batch, ExecError> {
            let tensors = batch
                .tensors
                .iter()
                .zip(&candidate_types)
                .map(|((name, t), &dtype)| {
                    let t = t.cast_to_dt(dtype).map_err(tract_err)?.into_owned();
                    Ok((name.clone(), t))
                })
                .collect::<Result<_, ExecError>>()?;
            Ok(Batch {
                name: batch.name.clone(),
                tensors,
            })
        };
        let is_logits = |name: &str| {
            if options.logits.is_empty() {
                name.to_ascii_lowercase().contains("logits")
            } else {
                options.logits.iter().any(|l| l == name)
            }
        };
        let inputs = self
            .batches
            .iter()
            .map(candidate_batch)
            .collect::<Result<Vec<_>, _>>()?;
        b.prepare(&inputs)?;
        let mut outputs: Vec<OutputDiff> = Vec::new();
        let mut likelihoods = options.perplexity.then(Likelihoods::default);
        let mut done = 0;
        for (chunk, expected) in inputs
            .chunks(parallel_batches())
            .zip(self.outputs.chunks(parallel_batches()))
        {
            for ((ra, rb), batch) in expected.iter().zip(b.run_parallel(chunk)?).zip(chunk) {
                if let Some(l) = &mut likelihoods {
                    l.add(batch, ra, &rb, &is_logits);
                }
                let compared = Compared {
                    is_logits: &is_logits,
                    masked_by: &self.masked_by,
                    batch,
                };
                compare_batch(ra, rb, &compared, options, &mut outputs)?;
                done += 1;
                on_batch(done, self.batches.len());
            }
        }
        let violations = outputs
            .iter()
            .flat_map(|d| options.tolerance.violations(d))
            .collect();
        Ok(Validation {
            reference_engine: self.engine,
            engine,
            second_opinion: None,
            batches: self.batches.iter().map(|b| b.name.clone()).collect(),
            outputs,
            tolerance: options.tolerance.clone(),
            violations,
            perplexity: likelihoods.and_then(Likelihoods::perplexity),
        })
    }
}

/// Both models' next-token likelihoods, summed over the batches where they could be scored.
#[derive(Default)]
struct Likelihoods {
    output: Option<String>,
    reference: perplexity::Likelihood,
    candidate: perplexity::Likelihood,
}

impl Likelihoods {
    /// Scores one batch on the first logits output, fed `input_ids` (and `attention_mask`).
    fn add(
        &mut self,
        batch: &Batch,
        reference: &[(String, Tensor)],
        candidate: &[(String, Tensor)],
        is_logits: &dyn Fn(&str) -> bool,
    ) {
        let Some(ids) = batch.tensor("input_ids") else {
            return;
        };
        let Some((name, expected)) = reference.iter().find(|(n, _)| is_logits(n)) else {
            return;
        };
        let Some((_, got)) = candidate.iter().find(|(n, _)| n == name) else {
            return;
        };
        let mask = batch.tensor("attention_mask");
        let scored = perplexity::next_tokens(expected, ids, mask)
            .zip(perplexity::next_tokens(got, ids, mask));
        if let Some((r, c)) = scored {
            self.output = Some(name.clone());
            self.reference.add(r);
            self.candidate.add(c);
        }
    }

    fn perplexity(self) -> Option<Perplexity> {
        Some(Perplexity {
            output: self.output?,
            tokens: self.reference.tokens,
            reference: self.reference.perplexity()?,
            candidate: self.candidate.perplexity()?,
        })
    }
}

/// How many batches run at once: one per thread, as tract runs each on one core.
pub fn parallel_batches() -> usize {
    rayon::current_num_threads().max(1)
}

/// How one batch's outputs are compared: which are logits, and which are compared at the
/// positions the batch's mask keeps (`Reference::masked_by`).
struct Compared<'a> {
    is_logits: &'a dyn Fn(&str) -> bool,
    masked_by: &'a HashMap<String, String>,
    batch: &'a Batch,
}

/// Folds one batch's differences between the reference's outputs `ra` and the candidate's
/// `rb` into `outputs` (one entry per reference output).
fn compare_batch(
    ra: &[(String, Tensor)],
    rb: Vec<(String, Tensor)>,
    compared: &Compared,
    options: &ValidateOptions,
    outputs: &mut Vec<OutputDiff>,
) -> Result<(), ExecError> {
    let rb: HashMap<String, Tensor> = rb.into_iter().collect();
    for (k, (name, ta)) in ra.iter().enumerate() {
        let tb = rb
            .get(name)
            .ok_or_else(|| ExecError::Input(format!("the candidate has no output `{name}`")))?;
        let t = (compared.is_logits)(name).then_some(options.kl_temperature);
        let mask = compared
            .masked_by
            .get(name)
            .and_then(|mask| Some((mask, compared.batch.tensor(mask)?)));
        let kept = mask.and_then(|(mask, m)| {
            let both = padding::kept_positions(ta, m).zip(padding::kept_positions(tb, m))?;
            Some((mask, both))
        });
        let d = match kept {
            Some((mask, (ka, kb))) => OutputDiff {
                at_positions_kept_by: Some(mask.clone()),
                ..compare::diff(name, &ka, &kb, t).map_err(ExecError::Input)?
            },
            None => compare::diff(name, ta, tb, t).map_err(ExecError::Input)?,
        };
        match outputs.get_mut(k) {
            Some(acc) => acc.merge(&d),
            None => outputs.push(d),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::DataType;

    #[test]
    fn an_output_the_mask_indexes_is_compared_at_the_kept_positions_only() {
        use tract_onnx::prelude::tract_ndarray::{arr2, Array3};
        let reference = Array3::from_shape_fn((2, 3, 2), |(b, s, f)| (1 + b + s + f) as f32);
        // The candidate is off only where the mask is 0.
        let mut candidate = reference.clone();
        candidate[[0, 2, 0]] = -50.0;
        candidate[[1, 1, 1]] = 80.0;
        let mask = Tensor::from(arr2(&[[1i64, 1, 0], [1, 0, 0]]));
        let batch = Batch {
            name: "b".into(),
            tensors: vec![("attention_mask".into(), mask)],
        };
        let ra = vec![("h".to_string(), Tensor::from(reference))];
        let rb = || vec![("h".to_string(), Tensor::from(candidate.clone()))];
        let is_logits = |_: &str| false;
        let compare = |masked_by: &HashMap<String, String>| {
            let compared = Compared {
                is_logits: &is_logits,
                masked_by,
                batch: &batch,
            };
            let mut outputs = Vec::new();
            compare_batch(
                &ra,
                rb(),
                &compared,
                &ValidateOptions::default(),
                &mut outputs,
            )
            .unwrap();
            outputs.remove(0)
        };
        let masked_by = HashMap::from([("h".to_string(), "attention_mask".to_string())]);
        let kept = compare(&masked_by);
        assert_eq!((kept.max_abs, kept.elements), (0.0, 6));
        assert_eq!(kept.at_positions_kept_by.as_deref(), Some("attention_mask"));
        let every = compare(&HashMap::new());
        assert!(every.max_abs > 50.0 && every.cosine < 0.9, "{every:?}");
        assert_eq!(every.at_positions_kept_by, None);
    }

    #[test]
    fn tensors_come_back_from_tract_with_their_onnx_type() {
        let f = crate::ir::Tensor::from_f32("f", &[2], &[1.5, -0.0]).unwrap();
        let back = from_tract("f", &to_tract(&f).unwrap()).unwrap();
        assert_eq!(back, f);
        let bools = crate::ir::Tensor::from_raw(
            "b",
            DataType::Bool,
            &[3],
            bytes::Bytes::from_static(&[1, 0, 1]),
        )
        .unwrap();
        let back = from_tract("b", &to_tract(&bools).unwrap()).unwrap();
        assert_eq!(back, bools);
        let dims = Tensor::from(tract_onnx::tract_hir::internal::tract_ndarray::arr1(&[
            tract_onnx::prelude::TDim::from(4),
        ]));
        let shape = from_tract("s", &dims).unwrap();
        assert_eq!(shape.dtype(), DataType::Int64);
        assert_eq!(shape.to_i64_vec().unwrap(), [4]);
        let text = Tensor::from(tract_onnx::tract_hir::internal::tract_ndarray::arr0(
            "x".to_string(),
        ));
        assert!(from_tract("t", &text).is_err());
    }
}
