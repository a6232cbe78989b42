//! The report of an `optimize` or `validate` run: per-pass counts and per-output errors, as
//! JSON (`--report FILE`) and as text for the terminal.

use std::fmt;

use crate::exec::{OutputDiff, Validation};
use crate::io::Saved;
use crate::passes::fuse::Target;
use crate::passes::{PassReport, Unfused};
use crate::prune::{Importance, PruneReport, Unstructured};
use crate::quant::{QuantReport, QuantTarget, RangeMethod};

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub onnxopt_version: &'static str,
    pub input: Option<ModelStats>,
    /// The runtime the output was built for.
    pub target: Option<Target>,
    pub passes: Option<PassReport>,
    pub pruning: Option<PruneReport>,
    pub quantization: Option<QuantReport>,
    pub validation: Option<Validation>,
    /// The output check, when nothing else validated the output.
    pub check: Option<Check>,
    pub output: Option<Saved>,
    pub warnings: Vec<String>,
    /// Each block the fusions left unfused, and why (with `--explain` or `--report`).
    pub unfused: Vec<Unfused>,
}

/// The output check of a lossless run: the input and the output model on the same
/// generated inputs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub outcome: CheckOutcome,
}

#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckOutcome {
    /// The outputs matched: the comparison.
    Passed(Validation),
    /// The output failed to run or differed: why.
    Failed(String),
    /// The check could not be made (the input model does not run on generated inputs).
    NotDone(String),
    /// Not asked for (`--no-check`).
    Skipped,
}

impl Check {
    pub fn passed(v: Validation) -> Check {
        Check {
            outcome: CheckOutcome::Passed(v),
        }
    }

    pub fn not_done(why: String) -> Check {
        Check {
            outcome: CheckOutcome::NotDone(why),
        }
    }

