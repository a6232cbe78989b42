//! Attention heads of attention written out in standard operators (a graph nobody fused).
//!
//! Matches: Reshapes that split a projection's features into `[…, heads, head size]` (Q, K
//! and V), followed through the operators that keep heads apart (Transpose, MatMul over
//! batch axes, element-wise operators broadcasting over the heads, Softmax over another
//! axis, and the dynamo exporter's Reshape pairs that fold heads into the batch axis and back)
//! to the one Reshape that merges heads and head size back into features, read only by
//! projections. Every value in between is tracked with the position of its heads axis; any
//! other reader, a graph output, or a heads axis that moves into a contracted or normalized
//! position, disqualifies the block.
//!
//! Produces: a `HeadLayout` for the shared head cut, which slices the projections, narrows
//! inputs that carry a heads axis of their own (a per-head bias), and rewrites the head count
//! in the splitting and unfolding Reshapes' shapes and the feature count in the merging one's.
//!
//! Why it is exact apart from the pruned heads: every tracked operator computes each head's
//! plane from that head's planes only, so removing a head's columns removes exactly its
//! plane, as in the fused operators.

use std::collections::HashMap;

use super::heads::{projected_qkv, HeadLayout};
use super::*;
use crate::ir::shape::{same_shape, Dim};

/// The heads axis of a tracked value, and the block it belongs to. A folded axis holds
/// batch × heads (heads inner), as `[batch·heads, seq, head size]`.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Tracked {
    block: usize,
    axis: usize,
    folded: bool,
}

#[derive(Default)]
struct Block {
    heads: i64,
    head_size: i64,
    /// The Reshapes splitting Q, K and V features into heads.
    splits: Vec<NodeId>,
    /// Reshapes whose shape holds the head count, with its place from the end.
    head_counts: Vec<(NodeId, usize)>,
    merges: Vec<NodeId>,
    per_head: Vec<FeatureSlot>,
    /// Merged into another block (its index), by an operator reading both.
    merged_into: Option<usize>,
    broken: bool,
}

/// Every unfused attention block of `g` whose layout is proven, in `order`.
pub(super) fn unfused_layouts(g: &Graph, order: &[NodeId]) -> Vec<HeadLayout> {
    let mut blocks: Vec<Block> = Vec::new();
    let mut tracked: HashMap<ValueId, Tracked> = HashMap::new();
    let root = |blocks: &[Block], mut b: usize| {
        while let Some(next) = blocks[b].merged_into {
            b = next;
        }
        b
    };
    for &id in order {
        let node = g.node(id);
        let inputs: Vec<(usize, Tracked)> = node
            .inputs
            .iter()
            .enumerate()
            .filter_map(|(slot, v)| {
                let t = tracked.get(&(*v)?)?;
                let block = root(&blocks, t.block);
                Some((slot, Tracked { block, ..*t }))
            })
            .collect();
        if inputs.is_empty() {
            if let Some((heads, head_size)) = head_split(g, id) {
                let (Some(out), Some(rank)) =
                    (node.output(0), node.output(0).and_then(|o| rank(g, o)))
                else {
                    continue;
                };
                blocks.push(Block {
                    heads,
                    head_size,
                    splits: vec![id],
                    head_counts: vec![(id, 2)],
                    ..Default::default()
                });
                let block = blocks.len() - 1;
                let axis = rank - 2;
                let folded = false;
                tracked.insert(
                    out,
                    Tracked {
                        block,
                        axis,
                        folded,
                    },
                );
            }
            continue;
        }
        // One block per operator: merge the blocks it reads.
        let block = inputs[0].1.block;
        for &(_, t) in &inputs[1..] {
            // Two inputs of one other block merge it once.
            let merged = root(&blocks, t.block);
            if merged != block {
                let other = std::mem::take(&mut blocks[merged]);
                let b = &mut blocks[block];
                b.broken |=
                    other.broken || other.heads != b.heads || other.head_size != b.head_size;
                b.splits.extend(other.splits);
                b.head_counts.extend(other.head_counts);
                b.merges.extend(other.merges);
                b.per_head.extend(other.per_head);
                blocks[merged].merged_into = Some(block);
            }
        }
        match follow(g, id, &inputs, &blocks[block]) {
            Some(Step::Merge) => blocks[block].merges.push(id),
            Some(Step::Tracked {
                axis,
                folded,
                per_head,
                head_count,
            }) => {
                blocks[block].per_head.extend(per_head);
                blocks[block]
                    .head_counts
                    .extend(head_count.map(|from_end| (id, from_end)));
                for &v in node.outputs.iter().take(1).flatten() {
                    tracked.insert(
                        v,
                        Tracked {
                            block,
                            axis,
                            folded,
                        },
                    );
                }
                // Dropout's mask, say, is not followed: it must not be read.
                if node
                    .outputs
                    .iter()
                    .skip(1)
                    .flatten()
                    .any(|&v| !g.uses(v).is_empty() || g.is_graph_output(v))
                {
                    blocks[block].broken = true;
                }
            }
            None => blocks[block].broken = true,
        }
    }
    for (&v, t) in &tracked {
        if g.is_graph_output(v) || g.uses(v).iter().any(|(_, u)| *u == Use::Captured) {
            let b = root(&blocks, t.block);
            blocks[b].broken = true;
        }
    }
    blocks
        .into_iter()
        .filter(|b| {
            b.merged_into.is_none() && !b.broken && b.splits.len() == 3 && b.merges.len() == 1
        })
        .filter_map(|b| layout(g, b))
        .collect()
}

