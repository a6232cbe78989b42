//! Types of values: element type and shape, with symbolic dimensions.
//!
//! A dimension is a product `coeff · s₁^e₁ · s₂^e₂ …` of named symbols (`batch`,
//! `sequence`), so that reshapes can multiply and divide dims exactly (`batch*sequence`, then
//! back). An expression that is not a product (`past_sequence + sequence`, `Min(128,
//! sequence)`) is kept whole as one opaque symbol named by its text. A dim nothing is known
//! about is `Unknown`; two unknown dims are never taken to be equal (`same`). Shape inference
//! names the unknown dims of the values it types (`Dim::anonymous`), so that dims computed
//! from one of them compare equal; those names are never written into a file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::proto::tensor_shape_proto::dimension::Value as DimValue;
use crate::proto::tensor_shape_proto::Dimension;
use crate::proto::type_proto::{Tensor as TensorType, Value as Type};
use crate::proto::{TensorShapeProto, TypeProto};

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    /// `coeff · Π symbol^exponent`; a known size has no symbols.
    Product {
        coeff: i64,
        symbols: BTreeMap<String, u32>,
    },
    Unknown,
}

/// What the symbols of `Dim::anonymous` start with.
const ANONYMOUS: &str = "__anon_";

impl Dim {
    pub fn known(n: i64) -> Dim {
        Dim::Product {
            coeff: n,
            symbols: BTreeMap::new(),
        }
    }

    /// A named symbol; a name that is an expression (not an identifier) stays one opaque
    /// symbol.
    pub fn symbol(name: &str) -> Dim {
        Dim::Product {
            coeff: 1,
            symbols: BTreeMap::from([(name.to_string(), 1)]),
        }
    }

    /// Axis `axis` of the value named `value`, when nothing else is known of its size: a
    /// symbol that stands for that one dim, so that the dims computed from it can be proved
    /// equal to each other (a Conv's output positions, reshaped into a query and a key, are
    /// the same sequence) where `Unknown` proves nothing. Stable: the same value and axis
    /// give the same symbol in every run of shape inference. Internal: `to_proto` never
    /// writes one into a file (`ValueType::without_anonymous_dims`), where a runtime would
    /// take it for a size of its own.
    pub fn anonymous(value: &str, axis: usize) -> Dim {
        let name = crate::ir::dump::fnv1a(value.as_bytes());
        Dim::symbol(&format!("{ANONYMOUS}{name:016x}_{axis}"))
    }

    /// True when the dim is computed from an `anonymous` one.
    pub fn mentions_anonymous(&self) -> bool {
        match self {
            Dim::Product { symbols, .. } => symbols.keys().any(|s| s.contains(ANONYMOUS)),
            Dim::Unknown => false,
        }
    }

    /// The size, when it is known.
    pub fn value(&self) -> Option<i64> {
        match self {
            Dim::Product { coeff, symbols } if symbols.is_empty() => Some(*coeff),
            _ => None,
        }
    }

    /// A product of a known factor other than 1 and a symbolic rest, as `(factor, rest)`:
    /// `4*batch` → `(4, batch)`.
    pub fn split_factor(&self) -> Option<(i64, Dim)> {
        match self {
            Dim::Product { coeff, symbols } if *coeff != 1 && !symbols.is_empty() => Some((
                *coeff,
                Dim::Product {
                    coeff: 1,
                    symbols: symbols.clone(),
                },
            )),
            _ => None,
        }
    }

    /// True when the dim is one symbol, to the first power and without a factor.
    pub fn is_plain_symbol(&self) -> bool {
        matches!(self, Dim::Product { coeff: 1, symbols } if symbols.len() == 1
            && symbols.values().all(|&e| e == 1))
    }

    /// True when both dims are provably the same size.
    pub fn same(&self, other: &Dim) -> bool {
        !matches!(self, Dim::Unknown) && self == other
    }

    pub fn mul(&self, other: &Dim) -> Dim {
        match (self, other) {
            (
                Dim::Product {
                    coeff: a,
                    symbols: sa,
                },
                Dim::Product {
                    coeff: b,
                    symbols: sb,
                },
            ) => {
                let mut symbols = sa.clone();
                for (s, e) in sb {
                    let have = symbols.entry(s.clone()).or_default();
                    let Some(sum) = have.checked_add(*e) else {
                        return Dim::Unknown;
                    };
                    *have = sum;
                }
                match a.checked_mul(*b) {
                    Some(coeff) if coeff != 0 => Dim::Product { coeff, symbols },
                    Some(_) => Dim::known(0),
                    None => Dim::Unknown,
                }
            }
            _ => Dim::Unknown,
        }
    }

