//! What `onnxopt inspect` shows: the facts about a model a user checks before and after
//! optimizing it.

use std::collections::BTreeMap;
use std::fmt;

use crate::ir::dump::type_text;
use crate::ir::{DataTypeExt, Model};

/// Metadata key under which onnxopt records the runtime an output was built for.
pub const TARGET_KEY: &str = "onnxopt.target";

#[derive(Clone, Debug, serde::Serialize)]
pub struct Inspection {
    pub path: String,
    pub file_bytes: u64,
    pub ir_version: i64,
    pub opsets: Vec<(String, i64)>,
    pub producer: String,
    /// The runtime onnxopt built this model for, if onnxopt wrote it.
    pub target: Option<String>,
    pub inputs: Vec<(String, String)>,
    pub outputs: Vec<(String, String)>,
    pub nodes: usize,
    pub op_histogram: BTreeMap<String, usize>,
    pub initializers: usize,
    /// Elements of floating-point initializers.
    pub parameters: u64,
    pub initializer_bytes: u64,
    pub external_data: Vec<(String, u64)>,
    pub local_functions: usize,
    pub metadata: Vec<(String, String)>,
    /// Bytes of the file that the schema did not account for (unknown fields, dropped).
    pub unknown_field_bytes: u64,
}

pub fn inspect(model: &Model) -> Inspection {
    let g = &model.graph;
    let port_types = |ports: &[crate::ir::Port]| -> Vec<(String, String)> {
        ports
            .iter()
            .filter(|p| g.initializer(p.value).is_none())
            .map(|p| {
                let ty = p
                    .decl
                    .r#type
                    .as_ref()
                    .map(type_text)
                    .unwrap_or_else(|| "?".into());
                (g.value_name(p.value).to_string(), ty)
            })
            .collect()
    };
    let mut op_histogram = BTreeMap::new();
    for (_, node) in g.nodes() {
        let op = match node.domain() {
            "" => node.op_type().to_string(),
            d => format!("{d}::{}", node.op_type()),
        };
        *op_histogram.entry(op).or_insert(0) += 1;
    }
    let (mut initializers, mut parameters, mut initializer_bytes) = (0, 0u64, 0u64);
    for (_, t) in g.initializers() {
        initializers += 1;
        initializer_bytes += t.byte_len() as u64;
        if t.dtype().is_float() {
            parameters += t.numel() as u64;
        }
    }
    let source = model.source.clone().unwrap_or_default();
    let e = &model.envelope;
    Inspection {
        path: source.path.display().to_string(),
        file_bytes: source.file_bytes,
        ir_version: model.ir_version(),
        opsets: e
            .opset_import
            .iter()
            .map(|o| {
                let d = if o.domain().is_empty() {
                    "ai.onnx"
                } else {
                    o.domain()
                };
                (d.to_string(), o.version())
            })
            .collect(),
        producer: format!("{} {}", e.producer_name(), e.producer_version())
            .trim()
            .to_string(),
        target: model.metadata(TARGET_KEY).map(str::to_string),
        inputs: port_types(&g.inputs),
        outputs: port_types(&g.outputs),
        nodes: g.node_count(),
        op_histogram,
        initializers,
        parameters,
        initializer_bytes,
        external_data: source.external_files,
        local_functions: e.functions.len(),
        metadata: e
            .metadata_props
            .iter()
            .map(|p| (p.key().to_string(), p.value().to_string()))
            .collect(),
        unknown_field_bytes: source.unknown_field_bytes,
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model        {} ({} bytes)", self.path, self.file_bytes)?;
        writeln!(f, "ir_version   {}", self.ir_version)?;
        let opsets: Vec<String> = self
            .opsets
            .iter()
            .map(|(d, v)| format!("{d} {v}"))
            .collect();
        writeln!(f, "opsets       {}", opsets.join(", "))?;
        writeln!(f, "producer     {}", self.producer)?;
        writeln!(
            f,
            "target       {}",
            self.target.as_deref().unwrap_or("(not written by onnxopt)")
        )?;
        for (name, ty) in &self.inputs {
            writeln!(f, "input        {name}: {ty}")?;
        }
        for (name, ty) in &self.outputs {
            writeln!(f, "output       {name}: {ty}")?;
        }
        writeln!(
            f,
            "parameters   {} in {} initializers, {} bytes",
            self.parameters, self.initializers, self.initializer_bytes
        )?;
        for (file, bytes) in &self.external_data {
            writeln!(f, "external     {file} ({bytes} bytes)")?;
        }
        if self.local_functions > 0 {
            writeln!(f, "functions    {}", self.local_functions)?;
        }
        for (k, v) in &self.metadata {
            writeln!(f, "metadata     {k} = {v}")?;
        }
        if self.unknown_field_bytes > 0 {
            writeln!(
                f,
                "warning      {} bytes of fields unknown to ONNX 1.23 were dropped",
                self.unknown_field_bytes
            )?;
        }
        writeln!(f, "nodes        {}", self.nodes)?;
        let mut ops: Vec<(&String, &usize)> = self.op_histogram.iter().collect();
        ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (op, n) in ops {
            writeln!(f, "  {n:>6}  {op}")?;
        }
        Ok(())
    }
}
