//! No-op and redundant chains: nodes that return their input, and pairs of nodes whose work
//! one node (or none) does. One rewrite family per file:
//!
//! - `arith`: a Mul by ones, an Add of zeros.
//! - `cast`: a Cast to the type its input has; a Cast after a lossless Cast; a CastLike as the
//!   Cast it is.
//! - `transpose`: an identity Transpose; a Transpose after a Transpose.
//! - `shape`: a Reshape or Expand to the shape its input has; a Slice keeping every axis
//!   whole; a Reshape after a Reshape; a Squeeze and an Unsqueeze of the same axes; a Pad by
//!   zeros.
//!
//! Every rule is exact: it fires only when it can prove, from attributes, constant inputs and
//! recorded types (`Graph::value_type`), that the result is the same for every valid input;
//! what it cannot prove it leaves alone. A graph output keeps its name (see
//! `matching::bypass`). The pass applies to each node the first rule that matches it
//! (`matching::rewrite_each`).

mod arith;
mod cast;
mod shape;
mod transpose;

use super::matching::rewrite_each;
use super::{Pass, Rewrites};
use crate::error::Result;
use crate::ir::{Graph, Model, NodeId, Patch};

/// A rewrite: the patch it makes of node `id`, if it matches there.
type Rule = fn(&Graph, NodeId) -> Option<Patch>;

const RULES: &[Rule] = &[
    cast::noop,
    cast::like,
    cast::chain,
    transpose::noop,
    transpose::chain,
    shape::reshape_noop,
    shape::reshape_chain,
    shape::squeeze_pair,
    shape::expand_noop,
    shape::slice_noop,
    shape::pad_zeros,
    arith::mul_one,
    arith::add_zeros,
];

pub struct NoOpElimination;

impl Pass for NoOpElimination {
    fn name(&self) -> &'static str {
        "noop"
    }

    fn run(&self, model: &mut Model) -> Result<Rewrites> {
        rewrite_each(model, |m, id| {
            RULES.iter().find_map(|rule| rule(&m.graph, id))
        })
    }
}

/// The kinds of rewrite one run of the pass makes on `model`, for the rules' tests.
#[cfg(test)]
fn kinds(model: &mut Model) -> Vec<String> {
    NoOpElimination
        .run(model)
        .expect("the pass runs")
        .0
        .into_keys()
        .collect()
}
