//! FFN neurons: a block read only as the features of projections, computed from entry
//! projections through element-wise operators.

use std::collections::HashSet;

use super::cut::{Cut, ShapeEntry, Slice};
use super::*;

/// Element-wise operators: output feature i depends only on input feature i.
fn is_elementwise(node: &crate::ir::Node) -> bool {
    let onnx = [
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Relu",
        "LeakyRelu",
        "Gelu",
        "Erf",
        "Tanh",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Neg",
        "Abs",
        "Sqrt",
        "Exp",
        "Log",
        "Softplus",
        "Reciprocal",
        "Elu",
        "Celu",
        "Selu",
        "Mish",
        "Clip",
        "Identity",
    ];
    let contrib = ["FastGelu", "BiasGelu", "Gelu", "QuickGelu"];
    match node.domain() {
        "" | "ai.onnx" => onnx.contains(&node.op_type()),
        "com.microsoft" => contrib.contains(&node.op_type()),
        _ => false,
    }
}

/// The FFN block read as input 0 by `exit` (a projection), as a cut removing `fraction` of
/// its neurons; `None` when `exit` does not read such a block.
pub(super) fn ffn_cut(
    g: &Graph,
    exit: NodeId,
    fraction: f64,
    energy: Option<&FeatureStats>,
) -> Option<(Cut, PrunedBlock)> {
    output_feature_axis(g, exit)?;
    let hidden = g.node(exit).input(0)?;
    let width = last_dim(g, hidden)?;
    let readers = feature_readers(g, hidden, width)?;

    // Walk back from the block's output to its entry projections.
    let mut entries: Vec<FeatureSlot> = Vec::new();
    let mut per_feature: Vec<FeatureSlot> = Vec::new();
    let mut reshapes: Vec<NodeId> = Vec::new();
    let mut inside: HashSet<NodeId> = HashSet::new();
    let mut stack = vec![hidden];
    let mut seen: HashSet<ValueId> = HashSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        let id = g.producer(v)?;
        let node = g.node(id);
        inside.insert(id);
        if let Some((w, bias, nodes)) = projection(g, v) {
            if const_dims(g, g.node(w.node).input(1)?)?[w.axis] != width {
                return None;
            }
            entries.push(w);
            per_feature.extend(bias);
            inside.extend(nodes);
            continue;
        }
        if node.is("Reshape") {
            let x = node.input(0)?;
            if reshape_features(g, id)? != width || last_dim(g, x) != Some(width) {
                return None;
            }
            reshapes.push(id);
            stack.push(x);
            continue;
        }
        if !is_elementwise(node) {
            return None;
        }
        for (slot, x) in node.inputs.iter().enumerate() {
            let Some(x) = *x else { continue };
            match const_dims(g, x) {
                Some(d) if d.last().is_none_or(|&l| l == 1) => {}
                Some(d) if *d.last()? == width => per_feature.push(FeatureSlot {
                    node: id,
                    slot,
                    axis: d.len() - 1,
                }),
                Some(_) => return None,
                None => stack.push(x),
            }
        }
    }
    if entries.is_empty() {
        return None;
    }
    // Nothing but the block may read its intermediate values.
    for &id in &inside {
        for &v in g.node(id).outputs.iter().flatten() {
            if v == hidden {
                continue;
            }
            if g.is_graph_output(v) || g.uses(v).iter().any(|(r, _)| !inside.contains(r)) {
                return None;
            }
        }
    }
    // Importance: a neuron's RMS activation (with calibration data), else the norms of its
    // entry columns, times the norm of its exit rows.
    let activation = energy
        .and_then(|e| e.get(&hidden))
        .filter(|e| e.len() == width as usize);
    let mut importance: Vec<f64> = match activation {
        Some(energy) => energy.iter().map(|e| e.sqrt()).collect(),
        None => vec![1.0; width as usize],
    };
    let weighed = if activation.is_some() {
        &readers.weights[..0]
    } else {
        &entries[..]
    };
    for s in weighed.iter().chain(&readers.weights) {
        for (i, n) in slot_norms(g, *s)?.iter().enumerate() {
            importance[i] *= n.sqrt();
        }
    }
    let removed = least_important(&importance, fraction);
    if removed.is_empty() {
        return None;
    }
    let keep = kept(width as usize, &removed);
    let slices = entries
        .iter()
        .chain(&per_feature)
        .chain(&readers.weights)
        .map(|s| Slice {
            node: s.node,
            slot: s.slot,
            axis: s.axis,
            keep: keep.clone(),
        })
        .collect();
    let cut = Cut {
        kind: "pruned-ffn",
        slices,
        reshapes: reshapes
            .into_iter()
            .chain(readers.reshapes)
            .map(|r| ShapeEntry::last(r, keep.len()))
            .collect(),
        int_inputs: Vec::new(),
        attrs: Vec::new(),
    };
    let block = PrunedBlock {
        node: g.node(exit).name().to_string(),
        before: width as usize,
        after: keep.len(),
        removed,
    };
    Some((cut, block))
}

