//! A streaming histogram of |x| and the clipping thresholds read off it.
//!
//! The histogram has a fixed number of equal bins over `[0, top)`. Its first batch sets the
//! bin width from that batch's largest magnitude; a later value beyond `top` doubles the
//! width (adjacent bins merge pairwise) until it fits. Memory is the bin array whatever the
//! number of batches, and a doubling halves the resolution at worst, so the histogram keeps
//! between half and all of its bins over the data seen.
//!
//! Thresholds are computed on magnitudes for a symmetric grid of `LEVELS` steps per side
//! (int8's 127 levels, plus zero): the clipping value `t` such that quantizing `|x|` onto
//! `[0, t]` in `LEVELS` steps loses the least by each method's measure.

/// Bins of the histogram: 2048, as TensorRT's entropy calibrator uses, so that the sweep
/// over thresholds has 1920 candidates above the 128 quantization levels.
pub const BINS: usize = 2048;

/// Quantization levels per side of the symmetric int8 grid the thresholds are sized for.
pub const LEVELS: usize = 128;

#[derive(Clone, Debug, PartialEq)]
pub struct AbsHistogram {
    counts: Vec<u64>,
    /// Width of a bin; 0 until the first non-zero magnitude.
    width: f64,
    /// Magnitudes seen while `width` was 0 (all exactly 0).
    zeros_before_width: u64,
}

impl Default for AbsHistogram {
    fn default() -> Self {
        AbsHistogram {
            counts: vec![0; BINS],
            width: 0.0,
            zeros_before_width: 0,
        }
    }
}

impl AbsHistogram {
    /// Adds the finite values of one batch (the caller drops the others).
    pub fn add(&mut self, values: &[f32]) {
        let absmax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if absmax == 0.0 {
            if self.width == 0.0 {
                self.zeros_before_width += values.len() as u64;
            } else {
                self.counts[0] += values.len() as u64;
            }
            return;
        }
        self.cover(f64::from(absmax));
        let last = BINS - 1;
        // Bin numbers a block at a time, then the counts: the divisions of a block run as
        // vector instructions, which the increments (a scatter) would otherwise keep from.
        let mut bins = [0usize; 256];
        for block in values.chunks(bins.len()) {
            for (bin, &v) in bins.iter_mut().zip(block) {
                *bin = (f64::from(v.abs()) / self.width) as usize;
            }
            for &bin in &bins[..block.len()] {
                self.counts[bin.min(last)] += 1;
            }
        }
    }

    /// Widens the bins until `absmax` falls inside the last one.
    fn cover(&mut self, absmax: f64) {
        if self.width == 0.0 {
            self.width = absmax / BINS as f64;
            self.counts[0] += std::mem::take(&mut self.zeros_before_width);
            return;
        }
        while absmax > self.width * BINS as f64 {
            for i in 0..BINS / 2 {
                self.counts[i] = self.counts[2 * i] + self.counts[2 * i + 1];
            }
            self.counts[BINS / 2..].fill(0);
            self.width *= 2.0;
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.zeros_before_width
    }

    /// The upper edge of bin `i - 1`: the threshold that keeps the first `i` bins.
    fn edge(&self, i: usize) -> f64 {
        self.width * i as f64
    }

    /// The smallest bin edge at or below which `percentile`% of the magnitudes lie.
    pub fn percentile(&self, percentile: f64) -> f64 {
        let total = self.total();
        if self.width == 0.0 || total == 0 {
            return 0.0;
        }
        // Slightly under p·n/100, so that float rounding (99.9 / 100 · 1000 = 999.000…1) never
        // asks for one value more than the share.
        let wanted = (percentile * total as f64 / 100.0 * (1.0 - 1e-12)).ceil() as u64;
        let mut seen = self.zeros_before_width;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= wanted {
                return self.edge(i + 1);
            }
        }
        self.edge(BINS)
    }

