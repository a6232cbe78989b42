//! Weight-only 4 and 8 bits end to end on `testdata/int4/chain.onnx` (a MatMul chain, one K
//! not a multiple of the block; `scripts/int4/make_chain.py`): both formats run in tract and
//! in ONNX Runtime and give the outputs of the float model holding the dequantized weights,
//! and GPTQ moves the outputs on the calibration batches less than round-to-nearest.

mod common;

use onnxopt::exec::{
    self, Batch, Engine, GenerateOptions, InputSource, Tolerance, ValidateOptions,
};
use onnxopt::io::{self, ExternalData};
use onnxopt::ir::{Model, Patch, Tensor};
use onnxopt::ops::nbits::{self, Bits, BlockQuantized, PackedCodes};
use onnxopt::ops::weights::transposed;
use onnxopt::passes::fuse::Target;
use onnxopt::quant::qdq::Selection;
use onnxopt::quant::weight_only::gptq::GptqOptions;
use onnxopt::quant::weight_only::{quantize_weights, WeightMethod, WeightOnlyOptions};

fn chain() -> Model {
    io::load(&common::testdata("int4/chain.onnx")).unwrap()
}

fn calib_dir() -> std::path::PathBuf {
    common::testdata("int4/calib")
}

fn batches(model: &Model) -> Vec<Batch> {
    exec::batches_for(
        model,
        &InputSource::Dir(calib_dir()),
        &GenerateOptions::default(),
    )
    .unwrap()
}

fn options(bits: Bits, target: Target, method: WeightMethod, symmetric: bool) -> WeightOnlyOptions {
    WeightOnlyOptions {
        bits,
        block_size: 32,
        symmetric,
        method,
        gptq: GptqOptions::default(),
        lm_head: false,
        // Float32 compute, so that ONNX Runtime's result is the dequantized weights' exactly.
        accuracy_level: 0,
        target,
        selection: Selection::default(),
        engine: Engine::Tract,
    }
}

fn quantized(bits: Bits, target: Target, method: WeightMethod, symmetric: bool) -> Model {
    let mut model = chain();
    let batches = batches(&model);
    let report = quantize_weights(
        &mut model,
        &batches,
        &options(bits, target, method, symmetric),
        &|_, _| {},
    )
    .unwrap();
    let int4 = report.weight_only.unwrap();
    assert_eq!(int4.weights.len(), 2, "{int4:?}");
    model
}

/// The float model `original` (the chain unless given) with each weight replaced by what the
/// quantized model's 4- or 8-bit initializers stand for, read back by our own unpacking; a
/// weight computed from a table (`Transpose(table)`) becomes an initializer, and an embedding
/// Gather that the quantized model made GatherBlockQuantized on its LM head's codes reads that
/// weight's transpose.
fn dequantized_reference(quantized: &Model) -> Model {
    dequantized_from(chain(), quantized)
}

