//! Chains that look like a fusion but must not be fused, each beside the correct chain that
//! is fused (so that each test fails if the matcher stops matching at all): a LayerNorm
//! reducing over axis 1, an RMSNorm of the mean of x·(−x) (and an RMSNorm for ONNX Runtime
//! below opset 23), a GELU with a wrong constant, and a GELU whose intermediate value has
//! another reader, a RoPE on cached tables whose halves differ. Fused results are checked in
//! tract.
//! And files whose recorded types lie, which the fusions must survive.

mod common;

use common::chain::{model, node, scalar, typed_value};
use onnxopt::exec::{self, InputSource, ValidateOptions};
use onnxopt::ir::{attr, Model, Tensor};
use onnxopt::optimize::{optimize, OptimizeOptions};
use onnxopt::passes::fuse::Target;
use onnxopt::proto::tensor_proto::DataType;
use onnxopt::proto::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto, ValueInfoProto};

/// Optimizes for ONNX Runtime, checks the outputs in tract, returns the operators left.
fn fused_ops(original: Model) -> Vec<String> {
    fused_ops_for(original, Target::Ort)
}

/// `fused_ops` for `target`.
fn fused_ops_for(original: Model, target: Target) -> Vec<String> {
    let mut model = original.clone();
    optimize(
        &mut model,
        &OptimizeOptions {
            target,
            ..Default::default()
        },
    )
    .unwrap();
    let options = ValidateOptions {
        inputs: InputSource::Generated(2),
        ..Default::default()
    };
    let v = exec::validate(&original, &model, &options, &|_, _| {}).unwrap();
    let worst = v.outputs.iter().map(|d| d.max_abs).fold(0.0, f64::max);
    assert!(worst <= 1e-5, "outputs changed by {worst}");
    let mut ops: Vec<String> = model
        .graph
        .nodes()
        .map(|(_, n)| n.op_type().to_string())
        .collect();
    ops.sort();
    ops
}

/// LayerNorm written out, reducing over `axis`, with `[8]` parameters.
fn layer_norm_over(axis: i64) -> Model {
    layer_norm_with(axis, &[8])
}

/// LayerNorm of x `[2, 3, 8]` written out, reducing over `axis`, with parameters of `dims`
/// (a different value per element).
fn layer_norm_with(axis: i64, dims: &[i64]) -> Model {
    let axes = || vec![attr::ints("axes", &[axis])];
    let n: i64 = dims.iter().product();
    let gamma: Vec<f32> = (0..n).map(|i| 1.5 + 0.25 * i as f32).collect();
    let beta: Vec<f32> = (0..n).map(|i| 0.25 - 0.5 * i as f32).collect();
    model(
        vec![
            node("ReduceMean", &["x"], "mean", axes()),
            node("Sub", &["x", "mean"], "d", vec![]),
            node("Pow", &["d", "two"], "d2", vec![]),
            node("ReduceMean", &["d2"], "var", axes()),
            node("Add", &["var", "eps"], "var_eps", vec![]),
            node("Sqrt", &["var_eps"], "std", vec![]),
            node("Div", &["d", "std"], "n", vec![]),
            node("Mul", &["n", "gamma"], "scaled", vec![]),
            node("Add", &["scaled", "beta"], "y", vec![]),
        ],
        vec![
            scalar("two", 2.0),
            scalar("eps", 1e-5),
            Tensor::from_f32("gamma", dims, &gamma).unwrap(),
            Tensor::from_f32("beta", dims, &beta).unwrap(),
        ],
        &["y"],
    )
}

#[test]
fn layer_norm_over_another_axis_is_not_fused() {
    assert_eq!(fused_ops(layer_norm_over(-1)), ["LayerNormalization"]);
    assert_eq!(fused_ops(layer_norm_over(2)), ["LayerNormalization"]);
    let kept = fused_ops(layer_norm_over(1));
    assert!(
        !kept.contains(&"LayerNormalization".to_string()),
        "{kept:?}"
    );
}

