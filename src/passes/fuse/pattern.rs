//! Declarative patterns over the IR, and the one matcher every fusion shares.
//!
//! A pattern is a tree written like the math it matches:
//!
//! ```ignore
//! // x · 0.5 · (1 + erf(x / √2))
//! let x = value("x");
//! mul(mul(x.clone(), add(erf(div(x, scalar(SQRT_2))), scalar(1.0))), scalar(0.5))
//! ```
//!
//! `value("x")` matches any value and binds it; a second `value("x")` must see the same
//! value, which is how a pattern says "the same x feeds both branches". `add` and `mul` try
//! both operand orders. `scalar` matches a constant (initializer or Constant node) holding
//! one value close to the given one, in any shape of one element. `either` tries each
//! alternative. Naming an operator pattern (`.named("d")`) binds its output, so a shared
//! sub-expression is written once and referred to again with `value("d")`.
//!
//! Matching returns every consistent binding; each lists the nodes it covers so that a rule
//! can check that nothing outside the match reads an intermediate value before replacing it.
//!
//! An operator marked `.anchor()` is what a rule is about (the Softmax of attention, the Erf
//! of GELU): `--explain` names each anchor left unfused with the reason. Matching with a
//! `Trace` (`matches_traced`) keeps, for each anchor a partial match covered, the mismatch
//! met deepest into the pattern after it: the first check that failed.

use super::Declined;
use crate::ir::attr;
use crate::ir::{Graph, NodeId, Tensor, ValueId};
use crate::proto::AttributeProto;

pub type Name = &'static str;

/// A condition on a constant.
#[derive(Clone, Copy)]
pub enum ConstPred {
    Any,
    /// One element equal to `value` within a relative tolerance (absolute near zero).
    Scalar(f64),
    Check(fn(&Tensor) -> bool),
}

/// A condition on an attribute (`None` when the node does not set it).
pub type AttrPred = fn(Option<&AttributeProto>) -> bool;

#[derive(Clone)]
pub enum Pat {
    /// Any value, bound to the name if there is one.
    Value(Option<Name>),
    /// An optional input that is not given.
    Absent,
    /// A constant satisfying the predicate, bound to the name if there is one.
    Const(Option<Name>, ConstPred),
    Op(Box<OpPat>),
    /// Any of the alternatives.
    Either(Vec<Pat>),
}

#[derive(Clone)]
pub struct OpPat {
    op: &'static str,
    domain: &'static str,
    inputs: Vec<Pat>,
    commutative: bool,
    /// Binds the output value.
    name: Option<Name>,
    /// Binds the node.
    node: Option<Name>,
    output: usize,
    attrs: Vec<(&'static str, AttrPred)>,
    /// The node the rule is about (see the module doc).
    anchor: bool,
}

/// A successful match: the bindings and the nodes it covers (the root's producer first).
#[derive(Clone, Debug, Default)]
pub struct Match {
    values: Vec<(Name, ValueId)>,
    node_names: Vec<(Name, NodeId)>,
    nodes: Vec<NodeId>,
    anchor: Option<NodeId>,
}

impl Match {
    pub fn value(&self, name: Name) -> Option<ValueId> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    pub fn node(&self, name: Name) -> Option<NodeId> {
        self.node_names
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, id)| *id)
    }

    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    /// The node of the pattern's anchor, when the pattern has one.
    pub fn anchor(&self) -> Option<NodeId> {
        self.anchor
    }

    /// The value bound to `name`, or why the builder cannot go on without it.
    pub fn get(&self, name: Name) -> Result<ValueId, Declined> {
        self.value(name).ok_or(Declined::Missing(name))
    }

    fn bind(mut self, name: Name, v: ValueId) -> Option<Match> {
        match self.value(name) {
            Some(bound) if bound != v => None,
            Some(_) => Some(self),
            None => {
                self.values.push((name, v));
                Some(self)
            }
        }
    }
}

// ---- building patterns ---------------------------------------------------------------------

pub fn value(name: Name) -> Pat {
    Pat::Value(Some(name))
}

pub fn any() -> Pat {
    Pat::Value(None)
}

