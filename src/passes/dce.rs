//! Dead-code elimination.
//!
//! Matches: nodes none of whose outputs is read by another node or is a graph output, and
//! initializers that nothing reads and that are not graph inputs or outputs.
//! Produces: the graph without them.
//! Safe because: ONNX operators have no side effects, so a node whose results nobody reads
//! cannot change the model's outputs (random generators included: their draws are not seen).
//! Graph inputs are the model's interface and are never removed, even when unused.

use std::collections::HashSet;

use super::{Pass, Rewrites};
use crate::error::Result;
use crate::ir::{Model, NodeId, Patch};

pub struct DeadCodeElimination;

impl Pass for DeadCodeElimination {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, model: &mut Model) -> Result<Rewrites> {
        let g = &model.graph;
        // Walk consumers before producers so a whole dead chain goes in one run.
        let mut dead: HashSet<NodeId> = HashSet::new();
        for id in g.topological_order()?.into_iter().rev() {
            let node = g.node(id);
            let read = node.outputs.iter().flatten().any(|&v| {
                g.is_graph_output(v) || g.uses(v).iter().any(|(reader, _)| !dead.contains(reader))
            });
            if !read {
                dead.insert(id);
            }
        }
        let mut rewrites = Rewrites::default();
        let dead_inits: Vec<_> = g
            .initializers()
            .map(|(v, _)| v)
            .filter(|&v| !g.is_graph_input(v) && !g.is_graph_output(v))
            .filter(|&v| g.uses(v).iter().all(|(reader, _)| dead.contains(reader)))
            .collect();
        if dead.is_empty() && dead_inits.is_empty() {
            return Ok(rewrites);
        }
        let mut patch = Patch::new("dead-code");
        for &n in &dead {
            patch.remove_node(n);
        }
        for &v in &dead_inits {
            patch.drop_initializer(v);
        }
        model.graph.apply(patch)?;
        rewrites.add("dead-node", dead.len());
        rewrites.add("dead-initializer", dead_inits.len());
        Ok(rewrites)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::testing::{model, ops};

    #[test]
    fn removes_dead_chains_and_unread_initializers_only() {
        let mut m = model(
            &["x", "unused_input"],
            &["y"],
            &["w", "dead_w"],
            &[
                ("Mul", &["x", "w"], &["a"]),
                ("Neg", &["x"], &["d1"]),
                ("Add", &["d1", "dead_w"], &["d2"]),
                ("Relu", &["a"], &["y"]),
            ],
        );
        let rewrites = DeadCodeElimination.run(&mut m).unwrap();
        assert_eq!(rewrites.0.get("dead-node"), Some(&2));
        assert_eq!(rewrites.0.get("dead-initializer"), Some(&1));
        assert_eq!(ops(&m), ["Mul", "Relu"]);
        let g = m.to_proto().unwrap().graph.unwrap();
        assert_eq!(g.initializer.len(), 1);
        assert_eq!(g.input.len(), 2, "graph inputs are the interface: kept");
        assert_eq!(DeadCodeElimination.run(&mut m).unwrap().total(), 0);
    }

    #[test]
    fn a_node_with_one_read_output_stays() {
        let mut m = model(
            &["x"],
            &["a"],
            &[],
            &[("Split", &["x"], &["a", "b"]), ("Neg", &["b"], &["c"])],
        );
        let rewrites = DeadCodeElimination.run(&mut m).unwrap();
        assert_eq!(rewrites.total(), 1);
        assert_eq!(ops(&m), ["Split"]);
    }
}
