//! Attention heads of fused attention operators: `com.microsoft` Attention (one packed
//! `[D, 3·N·H]` Q/K/V weight), and `com.microsoft` MultiHeadAttention or ONNX Attention whose
//! Q, K and V are each a projection, or one projection split three ways.

use std::collections::HashSet;

use super::cut::{Cut, ShapeEntry, Slice};
use super::*;

pub(super) fn is_attention(g: &Graph, id: NodeId) -> bool {
    let n = g.node(id);
    matches!(
        (n.domain(), n.op_type()),
        ("com.microsoft", "Attention")
            | ("com.microsoft", "MultiHeadAttention")
            | ("", "Attention")
    )
}

/// Where an attention block's Q, K and V columns come from.
#[derive(Default)]
pub(super) struct QkvSources {
    /// Constants holding Q/K/V columns, with how many of the three sections each holds
    /// (3 when packed into one weight).
    slots: Vec<(FeatureSlot, usize)>,
    /// The weights among them (for importance).
    weights: Vec<FeatureSlot>,
    /// Features of one section (Q, K or V).
    pub(super) width: i64,
    /// Reshapes between a packed projection and its Split, carrying all three sections.
    reshapes: Vec<NodeId>,
    /// The Split's section-sizes input, when it has one.
    split_sizes: Option<(NodeId, usize)>,
}

const NOT_PROJECTED: &str = "its Q/K/V projections are not constant weights read only by it";

/// The Q/K/V sources of attention `id`: its own packed weight (`com.microsoft` Attention),
/// or those of its three inputs (see `projected_qkv`).
fn qkv_sources(g: &Graph, id: NodeId, packed: bool) -> Option<QkvSources> {
    let node = g.node(id);
    if !packed {
        let inputs: Vec<ValueId> = (0..3).map(|s| node.input(s)).collect::<Option<_>>()?;
        return projected_qkv(g, &inputs);
    }
    let mut qkv = QkvSources::default();
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
        let b = FeatureSlot {
            node: id,
            slot: 2,
            axis: 0,
        };
        qkv.slots.push((b, 3));
    }
    Some(qkv)
}

/// The sources of three Q, K, V feature values (in any order), each read once: three
/// projections, or one projection split three ways along the features (GPT-2's fused
/// `c_attn`).
pub(super) fn projected_qkv(g: &Graph, inputs: &[ValueId]) -> Option<QkvSources> {
    let mut qkv = QkvSources::default();
    if inputs.len() != 3
        || inputs
            .iter()
            .any(|&v| g.is_graph_output(v) || g.uses(v).len() != 1)
    {
        return None;
    }
    qkv.width = last_dim(g, inputs[0])?;
    if inputs.iter().any(|&v| last_dim(g, v) != Some(qkv.width)) {
        return None;
    }
    if let Some(split) = three_way_split(g, inputs, qkv.width) {
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
    for &v in inputs {
        let (w, bias, _) = projection(g, v)?;
        qkv.slots.push((w, 1));
        qkv.slots.extend(bias.map(|b| (b, 1)));
        qkv.weights.push(w);
    }
    Some(qkv)
}

/// The Split writing exactly `outputs` (in any order) as three equal sections of `width`
/// features along the last axis.
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
    let written: HashSet<ValueId> = node.outputs.iter().flatten().copied().collect();
    let same_outputs = node.outputs.len() == 3
        && written.len() == 3
        && outputs.iter().all(|v| written.contains(v));
    (node.is("Split") && (axis == -1 || axis == rank - 1) && equal && same_outputs).then_some(id)
}

