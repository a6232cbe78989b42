//! Static INT8 quantization in QDQ form: QuantizeLinear → DequantizeLinear pairs around the
//! inputs of the ops worth running in integers, with int8 weights.
//!
//! Matches (see `selection`): MatMul, Gemm and Conv off the attention score path, Gather
//! from an embedding table, and ONNX Runtime's fused Attention (its packed Q/K/V weight,
//! weight-only); `include`/`exclude` widen and narrow the set.
//! Produces:
//! - per float activation read by a selected node, one shared `Q → DQ` pair (per-tensor;
//!   uint8 asymmetric for ONNX Runtime, int8 symmetric with zero point 0 for TensorRT), read
//!   by the selected readers only — the others keep the float value;
//! - per weight (a float initializer), an initializer of its codes, a float scale per output
//!   channel `<w>.scale` and zero points `<w>.zero_point`: for the weights of integer
//!   products as `QdqOptions::product_weights` says (`<w>.int7` by default for ONNX Runtime,
//!   7-bit codes its AVX2 kernel cannot saturate on; `<w>.int8`, every code, for TensorRT;
//!   `<w>.uint8` with zero points 128), every int8 code otherwise, dequantized by
//!   a per-axis DequantizeLinear (opset 13: a model below it is refused); biases stay float
//!   (no int32 bias, which TensorRT refuses and ONNX Runtime does not need);
//! - per embedding table, `<table>.int8` and per-row scales `<table>.scale` `[V, 1]`: the
//!   Gather reads the int8 rows and the rows' scales with the same indices, then
//!   `Cast(float) · scale` dequantizes only the rows gathered, never the whole table;
//! - for `--target trt`, also the residual input of skip Adds (see `placement`).
//!
//! A model that already holds quantization operators (quantization-aware training) is left as
//! it is and `QdqOutcome::AlreadyQuantized` says so: quantizing it again would stack a second
//! rounding on the trained one.
//! Safe because: DQ(Q(x)) is within half a step of x inside the calibrated range (values
//! outside it saturate, which is what calibration sizes the range against), each weight is
//! within half a step of its channel's scale, and every other value and reader is left
//! untouched; scales and zero points are computed as ONNX Runtime computes them (`params`).
//! The rewritten model computes the same function up to those roundings: `tests/qdq.rs`
//! holds every corpus model to a cosine bound against its float original in tract and ONNX
//! Runtime (0.99 for the tiny models quantized for ONNX Runtime; the bounds for TensorRT and
//! for MiniLM's real weights, and why they are lower, are written there).

mod params;
mod placement;
mod selection;
#[cfg(test)]
mod tests;
mod trt;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::ir::{attr, DataType, Model, NodeId, PValue, Patch, Tensor, ValueId};
pub(crate) use crate::ops::quantization::{is_integer_op, is_q_or_dq, quantizes};
use crate::passes::{opset, Rewrites};
use crate::quant::{QuantTarget, Ranges};
pub use params::{
    activation_params, quantize_per_channel, quantize_per_channel_within, scale_zero_point,
    IntRange, PerChannel, ProductWeights, QParams, INT7_SYMMETRIC, INT8_SYMMETRIC,
};
pub(crate) use placement::Plan;
use placement::{ActivationQdq, EmbeddingQdq, WeightQdq};
pub use selection::{Selection, Selector};
pub use trt::trt_violations;

/// Per-axis DequantizeLinear (per-channel weights) first appears in opset 13.
const QDQ_OPSET: i64 = 13;

#[derive(Clone, Debug)]
pub struct QdqOptions {
    pub target: QuantTarget,
    pub selection: Selection,
    /// How the weights of the integer products are stored (`ProductWeights::default_for`
    /// the target unless the user chose).
    pub product_weights: ProductWeights,
}

impl QdqOptions {
    /// Every selected node, weights stored as `target`'s kernels want them.
    pub fn for_target(target: QuantTarget) -> QdqOptions {
        QdqOptions {
            target,
            selection: Selection::default(),
            product_weights: ProductWeights::default_for(target),
        }
    }
}

/// What `insert_qdq` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QdqOutcome {
    /// The model was quantized; the rewrites by kind (`qdq-activation`, `qdq-weight`,
    /// `qdq-embedding`, `drop-float-weight`).
    Quantized(Rewrites),
    /// The model already holds these quantization operators (one entry per op type) and was
    /// left unchanged, so that nothing is quantized twice.
    AlreadyQuantized { operators: Vec<String> },
}

