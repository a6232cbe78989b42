//! The tiny decoder LLMs of `testdata/llm` (scripts/llm/make_llm.py: Llama-3, Qwen2.5, Qwen3,
//! Mistral, Phi-3, Gemma-3; 2 layers; without and with KV cache; torch dynamo at opsets 20
//! and 23, the legacy exporter for Llama): every RoPE is fused for ONNX Runtime, and for
//! `--target onnx` once the model is at opset 23 (the opset-23 exports hold the standard
//! operator already; below, the attention and RMSNorm fusions raise them to 23); every
//! attention is fused (`passes::fuse::attention::grouped`), Gemma-3's sliding-window layers
//! too, and every SiLU for ONNX Runtime; the outputs stay the original's in ONNX Runtime on every
//! batch of `testdata/llm/calib/{prefill,past}` (right and left padding, past of 0, 5 and 8,
//! a decode step), and in tract for the models without cache (tract cannot run the KV-cache
//! exports themselves: "Range: Undetermined symbol").

mod common;

use std::path::PathBuf;

use onnxopt::exec::{self, InputSource, Tolerance, ValidateOptions};
use onnxopt::ir::DataType;
use onnxopt::passes::fuse::Target;

/// Two layers, each with a rotated query and key.
const ROPES: usize = 4;
/// Two layers, each with one attention.
const ATTENTIONS: usize = 2;
fn llm_models() -> Vec<PathBuf> {
    let mut models: Vec<PathBuf> = std::fs::read_dir(common::testdata("llm"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    models.sort();
    assert!(models.len() >= 20, "testdata/llm holds {}", models.len());
    models
}

fn count(model: &onnxopt::ir::Model, op_type: &str) -> usize {
    model
        .graph
        .nodes()
        .filter(|(_, n)| n.op_type() == op_type)
        .count()
}

#[test]
fn every_rope_is_fused_and_outputs_stay_in_onnx_runtime_and_tract() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut checks = Vec::new();
    for path in llm_models() {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let form = if name.contains(".past.") {
            "past"
        } else {
            "prefill"
        };
        let batches = common::testdata("llm").join("calib").join(form);
        let original = onnxopt::io::load(&path).unwrap();
        let exported_at_23 = original.opset("").unwrap_or(0) >= 23;
        for target in [Target::Ort, Target::Onnx] {
            let model = common::optimized(&path, target);
            let ropes = count(&model, "RotaryEmbedding");
            let expected = if target == Target::Ort || model.opset("").unwrap_or(0) >= 23 {
                ROPES
            } else {
                0
            };
            let neg_left = count(&model, "Neg");
            let (attentions, softmax_left) = (count(&model, "Attention"), count(&model, "Softmax"));
            println!(
                "{name:<32} {:<4} RotaryEmbedding {ropes}, Neg {neg_left}, Attention {attentions}, Softmax {softmax_left}",
                target.name()
            );
            if ropes != expected || (expected == ROPES && neg_left != 0) {
                failures.push(format!(
                    "{name} {target:?}: {ropes} RotaryEmbedding (want {expected}), {neg_left} Neg"
                ));
            }
            // SiLU (`x · sigmoid(x)`) is QuickGelu with α = 1 for ONNX Runtime.
            let sigmoid_left = count(&model, "Sigmoid");
            if target == Target::Ort && sigmoid_left != 0 {
                failures.push(format!("{name} {target:?}: {sigmoid_left} Sigmoid left"));
            }
            if attentions != ATTENTIONS || softmax_left != 0 {
                failures.push(format!(
                    "{name} {target:?}: {attentions} Attention (want {ATTENTIONS}), {softmax_left} Softmax"
                ));
            }
            // The heads' split and merge move inside the fused operator (`attention-flat-heads`),
            // Gemma-3's norm of each head with them.
            let flat = common::flat_attentions(&model);
            if flat != ATTENTIONS {
                failures.push(format!(
                    "{name} {target:?}: {flat} Attention on [batch, sequence, heads·size] rows (want {ATTENTIONS})"
                ));
            }
            // For ONNX Runtime the value is a third of one product (Phi-3's own packed
            // projection is sliced; the others' are split by `attention-packed-projections`),
            // and with a cache the scale is on the query (its kernel decodes faster at 1).
            if target == Target::Ort {
                let cached = form == "past";
                let g = &model.graph;
                let made_by = |v: Option<onnxopt::ir::ValueId>| {
                    v.and_then(|v| g.producer(v))
                        .map_or("", |p| g.node(p).op_type())
                };
                let unfit = g
                    .nodes()
                    .filter(|(_, n)| n.op_type() == "Attention")
                    .filter(|(_, n)| {
                        let unit = onnxopt::ir::attr::get_float(&n.proto, "scale") == Some(1.0);
                        (cached && !(unit && made_by(n.input(0)) == "Mul"))
                            || !matches!(made_by(n.input(2)), "Split" | "Slice")
                    })
                    .count();
                if unfit != 0 {
                    failures.push(format!(
                        "{name} {target:?}: {unfit} Attention on three projections, or scaled with a cache"
                    ));
                }
            }
            // An opset-23 export's boolean mask reaches the fused operator as a boolean: as a
            // -inf float mask, left padding gives NaN in ONNX Runtime 1.24 and 1.25.
            if exported_at_23 {
                let boolean = |v: onnxopt::ir::ValueId| {
                    model.graph.value_type(v).map(|t| t.elem) == Some(DataType::Bool as i32)
                };
                let float_masks = model
                    .graph
                    .nodes()
                    .filter(|(_, n)| n.op_type() == "Attention")
                    .filter(|(_, n)| n.input(3).is_some_and(|m| !boolean(m)))
                    .count();
                if float_masks != 0 {
                    failures.push(format!(
                        "{name} {target:?}: {float_masks} Attention read a float mask"
                    ));
                }
            }
            let out = dir.path().join(format!("{name}.{}.onnx", target.name()));
            onnxopt::io::save(&model, &out, onnxopt::io::ExternalData::Never).unwrap();
            checks.extend([
                path.to_string_lossy().into_owned(),
                out.to_string_lossy().into_owned(),
                batches.to_string_lossy().into_owned(),
            ]);
            if form == "prefill" && !exported_at_23 {
                let options = ValidateOptions {
                    inputs: InputSource::Dir(batches.clone()),
                    tolerance: Tolerance {
                        max_abs_scaled: None,
                        max_abs: Some(1e-4),
                        ..Default::default()
                    },
                    engine: exec::Engine::Tract,
                    ..Default::default()
                };
                match exec::validate(&original, &model, &options, &|_, _| {}) {
                    Ok(v) if v.passed() => {}
                    Ok(v) => failures.push(format!("{name} {target:?} tract: {:?}", v.violations)),
                    Err(e) => failures.push(format!("{name} {target:?} tract: {e}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    if common::onnx_runtime_available() {
        common::ort_check(&checks);
    }
}
