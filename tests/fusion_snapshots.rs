//! One snapshot per fusion: the `dump` diff that the fusion pass (then dead-code elimination)
//! makes on a small corpus model, with types inferred and spellings made canonical
//! (`passes::canonical`, which the fusions expect, then dead code dropped) beforehand so the
//! diff shows only the rewrite. Each also runs both graphs in tract on the model's calibration batches.
//! Review these as carefully as code: a changed snapshot is a changed rewrite.

mod common;

use onnxopt::ir::dump::dump_model;
use onnxopt::ir::Model;
use onnxopt::passes::canonical::Canonicalize;
use onnxopt::passes::dce::DeadCodeElimination;
use onnxopt::passes::fuse::attention::AttentionFusion;
use onnxopt::passes::fuse::embed_layernorm::EmbedLayerNormFusion;
use onnxopt::passes::fuse::gelu::GeluFusion;
use onnxopt::passes::fuse::layernorm::LayerNormFusion;
use onnxopt::passes::fuse::rotary::RotaryFusion;
use onnxopt::passes::fuse::Target;
use onnxopt::passes::shape::ShapeInference;
use onnxopt::passes::shape_of::ShapeFromInputs;
use onnxopt::passes::{Pass, PassManager};

/// Loads `corpus/tiny/<model>`, infers types, makes spellings canonical, applies `fusion` and
/// DCE, checks the outputs in tract, and returns the rewrite counts and the dump diff.
fn fused_diff(model: &str, fusion: impl Pass + 'static) -> String {
    let path = common::corpus().join("tiny").join(model);
    diff_of(&path, &common::calib_dir(&path), fusion)
}

/// `fused_diff` of the wild corpus model `stem` (`testdata/wild/`).
fn wild_fused_diff(stem: &str, fusion: impl Pass + 'static) -> String {
    let wild = common::testdata("wild");
    let path = wild.join(format!("{stem}.onnx"));
    diff_of(&path, &wild.join("calib").join(stem), fusion)
}

fn diff_of(path: &std::path::Path, calib: &std::path::Path, fusion: impl Pass + 'static) -> String {
    diff_of_passes(path, calib, PassManager::new().with(fusion))
}

/// `diff_of` for several passes run together to their fixpoint (a fusion's rewrite of what
/// another fused); the first line gives each fusion's rewrite counts.
fn diff_of_passes(path: &std::path::Path, calib: &std::path::Path, fusions: PassManager) -> String {
    let model = path.file_name().unwrap().to_string_lossy();
    let mut typed = onnxopt::io::load(path).unwrap();
    PassManager::new()
        .with(ShapeInference)
        .with(ShapeFromInputs)
        .with(Canonicalize)
        .with(DeadCodeElimination)
        .run(&mut typed)
        .unwrap();
    let before = dump_model(&typed.to_proto().unwrap());
    let mut fused: Model = typed.clone();
    let report = fusions.with(DeadCodeElimination).run(&mut fused).unwrap();
    let same = common::same_outputs(&typed, &fused, calib);
    assert!(same.is_ok(), "{model}: {same:?}");
    let after = dump_model(&fused.to_proto().unwrap());
    let diff = similar::TextDiff::from_lines(&before, &after)
        .unified_diff()
        .context_radius(0)
        .to_string();
    let rewrites: Vec<String> = report
        .passes
        .iter()
        .filter(|p| p.pass.starts_with("fuse-"))
        .map(|p| format!("{:?}", p.rewrites.0))
        .collect();
    format!("rewrites {}\n{diff}", rewrites.join(" "))
}

#[test]
fn gelu_erf_form_legacy_export() {
    let diff = fused_diff(
        "bert-tiny.ts.onnx",
        GeluFusion {
            target: Target::Onnx,
        },
    );
    insta::assert_snapshot!(diff);
}

#[test]
fn bias_gelu_from_a_dynamo_gelu_node() {
    let diff = fused_diff(
        "bert-tiny.dynamo.onnx",
        GeluFusion {
            target: Target::Ort,
        },
    );
    insta::assert_snapshot!(diff);
}

#[test]
fn gelu_tanh_form_gpt2() {
    let diff = fused_diff(
        "gpt2-tiny.dynamo.onnx",
        GeluFusion {
            target: Target::Ort,
        },
    );
    insta::assert_snapshot!(diff);
}

#[test]
fn layer_norm_written_out_at_opset_14() {
    let diff = fused_diff(
        "bert-tiny.ts14.onnx",
        LayerNormFusion {
            target: Target::Onnx,
        },
    );
    insta::assert_snapshot!(diff);
}

#[test]
fn layer_norm_at_opset_11_raised_to_17() {
    let diff = wild_fused_diff(
        "deit.ts11.t21.eager",
        LayerNormFusion {
            target: Target::Onnx,
        },
    );
    insta::assert_snapshot!(diff);
}

#[test]
fn layer_norm_tf2onnx() {
    let diff = wild_fused_diff(
        "tf-distilbert.tf2onnx15.tf215",
        LayerNormFusion {
            target: Target::Ort,
        },
    );
    insta::assert_snapshot!(diff);
}

