#!/usr/bin/env python3
"""ONNX Runtime CPU latency of several models on the same inputs, measured alternately in
one process so that machine noise hits every model alike.

    ort_latency.py MODEL [MODEL ...] [--shape 1x128 --shape 8x128] [--threads 2] [--rounds 20]

Inputs are token ids (from the vocabulary of the first Gather's table when it can be read,
else 0..999), an all-ones attention mask and zero token types, or float32 N(0,1) for
float inputs. Prints one JSON line per shape: the median latency of each model in
milliseconds and each model's ratio to the first. Needs onnxruntime, onnx, numpy.

Timed by `latency_protocol` (one process, one shared pool, models alternated, warm-ups,
median of >= 15). Why one pool: with a pool per session, the workers of the session that just
ran keep spinning while the next one runs: on a 2-core machine that added 25-60 ms to every
BERT-base run at 1x128 (about a third), the same for every model, so it pulled every ratio
towards 1 (pruned/dense 0.78-0.79 alternating vs 0.70 alone). With one pool, alternating runs
match runs of each model alone (0.74-0.75)."""
import argparse
import json
import sys

import numpy as np

from latency_protocol import MIN_ROUNDS, alternate, describe, open_sessions


def feeds_for(session, batch, seq, rng):
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else None for d in i.shape]
        dims = []
        for k, d in enumerate(shape):
            dims.append(d if d is not None else (batch if k == 0 else seq))
        if "float" in i.type:
            feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
        elif "mask" in i.name:
            feeds[i.name] = np.ones(dims, dtype=np.int64)
        elif "token_type" in i.name:
            feeds[i.name] = np.zeros(dims, dtype=np.int64)
        else:
            feeds[i.name] = rng.integers(5, 1000, size=dims, dtype=np.int64)
    return feeds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--shape", action="append", default=None, help="BATCHxSEQ")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20, help=f"at least {MIN_ROUNDS}")
    a = p.parse_args()
    shapes = a.shape or ["1x128", "8x128"]
    sessions = open_sessions(a.models, a.threads)
    rng = np.random.default_rng(0)
    for shape in shapes:
        batch, seq = (int(x) for x in shape.split("x"))
        feeds = feeds_for(sessions[0], batch, seq, rng)
        runs = [lambda s=s: s.run(None, feeds) for s in sessions]
        medians = [m * 1000 for m in alternate(runs, a.rounds)]
        print(json.dumps({"shape": shape, **describe(a.threads, a.rounds),
                          "median_ms": dict(zip(a.models, medians)),
                          "ratio_to_first": [m / medians[0] for m in medians]}))


if __name__ == "__main__":
    sys.exit(main())
