//! Where the Q→DQ pairs and the int8 weights go, worked out once and shared by
//! `activations_to_calibrate` (which values to observe) and `insert_qdq` (what to rewrite).
//!
//! An activation gets one pair, read by every selected reader; other readers keep the float
//! value. A weight gets one int8 copy per quantization axis its selected readers need. For
//! `--target trt`, the residual input of an Add that follows a quantized weighted layer is
//! quantized too (see `residual_slot`).

use std::collections::HashMap;

use super::selection::{data_inputs, select, Role, Selection};
use crate::ir::{attr, DataType, Graph, Model, NodeId, ValueId};
use crate::passes::shape;
use crate::quant::QuantTarget;

/// A float activation read through one Q→DQ pair by `readers` (node, input slot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivationQdq {
    pub value: ValueId,
    pub readers: Vec<(NodeId, usize)>,
}

/// A float weight stored int8 with one scale per index along `axis`, dequantized for
/// `readers` (node, input slot); `in_products` when a reader multiplies it by a quantized
/// activation (a MatMul, Gemm or Conv the runtime runs in integers), not only in float.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightQdq {
    pub value: ValueId,
    pub axis: usize,
    pub readers: Vec<(NodeId, usize)>,
    pub in_products: bool,
}

/// An embedding table stored int8 per row, read by the Gather nodes `gathers`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddingQdq {
    pub table: ValueId,
    pub gathers: Vec<NodeId>,
}

/// Everything quantization will change, in the written order of the nodes.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub activations: Vec<ActivationQdq>,
    pub weights: Vec<WeightQdq>,
    pub embeddings: Vec<EmbeddingQdq>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.activations.is_empty() && self.weights.is_empty() && self.embeddings.is_empty()
    }

    pub fn new(model: &Model, target: QuantTarget, selection: &Selection) -> Plan {
        let g = &model.graph;
        let types = shape::infer(model).types;
        let roles = select(g, &types, selection);
        let mut plan = Plan::default();
        // A graph with a cycle cannot be written; there is nothing to place in it.
        let order = g.topological_order().unwrap_or_default();
        let position: HashMap<NodeId, usize> =
            order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let is_float = |v: ValueId| {
            types
                .get(&v)
                .is_some_and(|t| t.elem == DataType::Float as i32)
        };
        for &id in &order {
            let node = g.node(id);
            match roles.get(&id) {
                Some(Role::Weighted) => {
                    // Inputs A and B (X and W): a bias (slot 2) stays float.
                    let quantized = |v: ValueId| !is_constant(g, v) && is_float(v);
                    let integer = node.input(0).is_some_and(quantized);
                    for slot in 0..2 {
                        let Some(v) = node.input(slot) else { continue };
                        if let Some(axis) = (slot == 1).then(|| weight_axis(g, id)).flatten() {
                            plan.add_weight(v, axis, (id, slot), integer);
                        } else if quantized(v) {
                            plan.add_activation(v, (id, slot));
                        }
                    }
                }
                Some(Role::PackedAttention) => {
                    let packed = node.input(1).filter(|&w| {
                        !g.is_graph_input(w)
                            && g.initializer(w).is_some_and(|t| {
                                t.dtype() == DataType::Float && t.dims().len() == 2
                            })
                    });
                    if let Some(w) = packed {
                        plan.add_weight(w, 1, (id, 1), false);
                    }
                }
                Some(Role::Embedding) => {
                    if let Some(table) = node.input(0) {
                        plan.add_embedding(table, id);
                    }
                }
                Some(Role::Activations) => {
                    for (slot, v) in node.inputs.iter().enumerate().take(data_inputs(node)) {
                        if let Some(v) = v.filter(|&v| !is_constant(g, v) && is_float(v)) {
                            plan.add_activation(v, (id, slot));
                        }
                    }
                }
                None => {}
            }
            if target == QuantTarget::Trt && !selection.excludes(node) {
                if let Some(slot) = residual_slot(g, &roles, &position, &is_float, id) {
                    if let Some(v) = node.input(slot) {
                        plan.add_activation(v, (id, slot));
                    }
                }
            }
        }
        plan
    }

    fn add_activation(&mut self, value: ValueId, reader: (NodeId, usize)) {
        match self.activations.iter_mut().find(|a| a.value == value) {
            Some(a) if a.readers.contains(&reader) => {}
            Some(a) => a.readers.push(reader),
            None => self.activations.push(ActivationQdq {
                value,
                readers: vec![reader],
            }),
        }
    }

    fn add_weight(
        &mut self,
        value: ValueId,
        axis: usize,
        reader: (NodeId, usize),
        in_product: bool,
    ) {
        match self
            .weights
            .iter_mut()
            .find(|w| w.value == value && w.axis == axis)
        {
            Some(w) => {
                w.readers.push(reader);
                w.in_products |= in_product;
            }
            None => self.weights.push(WeightQdq {
                value,
                axis,
                readers: vec![reader],
                in_products: in_product,
            }),
        }
    }

    fn add_embedding(&mut self, table: ValueId, gather: NodeId) {
        match self.embeddings.iter_mut().find(|e| e.table == table) {
            Some(e) => e.gathers.push(gather),
            None => self.embeddings.push(EmbeddingQdq {
                table,
                gathers: vec![gather],
            }),
        }
    }
}