fn dequantized_from(original: Model, quantized: &Model) -> Model {
    let mut reference = original;
    let q = &quantized.graph;
    for (_, node) in q.nodes() {
        let constant = |slot: usize| node.input(slot).and_then(|v| q.initializer(v));
        let bytes = |slot: usize| constant(slot).map(|t| t.raw_bytes().unwrap().into_owned());
        let scales = |slot: usize| constant(slot).map(|t| t.to_f32_vec().unwrap());
        let (weight_name, dims, values) = if node.op_type() == "MatMulNBits" {
            let int = |n: &str| onnxopt::ir::attr::get_int(&node.proto, n).unwrap() as usize;
            let shape = (int("K"), int("N"), int("block_size"));
            let b = BlockQuantized::from_matmul_nbits(
                Bits::from_count(int("bits")).unwrap(),
                shape,
                &bytes(1).unwrap(),
                &scales(2).unwrap(),
                bytes(3).as_deref(),
            )
            .unwrap();
            let reader = reference
                .graph
                .nodes()
                .find(|(_, n)| n.name() == node.name())
                .map(|(_, n)| n.input(1).unwrap())
                .unwrap();
            (
                reference.graph.value_name(reader).to_string(),
                vec![shape.0 as i64, shape.1 as i64],
                b.dequantize(),
            )
        } else if node.is("DequantizeLinear") {
            let x = constant(0).unwrap();
            let shape = x.dims().to_vec();
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            use onnxopt::ir::DataType;
            let (bits, signed) = match x.dtype() {
                DataType::Int4 => (Bits::Four, true),
                DataType::Uint4 => (Bits::Four, false),
                DataType::Int8 => (Bits::Eight, true),
                DataType::Uint8 => (Bits::Eight, false),
                other => panic!("codes of type {other:?}"),
            };
            let block = onnxopt::ir::attr::get_int(&node.proto, "block_size").unwrap() as usize;
            let codes = bytes(0).unwrap();
            let x = PackedCodes {
                bytes: &codes,
                bits,
                signed,
            };
            let values = nbits::dequantize_linear(
                x,
                &dims,
                0,
                block,
                &scales(1).unwrap(),
                bytes(2).as_deref(),
            )
            .unwrap();
            let name = q.value_name(node.input(0).unwrap());
            let suffix = format!(".q{}", bits.count());
            (name.trim_end_matches(&suffix).to_string(), shape, values)
        } else {
            continue;
        };
        let g = &reference.graph;
        let v = g.find_value(&weight_name).unwrap();
        let tensor = Tensor::from_f32(&weight_name, &dims, &values).unwrap();
        let mut patch = Patch::new("test-dequantized");
        // The embedding's Gathers on the same codes (through a Reshape) read the table.
        let codes = node.input(1);
        let gathers: Vec<String> = q
            .nodes()
            .filter(|(_, n)| n.op_type() == "GatherBlockQuantized")
            .filter(|(_, n)| {
                let data = n.input(0).and_then(|d| q.producer(d)).map(|p| q.node(p));
                data.is_some_and(|p| p.input(0) == codes)
            })
            .map(|(_, n)| q.value_name(n.output(0).unwrap()).to_string())
            .collect();
        if !gathers.is_empty() {
            let (k, n) = (dims[0] as usize, dims[1] as usize);
            let table = transposed(&values, k, n);
            let table_name = format!("{weight_name}.table");
            let table = Tensor::from_f32(&table_name, &[n as i64, k as i64], &table).unwrap();
            let table = patch.new_initializer(&table_name, table);
            for (id, gather) in g.nodes() {
                let out = gather.output(0).map(|o| g.value_name(o).to_string());
                if gather.is("Gather") && out.is_some_and(|o| gathers.contains(&o)) {
                    patch.replace_input(id, 0, table);
                }
            }
        }
        let other_readers = g.uses(v).iter().any(|&(r, _)| !g.node(r).is("MatMul"));
        match (g.initializer(v), g.producer(v)) {
            (Some(_), _) if !other_readers => patch.replace_initializer(v, tensor),
            // A weight something else reads too (a tied embedding's Gather): only the
            // MatMuls read the dequantized copy.
            (Some(_), _) => {
                let copy = patch.new_initializer(&weight_name, tensor);
                for &(reader, _) in g.uses(v).iter().filter(|&&(r, _)| g.node(r).is("MatMul")) {
                    patch.replace_input(reader, 1, copy);
                }
                &mut patch
            }
            (None, Some(transpose)) => patch
                .remove_node(transpose)
                .replace_with_initializer(v, tensor),
            (None, None) => panic!("{} is neither a constant nor computed", weight_name),
        };
        reference.graph.apply(patch).unwrap();
    }
    reference
}

fn compare(
    reference: &Model,
    model: &Model,
    engine: Engine,
    tolerance: Tolerance,
) -> exec::Validation {
    compare_on(reference, model, engine, tolerance, calib_dir())
}

fn compare_on(
    reference: &Model,
    model: &Model,
    engine: Engine,
    tolerance: Tolerance,
    inputs: std::path::PathBuf,
) -> exec::Validation {
    let options = ValidateOptions {
        inputs: InputSource::Dir(inputs),
        tolerance,
        engine,
        ..Default::default()
    };
    exec::validate(reference, model, &options, &|_, _| {}).unwrap()
}

fn exact() -> Tolerance {
    Tolerance {
        max_abs: Some(1e-4),
        ..Default::default()
    }
}

