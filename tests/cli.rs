//! End-to-end runs of the `onnxopt` binary over `testdata/`: the happy paths, and every kind
//! of bad input, each of which must give a one-line reason, a non-zero exit and no output.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use onnxopt::proto::tensor_proto::{DataLocation, DataType};
use onnxopt::proto::type_proto::{Tensor as TensorType, Value as Type};
use onnxopt::proto::{
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TypeProto, ValueInfoProto,
};
use prost::Message;
use tract_onnx::tract_hir::internal::tract_ndarray::ArrayD;

fn onnxopt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_onnxopt"))
        .args(args)
        .output()
        .expect("run onnxopt")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `optimize` on `model` and checks that it fails cleanly: exit code 1, one line on
/// stderr containing `expected`, and no output file or temporary file left behind.
fn assert_refused(model: &Path, expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let result = onnxopt(&["optimize", s(model), s(&out)]);
    let stderr = text(&result.stderr);
    assert_eq!(
        result.status.code(),
        Some(1),
        "{}: {stderr}",
        model.display()
    );
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(expected), "`{expected}` not in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

/// A valid one-node model: y = Relu(x), x and y f32[2], with one initializer `w` (unused by
/// default) that the tests below corrupt.
fn tiny_model() -> ModelProto {
    let f32_2 = |name: &str| ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(Type::TensorType(TensorType {
                elem_type: Some(DataType::Float as i32),
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: vec![relu("x", "y")],
            initializer: vec![TensorProto {
                name: Some("w".into()),
                dims: vec![4],
                data_type: Some(DataType::Float as i32),
                raw_data: Some(vec![0u8; 16].into()),
                ..Default::default()
            }],
            input: vec![f32_2("x")],
            output: vec![f32_2("y")],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn relu(input: &str, output: &str) -> NodeProto {
    NodeProto {
        op_type: Some("Relu".into()),
        input: vec![input.into()],
        output: vec![output.into()],
        ..Default::default()
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn external(location: &str) -> ModelProto {
    let mut m = tiny_model();
    let w = &mut m.graph.as_mut().unwrap().initializer[0];
    w.raw_data = None;
    w.data_location = Some(DataLocation::External as i32);
    w.external_data = vec![StringStringEntryProto {
        key: Some("location".into()),
        value: Some(location.into()),
    }];
    m
}

#[test]
fn bad_inputs_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = std::fs::read(common::testdata("bert-tiny.ts.onnx")).unwrap();
    let noise: Vec<u8> = (0..4096u64)
        .map(|i| onnxopt::exec::rng::splitmix64(42, i) as u8)
        .collect();

    assert_refused(&write(d, "empty.onnx", b""), "empty file");
    assert_refused(
        &write(d, "truncated.onnx", &good[..good.len() / 2]),
        "not a valid ONNX protobuf",
    );
    assert_refused(&write(d, "noise.onnx", &noise), "ONNX");
    let tensor = TensorProto {
        name: Some("t".into()),
        dims: vec![2],
        data_type: Some(DataType::Float as i32),
        float_data: vec![1.0, 2.0],
        ..Default::default()
    };
    assert_refused(
        &write(d, "tensor.onnx", &tensor.encode_to_vec()),
        "not an ONNX model",
    );

    std::fs::write(dir.path().join("w.data"), [0u8; 16]).unwrap();
    let ok = write(d, "ok.onnx", &tiny_model().encode_to_vec());
    let written = onnxopt(&["optimize", s(&ok), s(&d.join("ok.out.onnx"))]);
    assert!(written.status.success(), "{}", text(&written.stderr));
    let _ = std::fs::remove_file(d.join("ok.out.onnx"));

    // External data that leaves the model's folder, or is missing.
    let sub = d.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let climb = write(&sub, "climb.onnx", &external("../w.data").encode_to_vec());
    assert_refused(&climb, "leaves the model's folder");
    let absolute = write(
        &sub,
        "abs.onnx",
        &external(s(&d.join("w.data"))).encode_to_vec(),
    );
    assert_refused(&absolute, "absolute path");
    let missing = write(
        &sub,
        "missing.onnx",
        &external("nothing.data").encode_to_vec(),
    );
    assert_refused(&missing, "missing external data file");

    let mut short = tiny_model();
    short.graph.as_mut().unwrap().initializer[0].dims = vec![1000];
    assert_refused(
        &write(d, "short.onnx", &short.encode_to_vec()),
        "need 4000 bytes but raw_data holds 16",
    );

    let mut cycle = tiny_model();
    cycle.graph.as_mut().unwrap().node = vec![relu("b", "a"), relu("a", "b"), relu("x", "y")];
    assert_refused(&write(d, "cycle.onnx", &cycle.encode_to_vec()), "cycle");

    let mut dangling = tiny_model();
    dangling.graph.as_mut().unwrap().node = vec![relu("ghost", "y")];
    assert_refused(
        &write(d, "dangling.onnx", &dangling.encode_to_vec()),
        "reads `ghost`, which no node, graph input or initializer produces",
    );

    // A missing input file is an error too, not a panic.
    assert_refused(&d.join("does-not-exist.onnx"), "No such file");
}

/// Damaged copies of a real model (bytes overwritten, truncated, or a stretch copied from
/// elsewhere in the file: what a bad download or disk does) either still optimize or are
/// refused with one line; none may panic. The damage is drawn from a fixed seed.
#[test]
fn damaged_models_are_optimized_or_refused_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(common::testdata("bert-tiny.ts.onnx")).unwrap();
    let mut draws = (0u64..).map(|i| onnxopt::exec::rng::splitmix64(7, i) as usize);
    let mut draw = |below: usize| draws.next().unwrap() % below;
    let (mut optimized, mut refused) = (0, 0);
    for case in 0..60 {
        let mut bytes = good.clone();
        match case % 3 {
            0 => {
                for _ in 0..1 + draw(8) {
                    let at = draw(bytes.len());
                    bytes[at] = draw(256) as u8;
                }
            }
            1 => bytes.truncate(draw(bytes.len())),
            _ => {
                let (to, from) = (draw(bytes.len() - 16), draw(good.len() - 16));
                bytes[to..to + 16].copy_from_slice(&good[from..from + 16]);
            }
        }
        let model = write(dir.path(), "damaged.onnx", &bytes);
        let out = dir.path().join("out.onnx");
        let result = onnxopt(&["optimize", s(&model), s(&out)]);
        let stderr = text(&result.stderr);
        assert!(!stderr.contains("panicked"), "case {case}: {stderr}");
        match result.status.code() {
            Some(0) => optimized += 1,
            Some(1) => {
                assert_eq!(stderr.lines().count(), 1, "case {case}: {stderr}");
                assert!(stderr.starts_with("error: "), "case {case}: {stderr}");
                assert!(!out.exists(), "case {case}: refused but wrote an output");
                refused += 1;
            }
            other => panic!("case {case}: exit {other:?}: {stderr}"),
        }
        let _ = std::fs::remove_file(&out);
    }
    // Both outcomes occur, so the damage is neither always fatal nor always harmless.
    assert!(
        optimized > 0 && refused > 0,
        "{optimized} optimized, {refused} refused"
    );
}

#[test]
fn validation_refuses_what_tract_cannot_run_faithfully() {
    let dir = tempfile::tempdir().unwrap();
    let mut contrib = tiny_model();
    contrib.graph.as_mut().unwrap().node[0].domain = Some("com.microsoft".into());
    contrib.graph.as_mut().unwrap().node[0].op_type = Some("Attention".into());
    let model = write(dir.path(), "contrib.onnx", &contrib.encode_to_vec());
    let result = onnxopt(&["validate", s(&model), s(&model)]);
    let stderr = text(&result.stderr);
    assert_eq!(result.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("cannot validate"), "{stderr}");
    assert!(stderr.contains("com.microsoft::Attention"), "{stderr}");
    let out = dir.path().join("out.onnx");
    let refused = onnxopt(&["optimize", s(&model), s(&out), "--validate"]);
    assert_eq!(refused.status.code(), Some(3));
    assert!(!out.exists());
}

/// Runs `optimize MODEL OUT ARGS --report R` and returns its output and the report, after
/// checking that it succeeded.
fn optimize_with_report(model: &Path, out: &Path, args: &[&str]) -> (Output, serde_json::Value) {
    let report = out.with_extension("report.json");
    let mut all = vec!["optimize", s(model), s(out)];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--report", s(&report)]);
    let result = onnxopt(&all);
    assert!(result.status.success(), "{}", text(&result.stderr));
    let json = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (result, json)
}

#[test]
fn optimize_validates_and_writes_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bert.onnx");
    let model = common::testdata("bert-tiny.ts.onnx");
    let calib = common::testdata("calib/bert-tiny");
    let (result, json) = optimize_with_report(&model, &out, &["--validate", "--inputs", s(&calib)]);
    let stdout = text(&result.stdout);
    assert!(
        stdout.contains("validation on 2 batches in ") && stdout.contains(": within tolerance"),
        "{stdout}"
    );
    let engine = json["validation"]["engine"].as_str().unwrap();
    assert!(engine == "tract" || engine == "onnxruntime", "{engine}");
    let passes: Vec<&str> = json["passes"]["passes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pass"].as_str().unwrap())
        .collect();
    assert!(
        passes.contains(&"dce") && passes.contains(&"fuse-gelu"),
        "{passes:?}"
    );
    assert_eq!(
        json["validation"]["outputs"][0]["name"],
        "last_hidden_state"
    );
    // Fused operators add up in another order: equal up to float rounding.
    let max_abs = json["validation"]["outputs"][0]["max_abs"]
        .as_f64()
        .unwrap();
    assert!(max_abs < 1e-5, "{max_abs}");
    assert_eq!(json["target"], "ort");
    // The output records its target and holds the fused operators.
    let mut written = onnxopt::io::load(&out).unwrap();
    assert_eq!(written.metadata("onnxopt.target"), Some("ort"));
    written.envelope.metadata_props.clear();
    let original = onnxopt::io::load(&model).unwrap();
    let fused = ["Attention", "BiasGelu", "Sum", "LayerNormalization"];
    let ops = |m: &onnxopt::ir::Model| -> Vec<String> {
        m.graph
            .nodes()
            .map(|(_, n)| n.op_type().to_string())
            .collect()
    };
    for op in fused {
        assert!(ops(&written).iter().any(|o| o == op), "{op} missing");
    }
    assert_eq!(written.ir_version(), original.ir_version());
}

#[test]
fn a_broken_tolerance_refuses_to_write() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    // A negative tolerance cannot be met even by identical outputs.
    let result = onnxopt(&[
        "optimize",
        s(&common::testdata("bert-tiny.dynamo.onnx")),
        s(&out),
        "--validate",
        "--max-error=-1",
    ]);
    assert_eq!(result.status.code(), Some(3), "{}", text(&result.stderr));
    assert!(text(&result.stderr).contains("was not written"));
    assert!(!out.exists());
}

#[test]
fn output_over_input_needs_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.onnx");
    std::fs::copy(common::testdata("bert-tiny.ts.onnx"), &model).unwrap();
    let refused = onnxopt(&["optimize", s(&model), s(&model)]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused.stderr).contains("--in-place"));
    let allowed = onnxopt(&["optimize", s(&model), s(&model), "--in-place"]);
    assert!(allowed.status.success(), "{}", text(&allowed.stderr));
}

