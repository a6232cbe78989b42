//! Canonical spellings: one form for each computation that exporters write several ways, so
//! that each fusion pattern is written once (`fuse::gelu` and `fuse::layernorm` match the
//! forms on the right only).
//!
//! Matches and produces:
//! - `div-by-constant`: `Div(x, c)`, c a float32 or float64 constant (a scalar or 1-D) whose
//!   reciprocal is finite and normal → `Mul(x, 1/c)` (ONNX Runtime's load-time GeluFusion
//!   matches `Div(x, √2)` only, which costs nothing: every GELU `fuse::gelu` matches is fused
//!   for ONNX Runtime, and one it refuses, an intermediate with another reader, ONNX Runtime
//!   refuses too; its MatMulScaleFusion takes both forms);
//! - `square`: `x·x` (`Mul(x, x)`, as dynamo and tf2onnx write it) → `Pow(x, 2)`;
//! - `reciprocal`: `Reciprocal(x)` (tf2onnx) → `Div(1, x)`;
//! - `sqrt`: `Pow(x, 0.5)` → `Sqrt(x)`;
//! - `neg`: `Sub(0, x)` → `Neg(x)` (float and signed integer x);
//! - `mean-last-axis`: `GlobalAveragePool(x)` of a rank-3 x (tf2onnx's mean over the last axis
//!   of `[batch, sequence, hidden]`) → `ReduceMean(x, axes=[-1], keepdims=1)`;
//! - `scale-into-where`: `Where(c, a, f) · s` with `f` and `s` one-element float32 constants
//!   (GPT-J and CodeGen mask the scores before scaling them) → `Where(c, a · s, f·s)`, the
//!   order every other exporter writes (`fuse::attention` scales the scores, then masks);
//! - `einsum-matmul`: an `Einsum` that is a projection (`bsi,io->bso`, `...i,io->...o`,
//!   `abc,cd->abd`, the weight transposed `bsi,oi->bso`, 3-D weights `bsh,hnd->bsnd` and
//!   `bsnd,ndh->bsh`) → `MatMul` (with Reshapes where several axes are contracted or kept);
//! - `window-bias`: a bias added to scores with their batch split in two and merged back
//!   (Swin's shifted-window mask) → the scores plus the bias tiled along their batch
//!   (`window_bias`);
//! - `index-slice`: `GatherND` of one index along the leading axis (dynamo's Falcon picking
//!   its key and value heads from the packed projection) → a `Slice` of that axis, before the
//!   Transpose that moved it first (`index_slice`);
//! - `sequence-split`: `SplitToSequence` whose pieces are each picked by a constant position
//!   (onnxscript's `torch.split`) → `Split` (`sequence_split`).
//!
//! Why squares become `Pow(x, 2)` and reciprocals `Div(1, x)`, and not the other way round:
//! those are the forms torch's legacy exporter writes, and the only ones ONNX Runtime's own
//! load-time LayerNormFusion and SimplifiedLayerNormFusion recognize (1.32: a norm written
//! with `x·x` or `Reciprocal` stays unfused in the session). A normalization the fusions here
//! leave written out (one ONNX Runtime can still fuse at load, see `fuse::layernorm`) must
//! reach it in those forms: twelve RMSNorms of 8×128×768 took 33.4 ms of kernel time per
//! run written with `x·x` and `Reciprocal`, 21.0 ms once ONNX Runtime fused them
//! (`scripts/ort_profile.py`-style profile, two threads). The new constants are float32, so
//! these two rewrite float32 values only.
//!
//! Casts that change nothing (a float cast to its own type, the `Cast(x, float)` that
//! fp16-safe exports write around a normalization, which is a no-op in a float32 model) are
//! `noop`'s (`cast-noop`, `cast-roundtrip`), and shape computations constant folding's.
//!
//! Safe because each rewrite computes the same function with the same broadcasting (a
//! one-element constant is accepted only where its rank cannot raise the output's), and:
//! - `square`, `reciprocal` and `mean-last-axis` round the same exact result once (x², 1/x,
//!   the mean over the same elements; the mean's sum may be added in another order; ONNX
//!   Runtime computes `Pow(x, 2)` as x·x);
//! - `neg` differs only in the sign of a zero result (0 − 0 = +0, −(+0) = −0);
//! - `sqrt` is within `Pow`'s own error (≤ 1 ulp in glibc and ONNX Runtime), and keeps
//!   NaN for negative x; only `Pow(−∞, 0.5) = +∞` becomes NaN;
//! - `div-by-constant` is exact when c is a power of two (1/c is exact), and otherwise within
//!   1 ulp of the quotient: x·fl(1/c) rounds x/c·(1 + δ), |δ| ≤ 2⁻²⁴, once more (measured on
//!   4·10⁶ float32 x of magnitudes 10⁻³ to 10³ for c in √2, 1.41421, √48, √96, 3, 6, 7, 10,
//!   0.7, 10⁻⁵: at most 1 ulp apart, for 0.3% to 54% of x depending on c);
//! - `scale-into-where` computes the same products: each element is `a·s` or `f·s`, the
//!   latter rounded once at build time as it was at run time;
//! - `einsum-matmul` sums the same products (in the MatMul kernel's order).

