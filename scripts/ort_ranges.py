#!/usr/bin/env python3
"""Min and max of named values of a model over input batches, run in ONNX Runtime (CPU): ranges
for models tract cannot run, and a cross-check of calibration.

    ort_ranges.py MODEL INPUT_DIR NAME [NAME ...]

INPUT_DIR holds `<batch>.<input>.npy` files (the layout of the corpus calibration folders).
Prints one JSON object {name: [min, max]} over the finite values. Needs onnx, onnxruntime, numpy.
"""
import argparse
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort

from ort_check import batches


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("input_dir")
    p.add_argument("names", nargs="+")
    a = p.parse_args()
    model = onnx.load(a.model)
    declared = {o.name for o in model.graph.output}
    # Intermediate values become outputs, with no type: ONNX Runtime infers it.
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in a.names if n not in declared)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feeds = batches(a.input_dir, [i.name for i in session.get_inputs()])
    if not feeds:
        sys.exit(f"no complete batch in {a.input_dir}")
    ranges = {}
    for feed in feeds:
        for name, value in zip(a.names, session.run(a.names, feed)):
            finite = value[np.isfinite(value)].astype(np.float64)
            lo, hi = float(finite.min(initial=np.inf)), float(finite.max(initial=-np.inf))
            old = ranges.get(name, [lo, hi])
            ranges[name] = [min(old[0], lo), max(old[1], hi)]
    print(json.dumps(ranges))


if __name__ == "__main__":
    main()
