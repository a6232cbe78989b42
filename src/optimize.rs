//! The optimization pipeline behind `onnxopt optimize`: which passes run, in which order.
//!
//! Each round: infer types (fusions read ranks and head counts from them), clean up (the
//! legacy exporter writes the same constant and shape computation dozens of times), fold
//! constants, cut shape computations loose from the values fusions replace, write each
//! computation exporters spell several ways in one form (`canonical`), fuse, run the same
//! pipeline on the branches of `If` nodes (`passes::branches`), drop what became dead. Rounds
//! repeat until nothing changes.

use crate::error::Result;
use crate::inspect::TARGET_KEY;
use crate::ir::Model;
use crate::passes::branches::BranchOptimization;
use crate::passes::canonical::Canonicalize;
use crate::passes::cse::CommonSubexpressions;
use crate::passes::dce::DeadCodeElimination;
use crate::passes::fold::ConstantFolding;
use crate::passes::fuse::attention::AttentionFusion;
use crate::passes::fuse::embed_layernorm::EmbedLayerNormFusion;
use crate::passes::fuse::gelu::GeluFusion;
use crate::passes::fuse::layernorm::LayerNormFusion;
use crate::passes::fuse::rotary::RotaryFusion;
use crate::passes::fuse::Target;
use crate::passes::identity::IdentityElimination;
use crate::passes::inline::FunctionInlining;
use crate::passes::noop::NoOpElimination;
use crate::passes::shape::ShapeInference;
use crate::passes::shape_of::ShapeFromInputs;
use crate::passes::{PassManager, PassReport, Unfused};

#[derive(Clone, Debug)]
pub struct OptimizeOptions {
    /// The runtime the fused operators are built for.
    pub target: Target,
    /// Run only these passes of the pipeline (by name); empty: all of them.
    pub passes: Vec<String>,
    /// Leave these passes out (by name).
    pub skip: Vec<String>,
}

impl Default for OptimizeOptions {
    fn default() -> Self {
        OptimizeOptions {
            target: Target::Ort,
            passes: Vec::new(),
            skip: Vec::new(),
        }
    }
}

/// The default pass pipeline for `options`.
pub fn pipeline(options: &OptimizeOptions) -> PassManager {
    let target = options.target;
    PassManager::new()
        .with(FunctionInlining)
        .with(ShapeInference)
        .with(IdentityElimination)
        .with(CommonSubexpressions)
        .with(ConstantFolding)
        .with(NoOpElimination)
        .with(ShapeFromInputs)
        .with(Canonicalize)
        .with(RotaryFusion { target })
        .with(AttentionFusion { target })
        .with(LayerNormFusion { target })
        .with(EmbedLayerNormFusion { target })
        .with(GeluFusion { target })
        .with(BranchOptimization {
            options: options.clone(),
        })
        .with(DeadCodeElimination)
}

/// Runs the pipeline (or the passes `options` names) on `model` to a fixpoint and records the
/// target in the model's metadata when a fusion pass ran (a clean-up alone builds for no
/// runtime).
pub fn optimize(model: &mut Model, options: &OptimizeOptions) -> Result<PassReport> {
    let passes = selected(options)?;
    let report = passes.run(model)?;
    if passes.names().iter().any(|n| n.starts_with("fuse-")) {
        model.set_metadata(TARGET_KEY, options.target.name());
    }
    Ok(report)
}

/// The passes `options` runs: the pipeline, or the ones it names, less the ones it skips.
pub(crate) fn selected(options: &OptimizeOptions) -> Result<PassManager> {
    let mut passes = pipeline(options);
    if !options.passes.is_empty() {
        passes = passes.only(&options.passes)?;
    }
    passes.without(&options.skip)
}

/// What the fusions `options` runs leave unfused in `model` (an optimized one), and why
/// (`--explain`).
pub fn explain(model: &Model, options: &OptimizeOptions) -> Result<Vec<Unfused>> {
    Ok(selected(options)?.explain(model))
}