/// One attention block as a head cut sees it, fused or written out.
pub(super) struct HeadLayout {
    /// The node the block is named after.
    pub(super) name: String,
    pub(super) heads: i64,
    pub(super) qkv: QkvSources,
    /// The attention output: `qkv.width` features, head-major.
    pub(super) out: ValueId,
    pub(super) readers: Readers,
    /// Inputs with a heads axis that lose the pruned heads' planes (a per-head bias).
    pub(super) per_head: Vec<FeatureSlot>,
    /// Head-count attributes to set.
    pub(super) attrs: Vec<(NodeId, &'static str)>,
    /// Reshapes whose target shape holds the head count, with its place from the end
    /// (2 in `[…, heads, head size]`).
    pub(super) head_counts: Vec<(NodeId, usize)>,
}

/// The cut removing `fraction` of the heads of attention `id`; `Ok(None)` when none would go,
/// `Err(reason)` when its layout cannot be proven.
pub(super) fn head_cut(
    g: &Graph,
    id: NodeId,
    fraction: f64,
    energy: Option<&FeatureStats>,
) -> std::result::Result<Option<(Cut, PrunedBlock)>, String> {
    let layout = fused_layout(g, id)?;
    cut_heads(g, &layout, fraction, energy).map_err(str::to_string)
}

fn fused_layout(g: &Graph, id: NodeId) -> std::result::Result<HeadLayout, String> {
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
    let mut per_head = Vec::new();
    if let Some(bias) = input(bias_slot) {
        let shape = g.value_type(bias).and_then(|t| t.shape);
        match shape
            .as_deref()
            .map(|s| (s.len(), s.get(1).and_then(|d| d.value())))
        {
            Some((4, Some(1))) => {}
            Some((4, Some(h))) if h == heads => per_head.push(FeatureSlot {
                node: id,
                slot: bias_slot,
                axis: 1,
            }),
            _ => return Err("its attention bias has no known head axis".into()),
        }
    }
    let qkv = qkv_sources(g, id, packed).ok_or(NOT_PROJECTED)?;
    let out = node.output(0).ok_or(NOT_PROJECTED)?;
    let readers = feature_readers(g, out, qkv.width)
        .ok_or("its output is read by something other than a projection")?;
    let mut attrs = vec![(id, heads_attr)];
    if standard {
        attrs.push((id, "kv_num_heads"));
    }
    Ok(HeadLayout {
        name: node.name().to_string(),
        heads,
        qkv,
        out,
        readers,
        per_head,
        attrs,
        head_counts: Vec::new(),
    })
}

/// The cut removing `fraction` of the heads of the block `layout` describes.
pub(super) fn cut_heads(
    g: &Graph,
    layout: &HeadLayout,
    fraction: f64,
    energy: Option<&FeatureStats>,
) -> std::result::Result<Option<(Cut, PrunedBlock)>, &'static str> {
    let (heads, qkv, readers) = (layout.heads, &layout.qkv, &layout.readers);
    let width = qkv.width;
    if heads <= 1 || width % heads != 0 {
        return Err("its features do not split into its heads");
    }
    let head_size = (width / heads) as usize;

    // Importance: with activations, the energy each head's output sends through the output
    // rows, Σ E[o_f²]·‖W_O[f]‖²; else the summed squared norms of its columns and rows.
    let mut importance = vec![0.0f64; heads as usize];
    let output_rows = summed_norms(g, &readers.weights).ok_or(NOT_PROJECTED)?;
    match energy
        .and_then(|e| e.get(&layout.out))
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
    slices.extend(
        layout
            .per_head
            .iter()
            .map(|&s| slice(s, kept_heads.clone())),
    );
    let after = kept_heads.len();
    let head_counts = layout
        .head_counts
        .iter()
        .map(|&(node, from_end)| ShapeEntry {
            node,
            from_end,
            value: after,
        });
    let reshapes = qkv
        .reshapes
        .iter()
        .map(|&r| ShapeEntry::last(r, 3 * features))
        .chain(
            readers
                .reshapes
                .iter()
                .map(|&r| ShapeEntry::last(r, features)),
        )
        .chain(head_counts)
        .collect();
    let int_inputs = qkv
        .split_sizes
        .map(|(split, slot)| (split, slot, vec![features as i64; 3]))
        .into_iter()
        .collect();
    let attrs = layout
        .attrs
        .iter()
        .map(|&(node, name)| (node, name, after as i64))
        .collect();
    let cut = Cut {
        kind: "pruned-heads",
        slices,
        reshapes,
        int_inputs,
        attrs,
    };
    let block = PrunedBlock {
        node: layout.name.clone(),
        before: heads as usize,
        after,
        removed,
    };
    Ok(Some((cut, block)))
}
