//! tract and ONNX Runtime agree on every corpus model, before and after optimizing for
//! ONNX Runtime.
//!
//! An optimized model holds ONNX Runtime's `com.microsoft` operators (Attention,
//! MultiHeadAttention, FastGelu, BiasGelu, …): tract runs them through our own lowerings
//! (`exec::lower`) or its own implementations, ONNX Runtime (`exec::ort::OrtRunner`) with its
//! real kernels, on the calibration batches of each model. Every output must agree within
//! 1e-4, which checks those lowerings against the kernels they stand for. The original
//! models are compared the same way, which checks the engines against each other.
//!
//! The quantized (static and dynamic INT8) and float16 variants of four tiny models are
//! compared too, by cosine (see below why not within 1e-4).
//!
//! Needs the ONNX Runtime library (see `exec::ort::locate`); without it the test fails,
//! unless `ONNXOPT_SKIP_ORT_ENGINE` (or `ONNXOPT_SKIP_ORT`) says to skip it.
#![cfg(feature = "ort")]

mod common;

use onnxopt::exec::{self, compare, InputSource, OrtRunner, Runner};
use onnxopt::ir::Model;
use onnxopt::passes::fuse::Target;

/// Largest absolute difference allowed between the engines.
const MAX_ABS: f64 = 1e-4;

/// The worst difference per output between tract and ONNX Runtime on `model`, over the
/// batches of `inputs`, with the largest |value| tract gave for it.
fn engines_diff(
    model: &Model,
    inputs: &std::path::Path,
) -> Result<Vec<(compare::OutputDiff, f64)>, String> {
    let batches = exec::batches_for(
        model,
        &InputSource::Dir(inputs.to_path_buf()),
        &Default::default(),
    )
    .map_err(|e| e.to_string())?;
    let mut tract = Runner::new(model).map_err(|e| format!("tract: {e}"))?;
    let mut ort = OrtRunner::new(model).map_err(|e| format!("ONNX Runtime: {e}"))?;
    let mut worst: Vec<(compare::OutputDiff, f64)> = Vec::new();
    for batch in &batches {
        let a = tract.run(batch).map_err(|e| format!("tract: {e}"))?;
        let b = ort.run(batch).map_err(|e| format!("ONNX Runtime: {e}"))?;
        for (k, ((name, ta), (_, tb))) in a.iter().zip(&b).enumerate() {
            let d = compare::diff(name, ta, tb, None)?;
            let largest = ta
                .cast_to::<f64>()
                .map_err(|e| e.to_string())?
                .to_plain_array_view::<f64>()
                .map_err(|e| e.to_string())?
                .iter()
                .fold(0.0f64, |m, v| m.max(v.abs()));
            match worst.get_mut(k) {
                Some((acc, big)) => {
                    acc.merge(&d);
                    *big = big.max(largest);
                }
                None => worst.push((d, largest)),
            }
        }
    }
    Ok(worst)
}

