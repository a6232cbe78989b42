//! TensorRT's rules for explicitly quantized ONNX models, checked node by node.
//!
//! TensorRT's ONNX parser takes quantization only as standard QuantizeLinear and
//! DequantizeLinear: int8, symmetric (zero points all 0), activations per tensor, weights per
//! tensor or per output channel, scales known at build time. It refuses integer operators
//! (QLinear*, MatMulInteger, ConvInteger, DynamicQuantizeLinear and ONNX Runtime's integer
//! contrib operators) and int32 biases. `trt_violations` lists every breach in words, so a
//! test can assert the list is empty and a user can see what to fix.

use super::placement::{channel_axis, is_constant};
use super::{is_integer_op, is_q_or_dq};
use crate::ir::Model;
use crate::ir::{attr, DataType, DataTypeExt, Graph, Node, NodeId, Tensor, ValueId};

/// Every way `model` breaks TensorRT's rules for explicit quantization; empty when it keeps
/// them all.
pub fn trt_violations(model: &Model) -> Vec<String> {
    let g = &model.graph;
    let order = match g.topological_order() {
        Ok(order) => order,
        Err(e) => return vec![e.to_string()],
    };
    let mut out = Vec::new();
    for id in order {
        let node = g.node(id);
        let label = format!("`{}` ({})", g.node_label(id), node.op_type());
        if is_integer_op(node) {
            out.push(format!(
                "{label}: an integer operator; TensorRT takes quantization as QuantizeLinear/DequantizeLinear only"
            ));
        } else if is_q_or_dq(node) && !node.domain().is_empty() {
            out.push(format!(
                "{label}: domain `{}`; TensorRT parses the standard ONNX operator only",
                node.domain()
            ));
        } else if node.is("QuantizeLinear") {
            check_quantize(g, id, &label, &mut out);
        } else if node.is("DequantizeLinear") {
            check_dequantize(g, id, &label, &mut out);
        } else if node.is("Conv") || node.is("Gemm") {
            let int32 = |b: ValueId| stored_type(g, b) == Some(DataType::Int32);
            if let Some(bias) = node.input(2).filter(|&b| int32(b)) {
                out.push(format!(
                    "{label}: bias `{}` is int32; TensorRT wants float biases",
                    g.value_name(bias)
                ));
            }
        }
    }
    out
}

/// The integer type of a quantized value: a constant's type, or what a QuantizeLinear
/// writes (its zero point's type, its `output_dtype`, or uint8 when it has neither).
fn int_type(g: &Graph, v: ValueId) -> Option<DataType> {
    if let Some(t) = g.initializer(v).filter(|_| is_constant(g, v)) {
        return Some(t.dtype());
    }
    let q = g.node(g.producer(v)?);
    if !q.is("QuantizeLinear") {
        return None;
    }
    if let Some(zp) = q.input(2) {
        return g.initializer(zp).map(Tensor::dtype);
    }
    let declared = attr::get_int(&q.proto, "output_dtype").filter(|&d| d != 0);
    Some(match declared {
        Some(code) => DataType::try_from(code as i32).unwrap_or(DataType::Undefined),
        None => DataType::Uint8,
    })
}

/// The integer type `v` is stored in: its own (`int_type`), or that of the value a
/// DequantizeLinear producing it reads.
fn stored_type(g: &Graph, v: ValueId) -> Option<DataType> {
    let dq = g
        .producer(v)
        .map(|p| g.node(p))
        .filter(|n| n.is("DequantizeLinear"));
    match dq.and_then(|n| n.input(0)) {
        Some(x) => int_type(g, x),
        None => int_type(g, v),
    }
}

/// The constant a Q/DQ parameter holds, or a breach when it is not a constant.
fn constant_param<'g>(
    g: &'g Graph,
    v: ValueId,
    label: &str,
    out: &mut Vec<String>,
) -> Option<&'g Tensor> {
    let t = g.initializer(v).filter(|_| is_constant(g, v));
    if t.is_none() {
        out.push(format!(
            "{label}: `{}` is not an initializer; TensorRT needs scales and zero points at build time",
            g.value_name(v)
        ));
    }
    t
}

/// Scale and zero point checks shared by Q and DQ; returns the scale.
fn check_params<'g>(
    g: &'g Graph,
    node: &Node,
    label: &str,
    out: &mut Vec<String>,
) -> Option<&'g Tensor> {
    if let Some(zp) = node
        .input(2)
        .and_then(|zp| constant_param(g, zp, label, out))
    {
        let nonzero = zp.to_i64_vec().map_or(true, |v| v.iter().any(|&z| z != 0));
        if nonzero {
            out.push(format!(
                "{label}: zero point `{}` is not all 0; TensorRT quantizes symmetrically",
                zp.name()
            ));
        }
    }
    let scale = node
        .input(1)
        .and_then(|s| constant_param(g, s, label, out))?;
    if !scale.dtype().is_float() {
        out.push(format!("{label}: scale `{}` is not float", scale.name()));
    }
    Some(scale)
}