    /// `self / other` when the division is exact.
    pub fn div(&self, other: &Dim) -> Option<Dim> {
        let (
            Dim::Product {
                coeff: a,
                symbols: sa,
            },
            Dim::Product {
                coeff: b,
                symbols: sb,
            },
        ) = (self, other)
        else {
            return None;
        };
        // Checked: a zero divisor and i64::MIN / -1 are no exact quotient.
        if a.checked_rem(*b) != Some(0) {
            return None;
        }
        let mut symbols = sa.clone();
        for (s, e) in sb {
            let have = symbols.get_mut(s)?;
            if *have < *e {
                return None;
            }
            *have -= e;
            if *have == 0 {
                symbols.remove(s);
            }
        }
        Some(Dim::Product {
            coeff: a.checked_div(*b)?,
            symbols,
        })
    }

    /// `self + other`: exact for known sizes and like terms, an opaque symbol otherwise.
    pub fn add(&self, other: &Dim) -> Dim {
        self.combine(other, 1)
    }

    pub fn sub(&self, other: &Dim) -> Dim {
        self.combine(other, -1)
    }

    fn combine(&self, other: &Dim, sign: i64) -> Dim {
        match (self, other) {
            (
                Dim::Product {
                    coeff: a,
                    symbols: sa,
                },
                Dim::Product {
                    coeff: b,
                    symbols: sb,
                },
            ) if sa == sb => match b.checked_mul(sign).and_then(|b| a.checked_add(b)) {
                Some(0) => Dim::known(0),
                Some(coeff) => Dim::Product {
                    coeff,
                    symbols: sa.clone(),
                },
                None => Dim::Unknown,
            },
            (Dim::Unknown, _) | (_, Dim::Unknown) => Dim::Unknown,
            _ if other.value() == Some(0) => self.clone(),
            _ if self.value() == Some(0) => other.mul(&Dim::known(sign)),
            // `a + (-1·b)` is `a - b` (torch's dynamo writes subtractions of dims so).
            (_, Dim::Product { coeff, symbols }) if *coeff < 0 && !symbols.is_empty() => {
                self.combine(&other.mul(&Dim::known(-1)), -sign)
            }
            _ if sign < 0 && self.minus_overflow(other).is_some() => {
                self.minus_overflow(other).unwrap_or(Dim::Unknown)
            }
            // `(a + b) - a` is `b`: a decoder's positions run from the past length to the
            // total one.
            _ if sign < 0
                && self
                    .sum_terms()
                    .is_some_and(|(a, b)| &a == other || &b == other) =>
            {
                match self.sum_terms() {
                    Some((a, b)) if &a == other => b,
                    Some((a, _)) => a,
                    None => Dim::Unknown,
                }
            }
            // A sum's terms are written in order, so that `a + b` and `b + a` are one symbol.
            _ if sign > 0 => {
                let (a, b) = (self.to_string(), other.to_string());
                let (a, b) = if a <= b { (a, b) } else { (b, a) };
                Dim::symbol(&format!("({a} + {b})"))
            }
            _ => Dim::symbol(&format!("({self} - {other})")),
        }
    }

    /// The two terms of an opaque sum symbol `(a + b)` (as `combine` writes it).
    fn sum_terms(&self) -> Option<(Dim, Dim)> {
        let Dim::Product { coeff: 1, symbols } = self else {
            return None;
        };
        let [(name, 1)] = symbols.iter().collect::<Vec<_>>()[..] else {
            return None;
        };
        let inner = parenthesized(name)?;
        let at = last_top_level(inner, " + ")?;
        Some((Dim::parse(&inner[..at]), Dim::parse(&inner[at + 3..])))
    }

