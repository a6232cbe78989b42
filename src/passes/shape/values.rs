//! Symbolic values: the elements, as dims, of small integer tensors of rank 0 or 1.
//!
//! Exporters compute Reshape targets, Expand shapes and Range limits at run time from
//! `Shape`, then cut and glue the dims with Gather, Slice, Squeeze, Unsqueeze, Concat, Cast
//! and integer arithmetic. Following those values exactly is what types the Reshape (and
//! later lets constant folding remove the chain). Each rule gives an output's elements from
//! its inputs' elements; an element it cannot decide is `Unknown`, a value it cannot follow
//! at all is `None`. Bool tensors are followed too, as 0 and 1, since masks of which dims
//! to keep are built with Equal and Where.

use std::cmp::Ordering;

use super::ops::{shape_range, slice_params, slice_range};
use super::{normalize_axis, Ctx};
use crate::ir::{DataType, Dim, Tensor, ValueType};

/// Values longer than this are not followed: shapes and index lists are short.
const MAX_ELEMENTS: usize = 256;

/// The range of an element type whose values are followed: integers that fit an i64, and
/// bool (as 0 and 1). `None` for any other type.
fn range_of(elem: i32) -> Option<(i64, i64)> {
    use DataType::*;
    Some(match DataType::try_from(elem).ok()? {
        Int64 => (i64::MIN, i64::MAX),
        Int32 => (i32::MIN.into(), i32::MAX.into()),
        Int16 => (i16::MIN.into(), i16::MAX.into()),
        Int8 => (i8::MIN.into(), i8::MAX.into()),
        Uint32 => (0, u32::MAX.into()),
        Uint16 => (0, u16::MAX.into()),
        Uint8 => (0, u8::MAX.into()),
        Bool => (0, 1),
        _ => return None,
    })
}

/// The elements of a constant, when it is a small integer tensor of rank 0 or 1.
pub(super) fn of_tensor(t: &Tensor) -> Option<Vec<Dim>> {
    let followed = range_of(t.proto().data_type()).is_some();
    if t.dims().len() > 1 || t.numel() > MAX_ELEMENTS || !followed {
        return None;
    }
    Some(t.to_i64_vec().ok()?.into_iter().map(Dim::known).collect())
}

/// `value` as the value of a tensor of type `t`, when it can be one: a followed element
/// type, rank 0 with one element or rank 1 with as many elements as the dim says. An
/// element the type cannot hold (the runtime wraps it around) becomes unknown, and so does
/// a symbol in a type narrower than i64, except one plain symbol (`batch`, `Min(128, s)`)
/// in i32: TensorFlow computes shapes in int32 and tf2onnx casts every `Shape` to it, so an
/// axis of 2³¹ or more would already break the model's own arithmetic; a product of symbols
/// (a flattened extent) may still overflow and stays unknown.
pub(super) fn checked(value: &[Dim], t: &ValueType) -> Option<Vec<Dim>> {
    let (lo, hi) = range_of(t.elem)?;
    let fits = match t.shape.as_deref()? {
        [] => value.len() == 1,
        [Dim::Unknown] => true,
        [n] => n.value() == i64::try_from(value.len()).ok(),
        _ => false,
    };
    if !fits || value.len() > MAX_ELEMENTS {
        return None;
    }
    let wide = t.elem == DataType::Int64 as i32;
    let axis_fits = t.elem == DataType::Int32 as i32;
    Some(
        value
            .iter()
            .map(|d| match d.value() {
                Some(x) if (lo..=hi).contains(&x) => d.clone(),
                None if wide || (axis_fits && d.is_plain_symbol()) => d.clone(),
                _ => Dim::Unknown,
            })
            .collect(),
    )
}

