//! Scales, zero points and quantized weights, computed as ONNX Runtime's quantization tool
//! computes them (`compute_scale_zp` and `quantize_nparray` in
//! `onnxruntime/quantization/quant_utils.py`, version 1.32), so that the same range gives the
//! same numbers here and there: the range is widened to hold 0, the scale is computed in f64
//! and stored as f32, a scale below the smallest normal f32 becomes 1 with zero point 0, and
//! rounding is half to even (numpy's `round`).

use crate::error::{Error, Result};
use crate::ir::DataType;
use crate::quant::{QuantTarget, Range};

/// The integers a quantized type may take, as ONNX Runtime chooses them: int8 weights and
/// symmetric int8 activations use [-127, 127] so that the range is symmetric around 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntRange {
    pub min: i32,
    pub max: i32,
}

/// uint8, asymmetric: ONNX Runtime's activations.
pub const UINT8: IntRange = IntRange { min: 0, max: 255 };
/// int8, symmetric: weights, and TensorRT's activations.
pub const INT8_SYMMETRIC: IntRange = IntRange {
    min: -127,
    max: 127,
};
/// int8 codes of 7 bits, symmetric (ONNX Runtime's `reduce_range`): a uint8 activation times
/// such a weight, summed in pairs, stays within int16 (2 · 255 · 63 < 32 767), where ONNX
/// Runtime's uint8×int8 kernel sums pairs on CPUs without VNNI.
pub const INT7_SYMMETRIC: IntRange = IntRange { min: -63, max: 63 };
/// Every int8 value: where quantized values are clipped (as `quantize_nparray` clips).
const INT8_FULL: IntRange = IntRange {
    min: -128,
    max: 127,
};

/// How the weights of integer products (the MatMul/Gemm/Conv a quantized activation feeds)
/// are stored. ONNX Runtime's fast CPU kernel multiplies uint8 activations by int8 weights,
/// and on x86 CPUs without VNNI (AVX2, AVX-512BW) it sums pairs of products in int16
/// (`vpmaddubsw`), which saturates when codes are large (255 · 127 · 2 > 32 767); 7-bit codes
/// cannot saturate it (255 · 63 · 2 < 32 767). Its uint8×uint8 kernel does not saturate either,
/// and is slower. TensorRT multiplies int8 by int8 and takes nothing else.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProductWeights {
    /// Symmetric int8, zero points 0: the fast uint8×int8 kernel, which can saturate on CPUs
    /// without VNNI.
    Int8,
    /// The int8 codes plus 128, zero points 128: the uint8×uint8 kernel.
    Uint8,
    /// Symmetric int8 codes of 7 bits (in [-63, 63]), zero points 0: the fast uint8×int8
    /// kernel, which cannot saturate on them.
    #[default]
    Int7,
}

impl ProductWeights {
    /// The default for `target`: 7-bit codes for ONNX Runtime (whatever CPU the model will
    /// meet), every int8 code for TensorRT (its int8×int8 products do not saturate).
    pub fn default_for(target: QuantTarget) -> ProductWeights {
        match target {
            QuantTarget::Ort => ProductWeights::Int7,
            QuantTarget::Trt => ProductWeights::Int8,
        }
    }

    /// The codes a user `chosen`, else the mode's default: static INT8's follow `target`'s
    /// kernels; dynamic INT8's MatMulInteger runs in ONNX Runtime whatever the target.
    pub fn chosen_or_default(
        chosen: Option<ProductWeights>,
        static_int8: bool,
        target: QuantTarget,
    ) -> ProductWeights {
        match chosen {
            Some(codes) => codes,
            None if static_int8 => ProductWeights::default_for(target),
            None => ProductWeights::default(),
        }
    }

    /// The symmetric codes a channel's largest magnitude maps onto.
    pub fn codes(self) -> IntRange {
        match self {
            ProductWeights::Int7 => INT7_SYMMETRIC,
            ProductWeights::Int8 | ProductWeights::Uint8 => INT8_SYMMETRIC,
        }
    }

    /// The stored element type, the offset added to each symmetric code (and stored as every
    /// zero point), and the suffix of the stored initializer's name.
    pub fn storage(self) -> (DataType, u8, &'static str) {
        match self {
            ProductWeights::Int8 => (DataType::Int8, 0, "int8"),
            ProductWeights::Int7 => (DataType::Int8, 0, "int7"),
            ProductWeights::Uint8 => (DataType::Uint8, 128, "uint8"),
        }
    }
}

/// `x ≈ scale · (q − zero_point)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: i32,
}