/// A LayerNorm over the channels of `[N, C, …]` with `[C, 1, …]` parameters (ConvNeXt's) fuses
/// between two Transposes; parameters of another form (x's own rank, or varying along the
/// positions too) stay written out.
#[test]
fn channels_first_layer_norm_fuses_only_with_per_channel_parameters() {
    assert_eq!(
        fused_ops(layer_norm_with(1, &[3, 1])),
        ["LayerNormalization", "Transpose", "Transpose"]
    );
    for dims in [&[1, 3, 1][..], &[3, 8]] {
        let kept = fused_ops(layer_norm_with(1, dims));
        assert!(
            !kept.contains(&"LayerNormalization".to_string()),
            "{dims:?}: {kept:?}"
        );
    }
}

/// RMSNorm with x² written by `square` (nodes writing `x2`).
fn rms_norm(square: Vec<NodeProto>) -> Model {
    let axes = vec![attr::ints("axes", &[-1])];
    model(
        [
            square,
            vec![
                node("ReduceMean", &["x2"], "ms", axes),
                node("Add", &["ms", "eps"], "ms_eps", vec![]),
                node("Sqrt", &["ms_eps"], "rms", vec![]),
                node("Div", &["x", "rms"], "n", vec![]),
                node("Mul", &["n", "gamma"], "y", vec![]),
            ],
        ]
        .concat(),
        vec![
            scalar("two", 2.0),
            scalar("eps", 1e-6),
            Tensor::from_f32("gamma", &[8], &[0.5; 8]).unwrap(),
        ],
        &["y"],
    )
}

#[test]
fn rms_norm_of_something_other_than_a_square_is_not_fused() {
    // `Pow(x, 2)` and `x·x` are one form (`passes::canonical`): both fuse.
    let onnx = |m| fused_ops_for(m, Target::Onnx);
    let pow = node("Pow", &["x", "two"], "x2", vec![]);
    assert_eq!(onnx(rms_norm(vec![pow])), ["RMSNormalization"]);
    let mul = node("Mul", &["x", "x"], "x2", vec![]);
    assert_eq!(onnx(rms_norm(vec![mul])), ["RMSNormalization"]);
    // The mean of x·(−x) is no mean square.
    let kept = onnx(rms_norm(vec![
        node("Neg", &["x"], "nx", vec![]),
        node("Mul", &["x", "nx"], "x2", vec![]),
    ]));
    assert!(kept.contains(&"ReduceMean".to_string()), "{kept:?}");
    assert!(
        !kept.iter().any(|o| o.ends_with("Normalization")),
        "{kept:?}"
    );
}

#[test]
fn rms_norm_for_onnx_runtime_is_fused_only_at_opset_23() {
    // Below it, written out in the form ONNX Runtime fuses when it loads the model (see
    // `fuse::layernorm::build_rms_norm`); the opset stays.
    let mul = || node("Mul", &["x", "x"], "x2", vec![]);
    let mut model = rms_norm(vec![mul()]);
    let before = model.opset("");
    optimize(&mut model, &OptimizeOptions::default()).unwrap();
    assert_eq!(model.opset(""), before);
    let kept = fused_ops(rms_norm(vec![mul()]));
    assert_eq!(kept, ["Add", "Div", "Mul", "Pow", "ReduceMean", "Sqrt"]);
    let mut at_23 = rms_norm(vec![mul()]);
    onnxopt::passes::opset::raise(&mut at_23, 23).unwrap();
    assert_eq!(fused_ops(at_23), ["RMSNormalization"]);
}

/// Exact GELU with the given √2 constant; `extra_output` also exposes the Erf result.
fn gelu(sqrt2: f32, extra_output: bool) -> Model {
    let outputs: &[&str] = if extra_output { &["y", "e"] } else { &["y"] };
    model(
        vec![
            node("Div", &["x", "sqrt2"], "t", vec![]),
            node("Erf", &["t"], "e", vec![]),
            node("Add", &["e", "one"], "a", vec![]),
            node("Mul", &["x", "a"], "m", vec![]),
            node("Mul", &["m", "half"], "y", vec![]),
        ],
        vec![
            scalar("sqrt2", sqrt2),
            scalar("one", 1.0),
            scalar("half", 0.5),
        ],
        outputs,
    )
}

