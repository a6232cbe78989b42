//! `GraphProto` ⇄ `Graph`. Loading checks what ONNX requires of a graph (every value has one
//! producer, every read value exists, no cycle) so that passes can rely on it; saving writes
//! back every field, in an order fixed by the graph alone, so the same graph always gives the
//! same bytes and an untouched graph gives the bytes it was read from.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::graph::{Graph, Node, OrderKey, Port};
use super::shape::{is_number, Dim, ValueType};
use super::tensor::Tensor;
use crate::error::{Error, Result};
use crate::proto::{AttributeProto, GraphProto, NodeProto, TensorProto, TypeProto, ValueInfoProto};

/// Builds the IR of a top-level graph. Tensors must have had their external data resolved.
/// Returns the graph and what loading repaired (see `drop_duplicate_constants`).
pub fn graph_from_proto(mut proto: GraphProto) -> Result<(Graph, Vec<String>)> {
    let mut nodes = std::mem::take(&mut proto.node);
    let mut initializers = std::mem::take(&mut proto.initializer);
    let mut repairs = drop_duplicate_constants(&mut nodes, &mut initializers);
    let sparse = std::mem::take(&mut proto.sparse_initializer);
    let mut inputs = std::mem::take(&mut proto.input);
    let mut outputs = std::mem::take(&mut proto.output);
    let mut value_info = std::mem::take(&mut proto.value_info);
    repairs.extend(mark_numbered_dims(
        &mut inputs,
        &mut outputs,
        &mut value_info,
    ));
    let mut g = Graph::empty(proto);

    // Every name defined in this graph, checked for single assignment before any node is
    // wired, so that nodes may appear in any order in the file.
    let mut defined: HashSet<String> = HashSet::new();
    let mut define = |name: &str| -> Result<()> {
        if !defined.insert(name.to_string()) {
            return Err(Error::DuplicateProducer(name.to_string()));
        }
        Ok(())
    };
    for t in &initializers {
        define(t.name())?;
    }
    for s in &sparse {
        define(s.values.as_ref().map(|v| v.name()).unwrap_or_default())?;
    }
    for input in &inputs {
        // Old models (IR < 4) list initializers as graph inputs too: that is one value.
        if !initializers.iter().any(|t| t.name() == input.name()) {
            define(input.name())?;
        }
    }
    for node in &nodes {
        for out in node.output.iter().filter(|o| !o.is_empty()) {
            define(out)?;
        }
    }

    for t in initializers {
        let v = g.intern(t.name());
        g.set_initializer(v, Tensor::from_proto(t)?);
    }
    for s in &sparse {
        let v = g.intern(s.values.as_ref().map(|v| v.name()).unwrap_or_default());
        g.mark_sparse(v);
    }
    g.sparse_initializers = sparse;
    for decl in inputs {
        let value = g.intern(decl.name());
        g.inputs.push(Port { value, decl });
    }
    for (position, mut proto) in nodes.into_iter().enumerate() {
        let resolve = |name: &String, g: &mut Graph| -> Result<Option<_>> {
            if name.is_empty() {
                return Ok(None);
            }
            if !defined.contains(name) {
                return Err(Error::UndefinedInput {
                    node: proto_label(&proto),
                    op_type: proto.op_type().to_string(),
                    input: name.clone(),
                });
            }
            Ok(Some(g.intern(name)))
        };
        let inputs = proto
            .input
            .iter()
            .map(|n| resolve(n, &mut g))
            .collect::<Result<Vec<_>>>()?;
        let outputs = proto
            .output
            .iter()
            .map(|n| (!n.is_empty()).then(|| g.intern(n)))
            .collect();
        let mut captured = Vec::new();
        for name in captured_names(&proto.attribute) {
            captured.push(resolve(&name, &mut g)?.ok_or_else(|| {
                Error::InvalidModel("a subgraph reads a value with an empty name".into())
            })?);
        }
        proto.input.clear();
        proto.output.clear();
        g.add_node(Node {
            proto,
            inputs,
            outputs,
            captured,
            order: OrderKey {
                major: position as u64,
                minor: 0,
            },
        })?;
    }
    for info in value_info {
        let v = g.intern(info.name());
        g.set_value_info(v, info);
    }
    for decl in outputs {
        if !defined.contains(decl.name()) {
            return Err(Error::UndefinedOutput(decl.name().to_string()));
        }
        let value = g.intern(decl.name());
        g.outputs.push(Port { value, decl });
    }
    g.topological_order()?;
    Ok((g, repairs))
}

