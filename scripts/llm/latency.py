#!/usr/bin/env python3
"""ONNX Runtime CPU latency of causal language models on the same token ids, in one
process, the models alternated round by round so that machine noise hits them alike.

    latency.py [--seq 128] [--threads 2] [--rounds 15] [--warmup 3] MODEL [MODEL ...]

Each session has `--threads` intra-op threads and `session.intra_op.allow_spinning` 0 (a
spinning pool of the session that just ran would slow the next one). MODEL takes
`input_ids` and `attention_mask` (prefill). Prints one JSON line: each model's median
milliseconds over the rounds after the warm-ups, and its ratio to the first model's.
Needs onnxruntime and numpy.
"""
import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort


def main():
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    sessions = []
    for path in a.models:
        o = ort.SessionOptions()
        o.intra_op_num_threads = a.threads
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions.append(ort.InferenceSession(path, o, providers=["CPUExecutionProvider"]))
    ids = np.random.default_rng(0).integers(1, 49152, size=(1, a.seq), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    times = [[] for _ in sessions]
    for r in range(a.warmup + a.rounds):
        for i, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(["logits"], feed)
            if r >= a.warmup:
                times[i].append((time.perf_counter() - t) * 1e3)
    medians = [statistics.median(t) for t in times]
    print(json.dumps({
        "seq": a.seq,
        "threads": a.threads,
        "rounds": a.rounds,
        "median_ms": {m: round(t, 2) for m, t in zip(a.models, medians)},
        "ratio": {m: round(t / medians[0], 3) for m, t in zip(a.models, medians)},
    }))


if __name__ == "__main__":
    main()
