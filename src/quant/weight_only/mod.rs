//! Weight-only quantization (`--weights int4|int8`, `--int4`): 4- or 8-bit codes for the
//! MatMuls with a constant 2-D weight, in blocks along the summed axis (`ops::nbits`),
//! activations left float.
//!
//! Matches: every default-domain MatMul whose weight (input 1) is a float32 initializer
//! `[K, N]` read only as a MatMul weight, unless `--exclude`d. A table that something else
//! reads is left float: SmolLM2's LM head reads the embedding table the Gather reads (tied
//! weights, reached through a Transpose); the LM head and the embeddings are the layers low
//! bits hurt most. With `--lm-head`, a MatMul whose weight is `Transpose(table)` of such a
//! table `[N, K]` is quantized too (the codes of `tableᵀ`), and the Gather keeps the float
//! table: the file grows by the codes, and a decoding step reads them instead of the float
//! table (on SmolLM2-135M the LM head is a fifth of the weights and the largest product).
//! The same for a `[K, N]` weight that its MatMuls and something else read (ONNX Runtime
//! GenAI's model builder ties the head so: its embedding's Gather reads `Transpose(weight)`):
//! the MatMuls take the codes, the others the float weight.
//!
//! Produces, per weight: for ONNX Runtime, `com.microsoft::MatMulNBits` in place of each
//! MatMul; for standard runtimes, a blockwise int4/uint4 (int8/uint8) `DequantizeLinear`
//! (opset 21, the model's opset raised) feeding the MatMul. The float weight is dropped.
//!
//! Methods: round-to-nearest (`grid`), or GPTQ (`gptq`) on the Gram matrices of the MatMul
//! inputs over the calibration batches (`gram`); a weight keeps whichever of the two
//! changes the layer's output on those batches less (GPTQ nearly always: the report gives
//! both errors). Memory: the Gram matrices (K² floats per distinct input) and one weight at a
//! time, read, quantized and replaced before the next, its pages in the input file handed
//! back once read; a Gram matrix is dropped once its readers are quantized.
//!
//! Why it is safe: the rewritten node computes `A · dequant(B)`, the weight the codes stand
//! for; the result is validated against the float model like every lossy mode.

pub mod gptq;
pub mod gram;
pub mod grid;

use std::collections::HashMap;

use bytes::Bytes;

use super::qdq::{self, Selection};
use super::{QuantReport, QuantTarget};
use crate::error::{Error, Result};
use crate::exec::{Batch, Engine};
use crate::ir::tensor::float_bytes;
use crate::ir::{attr, DataType, Graph, Model, NodeId, PValue, Patch, Tensor, Use, ValueId};
use crate::ops::nbits::{Bits, BlockQuantized};
use crate::ops::weights::{swaps_two_axes, transposed};
use crate::ops::MS_DOMAIN;
use crate::passes::fuse::Target;
use crate::passes::{opset, Rewrites};

/// The opset of blockwise DequantizeLinear and of int4/uint4 tensors.
pub const BLOCKWISE_OPSET: i64 = 21;
/// The default block size: the best perplexity. Larger blocks run faster at
/// `DEFAULT_ACCURACY_LEVEL`, whose kernel pays per block for every activation row:
/// SmolLM2-135M, 4-bit weights and head, ONNX Runtime 1.32, 2 threads, one shared pool,
/// against our float32 output in the same process (`scripts/llm/perplexity.py`, 1607
/// held-out tokens, float32 32.19): blocks of 32, prefill 1×128 1.32×, decode after 128
/// tokens 0.39×, after 512 0.47×, perplexity 36.12 (GPTQ; round-to-nearest 43.48); blocks
/// of 128, 0.94×, 0.35×, 0.43×, 37.79 (GPTQ; round-to-nearest 50.86).
pub const DEFAULT_BLOCK_SIZE: usize = 32;
/// MatMulNBits' default `accuracy_level`: 4, ONNX Runtime's CPU kernel quantizing the
/// activations to int8 per block (its own default for 4 bits). It decodes faster and
/// prefills slower than level 0 (float32 compute): SmolLM2-135M with 4-bit weights and head,
/// ONNX Runtime 1.32, 2 threads, an idle AVX-512-VNNI machine, against our float32 output in
/// the same process: decode after 128 tokens 0.45× (level 0: 0.53×), after 512 0.53×
/// (0.61×); prefill 1×128 1.40× (0.98×), 1×512 1.39× (1.07×). Generation spends its time
/// decoding; a prompt-only use (an embedding model) is better served by level 0.
pub const DEFAULT_ACCURACY_LEVEL: i64 = 4;

