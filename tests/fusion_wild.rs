//! The wild corpus (`testdata/wild/`, see `scripts/wild/README.md`): models from the exporters
//! users run (torch's legacy and dynamo exporters across torch 2.1-2.10, Optimum, tf2onnx).
//! For every model and both targets, `optimize` must fuse at least as many LayerNorms (and
//! RMSNorms) and GELUs as ONNX Runtime's transformers optimizer did (its counts are in the
//! manifest), and the optimized model must give the original's outputs within 1e-4 on the
//! model's calibration batches, in tract (our lowerings of the contrib operators) and in
//! ONNX Runtime (with the full onnx.checker first: `scripts/ort_check.py`). Where ONNX
//! Runtime's own output lost the original's outputs (past 1e-2), its counts are no bar.
//!
//! How fusions are counted on each side: a normalization is any of LayerNormalization,
//! SkipLayerNormalization, EmbedLayerNormalization, SimplifiedLayerNormalization,
//! SkipSimplifiedLayerNormalization and RMSNormalization (we write a residual Add before a
//! LayerNormalization as `Sum` + LayerNormalization for ONNX Runtime, see the README: the pair
//! counts once, as SkipLayerNormalization does); a GELU is any of Gelu, FastGelu, BiasGelu
//! and QuickGelu. Where a count may fall short, `SHORT` says which and why. For ONNX
//! Runtime, every EmbedLayerNormalization its optimizer wrote must be ours too.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use onnxopt::exec::{self, InputSource, Tolerance, ValidateOptions};
use onnxopt::io::{self, ExternalData};
use onnxopt::ir::Model;
use onnxopt::optimize::{optimize, OptimizeOptions};
use onnxopt::passes::fuse::Target;

const NORMS: &[&str] = &[
    "LayerNormalization",
    "SkipLayerNormalization",
    "EmbedLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
];
const GELUS: &[&str] = &["Gelu", "FastGelu", "BiasGelu", "QuickGelu"];

/// Fusions a target may leave out, with the reason: (target, what ONNX Runtime wrote, why).
const SHORT: &[(Target, &str, &str)] = &[
    (
        Target::Onnx,
        "QuickGelu",
        "x·sigmoid(α·x) has no standard ONNX operator",
    ),
    (
        Target::Ort,
        "SimplifiedLayerNormalization",
        LEFT_FOR_THE_SESSION,
    ),
    (
        Target::Ort,
        "SkipSimplifiedLayerNormalization",
        LEFT_FOR_THE_SESSION,
    ),
];

/// Why RMSNorms stay written out for ONNX Runtime below opset 23 (`fuse::layernorm`'s
/// `build_rms_norm`). The test holds ONNX Runtime to it: its session must fuse them.
const LEFT_FOR_THE_SESSION: &str = "below opset 23 no RMSNorm operator loads in both ONNX \
    Runtime and onnx.checker: written out, ONNX Runtime fuses it into \
    SimplifiedLayerNormalization when it loads the model";

fn wild() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/wild")
}

struct Entry {
    stem: String,
    /// ONNX Runtime's optimizer: operator (without its `onnx:` prefix) → count.
    ort: BTreeMap<String, usize>,
    /// onnxopt's counts when the corpus was made (`--target ort`): (LayerNorms, GELUs).
    baseline: (usize, usize),
    /// LayerNorms and RMSNorms in the original, as operators or written out.
    present: usize,
}

fn manifest() -> Vec<Entry> {
    let text = std::fs::read_to_string(wild().join("manifest.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let count = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as usize;
            // ONNX Runtime's optimizer fuses ConvNeXt's channels-first LayerNorms as if they
            // normalized the last axis (0.39 off the original's outputs): fusions that break
            // the model are no bar to hold onnxopt to.
            let ort_kept_outputs = m["ort_fused"]["runs"]
                .as_str()
                .and_then(|r| r.strip_prefix("ok, max abs diff vs original "))
                .and_then(|d| d.parse::<f64>().ok())
                .is_none_or(|d| d <= 1e-2);
            let ort = m["ort_fused"]["counts"]
                .as_object()
                .filter(|_| ort_kept_outputs)
                .map(|c| {
                    c.iter()
                        .map(|(k, v)| (k.trim_start_matches("onnx:").to_string(), count(v)))
                        .collect()
                })
                .unwrap_or_default();
            Entry {
                stem: m["stem"].as_str().unwrap().to_string(),
                ort,
                baseline: (
                    count(&m["onnxopt"]["layernorm"]),
                    count(&m["onnxopt"]["gelu"]),
                ),
                present: count(&m["structure"]["layernorm"]) + count(&m["structure"]["rmsnorm"]),
            }
        })
        .collect()
}

fn count(ops: &BTreeMap<String, usize>, family: &[&str]) -> usize {
    family.iter().filter_map(|op| ops.get(*op)).sum()
}

/// ONNX Runtime's count of `family` that `target` is held to.
fn expected(ort: &BTreeMap<String, usize>, family: &[&str], target: Target) -> usize {
    let excused = |op: &str| SHORT.iter().any(|(t, o, _)| *t == target && *o == op);
    family
        .iter()
        .filter(|op| !excused(op))
        .filter_map(|op| ort.get(*op))
        .sum()
}

fn histogram(model: &Model) -> BTreeMap<String, usize> {
    let mut ops = BTreeMap::new();
    for (_, n) in model.graph.nodes() {
        *ops.entry(n.op_type().to_string()).or_insert(0) += 1;
    }
    ops
}

