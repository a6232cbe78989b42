//! Small models written as chains of nodes on one input `x: f32[2, 3, 8]`, for the fusion
//! tests (near misses, spellings).

use onnxopt::ir::{Model, Tensor};
use onnxopt::proto::tensor_proto::DataType;
use onnxopt::proto::tensor_shape_proto::{dimension, Dimension};
use onnxopt::proto::type_proto::{Tensor as TensorType, Value as Type};
use onnxopt::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};

pub fn f32_value(name: &str, dims: &[i64]) -> ValueInfoProto {
    typed_value(name, DataType::Float, dims)
}

pub fn typed_value(name: &str, elem: DataType, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(Type::TensorType(TensorType {
                elem_type: Some(elem as i32),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(dimension::Value::DimValue(d)),
                            denotation: None,
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn node(op: &str, inputs: &[&str], output: &str, attributes: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: attributes,
        ..Default::default()
    }
}

pub fn scalar(name: &str, v: f32) -> Tensor {
    Tensor::from_f32(name, &[], &[v]).unwrap()
}

/// x: f32[2, 3, 8] → nodes → the listed outputs (f32[2, 3, 8]), at opset 17.
pub fn model(nodes: Vec<NodeProto>, constants: Vec<Tensor>, outputs: &[&str]) -> Model {
    model_of(DataType::Float, nodes, constants, outputs)
}

/// `model` with x and the outputs of element type `elem`.
pub fn model_of(
    elem: DataType,
    nodes: Vec<NodeProto>,
    constants: Vec<Tensor>,
    outputs: &[&str],
) -> Model {
    let dims = [2, 3, 8];
    Model::from_proto(ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(GraphProto {
            name: Some("negative".into()),
            node: nodes,
            initializer: constants.into_iter().map(Tensor::into_proto).collect(),
            input: vec![typed_value("x", elem, &dims)],
            output: outputs
                .iter()
                .map(|o| typed_value(o, elem, &dims))
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap()
}
