//! FP16: weights and compute in float16, with the numerically fragile operators kept in
//! float32 behind Casts.
//!
//! Matches every float32 value of the graph and decides its precision: a value computed by a
//! node that `keeps_float32` (normalizations, whose mean and variance lose digits in float16;
//! Softmax and Exp, which overflow at 11.1; reductions, Pow and squares `Mul(x, x)`, whose
//! sums and squares pass float16's 65 504; the standard Attention, and the attention masks
//! with what adds them to the scores, `mask_nodes`;
//! subgraph and quantization operators) stays float32, and so do the graph inputs and outputs
//! with `keep_io_types`, and every value a subgraph reads by name (the branches of an `If`
//! are not converted: they compute in float32 as before); every other float value becomes
//! float16.
//! Produces:
//! - float16 copies of float32 initializers and `Constant`/`ConstantOfShape` values read in
//!   float16 (values beyond ±65 504 clamped there rather than made infinite);
//! - `Cast(to=FLOAT16)` for `Cast(to=FLOAT)` nodes computing in float16;
//! - one `Cast` per value and precision where a reader expects the other precision (a kept
//!   node reading a float16 value, a float16 node reading a float32 one);
//! - graph inputs and outputs declared float16, or, with `keep_io_types`, Casts at the edges.
//!
//! Safe because every operator either computes in float32 as before or in float16 on float16
//! inputs of the same shapes (ONNX's `T` type constraints allow both); each Cast changes the
//! precision, never the value range (clamped constants aside). The outputs differ from float32
//! by float16 rounding: the report's validation states how much.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::ir::{attr, DataType, Graph, Model, NodeId, PValue, Patch, Tensor, Use, ValueId};
use crate::ops::{self, MS_DOMAIN};
use crate::passes::shape::{self, ShapeInference};
use crate::passes::{Pass, Rewrites};
use crate::quant::{QuantReport, QuantTarget};

/// Operators computed in float32 whatever their neighbours.
const KEEP_FLOAT32: &[&str] = &[
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RMSNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "BatchNormalization",
    "Softmax",
    "LogSoftmax",
    "Exp",
    "Log",
    "Pow",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceProd",
    "CumSum",
    "Range",
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "EyeLike",
    "If",
    "Loop",
    "Scan",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
];

/// Inputs that ONNX types float32 whatever the data's type: (operator, input slot).
const FLOAT32_INPUTS: &[(&str, usize)] = &[("Resize", 2), ("Upsample", 1)];

/// The largest finite float16.
const F16_MAX: f32 = 65504.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Precision {
    F32,
    F16,
}

