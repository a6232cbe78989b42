//! Rebuilds `Shape` of intermediate values from the graph inputs.
//!
//! Matches: `Shape(v)` (with its `start`/`end`) where `v` is computed inside the graph and its
//! recorded type says, for every dim taken, either its size, a symbol that is also a dim of
//! a graph input (`sequence` = dim 1 of `input_ids`), or such a symbol times a known size
//! (`4*batch`, the heads merged into the batch).
//! Produces: the same shape vector from constants and `Shape` of graph inputs (one node per
//! symbolic dim, times its factor with a `Mul`, joined by `Concat`); fully static shapes
//! become a constant.
//! Safe because: a value's shape is fixed by its type; equal symbols are equal sizes, which is
//! what shape inference (or the exporter's `value_info`) asserts. Exporters compute reshape
//! targets from `Shape` of intermediate values (the attention heads, say); after this pass
//! those values are read only by the computation itself, which is what lets fusions replace
//! them.

use std::collections::HashMap;

use super::{Pass, Rewrites};
use crate::error::Result;
use crate::ir::{attr, Dim, Model, PValue, Patch, Tensor, ValueId};

/// `Shape` takes `start` and `end` attributes from opset 15.
const SHAPE_SLICE_OPSET: i64 = 15;

pub struct ShapeFromInputs;

impl Pass for ShapeFromInputs {
    fn name(&self) -> &'static str {
        "shape-from-inputs"
    }

    fn run(&self, model: &mut Model) -> Result<Rewrites> {
        let sources = dim_sources(model);
        let slice_attrs = model.opset("").unwrap_or(0) >= SHAPE_SLICE_OPSET;
        let g = &model.graph;
        let shape_nodes: Vec<_> = g
            .nodes()
            .filter(|(_, n)| n.is("Shape"))
            .map(|(id, _)| id)
            .collect();
        let mut rewrites = Rewrites::default();
        for id in shape_nodes {
            let g = &model.graph;
            let node = g.node(id);
            let (Some(v), Some(out)) = (node.input(0), node.output(0)) else {
                continue;
            };
            if g.producer(v).is_none() {
                continue;
            }
            let Some(dims) = g.value_type(v).and_then(|t| t.shape) else {
                continue;
            };
            let Some(taken) = slice_range(
                dims.len(),
                attr::get_int(&node.proto, "start"),
                attr::get_int(&node.proto, "end"),
            ) else {
                continue;
            };
            let Some(pieces) = pieces(&dims[taken], &sources) else {
                continue;
            };
            let mut patch = Patch::new("shape-from-inputs");
            let parts: Vec<PValue> = pieces
                .into_iter()
                .map(|piece| piece.build(&mut patch, slice_attrs))
                .collect::<Result<_>>()?;
            let shape = match parts.as_slice() {
                [single] => *single,
                _ => patch.op("Concat", "", &parts, vec![attr::int("axis", 0)]),
            };
            patch.remove_node(id).replace_uses(out, shape);
            rewrites.apply(model, patch)?;
        }
        Ok(rewrites)
    }
}

/// For each symbolic dim of a graph input, the first (input, axis) that has it.
fn dim_sources(model: &Model) -> HashMap<Dim, (ValueId, usize)> {
    let g = &model.graph;
    let mut sources = HashMap::new();
    for port in g.inputs.iter().filter(|p| g.initializer(p.value).is_none()) {
        let Some(dims) = g.value_type(port.value).and_then(|t| t.shape) else {
            continue;
        };
        for (axis, d) in dims.into_iter().enumerate() {
            if d.value().is_none() && d != Dim::Unknown {
                sources.entry(d).or_insert((port.value, axis));
            }
        }
    }
    sources
}

/// The dims `Shape(start, end)` takes from a value of rank `rank` (negative bounds count from
/// the end and are clamped, as ONNX says).
fn slice_range(
    rank: usize,
    start: Option<i64>,
    end: Option<i64>,
) -> Option<std::ops::Range<usize>> {
    let r = rank as i64;
    let clamp = |i: i64| (if i < 0 { i + r } else { i }).clamp(0, r) as usize;
    let (s, e) = (clamp(start.unwrap_or(0)), clamp(end.unwrap_or(r)));
    (s <= e).then_some(s..e)
}

/// A run of the shape vector: known sizes, or one dim read from a graph input, times a
/// known factor.
enum Piece {
    Sizes(Vec<i64>),
    InputDim(ValueId, usize),
    Scaled(ValueId, usize, i64),
}

