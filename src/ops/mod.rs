//! What onnxopt knows about the operators it emits or treats specially, in one place below
//! both `passes` (which build them) and `exec` (which runs them): the domain they live in,
//! the input forms each runtime's kernel accepts (a fusion builds an operator only when the
//! inferred shapes prove that contract: `attention`), how tract runs them (`CONTRIB_OPS`,
//! and the lowerings in `attention`, `embed_layer_norm`, `rotary`), which element types their schema takes, and which
//! axis of their weights is which (`weights`).

pub mod attention;
pub mod embed_layer_norm;
pub mod nbits;
pub mod quantization;
pub mod rotary;
pub mod weights;

/// Operators that apply to each element (with broadcasting): they keep heads apart
/// (structured pruning) and the spatial dims of what a convolution wrote (`exec::inputs`).
pub const ELEMENTWISE: &[&str] = &[
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Where",
    "Pow",
    "Max",
    "Min",
    "Equal",
    "Less",
    "Greater",
    "IsNaN",
    "IsInf",
    "Not",
    "And",
    "Or",
    "Cast",
    "Dropout",
    "Identity",
    "Sqrt",
    "Neg",
    "Exp",
    "Tanh",
    "Erf",
    "Relu",
    "Sigmoid",
    "Abs",
    "Reciprocal",
    "Clip",
    "Gelu",
];

/// The domain of ONNX Runtime's contrib operators.
pub const MS_DOMAIN: &str = "com.microsoft";

/// Given which input slots of a node are present, the case tract gets wrong, if any.
pub type Caveat = fn(&[bool]) -> Option<&'static str>;

/// How tract runs a contrib operator. tract looks operators up by `op_type` and ignores
/// their domain, so each contrib operator must be one of these, never left to chance.
#[derive(Clone, Copy)]
pub enum Tract {
    /// tract's operator of that name follows ONNX Runtime's definition, except in the case
    /// the caveat names.
    Native(Option<Caveat>),
    /// Lowered to standard operators before tract sees it (`exec::lower`), in the forms
    /// onnxopt emits; any other form is refused.
    Lowered,
    /// tract has no faithful implementation: only ONNX Runtime runs it.
    Unfaithful,
}

/// One `com.microsoft` operator.
pub struct ContribOp {
    pub name: &'static str,
    pub tract: Tract,
    /// Its ONNX Runtime schema takes float16 wherever it takes float32 (FP16 conversion
    /// keeps every other contrib operator in float32, behind Casts).
    pub float16: bool,
    /// A fusion or quantizer of onnxopt can write it.
    pub emitted: bool,
}

impl std::fmt::Debug for ContribOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "com.microsoft::{}", self.name)
    }
}

const fn op(name: &'static str, tract: Tract, float16: bool, emitted: bool) -> ContribOp {
    ContribOp {
        name,
        tract,
        float16,
        emitted,
    }
}

/// tract counts present inputs, so a SkipLayerNormalization bias (input 4) without a beta
/// (input 3) is read from the wrong slot.
fn skip_layer_norm_caveat(present: &[bool]) -> Option<&'static str> {
    let has = |slot: usize| present.get(slot).copied().unwrap_or(false);
    (has(4) && !has(3)).then_some("a bias without a beta")
}

/// tract ignores a SkipSimplifiedLayerNormalization bias (input 3); ONNX Runtime 1.32 adds it.
fn skip_simplified_layer_norm_caveat(present: &[bool]) -> Option<&'static str> {
    present
        .get(3)
        .copied()
        .unwrap_or(false)
        .then_some("a bias, which tract ignores")
}

/// The contrib operators onnxopt emits or meets in users' files.
pub const CONTRIB_OPS: &[ContribOp] = &[
    op("Attention", Tract::Lowered, true, true),
    op("MultiHeadAttention", Tract::Lowered, true, true),
    // 4-bit weights (`nbits`). tract 0.23.9 has its own MatMulNBits, whose outputs with
    // zero points differ from ONNX Runtime's (0.18 apart on tests/weight_only's chain, where ONNX
    // Runtime and the dequantized weights agree within 1e-6): lowered to a MatMul with the
    // dequantized weight instead.
    op("MatMulNBits", Tract::Lowered, true, true),
    // A tied embedding on its LM head's 4-bit codes (`--weights int4 --lm-head`).
    op("GatherBlockQuantized", Tract::Lowered, false, true),
    // Same definition as ONNX Gelu with approximate="none".
    op("Gelu", Tract::Native(None), true, false),
    op("FastGelu", Tract::Native(None), true, true),
    op("BiasGelu", Tract::Native(None), true, true),
    op("QuickGelu", Tract::Native(None), true, true),
    op("RotaryEmbedding", Tract::Lowered, true, true),
    // ONNX Runtime 1.32 registers its CPU kernel for float32 only (`embed_layer_norm`).
    op("EmbedLayerNormalization", Tract::Lowered, false, true),
    op(
        "SkipLayerNormalization",
        Tract::Native(Some(skip_layer_norm_caveat)),
        true,
        false,
    ),
    // tract 0.23.9 runs it as ONNX Runtime 1.32 does (the sum, then the RMSNorm; its
    // residual-sum output), except that it ignores a bias, which ONNX Runtime adds
    // (tests/engines).
    op(
        "SkipSimplifiedLayerNormalization",
        Tract::Native(Some(skip_simplified_layer_norm_caveat)),
        true,
        false,
    ),
    // ONNX Runtime registers its SimplifiedLayerNormalization kernel in the default domain
    // only (1.32 refuses `com.microsoft::SimplifiedLayerNormalization` as "not a registered
    // function/op"): a default-domain node goes to tract, which runs it as RMSNorm, agreeing
    // with that kernel (tests/engines); this spelling has no kernel to be faithful to.
    op(
        "SimplifiedLayerNormalization",
        Tract::Unfaithful,
        true,
        false,
    ),
    // ONNX Runtime's dynamic quantization: float32 inputs only.
    op("DynamicQuantizeLSTM", Tract::Unfaithful, false, false),
    op("DynamicQuantizeMatMul", Tract::Unfaithful, false, false),
    op("MatMulIntegerToFloat", Tract::Unfaithful, true, false),
    op("QAttention", Tract::Unfaithful, false, false),
    op("QGemm", Tract::Unfaithful, false, false),
];

/// The entry of contrib operator `name`, if onnxopt knows it.
pub fn contrib(name: &str) -> Option<&'static ContribOp> {
    CONTRIB_OPS.iter().find(|o| o.name == name)
}
