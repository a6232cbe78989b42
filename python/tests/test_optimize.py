"""optimize: the same model from a path, bytes or a ModelProto, and the same bytes as the
command line's."""

import json

import numpy as np
import onnx
import pytest

import onnxopt
from conftest import BERT, CALIB, load_batches, write_batches


def random_batches(count, rows=4, length=16, seed=7):
    """Token batches for bert-tiny (1000 ids), the second half of each row padded."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        mask = np.ones((rows, length), dtype=np.int64)
        mask[1:, length // 2 :] = 0
        batches.append(
            {
                "input_ids": rng.integers(0, 1000, (rows, length), dtype=np.int64),
                "attention_mask": mask,
                "token_type_ids": np.zeros((rows, length), dtype=np.int64),
            }
        )
    return batches


def without_timings(value):
    """A report's JSON without what differs between two runs: seconds and paths."""
    if isinstance(value, dict):
        return {
            k: without_timings(v)
            for k, v in value.items()
            if k not in ("seconds", "input", "output")
        }
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def test_path_bytes_and_proto_give_the_cli_bytes(tmp_path, cli):
    expected = tmp_path / "cli.onnx"
    process = cli("optimize", BERT, expected)
    assert process.returncode == 0, process.stderr

    written = tmp_path / "py.onnx"
    report = onnxopt.optimize(BERT, written)
    assert report.model is None
    assert report.output.path == str(written)
    from_bytes = onnxopt.optimize(BERT.read_bytes()).model
    from_proto = onnxopt.optimize(onnx.load(str(BERT))).model
    from_str_path = onnxopt.optimize(str(BERT)).model

    cli_bytes = expected.read_bytes()
    assert written.read_bytes() == cli_bytes
    assert from_bytes == cli_bytes
    assert from_proto == cli_bytes
    assert from_str_path == cli_bytes


def test_as_proto_returns_a_model_proto():
    report = onnxopt.optimize(BERT, as_proto=True)
    assert isinstance(report.model, onnx.ModelProto)
    assert report.model.SerializeToString() == onnxopt.optimize(BERT).model
    onnx.checker.check_model(report.model)


def test_report_holds_the_cli_report(tmp_path, cli):
    cli_report = tmp_path / "report.json"
    out = tmp_path / "cli.onnx"
    process = cli("optimize", BERT, out, "--validate", "--inputs", CALIB, "--report", cli_report)
    assert process.returncode == 0, process.stderr
    expected = json.loads(cli_report.read_text())

    report = onnxopt.optimize(BERT, validate=True, inputs=CALIB)
    assert without_timings(report.to_dict()) == without_timings(expected)
    assert report.input.path == str(BERT)
    assert report.input.nodes == expected["input"]["nodes"]
    assert onnxopt.optimize(BERT.read_bytes()).input.path == "<bytes>"
    # Attributes, all the way down (a key that is a Python keyword reads as an item).
    assert report.target == "ort"
    assert report.passes.converged and report.passes.rounds == expected["passes"]["rounds"]
    passes = {p["pass"]: p for p in report.passes.passes}
    expected_passes = {p["pass"]: p for p in expected["passes"]["passes"]}
    assert passes["fuse-attention"].rewrites == expected_passes["fuse-attention"]["rewrites"]
    assert passes["fuse-attention"].rewrites == {"attention": 2}
    assert [o.name for o in report.validation.outputs] == ["last_hidden_state", "pooler_output"]
    assert report.validation.violations == []
    assert report.passed is True
    assert "validation on" in str(report)


