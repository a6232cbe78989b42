use super::*;
use crate::exec::Runner;
use crate::ir::testing::{builder, written};
use crate::proto::GraphProto;
use crate::quant::Range;

fn options(target: QuantTarget) -> QdqOptions {
    QdqOptions::for_target(target)
}

fn weight(name: &str, dims: &[i64]) -> Tensor {
    let n: i64 = dims.iter().product();
    let values: Vec<f32> = (0..n).map(|i| (i as f32 - 2.5) / 8.0).collect();
    Tensor::from_f32(name, dims, &values).unwrap()
}

/// Eager attention on `x` [2, 4]: `softmax(q·kᵀ · 0.5)·v`, then an output projection.
fn attention() -> Model {
    let f = DataType::Float;
    builder()
        .input("x", f, &["2", "4"])
        .output("y", f, &["2", "4"])
        .init(weight("wq", &[4, 4]))
        .init(weight("wk", &[4, 4]))
        .init(weight("wv", &[4, 4]))
        .init(weight("wo", &[4, 4]))
        .init(Tensor::from_f32("half", &[], &[0.5]).unwrap())
        .node("MatMul", &["x", "wq"], &["q"], vec![])
        .node("MatMul", &["x", "wk"], &["k"], vec![])
        .node("MatMul", &["x", "wv"], &["v"], vec![])
        .node(
            "Transpose",
            &["k"],
            &["kt"],
            vec![attr::ints("perm", &[1, 0])],
        )
        .node("MatMul", &["q", "kt"], &["scores"], vec![])
        .node("Mul", &["scores", "half"], &["scaled"], vec![])
        .node("Softmax", &["scaled"], &["p"], vec![])
        .node("MatMul", &["p", "v"], &["context"], vec![])
        .node("MatMul", &["context", "wo"], &["y"], vec![])
        .build()
}

fn selecting(include: &[&str], exclude: &[&str]) -> QdqOptions {
    let parse = |s: &[&str]| s.iter().map(|t| Selector::parse(t).unwrap()).collect();
    QdqOptions {
        target: QuantTarget::Ort,
        selection: Selection {
            include: parse(include),
            exclude: parse(exclude),
        },
        ..QdqOptions::for_target(QuantTarget::Ort)
    }
}

#[test]
fn the_attention_score_path_stays_float_by_default() {
    let m = attention();
    // q·kᵀ feeds the Softmax (through the scaling Mul), p·v reads it: neither is selected,
    // so q, kt, p and v are not quantized; x (read by three projections) and context are.
    assert_eq!(
        activations_to_calibrate(&m, &options(QuantTarget::Ort)),
        ["x", "context"]
    );
}

/// RoPE's angles, `inv_freq @ positions` (positions cast to float, moved by an Unsqueeze),
/// stay float: generation runs past any calibrated position. The projection after them is
/// quantized as usual; `--include op:MatMul` still takes the angles.
#[test]
fn rotary_angles_from_positions_stay_float_by_default() {
    let f = DataType::Float;
    let m = builder()
        .input("position_ids", DataType::Int64, &["1", "8"])
        .output("y", f, &["1", "4", "4"])
        .init(weight("inv_freq", &[1, 4, 1]))
        .init(weight("w", &[8, 4]))
        .init(Tensor::from_i64("axis", &[1], &[1]).unwrap())
        .node(
            "Cast",
            &["position_ids"],
            &["positions"],
            vec![attr::int("to", 1)],
        )
        .node("Unsqueeze", &["positions", "axis"], &["moved"], vec![])
        .node("MatMul", &["inv_freq", "moved"], &["angles"], vec![])
        .node("MatMul", &["angles", "w"], &["y"], vec![])
        .build();
    assert_eq!(
        activations_to_calibrate(&m, &options(QuantTarget::Ort)),
        ["angles"]
    );
    let g = &m.graph;
    let types = crate::passes::shape::infer(&m).types;
    let angles = g.producer(g.find_value("angles").unwrap()).unwrap();
    let selected = |s: &Selection| selection::select(g, &types, s).contains_key(&angles);
    assert!(!selected(&Selection::default()));
    assert!(selected(&selecting(&["op:MatMul"], &[]).selection));
}

