//! Lowering, before a model goes to tract, what tract cannot run as it is:
//!
//! - ONNX Runtime contrib operators that tract would misread (it resolves operators by name
//!   and would read `com.microsoft::Attention` as the standard `Attention`): the lowerings
//!   of `ops::attention`, `ops::embed_layer_norm` and `ops::rotary`, for the forms onnxopt's fusions emit; a node outside them is left
//!   as it is and then refused by `support`, so it is never run wrongly.
//! - a standard `RotaryEmbedding` with position ids: see `ops::rotary`.
//! - a standard `Attention` with a `softcap`: written out (see `ops::attention::lower_softcap`).
//! - `Gemm(A, B, C?)` with a float16 weight B, alpha and beta 1, A not transposed:
//!   `MatMul(A, B or Bᵀ) + C` (tract 0.23 mistypes a float16 Gemm; see `float16_gemm`).
//! - `com.microsoft::MatMulNBits(A, B, scales, zero_points?)` with 4- or 8-bit constant
//!   codes: `MatMul(A, W)` with W the float weight they stand for (see `matmul_nbits`).
//! - `com.microsoft::GatherBlockQuantized` of the 4-bit codes of a tied LM head (as
//!   `--weights int4 --lm-head` writes it): `Gather` of the float table they stand for (see
//!   `gather_block_quantized`).
//! - `DequantizeLinear` of a 4-bit initializer (int4/uint4), or of an 8-bit one in blocks (as
//!   `--weights int4|int8 --target onnx` writes): folded into its float values (tract 0.23
//!   cannot load 4-bit tensors nor read `block_size`; see `blockwise_dequantize`).
//! - `CumSum(x, axis)` of int64 `x`: summed in float64 and cast back (tract 0.23 cannot sum
//!   int64; see `int64_cumsum`).
//! - `Cast(x, to = int64)` of an int64 `x`: `Identity` (tract 0.23 casts every number to
//!   int64 through 32 bits; see `int64_to_int64_cast`).

use std::borrow::Cow;

use crate::error::Result;
use crate::ir::{attr, DataType, Model, Node, NodeId, PValue, Patch, Tensor};
use crate::ops::weights::{plain_gemm_trans_b, transposed};
use crate::ops::{attention, embed_layer_norm, nbits, rotary, MS_DOMAIN};
use crate::passes::branches::{rewrite_branches, BranchesOf};
use crate::passes::Rewrites;

/// Lowers every contrib node of `model` that has a lowering, float16 Gemms and int64 sums, in
/// the main graph and in the branches of its `If` nodes (an optimized merged decoder's fused
/// operators are there). Returns how many nodes it lowered.
pub fn lower_contrib_ops(model: &mut Model) -> Result<usize> {
    let nodes: Vec<NodeId> = model
        .graph
        .nodes()
        .filter(|(_, n)| {
            n.domain() == MS_DOMAIN
                || n.is("Gemm")
                || n.is("CumSum")
                || n.is("RotaryEmbedding")
                || n.is("DequantizeLinear")
                || n.is("Attention")
                || n.is("Cast")
        })
        .map(|(id, _)| id)
        .collect();
    let mut lowered = 0;
    for id in nodes {
        let node = model.graph.node(id).clone();
        let patch = match (node.domain(), node.op_type()) {
            (MS_DOMAIN, "Attention") => attention::lower_packed(&model.graph, id, &node),
            (MS_DOMAIN, "EmbedLayerNormalization") => {
                embed_layer_norm::lower_for_tract(&model.graph, id, &node)
            }
            (MS_DOMAIN, "MatMulNBits") => matmul_nbits(model, id, &node),
            (MS_DOMAIN, "GatherBlockQuantized") => gather_block_quantized(model, id, &node),
            (MS_DOMAIN, "MultiHeadAttention") => {
                attention::lower_multi_head(&model.graph, id, &node)
            }
            (MS_DOMAIN | "", "RotaryEmbedding") => rotary::lower_for_tract(&model.graph, id, &node),
            ("", "Gemm") => float16_gemm(model, id, &node),
            ("", "CumSum") => int64_cumsum(model, id, &node),
            ("", "DequantizeLinear") => blockwise_dequantize(model, id, &node),
            ("", "Attention") => attention::lower_softcap(&model.graph, id, &node),
            ("", "Cast") => int64_to_int64_cast(model, id, &node),
            _ => None,
        };
        if let Some(patch) = patch {
            model.graph.apply(patch)?;
            lowered += 1;
        }
    }
    let in_branches = rewrite_branches(model, BranchesOf::AnyKind, &|branch| {
        let mut done = Rewrites::default();
        done.add(LOWERED, lower_contrib_ops(branch)?);
        Ok(done)
    })?;
    Ok(lowered + in_branches.0.get(LOWERED).copied().unwrap_or(0))
}

