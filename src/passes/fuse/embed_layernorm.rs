//! Embeddings + LayerNorm fusion (BERT, DistilBERT, ELECTRA, ALBERT, MPNet, GPT-2, BART),
//! ONNX Runtime only.
//!
//! Matches `LayerNormalization(e, γ, β?)` over the last axis with constant 1-D γ and β, where
//! `e` is a sum of two or three `Gather(table, ids)` (axis 0) of 2-D float32 constant tables
//! of the output's width: `a + b`, `Sum(a, b)`, `(a + b) + c`, `Sum(a + b, c)`,
//! `Sum(c, a + b)` or `Sum(a, b, c)` (what the torch exporters write, and what
//! `LayerNormFusion`'s residual `Sum` makes of it before this pass). The inner sum `a + b`
//! must be read only inside; `e` itself may be read elsewhere too (GPT-2's first residual).
//!
//! Produces `com.microsoft::EmbedLayerNormalization` (`ops::embed_layer_norm`): the ids cast
//! to int32, always passed as `position_ids` (so positions computed any way the model
//! computes them stay what they are), no mask; its `embedding_sum` output replaces `e` where
//! something else reads it. β is a zero vector where the LayerNormalization has none.
//!
//! Safe because the kernel computes `(word + position) + segment` in float32 and then the
//! LayerNorm over the hidden axis, and a float sum is commutative but not associative: the
//! inner pair `a`, `b` goes to the word and position slots (in either order, since
//! `x + y == y + x` bit for bit) and the outer summand `c` to the segment slot, so the sum is
//! the model's bit for bit (`Sum(a, b, c)` is `(a + b) + c` in ONNX Runtime). Which of the
//! pair is the word slot is decided by the shapes the kernel accepts: the word ids must be
//! `[batch, seq]` like the output's leading dims, the position ids `[batch, seq]` or
//! `[1, seq]`, the segment ids exactly the word ids' shape (a `[1, seq]` outer summand's ids
//! are expanded to it, copying ids). Gathers of other shapes are left alone. The
//! LayerNormalization itself is the same normalization with the same ε, rounded as ONNX
//! Runtime's fused kernel rounds it (within a few float32 ulps of its LayerNormalization).
//!
//! Ids: the kernel refuses an id outside its table's rows ("input index out of range"),
//! where `Gather` refuses ids past the end too but reads a negative id `-k` as row
//! `rows - k`: a model given negative ids errors instead of computing. Ids beyond the int32
//! range wrap in the Cast (where `Gather` errors). Tokenizers produce neither; and the
//! position and segment ids the models compute are small and non-negative.

use super::pattern::{add, constant_where, either, int_attr_is, op, value, Match, Pat};
use super::{Built, Declined, Fusion, Rewrite, Rule, Target};
use crate::ir::{attr, DataType, Dim, PValue, Tensor, ValueId};
use crate::ops::embed_layer_norm as eln;
use crate::ops::MS_DOMAIN;

pub struct EmbedLayerNormFusion {
    pub target: Target,
}

impl Fusion for EmbedLayerNormFusion {
    const NAME: &'static str = "fuse-embed-layernorm";

    fn rules() -> Vec<Rule> {
        vec![Rule {
            kind: "embed-layer-norm",
            pattern: embed_layer_norm(),
            build: build_embed_layer_norm,
        }]
    }

    fn target(&self) -> Target {
        self.target
    }
}

fn is_table(t: &crate::ir::Tensor) -> bool {
    t.dims().len() == 2 && t.dtype() == DataType::Float
}

fn is_vector(t: &crate::ir::Tensor) -> bool {
    t.dims().len() == 1 && t.dtype() == DataType::Float
}

/// `Gather(table, ids)` along axis 0, its output bound to `embedding`.
fn gather(table: &'static str, ids: &'static str, embedding: &'static str) -> Pat {
    op("Gather", [constant_where(table, is_table), value(ids)])
        .attr("axis", |a| int_attr_is(a, 0, 0))
        .named(embedding)
}

