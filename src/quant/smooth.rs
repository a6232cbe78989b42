//! SmoothQuant: moves the activation outliers of transformer blocks into the weights before
//! static INT8 calibration (Xiao et al., 2023).
//!
//! Matches: a normalization (LayerNormalization over the last axis, `com.microsoft`
//! SkipLayerNormalization, SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization,
//! RMSNormalization) with a constant scale γ (and bias β) whose normalized output is read only
//! as the input of projections with constant 2-D weights: MatMul, Gemm without transA, packed
//! `com.microsoft` Attention, possibly behind Reshapes that keep the features last. These are
//! the Q/K/V and FFN entries, whose per-tensor activation scale a few outlier channels blow up.
//!
//! Where the output is also read by something else (BERT's post-LN residual), the
//! projections read it through a new `Mul(x, 1/s)` instead, and the residual keeps x.
//!
//! Produces: for each channel j, `s_j = max|x_j|^α / max|W_j|^(1−α)` (`max|x_j|` over the
//! calibration batches, `max|W_j|` over row j of every reading weight), every reading
//! weight's row j multiplied by s_j, and x divided by s: γ and β divided by s when the
//! projections are the only readers, else the Mul.
//!
//! Why it is safe: `(x/s)·(diag(s)·W) = x·W`, and the normalization's output is `γ·n + β`, so
//! dividing γ and β by s divides exactly that output when nothing else reads it. In float32
//! the results differ by rounding only (the tests check it in tract). Shared constants are
//! copied, not changed.

use crate::error::{Error, Result};
use crate::exec::features::feature_abs_max;
use crate::exec::Batch;
use crate::ir::{attr, Graph, Model, NodeId, Patch, Tensor, Use, ValueId};
use crate::ops::weights::features_last_axis;
use crate::passes::{matching, Rewrites};
use crate::quant::QuantTarget;

/// The usual migration strength, the paper's.
pub const DEFAULT_ALPHA: f64 = 0.5;

/// SmoothQuant's strength when the user asks for none: `DEFAULT_ALPHA` for dynamic INT8
/// (`dynamic`) and for static INT8 for ONNX Runtime, none for static INT8 for TensorRT.
/// Measured on all-MiniLM-L6-v2, embedding cosine to float32 on held-out sentences
/// (`scripts/heldout_cosine.py`, mean / min over 214): dynamic 0.9941 → 0.9960 (held-back
/// calibration sentences, 8 generated batches); static for ONNX Runtime, calibrated on
/// `calib/minilm/fixed128`, 0.9939 / 0.984 → 0.9967 / 0.991; static for TensorRT, whose
/// residual inputs are quantized too, 0.9797 / 0.956 → 0.9818 / 0.949, a worse worst case.
pub fn default_alpha(target: QuantTarget, dynamic: bool) -> Option<f64> {
    (dynamic || target == QuantTarget::Ort).then_some(DEFAULT_ALPHA)
}

/// What smoothing did, for the report.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SmoothReport {
    pub alpha: f64,
    /// The batches that measured the channels' ranges.
    pub batches: usize,
    /// The normalizations whose outputs were smoothed.
    pub smoothed: Vec<String>,
    /// The largest and smallest channel scale applied.
    pub max_scale: f64,
    pub min_scale: f64,
    pub rewrites: Rewrites,
}

/// `(domain, operator, γ slot, β slot, outputs that must be unread)`.
type NormSpec = (
    &'static str,
    &'static str,
    usize,
    Option<usize>,
    &'static [usize],
);

const NORMALIZATIONS: &[NormSpec] = &[
    ("", "LayerNormalization", 1, Some(2), &[1, 2]),
    ("", "RMSNormalization", 1, None, &[]),
    (
        "com.microsoft",
        "SkipLayerNormalization",
        2,
        Some(3),
        &[1, 2],
    ),
    (
        "com.microsoft",
        "SimplifiedLayerNormalization",
        1,
        None,
        &[1],
    ),
    (
        "com.microsoft",
        "SkipSimplifiedLayerNormalization",
        2,
        None,
        &[1, 2],
    ),
];

/// One normalization to smooth and the weights that read its output.
struct Site {
    norm: NodeId,
    /// The normalized output.
    out: ValueId,
    gamma_slot: usize,
    beta_slot: Option<usize>,
    /// Weight slots reading the features: (node, slot, axis of the features).
    rows: Vec<(NodeId, usize, usize)>,
    /// The readers of `out` that lead to those weights (projections, or Reshapes in front of
    /// them); `None` when they are all of its readers, so γ and β absorb the scales.
    shared: Option<Vec<NodeId>>,
}

