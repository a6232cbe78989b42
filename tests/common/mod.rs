//! Shared helpers of the integration tests.
#![allow(dead_code)]

pub mod chain;

use std::path::{Path, PathBuf};

/// The shared corpus (`../shared/corpus` beside the checkout, or `$ONNXOPT_CORPUS`). Tests
/// that need it fail when it is missing rather than pass without checking anything.
pub fn corpus() -> PathBuf {
    let dir = std::env::var_os("ONNXOPT_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus"));
    assert!(
        dir.join("README.md").is_file(),
        "the shared corpus is not at {} (set ONNXOPT_CORPUS)",
        dir.display()
    );
    dir
}

pub fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

/// Every model of the corpus that a round trip must survive: the tiny models and MiniLM.
pub fn corpus_models() -> Vec<PathBuf> {
    let corpus = corpus();
    let mut models: Vec<PathBuf> = std::fs::read_dir(corpus.join("tiny"))
        .expect("corpus/tiny")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    models.sort();
    models.push(corpus.join("minilm-l6/all-minilm-l6-v2.ts.onnx"));
    models
}

/// The calibration folder that holds inputs for `model` (`bert-tiny.ts.onnx` → `calib/bert-tiny`).
pub fn calib_dir(model: &Path) -> PathBuf {
    let name = model.file_name().unwrap().to_string_lossy();
    let family = name.split('.').next().unwrap();
    let corpus = corpus();
    if family.starts_with("all-minilm") {
        corpus.join("calib/minilm/dynamic")
    } else {
        corpus.join("calib").join(family)
    }
}

/// True when python3 can import onnx, onnxruntime and numpy, which the ONNX Runtime checks
/// need. Their absence fails the test: skipping is an explicit choice, `ONNXOPT_SKIP_ORT=1`.
pub fn onnx_runtime_available() -> bool {
    if opted_out(&["ONNXOPT_SKIP_ORT"]) {
        return false;
    }
    let available = std::process::Command::new("python3")
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        available,
        "python3 cannot import onnx, onnxruntime and numpy (pip install onnx onnxruntime numpy), \
         which the ONNX Runtime checks need; set ONNXOPT_SKIP_ORT=1 to skip them"
    );
    true
}

/// True when the ONNX Runtime engine (`exec::ort`) has loaded its library. Its absence fails
/// the test: skipping is an explicit choice, `ONNXOPT_SKIP_ORT=1` or
/// `ONNXOPT_SKIP_ORT_ENGINE=1` (CI runs the tests once without the library that way).
pub fn ort_engine_available() -> bool {
    if opted_out(&["ONNXOPT_SKIP_ORT", "ONNXOPT_SKIP_ORT_ENGINE"]) {
        return false;
    }
    match onnxopt::exec::ort::available() {
        Ok(path) => {
            println!("ONNX Runtime: {}", path.display());
            true
        }
        Err(why) => panic!(
            "ONNX Runtime is not available to the engine: {why}; set ONNXOPT_SKIP_ORT_ENGINE=1 \
             to skip the checks that need it"
        ),
    }
}