#[cfg(test)]
mod tests {
    use super::super::cut::apply;
    use super::*;
    use crate::ir::shape::{Dim, ValueType};
    use crate::ir::testing::model_proto;
    use crate::ir::{Model, Tensor};
    use crate::passes::shape::ShapeInference;
    use crate::passes::{Pass, Rewrites};

    /// `y = Relu(x·w1)·w2`, x f32[3, 2], four hidden neurons: all entry columns alike, exit
    /// rows of norms 4, 1, 3, 2.
    fn ffn() -> Model {
        let mut proto = model_proto(
            &["x"],
            &["y"],
            &[],
            &[
                ("MatMul", &["x", "w1"], &["h"]),
                ("Relu", &["h"], &["a"]),
                ("MatMul", &["a", "w2"], &["y"]),
            ],
        );
        let g = proto.graph.as_mut().unwrap();
        let w1 = Tensor::from_f32("w1", &[2, 4], &[1.0; 8]).unwrap();
        let w2 = Tensor::from_f32("w2", &[4, 1], &[4.0, 1.0, 3.0, 2.0]).unwrap();
        g.initializer = vec![w1.into_proto(), w2.into_proto()];
        let x = ValueType::new(1, vec![Dim::known(3), Dim::known(2)]);
        g.input[0].r#type = Some(x.to_type_proto());
        let mut m = Model::from_proto(proto).unwrap();
        ShapeInference.run(&mut m).unwrap();
        m
    }

    fn exit(g: &Graph) -> NodeId {
        g.nodes().find(|(_, n)| n.name() == "MatMul_y").unwrap().0
    }

    #[test]
    fn ffn_neurons_rank_by_weights_or_by_activations() {
        let m = ffn();
        let g = &m.graph;
        let (_, by_weights) = ffn_cut(g, exit(g), 0.25, None).unwrap();
        assert_eq!(by_weights.removed, [1]);
        // Neuron 2 never fires on the calibration data: it goes first, whatever its weights.
        let hidden = g.find_value("a").unwrap();
        let energy = FeatureStats::from([(hidden, vec![1.0, 1.0, 0.0, 1.0])]);
        let (cut, by_activations) = ffn_cut(g, exit(g), 0.25, Some(&energy)).unwrap();
        assert_eq!(by_activations.removed, [2]);
        assert_eq!((by_activations.before, by_activations.after), (4, 3));
        let mut pruned = m.clone();
        apply(&mut pruned, cut, &mut Rewrites::default()).unwrap();
        let dims = |name: &str| {
            let g = &pruned.graph;
            g.initializer(g.find_value(name).unwrap())
                .unwrap()
                .dims()
                .to_vec()
        };
        assert_eq!((dims("w1"), dims("w2")), (vec![2, 3], vec![3, 1]));
        let w2 = pruned
            .graph
            .initializer(pruned.graph.find_value("w2").unwrap());
        assert_eq!(w2.unwrap().to_f32_vec().unwrap(), [4.0, 1.0, 2.0]);
    }
}
