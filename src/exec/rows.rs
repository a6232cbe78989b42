//! Runs of fewer rows: a batch whose requested values would take much memory is run a few
//! rows at a time.
//!
//! Calibration, SmoothQuant's channel statistics and GPTQ's Gram matrices ask a run for
//! every activation they observe, and an engine hands them all back at once when the run
//! ends: on BERT-base, 49 activations take 260 MB for a batch of 8×128, held by the engine
//! and again by our copies of them, beside 438 MB of weights. Their statistics are sums over
//! positions, so running the batch's rows in smaller groups observes the same values, with
//! a fraction of the memory. A batch is split only where that is sure to give the same
//! values: every input the model is fed starts with one symbolic dim, the batch's (the
//! exporters' `batch`/`batch_size`), and each row runs independently of the others, as the
//! rows of a transformer's batch do. The size of a run's values comes from shape inference;
//! a batch whose values cannot be sized is not split.

use std::collections::HashMap;

use super::inputs::{input_specs, DimSpec, InputSpec};
use super::Batch;
use crate::ir::Model;
use crate::passes::shape;

/// What one run's requested values may take, at least (below it nothing is split).
const RUN_VALUES_FLOOR: usize = 64 << 20;

/// What one run's requested values may take for a model whose weights take `weights` bytes:
/// an eighth of them, at least `RUN_VALUES_FLOOR`.
fn run_budget(weights: usize) -> usize {
    (weights / 8).max(RUN_VALUES_FLOOR)
}

/// One run of `for_each_batch`.
#[derive(Clone, Copy, Debug)]
pub struct Run<'a> {
    /// The runs before this one (0: the first, or a start over in another engine).
    pub index: usize,
    /// The batch, or the rows of it, that ran.
    pub batch: &'a Batch,
    /// Which of the caller's batches it is, or holds rows of.
    pub of_batch: usize,
}

/// The runs of `for_each_batch`: what each feeds, and which of the caller's batches it is.
pub struct Runs {
    pub batches: Vec<Batch>,
    pub of_batch: Vec<usize>,
}

impl Runs {
    pub fn run(&self, index: usize) -> Run<'_> {
        Run {
            index,
            batch: &self.batches[index],
            of_batch: self.of_batch[index],
        }
    }

    fn push(&mut self, of_batch: usize, batch: Batch) {
        self.batches.push(batch);
        self.of_batch.push(of_batch);
    }
}

/// The runs `batches` are made in: each batch whole, or its rows in equal groups (the most
/// rows that keep a run's values within `run_budget`, dividing the batch's rows, so that
/// every run of a batch has one shape and tract compiles one plan for it).
pub fn runs(model: &Model, names: &[String], batches: &[Batch]) -> Runs {
    let mut runs = Runs {
        batches: Vec::with_capacity(batches.len()),
        of_batch: Vec::with_capacity(batches.len()),
    };
    let specs = input_specs(model).unwrap_or_default();
    let Some(batch_symbol) = shared_leading_symbol(&specs) else {
        batches
            .iter()
            .enumerate()
            .for_each(|(i, b)| runs.push(i, b.clone()));
        return runs;
    };
    let budget = run_budget(model.graph.initializer_bytes());
    let inference = shape::infer(model);
    for (of_batch, batch) in batches.iter().enumerate() {
        let rows = rows_of(batch);
        let held = rows.and_then(|_| held_bytes(model, &inference, &specs, names, batch));
        match (rows, held) {
            (Some(rows), Some(held)) if held > budget && rows > 1 => {
                let per_run = rows_per_run(rows, held, budget);
                match split(batch, rows, per_run, &batch_symbol) {
                    Some(parts) => parts.into_iter().for_each(|p| runs.push(of_batch, p)),
                    None => runs.push(of_batch, batch.clone()),
                }
            }
            _ => runs.push(of_batch, batch.clone()),
        }
    }
    runs
}

/// The symbolic dim every fed input (`specs`) starts with, when they all start with the same
/// one.
fn shared_leading_symbol(specs: &[InputSpec]) -> Option<String> {
    let mut symbol = None;
    for spec in specs {
        let DimSpec::Symbol(name) = spec.dims.first()? else {
            return None;
        };
        match &symbol {
            None => symbol = Some(name.clone()),
            Some(s) if s == name => {}
            Some(_) => return None,
        }
    }
    symbol
}

/// The rows every tensor of `batch` has on its first axis, when they agree.
fn rows_of(batch: &Batch) -> Option<usize> {
    let mut rows = None;
    for (_, t) in &batch.tensors {
        let n = *t.shape().first()?;
        if *rows.get_or_insert(n) != n {
            return None;
        }
    }
    rows
}

