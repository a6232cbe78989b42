#!/usr/bin/env python3
"""The operators ONNX Runtime (CPU) runs for each model once its own load-time graph
optimizations (level "extended": LayerNormFusion, SimplifiedLayerNormFusion, GeluFusion, ...)
have rewritten it: what a fusion left written out becomes in the session.

    ort_session_ops.py MODEL [MODEL ...]

Prints one JSON object per model: {"model": path, "ops": {op_type: count}}. Needs
onnxruntime.
"""
import collections
import json
import os
import sys
import tempfile

import onnx
import onnxruntime as ort


def session_ops(path):
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(tmp, "session.onnx")
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
        return collections.Counter(n.op_type for n in graph.node)


def main():
    ort.set_default_logger_severity(3)
    for path in sys.argv[1:]:
        print(json.dumps({"model": path, "ops": dict(sorted(session_ops(path).items()))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