/// Where a graph input names a dim by a number, that number in the dim expressions of the
/// declarations (inputs, outputs, `value_info`) marked as the symbol it is (`s11 + 3` →
/// `s11 + (3)`, see `Dim::parse`). torch 2.6's dynamo exporter names dynamic dims after the
/// example's sizes (`"2"`, `"3"`, `"s11"`) and writes the cache it returns as `s11 + 3`: past
/// plus the new tokens. Read as a sum with the number 3, it made positions and activations 3
/// tokens long for good, and the optimized model failed on any other length. Returns one line
/// for the report when it marks any.
fn mark_numbered_dims(
    inputs: &mut [ValueInfoProto],
    outputs: &mut [ValueInfoProto],
    value_info: &mut [ValueInfoProto],
) -> Option<String> {
    use crate::proto::tensor_shape_proto::dimension::Value as DimValue;
    use crate::proto::type_proto::Value as Type;
    fn dim_params(decl: &mut ValueInfoProto) -> impl Iterator<Item = &mut String> {
        let shape = match decl.r#type.as_mut().and_then(|t| t.value.as_mut()) {
            Some(Type::TensorType(t)) => t.shape.as_mut(),
            _ => None,
        };
        shape
            .into_iter()
            .flat_map(|s| s.dim.iter_mut())
            .filter_map(|d| match &mut d.value {
                Some(DimValue::DimParam(p)) => Some(p),
                _ => None,
            })
    }
    let names: HashSet<String> = inputs
        .iter_mut()
        .flat_map(dim_params)
        .filter(|p| is_number(p))
        .map(|p| p.trim().to_string())
        .collect();
    if names.is_empty() {
        return None;
    }
    let mut marked = 0;
    let decls = inputs.iter_mut().chain(outputs).chain(value_info);
    for text in decls.flat_map(dim_params).filter(|p| !is_number(p)) {
        let (rewritten, n) = with_symbols_marked(text, &names);
        if n > 0 {
            *text = rewritten;
            marked += n;
        }
    }
    (marked > 0).then(|| {
        format!(
            "{marked} numbers in recorded dims (such as `s11 + 3`) read as the dims the graph's \
             inputs name by them"
        )
    })
}

/// `text` with each standalone number of `names` in parentheses, and how many.
fn with_symbols_marked(text: &str, names: &HashSet<String>) -> (String, usize) {
    let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == '.';
    let mut out = String::with_capacity(text.len() + 4);
    let mut marked = 0;
    let mut rest = text;
    while let Some(start) = rest.find(|c: char| is_word(c)) {
        out.push_str(&rest[..start]);
        let word_len = rest[start..]
            .find(|c: char| !is_word(c))
            .unwrap_or(rest.len() - start);
        let word = &rest[start..start + word_len];
        if names.contains(word) {
            out.push('(');
            out.push_str(word);
            out.push(')');
            marked += 1;
        } else {
            out.push_str(word);
        }
        rest = &rest[start + word_len..];
    }
    out.push_str(rest);
    (out, marked)
}

