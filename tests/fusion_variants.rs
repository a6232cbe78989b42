//! The spellings of GELU and LayerNorm that exporters write, as small chains on `x: f32[2, 3,
//! 8]`: each fuses, for both targets, into the operator it should, and keeps its outputs
//! (tract within 1e-5, ONNX Runtime within 1e-4 after the full onnx.checker); the near misses
//! beside them (a constant beyond float32 rounding, a different mean subtracted; a mean over
//! another axis is in `fusion_negative.rs`) do not fuse. A snapshot per spelling holds the
//! `dump` diff of its fusion for ONNX Runtime, on the canonical form (see
//! `fusion_snapshots.rs`). The float16 norms of fp16-safe exports (Casts to float32 and back
//! inside) fuse too, within float16 rounding.

// The constants are written as the exporters write them, √2 to five decimals included.
#![allow(clippy::approx_constant)]

mod common;

use std::path::Path;

use onnxopt::exec::{self, InputSource, ValidateOptions};
use onnxopt::io::{self, ExternalData};
use onnxopt::ir::{attr, DataType, Model, Tensor};
use onnxopt::optimize::{optimize, OptimizeOptions};
use onnxopt::passes::canonical::Canonicalize;
use onnxopt::passes::dce::DeadCodeElimination;
use onnxopt::passes::fuse::gelu::GeluFusion;
use onnxopt::passes::fuse::layernorm::LayerNormFusion;
use onnxopt::passes::fuse::Target;
use onnxopt::passes::shape::ShapeInference;
use onnxopt::passes::{Pass, PassManager};
use onnxopt::proto::NodeProto;

use common::chain::{model, model_of, node, scalar};

const DIMS: [i64; 3] = [2, 3, 8];

/// `x · 0.5 · (1 + erf(x / root2))`, Megatron-LM's order: `x * 0.5 * (1.0 + erf(x / c))`.
fn gelu_erf_div(root2: f32) -> Model {
    model(
        vec![
            node("Mul", &["x", "half"], "xh", vec![]),
            node("Div", &["x", "c"], "t", vec![]),
            node("Erf", &["t"], "e", vec![]),
            node("Add", &["one", "e"], "a", vec![]),
            node("Mul", &["xh", "a"], "y", vec![]),
        ],
        vec![scalar("half", 0.5), scalar("c", root2), scalar("one", 1.0)],
        &["y"],
    )
}

/// `x · Φ(x)` with `Φ(x) = 0.5 · (1 + erf(x · 0.70710678))`, the constant as written.
fn gelu_phi() -> Model {
    model(
        vec![
            node("Mul", &["x", "c"], "t", vec![]),
            node("Erf", &["t"], "e", vec![]),
            node("Add", &["e", "one"], "a", vec![]),
            node("Mul", &["half", "a"], "phi", vec![]),
            node("Mul", &["x", "phi"], "y", vec![]),
        ],
        vec![
            scalar("c", 0.707_106_78),
            scalar("one", 1.0),
            scalar("half", 0.5),
        ],
        &["y"],
    )
}

/// HF `gelu_new`, `0.5 * x * (1 + tanh(√(2/π) * (x + 0.044715 * x³)))`, with the cube as
/// `Pow(x, 3)` and 0.5 first, or as `x·x·x` and 0.5 last.
fn gelu_new(pow: bool) -> Model {
    let cube: Vec<NodeProto> = if pow {
        vec![node("Pow", &["x", "three"], "x3", vec![])]
    } else {
        vec![
            node("Mul", &["x", "x"], "x2", vec![]),
            node("Mul", &["x2", "x"], "x3", vec![]),
        ]
    };
    let head = if pow {
        vec![
            node("Mul", &["half", "x"], "xh", vec![]),
            node("Mul", &["xh", "a"], "y", vec![]),
        ]
    } else {
        vec![
            node("Mul", &["x", "a"], "xa", vec![]),
            node("Mul", &["xa", "half"], "y", vec![]),
        ]
    };
    let body = vec![
        node("Mul", &["k", "x3"], "kx3", vec![]),
        node("Add", &["x", "kx3"], "p", vec![]),
        node("Mul", &["s", "p"], "t", vec![]),
        node("Tanh", &["t"], "th", vec![]),
        node("Add", &["one", "th"], "a", vec![]),
    ];
    model(
        [cube, body, head].concat(),
        vec![
            scalar("three", 3.0),
            scalar("k", 0.044715),
            scalar("s", 0.797_884_6),
            scalar("one", 1.0),
            scalar("half", 0.5),
        ],
        &["y"],
    )
}

