//! Rotary position embeddings (RoPE): `com.microsoft::RotaryEmbedding` (ONNX Runtime) and
//! ONNX `RotaryEmbedding` (opset 23), in the forms onnxopt emits.
//!
//! Both compute, for `x` of `[batch, heads, seq, head]` and rotary half `h = head/2`,
//! `y[..., :h] = x₁·cos − x₂·sin`, `y[..., h:] = x₂·cos + x₁·sin` with `x₁ = x[..., :h]`,
//! `x₂ = x[..., h:]` and `cos = cos_cache[position_ids[b, s]]` (HF's `rotate_half`); with
//! `interleaved = 1` the pairs are adjacent channels instead, `x₁ = x[..., ::2]`,
//! `x₂ = x[..., 1::2]` (GPT-J's `rotate_every_two`), and with `num_heads` they also take `x` as
//! `[batch, seq, heads·head]`. They differ only in the order of their inputs
//! (`rotary_inputs`).
//!
//! Contract, measured in ONNX Runtime 1.32 (both operators, CPU):
//! - `position_ids` is int64 `[batch, seq]` with `batch` the input's: a `[1, seq]` broadcast
//!   is refused ("Input 'position_ids' dimension 0 should be of size batch_size, got 1");
//! - `cos_cache`/`sin_cache` are `[rows, h]` and every position must lie in `[0, rows)`; one
//!   outside is an error ("position_ids value 8 at index 3 is out of range [0, 8)"), never a
//!   wrong value. A fusion therefore builds the caches from the positions it is given
//!   (one row per token, the ids numbering the tokens, `fuse::rotary`), which holds for any
//!   position a user passes.
//!
//! tract 0.23.9 implements both (it reads the domain and the contrib input order) but gathers
//! the cache rows with `Gather`, which takes i64 indices only, while tract types every value
//! cast to int64 as a symbolic dimension (`TDim`): position ids computed in the graph fail
//! ("Gather: Condition failed: `inputs[1].datum_type == i64::datum_type()` (TDim vs I64)").
//! `lower_for_tract` therefore hands tract the standard operator with the rows already
//! picked, by a one-hot product (exact: one term of 1·row, the others 0·row).

use crate::ir::{attr, Graph, Node, NodeId, PValue, Patch, Tensor};
use crate::proto::AttributeProto;

/// The opset that defines the standard RotaryEmbedding.
pub const ROTARY_OPSET: i64 = 23;

/// The inputs of a RotaryEmbedding node: `com.microsoft` takes
/// `(input, position_ids, cos_cache, sin_cache)`, ONNX `(X, cos_cache, sin_cache, position_ids)`.
pub fn rotary_inputs(
    contrib: bool,
    x: PValue,
    position_ids: PValue,
    cos_cache: PValue,
    sin_cache: PValue,
) -> [PValue; 4] {
    if contrib {
        [x, position_ids, cos_cache, sin_cache]
    } else {
        [x, cos_cache, sin_cache, position_ids]
    }
}

/// The attributes onnxopt writes: none for rotate-half pairs over `[batch, heads, seq, head]`;
/// `interleaved` for adjacent pairs, with `num_heads` where the input is
/// `[batch, seq, heads·head]` (the contrib operator then takes `num_heads` without
/// `rotary_embedding_dim`, measured in ONNX Runtime 1.32).
const EMITTED_ATTRIBUTES: [&str; 2] = ["interleaved", "num_heads"];

/// A RotaryEmbedding with position ids and the attributes onnxopt writes (in either
/// domain), for tract: `RotaryEmbedding(x, onehot(ids)·cos_cache, onehot(ids)·sin_cache)`,
/// the standard operator given `[batch, seq, h]` tables and the same attributes.
pub fn lower_for_tract(g: &Graph, id: NodeId, node: &Node) -> Option<Patch> {
    let emitted = |a: &AttributeProto| EMITTED_ATTRIBUTES.contains(&a.name());
    if node.inputs.len() != 4 || !node.proto.attribute.iter().all(emitted) {
        return None;
    }
    let slots = if node.domain().is_empty() {
        [0, 3, 1, 2]
    } else {
        [0, 1, 2, 3]
    };
    let [x, ids, cos_cache, sin_cache] = slots.map(|slot| node.input(slot));
    let (x, ids, cos_cache, sin_cache) = (x?, ids?, cos_cache?, sin_cache?);
    let float = g.value_type(cos_cache)?.elem;
    let mut patch = Patch::new("lower-rotary");
    let last = patch.new_initializer(
        "rotary_lower_last_axis",
        Tensor::from_i64("rotary_lower_last_axis", &[1], &[-1]).ok()?,
    );
    let first = patch.new_initializer(
        "rotary_lower_first_axis",
        Tensor::from_i64("rotary_lower_first_axis", &[1], &[0]).ok()?,
    );
    let zero = patch.new_initializer(
        "rotary_lower_zero",
        Tensor::from_i64("rotary_lower_zero", &[], &[0]).ok()?,
    );
    let one = patch.new_initializer(
        "rotary_lower_one",
        Tensor::from_i64("rotary_lower_one", &[], &[1]).ok()?,
    );
    let ids = patch.op("Unsqueeze", "", &[ids.into(), last], vec![]);
    let rows = patch.op(
        "Shape",
        "",
        &[cos_cache.into()],
        vec![attr::int("start", 0), attr::int("end", 1)],
    );
    let rows = patch.op("Squeeze", "", &[rows, first], vec![]);
    let row_ids = patch.op("Range", "", &[zero, rows, one], vec![]);
    let hot = patch.op("Equal", "", &[ids, row_ids], vec![]);
    let hot = patch.op("Cast", "", &[hot], vec![attr::int("to", float.into())]);
    let cos = patch.op("MatMul", "", &[hot, cos_cache.into()], vec![]);
    let sin = patch.op("MatMul", "", &[hot, sin_cache.into()], vec![]);
    patch.add_node(
        "RotaryEmbedding",
        "",
        &[Some(x.into()), Some(cos), Some(sin)],
        &[PValue::Old(node.output(0)?)],
        node.proto.attribute.clone(),
    );
    patch.remove_node(id);
    Some(patch)
}
