//! Structured pruning: attention heads and FFN neurons removed from the weight matrices.
//!
//! Matches:
//! - attention: `com.microsoft` Attention (packed `[D, 3·N·H]` Q/K/V weight), or
//!   `com.microsoft` MultiHeadAttention / ONNX Attention on 3-D Q, K, V that are each a
//!   projection `x·W (+ b)` of constant W read by nothing else; and every reader of the
//!   attention output must be a projection reading its features (MatMul or Gemm with a
//!   constant weight), possibly behind Reshapes that keep the features last;
//! - FFN: a block whose output is read only as the features of such projections, computed
//!   from one or more entry projections (`x·W (+ b)`, MatMul or Gemm) through element-wise
//!   operators only (the GELU forms, fused or not; T5's gated Mul of two entries), whose
//!   constants are scalars or per-feature vectors.
//!
//! Produces: the same blocks with the pruned heads' or neurons' columns gone from the entry
//! weights, biases and per-feature constants, their rows gone from the exit weights, the
//! head counts (`num_heads`, `q_num_heads`/`kv_num_heads`) and the feature entries of the
//! Reshape shapes in between rewritten. Constants read elsewhere are copied, not changed.
//!
//! Why it is exact apart from the pruned units: a head's output is computed from its own Q,
//! K and V columns only and reaches the rest of the model through its own rows of the output
//! projection; an FFN neuron likewise, because element-wise operators never mix features.
//! Removing them is the same as zeroing their contribution, which is the intended change.
//! Blocks whose layout the checks cannot prove (past key/values, a per-head attention bias,
//! an output read some other way) are skipped and listed with the reason.
//!
//! Importance is the weight norm of what a unit reads and writes: for an FFN neuron the
//! product of the norms of its entry columns and its exit row; for a head the root of the
//! summed squared norms of its Q, K, V columns and output rows. The least important go.

use std::collections::{HashMap, HashSet};

use super::activations::{feature_energy, FeatureEnergy};
use super::weights::Skipped;
use super::PruneOptions;
use crate::error::{Error, Result};
use crate::ir::tensor::raw_byte_len;
use crate::ir::{attr, Graph, Model, NodeId, PValue, Patch, Tensor, Use, ValueId};
use crate::passes::{matching, Rewrites};
use crate::proto::NodeProto;

/// One pruned block.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PrunedBlock {
    /// The node the block is named after: the attention operator, or the FFN's exit.
    pub node: String,
    /// Heads, or neurons, before and after.
    pub before: usize,
    pub after: usize,
    /// The indices removed, ascending.
    pub removed: Vec<usize>,
}

/// What ranked the units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Importance {
    /// Norms of the weights each unit reads and writes.
    #[default]
    Weights,
    /// Activations on calibration batches, times the weights that read them.
    Activations { batches: usize },
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StructuredReport {
    pub importance: Importance,
    pub heads: Vec<PrunedBlock>,
    pub ffn: Vec<PrunedBlock>,
    /// Attention operators left whole, and why.
    pub skipped: Vec<Skipped>,
}

/// A constant input to cut: input `slot` of `node` keeps only the indices `keep` along `axis`.
#[derive(Clone, Debug)]
struct Slice {
    node: NodeId,
    slot: usize,
    axis: usize,
    keep: Vec<usize>,
}

/// A weight slot as a unit reads or writes it: input `slot` of `node`, features on `axis`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FeatureSlot {
    node: NodeId,
    slot: usize,
    axis: usize,
}

/// The readers of a feature value: weight slots to cut on their input-feature axis, and the
/// Reshapes in between whose shape's last entry is the feature count.
#[derive(Default)]
struct Readers {
    weights: Vec<FeatureSlot>,
    reshapes: Vec<NodeId>,
}