def test_int8_with_numpy_batches_equals_the_cli_with_npy_files(tmp_path, cli):
    batches = random_batches(10)
    folder = write_batches(tmp_path / "calib", batches)
    cli_out = tmp_path / "cli.int8.onnx"
    cli_report = tmp_path / "report.json"
    process = cli("optimize", BERT, cli_out, "--int8", "--calib", folder, "--report", cli_report)
    assert process.returncode == 0, process.stderr

    report = onnxopt.optimize(BERT, int8=True, calib=batches)
    assert report.model == cli_out.read_bytes()
    expected = json.loads(cli_report.read_text())
    assert without_timings(report.to_dict()) == without_timings(expected)
    # As with a folder, the last fifth was held back for validation.
    assert report.quantization.calibration.batches == [f"batch_{i:02}" for i in range(8)]
    assert report.validation.batches == ["batch_08", "batch_09"]

    # Any iterable of dicts, and ONNX Runtime's reader convention, give the same model.
    assert onnxopt.optimize(BERT, int8=True, calib=iter(batches)).model == report.model

    class Reader:
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    assert onnxopt.optimize(BERT, int8=True, calib=Reader()).model == report.model
    # The folder itself, too.
    assert onnxopt.optimize(BERT, int8=True, calib=folder).model == report.model


def test_onnxruntime_calibration_data_reader_plugs_in():
    quantization = pytest.importorskip("onnxruntime.quantization")
    batches = random_batches(5)

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    from_reader = onnxopt.optimize(BERT, int8=True, calib=Reader())
    assert from_reader.model == onnxopt.optimize(BERT, int8=True, calib=batches).model


def test_int8_dynamic_and_fp16_equal_the_cli(tmp_path, cli):
    for flags, options in [
        (["--int8-dynamic"], {"int8_dynamic": True}),
        (["--int8-dynamic", "--no-smooth-quant"], {"int8_dynamic": True, "smooth_quant": False}),
        (["--int8", "--calib-random", "2"], {"int8": True, "calib_random": 2}),
        (
            ["--int8", "--calib-random", "2", "--no-smooth-quant"],
            {"int8": True, "calib_random": 2, "smooth_quant": False},
        ),
        (
            ["--int8", "--calib-random", "2", "--int8-weights", "uint8"],
            {"int8": True, "calib_random": 2, "int8_weights": "uint8"},
        ),
        # The option's former name, from when it was dynamic INT8's only.
        (
            ["--int8-dynamic", "--dynamic-weights", "int8"],
            {"int8_dynamic": True, "dynamic_weights": "int8"},
        ),
        (["--fp16", "--keep-io-types"], {"fp16": True, "keep_io_types": True}),
        (["--target", "onnx", "--prune", "2:4"], {"target": "onnx", "prune": "2:4"}),
        (
            ["--weights", "int8", "--weights-method", "rtn"],
            {"weights": "int8", "weights_method": "rtn"},
        ),
        (
            ["--target", "onnx", "--int4", "--block-size", "16", "--symmetric"]
            + ["--calib-random", "2"],
            {"target": "onnx", "weights": "int4", "block_size": 16, "symmetric": True}
            | {"calib_random": 2},
        ),
    ]:
        out = tmp_path / "cli.onnx"
        process = cli("optimize", BERT, out, *flags)
        assert process.returncode == 0, (flags, process.stderr)
        assert onnxopt.optimize(BERT, **options).model == out.read_bytes(), flags


def test_calibration_arrays_are_converted_and_checked():
    batches = random_batches(3)
    # int32 ids are read as int64, as from .npy files.
    as_int32 = [{k: v.astype(np.int32) for k, v in b.items()} for b in batches]
    expected = onnxopt.optimize(BERT, int8=True, calib=batches).model
    assert onnxopt.optimize(BERT, int8=True, calib=as_int32).model == expected
    # Lists become arrays.
    as_lists = [{k: v.tolist() for k, v in b.items()} for b in batches]
    assert onnxopt.optimize(BERT, int8=True, calib=as_lists).model == expected

    missing = [{k: v for k, v in b.items() if k != "token_type_ids"} for b in batches]
    with pytest.raises(onnxopt.InvalidArgumentError, match="no array for input `token_type_ids`"):
        onnxopt.optimize(BERT, int8=True, calib=missing)
    # Arrays that name no input (reference outputs, say) are left out, as files are.
    with_outputs = [dict(b, last_hidden_state=np.zeros((4, 16, 64))) for b in batches]
    assert onnxopt.optimize(BERT, int8=True, calib=with_outputs).model == expected
    floats = [dict(b, input_ids=b["input_ids"].astype(np.float32)) for b in batches]
    with pytest.raises(onnxopt.InvalidArgumentError, match="expected an array of I64, got F32"):
        onnxopt.optimize(BERT, int8=True, calib=floats)
    with pytest.raises(onnxopt.InvalidArgumentError, match="a dict is one batch"):
        onnxopt.optimize(BERT, int8=True, calib=batches[0])
    with pytest.raises(onnxopt.InvalidArgumentError, match="no batches"):
        onnxopt.optimize(BERT, int8=True, calib=[])


