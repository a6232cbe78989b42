//! Small hand-built models for unit tests.

use crate::ir::{Model, Tensor};
use crate::proto::tensor_proto::DataType;
use crate::proto::type_proto::{Tensor as TensorType, Value as Type};
use crate::proto::{
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TypeProto, ValueInfoProto,
};

/// `(op_type, inputs, outputs)`; an empty input name is an omitted optional input.
pub type NodeSpec<'a> = (&'a str, &'a [&'a str], &'a [&'a str]);

pub fn f32_value(name: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(Type::TensorType(TensorType {
                elem_type: Some(DataType::Float as i32),
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A model with f32 graph inputs and outputs, the given nodes (in this order), and one f32
/// scalar initializer per name in `initializers`.
pub fn model_proto(
    inputs: &[&str],
    outputs: &[&str],
    initializers: &[&str],
    nodes: &[NodeSpec],
) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(GraphProto {
            name: Some("test".into()),
            node: nodes
                .iter()
                .map(|(op, ins, outs)| NodeProto {
                    op_type: Some(op.to_string()),
                    name: Some(format!("{op}_{}", outs.first().unwrap_or(&""))),
                    input: ins.iter().map(|s| s.to_string()).collect(),
                    output: outs.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                })
                .collect(),
            initializer: initializers
                .iter()
                .map(|n| Tensor::from_f32(n, &[], &[1.0]).unwrap().into_proto())
                .collect(),
            input: inputs.iter().map(|n| f32_value(n)).collect(),
            output: outputs.iter().map(|n| f32_value(n)).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn model(
    inputs: &[&str],
    outputs: &[&str],
    initializers: &[&str],
    nodes: &[NodeSpec],
) -> Model {
    Model::from_proto(model_proto(inputs, outputs, initializers, nodes)).expect("valid test model")
}

/// The op types of the written graph, in file order.
pub fn ops(model: &Model) -> Vec<String> {
    let proto = model.to_proto().expect("writable");
    proto
        .graph
        .map(|g| g.node.iter().map(|n| n.op_type().to_string()).collect())
        .unwrap_or_default()
}