fn check_int8(ty: Option<DataType>, what: &str, label: &str, out: &mut Vec<String>) {
    if ty != Some(DataType::Int8) {
        let name = ty.map_or("unknown".into(), |t| t.short_name().to_string());
        out.push(format!(
            "{label}: {what} is {name}; TensorRT takes int8 only"
        ));
    }
}

fn check_quantize(g: &Graph, id: NodeId, label: &str, out: &mut Vec<String>) {
    let node = g.node(id);
    let Some(y) = node.output(0) else { return };
    check_int8(int_type(g, y), "the output", label, out);
    if let Some(scale) = check_params(g, node, label, out) {
        if scale.numel() != 1 {
            out.push(format!(
                "{label}: scale `{}` has {} elements; TensorRT quantizes activations per tensor",
                scale.name(),
                scale.numel()
            ));
        }
    }
    if g.is_graph_output(y) {
        out.push(format!(
            "{label}: its output is a graph output, not read by a DequantizeLinear"
        ));
    }
    for &(reader, _) in g.uses(y) {
        let r = g.node(reader);
        let same_params = (1..3).all(|slot| same_constant(g, node.input(slot), r.input(slot)));
        if !r.is("DequantizeLinear") {
            out.push(format!(
                "{label}: its output is read by `{}` ({}), not by a DequantizeLinear",
                g.node_label(reader),
                r.op_type()
            ));
        } else if !same_params {
            out.push(format!(
                "{label}: `{}` dequantizes with another scale or zero point",
                g.node_label(reader)
            ));
        }
    }
}

/// True when both are absent, or the same value, or constants of the same type, dims and data.
fn same_constant(g: &Graph, a: Option<ValueId>, b: Option<ValueId>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) if a == b => true,
        (Some(a), Some(b)) => match (g.initializer(a), g.initializer(b)) {
            (Some(x), Some(y)) => {
                x.dtype() == y.dtype() && x.dims() == y.dims() && x.raw_bytes() == y.raw_bytes()
            }
            _ => false,
        },
        _ => false,
    }
}

