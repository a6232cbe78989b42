//! The tract bridge on real models: intermediate values, generated inputs, input files.

mod common;

use onnxopt::exec::{self, inputs, GenerateOptions, InputSource, Runner};

fn bert() -> onnxopt::ir::Model {
    onnxopt::io::load(&common::testdata("bert-tiny.dynamo.onnx")).unwrap()
}

#[test]
fn intermediate_values_can_be_captured_in_one_run() {
    let model = bert();
    let batches = exec::batches_for(
        &model,
        &InputSource::Dir(common::testdata("calib/bert-tiny")),
        &GenerateOptions::default(),
    )
    .unwrap();
    let wanted = ["layer_norm", "val_99", "last_hidden_state"].map(String::from);
    let mut runner = Runner::with_outputs(&model, &wanted).unwrap();
    let values = runner.run(&batches[0]).unwrap();
    let shapes: Vec<(&str, &[usize])> = values
        .iter()
        .map(|(n, t)| (n.as_str(), t.shape()))
        .collect();
    // val_99 is the attention softmax: [batch, heads, sequence, sequence].
    assert_eq!(
        shapes,
        [
            ("layer_norm", &[8, 16, 64][..]),
            ("val_99", &[8, 4, 16, 16][..]),
            ("last_hidden_state", &[8, 16, 64][..])
        ]
    );
    // The captured graph output equals the one of a plain run.
    let plain = Runner::new(&model).unwrap().run(&batches[0]).unwrap();
    assert_eq!(plain[0].1, values[2].1);
    assert!(Runner::with_outputs(&model, &["no_such_value".into()]).is_err());
}

#[test]
fn generated_inputs_are_deterministic_and_index_the_embedding_table() {
    let model = bert();
    let specs = inputs::input_specs(&model).unwrap();
    assert_eq!(
        specs[0].inferred_range,
        Some((0, 999)),
        "input_ids index 1000 rows"
    );
    assert_eq!(
        specs[2].inferred_range,
        Some((0, 1)),
        "token types index 2 rows"
    );
    let options = GenerateOptions {
        dims: [("sequence".to_string(), 5)].into_iter().collect(),
        ..Default::default()
    };
    let a = inputs::generate(&specs, &options, 2).unwrap();
    let b = inputs::generate(&specs, &options, 2).unwrap();
    assert_eq!(a[1].tensors, b[1].tensors);
    assert_ne!(a[0].tensors[0].1, a[1].tensors[0].1, "batches differ");
    let ids = a[0].tensors[0].1.cast_to::<i64>().unwrap().into_owned();
    assert_eq!(ids.shape(), &[1, 5]);
    let view = ids.to_plain_array_view::<i64>().unwrap();
    assert!(view.iter().all(|&v| (0..1000).contains(&v)));
    let mask = a[0].tensors[1].1.cast_to::<i64>().unwrap().into_owned();
    assert!(mask
        .to_plain_array_view::<i64>()
        .unwrap()
        .iter()
        .all(|&v| v == 1));
}

/// Fused for ONNX Runtime, the ids reach their tables through EmbedLayerNormalization (and
/// Casts): the same ranges, which its kernel enforces.
#[test]
fn generated_ids_index_the_tables_of_an_embed_layer_normalization() {
    let model = common::optimized(
        &common::testdata("bert-tiny.dynamo.onnx"),
        onnxopt::passes::fuse::Target::Ort,
    );
    let fused = model
        .graph
        .nodes()
        .any(|(_, n)| n.op_type() == "EmbedLayerNormalization");
    assert!(fused);
    let specs = inputs::input_specs(&model).unwrap();
    assert_eq!(specs[0].inferred_range, Some((0, 999)));
    assert_eq!(specs[2].inferred_range, Some((0, 1)));
}

#[test]
fn input_files_with_a_wrong_shape_or_missing_input_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::testdata("calib/bert-tiny");
    for name in ["input_ids", "attention_mask"] {
        let f = format!("batch_00.{name}.npy");
        std::fs::copy(src.join(&f), dir.path().join(&f)).unwrap();
    }
    let specs = inputs::input_specs(&bert()).unwrap();
    let err = inputs::load_batches(dir.path(), &specs)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no array for input `token_type_ids`"), "{err}");
    let flat = tract_onnx::tract_hir::internal::tract_ndarray::Array1::<i64>::zeros(8);
    let file = std::fs::File::create(dir.path().join("batch_00.token_type_ids.npy")).unwrap();
    ndarray_npy::WriteNpyExt::write_npy(&flat, file).unwrap();
    let err = inputs::load_batches(dir.path(), &specs)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shape [8] does not fit input `token_type_ids`"),
        "{err}"
    );
    // Each array fits its input, but they disagree on `sequence`.
    let short = tract_onnx::tract_hir::internal::tract_ndarray::Array2::<i64>::zeros((8, 10));
    let file = std::fs::File::create(dir.path().join("batch_00.token_type_ids.npy")).unwrap();
    ndarray_npy::WriteNpyExt::write_npy(&short, file).unwrap();
    let err = inputs::load_batches(dir.path(), &specs)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "batch `batch_00`: input `token_type_ids` has sequence = 10 where input `input_ids` \
             has 16"
        ),
        "{err}"
    );
    let empty = tempfile::tempdir().unwrap();
    let err = inputs::load_batches(empty.path(), &specs)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no .npy or .npz file"), "{err}");
}
