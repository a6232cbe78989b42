//! Every corpus model, optimized for both targets, passes `onnx.checker` (full check) and runs
//! in ONNX Runtime with the original's outputs, as `scripts/ort_check.py` checks.
//!
//! The check needs Python with onnx and onnxruntime. CI installs them and sets
//! `ONNXOPT_REQUIRE_ORT=1`, which makes their absence a failure; elsewhere the test says it
//! skipped and why.

mod common;

use std::process::Command;

use onnxopt::io::{self, ExternalData};
use onnxopt::optimize::{optimize, OptimizeOptions};
use onnxopt::passes::fuse::Target;

fn python_has_onnxruntime() -> bool {
    Command::new("python3")
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn optimized_corpus_models_load_and_match_in_onnx_runtime() {
    if !python_has_onnxruntime() {
        assert!(
            std::env::var_os("ONNXOPT_REQUIRE_ORT").is_none(),
            "ONNXOPT_REQUIRE_ORT is set but python3 cannot import onnx and onnxruntime"
        );
        println!("skipped: python3 cannot import onnx, onnxruntime and numpy");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut triples: Vec<String> = Vec::new();
    for path in common::corpus_models() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for target in [Target::Ort, Target::Onnx] {
            let mut model = io::load(&path).unwrap();
            optimize(&mut model, &OptimizeOptions { target }).unwrap();
            let out = dir.path().join(format!("{}.{name}", target.name()));
            io::save(&model, &out, ExternalData::Auto).unwrap();
            for p in [path.clone(), out, common::calib_dir(&path)] {
                triples.push(p.to_string_lossy().into_owned());
            }
        }
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ort_check.py");
    let result = Command::new("python3")
        .arg(script)
        .args(&triples)
        .output()
        .expect("run scripts/ort_check.py");
    let stdout = String::from_utf8_lossy(&result.stdout);
    println!("{stdout}");
    assert!(
        result.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
}
