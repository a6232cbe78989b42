//! Comparing two runs output by output.
//!
//! For each output: the largest absolute error, the largest relative error (against the
//! reference value, floored at `REL_FLOOR` so that values at zero do not make it infinite),
//! the cosine similarity of the two tensors, and for logits-like outputs the mean KL
//! divergence KL(p‖q) between the softmaxes over the last axis at a temperature, which is
//! what a change does to a classifier's or a language model's probabilities, and the share of
//! rows whose largest logit (the class, the greedy next token) is the same. Non-finite
//! values must agree position by position (NaN with NaN, +inf with +inf); each disagreement is
//! counted and always fails a tolerance.

use tract_onnx::prelude::Tensor;

/// Denominator floor of the relative error.
pub const REL_FLOOR: f64 = 1e-6;

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OutputDiff {
    pub name: String,
    pub elements: usize,
    pub max_abs: f64,
    pub max_rel: f64,
    /// The reference's largest finite magnitude: the scale `Tolerance::max_abs_scaled`
    /// measures errors against.
    pub reference_max: f64,
    pub cosine: f64,
    /// Mean KL divergence over the last axis, for outputs compared as logits.
    pub kl_divergence: Option<f64>,
    /// The share of rows (over the last axis) whose largest value is at the same place, for
    /// outputs compared as logits.
    pub top1_agreement: Option<f64>,
    pub nonfinite_mismatches: usize,
    /// The mask input whose kept positions alone were compared, when one indexes the
    /// output's first two axes (`exec::padding`); none: every value was.
    pub at_positions_kept_by: Option<String>,
}

impl OutputDiff {
    /// Folds the diff of another batch into this one, keeping the worst of each measure.
    pub fn merge(&mut self, other: &OutputDiff) {
        self.elements += other.elements;
        self.max_abs = self.max_abs.max(other.max_abs);
        self.max_rel = self.max_rel.max(other.max_rel);
        self.reference_max = self.reference_max.max(other.reference_max);
        self.cosine = self.cosine.min(other.cosine);
        self.kl_divergence = match (self.kl_divergence, other.kl_divergence) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.top1_agreement = match (self.top1_agreement, other.top1_agreement) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.nonfinite_mismatches += other.nonfinite_mismatches;
        if self.at_positions_kept_by.is_none() {
            self.at_positions_kept_by = other.at_positions_kept_by.clone();
        }
    }
}

/// Compares `candidate` against `reference`. `kl_temperature` asks for the KL divergence.
pub fn diff(
    name: &str,
    reference: &Tensor,
    candidate: &Tensor,
    kl_temperature: Option<f64>,
) -> Result<OutputDiff, String> {
    if reference.shape() != candidate.shape() {
        return Err(format!(
            "output `{name}`: shapes differ ({:?} vs {:?})",
            reference.shape(),
            candidate.shape()
        ));
    }
    let a = as_f64(reference).map_err(|e| format!("output `{name}`: {e}"))?;
    let b = as_f64(candidate).map_err(|e| format!("output `{name}`: {e}"))?;
    let (mut max_abs, mut max_rel, mut mismatches) = (0.0f64, 0.0f64, 0usize);
    let mut reference_max = 0.0f64;
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(&b) {
        if !x.is_finite() || !y.is_finite() {
            let same = (x.is_nan() && y.is_nan()) || x == y;
            mismatches += usize::from(!same);
            continue;
        }
        let d = (x - y).abs();
        max_abs = max_abs.max(d);
        reference_max = reference_max.max(x.abs());
        max_rel = max_rel.max(d / x.abs().max(REL_FLOOR));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let cosine = match (na == 0.0, nb == 0.0) {
        (true, true) => 1.0,
        (false, false) => dot / (na.sqrt() * nb.sqrt()),
        _ => 0.0,
    };
    let last = reference.shape().last().copied().unwrap_or(1);
    let logits = kl_temperature.filter(|_| last > 0 && !a.is_empty());
    let kl_divergence = logits.map(|t| mean_kl(&a, &b, last, t));
    let top1_agreement = logits.map(|_| top1_agreement(&a, &b, last));
    Ok(OutputDiff {
        name: name.to_string(),
        elements: a.len(),
        max_abs,
        max_rel,
        reference_max,
        cosine,
        kl_divergence,
        top1_agreement,
        nonfinite_mismatches: mismatches,
        at_positions_kept_by: None,
    })
}

/// The values of a numeric tensor, widened to f64.
pub(crate) fn as_f64(t: &Tensor) -> Result<Vec<f64>, String> {
    values_as::<f64>(t)
}

/// The values of a tensor cast to i64 (ids, masks).
pub(crate) fn as_i64(t: &Tensor) -> Result<Vec<i64>, String> {
    values_as::<i64>(t)
}

fn values_as<T: tract_onnx::prelude::Datum + Copy>(t: &Tensor) -> Result<Vec<T>, String> {
    let cast = t.cast_to::<T>().map_err(|e| e.to_string())?;
    let view = cast.to_plain_array_view::<T>().map_err(|e| e.to_string())?;
    Ok(view.iter().copied().collect())
}

/// Mean over rows of KL(softmax(a/T) ‖ softmax(b/T)); rows holding non-finite values are
/// skipped (they are counted as mismatches elsewhere).
fn mean_kl(a: &[f64], b: &[f64], row: usize, temperature: f64) -> f64 {
    let log_softmax = |x: &[f64]| -> Vec<f64> {
        let m = x
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(v / temperature));
        let lse = m + x
            .iter()
            .map(|&v| (v / temperature - m).exp())
            .sum::<f64>()
            .ln();
        x.iter().map(|&v| v / temperature - lse).collect()
    };
    let (mut total, mut rows) = (0.0, 0usize);
    for (ra, rb) in a.chunks(row).zip(b.chunks(row)) {
        if ra.iter().chain(rb).any(|v| !v.is_finite()) {
            continue;
        }
        let (lp, lq) = (log_softmax(ra), log_softmax(rb));
        total += lp
            .iter()
            .zip(&lq)
            .map(|(p, q)| p.exp() * (p - q))
            .sum::<f64>();
        rows += 1;
    }
    if rows == 0 {
        0.0
    } else {
        (total / rows as f64).max(0.0)
    }
}