/// Everything one block's cut changes.
struct Cut {
    kind: &'static str,
    /// Constants sliced; computed values (a per-head attention bias) narrowed by a Gather.
    slices: Vec<Slice>,
    /// Reshapes whose target shape (input 1) gets this feature count as its last entry.
    reshapes: Vec<(NodeId, usize)>,
    /// Inputs that become this int64 vector (a Split's section sizes).
    int_inputs: Vec<(NodeId, usize, Vec<i64>)>,
    attrs: Vec<(NodeId, &'static str, i64)>,
}

pub fn prune_structured(
    model: &mut Model,
    options: &PruneOptions,
    rewrites: &mut Rewrites,
) -> Result<StructuredReport> {
    let mut report = StructuredReport::default();
    let order = model.graph.topological_order()?;
    let energy = if options.calibration.is_empty() {
        None
    } else {
        report.importance = Importance::Activations {
            batches: options.calibration.len(),
        };
        let values = unit_values(&model.graph, &order);
        Some(feature_energy(model, &values, &options.calibration)?)
    };
    let energy = energy.as_ref();
    if let Some(fraction) = options.heads {
        for &id in &order {
            let g = &model.graph;
            if !g.contains_node(id) || !is_attention(g, id) {
                continue;
            }
            match head_cut(g, id, fraction, energy) {
                Ok(Some((cut, block))) => {
                    apply(model, cut, rewrites)?;
                    report.heads.push(block);
                }
                Ok(None) => {}
                Err(reason) => report.skipped.push(Skipped {
                    weight: g.node(id).name().to_string(),
                    reason,
                }),
            }
        }
    }
    if let Some(fraction) = options.ffn {
        for &id in &order {
            let g = &model.graph;
            if !g.contains_node(id) {
                continue;
            }
            if let Some((cut, block)) = ffn_cut(g, id, fraction, energy) {
                apply(model, cut, rewrites)?;
                report.ffn.push(block);
            }
        }
    }
    Ok(report)
}

/// The values whose features are candidate units: attention outputs and the inputs of
/// projections (an FFN's hidden state is one), each once.
fn unit_values(g: &Graph, order: &[NodeId]) -> Vec<ValueId> {
    let mut seen = HashSet::new();
    order
        .iter()
        .filter_map(|&id| match is_attention(g, id) {
            true => g.node(id).output(0),
            false => output_feature_axis(g, id).and_then(|_| g.node(id).input(0)),
        })
        .filter(|&v| g.value_type(v).and_then(|t| t.shape).is_some() && seen.insert(v))
        .collect()
}

// ---- choosing units ------------------------------------------------------------------------

/// The units to remove: `round(fraction · n)` of the least important (at least one stays;
/// ties: the lower index goes first), ascending.
fn least_important(importance: &[f64], fraction: f64) -> Vec<usize> {
    let n = importance.len();
    let count = ((fraction.clamp(0.0, 1.0) * n as f64).round() as usize).min(n.saturating_sub(1));
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| importance[a].total_cmp(&importance[b]).then(a.cmp(&b)));
    let mut removed = order[..count].to_vec();
    removed.sort_unstable();
    removed
}

fn kept(n: usize, removed: &[usize]) -> Vec<usize> {
    (0..n)
        .filter(|i| removed.binary_search(i).is_err())
        .collect()
}

/// Squared L2 norm of each index along `axis` of a float weight.
fn squared_norms(t: &Tensor, axis: usize) -> Option<Vec<f64>> {
    let dims: Vec<usize> = t.dims().iter().map(|&d| d as usize).collect();
    let layout = super::mask::AxisLayout::new(&dims, axis);
    let values = t.to_f32_vec().ok()?;
    let mut norms = vec![0.0f64; layout.len];
    for (i, &v) in values.iter().enumerate() {
        norms[(i / layout.stride) % layout.len] += f64::from(v) * f64::from(v);
    }
    Some(norms)
}

fn slot_norms(g: &Graph, s: FeatureSlot) -> Option<Vec<f64>> {
    squared_norms(&g.constant(g.node(s.node).input(s.slot)?)?, s.axis)
}

/// The squared norms of each index of several weight slots (of one length), summed.
fn summed_norms(g: &Graph, slots: &[FeatureSlot]) -> Option<Vec<f64>> {
    let mut sum: Vec<f64> = Vec::new();
    for &s in slots {
        let norms = slot_norms(g, s)?;
        sum.resize(norms.len(), 0.0);
        if sum.len() != norms.len() {
            return None;
        }
        sum.iter_mut().zip(norms).for_each(|(a, n)| *a += n);
    }
    Some(sum)
}

// ---- shared matching -----------------------------------------------------------------------

fn const_dims(g: &Graph, v: ValueId) -> Option<Vec<i64>> {
    g.constant(v).map(|t| t.dims().to_vec())
}

fn last_dim(g: &Graph, v: ValueId) -> Option<i64> {
    g.value_type(v)?.shape?.last()?.value()
}

/// The axis of `node`'s constant weight (input 1) that indexes its output features, when
/// `node` is a projection `x·W`: MatMul with a 2-D W (axis 1), or a plain Gemm (axis 0 with
/// transB, else 1).
fn output_feature_axis(g: &Graph, node: NodeId) -> Option<usize> {
    let n = g.node(node);
    let w = n.input(1)?;
    if const_dims(g, w)?.len() != 2 || g.constant(n.input(0)?).is_some() {
        return None;
    }
    match n.op_type() {
        "MatMul" if matching::is_onnx(n) => Some(1),
        "Gemm" => matching::plain_gemm_trans_b(n).map(|t| if t { 0 } else { 1 }),
        _ => None,
    }
}