/// Resolves a value written by several `Constant` nodes (or by Constant nodes and an
/// initializer) the way ONNX Runtime does, which turns each Constant node into an
/// initializer, appended after the file's own, and keeps the last one of a name: old
/// exporters wrote such duplicates (a GPT-2 export with two identical Constants of one
/// name), and a user's file that ONNX Runtime runs must load here too. Only Constant nodes
/// are merged; any other value written twice stays an error. Returns one line per repaired
/// value, for the report.
fn drop_duplicate_constants(
    nodes: &mut Vec<NodeProto>,
    initializers: &mut Vec<TensorProto>,
) -> Vec<String> {
    let constant_output = |n: &NodeProto| -> Option<String> {
        let plain = n.op_type() == "Constant" && matches!(n.domain(), "" | "ai.onnx");
        (plain && n.output.len() == 1 && !n.output[0].is_empty()).then(|| n.output[0].clone())
    };
    let mut writers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if let Some(name) = constant_output(n) {
            writers.entry(name).or_default().push(i);
        }
    }
    let mut dropped_nodes: HashSet<usize> = HashSet::new();
    let mut dropped_initializers: HashSet<String> = HashSet::new();
    let mut repairs = Vec::new();
    let mut names: Vec<&String> = writers.keys().collect();
    names.sort();
    for name in names {
        let at = &writers[name];
        let initializer = initializers.iter().any(|t| t.name() == name);
        if at.len() + usize::from(initializer) < 2 {
            continue;
        }
        let (kept, earlier) = at.split_last().expect("at least one writer");
        let identical = earlier
            .iter()
            .all(|&i| nodes[i].attribute == nodes[*kept].attribute);
        dropped_nodes.extend(earlier.iter().copied());
        let mut what = format!("{} Constant nodes", at.len());
        if initializer {
            dropped_initializers.insert(name.clone());
            what = format!("an initializer and {what}");
        }
        let how = if identical && !initializer {
            "identical; one is kept"
        } else {
            "the last Constant node is kept, as ONNX Runtime does"
        };
        repairs.push(format!("value `{name}` was written by {what} ({how})"));
    }
    if !dropped_nodes.is_empty() {
        let mut i = 0;
        nodes.retain(|_| {
            i += 1;
            !dropped_nodes.contains(&(i - 1))
        });
    }
    initializers.retain(|t| !dropped_initializers.contains(t.name()));
    repairs
}

fn proto_label(node: &NodeProto) -> String {
    if !node.name().is_empty() {
        node.name().to_string()
    } else {
        node.output.first().cloned().unwrap_or_default()
    }
}

/// Writes the graph back as a `GraphProto`.
pub fn graph_to_proto(g: &Graph) -> Result<GraphProto> {
    let mut proto = g.rest.clone();
    let order = g.topological_order()?;
    let name_of = |v: Option<_>| v.map(|v| g.value_name(v).to_string()).unwrap_or_default();
    proto.node = order
        .into_iter()
        .map(|id| {
            let node = g.node(id);
            let mut p = node.proto.clone();
            p.input = node.inputs.iter().map(|&v| name_of(v)).collect();
            p.output = node.outputs.iter().map(|&v| name_of(v)).collect();
            p
        })
        .collect();
    proto.initializer = g
        .initializers()
        .map(|(v, t)| {
            let mut p = t.proto().clone();
            p.name = Some(g.value_name(v).to_string());
            p
        })
        .collect();
    proto.sparse_initializer = g.sparse_initializers.clone();
    let port = |p: &Port| ValueInfoProto {
        name: Some(g.value_name(p.value).to_string()),
        ..p.decl.clone()
    };
    proto.input = g.inputs.iter().map(port).collect();
    proto.output = g.outputs.iter().map(port).collect();
    proto.value_info = g
        .value_info_order()
        .iter()
        .filter(|&&v| !g.value(v).removed)
        .filter_map(|&v| {
            g.value(v).info.as_ref().map(|info| ValueInfoProto {
                name: Some(g.value_name(v).to_string()),
                r#type: info.r#type.as_ref().map(without_anonymous_dims),
                ..info.clone()
            })
        })
        .collect();
    Ok(proto)
}

