//! The weights pruning may touch: float initializers read only as the weight of a MatMul,
//! Gemm, Conv or packed `com.microsoft` Attention, with the axis those operators reduce over.

use crate::ir::{attr, DataType, Graph, Node, Use, ValueId};

/// A weight initializer and the axis its readers sum over (the one N:M groups run along).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrunableWeight {
    pub value: ValueId,
    pub reduction_axis: usize,
}

/// An initializer that looked like a weight but is left alone, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub weight: String,
    pub reason: String,
}

/// The axis a rank-`rank` weight (input 1) of `node` is reduced over: MatMul B `[…, K, N]`:
/// K; Gemm B: K is axis 1 with transB, else 0; Conv W `[M, C, k…]`: the input channels C;
/// packed Attention `[D, 3·N·H]`: D. `None` for any other reader.
pub fn reduction_axis(node: &Node, rank: usize) -> Option<usize> {
    match (node.domain(), node.op_type()) {
        ("", "MatMul") if rank >= 2 => Some(rank - 2),
        ("", "Gemm") if rank == 2 => {
            Some(usize::from(attr::get_int(&node.proto, "transB") == Some(1)))
        }
        ("", "Conv") if rank >= 3 => Some(1),
        ("com.microsoft", "Attention") if rank == 2 => Some(0),
        _ => None,
    }
}

/// Every prunable weight of `g`, in initializer order, and the weight-like initializers
/// (read in a weight slot) that are not prunable, with the reason.
pub fn prunable_weights(g: &Graph) -> (Vec<PrunableWeight>, Vec<Skipped>) {
    let mut weights = Vec::new();
    let mut skipped = Vec::new();
    for (v, t) in g.initializers() {
        let uses = g.uses(v);
        let weight_reads: Vec<Option<usize>> = uses
            .iter()
            .map(|&(n, u)| match u {
                Use::Input(1) => reduction_axis(g.node(n), t.dims().len()),
                _ => None,
            })
            .collect();
        if !weight_reads.iter().any(Option::is_some) {
            continue;
        }
        let name = g.value_name(v).to_string();
        let skip = |reason: String| Skipped {
            weight: name.clone(),
            reason,
        };
        if g.is_graph_input(v) || g.is_graph_output(v) {
            skipped.push(skip("it is a graph input or output".into()));
        } else if t.dtype() != DataType::Float {
            skipped.push(skip(format!(
                "its element type is {:?}, not float32",
                t.dtype()
            )));
        } else if let Some(i) = weight_reads.iter().position(Option::is_none) {
            let other = g.node(uses[i].0);
            skipped.push(skip(format!(
                "it is also read by {} `{}` (an embedding or an activation)",
                other.op_type(),
                other.name()
            )));
        } else if weight_reads.windows(2).any(|w| w[0] != w[1]) {
            skipped.push(skip("its readers reduce it over different axes".into()));
        } else if let Some(axis) = weight_reads[0] {
            weights.push(PrunableWeight {
                value: v,
                reduction_axis: axis,
            });
        }
    }
    (weights, skipped)
}
