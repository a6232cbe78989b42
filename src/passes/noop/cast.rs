//! Casts that change nothing.
//!
//! - `cast-noop`: `Cast(x, to=T)`, or `CastLike(x, like)`, where `x` already has type T: the
//!   ONNX Cast of a value to its own type is the value.
//! - `cast-roundtrip`: `Cast(Cast(x: S, to=T), to=S)` where T holds every value of S exactly
//!   (`lossless`): the first cast changes no value, the second brings back the type: `x`.
//! - `cast-chain`: `Cast(Cast(x: S, to=T), to=U)` → `Cast(x, to=U)` under the same condition,
//!   when converting a value to U gives the same result from T as from S (`composes`).
//! - `cast-like`: `CastLike(x, like)` → `Cast(x, to=T)` where `like` has type T: CastLike reads
//!   only the type of `like` (onnxscript's functions, which torch 2.5–2.6's dynamo exporter
//!   writes, cast every constant that way), so a constant `x` folds and the constants
//!   fusions look for appear.
//!
//! Element types come from `Graph::value_type`; without a recorded type nothing is done.

use super::super::matching::{bypass, input_producer, only_feeds, op_node, rewire};
use crate::ir::{attr, DataType, Graph, Node, NodeId, Patch, ValueId};

pub fn noop(g: &Graph, id: NodeId) -> Option<Patch> {
    let node = g.node(id);
    let target = if node.is("Cast") {
        cast_target(node)?
    } else if node.is("CastLike") {
        elem(g, node.input(1)?)?
    } else {
        return None;
    };
    let x = node.input(0)?;
    if elem(g, x)? != target {
        return None;
    }
    bypass(g, "cast-noop", id, node.output(0)?, x)
}

pub fn like(g: &Graph, id: NodeId) -> Option<Patch> {
    let node = op_node(g, id, "CastLike")?;
    let target = elem(g, node.input(1)?)?;
    let mut cast = node.proto.clone();
    cast.op_type = Some("Cast".into());
    cast.attribute.push(attr::int("to", target as i64));
    Some(rewire(
        "cast-like",
        id,
        cast,
        &[node.input(0)],
        node.output(0)?,
    ))
}

pub fn chain(g: &Graph, id: NodeId) -> Option<Patch> {
    let second = op_node(g, id, "Cast")?;
    let (first_id, first) = input_producer(g, second, 0, "Cast")?;
    let x = first.input(0)?;
    let (s, t, u) = (elem(g, x)?, cast_target(first)?, cast_target(second)?);
    if !lossless(s, t) || !composes(s, t, u) {
        return None;
    }
    let out = second.output(0)?;
    let mut patch = if u == s {
        bypass(g, "cast-roundtrip", id, out, x)?
    } else {
        rewire("cast-chain", id, second.proto.clone(), &[Some(x)], out)
    };
    if only_feeds(g, first_id, id) {
        patch.remove_node(first_id);
    }
    Some(patch)
}

fn cast_target(node: &Node) -> Option<DataType> {
    let to = attr::get_int(&node.proto, "to")?;
    DataType::try_from(i32::try_from(to).ok()?).ok()
}

/// The recorded element type of `v`, when there is one.
fn elem(g: &Graph, v: ValueId) -> Option<DataType> {
    let t = DataType::try_from(g.value_type(v)?.elem).ok()?;
    (t != DataType::Undefined).then_some(t)
}

/// The values of an integer type (bool is 0 and 1).
fn int_range(t: DataType) -> Option<(i128, i128)> {
    use DataType::*;
    let bits = |b: u32| (-(1i128 << (b - 1)), (1i128 << (b - 1)) - 1);
    let unsigned = |b: u32| (0, (1i128 << b) - 1);
    Some(match t {
        Bool => (0, 1),
        Uint8 => unsigned(8),
        Uint16 => unsigned(16),
        Uint32 => unsigned(32),
        Uint64 => unsigned(64),
        Int8 => bits(8),
        Int16 => bits(16),
        Int32 => bits(32),
        Int64 => bits(64),
        _ => return None,
    })
}