#[test]
fn include_and_exclude_select_by_name_op_type_and_regex() {
    let m = attention();
    let names = |o: QdqOptions| activations_to_calibrate(&m, &o);
    assert_eq!(
        names(selecting(&["MatMul_scores"], &[])),
        ["x", "q", "kt", "context"],
        "a score MatMul included by name"
    );
    assert_eq!(
        names(selecting(&["re:^MatMul_(scores|context)$"], &[])),
        ["x", "q", "kt", "p", "v", "context"],
        "both score MatMuls included by a regex"
    );
    assert_eq!(
        names(selecting(&["op:Softmax"], &[])),
        ["x", "scaled", "context"],
        "a Softmax included gets its input quantized"
    );
    assert_eq!(names(selecting(&[], &["MatMul_y"])), ["x"]);
    assert_eq!(names(selecting(&[], &["re:^MatMul_[qkv]$"])), ["context"]);
    assert!(
        names(selecting(&["MatMul_scores"], &["op:MatMul"])).is_empty(),
        "exclude wins"
    );
    assert!(Selector::parse("re:(").is_err());
}

#[test]
fn an_included_attention_keeps_its_mask_float() {
    // The additive mask holds -inf where a position is masked: no range can round it.
    let f = DataType::Float;
    let m = builder()
        .opset(23)
        .input("q", f, &["1", "2", "4"])
        .input("k", f, &["1", "2", "4"])
        .input("v", f, &["1", "2", "4"])
        .input("mask", f, &["2", "2"])
        .output("y", f, &["1", "2", "4"])
        .node(
            "Attention",
            &["q", "k", "v", "mask"],
            &["y"],
            vec![attr::int("q_num_heads", 2), attr::int("kv_num_heads", 2)],
        )
        .build();
    assert_eq!(
        activations_to_calibrate(&m, &selecting(&["op:Attention"], &[])),
        ["q", "k", "v"]
    );
}

/// The written initializer `name` as (dtype, dims, values as f64).
fn init(g: &GraphProto, name: &str) -> (DataType, Vec<i64>, Vec<f64>) {
    let t = g.initializer.iter().find(|t| t.name() == name);
    let t = Tensor::from_proto(t.unwrap_or_else(|| panic!("no {name}")).clone()).unwrap();
    let values = match t.dtype() {
        DataType::Float => t.to_f32_vec().unwrap().iter().map(|&v| v as f64).collect(),
        _ => t.to_i64_vec().unwrap().iter().map(|&v| v as f64).collect(),
    };
    (t.dtype(), t.dims().to_vec(), values)
}

fn ranges(names: &[(&str, f32, f32)]) -> Ranges {
    names
        .iter()
        .map(|&(n, min, max)| (n.to_string(), Range { min, max }))
        .collect()
}

fn quantized(model: &mut Model, ranges: &Ranges, target: QuantTarget) -> Rewrites {
    match insert_qdq(model, ranges, &options(target)).unwrap() {
        QdqOutcome::Quantized(r) => r,
        other => panic!("{other:?}"),
    }
}

