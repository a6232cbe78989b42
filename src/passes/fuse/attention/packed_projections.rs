//! For ONNX Runtime: the query, key and value projections of a fused 3-D `Attention` packed
//! into one product,
//!
//! ```text
//! q = x·Wq (+ bq), k = x·Wk (+ bk), v = x·Wv (+ bv)
//!   →   q, k, v = Split(x·[Wq | Wk | Wv] (+ [bq | bk | bv]), [Nq, Nk, Nv], axis -1)
//! ```
//!
//! where q, k and v reach the Attention's first three inputs through what the decoder fusions
//! leave between them: RotaryEmbedding, a head norm (RMSNormalization), Reshapes, a Mul by a
//! constant (`attention-unit-scale`). Matched from the projection's MatMul; the Attention must
//! be the 3-D form (`q_num_heads` set), which no rule rewrites further.
//!
//! Why: a decoding step multiplies one row by each weight, and ONNX Runtime's CPU MatMul runs
//! a narrow product (a grouped-query model's key and value projections, 192 columns on
//! SmolLM2-135M) at a lower memory rate than a wide one and dispatches its thread pool once
//! per product: three products of 576, 192 and 192 columns over thirty layers take 3.6 ms, one
//! of 960 columns and its Split 2.5 ms (ONNX Runtime 1.32, 2 threads); SmolLM2-135M's whole
//! decoding step after 512 tokens 0.35 ms less, its 512-token prefill the same within noise.
//! (Packing the MLP's gate and up projections, two of 1536 columns, gained nothing in a
//! decoding step and cost 3% of the products' time in a 512-token prefill, so they stay.)
//!
//! Safe because each column of `x·[Wq | Wk | Wv]` is the same dot product as the column of
//! the product it came from, the bias columns are added to the same columns, and the Split
//! returns each projection whole; the weights are float32 constants of the same rows, read
//! by nothing else once the three MatMuls go (the driver refuses the rewrite if another node
//! reads an intermediate).

use super::*;
use crate::ir::{Node, Use};
use crate::passes::fuse::pattern::constant;

/// A MatMul by a constant: a projection, possibly one of an Attention's three.
pub(super) fn projection() -> Pat {
    op("MatMul", [any(), constant("weight")]).named("projected")
}

/// The most nodes between a projection and the Attention reading it.
const PATH_AT_MOST: usize = 8;

/// Whether the other operand of binary `node`, read at `slot`, is a constant.
fn other_is_constant(g: &Graph, node: &Node, slot: usize) -> bool {
    node.input(1 - slot.min(1))
        .is_some_and(|other| g.constant(other).is_some())
}

/// Whether `node` passes its input `slot` on to the Attention as the decoder fusions leave
/// it: rotated, normalized per head, reshaped, or scaled by a constant.
fn carries(g: &Graph, node: &Node, slot: usize) -> bool {
    match node.op_type() {
        "RotaryEmbedding" | "RMSNormalization" | "Reshape" => slot == 0,
        "Mul" => other_is_constant(g, node, slot),
        _ => false,
    }
}

/// The 3-D Attention `v` feeds, following its only reader through `carries` nodes (and a
/// bias Add straight after the product).
fn attention_fed_by(g: &Graph, mut v: ValueId) -> Option<NodeId> {
    for _ in 0..PATH_AT_MOST {
        let [(reader, Use::Input(slot))] = *g.uses(v) else {
            return None;
        };
        let node = g.node(reader);
        if node.is("Attention") {
            let flat = attr::get_int(&node.proto, "q_num_heads").is_some();
            return (flat && slot < 3).then_some(reader);
        }
        let bias_add = node.is("Add") && other_is_constant(g, node, slot);
        if !(bias_add || carries(g, node, slot)) {
            return None;
        }
        v = node.output(0)?;
    }
    None
}

