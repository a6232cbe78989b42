//! Block-quantized weights (4 or 8 bits): the layout of a weight quantized in blocks along the
//! axis a product sums over, and the two operators that read it.
//!
//! - `com.microsoft::MatMulNBits` (ONNX Runtime): `Y = A · dequant(B)ᵀ` for A `[…, K]`,
//!   attributes `K`, `N`, `bits` (4 or 8), `block_size` (a power of two ≥ 16) and
//!   `accuracy_level`. B is uint8 `[N, blocks, block_size · bits / 8]`: for output column n,
//!   the codes of its K weights in blocks (4 bits: two per byte, the first in the low nibble);
//!   the last block is padded. `scales` is `[N · blocks]` (float, like A) and `zero_points`
//!   uint8 `[N · ⌈blocks · bits / 8⌉]`, packed as B (absent: the middle code, 8 or 128). A
//!   weight is `(code − zero) · scale`. ONNX Runtime 1.32 accepts 1-D or 2-D scales and zero
//!   points (`matmul_nbits_helper.h`); the 1-D form is the one every release since 1.17
//!   loads. It runs 8 bits on CPU too (measured with 1.32: float32 compute agrees with the
//!   dequantized weight to 1.4e-6). With `accuracy_level` 4 its CPU kernel quantizes A to
//!   int8 per block (faster, not exact); 0 computes in float32. tract 0.23.9 runs it itself
//!   for bits 4 or 2 only (`mat_mul_nbits.rs`, no `g_idx`).
//! - `DequantizeLinear` of opset 21 with `block_size`: x `[K, N]` int4/int8 (or uint4/uint8
//!   with a zero point of that type), `axis` 0, scale `[blocks, N]`, feeding a MatMul. ONNX
//!   packs 4-bit tensors two per byte in row-major order, the first in the low nibble. tract
//!   cannot load 4-bit tensors nor read `block_size`: `exec::lower` folds such a
//!   DequantizeLinear into its float weight.

use crate::error::{Error, Result};

/// Bits per code of a block-quantized weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Bits {
    #[serde(rename = "4")]
    Four,
    #[serde(rename = "8")]
    Eight,
}

impl Bits {
    /// The `bits` attribute of MatMulNBits for `count`, when it is one of ours.
    pub fn from_count(count: usize) -> Option<Bits> {
        match count {
            4 => Some(Bits::Four),
            8 => Some(Bits::Eight),
            _ => None,
        }
    }

    pub fn count(self) -> usize {
        match self {
            Bits::Four => 4,
            Bits::Eight => 8,
        }
    }

    /// The largest code.
    pub fn max_code(self) -> u8 {
        match self {
            Bits::Four => 15,
            Bits::Eight => 255,
        }
    }

    /// The zero point of a symmetric block (MatMulNBits' default when `zero_points` is
    /// absent): the middle code, so that codes stand for −2^(bits−1) ..= 2^(bits−1) − 1 steps.
    pub fn symmetric_zero(self) -> u8 {
        self.max_code() / 2 + 1
    }

    /// Codes as ONNX and MatMulNBits store them: 4 bits two per byte, the first in the low
    /// nibble (an odd count leaves the last high nibble 0); 8 bits one per byte.
    pub fn pack(self, codes: &[u8]) -> Vec<u8> {
        match self {
            Bits::Four => pack_nibbles(codes),
            Bits::Eight => codes.to_vec(),
        }
    }

    /// The first `count` codes of `packed` (as `pack` wrote them), unsigned.
    pub fn unpack(self, packed: &[u8], count: usize) -> Vec<u8> {
        match self {
            Bits::Four => unpack_nibbles(packed, count),
            Bits::Eight => packed[..count.min(packed.len())].to_vec(),
        }
    }

    /// The value of the stored code `raw` of a signed (two's complement) tensor.
    fn signed(self, raw: u8) -> i8 {
        match self {
            Bits::Four => signed_nibble(raw),
            Bits::Eight => raw as i8,
        }
    }

    /// Bytes of `count` packed codes.
    fn packed_len(self, count: usize) -> usize {
        (count * self.count()).div_ceil(8)
    }
}

/// A `[K, N]` weight (K the summed axis) quantized in blocks of `block` along K, per output
/// column.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockQuantized {
    pub bits: Bits,
    pub k: usize,
    pub n: usize,
    pub block: usize,
    /// `[N][K]`: column n's codes in 0..=max_code.
    pub codes: Vec<u8>,
    /// `[N][blocks]`.
    pub scales: Vec<f32>,
    /// `[N][blocks]`; `None`: symmetric, every zero point the middle code.
    pub zero_points: Option<Vec<u8>>,
}

