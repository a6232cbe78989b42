//! Pruning on real models.
//!
//! Structured pruning is checked against an independent construction: removing heads and FFN
//! neurons must give exactly what the unpruned model gives with those units' output rows
//! zeroed, in tract and in ONNX Runtime, for every corpus model and both targets. N:M and
//! magnitude pruning are checked weight by weight against their definitions, and a snapshot
//! pins what structured pruning does to a tiny BERT's graph.

mod common;

use onnxopt::exec::{self, InputSource};
use onnxopt::io::{self, ExternalData};
use onnxopt::ir::{attr, Graph, Model, Patch, Use, ValueId};
use onnxopt::passes::fuse::Target;
use onnxopt::prune::{prune, Importance, PruneOptions, PruneReport, Scope, Unstructured};

fn structured(fraction: f64) -> PruneOptions {
    PruneOptions {
        heads: Some(fraction),
        ffn: Some(fraction),
        ..Default::default()
    }
}

fn unstructured(kind: Unstructured) -> PruneOptions {
    PruneOptions {
        unstructured: Some(kind),
        ..Default::default()
    }
}

/// The weights reading feature value `v` as the input of a projection (through Reshapes),
/// with the axis of their input features: MatMul `[in, out]` axis 0, Gemm by `transB`.
fn projections_reading(g: &Graph, v: ValueId) -> Vec<(ValueId, usize)> {
    let mut found = Vec::new();
    for &(reader, u) in g.uses(v) {
        let node = g.node(reader);
        assert_eq!(
            u,
            Use::Input(0),
            "{} reads {}",
            node.name(),
            g.value_name(v)
        );
        match node.op_type() {
            "Reshape" => found.extend(projections_reading(g, node.output(0).unwrap())),
            "MatMul" => found.push((node.input(1).unwrap(), 0)),
            "Gemm" => {
                let trans_b = attr::get_int(&node.proto, "transB") == Some(1);
                found.push((node.input(1).unwrap(), usize::from(trans_b)));
            }
            other => panic!("{other} reads {}", g.value_name(v)),
        }
    }
    found
}

/// `weight` with the input features `rows` (along `axis`) set to zero.
fn zero_input_features(model: &mut Model, weight: ValueId, axis: usize, rows: &[usize]) {
    let t = model.graph.initializer(weight).unwrap();
    let dims: Vec<usize> = t.dims().iter().map(|&d| d as usize).collect();
    let mut values = t.to_f32_vec().unwrap();
    for (i, x) in values.iter_mut().enumerate() {
        let index = if axis == 0 { i / dims[1] } else { i % dims[1] };
        if rows.contains(&index) {
            *x = 0.0;
        }
    }
    let name = model.graph.value_name(weight).to_string();
    let tensor = onnxopt::ir::Tensor::from_f32(&name, t.dims(), &values).unwrap();
    let mut patch = Patch::new("zero");
    patch.replace_initializer(weight, tensor);
    model.graph.apply(patch).unwrap();
}

/// `model` with the contributions of the units `report` removed zeroed instead: the output
/// rows of each pruned head (`head_size` rows each) and of each pruned FFN neuron.
fn zeroed_like(model: &Model, report: &PruneReport) -> Model {
    let mut zeroed = model.clone();
    let node_named = |g: &Graph, name: &str| {
        g.nodes()
            .find(|(_, n)| n.name() == name)
            .map(|(id, _)| id)
            .unwrap_or_else(|| panic!("no node {name}"))
    };
    for block in &report.structured.heads {
        let g = &zeroed.graph;
        let out = g.node(node_named(g, &block.node)).output(0).unwrap();
        let shape = g.value_type(out).unwrap().shape.unwrap();
        let head_size = shape.last().unwrap().value().unwrap() as usize / block.before;
        let rows: Vec<usize> = block
            .removed
            .iter()
            .flat_map(|h| h * head_size..(h + 1) * head_size)
            .collect();
        for (w, axis) in projections_reading(g, out) {
            zero_input_features(&mut zeroed, w, axis, &rows);
        }
    }
    for block in &report.structured.ffn {
        let g = &zeroed.graph;
        let exit = g.node(node_named(g, &block.node));
        let (w, axis) = projections_reading(g, exit.input(0).unwrap())
            .into_iter()
            .find(|(w, _)| Some(*w) == exit.input(1))
            .unwrap();
        zero_input_features(&mut zeroed, w, axis, &block.removed);
    }
    zeroed
}