/// `(a + b) + c` or `a + b`, as Adds or Sums, bound to `sum`.
fn embedding_sum() -> Pat {
    let a = gather("table_a", "ids_a", "a");
    let b = gather("table_b", "ids_b", "b");
    let c = gather("table_c", "ids_c", "c");
    let pair = add(a.clone(), b.clone()).named("pair");
    either([
        add(pair.clone(), c.clone()),
        op("Sum", [pair.clone(), c.clone()]),
        op("Sum", [c.clone(), pair]),
        op("Sum", [a.clone(), b.clone(), c]),
        add(a.clone(), b.clone()),
        op("Sum", [a, b]),
    ])
    .named("sum")
}

fn embed_layer_norm() -> Pat {
    let gamma = constant_where("gamma", is_vector);
    either([
        op(
            "LayerNormalization",
            [
                embedding_sum(),
                gamma.clone(),
                constant_where("beta", is_vector),
            ],
        )
        .node("ln"),
        op("LayerNormalization", [embedding_sum(), gamma]).node("ln"),
    ])
}

/// One summand: its table, ids, and the ids' dims.
struct Summand {
    table: ValueId,
    ids: ValueId,
    ids_dims: Vec<Dim>,
    int32: bool,
}

fn summand(
    m: &Match,
    rw: &Rewrite,
    hidden: i64,
    table: &'static str,
    ids: &'static str,
) -> std::result::Result<Summand, Declined> {
    let (table, ids) = (m.get(table)?, m.get(ids)?);
    let rows = rw.constant_of(table)?.dims().to_vec();
    let ids_type = rw.graph.value_type(ids);
    let elem = ids_type.as_ref().map(|t| t.elem);
    let int32 = elem == Some(DataType::Int32 as i32);
    let ids_dims = ids_type.and_then(|t| t.shape).unwrap_or_default();
    if rows[1] != hidden || rows[0] > i64::from(i32::MAX) {
        return Err(Declined::Contract {
            op: "EmbedLayerNormalization",
            why: format!("a table of {rows:?} for hidden size {hidden}"),
        });
    }
    if !(int32 || elem == Some(DataType::Int64 as i32)) || ids_dims.len() != 2 {
        return Err(Declined::NotProven("2-D int32 or int64 ids".into()));
    }
    Ok(Summand {
        table,
        ids,
        ids_dims,
        int32,
    })
}