#[test]
fn both_formats_give_the_dequantized_weights_outputs_in_tract_and_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let mut checks = common::OrtChecks::default();
    let settings = [Target::Ort, Target::Onnx]
        .into_iter()
        .flat_map(|t| [(t, false), (t, true)])
        .flat_map(|s| [(s, Bits::Four), (s, Bits::Eight)]);
    for ((target, symmetric), bits) in settings {
        let what = format!("{target:?} {bits:?} symmetric {symmetric}");
        let model = quantized(bits, target, WeightMethod::Gptq, symmetric);
        let ops: Vec<&str> = model.graph.nodes().map(|(_, n)| n.op_type()).collect();
        match target {
            Target::Ort => assert_eq!(ops.iter().filter(|&&o| o == "MatMulNBits").count(), 2),
            Target::Onnx => {
                assert_eq!(ops.iter().filter(|&&o| o == "DequantizeLinear").count(), 2);
                assert_eq!(model.opset(""), Some(21));
            }
        }
        let reference = dequantized_reference(&model);
        let v = compare(&reference, &model, Engine::Tract, exact());
        assert!(v.passed(), "{what}: {:?}", v.violations);
        if common::ort_engine_available() {
            let v = compare(&reference, &model, Engine::Ort, exact());
            assert!(v.passed(), "{what} in ONNX Runtime: {:?}", v.violations);
        }
        let stem = format!("{}.{}.{symmetric}", target.name(), bits.count());
        let (r, m) = (
            dir.path().join(format!("reference.{stem}.onnx")),
            dir.path().join(format!("int4.{stem}.onnx")),
        );
        io::save(&reference, &r, ExternalData::Auto).unwrap();
        io::save(&model, &m, ExternalData::Auto).unwrap();
        match target {
            Target::Ort => checks.add_exact(&r, &m, &calib_dir()),
            // ONNX Runtime's default session fuses DequantizeLinear(int4) → MatMul into
            // its MatMulNBits at accuracy level 4 (int8 activations): 3.6e-2 apart on y, cosine 0.99988
            // (the engine's session, without that fusion, matched within 1e-4 above).
            // The same bound holds for the 8-bit codes.
            Target::Onnx => checks.add("0.999", &r, &m, &calib_dir()),
        }
    }
    checks.run();
}

#[test]
fn gptq_moves_the_calibration_outputs_less_than_round_to_nearest() {
    let float = chain();
    let rtn = quantized(Bits::Four, Target::Ort, WeightMethod::Rtn, false);
    let mut gptq = chain();
    let report = quantize_weights(
        &mut gptq,
        &batches(&float),
        &options(Bits::Four, Target::Ort, WeightMethod::Gptq, false),
        &|_, _| {},
    )
    .unwrap()
    .weight_only
    .unwrap();
    // Each weight's own output error, measured by the quantizer on the calibration rows.
    for w in &report.weights {
        let (rtn_error, error) = (w.rtn_error.unwrap(), w.error.unwrap());
        assert_eq!(w.kept, WeightMethod::Gptq, "{w:?}");
        assert!(error < rtn_error, "{w:?}");
    }
    // The model's output, through both layers, on the same batches.
    let loose = Tolerance::default();
    let distance = |m: &Model| {
        let v = compare(&float, m, Engine::Tract, loose.clone());
        1.0 - v.outputs[0].cosine
    };
    let (d_rtn, d_gptq) = (distance(&rtn), distance(&gptq));
    println!("1 - cosine to float: round-to-nearest {d_rtn:.3e}, GPTQ {d_gptq:.3e}");
    assert!(d_gptq < d_rtn, "GPTQ {d_gptq} vs round-to-nearest {d_rtn}");
}

/// testdata/llm's Llama with its tie as ONNX Runtime GenAI's model builder writes it: the LM
/// head's MatMul reads the `[K, N]` weight itself and the embedding's Gather reads
/// `Transpose(weight)` (the dynamo export's Transpose moved to the Gather's side, the table
/// transposed to match).
fn llama_tied_as_the_model_builder_does() -> Model {
    let mut proto = io::load(&common::testdata("llm/llama3.prefill.dynamo20.onnx"))
        .unwrap()
        .to_proto()
        .unwrap();
    let g = proto.graph.as_mut().unwrap();
    let table = g
        .initializer
        .iter_mut()
        .find(|t| t.name() == "m.lm_head.weight")
        .unwrap();
    let t = Tensor::from_proto(table.clone()).unwrap();
    let (n, k) = (t.dims()[0] as usize, t.dims()[1] as usize);
    let values = t.to_f32_vec().unwrap();
    let weight = transposed(&values, n, k);
    *table = Tensor::from_f32("m.lm_head.weight", &[k as i64, n as i64], &weight)
        .unwrap()
        .into_proto();
    let transpose = g
        .node
        .iter()
        .position(|node| node.op_type() == "Transpose" && node.input == ["m.lm_head.weight"])
        .unwrap();
    let moved = g.node[transpose].output[0].clone();
    for node in g.node.iter_mut() {
        let gather = node.op_type() == "Gather";
        for input in node.input.iter_mut() {
            if gather && *input == "m.lm_head.weight" {
                *input = moved.clone();
            } else if *input == moved {
                *input = "m.lm_head.weight".into();
            }
        }
    }
    // The Transpose now feeds the Gather: it goes before it.
    let node = g.node.remove(transpose);
    g.node.insert(0, node);
    Model::from_proto(proto).unwrap()
}

