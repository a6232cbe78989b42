//! Calibration, dynamic INT8 and FP16 on real models: what each range method gives on a tiny
//! BERT, masked values in observed activations, snapshots of the dynamic INT8 and FP16 graphs,
//! and every dynamically quantized and FP16 corpus model checked in tract and ONNX Runtime
//! against its float original.

mod common;

use onnxopt::exec::{self, GenerateOptions, InputSource, Tolerance, ValidateOptions};
use onnxopt::io::{self, ExternalData};
use onnxopt::ir::dump::dump_model;
use onnxopt::ir::{DataType, Model};
use onnxopt::passes::fuse::Target;
use onnxopt::quant::attention_projection::unpack_attention_projections;
use onnxopt::quant::calibrate::calibrate;
use onnxopt::quant::dynamic::{quantize_dynamic, DynamicOptions};
use onnxopt::quant::fp16::{convert_fp16, Fp16Options};
use onnxopt::quant::qdq::{
    activations_to_calibrate, ProductWeights, QdqOptions, Selection, Selector,
};
use onnxopt::quant::sensitivity::quantize_static_auto_exclude;
use onnxopt::quant::smooth::smooth_quant;
use onnxopt::quant::{quantize_static, QuantTarget, RangeMethod, StaticOptions};

const METHODS: [RangeMethod; 4] = [
    RangeMethod::MinMax,
    RangeMethod::Percentile(99.9),
    RangeMethod::Entropy,
    RangeMethod::Mse,
];

fn optimized(name: &str) -> Model {
    common::optimized_to_convert(&common::testdata(name), Target::Ort)
}

fn ort_options() -> QdqOptions {
    QdqOptions::for_target(QuantTarget::Ort)
}

fn dynamic_options(product_weights: ProductWeights) -> DynamicOptions {
    DynamicOptions {
        qdq: QdqOptions {
            product_weights,
            ..ort_options()
        },
        smooth_quant: None,
    }
}

fn bert_batches(model: &Model) -> Vec<exec::Batch> {
    let source = InputSource::Dir(common::testdata("calib/bert-tiny"));
    exec::batches_for(model, &source, &GenerateOptions::default()).unwrap()
}

#[test]
fn every_method_gives_a_range_inside_the_observed_one() {
    let model = optimized("bert-tiny.ts.onnx");
    let names = activations_to_calibrate(&model, &ort_options());
    assert!(!names.is_empty());
    let batches = bert_batches(&model);
    let observed = calibrate(&model, &names, &batches, RangeMethod::MinMax, &|_, _| {})
        .unwrap()
        .ranges;
    let mut clipped_somewhere = false;
    for method in METHODS {
        let ranges = calibrate(&model, &names, &batches, method, &|_, _| {})
            .unwrap()
            .ranges;
        assert_eq!(ranges.len(), names.len(), "{method:?}");
        for (name, r) in &ranges {
            let o = observed[name];
            assert!(
                o.min <= r.min && r.min <= 0.0_f32.max(r.max) && r.max <= o.max,
                "{method:?} {name}: {r:?} outside {o:?}"
            );
            clipped_somewhere |= r.max < o.max || r.min > o.min;
        }
    }
    assert!(clipped_somewhere, "no method clipped any tensor");
}

#[test]
fn masked_values_in_an_observed_activation_are_counted_and_left_out() {
    // Unfused, the dynamo export masks the attention scores with float32's lowest value: the
    // Softmax input holds -3.4e38 at every padded position of the calibration batches.
    let model = io::load(&common::testdata("bert-tiny.dynamo.onnx")).unwrap();
    let options = QdqOptions {
        target: QuantTarget::Ort,
        selection: Selection {
            include: vec![Selector::parse("op:Softmax").unwrap()],
            exclude: vec![],
        },
        ..QdqOptions::for_target(QuantTarget::Ort)
    };
    let batches = bert_batches(&model);
    let mut quantized = model.clone();
    let static_options = StaticOptions {
        qdq: options,
        method: RangeMethod::Entropy,
        smooth_quant: None,
    };
    let report = quantize_static(&mut quantized, &batches, &static_options, &|_, _| {}).unwrap();
    let calibration = report.calibration.unwrap();
    assert!(!calibration.masked.is_empty(), "{calibration:?}");
    for name in calibration.masked.keys() {
        let r = calibration.ranges[name];
        assert!(r.min > -1e3 && r.max < 1e3, "{name}: {r:?}");
    }
}