#[test]
fn gelu_with_a_wrong_constant_is_not_fused() {
    assert_eq!(fused_ops(gelu(std::f32::consts::SQRT_2, false)), ["Gelu"]);
    let kept = fused_ops(gelu(1.5, false));
    assert!(kept.contains(&"Erf".to_string()), "{kept:?}");
}

#[test]
fn gelu_whose_intermediate_has_another_reader_is_not_fused() {
    let kept = fused_ops(gelu(std::f32::consts::SQRT_2, true));
    assert!(kept.contains(&"Erf".to_string()), "{kept:?}");
    assert!(!kept.contains(&"Gelu".to_string()), "{kept:?}");
}

/// A file's `value_info` is the user's, and may be wrong: the fusions read ranks and dims
/// from it when run alone (`--passes fuse-attention`), and must give up, never panic, when
/// it lies. Each intermediate value in turn is given a wrong rank (a K-heads value of rank 2
/// once made the attention fusion index past its dims).
#[test]
fn fusions_survive_value_info_of_any_rank() {
    use onnxopt::ir::{Dim, ValueType};
    let passes: Vec<String> = ["fuse-attention", "fuse-layernorm", "fuse-gelu"]
        .iter()
        .map(|p| p.to_string())
        .collect();
    let options = OptimizeOptions {
        target: Target::Ort,
        passes,
        ..Default::default()
    };
    for file in [
        "bert-tiny.dynamo.onnx",
        "bert-tiny.ts.onnx",
        "gpt2-tiny.dynamo.onnx",
    ] {
        let original = onnxopt::io::load(&common::testdata(file)).unwrap();
        let g = &original.graph;
        let produced: Vec<_> = g
            .value_ids()
            .filter(|&v| g.producer(v).is_some() && !g.is_graph_output(v))
            .collect();
        for v in produced {
            for rank in [0usize, 2] {
                let mut model = original.clone();
                let elem = model.graph.value_type(v).map_or(1, |t| t.elem);
                let wrong = ValueType::new(elem, vec![Dim::symbol("n"); rank]);
                model.graph.set_value_type(v, &wrong);
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    optimize(&mut model, &options)
                }));
                let name = original.graph.value_name(v);
                assert!(run.is_ok(), "{file}: `{name}` of rank {rank}: panicked");
            }
        }
    }
}

/// HF's RoPE on cached tables as transformers ≤ 4.37 wrote it, `x·cos[position_ids] +
/// rotate_half(x)·sin[position_ids]`, on x: f32[2, 3, 8] split into 2 heads of 4 and
/// position_ids: i64[2, 3], with `[8, 4]` tables whose halves repeat `Concat(f, f)`, or
/// whose sin table's second half is off by `sin_skew`.
fn cached_rope(sin_skew: f32) -> Model {
    cached_rope_at(sin_skew, 14)
}

/// `cached_rope` importing the default-domain `opset`.
fn cached_rope_at(sin_skew: f32, opset: i64) -> Model {
    cached_rope_of(sin_skew, opset, None)
}

/// `cached_rope` on a sequence of any length, where the tables, `[1, 1, 64, 4]`, are sliced
/// along their rows from `start` to `start + sequence` instead of gathered (ESM-2's legacy
/// export): the positions go unread.
fn sliced_rope(start: i64) -> Model {
    cached_rope_of(0.0, 14, Some(start))
}