/// How the codes are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightMethod {
    /// Round to nearest, no data.
    Rtn,
    /// GPTQ on the calibration batches (`gptq`).
    Gptq,
}

#[derive(Clone, Debug)]
pub struct WeightOnlyOptions {
    /// Bits per weight: 4 or 8.
    pub bits: Bits,
    /// Weights per block along K: a power of two, at least 16 (MatMulNBits' contract; the
    /// same for both targets).
    pub block_size: usize,
    /// Zero points 8 (no zero-point input) instead of one per block.
    pub symmetric: bool,
    pub method: WeightMethod,
    /// How GPTQ walks each weight (act order, damping).
    pub gptq: gptq::GptqOptions,
    /// Also quantize a MatMul reading `Transpose(table)` of a table a Gather reads, or a
    /// weight something else reads too (a tied LM head); the float table stays for the rest.
    pub lm_head: bool,
    /// MatMulNBits' `accuracy_level` (ONNX Runtime only): 0 computes in float32, 4 lets its
    /// CPU kernel quantize the activations to int8 per block.
    pub accuracy_level: i64,
    /// MatMulNBits for ONNX Runtime, DequantizeLinear for standard runtimes.
    pub target: Target,
    pub selection: Selection,
    /// The engine the calibration runs in.
    pub engine: Engine,
}

/// One quantized weight, for the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WeightReport {
    pub name: String,
    pub k: usize,
    pub n: usize,
    /// Output error on the calibration rows relative to the output's energy,
    /// `tr(DᵀHD) / tr(WᵀHW)`, of round-to-nearest and of the codes kept (GPTQ only).
    pub rtn_error: Option<f64>,
    pub error: Option<f64>,
    /// The method whose codes were kept.
    pub kept: WeightMethod,
    /// Bytes of the float weight, and of what replaced it.
    pub float_bytes: usize,
    pub quantized_bytes: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct WeightOnlyReport {
    /// `MatMulNBits` or `DequantizeLinear`.
    pub format: &'static str,
    pub bits: Bits,
    pub method: WeightMethod,
    pub block_size: usize,
    pub symmetric: bool,
    pub calibration_rows: usize,
    pub weights: Vec<WeightReport>,
    /// Weights left float, and why.
    pub skipped: Vec<String>,
    /// Bytes of the float weights replaced, and of what replaced them.
    pub float_bytes: usize,
    pub quantized_bytes: usize,
}

impl WeightOnlyReport {
    /// Adds the weights of `other` (the same run on another graph: an `If` branch) that this
    /// report does not list by name yet: both branches of a merged decoder quantize the same
    /// weights, which the output holds once.
    pub fn absorb(&mut self, other: &WeightOnlyReport) {
        for w in &other.weights {
            if self.weights.iter().all(|mine| mine.name != w.name) {
                self.float_bytes += w.float_bytes;
                self.quantized_bytes += w.quantized_bytes;
                self.weights.push(w.clone());
            }
        }
        self.skipped.extend(other.skipped.iter().cloned());
        self.calibration_rows = self.calibration_rows.max(other.calibration_rows);
    }

    /// The mean relative output error on the calibration rows of round-to-nearest and of the
    /// codes kept, over the weights that have both.
    pub fn mean_errors(&self) -> Option<(f64, f64)> {
        let both: Vec<(f64, f64)> = self
            .weights
            .iter()
            .filter_map(|w| Some((w.rtn_error?, w.error?)))
            .collect();
        let count = both.len() as f64;
        (!both.is_empty()).then(|| {
            let (r, e) = both
                .iter()
                .fold((0.0, 0.0), |(r, e), (a, b)| (r + a, e + b));
            (r / count, e / count)
        })
    }
}