#[test]
fn calibration_ranks_the_units_by_their_activations() {
    let base = common::optimized(&common::testdata("bert-tiny.ts.onnx"), Target::Ort);
    let calib = common::testdata("calib/bert-tiny");
    let source = InputSource::Dir(calib.clone());
    let batches = exec::batches_for(&base, &source, &Default::default()).unwrap();
    let by_weights = {
        let mut pruned = base.clone();
        prune(&mut pruned, &structured(0.5)).unwrap()
    };
    let mut pruned = base.clone();
    let options = PruneOptions {
        calibration: batches,
        ..structured(0.5)
    };
    let report = prune(&mut pruned, &options).unwrap();
    let s = &report.structured;
    assert_eq!(s.importance, Importance::Activations { batches: 2 });
    assert_eq!((s.heads.len(), s.ffn.len()), (2, 2));
    // Activations pick other FFN neurons than the weights' norms do.
    assert_ne!(s.ffn, by_weights.structured.ffn);
    common::same_outputs(&zeroed_like(&base, &report), &pruned, &calib).unwrap();
}

#[test]
fn pruned_unfused_dynamo_bert_has_fewer_heads_in_every_shape() {
    let diff = structured_diff("bert-tiny.dynamo.onnx", Target::Ort, unfused_pipeline());
    insta::assert_snapshot!(diff);
}

/// The default pipeline without the attention fusion: attention stays in standard ops.
fn unfused_pipeline() -> Vec<String> {
    let all = onnxopt::optimize::pipeline(&Default::default());
    let names = all.names();
    names
        .iter()
        .filter(|p| **p != "fuse-attention")
        .map(|p| p.to_string())
        .collect()
}

#[test]
fn structured_pruning_is_zeroing_the_pruned_units_in_tract_and_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut ort = common::OrtChecks::default();
    let mut failures = Vec::new();
    for path in common::corpus_models() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for (form, passes) in [
            ("ort", Vec::new()),
            ("onnx", Vec::new()),
            ("unfused", unfused_pipeline()),
        ] {
            let label = format!("{name} {form}");
            let target = if form == "onnx" {
                Target::Onnx
            } else {
                Target::Ort
            };
            let base = common::optimized_with(&path, target, passes);
            let mut pruned = base.clone();
            let report = prune(&mut pruned, &structured(0.5)).unwrap();
            let s = &report.structured;
            // Only GPT-2 with past key/values keeps its heads (the cache is its interface).
            let past = name.contains("past");
            if s.ffn.is_empty() || s.heads.is_empty() != past {
                failures.push(format!("{label}: pruned {s:?}"));
                continue;
            }
            for b in s.heads.iter().chain(&s.ffn) {
                assert_eq!(b.after, b.before - b.before / 2, "{label} {}", b.node);
                assert_eq!(b.removed.len(), b.before / 2, "{label} {}", b.node);
            }
            assert!(report.parameters_after < report.parameters_before);
            let zeroed = zeroed_like(&base, &report);
            if let Err(e) = common::same_outputs(&zeroed, &pruned, &common::calib_dir(&path)) {
                failures.push(format!("{label}: {e}"));
            }
            let (z, p) = (
                dir.path().join(format!("zeroed.{label}")),
                dir.path().join(format!("pruned.{label}")),
            );
            io::save(&zeroed, &z, ExternalData::Auto).unwrap();
            io::save(&pruned, &p, ExternalData::Auto).unwrap();
            ort.add_exact(&z, &p, &common::calib_dir(&path));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    ort.run();
}

/// What structured pruning changed in `model` after `passes` (all when empty) for `target`.
fn structured_diff(model: &str, target: Target, passes: Vec<String>) -> String {
    let base = common::optimized_with(&common::testdata(model), target, passes);
    let mut pruned = base.clone();
    prune(&mut pruned, &structured(0.5)).unwrap();
    common::dump_diff(&base, &pruned)
}

#[test]
fn pruned_bert_with_packed_attention_has_the_smaller_shapes() {
    insta::assert_snapshot!(structured_diff(
        "bert-tiny.ts.onnx",
        Target::Ort,
        Vec::new()
    ));
}

