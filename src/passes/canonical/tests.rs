use super::*;
use crate::exec::{Batch, Runner};
use crate::ir::testing::{builder, ops, written, Builder};
use crate::passes::shape::ShapeInference;

fn scalar(name: &str, v: f32) -> Tensor {
    Tensor::from_f32(name, &[], &[v]).unwrap()
}

/// `x: f32[2, 3, 4]` → nodes → `y: f32[2, 3, 4]` (or `out_dims`).
fn graph(out_dims: &[&str]) -> Builder {
    builder()
        .input("x", DataType::Float, &["2", "3", "4"])
        .output("y", DataType::Float, out_dims)
}

/// Infers types, runs the pass, returns the kinds of rewrite; checks in tract that the
/// rewritten model gives the original's outputs (exactly, or within `tolerance` of each
/// output's largest magnitude).
fn canonicalized(m: &mut Model, tolerance: f32) -> Vec<String> {
    ShapeInference.run(m).unwrap();
    let before = m.clone();
    canonicalized_against(m, &before, tolerance)
}

/// `canonicalized`, checking the outputs against `reference`'s.
fn canonicalized_against(m: &mut Model, reference: &Model, tolerance: f32) -> Vec<String> {
    ShapeInference.run(m).unwrap();
    let before = reference.clone();
    let kinds: Vec<String> = Canonicalize.run(m).unwrap().0.into_keys().collect();
    let x: Vec<f32> = (0..24).map(|i| (i as f32 - 11.5) * 0.37).collect();
    let input = crate::exec::to_tract(&Tensor::from_f32("x", &[2, 3, 4], &x).unwrap()).unwrap();
    let batch = Batch {
        name: "b".into(),
        tensors: vec![("x".into(), input)],
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
    let (want, got) = (run(&before), run(m));
    assert_eq!(want.len(), got.len());
    let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
    for (w, g) in want.iter().zip(&got) {
        assert!((w - g).abs() <= tolerance * scale, "{w} vs {g}");
    }
    kinds
}

#[test]
fn division_by_a_constant_becomes_a_product_with_its_reciprocal() {
    let mut m = graph(&["2", "3", "4"])
        .init(scalar("c", 8.0))
        .node("Div", &["x", "c"], &["y"], vec![])
        .build();
    assert_eq!(
        canonicalized(&mut m, 0.0),
        ["div-by-constant"],
        "exact: 1/8"
    );
    assert_eq!(ops(&m), ["Mul"]);
    let g = written(&m);
    assert_eq!(g.node[0].name(), "Div_y", "the node keeps its name");
    let r = g
        .initializer
        .iter()
        .find(|t| t.name() == "c_reciprocal")
        .unwrap();
    assert_eq!(
        Tensor::from_proto(r.clone()).unwrap().to_f32_vec().unwrap(),
        [0.125]
    );
    // Per channel, and within an ulp where the reciprocal rounds.
    #[allow(clippy::approx_constant)]
    let c = Tensor::from_f32("c", &[4], &[1.41421, 3.0, 7.0, 0.7]).unwrap();
    let mut m = graph(&["2", "3", "4"])
        .init(c)
        .node("Div", &["x", "c"], &["y"], vec![])
        .build();
    assert_eq!(
        canonicalized(&mut m, 2.0 * f32::EPSILON),
        ["div-by-constant"]
    );
}

#[test]
fn division_by_zero_a_subnormal_reciprocal_or_a_matrix_stays() {
    for c in [
        scalar("c", 0.0),
        scalar("c", 3e38),
        Tensor::from_f32("c", &[1, 4], &[2.0; 4]).unwrap(),
    ] {
        let mut m = graph(&["2", "3", "4"])
            .init(c)
            .node("Div", &["x", "c"], &["y"], vec![])
            .build();
        ShapeInference.run(&mut m).unwrap();
        assert!(Canonicalize.run(&mut m).unwrap().0.is_empty());
    }
}

#[test]
fn a_reciprocal_is_one_over_x() {
    let mut m = graph(&["2", "3", "4"])
        .node("Reciprocal", &["x"], &["y"], vec![])
        .build();
    assert_eq!(canonicalized(&mut m, 0.0), ["reciprocal"]);
    assert_eq!(ops(&m), ["Div"]);
    assert_eq!(written(&m).node[0].input[1], "x");
}

#[test]
fn squares_are_pow_2_and_square_roots_lose_their_pow() {
    let mut m = graph(&["2", "3", "4"])
        .node("Mul", &["x", "x"], &["y"], vec![])
        .build();
    assert_eq!(canonicalized(&mut m, 0.0), ["square"]);
    let g = written(&m);
    assert_eq!(
        (g.node[0].op_type(), g.node[0].input[0].as_str()),
        ("Pow", "x")
    );
    let mut m = graph(&["2", "3", "4"])
        .init(scalar("half", 0.5))
        .node("Abs", &["x"], &["a"], vec![])
        .node("Pow", &["a", "half"], &["y"], vec![])
        .build();
    assert_eq!(canonicalized(&mut m, f32::EPSILON), ["sqrt"]);
    assert_eq!(ops(&m), ["Abs", "Sqrt"]);
    // A product of two values, a cube, and a one-element exponent that would raise a
    // scalar's rank, stay.
    let mut m = graph(&["2", "3", "4"])
        .node("Neg", &["x"], &["n"], vec![])
        .node("Mul", &["x", "n"], &["y"], vec![])
        .build();
    assert!(canonicalized(&mut m, 0.0).is_empty());
    let mut m = graph(&["2", "3", "4"])
        .init(scalar("three", 3.0))
        .node("Pow", &["x", "three"], &["y"], vec![])
        .build();
    assert!(canonicalized(&mut m, 0.0).is_empty());
    let mut m = builder()
        .input("x", DataType::Float, &[])
        .output("y", DataType::Float, &["1"])
        .init(Tensor::from_f32("half", &[1], &[0.5]).unwrap())
        .node("Pow", &["x", "half"], &["y"], vec![])
        .build();
    ShapeInference.run(&mut m).unwrap();
    assert!(Canonicalize.run(&mut m).unwrap().0.is_empty());
}

#[test]
fn zero_minus_x_is_a_negation() {
    let mut m = graph(&["2", "3", "4"])
        .init(scalar("zero", 0.0))
        .node("Sub", &["zero", "x"], &["y"], vec![])
        .build();
    assert_eq!(canonicalized(&mut m, 0.0), ["neg"]);
    assert_eq!(ops(&m), ["Neg"]);
    let mut m = graph(&["2", "3", "4"])
        .init(scalar("zero", 0.0))
        .node("Sub", &["x", "zero"], &["y"], vec![])
        .build();
    assert!(
        canonicalized(&mut m, 0.0).is_empty(),
        "x - 0 is not a negation"
    );
}

#[test]
fn global_average_pool_of_a_sequence_is_a_mean_over_the_last_axis() {
    for opset in [13, 18] {
        let mut m = graph(&["2", "3", "1"])
            .opset(opset)
            .node("GlobalAveragePool", &["x"], &["y"], vec![])
            .build();
        assert_eq!(canonicalized(&mut m, 1e-6), ["mean-last-axis"]);
        let g = written(&m);
        assert_eq!(g.node[0].op_type(), "ReduceMean");
        assert_eq!(g.node[0].input.len(), if opset >= 18 { 2 } else { 1 });
    }
    // Over an image it pools two axes: not the last axis alone.
    let mut m = builder()
        .input("x", DataType::Float, &["1", "2", "3", "4"])
        .output("y", DataType::Float, &["1", "2", "1", "1"])
        .node("GlobalAveragePool", &["x"], &["y"], vec![])
        .build();
    ShapeInference.run(&mut m).unwrap();
    assert!(Canonicalize.run(&mut m).unwrap().0.is_empty());
}

fn einsum(equation: &str, w_dims: &[i64], out_dims: &[&str]) -> Model {
    let n: i64 = w_dims.iter().product();
    let values: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) / 8.0).collect();
    graph(out_dims)
        .init(Tensor::from_f32("w", w_dims, &values).unwrap())
        .node(
            "Einsum",
            &["x", "w"],
            &["y"],
            vec![attr::string("equation", equation)],
        )
        .build()
}

