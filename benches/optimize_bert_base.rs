//! Benchmark: `onnxopt optimize --passes dce` (load + DCE + save) of full-size BERT-base
//! against copying the same file. (The whole pipeline, fusions included, is timed against
//! ONNX Runtime's optimizer by `fusion_vs_ort`.)
//!
//! The requirement it checks: optimizing the 438 MB BERT-base model takes at most 3x the time
//! of copying the file, with a peak RSS of at most 1.5x the file size. Copying is the floor
//! for any tool that reads a model and writes it back, so the ratio says how much the
//! optimizer costs beyond moving the bytes, independent of the machine's disk and memory.
//!
//! What it does, for each BERT-base export in the corpus (`bert-base.ts`, `bert-base.dynamo`):
//!
//! 1. Materializes the full-size model from its skeleton
//!    (`../shared/corpus/skeletons/<name>.skel.onnx`, or `$ONNXOPT_CORPUS/skeletons`) into
//!    `target/bench-data/<name>.onnx`, following the fill algorithm of
//!    `skeletons/materialize.py` (SplitMix64 + Box-Muller, see `onnxopt::exec::rng`), and
//!    checks the result against the sha256 the skeleton records. An existing output with the
//!    right hash is reused.
//! 2. Warms the page cache, then times, interleaved round by round so both see the same
//!    writeback pressure: `std::fs::copy` of the file, `onnxopt optimize --passes dce IN OUT`
//!    and the same with `--external-data` (the latter reported only). Each optimize
//!    runs as a child process; its peak RSS comes from `wait4`'s rusage, after resetting
//!    the bench's own peak (which a child spawned on Linux would otherwise inherit).
//! 3. Prints medians, the optimize/copy time ratio and the RSS/file-size ratio against the
//!    goals.
//!
//! Run it with `cargo bench --bench optimize_bert_base` (optionally followed by `-- ts` or
//! `-- dynamo` to pick one export). `ONNXOPT_BENCH_RUNS` sets the number of measured rounds
//! (5), which follow one unrecorded warm-up round.

#[cfg(unix)]
mod common;

/// The exports measured, by skeleton name (`<name>.skel.onnx`).
const MODELS: [&str; 2] = ["bert-base.ts", "bert-base.dynamo"];
const MAX_TIME_RATIO: f64 = 3.0;
const MAX_RSS_RATIO: f64 = 1.5;
const DEFAULT_RUNS: usize = 5;
const REPRODUCE: &str = "cargo bench --bench optimize_bert_base";

fn main() {
    #[cfg(unix)]
    bench::run();
    #[cfg(not(unix))]
    eprintln!("optimize_bert_base measures peak RSS with wait4 and only runs on Unix");
}

#[cfg(unix)]
mod bench {
    use std::path::Path;
    use std::process::Command;
    use std::time::Instant;

    use super::*;
    use common::{
        file_size, materialize_if_needed, megabytes, read_through, remove_if_present, run_measured,
        verdict, with_suffix, ChildRun, Samples, ShaCheck,
    };

    pub fn run() {
        let skeleton_dir = common::skeleton_dir();
        let data_dir = common::bench_data_dir();
        let runs = common::runs(DEFAULT_RUNS);
        let mut results = Vec::new();
        for name in MODELS {
            // Arguments pick models by substring.
            if !common::wanted(name) {
                continue;
            }
            let skeleton = skeleton_dir.join(format!("{name}.skel.onnx"));
            let model = data_dir.join(format!("{name}.onnx"));
            let sha = materialize_if_needed(&skeleton, &model);
            results.push(measure(name, &model, &data_dir, runs, sha));
        }
        println!();
        for result in &results {
            result.print();
        }
        println!("reproduce: {REPRODUCE}");
    }

    /// Runs `onnxopt optimize [extra] input output` as a child process.
    fn run_optimize(input: &Path, output: &Path, extra: &[&str], log_dir: &Path) -> ChildRun {
        let mut command = Command::new(env!("CARGO_BIN_EXE_onnxopt"));
        command.arg("optimize").args(extra).arg(input).arg(output);
        run_measured(&mut command, log_dir, "optimize").unwrap_or_else(|failure| {
            panic!(
                "`onnxopt optimize {} {} {}` {failure}",
                extra.join(" "),
                input.display(),
                output.display()
            )
        })
    }

    /// Everything measured on one model.
    pub struct ModelResult {
        name: String,
        file_bytes: u64,
        sha: ShaCheck,
        load_average: String,
        copy: Samples,
        optimize: Samples,
        optimize_rss: u64,
        optimized_bytes: u64,
        external: Samples,
        external_rss: u64,
        external_bytes: (u64, u64),
        /// The bench process's largest RSS when starting a child (included in the peaks).
        parent_rss: u64,
    }

