//! The weights pruning may touch: float initializers read only as the weight of a MatMul,
//! Gemm, Conv or packed `com.microsoft` Attention, with the axis those operators reduce over.

use crate::ir::{DataType, Graph, Use, ValueId};
use crate::ops::weights::reduction_axis;

/// A weight initializer and the axis its readers sum over (the one N:M groups run along).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrunableWeight {
    pub value: ValueId,
    /// `None` for an embedding table (read by Gather): only magnitude pruning touches it.
    pub reduction_axis: Option<usize>,
}

/// An initializer that looked like a weight but is left alone, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub weight: String,
    pub reason: String,
}

/// How one reader uses an initializer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// As a weight reduced over this axis.
    Weight(usize),
    /// As the table of a Gather.
    Embedding,
    Other,
}

/// Every prunable weight of `g`, in initializer order, and the weight-like initializers
/// (read in a weight slot, or as an embedding table when `embeddings`) that are not
/// prunable, with the reason. Embedding tables are prunable only when `embeddings` says so.
pub fn prunable_weights(g: &Graph, embeddings: bool) -> (Vec<PrunableWeight>, Vec<Skipped>) {
    let mut weights = Vec::new();
    let mut skipped = Vec::new();
    for (v, t) in g.initializers() {
        let uses = g.uses(v);
        let reads: Vec<Read> = uses
            .iter()
            .map(|&(n, u)| {
                let node = g.node(n);
                match u {
                    Use::Input(1) => {
                        reduction_axis(node, t.dims().len()).map_or(Read::Other, Read::Weight)
                    }
                    Use::Input(0) if node.is("Gather") && embeddings => Read::Embedding,
                    _ => Read::Other,
                }
            })
            .collect();
        if !reads.iter().any(|r| *r != Read::Other) {
            continue;
        }
        let name = g.value_name(v).to_string();
        let skip = |reason: String| Skipped {
            weight: name.clone(),
            reason,
        };
        let axes: Vec<usize> = reads
            .iter()
            .filter_map(|r| match r {
                Read::Weight(axis) => Some(*axis),
                _ => None,
            })
            .collect();
        if g.is_graph_input(v) || g.is_graph_output(v) {
            skipped.push(skip("it is a graph input or output".into()));
        } else if t.dtype() != DataType::Float {
            skipped.push(skip(format!(
                "its element type is {:?}, not float32",
                t.dtype()
            )));
        } else if let Some(i) = reads.iter().position(|r| *r == Read::Other) {
            let other = g.node(uses[i].0);
            skipped.push(skip(format!(
                "it is also read by {} `{}` (an embedding or an activation)",
                other.op_type(),
                other.name()
            )));
        } else if reads.contains(&Read::Embedding) {
            // A table tied to a projection (GPT-2's lm_head) is pruned as the table it is.
            weights.push(PrunableWeight {
                value: v,
                reduction_axis: None,
            });
        } else if axes.windows(2).any(|w| w[0] != w[1]) {
            skipped.push(skip("its readers reduce it over different axes".into()));
        } else {
            weights.push(PrunableWeight {
                value: v,
                reduction_axis: axes.first().copied(),
            });
        }
    }
    (weights, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::testing::model_proto;
    use crate::ir::{Model, Tensor};

    /// `y = Gather(table, ids)·w + b`, with the table also read by a tied MatMul when `tied`.
    fn model(tied: bool) -> Model {
        let mut nodes: Vec<(&str, &[&str], &[&str])> = vec![
            ("Gather", &["table", "ids"], &["e"]),
            ("MatMul", &["e", "w"], &["h"]),
            ("Add", &["h", "b"], &["y"]),
        ];
        if tied {
            nodes.push(("MatMul", &["y", "table"], &["logits"]));
        }
        let mut proto = model_proto(&["ids"], &["y"], &[], &nodes);
        let g = proto.graph.as_mut().unwrap();
        let tensor = |name: &str, dims: &[i64]| {
            let n = dims.iter().product::<i64>() as usize;
            Tensor::from_f32(name, dims, &vec![1.0; n])
                .unwrap()
                .into_proto()
        };
        g.initializer = vec![
            tensor("table", &[8, 4]),
            tensor("w", &[4, 4]),
            tensor("b", &[4]),
        ];
        Model::from_proto(proto).unwrap()
    }

    fn names(g: &Graph, weights: &[PrunableWeight]) -> Vec<(String, Option<usize>)> {
        weights
            .iter()
            .map(|w| (g.value_name(w.value).to_string(), w.reduction_axis))
            .collect()
    }

    #[test]
    fn weights_are_prunable_biases_never_and_embeddings_when_asked() {
        let m = model(false);
        let (weights, skipped) = prunable_weights(&m.graph, false);
        assert_eq!(names(&m.graph, &weights), [("w".to_string(), Some(0))]);
        assert!(skipped.is_empty());
        let (weights, _) = prunable_weights(&m.graph, true);
        let expected = [("table".to_string(), None), ("w".to_string(), Some(0))];
        assert_eq!(names(&m.graph, &weights), expected);
    }

    #[test]
    fn a_tied_embedding_is_skipped_unless_embeddings_are_pruned() {
        let m = model(true);
        let (weights, skipped) = prunable_weights(&m.graph, false);
        assert_eq!(names(&m.graph, &weights), [("w".to_string(), Some(0))]);
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0].reason.contains("also read by Gather"),
            "{skipped:?}"
        );
        let (weights, _) = prunable_weights(&m.graph, true);
        assert_eq!(names(&m.graph, &weights)[0], ("table".to_string(), None));
    }
}
