#!/usr/bin/env python3
"""Outputs and ONNX Runtime CPU latency of a KV-cache decoder (past_key_values.N.key/value ->
present.N.key/value, as shared/llm/build.sh and scripts/llm/make_llm.py export it) against its
optimized form, on the same inputs, in one process.

    decode_latency.py ORIGINAL OPTIMIZED [OPTIMIZED ...] [--ids FILE.npy | --vocab N] [--prefill 128] [--rounds 15] [--threads 2] [--head-size H]

Steps: prefill of 1 x P real tokens (past of length 0), then decode of one token with the
prefill's present (past P). Prints, as JSON: for each optimized model, the max abs difference
of its logits and of every present from the original's at each step, and the median latency
(ms) of each step for every model, timed by `scripts/latency_protocol.py` (one process, one shared pool of
`--threads` threads, the models alternated within each round, warm-ups, median of `--rounds`,
at least 15). Needs onnxruntime, numpy.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from latency_protocol import MIN_ROUNDS, alternate, describe, open_sessions  # noqa: E402


# The cache's head size where a model names it (onnxruntime-genai's `kv_cache_dim`): `--head-size`.
HEAD_SIZE = None


def feeds(s, ids, past_len, past=None):
    ins = {i.name: i for i in s.get_inputs()}
    b, n = ids.shape
    f = {"input_ids": ids, "attention_mask": np.ones((b, past_len + n), np.int64),
         "position_ids": np.arange(past_len, past_len + n, dtype=np.int64)[None].repeat(b, 0)}
    for name, i in ins.items():
        if name.startswith("past_key_values"):
            heads, dim = i.shape[1], i.shape[3] if isinstance(i.shape[3], int) else HEAD_SIZE
            f[name] = past[name] if past is not None else np.zeros((b, heads, 0, dim), np.float32)
    return {k: v for k, v in f.items() if k in ins}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("original")
    ap.add_argument("optimized", nargs="+")
    ap.add_argument("--ids", help="token ids .npy (first row used); default: random ids")
    ap.add_argument("--vocab", type=int, default=1000, help="random ids below this (default 1000)")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--head-size", type=int, help="the cache's head size where a model names it")
    a = ap.parse_args()
    global HEAD_SIZE
    HEAD_SIZE = a.head_size
    sessions = open_sessions([a.original, *a.optimized], a.threads)
    if a.ids:
        ids = np.load(a.ids)[:1, : a.prefill + 1].astype(np.int64)
    else:
        ids = np.random.default_rng(0).integers(3, a.vocab, size=(1, a.prefill + 1), dtype=np.int64)
    prompt, nxt = ids[:, : a.prefill], ids[:, a.prefill:]
    report = {"prefill": a.prefill, **describe(a.threads, a.rounds), "steps": {}}
    outs = [s.run(None, feeds(s, prompt, 0)) for s in sessions]
    names = [o.name for o in sessions[0].get_outputs()]
    past = {n.replace("present.", "past_key_values."): v for n, v in zip(names, outs[0]) if n.startswith("present")}
    step_feeds = {"prefill": [feeds(s, prompt, 0) for s in sessions],
                  "decode": [feeds(s, nxt, a.prefill, past) for s in sessions]}
    for step, fs in step_feeds.items():
        got = [s.run(None, f) for s, f in zip(sessions, fs)]
        med = [m * 1e3 for m in alternate([lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, fs)], a.rounds)]
        optimized = []
        for path, outs, ms in zip(a.optimized, got[1:], med[1:]):
            diff = {n: float(np.abs(x - y).max()) for n, x, y in zip(names, got[0], outs)}
            optimized.append({
                "model": path,
                "max_abs_logits": diff[names[0]],
                "max_abs_present": max(v for n, v in diff.items() if n != names[0]),
                "ms": round(ms, 3), "ratio": round(ms / med[0], 3),
            })
        report["steps"][step] = {"original_ms": round(med[0], 3), "optimized": optimized}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
