//! Shape inference against what tract computes: for every corpus model, every value a node
//! produces is captured on the first calibration batch and on a generated batch of other
//! sizes, and compared with its inferred type (element type, rank, and every dim that
//! evaluates once the input symbols take the batch's sizes) and, for small integer tensors,
//! with its inferred symbolic value. Inferred types are also compared with the types the
//! file records (output declarations, `value_info`), the only check a model gets that tract
//! cannot run. Coverage (values of known rank, dims known or symbolic) is printed per model
//! and held to a floor, and the `shape-inference` pass must reach a fixpoint in one run.
//!
//! The ONNX operator conformance tests check the rules beyond what the corpus exercises:
//! each case's outputs are inferred from its declared inputs alone (the file's output types
//! removed) and compared with the expected output tensors.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use onnxopt::exec::{self, Batch, GenerateOptions, InputSource, Runner};
use onnxopt::ir::{Dim, Model, ValueId, ValueType};
use onnxopt::passes::shape::{infer, Inference, ShapeInference};
use onnxopt::passes::Pass;
use onnxopt::proto::TensorProto;
use prost::Message;
use rayon::prelude::*;
use tract_onnx::prelude::{DatumType, Tensor};

/// Share of the dims of node outputs that must be known or symbolic.
const MIN_DIM_COVERAGE: f64 = 0.95;

/// The ONNX element type code of a tract datum type.
fn onnx_code(dt: DatumType) -> Option<i32> {
    Some(match dt {
        DatumType::F32 => 1,
        DatumType::U8 => 2,
        DatumType::I8 => 3,
        DatumType::U16 => 4,
        DatumType::I16 => 5,
        DatumType::I32 => 6,
        DatumType::I64 => 7,
        DatumType::String => 8,
        DatumType::Bool => 9,
        DatumType::F16 => 10,
        DatumType::F64 => 11,
        DatumType::U32 => 12,
        DatumType::U64 => 13,
        _ => return None,
    })
}

/// Sizes of the symbols of the graph inputs' declared dims, read from the batch.
fn symbol_sizes(model: &Model, batch: &Batch) -> HashMap<String, i64> {
    let g = &model.graph;
    let mut sizes = HashMap::new();
    for (name, tensor) in &batch.tensors {
        let Some(v) = g.find_value(name) else {
            continue;
        };
        let Some(shape) = g.value_type(v).and_then(|t| t.shape) else {
            continue;
        };
        learn_sizes(&mut sizes, &shape, tensor.shape().iter().map(|&n| n as i64));
    }
    sizes
}

/// Records the size of each declared dim that is a lone symbol, from the actual dims.
fn learn_sizes(
    sizes: &mut HashMap<String, i64>,
    declared: &[Dim],
    actual: impl IntoIterator<Item = i64>,
) {
    for (d, n) in declared.iter().zip(actual) {
        if let Dim::Product { coeff: 1, symbols } = d {
            if let [(symbol, 1)] = symbols.iter().collect::<Vec<_>>()[..] {
                sizes.insert(symbol.clone(), n);
            }
        }
    }
}

/// The index of the last `op` in `text` outside parentheses.
fn top_level(text: &str, op: &str) -> Option<usize> {
    let mut depth = 0i32;
    let mut last = None;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ if depth == 0 && text[i..].starts_with(op) => last = Some(i),
            _ => {}
        }
    }
    last
}

/// The size of a symbol: an input symbol, or an expression of them as inference writes
/// opaque symbols (`(a + b)`, `(a - b)`, `Min(a, b)`) or as the dynamo exporter writes
/// them in `value_info` (`past_sequence + sequence`).
fn symbol_value(name: &str, sizes: &HashMap<String, i64>) -> Option<i64> {
    if let Some(&v) = sizes.get(name) {
        return Some(v);
    }
    let eval = |text: &str| Dim::parse(text.trim()).evaluate(&|s| symbol_value(s, sizes));
    // Sums and differences associate to the left: split at the last operator.
    let split = [" + ", " - "]
        .iter()
        .filter_map(|op| top_level(name, op).map(|at| (at, *op)))
        .max();
    if let Some((at, op)) = split {
        let (a, b) = (eval(&name[..at])?, eval(&name[at + op.len()..])?);
        return match op {
            " + " => a.checked_add(b),
            _ => a.checked_sub(b),
        };
    }
    if let Some(inner) = name.strip_prefix("Min(").and_then(|r| r.strip_suffix(')')) {
        let at = top_level(inner, ",")?;
        return Some(eval(&inner[..at])?.min(eval(&inner[at + 1..])?));
    }
    symbol_value(name.strip_prefix('(')?.strip_suffix(')')?, sizes)
}

