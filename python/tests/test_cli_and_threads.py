"""The console script, and the GIL released while the work runs."""

import subprocess
import sys
import threading
import time

import numpy as np

import onnxopt
from conftest import BERT, CALIB, console_script, run_cli


def test_console_script_is_the_cli(tmp_path):
    script = console_script()
    version = run_cli("--version", program=script)
    assert version.returncode == 0
    assert version.stdout.strip() == f"onnxopt {onnxopt.__version__}"

    out = tmp_path / "script.onnx"
    process = run_cli("optimize", BERT, out, program=script)
    assert process.returncode == 0, process.stderr
    assert "check: the output matches" in process.stdout
    assert out.read_bytes() == onnxopt.optimize(BERT).model

    inspect = run_cli("inspect", out, program=script)
    assert "com.microsoft::Attention" in inspect.stdout

    usage = run_cli("optimize", "--no-such-flag", program=script)
    assert usage.returncode == 2
    assert "--no-such-flag" in usage.stderr

    failed = run_cli(
        "optimize", BERT, out, "--int8", "--calib", CALIB, "--min-cosine", "0.9999999",
        program=script,
    )
    assert failed.returncode == 3
    assert failed.stderr.startswith("error: ") or "\nerror: " in failed.stderr

    missing = run_cli("inspect", tmp_path / "missing.onnx", program=script)
    assert missing.returncode == 1


def test_python_dash_m(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "onnxopt", "dump", str(BERT)],
        capture_output=True,
        text=True,
    )
    assert process.returncode == 0
    assert process.stdout == onnxopt.dump(BERT)


def test_the_gil_is_released_during_calibration():
    """A second thread keeps running Python while optimize calibrates on 160 batches (most of
    the call): the longest pause between two of its loop iterations stays far below the
    call's length. No progress callback: its calls would hand the GIL over by themselves."""
    rng = np.random.default_rng(0)
    batches = [
        {
            "input_ids": rng.integers(0, 1000, (8, 128), dtype=np.int64),
            "attention_mask": np.ones((8, 128), dtype=np.int64),
            "token_type_ids": np.zeros((8, 128), dtype=np.int64),
        }
        # Enough work for the call to last well over half a second on an idle machine.
        for _ in range(160)
    ]
    stop = threading.Event()
    longest = [0.0]

    def spin():
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            longest[0] = max(longest[0], now - last)
            last = now

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        start = time.perf_counter()
        report = onnxopt.optimize(BERT, int8=True, calib=batches)
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        thread.join()
    assert len(report.quantization.calibration.batches) == 128
    assert elapsed > 0.5, f"the call took {elapsed:.2f} s: too short to tell"
    assert longest[0] < elapsed / 4, f"paused {longest[0]:.2f} s of {elapsed:.2f} s"