/// ONNX Runtime's `compute_scale_zp`: the scale and zero point that map `[rmin, rmax]`
/// (widened to hold 0, and made symmetric around 0 when `symmetric`) onto `q`.
pub fn scale_zero_point(rmin: f32, rmax: f32, q: IntRange, symmetric: bool) -> QParams {
    let (mut rmin, mut rmax) = (rmin.min(0.0), rmax.max(0.0));
    if symmetric {
        let absmax = rmin.abs().max(rmax.abs());
        (rmin, rmax) = (-absmax, absmax);
    }
    // Subtracting in f64 as ONNX Runtime does: the f32 difference can overflow.
    let scale = (f64::from(rmax) - f64::from(rmin)) / f64::from(q.max - q.min);
    if scale < f64::from(f32::MIN_POSITIVE) {
        return QParams {
            scale: 1.0,
            zero_point: 0,
        };
    }
    let zero_point = if symmetric {
        (f64::from(q.min + q.max) / 2.0).round_ties_even()
    } else {
        (f64::from(q.min) - f64::from(rmin) / scale).round_ties_even()
    };
    QParams {
        scale: scale as f32,
        // In [q.min, q.max] since rmin ≤ 0 ≤ rmax.
        zero_point: zero_point as i32,
    }
}

/// The scale and zero point of an activation with calibrated `range` for `target`: uint8
/// asymmetric for ONNX Runtime (its fast CPU kernels take uint8 activations), int8 symmetric
/// with zero point 0 for TensorRT (the only form its parser accepts).
pub fn activation_params(name: &str, range: &Range, target: QuantTarget) -> Result<QParams> {
    if !range.min.is_finite() || !range.max.is_finite() || range.min > range.max {
        return Err(Error::Quantization(format!(
            "activation `{name}` has the range [{}, {}], which no scale can cover",
            range.min, range.max
        )));
    }
    Ok(match target {
        QuantTarget::Ort => scale_zero_point(range.min, range.max, UINT8, false),
        QuantTarget::Trt => scale_zero_point(range.min, range.max, INT8_SYMMETRIC, true),
    })
}

/// A float tensor quantized to int8, symmetric, with one scale per slice along an axis.
#[derive(Clone, Debug, PartialEq)]
pub struct PerChannel {
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
}

/// Quantizes `data` (row-major, shape `dims`) to int8 with one symmetric scale per index
/// along `axis`, as ONNX Runtime quantizes weights per channel: each channel's scale covers
/// its own largest magnitude, values are `round(x / scale)` clipped to [-128, 127].
pub fn quantize_per_channel(
    name: &str,
    data: &[f32],
    dims: &[usize],
    axis: usize,
) -> Result<PerChannel> {
    quantize_per_channel_within(name, data, dims, axis, INT8_SYMMETRIC)
}

/// `quantize_per_channel` with each channel's largest magnitude mapped to `codes.max`.
pub fn quantize_per_channel_within(
    name: &str,
    data: &[f32],
    dims: &[usize],
    axis: usize,
    codes: IntRange,
) -> Result<PerChannel> {
    let bad = |why: String| Error::Quantization(format!("weight `{name}`: {why}"));
    let channels = *dims
        .get(axis)
        .ok_or_else(|| bad(format!("no axis {axis} in shape {dims:?}")))?;
    if dims.iter().product::<usize>() != data.len() {
        return Err(bad(format!(
            "shape {dims:?} does not hold {} values",
            data.len()
        )));
    }
    if let Some(x) = data.iter().find(|x| !x.is_finite()) {
        return Err(bad(format!("holds the non-finite value {x}")));
    }
    let inner: usize = dims[axis + 1..].iter().product();
    let channel_of = |i: usize| (i / inner.max(1)) % channels;
    let mut lo = vec![0.0f32; channels];
    let mut hi = vec![0.0f32; channels];
    for (i, &x) in data.iter().enumerate() {
        let c = channel_of(i);
        lo[c] = lo[c].min(x);
        hi[c] = hi[c].max(x);
    }
    let params: Vec<QParams> = lo
        .iter()
        .zip(&hi)
        .map(|(&l, &h)| scale_zero_point(l, h, codes, true))
        .collect();
    let values = data
        .iter()
        .enumerate()
        .map(|(i, &x)| quantize(x, params[channel_of(i)], INT8_FULL) as i8)
        .collect();
    Ok(PerChannel {
        values,
        scales: params.iter().map(|p| p.scale).collect(),
    })
}