pub fn absent() -> Pat {
    Pat::Absent
}

/// A constant of one element close to `v`.
pub fn scalar(v: f64) -> Pat {
    Pat::Const(None, ConstPred::Scalar(v))
}

/// Any constant, bound to `name`.
pub fn constant(name: Name) -> Pat {
    Pat::Const(Some(name), ConstPred::Any)
}

/// A constant satisfying `check`, bound to `name`.
pub fn constant_where(name: Name, check: fn(&Tensor) -> bool) -> Pat {
    Pat::Const(Some(name), ConstPred::Check(check))
}

pub fn either(alternatives: impl IntoIterator<Item = Pat>) -> Pat {
    Pat::Either(alternatives.into_iter().collect())
}

/// Output 0 of an ONNX operator `op` whose inputs match `inputs`, in order.
pub fn op(op: &'static str, inputs: impl IntoIterator<Item = Pat>) -> Pat {
    Pat::Op(Box::new(OpPat {
        op,
        domain: "",
        inputs: inputs.into_iter().collect(),
        commutative: false,
        name: None,
        node: None,
        output: 0,
        attrs: Vec::new(),
        anchor: false,
    }))
}

pub fn add(a: Pat, b: Pat) -> Pat {
    op("Add", [a, b]).commutative()
}

pub fn mul(a: Pat, b: Pat) -> Pat {
    op("Mul", [a, b]).commutative()
}

pub fn sub(a: Pat, b: Pat) -> Pat {
    op("Sub", [a, b])
}

pub fn div(a: Pat, b: Pat) -> Pat {
    op("Div", [a, b])
}

pub fn pow(a: Pat, b: Pat) -> Pat {
    op("Pow", [a, b])
}

pub fn unary(name: &'static str, a: Pat) -> Pat {
    op(name, [a])
}

impl Pat {
    /// Applies `f` to the operator pattern, or to every alternative of an `either`.
    fn with_op(self, f: impl Fn(&mut OpPat) + Copy) -> Pat {
        match self {
            Pat::Op(mut p) => {
                f(&mut p);
                Pat::Op(p)
            }
            Pat::Either(alts) => Pat::Either(alts.into_iter().map(|a| a.with_op(f)).collect()),
            other => other,
        }
    }

    /// Operands of a two-input operator may come in either order.
    pub fn commutative(self) -> Pat {
        self.with_op(|p| p.commutative = true)
    }

    /// Binds the matched value to `name` (an operator's output, a constant, any value).
    pub fn named(self, name: Name) -> Pat {
        match self {
            Pat::Const(_, pred) => Pat::Const(Some(name), pred),
            Pat::Value(_) => Pat::Value(Some(name)),
            Pat::Either(alts) => Pat::Either(alts.into_iter().map(|a| a.named(name)).collect()),
            other => other.with_op(|p| p.name = Some(name)),
        }
    }

    /// Binds the matched operator node to `name` (to read its attributes later).
    pub fn node(self, name: Name) -> Pat {
        self.with_op(move |p| p.node = Some(name))
    }

    pub fn domain(self, domain: &'static str) -> Pat {
        self.with_op(move |p| p.domain = domain)
    }

    /// Matches output `slot` of the operator instead of output 0.
    pub fn output(self, slot: usize) -> Pat {
        self.with_op(move |p| p.output = slot)
    }

    /// The attribute `name` must satisfy `pred`.
    pub fn attr(self, name: &'static str, pred: AttrPred) -> Pat {
        self.with_op(move |p| p.attrs.push((name, pred)))
    }

    /// Marks the operator as what the rule is about (see the module doc).
    pub fn anchor(self) -> Pat {
        self.with_op(|p| p.anchor = true)
    }