/// testdata/llm's Llama (torch dynamo) ties its LM head to the embeddings: the LM head's
/// MatMul reads `Transpose(table)` of the table the Gather reads; the model builder's tie is
/// the other way round (`llama_tied_as_the_model_builder_does`). The head stays float unless
/// `lm_head` asks; then the MatMul gets the codes of `tableᵀ`, and the Gather, for ONNX
/// Runtime, GatherBlockQuantized of the same codes (the float table gone: the tied weights
/// stored once), for the standard form the float table; the outputs are those of the float
/// model with every weight (and the embedding read from the codes) dequantized.
#[test]
fn a_tied_lm_head_is_quantized_when_asked_and_the_embedding_shares_its_codes() {
    let dynamo = || io::load(&common::testdata("llm/llama3.prefill.dynamo20.onnx")).unwrap();
    let tokens = common::testdata("llm/calib/prefill");
    let table = "m.lm_head.weight";
    for (lm_head, target, builder_tie) in [
        (false, Target::Ort, false),
        (true, Target::Ort, false),
        (true, Target::Onnx, false),
        (false, Target::Ort, true),
        (true, Target::Ort, true),
        (true, Target::Onnx, true),
    ] {
        let what = format!("lm_head {lm_head}, {target:?}, model builder's tie {builder_tie}");
        let llama = || match builder_tie {
            true => llama_tied_as_the_model_builder_does(),
            false => dynamo(),
        };
        let mut model = llama();
        let options = WeightOnlyOptions {
            lm_head,
            ..options(Bits::Four, target, WeightMethod::Rtn, false)
        };
        let report = quantize_weights(&mut model, &[], &options, &|_, _| {})
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let int4 = report.weight_only.unwrap();
        assert_eq!(int4.weights.len(), 14 + usize::from(lm_head), "{what}");
        assert_eq!(
            int4.skipped.len(),
            usize::from(!lm_head),
            "{what}: {:?}",
            int4.skipped
        );
        let g = &model.graph;
        let gathered = g
            .nodes()
            .filter(|(_, n)| n.op_type() == "GatherBlockQuantized")
            .count();
        // For ONNX Runtime the embedding gathers the head's codes and the float table goes;
        // the standard form keeps it for the Gather.
        let codes_gathered = lm_head && target == Target::Ort;
        assert_eq!(gathered, usize::from(codes_gathered), "{what}");
        let t = g.find_value(table);
        assert_eq!(
            t.and_then(|t| g.initializer(t)).is_some(),
            !codes_gathered,
            "{what}"
        );
        let mut readers: Vec<&str> = t
            .map(|t| {
                g.uses(t)
                    .iter()
                    .map(|&(r, _)| g.node(r).op_type())
                    .collect()
            })
            .unwrap_or_default();
        readers.sort();
        let expected: &[&str] = match (builder_tie, lm_head) {
            _ if codes_gathered => &[],
            (false, true) => &["Gather"],
            (false, false) => &["Gather", "Transpose"],
            (true, true) => &["Transpose"],
            (true, false) => &["MatMul", "Transpose"],
        };
        assert_eq!(readers, expected, "{what}");
        let reference = dequantized_from(llama(), &model);
        if lm_head {
            // The codes stand for the `[K, N]` weight (tableᵀ in the dynamo tie): each
            // weight within half a step of its own, a step being at most the table's range
            // over 15.
            let float = llama();
            let t = float
                .graph
                .initializer(float.graph.find_value(table).unwrap())
                .unwrap();
            let (rows, cols) = (t.dims()[0] as usize, t.dims()[1] as usize);
            let values = t.to_f32_vec().unwrap();
            let (k, n, t) = match builder_tie {
                true => (rows, cols, values),
                false => (cols, rows, transposed(&values, rows, cols)),
            };
            let r = &reference.graph;
            let head = r
                .nodes()
                .find(|(_, node)| node.output(0).is_some_and(|o| r.value_name(o) == "logits"))
                .and_then(|(_, node)| r.initializer(node.input(1)?))
                .unwrap()
                .to_f32_vec()
                .unwrap();
            let range = t.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
            assert_eq!(head.len(), k * n, "{what}");
            for (i, w) in head.iter().enumerate() {
                let (row, col) = (i / n, i % n);
                let err = (w - t[i]).abs();
                assert!(
                    err <= range / 15.0 / 2.0 + 1e-6,
                    "{what}: [{row}, {col}] {err}"
                );
            }
        }
        let v = compare_on(&reference, &model, Engine::Tract, exact(), tokens.clone());
        assert!(v.passed(), "{what}: {:?}", v.violations);
        if common::ort_engine_available() {
            let v = compare_on(&reference, &model, Engine::Ort, exact(), tokens.clone());
            assert!(v.passed(), "{what} in ONNX Runtime: {:?}", v.violations);
        }
    }
}

