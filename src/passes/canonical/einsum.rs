//! `einsum-matmul`: an Einsum of two operands that is a projection of the first by the
//! second, as MatMul.
//!
//! The equation must read `[...]F C, C G -> [...]F G` (or `[...]F C, G C -> [...]F G`, the
//! weight transposed), where F are the first operand's kept axes (any number, or a leading
//! `...`), C the contracted axes (in the same order in both operands), G the second operand's
//! kept axes, every letter once per term, and no axis shared by both operands and the
//! output (a batched product is not a projection). The second operand's dims must be known.
//! One contracted and one kept axis make one MatMul (after a Transpose for `G C`); more are
//! flattened into one by Reshapes (`0` copies the leading dims), and the result is reshaped
//! back to `F G`.

use super::{is_float, onnx_node, shape_constant};
use crate::ir::{attr, Model, NodeId, PValue, Patch};

/// One term of an equation: a leading `...` or not, then its axis letters.
struct Term {
    ellipsis: bool,
    letters: Vec<char>,
}

fn term(s: &str) -> Option<Term> {
    let (ellipsis, rest) = match s.strip_prefix("...") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let letters: Vec<char> = rest.chars().collect();
    let distinct = letters
        .iter()
        .enumerate()
        .all(|(i, c)| c.is_ascii_alphabetic() && !letters[..i].contains(c));
    distinct.then_some(Term { ellipsis, letters })
}

/// `(a, b, out)` of an explicit two-operand equation.
fn equation(s: &str) -> Option<(Term, Term, Term)> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, out) = s.split_once("->")?;
    let (a, b) = lhs.split_once(',')?;
    Some((term(a)?, term(b)?, term(out)?))
}

/// How the second operand is laid out.
#[derive(PartialEq)]
enum Weight {
    /// `C G`
    Plain,
    /// `G C`
    Transposed,
}

/// The projection an equation describes: (kept axes of a, contracted, kept axes of b, layout).
fn projection(a: &Term, b: &Term, out: &Term) -> Option<(usize, usize, usize, Weight)> {
    if b.ellipsis || a.ellipsis != out.ellipsis {
        return None;
    }
    let contracted: Vec<char> = a
        .letters
        .iter()
        .copied()
        .filter(|c| b.letters.contains(c))
        .collect();
    let f = a.letters.len() - contracted.len();
    if contracted.is_empty() || a.letters[f..] != contracted[..] {
        return None;
    }
    let c = contracted.len();
    let g = b.letters.len() - c;
    let layout = if b.letters[..c] == contracted[..] {
        Weight::Plain
    } else if b.letters[g..] == contracted[..] {
        Weight::Transposed
    } else {
        return None;
    };
    let kept_b = match layout {
        Weight::Plain => &b.letters[c..],
        Weight::Transposed => &b.letters[..g],
    };
    let expected: Vec<char> = a.letters[..f].iter().chain(kept_b).copied().collect();
    (g > 0 && out.letters == expected).then_some((f, c, g, layout))
}