#[test]
fn external_data_round_trips_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::testdata("bert-tiny.ts.onnx");
    let ext = dir.path().join("ext.onnx");
    let result = onnxopt(&["optimize", s(&model), s(&ext), "--external-data"]);
    assert!(result.status.success(), "{}", text(&result.stderr));
    let data = dir.path().join("ext.onnx.data");
    assert!(
        data.metadata().unwrap().len() > 500_000,
        "weights should be in the data file"
    );
    assert!(
        ext.metadata().unwrap().len() < 100_000,
        "the model file should hold no weights"
    );

    // Default (auto) keeps the input's layout; --no-external-data folds it back.
    let again = dir.path().join("again.onnx");
    assert!(onnxopt(&["optimize", s(&ext), s(&again)]).status.success());
    assert!(dir.path().join("again.onnx.data").exists());
    let single = dir.path().join("single.onnx");
    assert!(
        onnxopt(&["optimize", s(&ext), s(&single), "--no-external-data"])
            .status
            .success()
    );
    assert!(!dir.path().join("single.onnx.data").exists());
    assert!(single.metadata().unwrap().len() > 500_000);

    let validate = onnxopt(&["validate", s(&model), s(&ext)]);
    assert!(validate.status.success(), "{}", text(&validate.stdout));
    let inspect = text(&onnxopt(&["inspect", s(&ext)]).stdout);
    assert!(inspect.contains("external     ext.onnx.data"), "{inspect}");
}

