#!/usr/bin/env python3
"""Held-out quality of quantized sentence-embedding models on real text, padded as users pad
it: the cosine of each sentence's embedding from a candidate model to the float model's, in
ONNX Runtime (CPU). Run by hand, not by CI.

    heldout_cosine.py FLOAT NAME=MODEL [NAME=MODEL ...] [--tokenizer tokenizer.json]
                      [--sentences heldout/sentences.txt] [--batch 8] [--worst 3]
                      [--padding longest --padding fixed128]

The sentences (`heldout/sentences.txt`, one per line, 3 to ~60 words on varied topics) were
written for this evaluation and share nothing with the calibration sentences
(`calib/minilm/sentences.txt`): a model calibrated on those is scored on text it never saw.
They are tokenized with the model's `tokenizer.json` (default: beside FLOAT) and run in
batches of --batch sentences, `longest` padded to the batch's longest row (what a
sentence-transformers user sends), `fixed128` padded to 128 tokens (what a fixed-shape
deployment sends). The embedding is last_hidden_state mean-pooled over the attention mask,
L2-normalized (`quant_compare.embeddings`). Sessions use 2 intra-op threads, spinning off.
Prints one JSON line per model and padding: mean and min cosine, and the worst sentences.
Needs onnxruntime, numpy, tokenizers.
"""
import argparse
import json
import os

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from quant_compare import embeddings

HERE = os.path.dirname(os.path.abspath(__file__))


def session(path, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def batches(tokenizer, sentences, size, padding):
    """The feeds of each batch of `size` sentences, padded as `padding` says."""
    if padding == "longest":
        tokenizer.enable_padding()
    elif padding.startswith("fixed"):
        length = int(padding[len("fixed"):])
        tokenizer.enable_padding(length=length)
        tokenizer.enable_truncation(length)
    else:
        raise SystemExit(f"unknown padding {padding}")
    out = []
    for start in range(0, len(sentences), size):
        encoded = tokenizer.encode_batch(sentences[start:start + size])
        out.append({
            "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
        })
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("float_model")
    p.add_argument("models", nargs="+", help="NAME=MODEL")
    p.add_argument("--tokenizer")
    p.add_argument("--sentences", default=os.path.join(HERE, "heldout", "sentences.txt"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--padding", action="append")
    p.add_argument("--worst", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    tokenizer_path = a.tokenizer or os.path.join(os.path.dirname(a.float_model), "tokenizer.json")
    with open(a.sentences) as f:
        sentences = [line.strip() for line in f if line.strip()]
    reference = session(a.float_model, a.threads)
    models = [(m.split("=", 1)[0], session(m.split("=", 1)[1], a.threads)) for m in a.models]
    for padding in a.padding or ["longest", "fixed128"]:
        feeds = batches(Tokenizer.from_file(tokenizer_path), sentences, a.batch, padding)
        expected = embeddings(reference, feeds)
        for name, s in models:
            cos = (embeddings(s, feeds) * expected).sum(1)
            worst = np.argsort(cos)[:a.worst]
            print(json.dumps({
                "model": name,
                "padding": padding,
                "sentences": len(sentences),
                "mean_cosine": round(float(cos.mean()), 5),
                "min_cosine": round(float(cos.min()), 5),
                "worst": [[round(float(cos[i]), 4), sentences[i][:80]] for i in worst],
            }), flush=True)


if __name__ == "__main__":
    main()