fn cached_rope_of(sin_skew: f32, opset: i64, sliced_from: Option<i64>) -> Model {
    // Sliced tables are sliced to the sequence the check generates: more rows than it has.
    let rows: i64 = if sliced_from.is_some() { 64 } else { 8 };
    let table = |name: &str, trig: fn(f32) -> f32, skew: f32| {
        let values: Vec<f32> = (0..rows)
            .flat_map(|p| {
                let row: Vec<f32> = [1.0, 0.1].iter().map(|f| trig(p as f32 * f)).collect();
                let high: Vec<f32> = row.iter().map(|v| v + skew).collect();
                [row, high].concat()
            })
            .collect();
        let dims = match sliced_from {
            Some(_) => vec![1, 1, rows, 4],
            None => vec![rows, 4],
        };
        Tensor::from_f32(name, &dims, &values).unwrap()
    };
    let ints = |name: &str, values: &[i64]| {
        Tensor::from_i64(name, &[values.len() as i64], values).unwrap()
    };
    let tables = match sliced_from {
        Some(_) => vec![
            node("Shape", &["xh"], "xh_shape", vec![]),
            node(
                "Gather",
                &["xh_shape", "rows"],
                "seq",
                vec![attr::int("axis", 0)],
            ),
            node("Add", &["seq", "rows_from"], "rows_to", vec![]),
            node(
                "Slice",
                &["cos_table", "rows_from", "rows_to", "rows"],
                "cos",
                vec![],
            ),
            node(
                "Slice",
                &["sin_table", "rows_from", "rows_to", "rows"],
                "sin",
                vec![],
            ),
        ],
        None => vec![
            node(
                "Gather",
                &["cos_table", "position_ids"],
                "cos_rows",
                vec![attr::int("axis", 0)],
            ),
            node("Unsqueeze", &["cos_rows", "one"], "cos", vec![]),
            node(
                "Gather",
                &["sin_table", "position_ids"],
                "sin_rows",
                vec![attr::int("axis", 0)],
            ),
            node("Unsqueeze", &["sin_rows", "one"], "sin", vec![]),
        ],
    };
    let heads = vec![
        node("Reshape", &["x", "heads_shape"], "xs", vec![]),
        node(
            "Transpose",
            &["xs"],
            "xh",
            vec![attr::ints("perm", &[0, 2, 1, 3])],
        ),
    ];
    let rotation = vec![
        node("Slice", &["xh", "zero", "two", "last"], "x1", vec![]),
        node("Slice", &["xh", "two", "end", "last"], "x2", vec![]),
        node("Neg", &["x2"], "minus_x2", vec![]),
        node(
            "Concat",
            &["minus_x2", "x1"],
            "rotated",
            vec![attr::int("axis", -1)],
        ),
        node("Mul", &["xh", "cos"], "x_cos", vec![]),
        node("Mul", &["rotated", "sin"], "rotated_sin", vec![]),
        node("Add", &["x_cos", "rotated_sin"], "y", vec![]),
    ];
    let nodes = [heads, tables, rotation].concat();
    let start = sliced_from.unwrap_or(0);
    let constants = vec![
        ints("rows_from", &[start]),
        ints("rows", &[2]),
        ints("heads_shape", &[2, -1, 2, 4]),
        table("cos_table", f32::cos, 0.0),
        table("sin_table", f32::sin, sin_skew),
        ints("one", &[1]),
        ints("zero", &[0]),
        ints("two", &[2]),
        ints("end", &[i64::MAX]),
        ints("last", &[-1]),
    ];
    let dims: (&[i64], &[i64]) = match sliced_from {
        Some(_) => (&[2, -1, 8], &[2, 2, -1, 4]),
        None => (&[2, 3, 8], &[2, 2, 3, 4]),
    };
    rope_model(opset, nodes, constants, dims)
}

