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
    Optimize(Box<OptimizeArgs>),
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
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Run a model (in tract, or ONNX Runtime: see --engine) and write its outputs as .npy
    /// files.
    Run {
        model: PathBuf,
        #[command(flatten)]
        inputs: InputArgs,
        #[command(flatten)]
        engine: EngineArgs,
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
    /// Runtime to build for: `ort` (ONNX Runtime contrib operators; uint8 activations with
    /// zero points), `onnx` (standard operators only), `trt` (standard operators, and
    /// TensorRT's Q/DQ rules: int8 only, zero points 0).
    #[arg(long, value_enum, default_value_t = TargetArg::Ort)]
    pub target: TargetArg,
    /// Run the input and the output (see --engine) and refuse to write an output that breaks
    /// the tolerance. Quantizing validates always (on batches calibration did not see), and
    /// gates only on the tolerances given.
    #[arg(long)]
    pub validate: bool,
    /// Skip the output check (both models run on small generated inputs before writing,
    /// when nothing else validates the output), and the validation of a lossy step given no
    /// tolerance: the output is written unvalidated (for a model no engine here runs).
    #[arg(long, conflicts_with = "validate")]
    pub no_check: bool,
    /// Name each block a fusion left unfused (each Softmax, ReduceMean, Erf/Tanh/Sigmoid a
    /// rule is about), the rule that got furthest and the first check that failed (the
    /// `--report` JSON always lists them, as `unfused`).
    #[arg(long)]
    pub explain: bool,
    /// Run only these passes, comma-separated (`--passes dce`; the report lists them all).
    #[arg(long, value_delimiter = ',', value_name = "PASS,...")]
    pub passes: Vec<String>,
    #[command(flatten)]
    pub prune: PruneArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
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
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args, Debug)]
pub struct EngineArgs {
    /// The engine that runs models for validation and the output check: tract, ONNX Runtime
    /// (its library found from $ONNXOPT_ORT_LIB, $ORT_DYLIB_PATH or the onnxruntime Python
    /// package), or auto: ONNX Runtime for models built for it or that tract cannot run,
    /// and to decide when tract fails or finds a difference; tract otherwise.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    pub engine: EngineArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum EngineArg {
    Tract,
    Ort,
    Auto,
}

