//! Dynamic INT8: weights int8 per output channel, activations quantized at run time. No
//! calibration data is needed.
//!
//! Matches the nodes static quantization selects (`qdq::selection`) and produces:
//! - for a MatMul `x·W` with a 2-D float weight `W [K, N]`, or a Gemm `x·W + c` (alpha and
//!   beta 1, `x` not transposed; a `transB` weight is stored transposed): one
//!   `DynamicQuantizeLinear(x) → (x_q: uint8, x_scale, x_zero_point)` per activation, shared by
//!   all its integer readers, and per MatMul
//!   `Cast(MatMulInteger(x_q, W_q, x_zero_point, W.zero_point), float) · (x_scale · W.scale)`
//!   (`+ c` for a Gemm)
//!   with `W.scale [N]` and `W_q` the symmetric per-column weight of 7-bit codes (zero
//!   points 0), every int8 code with `ProductWeights::Int8`, or,
//!   with `ProductWeights::Uint8`, that weight plus 128 with zero points 128 — exactly the
//!   chain ONNX Runtime fuses into its `DynamicQuantizeMatMul` kernel (the fastest CPU form
//!   it has), and a chain of standard operators every runtime loads;
//! - for ONNX Runtime, its fused `Attention` first gives up its Q/K/V projection to a MatMul
//!   (`attention_projection`), which is then quantized as above;
//! - for other weights (Gemm, Conv, an Attention that keeps its packed weight) and embedding
//!   tables: the same int8 weights static quantization writes, dequantized by a
//!   DequantizeLinear (weight-only), so the file shrinks everywhere.
//!
//! Why 7-bit weights by default (`ProductWeights::Int7`): ONNX Runtime's fast uint8×int8
//! kernel saturates on x86 CPUs without VNNI when codes are large (`ProductWeights` says
//! how), and a model does not know the CPU it will meet. all-MiniLM-L6-v2, 214 held-out sentences padded to
//! their batch's longest (`scripts/heldout_cosine.py`, cosine of the mean-pooled embedding to
//! float's), and latency against float (`scripts/ort_latency.py`, one shared pool of 2
//! threads, alternated, median of 15), on an AVX2 machine (AMD EPYC, ONNX Runtime 1.32):
//!
//! | weights | mean cosine | min | 1×128 | 8×128 |
//! |---|---|---|---|---|
//! | `int8` (every code) | 0.98526 | 0.96548 | 0.674× | 0.685× |
//! | `int7` (default) | 0.99490 | 0.98721 | 0.656× | 0.669× |
//! | `uint8` | 0.99579 | 0.98846 | 0.774× | 0.813× |
//!
//! On an AVX-512-VNNI machine (an earlier measurement, before the projection of Attention
//! was quantized) int8 and uint8 weights both gave 0.9952, int8 at 0.67× of float's latency
//! at 8×128 and uint8 at 0.96×: there `int8` is the better choice, `--int8-weights int8`.
//!
//! Safe because: `DynamicQuantizeLinear` picks, per run, the uint8 scale covering the
//! activation's actual range (widened to hold 0), so nothing saturates; the integer product
//! is exact in int32 for any K below 2¹⁵ (|x_q − zp| ≤ 255, |w| ≤ 127: K · 255 · 127 < 2³¹)
//! where the kernel sums in int32, and with 7-bit codes where it sums pairs in int16 too;
//! multiplying by `x_scale · W.scale[n]` dequantizes column n exactly as the per-channel
//! weight was quantized. The result differs from float only by the two roundings.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::exec::Batch;
use crate::ir::{attr, DataType, Model, NodeId, PValue, Patch, ValueId};
use crate::ops::weights::plain_gemm_trans_b;
use crate::passes::{opset, Rewrites};
use crate::quant::qdq::{self, ProductWeights, QdqOptions};
use crate::quant::{QuantReport, QuantTarget};

/// MatMulInteger, DynamicQuantizeLinear and per-axis DequantizeLinear: opset 13 has them all.
const DYNAMIC_OPSET: i64 = 13;