#[test]
fn every_wild_model_fuses_as_much_as_onnx_runtime_and_keeps_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut ort = common::OrtChecks::default();
    let mut failures = Vec::new();
    // (optimized model, RMSNorms ONNX Runtime's session must fuse when it loads it)
    let mut left_for_the_session = Vec::new();
    println!(
        "{:<40} {:<5} {:>5} {:>9} {:>9} {:>9}  max abs (tract)",
        "model", "", "norms", "ORT", "was", "now"
    );
    for entry in manifest() {
        let path = wild().join(format!("{}.onnx", entry.stem));
        let calib = wild().join("calib").join(&entry.stem);
        let original = io::load(&path).unwrap();
        // The original's outputs in tract, once for both targets. tract 0.23 cannot run
        // opset 23's Attention with a boolean mask: those models are checked in ONNX
        // Runtime only.
        let source = InputSource::Dir(calib.clone());
        let batches = exec::batches_for(&original, &source, &Default::default()).unwrap();
        let reference =
            exec::Reference::run(&original, batches, exec::EngineKind::Tract, &|_, _| {});
        for target in [Target::Ort, Target::Onnx] {
            let name = format!("{} {}", entry.stem, target.name());
            let mut model = original.clone();
            let options = OptimizeOptions {
                target,
                ..Default::default()
            };
            if let Err(e) = optimize(&mut model, &options) {
                failures.push(format!("{name}: {e}"));
                continue;
            }
            let ops = histogram(&model);
            let (norms, gelus) = (count(&ops, NORMS), count(&ops, GELUS));
            let want_norms = expected(&entry.ort, NORMS, target);
            let want_gelus = expected(&entry.ort, GELUS, target);
            if norms < want_norms {
                failures.push(format!("{name}: {norms} norms fused, ORT {want_norms}"));
            }
            if gelus < want_gelus {
                failures.push(format!("{name}: {gelus} GELUs fused, ORT {want_gelus}"));
            }
            let embeddings =
                |ops: &BTreeMap<String, usize>| count(ops, &["EmbedLayerNormalization"]);
            if target == Target::Ort && embeddings(&ops) < embeddings(&entry.ort) {
                failures.push(format!(
                    "{name}: {} EmbedLayerNormalization, ORT {}",
                    embeddings(&ops),
                    embeddings(&entry.ort)
                ));
            }
            let options = ValidateOptions {
                inputs: source.clone(),
                tolerance: Tolerance {
                    max_abs_scaled: None,
                    max_abs: Some(1e-4),
                    ..Default::default()
                },
                ..Default::default()
            };
            let compared = reference
                .as_ref()
                .map(|r| r.compare(&model, exec::EngineKind::Tract, &options, &|_, _| {}));
            let numerics = match compared {
                Err(_) => "tract cannot run the original".into(),
                Ok(Ok(v)) if v.passed() => format!(
                    "{:.1e}",
                    v.outputs.iter().map(|d| d.max_abs).fold(0.0, f64::max)
                ),
                Ok(Ok(v)) => {
                    failures.push(format!("{name}: {}", v.violations.join("; ")));
                    "OUT OF TOLERANCE".into()
                }
                Ok(Err(e)) => {
                    failures.push(format!("{name}: not compared in tract: {e}"));
                    "NOT COMPARED".into()
                }
            };
            let was = match target {
                Target::Ort => format!("{}/{}", entry.baseline.0, entry.baseline.1),
                Target::Onnx => "-".into(),
            };
            println!(
                "{:<40} {:<5} {:>5} {:>9} {:>9} {:>9}  {numerics}",
                entry.stem,
                target.name(),
                entry.present,
                format!("{want_norms}/{want_gelus}"),
                was,
                format!("{norms}/{gelus}"),
            );
            let out = dir
                .path()
                .join(format!("{}.{}.onnx", entry.stem, target.name()));
            io::save(&model, &out, ExternalData::Never).unwrap();
            ort.add_exact(&path, &out, &calib);
            let left = count(&entry.ort, NORMS) - want_norms;
            if left > 0 {
                let ours = count(&ops, &["RMSNormalization"]);
                left_for_the_session.push((out, left.saturating_sub(ours)));
            }
        }
    }
    println!(
        "(norms: LayerNorms and RMSNorms in the model; norms/GELUs fused by ONNX Runtime's \
         optimizer, by onnxopt --target ort when the corpus was made, now)"
    );
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    ort.run();
    fused_by_the_session(&left_for_the_session);
}

/// Each model's RMSNorms left written out for ONNX Runtime are fused by its session when it
/// loads the model (`scripts/ort_session_ops.py`).
fn fused_by_the_session(models: &[(PathBuf, usize)]) {
    if models.is_empty() || !common::onnx_runtime_available() {
        return;
    }
    let paths: Vec<&Path> = models.iter().map(|(p, _)| p.as_path()).collect();
    for ((path, want), json) in models.iter().zip(common::session_ops(&paths)) {
        let fused = json["ops"]["SimplifiedLayerNormalization"]
            .as_u64()
            .unwrap_or(0) as usize;
        let name = path.file_name().unwrap().to_string_lossy();
        println!("{name}: ONNX Runtime's session fuses {fused} RMSNorms ({want} left to it)");
        assert!(
            fused >= *want,
            "{name}: the session fused {fused}, {want} left to it"
        );
    }
}
