//! QDQ quantization of real models: a snapshot of what it does to a tiny BERT for each target,
//! TensorRT's rules on every `--target trt` output of the corpus, and every quantized corpus
//! model checked in tract and in ONNX Runtime against its float original.
//!
//! Ranges here are plain min/max over the calibration batches, computed with tract
//! (calibration proper is `quant::calibrate`'s job). The ONNX Runtime check needs Python with
//! onnx and onnxruntime; their absence fails it unless `ONNXOPT_SKIP_ORT=1` asks to skip.

mod common;

use std::path::Path;

use onnxopt::exec::{self, GenerateOptions, InputSource, Runner, Tolerance, ValidateOptions};
use onnxopt::io::{self, ExternalData};
use onnxopt::ir::Model;
use onnxopt::passes::fuse::Target;
use onnxopt::quant::qdq::{
    activations_to_calibrate, insert_qdq, trt_violations, QdqOptions, QdqOutcome,
};
use onnxopt::quant::{QuantTarget, Range, Ranges};

/// The cosine similarity every output of `model` must keep with the float model's, with plain
/// min/max ranges.
///
/// TensorRT's bound is lower because its guide has the residual input of skip Adds quantized:
/// in a pre-LN model (ViT, T5) that is the residual stream itself, which nothing else
/// quantizes, so each layer adds its rounding to it (vit-tiny.dynamo `pooler_output` in ONNX
/// Runtime: 0.9885, and 0.9993 with the skip Adds excluded; in post-LN BERT the residual is
/// the LayerNorm output the next MatMuls quantize anyway, and costs nothing).
///
/// MiniLM has real weights, and real BERTs feed the second FFN MatMul activations with
/// outliers (up to 24.6 where most values are within 0..2): one per-tensor scale over that
/// range rounds the small values away. Measured on `last_hidden_state`, whole tensor, ONNX
/// Runtime: 0.9686 for ONNX Runtime (0.9912 with those MatMuls excluded; 0.9909 over unpadded
/// tokens only; sentence embeddings 0.9944 on average) and 0.9289 for TensorRT, whose
/// symmetric int8 spends half its codes on the negative side of a GELU output. Better ranges
/// are calibration's job (percentile, entropy); these bounds hold what min/max gives.
fn min_cosine(model: &str, target: QuantTarget) -> f64 {
    match (model.starts_with("all-minilm"), target) {
        (false, QuantTarget::Ort) => 0.99,
        (false, QuantTarget::Trt) => 0.985,
        (true, QuantTarget::Ort) => 0.96,
        (true, QuantTarget::Trt) => 0.92,
    }
}

/// Models tract cannot run (see `tests/shape_inference.rs`): their ranges come from ONNX
/// Runtime, and only ONNX Runtime checks them.
fn options(target: QuantTarget) -> QdqOptions {
    QdqOptions::for_target(target)
}

/// `path` after the optimize pipeline for the runtime `target` builds for.
fn optimized(path: &Path, target: QuantTarget) -> Model {
    let target = match target {
        QuantTarget::Ort => Target::Ort,
        QuantTarget::Trt => Target::Onnx,
    };
    common::optimized_to_convert(path, target)
}

/// Min and max of the finite values of `names` over the batches in `dir`, run in tract.
fn min_max(model: &Model, names: &[String], dir: &Path) -> Ranges {
    let mut ranges = Ranges::new();
    if names.is_empty() {
        return ranges;
    }
    let source = InputSource::Dir(dir.to_path_buf());
    let batches = exec::batches_for(model, &source, &GenerateOptions::default()).unwrap();
    let mut runner = Runner::with_outputs(model, names).unwrap();
    for batch in &batches {
        for (name, t) in runner.run(batch).unwrap() {
            let t = t.cast_to::<f32>().unwrap();
            let view = t.to_plain_array_view::<f32>().unwrap();
            let finite = view.iter().filter(|v| v.is_finite());
            let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
            let r = ranges.entry(name).or_insert(Range { min: lo, max: hi });
            (r.min, r.max) = (r.min.min(lo), r.max.max(hi));
        }
    }
    ranges
}