    /// TensorRT's entropy calibration: for each candidate `i` (keep `i` bins, `LEVELS..=BINS`),
    /// the reference distribution is the first `i` bins with everything beyond added to the
    /// last kept one; the candidate is those `i` bins merged into `LEVELS` groups and spread
    /// back evenly over each group's non-empty bins. The threshold is the edge of the `i` with
    /// the smallest KL(reference ‖ candidate) (the largest such `i` on ties).
    ///
    /// With fewer occupied bins than `LEVELS`, every candidate is exact and the threshold is
    /// the largest magnitude seen.
    pub fn entropy(&self) -> f64 {
        if self.width == 0.0 {
            return 0.0;
        }
        let Some(top) = self.counts.iter().rposition(|&c| c > 0) else {
            return 0.0;
        };
        if top < LEVELS {
            return self.edge(top + 1);
        }
        let mut best = (f64::INFINITY, BINS);
        let mut candidate = vec![0.0f64; BINS];
        for i in LEVELS..=BINS {
            let outliers: u64 = self.counts[i..].iter().sum();
            let reference = |j: usize| {
                let c = self.counts[j] as f64;
                if j == i - 1 {
                    c + outliers as f64
                } else {
                    c
                }
            };
            // Group g covers bins [g·i/LEVELS, (g+1)·i/LEVELS), as numpy's
            // `digitize(range(i), linspace(0, i, LEVELS + 1)) - 1` assigns them.
            let group_start = |g: usize| (g * i).div_ceil(LEVELS);
            for g in 0..LEVELS {
                let (start, end) = (group_start(g), group_start(g + 1).min(i));
                let bins = &self.counts[start..end];
                let nonempty = bins.iter().filter(|&&c| c > 0).count();
                let mass: u64 = bins.iter().sum();
                let spread = if nonempty == 0 {
                    0.0
                } else {
                    mass as f64 / nonempty as f64
                };
                for (j, &c) in (start..end).zip(bins) {
                    candidate[j] = if c > 0 { spread } else { 0.0 };
                }
            }
            let p_total: f64 = (0..i).map(reference).sum();
            let q_total: f64 = candidate[..i].iter().sum();
            if p_total == 0.0 || q_total == 0.0 {
                continue;
            }
            let mut kl = 0.0;
            for (j, &q) in candidate[..i].iter().enumerate() {
                let p = reference(j) / p_total;
                if p == 0.0 {
                    continue;
                }
                let q = q / q_total;
                kl += if q == 0.0 {
                    f64::INFINITY
                } else {
                    p * (p / q).ln()
                };
            }
            if kl <= best.0 {
                best = (kl, i);
            }
        }
        self.edge(best.1)
    }

