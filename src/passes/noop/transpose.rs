//! Transposes that move nothing, and pairs of transposes that one transpose does.
//!
//! - `transpose-noop`: `Transpose(x, perm=[0, 1, …, n-1])` is `x`.
//! - `transpose-cancel`: `Transpose(Transpose(x, p), q)` where the composition (axis i of the
//!   result is axis `p[q[i]]` of `x`) is the identity: `x`.
//! - `transpose-compose`: otherwise `Transpose(x, perm=p∘q)`, when nothing else reads the first
//!   transpose (else it would stay for its other readers, and nothing would be saved).
//!
//! A Transpose without `perm` reverses the axes, which needs the rank: it is left alone.

use super::super::matching::{bypass, input_producer, only_feeds, op_node, rewire};
use crate::ir::{attr, Graph, Node, NodeId, Patch};

pub fn noop(g: &Graph, id: NodeId) -> Option<Patch> {
    let node = op_node(g, id, "Transpose")?;
    if !is_identity(&perm(node)?) {
        return None;
    }
    bypass(g, "transpose-noop", id, node.output(0)?, node.input(0)?)
}

pub fn chain(g: &Graph, id: NodeId) -> Option<Patch> {
    let second = op_node(g, id, "Transpose")?;
    let (first_id, first) = input_producer(g, second, 0, "Transpose")?;
    let (p, q) = (perm(first)?, perm(second)?);
    if p.len() != q.len() {
        return None;
    }
    let composed: Vec<i64> = q
        .iter()
        .map(|&axis| p.get(usize::try_from(axis).ok()?).copied())
        .collect::<Option<_>>()?;
    let (x, out) = (first.input(0)?, second.output(0)?);
    let first_is_dead = only_feeds(g, first_id, id);
    let mut patch = if is_identity(&composed) {
        bypass(g, "transpose-cancel", id, out, x)?
    } else if first_is_dead {
        let mut proto = second.proto.clone();
        proto.attribute.retain(|a| a.name() != "perm");
        proto.attribute.push(attr::ints("perm", &composed));
        rewire("transpose-compose", id, proto, &[Some(x)], out)
    } else {
        return None;
    };
    if first_is_dead {
        patch.remove_node(first_id);
    }
    Some(patch)
}

/// The `perm` attribute, when it is a permutation of `0..n`.
fn perm(node: &Node) -> Option<Vec<i64>> {
    let p = attr::get_ints(&node.proto, "perm")?.to_vec();
    let mut sorted = p.clone();
    sorted.sort_unstable();
    is_identity(&sorted).then_some(p)
}

fn is_identity(perm: &[i64]) -> bool {
    perm.iter().enumerate().all(|(i, &p)| p == i as i64)
}

#[cfg(test)]
mod tests {
    use super::super::kinds as rewrites;
    use crate::ir::testing::{builder, ops, written};
    use crate::ir::{attr, DataType, Model};

    /// x → Transpose(p) → a → Transpose(q) → y → Neg → z, plus `extra` readers of `a`.
    fn two_transposes(p: &[i64], q: &[i64], a_is_output: bool) -> Model {
        let mut b = builder()
            .input("x", DataType::Float, &["2", "3", "4"])
            .output("z", DataType::Float, &["?", "?", "?"]);
        if a_is_output {
            b = b.output("a", DataType::Float, &["?", "?", "?"]);
        }
        b.node("Transpose", &["x"], &["a"], vec![attr::ints("perm", p)])
            .node("Transpose", &["a"], &["y"], vec![attr::ints("perm", q)])
            .node("Neg", &["y"], &["z"], vec![])
            .build()
    }

    #[test]
    fn an_identity_transpose_goes() {
        let mut m = two_transposes(&[0, 1, 2], &[0, 2, 1], false);
        assert_eq!(rewrites(&mut m), ["transpose-noop"]);
        assert_eq!(ops(&m), ["Transpose", "Neg"]);
        assert_eq!(written(&m).node[0].input, ["x"]);
    }

    #[test]
    fn inverse_transposes_cancel() {
        // [1, 2, 0] then [2, 0, 1]: axis i of y is axis p[q[i]] = i of x.
        let mut m = two_transposes(&[1, 2, 0], &[2, 0, 1], false);
        assert_eq!(rewrites(&mut m), ["transpose-cancel"]);
        assert_eq!(ops(&m), ["Neg"]);
        assert_eq!(written(&m).node[0].input, ["x"]);
        // The first one stays when someone else reads it.
        let mut m = two_transposes(&[1, 2, 0], &[2, 0, 1], true);
        assert_eq!(rewrites(&mut m), ["transpose-cancel"]);
        assert_eq!(ops(&m), ["Transpose", "Neg"]);
    }

    #[test]
    fn other_pairs_compose_into_one_and_do_not_vanish() {
        let mut m = two_transposes(&[0, 2, 1], &[1, 0, 2], false);
        assert_eq!(rewrites(&mut m), ["transpose-compose"]);
        assert_eq!(ops(&m), ["Transpose", "Neg"]);
        let g = written(&m);
        assert_eq!(g.node[0].input, ["x"]);
        assert_eq!(g.node[0].output, ["y"]);
        assert_eq!(g.node[0].attribute[0].ints, [2, 0, 1]);
        // With another reader of the first, composing would save nothing.
        let mut m = two_transposes(&[0, 2, 1], &[1, 0, 2], true);
        assert!(rewrites(&mut m).is_empty());
    }

    #[test]
    fn a_transpose_without_a_valid_perm_is_left_alone() {
        let mut m = two_transposes(&[0, 0, 1], &[0, 1, 2], false);
        assert_eq!(rewrites(&mut m), ["transpose-noop"], "only the second");
        assert_eq!(ops(&m), ["Transpose", "Neg"]);
    }
}
