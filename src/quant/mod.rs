//! Quantization: calibration, static INT8 with QuantizeLinear/DequantizeLinear pairs, dynamic
//! INT8 and FP16.
//!
//! The pieces share these types: a static run calibrates the activations `qdq` chooses
//! (`calibrate`), turning what it observed into a `Range` per tensor with a `RangeMethod`,
//! and `qdq` rewrites the graph from those ranges for a `QuantTarget`.

pub mod qdq;

use std::collections::BTreeMap;

/// The runtime a quantized model is built for; it decides the element types and which
/// operators may appear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantTarget {
    /// ONNX Runtime: uint8 activations with zero points, int8 weights.
    Ort,
    /// TensorRT's ONNX parser rules: int8 only, zero points 0, activation scales per tensor,
    /// weights per channel, no int32 bias, no QLinear*/MatMulInteger/ConvInteger operators.
    Trt,
}

/// How a tensor's observed values become the range its scale covers.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum RangeMethod {
    /// The smallest and largest finite values seen.
    MinMax,
    /// The given percentile of |x| (e.g. 99.999), symmetric.
    Percentile(f64),
    /// The clipping threshold minimizing the KL divergence between the observed distribution
    /// and its quantized form (TensorRT's entropy calibration).
    Entropy,
    /// The clipping threshold minimizing the mean squared quantization error.
    Mse,
}

/// The calibrated range of one tensor: the values its quantization must represent.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Range {
    pub min: f32,
    pub max: f32,
}

/// Calibrated ranges, by value name.
pub type Ranges = BTreeMap<String, Range>;