/// HF `gelu_fast`, `0.5 * x * (1 + tanh(x * 0.7978845608 * (1 + k * x * x)))`, or
/// Megatron-LM's fast GELU, `x * 0.5 * (1 + tanh(0.79788456 * x * (1 + k * x * x)))`.
fn gelu_fast(megatron: bool, k: f32) -> Model {
    let (scaled, head) = if megatron {
        (
            node("Mul", &["s", "x"], "xs", vec![]),
            vec![
                node("Mul", &["x", "half"], "xh", vec![]),
                node("Mul", &["xh", "a"], "y", vec![]),
            ],
        )
    } else {
        (
            node("Mul", &["x", "s"], "xs", vec![]),
            vec![
                node("Mul", &["half", "x"], "xh", vec![]),
                node("Mul", &["xh", "a"], "y", vec![]),
            ],
        )
    };
    let body = vec![
        node("Mul", &["k", "x"], "kx", vec![]),
        node("Mul", &["kx", "x"], "kx2", vec![]),
        node("Add", &["one", "kx2"], "p", vec![]),
        scaled,
        node("Mul", &["xs", "p"], "t", vec![]),
        node("Tanh", &["t"], "th", vec![]),
        node("Add", &["one", "th"], "a", vec![]),
    ];
    // HF writes 0.7978845608, Megatron 0.79788456: the same float32.
    let s = 0.797_884_6;
    model(
        [body, head].concat(),
        vec![
            scalar("k", k),
            scalar("s", s),
            scalar("one", 1.0),
            scalar("half", 0.5),
        ],
        &["y"],
    )
}

/// Keras LayerNormalization as tf2onnx writes it: the moments as GlobalAveragePool, then
/// `s = γ · 1/√(v + ε)` and `x·s + (β − m·s)`, with `m` the mean (or, `other_mean`, a second
/// mean of the same x that the variance is not taken around).
fn layer_norm_tf(other_mean: bool) -> Model {
    let subtracted = if other_mean { "m2" } else { "m" };
    model(
        vec![
            node("GlobalAveragePool", &["x"], "m", vec![]),
            node("ReduceMean", &["x"], "m2", vec![attr::ints("axes", &[-1])]),
            node("Sub", &["x", "m"], "d", vec![]),
            node("Mul", &["d", "d"], "d2", vec![]),
            node("GlobalAveragePool", &["d2"], "v", vec![]),
            node("Add", &["v", "eps"], "ve", vec![]),
            node("Sqrt", &["ve"], "sd", vec![]),
            node("Reciprocal", &["sd"], "r", vec![]),
            node("Mul", &["r", "gamma"], "s", vec![]),
            node("Mul", &[subtracted, "s"], "ms", vec![]),
            node("Sub", &["beta", "ms"], "shift", vec![]),
            node("Mul", &["x", "s"], "xs", vec![]),
            node("Add", &["xs", "shift"], "y", vec![]),
        ],
        vec![
            scalar("eps", 1e-12),
            Tensor::from_f32("gamma", &[8], &[1.5, 0.5, 1.0, 2.0, 0.75, 1.25, 1.0, 0.9]).unwrap(),
            Tensor::from_f32("beta", &[8], &[0.1, -0.2, 0.0, 0.3, 0.05, -0.1, 0.2, 0.0]).unwrap(),
        ],
        &["y"],
    )
}

/// A float16 vector of `values`.
fn half(name: &str, values: &[f32]) -> Tensor {
    let bytes: Vec<u8> = values
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let dims = [values.len() as i64];
    Tensor::from_raw(name, DataType::Float16, &dims, bytes.into()).unwrap()
}

/// A float16 LayerNorm as torch's legacy exporter writes it below opset 17: the mean and
/// `x - mean` in float16, `x - mean` cast to float32 for the variance and the division, the
/// quotient cast back to float16 before γ and β.
fn layer_norm_half() -> Model {
    let to = |t: DataType| vec![attr::int("to", t as i64)];
    model_of(
        DataType::Float16,
        vec![
            node("ReduceMean", &["x"], "m", vec![attr::ints("axes", &[-1])]),
            node("Sub", &["x", "m"], "d", vec![]),
            node("Cast", &["d"], "dw", to(DataType::Float)),
            node("Pow", &["dw", "two"], "d2", vec![]),
            node("ReduceMean", &["d2"], "v", vec![attr::ints("axes", &[-1])]),
            node("Add", &["v", "eps"], "ve", vec![]),
            node("Sqrt", &["ve"], "sd", vec![]),
            node("Div", &["dw", "sd"], "n", vec![]),
            node("Cast", &["n"], "nh", to(DataType::Float16)),
            node("Mul", &["nh", "gamma"], "s", vec![]),
            node("Add", &["s", "beta"], "y", vec![]),
        ],
        vec![
            scalar("two", 2.0),
            scalar("eps", 1e-5),
            half("gamma", &[1.5, 0.5, 1.0, 2.0, 0.75, 1.25, 1.0, 0.9]),
            half("beta", &[0.1, -0.2, 0.0, 0.3, 0.05, -0.1, 0.2, 0.0]),
        ],
        &["y"],
    )
}