#[test]
fn pruned_gpt2_with_split_qkv_and_computed_shapes_has_the_smaller_shapes() {
    insta::assert_snapshot!(structured_diff(
        "gpt2-tiny.dynamo.onnx",
        Target::Onnx,
        Vec::new()
    ));
}

/// The reduction axis of `weight` as its reader defines it (independent of the library's).
fn reduction_axis(g: &Graph, weight: ValueId) -> usize {
    let (reader, _) = g.uses(weight)[0];
    let node = g.node(reader);
    match node.op_type() {
        "MatMul" | "Attention" => 0,
        "Gemm" => usize::from(attr::get_int(&node.proto, "transB") == Some(1)),
        other => panic!("{other} reads a pruned weight"),
    }
}

#[test]
fn with_calibration_two_of_four_keeps_the_largest_weight_times_activation() {
    let model = common::optimized(&common::testdata("bert-tiny.ts.onnx"), Target::Ort);
    let source = InputSource::Dir(common::testdata("calib/bert-tiny"));
    let batches = exec::batches_for(&model, &source, &Default::default()).unwrap();
    let mut pruned = model.clone();
    let options = PruneOptions {
        calibration: batches.clone(),
        ..unstructured(Unstructured::NOfM { n: 2, m: 4 })
    };
    let report = prune(&mut pruned, &options).unwrap();
    assert_eq!(
        report.unstructured_importance,
        Importance::Activations { batches: 2 }
    );
    // Check every MatMul weight against |w|·RMS(x) computed here from the activations.
    let g = &model.graph;
    let matmuls: Vec<(ValueId, ValueId)> = g
        .nodes()
        .filter(|(_, n)| n.is("MatMul"))
        .filter_map(|(_, n)| Some((n.input(0)?, n.input(1)?)))
        .filter(|(_, w)| report.weights.iter().any(|r| r.weight == g.value_name(*w)))
        .collect();
    assert!(matmuls.len() >= 5, "{}", matmuls.len());
    let names: Vec<String> = matmuls
        .iter()
        .map(|(x, _)| g.value_name(*x).to_string())
        .collect();
    let mut runner = exec::Runner::with_outputs(&model, &names).unwrap();
    let mut energy: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut rows = vec![0usize; names.len()];
    for batch in &batches {
        for (i, (_, t)) in runner.run(batch).unwrap().iter().enumerate() {
            let view = t.to_plain_array_view::<f32>().unwrap();
            let width = *view.shape().last().unwrap();
            energy[i].resize(width, 0.0);
            for (k, x) in view.iter().enumerate() {
                energy[i][k % width] += f64::from(*x) * f64::from(*x);
            }
            rows[i] += view.len() / width;
        }
    }
    for (i, (_, w)) in matmuls.iter().enumerate() {
        let before = g.initializer(*w).unwrap();
        let cols = before.dims()[1] as usize;
        let values = before.to_f32_vec().unwrap();
        let p = &pruned.graph;
        let after = p
            .initializer(p.find_value(g.value_name(*w)).unwrap())
            .unwrap();
        let after = after.to_f32_vec().unwrap();
        let score = |k: usize, j: usize| {
            f64::from(values[k * cols + j].abs()) * (energy[i][k] / rows[i] as f64).sqrt()
        };
        for j in 0..cols {
            for group in 0..values.len() / cols / 4 {
                let ks: Vec<usize> = (group * 4..group * 4 + 4).collect();
                let kept: Vec<usize> = ks
                    .iter()
                    .copied()
                    .filter(|&k| after[k * cols + j] != 0.0)
                    .collect();
                let dropped: Vec<usize> = ks
                    .iter()
                    .copied()
                    .filter(|&k| after[k * cols + j] == 0.0)
                    .collect();
                let low = kept
                    .iter()
                    .map(|&k| score(k, j))
                    .fold(f64::INFINITY, f64::min);
                let high = dropped.iter().map(|&k| score(k, j)).fold(0.0, f64::max);
                // Equal up to the f32 rounding of the library's scores.
                assert!(
                    high <= low * (1.0 + 1e-5),
                    "{} column {j} group {group}",
                    g.value_name(*w)
                );
            }
        }
    }
}

