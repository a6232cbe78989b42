//! The optimization pipeline behind `onnxopt optimize`: which passes run, in which order.
//!
//! Each round: infer types (fusions read ranks and head counts from them), clean up (the
//! legacy exporter writes the same constant and shape computation dozens of times), fold
//! constants, cut shape computations loose from the values fusions replace, fuse, drop what
//! became dead. Rounds repeat until nothing changes.

use crate::error::Result;
use crate::inspect::TARGET_KEY;
use crate::ir::Model;
use crate::passes::cse::CommonSubexpressions;
use crate::passes::dce::DeadCodeElimination;
use crate::passes::fold::ConstantFolding;
use crate::passes::fuse::attention::AttentionFusion;
use crate::passes::fuse::gelu::GeluFusion;
use crate::passes::fuse::layernorm::LayerNormFusion;
use crate::passes::fuse::Target;
use crate::passes::identity::IdentityElimination;
use crate::passes::noop::NoOpElimination;
use crate::passes::shape::ShapeInference;
use crate::passes::shape_of::ShapeFromInputs;
use crate::passes::{PassManager, PassReport};

#[derive(Clone, Debug)]
pub struct OptimizeOptions {
    /// The runtime the fused operators are built for.
    pub target: Target,
}

impl Default for OptimizeOptions {
    fn default() -> Self {
        OptimizeOptions {
            target: Target::Ort,
        }
    }
}

/// The default pass pipeline for `options`.
pub fn pipeline(options: &OptimizeOptions) -> PassManager {
    let target = options.target;
    PassManager::new()
        .with(ShapeInference)
        .with(IdentityElimination)
        .with(CommonSubexpressions)
        .with(ConstantFolding)
        .with(NoOpElimination)
        .with(ShapeFromInputs)
        .with(AttentionFusion { target })
        .with(LayerNormFusion { target })
        .with(GeluFusion { target })
        .with(DeadCodeElimination)
}

/// Runs the pipeline on `model` to a fixpoint and records the target in the model's metadata.
pub fn optimize(model: &mut Model, options: &OptimizeOptions) -> Result<PassReport> {
    let report = pipeline(options).run(model)?;
    model.set_metadata(TARGET_KEY, options.target.name());
    Ok(report)
}