/// A float16 RMSNorm as T5 writes it: x cast to float32, `x · 1/√(mean(x²) + ε)`, cast back
/// to float16 before γ.
fn rms_norm_half() -> Model {
    let to = |t: DataType| vec![attr::int("to", t as i64)];
    model_of(
        DataType::Float16,
        vec![
            node("Cast", &["x"], "xw", to(DataType::Float)),
            node("Pow", &["xw", "two"], "x2", vec![]),
            node("ReduceMean", &["x2"], "v", vec![attr::ints("axes", &[-1])]),
            node("Add", &["v", "eps"], "ve", vec![]),
            node("Sqrt", &["ve"], "sd", vec![]),
            node("Reciprocal", &["sd"], "r", vec![]),
            node("Mul", &["xw", "r"], "n", vec![]),
            node("Cast", &["n"], "nh", to(DataType::Float16)),
            node("Mul", &["gamma", "nh"], "y", vec![]),
        ],
        vec![
            scalar("two", 2.0),
            scalar("eps", 1e-6),
            half("gamma", &[1.5, 0.5, 1.0, 2.0, 0.75, 1.25, 1.0, 0.9]),
        ],
        &["y"],
    )
}

#[test]
fn half_precision_norms_fuse_with_their_casts() {
    let dir = tempfile::tempdir().unwrap();
    let batch = inputs();
    let mut ort = common::OrtChecks::default();
    let cases: [(&str, Model, &[&str], &[&str]); 2] = [
        (
            "layer_norm_half",
            layer_norm_half(),
            &["LayerNormalization"],
            &["LayerNormalization"],
        ),
        // Below opset 23 an RMSNorm stays written out for ONNX Runtime (fuse::layernorm).
        ("rms_norm_half", rms_norm_half(), &[], &["RMSNormalization"]),
    ];
    for (name, original, for_ort, for_onnx) in cases {
        let original_path = dir.path().join(format!("{name}.onnx"));
        io::save(&original, &original_path, ExternalData::Never).unwrap();
        for (target, expected) in [(Target::Ort, for_ort), (Target::Onnx, for_onnx)] {
            let mut model = original.clone();
            let options = OptimizeOptions {
                target,
                ..Default::default()
            };
            optimize(&mut model, &options).unwrap();
            let fused: Vec<String> = model
                .graph
                .nodes()
                .map(|(_, n)| n.op_type().to_string())
                .filter(|op| op.ends_with("Normalization"))
                .collect();
            assert_eq!(fused, expected, "{name} {target:?}");
            // float16 results up to 5 or so, where one half ulp is 3.9e-3: two ulps at most.
            let validate = ValidateOptions {
                inputs: InputSource::Generated(2),
                ..Default::default()
            };
            let v = exec::validate(&original, &model, &validate, &|_, _| {}).unwrap();
            let worst = v.outputs.iter().map(|d| d.max_abs).fold(0.0, f64::max);
            println!("{name} {target:?}: max abs {worst:.2e} in tract");
            assert!(
                worst <= 4e-3,
                "{name} {target:?}: outputs changed by {worst}"
            );
            let out = dir.path().join(format!("{name}.{}.onnx", target.name()));
            io::save(&model, &out, ExternalData::Never).unwrap();
            ort.add("0.9999", &original_path, &out, batch.path());
        }
    }
    ort.run();
}

/// A folder holding the one batch every chain here reads: `x.npy`.
fn inputs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let x: Vec<f32> = (0..48)
        .map(|i| ((i * 37 % 48) as f32 - 23.5) / 6.0)
        .collect();
    common::write_npy_f32(&dir.path().join("x.npy"), &DIMS, &x);
    dir
}

