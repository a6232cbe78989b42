//! Running models in ONNX Runtime, the second execution engine beside tract.
//!
//! tract runs ONNX Runtime's `com.microsoft` operators only through the lowerings of
//! `exec::lower`, which are our reading of ONNX Runtime's documentation; ONNX Runtime runs
//! them with its own kernels, so a model checked in both engines checks those lowerings too.
//! `OrtRunner` has the surface of tract's `Runner` (`new`, `with_outputs` for intermediate
//! values, `inputs`, `output_names`, `run`, `run_parallel`, `prepare`) and takes and gives
//! tract tensors, so callers compare the two engines' results with the same code.
//!
//! The library is never linked: it is found at run time (`locate`: `$ONNXOPT_ORT_LIB`, else
//! `$ORT_DYLIB_PATH`, else the `onnxruntime` Python package's `capi/libonnxruntime.so*`) and
//! loaded once per process (`available`), behind the cargo feature `ort` (on by default;
//! without it every constructor says so). ONNX Runtime 1.17 or newer loads: the `ort` crate
//! is used at its lowest C API level, 17. A library that is missing, unloadable or too old is
//! an `ExecError::OrtUnavailable` naming the file and the reason, never a panic.
//!
//! The model goes to ONNX Runtime with its graph outputs replaced by the requested values, as
//! a model file whose weights are in an external data file beside it, both in a temporary
//! folder kept as long as the session: ONNX Runtime maps the data file instead of copying the
//! weights into its own memory, and the pages of the input's files read to write it are handed
//! back, so that a session does not hold a second copy of the weights (BERT-base, 438 MB,
//! ONNX Runtime 1.32, before the first run: the session's own memory 766 MB from bytes, 340
//! MB from files, its pre-packed MatMul weights, which replace the mapped ones). A
//! model past protobuf's 2 GB keeps the weights it was read with in their files instead of
//! copying them: serialized bytes point at them and the session is told their folder, a
//! setting ONNX Runtime 1.23 reads and 1.20 ignores (it then refuses the model).

#[cfg(feature = "ort")]
mod session;

use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;
use tract_onnx::prelude::Tensor;

use super::{check_batch, Batch, ExecError, InputSpec};
use crate::ir::Model;
use crate::proto::ValueInfoProto;

/// A path to the ONNX Runtime shared library (`libonnxruntime.so*`), which wins over every
/// other place.
pub const LIB_VAR: &str = "ONNXOPT_ORT_LIB";
/// The `ort` crate's own variable for the library, read after `LIB_VAR`.
pub const ORT_DYLIB_VAR: &str = "ORT_DYLIB_PATH";

/// How much of ONNX Runtime's own graph optimizer runs on loading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Optimization {
    /// None: the graph runs as written, so that a check runs our rewrites, not ONNX Runtime's
    /// (its extended level fuses on its own and could hide a broken fusion of ours). Every
    /// operator onnxopt emits has a CPU kernel of its own; the transformations ONNX Runtime
    /// needs to run a graph at all (casts around float16 nodes without a float16 kernel)
    /// run at every level.
    #[default]
    Disabled,
    /// Constant folding and removal of redundant nodes.
    Basic,
    /// Basic, and fusions of ONNX Runtime's own.
    Extended,
    /// Everything, layout changes included: what a deployment gets.
    All,
}

/// How a session is made.
#[derive(Clone, Debug, Default)]
pub struct OrtOptions {
    /// Intra-op threads of the session; 0: one per thread of rayon's pool, the cores tract's
    /// `run_parallel` would use. Threads wait without spinning between runs.
    pub threads: usize,
    pub optimization: Optimization,
}

/// Where the ONNX Runtime library is, without loading it: `$ONNXOPT_ORT_LIB`, else
/// `$ORT_DYLIB_PATH`, else the shared library inside the `onnxruntime` Python package
/// (found by `python3` without importing it). A variable that is set but names no file is an
/// error, not a reason to look elsewhere.
pub fn locate() -> Result<PathBuf, String> {
    locate_with(&|var| std::env::var_os(var))
}