    /// The product of `dims` (1 for none).
    pub fn product<'a>(dims: impl IntoIterator<Item = &'a Dim>) -> Dim {
        dims.into_iter().fold(Dim::known(1), |acc, d| acc.mul(d))
    }

    /// True when the dim is provably at least 1, taking every named symbol for a size of at
    /// least 1 (a batch, a sequence). An opaque symbol with a difference or a negative number
    /// in it (`(sequence - 1)`, `(sequence + -2)`) may be anything, so it is not.
    pub fn is_positive(&self) -> bool {
        match self {
            Dim::Product { coeff, symbols } => {
                *coeff > 0 && symbols.keys().all(|s| !s.contains('-'))
            }
            Dim::Unknown => false,
        }
    }

    /// The smaller of two dims (`Ord::min` would compare the representations instead): exact
    /// for known sizes, equal dims, and a known size of at most 1 against a positive dim;
    /// otherwise an opaque `Min(a, b)` symbol, written as torch writes it (a known operand
    /// first, else in text order), which `broadcast` understands.
    pub fn minimum(&self, other: &Dim) -> Dim {
        let at_most_one = |d: &Dim| d.value().is_some_and(|v| v <= 1);
        match (self.value(), other.value()) {
            _ if matches!(self, Dim::Unknown) || matches!(other, Dim::Unknown) => Dim::Unknown,
            (Some(a), Some(b)) => Dim::known(a.min(b)),
            _ if self == other => self.clone(),
            _ if at_most_one(self) && other.is_positive() => self.clone(),
            _ if at_most_one(other) && self.is_positive() => other.clone(),
            _ => self.call("Min", other),
        }
    }

    /// The opaque symbol `function(a, b)` of two dims, operands written as torch writes
    /// them: a known operand first, else in text order.
    fn call(&self, function: &str, other: &Dim) -> Dim {
        let (a, b) = match (self.value(), other.value()) {
            (None, Some(_)) => (other.to_string(), self.to_string()),
            (Some(_), None) => (self.to_string(), other.to_string()),
            _ => {
                let (a, b) = (self.to_string(), other.to_string());
                if a <= b {
                    (a, b)
                } else {
                    (b, a)
                }
            }
        };
        Dim::symbol(&format!("{function}({a}, {b})"))
    }

    /// The larger of two dims where `Max` of shape values cannot be decided: an opaque
    /// `Max(a, b)` symbol, written as torch writes it (a known operand first, else in text
    /// order), which `sub` understands (`a - Max(0, a - k)` is `Min(a, k)`). Unknown where
    /// either is.
    pub fn maximum(&self, other: &Dim) -> Dim {
        match (self.value(), other.value()) {
            _ if matches!(self, Dim::Unknown) || matches!(other, Dim::Unknown) => Dim::Unknown,
            (Some(a), Some(b)) => Dim::known(a.max(b)),
            _ if self == other => self.clone(),
            _ => self.call("Max", other),
        }
    }

    /// `Min(a, k)` when `self` is `a` and `other` is `Max(0, a - k)` for a known `k ≥ 0`:
    /// what is left of `a` positions once those past a window of `k` are dropped (torch's
    /// sliding-window caches: `past - Max(0, past - 4095)`).
    fn minus_overflow(&self, other: &Dim) -> Option<Dim> {
        let [zero, excess] = &other.call_operands("Max")?[..] else {
            return None;
        };
        if Dim::parse(zero).value() != Some(0) {
            return None;
        }
        let k = -Dim::parse(excess).sub(self).value()?;
        (k >= 0).then(|| self.minimum(&Dim::known(k)))
    }

    /// The operands of an opaque `Min(a, b)` symbol.
    fn min_operands(&self) -> Option<(Dim, Dim)> {
        match &self.call_operands("Min")?[..] {
            [a, b] => Some((Dim::parse(a), Dim::parse(b))),
            _ => None,
        }
    }

    /// The operand texts of an opaque `function(a, b, …)` symbol.
    fn call_operands(&self, function: &str) -> Option<Vec<&str>> {
        let Dim::Product { coeff: 1, symbols } = self else {
            return None;
        };
        if symbols.len() != 1 {
            return None;
        }
        let (name, &1) = symbols.iter().next()? else {
            return None;
        };
        let inner = parenthesized(name.strip_prefix(function)?)?;
        Some(
            split_top_level(inner, b',')
                .into_iter()
                .map(str::trim)
                .collect(),
        )
    }

    /// True when `self` is `Min(of, k)` for a positive `k`: then broadcasting it with `of`
    /// gives `of` (either the minimum is `of`, or it is `k < of` and must be 1).
    fn is_min_of(&self, of: &Dim) -> bool {
        self.min_operands().is_some_and(|(a, b)| {
            (a.same(of) && b.is_positive()) || (b.same(of) && a.is_positive())
        })
    }

    /// What an opaque `Broadcast(a, b, …)` symbol stands for, as the texts of its operands;
    /// any other dim stands for itself.
    fn broadcast_operands(&self) -> BTreeSet<String> {
        match self.call_operands("Broadcast") {
            Some(operands) => operands.into_iter().map(str::to_string).collect(),
            None => BTreeSet::from([self.to_string()]),
        }
    }

    /// True when `self` is `of`, or `of` broadcast with other dims (`Broadcast(of, …)`; `of`'s
    /// own operands when it is such a symbol): what an Expand of an axis of size `of` to a
    /// size computed elsewhere (a mask's length) is typed.
    pub fn is_broadcast_of(&self, of: &Dim) -> bool {
        self.same(of)
            || (self.call_operands("Broadcast").is_some()
                && of
                    .broadcast_operands()
                    .is_subset(&self.broadcast_operands()))
    }

    /// True when a valid model that broadcasts `self` with `of` has them equal: they are the
    /// same, or `self` is `Min(of, k)` for a known `k ≥ 2` (the minimum is `of`, or it is
    /// `k < of`, neither 1 nor `of`, which broadcasting refuses). A bound of 1 is always 1.
    pub fn equals_where_broadcast(&self, of: &Dim) -> bool {
        let bound_fits = |d: &Dim, k: &Dim| d.same(of) && k.value().is_some_and(|k| k >= 2);
        self.same(of)
            || self
                .min_operands()
                .is_some_and(|(a, b)| bound_fits(&a, &b) || bound_fits(&b, &a))
    }

    /// The dim two dims broadcast to (ONNX multidirectional broadcasting), for a valid
    /// model: a 1 gives way to the other dim; equal dims stay; a known size other than 1 wins
    /// over a symbol or an unknown dim (which must then be 1 or that size); a dim wins over
    /// `Min` of itself and a positive bound. Two different symbols, either of which may be 1,
    /// give the opaque symbol `Broadcast(a, b)`: the size is whichever is not 1, a function
    /// of the operands, so every value broadcast from the same dims provably has the same
    /// size (tf2onnx names each input's batch apart, and the sum of their embeddings must
    /// still be seen to split into heads by its own batch). Broadcasting is associative and
    /// commutative, so the operands are kept as a set (flattened, in text order). An unknown
    /// operand gives `Unknown`.
    pub fn broadcast(&self, other: &Dim) -> Dim {
        match (self.value(), other.value()) {
            (Some(1), _) => other.clone(),
            (_, Some(1)) => self.clone(),
            (Some(a), Some(b)) if a == b => self.clone(),
            (Some(_), Some(_)) => Dim::Unknown,
            (Some(_), None) => self.clone(),
            (None, Some(_)) => other.clone(),
            (None, None) if self.same(other) || other.is_min_of(self) => self.clone(),
            (None, None) if self.is_min_of(other) => other.clone(),
            _ if matches!(self, Dim::Unknown) || matches!(other, Dim::Unknown) => Dim::Unknown,
            (None, None) => {
                let (mine, theirs) = (self.broadcast_operands(), other.broadcast_operands());
                if theirs.is_subset(&mine) {
                    return self.clone();
                }
                if mine.is_subset(&theirs) {
                    return other.clone();
                }
                let all: Vec<String> = mine.union(&theirs).cloned().collect();
                Dim::symbol(&format!("Broadcast({})", all.join(", ")))
            }
        }
    }

    /// Of two dims that a valid model requires to be equal, the one that says more: a
    /// known size, else a symbol, else `Unknown`.
    pub fn unify(&self, other: &Dim) -> Dim {
        match (self, other) {
            (Dim::Unknown, d) | (d, Dim::Unknown) => d.clone(),
            (a, b) if b.value().is_some() && a.value().is_none() => b.clone(),
            (a, _) => a.clone(),
        }
    }

    /// The size once every symbol takes the value in `values`.
    pub fn evaluate(&self, values: &dyn Fn(&str) -> Option<i64>) -> Option<i64> {
        match self {
            Dim::Product { coeff, symbols } => symbols.iter().try_fold(*coeff, |acc, (s, e)| {
                acc.checked_mul(values(s)?.checked_pow(*e)?)
            }),
            Dim::Unknown => None,
        }
    }

    /// Reads a `dim_param`, so that what `Display` writes reads back the same: a product such
    /// as `64*batch*sequence^2` becomes that product; a sum or difference
    /// (`past_sequence+sequence`, `past_sequence + sequence`, `a - b`) becomes what `add` and
    /// `sub` make of its terms; a factor may be a parenthesized expression or a call such as
    /// `Min(128, sequence)` (kept as one opaque symbol). A `-` is a difference only with
    /// spaces around it, since names may hold hyphens. A number in parentheses is a symbol
    /// named by it (see `Display`). Any other text is one opaque symbol.
    pub fn parse(text: &str) -> Dim {
        /// Longer texts are not taken apart (each nesting level costs a stack frame).
        const MAX_PARSED: usize = 256;
        let text = text.trim();
        if text.len() > MAX_PARSED {
            return Dim::symbol(text);
        }
        let plus = last_top_level(text, "+").map(|at| (at, 1, 1));
        let minus = last_top_level(text, " - ").map(|at| (at, 3, -1));
        // Sums and differences associate to the left: split at the last operator.
        if let Some((at, len, sign)) = plus.into_iter().chain(minus).max() {
            let (a, b) = (Dim::parse(&text[..at]), Dim::parse(&text[at + len..]));
            return if sign > 0 { a.add(&b) } else { a.sub(&b) };
        }
        let is_name = |s: &str| {
            s.chars()
                .next()
                .is_some_and(|c| c.is_alphabetic() || c == '_')
                && s.chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
        };
        let factor = |part: &str| -> Option<Dim> {
            if let Ok(n) = part.parse::<i64>() {
                return Some(Dim::known(n));
            }
            let (base, exp) = match part.rsplit_once('^') {
                Some((base, e)) if !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()) => {
                    (base, e.parse::<u32>().ok()?)
                }
                _ => (part, 1),
            };
            if is_name(base) {
                return Some(Dim::Product {
                    coeff: 1,
                    symbols: BTreeMap::from([(base.to_string(), exp)]),
                });
            }
            let single = if let Some(inner) = parenthesized(base) {
                match is_number(inner) {
                    true => Dim::symbol(inner.trim()),
                    false => Dim::parse(inner),
                }
            } else if base.split_once('(').is_some_and(|(name, _)| {
                is_name(name) && parenthesized(&base[name.len()..]).is_some()
            }) {
                Dim::symbol(base)
            } else {
                return None;
            };
            (exp <= MAX_PARSED as u32)
                .then(|| (0..exp).fold(Dim::known(1), |acc, _| acc.mul(&single)))
        };
        split_top_level(text, b'*')
            .into_iter()
            .map(factor)
            .try_fold(Dim::known(1), |acc, f| f.map(|f| acc.mul(&f)))
            .unwrap_or_else(|| Dim::symbol(text))
    }

    /// The name of a symbol named by a number (`"12"`), when the dim is that symbol alone.
    fn numbered_symbol(&self) -> Option<&str> {
        let Dim::Product { coeff: 1, symbols } = self else {
            return None;
        };
        match symbols.iter().collect::<Vec<_>>()[..] {
            [(name, 1)] if is_number(name) => Some(name),
            _ => None,
        }
    }

    fn from_proto(d: &Dimension) -> Dim {
        match &d.value {
            Some(DimValue::DimValue(v)) if *v >= 0 => Dim::known(*v),
            // A `dim_param` names a dimension whatever its text: torch 2.6's dynamo exporter
            // names dynamic ones after the example's sizes (`"2"`, `"12"`), which runtimes
            // take at any size.
            Some(DimValue::DimParam(p)) if is_number(p) => Dim::symbol(p.trim()),
            Some(DimValue::DimParam(p)) if !p.is_empty() => Dim::parse(p),
            _ => Dim::Unknown,
        }
    }

    fn to_proto(&self) -> Dimension {
        let value = match self {
            Dim::Unknown => None,
            d => match (d.value(), d.numbered_symbol()) {
                (Some(v), _) => Some(DimValue::DimValue(v)),
                // The name as the file wrote it (`from_proto`).
                (None, Some(name)) => Some(DimValue::DimParam(name.to_string())),
                (None, None) => Some(DimValue::DimParam(d.to_string())),
            },
        };
        Dimension {
            value,
            denotation: None,
        }
    }
}