/// The embedding gathers its head's codes only where every ONNX Runtime release reads them
/// alike: with zero points, an even block count per row (1.23 to 1.26 packed zero points
/// across rows, 1.27 on pads each row). testdata's Llama is 64 wide: one block of 64 keeps
/// the float table unless the blocks are symmetric (no zero points).
#[test]
fn an_odd_block_count_keeps_the_float_embedding_unless_symmetric() {
    for symmetric in [false, true] {
        let mut model = io::load(&common::testdata("llm/llama3.prefill.dynamo20.onnx")).unwrap();
        let options = WeightOnlyOptions {
            lm_head: true,
            block_size: 64,
            ..options(Bits::Four, Target::Ort, WeightMethod::Rtn, symmetric)
        };
        quantize_weights(&mut model, &[], &options, &|_, _| {}).unwrap();
        let g = &model.graph;
        let ops: Vec<&str> = g.nodes().map(|(_, n)| n.op_type()).collect();
        assert_eq!(
            ops.contains(&"GatherBlockQuantized"),
            symmetric,
            "symmetric {symmetric}"
        );
        assert_eq!(ops.contains(&"Gather"), !symmetric, "symmetric {symmetric}");
    }
}

/// A float16 model's MatMul weights (a `--fp16` output; the hubs ship `model_fp16.onnx`)
/// are quantized too, their scales kept in float16 for DequantizeLinear; for ONNX Runtime
/// the MatMulNBits products run in float32 between Casts (its float16 kernel gave wrong
/// products inside an unoptimized session: MiniLM, cosine 0.44). The model's outputs stay
/// float16 and close to the float16 model's in both engines.
#[test]
fn a_float16_models_weights_are_quantized_with_its_outputs_kept_float16() {
    use onnxopt::ir::DataType;
    let mut float16 = chain();
    onnxopt::quant::fp16::convert_fp16(&mut float16, &Default::default()).unwrap();
    let calibration = batches(&float16);
    for target in [Target::Ort, Target::Onnx] {
        let mut model = float16.clone();
        let options = options(Bits::Eight, target, WeightMethod::Rtn, false);
        let report = quantize_weights(&mut model, &calibration, &options, &|_, _| {}).unwrap();
        assert_eq!(report.weight_only.unwrap().weights.len(), 2, "{target:?}");
        let g = &model.graph;
        let scales: Vec<DataType> = g
            .nodes()
            .filter_map(|(_, n)| match n.op_type() {
                "MatMulNBits" => n.input(2),
                "DequantizeLinear" => n.input(1),
                _ => None,
            })
            .map(|scale| g.initializer(scale))
            .map(|t| t.unwrap().dtype())
            .collect();
        let casts = g.nodes().filter(|(_, n)| n.is("Cast")).count();
        match target {
            Target::Ort => {
                assert_eq!(scales, [DataType::Float; 2]);
                assert_eq!(casts, 4, "one Cast to float32 and one back per product");
            }
            Target::Onnx => {
                assert_eq!(scales, [DataType::Float16; 2]);
                assert_eq!(casts, 0);
            }
        }
        let output = g.outputs[0].value;
        assert_eq!(g.value_type(output).unwrap().elem, DataType::Float16 as i32);
        let close = Tolerance {
            min_cosine: Some(0.999),
            ..Default::default()
        };
        let mut engines = vec![Engine::Tract];
        if common::ort_engine_available() {
            engines.push(Engine::Ort);
        }
        for engine in engines {
            let v = compare(&float16, &model, engine, close.clone());
            assert!(v.passed(), "{target:?} in {engine:?}: {:?}", v.violations);
        }
    }
}
