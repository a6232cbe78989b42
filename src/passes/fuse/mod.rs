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
//!
//! A builder that gives up says why (`Declined`), and so does the driver when the match is
//! not closed or its patch does not fit the graph: `explain_rules` asks every rule again on
//! the final graph and names, for each anchor left unfused (`Pat::anchor`), the rule that
//! got furthest and the first check that failed (`--explain`).

pub mod attention;
pub mod embed_layernorm;
pub mod gelu;
pub mod layernorm;
pub mod pattern;
pub mod rotary;

use crate::error::Result;
use crate::ir::{attr, Graph, Model, NodeId, PValue, Patch, Tensor, ValueId};
use crate::passes::{opset, Pass, Rewrites, Unfused};
use crate::proto::AttributeProto;
use pattern::{Match, Name, Pat, Trace};

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

/// A fusion pass: its rules, built for a target. Every fusion runs them (`apply_rules`) and
/// explains what they leave (`explain_rules`) the same way.
pub trait Fusion {
    /// The pass's name.
    const NAME: &'static str;
    fn rules() -> Vec<Rule>;
    fn target(&self) -> Target;
}

impl<F: Fusion> Pass for F {
    fn name(&self) -> &'static str {
        F::NAME
    }

    fn run(&self, model: &mut Model) -> Result<Rewrites> {
        apply_rules(model, &F::rules(), self.target())
    }

    fn explain(&self, model: &Model) -> Vec<Unfused> {
        explain_rules(model, F::NAME, &F::rules(), self.target())
    }
}

/// A fusion rule: what to match and how to build the replacement.
pub struct Rule {
    /// The rewrite kind counted in the statistics.
    pub kind: &'static str,
    pub pattern: Pat,
    /// Describes the replacement, or says why the match turns out not to be fusable.
    pub build: fn(&Match, &mut Rewrite) -> Built,
}

/// What a builder returns.
pub type Built = std::result::Result<(), Declined>;

