//! `GraphProto` ⇄ `Graph`. Loading checks what ONNX requires of a graph (every value has one
//! producer, every read value exists, no cycle) so that passes can rely on it; saving writes
//! back every field, in an order fixed by the graph alone, so the same graph always gives the
//! same bytes and an untouched graph gives the bytes it was read from.

use std::collections::{BTreeSet, HashSet};

use super::graph::{Graph, Node, OrderKey, Port};
use super::tensor::Tensor;
use crate::error::{Error, Result};
use crate::proto::{AttributeProto, GraphProto, NodeProto, ValueInfoProto};

/// Builds the IR of a top-level graph. Tensors must have had their external data resolved.
pub fn graph_from_proto(mut proto: GraphProto) -> Result<Graph> {
    let nodes = std::mem::take(&mut proto.node);
    let initializers = std::mem::take(&mut proto.initializer);
    let sparse = std::mem::take(&mut proto.sparse_initializer);
    let inputs = std::mem::take(&mut proto.input);
    let outputs = std::mem::take(&mut proto.output);
    let value_info = std::mem::take(&mut proto.value_info);
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
    Ok(g)
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
                ..info.clone()
            })
        })
        .collect();
    Ok(proto)
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
