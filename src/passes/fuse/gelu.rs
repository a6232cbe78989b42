//! GELU fusions.
//!
//! Matches, in the canonical forms of `passes::canonical` (a division by a constant is a
//! product with its reciprocal, `x·x` is `Pow(x, 2)`), with the operands of Add and Mul in
//! either order and every product of three factors associated any way (`(x·a)·0.5`,
//! `(x·0.5)·a`, `x·(a·0.5)`):
//! - exact GELU `x · 0.5 · (1 + erf(x · 1/√2))`, as torch's legacy exporter (`x / √2`),
//!   tf2onnx and the `x·Φ(x)` form `x · (0.5 · (1 + erf(x · 0.70710678)))` write it; and
//!   Megatron's `x · 0.5 · (1 + erf(x / 1.41421))` (see below);
//! - tanh GELU `x · 0.5 · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))` (`x³` as `Pow(x, 3)` or
//!   `x·x·x`; HF `gelu_new`, GPT-2, T5, FastGelu's definition), and its factored form
//!   `x · 0.5 · (1 + tanh(√(2/π) · x · (1 + 0.044715 · x·x)))` (HF `gelu_fast`, Megatron's
//!   fast GELU), the same polynomial;
//! - QuickGELU `x · sigmoid(α · x)`, and SiLU `x · sigmoid(x)` as QuickGELU with α = 1;
//! - a 1-D constant bias added just before a GELU node.
//!
//! Produces: for `Target::Ort` `com.microsoft` Gelu, FastGelu, QuickGelu, BiasGelu and
//! FastGelu with bias; for `Target::Onnx` the standard `Gelu` (approximate "none" or "tanh",
//! opset 20, raising the import); QuickGELU and bias folding have no standard operator and are
//! left alone for that target.
//! Safe because: every constant is checked (0.5, 1, 1/√2, 0.044715, √(2/π), the cube) to
//! float32 rounding (`pattern::close`), each intermediate value must have no reader outside
//! the pattern, and the replacements compute the same function (the tanh forms are the
//! definition of FastGelu and of Gelu(approximate="tanh")).
//!
//! One constant is accepted although it is not the one the fused operator uses: Megatron-LM
//! writes √2 as 1.41421 (float32 1.4142099…, 2.5·10⁻⁶ below √2, outside float32 rounding).
//! Fusing it is a choice: the fused Gelu computes the GELU the model was trained to
//! approximate, and differs from the written expression by the effect of that constant alone,
//! 0.5·|x|·erf′(z)·|Δz| with z = x/√2 and |Δz| = 2.5·10⁻⁶·|z|, at most 0.5·√2·(2/√π)·z²e^(−z²)
//! ·2.5·10⁻⁶ ≤ 7.5·10⁻⁷ (at z = 1); measured: 7.47·10⁻⁷ at x = −√2 in float64, 9.5·10⁻⁷ with
//! both sides evaluated in float32.

use std::f64::consts::{FRAC_1_SQRT_2, PI};

use super::pattern::{add, constant_where, either, mul, op, pow, scalar, unary, value, Match, Pat};
use super::{Built, Fusion, Rewrite, Rule, Target, MS_DOMAIN};
use crate::ir::{attr, DataTypeExt, Tensor};

/// The standard `Gelu` operator appeared in opset 20.
const GELU_OPSET: i64 = 20;

pub struct GeluFusion {
    pub target: Target,
}

impl Fusion for GeluFusion {
    const NAME: &'static str = "fuse-gelu";

    fn rules() -> Vec<Rule> {
        vec![
            Rule {
                kind: "gelu-erf",
                pattern: erf_form(),
                build: |m, rw| build_gelu(m, rw, "none"),
            },
            Rule {
                kind: "gelu-tanh",
                pattern: tanh_form(),
                build: |m, rw| build_gelu(m, rw, "tanh"),
            },
            Rule {
                kind: "quick-gelu",
                pattern: quick_form(),
                build: build_quick_gelu,
            },
            Rule {
                kind: "bias-gelu",
                pattern: gelu_node(biased(), "none"),
                build: |m, rw| build_bias_gelu(m, rw, "BiasGelu"),
            },
            Rule {
                kind: "fast-gelu-bias",
                pattern: gelu_node(biased(), "tanh"),
                build: |m, rw| build_bias_gelu(m, rw, "FastGelu"),
            },
            Rule {
                kind: "fast-gelu",
                pattern: op("Gelu", [value("x")])
                    .attr("approximate", |a| a.is_some_and(|a| a.s() == b"tanh")),
                build: build_fast_gelu_from_standard,
            },
        ]
    }

    fn target(&self) -> Target {
        self.target
    }
}

/// Megatron-LM's √2 (deliberately not `SQRT_2`: see the module's doc).
#[allow(clippy::approx_constant)]
const MEGATRON_SQRT_2: f64 = 1.41421;

/// `a · b · c` in any order and association.
fn product3(a: Pat, b: Pat, c: Pat) -> Pat {
    either([
        mul(mul(a.clone(), b.clone()), c.clone()),
        mul(mul(a.clone(), c.clone()), b.clone()),
        mul(mul(b, c), a),
    ])
}

