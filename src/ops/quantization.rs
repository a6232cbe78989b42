//! Operators that compute on quantized values: what a model that is already quantized holds
//! (quantizers leave it as it is, FP16 too, and its comparisons are by cosine: one float ulp
//! can move a quantizer's input across a rounding tie), and what TensorRT's parser refuses.

use crate::ir::Node;

/// Operators that compute on quantized integers: besides Q/DQ, what an already quantized
/// model holds, and what TensorRT's parser refuses (it takes explicit Q/DQ only).
const INTEGER_OPS: &[&str] = &[
    "MatMulInteger",
    "ConvInteger",
    "DynamicQuantizeLinear",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QAttention",
    "QEmbedLayerNormalization",
    "QOrderedMatMul",
    "QOrderedAttention",
    "QOrderedLayerNormalization",
    "QOrderedGelu",
    "MatMulNBits",
];

/// True for QLinear* and the other integer operators of `INTEGER_OPS`.
pub fn is_integer_op(node: &Node) -> bool {
    node.op_type().starts_with("QLinear") || INTEGER_OPS.contains(&node.op_type())
}

pub fn is_q_or_dq(node: &Node) -> bool {
    matches!(node.op_type(), "QuantizeLinear" | "DequantizeLinear")
}

/// True for a node that quantizes, dequantizes or computes on quantized integers.
pub fn quantizes(node: &Node) -> bool {
    is_q_or_dq(node) || is_integer_op(node)
}