    /// The threshold minimizing the expected squared error of quantizing the magnitudes onto
    /// `LEVELS` steps over `[0, t]`: a value below `t` contributes the rounding noise of a
    /// uniform step, `step²/12`; a value above it its clipping error `(|x| − t)²`, with each
    /// bin's values at its center. Candidates are every bin edge.
    pub fn mse(&self) -> f64 {
        if self.width == 0.0 {
            return 0.0;
        }
        let Some(top) = self.counts.iter().rposition(|&c| c > 0) else {
            return 0.0;
        };
        let center = |j: usize| (j as f64 + 0.5) * self.width;
        let mut best = (f64::INFINITY, top + 1);
        for i in 1..=top + 1 {
            let t = self.edge(i);
            let step = t / LEVELS as f64;
            let kept: u64 = self.counts[..i].iter().sum::<u64>() + self.zeros_before_width;
            let mut error = kept as f64 * step * step / 12.0;
            for j in i..=top {
                let d = center(j) - t;
                error += self.counts[j] as f64 * d * d;
            }
            if error < best.0 {
                best = (error, i);
            }
        }
        self.edge(best.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A histogram whose first batch spans exactly `BINS` bins of width 1: magnitudes
    /// `BINS - 1` and the given values.
    fn unit_bins(values: &[f32]) -> AbsHistogram {
        let mut h = AbsHistogram::default();
        h.add(&[BINS as f32]);
        h.counts[BINS - 1] = 0;
        h.add(values);
        assert_eq!(h.width, 1.0);
        h
    }

    #[test]
    fn values_land_in_their_bins_and_the_bins_widen_to_hold_new_maxima() {
        let mut h = AbsHistogram::default();
        h.add(&[0.0, 0.0]);
        assert_eq!(h.total(), 2);
        h.add(&[-1.0, 0.5, 1.0 / 2048.0 * 3.5]);
        // Width 1/2048: -1 is the top (last bin), 0.5 bin 1024, 3.5/2048 bin 3; the two zeros
        // seen before any width joined bin 0.
        assert_eq!(h.width, 1.0 / 2048.0);
        assert_eq!(
            (h.counts[0], h.counts[3], h.counts[1024], h.counts[2047]),
            (2, 1, 1, 1)
        );
        h.add(&[3.0]);
        // 3 > 1: the width doubles twice, to 4/2048; bin k moves to k/4.
        assert_eq!(h.width, 4.0 / 2048.0);
        assert_eq!((h.counts[0], h.counts[256], h.counts[511]), (3, 1, 1));
        assert_eq!(h.counts[1536], 1, "3.0 is bin 3 / (4/2048) = 1536");
        assert_eq!(h.total(), 6);
    }

    #[test]
    fn percentile_is_the_edge_holding_that_share_of_values() {
        // 1000 values in bins 0..999 (one each): 99.9% of 1000 is 999 values, which bins
        // 0..=998 hold, so the threshold is the edge 999.
        let values: Vec<f32> = (0..1000).map(|k| k as f32 + 0.5).collect();
        let h = unit_bins(&values);
        assert_eq!(h.percentile(99.9), 999.0);
        assert_eq!(h.percentile(100.0), 1000.0);
        assert_eq!(h.percentile(50.0), 500.0);
    }

    /// A histogram of bins of width 1 holding `counts`.
    fn with_counts(counts: &[u64]) -> AbsHistogram {
        let mut h = unit_bins(&[]);
        h.counts[..counts.len()].copy_from_slice(counts);
        h
    }

    #[test]
    fn entropy_clips_a_long_thin_tail() {
        // Counts falling as exp(-j/100) (to 0 beyond bin 1451): the
        // tail is sparse, and TensorRT's calibration clips it well below the largest magnitude
        // (at 1109 bins here) while keeping more than 99% of the values.
        let counts: Vec<u64> = (0..BINS)
            .map(|j| (1e6 * (-(j as f64) / 100.0).exp()).round() as u64)
            .collect();
        let h = with_counts(&counts);
        let t = h.entropy();
        assert!(
            t > h.percentile(99.0) && t < 0.75 * BINS as f64,
            "threshold {t}"
        );
    }

    #[test]
    fn entropy_keeps_what_the_levels_can_represent() {
        // A flat distribution over every bin has no tail to clip (KL 0 only when all bins are
        // kept); data in fewer bins than there are levels is represented exactly, so the
        // threshold is the largest magnitude. ONNX Runtime's entropy with 128 bins and 128
        // levels is always in that second case, which is why it returns the maximum.
        assert_eq!(with_counts(&[3; BINS]).entropy(), BINS as f64);
        assert_eq!(unit_bins(&[0.5, 10.5, 99.5]).entropy(), 100.0);
    }

    #[test]
    fn mse_trades_rounding_noise_against_clipping() {
        // n values in bin 0 and one in bin 3 (center 3.5); a threshold t keeping i bins costs
        // kept · (t/128)²/12 of noise plus (3.5 − t)² when it clips. With 196 608 = 128² · 12:
        // n = 10 000: t=1 6.30, t=2 2.45, t=3 0.458 + 0.25 = 0.708, t=4 10 001·16/196 608 = 0.814.
        assert_eq!(with_counts(&[10_000, 0, 0, 1]).mse(), 3.0);
        // n = 100: t=3 0.0046 + 0.25, t=4 0.0082: keeping the value wins.
        assert_eq!(with_counts(&[100, 0, 0, 1]).mse(), 4.0);
    }

    #[test]
    fn an_all_zero_tensor_has_threshold_zero() {
        let mut h = AbsHistogram::default();
        h.add(&[0.0; 5]);
        assert_eq!((h.percentile(99.0), h.entropy(), h.mse()), (0.0, 0.0, 0.0));
    }
}
