//! Dynamic INT8: weights int8 per output channel, activations quantized at run time. No
//! calibration data is needed.
//!
//! Matches the nodes static quantization selects (`qdq::selection`) and produces:
//! - for a MatMul `x·W` with a 2-D float weight `W [K, N]`, or a Gemm `x·W + c` (alpha and
//!   beta 1, `x` not transposed; a `transB` weight is stored transposed): one
//!   `DynamicQuantizeLinear(x) → (x_q: uint8, x_scale, x_zero_point)` per activation, shared by
//!   all its integer readers, and per MatMul
//!   `Cast(MatMulInteger(x_q, W.uint8, x_zero_point, W.zero_point), float) · (x_scale · W.scale)`
//!   (`+ c` for a Gemm)
//!   with `W.scale [N]`; `W.uint8` holds the symmetric int8 weight plus 128, with zero points
//!   `W.zero_point [N]` all 128 — exactly the chain ONNX
//!   Runtime fuses into its `DynamicQuantizeMatMul` kernel (the fastest CPU form it has), and
//!   a chain of standard operators every runtime loads;
//! - for other weights (Gemm, Conv, the packed weight of a fused Attention) and embedding
//!   tables: the same int8 weights static quantization writes, dequantized by a
//!   DequantizeLinear (weight-only), so the file shrinks everywhere.
//!
//! Why uint8 weights: ONNX Runtime's uint8×int8 kernel on x86 CPUs without VNNI (AVX2,
//! AVX-512BW) sums pairs of products in int16 (`vpmaddubsw`), which saturates when codes are
//! large (255 · 127 · 2 > 32 767); its uint8×uint8 kernel does not. Measured on
//! all-MiniLM-L6-v2 on an AVX2 machine, sentence-embedding cosine to float on held-back
//! sentences: int8 weights 0.9941, 7-bit int8 weights (ONNX Runtime's `reduce_range`)
//! 0.9936, uint8 weights 0.9952, at about 15% more latency than int8 at 8×128 tokens.
//!
//! Safe because: `DynamicQuantizeLinear` picks, per run, the uint8 scale covering the
//! activation's actual range (widened to hold 0), so nothing saturates; the integer product
//! is exact in int32 for any K below 2¹⁵ (|x_q − zp| ≤ 255, |w| ≤ 127: K · 255 · 127 < 2³¹);
//! multiplying by `x_scale · W.scale[n]` dequantizes column n exactly as the per-channel
//! weight was quantized. The result differs from float only by the two roundings.

use std::collections::{HashMap, HashSet};

use crate::error::Result;
use bytes::Bytes;

use crate::ir::{attr, DataType, Model, NodeId, PValue, Patch, Tensor, ValueId};
use crate::passes::{matching, opset, Rewrites};
use crate::quant::qdq::{self, QdqOptions};
use crate::quant::{QuantReport, QuantTarget};

/// MatMulInteger, DynamicQuantizeLinear and per-axis DequantizeLinear: opset 13 has them all.
const DYNAMIC_OPSET: i64 = 13;

/// Quantizes `model` dynamically (see the module doc). `options.target` only names the report's
/// runtime: the operators written are standard ones.
pub fn quantize_dynamic(model: &mut Model, options: &QdqOptions) -> Result<QuantReport> {
    let report = |rewrites, already_quantized| QuantReport {
        mode: "dynamic-int8",
        target: options.target,
        calibration: None,
        rewrites,
        already_quantized,
        auto_exclusion: None,
        smoothing: None,
    };
    let operators = qdq::quantization_ops(model);
    if !operators.is_empty() {
        return Ok(report(Rewrites::default(), operators));
    }
    let plan = qdq::Plan::new(model, QuantTarget::Ort, &options.selection);
    // Integer products, grouped by the activation they read.
    let mut integer: Vec<(ValueId, Vec<IntegerProduct>)> = Vec::new();
    let mut integer_weights = HashSet::new();
    for w in &plan.weights {
        let products: Option<Vec<IntegerProduct>> = w
            .readers
            .iter()
            .map(|&(reader, slot)| IntegerProduct::of(model, reader, slot, w.value))
            .collect();
        let Some(products) = products else { continue };
        integer_weights.insert(w.value);
        for p in products {
            match integer.iter_mut().find(|(x, _)| *x == p.x) {
                Some((_, products)) => products.push(p),
                None => integer.push((p.x, vec![p])),
            }
        }
    }
    let activation_patches = integer
        .iter()
        .map(|(x, products)| integer_products(model, *x, products))
        .collect::<Result<Vec<_>>>()?;
    // Every other weight and table, weight-only, as static quantization writes them.
    let mut weight_only = plan.clone();
    weight_only.activations.clear();
    weight_only
        .weights
        .retain(|w| !integer_weights.contains(&w.value));
    let mut rewrites = qdq::apply_plan(model, &weight_only, &Default::default(), QuantTarget::Ort)?;
    if !activation_patches.is_empty() {
        opset::raise(model, DYNAMIC_OPSET)?;
    }
    for patch in activation_patches {
        rewrites.apply(model, patch)?;
    }
    let sources = plan.weights.iter().map(|w| w.value);
    qdq::drop_unread_weights(model, sources, &mut rewrites)?;
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
        product(matching::plain_gemm_trans_b(n)?, n.input(2))
    }
}

/// One `DynamicQuantizeLinear` of `x` and the integer form of each of `products`.
fn integer_products(model: &Model, x: ValueId, products: &[IntegerProduct]) -> Result<Patch> {
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
        let (w_uint8, w_scale, w_zero_point) = match int8_weights.get(&key) {
            Some(&weight) => weight,
            None => {
                let weight = uint8_k_by_n(model, p, &mut patch)?;
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
            &[
                Some(x_q),
                Some(w_uint8),
                Some(x_zero_point),
                Some(w_zero_point),
            ],
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

/// The weight of `p` laid out `[K, N]` as uint8 initializers, one scale per column: the
/// symmetric int8 value plus 128, with zero points 128 (see the module doc for why not int8).
fn uint8_k_by_n(
    model: &Model,
    p: &IntegerProduct,
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
    let q = qdq::quantize_per_channel(&name, &data, &dims, 1)?;
    let offset =
        |values: &[i8]| -> Bytes { values.iter().map(|&v| (v as i16 + 128) as u8).collect() };
    let uint8 = |dims: &[i64], data: Bytes| Tensor::from_raw("", DataType::Uint8, dims, data);
    let shape: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
    let channels = [q.scales.len() as i64];
    let weight = patch.new_initializer(&format!("{name}.uint8"), uint8(&shape, offset(&q.values))?);
    let scale = patch.new_initializer(
        &format!("{name}.scale"),
        Tensor::from_f32("", &channels, &q.scales)?,
    );
    let zero_point = patch.new_initializer(
        &format!("{name}.zero_point"),
        uint8(&channels, Bytes::from(vec![128u8; q.scales.len()]))?,
    );
    Ok((weight, scale, zero_point))
}
