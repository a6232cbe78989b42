//! A stable, readable text form of a model, for snapshot tests and for diffing two models.
//!
//! One line per graph input, output, initializer and node, in file order (which `io::save`
//! makes deterministic). Values are written `%name`; a node output is followed by its type
//! when the graph records one. Small tensors (at most 8 elements) show their values, larger
//! ones their type and an FNV-1a hash of their bytes, so a snapshot catches a changed weight
//! without printing it. Node names and doc strings are left out: they do not change what a
//! model computes, and exporters make them long.

use super::tensor::{dtype_name, DataType, DataTypeExt, Tensor};
use crate::proto::attribute_proto::AttributeType;
use crate::proto::tensor_shape_proto::dimension::Value as Dim;
use crate::proto::type_proto::Value as Type;
use crate::proto::{
    AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, TensorProto, TypeProto,
    ValueInfoProto,
};

/// Tensors with at most this many elements are printed with their values.
const INLINE_VALUES: usize = 8;

pub fn dump_model(model: &ModelProto) -> String {
    let mut d = Dumper::default();
    d.line(format!("ir_version {}", model.ir_version()));
    for o in &model.opset_import {
        let domain = if o.domain().is_empty() {
            "ai.onnx"
        } else {
            o.domain()
        };
        d.line(format!("opset {domain} {}", o.version()));
    }
    if model.producer_name.is_some() || model.producer_version.is_some() {
        d.line(format!(
            "producer {:?} {:?}",
            model.producer_name(),
            model.producer_version()
        ));
    }
    for p in &model.metadata_props {
        d.line(format!("metadata {:?} = {:?}", p.key(), p.value()));
    }
    if let Some(g) = &model.graph {
        d.graph(g);
    }
    for f in &model.functions {
        d.function(f);
    }
    d.out
}

#[derive(Default)]
struct Dumper {
    out: String,
    indent: usize,
}

impl Dumper {
    fn line(&mut self, text: impl AsRef<str>) {
        for _ in 0..self.indent {
            self.out.push_str("  ");
        }
        self.out.push_str(text.as_ref());
        self.out.push('\n');
    }

    fn graph(&mut self, g: &GraphProto) {
        self.line(format!("graph {:?} {{", g.name()));
        self.indent += 1;
        let inits: std::collections::HashSet<&str> =
            g.initializer.iter().map(|t| t.name()).collect();
        for i in g.input.iter().filter(|i| !inits.contains(i.name())) {
            self.line(format!("input %{}: {}", i.name(), value_type(i)));
        }
        for o in &g.output {
            self.line(format!("output %{}: {}", o.name(), value_type(o)));
        }
        for t in &g.initializer {
            self.line(format!("init %{}: {}", t.name(), tensor_text(t)));
        }
        for s in &g.sparse_initializer {
            let values = s.values.as_ref();
            self.line(format!(
                "sparse_init %{}: dims {:?}, {} values",
                values.map(|v| v.name()).unwrap_or_default(),
                s.dims,
                values.map(|v| v.dims.iter().product::<i64>()).unwrap_or(0)
            ));
        }
        let types: std::collections::HashMap<&str, &ValueInfoProto> =
            g.value_info.iter().map(|v| (v.name(), v)).collect();
        for n in &g.node {
            let outputs: Vec<String> = n
                .output
                .iter()
                .map(|o| match (o.is_empty(), types.get(o.as_str())) {
                    (true, _) => "_".to_string(),
                    (false, Some(info)) => format!("%{o}: {}", value_type(info)),
                    (false, None) => format!("%{o}"),
                })
                .collect();
            self.node(&outputs.join(", "), n);
        }
        self.indent -= 1;
        self.line("}");
    }

    fn node(&mut self, outputs: &str, n: &NodeProto) {
        let op = if n.domain().is_empty() || n.domain() == "ai.onnx" {
            n.op_type().to_string()
        } else {
            format!("{}::{}", n.domain(), n.op_type())
        };
        let attrs: Vec<String> = n.attribute.iter().map(attribute_text).collect();
        let attrs = if attrs.is_empty() {
            String::new()
        } else {
            format!("[{}]", attrs.join(", "))
        };
        let inputs: Vec<String> = n
            .input
            .iter()
            .map(|i| {
                if i.is_empty() {
                    "_".to_string()
                } else {
                    format!("%{i}")
                }
            })
            .collect();
        self.line(format!("{outputs} = {op}{attrs}({})", inputs.join(", ")));
        for a in &n.attribute {
            for g in a.g.iter().chain(&a.graphs) {
                self.indent += 1;
                self.line(format!("{}:", a.name()));
                self.graph(g);
                self.indent -= 1;
            }
        }
    }