#[test]
fn inspect_and_dump_describe_the_model() {
    let model = common::testdata("bert-tiny.dynamo.onnx");
    let inspect = onnxopt(&["inspect", s(&model)]);
    let stdout = text(&inspect.stdout);
    assert!(inspect.status.success());
    for expected in [
        "ir_version   10",
        "opsets       ai.onnx 20",
        "input        input_ids: i64[batch, sequence]",
        "output       last_hidden_state: f32[batch, sequence, 64]",
        "parameters   143555 in 57 initializers",
        "nodes        120",
    ] {
        assert!(stdout.contains(expected), "`{expected}` not in:\n{stdout}");
    }
    let json = onnxopt(&["inspect", s(&model), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["op_histogram"]["LayerNormalization"], 5);

    let dump = onnxopt(&["dump", s(&model)]);
    assert!(dump.status.success());
    let first = text(&dump.stdout);
    assert_eq!(
        first,
        text(&onnxopt(&["dump", s(&model)]).stdout),
        "dump is stable"
    );
    assert!(first.contains("= Gelu[approximate=\"none\"](%linear_4)"));
}

#[test]
fn run_writes_outputs_as_npy() {
    let dir = tempfile::tempdir().unwrap();
    let result = onnxopt(&[
        "run",
        s(&common::testdata("bert-tiny.ts.onnx")),
        "--inputs",
        s(&common::testdata("calib/bert-tiny")),
        "--output-dir",
        s(dir.path()),
    ]);
    assert!(result.status.success(), "{}", text(&result.stderr));
    let written = dir.path().join("batch_00.last_hidden_state.npy");
    let array: ArrayD<f32> =
        ndarray_npy::ReadNpyExt::read_npy(std::fs::File::open(written).unwrap()).unwrap();
    assert_eq!(array.shape(), &[8, 16, 64]);
    let reference: ArrayD<f32> = ndarray_npy::ReadNpyExt::read_npy(
        std::fs::File::open(
            common::corpus().join("calib/bert-tiny/ref_batch_00.last_hidden_state.npy"),
        )
        .unwrap(),
    )
    .unwrap();
    // ONNX Runtime's output for the same batch, written when the corpus was built.
    let worst = array
        .iter()
        .zip(reference.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "tract and ONNX Runtime differ by {worst}");
}

#[test]
fn int8_calibrates_validates_on_held_back_batches_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bert.int8.onnx");
    let model = common::testdata("bert-tiny.ts.onnx");
    let calib = common::testdata("calib/bert-tiny");
    let (result, json) = optimize_with_report(&model, &out, &["--int8", "--calib", s(&calib)]);
    let stdout = text(&result.stdout);
    assert!(stdout.contains("quantization: static-int8"), "{stdout}");
    // No limit was given: the lossy result is measured, and the report does not call it
    // within a tolerance.
    assert!(
        stdout.contains("validation on 1 batches in ") && stdout.contains(": measured, not judged"),
        "{stdout}"
    );
    let q = &json["quantization"];
    // Two batches: one calibrates, the other is held back for validation.
    assert_eq!(q["calibration"]["batches"], serde_json::json!(["batch_00"]));
    assert_eq!(
        json["validation"]["batches"],
        serde_json::json!(["batch_01"])
    );
    assert_eq!(q["calibration"]["method"], "Mse");
    assert!(q["rewrites"]["qdq-weight"].as_u64().unwrap() > 0, "{q}");
    // The result is about 4× smaller than the float file (tiny weights, same metadata).
    let (before, after) = (
        std::fs::metadata(&model).unwrap().len(),
        std::fs::metadata(&out).unwrap().len(),
    );
    assert!(after * 3 < before, "{after} of {before} bytes");
    let cosine = json["validation"]["outputs"][0]["cosine"].as_f64().unwrap();
    assert!(cosine > 0.999, "{cosine}");
}

/// `onnxopt optimize MODEL OUT --int8 --calib CALIB EXTRA…`.
fn optimize_int8(model: &Path, out: &Path, calib: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["optimize", s(model), s(out), "--int8", "--calib", s(calib)];
    args.extend_from_slice(extra);
    onnxopt(&args)
}

#[test]
fn int8_gates_only_on_the_tolerances_given() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = common::testdata("bert-tiny.dynamo.onnx");
    let calib = common::testdata("calib/bert-tiny");
    let args = |extra: &[&str]| optimize_int8(&model, &out, &calib, extra);
    // An exact tolerance no int8 model keeps: refused, nothing written.
    let refused = args(&["--max-error", "1e-9"]);
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("was not written"));
    assert!(!out.exists());
    let accepted = args(&["--min-cosine", "0.99"]);
    assert!(accepted.status.success(), "{}", text(&accepted.stderr));
    assert!(out.exists());
}