def test_progress_reports_each_stage():
    calls = []
    batches = random_batches(10)
    onnxopt.optimize(
        BERT, int8=True, calib=batches, progress=lambda *call: calls.append(call)
    )
    calibrating = [(done, total) for stage, done, total in calls if stage == "calibrating"]
    assert calibrating[-1] == (8, 8)
    assert [d for d, _ in calibrating] == sorted(d for d, _ in calibrating)
    assert any(stage == "validating" for stage, _, _ in calls)


class FakeTqdm:
    """The part of tqdm's interface the package uses."""

    made = []

    def __init__(self, total=0, leave=True):
        self.total, self.n, self.descriptions, self.closed = total, 0, [], False
        FakeTqdm.made.append(self)

    def reset(self, total=None):
        self.total, self.n = total, 0

    def set_description(self, text, refresh=True):
        self.descriptions.append(text)

    def update(self, n):
        self.n += n

    def close(self):
        self.closed = True


def test_progress_drives_a_tqdm_bar():
    bar = FakeTqdm()
    onnxopt.optimize(BERT, int8=True, calib=random_batches(5), progress=bar)
    assert bar.descriptions[0] == "calibrating"
    assert bar.n == bar.total  # the last stage ran to its end
    assert not bar.closed  # the caller's bar stays open

    # A tqdm class: the package makes a bar, and closes it.
    onnxopt.optimize(BERT, int8=True, calib=random_batches(5), progress=FakeTqdm)
    made = FakeTqdm.made[-1]
    assert made is not bar and made.closed
    assert made.descriptions == ["calibrating", "validating"]


def test_an_exception_in_the_progress_callback_is_raised():
    def fail(stage, done, total):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        onnxopt.optimize(BERT, int8=True, calib=random_batches(5), progress=fail)


def test_passes_and_external_data(tmp_path):
    report = onnxopt.optimize(BERT, passes=["dce"])
    assert [p["pass"] for p in report.passes.passes] == ["dce"]
    out = tmp_path / "external.onnx"
    report = onnxopt.optimize(BERT, out, external_data=True)
    assert report.output.external_data[0].endswith("external.onnx.data")
    assert onnxopt.inspect(out)["external_data"]


def test_version_is_the_crate_version():
    assert onnxopt.__version__ == onnxopt.optimize(BERT, passes="dce").onnxopt_version


def test_calibration_folder_of_the_repository(tmp_path, cli):
    # The batches shipped with the repository, through numpy and through the folder.
    out = tmp_path / "cli.onnx"
    assert cli("optimize", BERT, out, "--int8", "--calib", CALIB).returncode == 0
    report = onnxopt.optimize(BERT, int8=True, calib=load_batches(CALIB))
    assert report.model == out.read_bytes()


def test_progress_true_shows_a_tqdm_bar():
    pytest.importorskip("tqdm")
    report = onnxopt.optimize(BERT, int8=True, calib=random_batches(5), progress=True)
    assert report.passed is not False
    with pytest.raises(onnxopt.InvalidArgumentError, match="smooth_quant takes"):
        onnxopt.optimize(BERT, int8_dynamic=True, smooth_quant=True)
