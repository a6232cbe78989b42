//! Graph passes and the manager that runs them.
//!
//! A pass looks at the model and applies `Patch`es (see `ir::patch`); it reports how many
//! rewrites of each kind it made. The manager runs a list of passes in order, again and
//! again until a whole round changes nothing (a fixpoint, since one pass's rewrite can
//! expose work for another), and records per pass the node counts before and after, the
//! rewrites by kind and the time spent, for the report.

pub mod branches;
pub mod canonical;
pub mod cse;
pub mod dce;
pub mod fold;
pub mod fuse;
pub mod identity;
pub mod inline;
pub(crate) mod matching;
pub mod noop;
pub mod opset;
pub mod shape;
pub mod shape_of;

use std::collections::BTreeMap;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::ir::{Model, Patch};

/// Rewrites a pass made, counted by kind (`"dead-node"`, `"gelu-erf"`, …).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Rewrites(pub BTreeMap<String, usize>);

impl Rewrites {
    pub fn add(&mut self, kind: &str, n: usize) {
        if n > 0 {
            *self.0.entry(kind.to_string()).or_default() += n;
        }
    }

    pub fn total(&self) -> usize {
        self.0.values().sum()
    }

    pub fn merge(&mut self, other: &Rewrites) {
        for (kind, n) in &other.0 {
            self.add(kind, *n);
        }
    }

    /// Applies `patch` to the model and counts it under its kind.
    pub fn apply(&mut self, model: &mut Model, patch: Patch) -> Result<()> {
        let kind = patch.kind;
        model.graph.apply(patch)?;
        self.add(kind, 1);
        Ok(())
    }
}

/// `kind n, kind n, …`, or `no change`.
impl std::fmt::Display for Rewrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return write!(f, "no change");
        }
        let parts: Vec<String> = self.0.iter().map(|(k, n)| format!("{k} {n}")).collect();
        write!(f, "{}", parts.join(", "))
    }
}

/// One transformation of the model.
pub trait Pass {
    /// Stable name, used in the report and in `--passes` lists.
    fn name(&self) -> &'static str;
    /// Runs once over the model and returns the rewrites it made (none: nothing to do).
    fn run(&self, model: &mut Model) -> Result<Rewrites>;
    /// For a fusion: each block it leaves unfused in `model`, with the reason (`--explain`).
    fn explain(&self, _model: &Model) -> Vec<Unfused> {
        Vec::new()
    }
}

/// A block a fusion left unfused (`--explain`): its anchor node (the Softmax of an attention
/// block, the Erf of a GELU), the fusion and rule that got furthest with it, and the first
/// check that failed.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Unfused {
    pub node: String,
    pub op: String,
    pub fusion: &'static str,
    pub rule: &'static str,
    pub reason: String,
}

impl std::fmt::Display for Unfused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let by = match self.rule {
            "" => self.fusion.to_string(),
            rule => format!("{}/{rule}", self.fusion),
        };
        write!(
            f,
            "{} `{}` not fused ({by}): {}",
            self.op, self.node, self.reason
        )
    }
}

/// What the manager saw one pass do, summed over every round.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PassStats {
    pub pass: String,
    pub runs: usize,
    /// Node count before the pass first ran, and after it last ran.
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub rewrites: Rewrites,
    pub seconds: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PassReport {
    pub rounds: usize,
    /// False when the round limit stopped the manager before a fixpoint.
    pub converged: bool,
    pub passes: Vec<PassStats>,
}

pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    max_rounds: usize,
}

impl Default for PassManager {
    fn default() -> Self {
        PassManager {
            passes: Vec::new(),
            max_rounds: 10,
        }
    }
}

impl PassManager {
    pub fn new() -> PassManager {
        PassManager::default()
    }

    pub fn with(mut self, pass: impl Pass + 'static) -> Self {
        self.passes.push(Box::new(pass));
        self
    }

    /// The names of the passes, in the order they run.
    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Keeps only the passes named in `names` (in pipeline order); a name that is no pass
    /// of this manager is an error that lists the names there are.
    pub fn only(mut self, names: &[String]) -> Result<Self> {
        self.check_names(names)?;
        self.passes.retain(|p| names.iter().any(|n| n == p.name()));
        Ok(self)
    }

    /// An error that lists the passes there are, when a name in `names` is none of them.
    fn check_names(&self, names: &[String]) -> Result<()> {
        match names.iter().find(|n| !self.names().contains(&n.as_str())) {
            Some(unknown) => Err(Error::InvalidArgument(format!(
                "no pass `{unknown}`: the passes are {}",
                self.names().join(", ")
            ))),
            None => Ok(()),
        }
    }

    /// Drops the passes named in `names`; a name that is no pass of this manager is an error.
    pub fn without(mut self, names: &[String]) -> Result<Self> {
        self.check_names(names)?;
        self.passes.retain(|p| !names.iter().any(|n| n == p.name()));
        Ok(self)
    }

    pub fn max_rounds(mut self, rounds: usize) -> Self {
        self.max_rounds = rounds.max(1);
        self
    }

    /// Runs the passes round after round until one changes nothing.
    /// What the passes' fusions leave unfused in `model`, and why.
    pub fn explain(&self, model: &Model) -> Vec<Unfused> {
        self.passes.iter().flat_map(|p| p.explain(model)).collect()
    }

    pub fn run(&self, model: &mut Model) -> Result<PassReport> {
        let mut stats: Vec<PassStats> = self
            .passes
            .iter()
            .map(|p| PassStats {
                pass: p.name().to_string(),
                runs: 0,
                nodes_before: 0,
                nodes_after: 0,
                rewrites: Rewrites::default(),
                seconds: 0.0,
            })
            .collect();
        let mut rounds = 0;
        let mut converged = false;
        while rounds < self.max_rounds {
            rounds += 1;
            let mut changed = false;
            for (pass, stat) in self.passes.iter().zip(&mut stats) {
                let before = model.graph.node_count();
                let start = Instant::now();
                let rewrites = pass.run(model)?;
                // What a pass read of the input's weights (CSE a prefix of each, folding the
                // constants it evaluates) is not kept resident: whatever it kept is a copy,
                // and a page read again comes back from the file. Without this, a pass
                // touching every weight would hold the whole input in memory.
                if let Some(source) = &model.source {
                    source.release_resident_pages();
                }
                // A pass must leave a graph that can be written: catch a bad rewrite here,
                // naming the pass, rather than as a broken output file.
                model.graph.check_invariants().map_err(|e| {
                    Error::Patch(format!("pass `{}` left an invalid graph: {e}", pass.name()))
                })?;
                stat.seconds += start.elapsed().as_secs_f64();
                if stat.runs == 0 {
                    stat.nodes_before = before;
                }
                stat.runs += 1;
                stat.nodes_after = model.graph.node_count();
                changed |= rewrites.total() > 0;
                stat.rewrites.merge(&rewrites);
            }
            if !changed {
                converged = true;
                break;
            }
        }
        Ok(PassReport {
            rounds,
            converged,
            passes: stats,
        })
    }
}