/// `locate`, reading the variables through `var`.
fn locate_with(var: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> Result<PathBuf, String> {
    for name in [LIB_VAR, ORT_DYLIB_VAR] {
        match var(name) {
            Some(path) if !path.is_empty() => {
                let path = PathBuf::from(path);
                return if path.is_file() {
                    Ok(std::path::absolute(&path).unwrap_or(path))
                } else {
                    Err(format!("{name}={} is not a file", path.display()))
                };
            }
            _ => {}
        }
    }
    python_wheel_library()
}

/// The library of the `onnxruntime` Python package that `python3` finds.
fn python_wheel_library() -> Result<PathBuf, String> {
    const FIND: &str = "import importlib.util as u; \
                        print(u.find_spec('onnxruntime').submodule_search_locations[0])";
    let python = if cfg!(windows) { "python" } else { "python3" };
    let out = Command::new(python)
        .args(["-c", FIND])
        .output()
        .map_err(|e| {
            format!("{LIB_VAR} and {ORT_DYLIB_VAR} are not set, and {python} cannot run: {e}")
        })?;
    if !out.status.success() {
        return Err(format!(
            "{LIB_VAR} and {ORT_DYLIB_VAR} are not set, and {python} has no onnxruntime \
             package (pip install onnxruntime)"
        ));
    }
    let package = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    library_in(&package.join("capi")).ok_or_else(|| {
        format!(
            "the onnxruntime package at {} holds no ONNX Runtime library in capi/",
            package.display()
        )
    })
}

/// The ONNX Runtime library in `dir` (the versioned name when there are several).
fn library_in(dir: &Path) -> Option<PathBuf> {
    let is_library = |name: &str| {
        if cfg!(target_os = "macos") {
            name.starts_with("libonnxruntime.") && name.ends_with(".dylib")
        } else if cfg!(windows) {
            name == "onnxruntime.dll"
        } else {
            name.starts_with("libonnxruntime.so")
        }
    };
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(is_library))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

/// The ONNX Runtime library this process uses, loading it on the first call (once per
/// process; a failure is remembered too): where it was found, or why it cannot be used.
pub fn available() -> Result<PathBuf, String> {
    runtime_path()
}

#[cfg(feature = "ort")]
fn runtime_path() -> Result<PathBuf, String> {
    session::runtime().map(|r| r.path.clone())
}

#[cfg(not(feature = "ort"))]
fn runtime_path() -> Result<PathBuf, String> {
    Err(NOT_BUILT.to_string())
}

#[cfg(not(feature = "ort"))]
const NOT_BUILT: &str = "onnxopt was built without the `ort` feature";

#[cfg(feature = "ort")]
type Engine = session::Engine;
/// Without the `ort` feature no runner can be made: methods that need a session cannot be
/// reached.
#[cfg(not(feature = "ort"))]
type Engine = std::convert::Infallible;

/// A model loaded into ONNX Runtime, with the surface of tract's `exec::Runner`.
pub struct OrtRunner {
    engine: Engine,
    inputs: Vec<InputSpec>,
    outputs: Vec<String>,
    /// The files the session was made from, which it may map: removed after the session
    /// (fields drop in order).
    _files: Option<tempfile::TempDir>,
}

impl OrtRunner {
    /// Loads `model`, returning its graph outputs when run.
    pub fn new(model: &Model) -> Result<OrtRunner, ExecError> {
        OrtRunner::with_outputs(model, &model.graph.output_names())
    }

    /// Loads `model`, returning the named values (graph outputs or intermediates) when run.
    pub fn with_outputs(model: &Model, outputs: &[String]) -> Result<OrtRunner, ExecError> {
        OrtRunner::with_options(model, outputs, &OrtOptions::default())
    }

    /// `with_outputs`, with the session made as `options` says.
    pub fn with_options(
        model: &Model,
        outputs: &[String],
        options: &OrtOptions,
    ) -> Result<OrtRunner, ExecError> {
        let inputs = super::inputs::input_specs(model)?;
        let (engine, files) = match session_model(model, outputs, PROTOBUF_LIMIT)? {
            SessionModel::Files { folder, model } => {
                (new_engine(Load::File(&model), options)?, Some(folder))
            }
            SessionModel::Bytes { bytes, dir } => (
                new_engine(Load::Bytes(&bytes, dir.as_deref()), options)?,
                None,
            ),
        };
        Ok(OrtRunner {
            engine,
            inputs,
            outputs: outputs.to_vec(),
            _files: files,
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
        check_batch(&self.inputs, batch)?;
        run_engine(&mut self.engine, &self.outputs, batch)
    }

    /// Runs `batches` one after the other, each on all the session's threads (ONNX Runtime
    /// parallelizes inside operators, where tract runs one batch per core); returns each
    /// batch's values, in order.
    pub fn run_parallel(
        &mut self,
        batches: &[Batch],
    ) -> Result<Vec<Vec<(String, Tensor)>>, ExecError> {
        self.prepare(batches)?;
        batches.iter().map(|b| self.run(b)).collect()
    }

    /// Checks that `batches` hold the model's inputs; ONNX Runtime needs no plan per shape.
    pub fn prepare(&mut self, batches: &[Batch]) -> Result<(), ExecError> {
        batches
            .iter()
            .try_for_each(|b| check_batch(&self.inputs, b))
    }
}

impl Drop for OrtRunner {
    fn drop(&mut self) {
        // ONNX Runtime frees a session's copy of the weights in blocks glibc keeps in its
        // heaps otherwise: the next session or plan would come on top of them.
        super::return_freed_memory();
    }
}

/// Where a session's model comes from.
#[derive(Clone, Copy)]
// Without the `ort` feature no session reads it.
#[cfg_attr(not(feature = "ort"), allow(dead_code))]
enum Load<'a> {
    /// A model file, its external data relative to its folder.
    File(&'a Path),
    /// Serialized bytes, external data locations relative to the folder given.
    Bytes(&'a [u8], Option<&'a Path>),
}

#[cfg(feature = "ort")]
fn new_engine(load: Load, options: &OrtOptions) -> Result<Engine, ExecError> {
    session::Engine::new(load, options)
}

#[cfg(not(feature = "ort"))]
fn new_engine(_: Load, _: &OrtOptions) -> Result<Engine, ExecError> {
    Err(ExecError::OrtUnavailable(NOT_BUILT.to_string()))
}

#[cfg(feature = "ort")]
fn run_engine(
    engine: &mut Engine,
    outputs: &[String],
    batch: &Batch,
) -> Result<Vec<(String, Tensor)>, ExecError> {
    engine.run(outputs, batch)
}

#[cfg(not(feature = "ort"))]
fn run_engine(
    engine: &mut Engine,
    _: &[String],
    _: &Batch,
) -> Result<Vec<(String, Tensor)>, ExecError> {
    match *engine {}
}

/// The protobuf limit a session's model must fit, weights included, to be written to files.
const PROTOBUF_LIMIT: usize = crate::io::PROTOBUF_LIMIT as usize;

/// A model as a session is made from it.
enum SessionModel {
    /// `model` in `folder`, its weights in an external data file beside it.
    Files {
        folder: tempfile::TempDir,
        model: PathBuf,
    },
    /// Serialized bytes whose weights point at the files the model was read from, relative to
    /// `dir`.
    Bytes {
        bytes: Vec<u8>,
        dir: Option<PathBuf>,
    },
}

/// `model` for ONNX Runtime, its graph outputs being `outputs`: written with its weights as
/// external data to a temporary folder when, weights included, it fits in `limit` bytes (or
/// serialized whole when that folder cannot be written);
/// past that, serialized with the weights still in the model's files pointing at their place
/// there (as for tract), so that the largest models are not copied.
fn session_model(
    model: &Model,
    outputs: &[String],
    limit: usize,
) -> Result<SessionModel, ExecError> {
    let mut proto = session_proto(model, outputs)?;
    if proto.encoded_len() <= limit {
        return Ok(match session_files(model, proto) {
            Ok((folder, path)) => SessionModel::Files {
                folder,
                model: path,
            },
            // A temporary folder that cannot hold the weights (a small tmpfs, say): the bytes
            // carry them, and ONNX Runtime copies them in as it always could.
            Err(_) => SessionModel::Bytes {
                bytes: session_proto(model, outputs)?.encode_to_vec(),
                dir: None,
            },
        });
    }
    let dir = super::point_at_source_files(&mut proto, model.source.as_ref())
        .map(|d| std::path::absolute(&d).unwrap_or(d));
    if proto.encoded_len() > limit {
        return Err(ExecError::Input(format!(
            "the model takes {} bytes besides the weights still in its files, more than \
             protobuf's {limit}-byte limit: save it with external data first",
            proto.encoded_len()
        )));
    }
    Ok(SessionModel::Bytes {
        bytes: proto.encode_to_vec(),
        dir,
    })
}

/// `proto`, a session's model, written to a new temporary folder (in `std::env::temp_dir()`,
/// `$TMPDIR` on Unix) with its weights in a data file beside it; the folder and the model's
/// path.
fn session_files(
    model: &Model,
    proto: crate::proto::ModelProto,
) -> Result<(tempfile::TempDir, PathBuf), ExecError> {
    let folder = tempfile::Builder::new()
        .prefix("onnxopt-ort-")
        .tempdir()
        .map_err(|e| ExecError::Input(format!("a temporary folder: {e}")))?;
    let path = folder.path().join("model.onnx");
    crate::io::save_proto(
        proto,
        &path,
        crate::io::ExternalData::Always,
        false,
        model.source.as_ref(),
    )?;
    // The session reads the weights from its own file: the pages of the model's files this
    // process has read (writing that file, or by passes that replaced weights, as SmoothQuant
    // does) need not stay resident beside it.
    if let Some(source) = &model.source {
        source.release_resident_pages();
    }
    Ok((folder, path))
}

/// `model` as a `ModelProto` whose graph outputs are `outputs`.
fn session_proto(model: &Model, outputs: &[String]) -> Result<crate::proto::ModelProto, ExecError> {
    let g = &model.graph;
    let mut declared: Vec<ValueInfoProto> = Vec::with_capacity(outputs.len());
    for name in outputs {
        if declared.iter().any(|d| d.name() == name) {
            continue;
        }
        let value = g
            .find_value(name)
            .filter(|&v| !g.value(v).removed)
            .ok_or_else(|| ExecError::Input(format!("the model has no value `{name}`")))?;
        let decl = match g.outputs.iter().find(|p| p.value == value) {
            Some(port) => port.decl.clone(),
            // The element type only: a shape recorded for an intermediate may name its dims
            // otherwise than ONNX Runtime's own inference, which then refuses the model.
            None => ValueInfoProto {
                name: Some(name.clone()),
                r#type: g.value_type(value).map(|t| {
                    crate::ir::ValueType {
                        elem: t.elem,
                        shape: None,
                    }
                    .to_type_proto()
                }),
                ..Default::default()
            },
        };
        declared.push(decl);
    }
    let mut proto = model.to_proto()?;
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| ExecError::Input("the model has no graph".into()))?;
    graph.output = declared;
    Ok(proto)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// True when the library has loaded. Its absence fails the test unless
    /// `ONNXOPT_SKIP_ORT` or `ONNXOPT_SKIP_ORT_ENGINE` is set: skipping is asked for, never
    /// the default.
    #[cfg(feature = "ort")]
    pub(super) fn loaded_or_skip(test: &str) -> bool {
        let skip = ["ONNXOPT_SKIP_ORT", "ONNXOPT_SKIP_ORT_ENGINE"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
        if skip {
            println!("{test}: skipped, as ONNXOPT_SKIP_ORT(_ENGINE) asks");
            return false;
        }
        if let Err(why) = available() {
            panic!(
                "{test}: ONNX Runtime is not available: {why} (ONNXOPT_SKIP_ORT_ENGINE=1 skips)"
            );
        }
        true
    }

    #[test]
    fn the_variables_come_first_in_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = (dir.path().join("ours.so"), dir.path().join("theirs.so"));
        std::fs::write(&ours, b"").unwrap();
        std::fs::write(&theirs, b"").unwrap();
        let env = |pairs: Vec<(&'static str, PathBuf)>| {
            move |var: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == var)
                    .map(|(_, v)| v.clone().into_os_string())
            }
        };
        let both = env(vec![
            (LIB_VAR, ours.clone()),
            (ORT_DYLIB_VAR, theirs.clone()),
        ]);
        assert_eq!(locate_with(&both).unwrap(), ours);
        let only_ort = env(vec![(ORT_DYLIB_VAR, theirs.clone())]);
        assert_eq!(locate_with(&only_ort).unwrap(), theirs);
        // A variable naming no file is an error, not a reason to look elsewhere.
        let missing = env(vec![
            (LIB_VAR, dir.path().join("nope.so")),
            (ORT_DYLIB_VAR, theirs),
        ]);
        let why = locate_with(&missing).unwrap_err();
        assert!(why.contains(LIB_VAR) && why.contains("not a file"), "{why}");
    }

    #[test]
    fn the_versioned_library_is_picked_from_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(library_in(dir.path()), None);
        for name in [
            "libonnxruntime_providers_shared.so",
            "libonnxruntime.so.1.32.0",
            "__init__.py",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let found = library_in(dir.path()).unwrap();
        if cfg!(target_os = "linux") {
            assert_eq!(found.file_name().unwrap(), "libonnxruntime.so.1.32.0");
        }
    }

    #[test]
    fn discovery_finds_a_library_or_says_why() {
        match locate() {
            Ok(path) => assert!(path.is_file(), "{}", path.display()),
            Err(why) => {
                assert!(!why.is_empty());
                println!("no ONNX Runtime library: {why}");
            }
        }
        #[cfg(feature = "ort")]
        if loaded_or_skip("discovery_finds_a_library_or_says_why") {
            let loaded = available().unwrap();
            assert!(loaded.is_file());
            // Loaded once: the second answer is the first.
            assert_eq!(available().unwrap(), loaded);
        }
        #[cfg(not(feature = "ort"))]
        assert!(available().unwrap_err().contains("`ort` feature"));
    }

    #[test]
    fn an_unknown_value_is_refused_before_loading() {
        let model = crate::ir::testing::model(&["x"], &["y"], &[], &[("Relu", &["x"], &["y"])]);
        let Err(err) = session_model(&model, &["nope".to_string()], PROTOBUF_LIMIT) else {
            panic!("an unknown value was accepted");
        };
        assert!(err.to_string().contains("no value `nope`"), "{err}");
    }

    #[test]
    fn intermediates_become_the_graph_outputs_with_their_element_type() {
        use crate::proto::tensor_proto::DataType;
        let model = crate::ir::testing::builder()
            .input("x", DataType::Float, &["batch", "4"])
            .typed("h", DataType::Float, &["batch", "4"])
            .output("y", DataType::Float, &["batch", "4"])
            .node("Relu", &["x"], &["h"], vec![])
            .node("Neg", &["h"], &["y"], vec![])
            .build();
        let wanted = ["h".to_string(), "y".to_string(), "h".to_string()];
        let proto = session_proto(&model, &wanted).unwrap();
        let outputs = &proto.graph.unwrap().output;
        let names: Vec<&str> = outputs.iter().map(|o| o.name()).collect();
        assert_eq!(names, ["h", "y"]);
        let tt = |o: &ValueInfoProto| match o.r#type.as_ref().unwrap().value.clone().unwrap() {
            crate::proto::type_proto::Value::TensorType(t) => t,
            _ => panic!("not a tensor"),
        };
        assert_eq!(tt(&outputs[0]).elem_type(), DataType::Float as i32);
        assert!(tt(&outputs[0]).shape.is_none());
        assert!(
            tt(&outputs[1]).shape.is_some(),
            "a graph output keeps its declaration"
        );
    }
}