/// Whether `text` is a number: a `dim_param` that is one names a symbol (`Dim::from_proto`).
pub(crate) fn is_number(text: &str) -> bool {
    text.trim().parse::<i64>().is_ok()
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Dim::Product { coeff, symbols } = self else {
            return write!(f, "?");
        };
        let mut parts: Vec<String> = Vec::new();
        if *coeff != 1 || symbols.is_empty() {
            parts.push(coeff.to_string());
        }
        for (s, e) in symbols {
            // A symbol named by a number, in parentheses: `(12)` reads back as that symbol, in
            // products (`2*(12)`, not 24) and in the sums and calls `parse` takes apart.
            let name = match is_number(s) {
                true => format!("({s})"),
                false => s.clone(),
            };
            parts.push(if *e == 1 { name } else { format!("{name}^{e}") });
        }
        write!(f, "{}", parts.join("*"))
    }
}

/// Nesting depth of parentheses before each byte of `text`, with the byte.
fn depths(text: &str) -> impl Iterator<Item = (usize, i32, u8)> + '_ {
    let mut depth = 0i32;
    text.bytes().enumerate().map(move |(i, b)| {
        let at = depth;
        match b {
            b'(' => depth += 1,
            b')' => depth -= 1,
            _ => {}
        }
        (i, at, b)
    })
}

