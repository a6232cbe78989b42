//! Types of values: element type and shape, with symbolic dimensions.
//!
//! A dimension is a product `coeff · s₁^e₁ · s₂^e₂ …` of named symbols (`batch`,
//! `sequence`), so that reshapes can multiply and divide dims exactly (`batch*sequence`, then
//! back). An expression that is not a product (`past_sequence + sequence`, `Min(128,
//! sequence)`) is kept whole as one opaque symbol named by its text. A dim nothing is known
//! about is `Unknown`; two unknown dims are never taken to be equal (`same`).

use std::collections::BTreeMap;
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

    /// The size, when it is known.
    pub fn value(&self) -> Option<i64> {
        match self {
            Dim::Product { coeff, symbols } if symbols.is_empty() => Some(*coeff),
            _ => None,
        }
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
                    *symbols.entry(s.clone()).or_default() += e;
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
        if *b == 0 || a % b != 0 {
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
            coeff: a / b,
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
            ) if sa == sb => match a.checked_add(sign * b) {
                Some(0) => Dim::known(0),
                Some(coeff) => Dim::Product {
                    coeff,
                    symbols: sa.clone(),
                },
                None => Dim::Unknown,
            },
            (Dim::Unknown, _) | (_, Dim::Unknown) => Dim::Unknown,
            _ => {
                let op = if sign > 0 { "+" } else { "-" };
                Dim::symbol(&format!("({self} {op} {other})"))
            }
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

    /// Reads a `dim_param`: a product such as `64*batch*sequence^2` becomes that product (so
    /// what `Display` writes reads back the same); any other text is one opaque symbol.
    pub fn parse(text: &str) -> Dim {
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
            let (name, exp) = match part.split_once('^') {
                Some((n, e)) => (n, e.parse::<u32>().ok()?),
                None => (part, 1),
            };
            is_name(name).then(|| Dim::Product {
                coeff: 1,
                symbols: BTreeMap::from([(name.to_string(), exp)]),
            })
        };
        text.split('*')
            .map(factor)
            .try_fold(Dim::known(1), |acc, f| f.map(|f| acc.mul(&f)))
            .unwrap_or_else(|| Dim::symbol(text))
    }

    fn from_proto(d: &Dimension) -> Dim {
        match &d.value {
            Some(DimValue::DimValue(v)) if *v >= 0 => Dim::known(*v),
            Some(DimValue::DimParam(p)) if !p.is_empty() => Dim::parse(p),
            _ => Dim::Unknown,
        }
    }

    fn to_proto(&self) -> Dimension {
        let value = match self {
            Dim::Unknown => None,
            d => match d.value() {
                Some(v) => Some(DimValue::DimValue(v)),
                None => Some(DimValue::DimParam(d.to_string())),
            },
        };
        Dimension {
            value,
            denotation: None,
        }
    }
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
            parts.push(if *e == 1 {
                s.clone()
            } else {
                format!("{s}^{e}")
            });
        }
        write!(f, "{}", parts.join("*"))
    }
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