/// Why a match was not rewritten: the first check that failed. Each reason is written once
/// here; rules pick one and fill in what they found.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Declined {
    /// The pattern did not bind this operand (an optional part that is absent).
    #[error("no `{0}` in the match")]
    Missing(Name),
    /// A value the rule needs to be constant is computed.
    #[error("{0} is not a constant")]
    NotConstant(String),
    /// Inferred types do not prove what the replacement assumes.
    #[error("not proven from the inferred shapes: {0}")]
    NotProven(String),
    /// An operator's contract (`src/ops`) refuses an input.
    #[error("{op}: {why}")]
    Contract { op: &'static str, why: String },
    /// The target has no operator for it.
    #[error("the {0} target has no operator for this form")]
    NoOperator(&'static str),
    /// The operator needs an opset the model cannot be raised to.
    #[error("needs opset {0}, which this model cannot be raised to")]
    Opset(i64),
    /// Left written out by design: the runtime fuses it itself when it loads the model.
    #[error("left written out: {0}")]
    LeftToRuntime(&'static str),
    /// An intermediate value is also read outside the match.
    #[error("{value} is also read by {reader}, outside the match")]
    ReadOutside { value: String, reader: String },
    /// The patch does not fit the graph (it would make a cycle, or write a value twice).
    #[error("the rewrite does not fit the graph: {0}")]
    Refused(String),
    /// The pattern matched up to here.
    #[error("{0}")]
    Mismatch(String),
}

/// The opset from which `Shape` takes `start`/`end`.
const SHAPE_SLICE_OPSET: i64 = 15;

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
    /// Values the replacement reads whose computation must outlive the match
    /// (`keep_alive`).
    kept: Vec<ValueId>,
    uses_contrib: bool,
}

impl Rewrite<'_> {
    /// The replacement reads `v`, a mask or bias the graph computes: where that computation
    /// reads the match only to size itself (a shape chain that would die with the match), it
    /// is kept (`keep_what_the_replacement_reads`).
    pub fn keep_alive(&mut self, v: ValueId) {
        self.kept.push(v);
    }

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

    /// Readers of each output of `node` from `first` on read the same output of its rebuilt
    /// form (`outputs`, as `op_with_outputs` returns them: `None` where not wanted).
    pub fn replace_outputs(&mut self, node: NodeId, outputs: &[Option<PValue>], first: usize) {
        let old: Vec<Option<ValueId>> = (0..outputs.len())
            .map(|slot| self.graph.node(node).output(slot))
            .collect();
        for (slot, new) in outputs.iter().enumerate().skip(first) {
            if let (Some(old), Some(new)) = (old[slot], new) {
                self.replace(old, *new);
            }
        }
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

    /// A 1-D int64 constant of `values` (a Reshape target, a Gather index).
    pub fn ints(&mut self, hint: &str, values: &[i64]) -> std::result::Result<PValue, Declined> {
        let tensor = Tensor::from_i64(hint, &[values.len() as i64], values)
            .map_err(|e| Declined::Refused(e.to_string()))?;
        Ok(self.constant(hint, tensor))
    }

    /// Dim `axis` of `v` as a 1-D int64 tensor of one element: `Shape` with `start`/`end`
    /// where the opset has them (15), the whole shape's `Gather` before.
    pub fn dim_of(&mut self, v: PValue, axis: i64) -> std::result::Result<PValue, Declined> {
        if self.opset >= SHAPE_SLICE_OPSET {
            let bounds = vec![attr::int("start", axis), attr::int("end", axis + 1)];
            return Ok(self.op("Shape", "", &[v], bounds));
        }
        let shape = self.op("Shape", "", &[v], vec![]);
        let index = self.ints("axis", &[axis])?;
        Ok(self.op("Gather", "", &[shape, index], vec![attr::int("axis", 0)]))
    }

    /// Asks for the default-domain opset `version`: granted when the model has it or can be
    /// raised to it (which happens once the pass is done).
    pub fn require_opset(&mut self, version: i64) -> Built {
        if version <= self.opset.max(self.can_raise_to) {
            self.needs_opset = self.needs_opset.max(version);
            Ok(())
        } else {
            Err(Declined::Opset(version))
        }
    }

    /// Only for ONNX Runtime: `com.microsoft` operators.
    pub fn require_ort(&self) -> Built {
        match self.target {
            Target::Ort => Ok(()),
            other => Err(Declined::NoOperator(other.name())),
        }
    }

    /// The constant `v` holds, or why the rule cannot go on.
    pub fn constant_of(&self, v: ValueId) -> std::result::Result<Tensor, Declined> {
        self.graph
            .constant(v)
            .ok_or_else(|| Declined::NotConstant(self.graph.value_name(v).to_string()))
    }

    /// The value the match's root node produces: what the fused node replaces.
    pub fn root_of(&self, m: &Match) -> std::result::Result<ValueId, Declined> {
        let root = m
            .nodes()
            .first()
            .and_then(|&n| self.graph.node(n).output(0));
        root.ok_or(Declined::Missing("root"))
    }
}

/// What applying a rule would change besides the graph.
struct Attempt {
    patch: Patch,
    needs_opset: i64,
    uses_contrib: bool,
}

/// What every rule of a pass shares while it runs.
struct Context {
    target: Target,
    opset: i64,
    can_raise_to: i64,
}

impl Context {
    fn of(model: &Model, target: Target) -> Context {
        Context {
            target,
            opset: model.opset("").unwrap_or(0),
            can_raise_to: opset::highest_reachable(model),
        }
    }
}

/// The patch `rule` makes of match `m` rooted at node `at`, checked whole, or why not.
fn attempt(
    g: &Graph,
    cx: &Context,
    needs_opset: i64,
    rule: &Rule,
    m: &Match,
    at: NodeId,
) -> std::result::Result<Attempt, Declined> {
    let mut rw = Rewrite {
        graph: g,
        target: cx.target,
        opset: cx.opset,
        can_raise_to: cx.can_raise_to,
        needs_opset,
        patch: Patch::new(rule.kind),
        replaced: Vec::new(),
        absorbed: Vec::new(),
        kept: Vec::new(),
        uses_contrib: false,
    };
    (rule.build)(m, &mut rw)?;
    let mut removed: Vec<NodeId> = m.nodes().iter().chain(&rw.absorbed).copied().collect();
    let matched = removed.len();
    removed.extend(dying_readers(g, &removed, &rw.replaced));
    keep_what_the_replacement_reads(g, &mut removed, matched, &rw.kept, &rw.replaced);
    if let Some((value, reader)) = read_outside(g, &removed, &rw.replaced) {
        return Err(Declined::ReadOutside { value, reader });
    }
    let mut patch = rw.patch;
    patch.anchor_at(at);
    for n in removed {
        patch.remove_node(n);
    }
    // The match is sound but its rewrite may not fit this graph (it would make a cycle, or
    // write a value twice): the block stays.
    g.check_patch(&patch)
        .map_err(|e| Declined::Refused(e.to_string()))?;
    Ok(Attempt {
        patch,
        needs_opset: rw.needs_opset,
        uses_contrib: rw.uses_contrib,
    })
}

/// Applies `rules` everywhere they match, then raises the opset if a builder needed it.
pub fn apply_rules(model: &mut Model, rules: &[Rule], target: Target) -> Result<Rewrites> {
    let cx = Context::of(model, target);
    let opset_now = cx.opset;
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
                    let Ok(done) = attempt(&model.graph, &cx, needs_opset, rule, &m, id) else {
                        continue;
                    };
                    needs_opset = done.needs_opset;
                    uses_contrib |= done.uses_contrib;
                    rewrites.apply(model, done.patch)?;
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

/// A value the removed nodes produce that is neither replaced by the rewrite nor read only
/// by removed nodes, with who else reads it (the graph's outputs, or a node).
/// The most nodes `dying_readers` looks at past a match: shape computations are short.
const DYING_READERS_AT_MOST: usize = 64;

/// Readers outside a match that only size it: nodes reading what the match removes (the
/// dynamo exporter's `Shape` of an intermediate, and what computes a Reshape's target from
/// it) whose every output is read by removed nodes only, directly or through one another.
/// They die with the match, so they go with it. Safe because nothing else reads them, and
/// `check_patch` refuses the patch should its new nodes read one of them.
fn dying_readers(g: &Graph, removed: &[NodeId], replaced: &[ValueId]) -> Vec<NodeId> {
    let mut reached: Vec<NodeId> = Vec::new();
    let mut frontier: Vec<ValueId> = removed
        .iter()
        .flat_map(|&n| g.node(n).outputs.iter().flatten().copied())
        .filter(|v| !replaced.contains(v))
        .collect();
    while let Some(v) = frontier.pop() {
        for &(reader, _) in g.uses(v) {
            if removed.contains(&reader) || reached.contains(&reader) {
                continue;
            }
            if reached.len() == DYING_READERS_AT_MOST {
                return Vec::new();
            }
            reached.push(reader);
            frontier.extend(g.node(reader).outputs.iter().flatten().copied());
        }
    }
    // The largest set whose outputs only removed nodes or members read.
    loop {
        let only_inside = |n: &NodeId| {
            g.node(*n).outputs.iter().flatten().all(|&v| {
                !g.is_graph_output(v)
                    && g.uses(v)
                        .iter()
                        .all(|(r, _)| removed.contains(r) || reached.contains(r))
            })
        };
        let dying: Vec<NodeId> = reached.iter().copied().filter(only_inside).collect();
        if dying.len() == reached.len() {
            return dying;
        }
        reached = dying;
    }
}

/// Takes out of `removed` the dying readers (`removed[matched..]`) computing what the
/// builder asked to keep (`kept`, `Rewrite::keep_alive`), with the removed nodes they read
/// from, transitively, match nodes included: Marian's mask is sliced to the length of the
/// keys as the match reshapes them (`Shape(Reshape(present))`), a shape chain that would
/// otherwise die with the match while the fused node reads the mask. Kept nodes compute what
/// they computed, from the same inputs. Only what a builder names is kept: any other value the
/// replacement reads from a removed node leaves the rewrite refused (`check_patch`), so that a
/// better-bound match can take its place. Nor is a node kept whose output the replacement
/// replaces.
fn keep_what_the_replacement_reads(
    g: &Graph,
    removed: &mut Vec<NodeId>,
    matched: usize,
    kept: &[ValueId],
    replaced: &[ValueId],
) {
    let dying: Vec<NodeId> = removed[matched..].to_vec();
    let mut wanted: Vec<ValueId> = kept
        .iter()
        .copied()
        .filter(|&v| g.producer(v).is_some_and(|p| dying.contains(&p)))
        .collect();
    while let Some(v) = wanted.pop() {
        let Some(producer) = g.producer(v) else {
            continue;
        };
        let Some(at) = removed.iter().position(|&n| n == producer) else {
            continue;
        };
        let node = g.node(producer);
        if node.outputs.iter().flatten().any(|o| replaced.contains(o)) {
            continue;
        }
        removed.remove(at);
        wanted.extend(node.inputs.iter().flatten());
    }
}

fn read_outside(g: &Graph, removed: &[NodeId], replaced: &[ValueId]) -> Option<(String, String)> {
    removed.iter().find_map(|&n| {
        g.node(n).outputs.iter().flatten().find_map(|&v| {
            if replaced.contains(&v) {
                return None;
            }
            let reader = match g.is_graph_output(v) {
                true => Some("the graph's outputs".to_string()),
                false => g
                    .uses(v)
                    .iter()
                    .find(|(r, _)| !removed.contains(r))
                    .map(|(r, _)| {
                        let node = g.node(*r);
                        format!("{} `{}`", node.op_type(), node.name())
                    }),
            };
            reader.map(|reader| (g.value_name(v).to_string(), reader))
        })
    })
}

/// Per anchor node, the best reason offered: (whole match?, depth), rule, reason.
#[derive(Default)]
struct Reasons(Vec<(NodeId, (bool, usize), &'static str, String)>);

impl Reasons {
    fn offer(&mut self, anchor: NodeId, rank: (bool, usize), rule: &'static str, why: String) {
        match self.0.iter_mut().find(|b| b.0 == anchor) {
            Some(b) if b.1 >= rank => {}
            Some(b) => *b = (anchor, rank, rule, why),
            None => self.0.push((anchor, rank, rule, why)),
        }
    }
}

/// For each anchor of `rules` still in the graph (what the pass left unfused), the rule that
/// got furthest with it and why it stopped: a builder's or the driver's reason for a whole
/// match (ahead of any partial one), else the deepest mismatch after the anchor; for an
/// anchor no whole pattern reached, what a rule asks of the anchor's own inputs (matched from
/// the anchor), or else that its readers are not the rule's. Nothing is changed.
pub fn explain_rules(
    model: &Model,
    fusion: &'static str,
    rules: &[Rule],
    target: Target,
) -> Vec<Unfused> {
    let g = &model.graph;
    let cx = Context::of(model, target);
    let anchor_ops: Vec<&str> = rules.iter().flat_map(|r| r.pattern.anchor_ops()).collect();
    let mut best = Reasons::default();
    let Ok(order) = g.topological_order() else {
        return Vec::new();
    };
    for id in order {
        for &v in g.node(id).outputs.iter().flatten() {
            for rule in rules {
                let mut trace = Trace::default();
                for m in rule.pattern.matches_traced(g, v, &mut trace) {
                    let Some(anchor) = m.anchor() else { continue };
                    let why = match attempt(g, &cx, cx.opset, rule, &m, id) {
                        Ok(_) => "it matches here; the output check left this fusion out".into(),
                        Err(why) => why.to_string(),
                    };
                    best.offer(anchor, (true, m.nodes().len()), rule.kind, why);
                }
                for (anchor, depth, why) in trace.misses {
                    best.offer(anchor, (false, depth), rule.kind, why);
                }
            }
        }
    }
    let anchors: Vec<(NodeId, ValueId)> = g
        .nodes()
        .filter(|(_, n)| n.domain().is_empty() && anchor_ops.contains(&n.op_type()))
        .filter_map(|(id, n)| Some((id, n.output(0)?)))
        .collect();
    for &(id, out) in &anchors {
        if best.0.iter().any(|b| b.0 == id) {
            continue;
        }
        for rule in rules {
            for sub in rule.pattern.anchors() {
                let mut trace = Trace::default();
                if sub.matches_traced(g, out, &mut trace).is_empty() {
                    for (anchor, depth, why) in trace.misses {
                        best.offer(anchor, (false, depth), rule.kind, why);
                    }
                } else {
                    let readers: Vec<String> = g
                        .uses(out)
                        .iter()
                        .map(|(r, _)| format!("{} `{}`", g.node(*r).op_type(), g.node(*r).name()))
                        .collect();
                    let why = format!(
                        "its inputs fit, but what it feeds ({}) is not the rest of the rule",
                        readers.join(", ")
                    );
                    best.offer(id, (false, 0), rule.kind, why);
                }
            }
        }
    }
    anchors
        .into_iter()
        .map(|(id, _)| {
            let n = g.node(id);
            let (rule, reason) = match best.0.iter().find(|b| b.0 == id) {
                Some((_, _, rule, why)) => (*rule, why.clone()),
                None => ("", "no rule's pattern reaches it".to_string()),
            };
            Unfused {
                node: n.name().to_string(),
                op: n.op_type().to_string(),
                fusion,
                rule,
                reason,
            }
        })
        .collect()
}
