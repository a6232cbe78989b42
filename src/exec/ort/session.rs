//! The calls into ONNX Runtime, through the `ort` crate (feature `ort`): loading the library
//! once per process, making sessions, and converting tract tensors to ONNX Runtime values
//! and back.
//!
//! Every call is guarded: `ort` panics in a few places (a library it cannot use, a null
//! pointer from the C API), and a panic becomes an `ExecError`. Nothing calls into `ort`
//! before the library has loaded, as `ort` would then look for a library of its own.

use std::path::PathBuf;
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};
use ort::AsPointer;
use tract_onnx::prelude::{DatumType, Tensor};
use tract_onnx::tract_hir::internal::tract_ndarray::{ArrayD, IxDyn};

use super::{Load, Optimization, OrtOptions};
use crate::exec::{tract_err, Batch, ExecError};

/// The loaded library, and the one environment `ort` allows per process.
pub(super) struct Runtime {
    pub(super) path: PathBuf,
    environment: Environment,
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// The library, loaded on the first call; the same answer, success or failure, afterwards.
pub(super) fn runtime() -> Result<&'static Runtime, String> {
    RUNTIME.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Runtime, String> {
    let path = super::locate()?;
    let path = path.canonicalize().unwrap_or(path);
    let environment = guarded(|| {
        let builder = ort::init_from(&path).map_err(|e| ExecError::Ort(e.to_string()))?;
        builder
            .with_name("onnxopt")
            .with_telemetry(false)
            .build()
            .map_err(|e| ExecError::Ort(e.to_string()))
    })
    .map_err(|e| match e {
        ExecError::Ort(why) => why,
        other => other.to_string(),
    })?;
    Ok(Runtime { path, environment })
}

/// Runs `f`, turning a panic inside `ort` into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, ExecError>) -> Result<T, ExecError> {
    crate::exec::guarded(f).map_err(|e| match e {
        ExecError::Panic(why) => ExecError::Ort(format!("the ort crate panicked: {why}")),
        other => other,
    })
}

fn ort_err(e: impl std::fmt::Display) -> ExecError {
    ExecError::Ort(e.to_string())
}

/// A status returned by a call into the C API, as a result.
fn ort_status(status: ort::sys::OrtStatusPtr) -> Result<(), ExecError> {
    // SAFETY: `status` was just returned by the API, which hands its ownership to us.
    unsafe { ort::Error::result_from_status(status) }.map_err(ort_err)
}

/// A session of ONNX Runtime.
pub(super) struct Engine {
    session: Session,
}

impl Engine {
    /// A session for the model `load` names.
    pub(super) fn new(load: Load, options: &OrtOptions) -> Result<Engine, ExecError> {
        let runtime = runtime().map_err(ExecError::OrtUnavailable)?;
        let threads = match options.threads {
            0 => rayon::current_num_threads().max(1),
            n => n,
        };
        let level = match options.optimization {
            Optimization::Disabled => GraphOptimizationLevel::Disable,
            Optimization::Basic => GraphOptimizationLevel::Level1,
            Optimization::Extended => GraphOptimizationLevel::Level2,
            Optimization::All => GraphOptimizationLevel::All,
        };
        let session = guarded(|| {
            let mut builder = Session::builder(&runtime.environment)
                .map_err(ort_err)?
                .with_optimization_level(level)
                .map_err(ort_err)?
                .with_intra_threads(threads)
                .map_err(ort_err)?
                .with_inter_threads(1)
                .map_err(ort_err)?
                // Idle threads would spin for a while after each run, on cores that tract
                // or another session may need.
                .with_config_entry("session.intra_op.allow_spinning", "0")
                .map_err(ort_err)?;
            // Without its arena, a run's values are freed back to the process when the run
            // ends (large blocks to the system: `exec::allocator`), instead of being kept
            // for the next run: calibration asks for a hundred intermediate values per
            // batch, which the arena would hold on top of our copies of them.
            let options_ptr = builder.ptr_mut();
            // SAFETY: the builder's options pointer is valid while the builder lives.
            let status = unsafe { (ort::api().DisableCpuMemArena)(options_ptr) };
            ort_status(status)?;
            let (bytes, dir) = match load {
                Load::File(path) => return builder.commit_from_file(path).map_err(ort_err),
                Load::Bytes(bytes, dir) => (bytes, dir),
            };
            if let Some(dir) = dir {
                let dir = dir.to_str().ok_or_else(|| {
                    ExecError::Ort(format!("{} is not valid UTF-8", dir.display()))
                })?;
                builder = builder
                    .with_config_entry("session.model_external_initializers_file_folder_path", dir)
                    .map_err(ort_err)?;
            }
            builder.commit_from_memory(bytes).map_err(|e| match dir {
                // Older versions ignore the folder and look in the working directory.
                Some(dir) => ExecError::Ort(format!(
                    "{e} (the weights are read from files in {}, which needs ONNX Runtime \
                     1.23 or newer)",
                    dir.display()
                )),
                None => ort_err(e),
            })
        })?;
        Ok(Engine { session })
    }