/// The weight slot of `reader`, reading a value of `width` features as input 0, on its
/// input-feature axis: MatMul W `[width, out]` (axis 0), Gemm B by transB.
fn input_feature_slot(g: &Graph, reader: NodeId, width: i64) -> Option<FeatureSlot> {
    let axis = 1 - output_feature_axis(g, reader)?;
    let dims = const_dims(g, g.node(reader).input(1)?)?;
    (dims[axis] == width).then_some(FeatureSlot {
        node: reader,
        slot: 1,
        axis,
    })
}

/// The last dim of Reshape `reshape`'s output, as shape inference found it. Its shape input
/// may be a constant or computed (the legacy exporter's `x.view(-1, x.size(-1))`); either
/// way the cut rewrites that entry (see `apply`).
fn reshape_features(g: &Graph, reshape: NodeId) -> Option<i64> {
    last_dim(g, g.node(reshape).output(0)?)
}

/// For a shape written by `Concat(axis=0)` with a constant last piece: the Concat and that
/// piece.
fn shape_concat(g: &Graph, shape: ValueId) -> Option<(NodeId, ValueId)> {
    let id = g.producer(shape)?;
    let node = g.node(id);
    if !node.is("Concat") || attr::get_int(&node.proto, "axis") != Some(0) {
        return None;
    }
    let last = (*node.inputs.last()?)?;
    g.constant(last).is_some().then_some((id, last))
}

/// The readers of `v` (`width` features, last axis), if every one reads it as the input of
/// a projection, directly or through Reshapes whose constant shape keeps `width` last.
fn feature_readers(g: &Graph, v: ValueId, width: i64) -> Option<Readers> {
    let mut readers = Readers::default();
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        if g.is_graph_output(v) || last_dim(g, v) != Some(width) {
            return None;
        }
        for &(reader, u) in g.uses(v) {
            if u != Use::Input(0) {
                return None;
            }
            let node = g.node(reader);
            if node.is("Reshape") {
                if reshape_features(g, reader)? != width {
                    return None;
                }
                readers.reshapes.push(reader);
                stack.push(node.output(0)?);
            } else {
                readers.weights.push(input_feature_slot(g, reader, width)?);
            }
        }
    }
    Some(readers)
}

/// `x·W (+ b)` producing `v` with constant W: its weight slot (output-feature axis), its
/// bias slot if any, and its nodes.
fn projection(g: &Graph, v: ValueId) -> Option<(FeatureSlot, Option<FeatureSlot>, Vec<NodeId>)> {
    let id = g.producer(v)?;
    let node = g.node(id);
    if let Some(axis) = output_feature_axis(g, id) {
        let bias = (node.is("Gemm") && node.input(2).is_some()).then_some(FeatureSlot {
            node: id,
            slot: 2,
            axis: 0,
        });
        if bias.is_some() && const_dims(g, node.input(2)?)?.len() != 1 {
            return None;
        }
        return Some((
            FeatureSlot {
                node: id,
                slot: 1,
                axis,
            },
            bias,
            vec![id],
        ));
    }
    if !node.is("Add") || !matching::is_onnx(node) {
        return None;
    }
    for (bias_slot, x_slot) in [(1, 0), (0, 1)] {
        let b = node.input(bias_slot)?;
        if const_dims(g, b).is_some_and(|d| d.len() == 1) {
            let x = node.input(x_slot)?;
            let (w, None, mut nodes) = projection(g, x)? else {
                return None;
            };
            if g.uses(x).len() != 1 {
                return None;
            }
            nodes.push(id);
            let bias = FeatureSlot {
                node: id,
                slot: bias_slot,
                axis: 0,
            };
            return Some((w, Some(bias), nodes));
        }
    }
    None
}

// ---- attention heads -----------------------------------------------------------------------

fn is_attention(g: &Graph, id: NodeId) -> bool {
    let n = g.node(id);
    matches!(
        (n.domain(), n.op_type()),
        ("com.microsoft", "Attention")
            | ("com.microsoft", "MultiHeadAttention")
            | ("", "Attention")
    )
}

/// Where an attention operator's Q, K and V columns come from.
#[derive(Default)]
struct QkvSources {
    /// Constants holding Q/K/V columns, with how many of the three sections each holds
    /// (3 when packed into one weight).
    slots: Vec<(FeatureSlot, usize)>,
    /// The weights among them (for importance).
    weights: Vec<FeatureSlot>,
    /// Features of one section (Q, K or V).
    width: i64,
    /// Reshapes between a packed projection and its Split, carrying all three sections.
    reshapes: Vec<NodeId>,
    /// The Split's section-sizes input, when it has one.
    split_sizes: Option<(NodeId, usize)>,
}

const NOT_PROJECTED: &str = "its Q/K/V projections are not constant weights read only by it";

