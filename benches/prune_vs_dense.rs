//! Benchmark: what pruning buys and costs, in two tables.
//!
//! a. Full-size BERT-base (materialized from its skeleton): `onnxopt optimize` dense, with
//!    `--prune-heads 0.25 --prune-ffn 0.25`, with `--prune 0.5` and with `--prune 2:4`. File
//!    sizes against the dense output and the original, the sparsity each run reports, and
//!    ONNX Runtime CPU latency (`scripts/ort_latency.py`: 1×128 and 8×128 tokens, 2 threads,
//!    the models run alternately in one process) of the pruned model against the dense one
//!    (the goal) and against the input file.
//! b. The real all-MiniLM-L6-v2 after `--prune 2:4` and after structured pruning, each ranked
//!    by the weights or by activations on the first 8 calibration batches: the cosine of each
//!    held-back sentence's embedding with float32's (`scripts/quant_compare.py`, 20
//!    sentences), to show what pruning without fine-tuning costs.
//!
//! Run it with `cargo bench --bench prune_vs_dense` (needs `pip install onnx onnxruntime
//! numpy`). `-- bert` or `-- minilm` runs one part.

#[cfg(unix)]
mod common;

const REPRODUCE: &str = "cargo bench --bench prune_vs_dense";
const MAX_LATENCY_RATIO: f64 = 0.75;
const MAX_SIZE_RATIO: f64 = 0.8;

fn main() {
    #[cfg(unix)]
    bench::run();
    #[cfg(not(unix))]
    eprintln!("prune_vs_dense shares the benches' Unix-only helpers and only runs on Unix");
}

#[cfg(unix)]
mod bench {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use super::*;
    use common::{file_size, materialize_if_needed, megabytes, verdict};

    pub fn run() {
        let data = common::bench_subdir("prune");
        if common::wanted("bert") {
            bert_base(&data);
        }
        if common::wanted("minilm") {
            minilm(&data);
        }
        println!("\nreproduce: {REPRODUCE}");
    }

