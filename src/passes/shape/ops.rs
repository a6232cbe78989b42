//! Type and shape rules, one per operator: ONNX semantics for the default domain (per
//! opset where an operator changed), ONNX Runtime's for `com.microsoft` contrib operators.
//! Each rule gives the types of the node's outputs from the types and symbolic values of
//! its inputs; a dim it cannot decide is `Unknown`, a rank it cannot decide is `None`.

use super::{normalize_axis, Ctx, BOOL, FLOAT, INT32, INT64, UINT8};
use crate::ir::shape::broadcast_shapes;
use crate::ir::{Dim, ValueType};

/// Ranks above this are not believed: a malformed file must not make a rule allocate
/// billions of dims.
const MAX_RANK: usize = 64;

/// The types of the node's outputs by slot; `None` for an operator without a rule here.
pub(super) fn infer(cx: &Ctx) -> Option<Vec<ValueType>> {
    match cx.node.domain() {
        "" => standard(cx),
        "com.microsoft" => contrib(cx),
        _ => None,
    }
}

fn standard(cx: &Ctx) -> Option<Vec<ValueType>> {
    let t = match cx.op() {
        "Identity"
        | "Abs"
        | "Neg"
        | "Relu"
        | "Sigmoid"
        | "Erf"
        | "Exp"
        | "Log"
        | "Sqrt"
        | "Reciprocal"
        | "Tanh"
        | "Floor"
        | "Ceil"
        | "Round"
        | "Sign"
        | "Sin"
        | "Cos"
        | "Softplus"
        | "Softsign"
        | "LeakyRelu"
        | "Elu"
        | "Selu"
        | "Celu"
        | "HardSigmoid"
        | "HardSwish"
        | "Mish"
        | "Clip"
        | "Softmax"
        | "LogSoftmax"
        | "Hardmax"
        | "CumSum"
        | "Trilu"
        | "Gelu"
        | "Not"
        | "BitwiseNot"
        | "Tan"
        | "Asin"
        | "Acos"
        | "Atan"
        | "Sinh"
        | "Cosh"
        | "Asinh"
        | "Acosh"
        | "Atanh"
        | "Shrink"
        | "ThresholdedRelu"
        | "LRN"
        | "MeanVarianceNormalization"
        | "GroupNormalization" => same(cx, 0),
        // Updates written into a copy of the data (torch's slice_scatter, index_put).
        "ScatterND" | "ScatterElements" | "Scatter" => same(cx, 0),
        "IsNaN" | "IsInf" => with_elem(cx, 0, BOOL),
        "If" => return if_outputs(cx),
        // The mask is bool from opset 10, of the input's type before.
        "Dropout" => {
            let mask = if cx.opset < 10 { cx.elem(0) } else { BOOL };
            return Some(vec![same(cx, 0), with_elem(cx, 0, mask)]);
        }
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Mod" | "PRelu" | "BitShift" | "And" | "Or"
        | "Xor" | "BitwiseAnd" | "BitwiseOr" | "BitwiseXor" | "Max" | "Min" | "Sum" | "Mean" => {
            broadcast(cx, 0..cx.input_count(), cx.elem(0))
        }
        "Equal" | "Greater" | "GreaterOrEqual" | "Less" | "LessOrEqual" => {
            broadcast(cx, 0..2, BOOL)
        }
        "Where" => broadcast(cx, 0..3, known_elem(cx, &[1, 2])),
        "Cast" => with_elem(cx, 0, i32::try_from(cx.attr_int("to", 0)).unwrap_or(0)),
        "CastLike" => with_elem(cx, 0, cx.elem(1)),
        "Constant" => constant(cx)?,
        "Shape" => shape_of(cx),
        "Size" => ValueType::new(INT64, vec![]),
        "Reshape" => reshape(cx),
        "Flatten" => flatten(cx),
        "Transpose" => transpose(cx),
        "Squeeze" => squeeze(cx),
        "Unsqueeze" => unsqueeze(cx),
        "Concat" => concat(cx),
        "Gather" => gather(cx),
        "GatherElements" => with_elem(cx, 1, cx.elem(0)),
        "GatherND" => gather_nd(cx),
        "Slice" => slice(cx),
        "Split" => return Some(split(cx)),
        "Expand" => expand(cx),
        "ConstantOfShape" => constant_of_shape(cx),
        "Range" => range(cx),
        "Tile" => tile(cx),
        "Conv" => conv(cx),
        // In inference mode (one output) the input's type; training mode's running mean
        // and variance outputs are left to the file.
        "BatchNormalization" | "InstanceNormalization" | "LpNormalization" => same(cx, 0),
        "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => global_pool(cx),
        // Sizes from windows, scales, pads or block sizes, which these rules do not follow:
        // the element type and the rank are known, the file's record where it has one.
        "Pad" => pad(cx),
        "MaxPool" | "AveragePool" | "LpPool" | "Resize" | "Upsample" | "DepthToSpace"
        | "SpaceToDepth" | "GridSample" | "ConvTranspose" => recorded_or(
            cx,
            0,
            unknown_dims(cx.elem(0), cx.shape(0).map(<[Dim]>::len)),
        ),
        "Einsum" => recorded_or(cx, 0, unknown(cx.elem(0))),
        // (indices, depth, values): a new axis of `depth` values' type.
        "OneHot" => recorded_or(
            cx,
            0,
            unknown_dims(cx.elem(2), cx.shape(0).map(|s| s.len() + 1)),
        ),
        "TopK" => {
            let rank = cx.shape(0).map(<[Dim]>::len);
            return Some(vec![
                recorded_or(cx, 0, unknown_dims(cx.elem(0), rank)),
                recorded_or(cx, 1, unknown_dims(INT64, rank)),
            ]);
        }
        "MatMul" => matmul(cx),
        "MatMulInteger" => matmul_of(cx, 1, INT32),
        "ConvInteger" => ValueType {
            elem: INT32,
            shape: conv(cx).shape,
        },
        // (a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point)
        "QLinearMatMul" => matmul_of(cx, 3, cx.elem(7)),
        "DynamicQuantizeLinear" => {
            return Some(vec![
                with_elem(cx, 0, UINT8),
                ValueType::new(FLOAT, vec![]),
                ValueType::new(UINT8, vec![]),
            ])
        }
        // The zero point's type, uint8 without one (opset 19's output_dtype aside).
        "QuantizeLinear" => {
            let elem = match cx.attr_int("output_dtype", 0) {
                0 => [cx.elem(2), UINT8]
                    .into_iter()
                    .find(|&e| e != 0)
                    .unwrap_or(0),
                e => i32::try_from(e).unwrap_or(0),
            };
            with_elem(cx, 0, elem)
        }
        // The scale's type (float32 unless float16 scales).
        "DequantizeLinear" => with_elem(cx, 0, cx.elem(1)),
        "LSTM" | "GRU" | "RNN" => return Some(recurrent(cx)),
        "Gemm" => gemm(cx),
        "RotaryEmbedding" => same(cx, 0),
        "LayerNormalization" => return Some(normalization(cx, Stats::MeanAndInvStdDev)),
        "SimplifiedLayerNormalization" | "RMSNormalization" => {
            return Some(normalization(cx, Stats::InvStdDev))
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1"
        | "ReduceL2" | "ReduceLogSum" | "ReduceLogSumExp" | "ReduceSumSquare" => reduce(cx),
        "ArgMax" | "ArgMin" => arg_reduce(cx),
        "NonZero" => ValueType::new(
            INT64,
            vec![rank_dim(cx.shape(0).map(<[Dim]>::len)), Dim::Unknown],
        ),
        "Attention" => return Some(attention(cx)),
        _ => return None,
    };
    Some(vec![t])
}

fn contrib(cx: &Ctx) -> Option<Vec<ValueType>> {
    Some(match cx.op() {
        // FastGelu's and BiasGelu's bias is added along the last dim: the input's type stays.
        "Gelu" | "FastGelu" | "BiasGelu" | "QuickGelu" => vec![same(cx, 0)],
        // Rotates the input where it stands: its type stays.
        "RotaryEmbedding" => vec![same(cx, 0)],
        "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization" => skip_layer_norm(cx),
        "LayerNormalization" => normalization(cx, Stats::MeanAndInvStdDev),
        "SimplifiedLayerNormalization" => normalization(cx, Stats::InvStdDev),
        "Attention" => contrib_attention(cx),
        "EmbedLayerNormalization" => embed_layer_norm(cx),
        "DynamicQuantizeLSTM" => recurrent(cx),
        // (a, b, a_scale, …) and (a, b, b_scale, …): a float result of the scales' type.
        "MatMulIntegerToFloat" | "DynamicQuantizeMatMul" => vec![matmul_of(cx, 1, cx.elem(2))],
        "MultiHeadAttention" => multi_head_attention(cx),
        // A `[…, K]` times the `[K, N]` weight its 4-bit codes stand for (`ops::nbits`).
        "MatMulNBits" => vec![matmul_nbits(cx)],
        "GatherBlockQuantized" => vec![gather_block_quantized(cx)?],
        _ => return None,
    })
}

/// Rows of packed `[N, K·bits/8]` codes gathered along axis 0 and dequantized along axis 1:
/// the indices' shape then K, in the scales' type. Other axes are not written by onnxopt.
fn gather_block_quantized(cx: &Ctx) -> Option<ValueType> {
    if (
        cx.attr_int("gather_axis", 0),
        cx.attr_int("quantize_axis", 1),
    ) != (0, 1)
    {
        return None;
    }
    let per_byte = 8 / cx.attr_int("bits", 4).clamp(1, 8);
    let row = match cx.shape(0)? {
        [_, width] => width
            .value()
            .map_or(Dim::Unknown, |w| Dim::known(w * per_byte)),
        _ => return None,
    };
    let mut shape = cx.shape(1)?.to_vec();
    shape.push(row);
    Some(ValueType {
        elem: cx.elem(2),
        shape: Some(shape),
    })
}

// ---- building blocks ---------------------------------------------------------------------

/// An If's outputs: each the element type both branches declare for it, with the sizes both
/// declare where they agree; a symbolic dim is unknown (exporters name a branch's dims after
/// its own values, and two Ifs' branches may reuse a name for different sizes). DeBERTa's
/// exports return relative positions of rank 3 from one branch and 4 from the other.
fn if_outputs(cx: &Ctx) -> Option<Vec<ValueType>> {
    let branch = |name| -> Option<Vec<Option<ValueType>>> {
        let graph = crate::ir::attr::get(&cx.node.proto, name)?.g.as_ref()?;
        Some(
            graph
                .output
                .iter()
                .map(|o| ValueType::from_type_proto(o.r#type.as_ref()?))
                .collect(),
        )
    };
    let (then, other) = (branch("then_branch")?, branch("else_branch")?);
    if then.len() != other.len() {
        return None;
    }
    let outputs = then
        .into_iter()
        .zip(other)
        .map(|pair| match pair {
            (Some(a), Some(b)) if a.elem == b.elem => match (a.shape, b.shape) {
                (Some(x), Some(y)) if x.len() == y.len() => {
                    let agreed = |(p, q): (&Dim, &Dim)| match (p.value(), q.value()) {
                        (Some(m), Some(n)) if m == n => p.clone(),
                        _ => Dim::Unknown,
                    };
                    ValueType::new(a.elem, x.iter().zip(&y).map(agreed).collect())
                }
                _ => unknown(a.elem),
            },
            _ => unknown(0),
        })
        .collect();
    Some(outputs)
}

/// `inferred`, whose dims are unknown, with the shape the file records for output `slot`
/// where it records one of that rank. The element type stays the inferred one: a record
/// may be older than a conversion of the inputs (FP16 re-infers after converting).
fn recorded_or(cx: &Ctx, slot: usize, inferred: ValueType) -> ValueType {
    let Some(recorded) = cx.node.output(slot).and_then(|v| cx.graph.value_type(v)) else {
        return inferred;
    };
    let shape = match (recorded.shape, inferred.shape) {
        (Some(r), Some(i)) if r.len() == i.len() => Some(r),
        (Some(r), None) => Some(r),
        (_, i) => i,
    };
    let elem = match inferred.elem {
        0 => recorded.elem,
        e => e,
    };
    ValueType { elem, shape }
}

fn unknown(elem: i32) -> ValueType {
    ValueType { elem, shape: None }
}

/// A shape of `rank` unknown dims (rank unknown when it is not believable).
fn unknown_dims(elem: i32, rank: Option<usize>) -> ValueType {
    match rank.filter(|&r| r <= MAX_RANK) {
        Some(r) => ValueType::new(elem, vec![Dim::Unknown; r]),
        None => unknown(elem),
    }
}

fn rank_dim(rank: Option<usize>) -> Dim {
    rank.and_then(|r| i64::try_from(r).ok())
        .map_or(Dim::Unknown, Dim::known)
}

/// MatMulNBits: A's type with its last dim replaced by the attribute N.
fn matmul_nbits(cx: &Ctx) -> ValueType {
    let mut t = same(cx, 0);
    if let Some(last) = t.shape.as_mut().and_then(|s| s.last_mut()) {
        *last = Dim::known(cx.attr_int("N", 0));
    }
    t
}

/// The type of input `slot`, or nothing known.
fn same(cx: &Ctx, slot: usize) -> ValueType {
    cx.input_type(slot).cloned().unwrap_or(unknown(0))
}

/// The shape of input `slot` with element type `elem`.
fn with_elem(cx: &Ctx, slot: usize, elem: i32) -> ValueType {
    ValueType {
        elem,
        shape: cx.shape(slot).map(<[Dim]>::to_vec),
    }
}

/// The first known element type among `slots`.
fn known_elem(cx: &Ctx, slots: &[usize]) -> i32 {
    slots
        .iter()
        .map(|&s| cx.elem(s))
        .find(|&e| e != 0)
        .unwrap_or(0)
}

/// The broadcast of the present inputs in `slots`.
fn broadcast(cx: &Ctx, slots: std::ops::Range<usize>, elem: i32) -> ValueType {
    let mut shape: Option<Vec<Dim>> = Some(Vec::new());
    for slot in slots.filter(|&s| cx.has_input(s)) {
        shape = match (shape, cx.shape(slot)) {
            (Some(acc), Some(s)) => Some(broadcast_shapes(&acc, s)),
            _ => None,
        };
    }
    ValueType { elem, shape }
}

/// The symbolic value of input `slot` as a shape, or unknown dims as many as the input
/// has elements when only its length is known.
fn shape_operand(cx: &Ctx, slot: usize) -> Option<Vec<Dim>> {
    if let Some(v) = cx.value(slot) {
        return Some(v.to_vec());
    }
    match cx.shape(slot)? {
        [n] => {
            let n = usize::try_from(n.value()?).ok()?;
            (n <= MAX_RANK).then(|| vec![Dim::Unknown; n])
        }
        _ => None,
    }
}

/// Axes of Squeeze, Unsqueeze and the Reduce family.
enum Axes {
    Given(Vec<i64>),
    Absent,
    /// An input gives them, but its value is not known.
    Unknown,
}

/// The axes, from the `axes` attribute before opset `input_since` and from input `slot`
/// from then on.
fn axes(cx: &Ctx, slot: usize, input_since: i64) -> Axes {
    if cx.opset < input_since {
        return match cx.attr_ints("axes") {
            Some(a) => Axes::Given(a.to_vec()),
            None => Axes::Absent,
        };
    }
    if !cx.has_input(slot) {
        return Axes::Absent;
    }
    match cx.ints(slot) {
        Some(a) => Axes::Given(a),
        None => Axes::Unknown,
    }
}

/// `axes` as a mask over `rank` dims; `None` when one is out of range or repeated.
fn axis_mask(axes: &[i64], rank: usize) -> Option<Vec<bool>> {
    let mut mask = vec![false; rank];
    for &a in axes {
        let a = normalize_axis(a, rank)?;
        if std::mem::replace(&mut mask[a], true) {
            return None;
        }
    }
    Some(mask)
}

// ---- rules -------------------------------------------------------------------------------

fn constant(cx: &Ctx) -> Option<ValueType> {
    let t = cx.constant_output()?;
    Some(ValueType::new(
        t.proto().data_type(),
        t.dims().iter().map(|&d| Dim::known(d)).collect(),
    ))
}

/// The dims `Shape` returns: `start` and `end` (opset 15) count from the end when negative
/// and are clamped to the rank.
pub(super) fn shape_range(cx: &Ctx, rank: usize) -> (usize, usize) {
    let clamp = |i: i64| -> usize {
        let r = rank as i64;
        let i = if i < 0 { i.saturating_add(r) } else { i };
        i.clamp(0, r) as usize
    };
    let start = clamp(cx.attr_int("start", 0));
    let end = match crate::ir::attr::get_int(&cx.node.proto, "end") {
        Some(e) => clamp(e),
        None => rank,
    };
    (start, end.max(start))
}

fn shape_of(cx: &Ctx) -> ValueType {
    let len = match cx.shape(0) {
        Some(s) => {
            let (start, end) = shape_range(cx, s.len());
            rank_dim(Some(end - start))
        }
        None => Dim::Unknown,
    };
    ValueType::new(INT64, vec![len])
}

fn reshape(cx: &Ctx) -> ValueType {
    let elem = cx.elem(0);
    let Some(target) = shape_operand(cx, 1) else {
        return unknown(elem);
    };
    let allowzero = cx.opset >= 14 && cx.attr_int("allowzero", 0) != 0;
    let input = cx.shape(0);
    let mut inferred_at = None;
    let mut dims = Vec::with_capacity(target.len());
    for (i, d) in target.iter().enumerate() {
        let dim = match d.value() {
            Some(-1) if inferred_at.is_none() => {
                inferred_at = Some(i);
                Dim::Unknown
            }
            // 0 copies the input's dim, unless `allowzero` makes it a real 0.
            Some(0) if !allowzero => input
                .and_then(|s| s.get(i))
                .cloned()
                .unwrap_or(Dim::Unknown),
            Some(n) if n >= 0 => Dim::known(n),
            Some(_) => Dim::Unknown,
            // A symbolic element is a size (never the -1 or 0 markers) only if positive; or
            // when it is the input's dim at that position, which a 0 would copy anyway.
            None if d.is_positive() => d.clone(),
            None if !allowzero && input.and_then(|s| s.get(i)).is_some_and(|x| x.same(d)) => {
                d.clone()
            }
            None => Dim::Unknown,
        };
        dims.push(dim);
    }
    if let (Some(at), Some(input)) = (inferred_at, input) {
        let others = Dim::product(
            dims.iter()
                .enumerate()
                .filter(|&(i, _)| i != at)
                .map(|(_, d)| d),
        );
        dims[at] = Dim::product(input).div(&others).unwrap_or(Dim::Unknown);
    }
    ValueType::new(elem, dims)
}

fn flatten(cx: &Ctx) -> ValueType {
    let elem = cx.elem(0);
    let Some(s) = cx.shape(0) else {
        return unknown_dims(elem, Some(2));
    };
    let axis = cx.attr_int("axis", 1);
    let rank = s.len() as i64;
    let axis = if axis < 0 { axis + rank } else { axis };
    if !(0..=rank).contains(&axis) {
        return unknown_dims(elem, Some(2));
    }
    let (outer, inner) = s.split_at(axis as usize);
    ValueType::new(elem, vec![Dim::product(outer), Dim::product(inner)])
}

fn transpose(cx: &Ctx) -> ValueType {
    let elem = cx.elem(0);
    let Some(s) = cx.shape(0) else {
        return unknown(elem);
    };
    let perm: Vec<i64> = match cx.attr_ints("perm") {
        Some(p) => p.to_vec(),
        None => (0..s.len() as i64).rev().collect(),
    };
    let is_permutation = perm.len() == s.len()
        && axis_mask(&perm, s.len()).is_some()
        && perm.iter().all(|&p| p >= 0);
    if !is_permutation {
        return unknown_dims(elem, Some(s.len()));
    }
    ValueType::new(elem, perm.iter().map(|&p| s[p as usize].clone()).collect())
}

fn squeeze(cx: &Ctx) -> ValueType {
    let elem = cx.elem(0);
    let Some(s) = cx.shape(0) else {
        return unknown(elem);
    };
    let keep: Vec<bool> = match axes(cx, 1, 13) {
        Axes::Given(a) if !a.is_empty() => match axis_mask(&a, s.len()) {
            Some(mask) => mask.iter().map(|&m| !m).collect(),
            None => return unknown(elem),
        },
        // Without axes every dim of size 1 goes: the rank is known only if every dim is.
        Axes::Given(_) | Axes::Absent => {
            if s.iter().any(|d| d.value().is_none()) {
                return unknown(elem);
            }
            s.iter().map(|d| d.value() != Some(1)).collect()
        }
        Axes::Unknown => return unknown(elem),
    };
    ValueType::new(
        elem,
        s.iter()
            .zip(keep)
            .filter(|(_, k)| *k)
            .map(|(d, _)| d.clone())
            .collect(),
    )
}

fn unsqueeze(cx: &Ctx) -> ValueType {
    let elem = cx.elem(0);
    let Some(s) = cx.shape(0) else {
        return unknown(elem);
    };
    let axes = match axes(cx, 1, 13) {
        Axes::Given(a) => a,
        Axes::Absent => return unknown(elem),
        Axes::Unknown => {
            let added = cx.shape(1).and_then(|a| match a {
                [n] => usize::try_from(n.value()?).ok(),
                _ => None,
            });
            return unknown_dims(elem, added.and_then(|n| s.len().checked_add(n)));
        }
    };
    let rank = s.len() + axes.len();
    if rank > MAX_RANK {
        return unknown(elem);
    }
    let Some(inserted) = axis_mask(&axes, rank) else {
        return unknown(elem);
    };
    let mut from_input = s.iter();
    let dims = inserted
        .iter()
        .map(|&new| match new {
            true => Dim::known(1),
            false => from_input.next().cloned().unwrap_or(Dim::Unknown),
        })
        .collect();
    ValueType::new(elem, dims)
}

fn concat(cx: &Ctx) -> ValueType {
    let slots: Vec<usize> = (0..cx.input_count()).filter(|&s| cx.has_input(s)).collect();
    let elem = known_elem(cx, &slots);
    let Some(rank) = slots.iter().find_map(|&s| cx.shape(s).map(<[Dim]>::len)) else {
        return unknown(elem);
    };
    let Some(axis) = normalize_axis(cx.attr_int("axis", 0), rank) else {
        return unknown(elem);
    };
    let shapes: Vec<Option<&[Dim]>> = slots.iter().map(|&s| cx.shape(s)).collect();
    if shapes.iter().flatten().any(|s| s.len() != rank) {
        return unknown(elem);
    }
    let dims = (0..rank)
        .map(|i| {
            let dims = shapes
                .iter()
                .map(|s| s.map_or(Dim::Unknown, |s| s[i].clone()));
            if i == axis {
                dims.fold(Dim::known(0), |acc, d| acc.add(&d))
            } else {
                dims.fold(Dim::Unknown, |acc, d| acc.unify(&d))
            }
        })
        .collect();
    ValueType::new(elem, dims)
}

fn gather(cx: &Ctx) -> ValueType {
    let elem = cx.elem(0);
    let (Some(data), Some(indices)) = (cx.shape(0), cx.shape(1)) else {
        return unknown(elem);
    };
    let Some(axis) = normalize_axis(cx.attr_int("axis", 0), data.len()) else {
        return unknown(elem);
    };
    let dims = data[..axis]
        .iter()
        .chain(indices)
        .chain(&data[axis + 1..])
        .cloned()
        .collect();
    ValueType::new(elem, dims)
}

fn gather_nd(cx: &Ctx) -> ValueType {
    let elem = cx.elem(0);
    let (Some(data), Some(indices)) = (cx.shape(0), cx.shape(1)) else {
        return unknown(elem);
    };
    let batch_dims = usize::try_from(cx.attr_int("batch_dims", 0)).ok();
    let Some((last, outer)) = indices.split_last() else {
        return unknown(elem);
    };
    let tail = last
        .value()
        .and_then(|k| usize::try_from(k).ok())
        .zip(batch_dims)
        .and_then(|(k, b)| data.get(b.checked_add(k)?..));
    match tail {
        Some(tail) => ValueType::new(elem, outer.iter().chain(tail).cloned().collect()),
        None => unknown(elem),
    }
}

/// Starts, ends, axes and steps of a Slice: attributes before opset 10, inputs after.
pub(super) struct SliceParams {
    pub starts: Vec<Dim>,
    pub ends: Vec<Dim>,
    pub axes: Vec<i64>,
    pub steps: Vec<i64>,
}

/// The parameters when the sliced axes and steps are known; `starts`/`ends` may hold
/// unknown elements.
pub(super) fn slice_params(cx: &Ctx) -> Option<SliceParams> {
    let known = |v: &[i64]| v.iter().map(|&x| Dim::known(x)).collect::<Vec<_>>();
    let (starts, ends, axes, steps) = if cx.opset < 10 {
        let starts = known(cx.attr_ints("starts")?);
        let ends = known(cx.attr_ints("ends")?);
        (
            starts,
            ends,
            cx.attr_ints("axes").map(<[i64]>::to_vec),
            None,
        )
    } else {
        let starts = shape_operand(cx, 1)?;
        let ends = shape_operand(cx, 2)?;
        let axes = if cx.has_input(3) {
            Some(cx.ints(3)?)
        } else {
            None
        };
        let steps = if cx.has_input(4) {
            Some(cx.ints(4)?)
        } else {
            None
        };
        (starts, ends, axes, steps)
    };
    let n = starts.len();
    let axes = axes.unwrap_or_else(|| (0..n as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; n]);
    (ends.len() == n && axes.len() == n && steps.len() == n).then_some(SliceParams {
        starts,
        ends,
        axes,
        steps,
    })
}

/// Ends at or past this are "to the end" (torch writes i64::MAX): no dim is this long.
const TO_THE_END: i64 = 1 << 62;

/// The first index and the length of `start:end:step` along a known dim of `dim`
/// elements, clamped as ONNX Slice clamps.
pub(super) fn slice_range(dim: i64, start: i64, end: i64, step: i64) -> Option<(i64, i64)> {
    if step == 0 || dim < 0 {
        return None;
    }
    if dim == 0 {
        return Some((0, 0));
    }
    let (d, s, e, st) = (dim as i128, start as i128, end as i128, step as i128);
    let s = if s < 0 { s + d } else { s };
    let e = if e < 0 { e + d } else { e };
    let (first, len) = if st > 0 {
        let (s, e) = (s.clamp(0, d), e.clamp(0, d));
        (s, ((e - s).max(0) + st - 1) / st)
    } else {
        let (s, e) = (s.clamp(0, d - 1), e.clamp(-1, d - 1));
        (s, ((s - e).max(0) + (-st) - 1) / (-st))
    };
    Some((i64::try_from(first).ok()?, i64::try_from(len).ok()?))
}

/// The length of `start:end:step` along `dim`. With symbols it is decided only for a step
/// of 1: from the start up to a known end it is `Min(end, dim)`, to the end it is `dim`;
/// between two bounds that cannot be negative (so neither wraps around) it is
/// `Min(end, dim) - Min(start, dim)`, except for a window `start : start + n` of a table
/// of known length, which is `n` long. That window is how BART-style learned positions are
/// cut (Whisper's decoder: `table[past : past + sequence]`, 448 rows); past the table's end
/// the clamped window is shorter than the tokens, where the original model fails to
/// broadcast it against them or adds no position at all: no model runs that gives the tokens
/// their positions.
fn slice_len(dim: &Dim, start: &Dim, end: &Dim, step: i64) -> Dim {
    if let (Some(d), Some(s), Some(e)) = (dim.value(), start.value(), end.value()) {
        return slice_range(d, s, e, step).map_or(Dim::Unknown, |(_, len)| Dim::known(len));
    }
    let from_start = start.value().is_some_and(|s| s == 0 || s <= -TO_THE_END);
    if step == 1 && !from_start && start.is_positive() {
        let window = end.sub(start);
        if dim.value().is_some() && start.value().is_none() && window.is_positive() {
            return window;
        }
        let to = match end.value() {
            Some(e) if e >= TO_THE_END => dim.clone(),
            _ if end.is_positive() => end.minimum(dim),
            _ => return Dim::Unknown,
        };
        return to.sub(&start.minimum(dim));
    }
    // The last k: `x[-k:]` (a sliding window's cache keeps its last positions).
    if let (1, Some(s), Some(e)) = (step, start.value(), end.value()) {
        if s < 0 && s > -TO_THE_END && e >= TO_THE_END {
            return dim.minimum(&Dim::known(-s));
        }
    }
    if step != 1 || !from_start {
        return Dim::Unknown;
    }
    match end.value() {
        Some(e) if e >= TO_THE_END => dim.clone(),
        Some(e) if e >= 0 => end.minimum(dim),
        Some(_) => Dim::Unknown,
        None if end.same(dim) => dim.clone(),
        None if end.is_positive() => end.minimum(dim),
        None => Dim::Unknown,
    }
}

fn slice(cx: &Ctx) -> ValueType {
    let elem = cx.elem(0);
    let Some(data) = cx.shape(0) else {
        return unknown(elem);
    };
    let Some(p) = slice_params(cx) else {
        return unknown_dims(elem, Some(data.len()));
    };
    let mut dims = data.to_vec();
    let mut sliced = vec![false; data.len()];
    for i in 0..p.axes.len() {
        let Some(axis) = normalize_axis(p.axes[i], data.len()) else {
            return unknown_dims(elem, Some(data.len()));
        };
        if std::mem::replace(&mut sliced[axis], true) {
            return unknown_dims(elem, Some(data.len()));
        }
        dims[axis] = slice_len(&data[axis], &p.starts[i], &p.ends[i], p.steps[i]);
    }
    ValueType::new(elem, dims)
}

/// Each padded axis grows by its two pads (negative pads crop), whatever the mode. The pads are
/// an attribute before opset 11, an input after; opset 18's `axes` input names the axes they
/// cover (all of them without it).
fn pad(cx: &Ctx) -> ValueType {
    let elem = cx.elem(0);
    let Some(data) = cx.shape(0) else {
        return recorded_or(cx, 0, unknown(elem));
    };
    let grown = || -> Option<Vec<Dim>> {
        let pads = match cx.opset {
            ..=10 => cx.attr_ints("pads")?.to_vec(),
            _ => cx.ints(1)?,
        };
        let axes: Vec<usize> = match cx.opset >= 18 && cx.has_input(3) {
            true => cx
                .ints(3)?
                .into_iter()
                .map(|a| normalize_axis(a, data.len()))
                .collect::<Option<_>>()?,
            false => (0..data.len()).collect(),
        };
        if pads.len() != 2 * axes.len() {
            return None;
        }
        let mut dims = data.to_vec();
        for (i, &axis) in axes.iter().enumerate() {
            let total = pads[i].checked_add(pads[i + axes.len()])?;
            dims[axis] = dims[axis].add(&Dim::known(total));
        }
        Some(dims)
    };
    match grown() {
        Some(dims) => ValueType::new(elem, dims),
        None => recorded_or(cx, 0, unknown_dims(elem, Some(data.len()))),
    }
}

fn split(cx: &Ctx) -> Vec<ValueType> {
    let elem = cx.elem(0);
    let n = cx.output_count();
    let Some(data) = cx.shape(0) else {
        return vec![unknown(elem); n];
    };
    let Some(axis) = normalize_axis(cx.attr_int("axis", 0), data.len()) else {
        return vec![unknown(elem); n];
    };
    let given: Option<Vec<Dim>> = if cx.opset < 13 {
        cx.attr_ints("split")
            .map(|s| s.iter().map(|&x| Dim::known(x)).collect())
    } else if cx.has_input(1) {
        Some(shape_operand(cx, 1).unwrap_or_else(|| vec![Dim::Unknown; n]))
    } else {
        None
    };
    let sizes = match given {
        Some(sizes) if sizes.len() == n => sizes,
        Some(_) => vec![Dim::Unknown; n],
        None => equal_split(&data[axis], n),
    };
    sizes
        .into_iter()
        .map(|size| {
            let mut dims = data.to_vec();
            dims[axis] = size;
            ValueType::new(elem, dims)
        })
        .collect()
}

/// Sizes of `n` equal parts of `dim`: a known dim that does not divide evenly gives a
/// smaller last part (opset 18), a symbolic dim must divide exactly.
fn equal_split(dim: &Dim, n: usize) -> Vec<Dim> {
    let Some(parts) = i64::try_from(n).ok().filter(|&p| p > 0) else {
        return vec![Dim::Unknown; n];
    };
    if let Some(d) = dim.value() {
        let chunk = d.div_euclid(parts) + i64::from(d.rem_euclid(parts) != 0);
        let last = chunk
            .checked_mul(parts - 1)
            .and_then(|rest| d.checked_sub(rest))
            .filter(|&last| last >= 0);
        let Some(last) = last.filter(|_| d >= 0) else {
            return vec![Dim::Unknown; n];
        };
        let mut sizes = vec![Dim::known(chunk); n - 1];
        sizes.push(Dim::known(last));
        return sizes;
    }
    vec![dim.div(&Dim::known(parts)).unwrap_or(Dim::Unknown); n]
}

fn expand(cx: &Ctx) -> ValueType {
    let elem = cx.elem(0);
    match (cx.shape(0), shape_operand(cx, 1)) {
        (Some(input), Some(target)) => {
            ValueType::new(elem, broadcast_shapes(input, &dims_from_value(target)))
        }
        _ => unknown(elem),
    }
}

/// A shape read from a value: elements must be sizes.
fn dims_from_value(value: Vec<Dim>) -> Vec<Dim> {
    value
        .into_iter()
        .map(|d| match d.value() {
            Some(n) if n >= 0 => d,
            None if d.is_positive() => d,
            _ => Dim::Unknown,
        })
        .collect()
}

fn constant_of_shape(cx: &Ctx) -> ValueType {
    let elem =
        crate::ir::attr::get_tensor(&cx.node.proto, "value").map_or(FLOAT, |t| t.data_type());
    match shape_operand(cx, 0) {
        Some(shape) => ValueType::new(elem, dims_from_value(shape)),
        None => unknown(elem),
    }
}

fn range(cx: &Ctx) -> ValueType {
    let elem = known_elem(cx, &[0, 1, 2]);
    let scalar = |slot: usize| cx.value(slot).and_then(|v| v.first().cloned());
    let len = match (scalar(0), scalar(1), scalar(2)) {
        (Some(start), Some(limit), Some(delta)) => range_len(&start, &limit, &delta),
        _ => Dim::Unknown,
    };
    ValueType::new(elem, vec![len])
}

/// `max(ceil((limit - start) / delta), 0)`; with symbols only `0..limit` by 1.
pub(super) fn range_len(start: &Dim, limit: &Dim, delta: &Dim) -> Dim {
    if let (Some(s), Some(l), Some(d)) = (start.value(), limit.value(), delta.value()) {
        if d == 0 {
            return Dim::Unknown;
        }
        let (s, l, d) = (s as i128, l as i128, d as i128);
        let n = (l - s).div_euclid(d) + i128::from((l - s).rem_euclid(d) != 0);
        return i64::try_from(n.max(0)).map_or(Dim::Unknown, Dim::known);
    }
    if start.value() == Some(0) && delta.value() == Some(1) && limit.is_positive() {
        return limit.clone();
    }
    // From an offset to the offset plus a length (a decoder's positions after its past).
    let len = limit.sub(start);
    if delta.value() == Some(1) && len.is_positive() {
        return len;
    }
    Dim::Unknown
}

fn tile(cx: &Ctx) -> ValueType {
    let elem = cx.elem(0);
    match (cx.shape(0), shape_operand(cx, 1)) {
        (Some(s), Some(repeats)) if repeats.len() == s.len() => ValueType::new(
            elem,
            s.iter()
                .zip(dims_from_value(repeats))
                .map(|(d, r)| d.mul(&r))
                .collect(),
        ),
        (Some(s), _) => unknown_dims(elem, Some(s.len())),
        _ => unknown(elem),
    }
}

/// `[N, C, d…]` → `[N, C, 1…]`.
fn global_pool(cx: &Ctx) -> ValueType {
    let elem = cx.elem(0);
    match cx.shape(0) {
        Some(s) if s.len() >= 2 => {
            let mut dims = s[..2].to_vec();
            dims.resize(s.len(), Dim::known(1));
            ValueType::new(elem, dims)
        }
        _ => unknown(elem),
    }
}

fn conv(cx: &Ctx) -> ValueType {
    let elem = cx.elem(0);
    let (Some(x), Some(w)) = (cx.shape(0), cx.shape(1)) else {
        return unknown_dims(elem, cx.shape(0).map(<[Dim]>::len));
    };
    if x.len() < 2 || w.len() != x.len() {
        return unknown(elem);
    }
    let spatial = x.len() - 2;
    let kernel: Vec<Option<i64>> = match cx.attr_ints("kernel_shape") {
        Some(k) if k.len() == spatial => k.iter().map(|&k| Some(k)).collect(),
        _ => w[2..].iter().map(Dim::value).collect(),
    };
    let per_axis = |name: &str, default: i64, len: usize| -> Vec<i64> {
        match cx.attr_ints(name) {
            Some(v) if v.len() == len => v.to_vec(),
            _ => vec![default; len],
        }
    };
    let strides = per_axis("strides", 1, spatial);
    let dilations = per_axis("dilations", 1, spatial);
    let pads = per_axis("pads", 0, 2 * spatial);
    let auto_pad = crate::ir::attr::get_string(&cx.node.proto, "auto_pad").unwrap_or_default();
    let mut dims = vec![x[0].clone(), w[0].clone()];
    for i in 0..spatial {
        let size = x[2 + i].value().zip(kernel[i]).and_then(|(n, k)| {
            conv_output_size(
                n,
                k,
                strides[i],
                dilations[i],
                pads[i],
                pads[spatial + i],
                &auto_pad,
            )
        });
        dims.push(size.map_or(Dim::Unknown, Dim::known));
    }
    ValueType::new(elem, dims)
}

/// One spatial dim of a convolution's output.
fn conv_output_size(
    n: i64,
    kernel: i64,
    stride: i64,
    dilation: i64,
    pad_begin: i64,
    pad_end: i64,
    auto_pad: &str,
) -> Option<i64> {
    if stride <= 0 || dilation <= 0 || kernel <= 0 || n < 0 {
        return None;
    }
    if let "SAME_UPPER" | "SAME_LOWER" = auto_pad {
        return Some(n.checked_add(stride - 1)? / stride);
    }
    let span = dilation.checked_mul(kernel - 1)?.checked_add(1)?;
    let padded = match auto_pad {
        "VALID" => n,
        _ => n.checked_add(pad_begin)?.checked_add(pad_end)?,
    };
    let room = padded.checked_sub(span)?;
    (room >= 0)
        .then(|| room / stride)
        .and_then(|steps| steps.checked_add(1))
}

/// The shape of `a @ b` with numpy's rules: 1-D operands get a dim added and then
/// removed, batch dims broadcast.
fn matmul_shape(a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let one = Dim::known(1);
    let a2: Vec<Dim> = if a.len() == 1 {
        vec![one.clone(), a[0].clone()]
    } else {
        a.to_vec()
    };
    let b2: Vec<Dim> = if b.len() == 1 {
        vec![b[0].clone(), one]
    } else {
        b.to_vec()
    };
    let (a_batch, a_mat) = a2.split_at(a2.len() - 2);
    let (b_batch, b_mat) = b2.split_at(b2.len() - 2);
    let mut dims = broadcast_shapes(a_batch, b_batch);
    if a.len() > 1 {
        dims.push(a_mat[0].clone());
    }
    if b.len() > 1 {
        dims.push(b_mat[1].clone());
    }
    Some(dims)
}

fn matmul(cx: &Ctx) -> ValueType {
    matmul_of(cx, 1, cx.elem(0))
}

/// The product of input 0 and input `b`, of element type `elem` (integer products
/// accumulate in int32; quantized ones take their output zero point's type).
fn matmul_of(cx: &Ctx, b: usize, elem: i32) -> ValueType {
    match (cx.shape(0), cx.shape(b)) {
        (Some(a), Some(b)) => matmul_shape(a, b).map_or(unknown(elem), |d| ValueType::new(elem, d)),
        _ => unknown(elem),
    }
}

/// LSTM/GRU/RNN (`direction`, `hidden_size`, `layout`) on X `[seq, batch, in]`: Y `[seq,
/// dirs, batch, hidden]`, then Y_h (and LSTM's Y_c) `[dirs, batch, hidden]`; `layout = 1`
/// puts batch first in X and in each output.
fn recurrent(cx: &Ctx) -> Vec<ValueType> {
    let elem = cx.elem(0);
    let bidirectional = crate::ir::attr::get_string(&cx.node.proto, "direction").as_deref()
        == Some("bidirectional");
    let dirs = Dim::known(if bidirectional { 2 } else { 1 });
    let hidden = positive_attr(cx, "hidden_size");
    let batch_first = cx.attr_int("layout", 0) == 1;
    let (seq, batch) = match cx.shape(0) {
        Some([a, b, _]) if batch_first => (b.clone(), a.clone()),
        Some([a, b, _]) => (a.clone(), b.clone()),
        _ => (Dim::Unknown, Dim::Unknown),
    };
    let y = if batch_first {
        vec![batch.clone(), seq, dirs.clone(), hidden.clone()]
    } else {
        vec![seq, dirs.clone(), batch.clone(), hidden.clone()]
    };
    let state = if batch_first {
        vec![batch, dirs, hidden]
    } else {
        vec![dirs, batch, hidden]
    };
    let mut out = vec![ValueType::new(elem, y)];
    out.resize(cx.output_count().max(1), ValueType::new(elem, state));
    out
}

fn gemm(cx: &Ctx) -> ValueType {
    let pick = |slot: usize, index: usize| match cx.shape(slot) {
        Some(s) if s.len() == 2 => s[index].clone(),
        _ => Dim::Unknown,
    };
    let m = pick(0, usize::from(cx.attr_int("transA", 0) != 0));
    let n = pick(1, usize::from(cx.attr_int("transB", 0) == 0));
    ValueType::new(cx.elem(0), vec![m, n])
}

/// Which statistics a normalization returns after its result.
enum Stats {
    /// LayerNormalization: mean, then inverse standard deviation.
    MeanAndInvStdDev,
    /// RMS normalizations: the inverse standard deviation (or root mean square).
    InvStdDev,
}

/// The shape of per-row statistics: the input's dims, with the normalized ones (from
/// `axis` on) kept as 1.
fn stats_type(cx: &Ctx, elem: i32) -> ValueType {
    let Some(x) = cx.shape(0) else {
        return unknown(elem);
    };
    let Some(axis) = normalize_axis(cx.attr_int("axis", -1), x.len()) else {
        return unknown(elem);
    };
    let dims = x
        .iter()
        .enumerate()
        .map(|(i, d)| if i < axis { d.clone() } else { Dim::known(1) })
        .collect();
    ValueType::new(elem, dims)
}

fn normalization(cx: &Ctx, stats: Stats) -> Vec<ValueType> {
    let stash = i32::try_from(cx.attr_int("stash_type", FLOAT as i64)).unwrap_or(FLOAT);
    let stat = stats_type(cx, stash);
    match stats {
        Stats::MeanAndInvStdDev => vec![same(cx, 0), stat.clone(), stat],
        Stats::InvStdDev => vec![same(cx, 0), stat],
    }
}

/// SkipLayerNormalization (and its RMS twin): output, mean, inv_std_var,
/// input_skip_bias_sum. The statistics are f32 and keep the last dim as 1.
fn skip_layer_norm(cx: &Ctx) -> Vec<ValueType> {
    let stat = match cx.shape(0) {
        Some([outer @ .., _]) => ValueType::new(
            FLOAT,
            outer.iter().cloned().chain([Dim::known(1)]).collect(),
        ),
        _ => unknown(FLOAT),
    };
    vec![same(cx, 0), stat.clone(), stat, same(cx, 0)]
}

fn reduce(cx: &Ctx) -> ValueType {
    let elem = cx.elem(0);
    let input_since = if cx.op() == "ReduceSum" { 13 } else { 18 };
    let keepdims = cx.attr_int("keepdims", 1) != 0;
    let noop_when_empty = cx.opset >= input_since && cx.attr_int("noop_with_empty_axes", 0) != 0;
    let Some(s) = cx.shape(0) else {
        return unknown(elem);
    };
    let reduced = match axes(cx, 1, input_since) {
        Axes::Given(a) if !a.is_empty() => match axis_mask(&a, s.len()) {
            Some(mask) => mask,
            None => return unknown(elem),
        },
        Axes::Given(_) | Axes::Absent if noop_when_empty => vec![false; s.len()],
        Axes::Given(_) | Axes::Absent => vec![true; s.len()],
        Axes::Unknown if keepdims => return unknown_dims(elem, Some(s.len())),
        Axes::Unknown => return unknown(elem),
    };
    reduced_type(elem, s, &reduced, keepdims)
}

fn reduced_type(elem: i32, s: &[Dim], reduced: &[bool], keepdims: bool) -> ValueType {
    let dims = s
        .iter()
        .zip(reduced)
        .filter_map(|(d, &r)| match (r, keepdims) {
            (false, _) => Some(d.clone()),
            (true, true) => Some(Dim::known(1)),
            (true, false) => None,
        })
        .collect();
    ValueType::new(elem, dims)
}

fn arg_reduce(cx: &Ctx) -> ValueType {
    let Some(s) = cx.shape(0) else {
        return unknown(INT64);
    };
    let Some(axis) = normalize_axis(cx.attr_int("axis", 0), s.len()) else {
        return unknown(INT64);
    };
    let mut reduced = vec![false; s.len()];
    reduced[axis] = true;
    reduced_type(INT64, s, &reduced, cx.attr_int("keepdims", 1) != 0)
}

/// The dim at `i` of input `slot`, when the input has rank `rank`.
fn dim_at(cx: &Ctx, slot: usize, rank: usize, i: usize) -> Dim {
    match cx.shape(slot) {
        Some(s) if s.len() == rank => s[i].clone(),
        _ => Dim::Unknown,
    }
}

/// `past + new` along the sequence: `new` alone without a past.
fn total_length(cx: &Ctx, past_slot: usize, past_rank: usize, axis: usize, new: &Dim) -> Dim {
    if cx.has_input(past_slot) {
        dim_at(cx, past_slot, past_rank, axis).add(new)
    } else {
        new.clone()
    }
}

/// Opset-23 Attention: Q, K, V as [batch, heads, sequence, head_size], or as [batch,
/// sequence, hidden] with `q_num_heads`/`kv_num_heads`. Outputs Y (Q's layout),
/// present_key and present_value ([batch, kv_heads, past + kv_sequence, head_size]) and
/// qk_matmul_output ([batch, q_heads, q_sequence, past + kv_sequence]).
fn attention(cx: &Ctx) -> Vec<ValueType> {
    let elem = cx.elem(0);
    let rank = cx.shape(0).map(<[Dim]>::len);
    let (batch, q_heads, q_seq, kv_heads, kv_seq, head, v_head) = match rank {
        Some(4) => (
            dim_at(cx, 0, 4, 0),
            dim_at(cx, 0, 4, 1),
            dim_at(cx, 0, 4, 2),
            dim_at(cx, 1, 4, 1),
            dim_at(cx, 1, 4, 2),
            dim_at(cx, 1, 4, 3),
            dim_at(cx, 2, 4, 3),
        ),
        Some(3) => {
            let kv_heads = positive_attr(cx, "kv_num_heads");
            let per_head = |slot: usize| {
                dim_at(cx, slot, 3, 2)
                    .div(&kv_heads)
                    .unwrap_or(Dim::Unknown)
            };
            (
                dim_at(cx, 0, 3, 0),
                positive_attr(cx, "q_num_heads"),
                dim_at(cx, 0, 3, 1),
                kv_heads.clone(),
                dim_at(cx, 1, 3, 1),
                per_head(1),
                per_head(2),
            )
        }
        _ => return vec![unknown(elem); cx.output_count().max(1)],
    };
    let total = total_length(cx, 4, 4, 2, &kv_seq);
    let y = if rank == Some(4) {
        vec![
            batch.clone(),
            q_heads.clone(),
            q_seq.clone(),
            v_head.clone(),
        ]
    } else {
        vec![batch.clone(), q_seq.clone(), q_heads.mul(&v_head)]
    };
    vec![
        ValueType::new(elem, y),
        ValueType::new(
            elem,
            vec![batch.clone(), kv_heads.clone(), total.clone(), head],
        ),
        ValueType::new(elem, vec![batch.clone(), kv_heads, total.clone(), v_head]),
        ValueType::new(elem, vec![batch, q_heads, q_seq, total]),
    ]
}

/// com.microsoft Attention: input [batch, sequence, input_hidden] with packed QKV weights;
/// output [batch, sequence, v_hidden] (`qkv_hidden_sizes[2]`, else a third of the packed
/// width), present [2, batch, heads, past + sequence, head_size].
/// com.microsoft EmbedLayerNormalization: `[batch, seq]` ids and `[rows, hidden]` tables
/// give `[batch, seq, hidden]` of the tables' type, the int32 `mask_index` `[batch]`, and the
/// embedding sum like the output (`ops::embed_layer_norm`).
fn embed_layer_norm(cx: &Ctx) -> Vec<ValueType> {
    let (batch, seq) = (dim_at(cx, 0, 2, 0), dim_at(cx, 0, 2, 1));
    let hidden = dim_at(cx, 2, 2, 1);
    let output = ValueType::new(cx.elem(2), vec![batch.clone(), seq, hidden]);
    let mask_index = ValueType::new(INT32, vec![batch]);
    vec![output.clone(), mask_index, output]
}

fn contrib_attention(cx: &Ctx) -> Vec<ValueType> {
    let elem = cx.elem(0);
    let packed_width = match (cx.shape(2), cx.shape(1)) {
        (Some([w]), _) | (_, Some([_, w])) => w.clone(),
        _ => Dim::Unknown,
    };
    let third = packed_width.div(&Dim::known(3)).unwrap_or(Dim::Unknown);
    let (k_hidden, v_hidden) = match cx.attr_ints("qkv_hidden_sizes") {
        Some([_, k, v]) => (Dim::known(*k), Dim::known(*v)),
        _ => (third.clone(), third),
    };
    let (batch, seq) = (dim_at(cx, 0, 3, 0), dim_at(cx, 0, 3, 1));
    let output = ValueType::new(elem, vec![batch.clone(), seq.clone(), v_hidden]);
    let present = if cx.attr_int("past_present_share_buffer", 0) != 0 {
        same(cx, 4)
    } else {
        let heads = positive_attr(cx, "num_heads");
        let head_size = k_hidden.div(&heads).unwrap_or(Dim::Unknown);
        let total = total_length(cx, 4, 5, 3, &seq);
        ValueType::new(elem, vec![Dim::known(2), batch, heads, total, head_size])
    };
    vec![output, present]
}

/// com.microsoft MultiHeadAttention: query [batch, sequence, hidden] (or packed QKV
/// [batch, sequence, heads, 3, head_size]); key/value [batch, kv_sequence, hidden], or
/// [batch, heads, kv_sequence, head_size], or packed KV [batch, kv_sequence, heads, 2,
/// head_size] in key. Output [batch, sequence, v_hidden]; present_key/present_value
/// [batch, heads, past + kv_sequence, head_size].
fn multi_head_attention(cx: &Ctx) -> Vec<ValueType> {
    let elem = cx.elem(0);
    let heads = positive_attr(cx, "num_heads");
    let per_head = |d: &Dim| d.div(&heads).unwrap_or(Dim::Unknown);
    let packed = |s: &[Dim], k: i64| s.len() == 5 && s[3].value() == Some(k);
    let q = cx.shape(0).unwrap_or_default();
    let (batch, seq) = match q {
        [b, s, ..] => (b.clone(), s.clone()),
        _ => (Dim::Unknown, Dim::Unknown),
    };
    // kv_sequence, the head size of K and of V, and V's hidden size.
    let (kv_seq, k_head, v_head, v_hidden) = match (cx.shape(1), cx.shape(2)) {
        _ if packed(q, 3) => (seq.clone(), q[4].clone(), q[4].clone(), q[2].mul(&q[4])),
        (Some(k), None) if packed(k, 2) => {
            (k[1].clone(), k[4].clone(), k[4].clone(), k[2].mul(&k[4]))
        }
        (Some([_, n, l, hk]), Some([_, _, _, hv])) => {
            (l.clone(), hk.clone(), hv.clone(), n.mul(hv))
        }
        (Some([_, l, dk]), Some([_, _, dv])) => (l.clone(), per_head(dk), per_head(dv), dv.clone()),
        _ => (Dim::Unknown, Dim::Unknown, Dim::Unknown, Dim::Unknown),
    };
    let total = total_length(cx, 6, 4, 2, &kv_seq);
    vec![
        ValueType::new(elem, vec![batch.clone(), seq, v_hidden]),
        ValueType::new(
            elem,
            vec![batch.clone(), heads.clone(), total.clone(), k_head],
        ),
        ValueType::new(elem, vec![batch, heads, total, v_head]),
    ]
}

/// A count attribute (heads): `Unknown` when missing or not positive.
fn positive_attr(cx: &Ctx, name: &str) -> Dim {
    let n = cx.attr_int(name, 0);
    if n > 0 {
        Dim::known(n)
    } else {
        Dim::Unknown
    }
}
