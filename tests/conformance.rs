//! The ONNX operator conformance tests (`corpus/onnx-node-tests`, 1802 cases): each model is
//! round-tripped through the IR, run in tract on the case's inputs, and compared with the
//! case's expected outputs.
//!
//! Every case ends in one of four groups, all printed:
//! - passed: tract's outputs match the reference (rtol 1e-3, atol 1e-7, onnx's defaults);
//! - tract cannot run: tract (or our domain check) refuses the model or fails running it;
//! - tract differs: tract runs it but disagrees with the reference (tract's problem);
//! - broken: our loader refused a valid model, or the round trip changed the model's bytes
//!   or its results. These are our bugs: the test fails if there is any.

mod common;

use std::path::{Path, PathBuf};

use onnxopt::exec::{self, Batch, Runner};
use onnxopt::io::{self, ExternalData};
use onnxopt::ir::{Model, Tensor};
use onnxopt::proto::type_proto::Value as Type;
use onnxopt::proto::TensorProto;
use prost::Message;
use rayon::prelude::*;
use tract_onnx::prelude::{DatumType, Tensor as TractTensor};

enum Outcome {
    Passed,
    CannotRun(String),
    Differs(String),
    Broken(String),
}

#[test]
fn onnx_node_tests_round_trip_and_run() {
    std::panic::set_hook(Box::new(|_| {}));
    let root = common::corpus().join("onnx-node-tests/node");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("node tests")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("model.onnx").is_file())
        .collect();
    cases.sort();
    assert_eq!(cases.len(), 1802, "the corpus should hold 1802 node tests");
    let scratch = tempfile::tempdir().unwrap();
    let outcomes: Vec<(String, Outcome)> = cases
        .par_iter()
        .map(|case| {
            let name = case.file_name().unwrap().to_string_lossy().into_owned();
            let outcome = run_case(case, &scratch.path().join(&name));
            (name, outcome)
        })
        .collect();

    let mut groups: [Vec<String>; 4] = Default::default();
    for (name, outcome) in outcomes {
        let (i, line) = match outcome {
            Outcome::Passed => (0, name),
            Outcome::CannotRun(why) => (1, format!("{name}: {why}")),
            Outcome::Differs(why) => (2, format!("{name}: {why}")),
            Outcome::Broken(why) => (3, format!("{name}: {why}")),
        };
        groups[i].push(line);
    }
    let [passed, cannot_run, differs, broken] = groups;
    println!(
        "tract cannot run ({}):\n  {}",
        cannot_run.len(),
        cannot_run.join("\n  ")
    );
    println!(
        "tract differs from the reference ({}):\n  {}",
        differs.len(),
        differs.join("\n  ")
    );
    println!(
        "broken by onnxopt ({}):\n  {}",
        broken.len(),
        broken.join("\n  ")
    );
    println!(
        "onnx node tests: {} passed / {} tract cannot run / {} tract differs / {} broken (of {})",
        passed.len(),
        cannot_run.len(),
        differs.len(),
        broken.len(),
        cases.len()
    );
    assert!(
        broken.is_empty(),
        "{} cases broken by the round trip",
        broken.len()
    );
}

fn run_case(case: &Path, scratch: &Path) -> Outcome {
    let original_path = case.join("model.onnx");
    let original = match io::load(&original_path) {
        Ok(m) => m,
        Err(e) => return Outcome::Broken(format!("load: {e}")),
    };
    let saved = scratch.with_extension("onnx");
    if let Err(e) = io::save(&original, &saved, ExternalData::Never) {
        return Outcome::Broken(format!("save: {e}"));
    }
    let roundtrip = match io::load(&saved) {
        Ok(m) => m,
        Err(e) => return Outcome::Broken(format!("reload: {e}")),
    };
    let same_bytes = std::fs::read(&saved).ok() == std::fs::read(&original_path).ok();
    let _ = std::fs::remove_file(&saved);
    if !same_bytes && original.to_proto().ok() != roundtrip.to_proto().ok() {
        return Outcome::Broken("the round trip changed the model".into());
    }

    if let Some(kind) = non_tensor_io(&roundtrip) {
        return Outcome::CannotRun(format!("{kind} inputs or outputs"));
    }
    let data = case.join("test_data_set_0");
    let batch = match read_batch(&roundtrip, &data) {
        Ok(b) => b,
        Err(e) => return e,
    };
    let got = match Runner::new(&roundtrip).and_then(|mut r| r.run(&batch)) {
        Ok(outputs) => outputs,
        Err(e) => return Outcome::CannotRun(first_line(&e.to_string())),
    };
    if !same_bytes {
        // The file changed (it held non-canonical encoding): the results must not.
        let before = Runner::new(&original).and_then(|mut r| r.run(&batch));
        match before {
            Ok(before) if before == got => {}
            _ => return Outcome::Broken("the round trip changed the results".into()),
        }
    }
    for (i, (name, actual)) in got.iter().enumerate() {
        let expected = match read_tensor(&data.join(format!("output_{i}.pb"))) {
            Ok(t) => t,
            Err(e) => return e,
        };
        if let Err(why) = allclose(&expected, actual) {
            return Outcome::Differs(format!("output `{name}`: {why}"));
        }
    }
    Outcome::Passed
}

