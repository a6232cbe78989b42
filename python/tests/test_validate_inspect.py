"""validate, inspect and dump: the command line's results, as values."""

import json

import onnx

import onnxopt
from conftest import BERT, CALIB, TESTDATA, load_batches


def test_validate_gives_the_cli_table(tmp_path, cli):
    optimized = tmp_path / "opt.onnx"
    onnxopt.optimize(BERT, optimized)
    cli_report = tmp_path / "report.json"
    process = cli("validate", BERT, optimized, "--inputs", CALIB, "--report", cli_report)
    assert process.returncode == 0, process.stderr
    expected = json.loads(cli_report.read_text())

    report = onnxopt.validate(BERT, optimized, CALIB)
    assert report.to_dict() == expected
    assert report.passed
    # The same batches as numpy arrays, and the models as bytes and a ModelProto.
    from_arrays = onnxopt.validate(
        onnx.load(str(BERT)), optimized.read_bytes(), load_batches(CALIB)
    )
    assert from_arrays.validation.outputs == report.validation.outputs
    assert report.validation.outputs[0].cosine > 0.9999


def test_validate_scores_perplexity_as_the_cli_does(tmp_path, cli):
    llama = TESTDATA / "llm" / "llama3.prefill.dynamo20.onnx"
    tokens = TESTDATA / "llm" / "calib" / "prefill"
    quantized = tmp_path / "int8w.onnx"
    onnxopt.optimize(llama, quantized, weights="int8", weights_method="rtn", check=False)
    cli_report = tmp_path / "report.json"
    # 8-bit weights are lossy: the default limits are those of a lossless rewrite.
    args = ["--inputs", tokens, "--min-cosine", "0.99", "--perplexity", "--report", cli_report]
    assert cli("validate", llama, quantized, *args).returncode == 0
    report = onnxopt.validate(llama, quantized, tokens, min_cosine=0.99, perplexity=True)
    assert report.to_dict() == json.loads(cli_report.read_text())
    assert report.to_dict()["validation"]["perplexity"]["tokens"] == 29


def test_validate_generates_inputs_as_the_cli_does(tmp_path, cli):
    optimized = tmp_path / "opt.onnx"
    onnxopt.optimize(BERT, optimized)
    cli_report = tmp_path / "report.json"
    args = ["--batches", "3", "--dim", "sequence=8", "--seed", "5", "--report", cli_report]
    assert cli("validate", BERT, optimized, *args).returncode == 0
    report = onnxopt.validate(BERT, optimized, batches=3, dims={"sequence": 8}, seed=5)
    assert report.to_dict() == json.loads(cli_report.read_text())


def test_inspect_is_the_cli_json(cli):
    process = cli("inspect", BERT, "--json")
    assert process.returncode == 0
    assert onnxopt.inspect(BERT) == json.loads(process.stdout)
    from_bytes = onnxopt.inspect(BERT.read_bytes())
    assert from_bytes["op_histogram"] == json.loads(process.stdout)["op_histogram"]


def test_dump_is_the_cli_text(cli):
    process = cli("dump", BERT)
    assert process.returncode == 0
    assert onnxopt.dump(BERT) == process.stdout
    assert onnxopt.dump(onnx.load(str(BERT))) == process.stdout