    /// Runs `batch`, returning the values named `outputs` (graph outputs of the session).
    pub(super) fn run(
        &mut self,
        outputs: &[String],
        batch: &Batch,
    ) -> Result<Vec<(String, Tensor)>, ExecError> {
        let session = &mut self.session;
        guarded(move || {
            let inputs = batch
                .tensors
                .iter()
                .map(|(name, t)| Ok((name.as_str(), to_ort(name, t)?)))
                .collect::<Result<Vec<_>, ExecError>>()?;
            let mut results = session.run(inputs).map_err(ort_err)?;
            // Each value is dropped once copied, so that ONNX Runtime's copies of a batch's
            // values (calibration asks for every activation it observes) and ours are never
            // all held at once.
            let mut values: Vec<(String, Tensor)> = Vec::with_capacity(outputs.len());
            for name in outputs {
                let tensor = match results.remove(name) {
                    Some(value) => from_ort(name, &value)?,
                    // A name asked for twice.
                    None => values
                        .iter()
                        .find(|(done, _)| done == name)
                        .map(|(_, t)| t.clone())
                        .ok_or_else(|| {
                            ExecError::Ort(format!("ONNX Runtime gave no value `{name}`"))
                        })?,
                };
                values.push((name.clone(), tensor));
            }
            Ok(values)
        })
    }
}

/// `t` as an ONNX Runtime value; plain types are lent, not copied.
pub(super) fn to_ort<'t>(name: &str, t: &'t Tensor) -> Result<SessionInputValue<'t>, ExecError> {
    let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    let convert_err = |e: ort::Error| ExecError::Input(format!("input `{name}`: {e}"));
    macro_rules! lend {
        ($ty:ty) => {{
            let plain = t.try_as_plain_ram().map_err(tract_err)?;
            let data = plain.as_slice::<$ty>().map_err(tract_err)?;
            TensorRef::from_array_view((shape, data))
                .map(SessionInputValue::from)
                .map_err(convert_err)
        }};
    }
    match t.datum_type() {
        DatumType::F32 => lend!(f32),
        DatumType::F16 => lend!(half::f16),
        DatumType::F64 => lend!(f64),
        DatumType::I64 => lend!(i64),
        DatumType::I32 => lend!(i32),
        DatumType::I16 => lend!(i16),
        DatumType::I8 => lend!(i8),
        DatumType::U64 => lend!(u64),
        DatumType::U32 => lend!(u32),
        DatumType::U16 => lend!(u16),
        DatumType::U8 => lend!(u8),
        DatumType::Bool => lend!(bool),
        DatumType::String => {
            let plain = t.try_as_plain_ram().map_err(tract_err)?;
            let data = plain.as_slice::<String>().map_err(tract_err)?;
            ort::value::Tensor::from_string_array((shape, data))
                .map(SessionInputValue::from)
                .map_err(convert_err)
        }
        DatumType::TDim => {
            let wide = t.cast_to::<i64>().map_err(tract_err)?;
            let data = wide.to_plain_array_view::<i64>().map_err(tract_err)?;
            let data: Vec<i64> = data.iter().copied().collect();
            ort::value::Tensor::from_array((shape, data))
                .map(SessionInputValue::from)
                .map_err(convert_err)
        }
        other => Err(ExecError::Input(format!(
            "input `{name}` is {other:?}, which ONNX Runtime is not fed here"
        ))),
    }
}

