//! Float16 to float32: a model stored and computed in float16 (a `--fp16` output, a hub's
//! `model_fp16.onnx`) as the float32 model it rounds, before its activations are quantized.
//!
//! Matches: float16 initializers, `Constant` and `ConstantOfShape` values, `Cast(to=FLOAT16)`
//! nodes, and graph inputs and outputs declared float16.
//! Produces: float32 initializers and constants; `Cast(to=FLOAT)` in place of each
//! `Cast(to=FLOAT16)`; a `Cast(to=FLOAT)` after each float16 graph input and a
//! `Cast(to=FLOAT16)` before each float16 graph output, so that the model's interface stays
//! as exported; the recorded types of the values in between made float32.
//! Why: INT8 activation quantization computes in float32 (ONNX Runtime's CPU
//! DynamicQuantizeLinear, MatMulIntegerToFloat and QuantizeLinear with float32 scales);
//! quantizing a float16 graph wrote operators bound to float16 and float32 at once (MiniLM
//! in float16, `--int8-dynamic`: "Type parameter (T) of Optype (Mul) bound to different
//! types"), which the validation refused.
//! Safe because every float16 number is a float32 number: the constants keep their values,
//! and every operator computes in float32 what it computed in float16, less float16's
//! rounding of its result. No float16 value is left inside the graph (every source of one is
//! rewritten), so no operator reads both precisions.

use crate::error::Result;
use crate::ir::{attr, DataType, Model, PValue, Patch, Tensor, Use, ValueId};
use crate::passes::shape::ShapeInference;
use crate::passes::{Pass, Rewrites};

const FLOAT16: i32 = DataType::Float16 as i32;

/// Whether `model` holds or computes float16 values: a float16 initializer, constant, Cast or
/// graph input or output.
pub fn is_float16(model: &Model) -> bool {
    let g = &model.graph;
    let declared = |v: ValueId| g.value_type(v).is_some_and(|t| t.elem == FLOAT16);
    g.initializers()
        .any(|(_, t)| t.dtype() == DataType::Float16)
        || g.inputs.iter().chain(&g.outputs).any(|p| declared(p.value))
        || g.nodes().any(|(_, n)| match n.op_type() {
            "Cast" => attr::get_int(&n.proto, "to") == Some(FLOAT16 as i64),
            "Constant" | "ConstantOfShape" => n.output(0).is_some_and(declared),
            _ => false,
        })
}

/// Rewrites `model` to compute in float32 (see the module doc).
pub fn upcast_float16(model: &mut Model) -> Result<Rewrites> {
    let mut rewrites = Rewrites::default();
    for patch in constant_patches(model)? {
        rewrites.apply(model, patch)?;
    }
    for patch in edge_patches(model) {
        rewrites.apply(model, patch)?;
    }
    let g = &mut model.graph;
    let recorded_float16: Vec<(ValueId, crate::ir::ValueType)> = g
        .value_ids()
        .filter(|&v| !g.is_graph_input(v) && !g.is_graph_output(v))
        .filter_map(|v| Some((v, g.value_type(v).filter(|t| t.elem == FLOAT16)?)))
        .collect();
    for (v, t) in recorded_float16 {
        let float = crate::ir::ValueType {
            elem: DataType::Float as i32,
            ..t
        };
        g.set_value_type(v, &float);
    }
    ShapeInference.run(model)?;
    Ok(rewrites)
}

/// Float32 initializers, Constant and ConstantOfShape values, and Casts to float32.
fn constant_patches(model: &Model) -> Result<Vec<Patch>> {
    let g = &model.graph;
    let mut patches = Vec::new();
    for (v, t) in g.initializers() {
        if t.dtype() == DataType::Float16 {
            let mut patch = Patch::new("upcast-initializer");
            patch.replace_initializer(v, to_f32(t)?);
            patches.push(patch);
        }
    }
    for (id, node) in g.nodes() {
        if !node.domain().is_empty() {
            continue;
        }
        let mut patch = Patch::new("upcast-constant");
        match node.op_type() {
            "Constant" | "ConstantOfShape" => {
                for a in &node.proto.attribute {
                    let Some(t) = &a.t else { continue };
                    let t = Tensor::from_proto(t.clone())?;
                    if t.dtype() == DataType::Float16 {
                        patch.set_attribute(id, attr::tensor(a.name(), to_f32(&t)?));
                    }
                }
            }
            "Cast" if attr::get_int(&node.proto, "to") == Some(FLOAT16 as i64) => {
                patch.set_attribute(id, attr::int("to", DataType::Float as i64));
            }
            _ => {}
        }
        if !patch.is_empty() {
            patches.push(patch);
        }
    }
    Ok(patches)
}

