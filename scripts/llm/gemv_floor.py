#!/usr/bin/env python3
"""The decode floor of a decoder in ONNX Runtime (CPU): how long its weight products alone
take for one token, i.e. reading every weight once, and with `--past N` the copies of its
KV cache that its interface asks for (present = past + the new token, per layer).

    gemv_floor.py MODEL [--past 512] [--threads 2] [--rounds 20]

Builds a model of MODEL's MatMuls with a constant 2-D weight (and a tied head, MatMul over
Transpose(table), as Gemm with transB) and its 4-bit products (com.microsoft MatMulNBits, as
they are, weights and attributes), each fed a random [1, 1, K] row; with `--past N`, a
Concat(past, new) for each `past_key_values.*` input, fed a past of N positions, as present;
and times it by `scripts/latency_protocol.py`. A decoding step of MODEL cannot take less.
Prints one JSON line. Needs onnx, onnxruntime, numpy.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from latency_protocol import MIN_ROUNDS, alternate, describe, open_sessions  # noqa: E402


def gemv_model(model, past=None):
    """The weight products of `model` alone (and, with `past`, its cache copies), their
    inputs as {name: shape}, and the weights' bytes."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes, inputs, used = [], {}, set()
    for n in model.graph.node:
        if n.op_type == "MatMulNBits" and n.domain == "com.microsoft":
            k = next(helper.get_attribute_value(a) for a in n.attribute if a.name == "K")
            inputs[f"x{k}"] = [1, 1, k]
            nodes.append(helper.make_node("MatMulNBits", [f"x{k}", *n.input[1:]],
                                          [n.output[0] + ".gemv"], domain="com.microsoft"))
            nodes[-1].attribute.extend(n.attribute)
            used.update(i for i in n.input[1:] if i)
            continue
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
    if past is not None:
        for i in model.graph.input:
            if not i.name.startswith("past_key_values"):
                continue
            dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
            heads, head_size = dims[1], dims[3]
            inputs[i.name] = [1, heads, past, head_size]
            inputs[i.name + ".new"] = [1, heads, 1, head_size]
            nodes.append(helper.make_node("Concat", [i.name, i.name + ".new"],
                                          [i.name.replace("past_key_values", "present")], axis=2))
    graph = helper.make_graph(
        nodes, "gemv",
        [helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, d) for k, d in inputs.items()],
        [helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in nodes],
        [inits[u] for u in sorted(used)])
    weight_bytes = sum(len(onnx.numpy_helper.to_array(inits[u]).tobytes()) for u in used)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets), inputs, weight_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--past", type=int, help="add the KV cache copies, after this many tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20, help=f"at least {MIN_ROUNDS}")
    a = p.parse_args()
    model, inputs, weight_bytes = gemv_model(onnx.load(a.model), a.past)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gemv.onnx")
        onnx.save(model, path, save_as_external_data=True)
        [session] = open_sessions([path], a.threads)
        rng = np.random.default_rng(0)
        feeds = {k: rng.standard_normal(d).astype(np.float32) for k, d in inputs.items()}
        [seconds] = alternate([lambda: session.run(None, feeds)], a.rounds)
    print(json.dumps({"model": a.model, **describe(a.threads, a.rounds),
                      "products": sum(n.op_type != "Concat" for n in model.graph.node),
                      "past": a.past, "weight_mb": round(weight_bytes / 1e6, 1),
                      "floor_ms": round(seconds * 1e3, 2)}))


if __name__ == "__main__":
    sys.exit(main())