impl Piece {
    fn build(self, patch: &mut Patch, slice_attrs: bool) -> Result<PValue> {
        Ok(match self {
            Piece::Scaled(input, axis, factor) => {
                let dim = Piece::InputDim(input, axis).build(patch, slice_attrs)?;
                let factor = Tensor::from_i64("factor", &[1], &[factor])?;
                let factor = patch.new_initializer("factor", factor);
                patch.op("Mul", "", &[dim, factor], vec![])
            }
            Piece::Sizes(sizes) => patch.new_initializer(
                "shape",
                Tensor::from_i64("shape", &[sizes.len() as i64], &sizes)?,
            ),
            Piece::InputDim(input, axis) if slice_attrs => patch.op(
                "Shape",
                "",
                &[input.into()],
                vec![
                    attr::int("start", axis as i64),
                    attr::int("end", axis as i64 + 1),
                ],
            ),
            Piece::InputDim(input, axis) => {
                let shape = patch.op("Shape", "", &[input.into()], vec![]);
                let index =
                    patch.new_initializer("axis", Tensor::from_i64("axis", &[1], &[axis as i64])?);
                patch.op("Gather", "", &[shape, index], vec![attr::int("axis", 0)])
            }
        })
    }
}

/// `dims` as pieces, or `None` if a dim is unknown or has no source among the inputs.
fn pieces(dims: &[Dim], sources: &HashMap<Dim, (ValueId, usize)>) -> Option<Vec<Piece>> {
    let mut pieces: Vec<Piece> = Vec::new();
    for d in dims {
        match d.value() {
            Some(n) => match pieces.last_mut() {
                Some(Piece::Sizes(sizes)) => sizes.push(n),
                _ => pieces.push(Piece::Sizes(vec![n])),
            },
            None => match sources.get(d) {
                Some(&(input, axis)) => pieces.push(Piece::InputDim(input, axis)),
                None => {
                    let (factor, symbol) = d.split_factor()?;
                    let &(input, axis) = sources.get(&symbol)?;
                    pieces.push(Piece::Scaled(input, axis, factor));
                }
            },
        }
    }
    if pieces.is_empty() {
        pieces.push(Piece::Sizes(Vec::new()));
    }
    Some(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::testing::{model_proto, ops};
    use crate::ir::ValueType;
    use crate::proto::ValueInfoProto;

    /// x: f32[batch, sequence] → Relu → r; Shape(r) is read by a Reshape.
    fn typed_model(r_type: ValueType) -> Model {
        let mut p = model_proto(
            &["x"],
            &["y"],
            &[],
            &[
                ("Relu", &["x"], &["r"]),
                ("Shape", &["r"], &["s"]),
                ("Reshape", &["r", "s"], &["y"]),
            ],
        );
        let g = p.graph.as_mut().unwrap();
        g.input[0].r#type = Some(
            ValueType::new(1, vec![Dim::symbol("batch"), Dim::symbol("sequence")]).to_type_proto(),
        );
        g.value_info.push(ValueInfoProto {
            name: Some("r".into()),
            r#type: Some(r_type.to_type_proto()),
            ..Default::default()
        });
        Model::from_proto(p).unwrap()
    }

    #[test]
    fn symbolic_dims_are_read_from_the_graph_inputs() {
        let t = ValueType::new(
            1,
            vec![Dim::symbol("sequence"), Dim::known(4), Dim::known(16)],
        );
        let mut m = typed_model(t);
        let rewrites = ShapeFromInputs.run(&mut m).unwrap();
        assert_eq!(rewrites.total(), 1);
        assert_eq!(ops(&m), ["Relu", "Shape", "Concat", "Reshape"]);
        let g = m.to_proto().unwrap().graph.unwrap();
        let shape = g.node.iter().find(|n| n.op_type() == "Shape").unwrap();
        assert_eq!(shape.input, ["x"], "Shape now reads the graph input");
        assert_eq!(attr::get_int(shape, "start"), Some(1));
        let concat = g.node.iter().find(|n| n.op_type() == "Concat").unwrap();
        assert_eq!(concat.input.len(), 2, "sequence, then [4, 16]");
    }

    #[test]
    fn a_multiple_of_an_input_dim_is_read_and_multiplied() {
        let four_batch = Dim::symbol("batch").mul(&Dim::known(4));
        let t = ValueType::new(1, vec![four_batch, Dim::symbol("sequence")]);
        let mut m = typed_model(t);
        assert_eq!(ShapeFromInputs.run(&mut m).unwrap().total(), 1);
        assert_eq!(
            ops(&m),
            ["Relu", "Shape", "Mul", "Shape", "Concat", "Reshape"]
        );
    }

    #[test]
    fn unknown_or_unsourced_dims_leave_the_shape_alone() {
        for d in [Dim::Unknown, Dim::symbol("elsewhere")] {
            let mut m = typed_model(ValueType::new(1, vec![d, Dim::known(4)]));
            assert_eq!(ShapeFromInputs.run(&mut m).unwrap().total(), 0);
        }
    }

    #[test]
    fn slices_follow_onnx_clamping() {
        assert_eq!(slice_range(4, None, None), Some(0..4));
        assert_eq!(slice_range(4, Some(-1), None), Some(3..4));
        assert_eq!(slice_range(4, Some(1), Some(100)), Some(1..4));
        assert_eq!(slice_range(4, Some(3), Some(1)), None);
    }
}