/// What a model's inference knows, over the values its nodes produce.
#[derive(Default)]
struct Coverage {
    values: usize,
    /// Values whose dims are all known sizes.
    static_shape: usize,
    /// Values whose dims are all known or symbolic, with at least one symbol.
    symbolic_shape: usize,
    /// Values of known rank with at least one unknown dim.
    partly_unknown: usize,
    unknown_rank: usize,
    known_dims: usize,
    symbolic_dims: usize,
    unknown_dims: usize,
    /// Values whose elements (symbolic value) are inferred.
    with_elements: usize,
}

impl Coverage {
    fn of(model: &Model, inference: &Inference) -> Coverage {
        let mut c = Coverage::default();
        for v in node_outputs(model) {
            c.values += 1;
            c.with_elements += usize::from(inference.values.contains_key(&v));
            let Some(shape) = inference.shape(v) else {
                c.unknown_rank += 1;
                continue;
            };
            let known = shape.iter().filter(|d| d.value().is_some()).count();
            let unknown = shape.iter().filter(|d| **d == Dim::Unknown).count();
            c.known_dims += known;
            c.unknown_dims += unknown;
            c.symbolic_dims += shape.len() - known - unknown;
            match (unknown, known == shape.len()) {
                (0, true) => c.static_shape += 1,
                (0, false) => c.symbolic_shape += 1,
                _ => c.partly_unknown += 1,
            }
        }
        c
    }

    fn dims(&self) -> usize {
        self.known_dims + self.symbolic_dims + self.unknown_dims
    }

    fn dim_share(&self) -> f64 {
        (self.known_dims + self.symbolic_dims) as f64 / self.dims().max(1) as f64
    }
}

impl std::fmt::Display for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} values: {} static, {} symbolic, {} partly unknown, {} of unknown rank; \
             {} dims: {} known, {} symbolic, {} unknown ({:.1}% known or symbolic); \
             {} with inferred elements",
            self.values,
            self.static_shape,
            self.symbolic_shape,
            self.partly_unknown,
            self.unknown_rank,
            self.dims(),
            self.known_dims,
            self.symbolic_dims,
            self.unknown_dims,
            100.0 * self.dim_share(),
            self.with_elements
        )
    }
}

fn node_outputs(model: &Model) -> Vec<ValueId> {
    let g = &model.graph;
    let mut outputs: Vec<ValueId> = g
        .nodes()
        .flat_map(|(_, n)| n.outputs.iter().flatten().copied())
        .filter(|&v| !g.value_name(v).is_empty())
        .collect();
    outputs.sort();
    outputs
}

/// Every way `inferred` contradicts a type the file records (a graph output's declaration
/// or a `value_info` entry): element type, rank, and dims that both evaluate.
fn check_recorded(
    name: &str,
    inferred: &ValueType,
    recorded: &ValueType,
    sizes: &HashMap<String, i64>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if inferred.elem != 0 && recorded.elem != 0 && inferred.elem != recorded.elem {
        problems.push(format!(
            "{name}: element type {} but the file records {}",
            inferred.elem, recorded.elem
        ));
    }
    let (Some(a), Some(b)) = (&inferred.shape, &recorded.shape) else {
        return problems;
    };
    if a.len() != b.len() {
        problems.push(format!(
            "{name}: {inferred} but the file records {recorded}"
        ));
        return problems;
    }
    let evaluate = |d: &Dim| d.evaluate(&|s| symbol_value(s, sizes));
    for (x, y) in a.iter().zip(b) {
        if let (Some(ex), Some(ey)) = (evaluate(x), evaluate(y)) {
            if ex != ey {
                problems.push(format!(
                    "{name}: {inferred} but the file records {recorded}"
                ));
            }
        }
    }
    problems
}

/// How much of the inference was compared with tract's tensors.
#[derive(Default)]
struct Compared {
    values: usize,
    dims: usize,
    elements: usize,
}