/// Bits of a float type's significand (with the implicit bit): it holds every integer up to
/// 2^bits exactly.
fn significand_bits(t: DataType) -> Option<u32> {
    use DataType::*;
    match t {
        Float16 => Some(11),
        Bfloat16 => Some(8),
        Float => Some(24),
        Double => Some(53),
        _ => None,
    }
}

/// True when `to` holds every value of `from` exactly, so casting to it changes no value.
fn lossless(from: DataType, to: DataType) -> bool {
    use DataType::*;
    if from == to {
        return true;
    }
    match (int_range(from), int_range(to), significand_bits(to)) {
        (Some((lo, hi)), Some((to_lo, to_hi)), _) => to_lo <= lo && hi <= to_hi,
        (Some((lo, hi)), None, Some(bits)) => lo.abs().max(hi) <= 1i128 << bits,
        _ => matches!(
            (from, to),
            (Float16 | Bfloat16, Float | Double) | (Float, Double)
        ),
    }
}

/// Given that `t` holds every value of `s` exactly, true when casting such a value from `t`
/// to `u` gives what casting it from `s` to `u` gives. Conversions between integers (modular),
/// to bool (`v != 0`), and to a float (one rounding of the exact value) depend only on the
/// value, so they agree. A float to an integer truncates, but out of the target's range (or
/// for NaN) ONNX leaves the result undefined and runtimes differ: that is allowed only for
/// integer values that `u` holds anyway.
fn composes(s: DataType, t: DataType, u: DataType) -> bool {
    let is_int = |x: DataType| int_range(x).is_some();
    if u == DataType::Bool || !is_int(u) {
        return true;
    }
    if is_int(t) {
        // `s` is an integer type too: `lossless` allows no float into an integer type.
        return true;
    }
    is_int(s) && lossless(s, u)
}

#[cfg(test)]
mod tests {
    use super::super::kinds as rewrites;
    use super::*;
    use crate::ir::testing::{builder, ops, written};
    use crate::ir::Model;

    fn cast(to: DataType) -> Vec<crate::proto::AttributeProto> {
        vec![attr::int("to", to as i64)]
    }

    /// x: `s` → Cast(t) → a → Cast(u) → y, read by an Identity so that `y` is no graph output.
    fn two_casts(s: DataType, t: DataType, u: DataType) -> Model {
        builder()
            .input("x", s, &["4"])
            .output("z", u, &["4"])
            .node("Cast", &["x"], &["a"], cast(t))
            .node("Cast", &["a"], &["y"], cast(u))
            .node("Identity", &["y"], &["z"], vec![])
            .build()
    }

    #[test]
    fn a_cast_to_the_type_it_has_goes() {
        use DataType::*;
        let mut m = builder()
            .input("x", Int64, &["batch"])
            .output("z", Float, &["batch"])
            .node("Cast", &["x"], &["a"], cast(Int64))
            .node("Cast", &["a"], &["z"], cast(Float))
            .build();
        assert_eq!(rewrites(&mut m), ["cast-noop"]);
        assert_eq!(ops(&m), ["Cast"]);
        assert_eq!(written(&m).node[0].input, ["x"]);
    }

    #[test]
    fn a_cast_that_changes_the_type_stays() {
        use DataType::*;
        let mut m = builder()
            .input("x", Int64, &["4"])
            .output("z", Int32, &["4"])
            .node("Cast", &["x"], &["z"], cast(Int32))
            .build();
        assert!(rewrites(&mut m).is_empty());
        // No recorded type: nothing to prove with.
        let mut m = builder()
            .input("x", Int64, &["4"])
            .output("z", Int64, &["4"])
            .node("Relu", &["x"], &["r"], vec![])
            .node("Cast", &["r"], &["z"], cast(Int64))
            .build();
        assert!(rewrites(&mut m).is_empty());
    }

