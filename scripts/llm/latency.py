#!/usr/bin/env python3
"""ONNX Runtime CPU latency of causal language models on the same token ids (prefill), timed
by `scripts/latency_protocol.py`: one process, one shared pool of `--threads` threads, the
models alternated round by round, warm-ups, median of `--rounds` (at least 15).

    latency.py [--seq 128] [--threads 2] [--rounds 15] MODEL [MODEL ...]

MODEL takes `input_ids` and `attention_mask`. Prints one JSON line: each model's median
milliseconds and its ratio to the first model's. Needs onnxruntime and numpy.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from latency_protocol import MIN_ROUNDS, alternate, describe, open_sessions  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    a = p.parse_args()
    sessions = open_sessions(a.models, a.threads)
    ids = np.random.default_rng(0).integers(1, 49152, size=(1, a.seq), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    medians = [m * 1e3 for m in alternate([lambda s=s: s.run(["logits"], feed) for s in sessions], a.rounds)]
    print(json.dumps({
        "seq": a.seq,
        **describe(a.threads, a.rounds),
        "median_ms": {m: round(t, 2) for m, t in zip(a.models, medians)},
        "ratio": {m: round(t / medians[0], 3) for m, t in zip(a.models, medians)},
    }))


if __name__ == "__main__":
    main()