    /// The op types of the anchors in this pattern.
    pub fn anchor_ops(&self) -> Vec<&'static str> {
        self.anchors()
            .into_iter()
            .filter_map(|a| match a {
                Pat::Op(p) => Some(p.op),
                _ => None,
            })
            .collect()
    }

    /// The sub-patterns rooted at an anchor: what a rule asks of an anchor's inputs.
    pub fn anchors(&self) -> Vec<&Pat> {
        match self {
            Pat::Op(p) => {
                let mut found: Vec<&Pat> = p.inputs.iter().flat_map(Pat::anchors).collect();
                if p.anchor {
                    found.push(self);
                }
                found
            }
            Pat::Either(alts) => alts.iter().flat_map(Pat::anchors).collect(),
            _ => Vec::new(),
        }
    }

    // ---- matching ----------------------------------------------------------------------

    /// Every way this pattern matches with its root at `v`.
    pub fn matches(&self, g: &Graph, v: ValueId) -> Vec<Match> {
        self.extend(g, Some(v), Match::default(), &mut Trace::default())
    }

    /// `matches`, keeping in `trace` the deepest mismatch after each anchor reached.
    pub fn matches_traced(&self, g: &Graph, v: ValueId, trace: &mut Trace) -> Vec<Match> {
        trace.on = true;
        self.extend(g, Some(v), Match::default(), trace)
    }

    fn extend(&self, g: &Graph, v: Option<ValueId>, m: Match, trace: &mut Trace) -> Vec<Match> {
        let Some(v) = v else {
            return match self {
                Pat::Absent => vec![m],
                // `either([any(), absent()])`: an optional input given or not.
                Pat::Either(alts) => alts
                    .iter()
                    .flat_map(|a| a.extend(g, None, m.clone(), trace))
                    .collect(),
                _ => {
                    trace.miss(&m, || "an optional input is not given".into());
                    Vec::new()
                }
            };
        };
        match self {
            Pat::Absent => {
                trace.miss(&m, || format!("{} is given", g.value_name(v)));
                Vec::new()
            }
            Pat::Value(None) => vec![m],
            Pat::Value(Some(name)) => bind_or_trace(m, name, v, g, trace),
            Pat::Const(name, pred) => {
                let Some(t) = g.constant(v) else {
                    trace.miss(&m, || format!("{} is not a constant", g.value_name(v)));
                    return Vec::new();
                };
                if !pred.holds(&t) {
                    trace.miss(&m, || pred.refusal(g.value_name(v), &t));
                    return Vec::new();
                }
                match name {
                    Some(name) => bind_or_trace(m, name, v, g, trace),
                    None => vec![m],
                }
            }
            Pat::Either(alts) => alts
                .iter()
                .flat_map(|a| a.extend(g, Some(v), m.clone(), trace))
                .collect(),
            Pat::Op(p) => p.extend(g, v, m, trace),
        }
    }
}

fn bind_or_trace(m: Match, name: Name, v: ValueId, g: &Graph, trace: &mut Trace) -> Vec<Match> {
    let bound = m.value(name);
    match m.clone().bind(name, v) {
        Some(m) => vec![m],
        None => {
            trace.miss(&m, || {
                let other = bound.map_or("", |b| g.value_name(b));
                format!(
                    "{} is not the same value as {name} ({other})",
                    g.value_name(v)
                )
            });
            Vec::new()
        }
    }
}

/// The deepest mismatch met after each anchor, while tracing (see the module doc).
#[derive(Default)]
pub struct Trace {
    on: bool,
    /// Per anchor: the nodes the partial match covered, and what did not match next.
    pub misses: Vec<(NodeId, usize, String)>,
}

impl Trace {
    fn miss(&mut self, m: &Match, what: impl FnOnce() -> String) {
        let Some(anchor) = m.anchor.filter(|_| self.on) else {
            return;
        };
        let depth = m.nodes.len();
        match self.misses.iter_mut().find(|(a, _, _)| *a == anchor) {
            Some(best) if best.1 >= depth => {}
            Some(best) => *best = (anchor, depth, what()),
            None => self.misses.push((anchor, depth, what())),
        }
    }
}