/// Smooths every matching block of `model` with migration strength `alpha` (0: nothing
/// moves; 0.5, the paper's default, balances activations and weights; 1: all into weights).
pub fn smooth_quant(model: &mut Model, batches: &[Batch], alpha: f64) -> Result<SmoothReport> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(Error::InvalidArgument(format!(
            "--smooth-quant {alpha}: expected a migration strength in [0, 1]"
        )));
    }
    let g = &model.graph;
    let sites: Vec<Site> = g
        .topological_order()?
        .into_iter()
        .filter_map(|id| site(g, id))
        .collect();
    let mut report = SmoothReport {
        alpha,
        batches: batches.len(),
        min_scale: f64::INFINITY,
        ..Default::default()
    };
    if sites.is_empty() {
        report.min_scale = 1.0;
        report.max_scale = 1.0;
        return Ok(report);
    }
    let outs: Vec<ValueId> = sites.iter().map(|s| s.out).collect();
    let activations = feature_abs_max(model, &outs, batches)
        .map_err(|e| Error::Quantization(format!("SmoothQuant calibration run: {e}")))?;
    for site in &sites {
        let g = &model.graph;
        let Some(x_max) = activations.get(&site.out) else {
            continue;
        };
        let Some(w_max) = weight_row_maxima(g, &site.rows, x_max.len()) else {
            continue;
        };
        let scales: Vec<f32> = x_max
            .iter()
            .zip(&w_max)
            .map(|(&x, &w)| match x > 0.0 && w > 0.0 {
                true => (x.powf(alpha) / w.powf(1.0 - alpha)).clamp(1e-5, 1e5) as f32,
                false => 1.0,
            })
            .collect();
        let mut patch = Patch::new("smooth-quant");
        match &site.shared {
            None => {
                scale_input(g, &mut patch, site.norm, site.gamma_slot, 0, &scales, true)?;
                if let Some(beta) = site
                    .beta_slot
                    .filter(|&b| g.node(site.norm).input(b).is_some())
                {
                    scale_input(g, &mut patch, site.norm, beta, 0, &scales, true)?;
                }
            }
            Some(readers) => {
                let inverse: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
                let name = format!("{}.smooth", g.value_name(site.out));
                let inverse = Tensor::from_f32(&name, &[inverse.len() as i64], &inverse)?;
                let inverse = patch.new_initializer(&name, inverse);
                let smoothed = patch.op("Mul", "", &[site.out.into(), inverse], Vec::new());
                for &reader in readers {
                    patch.replace_input(reader, 0, smoothed);
                }
            }
        }
        for &(node, slot, axis) in &site.rows {
            scale_input(g, &mut patch, node, slot, axis, &scales, false)?;
        }
        report.rewrites.apply(model, patch)?;
        report
            .smoothed
            .push(model.graph.node(site.norm).name().to_string());
        for &s in &scales {
            report.max_scale = report.max_scale.max(f64::from(s));
            report.min_scale = report.min_scale.min(f64::from(s));
        }
    }
    if report.smoothed.is_empty() {
        report.min_scale = 1.0;
    }
    Ok(report)
}

/// The site at normalization `id`, if it matches (see the module doc).
fn site(g: &Graph, id: NodeId) -> Option<Site> {
    let node = g.node(id);
    let &(_, _, gamma_slot, beta_slot, unread) = NORMALIZATIONS
        .iter()
        .find(|(d, op, ..)| node.domain() == *d && node.op_type() == *op)?;
    if node.op_type() == "LayerNormalization" || node.op_type() == "RMSNormalization" {
        let rank = g.value_type(node.input(0)?)?.rank()? as i64;
        let axis = attr::get_int(&node.proto, "axis").unwrap_or(-1);
        if axis != -1 && axis != rank - 1 {
            return None;
        }
    }
    let out = node.output(0)?;
    let width = matching::last_dim(g, out)? as usize;
    let is_vector = |slot: usize| {
        node.input(slot)
            .and_then(|v| g.constant(v))
            .is_some_and(|t| t.dims() == [width as i64])
    };
    let beta_ok = beta_slot.is_none_or(|b| node.input(b).is_none() || is_vector(b));
    let unread_ok = unread.iter().all(|&o| {
        node.outputs
            .get(o)
            .copied()
            .flatten()
            .is_none_or(|v| g.uses(v).is_empty() && !g.is_graph_output(v))
    });
    if !is_vector(gamma_slot) || !beta_ok || !unread_ok {
        return None;
    }
    // The readers leading only to projections; the others (a residual) keep x.
    let mut rows = Vec::new();
    let mut projecting = Vec::new();
    for &(reader, u) in g.uses(out) {
        if let Some(r) = (u == Use::Input(0))
            .then(|| reader_rows(g, reader, width))
            .flatten()
        {
            rows.extend(r);
            projecting.push(reader);
        }
    }
    projecting.dedup();
    if rows.is_empty() || rows.iter().any(|&(node, ..)| writes_an_output(g, node)) {
        return None;
    }
    let exclusive = projecting.len() == g.uses(out).len() && !g.is_graph_output(out);
    Some(Site {
        norm: id,
        out,
        gamma_slot,
        beta_slot,
        rows,
        shared: (!exclusive).then_some(projecting),
    })
}