#[test]
fn a_model_holding_quantization_operators_is_not_quantized_twice() {
    let mut model = optimized("bert-tiny.ts.onnx");
    quantize_dynamic(&mut model, &[], &dynamic_options(ProductWeights::Int8)).unwrap();
    let before = dump_model(&model.to_proto().unwrap());
    let again = quantize_dynamic(&mut model, &[], &dynamic_options(ProductWeights::Int8)).unwrap();
    assert!(again
        .already_quantized
        .contains(&"MatMulInteger".to_string()));
    let statically = quantize_static(
        &mut model,
        &[],
        &StaticOptions {
            qdq: ort_options(),
            method: RangeMethod::Mse,
            smooth_quant: None,
        },
        &|_, _| {},
    )
    .unwrap();
    assert!(!statically.already_quantized.is_empty());
    assert_eq!(dump_model(&model.to_proto().unwrap()), before);
}

#[test]
fn dynamic_int8_of_bert_tiny() {
    let float = optimized("bert-tiny.dynamo.onnx");
    let mut model = float.clone();
    let report = quantize_dynamic(&mut model, &[], &dynamic_options(ProductWeights::Int8)).unwrap();
    let diff = common::dump_diff(&float, &model);
    insta::assert_snapshot!(format!("rewrites {:?}\n{diff}", report.rewrites.0));
}

/// Every model but MiniLM, whose integer and float16 MatMuls tract runs too slowly for a
/// debug-build test: ONNX Runtime alone checks it.
fn tract_checks(name: &str) -> bool {
    !name.starts_with("all-minilm")
}

/// Every output of `model` keeps a cosine of at least `min_cosine` with `float`'s in tract on
/// the batches in `calib`.
fn assert_close_in_tract(
    float: &Model,
    model: &Model,
    calib: &std::path::Path,
    min_cosine: f64,
    what: &str,
) {
    let validation = ValidateOptions {
        inputs: InputSource::Dir(calib.to_path_buf()),
        tolerance: Tolerance {
            max_abs_scaled: None,
            min_cosine: Some(min_cosine),
            ..Default::default()
        },
        ..Default::default()
    };
    let v = exec::validate(float, model, &validation, &|_, _| {}).unwrap();
    assert!(v.passed(), "{what}: {:?}", v.violations);
}

/// Every corpus model (path, file name) after the default pipeline.
fn optimized_corpus_models() -> impl Iterator<Item = (std::path::PathBuf, String, Model)> {
    common::corpus_models().into_iter().map(|path| {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let float = common::optimized_to_convert(&path, Target::Ort);
        (path, name, float)
    })
}

#[test]
fn dynamically_quantized_corpus_models_stay_close_to_float_in_tract_and_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    // MiniLM's whole last_hidden_state, padding included, sits lower than its sentence
    // embeddings (0.995 on held-back sentences: `benches/quant_vs_ort.rs`).
    let mut checks = common::OrtChecks::default();
    for (path, name, float) in optimized_corpus_models() {
        let mut model = float.clone();
        let report =
            quantize_dynamic(&mut model, &[], &dynamic_options(ProductWeights::Int8)).unwrap();
        assert!(
            report.rewrites.0.contains_key("dynamic-matmul"),
            "{name}: {:?}",
            report.rewrites
        );
        let calib = common::calib_dir(&path);
        if tract_checks(&name) {
            assert_close_in_tract(&float, &model, &calib, 0.99, &name);
        }
        let out = dir.path().join(format!("dynamic.{name}"));
        io::save(&model, &out, ExternalData::Auto).unwrap();
        let bound = if name.starts_with("all-minilm") {
            "0.95"
        } else {
            "0.99"
        };
        checks.add(bound, &path, &out, &calib);
    }
    checks.run();
}