/// Token ids from another vocabulary are refused with the input and value named, before
/// tract (which would panic inside its Gather) sees them.
#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let batches = dir.path().join("batches");
    std::fs::create_dir(&batches).unwrap();
    for entry in std::fs::read_dir(common::testdata("calib/bert-tiny")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, batches.join(path.file_name().unwrap())).unwrap();
    }
    let ids = batches.join("batch_01.input_ids.npy");
    let mut array: ArrayD<i64> =
        ndarray_npy::ReadNpyExt::read_npy(std::fs::File::open(&ids).unwrap()).unwrap();
    array[[0, 3]] = 50_000;
    ndarray_npy::WriteNpyExt::write_npy(&array, std::fs::File::create(&ids).unwrap()).unwrap();
    let model = common::testdata("bert-tiny.ts.onnx");
    // `run` refuses the batch (exit 1); `optimize --int8` calibrates on batch_00 and holds
    // batch_01 back, so its validation is what cannot run (exit 3).
    for (args, code) in [
        (
            vec![
                "run",
                s(&model),
                "--inputs",
                s(&batches),
                "--output-dir",
                s(dir.path()),
            ],
            1,
        ),
        (
            vec![
                "optimize",
                s(&model),
                s(&dir.path().join("out.onnx")),
                "--int8",
                "--calib",
                s(&batches),
            ],
            3,
        ),
    ] {
        let result = onnxopt(&args);
        let stderr = text(&result.stderr);
        assert_eq!(result.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(
            stderr.contains("batch `batch_01`: input `input_ids` holds 50000 (element 3)"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert!(!dir.path().join("out.onnx").exists());
}

#[test]
fn int8_without_calibration_data_says_what_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = common::testdata("bert-tiny.ts.onnx");
    let result = onnxopt(&["optimize", s(&model), s(&out), "--int8"]);
    assert_eq!(result.status.code(), Some(1));
    assert!(text(&result.stderr).contains("--calib DIR or --calib-random N"));
    assert!(!out.exists());
    // Generated calibration data is enough.
    let result = onnxopt(&[
        "optimize",
        s(&model),
        s(&out),
        "--int8",
        "--calib-random",
        "3",
        "--calib-method",
        "entropy",
    ]);
    assert!(result.status.success(), "{}", text(&result.stderr));
    assert!(text(&result.stdout).contains("on 3 batches (entropy)"));
}

#[test]
fn int8_dynamic_needs_no_calibration() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = common::testdata("gpt2-tiny.dynamo.onnx");
    let result = onnxopt(&["optimize", s(&model), s(&out), "--int8-dynamic"]);
    let stdout = text(&result.stdout);
    assert!(result.status.success(), "{}", text(&result.stderr));
    assert!(stdout.contains("quantization: dynamic-int8"), "{stdout}");
    assert!(stdout.contains("dynamic-matmul"), "{stdout}");
}

#[test]
fn static_int8_weight_codes_follow_the_target_unless_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = common::testdata("bert-tiny.ts.onnx");
    let calib = common::testdata("calib/bert-tiny");
    // The codes of the first selected MatMul's weight: its stored type and largest magnitude.
    let codes = |args: &[&str]| {
        let result = optimize_int8(&model, &out, &calib, args);
        assert!(
            result.status.success(),
            "{args:?}: {}",
            text(&result.stderr)
        );
        let written = onnxopt::io::load(&out).unwrap();
        let g = &written.graph;
        let feeds_matmul = |n: &onnxopt::ir::Node| {
            let uses = n.output(0).map(|v| g.uses(v)).unwrap_or_default();
            uses.iter().any(|&(r, _)| g.node(r).is("MatMul"))
        };
        let (_, dq) = g
            .nodes()
            .find(|(_, n)| {
                n.is("DequantizeLinear")
                    && g.initializer(n.input(0).unwrap()).is_some()
                    && feeds_matmul(n)
            })
            .unwrap();
        let w = g.initializer(dq.input(0).unwrap()).unwrap();
        let zero_point = g
            .initializer(dq.input(2).unwrap())
            .unwrap()
            .raw_bytes()
            .unwrap()[0];
        let code = |b: u8| match w.dtype() {
            DataType::Int8 => i32::from(b as i8),
            _ => i32::from(b) - i32::from(zero_point),
        };
        let widest = w.raw_bytes().unwrap().iter().map(|&b| code(b).abs()).max();
        (w.dtype(), widest.unwrap())
    };
    assert_eq!(codes(&[]), (DataType::Int8, 63));
    assert_eq!(codes(&["--int8-weights", "int8"]), (DataType::Int8, 127));
    assert_eq!(codes(&["--int8-weights", "uint8"]), (DataType::Uint8, 127));
    assert_eq!(codes(&["--target", "trt"]), (DataType::Int8, 127));
    let refused = optimize_int8(
        &model,
        &out,
        &calib,
        &["--target", "trt", "--int8-weights", "uint8"],
    );
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains("TensorRT takes int8 weights only"));
}

#[test]
fn weights_int8_and_int4_quantize_every_matmul_weight_and_validate() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::testdata("int4/chain.onnx");
    let calib = common::testdata("int4/calib");
    // `--int4` is `--weights int4`; the `--int4-*` spellings of the options still work.
    let runs: [(&str, &[&str], &str, &str); 3] = [
        (
            "int8.onnx",
            &["--weights", "int8", "--block-size", "16"],
            "8",
            "int8-weights",
        ),
        (
            "int4.onnx",
            &["--weights", "int4", "--symmetric"],
            "4",
            "int4",
        ),
        ("short.onnx", &["--int4", "--int4-block", "16"], "4", "int4"),
    ];
    for (name, flags, bits, mode) in runs {
        let out = dir.path().join(name);
        let mut args = vec![
            "--weights-method",
            "rtn",
            "--validate",
            "--inputs",
            s(&calib),
        ];
        args.extend_from_slice(flags);
        let (result, json) = optimize_with_report(&model, &out, &args);
        let stdout = text(&result.stdout);
        assert!(
            stdout.contains(&format!("2 weights as {bits}-bit MatMulNBits")),
            "{stdout}"
        );
        assert_eq!(json["quantization"]["mode"], mode, "{name}");
        let written = onnxopt::io::load(&out).unwrap();
        let nbits: Vec<i64> = written
            .graph
            .nodes()
            .filter(|(_, n)| n.op_type() == "MatMulNBits")
            .map(|(_, n)| onnxopt::ir::attr::get_int(&n.proto, "bits").unwrap())
            .collect();
        assert_eq!(nbits, [bits.parse::<i64>().unwrap(); 2], "{name}");
    }
    // The block options need a weight-only mode.
    let out = dir.path().join("refused.onnx");
    let refused = onnxopt(&["optimize", s(&model), s(&out), "--block-size", "16"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("--weights"),
        "{}",
        text(&refused.stderr)
    );
}