/// The Q/K/V sources of attention `id`: its own packed weight (`com.microsoft` Attention),
/// three projections, or one projection split three ways along the features (the standard
/// Attention built from GPT-2's fused `c_attn`).
fn qkv_sources(g: &Graph, id: NodeId, packed: bool) -> Option<QkvSources> {
    let node = g.node(id);
    let mut qkv = QkvSources::default();
    if packed {
        let dims = const_dims(g, node.input(1)?)?;
        if dims.len() != 2 || dims[1] % 3 != 0 || g.constant(node.input(0)?).is_some() {
            return None;
        }
        qkv.width = dims[1] / 3;
        let w = FeatureSlot {
            node: id,
            slot: 1,
            axis: 1,
        };
        qkv.slots.push((w, 3));
        qkv.weights.push(w);
        if let Some(b) = node.input(2) {
            if const_dims(g, b)?.len() != 1 {
                return None;
            }
            qkv.slots.push((
                FeatureSlot {
                    node: id,
                    slot: 2,
                    axis: 0,
                },
                3,
            ));
        }
        return Some(qkv);
    }
    let inputs: Vec<ValueId> = (0..3).map(|s| node.input(s)).collect::<Option<_>>()?;
    if inputs
        .iter()
        .any(|&v| g.is_graph_output(v) || g.uses(v).iter().any(|&(r, _)| r != id))
    {
        return None;
    }
    qkv.width = last_dim(g, inputs[0])?;
    if inputs.iter().any(|&v| last_dim(g, v) != Some(qkv.width)) {
        return None;
    }
    if let Some(split) = three_way_split(g, &inputs, qkv.width) {
        let mut v = g.node(split).input(0)?;
        while let Some(r) = g.producer(v).filter(|&r| g.node(r).is("Reshape")) {
            let x = g.node(r).input(0)?;
            if g.uses(v).len() != 1 || last_dim(g, x) != Some(3 * qkv.width) {
                return None;
            }
            qkv.reshapes.push(r);
            v = x;
        }
        let (w, bias, _) = projection(g, v)?;
        if g.uses(v).len() != 1 {
            return None;
        }
        qkv.slots.push((w, 3));
        qkv.slots.extend(bias.map(|b| (b, 3)));
        qkv.weights.push(w);
        qkv.split_sizes = g.node(split).input(1).map(|_| (split, 1));
        return Some(qkv);
    }
    for v in inputs {
        let (w, bias, _) = projection(g, v)?;
        qkv.slots.push((w, 1));
        qkv.slots.extend(bias.map(|b| (b, 1)));
        qkv.weights.push(w);
    }
    Some(qkv)
}

/// The Split writing `outputs` (in order) as three equal sections of `width` features along
/// the last axis, read only by the attention.
fn three_way_split(g: &Graph, outputs: &[ValueId], width: i64) -> Option<NodeId> {
    let id = g.producer(outputs[0])?;
    let node = g.node(id);
    let x = node.input(0)?;
    let rank = g.value_type(x)?.shape?.len() as i64;
    let axis = attr::get_int(&node.proto, "axis").unwrap_or(0);
    let equal = match node.input(1) {
        Some(sizes) => matching::const_ints(g, sizes)? == [width; 3],
        None => true,
    };
    let same_outputs = node.outputs.len() == 3
        && node
            .outputs
            .iter()
            .zip(outputs)
            .all(|(o, v)| *o == Some(*v));
    (node.is("Split") && (axis == -1 || axis == rank - 1) && equal && same_outputs).then_some(id)
}