fn quantize(model: &mut Model, ranges: &Ranges, target: QuantTarget) -> onnxopt::passes::Rewrites {
    match insert_qdq(model, ranges, &options(target)).unwrap() {
        QdqOutcome::Quantized(rewrites) => rewrites,
        other => panic!("not quantized: {other:?}"),
    }
}

/// The rewrite counts and the dump diff that quantizing a tiny BERT for `target` makes.
fn qdq_diff(target: QuantTarget) -> String {
    let path = common::testdata("bert-tiny.dynamo.onnx");
    let float = optimized(&path, target);
    let mut model = float.clone();
    let names = activations_to_calibrate(&model, &options(target));
    let ranges = min_max(&model, &names, &common::testdata("calib/bert-tiny"));
    let rewrites = quantize(&mut model, &ranges, target);
    let tolerance = Tolerance {
        max_abs_scaled: None,
        min_cosine: Some(min_cosine("bert-tiny", target)),
        ..Default::default()
    };
    let validation = ValidateOptions {
        inputs: InputSource::Dir(common::testdata("calib/bert-tiny")),
        tolerance,
        ..Default::default()
    };
    let v = exec::validate(&float, &model, &validation, &|_, _| {}).unwrap();
    assert!(v.passed(), "{:?}", v.violations);
    let diff = common::dump_diff(&float, &model);
    format!("rewrites {:?}\n{}", rewrites.0, round_scales(&diff))
}

/// `diff` with each activation scale to 5 significant digits: they come from ranges tract
/// observes, whose last bits differ between CPUs (its kernels sum in other orders).
fn round_scales(diff: &str) -> String {
    let scale = regex::Regex::new(r"(\.scale: f32\[\] = \[)([^\]]+)\]").unwrap();
    scale
        .replace_all(diff, |c: &regex::Captures| {
            let value: f32 = c[2].parse().unwrap();
            format!("{}{value:.4e}]", &c[1])
        })
        .into_owned()
}

#[test]
fn qdq_of_bert_tiny_for_onnx_runtime() {
    insta::assert_snapshot!(qdq_diff(QuantTarget::Ort));
}

#[test]
fn qdq_of_bert_tiny_for_tensorrt() {
    insta::assert_snapshot!(qdq_diff(QuantTarget::Trt));
}

#[test]
fn every_tensorrt_output_of_the_corpus_keeps_tensorrt_rules() {
    for path in common::corpus_models() {
        let mut model = optimized(&path, QuantTarget::Trt);
        let options = options(QuantTarget::Trt);
        // The rules do not depend on the ranges' values.
        let any = Range {
            min: -1.0,
            max: 2.0,
        };
        let ranges: Ranges = activations_to_calibrate(&model, &options)
            .into_iter()
            .map(|n| (n, any))
            .collect();
        let rewrites = quantize(&mut model, &ranges, QuantTarget::Trt);
        assert!(
            rewrites.0.contains_key("qdq-weight"),
            "{}: {rewrites:?}",
            path.display()
        );
        let violations = trt_violations(&model);
        assert!(violations.is_empty(), "{}: {violations:#?}", path.display());
    }
}

#[test]
fn quantized_corpus_models_stay_close_to_float_in_tract_and_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut checks = common::OrtChecks::default();
    for path in common::corpus_models() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let calib = common::calib_dir(&path);
        for target in [QuantTarget::Ort, QuantTarget::Trt] {
            let bound = min_cosine(&name, target);
            let float = optimized(&path, target);
            let mut model = float.clone();
            let names = activations_to_calibrate(&model, &options(target));
            let ranges = min_max(&model, &names, &calib);
            quantize(&mut model, &ranges, target);
            let validation = ValidateOptions {
                inputs: InputSource::Dir(calib.clone()),
                tolerance: Tolerance {
                    max_abs_scaled: None,
                    min_cosine: Some(bound),
                    ..Default::default()
                },
                ..Default::default()
            };
            let v = exec::validate(&float, &model, &validation, &|_, _| {}).unwrap();
            assert!(v.passed(), "{name} {target:?}: {:?}", v.violations);
            let out = dir.path().join(format!("{target:?}.{name}"));
            io::save(&model, &out, ExternalData::Auto).unwrap();
            checks.add(&bound.to_string(), &path, &out, &calib);
        }
    }
    checks.run();
}