/// One weight to quantize and the MatMuls that read it.
struct Site {
    /// The `[K, N]` weight the readers multiply by: an initializer, or the output of the
    /// Transpose of `table`.
    weight: ValueId,
    /// For a weight that is `Transpose(table)`: the `[N, K]` table, kept float for its other
    /// readers, and the Transpose node, removed with its readers.
    table: Option<(ValueId, NodeId)>,
    readers: Vec<NodeId>,
    /// The input of the first reader (its Gram matrix calibrates the weight).
    input: ValueId,
    k: usize,
    n: usize,
    /// The float weight's element type (float32 or float16): DequantizeLinear's scales keep
    /// it; for ONNX Runtime a float16 weight's products run in float32 between Casts (`emit`).
    elem: DataType,
}

/// The weight element types quantized: what MatMulNBits' activations and DequantizeLinear's
/// scales may be.
fn quantizable(elem: DataType) -> bool {
    matches!(elem, DataType::Float | DataType::Float16)
}

/// Quantizes the weights of `model`'s MatMuls to 4 bits (see the module doc), calibrating
/// on `batches` for GPTQ. `on_weight(done, total)` reports progress.
pub fn quantize_weights(
    model: &mut Model,
    batches: &[Batch],
    options: &WeightOnlyOptions,
    on_weight: &(dyn Fn(usize, usize) + Sync),
) -> Result<QuantReport> {
    let b = options.block_size;
    if b < 16 || !b.is_power_of_two() {
        return Err(Error::InvalidArgument(format!(
            "--block-size {b}: expected a power of two, at least 16"
        )));
    }
    let damping = options.gptq.damping;
    if !(damping.is_finite() && damping >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "--gptq-damping {damping}: expected a fraction, at least 0"
        )));
    }
    let already = qdq::quantization_ops(model);
    let (sites, skipped) = sites(&model.graph, &options.selection, options.lm_head);
    let mut report = WeightOnlyReport {
        format: match options.target {
            Target::Ort => "MatMulNBits",
            Target::Onnx => "DequantizeLinear",
        },
        bits: options.bits,
        method: options.method,
        block_size: b,
        symmetric: options.symmetric,
        calibration_rows: 0,
        weights: Vec::new(),
        skipped,
        float_bytes: 0,
        quantized_bytes: 0,
    };
    let mut rewrites = Rewrites::default();
    if already.is_empty() && !sites.is_empty() {
        match options.target {
            Target::Ort => model.require_opset(MS_DOMAIN, 1),
            Target::Onnx => opset::raise(model, BLOCKWISE_OPSET)?,
        }
        let mut grams = match options.method {
            WeightMethod::Rtn => HashMap::new(),
            WeightMethod::Gptq => {
                let mut inputs: Vec<ValueId> = sites.iter().map(|s| s.input).collect();
                inputs.sort();
                inputs.dedup();
                gram::collect(model, &inputs, batches, options.engine)
                    .map_err(|e| Error::Quantization(format!("weight-only calibration run: {e}")))?
            }
        };
        report.calibration_rows = grams.values().map(|g| g.rows).max().unwrap_or(0);
        // Sites reading one input are done together, so that its Gram matrix goes after.
        let mut remaining: HashMap<ValueId, usize> = HashMap::new();
        for s in &sites {
            *remaining.entry(s.input).or_default() += 1;
        }
        for (done, site) in sites.iter().enumerate() {
            let t = model
                .graph
                .initializer(site.table.map_or(site.weight, |(table, _)| table))
                .ok_or_else(|| Error::Quantization("a weight is no longer a constant".into()))?;
            let values = t.to_f32_vec()?;
            let float_bytes = t.byte_len();
            report.float_bytes += float_bytes;
            // The float weight is read once: its pages in the input file need not stay
            // resident while the rest are quantized (a 1B model's would add up to the file).
            // A table a Gather still reads is read from the file again when it runs.
            if let (Some(source), Some(raw)) = (&model.source, &t.proto().raw_data) {
                source.release_pages_of(raw);
            }
            let w = match site.table {
                None => values,
                Some(_) => transposed(&values, site.n, site.k),
            };
            let name = model.graph.value_name(site.weight).to_string();
            let (q, weight_report) =
                quantize_weight(&w, site, &name, grams.get(&site.input), options);
            drop(w);
            let before = report.quantized_bytes;
            let patch = emit(&model.graph, site, &name, &q, options, &mut report)?;
            rewrites.apply(model, patch)?;
            report.weights.push(WeightReport {
                float_bytes,
                quantized_bytes: report.quantized_bytes - before,
                ..weight_report
            });
            let left = remaining.entry(site.input).or_default();
            *left -= 1;
            if *left == 0 && grams.remove(&site.input).is_some() {
                crate::exec::return_freed_memory();
            }
            on_weight(done + 1, sites.len());
        }
    }
    Ok(QuantReport {
        mode: match options.bits {
            Bits::Four => "int4",
            Bits::Eight => "int8-weights",
        },
        target: match options.target {
            Target::Ort => QuantTarget::Ort,
            Target::Onnx => QuantTarget::Trt,
        },
        calibration: None,
        rewrites,
        already_quantized: already,
        auto_exclusion: None,
        smoothing: None,
        weight_only: Some(report),
        product_weights: None,
    })
}