/// The cut removing `fraction` of the heads of attention `id`; `Ok(None)` when none would go,
/// `Err(reason)` when its layout cannot be proven.
fn head_cut(
    g: &Graph,
    id: NodeId,
    fraction: f64,
    energy: Option<&FeatureEnergy>,
) -> std::result::Result<Option<(Cut, PrunedBlock)>, String> {
    let node = g.node(id);
    let input = |slot: usize| node.input(slot);
    let standard = node.domain().is_empty();
    let heads_attr = if standard { "q_num_heads" } else { "num_heads" };
    let heads = attr::get_int(&node.proto, heads_attr).ok_or("it has no head count")?;
    if standard && attr::get_int(&node.proto, "kv_num_heads") != Some(heads) {
        return Err("its key/value head count differs from the query's".into());
    }
    if node.outputs.iter().skip(1).flatten().next().is_some() {
        return Err(
            "it returns present key/values (the cache layout is the model's interface)".into(),
        );
    }
    let packed = !standard && node.op_type() == "Attention";
    let (bias_slot, past_slots): (usize, &[usize]) = match (standard, packed) {
        (true, _) => (3, &[4, 5]),
        (false, true) => (5, &[4]),
        (false, false) => (5, &[6, 7]),
    };
    if past_slots.iter().any(|&s| input(s).is_some()) {
        return Err("it reads past key/values".into());
    }
    if packed && attr::get(&node.proto, "qkv_hidden_sizes").is_some() {
        return Err("it has qkv_hidden_sizes".into());
    }
    // An attention bias of shape [batch or 1, heads or 1, q, k]: a per-head one loses the
    // pruned heads' planes.
    let bias_heads = match input(bias_slot) {
        Some(bias) => {
            let shape = g.value_type(bias).and_then(|t| t.shape);
            match shape
                .as_deref()
                .map(|s| (s.len(), s.get(1).and_then(|d| d.value())))
            {
                Some((4, Some(1))) => None,
                Some((4, Some(h))) if h == heads => Some(bias),
                _ => return Err("its attention bias has no known head axis".into()),
            }
        }
        None => None,
    };
    let qkv = qkv_sources(g, id, packed).ok_or(NOT_PROJECTED)?;
    let width = qkv.width;
    if heads <= 0 || width % heads != 0 {
        return Err(format!("{width} features do not split into {heads} heads"));
    }
    let head_size = (width / heads) as usize;
    let out = node.output(0).ok_or(NOT_PROJECTED)?;
    let readers = feature_readers(g, out, width)
        .ok_or("its output is read by something other than a projection")?;

    // Importance: with activations, the energy each head's output sends through the output
    // rows, Σ E[o_f²]·‖W_O[f]‖²; else the summed squared norms of its columns and rows.
    let mut importance = vec![0.0f64; heads as usize];
    let output_rows = summed_norms(g, &readers.weights).ok_or(NOT_PROJECTED)?;
    match energy
        .and_then(|e| e.get(&out))
        .filter(|e| e.len() == width as usize)
    {
        Some(energy) => {
            for (f, (e, n)) in energy.iter().zip(&output_rows).enumerate() {
                importance[f / head_size] += e * n;
            }
        }
        None => {
            let columns = summed_norms(g, &qkv.weights).ok_or(NOT_PROJECTED)?;
            for (f, c) in columns.iter().enumerate() {
                importance[(f % width as usize) / head_size] += c;
            }
            for (f, n) in output_rows.iter().enumerate() {
                importance[f / head_size] += n;
            }
        }
    }
    let importance: Vec<f64> = importance.into_iter().map(f64::sqrt).collect();
    let removed = least_important(&importance, fraction);
    if removed.is_empty() {
        return Ok(None);
    }
    let kept_heads = kept(heads as usize, &removed);
    let features = kept_heads.len() * head_size;
    let columns = |sections: usize| -> Vec<usize> {
        (0..sections)
            .flat_map(|s| {
                kept_heads.iter().flat_map(move |&h| {
                    (0..head_size).map(move |i| s * width as usize + h * head_size + i)
                })
            })
            .collect()
    };
    let slice = |s: FeatureSlot, keep: Vec<usize>| Slice {
        node: s.node,
        slot: s.slot,
        axis: s.axis,
        keep,
    };
    let mut slices: Vec<Slice> = qkv
        .slots
        .iter()
        .map(|&(s, sections)| slice(s, columns(sections)))
        .collect();
    slices.extend(readers.weights.iter().map(|&s| slice(s, columns(1))));
    if bias_heads.is_some() {
        let planes = FeatureSlot {
            node: id,
            slot: bias_slot,
            axis: 1,
        };
        slices.push(slice(planes, kept_heads.clone()));
    }
    let after = kept_heads.len() as i64;
    let mut attrs = vec![(id, heads_attr, after)];
    if standard {
        attrs.push((id, "kv_num_heads", after));
    }
    let reshapes = qkv
        .reshapes
        .iter()
        .map(|&r| (r, 3 * features))
        .chain(readers.reshapes.iter().map(|&r| (r, features)))
        .collect();
    let int_inputs = qkv
        .split_sizes
        .map(|(split, slot)| (split, slot, vec![features as i64; 3]))
        .into_iter()
        .collect();
    let cut = Cut {
        kind: "pruned-heads",
        slices,
        reshapes,
        int_inputs,
        attrs,
    };
    let block = PrunedBlock {
        node: node.name().to_string(),
        before: heads as usize,
        after: kept_heads.len(),
        removed,
    };
    Ok(Some((cut, block)))
}

// ---- FFN neurons ---------------------------------------------------------------------------

/// Element-wise operators: output feature i depends only on input feature i.
fn is_elementwise(node: &crate::ir::Node) -> bool {
    let onnx = [
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Relu",
        "LeakyRelu",
        "Gelu",
        "Erf",
        "Tanh",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Neg",
        "Abs",
        "Sqrt",
        "Exp",
        "Log",
        "Softplus",
        "Reciprocal",
        "Elu",
        "Celu",
        "Selu",
        "Mish",
        "Clip",
        "Identity",
    ];
    let contrib = ["FastGelu", "BiasGelu", "Gelu", "QuickGelu"];
    match node.domain() {
        "" | "ai.onnx" => onnx.contains(&node.op_type()),
        "com.microsoft" => contrib.contains(&node.op_type()),
        _ => false,
    }
}