/// The share of rows of `row` values whose largest value is at the same index in `a` and `b`
/// (the first of equal ones); rows holding NaN disagree.
fn top1_agreement(a: &[f64], b: &[f64], row: usize) -> f64 {
    let argmax = |x: &[f64]| {
        x.iter()
            .enumerate()
            .try_fold((0, f64::NEG_INFINITY), |(i, m), (j, &v)| match v {
                v if v.is_nan() => None,
                v if v > m => Some((j, v)),
                _ => Some((i, m)),
            })
            .map(|(i, _)| i)
    };
    let rows = a.len() / row;
    let same = a
        .chunks(row)
        .zip(b.chunks(row))
        .filter(|(ra, rb)| argmax(ra).is_some_and(|i| argmax(rb) == Some(i)))
        .count();
    if rows == 0 {
        1.0
    } else {
        same as f64 / rows as f64
    }
}

/// Limits a comparison must stay within.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Tolerance {
    pub max_abs: Option<f64>,
    /// A max abs error relative to the output's scale: at most this × max(1, the
    /// reference's largest magnitude). Float rounding grows with the values (logits of 40
    /// carry errors 40 times those of values near 1), which an absolute bound ignores.
    pub max_abs_scaled: Option<f64>,
    pub min_cosine: Option<f64>,
    pub max_kl: Option<f64>,
}

impl Tolerance {
    /// True when no limit is set: a comparison only measures (non-finite values that differ
    /// still break it).
    pub fn sets_no_limit(&self) -> bool {
        self.max_abs.is_none()
            && self.max_abs_scaled.is_none()
            && self.min_cosine.is_none()
            && self.max_kl.is_none()
    }