/// Where the last `op` outside parentheses starts in `text`.
fn last_top_level(text: &str, op: &str) -> Option<usize> {
    depths(text)
        .filter(|&(i, depth, _)| depth == 0 && text.as_bytes()[i..].starts_with(op.as_bytes()))
        .map(|(i, _, _)| i)
        .last()
}

/// `text` cut at each `sep` outside parentheses.
fn split_top_level(text: &str, sep: u8) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    for (i, depth, b) in depths(text) {
        if depth == 0 && b == sep {
            parts.push(&text[start..i]);
            start = i + 1;
        }
    }
    parts.push(&text[start..]);
    parts
}

/// The inside of `text` when one pair of parentheses encloses all of it.
fn parenthesized(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('(')?.strip_suffix(')')?;
    let closes_early = depths(inner).any(|(_, depth, b)| b == b')' && depth == 0);
    (!closes_early).then_some(inner)
}

/// The shape two shapes broadcast to (ONNX multidirectional broadcasting): aligned at the
/// last dim, the shorter one padded with 1s, each pair of dims as `Dim::broadcast`.
/// True when the two shapes are provably equal: same rank, and each dim the same size or
/// the same symbol (`Dim::same`).
pub fn same_shape(a: &[Dim], b: &[Dim]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same(y))
}

pub fn broadcast_shapes(a: &[Dim], b: &[Dim]) -> Vec<Dim> {
    let rank = a.len().max(b.len());
    let one = Dim::known(1);
    let at = |s: &[Dim], i: usize| -> Dim {
        let pad = rank - s.len();
        if i < pad {
            one.clone()
        } else {
            s[i - pad].clone()
        }
    };
    (0..rank).map(|i| at(a, i).broadcast(&at(b, i))).collect()
}