impl BlockQuantized {
    pub fn blocks(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    pub fn zero_point(&self, column: usize, block: usize) -> u8 {
        self.zero_points
            .as_ref()
            .map_or(self.bits.symmetric_zero(), |z| {
                z[column * self.blocks() + block]
            })
    }

    /// The float weight `[K][N]` these codes stand for.
    pub fn dequantize(&self) -> Vec<f32> {
        let blocks = self.blocks();
        let mut w = vec![0.0; self.k * self.n];
        for col in 0..self.n {
            for (i, &code) in self.codes[col * self.k..(col + 1) * self.k]
                .iter()
                .enumerate()
            {
                let b = i / self.block;
                let zero = f32::from(self.zero_point(col, b));
                w[i * self.n + col] = (f32::from(code) - zero) * self.scales[col * blocks + b];
            }
        }
        w
    }

    /// MatMulNBits' B: `[N, blocks, block · bits / 8]`, the padding of the last block at the
    /// zero point (so that it would dequantize to 0).
    pub fn matmul_nbits_weight(&self) -> Vec<u8> {
        let blocks = self.blocks();
        let mut codes = Vec::with_capacity(self.n * blocks * self.block);
        for col in 0..self.n {
            codes.extend_from_slice(&self.codes[col * self.k..(col + 1) * self.k]);
            let padding = blocks * self.block - self.k;
            let zero = self.zero_point(col, blocks - 1);
            codes.extend(std::iter::repeat_n(zero, padding));
        }
        self.bits.pack(&codes)
    }

    /// MatMulNBits' zero points: `[N, ⌈blocks · bits / 8⌉]` packed; `None` when symmetric.
    pub fn matmul_nbits_zero_points(&self) -> Option<Vec<u8>> {
        let zeros = self.zero_points.as_ref()?;
        Some(
            zeros
                .chunks(self.blocks())
                .flat_map(|column| self.bits.pack(column))
                .collect(),
        )
    }

    /// Reads the inputs of a MatMulNBits back (the inverse of the two methods above).
    pub fn from_matmul_nbits(
        bits: Bits,
        shape: (usize, usize, usize),
        weight: &[u8],
        scales: &[f32],
        zero_points: Option<&[u8]>,
    ) -> Result<BlockQuantized> {
        let (k, n, block) = shape;
        let blocks = k.div_ceil(block);
        let zero_stride = bits.packed_len(blocks);
        let fits = block >= 2
            && block % 2 == 0
            && weight.len() == n * bits.packed_len(blocks * block)
            && scales.len() == n * blocks
            && zero_points.is_none_or(|z| z.len() == n * zero_stride);
        if !fits {
            return Err(Error::InvalidModel(format!(
                "MatMulNBits: inputs do not fit K {k}, N {n}, bits {}, block_size {block}",
                bits.count()
            )));
        }
        let all = bits.unpack(weight, n * blocks * block);
        let codes = all
            .chunks(blocks * block)
            .flat_map(|column| column[..k].iter().copied())
            .collect();
        let zero_points = zero_points.map(|z| {
            z.chunks(zero_stride)
                .flat_map(|packed| bits.unpack(packed, blocks))
                .collect()
        });
        Ok(BlockQuantized {
            bits,
            k,
            n,
            block,
            codes,
            scales: scales.to_vec(),
            zero_points,
        })
    }

    /// The inputs of a blockwise DequantizeLinear along axis 0: the codes `[K, N]` packed as
    /// ONNX packs them, signed (`code − middle`) when symmetric, else unsigned; the scales
    /// `[blocks, N]` and the unsigned zero points `[blocks, N]` packed (`None` when
    /// symmetric).
    pub fn dequantize_linear_inputs(&self) -> (Vec<u8>, Vec<f32>, Option<Vec<u8>>) {
        let blocks = self.blocks();
        let symmetric = self.zero_points.is_none();
        let (middle, max) = (self.bits.symmetric_zero(), self.bits.max_code());
        let mut rows = Vec::with_capacity(self.k * self.n);
        for i in 0..self.k {
            for col in 0..self.n {
                let code = self.codes[col * self.k + i];
                // Signed in two's complement: the low bits of `code − middle`.
                rows.push(if symmetric {
                    code.wrapping_sub(middle) & max
                } else {
                    code
                });
            }
        }
        let scales = blocks_first(&self.scales, self.n, blocks);
        let zeros = self
            .zero_points
            .as_ref()
            .map(|z| self.bits.pack(&blocks_first(z, self.n, blocks)));
        (self.bits.pack(&rows), scales, zeros)
    }
}

/// A stored tensor of 4- or 8-bit codes, as ONNX packs it.
#[derive(Clone, Copy, Debug)]
pub struct PackedCodes<'a> {
    pub bytes: &'a [u8],
    pub bits: Bits,
    /// int4/int8 (two's complement) rather than uint4/uint8.
    pub signed: bool,
}

