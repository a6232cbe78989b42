//! Snapshots of `dump`: the text form of two corpus models, what dead-code elimination
//! removes from a real model when the user drops one of its outputs, what the clean-up
//! passes do to a legacy export, and what `canonical` does to a legacy and a tf2onnx export. Review every change to these files as carefully as code: a
//! snapshot change is a change in what we write.

mod common;

use onnxopt::ir::dump::dump_model;
use onnxopt::ir::Model;
use onnxopt::passes::canonical::Canonicalize;
use onnxopt::passes::cse::CommonSubexpressions;
use onnxopt::passes::fold::ConstantFolding;
use onnxopt::passes::identity::IdentityElimination;
use onnxopt::passes::noop::NoOpElimination;
use onnxopt::passes::{dce::DeadCodeElimination, PassManager, PassReport};

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

/// The dump diff of what `passes` do to `model` (whose dump before is `before`).
fn run_and_diff(before: &str, model: &mut Model, passes: PassManager) -> (PassReport, String) {
    let report = passes.run(model).unwrap();
    let after = dump_model(&model.to_proto().unwrap());
    let diff = similar::TextDiff::from_lines(before, &after)
        .unified_diff()
        .context_radius(1)
        .to_string();
    (report, diff)
}

#[test]
fn dce_removes_the_pooler_when_its_output_is_dropped() {
    let mut model = onnxopt::io::load(&common::testdata("bert-tiny.dynamo.onnx")).unwrap();
    let before = dump_model(&model.to_proto().unwrap());
    let g = &mut model.graph;
    let pooler = g.find_value("pooler_output").unwrap();
    g.outputs.retain(|p| p.value != pooler);
    let passes = PassManager::new().with(DeadCodeElimination);
    let (report, diff) = run_and_diff(&before, &mut model, passes);
    let stats = &report.passes[0];
    insta::assert_snapshot!(format!(
        "nodes {} -> {}, rewrites {:?}\n{diff}",
        stats.nodes_before, stats.nodes_after, stats.rewrites.0
    ));
}

#[test]
fn cleanup_of_bert_tiny_legacy_export() {
    let mut model = onnxopt::io::load(&common::testdata("bert-tiny.ts.onnx")).unwrap();
    let before = dump_model(&model.to_proto().unwrap());
    let passes = PassManager::new()
        .with(IdentityElimination)
        .with(CommonSubexpressions)
        .with(NoOpElimination)
        .with(ConstantFolding)
        .with(DeadCodeElimination);
    let (report, diff) = run_and_diff(&before, &mut model, passes);
    let stats: Vec<String> = report
        .passes
        .iter()
        .map(|s| {
            format!(
                "{}: nodes {} -> {}, rewrites {:?}",
                s.pass, s.nodes_before, s.nodes_after, s.rewrites.0
            )
        })
        .collect();
    insta::assert_snapshot!(format!(
        "{} rounds\n{}\n{diff}",
        report.rounds,
        stats.join("\n")
    ));
}

/// What `canonical` (then DCE) does to `model`, types inferred beforehand.
fn canonical_diff(path: &std::path::Path) -> String {
    let mut model = onnxopt::io::load(path).unwrap();
    PassManager::new()
        .with(onnxopt::passes::shape::ShapeInference)
        .run(&mut model)
        .unwrap();
    let before = dump_model(&model.to_proto().unwrap());
    let passes = PassManager::new()
        .with(Canonicalize)
        .with(DeadCodeElimination);
    let (report, diff) = run_and_diff(&before, &mut model, passes);
    format!("rewrites {:?}\n{diff}", report.passes[0].rewrites.0)
}

#[test]
fn canonical_of_bert_tiny_legacy_export() {
    insta::assert_snapshot!(canonical_diff(&common::testdata("bert-tiny.ts.onnx")));
}

#[test]
fn canonical_of_a_tf2onnx_export() {
    let path = common::testdata("wild/tf-distilbert.tf2onnx15.tf215.onnx");
    insta::assert_snapshot!(canonical_diff(&path));
}
