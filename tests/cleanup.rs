//! The clean-up passes (identity, common subexpressions, no-op chains, constant folding) with
//! dead-code elimination, run to a fixpoint on every corpus model. The rewrites are exact, so
//! the result must give exactly the original's outputs on the model's calibration batches,
//! and its file must be no larger than the original. (Folded float arithmetic is exact only up
//! to rounding, see `tests/conformance.rs`; what these models fold comes out exact, even with
//! every intermediate type recorded, so the test asks for 0 rather than a tolerance.)

mod common;

use onnxopt::exec::{self, InputSource, ValidateOptions};
use onnxopt::io::{self, ExternalData};
use onnxopt::ir::Model;
use onnxopt::passes::cse::CommonSubexpressions;
use onnxopt::passes::dce::DeadCodeElimination;
use onnxopt::passes::fold::ConstantFolding;
use onnxopt::passes::identity::IdentityElimination;
use onnxopt::passes::noop::NoOpElimination;
use onnxopt::passes::{PassManager, Rewrites};

fn cleanup() -> PassManager {
    PassManager::new()
        .with(IdentityElimination)
        .with(CommonSubexpressions)
        .with(NoOpElimination)
        .with(ConstantFolding)
        .with(DeadCodeElimination)
}

/// The worst absolute error of `candidate` against `original` over every output.
fn max_error(name: &str, original: &Model, candidate: &Model, calib: InputSource) -> String {
    let options = ValidateOptions {
        inputs: calib,
        ..Default::default()
    };
    match exec::validate(original, candidate, &options, &|_, _| {}) {
        Ok(v) => {
            for d in &v.outputs {
                assert_eq!(d.max_abs, 0.0, "{name}: output {} changed", d.name);
                assert_eq!(d.nonfinite_mismatches, 0, "{name}: output {}", d.name);
            }
            let worst = v.outputs.iter().map(|d| d.max_abs).fold(0.0, f64::max);
            format!("max abs error {worst} on {} batches", v.batches.len())
        }
        Err(e) => panic!("{name}: tract cannot run it: {e}"),
    }
}

#[test]
fn cleanup_is_exact_and_never_grows_a_corpus_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for path in common::corpus_models() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let original = io::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut model = original.clone();
        let passes = cleanup()
            .run(&mut model)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(passes.converged, "{name}: no fixpoint");
        let out = dir.path().join(&name);
        io::save(&model, &out, ExternalData::Auto).unwrap();
        let bytes_before = std::fs::metadata(&path).unwrap().len();
        let bytes_after = std::fs::metadata(&out).unwrap().len();
        assert!(
            bytes_after <= bytes_before,
            "{name}: {bytes_before} -> {bytes_after} bytes"
        );
        let saved = io::load(&out).unwrap();
        let error = max_error(
            &name,
            &original,
            &saved,
            InputSource::Dir(common::calib_dir(&path)),
        );
        let mut rewrites = Rewrites::default();
        for p in &passes.passes {
            rewrites.merge(&p.rewrites);
        }
        let kinds: Vec<String> = rewrites.0.iter().map(|(k, n)| format!("{k} {n}")).collect();
        report.push(format!(
            "{name}: nodes {} -> {}, bytes {bytes_before} -> {bytes_after}, {} rounds, {error}\n    {}",
            original.graph.node_count(),
            saved.graph.node_count(),
            passes.rounds,
            kinds.join(", ")
        ));
    }
    println!("{}", report.join("\n"));
}
