"""ONNX Runtime as the second engine, found through the importing interpreter."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import onnxopt
from conftest import BERT


def test_the_package_finds_this_interpreters_onnxruntime():
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None:
        pytest.skip("no onnxruntime package")
    env = {k: v for k, v in os.environ.items() if k not in ("ONNXOPT_ORT_LIB", "ORT_DYLIB_PATH")}
    found = subprocess.run(
        [sys.executable, "-c", "import os, onnxopt; print(os.environ['ONNXOPT_ORT_LIB'])"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    capi = Path(list(spec.submodule_search_locations)[0]) / "capi"
    assert Path(found).parent == capi
    assert Path(found).name.startswith("libonnxruntime")

    # A variable set by the user wins.
    env["ONNXOPT_ORT_LIB"] = "/somewhere/libonnxruntime.so"
    kept = subprocess.run(
        [sys.executable, "-c", "import os, onnxopt; print(os.environ['ONNXOPT_ORT_LIB'])"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    assert kept == "/somewhere/libonnxruntime.so"


def test_validation_runs_in_onnxruntime():
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("no onnxruntime package")
    report = onnxopt.optimize(BERT, validate=True, engine="ort")
    assert report.validation.engine == "onnxruntime"
    assert report.passed