/// The codes of one weight: round-to-nearest, or GPTQ when a Gram matrix is given and it
/// moves the output less.
fn quantize_weight(
    w: &[f32],
    site: &Site,
    name: &str,
    gram: Option<&gram::Gram>,
    options: &WeightOnlyOptions,
) -> (BlockQuantized, WeightReport) {
    let (k, n, block, symmetric) = (site.k, site.n, options.block_size, options.symmetric);
    let rtn = grid::round_to_nearest(options.bits, w, k, n, block, symmetric);
    let mut report = WeightReport {
        name: name.to_string(),
        k,
        n,
        rtn_error: None,
        error: None,
        kept: WeightMethod::Rtn,
        // Known once the codes are written (`quantize_weights`).
        float_bytes: 0,
        quantized_bytes: 0,
    };
    let Some(gram) = gram.filter(|g| g.matrix.nrows() == k) else {
        return (rtn, report);
    };
    let energy = gptq::output_error(w, &vec![0.0; w.len()], &gram.matrix).max(f64::MIN_POSITIVE);
    let rtn_error = gptq::output_error(w, &rtn.dequantize(), &gram.matrix) / energy;
    report.rtn_error = Some(rtn_error);
    report.error = Some(rtn_error);
    let calibrated = gptq::gptq(
        options.bits,
        w,
        n,
        block,
        symmetric,
        &gram.matrix,
        options.gptq,
    );
    let Some(calibrated) = calibrated else {
        return (rtn, report);
    };
    let error = gptq::output_error(w, &calibrated.dequantize(), &gram.matrix) / energy;
    if error < rtn_error {
        report.error = Some(error);
        report.kept = WeightMethod::Gptq;
        return (calibrated, report);
    }
    (rtn, report)
}

/// `Transpose(table, perm [1, 0])` of a 2-D float32 initializer read by `reader` alone: the
/// table and the Transpose node.
fn transposed_table(g: &Graph, weight: ValueId, reader: NodeId) -> Option<(ValueId, NodeId)> {
    let transpose = g.producer(weight)?;
    let node = g.node(transpose);
    let table = node.input(0)?;
    let t = g.initializer(table)?;
    let only_reader =
        g.uses(weight).iter().all(|&(r, _)| r == reader) && !g.is_graph_output(weight);
    (swaps_two_axes(node) && t.dims().len() == 2 && quantizable(t.dtype()) && only_reader)
        .then_some((table, transpose))
}