#[test]
fn weights_are_int8_per_output_channel_on_the_axis_of_each_op() {
    let f = DataType::Float;
    let mut m = builder()
        .input("x", f, &["1", "2"])
        .input("img", f, &["1", "1", "2", "2"])
        .output("mm", f, &["1", "3"])
        .output("gemm", f, &["1", "3"])
        .output("conv", f, &["1", "2", "1", "1"])
        .init(Tensor::from_f32("w", &[2, 3], &[0.5, -1.0, 0.0, -0.25, 0.5, 0.0]).unwrap())
        .init(Tensor::from_f32("wt", &[3, 2], &[0.5, -0.25, -1.0, 0.5, 0.0, 0.0]).unwrap())
        .init(Tensor::from_f32("b", &[3], &[0.1, 0.2, 0.3]).unwrap())
        .init(
            Tensor::from_f32(
                "filters",
                &[2, 1, 2, 2],
                &[1.0, -2.0, 0.0, 0.0, 0.5, 0.25, 0.0, 0.0],
            )
            .unwrap(),
        )
        .node("MatMul", &["x", "w"], &["mm"], vec![])
        .node(
            "Gemm",
            &["x", "wt", "b"],
            &["gemm"],
            vec![attr::int("transB", 1)],
        )
        .node("Conv", &["img", "filters"], &["conv"], vec![])
        .build();
    let r = ranges(&[("x", -1.0, 1.0), ("img", -1.0, 1.0)]);
    let rewrites = quantized(&mut m, &r, QuantTarget::Trt);
    assert_eq!(rewrites.0["qdq-weight"], 3);
    assert_eq!(rewrites.0["drop-float-weight"], 3);
    let g = written(&m);
    let (s0, s1) = (
        (1.0f64 / 254.0) as f32 as f64,
        (2.0f64 / 254.0) as f32 as f64,
    );
    // MatMul B [K, N]: per column (axis 1); values as ONNX Runtime quantizes them.
    assert_eq!(
        init(&g, "w.int8"),
        (
            DataType::Int8,
            vec![2, 3],
            vec![127.0, -127.0, 0.0, -64.0, 64.0, 0.0]
        )
    );
    assert_eq!(
        init(&g, "w.scale"),
        (DataType::Float, vec![3], vec![s0, s1, 1.0])
    );
    assert_eq!(
        init(&g, "w.zero_point"),
        (DataType::Int8, vec![3], vec![0.0; 3])
    );
    // Gemm with transB: B is [N, K], per row (axis 0); the same matrix transposed.
    assert_eq!(
        init(&g, "wt.int8").2,
        [127.0, -64.0, -127.0, 64.0, 0.0, 0.0]
    );
    assert_eq!(init(&g, "wt.scale").2, [s0, s1, 1.0]);
    // Conv W [M, C, kh, kw]: per filter (axis 0).
    assert_eq!(
        init(&g, "filters.scale").2,
        [(4.0f64 / 254.0) as f32 as f64, s0]
    );
    assert_eq!(
        init(&g, "filters.int8").2,
        [64.0, -127.0, 0.0, 0.0, 127.0, 64.0, 0.0, 0.0]
    );
    let axis = |w: &str| {
        let dq = g
            .node
            .iter()
            .find(|n| n.input.first().is_some_and(|i| i == w))
            .unwrap();
        (dq.op_type().to_string(), attr::get_int(dq, "axis"))
    };
    assert_eq!(axis("w.int8"), ("DequantizeLinear".into(), Some(1)));
    assert_eq!(axis("wt.int8"), ("DequantizeLinear".into(), Some(0)));
    assert_eq!(axis("filters.int8"), ("DequantizeLinear".into(), Some(0)));
    // The bias stays float and the float weights are gone.
    let gemm = g.node.iter().find(|n| n.op_type() == "Gemm").unwrap();
    assert_eq!(gemm.input, ["x.dq", "wt.dq", "b"]);
    assert!(!g
        .initializer
        .iter()
        .any(|t| ["w", "wt", "filters"].contains(&t.name())));
    assert!(trt_violations(&m).is_empty(), "{:?}", trt_violations(&m));
}

#[test]
fn activation_scale_and_zero_point_follow_the_target() {
    for (target, dtype, scale, zero_point) in [
        (
            QuantTarget::Ort,
            DataType::Uint8,
            (4.0f64 / 255.0) as f32,
            64.0,
        ),
        (
            QuantTarget::Trt,
            DataType::Int8,
            (6.0f64 / 254.0) as f32,
            0.0,
        ),
    ] {
        let mut m = attention();
        let r = ranges(&[("x", -1.0, 3.0), ("context", 0.0, 1.0)]);
        quantized(&mut m, &r, target);
        let g = written(&m);
        assert_eq!(
            init(&g, "x.scale"),
            (DataType::Float, vec![], vec![scale as f64])
        );
        assert_eq!(init(&g, "x.zero_point"), (dtype, vec![], vec![zero_point]));
        let q = g
            .node
            .iter()
            .find(|n| n.op_type() == "QuantizeLinear")
            .unwrap();
        assert_eq!(q.input, ["x", "x.scale", "x.zero_point"]);
        assert_eq!(q.output, ["x.q"]);
    }
}

