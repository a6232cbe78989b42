#!/usr/bin/env python3
"""Runs ONNX Runtime's transformers optimizer on a model, the way its users run it, and
prints one JSON line: the fused operator counts, wall time and peak memory of the run.

    ort_optimizer.py MODEL OUTPUT [--model-type bert|gpt2|t5|vit|bart]

The model type defaults to what the file name says (gpt2*, t5*, vit*, bart*, else bert).
Heads and hidden size come from the transformers config beside the model
(`<family>.config.json`, as in the corpus) when there is one, else the optimizer detects them
(0): the baseline gets every hint a careful user would give it.
Needs onnxruntime (and onnx, numpy). The optimizer imports torch only to read
`torch.version.hip` (whether torch was built for ROCm); where torch is not installed, a
stand-in module answers `None`, which is what CPU and CUDA builds of torch answer."""
import argparse
import json
import resource
import sys
import time


def guess_type(path):
    name = path.rsplit("/", 1)[-1].lower()
    for prefix, kind in (("gpt2", "gpt2"), ("t5", "t5"), ("vit", "vit"), ("bart", "bart")):
        if name.startswith(prefix):
            return kind
    return "bert"


def config_hints(path):
    """(num_heads, hidden_size) from the transformers config next to the model, or (0, 0)."""
    import os

    folder, name = os.path.split(path)
    family = name.split(".")[0]
    for candidate in (f"{family}.config.json", "config.json"):
        config = os.path.join(folder, candidate)
        if os.path.exists(config):
            with open(config) as f:
                c = json.load(f)
            heads = (c.get("num_attention_heads") or c.get("n_head") or c.get("num_heads")
                     or c.get("encoder_attention_heads") or 0)
            hidden = c.get("hidden_size") or c.get("n_embd") or c.get("d_model") or 0
            if not (heads and hidden):
                # One hint without the other fails the optimizer's check; let it detect both.
                return 0, 0
            return int(heads), int(hidden)
    return 0, 0


def torch_stand_in():
    try:
        import torch  # noqa: F401
    except ImportError:
        import types

        torch = types.ModuleType("torch")
        torch.version = types.ModuleType("torch.version")
        torch.version.hip = None
        sys.modules["torch"] = torch
        sys.modules["torch.version"] = torch.version


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("output")
    p.add_argument("--model-type")
    a = p.parse_args()
    torch_stand_in()
    from onnxruntime.transformers import optimizer

    kind = a.model_type or guess_type(a.model)
    start = time.perf_counter()
    heads, hidden = config_hints(a.model)
    m = optimizer.optimize_model(a.model, model_type=kind, num_heads=heads, hidden_size=hidden)
    m.save_model_to_file(a.output)
    seconds = time.perf_counter() - start
    stats = {k: v for k, v in m.get_fused_operator_statistics().items() if v}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"model_type": kind, "num_heads": heads, "hidden_size": hidden, "fused": stats, "seconds": seconds,
                      "peak_rss_bytes": peak_kib * 1024}))


if __name__ == "__main__":
    sys.exit(main())