#[test]
fn perplexity_scores_both_models_next_tokens_on_the_validation_batches() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::testdata("llm/llama3.prefill.dynamo20.onnx");
    let inputs = common::testdata("llm/calib/prefill");
    let out = dir.path().join("llama3.int8w.onnx");
    let args = [
        "--weights",
        "int8",
        "--weights-method",
        "rtn",
        "--inputs",
        s(&inputs),
        "--perplexity",
    ];
    let (result, json) = optimize_with_report(&model, &out, &args);
    let stdout = text(&result.stdout);
    assert!(stdout.contains("next-token perplexity on "), "{stdout}");
    let p = &json["validation"]["perplexity"];
    // Five rows of 8 positions, two padded to 5 tokens (one on the right, one on the left):
    // 3 × 7 + 2 × 4 = 29 scored tokens.
    assert_eq!(p["tokens"], 29, "{p}");
    let (reference, candidate) = (
        p["reference"].as_f64().unwrap(),
        p["candidate"].as_f64().unwrap(),
    );
    // Random weights: a perplexity near the vocabulary's size; 8-bit weights barely move it.
    assert!(
        reference > 1.0 && (candidate / reference - 1.0).abs() < 0.01,
        "{p}"
    );
    let logits = &json["validation"]["outputs"][0];
    assert!(logits["top1_agreement"].as_f64().unwrap() > 0.9, "{logits}");
    // Without --perplexity nothing is scored.
    let plain = dir.path().join("plain.onnx");
    let (_, json) = optimize_with_report(&model, &plain, &args[..args.len() - 1]);
    assert!(json["validation"]["perplexity"].is_null());
}

/// A decoder with a KV cache, calibrated on text as a user has it (token ids and a mask, no
/// cache, no positions): each batch runs as a prompt, with an empty cache and positions that
/// follow its mask, for GPTQ and for the validation alike. Its next-token perplexity on those
/// prompts (one of them left-padded) is the prefill export's, which takes no cache and counts
/// its own positions.
#[test]
fn a_cached_decoder_calibrates_on_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = common::testdata("llm/calib/prefill");
    let args = [
        "--weights",
        "int4",
        "--block-size",
        "16",
        "--calib",
        s(&prompts),
        "--inputs",
        s(&prompts),
        "--perplexity",
    ];
    let mut reference = Vec::new();
    for form in ["past", "prefill"] {
        let model = common::testdata(&format!("llm/llama3.{form}.dynamo20.onnx"));
        let out = dir.path().join(format!("llama3.{form}.int4.onnx"));
        let (result, json) = optimize_with_report(&model, &out, &args);
        let stdout = text(&result.stdout);
        assert!(
            stdout.contains("(block 16, asymmetric, Gptq; GPTQ kept for "),
            "{form}: {stdout}"
        );
        let p = &json["validation"]["perplexity"];
        assert_eq!(p["tokens"], 29, "{form}: {p}");
        reference.push(p["reference"].as_f64().unwrap());
    }
    assert!(
        (reference[0] / reference[1] - 1.0).abs() < 1e-5,
        "{reference:?}"
    );
}

#[test]
fn fp16_keeps_float32_io_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = common::testdata("bert-tiny.ts.onnx");
    let calib = common::testdata("calib/bert-tiny");
    let args = [
        "optimize",
        s(&model),
        s(&out),
        "--fp16",
        "--keep-io-types",
        "--inputs",
        s(&calib),
        "--min-cosine",
        "0.999",
    ];
    let result = onnxopt(&args);
    assert!(result.status.success(), "{}", text(&result.stderr));
    assert!(text(&result.stdout).contains("quantization: fp16"));
    let written = onnxopt::io::load(&out).unwrap();
    let g = &written.graph;
    for port in &g.outputs {
        let t = g.value_type(port.value).unwrap();
        assert_eq!(
            t.elem,
            DataType::Float as i32,
            "{}",
            g.value_name(port.value)
        );
    }
    let halves = g
        .initializers()
        .filter(|(_, t)| t.dtype() == onnxopt::ir::DataType::Float16)
        .count();
    assert!(halves > 0);
}

/// A float16 model (here `--fp16`'s output: a float16 pooler output) takes INT8
/// activations, static and dynamic: it computes in float32 around its integer products
/// (`quant::upcast`), says so, and keeps its float16 outputs. Before, the output mixed float16
/// and float32 inputs on one operator, which ONNX Runtime refused to load.
#[test]
fn a_float16_model_is_quantized_to_int8_with_its_interface_kept() {
    let dir = tempfile::tempdir().unwrap();
    let float16 = dir.path().join("float16.onnx");
    let model = common::testdata("bert-tiny.ts.onnx");
    let calib = common::testdata("calib/bert-tiny");
    let result = onnxopt(&["optimize", s(&model), s(&float16), "--fp16"]);
    assert!(result.status.success(), "{}", text(&result.stderr));
    for mode in [
        &["--int8-dynamic"][..],
        &["--int8", "--calib", s(&calib)][..],
    ] {
        let out = dir.path().join("int8.onnx");
        let mut args = vec!["optimize", s(&float16), s(&out), "--inputs", s(&calib)];
        args.extend_from_slice(mode);
        args.extend_from_slice(&["--min-cosine", "0.999"]);
        let result = onnxopt(&args);
        assert!(
            result.status.success(),
            "{mode:?}: {}",
            text(&result.stderr)
        );
        let stdout = text(&result.stdout) + &text(&result.stderr);
        assert!(stdout.contains("the model computes in float16"), "{stdout}");
        let written = onnxopt::io::load(&out).unwrap();
        let g = &written.graph;
        let elems = |g: &onnxopt::ir::Graph| -> Vec<i32> {
            let ports = g.inputs.iter().chain(&g.outputs);
            ports.map(|p| g.value_type(p.value).unwrap().elem).collect()
        };
        let declared = elems(&onnxopt::io::load(&float16).unwrap().graph);
        assert!(declared.contains(&(DataType::Float16 as i32)));
        assert_eq!(elems(g), declared, "{mode:?}");
        let integer_products = g
            .nodes()
            .filter(|(_, n)| n.op_type().contains("Integer") || n.op_type().starts_with("QLinear"))
            .count()
            + g.nodes().filter(|(_, n)| n.is("QuantizeLinear")).count();
        assert!(integer_products > 0, "{mode:?}: nothing quantized");
    }
}