/// Every way the inferred type and value of `name` contradict the tensor tract computed.
fn check_actual(
    name: &str,
    inferred: Option<&ValueType>,
    value: Option<&[Dim]>,
    actual: &Tensor,
    sizes: &HashMap<String, i64>,
    compared: &mut Compared,
) -> Vec<String> {
    let mut problems = Vec::new();
    compared.values += 1;
    let Some(t) = inferred else {
        return problems;
    };
    if t.elem != 0 && onnx_code(actual.datum_type()) != Some(t.elem) {
        problems.push(format!(
            "{name}: element type {} but tract made {:?}",
            t.elem,
            actual.datum_type()
        ));
    }
    let evaluate = |d: &Dim| d.evaluate(&|s| symbol_value(s, sizes));
    if let Some(shape) = &t.shape {
        if shape.len() != actual.rank() {
            problems.push(format!(
                "{name}: rank {} but tract made {:?}",
                shape.len(),
                actual.shape()
            ));
            return problems;
        }
        for (i, (d, &n)) in shape.iter().zip(actual.shape()).enumerate() {
            if let Some(size) = evaluate(d) {
                compared.dims += 1;
                if size != n as i64 {
                    problems.push(format!(
                        "{name}: dim {i} is {d} = {size} but tract made {:?}",
                        actual.shape()
                    ));
                }
            }
        }
    }
    if let Some(value) = value {
        let Ok(ints) = actual.cast_to::<i64>() else {
            problems.push(format!("{name}: has a symbolic value but is not integer"));
            return problems;
        };
        let Ok(view) = ints.to_plain_array_view::<i64>() else {
            return problems;
        };
        let ints: Vec<i64> = view.iter().copied().collect();
        if ints.len() != value.len() {
            problems.push(format!(
                "{name}: value has {} elements but tract made {}",
                value.len(),
                ints.len()
            ));
        } else {
            for (i, (d, &x)) in value.iter().zip(&ints).enumerate() {
                let Some(e) = evaluate(d) else {
                    continue;
                };
                compared.elements += 1;
                if e != x {
                    problems.push(format!("{name}: element {i} is {d} but tract computed {x}"));
                }
            }
        }
    }
    problems
}

/// Sizes for a generated batch that differ from every fixed dim of the tiny models (head
/// size and sequence are both 16 in the calibration batches), so that a dim taken from the
/// wrong place shows.
fn generated_sizes() -> GenerateOptions {
    let dims = [
        ("batch", 3),
        ("sequence", 5),
        ("past_sequence", 7),
        ("past_sequence+sequence", 12),
        ("s53", 12),
    ];
    GenerateOptions {
        dims: dims.iter().map(|&(s, n)| (s.to_string(), n)).collect(),
        ..Default::default()
    }
}

