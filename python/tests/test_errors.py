"""Every kind of failure raises its class, with the command line's one-line message."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxopt
from conftest import BERT, CALIB, cli_error
from test_optimize import random_batches


def custom_op_model(path):
    """A model with an operator of a custom domain: no engine here runs it."""
    node = helper.make_node("Foo", ["x"], ["y"], domain="my.ops", name="foo")
    graph = helper.make_graph(
        [node],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)],
    )
    onnx.save(model, str(path))
    return path


def test_the_hierarchy():
    for cls in (
        onnxopt.InvalidModelError,
        onnxopt.InvalidArgumentError,
        onnxopt.ValidationError,
        onnxopt.UnsupportedError,
    ):
        assert issubclass(cls, onnxopt.OnnxoptError)
    assert issubclass(onnxopt.InvalidModelError, ValueError)
    assert issubclass(onnxopt.InvalidArgumentError, ValueError)


def test_invalid_model(tmp_path, cli):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(BERT.read_bytes()[:1000])
    process = cli("optimize", truncated, tmp_path / "out.onnx")
    assert process.returncode == 1
    with pytest.raises(onnxopt.InvalidModelError) as error:
        onnxopt.optimize(truncated, tmp_path / "out.onnx")
    assert str(error.value) == cli_error(process)
    assert "not a valid ONNX protobuf" in str(error.value)
    assert not (tmp_path / "out.onnx").exists()

    for call in (onnxopt.inspect, onnxopt.dump):
        with pytest.raises(onnxopt.InvalidModelError):
            call(truncated)
    with pytest.raises(onnxopt.InvalidModelError, match="^cannot load the model bytes: "):
        onnxopt.optimize(truncated.read_bytes())

    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    process = cli("inspect", empty)
    with pytest.raises(onnxopt.InvalidModelError) as error:
        onnxopt.inspect(empty)
    assert str(error.value) == cli_error(process)


def test_missing_file(tmp_path, cli):
    missing = tmp_path / "missing.onnx"
    process = cli("optimize", missing, tmp_path / "out.onnx")
    with pytest.raises(onnxopt.OnnxoptError) as error:
        onnxopt.optimize(missing, tmp_path / "out.onnx")
    assert type(error.value) is onnxopt.OnnxoptError
    assert str(error.value) == cli_error(process)


def test_validation_failed(tmp_path, cli):
    batches = random_batches(5)
    out = tmp_path / "out.onnx"
    from conftest import write_batches

    folder = write_batches(tmp_path / "calib", batches)
    process = cli("optimize", BERT, out, "--int8", "--calib", folder, "--min-cosine", "0.9999999")
    assert process.returncode == 3
    with pytest.raises(onnxopt.ValidationError) as error:
        onnxopt.optimize(BERT, out, int8=True, calib=batches, min_cosine=0.9999999)
    assert str(error.value) == cli_error(process)
    assert str(error.value).startswith(f"`{out}` was not written: outputs differ")
    assert not out.exists()
    report = error.value.report
    assert report.validation.violations
    assert report.passed is False
    assert report.quantization.mode == "static-int8" or report.quantization is not None
    # Without an output path, the reason alone.
    with pytest.raises(onnxopt.ValidationError, match="^outputs differ beyond the tolerance"):
        onnxopt.optimize(BERT, int8=True, calib=batches, min_cosine=0.9999999)


def test_validate_out_of_tolerance(tmp_path, cli):
    quantized = tmp_path / "int8.onnx"
    onnxopt.optimize(BERT, quantized, int8=True, calib=CALIB)
    process = cli("validate", BERT, quantized, "--inputs", CALIB)
    assert process.returncode == 3
    with pytest.raises(onnxopt.ValidationError) as error:
        onnxopt.validate(BERT, quantized, CALIB)
    assert str(error.value) == cli_error(process)
    assert error.value.report.validation.violations


def test_unsupported(tmp_path, cli):
    model = custom_op_model(tmp_path / "custom.onnx")
    out = tmp_path / "out.onnx"
    process = cli("optimize", model, out, "--validate", "--engine", "tract")
    assert process.returncode == 3
    with pytest.raises(onnxopt.UnsupportedError) as error:
        onnxopt.optimize(model, out, validate=True, engine="tract")
    assert str(error.value) == cli_error(process)
    assert "operators of domain `my.ops` are not run by tract" in str(error.value)
    assert error.value.report is not None
    assert not out.exists()

    process = cli("validate", model, model, "--engine", "tract")
    assert process.returncode == 3
    with pytest.raises(onnxopt.UnsupportedError) as error:
        onnxopt.validate(model, model, engine="tract")
    assert str(error.value) == cli_error(process)


def test_invalid_arguments(tmp_path, cli):
    process = cli("optimize", BERT, tmp_path / "out.onnx", "--int8")
    with pytest.raises(onnxopt.InvalidArgumentError) as error:
        onnxopt.optimize(BERT, int8=True)
    assert str(error.value) == cli_error(process)

    process = cli("optimize", BERT, tmp_path / "out.onnx", "--prune", "5:4")
    with pytest.raises(onnxopt.InvalidArgumentError) as error:
        onnxopt.optimize(BERT, prune="5:4")
    assert str(error.value) == cli_error(process)

    with pytest.raises(onnxopt.InvalidArgumentError, match="exclude each other"):
        onnxopt.optimize(BERT, int8=True, fp16=True)
    with pytest.raises(onnxopt.InvalidArgumentError, match="needs int8=True"):
        onnxopt.optimize(BERT, int8_weights="int8")
    with pytest.raises(onnxopt.InvalidArgumentError, match="target="):
        onnxopt.optimize(BERT, target="tensorflow")
    with pytest.raises(onnxopt.InvalidArgumentError, match="not int"):
        onnxopt.optimize(42)
    with pytest.raises(onnxopt.InvalidArgumentError, match="is the input"):
        onnxopt.optimize(BERT, BERT)
    with pytest.raises(onnxopt.InvalidArgumentError, match="no array for input"):
        onnxopt.validate(BERT, BERT, [{"input_ids": np.zeros((1, 4), dtype=np.int64)}])
