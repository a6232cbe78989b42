//! Structured pruning: attention heads and FFN neurons removed from the weight matrices.
//!
//! Matches:
//! - attention, fused (`heads`): `com.microsoft` Attention (packed `[D, 3·N·H]` Q/K/V
//!   weight), or `com.microsoft` MultiHeadAttention / ONNX Attention whose Q, K, V are each a
//!   projection `x·W (+ b)` of constant W, or one such projection split three ways;
//! - attention written out in standard operators (`unfused`): the Reshapes splitting Q, K, V
//!   into heads, followed to the Reshape merging them back;
//! - in both, every reader of the attention output must be a projection reading its features
//!   (MatMul or Gemm with a constant weight), possibly behind Reshapes that keep them last;
//! - FFN (`ffn`): a block whose output is read only as the features of such projections,
//!   computed from one or more entry projections through element-wise operators only (the
//!   GELU forms, fused or not; T5's gated Mul of two entries), whose constants are scalars or
//!   per-feature vectors.
//!
//! Produces (`cut`): the same blocks with the pruned heads' or neurons' columns gone from the
//! entry weights, biases and per-feature constants, their rows gone from the exit weights,
//! per-head inputs (a relative position bias) narrowed, and the head counts (`num_heads`,
//! `q_num_heads`/`kv_num_heads`, Reshape shapes) and feature counts rewritten. Constants read
//! elsewhere are copied, not changed.
//!
//! Why it is exact apart from the pruned units: a head's output is computed from its own Q,
//! K and V columns only and reaches the rest of the model through its own rows of the output
//! projection; an FFN neuron likewise, because element-wise operators never mix features.
//! Removing them is the same as zeroing their contribution, which is the intended change (the
//! tests check exactly that). Blocks whose layout the checks cannot prove (past key/values,
//! an output read some other way) are skipped and listed with the reason.
//!
//! Importance: without calibration data, the weight norm of what a unit reads and writes (an
//! FFN neuron: the product of its entry columns' and exit row's norms; a head: the root of
//! the summed squared norms of its Q, K, V columns and output rows). With calibration data,
//! what a unit sends on: its mean squared activation times the squared norm of the rows that
//! read it. The least important go.

mod cut;
mod ffn;
mod heads;
mod unfused;

use std::collections::HashSet;

use super::weights::Skipped;
use super::{Importance, PruneOptions};
use crate::error::Result;
use crate::exec::features::{feature_energy, FeatureStats};
use crate::ir::{attr, Graph, Model, NodeId, Tensor, Use, ValueId};
use crate::ops::weights::plain_gemm_trans_b;
use crate::passes::matching::{self, last_dim};
use crate::passes::Rewrites;
use cut::apply;
use ffn::ffn_cut;
use heads::{cut_heads, head_cut, is_attention};
use unfused::unfused_layouts;

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

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StructuredReport {
    pub importance: Importance,
    pub heads: Vec<PrunedBlock>,
    pub ffn: Vec<PrunedBlock>,
    /// Attention operators left whole, and why.
    pub skipped: Vec<Skipped>,
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
        Some(feature_energy(model, &values, &options.calibration).map_err(super::calibration_run)?)
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
        let order = model.graph.topological_order()?;
        for layout in unfused_layouts(&model.graph, &order) {
            match cut_heads(&model.graph, &layout, fraction, energy) {
                Ok(Some((cut, block))) => {
                    apply(model, cut, rewrites)?;
                    report.heads.push(block);
                }
                Ok(None) => {}
                Err(reason) => report.skipped.push(Skipped {
                    weight: layout.name,
                    reason: reason.to_string(),
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
    let layout = crate::prune::mask::AxisLayout::new(&dims, axis);
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
        "Gemm" => plain_gemm_trans_b(n).map(|t| if t { 0 } else { 1 }),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_important_units_go_ties_by_index() {
        assert_eq!(least_important(&[3.0, 1.0, 2.0, 1.0], 0.5), vec![1, 3]);
        assert_eq!(least_important(&[3.0, 1.0, 2.0, 1.0], 0.25), vec![1]);
        // At least one unit stays.
        assert_eq!(least_important(&[1.0, 2.0], 1.0), vec![0]);
        assert!(least_important(&[1.0, 2.0, 3.0], 0.1).is_empty());
    }
}