/// True for an initializer (not overridable as a graph input) or a `Constant` node's output.
pub fn is_constant(g: &Graph, v: ValueId) -> bool {
    (g.initializer(v).is_some() && !g.is_graph_input(v))
        || g.producer(v).is_some_and(|p| g.node(p).is("Constant"))
}

/// The output-channel axis of the weight (input 1) of a MatMul, Gemm or Conv, when that
/// weight is a float initializer: the axis whose index is the output feature. `None` when
/// input 1 is not such a weight.
pub fn weight_axis(g: &Graph, id: NodeId) -> Option<usize> {
    let node = g.node(id);
    let w = node.input(1).filter(|&w| !g.is_graph_input(w))?;
    let t = g.initializer(w).filter(|t| t.dtype() == DataType::Float)?;
    let rank = t.dims().len();
    channel_axis(node, rank)
}

/// The axis of a rank-`rank` weight that indexes the output channels of `node` (MatMul B
/// `[…, K, N]`: the last; Gemm B: 0 with transB, else 1; Conv W `[M, C, k…]`: 0).
pub fn channel_axis(node: &crate::ir::Node, rank: usize) -> Option<usize> {
    match node.op_type() {
        "MatMul" if rank >= 2 => Some(rank - 1),
        "Gemm" if rank == 2 => Some(if attr::get_int(&node.proto, "transB") == Some(1) {
            0
        } else {
            1
        }),
        "Conv" if rank >= 3 => Some(0),
        _ => None,
    }
}

/// For `--target trt`: the input slot of the Add `id` to quantize as the residual of a
/// skip connection, if it has one.
///
/// TensorRT's guide ("Q/DQ Layer-Placement Recommendations", Developer Guide, Working with
/// Quantized Types) says: quantize the residual input in skip-connections. TensorRT fuses an
/// element-wise addition that follows a weighted layer (Convolution, GEMM) into that layer,
/// and the precision of the Add's other input — the residual — decides the precision of the
/// fused output: a float residual keeps the fused layer's output float, so a following Q
/// cannot fuse with it; an INT8 residual (behind its own Q/DQ) lets the layer write INT8.
///
/// So: an Add of two float activations where one input is the output of a quantized weighted
/// layer — directly, or through its bias Add with a constant, which TensorRT folds into the
/// layer as exporters write `x·W + b` as MatMul then Add — gets its other input quantized.
/// When both inputs come from quantized weighted layers (a projection shortcut), TensorRT
/// fuses the Add into the layer computed last, and the input from the earlier one is the
/// residual.
fn residual_slot(
    g: &Graph,
    roles: &HashMap<NodeId, Role>,
    position: &HashMap<NodeId, usize>,
    is_float: &dyn Fn(ValueId) -> bool,
    id: NodeId,
) -> Option<usize> {
    let node = g.node(id);
    if !node.is("Add") {
        return None;
    }
    let (a, b) = (node.input(0)?, node.input(1)?);
    if [a, b].iter().any(|&v| is_constant(g, v) || !is_float(v)) {
        return None;
    }
    let position = |layer: NodeId| position.get(&layer).copied();
    let layer_a = quantized_layer_before(g, roles, a).and_then(position);
    let layer_b = quantized_layer_before(g, roles, b).and_then(position);
    match (layer_a, layer_b) {
        (Some(_), None) => Some(1),
        (None, Some(_)) => Some(0),
        (Some(pa), Some(pb)) => Some(if pa < pb { 0 } else { 1 }),
        (None, None) => None,
    }
}

/// The quantized weighted layer that `v` is the output of, directly or through a bias Add.
fn quantized_layer_before(g: &Graph, roles: &HashMap<NodeId, Role>, v: ValueId) -> Option<NodeId> {
    let producer = g.producer(v)?;
    if roles.get(&producer) == Some(&Role::Weighted) {
        return Some(producer);
    }
    let node = g.node(producer);
    if !node.is("Add") {
        return None;
    }
    let (x, y) = (node.input(0)?, node.input(1)?);
    let layer_input = match (is_constant(g, x), is_constant(g, y)) {
        (false, true) => x,
        (true, false) => y,
        _ => return None,
    };
    g.producer(layer_input)
        .filter(|p| roles.get(p) == Some(&Role::Weighted))
}
