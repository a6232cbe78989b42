//! Next-token perplexity of a causal language model, from the logits it returned for the
//! token ids it was fed: what a lossy step (4-bit weights, INT8) costs a decoder, in the unit
//! its users compare.
//!
//! For logits `[B, S, V]` and `input_ids` `[B, S]`, position t of row b predicts the token at
//! t + 1; it is scored when the attention mask keeps both (padding on either side is skipped).
//! With a KV cache the mask covers the past too (`[B, past + S]`): its last S columns are the
//! fed tokens'. The negative log-likelihoods are summed in float64 and averaged over the
//! tokens scored; the perplexity is the exponential of that mean.

use tract_onnx::prelude::{DatumType, Tensor};

/// Summed negative log-likelihood of the tokens scored.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Likelihood {
    pub nll: f64,
    pub tokens: usize,
}

impl Likelihood {
    pub fn add(&mut self, other: Likelihood) {
        self.nll += other.nll;
        self.tokens += other.tokens;
    }

    /// `exp(mean nll)`; `None` when no token was scored.
    pub fn perplexity(&self) -> Option<f64> {
        (self.tokens > 0).then(|| (self.nll / self.tokens as f64).exp())
    }
}

/// The likelihood of `ids`' next tokens under `logits` (see the module doc); `None` when the
/// shapes are not those of a causal language model's logits for these ids, or an id falls
/// outside the vocabulary.
pub fn next_tokens(logits: &Tensor, ids: &Tensor, mask: Option<&Tensor>) -> Option<Likelihood> {
    let (&[b, s, v], &[ib, is]) = (logits.shape(), ids.shape()) else {
        return None;
    };
    if (ib, is) != (b, s) || v == 0 {
        return None;
    }
    let logits = super::compare::as_f64(logits).ok()?;
    let ids = values_i64(ids)?;
    let mask = match mask {
        Some(m) => match *m.shape() {
            [mb, total] if mb == b && total >= s => {
                let all = values_i64(m)?;
                Some((all, total))
            }
            _ => return None,
        },
        None => None,
    };
    // The mask's value at fed position t of row r (its last S columns are the fed tokens').
    let kept = |r: usize, t: usize| match &mask {
        Some((m, total)) => m[r * total + total - s + t] != 0,
        None => true,
    };
    let mut out = Likelihood::default();
    for r in 0..b {
        for t in 0..s.saturating_sub(1) {
            if !(kept(r, t) && kept(r, t + 1)) {
                continue;
            }
            let next = usize::try_from(ids[r * s + t + 1])
                .ok()
                .filter(|&i| i < v)?;
            let row = &logits[(r * s + t) * v..(r * s + t + 1) * v];
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if !max.is_finite() {
                return None;
            }
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            out.nll += lse - row[next];
            out.tokens += 1;
        }
    }
    Some(out)
}

/// The values of an integer or boolean tensor (ids, a mask), widened to i64.
fn values_i64(t: &Tensor) -> Option<Vec<i64>> {
    let dt = t.datum_type();
    if !(dt.is_integer() || dt == DatumType::Bool) {
        return None;
    }
    super::compare::as_i64(t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_hir::internal::tract_ndarray::{arr2, Array3};

    /// Logits that give the token after each position probability `p` out of 4 equal rest.
    fn confident(ids: &[[i64; 4]], p: f64) -> Tensor {
        let rest = (1.0 - p) / 3.0;
        let logits = Array3::from_shape_fn((ids.len(), 4, 4), |(r, t, k)| {
            let next = ids[r].get(t + 1).copied().unwrap_or(0) as usize;
            (if k == next { p } else { rest }).ln() as f32
        });
        logits.into()
    }

    #[test]
    fn perplexity_is_the_inverse_probability_of_each_next_token() {
        let ids = [[0, 1, 2, 3], [3, 2, 1, 0]];
        let logits = confident(&ids, 0.5);
        let l = next_tokens(&logits, &arr2(&ids).into(), None).unwrap();
        assert_eq!(l.tokens, 6);
        assert!((l.perplexity().unwrap() - 2.0).abs() < 1e-6, "{l:?}");
    }

    #[test]
    fn padding_and_the_past_are_not_scored() {
        let ids = [[0, 1, 2, 3], [0, 0, 1, 2]];
        let logits = confident(&ids, 0.25);
        // Row 1 left-padded by two; the mask also covers a past of 3 tokens.
        let mask: Tensor = arr2(&[[1i64, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]]).into();
        let l = next_tokens(&logits, &arr2(&ids).into(), Some(&mask)).unwrap();
        assert_eq!(l.tokens, 3 + 1);
        assert!((l.perplexity().unwrap() - 4.0).abs() < 1e-6);
        let boolean = mask.cast_to::<bool>().unwrap().into_owned();
        assert_eq!(
            next_tokens(&logits, &arr2(&ids).into(), Some(&boolean)),
            Some(l)
        );
    }

    #[test]
    fn other_shapes_and_ids_outside_the_vocabulary_give_none() {
        let ids = [[0, 1, 2, 7]];
        let logits = confident(&[[0, 1, 2, 3]], 0.5);
        assert_eq!(next_tokens(&logits, &arr2(&ids).into(), None), None);
        let pooled: Tensor = arr2(&[[0.5f32, 0.5]]).into();
        assert_eq!(next_tokens(&pooled, &arr2(&[[0i64, 1]]).into(), None), None);
    }
}
