//! What the benchmarks share: where the corpus and the bench data live, materializing a
//! full-size model from its corpus skeleton (cached, checked against the sha256 the skeleton
//! records), running a child process for its wall time and peak RSS, and medians.
//!
//! Every bench compiles its own copy of this module and uses only part of it, so the parts
//! one bench leaves unused are not dead code.
#![allow(dead_code)]

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

/// Metadata keys starting with this are skeleton bookkeeping, dropped when materializing.
const SKELETON_META_PREFIX: &str = "onnxopt.skeleton";
const SKELETON_SHA_KEY: &str = "onnxopt.skeleton.sha256";
const FILL_PREFIX: &str = "materialize:";

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The shared corpus: `$ONNXOPT_CORPUS`, else `../shared/corpus` next to the crate.
pub fn corpus_dir() -> PathBuf {
    match std::env::var_os("ONNXOPT_CORPUS") {
        Some(corpus) => PathBuf::from(corpus),
        None => manifest_dir().join("../shared/corpus"),
    }
}

/// `$ONNXOPT_CORPUS/skeletons` (or `$ONNXOPT_CORPUS` itself if it holds the skeletons),
/// else `../shared/corpus/skeletons` next to the crate.
pub fn skeleton_dir() -> PathBuf {
    let corpus = corpus_dir();
    let nested = corpus.join("skeletons");
    let names_skeletons_itself = std::env::var_os("ONNXOPT_CORPUS").is_some() && !nested.is_dir();
    if names_skeletons_itself {
        corpus
    } else {
        nested
    }
}

/// Cargo's target folder (`$CARGO_TARGET_DIR`, relative to the crate, else `target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => manifest_dir().join(dir),
        None => manifest_dir().join("target"),
    }
}

/// `target/bench-data`, created if needed: materialized models and bench outputs.
pub fn bench_data_dir() -> PathBuf {
    let dir = target_dir().join("bench-data");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create `{}`: {e}", dir.display()));
    dir
}

/// `target/bench-data/<name>`, created if needed: one bench's outputs and logs.
pub fn bench_subdir(name: &str) -> PathBuf {
    let dir = bench_data_dir().join(name);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create `{}`: {e}", dir.display()));
    dir
}

/// Whether the bench was asked for `part`: `cargo bench --bench B -- minilm` runs the parts
/// whose names contain an argument (flags, such as the `--bench` cargo passes, do not count);
/// no argument runs every part.
pub fn wanted(part: &str) -> bool {
    let mut filters = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .peekable();
    filters.peek().is_none() || filters.any(|f| part.contains(f.as_str()))
}

/// Measured rounds: `$ONNXOPT_BENCH_RUNS`, else `default`.
pub fn runs(default: usize) -> usize {
    match std::env::var("ONNXOPT_BENCH_RUNS") {
        Ok(v) => match v.parse() {
            Ok(n) if n > 0 => n,
            _ => panic!("ONNXOPT_BENCH_RUNS must be a positive integer, not `{v}`"),
        },
        Err(_) => default,
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

/// Writes the full model from `skeleton` to `model`, following the fill algorithm of
/// `skeletons/materialize.py` (SplitMix64 + Box-Muller, see `onnxopt::exec::rng`), unless an
/// identical one is there.
///
/// "Identical" means the sha256 the skeleton records, or, when this machine's bytes differ
/// from Python's (see `ShaCheck::Mismatched`), the hash we stored in `<model>.sha256` the
/// last time we wrote it (the size alone when no hash is known).
pub fn materialize_if_needed(skeleton: &Path, model: &Path) -> ShaCheck {
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
    let stamp = with_suffix(model, ".sha256");

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
    drop_skeleton_metadata(&mut model);
    Ok((
        model,
        FillStats {
            tensors: stats.0,
            elements: stats.1,
        },
    ))
}

fn drop_skeleton_metadata(model: &mut ModelProto) {
    model.metadata_props.retain(|p| {
        !p.key
            .as_deref()
            .is_some_and(|k| k.starts_with(SKELETON_META_PREFIX))
    });
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
    drop_skeleton_metadata(&mut model);
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
pub fn read_through(path: &Path, mut each: impl FnMut(&[u8])) {
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

/// One child process that exited successfully: wall time and peak resident set.
pub struct ChildRun {
    pub wall: Duration,
    pub peak_rss_bytes: u64,
    /// This process's RSS when the child started: a floor under `peak_rss_bytes`.
    pub parent_rss_bytes: u64,
    /// Where the child's stdout went.
    pub stdout_path: PathBuf,
}

/// A child process that did not exit with status 0.
pub struct ChildFailure {
    pub wait_status: libc::c_int,
    pub stderr: String,
}

impl ChildFailure {
    /// The last line of stderr: usually the reason.
    pub fn reason(&self) -> &str {
        last_line(&self.stderr)
    }
}

impl std::fmt::Display for ChildFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "failed (wait status {}):\n{}",
            self.wait_status, self.stderr
        )
    }
}

/// The last non-empty line of a program's output, where tools put the error that stopped them.
pub fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message")
}

/// Runs `command` with its stdout and stderr in `<log_dir>/<label>.stdout` and `.stderr`,
/// waiting with `wait4` for its rusage.
pub fn run_measured(
    command: &mut Command,
    log_dir: &Path,
    label: &str,
) -> Result<ChildRun, ChildFailure> {
    let stdout_path = log_dir.join(format!("{label}.stdout"));
    let stderr_path = log_dir.join(format!("{label}.stderr"));
    let create = |p: &Path| {
        File::create(p).unwrap_or_else(|e| panic!("cannot create `{}`: {e}", p.display()))
    };
    command
        .stdin(Stdio::null())
        .stdout(create(&stdout_path))
        .stderr(create(&stderr_path));

    // A spawned child inherits this process's peak RSS as the floor of its own (Linux
    // records the old address space's high-water mark at exec, and std spawns with vfork,
    // which shares ours), so reset ours first: materializing peaked at twice the model.
    let parent_rss_bytes = reset_peak_rss();
    let start = Instant::now();
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", command.get_program()));
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
            panic!("wait4 on {:?} failed: {err}", command.get_program());
        }
    }
    let wall = start.elapsed();
    drop(child);

    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(ChildFailure {
            wait_status: status,
            stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
        });
    }
    // Linux reports ru_maxrss in KiB, macOS in bytes.
    let maxrss = usage.ru_maxrss.max(0) as u64;
    let peak_rss_bytes = if cfg!(target_os = "macos") {
        maxrss
    } else {
        maxrss * 1024
    };
    Ok(ChildRun {
        wall,
        peak_rss_bytes,
        parent_rss_bytes,
        stdout_path,
    })
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

/// Wall times of one operation, one per round.
#[derive(Default)]
pub struct Samples(Vec<Duration>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In seconds.
    pub fn median(&self) -> f64 {
        let mut v: Vec<f64> = self.0.iter().map(Duration::as_secs_f64).collect();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        }
    }

    /// In seconds.
    pub fn min(&self) -> f64 {
        self.0
            .iter()
            .map(Duration::as_secs_f64)
            .fold(f64::INFINITY, f64::min)
    }
}

/// The 1-minute load average: other work on the machine skews the timings.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string())
}

/// Flushes every file system, so that the next measurement pays for no writeback of
/// earlier files.
pub fn sync_filesystems() {
    // SAFETY: sync has no preconditions and cannot fail.
    unsafe { libc::sync() };
}

pub fn remove_if_present(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot remove `{}`: {e}", path.display()),
    }
}

pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

pub fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("`{}` was not written: {e}", path.display()))
        .len()
}

pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}
