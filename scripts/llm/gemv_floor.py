#!/usr/bin/env python3
"""The decode floor of a float32 decoder in ONNX Runtime (CPU): how long its weight products
alone take for one token, i.e. reading every weight once.

    gemv_floor.py MODEL [--threads 2] [--rounds 20]

Builds a model of MODEL's MatMuls with a constant 2-D weight (and a tied head, MatMul over
Transpose(table), as Gemm with transB), each fed a random [1, 1, K] row, and times it by
`scripts/latency_protocol.py`. A decoding step of MODEL cannot take less. Prints one JSON
line. Needs onnx, onnxruntime, numpy.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import onnx
from onnx import helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from latency_protocol import MIN_ROUNDS, alternate, describe, open_sessions  # noqa: E402


def gemv_model(model):
    """The weight products of `model` alone, their inputs, and the weights' bytes."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes, inputs, used = [], {}, set()
    for n in model.graph.node:
        if n.op_type != "MatMul":
            continue
        weight = inits.get(n.input[1])
        if weight is not None and len(weight.dims) == 2:
            k = weight.dims[0]
            inputs[f"x{k}"] = [1, 1, k]
            nodes.append(helper.make_node("MatMul", [f"x{k}", weight.name], [n.output[0] + ".gemv"]))
            used.add(weight.name)
            continue
        transpose = producer.get(n.input[1])
        if transpose is not None and transpose.op_type == "Transpose" and transpose.input[0] in inits:
            table = inits[transpose.input[0]]
            k = table.dims[1]
            inputs[f"row{k}"] = [1, k]
            nodes.append(helper.make_node("Gemm", [f"row{k}", table.name], [n.output[0] + ".gemv"],
                                          transB=1))
            used.add(table.name)
    graph = helper.make_graph(
        nodes, "gemv",
        [helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, d) for k, d in inputs.items()],
        [helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in nodes],
        [inits[u] for u in sorted(used)])
    weight_bytes = sum(int(np.prod(inits[u].dims)) * 4 for u in used)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), inputs, weight_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20, help=f"at least {MIN_ROUNDS}")
    a = p.parse_args()
    model, inputs, weight_bytes = gemv_model(onnx.load(a.model))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gemv.onnx")
        onnx.save(model, path, save_as_external_data=True)
        [session] = open_sessions([path], a.threads)
        rng = np.random.default_rng(0)
        feeds = {k: rng.standard_normal(d).astype(np.float32) for k, d in inputs.items()}
        [seconds] = alternate([lambda: session.run(None, feeds)], a.rounds)
    print(json.dumps({"model": a.model, **describe(a.threads, a.rounds),
                      "products": len(model.graph.node), "weight_mb": round(weight_bytes / 1e6, 1),
                      "gemv_only_ms": round(seconds * 1e3, 2)}))


if __name__ == "__main__":
    sys.exit(main())