/// The quantization operators `model` already holds, one entry per op type.
pub(crate) fn quantization_ops(model: &Model) -> Vec<String> {
    let mut found: Vec<String> = model
        .graph
        .nodes()
        .filter(|(_, n)| quantizes(n))
        .map(|(_, n)| n.op_type().to_string())
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The float activations `insert_qdq` will put behind a Q→DQ pair with `options`: the
/// values calibration must observe (none for a model that is already quantized).
pub fn activations_to_calibrate(model: &Model, options: &QdqOptions) -> Vec<String> {
    if !quantization_ops(model).is_empty() {
        return Vec::new();
    }
    Plan::new(model, options.target, &options.selection)
        .activations
        .iter()
        .map(|a| model.graph.value_name(a.value).to_string())
        .collect()
}

/// The names of the nodes whose weights `insert_qdq` will quantize with `options` (MatMul,
/// Gemm, Conv, embedding Gathers, fused Attention), in graph order; unnamed nodes, which no
/// selector can name, are left out.
pub fn quantized_layers(model: &Model, options: &QdqOptions) -> Vec<String> {
    let g = &model.graph;
    let plan = Plan::new(model, options.target, &options.selection);
    let readers = plan
        .weights
        .iter()
        .flat_map(|w| w.readers.iter().map(|r| r.0));
    let gathers = plan
        .embeddings
        .iter()
        .flat_map(|e| e.gathers.iter().copied());
    let mut nodes: Vec<NodeId> = readers.chain(gathers).collect();
    let order = g.topological_order().unwrap_or_default();
    nodes.sort_by_key(|n| order.iter().position(|o| o == n));
    nodes.dedup();
    nodes
        .into_iter()
        .map(|n| g.node(n).name().to_string())
        .filter(|name| !name.is_empty())
        .collect()
}

/// Quantizes `model` in QDQ form with the calibrated `ranges` (one per name
/// `activations_to_calibrate` returned). Everything is computed before the first change, so
/// on an error (a missing or unusable range, a non-finite weight, an opset that cannot be
/// raised to 13) the model is left as it was.
pub fn insert_qdq(model: &mut Model, ranges: &Ranges, options: &QdqOptions) -> Result<QdqOutcome> {
    let operators = quantization_ops(model);
    if !operators.is_empty() {
        return Ok(QdqOutcome::AlreadyQuantized { operators });
    }
    let plan = Plan::new(model, options.target, &options.selection);
    let mut rewrites = apply_plan(
        model,
        &plan,
        ranges,
        options.target,
        options.product_weights,
    )?;
    drop_unread_weights(model, plan.weights.iter().map(|w| w.value), &mut rewrites)?;
    Ok(QdqOutcome::Quantized(rewrites))
}

/// Rewrites `model` as `plan` says: Q→DQ pairs with `ranges`, int8 weights and tables. The
/// float embedding tables are dropped; the float weights are left to `drop_unread_weights`
/// (another quantization may still be reading them).
pub(crate) fn apply_plan(
    model: &mut Model,
    plan: &Plan,
    ranges: &Ranges,
    target: QuantTarget,
    product_weights: ProductWeights,
) -> Result<Rewrites> {
    let mut rewrites = Rewrites::default();
    if plan.is_empty() {
        return Ok(rewrites);
    }
    if target == QuantTarget::Trt && product_weights == ProductWeights::Uint8 {
        return Err(Error::Quantization(
            "TensorRT takes int8 weights only, not uint8".into(),
        ));
    }
    let activations = plan
        .activations
        .iter()
        .map(|a| activation_patch(model, a, ranges, target))
        .collect::<Result<Vec<_>>>()?;
    let weights = plan
        .weights
        .iter()
        .map(|w| weight_patch(model, w, product_weights))
        .collect::<Result<Vec<_>>>()?;
    let embeddings = plan
        .embeddings
        .iter()
        .map(|e| embedding_patch(model, e))
        .collect::<Result<Vec<_>>>()?;
    opset::raise(model, QDQ_OPSET)?;
    // Patches name nodes and values, not positions, so each stays valid after the others.
    for patch in activations.into_iter().chain(weights).chain(embeddings) {
        rewrites.apply(model, patch)?;
    }
    drop_unread_weights(
        model,
        plan.embeddings.iter().map(|e| e.table),
        &mut rewrites,
    )?;
    Ok(rewrites)
}

/// Drops the float initializers among `sources` that nothing reads any more. Quantizing read
/// every float weight, so the model's file pages are handed back too: a large model's float
/// weights would otherwise stay resident beside their int8 copies.
pub(crate) fn drop_unread_weights(
    model: &mut Model,
    sources: impl Iterator<Item = ValueId>,
    rewrites: &mut Rewrites,
) -> Result<()> {
    for v in sources.collect::<Vec<_>>() {
        let g = &model.graph;
        let unread = g.uses(v).is_empty() && !g.is_graph_output(v);
        if unread && g.initializer(v).is_some() {
            let mut patch = Patch::new("drop-float-weight");
            patch.drop_initializer(v);
            rewrites.apply(model, patch)?;
        }
    }
    if let Some(source) = &model.source {
        source.release_resident_pages();
    }
    Ok(())
}

fn int8_tensor(dims: &[i64], values: &[i8]) -> Result<Tensor> {
    let raw: Vec<u8> = values.iter().map(|&v| v as u8).collect();
    Tensor::from_raw("", DataType::Int8, dims, Bytes::from(raw))
}

/// One Q→DQ pair on an activation, read by its selected readers.
fn activation_patch(
    model: &Model,
    a: &ActivationQdq,
    ranges: &Ranges,
    target: QuantTarget,
) -> Result<Patch> {
    let g = &model.graph;
    let name = g.value_name(a.value);
    let range = ranges.get(name).ok_or_else(|| {
        Error::Quantization(format!("no calibrated range for activation `{name}`"))
    })?;
    let p = activation_params(name, range, target)?;
    let zero_point = match target {
        QuantTarget::Ort => Tensor::from_raw(
            "",
            DataType::Uint8,
            &[],
            Bytes::from(vec![p.zero_point as u8]),
        )?,
        QuantTarget::Trt => int8_tensor(&[], &[p.zero_point as i8])?,
    };
    let mut patch = Patch::new("qdq-activation");
    // Right after the producer, or before the first reader of a graph input.
    patch.anchor_at(g.producer(a.value).unwrap_or(a.readers[0].0));
    let scale = patch.new_initializer(
        &format!("{name}.scale"),
        Tensor::from_f32("", &[], &[p.scale])?,
    );
    let zero_point = patch.new_initializer(&format!("{name}.zero_point"), zero_point);
    let q = patch.new_value(&format!("{name}.q"));
    let dq = patch.new_value(&format!("{name}.dq"));
    let x = a.value.into();
    patch.add_node(
        "QuantizeLinear",
        "",
        &[Some(x), Some(scale), Some(zero_point)],
        &[q],
        vec![],
    );
    patch.add_node(
        "DequantizeLinear",
        "",
        &[Some(q), Some(scale), Some(zero_point)],
        &[dq],
        vec![],
    );
    for &(reader, slot) in &a.readers {
        patch.replace_input(reader, slot, dq);
    }
    Ok(patch)
}

/// The float values and dims of a weight initializer.
pub(crate) fn float_weight(model: &Model, v: ValueId) -> Result<(Vec<f32>, Vec<usize>)> {
    let g = &model.graph;
    let t = g.initializer(v).ok_or_else(|| {
        Error::Quantization(format!("`{}` is not an initializer", g.value_name(v)))
    })?;
    let dims = t.dims().iter().map(|&d| d as usize).collect();
    Ok((t.to_f32_vec()?, dims))
}

/// New initializers holding the float weight `data` (shape `dims`, named `name`) stored as
/// `codes` with one symmetric scale per index along `axis`: `<name>.<int8|int7|uint8>`,
/// `<name>.scale` and `<name>.zero_point` (0, or 128 for uint8).
pub(crate) fn stored_weight(
    name: &str,
    data: &[f32],
    dims: &[usize],
    axis: usize,
    codes: ProductWeights,
    patch: &mut Patch,
) -> Result<(PValue, PValue, PValue)> {
    let q = quantize_per_channel_within(name, data, dims, axis, codes.codes())?;
    let (dtype, offset, suffix) = codes.storage();
    // Two's complement: an int8 code's byte plus 128 (wrapping) is the uint8 code.
    let stored: Bytes = q
        .values
        .iter()
        .map(|&v| (v as u8).wrapping_add(offset))
        .collect();
    let shape: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
    let channels = [q.scales.len() as i64];
    let weight = patch.new_initializer(
        &format!("{name}.{suffix}"),
        Tensor::from_raw("", dtype, &shape, stored)?,
    );
    let scale = patch.new_initializer(
        &format!("{name}.scale"),
        Tensor::from_f32("", &channels, &q.scales)?,
    );
    let zero_point = patch.new_initializer(
        &format!("{name}.zero_point"),
        Tensor::from_raw(
            "",
            dtype,
            &channels,
            Bytes::from(vec![offset; q.scales.len()]),
        )?,
    );
    Ok((weight, scale, zero_point))
}

/// A weight stored int8 per output channel and dequantized for its selected readers.
fn weight_patch(model: &Model, w: &WeightQdq, product_weights: ProductWeights) -> Result<Patch> {
    let name = model.graph.value_name(w.value);
    let mut patch = Patch::new("qdq-weight");
    patch.anchor_at(w.readers[0].0);
    let (data, dims) = float_weight(model, w.value)?;
    // A weight dequantized for a float product (an Attention's packed projection) loses
    // nothing to a kernel: it keeps every code.
    let codes = if w.in_products {
        product_weights
    } else {
        ProductWeights::Int8
    };
    let (int8, scale, zero_point) = stored_weight(name, &data, &dims, w.axis, codes, &mut patch)?;
    let dq = patch.new_value(&format!("{name}.dq"));
    patch.add_node(
        "DequantizeLinear",
        "",
        &[Some(int8), Some(scale), Some(zero_point)],
        &[dq],
        vec![attr::int("axis", w.axis as i64)],
    );
    for &(reader, slot) in &w.readers {
        patch.replace_input(reader, slot, dq);
    }
    Ok(patch)
}

/// An embedding table stored int8 per row; each Gather becomes
/// `Cast(Gather(table.int8, i)) · Gather(table.scale, i)`.
fn embedding_patch(model: &Model, e: &EmbeddingQdq) -> Result<Patch> {
    let g = &model.graph;
    let name = g.value_name(e.table);
    let (data, dims) = float_weight(model, e.table)?;
    let q = quantize_per_channel(name, &data, &dims, 0)?;
    let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
    let mut patch = Patch::new("qdq-embedding");
    let int8 = patch.new_initializer(&format!("{name}.int8"), int8_tensor(&dims, &q.values)?);
    // [V, 1]: the gathered scales broadcast over the hidden dim of the gathered rows.
    let row_scales = patch.new_initializer(
        &format!("{name}.scale"),
        Tensor::from_f32("", &[q.scales.len() as i64, 1], &q.scales)?,
    );
    for &gather in &e.gathers {
        rebuild_gather(g, gather, int8, row_scales, &mut patch);
    }
    Ok(patch)
}

fn rebuild_gather(
    g: &crate::ir::Graph,
    gather: NodeId,
    int8: PValue,
    row_scales: PValue,
    patch: &mut Patch,
) {
    let node = g.node(gather);
    let (Some(indices), Some(out)) = (node.input(1), node.output(0)) else {
        return;
    };
    let out_name = g.value_name(out);
    let rows = patch.new_value(&format!("{out_name}.int8"));
    let scales = patch.new_value(&format!("{out_name}.scale"));
    let float = patch.new_value(&format!("{out_name}.float"));
    let dequantized = patch.new_value(out_name);
    // The Gather keeps its name, attributes and metadata; only its table changes.
    patch
        .remove_node(gather)
        .add_node_proto(
            node.proto.clone(),
            &[Some(int8), Some(indices.into())],
            &[rows],
        )
        .add_node(
            "Gather",
            "",
            &[Some(row_scales), Some(indices.into())],
            &[scales],
            vec![],
        )
        .add_node(
            "Cast",
            "",
            &[Some(rows)],
            &[float],
            vec![attr::int("to", DataType::Float as i64)],
        )
        .add_node(
            "Mul",
            "",
            &[Some(float), Some(scales)],
            &[dequantized],
            vec![],
        )
        .replace_uses(out, dequantized);
}