#[derive(Clone, Debug)]
pub struct DynamicOptions {
    /// `target` names the report's runtime and, for ONNX Runtime, lets its fused Attention
    /// give up its projection; the other operators written are standard ones.
    /// Its `product_weights` are how the weights MatMulInteger reads are stored (see the
    /// module doc for the trade).
    pub qdq: QdqOptions,
    /// SmoothQuant's migration strength α, applied before quantizing with the channel
    /// maxima of the calibration batches; `None`: no smoothing, and no batches needed.
    pub smooth_quant: Option<f64>,
}

/// Quantizes `model` dynamically (see the module doc). `calibration` is read only to smooth
/// (`options.smooth_quant`).
pub fn quantize_dynamic(
    model: &mut Model,
    calibration: &[Batch],
    options: &DynamicOptions,
) -> Result<QuantReport> {
    let operators = qdq::quantization_ops(model);
    let (unpacked, smoothing) =
        super::prepare_float(model, calibration, &options.qdq, options.smooth_quant)?;
    let report = |rewrites, already_quantized| QuantReport {
        mode: "dynamic-int8",
        target: options.qdq.target,
        calibration: None,
        rewrites,
        already_quantized,
        auto_exclusion: None,
        smoothing,
        weight_only: None,
        product_weights: Some(options.qdq.product_weights),
    };
    if !operators.is_empty() {
        return Ok(report(Rewrites::default(), operators));
    }
    let plan = qdq::Plan::new(model, QuantTarget::Ort, &options.qdq.selection);
    // The integer products: every reader of each weight they take.
    let mut products = Vec::new();
    let mut integer_weights = HashSet::new();
    for w in &plan.weights {
        let of_weight: Option<Vec<IntegerProduct>> = w
            .readers
            .iter()
            .map(|&(reader, slot)| IntegerProduct::of(model, reader, slot, w.value))
            .collect();
        let Some(of_weight) = of_weight else { continue };
        integer_weights.insert(w.value);
        products.extend(of_weight);
    }
    // Every other weight and table, weight-only, as static quantization writes them.
    let mut weight_only = plan.clone();
    weight_only.activations.clear();
    weight_only
        .weights
        .retain(|w| !integer_weights.contains(&w.value));
    // What is left is dequantized for float products: every int8 code.
    let mut rewrites = qdq::apply_plan(
        model,
        &weight_only,
        &Default::default(),
        QuantTarget::Ort,
        ProductWeights::Int8,
    )?;
    // Grouped by the activation they read, as the weight-only rewrites left it: a table's
    // Gather (an embedding) hands its readers a new value.
    let mut integer: Vec<(ValueId, Vec<IntegerProduct>)> = Vec::new();
    for mut p in products {
        p.x = model.graph.node(p.node).input(0).ok_or_else(|| {
            Error::Quantization(format!(
                "`{}` lost its input",
                model.graph.node_label(p.node)
            ))
        })?;
        match integer.iter_mut().find(|(x, _)| *x == p.x) {
            Some((_, products)) => products.push(p),
            None => integer.push((p.x, vec![p])),
        }
    }
    if !integer.is_empty() {
        opset::raise(model, DYNAMIC_OPSET)?;
    }
    for (x, products) in &integer {
        let patch = integer_products(model, *x, products, options.qdq.product_weights)?;
        rewrites.apply(model, patch)?;
    }
    let sources = plan.weights.iter().map(|w| w.value);
    qdq::drop_unread_weights(model, sources, &mut rewrites)?;
    rewrites.merge(&unpacked);
    Ok(report(rewrites, Vec::new()))
}

/// A MatMul or Gemm that computes `x·W (+ c)` in integers.
#[derive(Clone, Copy, Debug)]
struct IntegerProduct {
    node: NodeId,
    x: ValueId,
    weight: ValueId,
    /// The weight is stored `[N, K]` (Gemm with `transB`): its int8 copy is transposed to the
    /// `[K, N]` MatMulInteger reads.
    transposed: bool,
    /// Gemm's C, added after the product.
    bias: Option<ValueId>,
}