/// Element type (an ONNX `TensorProto.DataType` code, 0 when unknown) and shape (`None`
/// when even the rank is unknown) of a tensor value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueType {
    pub elem: i32,
    pub shape: Option<Vec<Dim>>,
}

impl ValueType {
    pub fn new(elem: i32, shape: Vec<Dim>) -> ValueType {
        ValueType {
            elem,
            shape: Some(shape),
        }
    }

    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(Vec::len)
    }

    /// The dims as sizes, when all of them are known.
    pub fn static_shape(&self) -> Option<Vec<i64>> {
        self.shape.as_ref()?.iter().map(Dim::value).collect()
    }

    /// The type of a tensor `TypeProto`; `None` for sequences, maps and optionals.
    pub fn from_type_proto(t: &TypeProto) -> Option<ValueType> {
        match &t.value {
            Some(Type::TensorType(tt)) => Some(ValueType {
                elem: tt.elem_type(),
                shape: tt
                    .shape
                    .as_ref()
                    .map(|s| s.dim.iter().map(Dim::from_proto).collect()),
            }),
            _ => None,
        }
    }

    /// `self` with every dim computed from an anonymous one unknown (`Dim::anonymous`).
    pub fn without_anonymous_dims(&self) -> ValueType {
        let forget = |d: &Dim| {
            if d.mentions_anonymous() {
                Dim::Unknown
            } else {
                d.clone()
            }
        };
        ValueType {
            elem: self.elem,
            shape: self.shape.as_ref().map(|s| s.iter().map(forget).collect()),
        }
    }

    pub fn to_type_proto(&self) -> TypeProto {
        TypeProto {
            value: Some(Type::TensorType(TensorType {
                elem_type: (self.elem != 0).then_some(self.elem),
                shape: self.shape.as_ref().map(|dims| TensorShapeProto {
                    dim: dims.iter().map(Dim::to_proto).collect(),
                }),
            })),
            denotation: None,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", crate::ir::tensor::dtype_name(self.elem))?;
        match &self.shape {
            None => write!(f, "[..]"),
            Some(dims) => {
                let d: Vec<String> = dims.iter().map(Dim::to_string).collect();
                write!(f, "[{}]", d.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_multiply_and_divide_exactly() {
        let b = Dim::symbol("batch");
        let s = Dim::symbol("sequence");
        let bs64 = b.mul(&s).mul(&Dim::known(64));
        assert_eq!(bs64.to_string(), "64*batch*sequence");
        assert_eq!(
            bs64.div(&Dim::known(16)).unwrap().to_string(),
            "4*batch*sequence"
        );
        assert_eq!(bs64.div(&b.mul(&s)), Some(Dim::known(64)));
        assert_eq!(bs64.div(&Dim::known(3)), None);
        assert_eq!(b.div(&s), None);
        assert_eq!(Dim::known(6).mul(&Dim::known(7)).value(), Some(42));
    }

    #[test]
    fn sums_of_unlike_terms_are_opaque_symbols() {
        let p = Dim::symbol("past_sequence");
        let s = Dim::symbol("sequence");
        let total = p.add(&s);
        assert_eq!(total.to_string(), "(past_sequence + sequence)");
        assert!(total.same(&p.add(&s)));
        assert_eq!(s.add(&s).to_string(), "2*sequence");
        assert_eq!(Dim::known(5).sub(&Dim::known(2)).value(), Some(3));
        assert!(!Dim::Unknown.same(&Dim::Unknown));
    }

    #[test]
    fn extreme_coefficients_give_unknown_not_overflow() {
        let min = Dim::known(i64::MIN);
        assert_eq!(Dim::known(1).sub(&min), Dim::Unknown);
        assert_eq!(min.div(&Dim::known(-1)), None);
        assert_eq!(min.mul(&Dim::symbol("b")).div(&Dim::known(-1)), None);
        assert_eq!(min.div(&Dim::known(0)), None);
        assert_eq!(min.mul(&Dim::known(2)), Dim::Unknown);
    }

    #[test]
    fn sums_are_commutative_and_zero_is_their_identity() {
        let (b, s) = (Dim::symbol("batch"), Dim::symbol("sequence"));
        assert_eq!(b.add(&s), s.add(&b));
        assert_eq!(Dim::known(0).add(&b), b);
        assert_eq!(b.sub(&Dim::known(0)), b);
        assert_eq!(Dim::known(0).sub(&b).to_string(), "-1*batch");
        // A sum less one of its terms is the other (a decoder's positions past..past+new).
        let past = Dim::symbol("past_sequence");
        assert_eq!(past.add(&s).sub(&past), s);
        assert_eq!(past.add(&s).sub(&s), past);
        assert_eq!(
            past.add(&s.mul(&Dim::known(2))).sub(&past),
            s.mul(&Dim::known(2))
        );
        assert_eq!(
            past.add(&s).sub(&b).to_string(),
            "((past_sequence + sequence) - batch)"
        );
    }

    #[test]
    fn positive_dims_are_products_of_sizes() {
        assert!(Dim::symbol("batch").mul(&Dim::known(4)).is_positive());
        assert!(Dim::symbol("a").add(&Dim::symbol("b")).is_positive());
        assert!(Dim::parse("Min(128, sequence)").is_positive());
        assert!(!Dim::symbol("a").sub(&Dim::symbol("b")).is_positive());
        assert!(!Dim::symbol("a").add(&Dim::known(-2)).is_positive());
        assert!(!Dim::known(0).is_positive());
        assert!(!Dim::Unknown.is_positive());
    }

    #[test]
    fn min_is_exact_where_it_can_be_and_torch_shaped_otherwise() {
        let s = Dim::symbol("sequence");
        assert_eq!(Dim::known(3).minimum(&Dim::known(5)), Dim::known(3));
        assert_eq!(s.minimum(&s), s);
        assert_eq!(s.minimum(&Dim::known(1)), Dim::known(1));
        assert_eq!(
            s.minimum(&Dim::known(128)).to_string(),
            "Min(128, sequence)"
        );
        assert_eq!(
            Dim::parse("Min(128, sequence)"),
            s.minimum(&Dim::known(128))
        );
        assert_eq!(s.minimum(&Dim::Unknown), Dim::Unknown);
    }

    #[test]
    fn a_length_broadcast_with_another_is_a_broadcast_of_either() {
        let cache = Dim::symbol("past").add(&Dim::symbol("sequence"));
        let mask = Dim::parse("past + 1");
        let expanded = cache.broadcast(&mask);
        assert!(expanded.is_broadcast_of(&cache));
        assert!(expanded.is_broadcast_of(&mask));
        assert!(cache.is_broadcast_of(&cache));
        assert!(
            !cache.is_broadcast_of(&mask),
            "two lengths, neither broadcast"
        );
        assert!(!expanded.is_broadcast_of(&Dim::symbol("batch")));
        assert!(!Dim::Unknown.is_broadcast_of(&Dim::Unknown));
    }

    #[test]
    fn broadcasting_dims() {
        let (b, s) = (Dim::symbol("batch"), Dim::symbol("sequence"));
        let one = Dim::known(1);
        assert_eq!(one.broadcast(&b), b);
        assert_eq!(b.broadcast(&b), b);
        assert_eq!(b.broadcast(&Dim::known(4)), Dim::known(4));
        assert_eq!(Dim::Unknown.broadcast(&Dim::known(4)), Dim::known(4));
        assert_eq!(Dim::Unknown.broadcast(&one), Dim::Unknown);
        let either = b.broadcast(&s);
        assert_eq!(either.to_string(), "Broadcast(batch, sequence)");
        assert_eq!(s.broadcast(&b), either, "the same whatever the order");
        assert_eq!(either.broadcast(&s), either);
        assert_eq!(b.broadcast(&either), either);
        assert_eq!(Dim::parse(&either.to_string()), either);
        let m = Dim::symbol("mask");
        assert_eq!(
            either.broadcast(&m),
            m.broadcast(&b).broadcast(&s),
            "flattened: {}",
            either.broadcast(&m)
        );
        assert_eq!(
            either.broadcast(&m).to_string(),
            "Broadcast(batch, mask, sequence)"
        );
        assert_eq!(
            either.broadcast(&m).broadcast(&either),
            either.broadcast(&m)
        );
        assert_eq!(b.broadcast(&Dim::Unknown), Dim::Unknown);
        assert_eq!(Dim::known(3).broadcast(&Dim::known(4)), Dim::Unknown);
        // Either Min(128, s) is s, or it is 128 < s and the model is invalid.
        assert_eq!(s.minimum(&Dim::known(128)).broadcast(&s), s);
        assert_eq!(s.broadcast(&s.minimum(&b)), s);
        assert_eq!(s.broadcast(&s.minimum(&Dim::known(0))), Dim::known(0));
        assert_eq!(
            broadcast_shapes(
                &[b.clone(), one.clone(), s.clone()],
                &[Dim::known(4), one.clone()]
            ),
            vec![b, Dim::known(4), s]
        );
    }

    #[test]
    fn dims_equal_where_broadcast() {
        let (b, s) = (Dim::symbol("batch"), Dim::symbol("sequence"));
        assert!(s.equals_where_broadcast(&s));
        assert!(Dim::parse("Min(64, sequence)").equals_where_broadcast(&s));
        assert!(Dim::parse("Min(sequence, 2)").equals_where_broadcast(&s));
        // Min(1, s) is always 1; Min(batch, s) may be 1 where s is not.
        assert!(!Dim::parse("Min(1, sequence)").equals_where_broadcast(&s));
        assert!(!s.minimum(&b).equals_where_broadcast(&s));
        assert!(!Dim::known(1).equals_where_broadcast(&s));
        assert!(!Dim::Unknown.equals_where_broadcast(&Dim::Unknown));
    }

    #[test]
    fn unify_prefers_what_says_more() {
        let b = Dim::symbol("batch");
        assert_eq!(Dim::Unknown.unify(&b), b);
        assert_eq!(b.unify(&Dim::known(8)), Dim::known(8));
        assert_eq!(Dim::known(8).unify(&b), Dim::known(8));
    }

    #[test]
    fn evaluate_substitutes_symbols() {
        let d = Dim::symbol("batch")
            .mul(&Dim::symbol("sequence"))
            .mul(&Dim::known(4));
        let values = |s: &str| match s {
            "batch" => Some(2),
            "sequence" => Some(16),
            _ => None,
        };
        assert_eq!(d.evaluate(&values), Some(128));
        assert_eq!(Dim::symbol("other").evaluate(&values), None);
    }

    #[test]
    fn dim_params_parse_as_products_or_opaque_symbols() {
        let d = Dim::parse("64*batch*sequence^2");
        assert_eq!(
            d,
            Dim::known(64)
                .mul(&Dim::symbol("batch"))
                .mul(&Dim::symbol("sequence"))
                .mul(&Dim::symbol("sequence"))
        );
        assert_eq!(Dim::parse(&d.to_string()), d);
        assert_eq!(
            Dim::parse("Min(128, sequence)"),
            Dim::symbol("Min(128, sequence)")
        );
        assert_eq!(Dim::parse("s53"), Dim::symbol("s53"));
        assert_eq!(Dim::parse("12*s"), Dim::known(12).mul(&Dim::symbol("s")));
    }

    /// torch 2.6's dynamo exporter names dynamic dims after the example's sizes: `"12"` is a
    /// symbol, alone and in the products and sums inference writes of it.
    #[test]
    fn a_dim_param_named_by_a_number_stays_a_symbol() {
        use crate::proto::tensor_shape_proto::{dimension::Value as DimValue, Dimension};
        let read = |text: &str| {
            Dim::from_proto(&Dimension {
                value: Some(DimValue::DimParam(text.to_string())),
                ..Default::default()
            })
        };
        let twelve = Dim::symbol("12");
        assert_eq!(read("12"), twelve);
        assert_eq!(
            twelve.to_proto().value,
            Some(DimValue::DimParam("12".into()))
        );
        let past = Dim::symbol("past");
        for d in [
            Dim::known(2).mul(&twelve),
            twelve.mul(&twelve),
            Dim::symbol("2").mul(&twelve),
            twelve.add(&past),
        ] {
            assert_eq!(read(&d.to_string()), d, "{d}");
        }
        // torch 2.6's positions: Range(past, past + new tokens) is as long as the new tokens.
        assert_eq!(twelve.add(&past).sub(&past), twelve);
    }

    #[test]
    fn sums_and_products_of_expressions_read_back() {
        let (p, s, b) = (
            Dim::symbol("past_sequence"),
            Dim::symbol("sequence"),
            Dim::symbol("batch"),
        );
        let total = p.add(&s);
        assert_eq!(Dim::parse("past_sequence+sequence"), total);
        assert_eq!(Dim::parse("past_sequence + sequence"), total);
        assert_eq!(
            Dim::parse("a - b - c"),
            Dim::symbol("a")
                .sub(&Dim::symbol("b"))
                .sub(&Dim::symbol("c"))
        );
        assert_eq!(
            Dim::parse("seq-len"),
            Dim::symbol("seq-len"),
            "a hyphen is no minus"
        );
        let min = s.minimum(&Dim::known(128));
        for d in [
            total.mul(&b),
            total.mul(&total).mul(&Dim::known(4)),
            min.mul(&b),
            total.sub(&Dim::known(1)).add(&min),
            Dim::known(-2).mul(&b),
        ] {
            assert_eq!(Dim::parse(&d.to_string()), d, "{d}");
        }
        assert_eq!(
            Dim::parse(&"(".repeat(5000)),
            Dim::symbol(&"(".repeat(5000))
        );
        assert_eq!(Dim::parse("(x)^4000000000"), Dim::symbol("(x)^4000000000"));
        assert_eq!(Dim::parse("x^4000000000*x^4000000000"), Dim::Unknown);
    }

    #[test]
    fn types_round_trip_through_type_proto() {
        let t = ValueType::new(
            1,
            vec![
                Dim::symbol("batch").mul(&Dim::symbol("sequence")),
                Dim::known(64),
                Dim::Unknown,
            ],
        );
        let back = ValueType::from_type_proto(&t.to_type_proto()).unwrap();
        assert_eq!(back, t);
        assert_eq!(t.to_string(), "f32[batch*sequence, 64, ?]");
        assert_eq!(t.static_shape(), None);
    }
}
