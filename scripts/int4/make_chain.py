#!/usr/bin/env python3
"""Writes testdata/int4/: `chain.onnx`, a tiny MatMul chain for the 4-bit weight tests, and
`calib/`, its calibration batches.

    x [batch, seq, 64] -> MatMul W1 [64, 72] -> Tanh -> MatMul W2 [72, 48] -> y

W2's K (72) is not a multiple of 32, so its last block of 32 is padded. The batches are
correlated the way transformer activations are (a few shared factors, some outlier
channels), so that a calibrated method has correlations to exploit: on independent inputs
GPTQ and round-to-nearest coincide. Needs onnx and numpy.
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "testdata", "int4")


def main():
    rng = np.random.default_rng(16)
    w1 = (rng.standard_normal((64, 72)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((72, 48)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Tanh", ["h"], ["a"], name="act"),
            helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2"),
        ],
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 48])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    os.makedirs(os.path.join(OUT, "calib"), exist_ok=True)
    onnx.save(model, os.path.join(OUT, "chain.onnx"))
    mixing = rng.standard_normal((6, 64)).astype(np.float32)
    outliers = np.ones(64, np.float32)
    outliers[[3, 17, 42]] = 6.0
    for b in range(5):
        factors = rng.standard_normal((2, 16, 6)).astype(np.float32)
        noise = 0.3 * rng.standard_normal((2, 16, 64)).astype(np.float32)
        x = ((factors @ mixing + noise) * outliers).astype(np.float32)
        np.save(os.path.join(OUT, "calib", f"batch_{b:02d}.x.npy"), x)


if __name__ == "__main__":
    main()