impl EngineArgs {
    pub fn engine(&self) -> onnxopt::exec::Engine {
        use onnxopt::exec::Engine;
        match self.engine {
            EngineArg::Tract => Engine::Tract,
            EngineArg::Ort => Engine::Ort,
            EngineArg::Auto => Engine::Auto,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum TargetArg {
    Ort,
    Onnx,
    Trt,
}

impl TargetArg {
    /// The operators fusions build.
    pub fn fusion(self) -> onnxopt::passes::fuse::Target {
        match self {
            TargetArg::Ort => onnxopt::passes::fuse::Target::Ort,
            TargetArg::Onnx | TargetArg::Trt => onnxopt::passes::fuse::Target::Onnx,
        }
    }

    /// The quantization rules: a standard-operator runtime gets TensorRT's, the strictest
    /// (int8 symmetric, no integer operators), which every QDQ-capable runtime accepts.
    pub fn quant(self) -> onnxopt::quant::QuantTarget {
        match self {
            TargetArg::Ort => onnxopt::quant::QuantTarget::Ort,
            TargetArg::Onnx | TargetArg::Trt => onnxopt::quant::QuantTarget::Trt,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum WeightBitsArg {
    Int4,
    Int8,
}

impl WeightBitsArg {
    pub fn bits(self) -> onnxopt::ops::nbits::Bits {
        use onnxopt::ops::nbits::Bits;
        match self {
            WeightBitsArg::Int4 => Bits::Four,
            WeightBitsArg::Int8 => Bits::Eight,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum WeightMethodArg {
    Rtn,
    Gptq,
}

impl WeightMethodArg {
    pub fn method(self) -> onnxopt::quant::weight_only::WeightMethod {
        use onnxopt::quant::weight_only::WeightMethod;
        match self {
            WeightMethodArg::Rtn => WeightMethod::Rtn,
            WeightMethodArg::Gptq => WeightMethod::Gptq,
        }
    }
}

/// Pruning (before quantization, which then calibrates the pruned model).
#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Zero weights of MatMul/Gemm/Conv/Attention: a sparsity such as `0.3` (the smallest
    /// magnitudes), or `N:M` such as `2:4` (keep N of every M along the reduction axis).
    #[arg(long, value_name = "SPARSITY|N:M")]
    pub prune: Option<String>,
    /// With a sparsity: rank each weight alone (`layer`) or all together (`global`).
    #[arg(long, value_enum, default_value_t = ScopeArg::Layer)]
    pub prune_scope: ScopeArg,
    /// With a sparsity: prune the embedding tables too (left alone by default).
    #[arg(long, requires = "prune")]
    pub prune_embeddings: bool,
    /// Remove this fraction of every attention block's heads (the weights shrink). The
    /// least important go: by their activations on --calib/--calib-random batches when
    /// given, else by their weights' norms.
    #[arg(long, value_name = "FRACTION")]
    pub prune_heads: Option<f64>,
    /// Remove this fraction of every FFN block's neurons (the weights shrink).
    #[arg(long, value_name = "FRACTION")]
    pub prune_ffn: Option<f64>,
}

impl PruneArgs {
    pub fn options(&self) -> onnxopt::Result<onnxopt::prune::PruneOptions> {
        use onnxopt::prune::{PruneOptions, Scope, Unstructured};
        let scope = match self.prune_scope {
            ScopeArg::Layer => Scope::Layer,
            ScopeArg::Global => Scope::Global,
        };
        let fraction = |flag: &str, f: Option<f64>| match f {
            Some(f) if !(0.0..1.0).contains(&f) => Err(onnxopt::Error::InvalidArgument(format!(
                "{flag} {f}: expected a fraction in [0, 1)"
            ))),
            other => Ok(other),
        };
        Ok(PruneOptions {
            unstructured: self
                .prune
                .as_deref()
                .map(|t| Unstructured::parse(t, scope))
                .transpose()?,
            heads: fraction("--prune-heads", self.prune_heads)?,
            ffn: fraction("--prune-ffn", self.prune_ffn)?,
            calibration: Vec::new(),
            embeddings: self.prune_embeddings,
        })
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ScopeArg {
    Layer,
    Global,
}

/// Quantization.
#[derive(Args, Debug)]
pub struct QuantArgs {
    /// Static INT8: calibrate activations, then insert QuantizeLinear/DequantizeLinear pairs
    /// with int8 weights.
    #[arg(long, conflicts_with = "int8_dynamic", group = "int8_mode")]
    pub int8: bool,
    /// Dynamic INT8: int8 weights, activations quantized at run time. No calibration data
    /// is needed: SmoothQuant (α 0.5 unless --smooth-quant or --no-smooth-quant says
    /// otherwise) reads --calib/--calib-random batches when given, else 8 generated ones.
    #[arg(long, conflicts_with = "fp16", group = "int8_mode")]
    pub int8_dynamic: bool,
    /// With --int8 or --int8-dynamic: how the weights of the integer products are stored.
    /// `int7` (7-bit codes; the default for ONNX Runtime) runs its fast uint8×int8 kernel
    /// without saturating on x86 CPUs lacking VNNI; `int8` (every code; the default of static
    /// INT8 for TensorRT) the same kernel, a little more accurate where the CPU has VNNI and
    /// much less where it has not (it saturates); `uint8` its uint8×uint8 kernel, exact
    /// everywhere and slower (not for TensorRT).
    #[arg(long, value_enum, alias = "dynamic-weights", requires = "int8_mode")]
    pub int8_weights: Option<Int8WeightsArg>,
    /// Weight-only quantization, `int4` or `int8`: every MatMul with a constant 2-D weight
    /// read by nothing else gets codes of that many bits in blocks along the summed axis:
    /// com.microsoft MatMulNBits for --target ort, blockwise DequantizeLinear (opset 21)
    /// feeding the MatMul otherwise. GPTQ on --calib/--calib-random batches unless
    /// --weights-method rtn.
    #[arg(long, value_enum, value_name = "BITS", group = "weight_only", conflicts_with_all = ["int8", "int8_dynamic", "fp16", "int4"])]
    pub weights: Option<WeightBitsArg>,
    /// Same as --weights int4.
    #[arg(long, group = "weight_only", conflicts_with_all = ["int8", "int8_dynamic", "fp16"])]
    pub int4: bool,
    /// With --weights: weights per block (a power of two, at least 16). Smaller blocks are more accurate; at --accuracy-level 4 larger ones prefill faster (128: faster than float32 on SmolLM2-135M, 32: slower; see `quant::weight_only::DEFAULT_BLOCK_SIZE`).
    #[arg(long, alias = "int4-block", value_name = "N", default_value_t = onnxopt::quant::weight_only::DEFAULT_BLOCK_SIZE, requires = "weight_only")]
    pub block_size: usize,
    /// With --weights: zero points the middle code (8 or 128) instead of one per block.
    #[arg(long, alias = "int4-symmetric", requires = "weight_only")]
    pub symmetric: bool,
    /// With --weights: `gptq` (calibrated; keeps round-to-nearest for a weight where that
    /// moves the calibration outputs less) or `rtn` (round to nearest, no data).
    #[arg(long, alias = "int4-method", value_enum, default_value_t = WeightMethodArg::Gptq, requires = "weight_only")]
    pub weights_method: WeightMethodArg,
    /// With --weights (GPTQ): quantize each weight's input channels in their order, instead
    /// of by decreasing activation energy with each block's grid fitted first (act order
    /// with static groups).
    #[arg(long, alias = "int4-no-act-order", requires = "weight_only")]
    pub no_act_order: bool,
    /// With --weights (GPTQ): added to the diagonal of each Gram matrix, as a fraction of
    /// its mean, before it is inverted.
    #[arg(long, alias = "int4-damping", value_name = "F", default_value_t = onnxopt::quant::weight_only::gptq::DAMPING, requires = "weight_only")]
    pub gptq_damping: f64,
    /// With --weights --target ort: MatMulNBits' accuracy_level (0: float32 compute; 4: ONNX
    /// Runtime's CPU kernel quantizes the activations to int8 per block: faster decoding,
    /// slower prefill, see `quant::weight_only::DEFAULT_ACCURACY_LEVEL`).
    #[arg(
        long,
        alias = "int4-accuracy-level",
        value_name = "LEVEL",
        default_value_t = onnxopt::quant::weight_only::DEFAULT_ACCURACY_LEVEL,
        requires = "weight_only"
    )]
    pub accuracy_level: i64,
    /// With --weights: also quantize a language model's LM head tied to its embeddings: a
    /// MatMul that reads the table through a Transpose (torch's exporters), or whose weight
    /// the embedding's Gather reads through a Transpose (ONNX Runtime GenAI's model
    /// builder). For ONNX Runtime with 4 bits the embedding then gathers the same codes
    /// (GatherBlockQuantized: the tied table stored once) where K is whole blocks, an even
    /// count of them unless --symmetric; otherwise the Gather keeps the float table.
    #[arg(long, requires = "weight_only")]
    pub lm_head: bool,
    /// FP16: weights and compute in float16, normalizations, Softmax, reductions, Pow and
    /// Exp kept in float32 behind Casts.
    #[arg(long, conflicts_with = "int8")]
    pub fp16: bool,
    /// With --fp16: keep float32 graph inputs and outputs.
    #[arg(long, requires = "fp16")]
    pub keep_io_types: bool,
    /// Folder of .npy/.npz calibration batches named after the graph inputs (for --int8,
    /// and to rank heads and neurons for --prune-heads/--prune-ffn). Unless
    /// --inputs is given, the last fifth of them (at least one, when there are two or more)
    /// is held back to validate on.
    #[arg(long, value_name = "DIR", conflicts_with = "calib_random")]
    pub calib: Option<PathBuf>,
    /// Calibrate on this many generated batches (the input options below shape them);
    /// validation then uses batches generated with another seed.
    #[arg(long, value_name = "N")]
    pub calib_random: Option<usize>,
    /// How observed values become a range (`mse` by default: the most accurate on real
    /// weights; see `onnxopt::quant::RangeMethod`).
    #[arg(long, value_enum, default_value_t = MethodArg::Mse)]
    pub calib_method: MethodArg,
    /// The percentile of |x| the `percentile` method keeps.
    #[arg(long, default_value_t = onnxopt::quant::calibrate::DEFAULT_PERCENTILE)]
    pub percentile: f64,
    /// With --int8: measure each layer's cost alone, then keep the most sensitive layers
    /// float until the output keeps the tolerance given (--min-cosine, --max-error, --max-kl).
    #[arg(long, requires = "int8")]
    pub auto_exclude: bool,
    /// SmoothQuant before quantizing: move activation outliers into the weights with
    /// migration strength α in [0, 1] (0.5 is the usual choice; the default with
    /// --int8-dynamic, and with --int8 --target ort).
    #[arg(long, value_name = "ALPHA", requires = "int8_mode")]
    pub smooth_quant: Option<f64>,
    /// With --int8-dynamic or --int8: no SmoothQuant (and no float run to measure the
    /// channels).
    #[arg(long, requires = "int8_mode", conflicts_with = "smooth_quant")]
    pub no_smooth_quant: bool,
    /// Quantize these nodes too: a node name, `op:<OpType>` or `re:<regex over names>`.
    #[arg(long, value_name = "SELECTOR")]
    pub include: Vec<String>,
    /// Keep these nodes float (wins over everything): a node name, `op:<OpType>` or
    /// `re:<regex over names>`.
    #[arg(long, value_name = "SELECTOR")]
    pub exclude: Vec<String>,
}

impl QuantArgs {
    /// The bits of weight-only quantization, if asked (`--weights`, or `--int4`).
    pub fn weight_bits(&self) -> Option<onnxopt::ops::nbits::Bits> {
        match (self.weights, self.int4) {
            (Some(w), _) => Some(w.bits()),
            (None, true) => Some(onnxopt::ops::nbits::Bits::Four),
            (None, false) => None,
        }
    }

    /// SmoothQuant's strength, if any: as given, else the default for the mode and `target`
    /// (`onnxopt::quant::smooth::default_alpha`).
    pub fn smoothing(&self, target: onnxopt::quant::QuantTarget) -> Option<f64> {
        match self.smooth_quant {
            Some(alpha) => Some(alpha),
            None if self.no_smooth_quant || !(self.int8 || self.int8_dynamic) => None,
            None => onnxopt::quant::smooth::default_alpha(target, self.int8_dynamic),
        }
    }

    pub fn method(&self) -> onnxopt::quant::RangeMethod {
        use onnxopt::quant::RangeMethod;
        match self.calib_method {
            MethodArg::Minmax => RangeMethod::MinMax,
            MethodArg::Percentile => RangeMethod::Percentile(self.percentile),
            MethodArg::Entropy => RangeMethod::Entropy,
            MethodArg::Mse => RangeMethod::Mse,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8WeightsArg {
    Int7,
    Int8,
    Uint8,
}

impl Int8WeightsArg {
    pub fn codes(self) -> onnxopt::quant::qdq::ProductWeights {
        use onnxopt::quant::qdq::ProductWeights;
        match self {
            Int8WeightsArg::Int8 => ProductWeights::Int8,
            Int8WeightsArg::Uint8 => ProductWeights::Uint8,
            Int8WeightsArg::Int7 => ProductWeights::Int7,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum MethodArg {
    Minmax,
    Percentile,
    Entropy,
    Mse,
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

/// Tolerances of a validation. Without quantization the defaults apply: max abs error 1e-4,
/// cosine 0.9999; a quantized output is gated only on the limits given.
#[derive(Args, Debug)]
pub struct ToleranceArgs {
    /// Largest absolute error allowed on any output [default: 1e-4 unless quantizing].
    #[arg(long)]
    pub max_error: Option<f64>,
    /// Smallest cosine similarity allowed on any output [default: 0.9999 unless quantizing].
    #[arg(long)]
    pub min_cosine: Option<f64>,
    /// Largest KL divergence allowed on logits outputs.
    #[arg(long)]
    pub max_kl: Option<f64>,
    /// Softmax temperature of the KL divergence.
    #[arg(long, default_value_t = 1.0)]
    pub kl_temperature: f64,
    /// Output to compare as logits (KL divergence); default: outputs named `*logits*`.
    #[arg(long = "logits", value_name = "OUTPUT")]
    pub logits: Vec<String>,
    /// Causal language models: report the next-token perplexity of both models on the
    /// validation batches' `input_ids` (positions their `attention_mask` keeps), from the
    /// first logits output.
    #[arg(long)]
    pub perplexity: bool,
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