/// True when projection `node` writes a graph output, itself or through its bias Add: the
/// model's output projection (an LM head, a classifier). Its norm stays unsmoothed. The
/// logits are the answer, with no normalization after them, and scaling the rows of a
/// vocabulary-wide weight raises the per-channel scale of every column: Whisper's decoder
/// (legacy export, tiny random weights, static INT8 for ONNX Runtime) had a logits cosine
/// of 0.918 in ONNX Runtime with its final norm smoothed, 0.994 without.
fn writes_an_output(g: &Graph, node: NodeId) -> bool {
    let Some(out) = g.node(node).output(0) else {
        return false;
    };
    g.is_graph_output(out)
        || matches!(g.uses(out), [(add, _)] if g.node(*add).is("Add")
            && g.node(*add).output(0).is_some_and(|v| g.is_graph_output(v)))
}

/// The weight slots `reader` multiplies `width` features by, reading them as input 0: its
/// own when it is a projection, those behind it when it is a Reshape keeping the features
/// last whose readers all are.
fn reader_rows(g: &Graph, reader: NodeId, width: usize) -> Option<Vec<(NodeId, usize, usize)>> {
    let node = g.node(reader);
    if node.is("Reshape") {
        let out = node.output(0)?;
        if matching::last_dim(g, out)? != width as i64 || g.is_graph_output(out) {
            return None;
        }
        let mut rows = Vec::new();
        for &(r, u) in g.uses(out) {
            rows.extend(
                (u == Use::Input(0))
                    .then(|| reader_rows(g, r, width))
                    .flatten()?,
            );
        }
        return (!rows.is_empty()).then_some(rows);
    }
    let dims = g.constant(node.input(1)?)?.dims().to_vec();
    let axis = features_last_axis(node, dims.len())?;
    (dims.len() == 2 && dims[axis] == width as i64).then(|| vec![(reader, 1, axis)])
}

/// max |W| of each feature row over all the weights in `rows`.
fn weight_row_maxima(g: &Graph, rows: &[(NodeId, usize, usize)], width: usize) -> Option<Vec<f64>> {
    let mut maxima = vec![0.0f64; width];
    for &(node, slot, axis) in rows {
        let t = g.constant(g.node(node).input(slot)?)?;
        let cols = t.dims()[1] as usize;
        for (i, w) in t.to_f32_vec().ok()?.iter().enumerate() {
            let feature = if axis == 0 { i / cols } else { i % cols };
            maxima[feature] = maxima[feature].max(f64::from(w.abs()));
        }
    }
    Some(maxima)
}

/// Input `slot` of `node`, a constant, with index j along `axis` divided (`divide`) or
/// multiplied by `scales[j]`: in place when only `node` reads it, else as a copy.
fn scale_input(
    g: &Graph,
    patch: &mut Patch,
    node: NodeId,
    slot: usize,
    axis: usize,
    scales: &[f32],
    divide: bool,
) -> Result<()> {
    let missing = || Error::Quantization("SmoothQuant: a constant disappeared".into());
    let v = g.node(node).input(slot).ok_or_else(missing)?;
    let t = g.constant(v).ok_or_else(missing)?;
    let dims = t.dims().to_vec();
    let inner: usize = dims[axis + 1..].iter().map(|&d| d as usize).product();
    let mut values = t.to_f32_vec()?;
    for (i, x) in values.iter_mut().enumerate() {
        let s = scales[(i / inner) % scales.len()];
        *x = if divide { *x / s } else { *x * s };
    }
    let name = g.value_name(v);
    let scaled = Tensor::from_f32(name, &dims, &values)?;
    patch.set_constant_input(g, node, slot, scaled, ".smoothed");
    Ok(())
}
