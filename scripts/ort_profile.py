#!/usr/bin/env python3
"""Where ONNX Runtime (CPU) spends a model's time, by operator type, from its session
profiler: the evidence behind target-specific rewrites (e.g. `Sum` + LayerNormalization in
place of SkipLayerNormalization).

    ort_profile.py MODEL [--shape 8x128] [--threads 2] [--runs 20] [--top 12]

Inputs are made as `ort_latency.py` makes them. After 3 warm-up runs, --runs runs are
profiled; prints the median run time and, per operator type, the kernel time per run and its
share of all kernel time. Needs onnxruntime, numpy.
"""
import argparse
import collections
import json
import os
import statistics
import tempfile

import numpy as np
import onnxruntime as ort

from ort_latency import feeds_for


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--shape", default="8x128", help="BATCHxSEQ")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args()
    batch, seq = (int(x) for x in a.shape.split("x"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = a.threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort_profile")
    session = ort.InferenceSession(a.model, options, providers=["CPUExecutionProvider"])
    feeds = feeds_for(session, batch, seq, np.random.default_rng(0))
    warm_up = 3
    for _ in range(warm_up + a.runs):
        session.run(None, feeds)
    path = session.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    by_op = collections.Counter()
    runs = []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            runs.append(e["dur"])
    total = sum(by_op.values())
    count = len(runs)
    print(f"{os.path.basename(a.model)} {a.shape}, {a.threads} threads: "
          f"median run {statistics.median(runs[warm_up:]) / 1000:.2f} ms "
          f"(profiled), kernel time {total / count / 1000:.2f} ms per run")
    for op, us in by_op.most_common(a.top):
        print(f"  {op:<32} {us / count / 1000:8.2f} ms  {100 * us / total:5.1f}%")


if __name__ == "__main__":
    main()