impl PackedCodes<'_> {
    fn value(&self, i: usize) -> f32 {
        let raw = match self.bits {
            Bits::Four => (self.bytes[i / 2] >> (4 * (i % 2))) & Bits::Four.max_code(),
            Bits::Eight => self.bytes[i],
        };
        match self.signed {
            true => f32::from(self.bits.signed(raw)),
            false => f32::from(raw),
        }
    }
}

/// The values of `DequantizeLinear(x, scales, zeros)` for x of shape `dims` (the zero points
/// stored as x): per tensor (one scale), per `axis` (`dims[axis]` scales) or in blocks of
/// `block_size` along `axis` (scales shaped as x with that axis `⌈dims[axis]/block_size⌉`).
/// `None` when the shapes disagree.
pub fn dequantize_linear(
    x: PackedCodes,
    dims: &[usize],
    axis: usize,
    block_size: usize,
    scales: &[f32],
    zeros: Option<&[u8]>,
) -> Option<Vec<f32>> {
    let count: usize = dims.iter().product();
    let dim = *dims.get(axis)?;
    let inner: usize = dims[axis + 1..].iter().product();
    let outer = count / (dim * inner).max(1);
    let blocks = if block_size > 0 {
        dim.div_ceil(block_size)
    } else {
        0
    };
    let index: Box<dyn Fn(usize) -> usize> = if scales.len() == 1 && block_size == 0 {
        Box::new(|_| 0)
    } else if block_size > 0 && scales.len() == outer * blocks * inner {
        Box::new(move |e| {
            let (o, a, i) = (e / (dim * inner), (e / inner) % dim, e % inner);
            (o * blocks + a / block_size) * inner + i
        })
    } else if block_size == 0 && scales.len() == dim {
        Box::new(move |e| (e / inner) % dim)
    } else {
        return None;
    };
    let bits = x.bits;
    if x.bytes.len() < bits.packed_len(count)
        || zeros.is_some_and(|z| z.len() < bits.packed_len(scales.len()))
    {
        return None;
    }
    let zeros = zeros.map(|bytes| PackedCodes { bytes, ..x });
    Some(
        (0..count)
            .map(|e| {
                let s = index(e);
                let zero = zeros.map_or(0.0, |z| z.value(s));
                (x.value(e) - zero) * scales[s]
            })
            .collect(),
    )
}

/// `[N][blocks]` values as `[blocks][N]`.
fn blocks_first<T: Copy>(values: &[T], n: usize, blocks: usize) -> Vec<T> {
    (0..blocks)
        .flat_map(|b| (0..n).map(move |col| values[col * blocks + b]))
        .collect()
}

/// Packs 4-bit values two per byte, the first in the low nibble; an odd count leaves the
/// last high nibble 0.
fn pack_nibbles(values: &[u8]) -> Vec<u8> {
    let low = Bits::Four.max_code();
    values
        .chunks(2)
        .map(|p| (p[0] & low) | (p.get(1).copied().unwrap_or(0) & low) << 4)
        .collect()
}

/// The first `count` 4-bit values of `packed` (as `pack_nibbles` wrote them), unsigned.
fn unpack_nibbles(packed: &[u8], count: usize) -> Vec<u8> {
    (0..count)
        .map(|i| (packed[i / 2] >> (4 * (i % 2))) & Bits::Four.max_code())
        .collect()
}