/// The weights to quantize, and the float 2-D MatMul weights left out, with why.
fn sites(g: &Graph, selection: &Selection, lm_head: bool) -> (Vec<Site>, Vec<String>) {
    let mut by_weight: HashMap<ValueId, Site> = HashMap::new();
    let mut order = Vec::new();
    let mut skipped = Vec::new();
    let Ok(topological) = g.topological_order() else {
        return (Vec::new(), skipped);
    };
    for id in topological {
        let node = g.node(id);
        if !(node.domain().is_empty() && node.is("MatMul")) || selection.excludes(node) {
            continue;
        }
        let (Some(input), Some(weight)) = (node.input(0), node.input(1)) else {
            continue;
        };
        if let Some((table, transpose)) = transposed_table(g, weight, id) {
            let name = g.value_name(table);
            let Some(t) = g.initializer(table) else {
                continue;
            };
            match t.dims() {
                &[n, k] if lm_head && n >= 1 && k >= 1 => {
                    order.push(weight);
                    by_weight.insert(
                        weight,
                        Site {
                            weight,
                            table: Some((table, transpose)),
                            readers: vec![id],
                            input,
                            k: k as usize,
                            n: n as usize,
                            elem: t.dtype(),
                        },
                    );
                }
                _ => skipped.push(format!(
                    "{name}: read through a Transpose by a MatMul (a tied LM head, say); \
                     --lm-head quantizes it"
                )),
            }
            continue;
        }
        let Some(t) = g.initializer(weight) else {
            continue;
        };
        let &[k, n] = t.dims() else { continue };
        if !quantizable(t.dtype()) || k < 1 || n < 1 {
            continue;
        }
        if let Some(site) = by_weight.get_mut(&weight) {
            site.readers.push(id);
            continue;
        }
        let only_matmul_weight = g.uses(weight).iter().all(|&(reader, slot)| {
            let r = g.node(reader);
            slot == Use::Input(1) && r.domain().is_empty() && r.is("MatMul")
        });
        if g.is_graph_output(weight) {
            skipped.push(format!("{}: a graph output", g.value_name(weight)));
            continue;
        }
        // A table read both as an LM head's weight and, through a Transpose, by the
        // embedding's Gather (ONNX Runtime GenAI's model builder ties them so): with
        // `--lm-head` its MatMuls take the codes and the float table stays for the rest.
        if !only_matmul_weight && !lm_head {
            skipped.push(format!(
                "{}: also read as something other than a MatMul weight (a tied LM head, say); \
                 --lm-head quantizes its MatMuls",
                g.value_name(weight)
            ));
            continue;
        }
        order.push(weight);
        by_weight.insert(
            weight,
            Site {
                weight,
                table: None,
                readers: vec![id],
                input,
                k: k as usize,
                n: n as usize,
                elem: t.dtype(),
            },
        );
    }
    let sites = order
        .into_iter()
        .filter_map(|w| by_weight.remove(&w))
        .collect();
    (sites, skipped)
}