    fn function(&mut self, f: &FunctionProto) {
        self.line(format!(
            "function {}::{}({}) -> ({}) {{",
            f.domain(),
            f.name(),
            f.input.join(", "),
            f.output.join(", ")
        ));
        self.indent += 1;
        for n in &f.node {
            let outputs: Vec<String> = n.output.iter().map(|o| format!("%{o}")).collect();
            self.node(&outputs.join(", "), n);
        }
        self.indent -= 1;
        self.line("}");
    }
}

/// `name=value`, as the dump writes an attribute.
pub fn attribute_text(a: &AttributeProto) -> String {
    let name = a.name();
    if let Some(r) = &a.ref_attr_name {
        return format!("{name}=@{r}");
    }
    let value = match a.r#type() {
        AttributeType::Int => a.i().to_string(),
        AttributeType::Float => format!("{:?}", a.f()),
        AttributeType::String => format!("{:?}", String::from_utf8_lossy(a.s())),
        AttributeType::Ints => format!("{:?}", a.ints),
        AttributeType::Floats => format!("{:?}", a.floats),
        AttributeType::Strings => {
            let s: Vec<_> = a
                .strings
                .iter()
                .map(|s| String::from_utf8_lossy(s))
                .collect();
            format!("{s:?}")
        }
        AttributeType::Tensor => a.t.as_ref().map(tensor_text).unwrap_or_default(),
        AttributeType::Tensors => {
            let t: Vec<_> = a.tensors.iter().map(tensor_text).collect();
            format!("[{}]", t.join(", "))
        }
        AttributeType::Graph => "<graph>".to_string(),
        AttributeType::Graphs => format!("<{} graphs>", a.graphs.len()),
        AttributeType::TypeProto => a.tp.as_ref().map(type_text).unwrap_or_default(),
        AttributeType::SparseTensor | AttributeType::SparseTensors | AttributeType::TypeProtos => {
            format!("<{}>", a.r#type().as_str_name())
        }
        AttributeType::Undefined => "<undefined>".to_string(),
    };
    format!("{name}={value}")
}

/// `f32[2, 3] = [..]` for small tensors, `f32[64, 64] #0123456789abcdef` for large ones.
pub fn tensor_text(t: &TensorProto) -> String {
    let ty = format!("{}{:?}", dtype_name(t.data_type()), t.dims);
    let Ok(tensor) = Tensor::from_proto(t.clone()) else {
        return format!("{ty} <invalid>");
    };
    if tensor.numel() <= INLINE_VALUES {
        if let Some(values) = values_text(&tensor) {
            return format!("{ty} = {values}");
        }
    }
    match tensor.raw_bytes() {
        Some(bytes) => format!("{ty} #{:016x}", fnv1a(&bytes)),
        None => ty,
    }
}

fn values_text(t: &Tensor) -> Option<String> {
    let dt = t.dtype();
    if dt == DataType::String {
        let s: Vec<_> = t
            .proto()
            .string_data
            .iter()
            .map(|s| String::from_utf8_lossy(s))
            .collect();
        return Some(format!("{s:?}"));
    }
    if dt.is_float() {
        return t.to_f32_vec().ok().map(|v| format!("{v:?}"));
    }
    t.to_i64_vec().ok().map(|v| format!("{v:?}"))
}

/// 64-bit FNV-1a: a stable hash (the same across runs and builds) for names and contents.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

fn value_type(v: &ValueInfoProto) -> String {
    v.r#type
        .as_ref()
        .map(type_text)
        .unwrap_or_else(|| "?".into())
}

/// `f32[batch, sequence, 64]`; `?` for a dim with neither value nor name, `[..]` for an
/// unknown rank.
pub fn type_text(t: &TypeProto) -> String {
    let shape_text = |shape: &Option<crate::proto::TensorShapeProto>| match shape {
        None => "[..]".to_string(),
        Some(s) => {
            let dims: Vec<String> = s
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(Dim::DimValue(v)) => v.to_string(),
                    Some(Dim::DimParam(p)) => p.clone(),
                    None => "?".into(),
                })
                .collect();
            format!("[{}]", dims.join(", "))
        }
    };
    match &t.value {
        Some(Type::TensorType(tt)) => {
            format!("{}{}", dtype_name(tt.elem_type()), shape_text(&tt.shape))
        }
        Some(Type::SparseTensorType(tt)) => {
            format!(
                "sparse {}{}",
                dtype_name(tt.elem_type()),
                shape_text(&tt.shape)
            )
        }
        Some(Type::SequenceType(s)) => format!(
            "seq({})",
            s.elem_type.as_deref().map(type_text).unwrap_or_default()
        ),
        Some(Type::OptionalType(o)) => format!(
            "optional({})",
            o.elem_type.as_deref().map(type_text).unwrap_or_default()
        ),
        Some(Type::MapType(m)) => format!(
            "map({}, {})",
            dtype_name(m.key_type()),
            m.value_type.as_deref().map(type_text).unwrap_or_default()
        ),
        Some(Type::OpaqueType(o)) => format!("opaque({}::{})", o.domain(), o.name()),
        None => "?".into(),
    }
}