/// OLMo-2 normalizes after attention, so its embedding's rows feed the first layer's projections
/// directly: the table's Gather is rewritten (int8 rows) and its readers quantized dynamically.
/// The dynamic products must read the rows the rewritten Gather gives, not the value it
/// replaced (which no node produces any more: ONNX Runtime refused to load the output).
#[test]
fn dynamic_products_of_an_embedding_read_its_int8_rows() {
    let path = common::testdata("wild/optimum-olmo2.optimum18.t27.onnx");
    let float = common::optimized_to_convert(&path, Target::Ort);
    let mut model = float.clone();
    let report = quantize_dynamic(&mut model, &[], &dynamic_options(ProductWeights::Int7)).unwrap();
    for rewrite in ["dynamic-matmul", "qdq-embedding"] {
        assert!(
            report.rewrites.0.contains_key(rewrite),
            "{:?}",
            report.rewrites
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dynamic.olmo2.onnx");
    io::save(&model, &out, ExternalData::Never).unwrap();
    io::load(&out).unwrap_or_else(|e| panic!("the output does not load: {e}"));
    let calib = common::testdata("wild/calib/optimum-olmo2.optimum18.t27");
    assert_close_in_tract(&float, &model, &calib, 0.99, "olmo2");
    let mut checks = common::OrtChecks::default();
    checks.add("0.99", &path, &out, &calib);
    checks.run();
}

#[test]
fn unpacked_attention_projections_give_the_packed_outputs_in_tract_and_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut checks = common::OrtChecks::default();
    let mut kept_packed = Vec::new();
    for (path, name, float) in optimized_corpus_models() {
        let mut model = float.clone();
        let rewrites = unpack_attention_projections(&mut model, &Selection::default()).unwrap();
        let Some(&n) = rewrites.0.get("unpack-attention") else {
            kept_packed.push(name);
            continue;
        };
        let attention = |m: &Model| {
            m.graph
                .nodes()
                .filter(|(_, node)| node.op_type() == "Attention")
                .count()
        };
        assert_eq!(attention(&float) - attention(&model), n, "{name}");
        let calib = common::calib_dir(&path);
        if tract_checks(&name) {
            common::same_outputs(&float, &model, &calib).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let (packed, unpacked) = (
            dir.path().join(format!("packed.{name}")),
            dir.path().join(format!("unpacked.{name}")),
        );
        io::save(&float, &packed, ExternalData::Auto).unwrap();
        io::save(&model, &unpacked, ExternalData::Auto).unwrap();
        checks.add_exact(&packed, &unpacked, &calib);
    }
    // Every model's attention is unpacked but GPT-2's with past key/values, whose fused
    // attention carries the cache.
    assert!(
        kept_packed.iter().all(|n| n.starts_with("gpt2-tiny-past")),
        "{kept_packed:?}"
    );
    checks.run();
}

#[test]
fn an_excluded_attention_keeps_its_packed_projection() {
    let mut model = optimized("bert-tiny.ts.onnx");
    let selection = Selection {
        exclude: vec![Selector::OpType("Attention".into())],
        ..Default::default()
    };
    let rewrites = unpack_attention_projections(&mut model, &selection).unwrap();
    assert_eq!(rewrites.total(), 0);
}

/// Weights of 7 bits (the default: ONNX Runtime's uint8×int8 kernel cannot saturate on them
/// without VNNI) keep within ±63 and reach it; int8 and uint8 ones use every code.
#[test]
fn dynamic_weights_are_int7_int8_or_uint8_with_matching_zero_points() {
    for (codes, dtype, zero, reach) in [
        (ProductWeights::Int7, DataType::Int8, 0u8, 63),
        (ProductWeights::Int8, DataType::Int8, 0u8, 127),
        (ProductWeights::Uint8, DataType::Uint8, 128u8, 127),
    ] {
        let mut model = optimized("bert-tiny.ts.onnx");
        quantize_dynamic(&mut model, &[], &dynamic_options(codes)).unwrap();
        let g = &model.graph;
        let products: Vec<_> = g
            .nodes()
            .filter(|(_, n)| n.is("MatMulInteger"))
            .map(|(_, n)| n.clone())
            .collect();
        assert!(!products.is_empty());
        for n in products {
            let weight = g.initializer(n.input(1).unwrap()).unwrap();
            let zero_point = g.initializer(n.input(3).unwrap()).unwrap();
            assert_eq!((weight.dtype(), zero_point.dtype()), (dtype, dtype));
            let zero_points = zero_point.raw_bytes().unwrap();
            assert!(zero_points.iter().all(|&z| z == zero), "{codes:?}");
            let largest = weight
                .raw_bytes()
                .unwrap()
                .iter()
                .map(|&b| (i32::from(b.wrapping_sub(zero) as i8)).abs())
                .max();
            // Each column's largest magnitude maps to the top code.
            assert_eq!(largest, Some(reach), "{codes:?}");
        }
    }
}

#[test]
fn fp16_of_bert_tiny() {
    let float = optimized("bert-tiny.dynamo.onnx");
    let mut model = float.clone();
    let options = Fp16Options {
        keep_io_types: true,
    };
    let report = convert_fp16(&mut model, &options).unwrap();
    let diff = common::dump_diff(&float, &model);
    insta::assert_snapshot!(format!("rewrites {:?}\n{diff}", report.rewrites.0));
}

#[test]
fn fp16_corpus_models_stay_close_to_float_in_tract_and_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut checks = common::OrtChecks::default();
    for (path, name, float) in optimized_corpus_models() {
        for keep_io_types in [true, false] {
            let mut model = float.clone();
            let report = convert_fp16(&mut model, &Fp16Options { keep_io_types }).unwrap();
            assert!(
                report.rewrites.0.contains_key("fp16-initializer"),
                "{name}: {:?}",
                report.rewrites
            );
            let calib = common::calib_dir(&path);
            if tract_checks(&name) {
                let what = format!("{name}, keep_io_types {keep_io_types}");
                assert_close_in_tract(&float, &model, &calib, 0.999, &what);
            }
            // ort_check.py feeds the batches as they are: float32 inputs only.
            if keep_io_types {
                let out = dir.path().join(format!("fp16.{name}"));
                io::save(&model, &out, ExternalData::Auto).unwrap();
                checks.add("0.999", &path, &out, &calib);
            }
        }
    }
    checks.run();
}

#[test]
fn auto_exclude_keeps_the_most_sensitive_layers_float_until_the_tolerance_holds() {
    let float = optimized("bert-tiny.ts.onnx");
    let batches = bert_batches(&float);
    let (calibration, validation) = batches.split_at(1);
    let options = StaticOptions {
        qdq: ort_options(),
        method: RangeMethod::MinMax,
        smooth_quant: None,
    };
    // The pooler's Gemm alone costs the most (cosine 0.9992 on its output); everything
    // else is near 1: a bound between the two must keep exactly it float.
    let tolerance = Tolerance {
        max_abs_scaled: None,
        min_cosine: Some(0.99995),
        ..Default::default()
    };
    let mut model = float.clone();
    let report = quantize_static_auto_exclude(
        &mut model,
        calibration,
        validation,
        &options,
        &tolerance,
        &|_, _, _| {},
    )
    .unwrap();
    let a = report.auto_exclusion.unwrap();
    assert!(a.passed);
    assert_eq!(a.excluded, ["/m/pooler/dense/Gemm"], "{a:#?}");
    assert_eq!(a.sensitivities[0].node, "/m/pooler/dense/Gemm");
    assert!(a
        .sensitivities
        .windows(2)
        .all(|w| w[0].cosine <= w[1].cosine));
    // The result is what the gate saw: it keeps the tolerance, and the Gemm reads float.
    let check = ValidateOptions {
        inputs: InputSource::Batches(validation.to_vec()),
        tolerance,
        ..Default::default()
    };
    assert!(exec::validate(&float, &model, &check, &|_, _| {})
        .unwrap()
        .passed());
    let g = &model.graph;
    let (_, gemm) = g
        .nodes()
        .find(|(_, n)| n.name() == "/m/pooler/dense/Gemm")
        .unwrap();
    let weight = gemm.input(1).unwrap();
    assert!(
        g.initializer(weight).is_some(),
        "the Gemm's weight stays a float initializer"
    );
}

#[test]
fn auto_exclude_needs_a_tolerance() {
    let float = optimized("bert-tiny.ts.onnx");
    let batches = bert_batches(&float);
    let options = StaticOptions {
        qdq: ort_options(),
        method: RangeMethod::MinMax,
        smooth_quant: None,
    };
    let mut model = float.clone();
    let err = quantize_static_auto_exclude(
        &mut model,
        &batches,
        &batches,
        &options,
        &Tolerance::default(),
        &|_, _, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("needs a tolerance"), "{err}");
}

/// SmoothQuant on its own changes no output beyond float rounding: folded into γ and β where
/// the projections are a normalization's only readers (GPT-2, pre-LN), through a Mul where a
/// residual reads it too (BERT, post-LN), for both targets' fused graphs.
#[test]
fn smoothing_keeps_the_float_outputs() {
    for (name, expected_muls) in [
        ("bert-tiny.ts.onnx", true),
        ("gpt2-tiny.dynamo.onnx", false),
    ] {
        let path = common::corpus().join("tiny").join(name);
        for target in [Target::Ort, Target::Onnx] {
            let float = common::optimized_to_convert(&path, target);
            let mut smoothed = float.clone();
            let source = InputSource::Dir(common::calib_dir(&path));
            let batches = exec::batches_for(&float, &source, &GenerateOptions::default()).unwrap();
            let report = smooth_quant(&mut smoothed, &batches, 0.5).unwrap();
            assert!(!report.smoothed.is_empty(), "{name} {target:?}");
            assert!(report.max_scale > report.min_scale, "{report:?}");
            let muls = smoothed.graph.nodes().filter(|(_, n)| n.is("Mul")).count()
                > float.graph.nodes().filter(|(_, n)| n.is("Mul")).count();
            assert_eq!(muls, expected_muls, "{name} {target:?}");
            let same = common::same_outputs(&float, &smoothed, &common::calib_dir(&path));
            assert!(same.is_ok(), "{name} {target:?}: {same:?}");
        }
    }
}

/// The output projection (Whisper's LM head, a constant weight writing the logits) keeps its
/// weight: its norm is not smoothed, the decoder layers' norms are.
#[test]
fn smoothing_leaves_the_output_projection_alone() {
    let stem = "whisper-dec-past.ts14.t21.eager";
    let path = common::testdata(&format!("wild/{stem}.onnx"));
    let float = common::optimized_to_convert(&path, Target::Ort);
    let source = InputSource::Dir(common::testdata(&format!("wild/calib/{stem}")));
    let batches = exec::batches_for(&float, &source, &GenerateOptions::default()).unwrap();
    let mut smoothed = float.clone();
    let report = smooth_quant(&mut smoothed, &batches, 0.5).unwrap();
    assert_eq!(report.smoothed.len(), 6, "{report:?}");
    let logits = float.graph.find_value("logits").unwrap();
    let head_weight = |m: &onnxopt::ir::Model| {
        let (head, _) = m.graph.value(logits).producer.unwrap();
        let w = m.graph.node(head).input(1).unwrap();
        m.graph.constant(w).unwrap().to_f32_vec().unwrap()
    };
    assert_eq!(head_weight(&float), head_weight(&smoothed));
}

#[test]
fn smoothing_refuses_a_strength_outside_zero_to_one() {
    let mut model = optimized("bert-tiny.ts.onnx");
    let batches = bert_batches(&model);
    let e = smooth_quant(&mut model, &batches, 1.5).unwrap_err();
    assert!(e.to_string().contains("[0, 1]"), "{e}");
}
