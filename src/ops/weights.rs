//! Which axis of an operator's weight is which: the facts pruning, quantization and the
//! fusions need to read a weight right (the axis a product sums over, the one that meets the
//! input's features), for every reader of a weight onnxopt handles.

use crate::ir::{attr, Node};

/// For a Gemm that is a plain product `A·B + C` or `A·Bᵀ + C` (alpha and beta 1, A not
/// transposed): whether B is transposed. `None` for any other node.
pub fn plain_gemm_trans_b(node: &Node) -> Option<bool> {
    let one = |name: &str| attr::get_float(&node.proto, name).unwrap_or(1.0) == 1.0;
    let int = |name: &str| attr::get_int(&node.proto, name).unwrap_or(0);
    (node.is("Gemm") && one("alpha") && one("beta") && int("transA") == 0)
        .then(|| int("transB") == 1)
}

/// The axis a rank-`rank` weight (input 1) of `node` is reduced over: MatMul B `[…, K, N]`:
/// K; Gemm B: K is axis 1 with transB, else 0; Conv W `[M, C, k…]`: the input channels C;
/// packed `com.microsoft` Attention `[D, 3·N·H]`: D. `None` for any other reader.
pub fn reduction_axis(node: &Node, rank: usize) -> Option<usize> {
    match (node.domain(), node.op_type()) {
        ("", "MatMul") if rank >= 2 => Some(rank - 2),
        ("", "Gemm") if rank == 2 => {
            Some(usize::from(attr::get_int(&node.proto, "transB") == Some(1)))
        }
        ("", "Conv") if rank >= 3 => Some(1),
        (super::MS_DOMAIN, "Attention") if rank == 2 => Some(0),
        _ => None,
    }
}

/// The axis of `node`'s rank-`rank` weight (input 1) that meets the last axis of its input
/// 0, when `node` computes `x·W` with x's features last: MatMul, packed Attention, Gemm
/// without transA (any alpha and beta). `None` for a Conv (channels first) or anything else.
pub fn features_last_axis(node: &Node, rank: usize) -> Option<usize> {
    let trans_a = node.is("Gemm") && attr::get_int(&node.proto, "transA").unwrap_or(0) != 0;
    if trans_a || node.is("Conv") {
        return None;
    }
    reduction_axis(node, rank)
}

/// The row-major `[cols, rows]` transpose of the row-major `[rows, cols]` values `m`: a
/// weight `[K, N]` as the table `[N, K]` it is tied to, and back.
pub fn transposed(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| m[r * cols + c]))
        .collect()
}

/// A Transpose that swaps the two axes of a matrix (`perm` `[1, 0]`).
pub fn swaps_two_axes(node: &Node) -> bool {
    node.is("Transpose") && attr::get_ints(&node.proto, "perm").is_some_and(|p| p == [1, 0])
}
