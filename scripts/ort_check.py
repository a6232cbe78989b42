#!/usr/bin/env python3
"""Checks optimized models the way their users will load them: onnx.checker (full check)
and ONNX Runtime (CPU), whose outputs must match the original model's on the same inputs.

    ort_check.py ORIGINAL OPTIMIZED INPUT_DIR [--atol A] [ORIGINAL OPTIMIZED INPUT_DIR ...]

INPUT_DIR holds `<batch>.<input>.npy` files (the layout of the corpus calibration folders).
Prints one line per pair and exits non-zero if any pair fails. Needs onnx, onnxruntime, numpy.
"""
import argparse
import collections
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort


def batches(input_dir, input_names):
    found = collections.defaultdict(dict)
    for f in sorted(os.listdir(input_dir)):
        if not f.endswith(".npy"):
            continue
        stem = f[: -len(".npy")]
        for name in sorted(input_names, key=len, reverse=True):
            if stem == name or stem.endswith("." + name):
                batch = stem[: -len(name)].rstrip(".")
                found[batch][name] = np.load(os.path.join(input_dir, f))
                break
    return [b for _, b in sorted(found.items()) if set(b) == set(input_names)]


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def check(original, optimized, input_dir, atol):
    onnx.checker.check_model(onnx.load(optimized), full_check=True)
    reference, candidate = session(original), session(optimized)
    names = [i.name for i in reference.get_inputs()]
    feeds = batches(input_dir, names)
    if not feeds:
        raise RuntimeError(f"no complete batch for inputs {names} in {input_dir}")
    outputs = [o.name for o in reference.get_outputs()]
    worst = 0.0
    for feed in feeds:
        want = reference.run(outputs, feed)
        got = candidate.run(outputs, feed)
        for name, a, b in zip(outputs, want, got):
            if a.shape != b.shape:
                raise RuntimeError(f"{name}: shape {b.shape}, expected {a.shape}")
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
            worst = max(worst, diff)
            if not np.allclose(a, b, atol=atol, rtol=0, equal_nan=True):
                raise RuntimeError(f"{name}: max abs error {diff:.3e} > {atol}")
    return len(feeds), worst


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("triples", nargs="+", metavar="ORIGINAL OPTIMIZED INPUT_DIR")
    a = p.parse_args()
    if len(a.triples) % 3:
        p.error("arguments come in triples: ORIGINAL OPTIMIZED INPUT_DIR")
    failures = 0
    for i in range(0, len(a.triples), 3):
        original, optimized, input_dir = a.triples[i : i + 3]
        try:
            n, worst = check(original, optimized, input_dir, a.atol)
            print(f"ok   {optimized}: checker passed, ONNX Runtime matches on {n} batches "
                  f"(max abs error {worst:.2e})")
        except Exception as e:  # report every pair, then fail
            failures += 1
            print(f"FAIL {optimized}: {type(e).__name__}: {e}".splitlines()[0][:400])
    print(f"{len(a.triples) // 3 - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