/// The `com.microsoft` operators of `model`, with their counts (`Attention×2`).
fn contrib_ops(model: &Model) -> Vec<String> {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for (_, node) in model.graph.nodes() {
        if node.domain() == "com.microsoft" {
            *counts.entry(node.op_type().to_string()).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .map(|(op, n)| format!("{op}×{n}"))
        .collect()
}

#[test]
fn tract_and_onnx_runtime_agree_on_corpus_models() {
    if !common::ort_engine_available() {
        return;
    }
    let mut failures = Vec::new();
    let mut compared = 0;
    let mut contrib_nodes = 0;
    for path in common::corpus_models() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let inputs = common::calib_dir(&path);
        let original = onnxopt::io::load(&path).unwrap();
        let optimized = common::optimized(&path, Target::Ort);
        let contrib = contrib_ops(&optimized);
        println!("{name}: optimized with {}", contrib.join(", "));
        contrib_nodes += contrib.len();
        for (kind, model) in [("original", &original), ("optimized", &optimized)] {
            match engines_diff(model, &inputs) {
                Err(why) => failures.push(format!("{name} ({kind}): {why}")),
                Ok(outputs) => {
                    for (d, largest) in outputs {
                        compared += 1;
                        println!(
                            "{name:36} {kind:9} {:22} max abs {:.2e}  max |x| {largest:9.3}  \
                             cosine {:.8}",
                            d.name, d.max_abs, d.cosine
                        );
                        if d.max_abs > MAX_ABS || d.nonfinite_mismatches > 0 {
                            failures.push(format!(
                                "{name} ({kind}) `{}`: max abs {:.3e} (max |x| {largest:.3}, \
                                 cosine {:.8}, {} non-finite mismatches)",
                                d.name, d.max_abs, d.cosine, d.nonfinite_mismatches
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(compared > 0, "no output was compared");
    assert!(
        contrib_nodes > 0,
        "no optimized model holds a contrib operator"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The variants of a model optimized for ONNX Runtime that its quantizers and float16
/// conversion make, by name.
fn variants(optimized: &Model, batches: &[exec::Batch]) -> Vec<(&'static str, Model)> {
    use onnxopt::quant::dynamic::{quantize_dynamic, DynamicOptions};
    use onnxopt::quant::fp16::{convert_fp16, Fp16Options};
    use onnxopt::quant::qdq::QdqOptions;
    use onnxopt::quant::{quantize_static, QuantTarget, RangeMethod, StaticOptions};
    let qdq = QdqOptions::for_target(QuantTarget::Ort);
    let mut int8 = optimized.clone();
    let options = StaticOptions {
        qdq: qdq.clone(),
        method: RangeMethod::MinMax,
        smooth_quant: None,
    };
    quantize_static(&mut int8, batches, &options, &|_, _| {}).unwrap();
    let mut dynamic = optimized.clone();
    // The default 7-bit codes: with every int8 code, ONNX Runtime's kernel saturates on CPUs
    // without VNNI where tract does not (`quant::qdq::ProductWeights`), and the engines part
    // for that.
    let options = DynamicOptions {
        qdq,
        smooth_quant: None,
    };
    quantize_dynamic(&mut dynamic, batches, &options).unwrap();
    let mut fp16 = optimized.clone();
    convert_fp16(
        &mut fp16,
        &Fp16Options {
            keep_io_types: true,
        },
    )
    .unwrap();
    vec![("int8", int8), ("int8-dyn", dynamic), ("fp16", fp16)]
}

/// Lowest cosine allowed between the engines on a quantized or float16 model.
const MIN_COSINE_REDUCED: f64 = 0.9999;

/// Quantized and float16 models cannot be held to 1e-4 across engines: a last-bit difference
/// in a float sum before a QuantizeLinear moves that value one int8 step (a scale of about
/// 1e-2), a DynamicQuantizeLinear's range moves all of them, and the engines accumulate
/// float16 products differently. A wrong lowering gives far worse than a cosine of 0.9999
/// (the tiny models give 0.999996 at worst). Static INT8 runs the Q/K/V projections unpacked
/// from the fused Attention, so it checks the MultiHeadAttention lowering with a bias too.
#[test]
fn tract_and_onnx_runtime_agree_on_quantized_and_float16_models() {
    if !common::ort_engine_available() {
        return;
    }
    let mut failures = Vec::new();
    for family in [
        "bert-tiny.ts",
        "distilbert-tiny.ts",
        "gpt2-tiny-past.ts",
        "vit-tiny.ts",
    ] {
        let path = common::corpus().join(format!("tiny/{family}.onnx"));
        let inputs = common::calib_dir(&path);
        let optimized = common::optimized(&path, Target::Ort);
        let batches = exec::batches_for(
            &optimized,
            &InputSource::Dir(inputs.clone()),
            &Default::default(),
        )
        .unwrap();
        for (kind, model) in variants(&optimized, &batches) {
            let contrib = contrib_ops(&model);
            match engines_diff(&model, &inputs) {
                Err(why) => failures.push(format!("{family} ({kind}): {why}")),
                Ok(outputs) => {
                    for (d, largest) in outputs {
                        println!(
                            "{family:20} {kind:9} {:18} max abs {:.2e}  max |x| {largest:7.3}  \
                             cosine {:.8}  [{}]",
                            d.name,
                            d.max_abs,
                            d.cosine,
                            contrib.join(", ")
                        );
                        if d.cosine < MIN_COSINE_REDUCED || d.nonfinite_mismatches > 0 {
                            failures.push(format!(
                                "{family} ({kind}) `{}`: cosine {:.8}, max abs {:.3e}, {} \
                                 non-finite mismatches",
                                d.name, d.cosine, d.max_abs, d.nonfinite_mismatches
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The RMSNorm operators ONNX Runtime's own optimizer writes (a user's file may hold them; a
/// T5 optimized by ONNX Runtime does): `SimplifiedLayerNormalization` (default domain) and
/// `com.microsoft::SkipSimplifiedLayerNormalization` with its residual-sum output, on an input
/// whose mean is far from 0. tract runs both natively; they must agree with ONNX Runtime's
/// kernels within 1e-5. (With a bias, ONNX Runtime 1.32 adds it and tract does not: refused,
/// see `ops::CONTRIB_OPS`.)
#[test]
fn tract_and_onnx_runtime_agree_on_onnx_runtimes_rms_norms() {
    use common::chain::{model, node, scalar};
    use onnxopt::ir::{attr, Tensor};
    if !common::ort_engine_available() {
        return;
    }
    let gamma = || Tensor::from_f32("gamma", &[8], &[1.5, 0.5, 1.0, 2.0, 0.75, 1.25, 1.0, 0.9]);
    let epsilon = || vec![attr::float("epsilon", 1e-6)];
    let simplified = model(
        vec![onnxopt::proto::NodeProto {
            attribute: vec![attr::int("axis", -1), attr::float("epsilon", 1e-6)],
            ..node("SimplifiedLayerNormalization", &["x", "gamma"], "y", vec![])
        }],
        vec![gamma().unwrap()],
        &["y"],
    );
    let mut skip = node(
        "SkipSimplifiedLayerNormalization",
        &["x", "r", "gamma"],
        "y",
        epsilon(),
    );
    skip.domain = Some("com.microsoft".into());
    skip.output = vec!["y".into(), String::new(), String::new(), "s".into()];
    let skipped = model(
        vec![node("Mul", &["x", "half"], "r", vec![]), skip],
        vec![gamma().unwrap(), scalar("half", -0.5)],
        &["y", "s"],
    );
    let dir = tempfile::tempdir().unwrap();
    let x: Vec<f32> = (0..48)
        .map(|i| 3.0 + ((i * 37 % 48) as f32 - 23.5) / 6.0)
        .collect();
    common::write_npy_f32(&dir.path().join("x.npy"), &[2, 3, 8], &x);
    for (name, m) in [
        ("SimplifiedLayerNormalization", simplified),
        ("SkipSimplified", skipped),
    ] {
        let outputs = engines_diff(&m, dir.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(outputs.len(), m.graph.outputs.len());
        for (d, largest) in outputs {
            println!(
                "{name}: `{}` max abs {:.2e} (max |x| {largest:.3})",
                d.name, d.max_abs
            );
            assert!(
                d.max_abs <= 1e-5,
                "{name} `{}`: max abs {:.3e}",
                d.name,
                d.max_abs
            );
        }
    }
}

/// tract cannot run the standard Attention with a boolean mask (torch's opset-23 SDPA
/// export): the support check says so before tract is asked, and calibration, SmoothQuant's
/// statistics and validation run the model in ONNX Runtime instead, so static and dynamic
/// INT8 of such a model are written and keep its outputs in ONNX Runtime.
#[test]
fn models_tract_refuses_are_calibrated_in_onnx_runtime() {
    if !common::ort_engine_available() {
        return;
    }
    let name = "bert.dynamo23.t210.sdpa";
    let path = common::testdata(&format!("wild/{name}.onnx"));
    let calib = common::testdata(&format!("wild/calib/{name}"));
    let model = onnxopt::io::load(&path).unwrap();
    let refusal = exec::engine::tract_refusal(&model).expect("tract runs a boolean mask now");
    assert!(
        refusal.reason.contains("boolean mask"),
        "{}",
        refusal.reason
    );
    int8_outputs_keep_their_outputs_in_onnx_runtime(&path, &calib, &[]);
}

/// tract runs a KV-cache LLM export on some batches and fails on others (its `Range` over a
/// length it cannot resolve at a past of 0): calibration and SmoothQuant's statistics start
/// over in ONNX Runtime from the first batch, so static and dynamic INT8 of such a model are
/// written for `--target onnx` and keep its outputs in ONNX Runtime.
#[test]
fn calibration_starts_over_in_onnx_runtime_where_tract_fails_part_way() {
    if !common::ort_engine_available() {
        return;
    }
    let path = common::testdata("llm/llama3.past.dynamo20.onnx");
    let calib = common::testdata("llm/calib/past");
    let calib_arg = calib.to_str().unwrap();
    int8_outputs_keep_their_outputs_in_onnx_runtime(&path, &calib, &["--calib", calib_arg]);
}

/// `--target onnx` static INT8 (on `calib`) and dynamic INT8 (with `dynamic_args`) of `path`
/// are written and keep its outputs in ONNX Runtime within cosine 0.99.
fn int8_outputs_keep_their_outputs_in_onnx_runtime(
    path: &std::path::Path,
    calib: &std::path::Path,
    dynamic_args: &[&str],
) {
    let dir = tempfile::tempdir().unwrap();
    let mut ort = common::OrtChecks::default();
    let static_args = vec!["--int8", "--calib", calib.to_str().unwrap()];
    let dynamic_args = [&["--int8-dynamic"], dynamic_args].concat();
    for (mode, args) in [("int8", static_args), ("int8-dynamic", dynamic_args)] {
        let out = dir.path().join(format!("{mode}.onnx"));
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_onnxopt"))
            .args(["optimize", path.to_str().unwrap(), out.to_str().unwrap()])
            .args(["--target", "onnx"])
            .args(&args)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        ort.add("0.99", path, &out, calib);
    }
    ort.run();
}
