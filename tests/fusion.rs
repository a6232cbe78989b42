//! Fusion coverage and numerics on every corpus model, for both targets: after `optimize`,
//! no attention core (Softmax), LayerNorm/RMSNorm statistics (ReduceMean, Sqrt) or GELU
//! pieces (Erf, Pow) are left, and tract gives the original's outputs on the model's
//! calibration batches (max abs error ≤ 1e-4). For ONNX Runtime an RMSNorm below opset 23 is
//! left written out (see `fuse::layernorm::build_rms_norm`): there the pieces must be gone
//! from the graph ONNX Runtime's session runs once it has loaded the model.

mod common;

use std::collections::BTreeMap;

use onnxopt::exec::{self, InputSource, Tolerance, ValidateOptions};
use onnxopt::optimize::{optimize, OptimizeOptions};
use onnxopt::passes::fuse::Target;

/// Operators that only appear in the unfused forms of attention, normalization and GELU.
const LEFTOVERS: &[&str] = &["Softmax", "ReduceMean", "Sqrt", "Erf", "Pow"];

fn histogram(model: &onnxopt::ir::Model) -> BTreeMap<String, usize> {
    let mut ops = BTreeMap::new();
    for (_, n) in model.graph.nodes() {
        let name = match n.domain() {
            "" => n.op_type().to_string(),
            d => format!("{d}::{}", n.op_type()),
        };
        *ops.entry(name).or_insert(0) += 1;
    }
    ops
}

#[test]
fn every_corpus_model_is_fused_and_keeps_its_outputs() {
    let mut failures = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    // Models for ONNX Runtime with pieces left for its session to fuse.
    let mut left_for_the_session = Vec::new();
    for path in common::corpus_models() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for target in [Target::Ort, Target::Onnx] {
            let original = onnxopt::io::load(&path).unwrap();
            let mut model = original.clone();
            let report = optimize(
                &mut model,
                &OptimizeOptions {
                    target,
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("{name} {target:?}: {e}"));
            let ops = histogram(&model);
            // Every contrib operator a fusion wrote is one `ops` knows it emits (its type
            // rule and its way to run are checked in `passes::shape`'s tests).
            for (_, n) in model.graph.nodes() {
                if n.domain() == onnxopt::ops::MS_DOMAIN {
                    let known = onnxopt::ops::contrib(n.op_type()).is_some_and(|o| o.emitted);
                    if !known {
                        failures.push(format!("{name} {target:?}: {} not in ops", n.op_type()));
                    }
                }
            }
            let fused: Vec<String> = report
                .passes
                .iter()
                .flat_map(|p| p.rewrites.0.iter())
                .filter(|(k, _)| !k.starts_with("dead") && !k.starts_with("shape"))
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let left: Vec<String> = LEFTOVERS
                .iter()
                .filter_map(|op| ops.get(*op).map(|n| format!("{op} {n}")))
                .collect();
            let options = ValidateOptions {
                inputs: InputSource::Dir(common::calib_dir(&path)),
                tolerance: Tolerance {
                    max_abs_scaled: None,
                    max_abs: Some(1e-4),
                    ..Default::default()
                },
                // Our lowerings of the contrib operators, as tract runs them (tests/engines.rs
                // holds them to ONNX Runtime's kernels).
                engine: exec::Engine::Tract,
                ..Default::default()
            };
            let numerics = match exec::validate(&original, &model, &options, &|_, _| {}) {
                Ok(v) if v.passed() => format!(
                    "max abs {:.1e}",
                    v.outputs.iter().map(|d| d.max_abs).fold(0.0, f64::max)
                ),
                Ok(v) => {
                    failures.push(format!("{name} {target:?}: {}", v.violations.join("; ")));
                    "OUT OF TOLERANCE".into()
                }
                Err(e) => {
                    failures.push(format!("{name} {target:?}: not compared: {e}"));
                    "NOT COMPARED".into()
                }
            };
            if !left.is_empty() && target == Target::Ort {
                let out = dir.path().join(&name);
                onnxopt::io::save(&model, &out, onnxopt::io::ExternalData::Never).unwrap();
                left_for_the_session.push(out);
            } else if !left.is_empty() {
                failures.push(format!("{name} {target:?}: unfused {left:?}"));
            }
            println!(
                "{name:<32} {:<5} {numerics:<18} fused: {}",
                target.name(),
                fused.join(", ")
            );
        }
    }
    if !left_for_the_session.is_empty() && common::onnx_runtime_available() {
        failures.extend(unfused_in_the_session(&left_for_the_session));
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The LEFTOVERS still in the graph ONNX Runtime's session runs for each model
/// (`scripts/ort_session_ops.py`), one line per model that has any.
fn unfused_in_the_session(models: &[std::path::PathBuf]) -> Vec<String> {
    let models: Vec<&std::path::Path> = models.iter().map(|p| p.as_path()).collect();
    common::session_ops(&models)
        .into_iter()
        .filter_map(|json| {
            let left: Vec<&str> = LEFTOVERS
                .iter()
                .copied()
                .filter(|op| json["ops"].get(*op).is_some())
                .collect();
            println!("{}: session {}", json["model"], json["ops"]);
            (!left.is_empty()).then(|| {
                format!(
                    "{}: unfused in ONNX Runtime's session {left:?}",
                    json["model"]
                )
            })
        })
        .collect()
}