/// What `lower_contrib_ops` counts a lowered node as in the branches it rewrites.
const LOWERED: &str = "lowered";

/// `Gemm(A, B, C)` with a float16 weight B, alpha and beta 1 and A not transposed, as
/// `MatMul(A, B or Bᵀ) + C`: tract 0.23's Gemm expansion types its result float32 whatever
/// its inputs, and refuses the float16 model.
fn float16_gemm(model: &Model, id: NodeId, node: &Node) -> Option<Patch> {
    let g = &model.graph;
    let b = node.input(1)?;
    let float16_weight = g
        .initializer(b)
        .is_some_and(|t| t.dtype() == crate::ir::DataType::Float16 && t.dims().len() == 2);
    let transposed = plain_gemm_trans_b(node)?;
    if !float16_weight {
        return None;
    }
    let mut patch = Patch::new("lower-gemm");
    let mut weight: PValue = b.into();
    if transposed {
        weight = patch.op(
            "Transpose",
            "",
            &[weight],
            vec![attr::ints("perm", &[1, 0])],
        );
    }
    let out = node.output(0)?;
    match node.input(2) {
        None => {
            patch.add_node(
                "MatMul",
                "",
                &[Some(node.input(0)?.into()), Some(weight)],
                &[PValue::Old(out)],
                vec![],
            );
        }
        Some(c) => {
            let product = patch.op("MatMul", "", &[node.input(0)?.into(), weight], vec![]);
            patch.add_node(
                "Add",
                "",
                &[Some(product), Some(c.into())],
                &[PValue::Old(out)],
                vec![],
            );
        }
    }
    patch.remove_node(id);
    Some(patch)
}

/// `MatMulNBits(A, B, scales, zero_points?)` of 4- or 8-bit constant codes, uint8 zero points
/// and float32 scales, without `g_idx` or bias, as `MatMul(A, W)` with W `[K, N]` the float
/// weight (`ops::nbits::BlockQuantized`): tract 0.23.9's own MatMulNBits disagrees with ONNX
/// Runtime when zero points are given, and runs no 8-bit codes. Any other form is left to be
/// refused.
fn matmul_nbits(model: &Model, id: NodeId, node: &Node) -> Option<Patch> {
    let g = &model.graph;
    let int = |name: &str| attr::get_int(&node.proto, name).and_then(|v| usize::try_from(v).ok());
    let bits = nbits::Bits::from_count(int("bits").unwrap_or(4))?;
    if node.inputs.len() > 4 {
        return None;
    }
    let constant = |slot: usize| node.input(slot).and_then(|v| g.initializer(v));
    let (weight, scales, zeros) = nbits_constants(node, 1, constant)?;
    let (k, n) = (int("K")?, int("N")?);
    let q = nbits::BlockQuantized::from_matmul_nbits(
        bits,
        (k, n, int("block_size")?),
        &weight,
        &scales,
        zeros.as_deref(),
    )
    .ok()?;
    let name = format!("{}.dequantized", g.value_name(node.input(1)?));
    let dequantized = Tensor::from_f32(&name, &[k as i64, n as i64], &q.dequantize()).ok()?;
    let mut patch = Patch::new("lower-matmul-nbits");
    let w = patch.new_initializer(&name, dequantized);
    patch.add_node(
        "MatMul",
        "",
        &[Some(node.input(0)?.into()), Some(w)],
        &[PValue::Old(node.output(0)?)],
        vec![],
    );
    patch.remove_node(id);
    Some(patch)
}