/// `clip(round(x / scale) + zero_point)`, the division in f32 as `quantize_nparray` does it.
pub fn quantize(x: f32, p: QParams, clip: IntRange) -> i32 {
    let q = (x / p.scale).round_ties_even() + p.zero_point as f32;
    q.clamp(clip.min as f32, clip.max as f32) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(min: f32, max: f32, target: QuantTarget) -> QParams {
        activation_params("x", &Range { min, max }, target).unwrap()
    }

    fn exact(scale: f64, zero_point: i32) -> QParams {
        QParams {
            scale: scale as f32,
            zero_point,
        }
    }

    #[test]
    fn uint8_activation_params_match_onnx_runtime() {
        // Values from onnxruntime.quantization.quant_utils.compute_scale_zp (1.32) with
        // qmin=0, qmax=255, symmetric=False, on float32 rmin/rmax.
        assert_eq!(params(-1.0, 3.0, QuantTarget::Ort), exact(4.0 / 255.0, 64));
        // A range that does not hold 0 is widened to hold it.
        assert_eq!(params(0.5, 2.0, QuantTarget::Ort), exact(2.0 / 255.0, 0));
        assert_eq!(
            params(-6.0, -2.0, QuantTarget::Ort),
            exact(6.0 / 255.0, 255)
        );
        // -rmin/scale = 0.5 · 255 = 127.5: half to even gives 128.
        assert_eq!(params(-0.5, 0.5, QuantTarget::Ort).zero_point, 128);
        // -rmin/scale = 1.5 · 255/6 = 63.75 → 64.
        assert_eq!(params(-1.5, 4.5, QuantTarget::Ort).zero_point, 64);
    }

    #[test]
    fn int8_activation_params_for_tensorrt_are_symmetric_with_zero_point_0() {
        assert_eq!(params(-1.0, 3.0, QuantTarget::Trt), exact(6.0 / 254.0, 0));
        // An all-zero tensor gets scale 1, as in ONNX Runtime.
        assert_eq!(params(0.0, 0.0, QuantTarget::Trt), exact(1.0, 0));
    }

    #[test]
    fn ranges_no_scale_can_cover_are_refused() {
        for (min, max) in [(f32::NEG_INFINITY, 1.0), (0.0, f32::NAN), (2.0, 1.0)] {
            let err = activation_params("h", &Range { min, max }, QuantTarget::Ort).unwrap_err();
            assert!(err.to_string().contains("activation `h`"), "{err}");
        }
    }

    #[test]
    fn per_channel_weights_are_exact_on_a_hand_made_matrix() {
        // [K=2, N=3]: channels are columns (axis 1).
        let w = [0.5, -1.0, 0.0, -0.25, 0.5, 0.0];
        let q = quantize_per_channel("w", &w, &[2, 3], 1).unwrap();
        let s0 = (1.0f64 / 254.0) as f32;
        let s1 = (2.0f64 / 254.0) as f32;
        assert_eq!(q.scales, [s0, s1, 1.0]);
        // 0.5 / (1/254) = 127; -0.25 / (1/254) = -63.5 → -64 (half to even);
        // -1 / (2/254) = -127; 0.5 / (2/254) = 63.5 → 64; an all-zero column stays 0.
        assert_eq!(q.values, [127, -127, 0, -64, 64, 0]);

        // The same matrix per row (axis 0), as for an embedding table or Gemm with transB.
        let q = quantize_per_channel("w", &w, &[2, 3], 0).unwrap();
        assert_eq!(q.scales, [s1, (0.5f64 / 127.0) as f32]);
        assert_eq!(q.values, [64, -127, 0, -64, 127, 0]);

        // Scale exactly 1: 62.5 rounds to the even 62, not away from zero.
        let q = quantize_per_channel("w", &[127.0, 62.5, -0.5], &[1, 3], 0).unwrap();
        assert_eq!((q.scales, q.values), (vec![1.0], vec![127, 62, 0]));
    }

    #[test]
    fn conv_weights_are_quantized_per_output_channel() {
        // [M=2, C=1, 1, 2]: axis 0, each filter spans two values.
        let w = [1.0, -2.0, 0.5, 0.25];
        let q = quantize_per_channel("w", &w, &[2, 1, 1, 2], 0).unwrap();
        assert_eq!(q.scales, [(4.0f64 / 254.0) as f32, (1.0f64 / 254.0) as f32]);
        assert_eq!(q.values, [64, -127, 127, 64]);
    }

    #[test]
    fn non_finite_weights_are_refused() {
        let err = quantize_per_channel("w", &[1.0, f32::INFINITY], &[1, 2], 1).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
        assert!(quantize_per_channel("w", &[1.0], &[1, 2], 1).is_err());
    }
}