#[test]
fn passes_picks_passes_from_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = common::testdata("bert-tiny.ts.onnx");
    let unknown = onnxopt(&["optimize", s(&model), s(&out), "--passes", "dce,fuse-magic"]);
    assert_eq!(unknown.status.code(), Some(1));
    let stderr = text(&unknown.stderr);
    assert!(
        stderr.contains("no pass `fuse-magic`") && stderr.contains("fuse-gelu"),
        "{stderr}"
    );
    assert!(!out.exists());
    let result = onnxopt(&["optimize", s(&model), s(&out), "--passes", "dce"]);
    assert!(result.status.success(), "{}", text(&result.stderr));
    let stdout = text(&result.stdout);
    assert!(
        stdout.contains("dce") && !stdout.contains("fuse-gelu"),
        "{stdout}"
    );
    // No fusion ran: the output builds for no particular runtime.
    let written = onnxopt::io::load(&out).unwrap();
    assert_eq!(written.metadata("onnxopt.target"), None);
}

#[test]
fn prune_then_int8_calibrates_the_pruned_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bert.pruned.int8.onnx");
    let model = common::testdata("bert-tiny.ts.onnx");
    let calib = common::testdata("calib/bert-tiny");
    let args = ["--prune", "2:4", "--int8", "--calib", s(&calib)];
    let (result, json) = optimize_with_report(&model, &out, &args);
    let stdout = text(&result.stdout);
    assert!(
        stdout.contains("2:4: 9 weights now 50.0% zeros"),
        "{stdout}"
    );
    assert!(stdout.contains("quantization: static-int8"), "{stdout}");
    assert_eq!(json["pruning"]["sparsity"], 0.5);
    assert!(
        json["quantization"]["rewrites"]["qdq-weight"]
            .as_u64()
            .unwrap()
            > 0
    );
    // The quantized weights (7-bit codes for ONNX Runtime) keep the pattern: zero quantizes
    // to the (symmetric) zero point.
    let written = onnxopt::io::load(&out).unwrap();
    for w in json["pruning"]["weights"].as_array().unwrap() {
        let name = format!("{}.int7", w["weight"].as_str().unwrap());
        let v = written.graph.find_value(&name).unwrap();
        let t = written.graph.initializer(v).unwrap();
        let zeros = t.raw_bytes().unwrap().iter().filter(|&&b| b == 0).count();
        assert!(zeros * 2 >= t.numel(), "{name}: {zeros} of {}", t.numel());
    }
}

#[test]
fn structured_pruning_reports_what_it_cut_and_gates_on_the_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::testdata("gpt2-tiny.dynamo.onnx");
    let (dense, pruned) = (
        dir.path().join("dense.onnx"),
        dir.path().join("pruned.onnx"),
    );
    optimize_with_report(&model, &dense, &[]);
    let args = ["--prune-heads", "0.5", "--prune-ffn", "0.5"];
    let (result, json) = optimize_with_report(&model, &pruned, &args);
    let stdout = text(&result.stdout);
    assert!(
        stdout.contains("heads: kept 4 of 8 in 2 blocks"),
        "{stdout}"
    );
    assert!(
        stdout.contains("FFN neurons: kept 128 of 256 in 2 blocks"),
        "{stdout}"
    );
    // Validation ran and states the cost; it gates on no tolerance that was not given.
    let cosine = json["validation"]["outputs"][0]["cosine"].as_f64().unwrap();
    assert!(cosine < 0.9999 && cosine > 0.9, "{cosine}");
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(
        size(&pruned) < size(&dense),
        "{} vs {}",
        size(&pruned),
        size(&dense)
    );
    let out = dir.path().join("refused.onnx");
    let mut refused_args = vec!["optimize", s(&model), s(&out)];
    refused_args.extend_from_slice(&args);
    refused_args.extend_from_slice(&["--min-cosine", "0.9999"]);
    let refused = onnxopt(&refused_args);
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused.stderr));
    assert!(!out.exists());
}

#[test]
fn bad_pruning_arguments_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = common::testdata("bert-tiny.ts.onnx");
    for (args, expected) in [
        (&["--prune", "1.5"][..], "expected a sparsity in [0, 1)"),
        (&["--prune", "4:2"][..], "expected N:M with 1 ≤ N < M"),
        (&["--prune", "half"][..], "such as 2:4"),
        (&["--prune-heads", "1"][..], "expected a fraction in [0, 1)"),
        (&["--prune-ffn=-0.5"][..], "expected a fraction in [0, 1)"),
    ] {
        let mut all = vec!["optimize", s(&model), s(&out)];
        all.extend_from_slice(args);
        let result = onnxopt(&all);
        let stderr = text(&result.stderr);
        assert_eq!(result.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!out.exists());
    }
}

#[test]
fn smooth_quant_smooths_before_calibrating_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bert.smooth.int8.onnx");
    let model = common::testdata("bert-tiny.ts.onnx");
    let calib = common::testdata("calib/bert-tiny");
    let args = ["--int8", "--calib", s(&calib), "--smooth-quant", "0.5"];
    let (result, json) = optimize_with_report(&model, &out, &args);
    let stdout = text(&result.stdout);
    assert!(
        stdout.contains("SmoothQuant α = 0.5 on 1 batches: 4 normalizations smoothed"),
        "{stdout}"
    );
    let smoothing = &json["quantization"]["smoothing"];
    assert_eq!(smoothing["smoothed"].as_array().unwrap().len(), 4);
    assert!(
        json["quantization"]["rewrites"]["qdq-weight"]
            .as_u64()
            .unwrap()
            > 0
    );
    // ONNX Runtime loads it and stays close to the float model.
    let mut ort = common::OrtChecks::default();
    ort.add("0.99", &model, &out, &calib);
    ort.run();
    // Without --int8 there is nothing to smooth for.
    let refused = onnxopt(&["optimize", s(&model), s(&out), "--smooth-quant", "0.5"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
}

#[test]
fn static_int8_smooths_by_default_for_onnx_runtime_only() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::testdata("bert-tiny.ts.onnx");
    let calib = common::testdata("calib/bert-tiny");
    let out = dir.path().join("bert.int8.onnx");
    let alpha = |more: &[&str]| {
        let mut args = vec!["--int8", "--calib", s(&calib)];
        args.extend_from_slice(more);
        let (_, json) = optimize_with_report(&model, &out, &args);
        json["quantization"]["smoothing"]["alpha"].as_f64()
    };
    assert_eq!(alpha(&[]), Some(0.5));
    assert_eq!(alpha(&["--no-smooth-quant"]), None);
    assert_eq!(alpha(&["--target", "trt"]), None);
    assert_eq!(
        alpha(&["--target", "trt", "--smooth-quant", "0.5"]),
        Some(0.5)
    );
}