    /// Why `d` breaks the tolerance, one line per broken limit.
    pub fn violations(&self, d: &OutputDiff) -> Vec<String> {
        let mut out = Vec::new();
        if d.nonfinite_mismatches > 0 {
            out.push(format!(
                "`{}`: {} non-finite values differ",
                d.name, d.nonfinite_mismatches
            ));
        }
        if let Some(limit) = self.max_abs.filter(|&l| d.max_abs > l) {
            out.push(format!(
                "`{}`: max abs error {:.3e} > {limit:.3e}",
                d.name, d.max_abs
            ));
        }
        if let Some(scaled) = self.max_abs_scaled {
            let limit = scaled * d.reference_max.max(1.0);
            if d.max_abs > limit {
                out.push(format!(
                    "`{}`: max abs error {:.3e} > {limit:.3e} ({scaled:e} of its largest \
                     value {:.3e})",
                    d.name, d.max_abs, d.reference_max
                ));
            }
        }
        if let Some(limit) = self.min_cosine.filter(|&l| d.cosine < l) {
            out.push(format!("`{}`: cosine {:.6} < {limit}", d.name, d.cosine));
        }
        if let (Some(limit), Some(kl)) = (self.max_kl, d.kl_divergence) {
            if kl > limit {
                out.push(format!(
                    "`{}`: KL divergence {kl:.3e} > {limit:.3e}",
                    d.name
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::tensor1;

    #[test]
    fn identical_tensors_have_no_error() {
        let t = tensor1(&[1.0f32, -2.0, 3.0]);
        let d = diff("y", &t, &t, Some(1.0)).unwrap();
        assert_eq!(d.max_abs, 0.0);
        assert_eq!(d.max_rel, 0.0);
        assert!((d.cosine - 1.0).abs() < 1e-12);
        assert!(d.kl_divergence.unwrap().abs() < 1e-12);
    }

    #[test]
    fn errors_are_measured_exactly() {
        let a = tensor1(&[1.0f32, 0.0, 2.0]);
        let b = tensor1(&[1.5f32, 0.0, 2.0]);
        let d = diff("y", &a, &b, None).unwrap();
        assert_eq!(d.max_abs, 0.5);
        assert_eq!(d.max_rel, 0.5);
        let expected = (1.5 + 4.0) / ((5.0f64).sqrt() * (6.25f64).sqrt());
        assert!((d.cosine - expected).abs() < 1e-12);
        assert_eq!(d.kl_divergence, None);
    }

    #[test]
    fn kl_of_known_distributions() {
        // softmax([0, ln 3]) = [0.25, 0.75]; softmax([0, 0]) = [0.5, 0.5].
        let a = tensor1(&[0.0f64, 3f64.ln()]);
        let b = tensor1(&[0.0f64, 0.0]);
        let d = diff("logits", &a, &b, Some(1.0)).unwrap();
        let expected = 0.25 * (0.25f64 / 0.5).ln() + 0.75 * (0.75f64 / 0.5).ln();
        assert!((d.kl_divergence.unwrap() - expected).abs() < 1e-12);
    }

    #[test]
    fn top1_agreement_counts_rows_with_the_same_largest_logit() {
        use tract_onnx::tract_hir::internal::tract_ndarray::arr2;
        let a: Tensor = arr2(&[[0.0f32, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).into();
        let b: Tensor = arr2(&[[0.0f32, 1.5, 1.4], [0.0, 3.0, 0.0], [0.0, 0.0, f32::NAN]]).into();
        let d = diff("logits", &a, &b, Some(1.0)).unwrap();
        assert!((d.top1_agreement.unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(diff("y", &a, &b, None).unwrap().top1_agreement, None);
    }

    #[test]
    fn nonfinite_values_must_match() {
        let a = tensor1(&[f32::NEG_INFINITY, f32::NAN, 1.0]);
        let same = diff("y", &a, &a.clone(), None).unwrap();
        assert_eq!(same.nonfinite_mismatches, 0);
        let b = tensor1(&[0.0f32, f32::NAN, 1.0]);
        let d = diff("y", &a, &b, None).unwrap();
        assert_eq!(d.nonfinite_mismatches, 1);
        assert_eq!(Tolerance::default().violations(&d).len(), 1);
    }

    #[test]
    fn a_scaled_bound_grows_with_the_outputs_magnitude() {
        let a = tensor1(&[40.0f32, -1.0]);
        let b = tensor1(&[40.002f32, -1.0]);
        let d = diff("logits", &a, &b, None).unwrap();
        assert_eq!(d.reference_max, 40.0);
        let scaled = Tolerance {
            max_abs_scaled: Some(1e-4),
            ..Default::default()
        };
        assert!(
            scaled.violations(&d).is_empty(),
            "2e-3 of 40 is within 1e-4 × 40"
        );
        let absolute = Tolerance {
            max_abs: Some(1e-4),
            ..Default::default()
        };
        assert_eq!(absolute.violations(&d).len(), 1);
        let small = diff("y", &tensor1(&[0.5f32]), &tensor1(&[0.5002f32]), None).unwrap();
        assert_eq!(
            scaled.violations(&small).len(),
            1,
            "values below 1 are held to 1e-4"
        );
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        assert!(diff("y", &tensor1(&[1.0f32]), &tensor1(&[1.0f32, 2.0]), None).is_err());
    }
}