#[test]
fn one_pair_per_activation_is_shared_by_its_selected_readers_only() {
    let f = DataType::Float;
    let mut m = builder()
        .input("x", f, &["1", "2"])
        .output("a", f, &["1", "2"])
        .output("b", f, &["1", "2"])
        .output("r", f, &["1", "2"])
        .init(weight("w1", &[2, 2]))
        .init(weight("w2", &[2, 2]))
        .node("MatMul", &["x", "w1"], &["a"], vec![])
        .node("MatMul", &["x", "w2"], &["b"], vec![])
        .node("Relu", &["x"], &["r"], vec![])
        .build();
    let rewrites = quantized(&mut m, &ranges(&[("x", -1.0, 1.0)]), QuantTarget::Ort);
    assert_eq!(rewrites.0["qdq-activation"], 1);
    let g = written(&m);
    let inputs = |op: &str| -> Vec<Vec<String>> {
        g.node
            .iter()
            .filter(|n| n.op_type() == op)
            .map(|n| n.input.clone())
            .collect()
    };
    assert_eq!(inputs("QuantizeLinear").len(), 1);
    assert_eq!(inputs("MatMul"), [["x.dq", "w1.dq"], ["x.dq", "w2.dq"]]);
    assert_eq!(
        inputs("Relu"),
        [["x"]],
        "a reader that is not selected keeps the float value"
    );
}

/// `x` → MatMul(W) → Add(bias) → Add(·, x): a skip connection around a weighted layer.
fn residual_block() -> Model {
    let f = DataType::Float;
    builder()
        .input("x", f, &["1", "2"])
        .output("y", f, &["1", "2"])
        .init(weight("w", &[2, 2]))
        .init(Tensor::from_f32("bias", &[2], &[0.1, -0.1]).unwrap())
        .node("MatMul", &["x", "w"], &["h"], vec![])
        .node("Add", &["h", "bias"], &["hb"], vec![])
        .node("Add", &["x", "hb"], &["y"], vec![])
        .build()
}

#[test]
fn tensorrt_gets_the_residual_input_of_a_skip_add_quantized() {
    let r = ranges(&[("x", -1.0, 1.0)]);
    let mut trt = residual_block();
    quantized(&mut trt, &r, QuantTarget::Trt);
    let add = |m: &Model| {
        let g = written(m);
        g.node
            .iter()
            .find(|n| n.output == ["y"])
            .unwrap()
            .input
            .clone()
    };
    assert_eq!(add(&trt), ["x.dq", "hb"]);
    assert!(
        trt_violations(&trt).is_empty(),
        "{:?}",
        trt_violations(&trt)
    );
    let mut ort = residual_block();
    quantized(&mut ort, &r, QuantTarget::Ort);
    assert_eq!(
        add(&ort),
        ["x", "hb"],
        "ONNX Runtime keeps the residual float"
    );
}

