//! Lossless round trip of every corpus model: load → save → load gives the same IR, the second
//! save is byte-identical to the first (and, for these files, to the original), and tract gives
//! identical outputs for the original and the round-tripped model.

mod common;

use onnxopt::exec::{self, InputSource, ValidateOptions};
use onnxopt::io::{self, ExternalData};

#[test]
fn every_corpus_model_round_trips_losslessly() {
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for path in common::corpus_models() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let original = io::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let first = dir.path().join(format!("first-{name}"));
        io::save(&original, &first, ExternalData::Auto).unwrap();
        let reloaded = io::load(&first).unwrap();
        assert_eq!(
            original.to_proto().unwrap(),
            reloaded.to_proto().unwrap(),
            "{name}: the reloaded model differs"
        );
        let second = dir.path().join(format!("second-{name}"));
        io::save(&reloaded, &second, ExternalData::Auto).unwrap();
        let (a, b) = (
            std::fs::read(&first).unwrap(),
            std::fs::read(&second).unwrap(),
        );
        assert!(a == b, "{name}: the second save differs from the first");
        assert!(
            a == std::fs::read(&path).unwrap(),
            "{name}: the saved bytes differ from the original file"
        );

        let options = ValidateOptions {
            inputs: InputSource::Dir(common::calib_dir(&path)),
            ..Default::default()
        };
        match exec::validate(&original, &reloaded, &options, &|_, _| {}) {
            Ok(v) => {
                for d in &v.outputs {
                    assert_eq!(d.max_abs, 0.0, "{name}: output {} changed", d.name);
                    assert_eq!(d.nonfinite_mismatches, 0, "{name}: output {}", d.name);
                }
                report.push(format!("{name}: identical on {} batches", v.batches.len()));
            }
            Err(e) => panic!("{name}: tract cannot run it: {e}"),
        }
    }
    println!("{}", report.join("\n"));
}