fn build_embed_layer_norm(m: &Match, rw: &mut Rewrite) -> Built {
    rw.require_ort()?;
    let g = rw.graph;
    let ln = g.node(m.node("ln").ok_or(Declined::Missing("ln"))?);
    let sum = m.get("sum")?;
    let dims = g.value_type(sum).and_then(|t| t.shape).unwrap_or_default();
    let [batch, seq, hidden] = &dims[..] else {
        return Err(Declined::NotProven(
            "the sum is [batch, seq, hidden]".into(),
        ));
    };
    let hidden = hidden
        .value()
        .ok_or_else(|| Declined::NotProven("a known hidden size".into()))?;
    let axis = attr::get_int(&ln.proto, "axis").unwrap_or(-1);
    let stash_type = attr::get_int(&ln.proto, "stash_type").unwrap_or(1);
    let params_fit = [m.value("gamma"), m.value("beta")]
        .into_iter()
        .flatten()
        .all(|p| g.constant(p).is_some_and(|t| t.dims() == [hidden]));
    if !(axis == -1 || axis == 2) || stash_type != 1 || !params_fit {
        return Err(Declined::NotProven(
            "a LayerNormalization over the last axis with γ and β of its width".into(),
        ));
    }
    let epsilon = attr::get_float(&ln.proto, "epsilon").unwrap_or(1e-5);

    // The inner pair to the word and position slots, the outer summand to the segment slot.
    let a = summand(m, rw, hidden, "table_a", "ids_a")?;
    let b = summand(m, rw, hidden, "table_b", "ids_b")?;
    let c = match m.value("c") {
        Some(_) => Some(summand(m, rw, hidden, "table_c", "ids_c")?),
        None => None,
    };
    // A summand's seq may be `Min(k, seq)` (BERT's sliced position buffer): the model runs
    // only where it is seq, and the kernel checks it ("input_ids and position_ids shall have
    // same sequence_length").
    let seq_fits = |s: &Summand| s.ids_dims[1].equals_where_broadcast(seq);
    let batch_seq = |s: &Summand| s.ids_dims[0].same(batch) && s.ids_dims[1].same(seq);
    let one_seq = |s: &Summand| s.ids_dims[0].value() == Some(1) && seq_fits(s);
    let (word, position) = match (batch_seq(&a), batch_seq(&b)) {
        (true, _) if batch_seq(&b) || one_seq(&b) => (a, b),
        (false, true) if one_seq(&a) => (b, a),
        _ => {
            return Err(Declined::Contract {
                op: "EmbedLayerNormalization",
                why: "word ids [batch, seq] and position ids [batch | 1, seq]".into(),
            })
        }
    };
    let expand_segment = match &c {
        Some(c) if batch_seq(c) => false,
        Some(c) if one_seq(c) => true,
        Some(_) => {
            return Err(Declined::Contract {
                op: "EmbedLayerNormalization",
                why: "segment ids [batch | 1, seq]".into(),
            })
        }
        None => false,
    };

    let to_int32 = |rw: &mut Rewrite, ids: PValue, int32: bool| {
        if int32 {
            ids
        } else {
            let to = attr::int("to", DataType::Int32 as i64);
            rw.op("Cast", "", &[ids], vec![to])
        }
    };
    let input_ids = to_int32(rw, word.ids.into(), word.int32);
    let position_ids = to_int32(rw, position.ids.into(), position.int32);
    let segment = match c {
        Some(c) => {
            let mut ids: PValue = c.ids.into();
            if expand_segment {
                let shape = rw.op("Shape", "", &[word.ids.into()], vec![]);
                ids = rw.op("Expand", "", &[ids, shape], vec![]);
            }
            Some((to_int32(rw, ids, c.int32), c.table))
        }
        None => None,
    };
    let beta = match m.value("beta") {
        Some(beta) => beta.into(),
        None => {
            let zeros = vec![0.0; hidden as usize];
            let tensor = Tensor::from_f32("embed_layer_norm_beta", &[hidden], &zeros)
                .map_err(|e| Declined::Refused(e.to_string()))?;
            rw.constant("embed_layer_norm_beta", tensor)
        }
    };
    let mut inputs: Vec<Option<PValue>> = vec![None; eln::POSITION_IDS + 1];
    inputs[eln::INPUT_IDS] = Some(input_ids);
    inputs[eln::WORD_EMBEDDING] = Some(word.table.into());
    inputs[eln::POSITION_EMBEDDING] = Some(position.table.into());
    if let Some((ids, table)) = segment {
        inputs[eln::SEGMENT_IDS] = Some(ids);
        inputs[eln::SEGMENT_EMBEDDING] = Some(table.into());
    }
    inputs[eln::GAMMA] = Some(m.get("gamma")?.into());
    inputs[eln::BETA] = Some(beta);
    inputs[eln::POSITION_IDS] = Some(position_ids);
    // The sum read outside the match comes from `embedding_sum`; `mask_index` is required
    // only when it is the last output (`ops::embed_layer_norm`).
    let ln_id = m.node("ln").ok_or(Declined::Missing("ln"))?;
    let sum_read = g.is_graph_output(sum) || g.uses(sum).iter().any(|&(r, _)| r != ln_id);
    let outputs = rw.op_with_outputs(
        "EmbedLayerNormalization",
        MS_DOMAIN,
        &inputs,
        &[true, !sum_read, sum_read],
        vec![attr::float("epsilon", epsilon)],
    );
    let out = outputs[0].ok_or(Declined::Missing("output"))?;
    rw.replace(rw.root_of(m)?, out);
    if sum_read {
        let embedding_sum = outputs[2].ok_or(Declined::Missing("embedding_sum"))?;
        rw.replace(sum, embedding_sum);
    }
    Ok(())
}