#[test]
fn dynamic_int8_smooths_on_calibration_data_or_generated_batches() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::testdata("bert-tiny.ts.onnx");
    let calib = common::testdata("calib/bert-tiny");
    let smoothing = |json: &serde_json::Value| json["quantization"]["smoothing"].clone();
    // The user's batches, less the one held back for validation (calib/bert-tiny has 2).
    let out = dir.path().join("bert.calib.onnx");
    let args = [
        "--int8-dynamic",
        "--calib",
        s(&calib),
        "--smooth-quant",
        "0.25",
    ];
    let (_, json) = optimize_with_report(&model, &out, &args);
    let smoothed = smoothing(&json);
    assert_eq!(json["quantization"]["mode"], "dynamic-int8");
    assert_eq!(smoothed["alpha"], 0.25);
    assert_eq!(smoothed["batches"], 1);
    assert_eq!(smoothed["smoothed"].as_array().unwrap().len(), 4);
    assert_eq!(json["quantization"]["rewrites"]["unpack-attention"], 2);
    let mut ort = common::OrtChecks::default();
    ort.add("0.99", &model, &out, &calib);
    ort.run();
    // No data from the user: α 0.5 on generated batches.
    let out = dir.path().join("bert.generated.onnx");
    let (result, json) = optimize_with_report(&model, &out, &["--int8-dynamic"]);
    assert_eq!(smoothing(&json)["alpha"], 0.5);
    assert_eq!(smoothing(&json)["batches"], 8);
    let stdout = text(&result.stdout);
    assert!(
        stdout.contains("SmoothQuant α = 0.5 on 8 batches"),
        "{stdout}"
    );
    // Asked for none: nothing smoothed.
    let out = dir.path().join("bert.plain.onnx");
    let (_, json) = optimize_with_report(&model, &out, &["--int8-dynamic", "--no-smooth-quant"]);
    assert!(smoothing(&json).is_null(), "{json}");
    let contradictory = onnxopt(&[
        "optimize",
        s(&model),
        s(&out),
        "--int8-dynamic",
        "--no-smooth-quant",
        "--smooth-quant",
        "0.5",
    ]);
    assert_eq!(contradictory.status.code(), Some(2));
}

#[test]
fn optimize_checks_its_output_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bert.onnx");
    let model = common::testdata("bert-tiny.ts.onnx");
    let (result, json) = optimize_with_report(&model, &out, &["--engine", "tract"]);
    let stdout = text(&result.stdout);
    assert!(
        stdout.contains("check: the output matches the input model in tract on 1 generated batch"),
        "{stdout}"
    );
    let check = &json["check"]["outcome"]["passed"];
    assert_eq!(check["engine"], "tract");
    assert_eq!(check["batches"].as_array().unwrap().len(), 1);
    let (result, json) = optimize_with_report(&model, &out, &["--no-check"]);
    assert!(text(&result.stdout).contains("check: skipped (--no-check)"));
    assert_eq!(json["check"]["outcome"], "skipped");
}

/// DINOv2 and wav2vec2 exported with every input dim free: their sequence is a Conv's output
/// positions (and, in DINOv2, a table of positions resized to the image), a size no input dim
/// gives. The query, key and value are still proved to share it, so each target gets its
/// attention fused, and the output is checked on generated inputs.
#[test]
fn encoders_whose_sequence_no_input_dim_gives_get_their_attention_fused() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["dinov2", "wav2vec2"] {
        let model = common::testdata(&format!("forms/{name}.free-dims.onnx"));
        for target in ["ort", "onnx"] {
            let out = dir.path().join(format!("{name}.{target}.onnx"));
            let (_, json) = optimize_with_report(&model, &out, &["--target", target]);
            assert!(
                json["check"]["outcome"]["passed"].is_object(),
                "{name} {target}: {}",
                json["check"]
            );
            let written = onnxopt::io::load(&out).unwrap();
            let count = |op: &str| {
                written
                    .graph
                    .nodes()
                    .filter(|(_, n)| n.op_type() == op)
                    .count()
            };
            assert_eq!(count("Attention"), 1, "{name} {target}");
            assert_eq!(count("Softmax"), 0, "{name} {target}");
        }
    }
}

/// What the report says pass `name` did.
fn pass_stats<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    let passes = report["passes"]["passes"].as_array().unwrap();
    let stats = passes.iter().find(|p| p["pass"] == name);
    stats.unwrap_or_else(|| panic!("no pass {name} in the report"))
}