/// An ONNX Runtime value as a tract tensor (a copy).
pub(super) fn from_ort(name: &str, value: &DynValue) -> Result<Tensor, ExecError> {
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(ExecError::Ort(format!(
            "value `{name}` is a {}, not a tensor",
            value.dtype()
        )));
    };
    let convert_err = |e: ort::Error| ExecError::Ort(format!("value `{name}`: {e}"));
    let dims = |shape: &ort::value::Shape| -> Vec<usize> {
        shape.iter().map(|&d| d.max(0) as usize).collect()
    };
    macro_rules! copy {
        ($ty:ty) => {{
            let (shape, data) = value.try_extract_tensor::<$ty>().map_err(convert_err)?;
            Tensor::from_shape::<$ty>(&dims(shape), data).map_err(tract_err)
        }};
    }
    match ty {
        TensorElementType::Float32 => copy!(f32),
        TensorElementType::Float16 => copy!(half::f16),
        TensorElementType::Float64 => copy!(f64),
        TensorElementType::Int64 => copy!(i64),
        TensorElementType::Int32 => copy!(i32),
        TensorElementType::Int16 => copy!(i16),
        TensorElementType::Int8 => copy!(i8),
        TensorElementType::Uint64 => copy!(u64),
        TensorElementType::Uint32 => copy!(u32),
        TensorElementType::Uint16 => copy!(u16),
        TensorElementType::Uint8 => copy!(u8),
        TensorElementType::Bool => copy!(bool),
        TensorElementType::String => {
            let (shape, data) = value.try_extract_strings().map_err(convert_err)?;
            let array = ArrayD::from_shape_vec(IxDyn(&dims(shape)), data)
                .map_err(|e| ExecError::Ort(format!("value `{name}`: {e}")))?;
            Ok(Tensor::from(array))
        }
        other => Err(ExecError::Ort(format!(
            "value `{name}` has element type {other}, which tract has no type for"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::loaded_or_skip;
    use super::super::OrtRunner;
    use super::*;
    use crate::proto::tensor_proto::DataType;

    fn batch(tensors: Vec<(&str, Tensor)>) -> Batch {
        Batch {
            name: "b".into(),
            tensors: tensors
                .into_iter()
                .map(|(n, t)| (n.to_string(), t))
                .collect(),
        }
    }

    #[test]
    fn every_element_type_goes_through_onnx_runtime_unchanged() {
        if !loaded_or_skip("every_element_type_goes_through_onnx_runtime_unchanged") {
            return;
        }
        let values: Vec<(&str, DataType, Tensor)> = vec![
            (
                "f32",
                DataType::Float,
                Tensor::from_shape(&[2, 2], &[1.5f32, -0.0, f32::INFINITY, 3e-38]).unwrap(),
            ),
            (
                "f16",
                DataType::Float16,
                Tensor::from_shape(&[3], &[1.5f32, -2.0, 65504.0].map(half::f16::from_f32))
                    .unwrap(),
            ),
            (
                "f64",
                DataType::Double,
                Tensor::from_shape(&[2], &[1e-300f64, -7.25]).unwrap(),
            ),
            (
                "i64",
                DataType::Int64,
                Tensor::from_shape(&[2, 1], &[i64::MIN, 1 << 40]).unwrap(),
            ),
            (
                "i32",
                DataType::Int32,
                Tensor::from_shape(&[2], &[i32::MAX, -5]).unwrap(),
            ),
            (
                "i8",
                DataType::Int8,
                Tensor::from_shape(&[3], &[-128i8, 0, 127]).unwrap(),
            ),
            (
                "u8",
                DataType::Uint8,
                Tensor::from_shape(&[2], &[0u8, 255]).unwrap(),
            ),
            (
                "bool",
                DataType::Bool,
                Tensor::from_shape(&[1, 3], &[true, false, true]).unwrap(),
            ),
            (
                "empty",
                DataType::Float,
                Tensor::from_shape::<f32>(&[0, 4], &[]).unwrap(),
            ),
            (
                "text",
                DataType::String,
                Tensor::from(
                    ArrayD::from_shape_vec(IxDyn(&[2]), vec!["a".to_string(), "é".into()]).unwrap(),
                ),
            ),
        ];
        let mut builder = crate::ir::testing::builder();
        for (name, dtype, t) in &values {
            let rank = t.rank();
            let dims = vec!["?"; rank];
            let out = format!("{name}.out");
            builder = builder
                .input(name, *dtype, &dims)
                .output(&out, *dtype, &dims)
                .node("Identity", &[name], &[&out], vec![]);
        }
        let model = builder.build();
        let mut runner = OrtRunner::new(&model).unwrap();
        let results = runner
            .run(&batch(
                values.iter().map(|(n, _, t)| (*n, t.clone())).collect(),
            ))
            .unwrap();
        assert_eq!(results.len(), values.len());
        for ((name, _, sent), (out, got)) in values.iter().zip(&results) {
            assert_eq!(*out, format!("{name}.out"));
            assert_eq!(got, sent, "{name}");
        }
    }

    #[test]
    fn intermediate_values_come_back_in_the_order_asked() {
        if !loaded_or_skip("intermediate_values_come_back_in_the_order_asked") {
            return;
        }
        let model = crate::ir::testing::builder()
            .input("x", DataType::Float, &["n"])
            .typed("h", DataType::Float, &["n"])
            .output("y", DataType::Float, &["n"])
            .node("Relu", &["x"], &["h"], vec![])
            .node("Neg", &["h"], &["y"], vec![])
            .build();
        let wanted = ["y".to_string(), "h".to_string()];
        let mut runner = OrtRunner::with_outputs(&model, &wanted).unwrap();
        assert_eq!(runner.output_names(), wanted);
        let x = Tensor::from_shape(&[3], &[-1.0f32, 0.5, 2.0]).unwrap();
        let results = runner.run_parallel(&[batch(vec![("x", x)])]).unwrap();
        let [values] = &results[..] else {
            panic!("one batch")
        };
        let h = Tensor::from_shape(&[3], &[0.0f32, 0.5, 2.0]).unwrap();
        let y = Tensor::from_shape(&[3], &[-0.0f32, -0.5, -2.0]).unwrap();
        assert_eq!(values[0], ("y".to_string(), y));
        assert_eq!(values[1], ("h".to_string(), h));
    }

    #[test]
    fn broken_models_and_batches_are_errors() {
        if !loaded_or_skip("broken_models_and_batches_are_errors") {
            return;
        }
        let unknown = crate::ir::testing::builder()
            .input("x", DataType::Float, &["n"])
            .output("y", DataType::Float, &["n"])
            .node("NoSuchOperator", &["x"], &["y"], vec![])
            .build();
        match OrtRunner::new(&unknown) {
            Err(ExecError::Ort(why)) => assert!(why.contains("NoSuchOperator"), "{why}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("an unknown operator loaded"),
        }
        let model = crate::ir::testing::model(&["x"], &["y"], &[], &[("Relu", &["x"], &["y"])]);
        let mut runner = OrtRunner::new(&model).unwrap();
        let wrong_name = batch(vec![("z", Tensor::from_shape(&[1], &[1.0f32]).unwrap())]);
        assert!(matches!(runner.run(&wrong_name), Err(ExecError::Input(_))));
        let wrong_type = batch(vec![("x", Tensor::from_shape(&[1], &[1i64]).unwrap())]);
        match runner.run(&wrong_type) {
            Err(ExecError::Ort(why)) => assert!(why.contains("x"), "{why}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn weights_in_external_data_files_are_read_from_them() {
        if !loaded_or_skip("weights_in_external_data_files_are_read_from_them") {
            return;
        }
        let weights: Vec<f32> = (0..64 * 64).map(|i| (i % 17) as f32 * 0.25 - 2.0).collect();
        let model = crate::ir::testing::builder()
            .input("x", DataType::Float, &["n", "64"])
            .output("y", DataType::Float, &["n", "64"])
            .init(crate::ir::Tensor::from_f32("w", &[64, 64], &weights).unwrap())
            .node("MatMul", &["x", "w"], &["y"], vec![])
            .build();
        let dir_of_model = tempfile::tempdir().unwrap();
        let saved = dir_of_model.path().join("m.onnx");
        crate::io::save(&model, &saved, crate::io::ExternalData::Always).unwrap();
        assert!(dir_of_model.path().join("m.onnx.data").is_file());
        let loaded = crate::io::load(&saved).unwrap();
        let x: Vec<f32> = (0..2 * 64).map(|i| (i % 5) as f32 - 2.0).collect();
        let input = batch(vec![("x", Tensor::from_shape(&[2, 64], &x).unwrap())]);
        let expected = crate::exec::Runner::new(&model)
            .unwrap()
            .run(&input)
            .unwrap();
        let outputs = ["y".to_string()];
        // Under the limit, written to a folder of the session's own with the weights in a
        // data file beside the model; past it (a model past 2 GB), left in the model's own
        // data file, which the session is pointed at.
        let Ok(super::super::SessionModel::Files {
            folder,
            model: path,
        }) = super::super::session_model(&loaded, &outputs, super::super::PROTOBUF_LIMIT)
        else {
            panic!("the model fits: written to files");
        };
        let data = std::fs::metadata(folder.path().join("model.onnx.data")).unwrap();
        assert!(data.len() >= 64 * 64 * 4 && std::fs::metadata(&path).unwrap().len() < 4096);
        let Ok(super::super::SessionModel::Bytes { bytes: small, dir }) =
            super::super::session_model(&loaded, &outputs, 4096)
        else {
            panic!("past the limit: serialized");
        };
        assert_eq!(
            dir.as_deref(),
            Some(std::path::absolute(dir_of_model.path()).unwrap().as_path())
        );
        assert!(small.len() < 4096);
        for load in [Load::File(&path), Load::Bytes(&small, dir.as_deref())] {
            let engine = Engine::new(load, &Default::default()).unwrap();
            let mut runner = OrtRunner {
                engine,
                inputs: crate::exec::inputs::input_specs(&loaded).unwrap(),
                outputs: outputs.to_vec(),
                _files: None,
            };
            let got = runner.run(&input).unwrap();
            let d = crate::exec::compare::diff("y", &expected[0].1, &got[0].1, None).unwrap();
            assert!(d.max_abs < 1e-4, "{d:?}");
        }
    }
}
