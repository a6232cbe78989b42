//! Benchmark: `onnxopt optimize` (load + DCE + save) of full-size BERT-base against copying
//! the same file.
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
//!    writeback pressure: `std::fs::copy` of the file, `onnxopt optimize IN OUT` and
//!    `onnxopt optimize --external-data IN OUT` (the latter reported only). Each optimize
//!    runs as a child process; its peak RSS comes from `wait4`'s rusage, after resetting
//!    the bench's own peak (which a child spawned on Linux would otherwise inherit).
//! 3. Prints medians, the optimize/copy time ratio and the RSS/file-size ratio against the
//!    goals.
//!
//! Run it with `cargo bench --bench optimize_bert_base` (optionally followed by `-- ts` or
//! `-- dynamo` to pick one export). `ONNXOPT_BENCH_RUNS` sets the number of measured rounds
//! (5), which follow one unrecorded warm-up round.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use onnxopt::exec::rng;
use onnxopt::proto::{tensor_proto::DataType, ModelProto, TensorProto};

/// The exports measured, by skeleton name (`<name>.skel.onnx`).
const MODELS: [&str; 2] = ["bert-base.ts", "bert-base.dynamo"];
/// Metadata keys starting with this are skeleton bookkeeping, dropped when materializing.
const SKELETON_META_PREFIX: &str = "onnxopt.skeleton";
const SKELETON_SHA_KEY: &str = "onnxopt.skeleton.sha256";
const FILL_PREFIX: &str = "materialize:";
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
    use super::*;

    pub fn run() {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let skeleton_dir = skeleton_dir(manifest_dir);
        let data_dir = target_dir(manifest_dir).join("bench-data");
        std::fs::create_dir_all(&data_dir)
            .unwrap_or_else(|e| panic!("cannot create `{}`: {e}", data_dir.display()));
        let runs = runs();
        // `cargo bench` passes `--bench`; any other argument picks models by substring.
        let filters: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .collect();

        let mut results = Vec::new();
        for name in MODELS {
            if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
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

    /// `$ONNXOPT_CORPUS/skeletons` (or `$ONNXOPT_CORPUS` itself if it holds the skeletons),
    /// else `../shared/corpus/skeletons` next to the crate.
    fn skeleton_dir(manifest_dir: &Path) -> PathBuf {
        match std::env::var_os("ONNXOPT_CORPUS") {
            Some(corpus) => {
                let corpus = PathBuf::from(corpus);
                let nested = corpus.join("skeletons");
                if nested.is_dir() {
                    nested
                } else {
                    corpus
                }
            }
            None => manifest_dir.join("../shared/corpus/skeletons"),
        }
    }

    fn target_dir(manifest_dir: &Path) -> PathBuf {
        match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => manifest_dir.join(dir),
            None => manifest_dir.join("target"),
        }
    }

    fn runs() -> usize {
        match std::env::var("ONNXOPT_BENCH_RUNS") {
            Ok(v) => match v.parse() {
                Ok(n) if n > 0 => n,
                _ => panic!("ONNXOPT_BENCH_RUNS must be a positive integer, not `{v}`"),
            },
            Err(_) => DEFAULT_RUNS,
        }
    }

    /// How the materialized file's sha256 compares with the one its skeleton records (the
    /// hash of the file materialize.py writes).
    #[derive(Clone, Debug)]
    pub enum ShaCheck {
        Matched(String),
        Mismatched { expected: String, got: String },
        NoExpectedHash(String),
    }

    impl std::fmt::Display for ShaCheck {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                ShaCheck::Matched(sha) => write!(f, "{sha} (matches the skeleton's)"),
                ShaCheck::Mismatched { expected, got } => {
                    write!(f, "{got} (MISMATCH: the skeleton expects {expected})")
                }
                ShaCheck::NoExpectedHash(sha) => write!(f, "{sha} (skeleton records no hash)"),
            }
        }
    }

    /// Writes the full model next to the bench data unless an identical one is there.
    ///
    /// "Identical" means the sha256 the skeleton records, or, when this machine's bytes differ
    /// from Python's (see `ShaCheck::Mismatched`), the hash we stored in `<model>.sha256` the
    /// last time we wrote it (the size alone when no hash is known).
    fn materialize_if_needed(skeleton: &Path, model: &Path) -> ShaCheck {
        let bytes = std::fs::read(skeleton).unwrap_or_else(|e| {
            panic!(
                "cannot read the skeleton `{}`: {e}\n(set ONNXOPT_CORPUS to the corpus folder)",
                skeleton.display()
            )
        });
        let skeleton_proto = ModelProto::decode(bytes.as_slice())
            .unwrap_or_else(|e| panic!("`{}` is not an ONNX model: {e}", skeleton.display()));
        let expected = skeleton_proto
            .metadata_props
            .iter()
            .find(|p| p.key.as_deref() == Some(SKELETON_SHA_KEY))
            .and_then(|p| p.value.clone());
        let stamp = stamp_path(model);

        if model.exists() {
            let previous = std::fs::read_to_string(&stamp).ok();
            let known = expected.as_deref().or(previous.as_deref().map(str::trim));
            if let Some(known) = known {
                let got = sha256_file(model);
                if got == known || previous.as_deref().map(str::trim) == Some(got.as_str()) {
                    println!("{}: reusing {}", file_name(model), model.display());
                    return classify(expected, got);
                }
            } else if let Some(size) = materialized_size(&skeleton_proto) {
                if std::fs::metadata(model).is_ok_and(|m| m.len() == size) {
                    println!(
                        "{}: reusing {} (same size)",
                        file_name(model),
                        model.display()
                    );
                    return ShaCheck::NoExpectedHash(sha256_file(model));
                }
            }
        }

        let start = Instant::now();
        let (full, stats) = materialize(skeleton_proto)
            .unwrap_or_else(|e| panic!("cannot materialize `{}`: {e}", skeleton.display()));
        let encoded = full.encode_to_vec();
        drop(full);
        let got = write_atomically(model, &encoded);
        std::fs::write(&stamp, format!("{got}\n"))
            .unwrap_or_else(|e| panic!("cannot write `{}`: {e}", stamp.display()));
        println!(
            "{}: materialized {} tensors, {} elements, {} in {:.1} s",
            file_name(model),
            stats.tensors,
            stats.elements,
            megabytes(encoded.len() as u64),
            start.elapsed().as_secs_f64()
        );
        let check = classify(expected, got);
        println!("  sha256 {check}");
        check
    }

    fn classify(expected: Option<String>, got: String) -> ShaCheck {
        match expected {
            Some(expected) if expected == got => ShaCheck::Matched(got),
            Some(expected) => ShaCheck::Mismatched { expected, got },
            None => ShaCheck::NoExpectedHash(got),
        }
    }

    fn stamp_path(model: &Path) -> PathBuf {
        let mut name = model.as_os_str().to_owned();
        name.push(".sha256");
        PathBuf::from(name)
    }

    struct FillStats {
        tensors: usize,
        elements: u64,
    }

    /// A parsed `materialize:normal(MEAN,STD),seed=N` instruction.
    #[derive(Clone, Copy, Debug)]
    struct Fill {
        mean: f64,
        std: f64,
        seed: u64,
    }

    /// The fill instruction in a tensor's doc_string, if any; an instruction this bench does
    /// not know is an error, as in materialize.py.
    fn parse_fill(tensor: &TensorProto) -> Result<Option<Fill>, String> {
        let doc = tensor.doc_string.as_deref().unwrap_or("");
        let Some(instruction) = doc.strip_prefix(FILL_PREFIX) else {
            return Ok(None);
        };
        let unknown = || {
            format!(
                "{}: unknown fill instruction {doc:?}",
                tensor.name.as_deref().unwrap_or("?")
            )
        };
        let args = instruction.strip_prefix("normal(").ok_or_else(unknown)?;
        let (params, seed) = args.split_once("),seed=").ok_or_else(unknown)?;
        let (mean, std) = params.split_once(',').ok_or_else(unknown)?;
        let number = |s: &str| {
            let s = s.trim();
            let allowed = |c: char| c.is_ascii_digit() || "+-.eE".contains(c);
            if s.is_empty() || !s.chars().all(allowed) {
                return Err(unknown());
            }
            s.parse::<f64>().map_err(|_| unknown())
        };
        if seed.is_empty() || !seed.chars().all(|c| c.is_ascii_digit()) {
            return Err(unknown());
        }
        Ok(Some(Fill {
            mean: number(mean)?,
            std: number(std)?,
            seed: seed.parse().map_err(|_| unknown())?,
        }))
    }

    fn element_count(tensor: &TensorProto) -> Result<u64, String> {
        tensor.dims.iter().try_fold(1u64, |n, &d| {
            u64::try_from(d)
                .ok()
                .and_then(|d| n.checked_mul(d))
                .ok_or_else(|| {
                    format!(
                        "{}: bad dims {:?}",
                        tensor.name.as_deref().unwrap_or("?"),
                        tensor.dims
                    )
                })
        })
    }

    /// Fills every marked initializer and drops the skeleton metadata, as materialize.py does.
    fn materialize(mut model: ModelProto) -> Result<(ModelProto, FillStats), String> {
        let graph = model.graph.as_mut().ok_or("the skeleton has no graph")?;
        let stats = graph
            .initializer
            .par_iter_mut()
            .map(|tensor| -> Result<(usize, u64), String> {
                let Some(fill) = parse_fill(tensor)? else {
                    return Ok((0, 0));
                };
                let name = tensor.name.as_deref().unwrap_or("?");
                if tensor.data_type != Some(DataType::Float as i32) {
                    return Err(format!(
                        "{name}: only FLOAT tensors can be materialized here, not data_type {:?}",
                        tensor.data_type
                    ));
                }
                let holds_data = tensor.raw_data.as_ref().is_some_and(|d| !d.is_empty())
                    || !tensor.float_data.is_empty()
                    || !tensor.double_data.is_empty()
                    || !tensor.int32_data.is_empty();
                if holds_data {
                    return Err(format!(
                        "{name}: marked for materialization but already holds data"
                    ));
                }
                let n = element_count(tensor)?;
                tensor.raw_data = Some(fill_float32(fill, n).into());
                // Python's `t.doc_string = ""` keeps the proto2 field present (an empty string
                // on the wire), so the bytes only match materialize.py's with `Some("")`.
                tensor.doc_string = Some(String::new());
                Ok((1, n))
            })
            .try_reduce(|| (0, 0), |a, b| Ok((a.0 + b.0, a.1 + b.1)))?;
        model.metadata_props.retain(|p| {
            !p.key
                .as_deref()
                .is_some_and(|k| k.starts_with(SKELETON_META_PREFIX))
        });
        Ok((
            model,
            FillStats {
                tensors: stats.0,
                elements: stats.1,
            },
        ))
    }

    /// `value_i = float32(MEAN + STD * g_i)`, little-endian.
    fn fill_float32(fill: Fill, n: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(n as usize * 4);
        for i in 0..n {
            let value = (fill.mean + fill.std * rng::normal(fill.seed, i)) as f32;
            out.extend_from_slice(&value.to_le_bytes());
        }
        out
    }

    /// The size the materialized model will have, without generating its weights.
    fn materialized_size(skeleton: &ModelProto) -> Option<u64> {
        let mut model = skeleton.clone();
        for tensor in &mut model.graph.as_mut()?.initializer {
            if parse_fill(tensor).ok()?.is_some() {
                let n = element_count(tensor).ok()?;
                // Only the length matters to `encoded_len`.
                tensor.raw_data = Some(vec![0u8; n as usize * 4].into());
                tensor.doc_string = Some(String::new());
            }
        }
        model.metadata_props.retain(|p| {
            !p.key
                .as_deref()
                .is_some_and(|k| k.starts_with(SKELETON_META_PREFIX))
        });
        Some(model.encoded_len() as u64)
    }

    /// Writes `bytes` to a temporary file beside `path`, renames it over `path`, and returns the
    /// sha256 of what was written.
    fn write_atomically(path: &Path, bytes: &[u8]) -> String {
        let tmp = path.with_extension("onnx.partial");
        let mut file =
            File::create(&tmp).unwrap_or_else(|e| panic!("cannot create `{}`: {e}", tmp.display()));
        file.write_all(bytes)
            .unwrap_or_else(|e| panic!("cannot write `{}`: {e}", tmp.display()));
        drop(file);
        std::fs::rename(&tmp, path)
            .unwrap_or_else(|e| panic!("cannot rename to `{}`: {e}", path.display()));
        hex(&Sha256::digest(bytes))
    }

    fn sha256_file(path: &Path) -> String {
        let mut hasher = Sha256::new();
        read_through(path, |chunk| hasher.update(chunk));
        hex(&hasher.finalize())
    }

    /// Reads the file in 1 MiB chunks (also how the page cache gets warmed).
    fn read_through(path: &Path, mut each: impl FnMut(&[u8])) {
        let mut file =
            File::open(path).unwrap_or_else(|e| panic!("cannot open `{}`: {e}", path.display()));
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("cannot read `{}`: {e}", path.display()));
            if n == 0 {
                break;
            }
            each(&buf[..n]);
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// One child process: wall time and peak resident set.
    struct ChildRun {
        wall: Duration,
        peak_rss_bytes: u64,
        /// This process's RSS when the child started: a floor under `peak_rss_bytes`.
        parent_rss_bytes: u64,
    }

    /// Runs `onnxopt optimize [extra] input output`, waiting with `wait4` for its rusage.
    fn run_optimize(input: &Path, output: &Path, extra: &[&str], log_dir: &Path) -> ChildRun {
        let stdout_path = log_dir.join("optimize.stdout");
        let stderr_path = log_dir.join("optimize.stderr");
        let create = |p: &Path| {
            File::create(p).unwrap_or_else(|e| panic!("cannot create `{}`: {e}", p.display()))
        };
        let mut command = Command::new(env!("CARGO_BIN_EXE_onnxopt"));
        command
            .arg("optimize")
            .args(extra)
            .arg(input)
            .arg(output)
            .stdin(Stdio::null())
            .stdout(create(&stdout_path))
            .stderr(create(&stderr_path));

        // A spawned child inherits this process's peak RSS as the floor of its own (Linux
        // records the old address space's high-water mark at exec, and std spawns with vfork,
        // which shares ours), so reset ours first: materializing peaked at twice the model.
        let parent_rss_bytes = reset_peak_rss();
        let start = Instant::now();
        let child = command.spawn().expect("cannot start the onnxopt binary");
        let pid = child.id() as libc::pid_t;
        let mut status: libc::c_int = 0;
        // SAFETY: rusage is plain old data; zero is a valid value for every field.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: `pid` is our own child, not yet reaped (std's `Child` never waits unless
            // asked), and both out-pointers are valid for writes.
            let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            if r == pid {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                panic!("wait4 on onnxopt failed: {err}");
            }
        }
        let wall = start.elapsed();
        drop(child);

        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            panic!(
                "`onnxopt optimize {} {} {}` failed (wait status {status}):\n{stderr}",
                extra.join(" "),
                input.display(),
                output.display()
            );
        }
        // Linux reports ru_maxrss in KiB, macOS in bytes.
        let maxrss = usage.ru_maxrss.max(0) as u64;
        let peak_rss_bytes = if cfg!(target_os = "macos") {
            maxrss
        } else {
            maxrss * 1024
        };
        ChildRun {
            wall,
            peak_rss_bytes,
            parent_rss_bytes,
        }
    }

    /// Resets this process's peak RSS to its current RSS and returns that RSS, which is then
    /// the least peak a child can report. Without the reset, the figure is this process's
    /// peak so far.
    fn reset_peak_rss() -> u64 {
        #[cfg(target_os = "linux")]
        {
            // "5" resets the high-water mark of the resident set (proc(5), Linux >= 4.0).
            if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
                eprintln!("warning: cannot reset the peak RSS ({e}); child peaks include ours");
            }
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
            let resident_pages: u64 = statm
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            // SAFETY: sysconf has no preconditions.
            let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
            resident_pages * page_size
        }
        #[cfg(not(target_os = "linux"))]
        {
            0
        }
    }

    fn remove_if_present(path: &Path) {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("cannot remove `{}`: {e}", path.display()),
        }
    }

    fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
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

    /// Wall times of one operation, one per round.
    #[derive(Default)]
    struct Samples(Vec<Duration>);

    impl Samples {
        fn median(&self) -> f64 {
            let mut v: Vec<f64> = self.0.iter().map(Duration::as_secs_f64).collect();
            v.sort_by(f64::total_cmp);
            let mid = v.len() / 2;
            if v.len() % 2 == 1 {
                v[mid]
            } else {
                (v[mid - 1] + v[mid]) / 2.0
            }
        }

        fn min(&self) -> f64 {
            self.0
                .iter()
                .map(Duration::as_secs_f64)
                .fold(f64::INFINITY, f64::min)
        }
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
        sync_filesystems();
        let mut warm_bytes = 0u64;
        read_through(model, |chunk| warm_bytes += chunk.len() as u64);
        assert_eq!(warm_bytes, file_bytes, "`{}` changed size", model.display());

        let load_average = load_average();
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
            let run = run_optimize(model, &optimized, &[], data_dir);
            let ext = run_optimize(model, &external, &["--external-data"], data_dir);

            let label = if round == 0 {
                "warm-up".to_string()
            } else {
                result.copy.0.push(copy);
                result.optimize.0.push(run.wall);
                result.external.0.push(ext.wall);
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
            sync_filesystems();
        }
        result
    }

    /// The 1-minute load average: other work on the machine skews the timings.
    fn load_average() -> String {
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| "unknown".to_string())
    }

    fn sync_filesystems() {
        // SAFETY: sync has no preconditions and cannot fail.
        unsafe { libc::sync() };
    }

    fn file_size(path: &Path) -> u64 {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("`{}` was not written: {e}", path.display()))
            .len()
    }

    fn megabytes(bytes: u64) -> String {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }

    fn verdict(ok: bool) -> &'static str {
        if ok {
            "PASS"
        } else {
            "FAIL"
        }
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
                self.copy.0.len(),
                self.load_average
            );
            println!("  materialized sha256       {}", self.sha);
            println!(
                "  copy (std::fs::copy)      {copy:.3} s  (min {:.3} s)",
                self.copy.min()
            );
            println!(
                "  onnxopt optimize          {optimize:.3} s  (min {:.3} s)  = {time_ratio:.2}x copy \
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

    fn file_name(path: &Path) -> String {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}