impl OpPat {
    fn extend(&self, g: &Graph, v: ValueId, mut m: Match, trace: &mut Trace) -> Vec<Match> {
        if let Some(name) = self.name {
            match m.clone().bind(name, v) {
                Some(bound) => m = bound,
                None => return bind_or_trace(m, name, v, g, trace),
            }
        }
        let Some((id, slot)) = g.value(v).producer else {
            trace.miss(&m, || {
                format!("{} is a graph input, not {}", g.value_name(v), self.op)
            });
            return Vec::new();
        };
        let node = g.node(id);
        let domain_ok = match self.domain {
            "" => node.domain().is_empty(),
            d => node.domain() == d,
        };
        if slot != self.output || node.op_type() != self.op || !domain_ok {
            trace.miss(&m, || {
                format!(
                    "{} comes from {}, not {}",
                    g.value_name(v),
                    node.op_type(),
                    self.op
                )
            });
            return Vec::new();
        }
        // The anchor is reached once its op type is: a mismatch on its own inputs or
        // attributes is the anchor's reason.
        if self.anchor && m.anchor.is_none() {
            m.anchor = Some(id);
        }
        if node.inputs.len() != self.inputs.len() {
            trace.miss(&m, || {
                format!(
                    "{} `{}` has {} inputs, not {}",
                    self.op,
                    node.name(),
                    node.inputs.len(),
                    self.inputs.len()
                )
            });
            return Vec::new();
        }
        if let Some((name, _)) = self
            .attrs
            .iter()
            .find(|(name, pred)| !pred(attr::get(&node.proto, name)))
        {
            trace.miss(&m, || {
                let found = attr::get(&node.proto, name).map(crate::ir::dump::attribute_text);
                let found = found.unwrap_or_else(|| format!("{name} not set"));
                format!(
                    "{} `{}`: {found} is not one the rule takes",
                    self.op,
                    node.name()
                )
            });
            return Vec::new();
        }
        if !m.nodes.contains(&id) {
            m.nodes.push(id);
        }
        if let Some(name) = self.node {
            match m.node(name) {
                Some(bound) if bound != id => return Vec::new(),
                Some(_) => {}
                None => m.node_names.push((name, id)),
            }
        }
        let orders: &[[usize; 2]] = if self.commutative && self.inputs.len() == 2 {
            &[[0, 1], [1, 0]]
        } else {
            &[[0, 1]]
        };
        let mut results = Vec::new();
        for order in orders {
            let mut states = vec![m.clone()];
            for (i, pat) in self.inputs.iter().enumerate() {
                let slot = if self.inputs.len() == 2 { order[i] } else { i };
                let input = node.inputs[slot];
                states = states
                    .into_iter()
                    .flat_map(|s| pat.extend(g, input, s, trace))
                    .collect();
            }
            results.extend(states);
        }
        results
    }
}

impl ConstPred {
    fn holds(&self, t: &Tensor) -> bool {
        match self {
            ConstPred::Any => true,
            ConstPred::Scalar(want) => t.scalar_f64().is_some_and(|got| close(got, *want)),
            ConstPred::Check(f) => f(t),
        }
    }

    /// Why the constant `name` holding `t` fails the predicate, for `--explain`.
    fn refusal(&self, name: &str, t: &Tensor) -> String {
        match (self, t.scalar_f64()) {
            (ConstPred::Scalar(want), Some(got)) => {
                format!(
                    "constant {name} is {got}, not {want} (off by {:e})",
                    got - want
                )
            }
            (ConstPred::Scalar(want), None) => {
                format!("constant {name} {:?} is not the scalar {want}", t.dims())
            }
            (_, Some(got)) => format!("constant {name} = {got} is not one the rule takes"),
            (_, None) => format!("constant {name} {:?} is not one the rule takes", t.dims()),
        }
    }
}

/// Equal up to float32 rounding: exporters write these constants as f32.
pub fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-6 * want.abs().max(1e-3)
}

/// Attribute predicate: an int attribute equal to `v`, absent counting as `default`.
pub fn int_attr_is(a: Option<&AttributeProto>, v: i64, default: i64) -> bool {
    a.map_or(default, |a| a.i()) == v
}

