"""Shared fixtures: the repository's test models, and the command line to compare with.

The command line is the `onnxopt` binary named by $ONNXOPT_BIN (CI: the one `cargo build
--release --workspace` built beside the extension), else the package's console script.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TESTDATA = REPO / "testdata"
BERT = TESTDATA / "bert-tiny.ts.onnx"
CALIB = TESTDATA / "calib" / "bert-tiny"


def console_script():
    """The `onnxopt` script installed beside this Python."""
    script = shutil.which("onnxopt", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.fail("the onnxopt console script is not installed beside " + sys.executable)
    return script


def run_cli(*args, program=None):
    """Runs the command line; returns the completed process (text output)."""
    program = program or os.environ.get("ONNXOPT_BIN") or console_script()
    return subprocess.run(
        [program, *map(str, args)], capture_output=True, text=True, timeout=600
    )


def cli_error(process):
    """The one-line message the command line printed after `error: `."""
    lines = [l for l in process.stderr.splitlines() if l.startswith("error: ")]
    assert lines, f"no error line in stderr: {process.stderr!r}"
    return lines[-1][len("error: ") :]


def load_batches(folder):
    """The batches of a folder of `<batch>.<input>.npy` files, as a list of dicts in batch
    order (what the command line reads from the same folder)."""
    batches = {}
    for path in sorted(Path(folder).glob("*.npy")):
        batch, _, input_name = path.stem.partition(".")
        batches.setdefault(batch, {})[input_name] = np.load(path)
    return [batches[name] for name in sorted(batches)]


def write_batches(folder, batches):
    """Writes a list of dicts as `batch_NN.<input>.npy` files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, batch in enumerate(batches):
        for name, array in batch.items():
            np.save(folder / f"batch_{i:02}.{name}.npy", array)
    return folder


@pytest.fixture
def cli():
    return run_cli
