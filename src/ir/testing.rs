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

/// A model built step by step, for tests that need typed values, attributes, initializers
/// with values or another opset than `model`'s.
pub struct Builder {
    graph: GraphProto,
    opset: i64,
}

/// A value's type for `Builder`: each dim is a size (`"64"`), a symbol (`"batch"`) or `"?"`.
pub fn value_type(elem: DataType, dims: &[&str]) -> crate::ir::ValueType {
    use crate::ir::Dim;
    let dims = dims
        .iter()
        .map(|d| match (d.parse::<i64>(), *d) {
            (Ok(n), _) => Dim::known(n),
            (_, "?") => Dim::Unknown,
            (_, name) => Dim::symbol(name),
        })
        .collect();
    crate::ir::ValueType::new(elem as i32, dims)
}

fn typed_value(name: &str, elem: DataType, dims: &[&str]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(value_type(elem, dims).to_type_proto()),
        ..Default::default()
    }
}

/// An empty model at opset 17, to fill with `Builder`'s methods.
pub fn builder() -> Builder {
    Builder {
        graph: GraphProto {
            name: Some("test".into()),
            ..Default::default()
        },
        opset: 17,
    }
}

impl Builder {
    pub fn opset(mut self, version: i64) -> Self {
        self.opset = version;
        self
    }

    pub fn input(mut self, name: &str, elem: DataType, dims: &[&str]) -> Self {
        self.graph.input.push(typed_value(name, elem, dims));
        self
    }

    pub fn output(mut self, name: &str, elem: DataType, dims: &[&str]) -> Self {
        self.graph.output.push(typed_value(name, elem, dims));
        self
    }

    /// Records the type of an intermediate value in `value_info`.
    pub fn typed(mut self, name: &str, elem: DataType, dims: &[&str]) -> Self {
        self.graph.value_info.push(typed_value(name, elem, dims));
        self
    }

    /// An initializer named after `tensor`.
    pub fn init(mut self, tensor: Tensor) -> Self {
        self.graph.initializer.push(tensor.into_proto());
        self
    }

    /// A `Constant` node writing `tensor` to `output`.
    pub fn constant(self, output: &str, tensor: Tensor) -> Self {
        let value = crate::ir::attr::tensor("value", tensor);
        self.node("Constant", &[], &[output], vec![value])
    }

    pub fn node(
        mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<crate::proto::AttributeProto>,
    ) -> Self {
        self.graph.node.push(NodeProto {
            op_type: Some(op.to_string()),
            name: Some(format!("{op}_{}", outputs.first().unwrap_or(&""))),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attributes,
            ..Default::default()
        });
        self
    }

    pub fn build(self) -> Model {
        Model::from_proto(ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(self.opset),
            }],
            graph: Some(self.graph),
            ..Default::default()
        })
        .expect("valid test model")
    }
}

/// The written graph, for assertions on names, inputs and initializers.
pub fn written(model: &Model) -> GraphProto {
    model.to_proto().expect("writable").graph.expect("a graph")
}
