#!/usr/bin/env python3
"""Outputs and ONNX Runtime CPU latency of a KV-cache decoder (past_key_values.N.key/value ->
present.N.key/value, as shared/llm/build.sh and scripts/llm/make_llm.py export it) against its
optimized form, on the same inputs, in one process.

    decode_latency.py ORIGINAL OPTIMIZED [--ids FILE.npy | --vocab N] [--prefill 128] [--rounds 15] [--threads 2]

Steps: prefill of 1 x P real tokens (past of length 0), then decode of one token with the
prefill's present (past P). Prints, as JSON: the max abs difference of the logits and of every
present between the two models at each step, and the median latency (ms) of each step for
each model: models alternated within each round, intra-op threads as given,
`session.intra_op.allow_spinning` 0, 3 warm-up rounds first. Needs onnxruntime, numpy.
"""
import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort


def session(path, threads):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def feeds(s, ids, past_len, past=None):
    ins = {i.name: i for i in s.get_inputs()}
    b, n = ids.shape
    f = {"input_ids": ids, "attention_mask": np.ones((b, past_len + n), np.int64),
         "position_ids": np.arange(past_len, past_len + n, dtype=np.int64)[None].repeat(b, 0)}
    for name, i in ins.items():
        if name.startswith("past_key_values"):
            heads, dim = i.shape[1], i.shape[3]
            f[name] = past[name] if past is not None else np.zeros((b, heads, 0, dim), np.float32)
    return {k: v for k, v in f.items() if k in ins}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("original")
    ap.add_argument("optimized")
    ap.add_argument("--ids", help="token ids .npy (first row used); default: random ids")
    ap.add_argument("--vocab", type=int, default=1000, help="random ids below this (default 1000)")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    sessions = [session(p, a.threads) for p in (a.original, a.optimized)]
    if a.ids:
        ids = np.load(a.ids)[:1, : a.prefill + 1].astype(np.int64)
    else:
        ids = np.random.default_rng(0).integers(3, a.vocab, size=(1, a.prefill + 1), dtype=np.int64)
    prompt, nxt = ids[:, : a.prefill], ids[:, a.prefill:]
    report = {"prefill": a.prefill, "threads": a.threads, "rounds": a.rounds, "steps": {}}
    outs = [s.run(None, feeds(s, prompt, 0)) for s in sessions]
    names = [o.name for o in sessions[0].get_outputs()]
    past = {n.replace("present.", "past_key_values."): v for n, v in zip(names, outs[0]) if n.startswith("present")}
    step_feeds = {"prefill": [feeds(s, prompt, 0) for s in sessions],
                  "decode": [feeds(s, nxt, a.prefill, past) for s in sessions]}
    for step, fs in step_feeds.items():
        got = [s.run(None, f) for s, f in zip(sessions, fs)]
        diff = {n: float(np.abs(x - y).max()) for n, x, y in zip(names, got[0], got[1])}
        times = [[], []]
        for r in range(3 + a.rounds):
            for k, (s, f) in enumerate(zip(sessions, fs)):
                t = time.perf_counter()
                s.run(None, f)
                if r >= 3:
                    times[k].append((time.perf_counter() - t) * 1e3)
        med = [statistics.median(t) for t in times]
        report["steps"][step] = {
            "max_abs_logits": diff[names[0]],
            "max_abs_present": max(v for n, v in diff.items() if n != names[0]),
            "original_ms": round(med[0], 3), "optimized_ms": round(med[1], 3),
            "ratio": round(med[1] / med[0], 3),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