    pub fn skipped() -> Check {
        Check {
            outcome: CheckOutcome::Skipped,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelStats {
    pub path: String,
    pub file_bytes: u64,
    pub nodes: usize,
}

impl Report {
    pub fn new() -> Report {
        Report {
            onnxopt_version: env!("CARGO_PKG_VERSION"),
            ..Default::default()
        }
    }

    /// The blocks left unfused, one line each (`--explain`).
    pub fn unfused_text(&self) -> String {
        let lines: Vec<String> = self.unfused.iter().map(|u| format!("  {u}\n")).collect();
        format!("unfused: {}\n{}", self.unfused.len(), lines.concat())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        if let Some(p) = &self.passes {
            let state = if p.converged {
                "fixpoint"
            } else {
                "round limit"
            };
            writeln!(f, "passes: {} rounds ({state})", p.rounds)?;
            for s in &p.passes {
                writeln!(
                    f,
                    "  {:<18} nodes {:>6} -> {:<6} {:>8.3}s  {}",
                    s.pass, s.nodes_before, s.nodes_after, s.seconds, s.rewrites
                )?;
            }
        }
        if let Some(p) = &self.pruning {
            write_pruning(f, p)?;
        }
        if let Some(q) = &self.quantization {
            write_quantization(f, q)?;
        }
        if let Some(v) = &self.validation {
            write_validation(f, v)?;
        }
        if let Some(c) = &self.check {
            write_check(f, c)?;
        }
        if let Some(o) = &self.output {
            write!(f, "wrote {} ({} bytes", o.path.display(), o.bytes)?;
            if let Some((data, bytes)) = &o.external_data {
                write!(f, " + {} with {bytes} bytes", data.display())?;
            }
            writeln!(f, ")")?;
        }
        Ok(())
    }
}

fn write_pruning(f: &mut fmt::Formatter<'_>, p: &PruneReport) -> fmt::Result {
    let (before, after) = (p.parameters_before, p.parameters_after);
    writeln!(
        f,
        "pruning: float parameters {before} -> {after} ({:.1}% fewer)",
        100.0 * before.saturating_sub(after) as f64 / before.max(1) as f64
    )?;
    for (what, blocks) in [
        ("heads", &p.structured.heads),
        ("FFN neurons", &p.structured.ffn),
    ] {
        if blocks.is_empty() {
            continue;
        }
        let kept: usize = blocks.iter().map(|b| b.after).sum();
        let total: usize = blocks.iter().map(|b| b.before).sum();
        let ranked = match p.structured.importance {
            Importance::Weights => "ranked by weight norms".to_string(),
            Importance::Activations { batches } => ranked_by_activations(batches),
        };
        writeln!(
            f,
            "  {what}: kept {kept} of {total} in {} blocks, {ranked}",
            blocks.len()
        )?;
    }
    for s in &p.structured.skipped {
        writeln!(f, "  left whole: {} ({})", s.weight, s.reason)?;
    }
    if let Some(kind) = &p.unstructured {
        let kind = match kind {
            Unstructured::Magnitude { sparsity, scope } => {
                format!("magnitude {sparsity} ({scope:?} scope)")
            }
            Unstructured::NOfM { n, m } => format!("{n}:{m}"),
        };
        let ranked = match p.unstructured_importance {
            Importance::Weights => "ranked by |w|".to_string(),
            Importance::Activations { batches } => {
                format!("{} (|w|·‖x‖)", ranked_by_activations(batches))
            }
        };
        writeln!(
            f,
            "  {kind}: {} weights now {:.1}% zeros, {ranked}",
            p.weights.len(),
            100.0 * p.sparsity
        )?;
        for s in &p.skipped {
            writeln!(f, "  not pruned: {} ({})", s.weight, s.reason)?;
        }
    }
    writeln!(f, "  {}", p.rewrites)
}

fn ranked_by_activations(batches: usize) -> String {
    format!("ranked by activations on {batches} batches")
}

fn write_weight_only(
    f: &mut fmt::Formatter<'_>,
    r: &crate::quant::weight_only::WeightOnlyReport,
) -> fmt::Result {
    let zero = if r.symmetric {
        "symmetric"
    } else {
        "asymmetric"
    };
    let kept = r
        .weights
        .iter()
        .filter(|w| w.kept == crate::quant::weight_only::WeightMethod::Gptq)
        .count();
    writeln!(
        f,
        "  {} weights as {}-bit {} (block {}, {zero}, {:?}; GPTQ kept for {kept}): {:.1} MB → \
         {:.1} MB",
        r.weights.len(),
        r.bits.count(),
        r.format,
        r.block_size,
        r.method,
        r.float_bytes as f64 / 1e6,
        r.quantized_bytes as f64 / 1e6
    )?;
    if let Some((rtn, kept)) = r.mean_errors() {
        writeln!(
            f,
            "  relative output error on {} calibration rows, mean over weights: \
             round-to-nearest {rtn:.3e}, kept {kept:.3e}",
            r.calibration_rows
        )?;
    }
    for s in &r.skipped {
        writeln!(f, "  left float: {s}")?;
    }
    Ok(())
}

fn write_quantization(f: &mut fmt::Formatter<'_>, q: &QuantReport) -> fmt::Result {
    let target = match q.target {
        QuantTarget::Ort => "ONNX Runtime",
        QuantTarget::Trt => "TensorRT rules",
    };
    match q.product_weights {
        Some(codes) => writeln!(
            f,
            "quantization: {} for {target}, {} weights",
            q.mode,
            codes.storage().2
        )?,
        None => writeln!(f, "quantization: {} for {target}", q.mode)?,
    }
    if !q.already_quantized.is_empty() {
        writeln!(
            f,
            "  the input already holds {}: left as it is, not quantized twice",
            q.already_quantized.join(", ")
        )?;
        return Ok(());
    }
    if let Some(s) = &q.smoothing {
        writeln!(
            f,
            "  SmoothQuant α = {} on {} batches: {} normalizations smoothed, channel scales \
             {:.3}..{:.3}",
            s.alpha,
            s.batches,
            s.smoothed.len(),
            s.min_scale,
            s.max_scale
        )?;
    }
    if let Some(c) = &q.calibration {
        let method = match c.method {
            RangeMethod::MinMax => "min/max".to_string(),
            RangeMethod::Percentile(p) => format!("percentile {p}"),
            RangeMethod::Entropy => "entropy".to_string(),
            RangeMethod::Mse => "mse".to_string(),
        };
        writeln!(
            f,
            "  calibrated {} activations on {} batches ({method}) in {:.2}s",
            c.ranges.len(),
            c.batches.len(),
            c.seconds
        )?;
        if !c.unpadded.is_empty() {
            let mut masks: Vec<&str> = c.unpadded.values().map(String::as_str).collect();
            masks.sort();
            masks.dedup();
            writeln!(
                f,
                "  {} of them observed at unpadded positions only ({})",
                c.unpadded.len(),
                masks.join(", ")
            )?;
        }
        if !c.unobserved.is_empty() {
            writeln!(
                f,
                "  {} activations held no finite value in any batch (nothing was routed there): \
                 their readers stay float ({})",
                c.unobserved.len(),
                c.unobserved.join(", ")
            )?;
        }
        if !c.masked.is_empty() {
            let total: u64 = c.masked.values().sum();
            writeln!(
                f,
                "  {total} masked values (inf, NaN, |x| >= 1e30) in {} activations, left out of \
                 their ranges: their quantized readers see them clipped",
                c.masked.len()
            )?;
        }
    }
    if let Some(w) = &q.weight_only {
        write_weight_only(f, w)?;
    }
    if let Some(a) = &q.auto_exclusion {
        let worst: Vec<String> = a
            .sensitivities
            .iter()
            .take(5)
            .map(|s| format!("{} (cosine {:.5})", s.node, s.cosine))
            .collect();
        writeln!(
            f,
            "  auto-exclude: measured {} layers, most sensitive {}",
            a.sensitivities.len(),
            worst.join(", ")
        )?;
        let verdict = if a.passed {
            "keeps the tolerance"
        } else {
            "still breaks the tolerance"
        };
        writeln!(
            f,
            "  kept float: {} ({} layers); the result {verdict}",
            if a.excluded.is_empty() {
                "none".to_string()
            } else {
                a.excluded.join(", ")
            },
            a.excluded.len()
        )?;
    }
    writeln!(f, "  {}", q.rewrites)
}

fn write_validation(f: &mut fmt::Formatter<'_>, v: &Validation) -> fmt::Result {
    // A lossy run given no limit is measured, not judged: it cannot be "within" anything.
    let verdict = if !v.passed() {
        "OUT OF TOLERANCE"
    } else if v.tolerance.sets_no_limit() {
        "measured, not judged (no --max-error, --min-cosine or --max-kl given)"
    } else {
        "within tolerance"
    };
    writeln!(
        f,
        "validation on {} batches in {}: {verdict}",
        v.batches.len(),
        engines(v)
    )?;
    if let Some(first) = &v.second_opinion {
        writeln!(f, "  (asked {} again: {first})", v.engine.name())?;
    }
    writeln!(
        f,
        "  {:<28} {:>10} {:>10} {:>10} {:>10} {:>7}",
        "output", "max abs", "max rel", "cosine", "KL", "top-1"
    )?;
    for d in &v.outputs {
        write_diff(f, d)?;
    }
    if let Some(p) = &v.perplexity {
        writeln!(
            f,
            "  next-token perplexity on {} tokens (`{}`): input {:.3}, output {:.3} ({:+.2}%)",
            p.tokens,
            p.output,
            p.reference,
            p.candidate,
            100.0 * (p.candidate / p.reference - 1.0)
        )?;
    }
    for line in &v.violations {
        writeln!(f, "  violation: {line}")?;
    }
    Ok(())
}

/// Where the two models of a comparison ran: `tract`, or `tract (input) and ONNX Runtime`.
fn engines(v: &Validation) -> String {
    if v.reference_engine == v.engine {
        v.engine.name().to_string()
    } else {
        format!(
            "{} (input) and {} (output)",
            v.reference_engine.name(),
            v.engine.name()
        )
    }
}

fn write_check(f: &mut fmt::Formatter<'_>, c: &Check) -> fmt::Result {
    match &c.outcome {
        CheckOutcome::Passed(v) => {
            let worst = v.outputs.iter().map(|d| d.max_abs).fold(0.0f64, f64::max);
            let cosine = v.outputs.iter().map(|d| d.cosine).fold(1.0f64, f64::min);
            writeln!(
                f,
                "check: the output matches the input model in {} on {} generated batch{} \
                 (max abs error {worst:.2e}, lowest cosine {cosine:.6})",
                engines(v),
                v.batches.len(),
                if v.batches.len() == 1 { "" } else { "es" }
            )?;
            match &v.second_opinion {
                Some(first) => writeln!(f, "  (asked {} again: {first})", v.engine.name()),
                None => Ok(()),
            }
        }
        CheckOutcome::Failed(why) => writeln!(f, "check: FAILED: {why}"),
        CheckOutcome::NotDone(why) => writeln!(f, "check: not done: {why}"),
        CheckOutcome::Skipped => writeln!(f, "check: skipped (--no-check)"),
    }
}

fn write_diff(f: &mut fmt::Formatter<'_>, d: &OutputDiff) -> fmt::Result {
    let kl = d
        .kl_divergence
        .map(|k| format!("{k:.3e}"))
        .unwrap_or_else(|| "-".into());
    let top1 = d
        .top1_agreement
        .map(|t| format!("{:.1}%", 100.0 * t))
        .unwrap_or_else(|| "-".into());
    writeln!(
        f,
        "  {:<28} {:>10.3e} {:>10.3e} {:>10.6} {:>10} {:>7}",
        d.name, d.max_abs, d.max_rel, d.cosine, kl, top1
    )?;
    if let Some(mask) = &d.at_positions_kept_by {
        writeln!(f, "    (at the positions `{mask}` keeps)")?;
    }
    if d.nonfinite_mismatches > 0 {
        writeln!(
            f,
            "  {:<28} {} non-finite values differ",
            "", d.nonfinite_mismatches
        )?;
    }
    Ok(())
}