mod einsum;
mod index_slice;
mod sequence_split;
mod window_bias;

use super::matching::{only_feeds, rewire, rewrite_each};
use super::{Pass, Rewrites};
use crate::error::Result;
use crate::ir::{attr, DataType, Graph, Model, NodeId, PValue, Patch, Tensor, ValueId};

pub struct Canonicalize;

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        "canonical"
    }

    fn run(&self, model: &mut Model) -> Result<Rewrites> {
        rewrite_each(model, |m, id| RULES.iter().find_map(|rule| rule(m, id)))
    }
}

type Rule = fn(&Model, NodeId) -> Option<Patch>;

/// The opset from which Slice takes its bounds as inputs (rules that write a Slice).
const SLICE_INPUTS_OPSET: i64 = 10;

const RULES: &[Rule] = &[
    div_by_constant,
    reciprocal,
    square,
    power,
    neg,
    mean_last_axis,
    scale_into_where,
    einsum::to_matmul,
    window_bias::window_bias,
    index_slice::index_slice,
    sequence_split::sequence_split,
];

/// Node `id` when it is the default-domain operator `op` with `inputs` inputs.
fn onnx_node<'g>(g: &'g Graph, id: NodeId, op: &str, inputs: usize) -> Option<&'g crate::ir::Node> {
    let n = g.node(id);
    (n.domain().is_empty() && n.is(op) && n.inputs.len() == inputs && n.outputs.len() == 1)
        .then_some(n)
}

/// The single value of constant `c` when it has one element and its rank cannot change the
/// broadcast shape of an operation with `other` (rank 0, or `other`'s rank known and at least
/// as high).
fn one_element(g: &Graph, c: ValueId, other: ValueId) -> Option<f64> {
    let t = g.constant(c)?;
    let rank_ok = t.dims().is_empty()
        || g.value_type(other)
            .and_then(|v| v.rank())
            .is_some_and(|r| r >= t.dims().len());
    if !rank_ok {
        return None;
    }
    t.scalar_f64()
}

/// The single-input node that replaces binary node `id`, keeping its name and output.
fn unary(g: &Graph, id: NodeId, kind: &'static str, op: &str, x: ValueId) -> Option<Patch> {
    let node = g.node(id);
    let mut proto = node.proto.clone();
    proto.op_type = Some(op.to_string());
    proto.attribute.clear();
    Some(rewire(kind, id, proto, &[Some(x)], node.output(0)?))
}

