//! What onnxopt knows about the operators it emits or treats specially, in one place below
//! both `passes` (which build them) and `exec` (which runs them): the domain they live in,
//! the input forms each runtime's kernel accepts (a fusion builds an operator only when the
//! inferred shapes prove that contract), and how tract runs them.

pub mod attention;

/// The domain of ONNX Runtime's contrib operators.
pub const MS_DOMAIN: &str = "com.microsoft";
