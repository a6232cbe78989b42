#!/usr/bin/env python3
"""Side-by-side quality, size and speed of quantized sentence-embedding models against their
float original and against ONNX Runtime's own quantizers, in ONNX Runtime (CPU).

    quant_compare.py FLOAT CALIB_DIR --eval BATCH[,BATCH...] [NAME=MODEL ...]
                     [--anchors DIR] [--threads 2] [--rounds 15] [--shape 1x128 --shape 8x128]

CALIB_DIR holds `<batch>.<input>.npy` batches (`../shared/corpus/calib/minilm/dynamic`).
The batches named by --eval are held back: they score the models and never calibrate.
With --anchors, ONNX Runtime's `quantize_static` (QDQ, per-channel weights, uint8
activations, MatMul only, min/max on the other batches) and `quantize_dynamic` (per-channel)
are written into DIR and scored alongside. Quality is the cosine between each sentence's
embedding (last_hidden_state mean-pooled over the attention mask, L2-normalized) from the
model and from FLOAT, over the held-back sentences. Latency is timed by `latency_protocol`
(one process, one shared pool, models alternated, warm-ups, median of --rounds >= 15), as a
ratio to FLOAT. Prints one
JSON line per model. Needs onnxruntime, onnx, numpy.
"""
import argparse
import collections
import json
import os
import sys
import time

import numpy as np

from latency_protocol import MIN_ROUNDS, alternate, describe, open_sessions


def read_batches(folder):
    found = collections.defaultdict(dict)
    for f in sorted(os.listdir(folder)):
        if f.endswith(".npy") and f.count(".") == 2:
            batch, name, _ = f.split(".")
            found[batch][name] = np.load(os.path.join(folder, f))
    return dict(found)


def embeddings(s, batches):
    out = []
    for feeds in batches:
        names = [i.name for i in s.get_inputs()]
        hidden = s.run(None, {n: feeds[n] for n in names})[0]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def anchors(float_path, calib, out_dir):
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    os.makedirs(out_dir, exist_ok=True)
    static = os.path.join(out_dir, "ort-static.onnx")
    started = time.perf_counter()
    q.quantize_static(float_path, static, Reader(), quant_format=q.QuantFormat.QDQ,
                      per_channel=True, activation_type=q.QuantType.QUInt8,
                      weight_type=q.QuantType.QInt8, op_types_to_quantize=["MatMul"])
    static_seconds = time.perf_counter() - started
    dynamic = os.path.join(out_dir, "ort-dynamic.onnx")
    started = time.perf_counter()
    q.quantize_dynamic(float_path, dynamic, per_channel=True, weight_type=q.QuantType.QInt8)
    dynamic_seconds = time.perf_counter() - started
    return [("ort-static", static, static_seconds), ("ort-dynamic", dynamic, dynamic_seconds)]


def latencies(sessions, shapes, rounds):
    result = [{} for _ in sessions]
    rng = np.random.default_rng(0)
    for shape in shapes:
        batch, seq = (int(x) for x in shape.split("x"))
        feeds = {
            "input_ids": rng.integers(1000, 30000, size=(batch, seq), dtype=np.int64),
            "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
        }
        medians = alternate([lambda s=s: s.run(None, feeds) for s in sessions], rounds)
        for k, m in enumerate(medians):
            result[k][shape] = {"ms": round(m * 1e3, 2), "ratio": round(m / medians[0], 3)}
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("float_model")
    p.add_argument("calib_dir")
    p.add_argument("--eval", required=True)
    p.add_argument("models", nargs="*", help="NAME=MODEL")
    p.add_argument("--anchors")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    p.add_argument("--shape", action="append")
    a = p.parse_intermixed_args()
    batches = read_batches(a.calib_dir)
    held_back = a.eval.split(",")
    missing = [b for b in held_back if b not in batches]
    if missing:
        sys.exit(f"no batch {missing} in {a.calib_dir}")
    evaluation = [batches[b] for b in held_back]
    calib = [v for k, v in sorted(batches.items()) if k not in held_back]
    models = [("float", a.float_model, None)]
    models += [(m.split("=", 1)[0], m.split("=", 1)[1], None) for m in a.models]
    if a.anchors:
        models += anchors(a.float_model, calib, a.anchors)
    # After the anchors: ORT's quantizers open sessions with a pool of their own, which ONNX
    # Runtime refuses once a global pool exists.
    sessions = open_sessions([path for _, path, _ in models], a.threads)
    reference = embeddings(sessions[0], evaluation)
    timing = latencies(sessions, a.shape or ["1x128", "8x128"], a.rounds)
    float_bytes = os.path.getsize(a.float_model)
    for (name, path, seconds), s, t in zip(models, sessions, timing):
        cos = (embeddings(s, evaluation) * reference).sum(1)
        line = {
            "model": name,
            "size_ratio": round(os.path.getsize(path) / float_bytes, 3),
            "mean_cosine": round(float(cos.mean()), 5),
            "min_cosine": round(float(cos.min()), 5),
            "latency": t,
            "latency_protocol": describe(a.threads, a.rounds)["protocol"],
        }
        if seconds is not None:
            line["quantize_seconds"] = round(seconds, 2)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