/// Optimizes `original` for `target` and returns the optimized model and its operators,
/// sorted; checks its outputs in tract (within 1e-5 on the batch in `inputs`).
fn optimized(original: &Model, target: Target, inputs: &Path) -> (Model, Vec<String>) {
    let mut model = original.clone();
    let options = OptimizeOptions {
        target,
        ..Default::default()
    };
    optimize(&mut model, &options).unwrap();
    let validate = ValidateOptions {
        inputs: InputSource::Dir(inputs.to_path_buf()),
        ..Default::default()
    };
    let v = exec::validate(original, &model, &validate, &|_, _| {}).unwrap();
    let worst = v.outputs.iter().map(|d| d.max_abs).fold(0.0, f64::max);
    assert!(worst <= 1e-5, "{target:?}: outputs changed by {worst}");
    let mut ops: Vec<String> = model
        .graph
        .nodes()
        .map(|(_, n)| n.op_type().to_string())
        .collect();
    ops.sort();
    (model, ops)
}

/// The `dump` diff that `fusion` (then DCE) makes on `model`'s canonical form.
fn fused_diff(model: &Model, fusion: impl Pass + 'static) -> String {
    let mut typed = model.clone();
    PassManager::new()
        .with(ShapeInference)
        .with(Canonicalize)
        .with(DeadCodeElimination)
        .run(&mut typed)
        .unwrap();
    let mut fused = typed.clone();
    let report = PassManager::new()
        .with(fusion)
        .with(DeadCodeElimination)
        .run(&mut fused)
        .unwrap();
    format!(
        "rewrites {:?}\n{}",
        report.passes[0].rewrites.0,
        common::dump_diff(&typed, &fused)
    )
}

/// Each fusing spelling: (name, model, operators for ONNX Runtime, for the standard target).
fn fusing() -> Vec<(
    &'static str,
    Model,
    &'static [&'static str],
    &'static [&'static str],
)> {
    vec![
        (
            "gelu_erf_megatron",
            gelu_erf_div(1.41421),
            &["Gelu"],
            &["Gelu"],
        ),
        ("gelu_erf_phi", gelu_phi(), &["Gelu"], &["Gelu"]),
        ("gelu_new_pow", gelu_new(true), &["FastGelu"], &["Gelu"]),
        ("gelu_new_cube", gelu_new(false), &["FastGelu"], &["Gelu"]),
        (
            "gelu_fast_hf",
            gelu_fast(false, 0.044715),
            &["FastGelu"],
            &["Gelu"],
        ),
        (
            "gelu_fast_megatron",
            gelu_fast(true, 0.044715),
            &["FastGelu"],
            &["Gelu"],
        ),
        (
            "layer_norm_tf2onnx",
            layer_norm_tf(false),
            &["LayerNormalization"],
            &["LayerNormalization"],
        ),
    ]
}

#[test]
fn every_spelling_fuses_for_both_targets_and_keeps_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let batch = inputs();
    let inputs = batch.path();
    let mut ort = common::OrtChecks::default();
    for (name, original, for_ort, for_onnx) in fusing() {
        let original_path = dir.path().join(format!("{name}.onnx"));
        io::save(&original, &original_path, ExternalData::Never).unwrap();
        for (target, expected) in [(Target::Ort, for_ort), (Target::Onnx, for_onnx)] {
            let (model, ops) = optimized(&original, target, inputs);
            assert_eq!(ops, expected, "{name} {target:?}");
            let out = dir.path().join(format!("{name}.{}.onnx", target.name()));
            io::save(&model, &out, ExternalData::Never).unwrap();
            ort.add_exact(&original_path, &out, inputs);
        }
        let diff = match name {
            n if n.starts_with("gelu") => fused_diff(
                &original,
                GeluFusion {
                    target: Target::Ort,
                },
            ),
            _ => fused_diff(
                &original,
                LayerNormFusion {
                    target: Target::Ort,
                },
            ),
        };
        insta::assert_snapshot!(name, diff);
    }
    ort.run();
}

/// The operators `optimize` leaves of `model` for ONNX Runtime.
fn kept(model: Model) -> Vec<String> {
    optimized(&model, Target::Ort, inputs().path()).1
}

#[test]
fn near_misses_do_not_fuse() {
    // √2 to four decimals is 2.5e-5 off, ten times Megatron's: not a GELU constant.
    let ops = kept(gelu_erf_div(1.4142));
    assert!(ops.contains(&"Erf".to_string()), "{ops:?}");
    // 0.0447 is not 0.044715.
    let ops = kept(gelu_fast(false, 0.0447));
    assert!(ops.contains(&"Tanh".to_string()), "{ops:?}");
    // A variance taken around one mean, another mean subtracted.
    let ops = kept(layer_norm_tf(true));
    assert!(!ops.contains(&"LayerNormalization".to_string()), "{ops:?}");
}