/// The values of the node's outputs by slot (only single-output operators have rules).
pub(super) fn infer(cx: &Ctx, types: &[Option<ValueType>]) -> Vec<Option<Vec<Dim>>> {
    if !cx.node.domain().is_empty() {
        return Vec::new();
    }
    let value = match cx.op() {
        "Constant" => cx.constant_output().as_ref().and_then(of_tensor),
        // The elements keep their order; `fits` checks the count against the output type.
        "Identity" | "Squeeze" | "Unsqueeze" | "Reshape" => cx.value(0).map(<[Dim]>::to_vec),
        "Shape" => cx.shape(0).map(|s| {
            let (start, end) = shape_range(cx, s.len());
            s[start..end].to_vec()
        }),
        "Size" => cx.shape(0).map(|s| vec![Dim::product(s)]),
        "Cast" => cast(cx),
        "Gather" => gather(cx),
        "Slice" => slice(cx),
        "Concat" => concat(cx),
        "Add" => elementwise(cx, Dim::add),
        "Sub" => elementwise(cx, Dim::sub),
        "Mul" => elementwise(cx, Dim::mul),
        "Div" => elementwise(cx, divide),
        // fmod=0: the remainder takes the divisor's sign (Python's %); fmod=1: the dividend's.
        "Mod" if cx.attr_int("fmod", 0) == 0 => known_binary(cx, |a, b| {
            a.checked_rem(b)
                .and_then(|r| match r != 0 && (r < 0) != (b < 0) {
                    true => r.checked_add(b),
                    false => Some(r),
                })
        }),
        "Mod" => known_binary(cx, i64::checked_rem),
        "Max" => elementwise(cx, |a, b| match compare(a, b) {
            Some(Ordering::Less | Ordering::Equal) => b.clone(),
            Some(Ordering::Greater) => a.clone(),
            None => a.maximum(b),
        }),
        "Min" => elementwise(cx, |a, b| match compare(a, b) {
            Some(Ordering::Less | Ordering::Equal) => a.clone(),
            Some(Ordering::Greater) => b.clone(),
            None => a.minimum(b),
        }),
        "Neg" => cx
            .value(0)
            .map(|v| v.iter().map(|d| d.mul(&Dim::known(-1))).collect()),
        "Abs" => known_unary(cx, i64::checked_abs),
        "Not" => known_unary(cx, |x| Some(i64::from(x == 0))),
        "And" => known_binary(cx, |a, b| Some(i64::from(a != 0 && b != 0))),
        "Or" => known_binary(cx, |a, b| Some(i64::from(a != 0 || b != 0))),
        "Xor" => known_binary(cx, |a, b| Some(i64::from((a != 0) != (b != 0)))),
        "Equal" => comparison(cx, |o| o == Ordering::Equal),
        "Less" => comparison(cx, |o| o == Ordering::Less),
        "LessOrEqual" => comparison(cx, |o| o != Ordering::Greater),
        "Greater" => comparison(cx, |o| o == Ordering::Greater),
        "GreaterOrEqual" => comparison(cx, |o| o != Ordering::Less),
        "Where" => select(cx),
        "Range" => range(cx),
        "ConstantOfShape" => constant_of_shape(cx, output_len(types)),
        "Expand" => expand(cx, output_len(types)),
        _ => None,
    };
    vec![value]
}

/// The number of elements of output 0, when its type says (rank 0, or rank 1 of a known
/// length).
fn output_len(types: &[Option<ValueType>]) -> Option<usize> {
    match types.first()?.as_ref()?.shape.as_deref()? {
        [] => Some(1),
        [n] => usize::try_from(n.value()?).ok(),
        _ => None,
    }
}

/// The length `a` and `b` broadcast to, for values of rank 0 or 1.
fn broadcast_len(a: usize, b: usize) -> Option<usize> {
    match (a, b) {
        _ if a == b => Some(a),
        (1, n) | (n, 1) => Some(n),
        _ => None,
    }
}

fn elementwise(cx: &Ctx, f: impl Fn(&Dim, &Dim) -> Dim) -> Option<Vec<Dim>> {
    let (a, b) = (cx.value(0)?, cx.value(1)?);
    let n = broadcast_len(a.len(), b.len())?;
    Some(
        (0..n)
            .map(|i| f(&a[i % a.len()], &b[i % b.len()]))
            .collect(),
    )
}

fn known_unary(cx: &Ctx, f: impl Fn(i64) -> Option<i64>) -> Option<Vec<Dim>> {
    let v = cx.value(0)?;
    Some(
        v.iter()
            .map(|d| d.value().and_then(&f).map_or(Dim::Unknown, Dim::known))
            .collect(),
    )
}

fn known_binary(cx: &Ctx, f: impl Fn(i64, i64) -> Option<i64>) -> Option<Vec<Dim>> {
    elementwise(cx, |a, b| match (a.value(), b.value()) {
        (Some(x), Some(y)) => f(x, y).map_or(Dim::Unknown, Dim::known),
        _ => Dim::Unknown,
    })
}

/// Integer division, where it is exact or both operands are non-negative (there ONNX
/// runtimes agree: they truncate).
fn divide(a: &Dim, b: &Dim) -> Dim {
    match (a.value(), b.value()) {
        (Some(x), Some(y)) => {
            let exact = x.checked_rem(y) == Some(0);
            if exact || (x >= 0 && y > 0) {
                x.checked_div(y).map_or(Dim::Unknown, Dim::known)
            } else {
                Dim::Unknown
            }
        }
        _ => a.div(b).unwrap_or(Dim::Unknown),
    }
}

/// How `a` compares with `b`, when that is decided: known sizes, equal dims, or a positive
/// dim against a known size of at most 0.
fn compare(a: &Dim, b: &Dim) -> Option<Ordering> {
    match (a.value(), b.value()) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        _ if a.same(b) => Some(Ordering::Equal),
        (None, Some(y)) if y <= 0 && a.is_positive() => Some(Ordering::Greater),
        (Some(x), None) if x <= 0 && b.is_positive() => Some(Ordering::Less),
        _ => None,
    }
}

