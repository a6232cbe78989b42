//! Which nodes get quantized.
//!
//! By default: every MatMul, Gemm and Conv except the MatMuls of the attention score path,
//! and every Gather of an embedding table (weight-only). The score path — `Q·Kᵀ` and
//! `softmax(…)·V` — stays float because its operands are computed per input (no weight to
//! quantize once) and because softmax turns small errors in the scores into large errors in
//! the probabilities. LayerNorm, Softmax, GELU and every other node stay float unless
//! `include`d; `exclude` wins over everything. Selectors match a node by exact name, by op
//! type, or by a regex over the name.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::ir::{attr, DataType, Graph, Node, NodeId, ValueId, ValueType};
use crate::passes::fuse::MS_DOMAIN;

/// Picks nodes by name, op type or a regex over the name.
#[derive(Clone, Debug)]
pub enum Selector {
    Name(String),
    OpType(String),
    NameRegex(regex::Regex),
}

impl Selector {
    /// Reads `op:<OpType>`, `re:<regex>` or a plain node name (the form of `--include` and
    /// `--exclude`).
    pub fn parse(text: &str) -> Result<Selector> {
        if let Some(op) = text.strip_prefix("op:") {
            return Ok(Selector::OpType(op.to_string()));
        }
        if let Some(pattern) = text.strip_prefix("re:") {
            return regex::Regex::new(pattern)
                .map(Selector::NameRegex)
                .map_err(|e| Error::Quantization(format!("selector `{text}`: {e}")));
        }
        Ok(Selector::Name(text.to_string()))
    }

    pub fn matches(&self, node: &Node) -> bool {
        match self {
            Selector::Name(name) => node.name() == name,
            Selector::OpType(op) => node.op_type() == op,
            Selector::NameRegex(re) => re.is_match(node.name()),
        }
    }
}

/// Nodes to add to the default set (`include`) and to take out of it (`exclude`, which wins;
/// an excluded skip Add also keeps its residual input float under `--target trt`).
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub include: Vec<Selector>,
    pub exclude: Vec<Selector>,
}

impl Selection {
    pub fn excludes(&self, node: &Node) -> bool {
        self.exclude.iter().any(|s| s.matches(node))
    }
}

/// How a selected node is quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// MatMul, Gemm, Conv: the weight int8 per output channel, the other float inputs (A, B
    /// or X, never a bias) through a Q→DQ pair.
    Weighted,
    /// Gather from an embedding table: the table int8 per row (weight-only).
    Embedding,
    /// ONNX Runtime's fused `Attention`: its packed Q/K/V weight (input 1, `[hidden,
    /// 3·hidden]`) int8 per output column behind a DequantizeLinear (weight-only: ONNX
    /// Runtime has no QDQ form of this operator, and its input is the LayerNorm output the
    /// other projections already see quantized).
    PackedAttention,
    /// Any other node asked for with `include`: its float data inputs that are not
    /// constants (see `data_inputs`) through a Q→DQ pair.
    Activations,
}

/// How many leading inputs of `node` are data that quantizing may round; the inputs after
/// them are masks and additive attention biases, which hold -inf where a position is masked:
/// a range over finite values cannot represent it, and rounding it to the range's edge
/// would unmask the position. Attention (standard: Q, K, V; `com.microsoft`: the input, then
/// its constant weight and bias) and MultiHeadAttention (Q, K, V) have such inputs; every
/// other operator's inputs are all data.
pub fn data_inputs(node: &Node) -> usize {
    match node.op_type() {
        "Attention" | "MultiHeadAttention" => 3,
        _ => usize::MAX,
    }
}

/// Ops whose activations and weights are quantized by default.
const WEIGHTED_OPS: &[&str] = &["MatMul", "Gemm", "Conv"];
/// How far the score-path walk looks past the Softmax: the SDPA export puts
/// `Where(IsNaN(P), 0, P)` after it, eager exports scale/mask/cast before it.
const SCORE_PATH_DEPTH: usize = 4;
/// Ops a score may pass through on its way into the Softmax (scaling, masks, bias).
const INTO_SOFTMAX: &[&str] = &["Mul", "Div", "Add", "Sub", "Where", "Cast"];
/// Ops probabilities may pass through on their way out of the Softmax into `P·V`.
const OUT_OF_SOFTMAX: &[&str] = &["Where", "Cast", "Identity", "Dropout", "Mul", "Div"];

/// The selected nodes and their roles, by node.
pub fn select(
    g: &Graph,
    types: &HashMap<ValueId, ValueType>,
    selection: &Selection,
) -> HashMap<NodeId, Role> {
    g.nodes()
        .filter(|(_, node)| !selection.excludes(node))
        .filter_map(|(id, node)| {
            let included = selection.include.iter().any(|s| s.matches(node));
            let role = natural_role(g, types, node);
            let by_default = role != Role::Activations
                && !(node.is("MatMul")
                    && (on_score_path(g, id) || reads_positions(g, types, node)));
            (by_default || included).then_some((id, role))
        })
        .collect()
}

