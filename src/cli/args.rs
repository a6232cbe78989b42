//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "onnxopt",
    version,
    about = "ONNX graph optimizer for transformer models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Optimize a model and write the result.
    Optimize(OptimizeArgs),
    /// Print a model's IR version, opsets, inputs, outputs, operators and parameters.
    Inspect {
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a stable, readable text form of a model's graph.
    Dump { model: PathBuf },
    /// Run two models on the same inputs and compare every output.
    Validate {
        reference: PathBuf,
        candidate: PathBuf,
        #[command(flatten)]
        inputs: InputArgs,
        #[command(flatten)]
        tolerance: ToleranceArgs,
        /// Write the comparison as JSON to this file.
        #[arg(long, value_name = "FILE.json")]
        report: Option<PathBuf>,
    },
    /// Run a model in tract and write its outputs as .npy files.
    Run {
        model: PathBuf,
        #[command(flatten)]
        inputs: InputArgs,
        /// Folder for the outputs (`<batch>.<output>.npy`).
        #[arg(long, value_name = "DIR")]
        output_dir: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct OptimizeArgs {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Allow OUTPUT to be INPUT (the input is replaced once the output is complete).
    #[arg(long)]
    pub in_place: bool,
    /// Runtime to build fused operators for: `ort` (ONNX Runtime contrib operators) or
    /// `onnx` (standard operators only, for TensorRT and others).
    #[arg(long, value_enum, default_value_t = TargetArg::Ort)]
    pub target: TargetArg,
    /// Run the input and the output in tract and refuse to write an output that breaks the
    /// tolerance.
    #[arg(long)]
    pub validate: bool,
    #[command(flatten)]
    pub inputs: InputArgs,
    #[command(flatten)]
    pub tolerance: ToleranceArgs,
    /// Write weights of 1 KiB and more to OUTPUT.data (default: only when the input had
    /// external data or the output would pass 2 GB).
    #[arg(long, conflicts_with = "no_external_data")]
    pub external_data: bool,
    /// Write everything into OUTPUT (fails over 2 GB).
    #[arg(long)]
    pub no_external_data: bool,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum TargetArg {
    Ort,
    Onnx,
}

impl From<TargetArg> for onnxopt::passes::fuse::Target {
    fn from(t: TargetArg) -> Self {
        match t {
            TargetArg::Ort => onnxopt::passes::fuse::Target::Ort,
            TargetArg::Onnx => onnxopt::passes::fuse::Target::Onnx,
        }
    }
}

/// Where inputs for running models come from.
#[derive(Args, Debug)]
pub struct InputArgs {
    /// Folder of .npy/.npz batches named after the graph inputs (`batch_00.input_ids.npy`).
    #[arg(long, value_name = "DIR")]
    pub inputs: Option<PathBuf>,
    /// Without --inputs: how many batches to generate.
    #[arg(long, default_value_t = 2)]
    pub batches: usize,
    /// Value of a symbolic dimension for generated inputs, e.g. `--dim sequence=128`.
    #[arg(long = "dim", value_name = "NAME=N", value_parser = parse_dim)]
    pub dims: Vec<(String, usize)>,
    /// Inclusive value range of a generated input, e.g. `--input-range input_ids=0:30521`.
    #[arg(long = "input-range", value_name = "NAME=LO:HI", value_parser = parse_range)]
    pub ranges: Vec<(String, (f64, f64))>,
    /// Seed of generated inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct ToleranceArgs {
    /// Largest absolute error allowed on any output.
    #[arg(long, default_value_t = 1e-4)]
    pub max_error: f64,
    /// Smallest cosine similarity allowed on any output.
    #[arg(long, default_value_t = 0.9999)]
    pub min_cosine: f64,
    /// Largest KL divergence allowed on logits outputs.
    #[arg(long)]
    pub max_kl: Option<f64>,
    /// Softmax temperature of the KL divergence.
    #[arg(long, default_value_t = 1.0)]
    pub kl_temperature: f64,
    /// Output to compare as logits (KL divergence); default: outputs named `*logits*`.
    #[arg(long = "logits", value_name = "OUTPUT")]
    pub logits: Vec<String>,
}

fn parse_dim(s: &str) -> Result<(String, usize), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected NAME=N"))?;
    let n = value
        .parse::<usize>()
        .map_err(|_| format!("`{s}`: `{value}` is not a positive integer"))?;
    Ok((name.to_string(), n))
}

fn parse_range(s: &str) -> Result<(String, (f64, f64)), String> {
    let (name, range) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected NAME=LO:HI"))?;
    let (lo, hi) = range
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: expected NAME=LO:HI"))?;
    let num = |v: &str| {
        v.parse::<f64>()
            .map_err(|_| format!("`{s}`: `{v}` is not a number"))
    };
    let (lo, hi) = (num(lo)?, num(hi)?);
    if hi < lo {
        return Err(format!("`{s}`: the range is empty"));
    }
    Ok((name.to_string(), (lo, hi)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_and_ranges_parse() {
        assert_eq!(parse_dim("sequence=128"), Ok(("sequence".into(), 128)));
        assert!(parse_dim("sequence").is_err());
        assert!(parse_dim("sequence=-1").is_err());
        assert_eq!(parse_range("ids=0:99"), Ok(("ids".into(), (0.0, 99.0))));
        assert!(parse_range("ids=5:1").is_err());
    }
}