/// `GatherBlockQuantized(data, indices, scales, zero_points?)` along axis 0 of 4-bit codes
/// quantized along axis 1, each of data, scales and zero points an initializer or a Reshape
/// of one (the LM head's MatMulNBits inputs, whose bytes are the same rows): `Gather` of the
/// float `[N, K]` table they stand for, K whole blocks. Any other form is left to be refused.
fn gather_block_quantized(model: &Model, id: NodeId, node: &Node) -> Option<Patch> {
    let g = &model.graph;
    let int = |name: &str| attr::get_int(&node.proto, name);
    let axes = (
        int("gather_axis").unwrap_or(0),
        int("quantize_axis").unwrap_or(1),
    );
    if axes != (0, 1) || int("bits").unwrap_or(4) != 4 || node.inputs.len() > 4 {
        return None;
    }
    let block = usize::try_from(int("block_size").unwrap_or(128)).ok()?;
    // The initializer behind a slot, through a Reshape (its bytes, row-major, are the same).
    let constant = |slot: usize| {
        let v = node.input(slot)?;
        let v = match g.producer(v).map(|p| g.node(p)) {
            Some(p) if p.is("Reshape") => p.input(0)?,
            _ => v,
        };
        g.initializer(v)
    };
    let n = usize::try_from(*constant(0)?.dims().first()?).ok()?;
    let (codes, scales, zeros) = nbits_constants(node, 0, constant)?;
    let k = codes.len().checked_div(n)? * 2;
    if n == 0 || k % block != 0 {
        return None;
    }
    let q = nbits::BlockQuantized::from_matmul_nbits(
        nbits::Bits::Four,
        (k, n, block),
        &codes,
        &scales,
        zeros.as_deref(),
    )
    .ok()?;
    // `dequantize` gives the `[K, N]` weight; the table is its transpose.
    let table = transposed(&q.dequantize(), k, n);
    let name = format!("{}.dequantized", g.value_name(node.input(0)?));
    let table = Tensor::from_f32(&name, &[n as i64, k as i64], &table).ok()?;
    let mut patch = Patch::new("lower-gather-block-quantized");
    let table = patch.new_initializer(&name, table);
    patch.add_node(
        "Gather",
        "",
        &[Some(table), Some(node.input(1)?.into())],
        &[PValue::Old(node.output(0)?)],
        vec![attr::int("axis", 0)],
    );
    patch.remove_node(id);
    Some(patch)
}

/// The constants of a MatMulNBits or GatherBlockQuantized node: uint8 codes, float32 scales,
/// uint8 zero points if given.
type NbitsConstants<'t> = (Cow<'t, [u8]>, Vec<f32>, Option<Cow<'t, [u8]>>);

/// The codes at `codes_slot` of a MatMulNBits or GatherBlockQuantized node, its scales (slot 2)
/// and its zero points (slot 3), each the constant `constant` finds for the slot.
fn nbits_constants<'t>(
    node: &Node,
    codes_slot: usize,
    constant: impl Fn(usize) -> Option<&'t Tensor>,
) -> Option<NbitsConstants<'t>> {
    let codes = constant(codes_slot).filter(|t| t.dtype() == DataType::Uint8)?;
    let scales = constant(2).filter(|t| t.dtype() == DataType::Float)?;
    let zeros = match node.input(3) {
        Some(_) => Some(
            constant(3)
                .filter(|t| t.dtype() == DataType::Uint8)?
                .raw_bytes()?,
        ),
        None => None,
    };
    Some((codes.raw_bytes()?, scales.to_f32_vec().ok()?, zeros))
}