/// The FFN block read as input 0 by `exit` (a projection), as a cut removing `fraction` of
/// its neurons; `None` when `exit` does not read such a block.
fn ffn_cut(
    g: &Graph,
    exit: NodeId,
    fraction: f64,
    energy: Option<&FeatureEnergy>,
) -> Option<(Cut, PrunedBlock)> {
    output_feature_axis(g, exit)?;
    let hidden = g.node(exit).input(0)?;
    let width = last_dim(g, hidden)?;
    let readers = feature_readers(g, hidden, width)?;

    // Walk back from the block's output to its entry projections.
    let mut entries: Vec<FeatureSlot> = Vec::new();
    let mut per_feature: Vec<FeatureSlot> = Vec::new();
    let mut reshapes: Vec<NodeId> = Vec::new();
    let mut inside: HashSet<NodeId> = HashSet::new();
    let mut stack = vec![hidden];
    let mut seen: HashSet<ValueId> = HashSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        let id = g.producer(v)?;
        let node = g.node(id);
        inside.insert(id);
        if let Some((w, bias, nodes)) = projection(g, v) {
            if const_dims(g, g.node(w.node).input(1)?)?[w.axis] != width {
                return None;
            }
            entries.push(w);
            per_feature.extend(bias);
            inside.extend(nodes);
            continue;
        }
        if node.is("Reshape") {
            let x = node.input(0)?;
            if reshape_features(g, id)? != width || last_dim(g, x) != Some(width) {
                return None;
            }
            reshapes.push(id);
            stack.push(x);
            continue;
        }
        if !is_elementwise(node) {
            return None;
        }
        for (slot, x) in node.inputs.iter().enumerate() {
            let Some(x) = *x else { continue };
            match const_dims(g, x) {
                Some(d) if d.last().is_none_or(|&l| l == 1) => {}
                Some(d) if *d.last()? == width => per_feature.push(FeatureSlot {
                    node: id,
                    slot,
                    axis: d.len() - 1,
                }),
                Some(_) => return None,
                None => stack.push(x),
            }
        }
    }
    if entries.is_empty() {
        return None;
    }
    // Nothing but the block may read its intermediate values.
    for &id in &inside {
        for &v in g.node(id).outputs.iter().flatten() {
            if v == hidden {
                continue;
            }
            if g.is_graph_output(v) || g.uses(v).iter().any(|(r, _)| !inside.contains(r)) {
                return None;
            }
        }
    }
    // Importance: a neuron's RMS activation (with calibration data), else the norms of its
    // entry columns, times the norm of its exit rows.
    let activation = energy
        .and_then(|e| e.get(&hidden))
        .filter(|e| e.len() == width as usize);
    let mut importance: Vec<f64> = match activation {
        Some(energy) => energy.iter().map(|e| e.sqrt()).collect(),
        None => vec![1.0; width as usize],
    };
    let weighed = if activation.is_some() {
        &readers.weights[..0]
    } else {
        &entries[..]
    };
    for s in weighed.iter().chain(&readers.weights) {
        for (i, n) in slot_norms(g, *s)?.iter().enumerate() {
            importance[i] *= n.sqrt();
        }
    }
    let removed = least_important(&importance, fraction);
    if removed.is_empty() {
        return None;
    }
    let keep = kept(width as usize, &removed);
    let slices = entries
        .iter()
        .chain(&per_feature)
        .chain(&readers.weights)
        .map(|s| Slice {
            node: s.node,
            slot: s.slot,
            axis: s.axis,
            keep: keep.clone(),
        })
        .collect();
    let cut = Cut {
        kind: "pruned-ffn",
        slices,
        reshapes: reshapes
            .into_iter()
            .chain(readers.reshapes)
            .map(|r| (r, keep.len()))
            .collect(),
        int_inputs: Vec::new(),
        attrs: Vec::new(),
    };
    let block = PrunedBlock {
        node: g.node(exit).name().to_string(),
        before: width as usize,
        after: keep.len(),
        removed,
    };
    Some((cut, block))
}

// ---- applying a cut ------------------------------------------------------------------------

/// `t` keeping only the indices `keep` along `axis`.
fn slice_tensor(t: &Tensor, axis: usize, keep: &[usize]) -> Result<Tensor> {
    let dims: Vec<usize> = t.dims().iter().map(|&d| d as usize).collect();
    let elem = raw_byte_len(t.dtype(), 1)
        .filter(|&e| raw_byte_len(t.dtype(), t.numel()) == Some(e * t.numel()))
        .ok_or_else(|| Error::invalid_tensor(t.name(), "cannot slice this element type"))?;
    let bytes = t
        .raw_bytes()
        .ok_or_else(|| Error::invalid_tensor(t.name(), "cannot read its data"))?;
    let layout = super::mask::AxisLayout::new(&dims, axis);
    let run = layout.stride * elem;
    let mut out = Vec::with_capacity(layout.outer * keep.len() * run);
    for o in 0..layout.outer {
        for &k in keep {
            let start = (o * layout.len + k) * run;
            out.extend_from_slice(&bytes[start..start + run]);
        }
    }
    let mut new_dims: Vec<i64> = t.dims().to_vec();
    new_dims[axis] = keep.len() as i64;
    Tensor::from_raw(t.name(), t.dtype(), &new_dims, bytes::Bytes::from(out))
}