    #[test]
    fn a_cast_like_is_the_cast_to_its_template_s_type() {
        use DataType::*;
        // onnxscript's GELU: 1 + erf(x), the 1 an int64 constant cast like `erf`.
        let mut m = builder()
            .input("x", Float, &["4"])
            .output("y", Float, &["4"])
            .init(crate::ir::Tensor::from_i64("one", &[], &[1]).unwrap())
            .node("CastLike", &["one", "x"], &["one_cast"], vec![])
            .node("Add", &["x", "one_cast"], &["y"], vec![])
            .build();
        assert_eq!(rewrites(&mut m), ["cast-like"]);
        let g = written(&m);
        assert_eq!(
            (g.node[0].op_type(), g.node[0].input.as_slice()),
            ("Cast", &["one".to_string()][..])
        );
        assert_eq!(attr::get_int(&g.node[0], "to"), Some(Float as i64));
    }

    #[test]
    fn a_lossless_round_trip_goes() {
        use DataType::*;
        for (s, t) in [
            (Int32, Int64),
            (Float16, Float),
            (Bool, Int32),
            (Int16, Float),
        ] {
            let mut m = two_casts(s, t, s);
            assert_eq!(rewrites(&mut m), ["cast-roundtrip"], "{s:?} via {t:?}");
            assert_eq!(ops(&m), ["Identity"]);
        }
    }

    #[test]
    fn a_lossy_round_trip_stays() {
        use DataType::*;
        for (s, t) in [
            (Int64, Int32),
            (Float, Float16),
            (Int32, Float),
            (Float, Int64),
            (Int8, Uint8),
            (Float16, Bfloat16),
        ] {
            let mut m = two_casts(s, t, s);
            assert!(rewrites(&mut m).is_empty(), "{s:?} via {t:?}");
            assert_eq!(ops(&m), ["Cast", "Cast", "Identity"]);
        }
    }

    #[test]
    fn a_cast_after_a_lossless_cast_reads_the_original() {
        use DataType::*;
        let mut m = two_casts(Int32, Int64, Float);
        assert_eq!(rewrites(&mut m), ["cast-chain"]);
        assert_eq!(ops(&m), ["Cast", "Identity"]);
        let g = written(&m);
        assert_eq!(
            (g.node[0].input[0].as_str(), g.node[0].output[0].as_str()),
            ("x", "y")
        );
        assert_eq!(g.node[0].attribute[0].i, Some(Float as i64));
        // Float to an integer type is defined only in range: i32 → f64 → i8 would turn
        // wrapping into an undefined conversion.
        assert!(rewrites(&mut two_casts(Int32, Double, Int8)).is_empty());
        assert_eq!(rewrites(&mut two_casts(Int8, Float, Int32)), ["cast-chain"]);
        assert!(rewrites(&mut two_casts(Float16, Float, Int32)).is_empty());
        assert_eq!(
            rewrites(&mut two_casts(Float16, Float, Double)),
            ["cast-chain"]
        );
    }

    #[test]
    fn the_first_cast_stays_for_its_other_readers() {
        use DataType::*;
        let mut m = builder()
            .input("x", Int32, &["4"])
            .output("y", Int32, &["4"])
            .output("a", Int64, &["4"])
            .node("Cast", &["x"], &["a"], cast(Int64))
            .node("Cast", &["a"], &["c"], cast(Int32))
            .node("Neg", &["c"], &["y"], vec![])
            .build();
        assert_eq!(rewrites(&mut m), ["cast-roundtrip"]);
        assert_eq!(ops(&m), ["Cast", "Neg"]);
        assert_eq!(written(&m).node[1].input, ["x"]);
    }

    #[test]
    fn lossless_is_about_every_value() {
        use DataType::*;
        assert!(lossless(Uint8, Float16) && lossless(Int16, Float));
        assert!(!lossless(Int16, Float16), "f16 has 11 significant bits");
        assert!(lossless(Int32, Double) && !lossless(Int64, Double));
        assert!(lossless(Uint32, Int64) && !lossless(Uint64, Int64));
        assert!(lossless(Bool, Uint8) && !lossless(Uint8, Bool));
        assert!(!lossless(Float, Int64) && !lossless(Double, Float));
    }
}
