//! Visits every `TensorProto` of a model: initializers, Constant and other tensor attributes,
//! sparse tensors, and the same inside subgraphs, local functions and training graphs. Loading
//! uses it to resolve external data and to check every tensor, not only the top-level ones.

use crate::error::Result;
use crate::proto::{AttributeProto, GraphProto, ModelProto, SparseTensorProto, TensorProto};

pub type TensorVisitor<'a> = dyn FnMut(&mut TensorProto) -> Result<()> + 'a;

pub fn model_tensors(model: &mut ModelProto, f: &mut TensorVisitor) -> Result<()> {
    if let Some(g) = &mut model.graph {
        graph_tensors(g, f)?;
    }
    for function in &mut model.functions {
        for node in &mut function.node {
            attribute_tensors(&mut node.attribute, f)?;
        }
    }
    for info in &mut model.training_info {
        for g in info
            .initialization
            .iter_mut()
            .chain(info.algorithm.iter_mut())
        {
            graph_tensors(g, f)?;
        }
    }
    Ok(())
}

pub fn graph_tensors(g: &mut GraphProto, f: &mut TensorVisitor) -> Result<()> {
    for t in &mut g.initializer {
        f(t)?;
    }
    for s in &mut g.sparse_initializer {
        sparse_tensors(s, f)?;
    }
    for node in &mut g.node {
        attribute_tensors(&mut node.attribute, f)?;
    }
    Ok(())
}

fn attribute_tensors(attributes: &mut [AttributeProto], f: &mut TensorVisitor) -> Result<()> {
    for a in attributes {
        for t in a.t.iter_mut().chain(a.tensors.iter_mut()) {
            f(t)?;
        }
        for s in a
            .sparse_tensor
            .iter_mut()
            .chain(a.sparse_tensors.iter_mut())
        {
            sparse_tensors(s, f)?;
        }
        for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
            graph_tensors(g, f)?;
        }
    }
    Ok(())
}

fn sparse_tensors(s: &mut SparseTensorProto, f: &mut TensorVisitor) -> Result<()> {
    for t in s.values.iter_mut().chain(s.indices.iter_mut()) {
        f(t)?;
    }
    Ok(())
}