/// The patch that replaces `site`'s weight by `q` in the target's form.
fn emit(
    g: &Graph,
    site: &Site,
    name: &str,
    q: &BlockQuantized,
    options: &WeightOnlyOptions,
    report: &mut WeightOnlyReport,
) -> Result<Patch> {
    let mut patch = Patch::new("weight-only");
    let (k, n, blocks) = (site.k as i64, site.n as i64, q.blocks() as i64);
    let bits = q.bits;
    let codes_suffix = format!("q{}", bits.count());
    let mut initializer = |patch: &mut Patch, suffix: &str, dt, dims: &[i64], data: Vec<u8>| {
        report.quantized_bytes += data.len();
        let hint = format!("{name}.{suffix}");
        Tensor::from_raw(&hint, dt, dims, Bytes::from(data))
            .map(|t| patch.new_initializer(&hint, t))
    };
    match options.target {
        Target::Ort => {
            let weight = initializer(
                &mut patch,
                &codes_suffix,
                DataType::Uint8,
                &[n, blocks, (options.block_size * bits.count() / 8) as i64],
                q.matmul_nbits_weight(),
            )?;
            // ONNX Runtime's float16 MatMulNBits on CPU gave wrong products inside a model
            // run without its graph optimizations (ORT 1.32: MiniLM in float16, cosine 0.44,
            // right only when each product was also a graph output): a float16 model's
            // products run in float32 between Casts, which every level runs right.
            let scales = initializer(
                &mut patch,
                "scales",
                DataType::Float,
                &[n * blocks],
                float_bytes(&q.scales, DataType::Float)?,
            )?;
            let zeros = match q.matmul_nbits_zero_points() {
                Some(z) => Some(initializer(
                    &mut patch,
                    "zero_points",
                    DataType::Uint8,
                    &[z.len() as i64],
                    z,
                )?),
                None => None,
            };
            for &reader in &site.readers {
                let node = g.node(reader);
                let (Some(a), Some(out)) = (node.input(0), node.output(0)) else {
                    continue;
                };
                let mut proto = node.proto.clone();
                proto.op_type = Some("MatMulNBits".into());
                proto.domain = Some(MS_DOMAIN.into());
                proto.attribute = vec![
                    attr::int("K", k),
                    attr::int("N", n),
                    attr::int("bits", bits.count() as i64),
                    attr::int("block_size", options.block_size as i64),
                    attr::int("accuracy_level", options.accuracy_level),
                ];
                let float16 = site.elem == DataType::Float16;
                let cast = |patch: &mut Patch, from: PValue, to: PValue, elem: DataType| {
                    let to_type = attr::int("to", elem as i64);
                    patch.add_node("Cast", "", &[Some(from)], &[to], vec![to_type]);
                };
                let a = match float16 {
                    true => {
                        let a_float = patch.new_value(&format!("{name}.input_float"));
                        cast(&mut patch, a.into(), a_float, DataType::Float);
                        a_float
                    }
                    false => a.into(),
                };
                let product = match float16 {
                    true => patch.new_value(&format!("{name}.product_float")),
                    false => PValue::Old(out),
                };
                let mut inputs = vec![Some(a), Some(weight), Some(scales)];
                inputs.extend(zeros.map(Some));
                patch.add_node_proto(proto, &inputs, &[product]);
                if float16 {
                    cast(&mut patch, product, PValue::Old(out), DataType::Float16);
                }
                patch.remove_node(reader);
            }
            let codes = TiedCodes {
                weight,
                scales,
                zeros,
                n,
                k,
                blocks,
            };
            // No tied Gather to take the codes, or no form every release reads alike: the
            // float table stays for the Gather.
            let _ = gather_codes(g, site, &codes, options, &mut patch);
        }
        Target::Onnx => {
            let (codes, scales, zeros) = q.dequantize_linear_inputs();
            let code_type = match (bits, zeros.is_some()) {
                (Bits::Four, true) => DataType::Uint4,
                (Bits::Four, false) => DataType::Int4,
                (Bits::Eight, true) => DataType::Uint8,
                (Bits::Eight, false) => DataType::Int8,
            };
            let codes = initializer(&mut patch, &codes_suffix, code_type, &[k, n], codes)?;
            let scales = initializer(
                &mut patch,
                "scales",
                site.elem,
                &[blocks, n],
                float_bytes(&scales, site.elem)?,
            )?;
            let zeros = match zeros {
                Some(z) => Some(initializer(
                    &mut patch,
                    "zero_points",
                    code_type,
                    &[blocks, n],
                    z,
                )?),
                None => None,
            };
            let mut inputs = vec![Some(codes), Some(scales)];
            inputs.extend(zeros.map(Some));
            let dequantized = patch.new_value(&format!("{name}.dequantized"));
            patch.add_node(
                "DequantizeLinear",
                "",
                &inputs,
                &[dequantized],
                vec![
                    attr::int("axis", 0),
                    attr::int("block_size", options.block_size as i64),
                ],
            );
            for &reader in &site.readers {
                patch.replace_input(reader, 1, dequantized);
            }
        }
    }
    // The head's Transpose of the table goes with the head.
    if let Some((_, transpose)) = site.table {
        patch.remove_node(transpose);
    }
    // Read by nothing the patch keeps (a tied embedding's Gathers took the codes too, or
    // there are none), the float weight goes; else it stays for its other readers.
    let float = site.table.map_or(site.weight, |(table, _)| table);
    let removed = patch.removed_nodes();
    let unread = g
        .uses(float)
        .iter()
        .all(|(r, _)| removed.contains(r) || site.readers.contains(r));
    if unread && !g.is_graph_output(float) {
        patch.drop_initializer(float);
    }
    Ok(patch)
}

/// The MatMulNBits inputs of a tied LM head, for its embedding's Gathers.
struct TiedCodes {
    weight: PValue,
    scales: PValue,
    zeros: Option<PValue>,
    n: i64,
    k: i64,
    blocks: i64,
}