pub fn to_matmul(m: &Model, id: NodeId) -> Option<crate::ir::Patch> {
    let g = &m.graph;
    let node = onnx_node(g, id, "Einsum", 2)?;
    let (a, b, out) = (node.input(0)?, node.input(1)?, node.output(0)?);
    let (ta, tb, tout) = equation(&attr::get_string(&node.proto, "equation")?)?;
    let (f, c, kept, layout) = projection(&ta, &tb, &tout)?;
    if !is_float(g, a) || !is_float(g, b) {
        return None;
    }
    let b_dims: Vec<i64> = g
        .value_type(b)?
        .shape?
        .iter()
        .map(|d| d.value())
        .collect::<Option<_>>()?;
    if b_dims.len() != c + kept {
        return None;
    }
    let (contracted_dims, kept_dims) = match layout {
        Weight::Plain => (&b_dims[..c], &b_dims[c..]),
        Weight::Transposed => (&b_dims[kept..], &b_dims[..kept]),
    };
    let (c_size, g_size): (i64, i64) =
        (contracted_dims.iter().product(), kept_dims.iter().product());
    // The leading dims of a that the Reshapes copy (all of them but the contracted ones).
    let a_rank = g.value_type(a).and_then(|t| t.rank());
    let leading = match (ta.ellipsis, a_rank) {
        (false, Some(r)) if r != ta.letters.len() => return None,
        (false, _) => Some(f),
        (true, r) => r.and_then(|r| r.checked_sub(c)),
    };
    let mut patch = Patch::new("einsum-matmul");
    patch.remove_node(id);
    let mut lhs: PValue = a.into();
    if c > 1 {
        let zeros = vec![0; leading?];
        let dims: Vec<i64> = zeros.into_iter().chain([c_size]).collect();
        let shape = shape_constant(&mut patch, "einsum_shape", &dims)?;
        lhs = patch.op("Reshape", "", &[lhs, shape], vec![]);
    }
    let mut rhs: PValue = b.into();
    if c > 1 || kept > 1 {
        let dims = match layout {
            Weight::Plain => [c_size, g_size],
            Weight::Transposed => [g_size, c_size],
        };
        let shape = shape_constant(&mut patch, "einsum_weight_shape", &dims)?;
        rhs = patch.op("Reshape", "", &[rhs, shape], vec![]);
    }
    if layout == Weight::Transposed {
        let perm = vec![attr::ints("perm", &[1, 0])];
        rhs = patch.op("Transpose", "", &[rhs], perm);
    }
    if kept > 1 {
        let zeros = vec![0; leading?];
        let dims: Vec<i64> = zeros.into_iter().chain(kept_dims.iter().copied()).collect();
        let shape = shape_constant(&mut patch, "einsum_out_shape", &dims)?;
        let product = patch.op("MatMul", "", &[lhs, rhs], vec![]);
        patch.add_node(
            "Reshape",
            "",
            &[Some(product), Some(shape)],
            &[out.into()],
            vec![],
        );
    } else {
        let mut proto = node.proto.clone();
        proto.op_type = Some("MatMul".into());
        proto.attribute.clear();
        patch.add_node_proto(proto, &[Some(lhs), Some(rhs)], &[out.into()]);
    }
    Some(patch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(s: &str) -> Option<(usize, usize, usize, bool)> {
        let (a, b, out) = equation(s)?;
        projection(&a, &b, &out).map(|(f, c, g, l)| (f, c, g, l == Weight::Transposed))
    }

    #[test]
    fn projections_are_recognized_and_the_rest_refused() {
        assert_eq!(parsed("bsi,io->bso"), Some((2, 1, 1, false)));
        assert_eq!(parsed("...i,io->...o"), Some((0, 1, 1, false)));
        assert_eq!(parsed("abc,cd->abd"), Some((2, 1, 1, false)));
        assert_eq!(parsed("bsi, oi -> bso"), Some((2, 1, 1, true)));
        assert_eq!(parsed("bsh,hnd->bsnd"), Some((2, 1, 2, false)));
        assert_eq!(parsed("bsnd,ndh->bsh"), Some((2, 2, 1, false)));
        assert_eq!(parsed("bsnd,hnd->bsh"), Some((2, 2, 1, true)));
        // A batched product, a reduction without projection, a permuted output, a repeated
        // letter, an implicit output, a contraction out of order.
        assert_eq!(parsed("bhqd,bhkd->bhqk"), None);
        assert_eq!(parsed("bsi,i->bs"), None);
        assert_eq!(parsed("bsi,io->sbo"), None);
        assert_eq!(parsed("bii,io->bo"), None);
        assert_eq!(parsed("bsi,io"), None);
        assert_eq!(parsed("bsnd,dnh->bsh"), None);
        assert_eq!(parsed("bsi,io->bsio"), None);
    }
}