/// Optimum's merged decoder (`testdata/forms/t5-dec.merged.onnx`): the decoder sits in both
/// branches of an `If`, reading its weights from the main graph. Each branch gets its
/// attention fused as a model of its own would (2 layers × self and cross attention); the
/// tensors the rewrite makes live once in the main graph, shared by both branches; and ONNX
/// Runtime gives the original's outputs down either branch (one calibration batch each).
/// `--fp16`, dynamic INT8 and round-to-nearest weights convert the branches the same way;
/// static INT8 leaves them float32 and says so.
#[test]
fn the_branches_of_a_merged_decoder_are_optimized() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::testdata("forms/t5-dec.merged.onnx");
    let out = dir.path().join("merged.onnx");
    let (_, json) = optimize_with_report(&model, &out, &[]);
    assert!(
        json["check"]["outcome"]["passed"].is_object(),
        "{}",
        json["check"]
    );
    let stats = pass_stats(&json, "optimize-branches");
    assert_eq!(stats["rewrites"]["attention"], 8, "{stats}");
    let written = onnxopt::io::load(&out).unwrap().to_proto().unwrap();
    let graph = written.graph.unwrap();
    let branches: Vec<_> = graph.node[0]
        .attribute
        .iter()
        .filter_map(|a| a.g.as_ref())
        .collect();
    assert_eq!(branches.len(), 2);
    for branch in branches {
        let fused = branch
            .node
            .iter()
            .filter(|n| n.op_type() == "MultiHeadAttention");
        assert_eq!(fused.count(), 4, "{}", branch.name());
        assert!(branch.initializer.is_empty(), "{}", branch.name());
    }
    let contents: std::collections::HashSet<_> = graph
        .initializer
        .iter()
        .map(|t| {
            (
                t.dims.clone(),
                t.raw_data.clone(),
                t.float_data.len(),
                t.int64_data.clone(),
            )
        })
        .collect();
    assert_eq!(
        contents.len(),
        graph.initializer.len(),
        "a tensor held twice"
    );
    let mut checks = common::OrtChecks::default();
    let calib = common::testdata("forms/calib/t5-dec.merged");
    checks.add_exact(&model, &out, &calib);
    // For standard operators, attention needs opset 23 (the model imports 13): the branches
    // keep the model's opset, decline that fusion, and get the rest of the pipeline.
    let standard = dir.path().join("merged.onnx-target.onnx");
    let (_, json) = optimize_with_report(&model, &standard, &["--target", "onnx"]);
    let stats = pass_stats(&json, "optimize-branches");
    assert_eq!(stats["rewrites"]["branch"], 1, "{stats}");
    assert!(stats["rewrites"]["attention"].is_null(), "{stats}");
    let opset = |m: &Path| onnxopt::io::load(m).unwrap().opset("");
    assert_eq!(opset(&standard), opset(&model));
    checks.add_exact(&model, &standard, &calib);
    // Conversions that need no batches of the branch's values convert each branch as a
    // model (each quantized weight once, shared by both branches); static INT8, whose
    // calibration runs the main graph only, leaves them as they are and says so.
    for (mode, converted_ops) in [
        (&["--fp16"][..], "Cast"),
        (&["--int8-dynamic"][..], "MatMulInteger"),
        (
            &["--weights", "int4", "--weights-method", "rtn"][..],
            "MatMulNBits",
        ),
        (&["--int8", "--calib-random", "2"][..], ""),
    ] {
        let converted = dir.path().join(format!("merged{}.onnx", mode[0]));
        let mut args = vec!["optimize", s(&model), s(&converted)];
        args.extend_from_slice(mode);
        let result = onnxopt(&args);
        assert!(
            result.status.success(),
            "{mode:?}: {}",
            text(&result.stderr)
        );
        let said = format!("{}{}", text(&result.stdout), text(&result.stderr));
        let warned = said.contains("inside the branches of an If");
        assert_eq!(warned, converted_ops.is_empty(), "{mode:?}: {said}");
        let graph = onnxopt::io::load(&converted)
            .unwrap()
            .to_proto()
            .unwrap()
            .graph
            .unwrap();
        for branch in graph.node[0].attribute.iter().filter_map(|a| a.g.as_ref()) {
            let ops = branch.node.iter().filter(|n| n.op_type() == converted_ops);
            assert_eq!(ops.count() > 0, !converted_ops.is_empty(), "{mode:?}");
        }
        match converted_ops {
            "" => checks.add_exact(&model, &converted, &calib),
            "MatMulNBits" => checks.add("0.98", &model, &converted, &calib),
            _ => checks.add("0.999", &model, &converted, &calib),
        }
    }
    checks.run();
}

/// Optimum names a ViT's input dims `num_channels`, `height`, `width`: generated inputs take
/// the sizes its graph fixes (3 channels from the patch kernel; 32 pixels, whose 8-pixel
/// patches are the 16 tokens its table of 17 positions adds to), so a lossy run is
/// validated. Sizes that do not fit (given wrong here) are refused, and the refusal says how
/// to give inputs that fit.
#[test]
fn validation_on_generated_inputs_that_do_not_fit_says_how_to_fix_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::testdata("wild/optimum-vit.optimum14.t24.onnx");
    let out = dir.path().join("vit.fp16.onnx");
    let fp16_in_tract = [
        "optimize",
        s(&model),
        s(&out),
        "--fp16",
        "--engine",
        "tract",
    ];
    let written = onnxopt(&fp16_in_tract);
    assert!(written.status.success(), "{}", text(&written.stderr));
    std::fs::remove_file(&out).unwrap();
    let wrong = ["--dim", "height=24", "--dim", "width=24"];
    let refused = onnxopt(&[&fp16_in_tract[..], &wrong[..]].concat());
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("--dim NAME=N"),
        "{}",
        text(&refused.stderr)
    );
    assert!(!out.exists());
}

/// Optimum's GPT-2 with past names its mask `past_sequence_length + 1` beside tokens of
/// `sequence_length`: generated inputs give the mask the past's and the new tokens' length
/// (`exec::inputs`), so the output check, a lossy run's validation and dynamic INT8's
/// smoothing run at the default lengths, without falling back to one token (which they did
/// before) or leaving the check undone.
#[test]
fn a_decoder_whose_mask_says_one_new_token_is_checked_at_the_default_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::testdata("wild/optimum-gpt2.optimum14.t24.onnx");
    for args in [&[][..], &["--fp16"][..], &["--int8-dynamic"][..]] {
        let out = dir.path().join("out.onnx");
        let mut all = vec!["optimize", s(&model), s(&out)];
        all.extend_from_slice(args);
        let result = onnxopt(&all);
        let (stdout, stderr) = (text(&result.stdout), text(&result.stderr));
        assert!(result.status.success(), "{args:?}: {stderr}");
        let said = format!("{stdout}{stderr}");
        assert!(!said.contains("on one token"), "{args:?}: {said}");
        assert!(!said.contains("does not run"), "{args:?}: {said}");
        assert!(!said.contains("check: not done"), "{args:?}: {said}");
    }
}

/// DeBERTa's legacy export computes its relative positions in an If whose branches return
/// int64 of ranks 3 and 4: `--fp16` needs every value's element type, which the If now has.
#[test]
fn fp16_converts_a_model_with_an_if() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::testdata("wild/deberta-v2.ts17.t27.eager.onnx");
    let out = dir.path().join("out.onnx");
    let result = onnxopt(&["optimize", s(&model), s(&out), "--fp16"]);
    assert!(result.status.success(), "{}", text(&result.stderr));
}
