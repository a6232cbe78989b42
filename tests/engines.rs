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
//! Needs the ONNX Runtime library (see `exec::ort::locate`); without it the test says why and
//! skips, unless `ONNXOPT_REQUIRE_ORT` is set (CI), which makes its absence a failure.
#![cfg(feature = "ort")]

mod common;

use onnxopt::exec::{self, compare, InputSource, OrtRunner, Runner};
use onnxopt::ir::Model;
use onnxopt::passes::fuse::Target;

/// Largest absolute difference allowed between the engines.
const MAX_ABS: f64 = 1e-4;

/// True when ONNX Runtime has loaded; else prints why, or fails under `ONNXOPT_REQUIRE_ORT`.
fn ort_loaded() -> bool {
    match exec::ort::available() {
        Ok(path) => {
            println!("ONNX Runtime: {}", path.display());
            true
        }
        Err(why) => {
            assert!(
                std::env::var_os("ONNXOPT_REQUIRE_ORT").is_none(),
                "ONNXOPT_REQUIRE_ORT is set but ONNX Runtime is not available: {why}"
            );
            println!("skipped: ONNX Runtime is not available: {why}");
            false
        }
    }
}

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
    if !ort_loaded() {
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