/// `(heads, head size)` when Reshape `id` splits the last axis of a value of static width
/// into `[…, heads, head size]` (both static, more than one head).
fn head_split(g: &Graph, id: NodeId) -> Option<(i64, i64)> {
    let node = g.node(id);
    if !node.is("Reshape") {
        return None;
    }
    let x = node.input(0)?;
    let out = g.value_type(node.output(0)?)?.shape?;
    let width = last_dim(g, x)?;
    let [.., heads, head_size] = out.as_slice() else {
        return None;
    };
    let (heads, head_size) = (heads.value()?, head_size.value()?);
    let split = out.len() == rank(g, x)? + 1 && heads > 1 && heads * head_size == width;
    split.then_some((heads, head_size))
}

fn rank(g: &Graph, v: ValueId) -> Option<usize> {
    g.value_type(v)?.rank()
}

enum Step {
    /// The output is tracked with its heads axis here; `per_head` inputs carry heads of their
    /// own; a Reshape unfolding heads holds their count `head_count` entries from its end.
    Tracked {
        axis: usize,
        folded: bool,
        per_head: Vec<FeatureSlot>,
        head_count: Option<usize>,
    },
    /// The Reshape merging heads and head size back into features.
    Merge,
}

/// What node `id`, reading the tracked `inputs`, does with the heads axis; `None` when it
/// mixes heads or cannot be proven not to.
fn follow(g: &Graph, id: NodeId, inputs: &[(usize, Tracked)], block: &Block) -> Option<Step> {
    let node = g.node(id);
    let out = node.output(0)?;
    let out_rank = rank(g, out)?;
    let (slot, first) = inputs[0];
    let in_rank = rank(g, node.input(slot)?)?;
    if inputs.iter().any(|(_, t)| t.folded != first.folded) {
        return None;
    }
    let keep = |axis: usize| Step::Tracked {
        axis,
        folded: first.folded,
        per_head: Vec::new(),
        head_count: None,
    };
    match node.op_type() {
        _ if !matching::is_onnx(node) => None,
        "Reshape" if slot == 0 => reshape_step(g, id, first, block),
        "Transpose" => {
            let perm = attr::get_ints(&node.proto, "perm")?;
            perm.iter().position(|&p| p == first.axis as i64).map(keep)
        }
        "Softmax" | "LogSoftmax" => {
            let a = attr::get_int(&node.proto, "axis").unwrap_or(-1);
            let a = if a < 0 { a + in_rank as i64 } else { a };
            (a != first.axis as i64).then(|| keep(first.axis))
        }
        "MatMul" => {
            // Both operands tracked, heads on the same (right-aligned) batch axis.
            let [(0, a), (1, b)] = inputs else {
                return None;
            };
            let b_rank = rank(g, node.input(1)?)?;
            let from_end = in_rank - a.axis;
            let batch = a.axis + 2 < in_rank && b.axis + 2 < b_rank && b_rank - b.axis == from_end;
            batch.then(|| keep(out_rank - from_end))
        }
        op if crate::ops::ELEMENTWISE.contains(&op) => {
            let from_end = in_rank - first.axis;
            let axis = out_rank.checked_sub(from_end)?;
            let mut per_head = Vec::new();
            for (s, v) in node.inputs.iter().enumerate() {
                let Some(v) = *v else { continue };
                if let Some((_, t)) = inputs.iter().find(|(ts, _)| *ts == s) {
                    if rank(g, v)? - t.axis != from_end {
                        return None;
                    }
                    continue;
                }
                // An untracked operand broadcasts over the heads, or has them itself.
                let shape = g.value_type(v)?.shape?;
                let Some(k) = shape.len().checked_sub(from_end) else {
                    continue;
                };
                match shape[k].value() {
                    Some(1) => {}
                    Some(h) if h == block.heads && !first.folded => per_head.push(FeatureSlot {
                        node: id,
                        slot: s,
                        axis: k,
                    }),
                    _ => return None,
                }
            }
            Some(Step::Tracked {
                axis,
                folded: first.folded,
                per_head,
                head_count: None,
            })
        }
        _ => None,
    }
}