/// Input `slot` of `node` reads `tensor` instead: in place when nothing else reads the
/// constant initializer, else from a copy (a shared constant keeps its other readers' value).
fn set_input_constant(g: &Graph, patch: &mut Patch, node: NodeId, slot: usize, tensor: Tensor) {
    let Some(v) = g.node(node).input(slot) else {
        return;
    };
    if g.initializer(v).is_some() && g.uses(v).len() == 1 {
        patch.replace_initializer(v, tensor);
    } else {
        let copy = patch.new_initializer(&format!("{}.pruned", g.value_name(v)), tensor);
        patch.replace_input(node, slot, copy);
    }
}

fn apply(model: &mut Model, cut: Cut, rewrites: &mut Rewrites) -> Result<()> {
    let g = &model.graph;
    let mut patch = Patch::new(cut.kind);
    for s in &cut.slices {
        let v = g
            .node(s.node)
            .input(s.slot)
            .ok_or_else(|| missing("an input"))?;
        match g.constant(v) {
            Some(t) => {
                let sliced = slice_tensor(&t, s.axis, &s.keep)?;
                set_input_constant(g, &mut patch, s.node, s.slot, sliced);
            }
            None => {
                let keep: Vec<i64> = s.keep.iter().map(|&k| k as i64).collect();
                let name = format!("{}.kept", g.value_name(v));
                let indices = Tensor::from_i64(&name, &[keep.len() as i64], &keep)?;
                let indices = patch.new_initializer(&name, indices);
                let axis = vec![attr::int("axis", s.axis as i64)];
                let kept = patch.op("Gather", "", &[PValue::from(v), indices], axis);
                patch.replace_input(s.node, s.slot, kept);
            }
        }
    }
    for (node, slot, ints) in &cut.int_inputs {
        let v = g
            .node(*node)
            .input(*slot)
            .ok_or_else(|| missing("an input"))?;
        let t = Tensor::from_i64(g.value_name(v), &[ints.len() as i64], ints)?;
        set_input_constant(g, &mut patch, *node, *slot, t);
    }
    // One new shape per shape value and count: other Reshapes may read the original.
    let mut shapes: HashMap<(ValueId, usize), PValue> = HashMap::new();
    for &(reshape, features) in &cut.reshapes {
        let v = g
            .node(reshape)
            .input(1)
            .ok_or_else(|| missing("a Reshape shape"))?;
        if g.constant(v).is_some() {
            set_input_constant(g, &mut patch, reshape, 1, ending_in(g, v, features)?);
            continue;
        }
        let shape = match shapes.get(&(v, features)) {
            Some(&shape) => shape,
            None => {
                let shape = shape_ending_in(g, &mut patch, v, features)?;
                *shapes.entry((v, features)).or_insert(shape)
            }
        };
        patch.replace_input(reshape, 1, shape);
    }
    rewrites.apply(model, patch)?;
    for (node, name, value) in cut.attrs {
        let proto = model.graph.node_mut_proto(node);
        match proto.attribute.iter_mut().find(|a| a.name() == name) {
            Some(a) => *a = attr::int(name, value),
            None => proto.attribute.push(attr::int(name, value)),
        }
    }
    Ok(())
}

fn missing(what: &str) -> Error {
    Error::Patch(format!("pruning: {what} is not there"))
}

/// Constant int vector `v` with its last entry set to `last`.
fn ending_in(g: &Graph, v: ValueId, last: usize) -> Result<Tensor> {
    let mut ints = matching::const_ints(g, v).ok_or_else(|| missing(g.value_name(v)))?;
    if let Some(l) = ints.last_mut() {
        *l = last as i64;
    }
    Tensor::from_i64(g.value_name(v), &[ints.len() as i64], &ints)
}