    fn measure(
        name: &str,
        model: &Path,
        data_dir: &Path,
        runs: usize,
        sha: ShaCheck,
    ) -> ModelResult {
        let file_bytes = file_size(model);
        let copy_path = data_dir.join("copy.onnx");
        let optimized = data_dir.join("optimized.onnx");
        let external = data_dir.join("optimized-external.onnx");
        let external_data = with_suffix(&external, ".data");
        let outputs = [&copy_path, &optimized, &external, &external_data];
        for path in outputs {
            remove_if_present(path);
        }

        // Flush earlier writes (the materialized model), then warm the page cache so no
        // measurement pays for reading the disk or for writeback it did not cause.
        common::sync_filesystems();
        let mut warm_bytes = 0u64;
        read_through(model, |chunk| warm_bytes += chunk.len() as u64);
        assert_eq!(warm_bytes, file_bytes, "`{}` changed size", model.display());

        let load_average = common::load_average();
        println!(
            "{name}: 1 warm-up + {runs} rounds of copy / optimize / optimize --external-data \
             (load average {load_average})"
        );
        let mut result = ModelResult {
            name: name.to_string(),
            file_bytes,
            sha,
            load_average,
            copy: Samples::default(),
            optimize: Samples::default(),
            optimize_rss: 0,
            optimized_bytes: 0,
            external: Samples::default(),
            external_rss: 0,
            external_bytes: (0, 0),
            parent_rss: 0,
        };
        // Round 0 is a warm-up (the first writes after a sync are slower); it is not recorded.
        for round in 0..=runs {
            let start = Instant::now();
            std::fs::copy(model, &copy_path)
                .unwrap_or_else(|e| panic!("cannot copy to `{}`: {e}", copy_path.display()));
            let copy = start.elapsed();
            let run = run_optimize(model, &optimized, &["--passes", "dce"], data_dir);
            let ext = run_optimize(
                model,
                &external,
                &["--passes", "dce", "--external-data"],
                data_dir,
            );

            let label = if round == 0 {
                "warm-up".to_string()
            } else {
                result.copy.push(copy);
                result.optimize.push(run.wall);
                result.external.push(ext.wall);
                result.optimize_rss = result.optimize_rss.max(run.peak_rss_bytes);
                result.external_rss = result.external_rss.max(ext.peak_rss_bytes);
                result.parent_rss = result
                    .parent_rss
                    .max(run.parent_rss_bytes.max(ext.parent_rss_bytes));
                result.optimized_bytes = file_size(&optimized);
                result.external_bytes = (file_size(&external), file_size(&external_data));
                format!("round {round}")
            };
            println!(
                "  {label}: copy {:.3} s, optimize {:.3} s ({}), --external-data {:.3} s ({})",
                copy.as_secs_f64(),
                run.wall.as_secs_f64(),
                megabytes(run.peak_rss_bytes),
                ext.wall.as_secs_f64(),
                megabytes(ext.peak_rss_bytes),
            );
            for path in outputs {
                remove_if_present(path);
            }
            // Start the next round without writeback of this one's files in flight.
            common::sync_filesystems();
        }
        result
    }

    impl ModelResult {
        fn print(&self) {
            let copy = self.copy.median();
            let optimize = self.optimize.median();
            let external = self.external.median();
            let time_ratio = optimize / copy;
            let rss_ratio = self.optimize_rss as f64 / self.file_bytes as f64;
            let ext_rss_ratio = self.external_rss as f64 / self.file_bytes as f64;
            println!(
                "== {}.onnx: {} ({} bytes), median of {} runs, load average {} ==",
                self.name,
                megabytes(self.file_bytes),
                self.file_bytes,
                self.copy.len(),
                self.load_average
            );
            println!("  materialized sha256       {}", self.sha);
            println!(
                "  copy (std::fs::copy)      {copy:.3} s  (min {:.3} s)",
                self.copy.min()
            );
            println!(
                "  optimize --passes dce     {optimize:.3} s  (min {:.3} s)  = {time_ratio:.2}x copy \
                 (min/min {:.2}x)  goal <= {MAX_TIME_RATIO}x: {}",
                self.optimize.min(),
                self.optimize.min() / self.copy.min(),
                verdict(time_ratio <= MAX_TIME_RATIO)
            );
            println!(
                "    peak RSS                {} = {rss_ratio:.2}x file  goal <= {MAX_RSS_RATIO}x: {} \
                 (includes the bench process's {} at spawn)",
                megabytes(self.optimize_rss),
                verdict(rss_ratio <= MAX_RSS_RATIO),
                megabytes(self.parent_rss)
            );
            println!(
                "    output                  {}",
                megabytes(self.optimized_bytes)
            );
            println!(
                "  optimize --external-data  {external:.3} s  (min {:.3} s)  = {:.2}x copy, \
                 peak RSS {} = {ext_rss_ratio:.2}x file  (report only)",
                self.external.min(),
                external / copy,
                megabytes(self.external_rss)
            );
            println!(
                "    output                  {} + {} data",
                megabytes(self.external_bytes.0),
                megabytes(self.external_bytes.1)
            );
        }
    }
}