#[test]
fn rms_norm_t5() {
    let diff = fused_diff(
        "t5-encoder-tiny.dynamo.onnx",
        LayerNormFusion {
            target: Target::Onnx,
        },
    );
    insta::assert_snapshot!(diff);
}

#[test]
fn residual_sum_bert() {
    let diff = fused_diff(
        "bert-tiny.dynamo.onnx",
        LayerNormFusion {
            target: Target::Ort,
        },
    );
    insta::assert_snapshot!(diff);
}

/// BERT's embeddings (legacy exporter, opset 17): `(word + token_type) + position`, the
/// position ids a `[1, Min(64, sequence)]` slice of the buffer. The pair goes to the word and
/// position slots, the position Gather to the segment slot, its ids expanded to the batch.
#[test]
fn embed_layer_norm_bert_legacy() {
    let diff = wild_fused_diff(
        "bert.ts17.t24.sdpa",
        EmbedLayerNormFusion {
            target: Target::Ort,
        },
    );
    insta::assert_snapshot!(diff);
}

#[test]
fn attention_bert_sdpa_dynamo_for_onnx_runtime() {
    let diff = fused_diff(
        "bert-tiny.dynamo.onnx",
        AttentionFusion {
            target: Target::Ort,
        },
    );
    insta::assert_snapshot!(diff);
}

#[test]
fn attention_bert_sdpa_legacy_standard_op() {
    let diff = fused_diff(
        "bert-tiny.ts.onnx",
        AttentionFusion {
            target: Target::Onnx,
        },
    );
    insta::assert_snapshot!(diff);
}

/// GPT-2 with its cache, for ONNX Runtime: MultiHeadAttention with past and present, its
/// scale on the query (`attention-unit-scale`: a decoding step's scores take MLAS' one-row
/// path only at scale 1).
#[test]
fn attention_gpt2_with_past_for_onnx_runtime() {
    let diff = fused_diff(
        "gpt2-tiny-past.dynamo.onnx",
        AttentionFusion {
            target: Target::Ort,
        },
    );
    insta::assert_snapshot!(diff);
}

#[test]
fn attention_gpt2_split_qkv_legacy() {
    let diff = fused_diff(
        "gpt2-tiny.ts.onnx",
        AttentionFusion {
            target: Target::Ort,
        },
    );
    insta::assert_snapshot!(diff);
}

#[test]
fn attention_t5_relative_bias_unscaled() {
    let diff = fused_diff(
        "t5-encoder-tiny.dynamo.onnx",
        AttentionFusion {
            target: Target::Ort,
        },
    );
    insta::assert_snapshot!(diff);
}

#[test]
fn attention_vit_without_mask() {
    let diff = fused_diff(
        "vit-tiny.ts.onnx",
        AttentionFusion {
            target: Target::Onnx,
        },
    );
    insta::assert_snapshot!(diff);
}

#[test]
fn attention_mpnet_position_bias_and_mask() {
    // MPNet adds its relative position bias, then the padding mask: one attention_bias.
    let diff = wild_fused_diff(
        "mpnet.ts14.t21.eager",
        AttentionFusion {
            target: Target::Ort,
        },
    );
    insta::assert_snapshot!(diff);
}

/// A decoder LLM's grouped-query attention (`testdata/llm`, Llama-3: 4 query heads over 2
/// key/value heads, each repeated twice by `repeat_kv`; torch's dynamo exporter at opset 20):
/// the standard Attention on the rotated heads, the mask's float32 lowest rewritten for ONNX
/// Runtime's kernel, SDPA's NaN clean-up on its output.
#[test]
fn attention_grouped_query_llama_dynamo() {
    let llm = common::testdata("llm");
    let diff = diff_of(
        &llm.join("llama3.prefill.dynamo20.onnx"),
        &llm.join("calib").join("prefill"),
        AttentionFusion {
            target: Target::Ort,
        },
    );
    insta::assert_snapshot!(diff);
}

/// The same block with a cache, its RoPE fused first (`testdata/llm`, Llama-3, dynamo at opset
/// 20): the grouped rule's `Attention` on 4-D heads, then the heads' split and merge moved
/// inside it (`attention-flat-heads`): `q_num_heads`/`kv_num_heads` on the projections'
/// `[batch, sequence, N·16]` rows, RotaryEmbedding with `num_heads` on the same rows, the
/// past and presents still `[batch, 2, ·, 16]`; then, for ONNX Runtime, the scale on the
/// query (`attention-unit-scale`: `Mul` by 0.25, `scale=1.0`) and the three projections one
/// product split three ways (`attention-packed-projections`).
#[test]
fn attention_grouped_query_with_cache_flat_heads() {
    let llm = common::testdata("llm");
    let target = Target::Ort;
    let diff = diff_of_passes(
        &llm.join("llama3.past.dynamo20.onnx"),
        &llm.join("calib").join("past"),
        // Types inferred before each round, as the pipeline does: tract's lowering of the
        // fused RotaryEmbedding reads its tables' element type.
        PassManager::new()
            .with(ShapeInference)
            .with(RotaryFusion { target })
            .with(AttentionFusion { target }),
    );
    insta::assert_snapshot!(diff);
}
