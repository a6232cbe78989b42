#!/usr/bin/env python3
"""tf2onnx exports of transformers' Keras (TF) models, random weights from a tiny config. Runs inside the `tf` venv
(tensorflow-cpu + tf2onnx + transformers with its TF models); called by `make_wild.py export tf`.

    /work/venvs/wild-tf/bin/python scripts/wild/export_tf.py export-env tf
"""
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_wild as W  # noqa: E402

# (arch, opset): tf2onnx.convert.from_function on a tf.function over the Keras model, int32 inputs
PLAN = [("tf-bert", 13), ("tf-bert", 17), ("tf-distilbert", 15), ("tf-roberta", 13)]


def versions():
    import numpy as np
    import tensorflow as tf
    import tf2onnx
    import transformers
    import onnx
    return {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "numpy": np.__version__}


def add_noise(model, seed):
    import numpy as np
    rng = np.random.RandomState(seed + 1)
    for w in sorted(model.weights, key=lambda w: w.name):
        if len(w.shape) == 1:
            w.assign_add((rng.standard_normal(tuple(w.shape)) * 0.02).astype(w.dtype.as_numpy_dtype))


def build(arch, seed):
    import tensorflow as tf
    import transformers as T
    tf.keras.backend.clear_session()  # layer names (and so tf2onnx's node names) restart for each model
    tf.keras.utils.set_random_seed(seed)
    common = dict(num_hidden_layers=W.L, hidden_size=W.H, num_attention_heads=W.NH, intermediate_size=W.FF,
                  vocab_size=W.V)
    if arch == "tf-bert":
        cfg = T.BertConfig(max_position_embeddings=64, **common)
        m, tt, pad, outs = T.TFBertModel(cfg), True, 0, ["last_hidden_state", "pooler_output"]
    elif arch == "tf-distilbert":
        cfg = T.DistilBertConfig(n_layers=W.L, dim=W.H, n_heads=W.NH, hidden_dim=W.FF, vocab_size=W.V,
                                 max_position_embeddings=64)
        m, tt, pad, outs = T.TFDistilBertModel(cfg), False, 0, ["last_hidden_state"]
    elif arch == "tf-roberta":
        cfg = T.RobertaConfig(max_position_embeddings=66, pad_token_id=1, **common)
        m, tt, pad, outs = T.TFRobertaModel(cfg), False, 1, ["last_hidden_state", "pooler_output"]
    else:
        raise KeyError(arch)
    batches = W.text_batches(seed, W.V, tt, pad)
    for b in batches:
        for k in b:
            b[k] = b[k].astype("int32")
    m({k: tf.constant(v) for k, v in batches[0].items()}, training=False)  # build the weights
    add_noise(m, seed)
    return m, list(batches[0]), outs, batches


def export_one(arch, opset, seed):
    import tensorflow as tf
    import tf2onnx
    m, ins, outs, batches = build(arch, seed)
    stem = "%s.tf2onnx%d.tf%s" % (arch, opset, "".join(tf.__version__.split(".")[:2]))
    path = os.path.join(W.OUT, stem + ".onnx")
    spec = [tf.TensorSpec((None, None), tf.int32, name=n) for n in ins]

    @tf.function(input_signature=spec)
    def f(*args):
        o = m(dict(zip(ins, args)), training=False)
        return {n: o[n] for n in outs}

    refs = []
    for b in batches:
        o = f(*[tf.constant(b[n]) for n in ins])
        refs.append({n: o[n].numpy() for n in outs})
    tf2onnx.convert.from_function(f, input_signature=spec, opset=opset, output_path=path)
    import onnx
    mm = onnx.load(path)
    info = {"file": stem + ".onnx", "stem": stem, "env": "tf", "arch": arch,
            "arch_name": {"tf-bert": "BERT (TFBertModel + pooler, Keras)",
                          "tf-distilbert": "DistilBERT (TFDistilBertModel, Keras)",
                          "tf-roberta": "RoBERTa (TFRobertaModel + pooler, Keras)"}[arch],
            "exporter": "tf2onnx", "opset_requested": opset, "attn_requested": None, "attn_implementation": "eager",
            "seed": seed, "versions": versions(),
            "exporter_call": "tf2onnx.convert.from_function(tf.function(model(dict, training=False)), "
                             "input_signature=int32 [None, None] per input, opset=%d)" % opset,
            "opset": next((o.version for o in mm.opset_import if o.domain in ("", "ai.onnx")), None),
            "inputs_declared": ins, "outputs_declared": outs,
            "graph_output_names": [o.name for o in mm.graph.output]}
    # tf2onnx names the outputs after the dict keys
    W.save(stem, batches, "calib")
    W.save(stem, refs, ".build/refs")
    return stem, info


def main():
    os.makedirs(os.path.join(W.BUILD, "info"), exist_ok=True)
    for k, (arch, opset) in enumerate(PLAN):
        seed = 2600 + k
        tag = "%s.tf2onnx%d" % (arch, opset)
        try:
            stem, info = export_one(arch, opset, seed)
            W.write_info(stem, info)
            print("exported", stem, flush=True)
        except Exception as e:  # noqa: BLE001
            msg = "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[0][:400] if str(e).strip() else "")
            W.write_info(tag + ".FAILED", {"file": None, "stem": tag, "env": "tf", "arch": arch, "exporter": "tf2onnx",
                                           "opset_requested": opset, "versions": versions(),
                                           "error": "export failed: " + msg})
            print("FAILED", tag, msg, flush=True)
            traceback.print_exc(limit=4)


if __name__ == "__main__":
    main()