/// A recorded type as a file gets it: the dims shape inference named for itself
/// (`Dim::anonymous`) are left unknown, since a runtime reading them would take them for
/// sizes of their own (tract would try to unify them with the sizes it computes).
fn without_anonymous_dims(t: &TypeProto) -> TypeProto {
    match ValueType::from_type_proto(t) {
        Some(vt) if vt.shape.iter().flatten().any(Dim::mentions_anonymous) => TypeProto {
            denotation: t.denotation.clone(),
            ..vt.without_anonymous_dims().to_type_proto()
        },
        _ => t.clone(),
    }
}

/// Names that subgraph attributes read from enclosing scopes, in sorted order.
pub fn captured_names(attributes: &[AttributeProto]) -> BTreeSet<String> {
    attributes
        .iter()
        .flat_map(|a| a.g.iter().chain(a.graphs.iter()))
        .flat_map(free_names)
        .collect()
}

/// Names a graph reads but does not define (ONNX lets subgraphs read outer values by name).
pub fn free_names(g: &GraphProto) -> BTreeSet<String> {
    let mut defined: HashSet<&str> = HashSet::new();
    defined.extend(g.input.iter().map(|i| i.name()));
    defined.extend(g.initializer.iter().map(|t| t.name()));
    defined.extend(
        g.sparse_initializer
            .iter()
            .filter_map(|s| s.values.as_ref().map(|v| v.name())),
    );
    defined.extend(
        g.node
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str)),
    );
    let mut free = BTreeSet::new();
    for node in &g.node {
        for name in node.input.iter().filter(|n| !n.is_empty()) {
            if !defined.contains(name.as_str()) {
                free.insert(name.clone());
            }
        }
        for name in captured_names(&node.attribute) {
            if !defined.contains(name.as_str()) {
                free.insert(name);
            }
        }
    }
    for out in &g.output {
        if !defined.contains(out.name()) {
            free.insert(out.name().to_string());
        }
    }
    free
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DataType, Model};
    use crate::proto::tensor_shape_proto::{dimension::Value as DimValue, Dimension};
    use crate::proto::{type_proto, ModelProto, OperatorSetIdProto, TensorShapeProto};

    fn declared(name: &str, dims: &[&str]) -> ValueInfoProto {
        let dim = |d: &&str| Dimension {
            value: Some(DimValue::DimParam(d.to_string())),
            ..Default::default()
        };
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(DataType::Float as i32),
                    shape: Some(TensorShapeProto {
                        dim: dims.iter().map(dim).collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// torch 2.6's dynamo export of a cache step: the new tokens' dim is named "3", and the
    /// cache it returns and the mask it takes are declared `s11 + 3`, past plus those tokens.
    #[test]
    fn a_number_naming_an_input_dim_is_that_dim_in_expressions() {
        let concat = NodeProto {
            op_type: Some("Concat".into()),
            input: vec!["past".into(), "new".into()],
            output: vec!["present".into()],
            attribute: vec![crate::ir::attr::int("axis", 1)],
            ..Default::default()
        };
        let m = Model::from_proto(ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(18),
            }],
            graph: Some(GraphProto {
                node: vec![concat],
                input: vec![
                    declared("past", &["2", "s11"]),
                    declared("new", &["2", "3"]),
                    declared("mask", &["2", "s11 + 3"]),
                ],
                output: vec![declared("present", &["2", "s11 + 3"])],
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
        let past_and_new = Dim::symbol("s11").add(&Dim::symbol("3"));
        for name in ["present", "mask"] {
            let v = m.graph.find_value(name).unwrap();
            let dims = m.graph.value_type(v).unwrap().shape.unwrap();
            assert_eq!(dims[1], past_and_new, "{name}");
        }
        assert_eq!(m.repairs.len(), 1, "{:?}", m.repairs);
        let (text, marked) = with_symbols_marked("Min(3, s3 + 3*x3)", &["3".to_string()].into());
        assert_eq!((text.as_str(), marked), ("Min((3), s3 + (3)*x3)", 2));
    }
}
