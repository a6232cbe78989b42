//! The ONNX operator conformance tests (`corpus/onnx-node-tests`, 1802 cases): each model is
//! round-tripped through the IR, run in tract on the case's inputs, and compared with the
//! case's expected outputs.
//!
//! A second test folds each case whose inputs are made constants (`fold` below).
//!
//! Every case of the first test ends in one of four groups, all printed:
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
use onnxopt::passes::dce::DeadCodeElimination;
use onnxopt::passes::fold::ConstantFolding;
use onnxopt::passes::PassManager;
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

/// The folders of the node tests, sorted.
fn node_test_cases() -> Vec<PathBuf> {
    let root = common::corpus().join("onnx-node-tests/node");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("node tests")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("model.onnx").is_file())
        .collect();
    cases.sort();
    assert_eq!(cases.len(), 1802, "the corpus should hold 1802 node tests");
    cases
}

#[test]
fn onnx_node_tests_round_trip_and_run() {
    std::panic::set_hook(Box::new(|_| {}));
    let cases = node_test_cases();
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

/// Each case that tract runs, with its inputs made initializers, goes through constant folding:
/// every output it folds must be what tract computes when it runs the case, since a folded
/// model must compute what the original does. Integers, bools and strings must be identical;
/// float arithmetic folded by tract's plain evaluation may round differently from its
/// run-time kernels by a few units in the last place (`FloatTolerance`), and those cases are
/// counted. Outputs the size budget keeps as nodes are counted, not checked.
#[test]
fn folding_a_node_test_gives_what_running_it_gives() {
    std::panic::set_hook(Box::new(|_| {}));
    let outcomes: Vec<(String, Result<Folded, String>)> = node_test_cases()
        .par_iter()
        .map(|case| {
            let name = case.file_name().unwrap().to_string_lossy().into_owned();
            (name, fold_case(case))
        })
        .collect();
    let (mut exact, mut rounded, mut kept, mut skipped) = (0, Vec::new(), 0, 0);
    let mut wrong = Vec::new();
    for (name, outcome) in outcomes {
        match outcome {
            Ok(Folded::Exactly) => exact += 1,
            Ok(Folded::Rounded(abs)) => rounded.push((abs, name)),
            Ok(Folded::NotAll) => kept += 1,
            Ok(Folded::Skipped) => skipped += 1,
            Err(why) => wrong.push(format!("{name}: {why}")),
        }
    }
    rounded.sort_by(|a, b| b.0.total_cmp(&a.0));
    let worst: Vec<String> = rounded
        .iter()
        .take(5)
        .map(|(abs, name)| format!("{name} {abs:.1e}"))
        .collect();
    println!("folded wrong ({}):\n  {}", wrong.len(), wrong.join("\n  "));
    println!(
        "folding node tests: {exact} folded exactly / {} folded within float rounding \
         (worst: {}) / {kept} with outputs left to run / {skipped} not run by tract / {} wrong",
        rounded.len(),
        worst.join(", "),
        wrong.len()
    );
    assert!(wrong.is_empty(), "{} cases folded wrong", wrong.len());
}

enum Folded {
    /// Every output became an initializer holding exactly what tract computes.
    Exactly,
    /// Every output was folded, floats within rounding (the worst absolute difference).
    Rounded(f64),
    /// Some outputs stayed computed (the size budget, or a node tract runs only whole).
    NotAll,
    /// tract cannot run the case, or its inputs cannot be constants: nothing to compare.
    Skipped,
}

fn fold_case(case: &Path) -> Result<Folded, String> {
    let Ok(model) = io::load(&case.join("model.onnx")) else {
        return Ok(Folded::Skipped);
    };
    if non_tensor_io(&model).is_some() {
        return Ok(Folded::Skipped);
    }
    let Ok(batch) = read_batch(&model, &case.join("test_data_set_0")) else {
        return Ok(Folded::Skipped);
    };
    let Ok(ran) = Runner::new(&model).and_then(|mut r| r.run(&batch)) else {
        return Ok(Folded::Skipped);
    };
    // The same model with its inputs as initializers.
    let mut proto = model.to_proto().map_err(|e| e.to_string())?;
    let graph = proto.graph.as_mut().ok_or("no graph")?;
    for (name, t) in &batch.tensors {
        let Ok(constant) = exec::from_tract(name, t) else {
            return Ok(Folded::Skipped);
        };
        graph.input.retain(|v| v.name() != name);
        graph.initializer.push(constant.into_proto());
    }
    let mut constant = Model::from_proto(proto).map_err(|e| e.to_string())?;
    PassManager::new()
        .with(ConstantFolding)
        .with(DeadCodeElimination)
        .run(&mut constant)
        .map_err(|e| format!("the passes failed: {e}"))?;
    let g = &constant.graph;
    let mut outcome = Folded::Exactly;
    for (port, (name, expected)) in g.outputs.iter().zip(&ran) {
        let Some(t) = g.initializer(port.value) else {
            outcome = Folded::NotAll;
            continue;
        };
        let got = exec::to_tract(t).map_err(|e| e.to_string())?;
        let abs = difference(expected, &got).map_err(|why| format!("output `{name}`: {why}"))?;
        if abs > 0.0 {
            outcome = match outcome {
                Folded::Exactly => Folded::Rounded(abs),
                Folded::Rounded(worst) => Folded::Rounded(worst.max(abs)),
                other => other,
            };
        }
    }
    Ok(outcome)
}

/// How far a float may round differently: |folded - ran| <= atol + rtol * |ran|.
struct FloatTolerance {
    atol: f64,
    rtol: f64,
}

/// The largest absolute difference of `got` from `expected`: 0 for identical tensors, within
/// `FloatTolerance` for floats; an error for anything else.
fn difference(expected: &TractTensor, got: &TractTensor) -> Result<f64, String> {
    let (dt, shape) = (expected.datum_type(), expected.shape());
    if dt != got.datum_type() || shape != got.shape() {
        return Err(format!(
            "folded {:?} {:?}, ran {dt:?} {shape:?}",
            got.datum_type(),
            got.shape()
        ));
    }
    if !dt.is_float() {
        return if expected == got {
            Ok(0.0)
        } else {
            Err("values differ".into())
        };
    }
    let tolerance = match dt {
        DatumType::F16 => FloatTolerance {
            atol: 1e-3,
            rtol: 1e-3,
        },
        _ => FloatTolerance {
            atol: 1e-6,
            rtol: 1e-5,
        },
    };
    let as_f64 = |t: &TractTensor| -> Result<Vec<f64>, String> {
        let c = t.cast_to::<f64>().map_err(|e| e.to_string())?;
        let view = c.to_plain_array_view::<f64>().map_err(|e| e.to_string())?;
        Ok(view.iter().copied().collect())
    };
    let mut worst = 0.0f64;
    for (e, g) in as_f64(expected)?.into_iter().zip(as_f64(got)?) {
        if (e.is_nan() && g.is_nan()) || e == g {
            continue;
        }
        let d = (e - g).abs();
        if d.is_nan() || d > tolerance.atol + tolerance.rtol * e.abs() {
            return Err(format!("{g} folded, {e} ran"));
        }
        worst = worst.max(d);
    }
    Ok(worst)
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