/// The projection `x · W (+ b)` behind Attention input `v`, back through `carries` nodes: the
/// value `linear` takes (the product, or its bias Add).
fn projection_behind(g: &Graph, mut v: ValueId) -> Option<ValueId> {
    for _ in 0..PATH_AT_MOST {
        if linear(g, v).is_some() {
            return Some(v);
        }
        let producer = g.node(g.producer(v)?);
        let slot = (0..producer.inputs.len()).find(|&s| {
            producer
                .input(s)
                .is_some_and(|i| g.constant(i).is_none() && carries(g, producer, s))
        })?;
        v = producer.input(slot)?;
    }
    None
}

/// One of the Attention's three projections, `input · weight (+ bias)`.
struct Projection {
    /// What the Attention's input is computed from: the product, or its bias Add.
    value: ValueId,
    input: ValueId,
    weight: Tensor,
    bias: Option<Tensor>,
    /// The MatMul, and the bias Add if any.
    nodes: Vec<NodeId>,
}

pub(super) fn build_packed(m: &Match, rw: &mut Rewrite) -> Built {
    rw.require_ort()?;
    let g = rw.graph;
    let projected = m.get("projected")?;
    let attention = attention_fed_by(g, projected).ok_or_else(|| {
        Declined::Mismatch(format!(
            "{} does not reach a 3-D Attention's query, key or value",
            g.value_name(projected)
        ))
    })?;
    let node = g.node(attention);
    let mut parts = Vec::with_capacity(3);
    for slot in 0..3 {
        let input = node
            .input(slot)
            .ok_or(Declined::Missing("attention input"))?;
        let behind = projection_behind(g, input).ok_or_else(|| {
            Declined::Mismatch(format!(
                "Attention input {slot} is not a projection by a constant"
            ))
        })?;
        let (input, weight, bias, nodes) =
            linear(g, behind).ok_or(Declined::Missing("projection"))?;
        parts.push(Projection {
            value: behind,
            input,
            weight,
            bias,
            nodes,
        });
    }
    let x = parts[0].input;
    let [q, k, v] = [parts[0].value, parts[1].value, parts[2].value];
    let distinct = q != k && k != v && q != v;
    if !distinct {
        return Err(Declined::Mismatch(
            "two of the query, key and value are the same projection".into(),
        ));
    }
    if parts.iter().any(|p| p.input != x) {
        return Err(Declined::Mismatch(
            "the query, key and value are projections of different inputs".into(),
        ));
    }
    let root = m.nodes().first().copied();
    if !parts.iter().any(|p| p.nodes.first().copied() == root) {
        return Err(Declined::Mismatch(
            "the product is not one of the Attention's projections".into(),
        ));
    }
    let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
    let packed = concat_columns(&weights).ok_or_else(|| {
        Declined::Mismatch("the weights are not float32 matrices of the same rows".into())
    })?;
    let bias = match (&parts[0].bias, &parts[1].bias, &parts[2].bias) {
        (Some(bq), Some(bk), Some(bv)) => Some(
            concat_vectors(&[bq, bk, bv])
                .ok_or_else(|| Declined::Mismatch("the biases are not float32".into()))?,
        ),
        (None, None, None) => None,
        _ => {
            return Err(Declined::Mismatch(
                "some projections have a bias and some not".into(),
            ))
        }
    };
    // Split's widths as an input.
    rw.require_opset(13)?;
    let widths: Vec<i64> = parts.iter().map(|p| p.weight.dims()[1]).collect();
    let packed = rw.constant("qkv_weight", packed);
    let mut product = rw.op("MatMul", "", &[x.into(), packed], vec![]);
    if let Some(bias) = bias {
        let bias = rw.constant("qkv_bias", bias);
        product = rw.op("Add", "", &[product, bias], vec![]);
    }
    let widths = rw.ints("qkv_widths", &widths)?;
    let outs = rw.op_with_outputs(
        "Split",
        "",
        &[Some(product), Some(widths)],
        &[true; 3],
        vec![attr::int("axis", -1)],
    );
    for (part, out) in parts.iter().zip(outs) {
        rw.replace(part.value, out.ok_or(Declined::Missing("split output"))?);
        for &n in &part.nodes {
            if Some(n) != root {
                rw.absorb(n);
            }
        }
    }
    Ok(())
}
