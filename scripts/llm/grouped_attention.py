#!/usr/bin/env python3
"""A measurement, not a product path: rewrites every standard ONNX `Attention` of a decoder
(4-D Q/K/V `[batch, heads, sequence, head_size]`, a float additive mask `[batch, 1, sequence,
total]`, past and present K/V, as `onnxopt optimize` writes a grouped-query decoder) into
plain operators that attend over the KV heads without repeating them: each KV head's group
of query heads becomes the rows of one product.

    grouped_attention.py IN.onnx OUT.onnx

Per Attention: present = Concat(past, new) for K and V; Q `[B, Nq, S, H]` reshaped to
`[B, Nkv, G·S, H]` (query head h = kv·G + g serves KV head kv, as ONNX's Attention and
Hugging Face's `repeat_kv` pair them); FusedMatMul(Q, present K, transB, alpha = scale);
+ the mask tiled G times along its query axis (once for all layers); Softmax; MatMul with
present V; reshaped back to `[B, Nq, S, H]`. On SmolLM2-135M in ONNX Runtime 1.32 this ran
faster than the Attention operator at every step (see the closing note of stop 24); time
both with `decode_latency.py` or `latency_protocol`. Needs onnx, numpy.
"""
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper


def dims(graph, name):
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        if v.name == name:
            return [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
    sys.exit(f"no shape for `{name}`: run onnxopt's shape inference first")


def main():
    src, dst = sys.argv[1:3]
    model = onnx.load(src)
    graph = model.graph
    nodes, constants, tiled = [], {}, {}

    def const(name, values):
        if name not in constants:
            constants[name] = numpy_helper.from_array(np.array(values, np.int64), name)
        return name

    for n in graph.node:
        if n.op_type != "Attention" or n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        if len(n.input) != 6 or len(n.output) != 3 or not all(n.input) or not all(n.output):
            sys.exit(f"{n.name}: not the form this rewrites (Q, K, V, mask, past K, past V)")
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if set(attrs) - {"scale"}:
            sys.exit(f"{n.name}: attributes {sorted(set(attrs) - {'scale'})} not handled")
        q, k, v, mask, past_k, past_v = n.input
        y, present_k, present_v = n.output
        q_heads, head_size = dims(graph, q)[1], dims(graph, q)[3]
        kv_heads = dims(graph, k)[1]
        group = q_heads // kv_heads
        scale = attrs.get("scale", head_size ** -0.5)
        if mask not in tiled:
            tiled[mask] = mask + ".grouped"
            nodes.append(helper.make_node("Tile", [mask, const(f"grouped.tile.{group}", [1, 1, group, 1])],
                                          [tiled[mask]]))
        p = (n.name or y) + "/grouped"
        nodes += [
            helper.make_node("Concat", [past_k, k], [present_k], axis=2),
            helper.make_node("Concat", [past_v, v], [present_v], axis=2),
            helper.make_node("Reshape", [q, const(f"grouped.rows.{kv_heads}.{head_size}", [0, kv_heads, -1, head_size])],
                             [p + "/q"]),
            helper.make_node("FusedMatMul", [p + "/q", present_k], [p + "/scores"],
                             domain="com.microsoft", transB=1, alpha=scale),
            helper.make_node("Add", [p + "/scores", tiled[mask]], [p + "/masked"]),
            helper.make_node("Softmax", [p + "/masked"], [p + "/weights"], axis=-1),
            helper.make_node("MatMul", [p + "/weights", present_v], [p + "/out"]),
            helper.make_node("Reshape", [p + "/out", const(f"grouped.heads.{q_heads}.{head_size}",
                                                           [0, q_heads, -1, head_size])],
                             [y]),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(constants.values())
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, dst, save_as_external_data=True, location=dst.split("/")[-1] + ".data")


if __name__ == "__main__":
    sys.exit(main())
