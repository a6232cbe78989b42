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

impl Source {
    /// `FileMapping::release_resident_pages` for every file of the model.
    pub fn release_resident_pages(&self) {
        for mapping in &self.mappings {
            mapping.release_resident_pages();
        }
    }

    /// Hands back the pages of `data`, a tensor's bytes, when they are a slice of one of the
    /// model's files (see `FileMapping::release_resident_pages`): for a pass that reads one
    /// weight at a time, so that what it has read does not pile up in memory. Bytes held
    /// anywhere else are left alone.
    pub fn release_pages_of(&self, data: &[u8]) {
        if let Some((mapping, offset)) = self
            .mappings
            .iter()
            .find_map(|m| Some((m, m.offset_of(data)?)))
        {
            mapping.release_range(offset as usize, data.len());
        }
    }
}

/// A file of a model (the model file or an external data file) mapped read-only in memory,
/// kept mapped so that a tensor whose bytes are a slice of it can be found again in the file,
/// and so that the pages read from it can be handed back to the kernel.
#[derive(Clone, Debug)]
pub struct FileMapping {
    /// The file, relative to `Source::dir`.
    pub location: String,
    /// `None` for an empty file, which cannot be mapped.
    map: Option<std::sync::Arc<memmap2::Mmap>>,
    bytes: bytes::Bytes,
}

/// The map as the owner of `Bytes` slices.
struct SharedMap(std::sync::Arc<memmap2::Mmap>);

impl AsRef<[u8]> for SharedMap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl FileMapping {
    /// Maps `file` read-only.
    pub fn map(location: &str, file: &std::fs::File) -> std::io::Result<FileMapping> {
        let empty = file.metadata()?.len() == 0;
        let map = if empty {
            None
        } else {
            // SAFETY: a read-only map; like every memory-mapped reader we rely on the file
            // not being truncated while the model is in use.
            Some(std::sync::Arc::new(unsafe { memmap2::Mmap::map(file)? }))
        };
        let bytes = match &map {
            Some(map) => bytes::Bytes::from_owner(SharedMap(map.clone())),
            None => bytes::Bytes::new(),
        };
        Ok(FileMapping {
            location: location.to_string(),
            map,
            bytes,
        })
    }

    /// The whole file; slices of it share the map.
    pub fn bytes(&self) -> &bytes::Bytes {
        &self.bytes
    }

    /// Where `data` lies in the file, if it is a slice of this mapping.
    pub fn offset_of(&self, data: &[u8]) -> Option<u64> {
        let base = self.bytes.as_ptr() as usize;
        let start = data.as_ptr() as usize;
        let inside = start >= base && start + data.len() <= base + self.bytes.len();
        (inside && !data.is_empty()).then(|| (start - base) as u64)
    }

    /// Hands the pages of the file this process has read back to the kernel, so that they no
    /// longer count in its memory. Nothing changes for readers: a page read again is read
    /// back from the file (the page cache, usually). Worth it once the weights have been
    /// copied elsewhere (into tract, or quantized), since a large model's pages would
    /// otherwise stay resident beside the copy.
    pub fn release_resident_pages(&self) {
        self.release_range(0, self.bytes.len());
    }

    /// `release_resident_pages` for bytes `offset..offset + len` of the file (the pages they
    /// touch, partial ones included: a neighbour's page is read again if needed, no more).
    fn release_range(&self, offset: usize, len: usize) {
        let Some(map) = &self.map else {
            return;
        };
        // SAFETY: the map is read-only and backed by the file, so MADV_DONTNEED only drops
        // this process's copies of clean pages: every slice keeps its contents, read again
        // from the file on the next access. A failure (a range outside the map included)
        // leaves the pages resident, no more.
        #[cfg(unix)]
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
        #[cfg(not(unix))]
        let _ = (map, offset, len);
    }
}

#[derive(Clone, Debug)]
pub struct Model {
    /// Everything of the `ModelProto` except the main graph: IR version, opset imports,
    /// producer, metadata, local functions, training info. Written back as read.
    pub envelope: ModelProto,
    pub graph: Graph,
    pub source: Option<Source>,
    /// What loading changed to make the file well-formed (a value written by two Constant
    /// nodes, say), one line each, for the report.
    pub repairs: Vec<String>,
    /// The default-domain opset import may not be raised: the model is an `If` branch
    /// rewritten on its own (`passes::branches`), and the main graph and the other branch
    /// import the same opset.
    pub opset_pinned: bool,
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
        let (graph, repairs) = convert::graph_from_proto(graph)?;
        Ok(Model {
            envelope: proto,
            graph,
            source: None,
            repairs,
            opset_pinned: false,
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

/// The default domain spelled `""`, however the file spelled it (`"ai.onnx"`).
pub(crate) fn normalize_domain(domain: &str) -> &str {
    if domain == "ai.onnx" {
        ""
    } else {
        domain
    }
}
