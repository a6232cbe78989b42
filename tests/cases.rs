//! Models other people's exporters wrote, that onnxopt once turned into broken outputs or
//! refused (`testdata/cases/`, made by `scripts/cases/make_cases.py` with torch 2.1's legacy
//! exporter, transformers 4.20 and 4.36, sentence-transformers 2.7 and ONNX Runtime's
//! `quantize_dynamic`; `manifest.json` says what each one is):
//!
//! - the classic BERT mask `(1 - mask[:, None, None, :]) * finfo.min` (or `* -10000`), a
//!   `[batch, 1, 1, seq]` bias that ONNX Runtime's attention kernels refuse as it is;
//! - a GPT-2 export with two identical Constant nodes writing one value;
//! - a T5 decoder and an LSTM dynamically quantized by ONNX Runtime (DynamicQuantizeLinear,
//!   MatMulInteger, com.microsoft DynamicQuantizeLSTM, which tract cannot run);
//! - a ViT whose head keeps BatchNormalization after a Conv;
//! - a BERT through ONNX Runtime's own transformers optimizer and `quantize_dynamic`
//!   (QEmbedLayerNormalization, QAttention), whose token ids the generated validation inputs
//!   must keep within its quantized embedding table.
//!
//! Every case goes through the whole pipeline for both targets, as written and with each
//! lossy mode; each must be written, and load and run in ONNX Runtime with the original's
//! outputs (exactly for a lossless run, by cosine for a lossy one).

mod common;

use std::path::{Path, PathBuf};

use onnxopt::exec::{InputSource, Tolerance};
use onnxopt::io::{self, ExternalData};
use onnxopt::passes::fuse::Target;
use onnxopt::pipeline::{self, Mode, PipelineError};
use onnxopt::quant::{self, qdq::QdqOptions, QuantTarget};

fn cases() -> Vec<PathBuf> {
    let mut models: Vec<PathBuf> = std::fs::read_dir(common::testdata("cases"))
        .expect("testdata/cases")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    models.sort();
    assert!(models.len() >= 11, "the cases are in testdata/cases");
    models
}

fn inputs(model: &Path) -> PathBuf {
    let stem = model.file_stem().unwrap().to_string_lossy();
    common::testdata("cases/calib").join(stem.as_ref())
}

fn name(model: &Path) -> String {
    model.file_name().unwrap().to_string_lossy().into_owned()
}

/// The pipeline's options for `target` and `mode`, calibrating on the case's batches.
fn options(model: &Path, target: Target, mode: &str) -> pipeline::Options {
    let quant_target = match target {
        Target::Ort => QuantTarget::Ort,
        Target::Onnx => QuantTarget::Trt,
    };
    let qdq = QdqOptions::for_target(quant_target);
    let mode = match mode {
        "float" => Mode::Float,
        "int8" => Mode::Static {
            options: quant::StaticOptions {
                qdq,
                method: quant::RangeMethod::MinMax,
                smooth_quant: None,
            },
            auto_exclude: false,
        },
        "int8-dynamic" => Mode::Dynamic(quant::dynamic::DynamicOptions {
            qdq: QdqOptions {
                product_weights: quant::qdq::ProductWeights::Int8,
                ..qdq
            },
            smooth_quant: Some(0.5),
        }),
        "fp16" => Mode::Fp16(Default::default()),
        other => panic!("no mode {other}"),
    };
    let mut options = pipeline::Options {
        mode,
        ..Default::default()
    };
    options.optimize.target = target;
    options.calibration = Some(InputSource::Dir(inputs(model)));
    options
}

/// What the pipeline did with one case in one mode.
enum Written {
    Yes(PathBuf),
    Refused(String),
}

fn optimize(model: &Path, target: Target, mode: &str, out: &Path) -> Written {
    let loaded = io::load(model).unwrap_or_else(|e| panic!("{}: {e}", name(model)));
    match pipeline::run(loaded, &options(model, target, mode), &|_, _, _| {}) {
        Ok(outcome) => {
            io::save(&outcome.model, out, ExternalData::Never).unwrap();
            Written::Yes(out.to_path_buf())
        }
        Err(PipelineError::NotWritten { reason, .. }) => Written::Refused(reason),
        Err(e) => Written::Refused(e.to_string()),
    }
}