#[test]
fn an_embedding_gather_reads_int8_rows_and_dequantizes_them_after_the_gather() {
    let f = DataType::Float;
    let table = Tensor::from_f32("table", &[3, 2], &[0.5, -1.0, 0.25, 0.125, 2.0, 0.0]).unwrap();
    let mut m = builder()
        .input("ids", DataType::Int64, &["1", "4"])
        .output("emb", f, &["1", "4", "2"])
        .init(table)
        .node("Gather", &["table", "ids"], &["emb"], vec![])
        .build();
    let float = m.clone();
    assert!(
        activations_to_calibrate(&m, &options(QuantTarget::Ort)).is_empty(),
        "weight-only"
    );
    let rewrites = quantized(&mut m, &Ranges::new(), QuantTarget::Trt);
    assert_eq!(rewrites.0["qdq-embedding"], 1);
    let g = written(&m);
    let ops: Vec<(&str, &[String])> = g.node.iter().map(|n| (n.op_type(), &n.input[..])).collect();
    assert_eq!(
        ops,
        [
            ("Gather", &["table.int8".to_string(), "ids".into()][..]),
            ("Gather", &["table.scale".into(), "ids".into()][..]),
            ("Cast", &["emb.int8".into()][..]),
            ("Mul", &["emb.float".into(), "emb.scale".into()][..]),
        ]
    );
    assert_eq!(g.node[3].output, ["emb"], "the output keeps its name");
    assert_eq!(
        init(&g, "table.int8").2,
        [64.0, -127.0, 127.0, 64.0, 127.0, 0.0]
    );
    assert_eq!(init(&g, "table.scale").1, [3, 1]);
    assert!(!g.initializer.iter().any(|t| t.name() == "table"));
    assert!(trt_violations(&m).is_empty(), "{:?}", trt_violations(&m));

    // Each gathered row is its int8 row times its own scale.
    let ids = tract_onnx::prelude::tensor2(&[[2i64, 0, 1, 0]]);
    let batch = crate::exec::Batch {
        name: "b".into(),
        tensors: vec![("ids".into(), ids)],
    };
    let run = |m: &Model| {
        let out = Runner::new(m).unwrap().run(&batch).unwrap();
        out[0]
            .1
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect::<Vec<f32>>()
    };
    let s = |absmax: f64| (2.0 * absmax / 254.0) as f32;
    let expected = [
        127.0 * s(2.0),
        0.0,
        64.0 * s(1.0),
        -127.0 * s(1.0),
        127.0 * s(0.25),
        64.0 * s(0.25),
    ];
    assert_eq!(run(&m), [&expected[..], &expected[2..4]].concat());
    let reference = run(&float);
    assert!(run(&m)
        .iter()
        .zip(&reference)
        .all(|(a, b)| (a - b).abs() <= 1.0 / 127.0));
}

#[test]
fn a_model_already_holding_quantize_dequantize_pairs_is_left_alone() {
    let f = DataType::Float;
    let mut m = builder()
        .input("x", f, &["1", "2"])
        .output("y", f, &["1", "2"])
        .init(weight("w", &[2, 2]))
        .init(Tensor::from_f32("s", &[], &[0.1]).unwrap())
        .node("QuantizeLinear", &["x", "s"], &["xq"], vec![])
        .node("DequantizeLinear", &["xq", "s"], &["xd"], vec![])
        .node("MatMul", &["xd", "w"], &["y"], vec![])
        .build();
    let before = m.to_proto().unwrap();
    assert!(activations_to_calibrate(&m, &options(QuantTarget::Ort)).is_empty());
    let outcome = insert_qdq(
        &mut m,
        &ranges(&[("xd", -1.0, 1.0)]),
        &options(QuantTarget::Ort),
    );
    assert_eq!(
        outcome.unwrap(),
        QdqOutcome::AlreadyQuantized {
            operators: vec!["DequantizeLinear".into(), "QuantizeLinear".into()]
        }
    );
    assert_eq!(m.to_proto().unwrap(), before);
}

#[test]
fn a_missing_range_changes_nothing() {
    let mut m = attention();
    let before = m.to_proto().unwrap();
    let err = insert_qdq(
        &mut m,
        &ranges(&[("x", -1.0, 1.0)]),
        &options(QuantTarget::Ort),
    );
    let err = err.unwrap_err().to_string();
    assert!(
        err.contains("no calibrated range for activation `context`"),
        "{err}"
    );
    assert_eq!(m.to_proto().unwrap(), before);
}

#[test]
fn per_axis_dequantization_needs_opset_13() {
    let matmul_at = |opset: i64| {
        let f = DataType::Float;
        builder()
            .opset(opset)
            .input("x", f, &["1", "2"])
            .output("y", f, &["1", "2"])
            .init(weight("w", &[2, 2]))
            .node("MatMul", &["x", "w"], &["y"], vec![])
            .build()
    };
    let r = ranges(&[("x", -1.0, 1.0)]);
    let mut m = matmul_at(13);
    quantized(&mut m, &r, QuantTarget::Ort);
    assert_eq!(m.opset(""), Some(13));
    for from in [12, 10, 9] {
        let mut m = matmul_at(from);
        quantized(&mut m, &r, QuantTarget::Ort);
        assert_eq!(m.opset(""), Some(13), "raised from {from}");
    }
    let err = insert_qdq(&mut matmul_at(8), &r, &options(QuantTarget::Ort)).unwrap_err();
    assert!(err.to_string().contains("opset"), "{err}");
}