fn check_dequantize(g: &Graph, id: NodeId, label: &str, out: &mut Vec<String>) {
    let node = g.node(id);
    let Some(x) = node.input(0) else { return };
    check_int8(
        int_type(g, x),
        &format!("the input `{}`", g.value_name(x)),
        label,
        out,
    );
    let Some(scale) = check_params(g, node, label, out) else {
        return;
    };
    let from_quantize = g
        .producer(x)
        .is_some_and(|p| g.node(p).is("QuantizeLinear"));
    if from_quantize {
        // The QuantizeLinear's checks cover the activation's scale; pairing is checked there.
        return;
    }
    let Some(weight) = g.initializer(x).filter(|_| is_constant(g, x)) else {
        out.push(format!(
            "{label}: reads `{}`, which is neither a QuantizeLinear's output nor an initializer",
            g.value_name(x)
        ));
        return;
    };
    if scale.numel() == 1 {
        return;
    }
    if scale.dims().len() != 1 {
        out.push(format!(
            "{label}: scale `{}` has dims {:?}; TensorRT takes a scalar or a 1-D per-channel scale",
            scale.name(),
            scale.dims()
        ));
        return;
    }
    let rank = weight.dims().len();
    let axis = attr::get_int(&node.proto, "axis").unwrap_or(1);
    let axis = if axis < 0 { axis + rank as i64 } else { axis };
    let channels = usize::try_from(axis)
        .ok()
        .and_then(|a| weight.dims().get(a).copied());
    if channels != Some(scale.dims()[0]) {
        out.push(format!(
            "{label}: {} scales along axis {axis} of `{}` with dims {:?}",
            scale.dims()[0],
            g.value_name(x),
            weight.dims()
        ));
    }
    let Some(y) = node.output(0) else { return };
    for &(reader, use_) in g.uses(y) {
        let consumer = g.node(reader);
        let needed = channel_axis(consumer, rank);
        let is_weight_slot = use_ == crate::ir::Use::Input(1);
        if is_weight_slot && needed.is_some() && needed != usize::try_from(axis).ok() {
            out.push(format!(
                "{label}: per-channel scales along axis {axis}, but `{}` ({}) has its output channels on axis {}",
                g.node_label(reader),
                consumer.op_type(),
                needed.unwrap_or_default()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::testing::builder;
    use bytes::Bytes;

    fn int(name: &str, dt: DataType, dims: &[i64], values: &[i64]) -> Tensor {
        let raw: Vec<u8> = match dt {
            DataType::Int32 => values
                .iter()
                .flat_map(|&v| (v as i32).to_le_bytes())
                .collect(),
            _ => values.iter().map(|&v| v as u8).collect(),
        };
        Tensor::from_raw(name, dt, dims, Bytes::from(raw)).unwrap()
    }

    /// `x` → Q → DQ → MatMul with a DQ'd weight `w.int8` [2, 3]; `zp` is the activation's
    /// zero point and `(scale dims, axis)` the weight's per-channel scale.
    fn model(zp: Tensor, w_scale: Tensor, axis: i64) -> Model {
        let f = DataType::Float;
        builder()
            .input("x", f, &["1", "2"])
            .output("y", f, &["1", "3"])
            .init(Tensor::from_f32("s", &[], &[0.1]).unwrap())
            .init(zp)
            .init(int("w.int8", DataType::Int8, &[2, 3], &[1, 2, 3, 4, 5, 6]))
            .init(w_scale)
            .node("QuantizeLinear", &["x", "s", "zp"], &["xq"], vec![])
            .node("DequantizeLinear", &["xq", "s", "zp"], &["xd"], vec![])
            .node(
                "DequantizeLinear",
                &["w.int8", "ws"],
                &["w"],
                vec![attr::int("axis", axis)],
            )
            .node("MatMul", &["xd", "w"], &["y"], vec![])
            .build()
    }

    fn int8_zp(v: i64) -> Tensor {
        int("zp", DataType::Int8, &[], &[v])
    }

    fn per_column() -> Tensor {
        Tensor::from_f32("ws", &[3], &[0.1, 0.2, 0.3]).unwrap()
    }

    #[test]
    fn a_model_keeping_the_rules_has_no_violation() {
        assert_eq!(
            trt_violations(&model(int8_zp(0), per_column(), 1)),
            Vec::<String>::new()
        );
        let per_tensor = Tensor::from_f32("ws", &[], &[0.1]).unwrap();
        assert_eq!(
            trt_violations(&model(int8_zp(0), per_tensor, 1)),
            Vec::<String>::new()
        );
    }

    fn one_violation(m: &Model, expected: &str) {
        let v = trt_violations(m);
        assert!(
            v.iter().any(|l| l.contains(expected)),
            "{expected:?} not in {v:?}"
        );
    }

    #[test]
    fn a_uint8_or_nonzero_zero_point_is_a_violation() {
        let uint8 = int("zp", DataType::Uint8, &[], &[128]);
        let v = trt_violations(&model(uint8, per_column(), 1));
        assert!(
            v.iter()
                .any(|l| l.contains("the output is u8; TensorRT takes int8 only")),
            "{v:?}"
        );
        assert!(
            v.iter().any(|l| l.contains("zero point `zp` is not all 0")),
            "{v:?}"
        );
        one_violation(
            &model(int8_zp(3), per_column(), 1),
            "zero point `zp` is not all 0",
        );
    }

    #[test]
    fn weight_scales_must_be_1d_along_the_output_channels() {
        let two_d = Tensor::from_f32("ws", &[1, 3], &[0.1, 0.2, 0.3]).unwrap();
        one_violation(&model(int8_zp(0), two_d, 1), "scale `ws` has dims [1, 3]");
        let per_row = Tensor::from_f32("ws", &[2], &[0.1, 0.2]).unwrap();
        one_violation(
            &model(int8_zp(0), per_row, 0),
            "`MatMul_y` (MatMul) has its output channels on axis 1",
        );
        let wrong_length = Tensor::from_f32("ws", &[2], &[0.1, 0.2]).unwrap();
        one_violation(&model(int8_zp(0), wrong_length, 1), "2 scales along axis 1");
    }

    #[test]
    fn an_int32_bias_and_integer_operators_are_violations() {
        let f = DataType::Float;
        let m = builder()
            .input("x", f, &["1", "2"])
            .input("xi", DataType::Uint8, &["1", "2"])
            .output("y", f, &["1", "2"])
            .output("yi", DataType::Int32, &["1", "2"])
            .init(Tensor::from_f32("w", &[2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap())
            .init(int("b", DataType::Int32, &[2], &[1, 2]))
            .init(int("wi", DataType::Uint8, &[2, 2], &[1, 2, 3, 4]))
            .node("Gemm", &["x", "w", "b"], &["y"], vec![])
            .node("MatMulInteger", &["xi", "wi"], &["yi"], vec![])
            .build();
        one_violation(&m, "bias `b` is int32; TensorRT wants float biases");
        one_violation(
            &m,
            "`MatMulInteger_yi` (MatMulInteger): an integer operator",
        );
    }

    #[test]
    fn a_quantize_linear_must_feed_matching_dequantize_linears_only() {
        let f = DataType::Float;
        let m = builder()
            .input("x", f, &["1", "2"])
            .output("y", f, &["1", "2"])
            .output("xq", DataType::Int8, &["1", "2"])
            .init(Tensor::from_f32("s", &[], &[0.1]).unwrap())
            .init(Tensor::from_f32("s2", &[], &[0.2]).unwrap())
            .init(int8_zp(0))
            .node("QuantizeLinear", &["x", "s", "zp"], &["xq"], vec![])
            .node("DequantizeLinear", &["xq", "s2", "zp"], &["y"], vec![])
            .build();
        one_violation(&m, "dequantizes with another scale or zero point");
        one_violation(&m, "its output is a graph output");
    }
}