fn comparison(cx: &Ctx, holds: impl Fn(Ordering) -> bool) -> Option<Vec<Dim>> {
    elementwise(cx, |a, b| match compare(a, b) {
        Some(o) => Dim::known(i64::from(holds(o))),
        None => Dim::Unknown,
    })
}

fn select(cx: &Ctx) -> Option<Vec<Dim>> {
    let (c, x, y) = (cx.value(0)?, cx.value(1)?, cx.value(2)?);
    let n = broadcast_len(broadcast_len(c.len(), x.len())?, y.len())?;
    Some(
        (0..n)
            .map(|i| match c[i % c.len()].value() {
                Some(0) => y[i % y.len()].clone(),
                Some(_) => x[i % x.len()].clone(),
                None => Dim::Unknown,
            })
            .collect(),
    )
}

/// A cast to an integer type keeps the elements (`checked` then drops those the target
/// cannot hold); a cast to bool makes non-zero elements 1. Casts to other types are not
/// followed.
fn cast(cx: &Ctx) -> Option<Vec<Dim>> {
    let v = cx.value(0)?;
    let to = i32::try_from(cx.attr_int("to", 0)).ok()?;
    range_of(to)?;
    let to_bool = to == DataType::Bool as i32;
    Some(
        v.iter()
            .map(|d| match d.value() {
                Some(x) if to_bool => Dim::known(i64::from(x != 0)),
                None if to_bool && d.is_positive() => Dim::known(1),
                None if to_bool => Dim::Unknown,
                _ => d.clone(),
            })
            .collect(),
    )
}

/// A Gather along the only axis of a rank-1 value.
fn gather(cx: &Ctx) -> Option<Vec<Dim>> {
    let data = cx.value(0)?;
    if cx.shape(0)?.len() != 1 || normalize_axis(cx.attr_int("axis", 0), 1) != Some(0) {
        return None;
    }
    let n = i64::try_from(data.len()).ok()?;
    let indices = cx.value(1)?;
    Some(
        indices
            .iter()
            .map(|i| {
                let at = i.value().map(|i| if i < 0 { i + n } else { i });
                at.and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| data.get(i).cloned())
                    .unwrap_or(Dim::Unknown)
            })
            .collect(),
    )
}

/// A Slice of a rank-1 value with known bounds.
fn slice(cx: &Ctx) -> Option<Vec<Dim>> {
    let data = cx.value(0)?;
    if cx.shape(0)?.len() != 1 {
        return None;
    }
    let p = slice_params(cx)?;
    let ([start], [end], [axis], [step]) = (&p.starts[..], &p.ends[..], &p.axes[..], &p.steps[..])
    else {
        return None;
    };
    normalize_axis(*axis, 1)?;
    let n = i64::try_from(data.len()).ok()?;
    let (first, len) = slice_range(n, start.value()?, end.value()?, *step)?;
    (0..len)
        .map(|k| {
            let i = first.checked_add(k.checked_mul(*step)?)?;
            data.get(usize::try_from(i).ok()?).cloned()
        })
        .collect()
}

fn concat(cx: &Ctx) -> Option<Vec<Dim>> {
    normalize_axis(cx.attr_int("axis", 0), 1)?;
    let mut all = Vec::new();
    for slot in (0..cx.input_count()).filter(|&s| cx.has_input(s)) {
        if cx.shape(slot)?.len() != 1 {
            return None;
        }
        all.extend_from_slice(cx.value(slot)?);
    }
    Some(all)
}

/// `start, start + delta, …` below `limit`, when all three are known and the count small.
fn range(cx: &Ctx) -> Option<Vec<Dim>> {
    let scalar = |slot: usize| match cx.ints(slot)?.as_slice() {
        [x] => Some(*x),
        _ => None,
    };
    let (start, limit, delta) = (scalar(0)?, scalar(1)?, scalar(2)?);
    let count = super::ops::range_len(&Dim::known(start), &Dim::known(limit), &Dim::known(delta))
        .value()
        .and_then(|c| usize::try_from(c).ok())
        .filter(|&c| c <= MAX_ELEMENTS)?;
    (0..count)
        .map(|k| {
            let k = i64::try_from(k).ok()?;
            start.checked_add(k.checked_mul(delta)?).map(Dim::known)
        })
        .collect()
}

fn constant_of_shape(cx: &Ctx, len: Option<usize>) -> Option<Vec<Dim>> {
    let proto = crate::ir::attr::get_tensor(&cx.node.proto, "value")?;
    let fill = of_tensor(&Tensor::from_proto(proto.clone()).ok()?)?;
    let [fill] = fill.as_slice() else {
        return None;
    };
    Some(vec![fill.clone(); len.filter(|&n| n <= MAX_ELEMENTS)?])
}

fn expand(cx: &Ctx, len: Option<usize>) -> Option<Vec<Dim>> {
    let v = cx.value(0)?;
    let n = len.filter(|&n| n <= MAX_ELEMENTS)?;
    (broadcast_len(v.len(), n)? == n).then(|| (0..n).map(|i| v[i % v.len()].clone()).collect())
}
