//! Inlining of model-local functions.
//!
//! Matches: a node of the main graph that calls a function the model defines
//! (`ModelProto.functions`, by domain, name and overload). torch 2.5–2.6's dynamo exporter
//! writes LayerNorm, GELU, `expand` and more as onnxscript `torch_lib` functions: the blocks
//! the fusions look for hide inside calls, and tract runs no model-local function.
//! Produces: the function's body in place of the call: each body node, named
//! `<call>/<node>`, reads the call's inputs for the function's formal inputs (an input the
//! call leaves out is absent) and writes the call's outputs for its formal outputs; the body's
//! own values get fresh names. An attribute the body takes from the call (`ref_attr_name`)
//! takes the call's attribute of that name, else the function's default, else it is left out.
//! A formal output that is a formal input is an `Identity`. The function's opset imports that
//! the model lacks are added; calls the body makes are inlined the same way (to
//! `MAX_NESTING` levels), and a function no node calls any more is dropped.
//! Safe because: this is what a function call means in ONNX (its body with the formal
//! parameters bound, what ONNX Runtime does on loading), and the body's operators mean what
//! they mean in the model: a function importing a domain at a version other than the model's
//! is left alone.
//! Left alone (the call stays, opaque to the rest of the pipeline): functions whose body
//! holds a subgraph (`If`, `Loop`, `Scan`: the names read inside it would need renaming too),
//! calls with a subgraph attribute, calls inside `If` branches, and recursive functions past
//! `MAX_NESTING` levels.

use std::collections::{HashMap, HashSet};

use super::matching::holds_subgraph;
use super::{Pass, Rewrites};
use crate::error::Result;
use crate::ir::{normalize_domain, Model, Node, NodeId, PValue, Patch};
use crate::proto::{AttributeProto, FunctionProto, NodeProto};

/// Levels of calls inside function bodies inlined, at most.
const MAX_NESTING: usize = 16;

pub struct FunctionInlining;

impl Pass for FunctionInlining {
    fn name(&self) -> &'static str {
        "inline-functions"
    }

    fn run(&self, model: &mut Model) -> Result<Rewrites> {
        let mut rewrites = Rewrites::default();
        if model.envelope.functions.is_empty() {
            return Ok(rewrites);
        }
        for _ in 0..MAX_NESTING {
            let calls: Vec<(NodeId, usize)> = model
                .graph
                .nodes()
                .filter_map(|(id, node)| Some((id, inlinable(model, node)?)))
                .collect();
            if calls.is_empty() {
                break;
            }
            for (id, f) in calls {
                let function = model.envelope.functions[f].clone();
                let Some(patch) = inlined(model, id, &function) else {
                    continue;
                };
                for import in &function.opset_import {
                    if model.opset(import.domain()).is_none() {
                        model.envelope.opset_import.push(import.clone());
                    }
                }
                rewrites.apply(model, patch)?;
            }
        }
        rewrites.add("dead-function", drop_uncalled(model));
        Ok(rewrites)
    }
}

/// A function's identity: domain (the default one spelled `""`), name, overload.
type Key = (String, String, String);

fn key(domain: &str, name: &str, overload: &str) -> Key {
    (
        normalize_domain(domain).into(),
        name.into(),
        overload.into(),
    )
}

fn call_key(node: &NodeProto) -> Key {
    key(node.domain(), node.op_type(), node.overload())
}

fn function_key(f: &FunctionProto) -> Key {
    key(f.domain(), f.name(), f.overload())
}

/// The index of the function `node` calls, when its call can be inlined.
fn inlinable(model: &Model, node: &Node) -> Option<usize> {
    let wanted = call_key(&node.proto);
    let index = model
        .envelope
        .functions
        .iter()
        .position(|f| function_key(f) == wanted)?;
    let f = &model.envelope.functions[index];
    let same_opsets = f.opset_import.iter().all(|import| {
        model
            .opset(import.domain())
            .is_none_or(|version| version == import.version())
    });
    let plain = !holds_subgraph(&node.proto) && !f.node.iter().any(holds_subgraph);
    (same_opsets && plain).then_some(index)
}