/// True (with a line saying so) when one of `vars` is set to a non-empty value.
fn opted_out(vars: &[&str]) -> bool {
    match vars
        .iter()
        .find(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
    {
        Some(var) => {
            println!("skipped: {var} is set");
            true
        }
        None => false,
    }
}

/// Runs `scripts/ort_check.py` with `args` (options, then ORIGINAL CHECKED INPUT_DIR
/// triples), prints its report and fails the test if any model fails it.
pub fn ort_check(args: &[String]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ort_check.py");
    let result = std::process::Command::new("python3")
        .arg(script)
        .args(args)
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

/// The unified diff of two models' dumps, without context lines: what a rewrite changed.
pub fn dump_diff(before: &onnxopt::ir::Model, after: &onnxopt::ir::Model) -> String {
    let dump = |m: &onnxopt::ir::Model| onnxopt::ir::dump::dump_model(&m.to_proto().unwrap());
    similar::TextDiff::from_lines(&dump(before), &dump(after))
        .unified_diff()
        .context_radius(0)
        .to_string()
}

/// Models for `scripts/ort_check.py` (ORIGINAL CHECKED INPUT_DIR triples), grouped by the
/// bound each must keep (the script's options).
#[derive(Default)]
pub struct OrtChecks(std::collections::BTreeMap<Vec<String>, Vec<String>>);

impl OrtChecks {
    /// `checked` must keep a cosine of `min_cosine` with `original` on every output.
    pub fn add(&mut self, min_cosine: &str, original: &Path, checked: &Path, inputs: &Path) {
        let bound = vec!["--min-cosine".to_string(), min_cosine.to_string()];
        self.add_with(bound, original, checked, inputs);
    }

    /// `checked` must give `original`'s outputs within 1e-4.
    pub fn add_exact(&mut self, original: &Path, checked: &Path, inputs: &Path) {
        let bound = vec!["--atol".to_string(), "1e-4".to_string()];
        self.add_with(bound, original, checked, inputs);
    }

    fn add_with(&mut self, bound: Vec<String>, original: &Path, checked: &Path, inputs: &Path) {
        let group = self.0.entry(bound).or_default();
        for p in [original, checked, inputs] {
            group.push(p.to_string_lossy().into_owned());
        }
    }

    /// Runs every group (unless `ONNXOPT_SKIP_ORT` is set).
    pub fn run(self) {
        if !onnx_runtime_available() {
            return;
        }
        for (bound, triples) in self.0 {
            ort_check(&[bound, triples].concat());
        }
    }
}

/// The standard `Attention` nodes of `model` in their 3-D form (`q_num_heads` set: the heads'
/// split and merge inside the operator, `passes::fuse::attention::flat_heads`).
pub fn flat_attentions(model: &onnxopt::ir::Model) -> usize {
    model
        .graph
        .nodes()
        .filter(|(_, n)| n.op_type() == "Attention" && n.domain().is_empty())
        .filter(|(_, n)| onnxopt::ir::attr::get_int(&n.proto, "q_num_heads").is_some())
        .count()
}

/// The model at `path` after the optimize pipeline for `target`.
pub fn optimized(path: &Path, target: onnxopt::passes::fuse::Target) -> onnxopt::ir::Model {
    optimized_with(path, target, Vec::new())
}

/// The model at `path` optimized for `target` as `pipeline` optimizes it before INT8
/// quantization or float16 conversion: without the EmbedLayerNormalization fusion, which
/// would keep the embedding tables float32 (`pipeline::Options::optimize_options`).
pub fn optimized_to_convert(
    path: &Path,
    target: onnxopt::passes::fuse::Target,
) -> onnxopt::ir::Model {
    let mut model = onnxopt::io::load(path).unwrap();
    let options = onnxopt::optimize::OptimizeOptions {
        target,
        skip: vec!["fuse-embed-layernorm".to_string()],
        ..Default::default()
    };
    onnxopt::optimize::optimize(&mut model, &options).unwrap();
    model
}

/// The model at `path` after `passes` of the optimize pipeline (all when empty) for `target`.
pub fn optimized_with(
    path: &Path,
    target: onnxopt::passes::fuse::Target,
    passes: Vec<String>,
) -> onnxopt::ir::Model {
    let mut model = onnxopt::io::load(path).unwrap();
    let options = onnxopt::optimize::OptimizeOptions {
        target,
        passes,
        ..Default::default()
    };
    onnxopt::optimize::optimize(&mut model, &options).unwrap();
    model
}

/// Whether tract gives `a` and `b` the same outputs (within 1e-4) on the batches in `inputs`.
pub fn same_outputs(
    a: &onnxopt::ir::Model,
    b: &onnxopt::ir::Model,
    inputs: &Path,
) -> Result<(), String> {
    use onnxopt::exec::{self, InputSource, Tolerance, ValidateOptions};
    let options = ValidateOptions {
        inputs: InputSource::Dir(inputs.to_path_buf()),
        tolerance: Tolerance {
            max_abs_scaled: None,
            max_abs: Some(1e-4),
            ..Default::default()
        },
        ..Default::default()
    };
    match exec::validate(a, b, &options, &|_, _| {}) {
        Ok(v) if v.passed() => Ok(()),
        Ok(v) => Err(format!("{:?}", v.violations)),
        Err(e) => Err(e.to_string()),
    }
}

/// Writes `values` as a float32 `.npy` array of `dims` (NPY format 1.0), the batch format
/// the calibration folders and `scripts/ort_check.py` read.
pub fn write_npy_f32(path: &Path, dims: &[i64], values: &[f32]) {
    assert_eq!(dims.iter().product::<i64>() as usize, values.len());
    let shape: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    let shape = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + newline: a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

/// What ONNX Runtime's session runs after its load-time fusions, one JSON object per model
/// (`scripts/ort_session_ops.py`: `model`, and `ops`, the operator histogram).
#[allow(dead_code)]
pub fn session_ops(models: &[&Path]) -> Vec<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ort_session_ops.py");
    let run = std::process::Command::new("python3")
        .arg(script)
        .args(models)
        .output()
        .expect("run scripts/ort_session_ops.py");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}