/// A signed int4 nibble's value.
fn signed_nibble(v: u8) -> i8 {
    ((v << 4) as i8) >> 4
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic quantized weight with codes, scales and zero points all varying.
    fn sample(bits: Bits, k: usize, n: usize, block: usize, symmetric: bool) -> BlockQuantized {
        let blocks = k.div_ceil(block);
        let codes = usize::from(bits.max_code()) + 1;
        BlockQuantized {
            bits,
            k,
            n,
            block,
            codes: (0..k * n).map(|i| ((i * 7 + 3) % codes) as u8).collect(),
            scales: (0..n * blocks).map(|i| 0.01 * (i + 1) as f32).collect(),
            zero_points: (!symmetric)
                .then(|| (0..n * blocks).map(|i| ((i * 5) % codes) as u8).collect()),
        }
    }

    #[test]
    fn matmul_nbits_round_trips_odd_k_and_a_padded_last_block() {
        for bits in [Bits::Four, Bits::Eight] {
            for (k, n, block, symmetric) in [
                (64, 3, 32, false),
                (45, 5, 16, false),
                (45, 5, 16, true),
                (33, 2, 32, false),
                (7, 1, 16, true),
            ] {
                let q = sample(bits, k, n, block, symmetric);
                let blocks = q.blocks();
                let weight = q.matmul_nbits_weight();
                assert_eq!(weight.len(), n * blocks * block * bits.count() / 8);
                let zeros = q.matmul_nbits_zero_points();
                if let Some(z) = &zeros {
                    assert_eq!(z.len(), n * (blocks * bits.count()).div_ceil(8));
                }
                let back = BlockQuantized::from_matmul_nbits(
                    bits,
                    (k, n, block),
                    &weight,
                    &q.scales,
                    zeros.as_deref(),
                )
                .unwrap();
                assert_eq!(back, q, "bits {bits:?} k {k} n {n} block {block}");
                // The padding of each column's last block holds its zero point.
                let codes = bits.unpack(&weight, n * blocks * block);
                for col in 0..n {
                    let column = &codes[col * blocks * block..(col + 1) * blocks * block];
                    let zero = q.zero_point(col, blocks - 1);
                    assert!(column[k..].iter().all(|&c| c == zero));
                }
            }
        }
    }

    #[test]
    fn matmul_nbits_packs_the_first_code_low() {
        let q = BlockQuantized {
            bits: Bits::Four,
            k: 16,
            n: 1,
            block: 16,
            codes: (0..16).collect(),
            scales: vec![1.0],
            zero_points: Some(vec![3]),
        };
        assert_eq!(&q.matmul_nbits_weight()[..2], &[0x10, 0x32]);
        assert_eq!(q.matmul_nbits_zero_points(), Some(vec![0x03]));
        assert_eq!(q.dequantize()[..4], [-3.0, -2.0, -1.0, 0.0]);
        let eight = BlockQuantized {
            bits: Bits::Eight,
            codes: vec![0, 127, 128, 255],
            k: 4,
            zero_points: None,
            ..q
        };
        assert_eq!(eight.matmul_nbits_weight()[..4], [0, 127, 128, 255]);
        assert_eq!(eight.dequantize(), [-128.0, -1.0, 0.0, 127.0]);
    }

    #[test]
    fn dequantize_linear_inputs_hold_the_same_weight() {
        for bits in [Bits::Four, Bits::Eight] {
            for symmetric in [false, true] {
                let (k, n, block) = (45, 3, 16);
                let q = sample(bits, k, n, block, symmetric);
                let (codes, scales, zeros) = q.dequantize_linear_inputs();
                let blocks = q.blocks();
                assert_eq!(codes.len(), (k * n * bits.count()).div_ceil(8));
                let x = PackedCodes {
                    bytes: &codes,
                    bits,
                    signed: symmetric,
                };
                let lowered = dequantize_linear(x, &[k, n], 0, block, &scales, zeros.as_deref());
                assert_eq!(lowered.as_deref(), Some(&q.dequantize()[..]));
                let codes = bits.unpack(&codes, k * n);
                let zeros = zeros.map(|z| bits.unpack(&z, blocks * n));
                let w = q.dequantize();
                for i in 0..k {
                    for col in 0..n {
                        let raw = codes[i * n + col];
                        let (value, zero) = match &zeros {
                            Some(z) => (f32::from(raw), f32::from(z[(i / block) * n + col])),
                            None => (f32::from(bits.signed(raw)), 0.0),
                        };
                        let x = (value - zero) * scales[(i / block) * n + col];
                        assert_eq!(x, w[i * n + col], "bits {bits:?} i {i} col {col}");
                    }
                }
            }
        }
    }

    #[test]
    fn nibbles_round_trip_an_odd_count() {
        let values = [1, 15, 0, 9, 4];
        let packed = pack_nibbles(&values);
        assert_eq!(packed, vec![0xf1, 0x90, 0x04]);
        assert_eq!(unpack_nibbles(&packed, 5), values);
        assert_eq!(signed_nibble(0xf), -1);
        assert_eq!(signed_nibble(0x8), -8);
        assert_eq!(signed_nibble(0x7), 7);
        assert_eq!(Bits::Eight.signed(0x80), -128);
        assert_eq!(Bits::Four.symmetric_zero(), 8);
        assert_eq!(Bits::Eight.symmetric_zero(), 128);
    }
}