impl IntegerProduct {
    /// The integer form of `node` reading the 2-D float weight `weight` in input `slot`: a
    /// MatMul `x·W`, or a Gemm `x·W + c` or `x·Wᵀ + c` with alpha and beta 1 and `x` not
    /// transposed. `None` for anything else (it is quantized weight-only).
    fn of(model: &Model, node: NodeId, slot: usize, weight: ValueId) -> Option<IntegerProduct> {
        let g = &model.graph;
        let n = g.node(node);
        let x = n.input(0)?;
        let two_d = g.initializer(weight).is_some_and(|t| t.dims().len() == 2);
        if slot != 1 || !two_d {
            return None;
        }
        let product = |transposed, bias| {
            Some(IntegerProduct {
                node,
                x,
                weight,
                transposed,
                bias,
            })
        };
        if n.is("MatMul") {
            return product(false, None);
        }
        product(plain_gemm_trans_b(n)?, n.input(2))
    }
}

/// One `DynamicQuantizeLinear` of `x` and the integer form of each of `products`.
fn integer_products(
    model: &Model,
    x: ValueId,
    products: &[IntegerProduct],
    codes: ProductWeights,
) -> Result<Patch> {
    let g = &model.graph;
    let name = g.value_name(x);
    let mut patch = Patch::new("dynamic-matmul");
    patch.anchor_at(g.producer(x).unwrap_or(products[0].node));
    let (x_q, x_scale, x_zero_point) = (
        patch.new_value(&format!("{name}.quantized")),
        patch.new_value(&format!("{name}.scale")),
        patch.new_value(&format!("{name}.zero_point")),
    );
    patch.add_node(
        "DynamicQuantizeLinear",
        "",
        &[Some(x.into())],
        &[x_q, x_scale, x_zero_point],
        vec![],
    );
    let mut int8_weights: HashMap<(ValueId, bool), (PValue, PValue, PValue)> = HashMap::new();
    for p in products {
        let key = (p.weight, p.transposed);
        let (w_q, w_scale, w_zero_point) = match int8_weights.get(&key) {
            Some(&weight) => weight,
            None => {
                let weight = k_by_n_weight(model, p, codes, &mut patch)?;
                int8_weights.insert(key, weight);
                weight
            }
        };
        let Some(out) = g.node(p.node).output(0) else {
            continue;
        };
        let out_name = g.value_name(out).to_string();
        let product = patch.new_value(&format!("{out_name}.int32"));
        patch.add_node(
            "MatMulInteger",
            "",
            &[Some(x_q), Some(w_q), Some(x_zero_point), Some(w_zero_point)],
            &[product],
            vec![],
        );
        let float = patch.new_value(&format!("{out_name}.float"));
        patch.add_node(
            "Cast",
            "",
            &[Some(product)],
            &[float],
            vec![attr::int("to", DataType::Float as i64)],
        );
        let scale = patch.new_value(&format!("{out_name}.scale"));
        patch.add_node("Mul", "", &[Some(x_scale), Some(w_scale)], &[scale], vec![]);
        patch.remove_node(p.node);
        match p.bias {
            None => {
                patch.add_node(
                    "Mul",
                    "",
                    &[Some(float), Some(scale)],
                    &[PValue::Old(out)],
                    vec![],
                );
            }
            Some(c) => {
                let scaled = patch.new_value(&format!("{out_name}.product"));
                patch.add_node("Mul", "", &[Some(float), Some(scale)], &[scaled], vec![]);
                patch.add_node(
                    "Add",
                    "",
                    &[Some(scaled), Some(c.into())],
                    &[PValue::Old(out)],
                    vec![],
                );
            }
        }
    }
    Ok(patch)
}

/// The weight of `p` laid out `[K, N]` as `codes` initializers with one scale per column:
/// symmetric int8 with zero points 0, or those codes plus 128 with zero points 128.
fn k_by_n_weight(
    model: &Model,
    p: &IntegerProduct,
    codes: ProductWeights,
    patch: &mut Patch,
) -> Result<(PValue, PValue, PValue)> {
    let (mut data, mut dims) = qdq::float_weight(model, p.weight)?;
    let mut name = model.graph.value_name(p.weight).to_string();
    if p.transposed {
        let (n, k) = (dims[0], dims[1]);
        let mut transposed = vec![0.0f32; data.len()];
        for (i, row) in data.chunks_exact(k).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                transposed[j * n + i] = v;
            }
        }
        (data, dims) = (transposed, vec![k, n]);
        name.push_str(".transposed");
    }
    qdq::stored_weight(&name, &data, &dims, 1, codes, patch)
}
