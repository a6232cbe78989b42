//! The streaming int4 quantizer's memory (issue 16): `onnxopt optimize --int4 --int4-method rtn`
//! reads, quantizes and replaces one weight at a time and hands back the input file's pages as
//! it goes, so its peak RSS stays flat in the number of weights; only the 4-bit output, an
//! eighth of the float weights, grows with it. Two synthetic models of 1024×1024 MatMul
//! weights, 8 and 32 of them (32 and 128 MB with external data), go through the CLI as child
//! processes, whose peak RSS `wait4` reports (the benches' `run_measured`). Before streaming,
//! every weight read stayed resident (and passes hashed or copied them all): the 24 more
//! weights added 96 MB and more to the peak.
//!
//! Alone in its file: the measuring process must not be running other tests' models.

mod common;
#[path = "../benches/common/mod.rs"]
mod measure;

use std::path::Path;
use std::process::Command;

use common::chain::f32_value;
use onnxopt::io::{self, ExternalData};
use onnxopt::ir::{Model, Tensor};
use onnxopt::proto::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto};

const SIZE: usize = 1024;
const MIB: u64 = 1 << 20;

/// x → `weights` MatMuls by distinct pseudo-random 1024×1024 weights → y, written with its
/// weights in `<path>.data`.
fn write_chain(path: &Path, weights: usize) {
    let mut nodes = Vec::new();
    let mut initializers = Vec::new();
    for l in 0..weights {
        let name = format!("w{l}");
        // A multiplicative hash per layer: distinct weights (CSE merges equal ones), cheap.
        let values: Vec<f32> = (0..SIZE * SIZE)
            .map(|i| {
                let h = (i as u32 ^ ((l as u32) << 24)).wrapping_mul(0x9E37_79B1);
                h as f32 / u32::MAX as f32 - 0.5
            })
            .collect();
        let t = Tensor::from_f32(&name, &[SIZE as i64, SIZE as i64], &values).unwrap();
        initializers.push(t.into_proto());
        let input = if l == 0 { "x".into() } else { format!("h{l}") };
        let output = if l + 1 == weights {
            "y".into()
        } else {
            format!("h{}", l + 1)
        };
        nodes.push(NodeProto {
            op_type: Some("MatMul".into()),
            input: vec![input, name],
            output: vec![output],
            ..Default::default()
        });
    }
    let model = Model::from_proto(ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(GraphProto {
            name: Some("chain".into()),
            node: nodes,
            initializer: initializers,
            input: vec![f32_value("x", &[1, SIZE as i64])],
            output: vec![f32_value("y", &[1, SIZE as i64])],
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap();
    io::save(&model, path, ExternalData::Always).unwrap();
    drop(model);
    // A child's peak RSS starts at ours when it is spawned (see `run_measured`): give back
    // the heap the weights were built in, which glibc keeps by default.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The CLI's peak RSS quantizing a chain of `weights` weights.
fn peak_rss(dir: &Path, weights: usize) -> u64 {
    let input = dir.join(format!("chain{weights}.onnx"));
    write_chain(&input, weights);
    let output = dir.join(format!("chain{weights}.int4.onnx"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_onnxopt"));
    command.arg("optimize").arg(&input).arg(&output).args([
        "--int4",
        "--int4-method",
        "rtn",
        "--no-check",
    ]);
    let label = format!("chain{weights}");
    match measure::run_measured(&mut command, dir, &label) {
        Ok(run) => {
            println!(
                "{weights} weights: peak RSS {} MiB (this process: {} MiB)",
                run.peak_rss_bytes / MIB,
                run.parent_rss_bytes / MIB
            );
            run.peak_rss_bytes
        }
        Err(failure) => panic!("onnxopt on {weights} weights {failure}"),
    }
}

#[cfg(target_os = "linux")]
#[test]
fn peak_memory_is_flat_in_the_number_of_weights() {
    let dir = tempfile::tempdir().unwrap();
    let few = peak_rss(dir.path(), 8);
    let many = peak_rss(dir.path(), 32);
    let added_float = 24 * (SIZE * SIZE * 4) as u64;
    // What must grow: the 4-bit codes, scales and zero points held until the output is
    // written, about a sixth of the float bytes (17 MiB); half of them is a clear margin.
    assert!(
        many.saturating_sub(few) < added_float / 2,
        "the peak grew by {} MiB for {} MiB of weights more",
        many.saturating_sub(few) / MIB,
        added_float / MIB
    );
}