#[test]
fn every_case_is_optimized_and_runs_in_onnx_runtime_with_the_originals_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut exact = common::OrtChecks::default();
    let mut lossy = common::OrtChecks::default();
    let mut refused = Vec::new();
    for model in cases() {
        let case = name(&model);
        for target in [Target::Ort, Target::Onnx] {
            for mode in ["float", "int8-dynamic", "fp16", "int8"] {
                let out = dir.path().join(format!("{}.{mode}.{case}", target.name()));
                match optimize(&model, target, mode, &out) {
                    Written::Yes(out) if mode == "float" => {
                        // A model that quantizes its activations is compared by cosine: see
                        // `pipeline::check_tolerance`.
                        if case.contains("qdyn") {
                            lossy.add("0.999", &model, &out, &inputs(&model));
                        } else {
                            exact.add_exact(&model, &out, &inputs(&model));
                        }
                    }
                    Written::Yes(out) => lossy.add("0.9", &model, &out, &inputs(&model)),
                    Written::Refused(why) => refused.push((case.clone(), mode, why)),
                }
            }
        }
    }
    // Without ONNX Runtime, nothing here runs com.microsoft::DynamicQuantizeLSTM or
    // QEmbedLayerNormalization: a lossy step on those models cannot be validated, and is
    // refused saying what would.
    const ORT_ONLY: &[(&str, &str)] = &[
        ("lstm-tiny.qdyn.onnx", "DynamicQuantizeLSTM"),
        ("bert-ortopt.qdyn.onnx", "QEmbedLayerNormalization"),
    ];
    let ort = onnxopt::exec::ort::available().is_ok();
    for (case, mode, why) in &refused {
        let unvalidated = !ort
            && *mode != "float"
            && ORT_ONLY
                .iter()
                .any(|(c, op)| c == case && why.contains(op) && why.contains("--no-check"));
        assert!(unvalidated, "{case} {mode} was refused: {why}");
    }
    exact.run();
    lossy.run();
}

#[test]
fn the_classic_bert_mask_is_fused_with_a_bias_every_kernel_accepts() {
    for case in ["bert-finfo-mask.ts14.onnx", "bert-10000-mask.ts14.onnx"] {
        let model = common::testdata("cases").join(case);
        for target in [Target::Ort, Target::Onnx] {
            let optimized = common::optimized(&model, target);
            let dump = onnxopt::ir::dump::dump_model(&optimized.to_proto().unwrap());
            let attention = dump.lines().filter(|l| l.contains("Attention")).count();
            assert_eq!(attention, 2, "{case} {target:?}: both layers fused\n{dump}");
            // The mask's Expand among others (for ONNX Runtime, the embeddings' position
            // ids are expanded to the batch too: `fuse::embed_layernorm`).
            let expands: Vec<&str> = dump.lines().filter(|l| l.contains("= Expand(")).collect();
            assert!(
                expands
                    .iter()
                    .any(|l| l.contains("[batch, 1, sequence, sequence]")),
                "{case} {target:?}: the bias is expanded over the query rows: {expands:#?}\n{dump}"
            );
        }
    }
}

#[test]
fn a_value_written_by_two_constants_loads_with_a_warning() {
    let model = io::load(&common::testdata("cases/gpt2-dup-constant.ts17.onnx")).unwrap();
    assert_eq!(model.repairs.len(), 1, "{:?}", model.repairs);
    assert!(model.repairs[0].contains("identical; one is kept"));
}

#[test]
fn validating_the_quantized_t5_decoder_raises_no_false_alarm() {
    // Its optimized form computes GELU and the RMS norm fused, a float ulp away from the
    // original's; one such ulp can cross a quantizer's rounding tie. The lossless limits
    // of a quantized model are by cosine (see `pipeline::check_tolerance`).
    let model = common::testdata("cases/t5-decoder.qdyn.onnx");
    for target in [Target::Ort, Target::Onnx] {
        let mut options = options(&model, target, "float");
        options.validate = true;
        options.inputs = InputSource::Dir(inputs(&model));
        let outcome = pipeline::run(io::load(&model).unwrap(), &options, &|_, _, _| {})
            .unwrap_or_else(|e| panic!("{target:?}: {e}"));
        let v = outcome.report.validation.expect("validated");
        assert!(v.passed(), "{:?}", v.violations);
        assert!(v.tolerance.max_abs.is_none() && v.tolerance.min_cosine.is_some());
    }
}

#[test]
fn a_lossless_check_holds_outputs_to_their_own_scale() {
    // The limits of a float model: 1e-4 of each output's largest value, and a cosine.
    let model = io::load(&common::testdata("bert-tiny.ts.onnx")).unwrap();
    let limits = pipeline::Tolerances::default().limits(&model, false);
    assert_eq!(limits.max_abs_scaled, Some(pipeline::LOSSLESS_MAX_ERROR));
    assert_eq!(limits.min_cosine, Some(pipeline::LOSSLESS_MIN_COSINE));
    // A lossy run keeps only the limits given.
    let given = pipeline::Tolerances {
        min_cosine: Some(0.99),
        ..Default::default()
    };
    let limits: Tolerance = given.limits(&model, true);
    assert_eq!(limits.min_cosine, Some(0.99));
    assert!(limits.max_abs.is_none() && limits.max_abs_scaled.is_none());
}
