//! Identity and inference-mode Dropout removal.
//!
//! Matches: `Identity(x)`, and `Dropout(x, …)` in inference mode (see
//! `matching::dropout_is_inference`) whose mask output nobody reads.
//! Produces: the readers of the node's output read `x`. A graph output produced by such a node
//! keeps its name: `x` takes it over.
//! Safe because: both operators return their input unchanged (Dropout only drops in training).
//! Left alone: an output read by name inside a subgraph, and a graph output whose `x` is
//! itself a name the user sees (a graph input, another output, an initializer): keeping both
//! names takes an Identity, which is what is there already.

use super::matching::{bypass, dropout_is_inference, rewrite_each};
use super::{Pass, Rewrites};
use crate::error::Result;
use crate::ir::{Model, NodeId, Patch};

pub struct IdentityElimination;

impl Pass for IdentityElimination {
    fn name(&self) -> &'static str {
        "identity"
    }

    fn run(&self, model: &mut Model) -> Result<Rewrites> {
        rewrite_each(model, removal)
    }
}

/// The patch that removes node `id` if it copies its input.
fn removal(model: &Model, id: NodeId) -> Option<Patch> {
    let g = &model.graph;
    let node = g.node(id);
    let (x, out) = (node.input(0)?, node.output(0)?);
    let kind = if node.is("Identity") {
        "identity"
    } else if node.is("Dropout") && dropout_is_inference(model, node) {
        let mask_read = node
            .output(1)
            .is_some_and(|mask| g.is_graph_output(mask) || !g.uses(mask).is_empty());
        if mask_read {
            return None;
        }
        "dropout"
    } else {
        return None;
    };
    bypass(g, kind, id, out, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::Runner;
    use crate::ir::attr;
    use crate::ir::testing::{builder, model, ops, written};
    use crate::ir::{DataType, Tensor};

    #[test]
    fn identities_go_and_readers_read_the_input() {
        let mut m = model(
            &["x"],
            &["y"],
            &[],
            &[
                ("Relu", &["x"], &["a"]),
                ("Identity", &["a"], &["b"]),
                ("Identity", &["b"], &["c"]),
                ("Neg", &["c"], &["y"]),
            ],
        );
        let rewrites = IdentityElimination.run(&mut m).unwrap();
        assert_eq!(rewrites.0.get("identity"), Some(&2));
        assert_eq!(ops(&m), ["Relu", "Neg"]);
        assert_eq!(written(&m).node[1].input, ["a"]);
    }

    #[test]
    fn a_graph_output_keeps_its_name() {
        let mut m = model(
            &["x"],
            &["y"],
            &[],
            &[("Relu", &["x"], &["a"]), ("Identity", &["a"], &["y"])],
        );
        IdentityElimination.run(&mut m).unwrap();
        assert_eq!(ops(&m), ["Relu"]);
        let g = written(&m);
        assert_eq!(g.node[0].output, ["y"]);
        assert_eq!(g.output[0].name(), "y");
    }

    #[test]
    fn a_graph_input_passed_to_an_output_keeps_working() {
        // x → Identity → a → Identity → y: the first goes, the second must stay to keep
        // both names, and a second run finds nothing to do.
        let mut m = model(
            &["x"],
            &["y"],
            &[],
            &[("Identity", &["x"], &["a"]), ("Identity", &["a"], &["y"])],
        );
        assert_eq!(IdentityElimination.run(&mut m).unwrap().total(), 1);
        assert_eq!(IdentityElimination.run(&mut m).unwrap().total(), 0);
        let g = written(&m);
        assert_eq!(
            (g.node[0].input[0].as_str(), g.node[0].output[0].as_str()),
            ("x", "y")
        );
        let mut runner = Runner::new(&m).unwrap();
        let x = tract_onnx::prelude::Tensor::from(
            tract_onnx::tract_hir::internal::tract_ndarray::arr1(&[1.5f32, -2.0]),
        );
        let batch = crate::exec::Batch {
            name: "b".into(),
            tensors: vec![("x".into(), x.clone())],
        };
        assert_eq!(runner.run(&batch).unwrap()[0].1, x);
    }

    #[test]
    fn a_value_read_by_name_inside_a_subgraph_keeps_its_producer() {
        use crate::proto::attribute_proto::AttributeType;
        use crate::proto::{AttributeProto, GraphProto, NodeProto, ValueInfoProto};
        let branch = |name: &str| AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Graph as i32),
            g: Some(GraphProto {
                name: Some(name.into()),
                node: vec![NodeProto {
                    op_type: Some("Neg".into()),
                    input: vec!["a".into()],
                    output: vec![format!("{name}_out")],
                    ..Default::default()
                }],
                output: vec![ValueInfoProto {
                    name: Some(format!("{name}_out")),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut m = builder()
            .input("x", DataType::Float, &["2"])
            .input("cond", DataType::Bool, &[])
            .output("y", DataType::Float, &["2"])
            .node("Identity", &["x"], &["a"], vec![])
            .node(
                "If",
                &["cond"],
                &["y"],
                vec![branch("then_branch"), branch("else_branch")],
            )
            .build();
        assert_eq!(IdentityElimination.run(&mut m).unwrap().total(), 0);
        assert_eq!(ops(&m), ["Identity", "If"]);
    }

    fn dropout_model(opset: i64, inputs: &[&str], outputs: &[&str]) -> Model {
        builder()
            .opset(opset)
            .input("x", DataType::Float, &["4"])
            .input("train", DataType::Bool, &[])
            .output("y", DataType::Float, &["4"])
            .constant(
                "off",
                Tensor::from_raw("", DataType::Bool, &[], bytes::Bytes::from_static(&[0])).unwrap(),
            )
            .node("Dropout", inputs, outputs, vec![])
            .node("Neg", &["d"], &["y"], vec![])
            .build()
    }

    #[test]
    fn dropout_goes_only_in_inference_mode_with_its_mask_unread() {
        for (inputs, outputs, removed) in [
            (&["x"][..], &["d"][..], true),
            (&["x", "", "off"][..], &["d"][..], true),
            (&["x", "", "off"][..], &["d", "unread_mask"][..], true),
            (&["x", "", "train"][..], &["d"][..], false),
        ] {
            let mut m = dropout_model(17, inputs, outputs);
            let n = IdentityElimination.run(&mut m).unwrap();
            assert_eq!(n.0.contains_key("dropout"), removed, "{inputs:?}");
        }
        // The mask is read: it would lose its producer.
        let mut m = builder()
            .input("x", DataType::Float, &["4"])
            .output("y", DataType::Float, &["4"])
            .output("mask", DataType::Bool, &["4"])
            .node("Dropout", &["x"], &["d", "mask"], vec![])
            .node("Neg", &["d"], &["y"], vec![])
            .build();
        assert_eq!(IdentityElimination.run(&mut m).unwrap().total(), 0);
    }

    #[test]
    fn old_dropout_must_say_it_is_a_test() {
        let mut training = dropout_model(6, &["x"], &["d"]);
        assert_eq!(IdentityElimination.run(&mut training).unwrap().total(), 0);
        let mut m = dropout_model(6, &["x"], &["d"]);
        let id = m
            .graph
            .node_ids()
            .find(|&n| m.graph.node(n).is("Dropout"))
            .unwrap();
        m.graph
            .node_mut_proto(id)
            .attribute
            .push(attr::int("is_test", 1));
        assert_eq!(IdentityElimination.run(&mut m).unwrap().total(), 1);
    }
}
