//! Rules on small hand-built graphs: the tricky cases of each, and malformed inputs.

use super::*;
use crate::ir::attr;
use crate::ir::Tensor;
use crate::proto::type_proto::{Tensor as TensorType, Value as Type};
use crate::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};

/// A graph under construction, at one opset of the default domain.
struct Net {
    graph: GraphProto,
    opsets: Vec<OperatorSetIdProto>,
}

const F32: i32 = FLOAT;
const I64: i32 = INT64;
const F16: i32 = crate::ir::DataType::Float16 as i32;

fn type_proto(elem: i32, dims: &str) -> TypeProto {
    use crate::proto::tensor_shape_proto::dimension::Value as D;
    let dim = |d: &str| crate::proto::tensor_shape_proto::Dimension {
        value: match d.parse::<i64>() {
            _ if d == "?" => None,
            Ok(n) => Some(D::DimValue(n)),
            Err(_) => Some(D::DimParam(d.into())),
        },
        denotation: None,
    };
    TypeProto {
        value: Some(Type::TensorType(TensorType {
            elem_type: Some(elem),
            shape: (dims != "?").then(|| TensorShapeProto {
                dim: dims
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(|d| dim(d.trim()))
                    .collect(),
            }),
        })),
        denotation: None,
    }
}

fn value_info(name: &str, elem: i32, dims: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(type_proto(elem, dims)),
        ..Default::default()
    }
}

impl Net {
    fn new(opset: i64) -> Net {
        Net {
            graph: GraphProto {
                name: Some("test".into()),
                ..Default::default()
            },
            opsets: vec![
                OperatorSetIdProto {
                    domain: Some(String::new()),
                    version: Some(opset),
                },
                OperatorSetIdProto {
                    domain: Some("com.microsoft".into()),
                    version: Some(1),
                },
            ],
        }
    }

    /// A graph input; `dims` is a comma-separated list of sizes, symbols and `?` for an
    /// unknown dim (`?` alone: no shape).
    fn input(mut self, name: &str, elem: i32, dims: &str) -> Net {
        self.graph.input.push(value_info(name, elem, dims));
        self
    }

    fn ints(mut self, name: &str, dims: &[i64], values: &[i64]) -> Net {
        let t = Tensor::from_i64(name, dims, values).expect("valid test tensor");
        self.graph.initializer.push(t.into_proto());
        self
    }

    fn floats(mut self, name: &str, dims: &[i64]) -> Net {
        let n = dims.iter().product::<i64>() as usize;
        let t = Tensor::from_f32(name, dims, &vec![0.5; n]).expect("valid test tensor");
        self.graph.initializer.push(t.into_proto());
        self
    }

    fn node(self, op: &str, inputs: &[&str], outputs: &[&str]) -> Net {
        self.node_with(op, inputs, outputs, vec![])
    }