/// Names the first graph input or output that is not a tensor (tract runs tensors only).
fn non_tensor_io(model: &Model) -> Option<&'static str> {
    let g = &model.graph;
    g.inputs.iter().chain(&g.outputs).find_map(|p| {
        match p.decl.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(Type::TensorType(_)) => None,
            Some(Type::SequenceType(_)) => Some("sequence"),
            Some(Type::OptionalType(_)) => Some("optional"),
            Some(Type::MapType(_)) => Some("map"),
            Some(Type::SparseTensorType(_)) => Some("sparse tensor"),
            _ => Some("untyped"),
        }
    })
}

/// Reads a serialized `TensorProto`: failing to decode it is our bug, tract refusing its
/// element type is not.
fn read_tensor(path: &Path) -> Result<TractTensor, Outcome> {
    let bytes = std::fs::read(path).map_err(|e| Outcome::Broken(e.to_string()))?;
    let proto = TensorProto::decode(&bytes[..]).map_err(|e| Outcome::Broken(e.to_string()))?;
    let tensor = Tensor::from_proto(proto).map_err(|e| Outcome::Broken(e.to_string()))?;
    exec::to_tract(&tensor).map_err(|e| Outcome::CannotRun(first_line(&e.to_string())))
}

fn read_batch(model: &Model, data: &Path) -> Result<Batch, Outcome> {
    let specs = exec::inputs::input_specs(model)
        .map_err(|e| Outcome::CannotRun(first_line(&e.to_string())))?;
    let tensors = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let t = read_tensor(&data.join(format!("input_{i}.pb")))?;
            Ok((spec.name.clone(), t))
        })
        .collect::<Result<_, Outcome>>()?;
    Ok(Batch {
        name: "test_data_set_0".into(),
        tensors,
    })
}

/// numpy's `assert_allclose(expected, actual, rtol=1e-3, atol=1e-7)`, NaN equal to NaN.
fn allclose(expected: &TractTensor, actual: &TractTensor) -> Result<(), String> {
    if expected.shape() != actual.shape() {
        return Err(format!(
            "shape {:?}, expected {:?}",
            actual.shape(),
            expected.shape()
        ));
    }
    if expected.datum_type() != actual.datum_type() {
        return Err(format!(
            "type {:?}, expected {:?}",
            actual.datum_type(),
            expected.datum_type()
        ));
    }
    let dt = expected.datum_type();
    if dt == DatumType::String || dt == DatumType::Bool || dt.is_integer() {
        return if expected == actual {
            Ok(())
        } else {
            Err("values differ".into())
        };
    }
    let as_f64 = |t: &TractTensor| -> Result<Vec<f64>, String> {
        let c = t.cast_to::<f64>().map_err(|e| e.to_string())?;
        let view = c.to_plain_array_view::<f64>().map_err(|e| e.to_string())?;
        Ok(view.iter().copied().collect())
    };
    let (e, a) = (as_f64(expected)?, as_f64(actual)?);
    let bad = e
        .iter()
        .zip(&a)
        .filter(|(e, a)| {
            let both_nan = e.is_nan() && a.is_nan();
            !(both_nan || **e == **a || (*e - *a).abs() <= 1e-7 + 1e-3 * e.abs())
        })
        .count();
    if bad == 0 {
        Ok(())
    } else {
        Err(format!("{bad} of {} values differ", e.len()))
    }
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or_default();
    line.chars().take(160).collect()
}