impl Precision {
    fn elem(self) -> DataType {
        match self {
            Precision::F32 => DataType::Float,
            Precision::F16 => DataType::Float16,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Fp16Options {
    /// Keep float32 graph inputs and outputs (Casts at the edges).
    pub keep_io_types: bool,
}

/// Converts `model` to float16 (see the module doc). A model that already quantizes its
/// activations is left as it is (the report lists its quantization operators): its integer
/// accumulators (MatMulInteger's int32 sums pass 65 504 easily) would become infinite in
/// float16 between the product and its scale.
pub fn convert_fp16(model: &mut Model, options: &Fp16Options) -> Result<QuantReport> {
    let report = |rewrites, already_quantized| QuantReport {
        mode: "fp16",
        target: QuantTarget::Ort,
        calibration: None,
        rewrites,
        already_quantized,
        auto_exclusion: None,
        smoothing: None,
        weight_only: None,
        product_weights: None,
    };
    let operators = crate::quant::qdq::quantization_ops(model);
    if !operators.is_empty() {
        return Ok(report(Rewrites::default(), operators));
    }
    let mut precision = precisions(model, options)?;
    let mut rewrites = Rewrites::default();
    // In steps, each computed on the graph the one before left: rebuilding a node (a
    // Constant, a Cast, the producer of an output) gives it a new id.
    for patch in constant_patches(model, &precision)? {
        rewrites.apply(model, patch)?;
    }
    if options.keep_io_types {
        for patch in output_patches(model, &mut precision) {
            rewrites.apply(model, patch)?;
        }
    }
    for patch in cast_patches(model, &precision) {
        rewrites.apply(model, patch)?;
    }
    if !options.keep_io_types {
        let g = &model.graph;
        let ports: Vec<ValueId> = g.inputs.iter().chain(&g.outputs).map(|p| p.value).collect();
        for v in ports {
            let g = &model.graph;
            if precision.get(&v) == Some(&Precision::F16) && g.initializer(v).is_none() {
                let mut patch = Patch::new("fp16-io");
                patch.declare_elem_type(v, DataType::Float16 as i32);
                rewrites.apply(model, patch)?;
            }
        }
    }
    // value_info: every value's element type as it now is.
    ShapeInference.run(model)?;
    Ok(report(rewrites, Vec::new()))
}

/// The precision a reader wants in input `slot`.
fn expects(g: &Graph, mask: &HashSet<NodeId>, reader: NodeId, slot: usize) -> Precision {
    let node = g.node(reader);
    let float32_input = FLOAT32_INPUTS
        .iter()
        .any(|&(op, s)| node.is(op) && s == slot);
    if keeps_float32(g, reader, mask) || float32_input {
        Precision::F32
    } else {
        Precision::F16
    }
}

/// The precision of every float value (see the module doc). A value whose element type
/// nothing tells (an operator without a type rule, a file without `value_info`) is an
/// error: whether it is float decides where Casts go, and a guess could leave an operator
/// with a float16 and a float32 input, a model no runtime loads.
fn precisions(model: &Model, options: &Fp16Options) -> Result<HashMap<ValueId, Precision>> {
    let types = shape::infer(model).types;
    let g = &model.graph;
    let mask = mask_nodes(g);
    let elem = |v: ValueId| {
        types
            .get(&v)
            .cloned()
            .or_else(|| g.value_type(v))
            .map_or(0, |t| t.elem)
    };
    for (id, node) in g.nodes() {
        let untyped = node
            .outputs
            .iter()
            .flatten()
            .find(|&&v| elem(v) == 0 && (!g.uses(v).is_empty() || g.is_graph_output(v)));
        if let Some(&v) = untyped {
            return Err(Error::Quantization(format!(
                "FP16 needs the element type of every value, and `{}` ({} `{}`) has none \
                 that onnxopt can infer",
                g.value_name(v),
                node.op_type(),
                g.node_label(id)
            )));
        }
    }
    let is_float = |v: ValueId| elem(v) == DataType::Float as i32;
    let at_edge = if options.keep_io_types {
        Precision::F32
    } else {
        Precision::F16
    };
    let mut precision = HashMap::new();
    for v in g.value_ids().filter(|&v| is_float(v)) {
        let p = if let Some(producer) = g.producer(v) {
            if keeps_float32(g, producer, &mask) {
                Precision::F32
            } else {
                Precision::F16
            }
        } else if read_by_subgraph(g, v) {
            // A branch reads it by name as the float32 it was: no Cast can go between.
            Precision::F32
        } else if g.initializer(v).is_none() || g.is_graph_input(v) || g.is_graph_output(v) {
            at_edge
        } else {
            // An initializer: float16 unless every reader wants float32.
            let read_as_f16 = g.uses(v).iter().any(|&(reader, u)| {
                matches!(u, Use::Input(slot) if expects(g, &mask, reader, slot) == Precision::F16)
            });
            if read_as_f16 {
                Precision::F16
            } else {
                Precision::F32
            }
        };
        precision.insert(v, p);
    }
    Ok(precision)
}

/// Float16 initializers, Constant and ConstantOfShape values, and Casts to float16.
fn constant_patches(model: &Model, precision: &HashMap<ValueId, Precision>) -> Result<Vec<Patch>> {
    let g = &model.graph;
    let mut patches = Vec::new();
    let mut initializers: Vec<ValueId> = precision
        .iter()
        .filter(|&(&v, &p)| p == Precision::F16 && g.initializer(v).is_some())
        .map(|(&v, _)| v)
        .collect();
    initializers.sort_by_key(|v| v.index());
    for v in initializers {
        if let Some(t) = g.initializer(v) {
            let mut patch = Patch::new("fp16-initializer");
            patch.replace_initializer(v, to_f16(t)?);
            patches.push(patch);
        }
    }
    for (id, node) in g.nodes() {
        let out = node.output(0);
        let computes_f16 = out.is_some_and(|o| precision.get(&o) == Some(&Precision::F16));
        if !computes_f16 || !node.domain().is_empty() {
            continue;
        }
        let mut proto = node.proto.clone();
        let changed = match node.op_type() {
            "Constant" | "ConstantOfShape" => {
                let mut changed = false;
                for a in &mut proto.attribute {
                    let Some(t) = a.t.take() else { continue };
                    let t = Tensor::from_proto(t)?;
                    let t = if t.dtype() == DataType::Float {
                        changed = true;
                        to_f16(&t)?
                    } else {
                        t
                    };
                    a.t = Some(t.into_proto());
                }
                changed
            }
            "Cast" => {
                proto.attribute.retain(|a| a.name() != "to");
                proto
                    .attribute
                    .push(attr::int("to", DataType::Float16 as i64));
                true
            }
            _ => false,
        };
        if changed {
            let mut patch = Patch::new("fp16-constant");
            let inputs: Vec<Option<PValue>> =
                node.inputs.iter().map(|i| i.map(PValue::from)).collect();
            let outputs: Vec<PValue> = node.outputs.iter().flatten().map(|&o| o.into()).collect();
            patch
                .remove_node(id)
                .add_node_proto(proto, &inputs, &outputs);
            patches.push(patch);
        }
    }
    Ok(patches)
}

/// With `keep_io_types`, float32 graph outputs whose producer computes in float16: the
/// producer writes `<output>.float16`, a Cast writes the output, and the float16 readers read
/// the float16 value. One patch per producer (it may write several outputs); `precision`
/// records the outputs as float32 from then on.
fn output_patches(model: &Model, precision: &mut HashMap<ValueId, Precision>) -> Vec<Patch> {
    let g = &model.graph;
    let mask = mask_nodes(g);
    let mut by_producer: Vec<(NodeId, Vec<ValueId>)> = Vec::new();
    for port in &g.outputs {
        let v = port.value;
        let (Some(producer), Some(Precision::F16)) = (g.producer(v), precision.get(&v)) else {
            continue;
        };
        match by_producer.iter_mut().find(|(p, _)| *p == producer) {
            Some((_, outputs)) => outputs.push(v),
            None => by_producer.push((producer, vec![v])),
        }
    }
    let mut patches = Vec::new();
    for (producer, outputs) in by_producer {
        let node = g.node(producer);
        let mut patch = Patch::new("fp16-output");
        let f16: HashMap<ValueId, PValue> = outputs
            .iter()
            .map(|&v| (v, patch.new_value(&format!("{}.float16", g.value_name(v)))))
            .collect();
        let inputs: Vec<Option<PValue>> = node.inputs.iter().map(|i| i.map(PValue::from)).collect();
        let written: Vec<PValue> = node
            .outputs
            .iter()
            .flatten()
            .map(|o| f16.get(o).copied().unwrap_or(PValue::Old(*o)))
            .collect();
        patch
            .remove_node(producer)
            .add_node_proto(node.proto.clone(), &inputs, &written);
        for &v in &outputs {
            patch.add_node(
                "Cast",
                "",
                &[Some(f16[&v])],
                &[PValue::Old(v)],
                vec![attr::int("to", DataType::Float as i64)],
            );
            for &(reader, u) in g.uses(v) {
                if let Use::Input(slot) = u {
                    if expects(g, &mask, reader, slot) == Precision::F16 {
                        patch.replace_input(reader, slot, f16[&v]);
                    }
                }
            }
            precision.insert(v, Precision::F32);
        }
        patches.push(patch);
    }
    patches
}

/// A Cast per value and precision its readers want, where that is not the value's own.
fn cast_patches(model: &Model, precision: &HashMap<ValueId, Precision>) -> Vec<Patch> {
    let g = &model.graph;
    let mask = mask_nodes(g);
    let mut values: Vec<(ValueId, Precision)> = precision.iter().map(|(&v, &p)| (v, p)).collect();
    values.sort_by_key(|(v, _)| v.index());
    let mut patches = Vec::new();
    for (v, p) in values {
        let name = g.value_name(v);
        let mut patch = Patch::new("fp16-cast");
        if let Some(anchor) = g.producer(v).or_else(|| g.uses(v).first().map(|u| u.0)) {
            patch.anchor_at(anchor);
        }
        let mut wanting: HashMap<Precision, Vec<(NodeId, usize)>> = HashMap::new();
        for &(reader, u) in g.uses(v) {
            if let Use::Input(slot) = u {
                let want = expects(g, &mask, reader, slot);
                if want != p {
                    wanting.entry(want).or_default().push((reader, slot));
                }
            }
        }
        for (want, readers) in wanting {
            let suffix = match want {
                Precision::F32 => "float32",
                Precision::F16 => "float16",
            };
            let cast = patch.new_value(&format!("{name}.{suffix}"));
            patch.add_node(
                "Cast",
                "",
                &[Some(v.into())],
                &[cast],
                vec![attr::int("to", want.elem() as i64)],
            );
            for (reader, slot) in readers {
                patch.replace_input(reader, slot, cast);
            }
        }
        if !patch.is_empty() {
            patches.push(patch);
        }
    }
    patches
}

/// Products whose inputs `mask_nodes` does not walk into: attention scores, not masks.
const PRODUCTS: &[&str] = &["MatMul", "Gemm", "Einsum", "Conv", "Attention"];

/// The most nodes `mask_nodes` takes from one root: a mask is a short chain.
const MASK_NODES_AT_MOST: usize = 64;

/// The nodes computing an attention mask and adding it to the scores: what a standard
/// `Attention` reads as its mask, and what a Softmax reads, from the last integer or boolean
/// values (and the products of the scores) on. They stay float32, with the Attention and
/// the Softmax. A mask filled with float32's lowest becomes float16's lowest in float16: a
/// score plus it overflows to -inf or rounds to it depending on the score, so a query row
/// masked whole (left padding) no longer averages as in the float32 graph, and ONNX
/// Runtime's Attention kernel reads float16's lowest as -inf (see
/// `passes::fuse::attention::grouped`). A root whose chain is longer than
/// `MASK_NODES_AT_MOST` is left to the other rules.
fn mask_nodes(g: &Graph) -> HashSet<NodeId> {
    let is_float = |v: ValueId| {
        g.value_type(v)
            .is_none_or(|t| t.elem == DataType::Float as i32)
    };
    let roots = g.nodes().filter_map(|(_, n)| match n.op_type() {
        "Attention" if n.domain().is_empty() => n.input(3),
        "Softmax" => n.input(0),
        _ => None,
    });
    let mut nodes = HashSet::new();
    for root in roots.collect::<Vec<_>>() {
        let mut chain = HashSet::new();
        let mut stack = vec![root];
        while let Some(v) = stack.pop() {
            let Some(producer) = g.producer(v).filter(|_| is_float(v)) else {
                continue;
            };
            let node = g.node(producer);
            if PRODUCTS.contains(&node.op_type()) || !chain.insert(producer) {
                continue;
            }
            if chain.len() > MASK_NODES_AT_MOST {
                chain.clear();
                break;
            }
            stack.extend(node.inputs.iter().flatten().copied());
        }
        nodes.extend(chain);
    }
    nodes
}

fn keeps_float32(g: &Graph, id: NodeId, mask: &HashSet<NodeId>) -> bool {
    let node = g.node(id);
    // The standard attention (its Softmax inside), and its mask with it: see `mask_nodes`.
    let standard_attention = node.is("Attention") && node.domain().is_empty();
    if standard_attention || mask.contains(&id) {
        return true;
    }
    let float16_schema = match node.domain() {
        "" => true,
        MS_DOMAIN => ops::contrib(node.op_type()).is_some_and(|o| o.float16),
        _ => false,
    };
    // A square (`Mul(x, x)`, the canonical `Pow(x, 2)`) passes float16's range as Pow does.
    let square = node.is("Mul") && node.inputs.len() == 2 && node.inputs[0] == node.inputs[1];
    let read_by_name = node
        .outputs
        .iter()
        .flatten()
        .any(|&v| read_by_subgraph(g, v));
    !float16_schema
        || KEEP_FLOAT32.contains(&node.op_type())
        || square
        || read_by_name
        || moves_batch_into_matmul(g, id)
}

/// A Transpose that moves the leading (batch) axis of a MatMul operand back among the matrix
/// axes (`[1, …, r−2, 0, r−1]` or `[1, …, r−1, 0]`: WavLM's `[T, B, C]` projections), read
/// by a MatMul. In float16, ONNX Runtime (1.24 to 1.32 at least, x86-64) crashes loading it
/// at its default level: its MatMul-Transpose fusion rewrites the float16 chain (through the
/// Cast it puts before a MatMul it has no float16 kernel for) into a node the NCHWc
/// transformer then dereferences without a schema (onnxruntime#28392). Computed in float32
/// (a Transpose is exact in both) the chain loads.
fn moves_batch_into_matmul(g: &Graph, id: NodeId) -> bool {
    let node = g.node(id);
    let Some(perm) = node
        .is("Transpose")
        .then(|| attr::get_ints(&node.proto, "perm"))
        .flatten()
    else {
        return false;
    };
    let rank = perm.len();
    let batch_moved = |at: usize| {
        let mut order: Vec<i64> = (1..rank as i64).collect();
        order.insert(at, 0);
        order == perm
    };
    let read_by_matmul = node.output(0).is_some_and(|v| {
        g.uses(v)
            .iter()
            .any(|&(reader, u)| matches!(u, Use::Input(_)) && g.node(reader).is("MatMul"))
    });
    rank >= 3 && (batch_moved(rank - 2) || batch_moved(rank - 1)) && read_by_matmul
}

/// Whether a subgraph (an `If` branch, a `Loop` body) reads `v` by name: it computes with
/// the element type `v` has now, which this conversion does not change inside it.
fn read_by_subgraph(g: &Graph, v: ValueId) -> bool {
    g.uses(v).iter().any(|&(_, u)| u == Use::Captured)
}

/// `t` as float16, values beyond float16's range clamped to ±65 504.
fn to_f16(t: &Tensor) -> Result<Tensor> {
    // Infinities and NaN stay what they are.
    let clamped: Vec<f32> = t
        .to_f32_vec()?
        .into_iter()
        .map(|x| {
            if x.is_finite() {
                x.clamp(-F16_MAX, F16_MAX)
            } else {
                x
            }
        })
        .collect();
    Tensor::from_f32_as(t.name(), DataType::Float16, t.dims(), &clamped)
}