/// The bytes the values `names` take when `model` (fed inputs `specs`) runs `batch`, from
/// the shapes inference gives them with the symbols the batch's tensors fix; `None` when one
/// cannot be sized.
fn held_bytes(
    model: &Model,
    inference: &shape::Inference,
    specs: &[InputSpec],
    names: &[String],
    batch: &Batch,
) -> Option<usize> {
    let g = &model.graph;
    let mut symbols: HashMap<String, i64> = HashMap::new();
    for spec in specs {
        let t = batch.tensor(&spec.name)?;
        for (dim, &size) in spec.dims.iter().zip(t.shape()) {
            if let DimSpec::Symbol(s) = dim {
                symbols.insert(s.clone(), size as i64);
            }
        }
    }
    let value = |s: &str| symbols.get(s).copied();
    names.iter().try_fold(0usize, |total, name| {
        let v = g.find_value(name)?;
        let t = inference.types.get(&v)?;
        let elements = t.shape.as_ref()?.iter().try_fold(1usize, |n, d| {
            n.checked_mul(usize::try_from(d.evaluate(&value)?).ok()?)
        })?;
        let dt = crate::ir::DataType::try_from(t.elem).ok()?;
        total.checked_add(crate::ir::tensor::raw_byte_len(dt, elements)?)
    })
}

/// The most rows, dividing `rows`, whose share of `held` stays within `budget` (at least 1).
fn rows_per_run(rows: usize, held: usize, budget: usize) -> usize {
    (1..=rows)
        .rev()
        .filter(|&d| rows.is_multiple_of(d))
        .find(|&d| held / rows * d <= budget)
        .unwrap_or(1)
}

/// `batch` as runs of `per_run` rows, named after it (`None` if a tensor cannot be sliced).
fn split(batch: &Batch, rows: usize, per_run: usize, symbol: &str) -> Option<Vec<Batch>> {
    (0..rows)
        .step_by(per_run)
        .map(|start| {
            let end = (start + per_run).min(rows);
            let tensors = batch
                .tensors
                .iter()
                .map(|(name, t)| Some((name.clone(), t.slice(0, start, end).ok()?)))
                .collect::<Option<_>>()?;
            Some(Batch {
                name: format!("{} ({symbol} {start}..{end})", batch.name),
                tensors,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::testing::builder;
    use crate::ir::DataType;
    use tract_onnx::prelude::Tensor;

    /// `y = Relu(x)`, `x` `[batch, width]`, with a weight of `weight_floats` floats.
    fn model(leading: &str, weight_floats: usize) -> Model {
        builder()
            .input("x", DataType::Float, &[leading, "width"])
            .typed("h", DataType::Float, &[leading, "width"])
            .output("y", DataType::Float, &[leading, "width"])
            .init(
                crate::ir::Tensor::from_f32(
                    "w",
                    &[weight_floats as i64],
                    &vec![0.0; weight_floats],
                )
                .unwrap(),
            )
            .node("Relu", &["x"], &["h"], vec![])
            .node("Neg", &["h"], &["y"], vec![])
            .build()
    }

    fn batch(rows: usize, width: usize) -> Batch {
        let data: Vec<f32> = (0..rows * width).map(|i| i as f32).collect();
        Batch {
            name: "b".into(),
            tensors: vec![(
                "x".into(),
                Tensor::from_shape(&[rows, width], &data).unwrap(),
            )],
        }
    }

    #[test]
    fn runs_divide_the_rows_within_the_budget() {
        // 8 rows of 4 MiB of `h` and 4 MiB of `y`: 64 MiB a batch, 8 MiB a row.
        let width = 1 << 20;
        assert_eq!(rows_per_run(8, 64 << 20, 64 << 20), 8);
        assert_eq!(rows_per_run(8, (8 * 16) << 20, 64 << 20), 4);
        assert_eq!(rows_per_run(6, (6 * 24) << 20, 64 << 20), 2);
        assert_eq!(rows_per_run(7, 7 << 30, 64 << 20), 1);
        let names = ["h".to_string(), "y".to_string()];
        let small = model("batch", 16);
        let whole = runs(&small, &names, &[batch(8, width / 8)]);
        assert_eq!(whole.batches.len(), 1, "within the floor: one run");
        let runs = runs(&small, &names, &[batch(2, 4), batch(12, width)]);
        // 12 rows of 8 MiB: 96 MiB, over the 64 MiB floor; 6 rows take 48.
        assert_eq!(runs.of_batch, [0, 1, 1], "the second batch in two runs");
        let x = |b: &Batch| b.tensor("x").unwrap().clone();
        assert_eq!(x(&runs.batches[1]).shape(), &[6, width]);
        let rows = batch(12, width)
            .tensor("x")
            .unwrap()
            .slice(0, 6, 12)
            .unwrap();
        assert_eq!(x(runs.run(2).batch), rows);
        assert!(
            runs.batches[2].name.contains("batch 6..12"),
            "{}",
            runs.batches[2].name
        );
    }

    #[test]
    fn a_batch_axis_not_proven_shared_is_not_split() {
        let names = ["h".to_string()];
        let fixed = builder()
            .input("x", DataType::Float, &["12", "width"])
            .output("h", DataType::Float, &["12", "width"])
            .node("Relu", &["x"], &["h"], vec![])
            .build();
        assert_eq!(runs(&fixed, &names, &[batch(12, 1 << 20)]).batches.len(), 1);
        let two_symbols = builder()
            .input("x", DataType::Float, &["batch", "width"])
            .input("z", DataType::Float, &["other", "width"])
            .output("h", DataType::Float, &["batch", "width"])
            .node("Relu", &["x"], &["h"], vec![])
            .build();
        let mut b = batch(12, 1 << 20);
        b.tensors.push(("z".into(), b.tensors[0].1.clone()));
        assert_eq!(runs(&two_symbols, &names, &[b]).batches.len(), 1);
    }
}
