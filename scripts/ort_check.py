#!/usr/bin/env python3
"""Checks optimized models the way their users will load them: onnx.checker (full check)
and ONNX Runtime (CPU), whose outputs must match the original model's on the same inputs.

    ort_check.py ORIGINAL OPTIMIZED INPUT_DIR [--atol A] [--min-cosine C] [ORIGINAL OPTIMIZED INPUT_DIR ...]

Each output must stay within the absolute error A (default 1e-4) or, with --min-cosine (for
quantized models, whose errors scale with each output's magnitude), have a cosine similarity
of at least C with the original's on each batch (and stay within A too when --atol is also
given). The cosine of an output whose first two axes are a 2-D attention mask's `[batch,
sequence]` takes the positions the mask keeps only: at padded positions a model computes
values nothing reads, which quantization moves freely (all-MiniLM-L6-v2's dynamic INT8 on
its padded batches: cosine 0.975 over every position, 0.995 over the tokens). INPUT_DIR holds `<batch>.<input>.npy` files (the layout of the corpus calibration
folders).
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


FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def as_inputs_of(session, feed):
    """`feed` with each float array in the float type `session` declares for it (a float16
    model's inputs are float16; the batches are float32)."""
    declared = {i.name: i.type for i in session.get_inputs()}
    return {
        name: value.astype(FLOAT_TYPES[declared[name]])
        if value.dtype.kind == "f" and declared.get(name) in FLOAT_TYPES
        else value
        for name, value in feed.items()
    }


def cosine(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    finite = np.isfinite(a) & np.isfinite(b)
    a, b = a[finite], b[finite]
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b / (na * nb))


def kept_positions(feed):
    """The positions a batch's 2-D attention mask keeps (`[batch, sequence]`, non-zero), if
    it has one (PyTorch's `*_padding_mask`, true at padding, is not one)."""
    for name, value in feed.items():
        lower = name.lower()
        if value.ndim == 2 and "mask" in lower and "padding" not in lower and value.dtype.kind in "biu":
            return value != 0
    return None


def check(original, optimized, input_dir, atol, min_cosine):
    onnx.checker.check_model(onnx.load(optimized), full_check=True)
    reference, candidate = session(original), session(optimized)
    names = [i.name for i in reference.get_inputs()]
    feeds = batches(input_dir, names)
    if not feeds:
        raise RuntimeError(f"no complete batch for inputs {names} in {input_dir}")
    outputs = [o.name for o in reference.get_outputs()]
    worst, lowest_cosine = 0.0, 1.0
    for feed in feeds:
        kept = kept_positions(feed)
        want = reference.run(outputs, as_inputs_of(reference, feed))
        got = candidate.run(outputs, as_inputs_of(candidate, feed))
        for name, a, b in zip(outputs, want, got):
            if a.shape != b.shape:
                raise RuntimeError(f"{name}: shape {b.shape}, expected {a.shape}")
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
            worst = max(worst, diff)
            if atol is not None and not np.allclose(a, b, atol=atol, rtol=0, equal_nan=True):
                raise RuntimeError(f"{name}: max abs error {diff:.3e} > {atol}")
            if min_cosine is not None:
                if not np.array_equal(np.isfinite(a), np.isfinite(b)):
                    raise RuntimeError(f"{name}: non-finite values differ")
                if kept is not None and a.shape[:2] == kept.shape:
                    a, b = a[kept], b[kept]
                c = cosine(a, b)
                lowest_cosine = min(lowest_cosine, c)
                if c < min_cosine:
                    raise RuntimeError(f"{name}: cosine {c:.6f} < {min_cosine}")
    return len(feeds), worst, lowest_cosine


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--atol", type=float, default=None, help="default 1e-4 without --min-cosine")
    p.add_argument("--min-cosine", type=float, default=None)
    p.add_argument("triples", nargs="+", metavar="ORIGINAL OPTIMIZED INPUT_DIR")
    a = p.parse_args()
    if len(a.triples) % 3:
        p.error("arguments come in triples: ORIGINAL OPTIMIZED INPUT_DIR")
    if a.atol is None and a.min_cosine is None:
        a.atol = 1e-4
    failures = 0
    for i in range(0, len(a.triples), 3):
        original, optimized, input_dir = a.triples[i : i + 3]
        try:
            n, worst, lowest_cosine = check(original, optimized, input_dir, a.atol, a.min_cosine)
            print(f"ok   {optimized}: checker passed, ONNX Runtime matches on {n} batches "
                  f"(max abs error {worst:.2e}, lowest cosine {lowest_cosine:.6f})")
        except Exception as e:  # report every pair, then fail
            failures += 1
            print(f"FAIL {optimized}: {type(e).__name__}: {e}".splitlines()[0][:400])
    print(f"{len(a.triples) // 3 - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