    fn node_with(
        self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> Net {
        self.node_in("", op, inputs, outputs, attributes)
    }

    fn node_in(
        mut self,
        domain: &str,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> Net {
        self.graph.node.push(NodeProto {
            op_type: Some(op.into()),
            domain: Some(domain.into()),
            name: Some(format!("{op}_{}", outputs[0])),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attributes,
            ..Default::default()
        });
        self
    }

    fn value_info(mut self, name: &str, elem: i32, dims: &str) -> Net {
        self.graph.value_info.push(value_info(name, elem, dims));
        self
    }

    fn model(self) -> Model {
        Model::from_proto(ModelProto {
            ir_version: Some(8),
            opset_import: self.opsets,
            graph: Some(self.graph),
            ..Default::default()
        })
        .expect("valid test model")
    }

    fn infer(self) -> Typed {
        let model = self.model();
        let inference = infer(&model);
        Typed { model, inference }
    }
}

struct Typed {
    model: Model,
    inference: Inference,
}

impl Typed {
    fn id(&self, name: &str) -> ValueId {
        self.model.graph.find_value(name).expect("value exists")
    }

    /// The inferred type as text: `f32[batch, sequence, 64]`, a dim that is known only as
    /// itself (`Dim::anonymous`, or computed from one) shown as `?`.
    fn ty(&self, name: &str) -> String {
        self.inference
            .types
            .get(&self.id(name))
            .map_or("none".into(), |t| t.without_anonymous_dims().to_string())
    }

    fn dims(&self, name: &str) -> Vec<Dim> {
        self.inference
            .shape(self.id(name))
            .expect("a shape")
            .to_vec()
    }

    /// The inferred symbolic value as text: `[batch, sequence, 4, 16]`, anonymous dims as `?`.
    fn value(&self, name: &str) -> String {
        let shown = |d: &Dim| match d.mentions_anonymous() {
            true => "?".to_string(),
            false => d.to_string(),
        };
        match self.inference.value(self.id(name)) {
            Some(v) => format!("[{}]", v.iter().map(shown).collect::<Vec<_>>().join(", ")),
            None => "none".into(),
        }
    }
}

/// A graph with `x: f32[batch, sequence, 64]` and its shape `s`.
fn with_x_shape(opset: i64) -> Net {
    Net::new(opset)
        .input("x", F32, "batch,sequence,64")
        .node("Shape", &["x"], &["s"])
}

#[test]
fn broadcasting_follows_onnx_with_symbols() {
    let t = Net::new(17)
        .input("a", F32, "batch,1,sequence")
        .input("b", F32, "4,1")
        .input("c", F32, "batch")
        .input("d", F32, "sequence")
        .input("e", F32, "7,sequence")
        .node("Add", &["a", "b"], &["ab"])
        .node("Mul", &["c", "d"], &["cd"])
        .node("Sub", &["e", "d"], &["ed"])
        .node("Equal", &["a", "b"], &["eq"])
        .node("Where", &["eq", "a", "b"], &["w"])
        .infer();
    assert_eq!(t.ty("ab"), "f32[batch, 4, sequence]");
    assert_eq!(
        t.ty("cd"),
        "f32[Broadcast(batch, sequence)]",
        "either symbol may be 1"
    );
    assert_eq!(t.ty("ed"), "f32[7, sequence]");
    assert_eq!(t.ty("eq"), "bool[batch, 4, sequence]");
    assert_eq!(t.ty("w"), "f32[batch, 4, sequence]");
}

#[test]
fn inputs_named_apart_broadcast_to_one_named_dim_that_reshapes_split() {
    // tf2onnx names every input's dims apart: the embeddings' sum has the batch of both
    // token inputs, and a head split of it by its own Shape is proven.
    let t = Net::new(13)
        .input("ids", F32, "unk__310,unk__311,64")
        .input("types", F32, "unk__314,unk__315,64")
        .node("Add", &["ids", "types"], &["sum"])
        .node("Shape", &["sum"], &["s"])
        .ints("first", &[1], &[0])
        .ints("second", &[1], &[1])
        .node("Slice", &["s", "first", "second"], &["batch"])
        .ints("heads", &[3], &[-1, 4, 16])
        .node_with(
            "Concat",
            &["batch", "heads"],
            &["target"],
            vec![attr::int("axis", 0)],
        )
        .node("Reshape", &["sum", "target"], &["split"])
        .infer();
    assert_eq!(
        t.ty("sum"),
        "f32[Broadcast(unk__310, unk__314), Broadcast(unk__311, unk__315), 64]"
    );
    assert_eq!(
        t.ty("split"),
        "f32[Broadcast(unk__310, unk__314), Broadcast(unk__311, unk__315), 4, 16]"
    );
}

#[test]
fn a_window_of_learned_positions_is_as_long_as_the_tokens() {
    // Whisper's decoder: positions table[past : past + sequence] of a 448-row table; a
    // slice between symbolic bounds of a symbolic dim is clamped to it.
    let t = with_x_shape(17)
        .input("past", F32, "batch,4,past_sequence,16")
        .floats("table", &[448, 64])
        .node("Shape", &["past"], &["ps"])
        .ints("two", &[1], &[2])
        .ints("three", &[1], &[3])
        .node("Slice", &["ps", "two", "three"], &["start"])
        .ints("one", &[1], &[1])
        .node("Slice", &["s", "one", "two"], &["len"])
        .node("Add", &["start", "len"], &["end"])
        .ints("zero", &[1], &[0])
        .node("Slice", &["table", "start", "end", "zero"], &["positions"])
        .node("Add", &["x", "positions"], &["embedded"])
        .node("Slice", &["x", "start", "end", "one"], &["window"])
        .infer();
    assert_eq!(t.ty("positions"), "f32[sequence, 64]");
    assert_eq!(t.ty("embedded"), "f32[batch, sequence, 64]");
    assert_eq!(
        t.ty("window"),
        "f32[batch, (Min((past_sequence + sequence), sequence) - Min(past_sequence, sequence)), 64]"
    );
}

#[test]
fn a_sliding_window_cache_is_as_long_as_its_repeat_says() {
    // Gemma-3's sliding-window layers, torch dynamo at opset 20: the cache keeps its last
    // 4095 positions (Slice from -4095), and the target of the heads' repeat is computed as
    // new + Max(0, past + -1·Max(0, past - 4095)): both are Min(4095, past) + new.
    let t = with_x_shape(20)
        .input("past", F32, "batch,2,past_sequence,16")
        .ints("window", &[1], &[-4095])
        .ints("to_end", &[1], &[i64::MAX])
        .ints("axis2", &[1], &[2])
        .node("Slice", &["past", "window", "to_end", "axis2"], &["kept"])
        .node("Shape", &["past"], &["ps"])
        .ints("at2", &[], &[2])
        .node_with("Gather", &["ps", "at2"], &["p"], vec![attr::int("axis", 0)])
        .ints("minus_window", &[], &[-4095])
        .ints("zero", &[], &[0])
        .ints("minus_one", &[], &[-1])
        .node("Add", &["minus_window", "p"], &["over"])
        .node("Max", &["zero", "over"], &["dropped"])
        .node("Mul", &["minus_one", "dropped"], &["neg_dropped"])
        .node("Add", &["p", "neg_dropped"], &["left"])
        .node("Max", &["zero", "left"], &["kept_len"])
        .infer();
    assert_eq!(t.ty("kept"), "f32[batch, 2, Min(4095, past_sequence), 16]");
    assert_eq!(t.value("dropped"), "[Max(0, (-4095 + past_sequence))]");
    assert_eq!(t.value("kept_len"), "[Min(4095, past_sequence)]");
}

#[test]
fn an_if_has_the_element_type_its_branches_agree_on() {
    // DeBERTa's relative positions: one branch returns rank 3, the other rank 4, both int64,
    // and the branches name their dims after their own values.
    let branch = |name: &str, dims: &str| GraphProto {
        name: Some(name.into()),
        initializer: vec![Tensor::from_i64(name, &[1], &[0]).unwrap().into_proto()],
        output: vec![value_info(name, I64, dims)],
        ..Default::default()
    };
    let graph_attr = |name: &str, g: GraphProto| AttributeProto {
        name: Some(name.into()),
        r#type: Some(crate::proto::attribute_proto::AttributeType::Graph as i32),
        g: Some(g),
        ..Default::default()
    };
    let t = Net::new(17)
        .input("c", crate::ir::DataType::Bool as i32, "")
        .node_with(
            "If",
            &["c"],
            &["positions"],
            vec![
                graph_attr("then_branch", branch("a", "1,a_dim_1,a_dim_2")),
                graph_attr("else_branch", branch("b", "1,1,b_dim_2,b_dim_3")),
            ],
        )
        .node_with(
            "If",
            &["c"],
            &["same"],
            vec![
                graph_attr("then_branch", branch("a", "2,x,4")),
                graph_attr("else_branch", branch("b", "2,x,5")),
            ],
        )
        .infer();
    assert_eq!(t.ty("positions"), "i64[..]");
    assert_eq!(
        t.ty("same"),
        "i64[2, ?, ?]",
        "a branch's own dim names say nothing"
    );
}

#[test]
fn a_slice_up_to_the_sequence_broadcasts_with_the_sequence() {
    // BERT's legacy export: position ids sliced from a [1, 128] buffer up to `sequence`.
    let t = with_x_shape(17)
        .ints("ids", &[1, 128], &(0..128).collect::<Vec<_>>())
        .ints("zero", &[1], &[0])
        .ints("one", &[1], &[1])
        .ints("at1", &[], &[1])
        .floats("table", &[128, 64])
        .node("Gather", &["s", "at1"], &["seq"])
        .ints("axes0", &[1], &[0])
        .node("Unsqueeze", &["seq", "axes0"], &["seq1"])
        .node("Slice", &["ids", "zero", "seq1", "one", "one"], &["pos"])
        .node("Gather", &["table", "pos"], &["emb"])
        .node("Add", &["x", "emb"], &["sum"])
        .infer();
    assert_eq!(t.ty("pos"), "i64[1, Min(128, sequence)]");
    assert_eq!(t.ty("emb"), "f32[1, Min(128, sequence), 64]");
    assert_eq!(t.ty("sum"), "f32[batch, sequence, 64]");
}

#[test]
fn reshape_copies_zeros_and_infers_minus_one() {
    let t = with_x_shape(17)
        .ints("heads", &[4], &[0, 0, 4, -1])
        .ints("flat", &[2], &[-1, 64])
        .ints("zeros", &[2], &[0, 64])
        .node("Reshape", &["x", "heads"], &["split_heads"])
        .node("Reshape", &["x", "flat"], &["rows"])
        .node("Reshape", &["rows", "s"], &["back"])
        .node_with(
            "Reshape",
            &["x", "zeros"],
            &["empty"],
            vec![attr::int("allowzero", 1)],
        )
        .infer();
    assert_eq!(t.ty("split_heads"), "f32[batch, sequence, 4, 16]");
    assert_eq!(t.ty("rows"), "f32[batch*sequence, 64]");
    assert_eq!(t.ty("back"), "f32[batch, sequence, 64]");
    assert_eq!(t.ty("empty"), "f32[0, 64]", "allowzero makes 0 a size");
}

#[test]
fn reshape_to_an_unknown_target_of_known_length_keeps_the_rank() {
    let t = Net::new(17)
        .input("x", F32, "batch,64")
        .input("target", I64, "3")
        .node("Reshape", &["x", "target"], &["y"])
        .infer();
    assert_eq!(t.ty("y"), "f32[?, ?, ?]");
}

#[test]
fn shape_honours_start_and_end() {
    let t = Net::new(17)
        .input("x", F32, "batch,sequence,64")
        .node_with("Shape", &["x"], &["tail"], vec![attr::int("start", 1)])
        .node_with("Shape", &["x"], &["last"], vec![attr::int("start", -1)])
        .node_with("Shape", &["x"], &["head"], vec![attr::int("end", -1)])
        .node_with(
            "Shape",
            &["x"],
            &["none"],
            vec![attr::int("start", 2), attr::int("end", 1)],
        )
        .infer();
    assert_eq!(t.ty("tail"), "i64[2]");
    assert_eq!(t.value("tail"), "[sequence, 64]");
    assert_eq!(t.value("last"), "[64]");
    assert_eq!(t.value("head"), "[batch, sequence]");
    assert_eq!(t.ty("none"), "i64[0]");
    assert_eq!(t.value("none"), "[]");
}

#[test]
fn gather_picks_dims_of_a_shape() {
    let t = with_x_shape(17)
        .ints("one", &[], &[1])
        .ints("ends", &[2], &[0, -1])
        .node("Gather", &["s", "one"], &["seq"])
        .node("Gather", &["s", "ends"], &["outer"])
        .infer();
    assert_eq!(t.ty("seq"), "i64[]");
    assert_eq!(t.value("seq"), "[sequence]");
    assert_eq!(t.ty("outer"), "i64[2]");
    assert_eq!(t.value("outer"), "[batch, 64]");
}

#[test]
fn concat_of_symbolic_values_types_the_reshape() {
    // The legacy exporter's head split: Concat(batch, sequence, 4, 16) from Shape.
    let t = with_x_shape(17)
        .ints("i0", &[], &[0])
        .ints("i1", &[], &[1])
        .ints("axes", &[1], &[0])
        .ints("heads", &[1], &[4])
        .ints("size", &[1], &[16])
        .node("Gather", &["s", "i0"], &["b"])
        .node("Gather", &["s", "i1"], &["q"])
        .node("Unsqueeze", &["b", "axes"], &["b1"])
        .node("Unsqueeze", &["q", "axes"], &["q1"])
        .node_with(
            "Concat",
            &["b1", "q1", "heads", "size"],
            &["target"],
            vec![attr::int("axis", 0)],
        )
        .node("Reshape", &["x", "target"], &["y"])
        .node("Mul", &["b", "q"], &["bq"])
        .node("Div", &["bq", "q"], &["bq_q"])
        .infer();
    assert_eq!(t.value("target"), "[batch, sequence, 4, 16]");
    assert_eq!(t.ty("y"), "f32[batch, sequence, 4, 16]");
    assert_eq!(t.value("bq"), "[batch*sequence]");
    assert_eq!(t.value("bq_q"), "[batch]");
}

#[test]
fn squeeze_and_unsqueeze_take_axes_from_attributes_before_opset_13() {
    let old = Net::new(11)
        .input("x", F32, "batch,1,64")
        .node_with("Squeeze", &["x"], &["sq"], vec![attr::ints("axes", &[1])])
        .node_with(
            "Unsqueeze",
            &["sq"],
            &["un"],
            vec![attr::ints("axes", &[0, -1])],
        )
        .infer();
    assert_eq!(old.ty("sq"), "f32[batch, 64]");
    assert_eq!(old.ty("un"), "f32[1, batch, 64, 1]");

    let new = Net::new(13)
        .input("x", F32, "batch,1,64")
        .ints("axes", &[1], &[1])
        .ints("outer", &[2], &[0, -1])
        .node("Squeeze", &["x", "axes"], &["sq"])
        .node("Unsqueeze", &["sq", "outer"], &["un"])
        .node("Squeeze", &["x"], &["all"])
        .infer();
    assert_eq!(new.ty("sq"), "f32[batch, 64]");
    assert_eq!(new.ty("un"), "f32[1, batch, 64, 1]");
    assert_eq!(
        new.ty("all"),
        "f32[..]",
        "batch may be 1: the rank is unknown"
    );

    let known = Net::new(13)
        .input("x", F32, "1,3,1")
        .node("Squeeze", &["x"], &["all"])
        .infer();
    assert_eq!(known.ty("all"), "f32[3]");
}

#[test]
fn squeeze_and_unsqueeze_carry_values() {
    let t = with_x_shape(13)
        .ints("last", &[1], &[-1])
        .ints("ends", &[1], &[i64::MAX])
        .ints("axes", &[1], &[0])
        .node("Slice", &["s", "last", "ends"], &["s_last"])
        .node("Squeeze", &["s_last", "axes"], &["hidden"])
        .node("Unsqueeze", &["hidden", "axes"], &["hidden1"])
        .infer();
    assert_eq!(t.ty("hidden"), "i64[]");
    assert_eq!(t.value("hidden"), "[64]");
    assert_eq!(t.value("hidden1"), "[64]");
}

#[test]
fn matmul_handles_one_dimensional_operands_and_batch_broadcasting() {
    let t = Net::new(17)
        .input("v", F32, "64")
        .input("m", F32, "batch,64,32")
        .input("a", F32, "batch,1,sequence,64")
        .input("w", F32, "4,64,16")
        .node("MatMul", &["v", "m"], &["vm"])
        .node("MatMul", &["m", "w2"], &["mv"])
        .input("w2", F32, "32")
        .node("MatMul", &["v", "v"], &["dot"])
        .node("MatMul", &["a", "w"], &["aw"])
        .infer();
    assert_eq!(t.ty("vm"), "f32[batch, 32]");
    assert_eq!(t.ty("mv"), "f32[batch, 64]");
    assert_eq!(t.ty("dot"), "f32[]");
    assert_eq!(t.ty("aw"), "f32[batch, 4, sequence, 16]");
}

#[test]
fn gemm_respects_transposition() {
    let t = Net::new(17)
        .input("a", F32, "rows,64")
        .input("at", F32, "64,rows")
        .floats("w", &[192, 64])
        .floats("bias", &[192])
        .node_with(
            "Gemm",
            &["a", "w", "bias"],
            &["y"],
            vec![attr::int("transB", 1)],
        )
        .node_with(
            "Gemm",
            &["at", "w", "bias"],
            &["yt"],
            vec![attr::int("transA", 1), attr::int("transB", 1)],
        )
        .infer();
    assert_eq!(t.ty("y"), "f32[rows, 192]");
    assert_eq!(t.ty("yt"), "f32[rows, 192]");
}

#[test]
fn split_by_sizes_by_count_and_by_opset() {
    let by_input = Net::new(13)
        .input("x", F32, "batch,sequence,192")
        .ints("sizes", &[3], &[64, 64, 64])
        .node_with(
            "Split",
            &["x", "sizes"],
            &["q", "k", "v"],
            vec![attr::int("axis", 2)],
        )
        .infer();
    assert_eq!(by_input.ty("v"), "f32[batch, sequence, 64]");

    let by_attr = Net::new(11)
        .input("x", F32, "10,sequence")
        .node_with(
            "Split",
            &["x"],
            &["a", "b"],
            vec![attr::ints("split", &[3, 7])],
        )
        .infer();
    assert_eq!(by_attr.ty("b"), "f32[7, sequence]");

    let by_count = Net::new(18)
        .input("x", F32, "10,sequence")
        .node_with(
            "Split",
            &["x"],
            &["a", "b", "c"],
            vec![attr::int("num_outputs", 3)],
        )
        .node_with(
            "Split",
            &["x"],
            &["s1", "s2"],
            vec![attr::int("axis", 1), attr::int("num_outputs", 2)],
        )
        .infer();
    assert_eq!(by_count.ty("a"), "f32[4, sequence]");
    assert_eq!(
        by_count.ty("c"),
        "f32[2, sequence]",
        "the last part is smaller"
    );
    assert_eq!(by_count.ty("s1"), "f32[10, ?]", "sequence may be odd");
}

#[test]
fn slices_of_tensors_and_of_values() {
    let t = with_x_shape(17)
        .ints("zero", &[1], &[0])
        .ints("two", &[1], &[2])
        .ints("end", &[1], &[i64::MAX])
        .ints("one", &[1], &[1])
        .ints("back", &[1], &[-1])
        .ints("neg_end", &[1], &[i64::MIN])
        .node("Slice", &["s", "zero", "two"], &["outer"])
        .node("Slice", &["x", "zero", "end", "one"], &["all_seq"])
        .node("Slice", &["x", "one", "end", "one"], &["from1"])
        .node(
            "Slice",
            &["s", "back", "neg_end", "zero", "back"],
            &["reversed"],
        )
        .node("Slice", &["x", "zero", "two", "back"], &["first2"])
        .infer();
    assert_eq!(t.value("outer"), "[batch, sequence]");
    assert_eq!(t.ty("all_seq"), "f32[batch, sequence, 64]");
    assert_eq!(
        t.ty("from1"),
        "f32[batch, (sequence - 1), 64]",
        "Min(1, sequence) is 1: a symbol is a positive size"
    );
    assert_eq!(t.value("reversed"), "[64, sequence, batch]");
    assert_eq!(t.ty("first2"), "f32[batch, sequence, 2]");
}

#[test]
fn unknown_elements_stay_unknown() {
    let t = Net::new(17)
        .input("x", F32, "batch,?")
        .node("Shape", &["x"], &["s"])
        .ints("minus1", &[2], &[-1, -1])
        .ints("two", &[], &[2])
        .node("Mul", &["s", "two"], &["doubled"])
        .node("Equal", &["s", "minus1"], &["is_minus1"])
        .node("Equal", &["s", "s"], &["self_equal"])
        .node("Div", &["s", "two"], &["halved"])
        .infer();
    assert_eq!(t.value("s"), "[batch, ?]");
    assert_eq!(t.value("doubled"), "[2*batch, ?]");
    assert_eq!(t.value("is_minus1"), "[0, ?]", "a size is never -1");
    assert_eq!(t.value("self_equal"), "[1, ?]");
    assert_eq!(t.value("halved"), "[?, ?]", "batch may be odd");
}

/// Swin pads each side to a multiple of its window, `(w − H mod w) mod w`, with Python's
/// modulo (the divisor's sign, fmod=0); C's (the dividend's) with fmod=1.
#[test]
fn remainders_of_known_elements_follow_fmod() {
    let t = Net::new(17)
        .input("x", F32, "batch,30")
        .node("Shape", &["x"], &["s"])
        .ints("seven", &[], &[7])
        .ints("minus", &[2], &[-5, 5])
        .ints("minus_seven", &[], &[-7])
        .ints("zero", &[], &[0])
        .node("Mod", &["s", "seven"], &["rem"])
        .node("Sub", &["seven", "rem"], &["missing"])
        .node("Mod", &["missing", "seven"], &["pad"])
        .node("Mod", &["minus", "seven"], &["python"])
        .node_with(
            "Mod",
            &["minus", "seven"],
            &["c"],
            vec![attr::int("fmod", 1)],
        )
        .node("Mod", &["minus", "minus_seven"], &["negative_divisor"])
        .node("Mod", &["s", "zero"], &["by_zero"])
        .infer();
    assert_eq!(t.value("rem"), "[?, 2]");
    assert_eq!(t.value("pad"), "[?, 5]");
    assert_eq!(t.value("python"), "[2, 5]");
    assert_eq!(t.value("c"), "[-5, 5]");
    assert_eq!(t.value("negative_divisor"), "[-5, -2]");
    assert_eq!(t.value("by_zero"), "[?, ?]");
}

#[test]
fn elements_a_narrow_type_cannot_hold_are_unknown() {
    let big = Tensor::from_raw(
        "big",
        DataType::Int32,
        &[2],
        bytes::Bytes::from([i32::MAX.to_le_bytes(), 7i32.to_le_bytes()].concat()),
    )
    .unwrap();
    let mut net = with_x_shape(17);
    net.graph.initializer.push(big.into_proto());
    let t = net
        .node("Add", &["big", "big"], &["sum"])
        .node_with(
            "Cast",
            &["s"],
            &["s32"],
            vec![attr::int("to", DataType::Int32 as i64)],
        )
        .node("Mul", &["s", "s"], &["squares"])
        .node_with(
            "Cast",
            &["squares"],
            &["squares32"],
            vec![attr::int("to", DataType::Int32 as i64)],
        )
        .node_with(
            "Cast",
            &["s"],
            &["s16"],
            vec![attr::int("to", DataType::Int16 as i64)],
        )
        .node_with(
            "Cast",
            &["s"],
            &["nonzero"],
            vec![attr::int("to", DataType::Bool as i64)],
        )
        .node_with(
            "Cast",
            &["s"],
            &["float"],
            vec![attr::int("to", DataType::Float as i64)],
        )
        .infer();
    assert_eq!(
        t.value("sum"),
        "[?, 14]",
        "i32::MAX + i32::MAX wraps around"
    );
    assert_eq!(
        t.value("s32"),
        "[batch, sequence, 64]",
        "an axis fits an i32 (tf2onnx's shapes are int32)"
    );
    assert_eq!(
        t.value("squares32"),
        "[?, ?, 4096]",
        "a product of sizes may not fit an i32"
    );
    assert_eq!(t.value("s16"), "[?, ?, 64]", "an axis may not fit an i16");
    assert_eq!(t.value("nonzero"), "[1, 1, 1]");
    assert_eq!(t.value("float"), "none");
}

#[test]
fn the_legacy_mask_expand_resolves_its_target() {
    // shape = Where(Equal(target, -1 * ones), ones, target) as the legacy exporter builds
    // the target of `expand(batch, -1, sequence, sequence)`.
    let t = with_x_shape(17)
        .ints("i0", &[1], &[0])
        .ints("i1", &[1], &[1])
        .ints("minus1", &[1], &[-1])
        .ints("minus1_scalar", &[], &[-1])
        .node("Gather", &["s", "i0"], &["b"])
        .node("Gather", &["s", "i1"], &["q"])
        .node_with(
            "Concat",
            &["b", "minus1", "q", "q"],
            &["target"],
            vec![attr::int("axis", 0)],
        )
        .node("Shape", &["target"], &["len"])
        .node_with(
            "ConstantOfShape",
            &["len"],
            &["ones"],
            vec![attr::tensor(
                "value",
                Tensor::from_i64("v", &[1], &[1]).unwrap(),
            )],
        )
        .node("Mul", &["ones", "minus1_scalar"], &["minus_ones"])
        .node("Equal", &["target", "minus_ones"], &["keep"])
        .node("Where", &["keep", "ones", "target"], &["shape"])
        .input("mask", 9, "1,1,sequence,1")
        .node("Expand", &["mask", "shape"], &["expanded"])
        .infer();
    assert_eq!(t.value("ones"), "[1, 1, 1, 1]");
    assert_eq!(t.value("keep"), "[0, 1, 0, 0]");
    assert_eq!(t.value("shape"), "[batch, 1, sequence, sequence]");
    assert_eq!(t.ty("expanded"), "bool[batch, 1, sequence, sequence]");
}

#[test]
fn range_and_sums_of_symbols() {
    let t = Net::new(17)
        .input("past", F32, "batch,4,past_sequence,16")
        .input("new", F32, "batch,4,sequence,16")
        .node_with(
            "Concat",
            &["past", "new"],
            &["present"],
            vec![attr::int("axis", -2)],
        )
        .node("Shape", &["present"], &["s"])
        .ints("i2", &[], &[2])
        .ints("zero", &[], &[0])
        .ints("one", &[], &[1])
        .ints("five", &[], &[5])
        .node("Gather", &["s", "i2"], &["total"])
        .node("Range", &["zero", "total", "one"], &["positions"])
        .node("Range", &["one", "five", "one"], &["small"])
        .infer();
    assert_eq!(
        t.ty("present"),
        "f32[batch, 4, (past_sequence + sequence), 16]"
    );
    assert_eq!(t.ty("positions"), "i64[(past_sequence + sequence)]");
    assert_eq!(t.value("small"), "[1, 2, 3, 4]");
}

#[test]
fn normalizations_and_their_statistics() {
    let t = Net::new(17)
        .input("x", F32, "batch,sequence,64")
        .floats("g", &[64])
        .node_with(
            "LayerNormalization",
            &["x", "g", "g"],
            &["y", "mean", "inv"],
            vec![attr::int("axis", -1)],
        )
        .node_in(
            "com.microsoft",
            "SkipLayerNormalization",
            &["x", "x", "g", "g"],
            &["sy", "smean", "sinv", "sum"],
            vec![],
        )
        .node_in("com.microsoft", "FastGelu", &["x", "g"], &["gelu"], vec![])
        .infer();
    assert_eq!(t.ty("y"), "f32[batch, sequence, 64]");
    assert_eq!(t.ty("inv"), "f32[batch, sequence, 1]");
    assert_eq!(t.ty("smean"), "f32[batch, sequence, 1]");
    assert_eq!(t.ty("sum"), "f32[batch, sequence, 64]");
    assert_eq!(t.ty("gelu"), "f32[batch, sequence, 64]");
}

#[test]
fn attention_operators() {
    let t = Net::new(23)
        .input("x", F32, "batch,sequence,64")
        .floats("w", &[64, 192])
        .floats("b", &[192])
        .input("past", F32, "2,batch,4,past_sequence,16")
        .node_in(
            "com.microsoft",
            "Attention",
            &["x", "w", "b", "", "past"],
            &["out", "present"],
            vec![attr::int("num_heads", 4)],
        )
        .node_in(
            "com.microsoft",
            "MultiHeadAttention",
            &["x", "x", "x"],
            &["mha", "pk", "pv"],
            vec![attr::int("num_heads", 4)],
        )
        .input("q", F32, "batch,4,sequence,16")
        .input("kv", F32, "batch,2,kv,16")
        .node("Attention", &["q", "kv", "kv"], &["y4"])
        .node_with(
            "Attention",
            &["x", "x", "x"],
            &["y3", "present_key"],
            vec![attr::int("q_num_heads", 4), attr::int("kv_num_heads", 4)],
        )
        .infer();
    assert_eq!(t.ty("out"), "f32[batch, sequence, 64]");
    assert_eq!(
        t.ty("present"),
        "f32[2, batch, 4, (past_sequence + sequence), 16]"
    );
    assert_eq!(t.ty("mha"), "f32[batch, sequence, 64]");
    assert_eq!(t.ty("pk"), "f32[batch, 4, sequence, 16]");
    assert_eq!(t.ty("y4"), "f32[batch, 4, sequence, 16]");
    assert_eq!(t.ty("y3"), "f32[batch, sequence, 64]");
    assert_eq!(t.ty("present_key"), "f32[batch, 4, sequence, 16]");
}

/// A vision tower with free image dims: nothing says how many patches a Conv makes, yet the
/// query and the key split from them have the same sequence (what attention fusion must
/// prove), and the anonymous dims that say so stay out of the written file.
#[test]
fn unknown_dims_computed_from_one_source_are_the_same() {
    let t = Net::new(17)
        .input("img", F32, "batch,3,height,width")
        .floats("w", &[32, 3, 14, 14])
        .floats("wq", &[32, 32])
        .floats("wk", &[32, 32])
        .ints("flat", &[3], &[0, 32, -1])
        .ints("heads", &[4], &[0, -1, 2, 16])
        .node_with(
            "Conv",
            &["img", "w"],
            &["patches"],
            vec![attr::ints("strides", &[14, 14])],
        )
        .node("Reshape", &["patches", "flat"], &["rows"])
        .node_with(
            "Transpose",
            &["rows"],
            &["tokens"],
            vec![attr::ints("perm", &[0, 2, 1])],
        )
        .node("MatMul", &["tokens", "wq"], &["q"])
        .node("MatMul", &["tokens", "wk"], &["k"])
        .node("Reshape", &["q", "heads"], &["q_heads"])
        .node("Reshape", &["k", "heads"], &["k_heads"])
        .infer();
    assert_eq!(t.ty("patches"), "f32[batch, 32, ?, ?]");
    assert_eq!(t.ty("q_heads"), "f32[batch, ?, 2, 16]");
    let (q, k) = (t.dims("q_heads"), t.dims("k_heads"));
    assert!(q[1].same(&k[1]), "{} is {}", q[1], k[1]);
    assert!(q[1].same(&t.dims("tokens")[1]));
    let (h, w) = (&t.dims("patches")[2], &t.dims("patches")[3]);
    assert!(!h.same(w), "two axes are two sizes");
    assert_eq!(q[1], h.mul(w));

    let mut model = t.model;
    ShapeInference.run(&mut model).expect("infers");
    let recorded = model
        .graph
        .value_type(model.graph.find_value("k_heads").unwrap());
    assert!(recorded.unwrap().shape.unwrap()[1].mentions_anonymous());
    let written = model.to_proto().expect("writable").graph.expect("a graph");
    let k_heads = written.value_info.iter().find(|v| v.name() == "k_heads");
    let k_heads = ValueType::from_type_proto(k_heads.unwrap().r#type.as_ref().unwrap());
    assert_eq!(k_heads.unwrap().to_string(), "f32[batch, ?, 2, 16]");
}

#[test]
fn conv_flatten_and_transpose() {
    let t = Net::new(17)
        .input("img", F32, "batch,3,32,32")
        .floats("w", &[64, 3, 8, 8])
        .node_with(
            "Conv",
            &["img", "w"],
            &["patches"],
            vec![attr::ints("strides", &[8, 8])],
        )
        .node_with(
            "Flatten",
            &["patches"],
            &["flat"],
            vec![attr::int("axis", 2)],
        )
        .node_with(
            "Transpose",
            &["patches"],
            &["swapped"],
            vec![attr::ints("perm", &[0, 2, 1, 3])],
        )
        .node("Transpose", &["img"], &["reversed"])
        .infer();
    assert_eq!(t.ty("patches"), "f32[batch, 64, 4, 4]");
    assert_eq!(t.ty("flat"), "f32[64*batch, 16]");
    assert_eq!(t.ty("swapped"), "f32[batch, 4, 64, 4]");
    assert_eq!(t.ty("reversed"), "f32[32, 32, 3, batch]");
}

#[test]
fn reductions_by_opset() {
    let t = Net::new(17)
        .input("x", F32, "batch,sequence,64")
        .node_with(
            "ReduceMean",
            &["x"],
            &["mean"],
            vec![attr::ints("axes", &[-1])],
        )
        .ints("axes", &[1], &[1])
        .node_with(
            "ReduceSum",
            &["x", "axes"],
            &["sum"],
            vec![attr::int("keepdims", 0)],
        )
        .node("ReduceMax", &["x"], &["max"])
        .infer();
    assert_eq!(t.ty("mean"), "f32[batch, sequence, 1]");
    assert_eq!(t.ty("sum"), "f32[batch, 64]");
    assert_eq!(t.ty("max"), "f32[1, 1, 1]");
}

#[test]
fn unknown_operators_keep_the_recorded_type() {
    let t = Net::new(17)
        .input("x", F32, "batch,64")
        .node_in("custom.domain", "Mystery", &["x"], &["y"], vec![])
        .node("Relu", &["y"], &["z"])
        .node("Mystery", &["x"], &["unrecorded"])
        .value_info("y", F32, "batch,32")
        .infer();
    assert_eq!(t.ty("y"), "f32[batch, 32]");
    assert_eq!(t.ty("z"), "f32[batch, 32]");
    assert_eq!(t.ty("unrecorded"), "none");
}

#[test]
fn malformed_graphs_give_unknowns_not_panics() {
    let t = Net::new(17)
        .input("x", F32, "batch,64")
        .input("huge_target", I64, "1000000000000")
        .ints("bad_target", &[3], &[-1, -1, -7])
        .ints("overflow", &[2], &[i64::MAX, i64::MAX])
        .ints("min", &[1], &[i64::MIN])
        .ints("zero", &[], &[0])
        .node("Reshape", &["x", "huge_target"], &["huge"])
        .node("Reshape", &["x", "bad_target"], &["bad"])
        .node("Reshape", &["x", "overflow"], &["big"])
        .node("Reshape", &["big", "overflow"], &["bigger"])
        .node_with(
            "Transpose",
            &["x"],
            &["t"],
            vec![attr::ints("perm", &[0, 0])],
        )
        .node_with("Concat", &["x", "x"], &["c"], vec![attr::int("axis", 5)])
        .node_with(
            "Gather",
            &["x", "zero"],
            &["g"],
            vec![attr::int("axis", -9)],
        )
        .node("Slice", &["x", "min", "min", "min"], &["s"])
        .node("Range", &["min", "overflow", "zero"], &["r"])
        .node("ConstantOfShape", &["huge_target"], &["filled"])
        .node("Div", &["min", "zero"], &["div0"])
        .node_with(
            "Unsqueeze",
            &["x"],
            &["u"],
            vec![attr::ints("axes", &[9, 9])],
        )
        .node("Sub", &["zero", "min"], &["negated_min"])
        .input("empty", F32, "0")
        .ints("minus1", &[1], &[-1])
        .node(
            "Slice",
            &["empty", "minus1", "min", "zero", "minus1"],
            &["reversed"],
        )
        .input("long", F32, "9223372036854775807")
        .node_with(
            "Split",
            &["long"],
            &["p1", "p2"],
            vec![attr::int("num_outputs", 2)],
        )
        .input("img", F32, "1,1,9223372036854775807")
        .floats("k", &[1, 1, 1])
        .node("Conv", &["img", "k"], &["conv"])
        .node_with(
            "Conv",
            &["img", "k"],
            &["padded"],
            vec![attr::ints("pads", &[1, 1])],
        )
        .infer();
    assert_eq!(t.value("negated_min"), "[?]");
    assert_eq!(t.ty("reversed"), "f32[0]");
    assert_eq!(t.ty("p1"), "f32[4611686018427387904]");
    assert_eq!(t.ty("p2"), "f32[4611686018427387903]");
    assert_eq!(t.ty("conv"), "f32[1, 1, 9223372036854775807]");
    assert_eq!(t.ty("padded"), "f32[1, 1, ?]", "the padded size overflows");
    assert_eq!(t.ty("huge"), "f32[..]");
    assert_eq!(t.ty("bad"), "f32[?, ?, ?]");
    assert_eq!(t.ty("big"), "f32[9223372036854775807, 9223372036854775807]");
    assert_eq!(t.ty("t"), "f32[?, ?]");
    assert_eq!(t.ty("c"), "f32[..]");
    assert_eq!(t.ty("g"), "f32[..]");
    assert_eq!(t.ty("r"), "i64[?]");
    assert_eq!(t.ty("filled"), "f32[..]");
    assert_eq!(t.value("div0"), "[?]");
    assert_eq!(t.ty("u"), "f32[..]");
}

#[test]
fn the_pass_records_types_once_and_keeps_declarations() {
    let mut model = with_x_shape(17)
        .ints("target", &[2], &[-1, 64])
        .node("Reshape", &["x", "target"], &["rows"])
        .node("Relu", &["rows"], &["y"])
        .node_in("custom.domain", "Mystery", &["y"], &["m"], vec![])
        .node("Relu", &["m"], &["out"])
        .value_info("m", F32, "rows,64")
        .model();
    model.graph.outputs.push(crate::ir::Port {
        value: model.graph.find_value("out").unwrap(),
        decl: value_info("out", F32, "?"),
    });
    let first = ShapeInference.run(&mut model).unwrap();
    assert_eq!(first.0.get("value-type"), Some(&3), "s, rows and y");
    let g = &model.graph;
    let ty = |name: &str| {
        g.value_type(g.find_value(name).unwrap())
            .unwrap()
            .to_string()
    };
    assert_eq!(ty("rows"), "f32[batch*sequence, 64]");
    assert_eq!(ty("m"), "f32[rows, 64]", "the unknown op keeps its record");
    assert_eq!(ty("out"), "f32[..]", "graph outputs keep their declaration");
    assert_eq!(ShapeInference.run(&mut model).unwrap().total(), 0);
}

#[test]
fn recorded_dims_fill_what_inference_leaves_unknown_or_anonymous() {
    let recorded = ValueType::new(FLOAT, vec![Dim::symbol("batch"), Dim::known(64)]);
    let inferred = ValueType::new(FLOAT, vec![Dim::Unknown, Dim::known(64)]);
    assert_eq!(
        keep_recorded_where_vaguer(&inferred, Some(&recorded)),
        recorded
    );
    let no_rank = ValueType {
        elem: 0,
        shape: None,
    };
    assert_eq!(
        keep_recorded_where_vaguer(&no_rank, Some(&recorded)),
        recorded
    );
    // A dim known only as an anonymous one's is vaguer than the size the file gives...
    let anonymous = Dim::anonymous("x", 0);
    let through = ValueType::new(FLOAT, vec![anonymous.clone(), Dim::known(64)]);
    assert_eq!(
        keep_recorded_where_vaguer(&through, Some(&recorded)),
        recorded
    );
    // ...but not than another anonymous one (both are true; the inferred one is the link).
    let other = ValueType::new(FLOAT, vec![Dim::anonymous("y", 0), Dim::known(64)]);
    assert_eq!(keep_recorded_where_vaguer(&through, Some(&other)), through);
}

#[test]
fn every_contrib_operator_onnxopt_emits_has_a_type_rule_and_runs_in_tract() {
    // Each with float inputs of the shapes its fusion gives it: the rule must at least type
    // the first output float, and tract must run it (natively or lowered). MatMulNBits and
    // GatherBlockQuantized need packed 4-bit codes, not these float inputs: tests/weight_only
    // runs them in tract and ONNX Runtime (and `a_gather_of_packed_codes_has_k_columns` types
    // the second).
    let packed = ["MatMulNBits", "GatherBlockQuantized"];
    let float_inputs = |o: &&crate::ops::ContribOp| o.emitted && !packed.contains(&o.name);
    for op in crate::ops::CONTRIB_OPS.iter().filter(float_inputs) {
        let t = Net::new(17)
            .input("x", F32, "2,4,8")
            .floats("w", &[8, 24])
            .floats("b", &[24])
            .node_in(
                "com.microsoft",
                op.name,
                &["x", "w", "b"],
                &["y"],
                vec![attr::int("num_heads", 2)],
            )
            .infer();
        assert!(
            t.ty("y").starts_with("f32"),
            "{op:?} has no type rule: {}",
            t.ty("y")
        );
        assert!(
            !matches!(op.tract, crate::ops::Tract::Unfaithful),
            "{op:?} is emitted but tract cannot run it"
        );
    }
}

/// A scatter writes into a copy of its data: the data's type, so that FP16 (which rewrites
/// types through inference) never leaves a float16 ScatterND declared float32.
#[test]
fn scatters_have_their_datas_type() {
    let t = Net::new(17)
        .input("data", F16, "batch,4,8")
        .input("indices", I64, "3,1")
        .input("updates", F16, "3,4,8")
        .node("ScatterND", &["data", "indices", "updates"], &["nd"])
        .node("ScatterElements", &["data", "idx", "data"], &["elements"])
        .input("idx", I64, "batch,4,8")
        .value_info("nd", F32, "batch,4,8")
        .infer();
    assert_eq!(t.ty("nd"), "f16[batch, 4, 8]");
    assert_eq!(t.ty("elements"), "f16[batch, 4, 8]");
}

/// Resize's sizes come from its scales, which no rule follows: the element type is the
/// data's and the rank is kept, with the shape the file records where it records one, never
/// its element type (FP16 re-infers after converting the data to float16).
#[test]
fn a_resize_keeps_the_data_type_and_rank_and_a_recorded_shape() {
    let net = |recorded: Option<(i32, &str)>| {
        let net = Net::new(17)
            .input("x", F16, "batch,3,32,32")
            .floats("scales", &[4])
            .node("Resize", &["x", "", "scales"], &["y"]);
        match recorded {
            Some((elem, dims)) => net.value_info("y", elem, dims),
            None => net,
        }
    };
    assert_eq!(net(None).infer().ty("y"), "f16[?, ?, ?, ?]");
    assert_eq!(
        net(Some((F32, "batch,3,64,64"))).infer().ty("y"),
        "f16[batch, 3, 64, 64]"
    );
}

#[test]
fn a_gather_of_packed_codes_has_k_columns() {
    // 4-bit codes of a [10, 64] table: 32 bytes a row; ids [batch, sequence].
    let t = Net::new(21)
        .input("codes", UINT8, "10,32")
        .input("ids", I64, "b,s")
        .floats("scales", &[10, 2])
        .node_in(
            "com.microsoft",
            "GatherBlockQuantized",
            &["codes", "ids", "scales"],
            &["rows"],
            vec![attr::int("block_size", 32), attr::int("bits", 4)],
        )
        .infer();
    assert_eq!(t.ty("rows"), "f32[b, s, 64]");
}
