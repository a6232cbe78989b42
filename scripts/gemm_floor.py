#!/usr/bin/env python3
"""The GEMM floor of a model in ONNX Runtime (CPU): how fast its matrix products alone run,
as a fraction of the whole model's latency.

    gemm_floor.py MODEL [--against OPTIMIZED ...] [--shape 1x128 --shape 8x128] [--threads 2] [--rounds 15]
    gemm_floor.py QUANTIZED --int8 [--shape ...]

A float32 graph rewrite (fusion, clean-up) keeps every multiply-add of a model's MatMul and
Gemm nodes, so its output cannot run faster than those products do. This script measures
that bound: it runs MODEL once with every MatMul/Gemm input as an extra output, builds a
model of those nodes alone (same weights; activations fed as inputs of the shapes seen),
and times the two by `latency_protocol` (one process, one shared pool, alternated, warm-ups,
median of >= 15). The GEMM-only model writes its outputs into buffers bound once (I/O binding),
so its runs pay nothing for handing every product back to Python. Each `--against` model (an
optimized form of MODEL) is timed in the same rounds, with `removed`: the share of MODEL's
time above the floor that it no longer spends, 1 - (ours - floor) / (model - floor).

With `--int8`, MODEL is a quantized model and its products are the integer kernels ONNX
Runtime runs for it: the nodes of its own optimized graph (level "extended", where
DequantizeLinear -> MatMul -> QuantizeLinear become one kernel) of the types in
`INT8_PRODUCTS`, alone on the inputs they see; `within` = model / products alone.

Prints one JSON line per shape: the medians in ms and `floor` = GEMM-only / model.
Needs onnxruntime, onnx, numpy.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from latency_protocol import MIN_ROUNDS, alternate, describe, open_sessions
from ort_latency import feeds_for

GEMM_OPS = ("MatMul", "Gemm")
# The products of ONNX Runtime's optimized graph of a quantized model: integer kernels, and the
# float products left beside them.
INT8_PRODUCTS = ("MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                 "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm")


def gemm_nodes(model, ops=GEMM_OPS):
    return [n for n in model.graph.node if n.op_type in ops
            and n.domain in ("", "ai.onnx", "com.microsoft")]


def session_graph(path, tmp):
    """The model ONNX Runtime runs for `path` once its extended optimizations have run."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = os.path.join(tmp, "session.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


class ActivationProbe:
    """The whole model with every non-constant GEMM input as an extra output: one session,
    run once per shape to read the activations the GEMMs are fed."""

    def __init__(self, model, gemms, threads):
        constants = {i.name for i in model.graph.initializer}
        constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
        self.wanted = sorted({i for n in gemms for i in n.input if i and i not in constants})
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        known = {o.name for o in probe.graph.output}
        for name in self.wanted:
            if name not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "probe.onnx")
            onnx.save(probe, path)
            [self.session] = open_sessions([path], threads)

    def activations(self, feeds):
        return dict(zip(self.wanted, self.session.run(self.wanted, feeds)))


def gemm_only_model(model, gemms, inputs):
    used = {i for n in gemms for i in n.input}
    weights_from_nodes = [n for n in model.graph.node
                          if n.op_type == "Constant" and n.output[0] in used]
    graph = onnx.helper.make_graph(
        weights_from_nodes + gemms,
        "gemm_only",
        [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(v.dtype),
                                            v.shape)
         for name, v in inputs.items()],
        [onnx.ValueInfoProto(name=o) for n in gemms for o in n.output],
        [i for i in model.graph.initializer if i.name in used],
    )
    only = onnx.helper.make_model(graph, opset_imports=model.opset_import)
    only.ir_version = model.ir_version
    return only


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--against", action="append", default=[], help="an optimized form of MODEL")
    p.add_argument("--int8", action="store_true",
                   help="MODEL is quantized: its products are ONNX Runtime's integer kernels")
    p.add_argument("--shape", action="append", default=None, help="BATCHxSEQ")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    a = p.parse_args()
    if a.int8:
        with tempfile.TemporaryDirectory() as tmp:
            model = session_graph(a.model, tmp)
        gemms = gemm_nodes(model, INT8_PRODUCTS)
    else:
        model = onnx.load(a.model)
        gemms = gemm_nodes(model)
    if not gemms:
        sys.exit(f"{a.model} has no matrix product")
    [whole, *against] = open_sessions([a.model, *a.against], a.threads)
    probe = ActivationProbe(model, gemms, a.threads)
    rng = np.random.default_rng(0)
    for shape in a.shape or ["1x128", "8x128"]:
        batch, seq = (int(x) for x in shape.split("x"))
        feeds = feeds_for(whole, batch, seq, rng)
        inputs = probe.activations(feeds)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "gemm_only.onnx")
            onnx.save(gemm_only_model(model, gemms, inputs), path)
            [only] = open_sessions([path], a.threads)
        binding = only.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
        for output in only.get_outputs():
            binding.bind_output(output.name, "cpu")
        only.run_with_iobinding(binding)  # allocates the outputs, which later runs reuse
        for o, value in zip(only.get_outputs(), binding.get_outputs()):
            binding.bind_ortvalue_output(o.name, value)
        runs = [lambda: whole.run(None, feeds), lambda: only.run_with_iobinding(binding)]
        runs += [lambda s=s: s.run(None, feeds) for s in against]
        model_s, gemm_only_s, *against_s = alternate(runs, a.rounds)
        line = {"shape": shape, **describe(a.threads, a.rounds), "gemms": len(gemms),
                "model_ms": model_s * 1000, "gemm_only_ms": gemm_only_s * 1000,
                "floor": gemm_only_s / model_s}
        if a.int8:
            line["within"] = model_s / gemm_only_s
        line["against"] = [{"model": path, "ms": t * 1000,
                            "removed": 1 - (t - gemm_only_s) / (model_s - gemm_only_s)}
                           for path, t in zip(a.against, against_s)]
        print(json.dumps(line))


if __name__ == "__main__":
    sys.exit(main())