/// A RoPE test graph at the default-domain `opset`: inputs x: f32 of `dims.0` and
/// position_ids: i64[2, 3], output y: f32 of `dims.1`; a dim of −1 is the symbol `sequence`.
fn rope_model(
    opset: i64,
    nodes: Vec<NodeProto>,
    constants: Vec<Tensor>,
    dims: (&[i64], &[i64]),
) -> Model {
    Model::from_proto(ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        graph: Some(GraphProto {
            name: Some("rope".into()),
            node: nodes,
            initializer: constants.into_iter().map(Tensor::into_proto).collect(),
            input: vec![
                with_sequence(typed_value("x", DataType::Float, dims.0)),
                typed_value("position_ids", DataType::Int64, &[2, 3]),
            ],
            output: vec![with_sequence(typed_value("y", DataType::Float, dims.1))],
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap()
}

/// `v` with its dims of −1 named `sequence`.
fn with_sequence(mut v: ValueInfoProto) -> ValueInfoProto {
    use onnxopt::proto::tensor_shape_proto::dimension::Value;
    use onnxopt::proto::type_proto::Value as Type;
    if let Some(Type::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        for d in t.shape.iter_mut().flat_map(|s| s.dim.iter_mut()) {
            if d.value == Some(Value::DimValue(-1)) {
                d.value = Some(Value::DimParam("sequence".into()));
            }
        }
    }
    v
}

#[test]
fn rope_on_cached_tables_whose_halves_differ_is_not_fused() {
    for target in [Target::Ort, Target::Onnx] {
        let fused = fused_ops_for(cached_rope(0.0), target);
        let expected = match target {
            Target::Ort => 1,
            // No standard RotaryEmbedding below opset 23, which nothing here raises to.
            Target::Onnx => 0,
        };
        let ropes = fused.iter().filter(|op| *op == "RotaryEmbedding").count();
        assert_eq!(ropes, expected, "{target:?}: {fused:?}");
        assert!(!fused_ops_for(cached_rope(1e-3), target).contains(&"RotaryEmbedding".to_string()));
    }
}

/// ESM-2's tables sliced from row 0 fuse (token `i` reads row `i`); sliced from row 1 they
/// do not (the fused ids number the tokens from 0).
#[test]
fn rope_on_sliced_tables_fuses_only_from_the_first_row() {
    let ropes = |start| {
        let fused = fused_ops_for(sliced_rope(start), Target::Ort);
        fused.iter().filter(|op| *op == "RotaryEmbedding").count()
    };
    assert_eq!(ropes(0), 1);
    assert_eq!(ropes(1), 0);
}

/// Below opset 13 Squeeze and Unsqueeze take no axes input, which the fused caches use: the
/// fusion raises the model to 13 rather than write nodes its opset does not define.
#[test]
fn rope_below_opset_13_raises_the_model() {
    let mut model = cached_rope_at(0.0, 12);
    optimize(&mut model, &OptimizeOptions::default()).unwrap();
    let ropes = model
        .graph
        .nodes()
        .filter(|(_, n)| n.op_type() == "RotaryEmbedding")
        .count();
    assert_eq!(ropes, 1);
    assert!(model.opset("").unwrap_or(0) >= 13, "{:?}", model.opset(""));
}

/// How `interleaved_rope` writes its RoPE.
#[derive(Clone, Copy, PartialEq)]
enum Interleaving {
    /// GPT-J's: `x·cos + rotate_every_two(x)·sin`, each table `repeat_interleave(t, 2)`.
    Pairs,
    /// The negated lane is the even channels: the rotation turns the other way.
    NegatedEven,
    /// Each table repeated whole (`[t, t]`, a new axis before the last one) instead of
    /// value by value.
    TablesRepeatedWhole,
}

/// GPT-J's RoPE as the legacy exporter and Optimum write it, on x: f32[2, 3, 2, 4]
/// (`[batch, seq, heads, rot]`) and position_ids: i64[2, 3], the tables the two halves of the
/// rows `torch.gather` picks from a `[1, 8, 4]` table of sin | cos; or a variant that must not
/// fuse.
fn interleaved_rope(form: Interleaving) -> Model {
    let values: Vec<f32> = (0..8)
        .flat_map(|p| {
            let angles = [p as f32, p as f32 * 0.1];
            let sin = angles.map(f32::sin);
            let cos = angles.map(f32::cos);
            [sin, cos].concat()
        })
        .collect();
    let ints = |name: &str, values: &[i64]| {
        Tensor::from_i64(name, &[values.len() as i64], values).unwrap()
    };
    let (negated, kept) = match form {
        Interleaving::NegatedEven => ("x_even", "x_odd"),
        _ => ("x_odd", "x_even"),
    };
    let (lane_axis, doubling) = match form {
        Interleaving::TablesRepeatedWhole => ("three", "twice_before_last"),
        _ => ("last", "twice_last"),
    };
    let mut nodes = vec![
        node("Unsqueeze", &["position_ids", "last"], "index_lane", vec![]),
        node("Tile", &["index_lane", "index_repeats"], "index", vec![]),
        node("Tile", &["table", "batch_repeats"], "rows", vec![]),
        node(
            "GatherElements",
            &["rows", "index"],
            "sincos",
            vec![attr::int("axis", 1)],
        ),
        NodeProto {
            op_type: Some("Split".into()),
            input: vec!["sincos".into(), "halves".into()],
            output: vec!["sin_part".into(), "cos_part".into()],
            attribute: vec![attr::int("axis", -1)],
            ..Default::default()
        },
    ];
    for t in ["sin", "cos"] {
        let part = format!("{t}_part");
        let with_head = format!("{t}_with_head");
        let lane = format!("{t}_lane");
        let doubled = format!("{t}_doubled");
        nodes.extend([
            node("Unsqueeze", &[&part, "two"], &with_head, vec![]),
            node("Unsqueeze", &[&with_head, lane_axis], &lane, vec![]),
            node("Tile", &[&lane, doubling], &doubled, vec![]),
            node("Reshape", &[&doubled, "table_shape"], t, vec![]),
        ]);
    }
    nodes.extend([
        node(
            "Slice",
            &["x", "zero", "end", "last", "two"],
            "x_even",
            vec![],
        ),
        node(
            "Slice",
            &["x", "one", "end", "last", "two"],
            "x_odd",
            vec![],
        ),
        node("Neg", &[negated], "negated", vec![]),
        node("Unsqueeze", &["negated", "last"], "negated_lane", vec![]),
        node("Unsqueeze", &[kept, "last"], "kept_lane", vec![]),
        node(
            "Concat",
            &["negated_lane", "kept_lane"],
            "pairs",
            vec![attr::int("axis", -1)],
        ),
        node("Reshape", &["pairs", "x_shape"], "rotated", vec![]),
        node("Mul", &["x", "cos"], "x_cos", vec![]),
        node("Mul", &["rotated", "sin"], "rotated_sin", vec![]),
        node("Add", &["x_cos", "rotated_sin"], "y", vec![]),
    ]);
    let constants = vec![
        Tensor::from_f32("table", &[1, 8, 4], &values).unwrap(),
        ints("index_repeats", &[1, 1, 4]),
        ints("batch_repeats", &[2, 1, 1]),
        ints("halves", &[2, 2]),
        ints("twice_last", &[1, 1, 1, 1, 2]),
        ints("twice_before_last", &[1, 1, 1, 2, 1]),
        ints("table_shape", &[2, 3, 1, 4]),
        ints("x_shape", &[2, 3, 2, 4]),
        ints("zero", &[0]),
        ints("one", &[1]),
        ints("two", &[2]),
        ints("three", &[3]),
        ints("end", &[i64::MAX]),
        ints("last", &[-1]),
    ];
    rope_model(17, nodes, constants, (&[2, 3, 2, 4], &[2, 3, 2, 4]))
}

/// GPT-J's interleaved RoPE fuses (and gives the original's outputs in tract); the same
/// graph turning its pairs the other way, or repeating its tables whole, does not.
#[test]
fn interleaved_rope_fuses_only_with_pairs_and_tables_repeated_value_by_value() {
    let ropes = |form| {
        let fused = fused_ops_for(interleaved_rope(form), Target::Ort);
        fused.iter().filter(|op| *op == "RotaryEmbedding").count()
    };
    assert_eq!(ropes(Interleaving::Pairs), 1);
    assert_eq!(ropes(Interleaving::NegatedEven), 0);
    assert_eq!(ropes(Interleaving::TablesRepeatedWhole), 0);
}