    /// `onnxopt optimize INPUT OUTPUT ARGS`, its report read back.
    fn optimize(input: &Path, output: &Path, args: &[&str], label: &str) -> serde_json::Value {
        let report = output.with_extension("report.json");
        let result = Command::new(env!("CARGO_BIN_EXE_onnxopt"))
            .arg("optimize")
            .arg(input)
            .arg(output)
            .args(args)
            .arg("--report")
            .arg(&report)
            .output()
            .expect("run onnxopt");
        assert!(
            result.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        serde_json::from_slice(&std::fs::read(&report).expect("the report")).expect("JSON")
    }

    /// Runs a Python script of `scripts/` and returns its JSON output lines.
    fn script(name: &str, args: &[String]) -> Vec<serde_json::Value> {
        let result = Command::new("python3")
            .arg(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("scripts")
                    .join(name),
            )
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {name}: {e}"));
        assert!(
            result.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        String::from_utf8_lossy(&result.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn path_text(p: &Path) -> String {
        p.to_string_lossy().into_owned()
    }

    fn bert_base(data: &Path) {
        let skeleton: PathBuf = common::skeleton_dir().join("bert-base.ts.skel.onnx");
        let model = common::bench_data_dir().join("bert-base.ts.onnx");
        let sha = materialize_if_needed(&skeleton, &model);
        println!(
            "\na. BERT-base ({}, sha256 {sha})",
            megabytes(file_size(&model))
        );
        let runs: [(&str, &[&str]); 4] = [
            ("dense", &[]),
            (
                "heads25-ffn25",
                &["--prune-heads", "0.25", "--prune-ffn", "0.25"],
            ),
            ("magnitude50", &["--prune", "0.5"]),
            ("2of4", &["--prune", "2:4"]),
        ];
        let mut outputs = Vec::new();
        println!(
            "{:<16} {:>10} {:>9} {:>9} {:>12} {:>9}",
            "run", "size", "vs dense", "vs input", "parameters", "sparsity"
        );
        for (label, args) in runs {
            let out = data.join(format!("bert-base.{label}.onnx"));
            let report = optimize(&model, &out, args, label);
            let p = &report["pruning"];
            let size = file_size(&out);
            let dense = outputs.first().map_or(size, |(_, _, s, _)| *s);
            println!(
                "{label:<16} {:>10} {:>8.3}x {:>8.3}x {:>12} {:>9}",
                megabytes(size),
                size as f64 / dense as f64,
                size as f64 / file_size(&model) as f64,
                p["parameters_after"]
                    .as_u64()
                    .map_or("-".into(), |n| n.to_string()),
                p["sparsity"]
                    .as_f64()
                    .filter(|_| !p["weights"].as_array().is_none_or(Vec::is_empty))
                    .map_or("-".into(), |s| format!("{s:.4}")),
            );
            outputs.push((label, out, size, report));
        }
        // The input too: the dense output is itself faster than the file users start from.
        let mut models: Vec<String> = outputs[..2]
            .iter()
            .map(|(_, p, _, _)| path_text(p))
            .collect();
        models.push(path_text(&model));
        let mut args = models.clone();
        args.extend(["--rounds", "20", "--shape", "1x128", "--shape", "8x128"].map(String::from));
        println!("ONNX Runtime CPU latency, 2 threads (median of 20, alternating):");
        let mut worst = 0.0f64;
        for line in script("ort_latency.py", &args) {
            let medians = &line["median_ms"];
            let median = |k: usize| medians[&models[k]].as_f64().unwrap_or(f64::NAN);
            let (dense, pruned, input) = (median(0), median(1), median(2));
            worst = worst.max(pruned / dense);
            println!(
                "  {:<6} input {input:>8.1} ms, dense {dense:>8.1} ms, heads25-ffn25 {pruned:>8.1} \
                 ms = {:.3}x of dense, {:.3}x of the input",
                line["shape"].as_str().unwrap_or("?"),
                pruned / dense,
                pruned / input
            );
        }
        let size_ratio = outputs[1].2 as f64 / outputs[0].2 as f64;
        println!(
            "goal: latency <= {MAX_LATENCY_RATIO}x of dense: worst {worst:.3}x {}; file <= \
         {MAX_SIZE_RATIO}x of dense: {size_ratio:.3}x {}",
            verdict(worst <= MAX_LATENCY_RATIO),
            verdict(size_ratio <= MAX_SIZE_RATIO)
        );
        // A file holds its parameters: the fraction these flags keep bounds the file's ratio.
        let pruning = &outputs[1].3["pruning"];
        if let (Some(before), Some(after)) = (
            pruning["parameters_before"].as_u64(),
            pruning["parameters_after"].as_u64(),
        ) {
            println!(
                "  heads25-ffn25 keeps {after} of {before} parameters ({:.4}x): no file of them \
                 is smaller than that; heads and FFN pruning leave the embeddings",
                after as f64 / before as f64
            );
        }
    }

    fn minilm(data: &Path) {
        let corpus = common::corpus_dir();
        let model = corpus.join("minilm-l6/all-minilm-l6-v2.ts.onnx");
        let calib = corpus.join("calib/minilm/dynamic");
        // The first 8 batches rank units; 08 and 09 are held back for scoring.
        let ranking = data.join("minilm-calib");
        std::fs::create_dir_all(&ranking).expect("calibration folder");
        for entry in std::fs::read_dir(&calib).expect("calib/minilm/dynamic") {
            let path = entry.expect("dir entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with("batch_08") && !name.starts_with("batch_09") {
                std::fs::copy(&path, ranking.join(&name)).expect("copy a batch");
            }
        }
        let structured = ["--prune-heads", "0.25", "--prune-ffn", "0.25"];
        let by_activations: Vec<&str> = structured
            .iter()
            .copied()
            .chain(["--calib", ranking.to_str().unwrap()])
            .collect();
        let two_of_four_by_activations = ["--prune", "2:4", "--calib", ranking.to_str().unwrap()];
        let runs: [(&str, &[&str]); 4] = [
            ("2of4", &["--prune", "2:4"]),
            ("2of4-activations", &two_of_four_by_activations),
            ("heads25-ffn25-weights", &structured),
            ("heads25-ffn25-activations", &by_activations),
        ];
        let mut models = Vec::new();
        for (label, args) in runs {
            let out = data.join(format!("minilm.{label}.onnx"));
            optimize(&model, &out, args, label);
            models.push(format!("{label}={}", out.display()));
        }
        let mut args = vec![
            path_text(&model),
            path_text(&calib),
            "--eval".into(),
            "batch_08,batch_09".into(),
            "--rounds".into(),
            "10".into(),
        ];
        args.extend(models);
        println!("\nb. all-MiniLM-L6-v2, 20 held-back sentences, ONNX Runtime CPU (2 threads)");
        println!(
            "{:<28} {:>6} {:>9} {:>9} {:>8} {:>8}",
            "model", "size", "mean cos", "min cos", "1x128", "8x128"
        );
        for l in script("quant_compare.py", &args) {
            let ratio = |shape: &str| l["latency"][shape]["ratio"].as_f64().unwrap_or(f64::NAN);
            println!(
                "{:<28} {:>5.3}x {:>9.5} {:>9.5} {:>7.3}x {:>7.3}x",
                l["model"].as_str().unwrap_or("?"),
                l["size_ratio"].as_f64().unwrap_or(f64::NAN),
                l["mean_cosine"].as_f64().unwrap_or(f64::NAN),
                l["min_cosine"].as_f64().unwrap_or(f64::NAN),
                ratio("1x128"),
                ratio("8x128"),
            );
        }
    }
}
