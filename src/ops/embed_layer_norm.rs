//! `com.microsoft::EmbedLayerNormalization` (ONNX Runtime), in the one form onnxopt emits.
//!
//! Inputs `(input_ids, segment_ids?, word_embedding, position_embedding,
//! segment_embedding?, gamma, beta, mask?, position_ids?)`, outputs `(output, mask_index,
//! embedding_sum?)`, attribute `epsilon`. For each token `t` it computes
//! `e = (word[input_ids[t]] + position[position_ids[t]]) + segment[segment_ids[t]]` in that
//! order (float32, bit for bit: `embedding_sum`), then LayerNorm of `e` over the hidden axis.
//!
//! Contract, measured in ONNX Runtime 1.32 (CPU; float32 is its only CPU kernel type, so
//! the operator is not float16 here):
//! - every id is int32 (`T1`); `input_ids` is `[batch, seq]` and gives the output's
//!   `[batch, seq, hidden]`; `segment_ids` must have its shape exactly (a `[1, seq]` is
//!   refused: "Input 0 and 1 shall have same shape"); `position_ids` may be `[batch, seq]`
//!   or `[1, seq]` (broadcast over the batch), with the input's seq ("input_ids and
//!   position_ids shall have same sequence_length"); a 1-D `[seq]` aborts the process
//!   ("terminate called without an active exception"), so it is never emitted;
//! - an id outside `[0, rows)` of its table, negative ones included, is an error ("input
//!   index out of range"), never a wrapped row as `Gather` reads a negative index;
//! - `beta` is required (a node without it is an invalid graph), and so is output 1,
//!   `mask_index` (`[batch]` int32, zeros without a mask): a node with output 0 alone fails
//!   type inference ("output index 1 is out of range"); it may be left unnamed when output 2
//!   is written.
//!
//! tract has no such operator: `lower_for_tract` hands it the Gathers, Adds and
//! LayerNormalization it stands for.

use crate::ir::{attr, DataType, Graph, Node, NodeId, PValue, Patch, Tensor, ValueId};

/// Input slots.
pub const INPUT_IDS: usize = 0;
pub const SEGMENT_IDS: usize = 1;
pub const WORD_EMBEDDING: usize = 2;
pub const POSITION_EMBEDDING: usize = 3;
pub const SEGMENT_EMBEDDING: usize = 4;
pub const GAMMA: usize = 5;
pub const BETA: usize = 6;
pub const MASK: usize = 7;
pub const POSITION_IDS: usize = 8;

/// The table that the ids in input `slot` of a `com.microsoft` node `op_type` index, if they
/// are ids: EmbedLayerNormalization's (`table_of`), or QEmbedLayerNormalization's, ONNX
/// Runtime's quantized form (its `quantize_dynamic` writes it), whose first inputs keep that
/// layout with the tables quantized, and whose inputs from 8 on are the tables' scales and
/// zero points (no position ids).
pub fn table_of_op(op_type: &str, slot: usize) -> Option<usize> {
    match op_type {
        "EmbedLayerNormalization" => table_of(slot),
        "QEmbedLayerNormalization" if slot < POSITION_IDS => table_of(slot),
        _ => None,
    }
}

/// The table that the ids in input `slot` index, if they are ids.
pub fn table_of(slot: usize) -> Option<usize> {
    match slot {
        INPUT_IDS => Some(WORD_EMBEDDING),
        SEGMENT_IDS => Some(SEGMENT_EMBEDDING),
        POSITION_IDS => Some(POSITION_EMBEDDING),
        _ => None,
    }
}

/// The ids as tract can gather with them: the int64 value our fusion cast to int32, or
/// a new Cast to int64 (tract's Gather takes int64 indices only).
fn int64_ids(g: &Graph, patch: &mut Patch, ids: ValueId) -> PValue {
    let int64 = DataType::Int64 as i32;
    let cast_from_int64 = g.producer(ids).map(|p| g.node(p)).and_then(|p| {
        let source = p.input(0)?;
        (p.is("Cast") && g.value_type(source).is_some_and(|t| t.elem == int64)).then_some(source)
    });
    match cast_from_int64 {
        Some(source) => source.into(),
        None => patch.op(
            "Cast",
            "",
            &[ids.into()],
            vec![attr::int("to", int64.into())],
        ),
    }
}

/// An EmbedLayerNormalization with position ids and no mask (the form onnxopt emits), for
/// tract: `LayerNormalization((Gather(word, ids) + Gather(position, position_ids)) +
/// Gather(segment, segment_ids))`, the sum also written to `embedding_sum` and zeros to
/// `mask_index`, as the kernel computes them.
pub fn lower_for_tract(g: &Graph, id: NodeId, node: &Node) -> Option<Patch> {
    if node.input(MASK).is_some()
        || node.input(SEGMENT_IDS).is_some() != node.input(SEGMENT_EMBEDDING).is_some()
    {
        return None;
    }
    let epsilon = attr::get_float(&node.proto, "epsilon")?;
    let mut patch = Patch::new("lower-embed-layer-norm");
    let gather = |ids: usize, patch: &mut Patch| -> Option<PValue> {
        let table = node.input(table_of(ids)?)?;
        let ids = int64_ids(g, patch, node.input(ids)?);
        Some(patch.op("Gather", "", &[table.into(), ids], vec![]))
    };
    let word = gather(INPUT_IDS, &mut patch)?;
    let position = gather(POSITION_IDS, &mut patch)?;
    let mut sum = patch.op("Add", "", &[word, position], vec![]);
    if node.input(SEGMENT_IDS).is_some() {
        let segment = gather(SEGMENT_IDS, &mut patch)?;
        sum = patch.op("Add", "", &[sum, segment], vec![]);
    }
    if let Some(embedding_sum) = node.output(2) {
        patch.add_node(
            "Identity",
            "",
            &[Some(sum)],
            &[PValue::Old(embedding_sum)],
            vec![],
        );
    }
    if let Some(mask_index) = node.output(1) {
        let batch = patch.op(
            "Shape",
            "",
            &[node.input(INPUT_IDS)?.into()],
            vec![attr::int("start", 0), attr::int("end", 1)],
        );
        let zero = Tensor::from_i64("embed_layer_norm_zero", &[1], &[0]).ok()?;
        let zeros = patch.op(
            "ConstantOfShape",
            "",
            &[batch],
            vec![attr::tensor("value", zero)],
        );
        patch.add_node(
            "Cast",
            "",
            &[Some(zeros)],
            &[PValue::Old(mask_index)],
            vec![attr::int("to", DataType::Int32 as i64)],
        );
    }
    patch.add_node(
        "LayerNormalization",
        "",
        &[
            Some(sum),
            Some(node.input(GAMMA)?.into()),
            Some(node.input(BETA)?.into()),
        ],
        &[PValue::Old(node.output(0)?)],
        vec![attr::int("axis", -1), attr::float("epsilon", epsilon)],
    );
    patch.remove_node(id);
    Some(patch)
}