/// Attribute predicate: a Transpose's `perm` is `perm`.
pub fn perm_is(a: Option<&AttributeProto>, perm: &[i64]) -> bool {
    a.is_some_and(|a| a.ints == perm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::testing::model;

    #[test]
    fn commutative_operands_match_in_either_order() {
        let m = model(&["x"], &["y"], &["w"], &[("Mul", &["w", "x"], &["y"])]);
        let g = &m.graph;
        let y = g.find_value("y").unwrap();
        let pat = mul(value("x"), constant("w"));
        let found = pat.matches(g, y);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].value("x"), g.find_value("x"));
        assert_eq!(found[0].value("w"), g.find_value("w"));
        assert!(div(value("x"), constant("w")).matches(g, y).is_empty());
    }

    #[test]
    fn a_repeated_name_must_see_the_same_value() {
        // y = (x - a) * (x - b): `d` twice only matches when both factors are the same value.
        let m = model(
            &["x", "a", "b"],
            &["y", "z"],
            &[],
            &[
                ("Sub", &["x", "a"], &["d1"]),
                ("Sub", &["x", "b"], &["d2"]),
                ("Mul", &["d1", "d2"], &["y"]),
                ("Mul", &["d1", "d1"], &["z"]),
            ],
        );
        let g = &m.graph;
        let square = mul(sub(value("x"), any()).named("d"), value("d"));
        assert!(square.matches(g, g.find_value("y").unwrap()).is_empty());
        let found = square.matches(g, g.find_value("z").unwrap());
        assert!(!found.is_empty());
        assert_eq!(found[0].nodes().len(), 2, "Mul and the shared Sub");
    }

    #[test]
    fn a_trace_keeps_the_deepest_mismatch_after_the_anchor() {
        // y = Erf(x · w) · w with w = 1: a GELU-like shape whose constant is not 0.5.
        let m = model(
            &["x"],
            &["y"],
            &["w"],
            &[
                ("Mul", &["x", "w"], &["xw"]),
                ("Erf", &["xw"], &["e"]),
                ("Mul", &["e", "w"], &["y"]),
            ],
        );
        let g = &m.graph;
        let (y, e) = (g.find_value("y").unwrap(), g.find_value("e").unwrap());
        let erf = g.producer(e).unwrap();
        let pat = mul(
            unary("Erf", mul(value("x"), scalar(2.0))).anchor(),
            scalar(0.5),
        );
        assert_eq!(pat.anchor_ops(), ["Erf"]);
        let mut trace = Trace::default();
        assert!(pat.matches_traced(g, y, &mut trace).is_empty());
        // Both operand orders of the outer Mul reach the Erf; the inner constant is the
        // deepest mismatch, and it says by how much.
        assert_eq!(trace.misses.len(), 1);
        let (anchor, depth, why) = &trace.misses[0];
        assert_eq!((*anchor, *depth), (erf, 3));
        assert_eq!(why, "constant w is 1, not 2 (off by -1e0)");
        // Untraced matching records nothing and finds the same.
        assert!(pat.matches(g, y).is_empty());
    }

    #[test]
    fn an_alternative_may_be_an_absent_input() {
        // y = Clip(x, "", hi): its lower bound is not given.
        let m = model(
            &["x"],
            &["y"],
            &["hi"],
            &[("Clip", &["x", "", "hi"], &["y"])],
        );
        let g = &m.graph;
        let y = g.find_value("y").unwrap();
        let optional = || either([any(), absent()]);
        let clip = |lower: Pat, upper: Pat| op("Clip", [value("x"), lower, upper]);
        assert_eq!(clip(optional(), optional()).matches(g, y).len(), 1);
        assert_eq!(clip(absent(), constant("hi")).matches(g, y).len(), 1);
        // `any()` is a given value: alone it does not take the missing bound.
        assert!(clip(any(), optional()).matches(g, y).is_empty());
        assert!(clip(optional(), absent()).matches(g, y).is_empty());
    }

    #[test]
    fn scalars_match_within_float32_rounding() {
        assert!(close(
            std::f32::consts::SQRT_2 as f64,
            std::f64::consts::SQRT_2
        ));
        assert!(close(0.044715f32 as f64, 0.044715));
        assert!(!close(0.0447, 0.044715));
        assert!(close(0.0, 0.0));
    }
}