/// The call `id` replaced by the body of `f`; `None` if the body reads a name it never
/// defines or returns one it never computes (a malformed function, left as it is).
fn inlined(model: &Model, id: NodeId, f: &FunctionProto) -> Option<Patch> {
    let g = &model.graph;
    let call = g.node(id);
    let prefix = match call.proto.name() {
        "" => call.op_type().to_string(),
        name => name.to_string(),
    };
    let mut patch = Patch::new("inline-function");
    // What each name of the body stands for: a value, or nothing (an absent input).
    let mut scope: HashMap<&str, Option<PValue>> = f
        .input
        .iter()
        .enumerate()
        .map(|(i, formal)| (formal.as_str(), call.input(i).map(PValue::Old)))
        .collect();
    let returned: HashMap<&str, PValue> = f
        .output
        .iter()
        .enumerate()
        .filter_map(|(j, formal)| Some((formal.as_str(), PValue::Old(call.output(j)?))))
        .collect();
    let mut written: HashSet<&str> = HashSet::new();
    for (k, body) in f.node.iter().enumerate() {
        let inputs = body
            .input
            .iter()
            .map(|name| match name.as_str() {
                "" => Some(None),
                name => scope.get(name).copied(),
            })
            .collect::<Option<Vec<_>>>()?;
        let outputs: Vec<Option<PValue>> = body
            .output
            .iter()
            .map(|name| {
                if name.is_empty() {
                    return None;
                }
                let value = match returned.get(name.as_str()) {
                    Some(&out) => out,
                    None => patch.new_value(&format!("{prefix}/{name}")),
                };
                scope.insert(name, Some(value));
                written.insert(name);
                Some(value)
            })
            .collect();
        let mut proto = body.clone();
        proto.name = Some(match body.name() {
            "" => format!("{prefix}/{}_{k}", body.op_type()),
            name => format!("{prefix}/{name}"),
        });
        proto.attribute = bound_attributes(&body.attribute, &call.proto, f);
        patch.add_node_proto_with_optional_outputs(proto, &inputs, &outputs);
    }
    // A formal output the body passes through from its inputs.
    for (formal, &out) in &returned {
        if !written.contains(formal) {
            let passed = (*scope.get(formal)?)?;
            patch.add_node("Identity", "", &[Some(passed)], &[out], vec![]);
        }
    }
    patch.remove_node(id);
    Some(patch)
}

/// `attributes` of a body node with each reference to an attribute of the function resolved:
/// the call's attribute of that name, else the function's default, else none.
fn bound_attributes(
    attributes: &[AttributeProto],
    call: &NodeProto,
    f: &FunctionProto,
) -> Vec<AttributeProto> {
    attributes
        .iter()
        .filter_map(|a| {
            let reference = match a.ref_attr_name.as_deref() {
                None | Some("") => return Some(a.clone()),
                Some(reference) => reference,
            };
            let given = call
                .attribute
                .iter()
                .chain(&f.attribute_proto)
                .find(|c| c.name() == reference)?;
            Some(AttributeProto {
                name: a.name.clone(),
                ref_attr_name: None,
                ..given.clone()
            })
        })
        .collect()
}

/// The functions of `model` that nothing calls (the main graph, its subgraphs, or a called
/// function's body), removed; how many.
fn drop_uncalled(model: &mut Model) -> usize {
    let mut called = HashSet::new();
    let main: Vec<&NodeProto> = model.graph.nodes().map(|(_, n)| &n.proto).collect();
    add_calls(main, &mut called);
    loop {
        let before = called.len();
        let bodies: Vec<&NodeProto> = model
            .envelope
            .functions
            .iter()
            .filter(|f| called.contains(&function_key(f)))
            .flat_map(|f| &f.node)
            .collect();
        add_calls(bodies, &mut called);
        if called.len() == before {
            break;
        }
    }
    let before = model.envelope.functions.len();
    model
        .envelope
        .functions
        .retain(|f| called.contains(&function_key(f)));
    before - model.envelope.functions.len()
}

