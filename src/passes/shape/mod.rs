//! Shape and type inference.
//!
//! Matches: every node, in topological order.
//! Produces: for every value its element type and shape (`ValueType`), with symbolic dims:
//! graph-input dims such as `batch` stay symbols, reshapes make products such as
//! `batch*sequence`. For small integer tensors (rank 0 or 1) it also works out their
//! *symbolic value*, the elements as dims: `Shape` of a `[batch, sequence, 64]` tensor is
//! `[batch, sequence, 64]`, followed through the Gather/Unsqueeze/Concat/arithmetic chains
//! exporters use to compute Reshape targets. That is what lets a Reshape to
//! `Concat(Gather(Shape(x), 0), Gather(Shape(x), 1), 4, 16)` be typed `[batch, sequence, 4,
//! 16]`, constant folding fold such chains when their dims are static, and fusions read
//! head counts from them. The `shape-inference` pass records the inferred types of
//! intermediate values in the graph's `value_info`.
//! A dim that neither a rule nor the file sizes (a Conv's output positions over a free image
//! size) is named for its value and axis (`Dim::anonymous`): nothing is known of its size, but
//! the values computed from it share it, so a query and a key split from one Conv's positions
//! are provably as long as each other. Those names stay in the IR; files get the dim unknown.
//! Safe because: types are annotations; recording them changes no computation. A rule that
//! cannot decide says `Unknown` (a dim, the rank, an element of a value) instead of guessing,
//! and an operator without a rule keeps the type the file recorded; an anonymous dim says only
//! that it is itself. The rules take the model to be valid (where broadcasting needs a dim to
//! be 1 or equal to another, it is) and every named symbol to be a size of at least 1.

mod ops;
mod values;

#[cfg(test)]
mod tests;

use std::collections::HashMap;

use super::{Pass, Rewrites};
use crate::error::Result;
use crate::ir::attr;
use crate::ir::{DataType, Dim, Graph, Model, Node, ValueId, ValueType};

/// What inference found out about a model's values.
#[derive(Clone, Debug, Default)]
pub struct Inference {
    /// Element type and shape of every value something is known about.
    pub types: HashMap<ValueId, ValueType>,
    /// The elements, as dims, of integer tensors of rank 0 (one element) or 1 whose elements
    /// are known or symbolic; an element nothing is known about is `Dim::Unknown`.
    pub values: HashMap<ValueId, Vec<Dim>>,
}

impl Inference {
    pub fn shape(&self, v: ValueId) -> Option<&[Dim]> {
        self.types.get(&v)?.shape.as_deref()
    }

    pub fn value(&self, v: ValueId) -> Option<&[Dim]> {
        self.values.get(&v).map(Vec::as_slice)
    }
}

/// Infers the type of every value of `model` and the symbolic value of its small integer
/// tensors. A graph with a cycle gets only the types of its inputs and initializers.
pub fn infer(model: &Model) -> Inference {
    let g = &model.graph;
    let mut inference = Inference::default();
    for v in g.value_ids() {
        let value = g.value(v);
        if value.producer.is_some() || value.removed {
            continue;
        }
        if let Some(t) = g.value_type(v) {
            inference.types.insert(v, t);
        }
        if let Some(elements) = g.constant(v).as_ref().and_then(values::of_tensor) {
            inference.values.insert(v, elements);
        }
    }
    let Ok(order) = g.topological_order() else {
        return inference;
    };
    for id in order {
        let node = g.node(id);
        let cx = Ctx {
            graph: g,
            node,
            opset: model.opset(node.domain()).unwrap_or(1),
            inference: &inference,
        };
        let rule = ops::infer(&cx);
        let types: Vec<Option<ValueType>> = node
            .outputs
            .iter()
            .enumerate()
            .map(|(slot, v)| {
                let v = (*v)?;
                let recorded = g.value_type(v);
                let t = match rule.as_ref().and_then(|types| types.get(slot)) {
                    Some(t) => keep_recorded_where_vaguer(t, recorded.as_ref()),
                    None => recorded?,
                };
                Some(with_anonymous_dims(t, g.value_name(v)))
            })
            .collect();
        let elements = values::infer(&cx, &types);
        for (slot, v) in node.outputs.iter().enumerate() {
            let Some(v) = *v else { continue };
            let Some(t) = types[slot].clone() else {
                continue;
            };
            if let Some(e) = elements
                .get(slot)
                .and_then(|e| values::checked(e.as_ref()?, &t))
            {
                inference.values.insert(v, e);
            }
            inference.types.insert(v, t);
        }
    }
    inference
}

/// What a rule sees of the node it types.
pub(super) struct Ctx<'a> {
    graph: &'a Graph,
    node: &'a Node,
    /// The version of the node's domain that the model imports.
    opset: i64,
    inference: &'a Inference,
}