/// The Gathers of the embedding table tied to `site`'s LM head (`--lm-head`): each reads the
/// `[N, K]` table the codes stand for, directly (torch's exporters: the head reads
/// `Transpose(table)`) or through a Transpose of the head's `[K, N]` weight (the model
/// builder's). Axis 0, the Gather's own input 0.
fn tied_gathers(g: &Graph, site: &Site) -> Vec<(NodeId, Option<NodeId>)> {
    let gathers_of = |table: ValueId, through: Option<NodeId>| -> Vec<(NodeId, Option<NodeId>)> {
        g.uses(table)
            .iter()
            .filter(|&&(r, slot)| {
                let node = g.node(r);
                slot == Use::Input(0)
                    && node.domain().is_empty()
                    && node.is("Gather")
                    && attr::get_int(&node.proto, "axis").unwrap_or(0) == 0
            })
            .map(|&(r, _)| (r, through))
            .collect()
    };
    match site.table {
        Some((table, _)) => gathers_of(table, None),
        None => g
            .uses(site.weight)
            .iter()
            .filter_map(|&(r, _)| {
                let node = g.node(r);
                let moved = node.output(0)?;
                let gathers = gathers_of(moved, Some(r));
                let only_gathers =
                    g.uses(moved).len() == gathers.len() && !g.is_graph_output(moved);
                (swaps_two_axes(node) && only_gathers).then_some(gathers)
            })
            .flatten()
            .collect(),
    }
}

/// With `--lm-head` for ONNX Runtime, 4-bit codes whose K is whole blocks: the tied
/// embedding's Gathers become `com.microsoft` GatherBlockQuantized on the same codes, scales
/// and zero points (Reshaped to the rows it gathers), so the tied table is stored once, in 4
/// bits, and the float table goes. Its zero points need an even block count per row: ONNX
/// Runtime 1.27 on pads each row's packed zero points to a whole byte, 1.23 to 1.26 packed
/// them across rows (the same bytes when the count is even; measured, `K` of 3 blocks is
/// 2.0 off in 1.25.1).
fn gather_codes(
    g: &Graph,
    site: &Site,
    codes: &TiedCodes,
    options: &WeightOnlyOptions,
    patch: &mut Patch,
) -> Option<()> {
    let block = options.block_size as i64;
    let fits = options.bits == Bits::Four
        && codes.k % block == 0
        && (codes.zeros.is_none() || codes.blocks % 2 == 0)
        && site.elem == DataType::Float;
    let gathers = tied_gathers(g, site);
    if !options.lm_head || !fits || gathers.is_empty() {
        return None;
    }
    let reshaped = |patch: &mut Patch, v: PValue, dims: &[i64], hint: &str| {
        let shape = Tensor::from_i64(hint, &[dims.len() as i64], dims).ok()?;
        let shape = patch.new_initializer(&format!("{hint}.shape"), shape);
        let out = patch.new_value(hint);
        patch.add_node("Reshape", "", &[Some(v), Some(shape)], &[out], vec![]);
        Some(out)
    };
    let (n, k, blocks) = (codes.n, codes.k, codes.blocks);
    let data = reshaped(patch, codes.weight, &[n, k / 2], "tied_codes")?;
    let scales = reshaped(patch, codes.scales, &[n, blocks], "tied_scales")?;
    let zeros = match codes.zeros {
        Some(z) => Some(reshaped(patch, z, &[n, blocks / 2], "tied_zero_points")?),
        None => None,
    };
    for (gather, transpose) in gathers {
        let node = g.node(gather);
        let (Some(ids), Some(out)) = (node.input(1), node.output(0)) else {
            continue;
        };
        let mut inputs = vec![Some(data), Some(ids.into()), Some(scales)];
        inputs.extend(zeros.map(Some));
        let attributes = vec![
            attr::int("gather_axis", 0),
            attr::int("quantize_axis", 1),
            attr::int("block_size", block),
            attr::int("bits", 4),
        ];
        patch.add_node(
            "GatherBlockQuantized",
            MS_DOMAIN,
            &inputs,
            &[PValue::Old(out)],
            attributes,
        );
        patch.remove_node(gather);
        if let Some(transpose) = transpose {
            patch.remove_node(transpose);
        }
    }
    Some(())
}