/// The keys of every operator `nodes` and the graphs in their attributes call.
fn add_calls<'a>(nodes: impl IntoIterator<Item = &'a NodeProto>, called: &mut HashSet<Key>) {
    for node in nodes {
        called.insert(call_key(node));
        for a in &node.attribute {
            for graph in a.g.iter().chain(&a.graphs) {
                add_calls(&graph.node, called);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::Runner;
    use crate::ir::{attr, DataType};
    use crate::proto::{GraphProto, ModelProto, OperatorSetIdProto, ValueInfoProto};

    fn node(op: &str, domain: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            domain: Some(domain.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn opset(domain: &str, version: i64) -> OperatorSetIdProto {
        OperatorSetIdProto {
            domain: Some(domain.into()),
            version: Some(version),
        }
    }

    fn float(name: &str, dims: &[i64]) -> ValueInfoProto {
        let dims = dims.iter().map(|&d| crate::ir::Dim::known(d)).collect();
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(crate::ir::ValueType::new(DataType::Float as i32, dims).to_type_proto()),
            ..Default::default()
        }
    }

    /// `lib.Scaled(x, low?) = Mul(Clip(x, low), alpha)` with `alpha` a referenced float
    /// attribute (default 2), and `lib.Twice(x) = Scaled(Scaled(x))`, which calls it with no
    /// `low` and no `alpha`.
    fn functions() -> Vec<FunctionProto> {
        let mut mul = node("Mul", "", &["clipped", "a"], &["y"]);
        mul.name = Some("scale".into());
        let constant = NodeProto {
            attribute: vec![AttributeProto {
                name: Some("value_float".into()),
                ref_attr_name: Some("alpha".into()),
                r#type: Some(1),
                ..Default::default()
            }],
            ..node("Constant", "", &[], &["a"])
        };
        let scaled = FunctionProto {
            name: Some("Scaled".into()),
            domain: Some("lib".into()),
            input: vec!["x".into(), "low".into()],
            output: vec!["y".into()],
            attribute_proto: vec![attr::float("alpha", 2.0)],
            node: vec![constant, node("Clip", "", &["x", "low"], &["clipped"]), mul],
            opset_import: vec![opset("", 17)],
            ..Default::default()
        };
        let twice = FunctionProto {
            name: Some("Twice".into()),
            domain: Some("lib".into()),
            input: vec!["x".into()],
            output: vec!["y".into()],
            node: vec![
                node("Scaled", "lib", &["x"], &["once"]),
                node("Scaled", "lib", &["once"], &["y"]),
            ],
            opset_import: vec![opset("", 17), opset("lib", 1)],
            ..Default::default()
        };
        vec![scaled, twice]
    }

    fn model(nodes: Vec<NodeProto>, functions: Vec<FunctionProto>) -> Model {
        Model::from_proto(ModelProto {
            ir_version: Some(10),
            opset_import: vec![opset("", 17), opset("lib", 1)],
            graph: Some(GraphProto {
                name: Some("calls".into()),
                node: nodes,
                input: vec![float("x", &[3]), float("low", &[])],
                output: vec![float("y", &[3])],
                ..Default::default()
            }),
            functions,
            ..Default::default()
        })
        .unwrap()
    }

    fn run(m: &Model) -> Vec<f32> {
        use tract_onnx::prelude::Tensor as TractTensor;
        use tract_onnx::tract_hir::internal::tract_ndarray::{arr0, arr1};
        let batch = crate::exec::Batch {
            name: "b".into(),
            tensors: vec![
                ("x".into(), TractTensor::from(arr1(&[1.0f32, 2.0, 3.0]))),
                ("low".into(), TractTensor::from(arr0(1.5f32))),
            ],
        };
        let out = Runner::new(m).unwrap().run(&batch).unwrap();
        let y = out[0].1.clone().into_plain_array::<f32>().unwrap();
        y.iter().copied().collect()
    }

    #[test]
    fn a_call_becomes_the_body_with_its_inputs_attributes_and_outputs_bound() {
        let mut call = node("Scaled", "lib", &["x", "low"], &["t"]);
        call.attribute = vec![attr::float("alpha", 3.0)];
        let mut m = model(
            vec![call, node("Twice", "lib", &["t"], &["y"])],
            functions(),
        );
        let rewrites = FunctionInlining.run(&mut m).unwrap();
        // Scaled and Twice, then Twice's two calls of Scaled; both functions are dropped.
        assert_eq!(rewrites.0.get("inline-function"), Some(&4), "{rewrites}");
        assert_eq!(rewrites.0.get("dead-function"), Some(&2));
        assert!(m.envelope.functions.is_empty());
        let ops: Vec<_> = m
            .graph
            .nodes()
            .map(|(_, n)| n.op_type().to_string())
            .collect();
        assert_eq!(ops.iter().filter(|op| *op == "Mul").count(), 3);
        // max(x, 1.5)·3·2·2: Twice's calls take alpha's default and clip at nothing.
        assert_eq!(run(&m), [18.0, 24.0, 36.0]);
    }

    #[test]
    fn a_function_importing_another_version_stays_a_call() {
        let mut fs = functions();
        fs[0].opset_import = vec![opset("", 13)];
        let mut m = model(vec![node("Scaled", "lib", &["x", "low"], &["y"])], fs);
        let rewrites = FunctionInlining.run(&mut m).unwrap();
        assert_eq!(rewrites.0.get("inline-function"), None);
        // Twice is dropped: nothing calls it.
        assert_eq!(m.envelope.functions.len(), 1);
    }
}