impl<'a> Ctx<'a> {
    fn op(&self) -> &'a str {
        self.node.op_type()
    }

    fn has_input(&self, slot: usize) -> bool {
        self.node.input(slot).is_some()
    }

    fn input_count(&self) -> usize {
        self.node.inputs.len()
    }

    fn output_count(&self) -> usize {
        self.node.outputs.len()
    }

    fn input_type(&self, slot: usize) -> Option<&'a ValueType> {
        self.inference.types.get(&self.node.input(slot)?)
    }

    /// The element type of input `slot`, 0 when unknown.
    fn elem(&self, slot: usize) -> i32 {
        self.input_type(slot).map_or(0, |t| t.elem)
    }

    fn shape(&self, slot: usize) -> Option<&'a [Dim]> {
        self.input_type(slot)?.shape.as_deref()
    }

    fn value(&self, slot: usize) -> Option<&'a [Dim]> {
        self.inference.value(self.node.input(slot)?)
    }

    /// The value of input `slot` when every element is a known integer.
    fn ints(&self, slot: usize) -> Option<Vec<i64>> {
        self.value(slot)?.iter().map(Dim::value).collect()
    }

    fn attr_int(&self, name: &str, default: i64) -> i64 {
        attr::get_int(&self.node.proto, name).unwrap_or(default)
    }

    fn attr_ints(&self, name: &str) -> Option<&'a [i64]> {
        attr::get_ints(&self.node.proto, name)
    }

    fn constant_output(&self) -> Option<crate::ir::Tensor> {
        self.graph.constant(self.node.output(0)?)
    }
}

/// `axis` of a tensor of rank `rank` as an index, counting negative axes from the end.
fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let rank = i64::try_from(rank).ok()?;
    let a = if axis < 0 {
        axis.checked_add(rank)?
    } else {
        axis
    };
    (0..rank).contains(&a).then_some(a as usize)
}

const BOOL: i32 = DataType::Bool as i32;
const INT64: i32 = DataType::Int64 as i32;
const FLOAT: i32 = DataType::Float as i32;
const INT32: i32 = DataType::Int32 as i32;
const UINT8: i32 = DataType::Uint8 as i32;

/// Records every inferred type of an intermediate value in the graph.
///
/// Where inference leaves a dim `Unknown` or anonymous (or the rank, or the element type) and
/// the graph had recorded it, `infer` kept the recorded one, so running the pass never loses
/// what the file said. Graph inputs, outputs and initializers keep their declarations.
pub struct ShapeInference;

impl Pass for ShapeInference {
    fn name(&self) -> &'static str {
        "shape-inference"
    }

    fn run(&self, model: &mut Model) -> Result<Rewrites> {
        let inference = infer(model);
        let g = &mut model.graph;
        let mut changed = 0;
        for id in g.topological_order()? {
            let outputs: Vec<ValueId> = g.node(id).outputs.iter().flatten().copied().collect();
            for v in outputs {
                if g.is_graph_output(v) {
                    continue;
                }
                let Some(inferred) = inference.types.get(&v) else {
                    continue;
                };
                // A type without its element type is no type: ONNX Runtime refuses a file
                // whose value_info says `elem_type 0` ("Invalid tensor data type 0").
                let says_something = inferred.elem != 0;
                // Compared as it will read back: a dim whose text does not parse back to the
                // same dim must not count as a change on every run.
                let written = ValueType::from_type_proto(&inferred.to_type_proto());
                if says_something && g.value_type(v) != written {
                    g.set_value_type(v, inferred);
                    changed += 1;
                }
            }
        }
        let mut rewrites = Rewrites::default();
        rewrites.add("value-type", changed);
        Ok(rewrites)
    }
}

/// `t` with each unknown dim named for the value and axis it sizes (`Dim::anonymous`), so
/// that what is computed from it can be proved equal.
fn with_anonymous_dims(mut t: ValueType, value: &str) -> ValueType {
    for (axis, d) in t.shape.iter_mut().flatten().enumerate() {
        if *d == Dim::Unknown {
            *d = Dim::anonymous(value, axis);
        }
    }
    t
}

/// `inferred`, with what `recorded` says filled in where `inferred` says less: where it knows
/// nothing (`Unknown`), and where it knows a dim only through an anonymous one that the file
/// sizes or names.
fn keep_recorded_where_vaguer(inferred: &ValueType, recorded: Option<&ValueType>) -> ValueType {
    let Some(recorded) = recorded else {
        return inferred.clone();
    };
    let elem = if inferred.elem != 0 {
        inferred.elem
    } else {
        recorded.elem
    };
    let vaguer = |x: &Dim, y: &Dim| {
        *x == Dim::Unknown
            || (x.mentions_anonymous() && *y != Dim::Unknown && !y.mentions_anonymous())
    };
    let shape = match (&inferred.shape, &recorded.shape) {
        (Some(a), Some(b)) if a.len() == b.len() => Some(
            a.iter()
                .zip(b)
                .map(|(x, y)| if vaguer(x, y) { y.clone() } else { x.clone() })
                .collect(),
        ),
        (Some(a), _) => Some(a.clone()),
        (None, b) => b.clone(),
    };
    ValueType { elem, shape }
}
