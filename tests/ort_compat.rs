//! Every corpus model, optimized for both targets, passes `onnx.checker` (full check) and runs
//! in ONNX Runtime with the original's outputs, as `scripts/ort_check.py` checks.
//!
//! The check needs Python with onnx and onnxruntime; their absence fails it unless
//! `ONNXOPT_SKIP_ORT=1` asks to skip.

mod common;

use onnxopt::io::{self, ExternalData};
use onnxopt::passes::fuse::Target;

#[test]
fn optimized_corpus_models_load_and_match_in_onnx_runtime() {
    if !common::onnx_runtime_available() {
        println!("skipped: python3 cannot import onnx, onnxruntime and numpy");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut triples: Vec<String> = Vec::new();
    for path in common::corpus_models() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for target in [Target::Ort, Target::Onnx] {
            let model = common::optimized(&path, target);
            let out = dir.path().join(format!("{}.{name}", target.name()));
            io::save(&model, &out, ExternalData::Auto).unwrap();
            for p in [path.clone(), out, common::calib_dir(&path)] {
                triples.push(p.to_string_lossy().into_owned());
            }
        }
    }
    common::ort_check(&triples);
}