/// `x · 0.5 · inner`.
fn half_x_times(inner: Pat) -> Pat {
    product3(value("x"), scalar(0.5), inner)
}

fn erf_form() -> Pat {
    let reciprocal = either([scalar(FRAC_1_SQRT_2), scalar(1.0 / MEGATRON_SQRT_2)]);
    half_x_times(add(
        unary("Erf", mul(value("x"), reciprocal)).anchor(),
        scalar(1.0),
    ))
}

fn tanh_form() -> Pat {
    let x = || value("x");
    let sqrt_2_over_pi = || scalar((2.0 / PI).sqrt());
    let square = || pow(x(), scalar(2.0));
    let cube = either([pow(x(), scalar(3.0)), mul(square(), x())]);
    let expanded = mul(add(x(), mul(cube, scalar(0.044715))), sqrt_2_over_pi());
    let factored = product3(
        x(),
        sqrt_2_over_pi(),
        add(
            either([
                mul(square(), scalar(0.044715)),
                mul(mul(x(), scalar(0.044715)), x()),
            ]),
            scalar(1.0),
        ),
    );
    half_x_times(add(
        unary("Tanh", either([expanded, factored])).anchor(),
        scalar(1.0),
    ))
}

/// `x · sigmoid(α · x)`, or SiLU `x · sigmoid(x)` (α = 1, the decoder LLMs' gated MLP; ONNX
/// Runtime fuses it into QuickGelu when it loads a model, so the kernel is the one it runs
/// anyway).
fn quick_form() -> Pat {
    let scaled = either([
        mul(value("x"), constant_where("alpha", is_scalar)),
        value("x"),
    ]);
    mul(value("x"), unary("Sigmoid", scaled).anchor())
}

fn is_scalar(t: &Tensor) -> bool {
    t.numel() == 1 && t.dtype().is_float()
}

fn is_bias(t: &Tensor) -> bool {
    t.dims().len() == 1 && t.dtype().is_float()
}

/// `x + bias` with a 1-D constant bias.
fn biased() -> Pat {
    add(value("x"), constant_where("bias", is_bias))
}

/// A GELU node of the given approximation, standard or `com.microsoft`.
fn gelu_node(input: Pat, approximate: &'static str) -> Pat {
    let standard = op("Gelu", [input.clone()]).attr(
        "approximate",
        match approximate {
            "tanh" => |a| a.is_some_and(|a| a.s() == b"tanh"),
            _ => |a| a.is_none_or(|a| a.s() == b"none"),
        },
    );
    match approximate {
        "tanh" => either([standard, op("FastGelu", [input]).domain(MS_DOMAIN)]),
        _ => either([standard, op("Gelu", [input]).domain(MS_DOMAIN)]),
    }
}

fn build_gelu(m: &Match, rw: &mut Rewrite, approximate: &str) -> Built {
    let x = m.get("x")?;
    let out = match (rw.target, approximate) {
        (Target::Ort, "tanh") => rw.op("FastGelu", MS_DOMAIN, &[x.into()], vec![]),
        (Target::Ort, _) => rw.op("Gelu", MS_DOMAIN, &[x.into()], vec![]),
        (Target::Onnx, _) => {
            rw.require_opset(GELU_OPSET)?;
            let attrs = match approximate {
                "tanh" => vec![attr::string("approximate", "tanh")],
                _ => vec![],
            };
            rw.op("Gelu", "", &[x.into()], attrs)
        }
    };
    let root = rw.root_of(m)?;
    rw.replace(root, out);
    Ok(())
}

fn build_quick_gelu(m: &Match, rw: &mut Rewrite) -> Built {
    rw.require_ort()?;
    // `is_scalar` checked it holds one float; SiLU has none.
    let alpha = match m.value("alpha") {
        Some(alpha) => rw.constant_of(alpha)?.scalar_f64().unwrap_or(1.0) as f32,
        None => 1.0,
    };
    let out = rw.op(
        "QuickGelu",
        MS_DOMAIN,
        &[m.get("x")?.into()],
        vec![attr::float("alpha", alpha)],
    );
    let root = rw.root_of(m)?;
    rw.replace(root, out);
    Ok(())
}

fn build_bias_gelu(m: &Match, rw: &mut Rewrite, op_type: &str) -> Built {
    rw.require_ort()?;
    let out = rw.op(
        op_type,
        MS_DOMAIN,
        &[m.get("x")?.into(), m.get("bias")?.into()],
        vec![],
    );
    let root = rw.root_of(m)?;
    rw.replace(root, out);
    Ok(())
}

/// Standard `Gelu(approximate="tanh")` (dynamo exports at opset 20) → FastGelu for ONNX
/// Runtime, which has a faster kernel for it.
fn build_fast_gelu_from_standard(m: &Match, rw: &mut Rewrite) -> Built {
    rw.require_ort()?;
    let x = m.get("x")?;
    let out = rw.op("FastGelu", MS_DOMAIN, &[x.into()], vec![]);
    let root = rw.root_of(m)?;
    rw.replace(root, out);
    Ok(())
}