#[test]
fn inferred_types_and_values_match_what_tract_computes() {
    let mut report = Vec::new();
    let mut problems = Vec::new();
    for path in common::corpus_models() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let model = onnxopt::io::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let inference = infer(&model);
        let g = &model.graph;

        let coverage = Coverage::of(&model, &inference);
        if coverage.unknown_rank > 0 {
            problems.push(format!(
                "{name}: {} values of unknown rank",
                coverage.unknown_rank
            ));
        }
        if coverage.dim_share() < MIN_DIM_COVERAGE {
            problems.push(format!(
                "{name}: too few dims known or symbolic: {coverage}"
            ));
        }

        // The pass records what inference found, then has nothing left to record.
        let mut annotated = model.clone();
        let recorded_by_pass = ShapeInference.run(&mut annotated).unwrap().total();
        let second_run = ShapeInference.run(&mut annotated).unwrap();
        if second_run.total() != 0 {
            problems.push(format!("{name}: a second pass run changed {second_run:?}"));
        }
        let reinferred = infer(&annotated);
        if node_outputs(&model)
            .iter()
            .any(|v| reinferred.types.get(v) != inference.types.get(v))
        {
            problems.push(format!("{name}: the recorded types change inference"));
        }

        let calibration = exec::batches_for(
            &model,
            &InputSource::Dir(common::calib_dir(&path)),
            &GenerateOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let generated = exec::batches_for(&model, &InputSource::Generated(1), &generated_sizes())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let batches = [&calibration[0], &generated[0]];

        // What the file records: graph output declarations, and value_info (dynamo exports).
        let outputs = node_outputs(&model);
        let recorded: Vec<(ValueId, ValueType)> = outputs
            .iter()
            .filter_map(|&v| Some((v, g.value_type(v)?)))
            .collect();
        for batch in batches {
            let sizes = symbol_sizes(&model, batch);
            for (v, r) in &recorded {
                if let Some(t) = inference.types.get(v) {
                    let label = format!("{name}: {} (recorded)", g.value_name(*v));
                    problems.extend(check_recorded(&label, t, r, &sizes));
                }
            }
        }

        let names: Vec<String> = outputs
            .iter()
            .map(|&v| g.value_name(v).to_string())
            .collect();
        let mut compared = Compared::default();
        let run = Runner::with_outputs(&model, &names).and_then(|mut runner| {
            for batch in batches {
                let sizes = symbol_sizes(&model, batch);
                for (&v, (out, tensor)) in outputs.iter().zip(runner.run(batch)?) {
                    problems.extend(check_actual(
                        &format!("{name}: {out} on {}", batch.name),
                        inference.types.get(&v),
                        inference.value(v),
                        &tensor,
                        &sizes,
                        &mut compared,
                    ));
                }
            }
            Ok(())
        });
        let checked = match run {
            Ok(()) => format!(
                "checked against tract on 2 batches: {} values, {} dims, {} value elements",
                compared.values, compared.dims, compared.elements
            ),
            Err(e) => {
                problems.push(format!("{name}: tract failed: {e}"));
                "not checked".into()
            }
        };
        report.push(format!(
            "{name}: {coverage}; the pass recorded {recorded_by_pass} types; \
             {} recorded types checked; {checked}",
            recorded.len()
        ));
    }
    println!("{}", report.join("\n"));
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// The graph of `model` without `value_info` and without the types of its outputs, so that
/// every type inference gives is its own.
fn without_recorded_types(model: &Model) -> Option<Model> {
    let mut proto = model.to_proto().ok()?;
    let graph = proto.graph.as_mut()?;
    graph.value_info.clear();
    for output in &mut graph.output {
        output.r#type = None;
    }
    Model::from_proto(proto).ok()
}

fn read_tensor(path: &Path) -> Option<onnxopt::ir::Tensor> {
    let bytes = std::fs::read(path).ok()?;
    onnxopt::ir::Tensor::from_proto(TensorProto::decode(&bytes[..]).ok()?).ok()
}

/// What one node test case showed.
#[derive(Default)]
struct NodeCase {
    outputs: usize,
    /// Outputs whose element type and every dim were inferred.
    fully_typed: usize,
    problems: Vec<String>,
}

/// Infers the types of a node test's graph outputs from its declared inputs and compares
/// them with the expected outputs.
fn check_node_case(case: &Path) -> NodeCase {
    let name = case.file_name().unwrap().to_string_lossy().into_owned();
    let mut result = NodeCase::default();
    let Some(model) = onnxopt::io::load(&case.join("model.onnx"))
        .ok()
        .as_ref()
        .and_then(without_recorded_types)
    else {
        return result;
    };
    let inference = infer(&model);
    let g = &model.graph;
    let data = case.join("test_data_set_0");
    let mut sizes = HashMap::new();
    let fed = g.inputs.iter().filter(|p| g.initializer(p.value).is_none());
    for (i, port) in fed.enumerate() {
        let (Some(t), Some(shape)) = (
            read_tensor(&data.join(format!("input_{i}.pb"))),
            g.value_type(port.value).and_then(|t| t.shape),
        ) else {
            continue;
        };
        learn_sizes(&mut sizes, &shape, t.dims().iter().copied());
    }
    for (i, port) in g.outputs.iter().enumerate() {
        let (Some(t), Some(expected)) = (
            inference.types.get(&port.value),
            read_tensor(&data.join(format!("output_{i}.pb"))),
        ) else {
            continue;
        };
        result.outputs += 1;
        let label = format!("{name}: output {i}");
        let expected_type = ValueType::new(
            expected.proto().data_type(),
            expected.dims().iter().map(|&d| Dim::known(d)).collect(),
        );
        result
            .problems
            .extend(check_recorded(&label, t, &expected_type, &sizes));
        let evaluated: Option<Vec<i64>> = t.shape.as_ref().and_then(|s| {
            s.iter()
                .map(|d| d.evaluate(&|s| symbol_value(s, &sizes)))
                .collect()
        });
        if t.elem != 0 && evaluated.is_some() {
            result.fully_typed += 1;
        }
        let value: Option<Vec<i64>> = inference.value(port.value).and_then(|v| {
            v.iter()
                .map(|d| d.evaluate(&|s| symbol_value(s, &sizes)))
                .collect()
        });
        if let (Some(value), Ok(actual)) = (value, expected.to_i64_vec()) {
            if value != actual {
                result.problems.push(format!(
                    "{label}: value {value:?} but the test expects {actual:?}"
                ));
            }
        }
    }
    result
}

#[test]
fn inferred_types_match_the_onnx_node_tests() {
    let root = common::corpus().join("onnx-node-tests/node");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("node tests")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("model.onnx").is_file())
        .collect();
    cases.sort();
    let results: Vec<NodeCase> = cases.par_iter().map(|c| check_node_case(c)).collect();
    let outputs: usize = results.iter().map(|r| r.outputs).sum();
    let fully_typed: usize = results.iter().map(|r| r.fully_typed).sum();
    let problems: Vec<&String> = results.iter().flat_map(|r| &r.problems).collect();
    println!(
        "onnx node tests: {} cases, {outputs} outputs compared, {fully_typed} fully typed by inference",
        cases.len()
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}
