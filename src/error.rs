//! Library error type. Callers branch on the variant (the CLI maps them to one-line messages
//! and exit codes; tests assert on them), so every failure a user's file can cause has its own
//! variant instead of a string.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: empty file, not an ONNX model")]
    EmptyFile { path: PathBuf },

    #[error("not a valid ONNX protobuf ({0}); the file is truncated or is not an ONNX model")]
    Decode(#[from] prost::DecodeError),

    #[error("not an ONNX model: {0}")]
    NotAModel(String),

    #[error("invalid model: {0}")]
    InvalidModel(String),

    #[error("tensor `{name}`: {reason}")]
    InvalidTensor { name: String, reason: String },

    #[error("external data of tensor `{tensor}`: {reason}")]
    ExternalData { tensor: String, reason: String },

    #[error("node `{node}` ({op_type}) reads `{input}`, which no node, graph input or initializer produces")]
    UndefinedInput {
        node: String,
        op_type: String,
        input: String,
    },

    #[error("value `{0}` is produced more than once")]
    DuplicateProducer(String),

    #[error("the graph has a cycle through node `{0}`")]
    Cycle(String),

    #[error("graph output `{0}` is not produced by any node, graph input or initializer")]
    UndefinedOutput(String),

    #[error("cannot apply patch: {0}")]
    Patch(String),

    #[error("cannot quantize: {0}")]
    Quantization(String),

    #[error("cannot prune: {0}")]
    Pruning(String),

    #[error("{0}")]
    InvalidArgument(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn invalid_tensor(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidTensor {
            name: name.into(),
            reason: reason.into(),
        }
    }
}
