//! The optimization pipeline behind `onnxopt optimize`: which passes run, in which order.

use crate::error::Result;
use crate::ir::Model;
use crate::passes::dce::DeadCodeElimination;
use crate::passes::{PassManager, PassReport};

/// The default pass pipeline.
pub fn pipeline() -> PassManager {
    PassManager::new().with(DeadCodeElimination)
}

/// Runs the default pipeline on `model` to a fixpoint.
pub fn optimize(model: &mut Model) -> Result<PassReport> {
    pipeline().run(model)
}
