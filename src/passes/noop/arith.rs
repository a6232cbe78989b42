//! Arithmetic that returns its input.
//!
//! - `mul-one`: `Mul(x, c)` with a constant `c` of ones.
//! - `add-zeros`: `Add(x, z)` with `z` all zeros: a constant of zeros, `ConstantOfShape` of 0,
//!   `Expand` of a constant 0, or such zeros times a constant (torch's `baddbmm(zeros, a, b)`,
//!   GPT-BigCode's scores, writes `a·b + zeros·β`).
//!
//! Both only where the result has `x`'s recorded shape (the other operand broadcasts into it
//! without growing it) and `x`'s float type: `x·1` and `x + 0` are `x` for every float, NaN
//! and infinities included (`-0 + 0` gives `+0`, which compares equal).

use super::super::matching::{bypass, op_node};
use crate::ir::shape::same_shape;
use crate::ir::{attr, DataType, DataTypeExt, Graph, NodeId, Patch, Tensor, ValueId};

pub fn mul_one(g: &Graph, id: NodeId) -> Option<Patch> {
    let node = op_node(g, id, "Mul")?;
    let out = node.output(0)?;
    let (x, _) = operands(g, node.input(0)?, node.input(1)?, out, |g, v| {
        all(g.constant(v)?, 1.0)
    })?;
    bypass(g, "mul-one", id, out, x)
}

pub fn add_zeros(g: &Graph, id: NodeId) -> Option<Patch> {
    let node = op_node(g, id, "Add")?;
    let out = node.output(0)?;
    let (x, _) = operands(g, node.input(0)?, node.input(1)?, out, is_zeros)?;
    bypass(g, "add-zeros", id, out, x)
}

/// `(x, other)` of a commutative binary node with output `out`, where `other` satisfies
/// `is_identity` and the output is provably `x`'s shape and float type.
fn operands(
    g: &Graph,
    a: ValueId,
    b: ValueId,
    out: ValueId,
    is_identity: fn(&Graph, ValueId) -> Option<bool>,
) -> Option<(ValueId, ValueId)> {
    let out_type = g.value_type(out)?;
    let out_dims = out_type.shape?;
    [(a, b), (b, a)].into_iter().find(|&(x, other)| {
        let keeps = g.value_type(x).is_some_and(|t| {
            t.elem == out_type.elem
                && DataType::try_from(t.elem).is_ok_and(|d| d.is_float())
                && t.shape.is_some_and(|d| same_shape(&d, &out_dims))
        });
        keeps && is_identity(g, other) == Some(true)
    })
}

/// Every element of `t` is `v`.
fn all(t: Tensor, v: f32) -> Option<bool> {
    Some(t.to_f32_vec().ok()?.iter().all(|&e| e == v))
}

/// `v` is all zeros: a constant, `ConstantOfShape` of 0 (its default), `Expand` of a
/// constant 0, or zeros times a finite constant.
fn is_zeros(g: &Graph, v: ValueId) -> Option<bool> {
    if let Some(t) = g.constant(v) {
        return all(t, 0.0);
    }
    let node = g.node(g.producer(v)?);
    let zero = match node.op_type() {
        _ if !node.domain().is_empty() => false,
        "ConstantOfShape" => match attr::get_tensor(&node.proto, "value") {
            None => true,
            Some(t) => all(Tensor::from_proto(t.clone()).ok()?, 0.0)?,
        },
        "Expand" => all(g.constant(node.input(0)?)?, 0.0)?,
        "Mul" => {
            let (a, b) = (node.input(0)?, node.input(1)?);
            let finite = |c: ValueId| {
                g.constant(c)
                    .and_then(|t| t.to_f32_vec().ok())
                    .is_some_and(|e| e.iter().all(|x| x.is_finite()))
            };
            (is_zeros(g, a) == Some(true) && finite(b))
                || (is_zeros(g, b) == Some(true) && finite(a))
        }
        _ => false,
    };
    Some(zero)
}

#[cfg(test)]
mod tests {
    use super::super::kinds as rewrites;
    use crate::ir::testing::{builder, ops, written};
    use crate::ir::{attr, DataType, Model, Tensor};

    /// x: f32[2, 3] → Mul(x, ones) → Add(·, zeros) → Neg → z, with `ones` and `zeros` of
    /// `dims` (zeros as `ConstantOfShape` of `fill` times 1), the results typed as the
    /// broadcast makes them (`[2, 3]`, or `[4, 2, 3]` with `wide`).
    fn chain(dims: &[i64], fill: f32, wide: bool) -> Model {
        let result: &[&str] = if wide { &["4", "2", "3"] } else { &["2", "3"] };
        let n = dims.iter().product::<i64>() as usize;
        let ones = Tensor::from_f32("ones", dims, &vec![1.0; n]).unwrap();
        let shape = Tensor::from_i64("shape", &[dims.len() as i64], dims).unwrap();
        let filled = attr::tensor("value", Tensor::from_f32("value", &[1], &[fill]).unwrap());
        builder()
            .input("x", DataType::Float, &["2", "3"])
            .output("z", DataType::Float, result)
            .typed("a", DataType::Float, result)
            .typed("b", DataType::Float, result)
            .init(ones)
            .init(shape)
            .node("ConstantOfShape", &["shape"], &["fill"], vec![filled])
            .node("Mul", &["fill", "ones"], &["zeros"], vec![])
            .node("Mul", &["x", "ones"], &["a"], vec![])
            .node("Add", &["zeros", "a"], &["b"], vec![])
            .node("Neg", &["b"], &["z"], vec![])
            .build()
    }

    #[test]
    fn ones_and_zeros_that_keep_the_shape_go() {
        let mut m = chain(&[1, 3], 0.0, false);
        let mut kinds = rewrites(&mut m);
        kinds.sort();
        assert_eq!(kinds, ["add-zeros", "mul-one"]);
        assert!(!ops(&m).contains(&"Add".to_string()), "{:?}", ops(&m));
        let g = written(&m);
        let neg = g.node.iter().find(|n| n.op_type() == "Neg").unwrap();
        assert_eq!(neg.input, ["x"]);
    }

    #[test]
    fn a_fill_other_than_zero_or_a_growing_broadcast_stays() {
        let mut m = chain(&[1, 3], 0.5, false);
        assert_eq!(rewrites(&mut m), ["mul-one"]);
        assert!(ops(&m).contains(&"Add".to_string()));
        // Ones of [4, 2, 3] make the product [4, 2, 3]: not x (zeros of [4, 2, 3] added to it
        // are still nothing).
        let mut m = chain(&[4, 2, 3], 0.0, true);
        assert_eq!(rewrites(&mut m), ["add-zeros"]);
        let g = written(&m);
        let neg = g.node.iter().find(|n| n.op_type() == "Neg").unwrap();
        assert_eq!(neg.input, ["a"]);
    }
}
