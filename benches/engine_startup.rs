//! Benchmark: what one check costs in each engine, from nothing to the first result.
//!
//! On MiniLM (`minilm-l6/all-minilm-l6-v2.ts.onnx`) as exported and as optimized for ONNX
//! Runtime, with one generated batch of 1×16 tokens: ONNX Runtime's library discovery (a
//! `python3` child when no variable names it) and load (once per process), session creation (`OrtRunner::new`, graph optimizer off, as for checks, and at
//! its full level for comparison) and first and second run, against tract's `Runner::new`
//! (parse) and first run (which compiles the plan for the shape) and second run. Each
//! engine's threads: ONNX Runtime one intra-op thread per rayon thread, tract one core per
//! batch. Without the corpus or the library it says why and measures nothing; it needs the
//! `ort` feature.

use std::time::{Duration, Instant};

const MINILM: &str = "minilm-l6/all-minilm-l6-v2.ts.onnx";

fn ms(d: Duration) -> String {
    format!("{:9.1} ms", d.as_secs_f64() * 1e3)
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

fn main() {
    use onnxopt::exec::{self, ort::Optimization, OrtOptions, OrtRunner, Runner};

    let corpus = std::env::var_os("ONNXOPT_CORPUS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus")
        });
    let path = corpus.join(MINILM);
    if !path.is_file() {
        eprintln!("skipped: no {} (set ONNXOPT_CORPUS)", path.display());
        return;
    }
    let original = onnxopt::io::load(&path).expect("MiniLM loads");
    let mut optimized = original.clone();
    let options = onnxopt::optimize::OptimizeOptions {
        target: onnxopt::passes::fuse::Target::Ort,
        ..Default::default()
    };
    onnxopt::optimize::optimize(&mut optimized, &options).expect("MiniLM optimizes");
    let specs = exec::inputs::input_specs(&original).expect("inputs");
    let batch = exec::inputs::generate(&specs, &Default::default(), 1)
        .expect("a batch")
        .remove(0);
    let shape: Vec<_> = batch
        .tensors
        .iter()
        .map(|(_, t)| t.shape().to_vec())
        .collect();
    println!(
        "MiniLM, one batch {shape:?}, rayon threads {}",
        rayon::current_num_threads()
    );

    let (_, find) = timed(exec::ort::locate);
    let (loaded, load) = timed(exec::ort::available);
    match loaded {
        Ok(lib) => println!(
            "ONNX Runtime library: {} (found in {}; found again, loaded and an environment \
             made in {})\n",
            lib.display(),
            ms(find).trim(),
            ms(load).trim()
        ),
        Err(why) => {
            eprintln!("skipped: ONNX Runtime is not available: {why}");
            return;
        }
    }
    println!(
        "{:10} {:9} {:22} {:>12} {:>12} {:>12} {:>12}",
        "model", "engine", "setting", "load lib", "new", "run 1", "run 2"
    );
    let mut first = true;
    for (name, model) in [("original", &original), ("optimized", &optimized)] {
        for (setting, optimization) in [
            ("optimizer off", Optimization::Disabled),
            ("optimizer all", Optimization::All),
        ] {
            let options = OrtOptions {
                optimization,
                ..Default::default()
            };
            let outputs: Vec<String> = model
                .graph
                .outputs
                .iter()
                .map(|p| model.graph.value_name(p.value).to_string())
                .collect();
            let (runner, new) = timed(|| OrtRunner::with_options(model, &outputs, &options));
            let mut runner = runner.expect("ONNX Runtime loads MiniLM");
            let (_, run1) = timed(|| runner.run(&batch).expect("ONNX Runtime runs MiniLM"));
            let (_, run2) = timed(|| runner.run(&batch).expect("ONNX Runtime runs MiniLM"));
            let lib = if first {
                ms(load)
            } else {
                format!("{:>12}", "-")
            };
            first = false;
            println!(
                "{name:10} {:9} {setting:22} {lib} {} {} {}",
                "ORT",
                ms(new),
                ms(run1),
                ms(run2)
            );
        }
        let (runner, new) = timed(|| Runner::new(model));
        let mut runner = runner.expect("tract loads MiniLM");
        let (_, run1) = timed(|| runner.run(&batch).expect("tract runs MiniLM"));
        let (_, run2) = timed(|| runner.run(&batch).expect("tract runs MiniLM"));
        println!(
            "{name:10} {:9} {:22} {:>12} {} {} {}",
            "tract",
            "(contrib ops lowered)",
            "-",
            ms(new),
            ms(run1),
            ms(run2)
        );
    }
}