/// Casts at the float16 graph inputs and outputs: readers of an input read its float32
/// Cast; an output's producer writes `<output>.float32`, which its other readers read and a
/// Cast to float16 turns into the output.
fn edge_patches(model: &Model) -> Vec<Patch> {
    let g = &model.graph;
    let float16 = |v: ValueId| g.value_type(v).is_some_and(|t| t.elem == FLOAT16);
    let cast = |patch: &mut Patch, from: PValue, to: PValue, elem: DataType| {
        let to_type = attr::int("to", elem as i64);
        patch.add_node("Cast", "", &[Some(from)], &[to], vec![to_type]);
    };
    let mut patches = Vec::new();
    for port in &g.inputs {
        let v = port.value;
        if !float16(v) || g.initializer(v).is_some() {
            continue;
        }
        let mut patch = Patch::new("upcast-input");
        let float = patch.new_value(&format!("{}.float32", g.value_name(v)));
        cast(&mut patch, v.into(), float, DataType::Float);
        for &(reader, u) in g.uses(v) {
            if let Use::Input(slot) = u {
                patch.replace_input(reader, slot, float);
            }
        }
        patches.push(patch);
    }
    for port in &g.outputs {
        let v = port.value;
        let Some(producer) = g.producer(v).filter(|_| float16(v)) else {
            continue;
        };
        let node = g.node(producer);
        let mut patch = Patch::new("upcast-output");
        let float = patch.new_value(&format!("{}.float32", g.value_name(v)));
        let inputs: Vec<Option<PValue>> = node.inputs.iter().map(|i| i.map(PValue::from)).collect();
        let written: Vec<PValue> = node
            .outputs
            .iter()
            .flatten()
            .map(|&o| if o == v { float } else { PValue::Old(o) })
            .collect();
        patch
            .remove_node(producer)
            .add_node_proto(node.proto.clone(), &inputs, &written);
        cast(&mut patch, float, PValue::Old(v), DataType::Float16);
        for &(reader, u) in g.uses(v) {
            if let Use::Input(slot) = u {
                patch.replace_input(reader, slot, float);
            }
        }
        patches.push(patch);
    }
    patches
}

/// `t`, a float16 tensor, as float32 (exactly).
fn to_f32(t: &Tensor) -> Result<Tensor> {
    Tensor::from_f32(t.name(), t.dims(), &t.to_f32_vec()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::testing::{builder, ops};

    fn half(name: &str, values: &[f32]) -> Tensor {
        let dims = [values.len() as i64];
        Tensor::from_f32_as(name, DataType::Float16, &dims, values).unwrap()
    }

    /// `y = Cast<f16>(x · w + c)` over a float16 input, weight and constant.
    #[test]
    fn a_float16_graph_computes_in_float32_between_casts_at_its_float16_edges() {
        let mut model = builder()
            .input("x", DataType::Float16, &["2"])
            .output("y", DataType::Float16, &["2"])
            .typed("xw", DataType::Float16, &["2"])
            .init(half("w", &[0.5, 2.0]))
            .constant("c", half("c", &[1.0, -1.0]))
            .node("Mul", &["x", "w"], &["xw"], vec![])
            .node("Add", &["xw", "c"], &["sum"], vec![])
            .node(
                "Cast",
                &["sum"],
                &["y"],
                vec![attr::int("to", FLOAT16 as i64)],
            )
            .build();
        assert!(is_float16(&model));
        upcast_float16(&mut model).unwrap();
        assert_eq!(
            ops(&model),
            ["Constant", "Cast", "Mul", "Add", "Cast", "Cast"]
        );
        let g = &model.graph;
        let elem = |name: &str| g.value_type(g.find_value(name).unwrap()).unwrap().elem;
        assert_eq!(elem("x"), FLOAT16, "the interface stays");
        assert_eq!(elem("y"), FLOAT16, "the interface stays");
        assert_eq!(elem("w"), DataType::Float as i32);
        assert_eq!(
            elem("xw"),
            DataType::Float as i32,
            "no stale float16 record"
        );
        let w = g.initializer(g.find_value("w").unwrap()).unwrap();
        assert_eq!(w.to_f32_vec().unwrap(), [0.5, 2.0]);
        // Every node but the edge Casts reads float32: no operator mixes the two.
        let types = crate::passes::shape::infer(&model).types;
        for (_, node) in g.nodes().filter(|(_, n)| !n.is("Cast")) {
            for v in node.inputs.iter().flatten() {
                assert_eq!(types[v].elem, DataType::Float as i32, "{}", node.op_type());
            }
        }
    }
}
