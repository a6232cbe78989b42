//! The intermediate representation every pass works on.
//!
//! A `Model` is the main graph as a petgraph-backed `Graph` plus the rest of the
//! `ModelProto` (the envelope) kept as read. Passes see only this module's types; protobuf
//! details stay in `convert` and `io`.

pub mod attr;
mod convert;
pub mod dump;
mod graph;
mod patch;
pub mod shape;
pub mod tensor;
#[cfg(test)]
pub(crate) mod testing;

pub use convert::{captured_names, free_names};
pub use graph::{Flow, Graph, Node, NodeId, OrderKey, Port, Use, Value, ValueId};
pub use patch::{PValue, Patch};
pub use shape::{Dim, ValueType};
pub use tensor::{DataType, DataTypeExt, Tensor};

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::proto::{ModelProto, OperatorSetIdProto, StringStringEntryProto};

/// Where a model was loaded from, for `inspect`, the report, and the tract bridge.
#[derive(Clone, Debug, Default)]
pub struct Source {
    pub path: PathBuf,
    /// The folder external data locations are relative to.
    pub dir: PathBuf,
    pub file_bytes: u64,
    /// External data files read, with the bytes each holds.
    pub external_files: Vec<(String, u64)>,
    /// Bytes of fields this schema does not know; they were dropped on reading.
    pub unknown_field_bytes: u64,
    /// The files mapped in memory, which untouched weights still point into.
    pub mappings: Vec<FileMapping>,
}

/// A memory-mapped file of a model (the model file or an external data file), kept mapped
/// so that a tensor whose bytes are a slice of it can be found again in the file.
#[derive(Clone, Debug)]
pub struct FileMapping {
    /// The file, relative to `Source::dir`.
    pub location: String,
    bytes: bytes::Bytes,
}

impl FileMapping {
    pub fn new(location: &str, bytes: bytes::Bytes) -> FileMapping {
        FileMapping {
            location: location.to_string(),
            bytes,
        }
    }

    /// Where `data` lies in the file, if it is a slice of this mapping.
    pub fn offset_of(&self, data: &[u8]) -> Option<u64> {
        let base = self.bytes.as_ptr() as usize;
        let start = data.as_ptr() as usize;
        let inside = start >= base && start + data.len() <= base + self.bytes.len();
        (inside && !data.is_empty()).then(|| (start - base) as u64)
    }
}

#[derive(Clone, Debug)]
pub struct Model {
    /// Everything of the `ModelProto` except the main graph: IR version, opset imports,
    /// producer, metadata, local functions, training info. Written back as read.
    pub envelope: ModelProto,
    pub graph: Graph,
    pub source: Option<Source>,
}

impl Model {
    /// Builds the IR. Tensors must have had their external data resolved (see `io`).
    pub fn from_proto(mut proto: ModelProto) -> Result<Model> {
        if proto.ir_version.unwrap_or(0) <= 0 {
            return Err(Error::NotAModel("no IR version".into()));
        }
        if proto.opset_import.is_empty() {
            return Err(Error::NotAModel("no opset import".into()));
        }
        let graph = proto
            .graph
            .take()
            .ok_or_else(|| Error::NotAModel("no graph".into()))?;
        Ok(Model {
            envelope: proto,
            graph: convert::graph_from_proto(graph)?,
            source: None,
        })
    }

    pub fn to_proto(&self) -> Result<ModelProto> {
        let mut proto = self.envelope.clone();
        proto.graph = Some(convert::graph_to_proto(&self.graph)?);
        Ok(proto)
    }

    pub fn ir_version(&self) -> i64 {
        self.envelope.ir_version()
    }

    /// The imported version of `domain` (`""` or `"ai.onnx"` for the default domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        let wanted = normalize_domain(domain);
        self.envelope
            .opset_import
            .iter()
            .find(|o| normalize_domain(o.domain()) == wanted)
            .map(|o| o.version())
    }

    /// Imports `domain` at `version`, raising an existing import if it is lower.
    pub fn require_opset(&mut self, domain: &str, version: i64) {
        let wanted = normalize_domain(domain);
        match self
            .envelope
            .opset_import
            .iter_mut()
            .find(|o| normalize_domain(o.domain()) == wanted)
        {
            Some(o) if o.version() >= version => {}
            Some(o) => o.version = Some(version),
            None => self.envelope.opset_import.push(OperatorSetIdProto {
                domain: Some(domain.to_string()),
                version: Some(version),
            }),
        }
    }

    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.envelope
            .metadata_props
            .iter()
            .find(|p| p.key() == key)
            .map(|p| p.value())
    }

    pub fn set_metadata(&mut self, key: &str, value: &str) {
        match self
            .envelope
            .metadata_props
            .iter_mut()
            .find(|p| p.key() == key)
        {
            Some(p) => p.value = Some(value.to_string()),
            None => self.envelope.metadata_props.push(StringStringEntryProto {
                key: Some(key.to_string()),
                value: Some(value.to_string()),
            }),
        }
    }
}

fn normalize_domain(domain: &str) -> &str {
    if domain == "ai.onnx" {
        ""
    } else {
        domain
    }
}
