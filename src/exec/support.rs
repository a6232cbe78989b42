//! Which operators tract runs with the semantics of the domain they come from.
//!
//! tract looks operators up by `op_type` alone and ignores the domain, so a
//! `com.microsoft::Attention` would be run as the standard opset-23 `Attention`, a different
//! operator, and a comparison built on that run would be wrong while looking fine. Before a
//! model goes to tract every node is checked here: the default domain and `ai.onnx.ml` go to
//! tract (which then either runs an op or says it does not know it), and a node of any other
//! domain runs only if `ops::CONTRIB_OPS` says tract's implementation follows that domain's
//! definition (after `exec::lower` has lowered the ones it lowers). Anything else is refused, so it is reported as "cannot run",
//! never as "equal".

use crate::ir::{Model, Node};
use crate::ops::{self, Tract, MS_DOMAIN};
use crate::proto::{AttributeProto, GraphProto};

/// Why a node cannot be run faithfully.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported {
    pub node: String,
    pub op: String,
    pub reason: String,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node `{}` ({}): {}", self.node, self.op, self.reason)
    }
}

/// The first node of `model` that tract would not run with its own domain's semantics.
pub fn first_unsupported(model: &Model) -> Option<Unsupported> {
    let local_functions: Vec<(&str, &str)> = model
        .envelope
        .functions
        .iter()
        .map(|f| (f.domain(), f.name()))
        .collect();
    let check = |op: &str, domain: &str, present: &[bool]| {
        if local_functions.contains(&(domain, op)) {
            return Some("calls a model-local function, which tract does not run".to_string());
        }
        match domain {
            "" | "ai.onnx" | "ai.onnx.ml" => None,
            MS_DOMAIN => match ops::contrib(op).map(|o| o.tract) {
                Some(Tract::Native(None)) => None,
                Some(Tract::Native(Some(caveat))) => caveat(present)
                    .map(|why| format!("tract does not run com.microsoft::{op} with {why}")),
                // Still here after `exec::lower`: a form the lowering does not cover.
                Some(Tract::Lowered) => Some(format!(
                    "tract runs com.microsoft::{op} only in the forms onnxopt emits"
                )),
                Some(Tract::Unfaithful) | None => Some(format!(
                    "tract has no faithful implementation of com.microsoft::{op}"
                )),
            },
            other => Some(format!(
                "operators of domain `{other}` are not run by tract"
            )),
        }
    };
    for (id, node) in model.graph.nodes() {
        let present: Vec<bool> = node.inputs.iter().map(Option::is_some).collect();
        if let Some(reason) = check(node.op_type(), node.domain(), &present) {
            return Some(unsupported(&model.graph.node_label(id), node, reason));
        }
        if node.is("Attention") {
            if let Some(why) = ops::attention::tract_refuses_standard(&model.graph, node) {
                let reason = format!("tract does not run the standard Attention with {why}");
                return Some(unsupported(&model.graph.node_label(id), node, reason));
            }
        }
        for g in subgraphs(&node.proto.attribute) {
            if let Some(u) = first_unsupported_in(g, &check) {
                return Some(u);
            }
        }
    }
    None
}

type Check<'a> = dyn Fn(&str, &str, &[bool]) -> Option<String> + 'a;

fn first_unsupported_in(g: &GraphProto, check: &Check) -> Option<Unsupported> {
    for n in &g.node {
        let present: Vec<bool> = n.input.iter().map(|i| !i.is_empty()).collect();
        if let Some(reason) = check(n.op_type(), n.domain(), &present) {
            return Some(Unsupported {
                node: n.name().to_string(),
                op: qualified(n.domain(), n.op_type()),
                reason,
            });
        }
        for sub in subgraphs(&n.attribute) {
            if let Some(u) = first_unsupported_in(sub, check) {
                return Some(u);
            }
        }
    }
    None
}

fn subgraphs(attributes: &[AttributeProto]) -> impl Iterator<Item = &GraphProto> {
    attributes
        .iter()
        .flat_map(|a| a.g.iter().chain(a.graphs.iter()))
}

fn unsupported(label: &str, node: &Node, reason: String) -> Unsupported {
    Unsupported {
        node: label.to_string(),
        op: qualified(node.domain(), node.op_type()),
        reason,
    }
}

fn qualified(domain: &str, op: &str) -> String {
    if domain.is_empty() || domain == "ai.onnx" {
        op.to_string()
    } else {
        format!("{domain}::{op}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::testing::model;

    fn with_domain(op: &str, domain: &str, inputs: &[&str]) -> Model {
        let mut m = model(&["x"], &["y"], &["g", "b"], &[(op, inputs, &["y"])]);
        let id = m.graph.node_ids().next().unwrap();
        m.graph.node_mut_proto(id).domain = Some(domain.to_string());
        m
    }

    #[test]
    fn standard_ops_go_to_tract() {
        assert_eq!(first_unsupported(&with_domain("Relu", "", &["x"])), None);
        assert_eq!(
            first_unsupported(&with_domain("Relu", "ai.onnx", &["x"])),
            None
        );
    }

    #[test]
    fn contrib_ops_that_tract_would_misread_are_refused() {
        // An Attention left after lowering is a form the lowering does not cover.
        let u = first_unsupported(&with_domain("Attention", "com.microsoft", &["x"])).unwrap();
        assert_eq!(u.op, "com.microsoft::Attention");
        assert!(u.reason.contains("only in the forms"), "{}", u.reason);
        let u = first_unsupported(&with_domain("QGemm", "com.microsoft", &["x"])).unwrap();
        assert!(
            u.reason.contains("no faithful implementation"),
            "{}",
            u.reason
        );
        assert_eq!(
            first_unsupported(&with_domain("FastGelu", "com.microsoft", &["x"])),
            None
        );
        let custom = first_unsupported(&with_domain("Relu", "my.ops", &["x"])).unwrap();
        assert!(custom.reason.contains("`my.ops`"), "{}", custom.reason);
    }

    #[test]
    fn skip_layer_norm_is_run_only_with_the_inputs_tract_reads_right() {
        let ok = with_domain(
            "SkipLayerNormalization",
            "com.microsoft",
            &["x", "x", "g", "b"],
        );
        assert_eq!(first_unsupported(&ok), None);
        let bias_only = with_domain(
            "SkipLayerNormalization",
            "com.microsoft",
            &["x", "x", "g", "", "b"],
        );
        let u = first_unsupported(&bias_only).unwrap();
        assert!(u.reason.contains("a bias without a beta"), "{}", u.reason);
        let simplified =
            |inputs| with_domain("SkipSimplifiedLayerNormalization", "com.microsoft", inputs);
        assert_eq!(first_unsupported(&simplified(&["x", "x", "g"])), None);
        let u = first_unsupported(&simplified(&["x", "x", "g", "b"])).unwrap();
        assert!(u.reason.contains("a bias"), "{}", u.reason);
    }
}