#[test]
fn projections_written_as_einsum_become_matmuls() {
    // (equation, weight dims, output dims, operators written)
    type Case<'a> = (&'a str, &'a [i64], &'a [&'a str], &'a [&'a str]);
    let cases: &[Case] = &[
        ("bsi,io->bso", &[4, 5], &["2", "3", "5"], &["MatMul"]),
        ("...i,io->...o", &[4, 5], &["2", "3", "5"], &["MatMul"]),
        (
            "bsi,oi->bso",
            &[5, 4],
            &["2", "3", "5"],
            &["Transpose", "MatMul"],
        ),
        (
            "bsh,hnd->bsnd",
            &[4, 2, 3],
            &["2", "3", "2", "3"],
            &["Reshape", "MatMul", "Reshape"],
        ),
        (
            "bnd,ndh->bh",
            &[3, 4, 5],
            &["2", "5"],
            &["Reshape", "Reshape", "MatMul"],
        ),
    ];
    // tract 0.23 runs `...i,io->...o` wrong (half the output): that one is checked against
    // the same projection written without the ellipsis.
    let plain = einsum("bsi,io->bso", &[4, 5], &["2", "3", "5"]);
    for (equation, w, out, expected) in cases {
        let mut m = einsum(equation, w, out);
        let reference = if equation.contains("...") {
            plain.clone()
        } else {
            m.clone()
        };
        let kinds = canonicalized_against(&mut m, &reference, 1e-6);
        assert_eq!(kinds, ["einsum-matmul"], "{equation}");
        assert_eq!(ops(&m), *expected, "{equation}");
    }
}

#[test]
fn an_einsum_that_is_no_projection_stays() {
    for (equation, w, out) in [
        ("bsi,bi->bs", &[2, 4][..], &["2", "3"][..]),
        ("bsi,io->sbo", &[4, 5], &["3", "2", "5"]),
    ] {
        let mut m = einsum(equation, w, out);
        ShapeInference.run(&mut m).unwrap();
        assert!(Canonicalize.run(&mut m).unwrap().0.is_empty(), "{equation}");
    }
}

/// `x` `[2, 3, 4]` seen as scores `s` `[4, 3, 2]` (two batches of K = 2 windows), split to
/// `[2, 2, 3, 2]`, plus a constant bias of `bias_dims`, merged back to `merged` and returned
/// as `[2, 3, 4]`.
fn window_scores(bias_dims: &[i64], merged: &[i64]) -> Model {
    let ints = |name: &str, v: &[i64]| Tensor::from_i64(name, &[v.len() as i64], v).unwrap();
    let count: i64 = bias_dims.iter().product();
    let bias: Vec<f32> = (0..count).map(|i| i as f32 * 10.0 - 3.0).collect();
    let merged_dims: Vec<String> = merged.iter().map(i64::to_string).collect();
    let merged_dims: Vec<&str> = merged_dims.iter().map(String::as_str).collect();
    graph(&["2", "3", "4"])
        .constant("s_shape", ints("s_shape", &[4, 3, 2]))
        .constant("split_shape", ints("split_shape", &[2, 2, 3, 2]))
        .constant("merged_shape", ints("merged_shape", merged))
        .constant("x_shape", ints("x_shape", &[2, 3, 4]))
        .constant("bias", Tensor::from_f32("bias", bias_dims, &bias).unwrap())
        .node("Reshape", &["x", "s_shape"], &["s"], vec![])
        .node("Reshape", &["s", "split_shape"], &["split"], vec![])
        .node("Add", &["split", "bias"], &["sum"], vec![])
        .typed("merged", DataType::Float, &merged_dims)
        .node("Reshape", &["sum", "merged_shape"], &["merged"], vec![])
        .node("Reshape", &["merged", "x_shape"], &["y"], vec![])
        .build()
}

#[test]
fn a_bias_added_to_split_windows_is_added_to_the_scores_tiled() {
    // One bias row per window (tiled over the batches), or one for all.
    for bias in [&[1, 2, 1, 2][..], &[1, 2, 3, 2], &[1, 1, 3, 2]] {
        let mut m = window_scores(bias, &[4, 3, 2]);
        assert_eq!(canonicalized(&mut m, 0.0), ["window-bias"], "{bias:?}");
        // The split and the merge are gone; the bias loses its leading 1.
        let reshapes = ops(&m).iter().filter(|op| *op == "Reshape").count();
        assert_eq!(reshapes, 3, "{:?}", ops(&m));
    }
    // A bias that grows the split (a batch of its own), or scores merged into another shape.
    for (bias, merged) in [
        (&[2, 2, 3, 2][..], &[4, 3, 2][..]),
        (&[1, 2, 3, 2], &[3, 4, 2]),
    ] {
        let mut m = window_scores(bias, merged);
        assert!(canonicalized(&mut m, 0.0).is_empty(), "{bias:?} {merged:?}");
    }
}

/// x `[2, 3, 4]`, its axis 1 moved first (`[3, 2, 4]`), one index picked by GatherND and the
/// axes moved back: `[2, 1, 4]`, as dynamo writes Falcon's `fused_qkv[:, -2]`.
fn picked(index: i64, moved: bool) -> Model {
    let indices = Tensor::from_i64("i", &[1, 1], &[index]).unwrap();
    let swap = || vec![attr::ints("perm", &[1, 0, 2])];
    let b = graph(&["2", "1", "4"]).opset(18).init(indices);
    let b = b.node("Transpose", &["x"], &["t"], swap());
    // An Identity between: no Transpose feeds the pick.
    let b = match moved {
        true => b.node("GatherND", &["t", "i"], &["g"], vec![]),
        false => {
            b.node("Identity", &["t"], &["u"], vec![])
                .node("GatherND", &["u", "i"], &["g"], vec![])
        }
    };
    b.node("Transpose", &["g"], &["y"], swap()).build()
}

/// Checked against the same pick by a non-negative index: tract's own GatherND slices a
/// negative one wrongly (`end <= len` fails at `-2`), which is how the dynamo export of
/// Falcon validates in ONNX Runtime only.
#[test]
fn one_index_picked_by_gather_nd_is_a_slice_before_the_transpose() {
    for index in [0i64, 1, -2, -1] {
        let reference = picked(index.rem_euclid(3), true);
        let mut m = picked(index, true);
        let kinds = canonicalized_against(&mut m, &reference, 0.0);
        assert_eq!(kinds, ["index-slice"], "{index}");
        // The first Transpose, read by nothing now, is dead code's to remove.
        assert_eq!(
            ops(&m),
            ["Transpose", "Slice", "Transpose", "Transpose"],
            "{index}"
        );
        let g = &m.graph;
        let (_, slice) = g.nodes().find(|(_, n)| n.is("Slice")).unwrap();
        assert_eq!(
            slice.input(0),
            g.find_value("x"),
            "{index}: x sliced on its axis 1"
        );
        // Without a Transpose feeding it, the pick slices axis 0 where it is.
        let mut m = picked(index, false);
        let kinds = canonicalized_against(&mut m, &reference, 0.0);
        assert_eq!(kinds, ["index-slice"], "{index}");
        assert_eq!(
            ops(&m),
            ["Transpose", "Identity", "Slice", "Transpose"],
            "{index}"
        );
    }
}

/// onnxscript's `torch.split(x, 2, -1)` and the `getitem` of each piece.
#[test]
fn a_sequence_whose_pieces_are_picked_by_position_is_a_split() {
    let i64s = |name: &str, v: &[i64], dims: &[i64]| Tensor::from_i64(name, dims, v).unwrap();
    let mut m = graph(&["2", "3", "2"])
        .init(i64s("size", &[2], &[]))
        .init(i64s("one", &[1], &[]))
        .init(i64s("minus_two", &[-2], &[]))
        .node(
            "SplitToSequence",
            &["x", "size"],
            &["pieces"],
            vec![attr::int("axis", -1)],
        )
        .node("SequenceAt", &["pieces", "one"], &["high"], vec![])
        .node("SequenceAt", &["pieces", "minus_two"], &["low"], vec![])
        .node("Sub", &["high", "low"], &["y"], vec![])
        .build();
    let slice = |b: Builder, out: &str, start: i64| {
        let (s, e) = (format!("{out}_start"), format!("{out}_end"));
        b.init(i64s(&s, &[start], &[1]))
            .init(i64s(&e, &[start + 2], &[1]))
            .node("Slice", &["x", &s, &e, "axis"], &[out], vec![])
    };
    let reference = slice(
        slice(
            graph(&["2", "3", "2"]).init(i64s("axis", &[2], &[1])),
            "high",
            2,
        ),
        "low",
        0,
    )
    .node("Sub", &["high", "low"], &["y"], vec![])
    .build();
    assert_eq!(
        canonicalized_against(&mut m, &reference, 0.0),
        ["sequence-split"]
    );
    assert_eq!(ops(&m), ["Split", "Sub"]);
    // A piece past the sequence's end stays a pick (and the sequence stays).
    let mut m = graph(&["2", "3", "2"])
        .init(i64s("size", &[2], &[]))
        .init(i64s("two", &[2], &[]))
        .node(
            "SplitToSequence",
            &["x", "size"],
            &["pieces"],
            vec![attr::int("axis", 2)],
        )
        .node("SequenceAt", &["pieces", "two"], &["y"], vec![])
        .build();
    ShapeInference.run(&mut m).unwrap();
    assert!(Canonicalize.run(&mut m).unwrap().0.is_empty());
}
