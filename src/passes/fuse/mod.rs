//! Fusions: a rule is a pattern (`pattern.rs`) plus a builder of the replacement.
//!
//! `apply_rules` is the one driver every fusion pass uses: it visits values from the outputs
//! back, asks each rule's pattern for matches rooted there, lets the rule's builder describe
//! the replacement in a `Rewrite` (which knows the target runtime), and applies it as one
//! `Patch` only if the match is closed: every intermediate value of the match is either read
//! only inside the match or explicitly replaced by the builder. That check is what keeps a
//! fusion from deleting a value someone else still needs.
//!
//! Matching is shared; only the builders look at the `Target`: `Ort` builds ONNX Runtime's
//! `com.microsoft` operators, `Onnx` standard operators only (raising the opset import when
//! the operator needs it, see `opset.rs`).

pub mod attention;
pub mod gelu;
pub mod layernorm;
pub mod pattern;
pub mod rotary;

use crate::error::Result;
use crate::ir::{Graph, Model, NodeId, PValue, Patch, Tensor, ValueId};
use crate::passes::{opset, Rewrites};
use crate::proto::AttributeProto;
use pattern::{Match, Pat};

pub use crate::ops::MS_DOMAIN;

/// The runtime a fused model is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// ONNX Runtime: its `com.microsoft` contrib operators.
    Ort,
    /// Standard ONNX operators only (TensorRT and other runtimes).
    Onnx,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Ort => "ort",
            Target::Onnx => "onnx",
        }
    }
}

/// A fusion rule: what to match and how to build the replacement.
pub struct Rule {
    /// The rewrite kind counted in the statistics.
    pub kind: &'static str,
    pub pattern: Pat,
    /// Describes the replacement; `None` when the match turns out not to be fusable.
    pub build: fn(&Match, &mut Rewrite) -> Option<()>,
}

/// What a rule's builder sees and fills in.
pub struct Rewrite<'a> {
    pub graph: &'a Graph,
    pub target: Target,
    /// The model's default-domain opset.
    pub opset: i64,
    can_raise_to: i64,
    needs_opset: i64,
    patch: Patch,
    replaced: Vec<ValueId>,
    /// Nodes outside the match that the replacement also makes redundant.
    absorbed: Vec<NodeId>,
    uses_contrib: bool,
}

impl Rewrite<'_> {
    /// Removes `node` along with the match (it must be read only by the match too).
    pub fn absorb(&mut self, node: NodeId) {
        if !self.absorbed.contains(&node) {
            self.absorbed.push(node);
        }
    }

    /// Readers of `old` will read `new`.
    pub fn replace(&mut self, old: ValueId, new: PValue) {
        self.patch.replace_uses(old, new);
        self.replaced.push(old);
    }

    /// Adds a single-output operator; returns its output.
    pub fn op(
        &mut self,
        op_type: &str,
        domain: &str,
        inputs: &[PValue],
        attributes: Vec<AttributeProto>,
    ) -> PValue {
        self.uses_contrib |= domain == MS_DOMAIN;
        self.patch.op(op_type, domain, inputs, attributes)
    }

    /// Adds an operator with optional inputs and the outputs flagged in `wanted` (the others
    /// are left unnamed, so the runtime need not compute them). The result has one entry per
    /// output written: trailing unwanted outputs are omitted.
    pub fn op_with_outputs(
        &mut self,
        op_type: &str,
        domain: &str,
        inputs: &[Option<PValue>],
        wanted: &[bool],
        attributes: Vec<AttributeProto>,
    ) -> Vec<Option<PValue>> {
        self.uses_contrib |= domain == MS_DOMAIN;
        // Trailing outputs nobody wants are left out rather than written unnamed.
        let len = wanted.iter().rposition(|&w| w).map_or(1, |i| i + 1);
        let outs: Vec<Option<PValue>> = wanted[..len]
            .iter()
            .map(|&w| w.then(|| self.patch.new_value(op_type)))
            .collect();
        self.patch
            .add_node_with_optional_outputs(op_type, domain, inputs, &outs, attributes);
        outs
    }

    pub fn constant(&mut self, hint: &str, tensor: Tensor) -> PValue {
        self.patch.new_initializer(hint, tensor)
    }

    /// Asks for the default-domain opset `version`: true when the model has it or can be
    /// raised to it (which happens once the pass is done).
    pub fn require_opset(&mut self, version: i64) -> bool {
        if version <= self.opset.max(self.can_raise_to) {
            self.needs_opset = self.needs_opset.max(version);
            true
        } else {
            false
        }
    }
}

/// Applies `rules` everywhere they match, then raises the opset if a builder needed it.
pub fn apply_rules(model: &mut Model, rules: &[Rule], target: Target) -> Result<Rewrites> {
    let opset_now = model.opset("").unwrap_or(0);
    let can_raise_to = opset::highest_reachable(model);
    let mut needs_opset = opset_now;
    let mut uses_contrib = false;
    let mut rewrites = Rewrites::default();
    // Consumers first: a rule then meets the largest match rooted at a value before any
    // smaller one inside it (`γ·n + β` before `γ·n`).
    for id in model.graph.topological_order()?.into_iter().rev() {
        if !model.graph.contains_node(id) {
            continue;
        }
        let outputs: Vec<ValueId> = model
            .graph
            .node(id)
            .outputs
            .iter()
            .flatten()
            .copied()
            .collect();
        'value: for v in outputs {
            for rule in rules {
                for m in rule.pattern.matches(&model.graph, v) {
                    let mut rw = Rewrite {
                        graph: &model.graph,
                        target,
                        opset: opset_now,
                        can_raise_to,
                        needs_opset,
                        patch: Patch::new(rule.kind),
                        replaced: Vec::new(),
                        absorbed: Vec::new(),
                        uses_contrib: false,
                    };
                    if (rule.build)(&m, &mut rw).is_none() {
                        continue;
                    }
                    let removed: Vec<NodeId> =
                        m.nodes().iter().chain(&rw.absorbed).copied().collect();
                    if !is_closed(&model.graph, &removed, &rw.replaced) {
                        continue;
                    }
                    let mut patch = rw.patch;
                    needs_opset = rw.needs_opset;
                    uses_contrib |= rw.uses_contrib;
                    patch.anchor_at(id);
                    for n in removed {
                        patch.remove_node(n);
                    }
                    if model.graph.check_patch(&patch).is_err() {
                        // The match is sound but its rewrite does not fit this graph (it
                        // would make a cycle, or write a value twice): the block stays.
                        continue;
                    }
                    rewrites.apply(model, patch)?;
                    break 'value;
                }
            }
        }
    }
    if needs_opset > opset_now {
        opset::raise(model, needs_opset)?;
    }
    if uses_contrib {
        model.require_opset(MS_DOMAIN, 1);
    }
    Ok(rewrites)
}

/// True when every value the removed nodes produce is either replaced by the rewrite or
/// read only by removed nodes (and is not a graph output).
fn is_closed(g: &Graph, removed: &[NodeId], replaced: &[ValueId]) -> bool {
    removed.iter().all(|&n| {
        g.node(n).outputs.iter().flatten().all(|&v| {
            replaced.contains(&v)
                || (!g.is_graph_output(v) && g.uses(v).iter().all(|(r, _)| removed.contains(r)))
        })
    })
}