fn div_by_constant(m: &Model, id: NodeId) -> Option<Patch> {
    let g = &m.graph;
    let node = onnx_node(g, id, "Div", 2)?;
    let (x, c) = (node.input(0)?, node.input(1)?);
    if g.constant(x).is_some() {
        return None;
    }
    let t = g.constant(c)?;
    if t.dims().len() > 1 {
        return None;
    }
    let reciprocal = match t.dtype() {
        DataType::Float => {
            let r: Vec<f32> = t.to_f32_vec().ok()?.iter().map(|v| 1.0 / v).collect();
            if !r.iter().all(|v| v.is_normal()) {
                return None;
            }
            Tensor::from_f32(&format!("{}_reciprocal", g.value_name(c)), t.dims(), &r).ok()?
        }
        DataType::Double => {
            let raw = t.raw_bytes()?;
            let r: Vec<f64> = raw
                .chunks_exact(8)
                .map(|b| 1.0 / f64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .collect();
            if !r.iter().all(|v| v.is_normal()) {
                return None;
            }
            let bytes: Vec<u8> = r.iter().flat_map(|v| v.to_le_bytes()).collect();
            let name = format!("{}_reciprocal", g.value_name(c));
            Tensor::from_raw(&name, DataType::Double, t.dims(), bytes.into()).ok()?
        }
        _ => return None,
    };
    let mut proto = node.proto.clone();
    proto.op_type = Some("Mul".into());
    let mut patch = Patch::new("div-by-constant");
    let name = reciprocal.name().to_string();
    let r = patch.new_initializer(&name, reciprocal);
    patch.remove_node(id).add_node_proto(
        proto,
        &[Some(x.into()), Some(r)],
        &[node.output(0)?.into()],
    );
    Some(patch)
}

/// `Reciprocal(x)` → `Div(1, x)`, float32 x.
fn reciprocal(m: &Model, id: NodeId) -> Option<Patch> {
    let g = &m.graph;
    let node = onnx_node(g, id, "Reciprocal", 1)?;
    let x = node.input(0)?;
    if !is_float32(g, x) {
        return None;
    }
    with_constant(node, id, "reciprocal", "Div", ("one", 1.0), x, true)
}

/// `Mul(x, x)` → `Pow(x, 2)`, float32 x.
fn square(m: &Model, id: NodeId) -> Option<Patch> {
    let g = &m.graph;
    let node = onnx_node(g, id, "Mul", 2)?;
    let x = node.input(0)?;
    if node.input(1)? != x || !is_float32(g, x) {
        return None;
    }
    with_constant(node, id, "square", "Pow", ("two", 2.0), x, false)
}

/// Node `id` (its name and output kept) as `op(constant, x)` (`first`) or `op(x, constant)`,
/// with a new float32 scalar constant.
fn with_constant(
    node: &crate::ir::Node,
    id: NodeId,
    kind: &'static str,
    op: &str,
    (hint, value): (&str, f32),
    x: ValueId,
    first: bool,
) -> Option<Patch> {
    let mut proto = node.proto.clone();
    proto.op_type = Some(op.to_string());
    proto.attribute.clear();
    let mut patch = Patch::new(kind);
    let c = patch.new_initializer(hint, Tensor::from_f32(hint, &[], &[value]).ok()?);
    let inputs = if first {
        [Some(c), Some(x.into())]
    } else {
        [Some(x.into()), Some(c)]
    };
    patch
        .remove_node(id)
        .add_node_proto(proto, &inputs, &[node.output(0)?.into()]);
    Some(patch)
}

/// `Pow(x, 0.5)` → `Sqrt(x)`.
fn power(m: &Model, id: NodeId) -> Option<Patch> {
    let g = &m.graph;
    let node = onnx_node(g, id, "Pow", 2)?;
    let (x, e) = (node.input(0)?, node.input(1)?);
    if !is_float(g, x) || one_element(g, e, x)? != 0.5 {
        return None;
    }
    unary(g, id, "sqrt", "Sqrt", x)
}

fn neg(m: &Model, id: NodeId) -> Option<Patch> {
    let g = &m.graph;
    let node = onnx_node(g, id, "Sub", 2)?;
    let (zero, x) = (node.input(0)?, node.input(1)?);
    let signed = g
        .value_type(x)
        .and_then(|t| DataType::try_from(t.elem).ok())
        .is_some_and(|t| {
            use DataType::*;
            matches!(
                t,
                Float | Double | Float16 | Bfloat16 | Int8 | Int16 | Int32 | Int64
            )
        });
    if !signed || one_element(g, zero, x)? != 0.0 {
        return None;
    }
    unary(g, id, "neg", "Neg", x)
}

/// `Mul(Where(c, a, f), s)` (either operand order of the Mul, either branch of the Where the
/// constant) → `Where(c, Mul(a, s), f·s)`, when the Where is read by this Mul only.
fn scale_into_where(m: &Model, id: NodeId) -> Option<Patch> {
    let g = &m.graph;
    let node = onnx_node(g, id, "Mul", 2)?;
    let out = node.output(0)?;
    let (masked, s) = [(0, 1), (1, 0)].into_iter().find_map(|(w, c)| {
        let masked = node.input(w)?;
        let producer = g.producer(masked)?;
        let scale = node.input(c)?;
        (onnx_node(g, producer, "Where", 3).is_some() && g.constant(scale).is_some())
            .then_some((producer, scale))
    })?;
    let where_node = g.node(masked);
    if !only_feeds(g, masked, id) || !is_float32(g, out) {
        return None;
    }
    let (cond, x, y) = (
        where_node.input(0)?,
        where_node.input(1)?,
        where_node.input(2)?,
    );
    let (a, f, fill_first) = if g.constant(y).is_some() {
        (x, y, false)
    } else {
        (y, x, true)
    };
    let (fill, scale) = (one_element(g, f, a)?, one_element(g, s, a)?);
    if g.constant(a).is_some() || !is_float32(g, f) || !is_float32(g, s) {
        return None;
    }
    let mut patch = Patch::new("scale-into-where");
    let scaled = patch.op("Mul", "", &[a.into(), s.into()], vec![]);
    let hint = format!("{}_scaled", g.value_name(f));
    let fill = (fill as f32) * (scale as f32);
    let fill = patch.new_initializer(&hint, Tensor::from_f32(&hint, &[], &[fill]).ok()?);
    let branches = if fill_first {
        [fill, scaled]
    } else {
        [scaled, fill]
    };
    let proto = where_node.proto.clone();
    patch.remove_node(masked).remove_node(id).add_node_proto(
        proto,
        &[Some(cond.into()), Some(branches[0]), Some(branches[1])],
        &[out.into()],
    );
    Some(patch)
}

fn mean_last_axis(m: &Model, id: NodeId) -> Option<Patch> {
    let g = &m.graph;
    let node = onnx_node(g, id, "GlobalAveragePool", 1)?;
    let x = node.input(0)?;
    if g.value_type(x)?.rank()? != 3 {
        return None;
    }
    let out = node.output(0)?;
    let mut patch = Patch::new("mean-last-axis");
    patch.remove_node(id);
    let keepdims = attr::int("keepdims", 1);
    if m.opset("").unwrap_or(0) >= 18 {
        let axes = patch.new_initializer("axes", Tensor::from_i64("axes", &[1], &[-1]).ok()?);
        patch.add_node(
            "ReduceMean",
            "",
            &[Some(x.into()), Some(axes)],
            &[out.into()],
            vec![keepdims],
        );
    } else {
        let attributes = vec![attr::ints("axes", &[-1]), keepdims];
        patch.add_node(
            "ReduceMean",
            "",
            &[Some(x.into())],
            &[out.into()],
            attributes,
        );
    }
    Some(patch)
}

fn is_float32(g: &Graph, v: ValueId) -> bool {
    g.value_type(v)
        .is_some_and(|t| t.elem == DataType::Float as i32)
}

fn is_float(g: &Graph, v: ValueId) -> bool {
    use crate::ir::DataTypeExt;
    g.value_type(v)
        .and_then(|t| DataType::try_from(t.elem).ok())
        .is_some_and(|t| t.is_float())
}

/// A new value of `patch` for a constant of `dims` int64s (a Reshape target).
fn shape_constant(patch: &mut Patch, hint: &str, dims: &[i64]) -> Option<PValue> {
    let t = Tensor::from_i64(hint, &[dims.len() as i64], dims).ok()?;
    Some(patch.new_initializer(hint, t))
}

#[cfg(test)]
mod tests;
