//! Snapshots of `dump`: the text form of two corpus models, and what dead-code elimination
//! removes from a real model when the user drops one of its outputs. Review every change to
//! these files as carefully as code: a snapshot change is a change in what we write.

mod common;

use onnxopt::ir::dump::dump_model;
use onnxopt::passes::{dce::DeadCodeElimination, PassManager};

fn dump(path: &std::path::Path) -> String {
    dump_model(&onnxopt::io::load(path).unwrap().to_proto().unwrap())
}

#[test]
fn dump_of_bert_tiny_legacy_export() {
    insta::assert_snapshot!(dump(&common::testdata("bert-tiny.ts.onnx")));
}

#[test]
fn dump_of_gpt2_tiny_dynamo_export() {
    insta::assert_snapshot!(dump(&common::testdata("gpt2-tiny.dynamo.onnx")));
}

#[test]
fn dce_removes_the_pooler_when_its_output_is_dropped() {
    let mut model = onnxopt::io::load(&common::testdata("bert-tiny.dynamo.onnx")).unwrap();
    let before = dump_model(&model.to_proto().unwrap());
    let g = &mut model.graph;
    let pooler = g.find_value("pooler_output").unwrap();
    g.outputs.retain(|p| p.value != pooler);
    let report = PassManager::new()
        .with(DeadCodeElimination)
        .run(&mut model)
        .unwrap();
    let after = dump_model(&model.to_proto().unwrap());
    let diff = similar::TextDiff::from_lines(&before, &after)
        .unified_diff()
        .context_radius(1)
        .to_string();
    let stats = &report.passes[0];
    insta::assert_snapshot!(format!(
        "nodes {} -> {}, rewrites {:?}\n{diff}",
        stats.nodes_before, stats.nodes_after, stats.rewrites.0
    ));
}