/// The role a node gets when it is selected.
fn natural_role(g: &Graph, types: &HashMap<ValueId, ValueType>, node: &Node) -> Role {
    if node.domain().is_empty() && WEIGHTED_OPS.contains(&node.op_type()) {
        Role::Weighted
    } else if node.domain() == MS_DOMAIN && node.op_type() == "Attention" {
        Role::PackedAttention
    } else if is_embedding_gather(g, types, node) {
        Role::Embedding
    } else {
        Role::Activations
    }
}

/// A Gather along axis 0 of a 2-D float initializer by integer indices: an embedding lookup.
pub fn is_embedding_gather(g: &Graph, types: &HashMap<ValueId, ValueType>, node: &Node) -> bool {
    let table_is_2d_float = node.input(0).is_some_and(|t| {
        !g.is_graph_input(t)
            && g.initializer(t)
                .is_some_and(|w| w.dtype() == DataType::Float && w.dims().len() == 2)
    });
    let integer_indices = node
        .input(1)
        .and_then(|i| types.get(&i))
        .is_some_and(|t| t.elem == DataType::Int64 as i32 || t.elem == DataType::Int32 as i32);
    node.is("Gather")
        && attr::get_int(&node.proto, "axis").unwrap_or(0) == 0
        && table_is_2d_float
        && integer_indices
}

/// Ops that move or repeat values without computing new ones.
const VALUE_PRESERVING: &[&str] = &["Reshape", "Unsqueeze", "Squeeze", "Expand", "Transpose"];
/// How many of them the walk from a MatMul back to a Cast of positions crosses, at most.
const POSITIONS_PATH_DEPTH: usize = 4;

/// True for a node reading integers cast to float (through ops that only move them): a
/// rotary embedding's angles `inv_freq @ positions`. Positions at generation run past any
/// calibrated range, and a quantized one would clip there (every later token rotated as the
/// last calibrated position: a model broken past the calibration's length), so such a
/// MatMul stays float unless asked.
fn reads_positions(g: &Graph, types: &HashMap<ValueId, ValueType>, node: &Node) -> bool {
    let integer = |v: ValueId| {
        let elem = types
            .get(&v)
            .map(|t| t.elem)
            .or_else(|| g.value_type(v).map(|t| t.elem));
        elem.and_then(|e| DataType::try_from(e).ok())
            .is_some_and(|dt| {
                use DataType::*;
                matches!(
                    dt,
                    Int64 | Int32 | Int16 | Int8 | Uint64 | Uint32 | Uint16 | Uint8
                )
            })
    };
    let mut frontier: Vec<ValueId> = node.inputs.iter().flatten().copied().collect();
    for _ in 0..=POSITIONS_PATH_DEPTH {
        let mut next = Vec::new();
        for v in frontier {
            let Some(producer) = g.producer(v).map(|p| g.node(p)) else {
                continue;
            };
            let Some(input) = producer.input(0) else {
                continue;
            };
            if producer.is("Cast") && integer(input) {
                return true;
            }
            if VALUE_PRESERVING.contains(&producer.op_type()) {
                next.push(input);
            }
        }
        frontier = next;
    }
    false
}

/// True for a MatMul of the attention score path: one that reads a Softmax's output, or
/// whose output reaches a Softmax, each through the few ops attention puts in between.
pub fn on_score_path(g: &Graph, matmul: NodeId) -> bool {
    let node = g.node(matmul);
    let reads_probabilities = node
        .inputs
        .iter()
        .flatten()
        .any(|&v| from_softmax(g, v, SCORE_PATH_DEPTH));
    let makes_scores = node
        .output(0)
        .is_some_and(|v| into_softmax(g, v, SCORE_PATH_DEPTH));
    reads_probabilities || makes_scores
}

fn from_softmax(g: &Graph, v: ValueId, depth: usize) -> bool {
    let Some(producer) = g.producer(v).map(|p| g.node(p)) else {
        return false;
    };
    producer.op_type() == "Softmax"
        || (depth > 0
            && OUT_OF_SOFTMAX.contains(&producer.op_type())
            && producer
                .inputs
                .iter()
                .flatten()
                .any(|&i| from_softmax(g, i, depth - 1)))
}

fn into_softmax(g: &Graph, v: ValueId, depth: usize) -> bool {
    g.uses(v).iter().any(|&(reader, _)| {
        let node = g.node(reader);
        node.op_type() == "Softmax"
            || (depth > 0
                && INTO_SOFTMAX.contains(&node.op_type())
                && node
                    .output(0)
                    .is_some_and(|o| into_softmax(g, o, depth - 1)))
    })
}