#[test]
fn two_of_four_holds_along_the_reduction_axis_of_every_pruned_weight() {
    for path in common::corpus_models() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut model = common::optimized(&path, Target::Ort);
        let report = prune(&mut model, &unstructured(Unstructured::NOfM { n: 2, m: 4 })).unwrap();
        assert!(!report.weights.is_empty(), "{name}");
        let g = &model.graph;
        for w in &report.weights {
            let v = g.find_value(&w.weight).unwrap();
            let t = g.initializer(v).unwrap();
            let (dims, values) = (t.dims().to_vec(), t.to_f32_vec().unwrap());
            let (rows, cols) = (dims[0] as usize, dims[1] as usize);
            let axis = reduction_axis(g, v);
            let at = |k: usize, j: usize| {
                if axis == 0 {
                    values[k * cols + j]
                } else {
                    values[j * cols + k]
                }
            };
            let (len, across) = if axis == 0 {
                (rows, cols)
            } else {
                (cols, rows)
            };
            for j in 0..across {
                for group in 0..len / 4 {
                    let nonzero = (0..4).filter(|i| at(group * 4 + i, j) != 0.0).count();
                    assert!(
                        nonzero <= 2,
                        "{name} {}: group {group} of line {j}",
                        w.weight
                    );
                }
            }
            let zeros = values.iter().filter(|&&x| x == 0.0).count();
            assert_eq!(zeros, w.zeros, "{name} {}", w.weight);
            assert_eq!(w.sparsity, zeros as f64 / values.len() as f64);
            assert!(zeros * 2 >= values.len(), "{name} {}", w.weight);
        }
        // Every weight the pass left alone is reported with its reason.
        for s in &report.skipped {
            assert!(!s.reason.is_empty(), "{name} {}", s.weight);
        }
    }
}

#[test]
fn magnitude_pruning_zeroes_exactly_the_smallest() {
    let model = common::optimized(&common::testdata("bert-tiny.ts.onnx"), Target::Ort);
    for scope in [Scope::Layer, Scope::Global] {
        let mut pruned = model.clone();
        let kind = Unstructured::Magnitude {
            sparsity: 0.3,
            scope,
        };
        let report = prune(&mut pruned, &unstructured(kind)).unwrap();
        let (mut all_before, mut all_after) = (Vec::new(), Vec::new());
        let mut layer_targets = 0;
        for w in &report.weights {
            let values = |m: &Model| {
                let v = m.graph.find_value(&w.weight).unwrap();
                m.graph.initializer(v).unwrap().to_f32_vec().unwrap()
            };
            let (before, after) = (values(&model), values(&pruned));
            // Kept weights keep their value.
            assert!(before.iter().zip(&after).all(|(b, a)| *a == 0.0 || a == b));
            let zeros = after.iter().filter(|&&x| x == 0.0).count();
            assert_eq!(zeros, w.zeros, "{}", w.weight);
            let target = (0.3 * before.len() as f64).round() as usize;
            layer_targets += target.max(w.zeros_before);
            if scope == Scope::Layer {
                assert_eq!(zeros, target.max(w.zeros_before), "{}", w.weight);
                assert_largest_kept(&before, &after, &w.weight);
            }
            all_before.extend(before);
            all_after.extend(after);
        }
        let zeros = all_after.iter().filter(|&&x| x == 0.0).count();
        let expected = match scope {
            Scope::Layer => layer_targets,
            Scope::Global => (0.3 * all_before.len() as f64).round() as usize,
        };
        assert_eq!(zeros, expected, "{scope:?}");
        assert_eq!(report.sparsity, zeros as f64 / all_after.len() as f64);
        if scope == Scope::Global {
            assert_largest_kept(&all_before, &all_after, "all weights");
        }
    }
}

/// No zeroed weight is larger in magnitude than a kept one.
fn assert_largest_kept(before: &[f32], after: &[f32], what: &str) {
    let pruned = |keep: bool| {
        before
            .iter()
            .zip(after)
            .filter(move |(_, a)| (**a != 0.0) == keep)
            .map(|(b, _)| b.abs())
    };
    let largest_zeroed = pruned(false).fold(0.0f32, f32::max);
    let smallest_kept = pruned(true).fold(f32::INFINITY, f32::min);
    assert!(
        largest_zeroed <= smallest_kept,
        "{what}: {largest_zeroed} > {smallest_kept}"
    );
}