/// What a Reshape of a tracked value does: merge heads and head size into the last axis (the
/// block's end), fold heads into the axis before them (`[b, h, s, d]` → `[b·h, s, d]`, its
/// shape saying -1 there), or unfold them back out of a folded axis.
fn reshape_step(g: &Graph, id: NodeId, t: Tracked, block: &Block) -> Option<Step> {
    let node = g.node(id);
    let x = g.value_type(node.input(0)?)?.shape?;
    let y = g.value_type(node.output(0)?)?.shape?;
    let a = t.axis;
    let heads = Dim::known(block.heads);
    let tracked = |axis: usize, folded: bool, head_count: Option<usize>| Step::Tracked {
        axis,
        folded,
        per_head: Vec::new(),
        head_count,
    };
    if t.folded {
        // [.., b·h, ..] → [.., b, h, ..]
        let unfolds = y.len() == x.len() + 1
            && y[a + 1].same(&heads)
            && y[a].mul(&heads).same(&x[a])
            && same_shape(&y[..a], &x[..a])
            && same_shape(&y[a + 2..], &x[a + 1..]);
        return unfolds.then(|| tracked(a + 1, false, Some(y.len() - (a + 1))));
    }
    // Heads and head size last, merged into the last axis (the leading axes may merge too,
    // as in GPT-2's `[b·s, features]`).
    let merges = a + 2 == x.len()
        && x[a + 1].value() == Some(block.head_size)
        && y.last()?.value() == Some(block.heads * block.head_size);
    if merges {
        return Some(Step::Merge);
    }
    // [.., b, h, ..] → [.., b·h, ..], the shape holding -1 for b·h.
    let folds = a >= 1
        && y.len() + 1 == x.len()
        && y[a - 1].same(&x[a - 1].mul(&x[a]))
        && same_shape(&y[..a - 1], &x[..a - 1])
        && same_shape(&y[a..], &x[a + 1..])
        && shape_entry(g, node.input(1)?, a - 1) == Some(-1);
    folds.then(|| tracked(a - 1, true, None))
}

/// Entry `index` of shape value `v` where it is a known constant: in a constant, or in a
/// constant piece of a Concat whose pieces before it have known lengths.
fn shape_entry(g: &Graph, v: ValueId, index: usize) -> Option<i64> {
    if let Some(ints) = matching::const_ints(g, v) {
        return ints.get(index).copied();
    }
    let node = g.node(g.producer(v)?);
    if !node.is("Concat") {
        return None;
    }
    let mut start = 0;
    for piece in node.inputs.iter() {
        let piece = (*piece)?;
        let len = g.value_type(piece)?.static_shape()?.first().copied()? as usize;
        if index < start + len {
            return matching::const_ints(g, piece)?.get(index - start).copied();
        }
        start += len;
    }
    None
}

/// The head layout of a block whose operators all keep heads apart.
fn layout(g: &Graph, b: Block) -> Option<HeadLayout> {
    let merge = b.merges[0];
    let inputs: Vec<ValueId> = b
        .splits
        .iter()
        .map(|&s| g.node(s).input(0))
        .collect::<Option<_>>()?;
    let qkv = projected_qkv(g, &inputs)?;
    let out = g.node(merge).output(0)?;
    let mut readers = feature_readers(g, out, qkv.width)?;
    // The merging Reshape's shape may spell out the feature count.
    readers.reshapes.push(merge);
    Some(HeadLayout {
        name: g.node(merge).name().to_string(),
        heads: b.heads,
        qkv,
        out,
        readers,
        per_head: b.per_head,
        attrs: Vec::new(),
        head_counts: b.head_counts,
    })
}