/// A new value holding computed shape `v` with its last entry set to `last`: its Concat
/// again with the constant last piece rewritten where it has one, else
/// `Concat(Slice(v, 0, -1), [last])`.
fn shape_ending_in(g: &Graph, patch: &mut Patch, v: ValueId, last: usize) -> Result<PValue> {
    if let Some((concat, piece)) = shape_concat(g, v) {
        let node = g.node(concat);
        let piece = patch.new_initializer(g.value_name(piece), ending_in(g, piece, last)?);
        let mut inputs: Vec<Option<PValue>> =
            node.inputs.iter().map(|i| i.map(PValue::from)).collect();
        if let Some(l) = inputs.last_mut() {
            *l = Some(piece);
        }
        let shape = patch.new_value(g.value_name(v));
        // Unnamed, so the patch gives it a fresh name.
        let proto = NodeProto {
            name: None,
            ..node.proto.clone()
        };
        patch.add_node_proto(proto, &inputs, &[shape]);
        return Ok(shape);
    }
    let mut int = |name: &str, v: i64| -> Result<PValue> {
        Ok(patch.new_initializer(name, Tensor::from_i64(name, &[1], &[v])?))
    };
    let (start, end, last) = (
        int("start", 0)?,
        int("end", -1)?,
        int("features", last as i64)?,
    );
    let leading = patch.op("Slice", "", &[PValue::from(v), start, end], Vec::new());
    Ok(patch.op("Concat", "", &[leading, last], vec![attr::int("axis", 0)]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::shape::{Dim, ValueType};
    use crate::ir::testing::model_proto;
    use crate::passes::shape::ShapeInference;
    use crate::passes::Pass;

    /// `y = Relu(x·w1)·w2`, x f32[3, 2], four hidden neurons: all entry columns alike, exit
    /// rows of norms 4, 1, 3, 2.
    fn ffn() -> Model {
        let mut proto = model_proto(
            &["x"],
            &["y"],
            &[],
            &[
                ("MatMul", &["x", "w1"], &["h"]),
                ("Relu", &["h"], &["a"]),
                ("MatMul", &["a", "w2"], &["y"]),
            ],
        );
        let g = proto.graph.as_mut().unwrap();
        let w1 = Tensor::from_f32("w1", &[2, 4], &[1.0; 8]).unwrap();
        let w2 = Tensor::from_f32("w2", &[4, 1], &[4.0, 1.0, 3.0, 2.0]).unwrap();
        g.initializer = vec![w1.into_proto(), w2.into_proto()];
        let x = ValueType::new(1, vec![Dim::known(3), Dim::known(2)]);
        g.input[0].r#type = Some(x.to_type_proto());
        let mut m = Model::from_proto(proto).unwrap();
        ShapeInference.run(&mut m).unwrap();
        m
    }

    fn exit(g: &Graph) -> NodeId {
        g.nodes().find(|(_, n)| n.name() == "MatMul_y").unwrap().0
    }

    #[test]
    fn ffn_neurons_rank_by_weights_or_by_activations() {
        let m = ffn();
        let g = &m.graph;
        let (_, by_weights) = ffn_cut(g, exit(g), 0.25, None).unwrap();
        assert_eq!(by_weights.removed, [1]);
        // Neuron 2 never fires on the calibration data: it goes first, whatever its weights.
        let hidden = g.find_value("a").unwrap();
        let energy = FeatureEnergy::from([(hidden, vec![1.0, 1.0, 0.0, 1.0])]);
        let (cut, by_activations) = ffn_cut(g, exit(g), 0.25, Some(&energy)).unwrap();
        assert_eq!(by_activations.removed, [2]);
        assert_eq!((by_activations.before, by_activations.after), (4, 3));
        let mut pruned = m.clone();
        apply(&mut pruned, cut, &mut Rewrites::default()).unwrap();
        let dims = |name: &str| {
            let g = &pruned.graph;
            g.initializer(g.find_value(name).unwrap())
                .unwrap()
                .dims()
                .to_vec()
        };
        assert_eq!((dims("w1"), dims("w2")), (vec![2, 3], vec![3, 1]));
        let w2 = pruned
            .graph
            .initializer(pruned.graph.find_value("w2").unwrap());
        assert_eq!(w2.unwrap().to_f32_vec().unwrap(), [4.0, 1.0, 2.0]);
    }

    #[test]
    fn the_least_important_units_go_ties_by_index() {
        assert_eq!(least_important(&[3.0, 1.0, 2.0, 1.0], 0.5), vec![1, 3]);
        assert_eq!(least_important(&[3.0, 1.0, 2.0, 1.0], 0.25), vec![1]);
        // At least one unit stays.
        assert_eq!(least_important(&[1.0, 2.0], 1.0), vec![0]);
        assert!(least_important(&[1.0, 2.0, 3.0], 0.1).is_empty());
    }

    #[test]
    fn slicing_keeps_the_chosen_indices_along_the_axis() -> Result<()> {
        let t = Tensor::from_f32("w", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?;
        let columns = slice_tensor(&t, 1, &[0, 2])?;
        assert_eq!(columns.dims(), [2, 2]);
        assert_eq!(columns.to_f32_vec()?, [1.0, 3.0, 4.0, 6.0]);
        let rows = slice_tensor(&t, 0, &[1])?;
        assert_eq!(rows.to_f32_vec()?, [4.0, 5.0, 6.0]);
        Ok(())
    }
}
