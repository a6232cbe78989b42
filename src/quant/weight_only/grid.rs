//! Round-to-nearest quantization of a `[K, N]` weight to 4 or 8 bits in blocks along K: the
//! baseline the calibrated method (`gptq`) must beat, and the grid both use for one block.
//!
//! Asymmetric: the block's range, widened to hold 0 (a zero point must be a code in
//! 0..=max, max 15 or 255), is cut into max steps; the zero point is the code nearest to 0.
//! Symmetric: the largest magnitude is 7 (127) steps and the zero point 8 (128): codes
//! 0..=15 stand for −8..=7 steps (0..=255 for −128..=127).

use crate::ops::nbits::{Bits, BlockQuantized};

/// The values one block of one column can take: `(code − zero) · scale`, code 0..=max.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grid {
    pub scale: f32,
    pub zero: u8,
    pub bits: Bits,
}

impl Grid {
    /// The grid covering `values` (see the module doc). An all-zero block gets scale 1.
    pub fn fit(values: impl Iterator<Item = f32> + Clone, symmetric: bool, bits: Bits) -> Grid {
        let (lo, hi) = values.fold((0f32, 0f32), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let nonzero = |s: f32| if s > 0.0 && s.is_finite() { s } else { 1.0 };
        let max = f32::from(bits.max_code());
        if symmetric {
            let zero = bits.symmetric_zero();
            let scale = nonzero(lo.abs().max(hi) / (max - f32::from(zero)));
            return Grid { scale, zero, bits };
        }
        let scale = nonzero((hi - lo) / max);
        let zero = (-lo / scale).round().clamp(0.0, max) as u8;
        Grid { scale, zero, bits }
    }

    /// The code nearest to `w`.
    pub fn code(&self, w: f32) -> u8 {
        let max = f32::from(self.bits.max_code());
        ((w / self.scale).round() + f32::from(self.zero)).clamp(0.0, max) as u8
    }

    pub fn value(&self, code: u8) -> f32 {
        (f32::from(code) - f32::from(self.zero)) * self.scale
    }
}

/// An empty quantized `[K, N]` weight, codes 0, to be filled block by block.
pub fn empty(bits: Bits, k: usize, n: usize, block: usize, symmetric: bool) -> BlockQuantized {
    let blocks = k.div_ceil(block);
    BlockQuantized {
        bits,
        k,
        n,
        block,
        codes: vec![0; k * n],
        scales: vec![0.0; n * blocks],
        zero_points: (!symmetric).then(|| vec![0; n * blocks]),
    }
}

/// Records `grid` as block `b` of column `col` of `q`.
pub fn set_grid(q: &mut BlockQuantized, col: usize, b: usize, grid: Grid) {
    let blocks = q.blocks();
    q.scales[col * blocks + b] = grid.scale;
    if let Some(z) = &mut q.zero_points {
        z[col * blocks + b] = grid.zero;
    }
}

/// The grid of block `b` of column `col` of `q`.
pub fn grid_of(q: &BlockQuantized, col: usize, b: usize) -> Grid {
    Grid {
        scale: q.scales[col * q.blocks() + b],
        zero: q.zero_point(col, b),
        bits: q.bits,
    }
}

/// Round-to-nearest quantization of the row-major `[K, N]` weight `w`.
pub fn round_to_nearest(
    bits: Bits,
    w: &[f32],
    k: usize,
    n: usize,
    block: usize,
    symmetric: bool,
) -> BlockQuantized {
    let mut q = empty(bits, k, n, block, symmetric);
    for col in 0..n {
        for (b, start) in (0..k).step_by(block).enumerate() {
            let rows = start..(start + block).min(k);
            let column = rows.clone().map(|i| w[i * n + col]);
            let grid = Grid::fit(column, symmetric, bits);
            set_grid(&mut q, col, b, grid);
            for i in rows {
                q.codes[col * k + i] = grid.code(w[i * n + col]);
            }
        }
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::rng::normal;

    fn weight(k: usize, n: usize, seed: u64) -> Vec<f32> {
        (0..k * n)
            .map(|i| normal(seed, i as u64) as f32 * 0.05)
            .collect()
    }

    #[test]
    fn round_to_nearest_is_within_half_a_step() {
        for (bits, symmetric) in [
            (Bits::Four, false),
            (Bits::Four, true),
            (Bits::Eight, false),
            (Bits::Eight, true),
        ] {
            let (k, n, block) = (80, 6, 32);
            let w = weight(k, n, 7);
            let q = round_to_nearest(bits, &w, k, n, block, symmetric);
            let back = q.dequantize();
            for i in 0..k {
                for col in 0..n {
                    let step = q.scales[col * q.blocks() + i / block];
                    let err = (back[i * n + col] - w[i * n + col]).abs();
                    assert!(
                        err <= step * 0.5 + 1e-7,
                        "i {i} col {col}: {err} > {step}/2"
                    );
                }
            }
        }
    }

    #[test]
    fn asymmetric_grid_spans_the_block_and_zero() {
        let g = Grid::fit([0.5f32, 2.0, 3.5].into_iter(), false, Bits::Four);
        assert_eq!(g.zero, 0);
        assert!((g.scale - 3.5 / 15.0).abs() < 1e-7);
        let g = Grid::fit([-1.5f32, 0.0, 1.5].into_iter(), false, Bits::Four);
        assert_eq!(g.zero, 8);
        assert_eq!(g.code(-1.5), 0);
        assert_eq!(g.code(1.5), 15);
        let g = Grid::fit([-1.5f32, 0.0, 1.5].into_iter(), false, Bits::Eight);
        assert_eq!(g.zero, 128);
        assert_eq!(g.code(-1.5), 0);
        assert_eq!(g.code(1.5), 255);
        let g = Grid::fit([-1.27f32, 0.5].into_iter(), true, Bits::Eight);
        assert!((g.scale - 0.01).abs() < 1e-7);
        assert_eq!(g.code(-1.27), 1);
        assert_eq!(
            Grid::fit([0.0f32; 4].into_iter(), false, Bits::Four).scale,
            1.0
        );
    }
}