/// `DequantizeLinear(x, scale, zero?)` with constant float32 or float16 scales of a 4-bit initializer x,
/// or of an 8-bit one in blocks (`block_size`), as the float initializer it computes
/// (`ops::nbits::dequantize_linear`); the initializers it alone read are dropped, since tract
/// cannot load 4-bit ones even unread. 8-bit ones per tensor or per axis tract runs itself.
fn blockwise_dequantize(model: &Model, id: NodeId, node: &Node) -> Option<Patch> {
    let g = &model.graph;
    let x = g.initializer(node.input(0)?)?;
    let block_size = usize::try_from(attr::get_int(&node.proto, "block_size").unwrap_or(0)).ok()?;
    let (bits, signed) = match x.dtype() {
        DataType::Int4 => (nbits::Bits::Four, true),
        DataType::Uint4 => (nbits::Bits::Four, false),
        DataType::Int8 if block_size > 0 => (nbits::Bits::Eight, true),
        DataType::Uint8 if block_size > 0 => (nbits::Bits::Eight, false),
        _ => return None,
    };
    let scales = g.initializer(node.input(1)?)?;
    let elem = scales.dtype();
    if !matches!(elem, DataType::Float | DataType::Float16) {
        return None;
    }
    let scales = scales.to_f32_vec().ok()?;
    let zeros = match node.input(2) {
        Some(z) => Some(g.initializer(z)?.raw_bytes()?),
        None => None,
    };
    let dims: Vec<usize> = x
        .dims()
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    let rank = dims.len() as i64;
    let axis = attr::get_int(&node.proto, "axis").unwrap_or(1);
    let axis = usize::try_from(if axis < 0 { axis + rank } else { axis }).ok()?;
    let bytes = x.raw_bytes()?;
    let codes = nbits::PackedCodes {
        bytes: &bytes,
        bits,
        signed,
    };
    let values =
        nbits::dequantize_linear(codes, &dims, axis, block_size, &scales, zeros.as_deref())?;
    let out = node.output(0)?;
    // The scales' type, as DequantizeLinear computes: float16 scales give float16 weights.
    let tensor = Tensor::from_f32_as(g.value_name(out), elem, x.dims(), &values).ok()?;
    let mut patch = Patch::new("lower-dequantize-blockwise");
    patch.remove_node(id);
    patch.replace_with_initializer(out, tensor);
    for v in node.inputs.iter().flatten() {
        if g.uses(*v).iter().all(|&(reader, _)| reader == id) && g.initializer(*v).is_some() {
            patch.drop_initializer(*v);
        }
    }
    Some(patch)
}

/// `Cast(x, to = int64)` of an int64 `x` as `Identity(x)`. tract reads every ONNX cast to
/// int64 as a cast to its symbolic-dimension type, which it makes from numbers through i32:
/// `i64::MAX` became -1 and 2^31 became -2^31. torch 2.6's dynamo export casts its slices'
/// "to the end" bound, `i64::MAX`, from int64 to int64, so constant folding turned ViT's pooler
/// slice `[0:]` into `[0:-1]` (one row short). A cast to its own type is the identity; casts
/// from other types keep tract's reading (their values fit 32 bits in the graphs seen).
fn int64_to_int64_cast(model: &Model, id: NodeId, node: &Node) -> Option<Patch> {
    let g = &model.graph;
    let int64 = DataType::Int64 as i32;
    if attr::get_int(&node.proto, "to") != Some(int64.into()) {
        return None;
    }
    let x = node.input(0)?;
    let x_type = match g.initializer(x) {
        Some(t) => t.dtype() as i32,
        None => g.value_type(x)?.elem,
    };
    if x_type != int64 {
        return None;
    }
    let mut patch = Patch::new("lower-cast");
    patch.add_node(
        "Identity",
        "",
        &[Some(x.into())],
        &[PValue::Old(node.output(0)?)],
        vec![],
    );
    patch.remove_node(id);
    Some(patch)
}

/// `CumSum(x, axis)` of an int64 `x` as `Cast(CumSum(Cast(x, double), axis), int64)`.
/// tract reads every ONNX cast to int64 as a cast to its symbolic-dimension type, which its
/// CumSum cannot sum ("TDim is not a number"): the position ids of RoBERTa's dynamo export
/// (`CumSum(Cast(mask, int64))`) stopped validation and calibration of that model. A float64
/// sum is exact while the sums stay below 2^53 in magnitude (position ids count tokens).
fn int64_cumsum(model: &Model, id: NodeId, node: &Node) -> Option<Patch> {
    let g = &model.graph;
    let data = node.input(0)?;
    let int64 = crate::ir::DataType::Int64 as i32;
    let from_cast_to_int64 = g
        .producer(data)
        .map(|p| g.node(p))
        .is_some_and(|p| p.is("Cast") && attr::get_int(&p.proto, "to") == Some(int64.into()));
    let typed_int64 = g.value_type(data).is_some_and(|t| t.elem == int64);
    if !(from_cast_to_int64 || typed_int64) {
        return None;
    }
    let double = crate::ir::DataType::Double as i64;
    let mut patch = Patch::new("lower-cumsum");
    let wide = patch.op("Cast", "", &[data.into()], vec![attr::int("to", double)]);
    let sum = patch.op(
        "CumSum",
        "",
        &[wide, node.input(1)?.into()],
        node.proto.attribute.clone(),
    );
    patch.add_node(
        "Cast",
        "",
        &[Some(sum)],
        &[PValue::Old(node.output(0)?)],
        vec![attr::int("to", int64.into())],
    );
    patch.remove_node(id);
    Some(patch)
}
