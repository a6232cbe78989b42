#!/usr/bin/env python3
"""Perplexity of causal language models in ONNX Runtime (CPU) on text of our own, one
paragraph at a time (no padding), token 0 (`<|endoftext|>`, SmolLM2's document separator)
prepended so that every token of the paragraph is scored.

    perplexity.py --tokenizer DIR [--text FILE] [--threads 2] [--head-size H] MODEL [MODEL ...]

MODEL takes `input_ids` and `attention_mask` and returns `logits` (the prefill export of
`/work/shared/llm/build.sh`); a model with a KV cache gets empty `past_key_values.*` (and
`position_ids` where it takes them), so the with-past export and onnxruntime-genai's model
builder outputs are scored the same way (`--head-size` for a cache whose head size is a
named dim, as the builder writes it). FILE holds one paragraph per line (default:
`eval_paragraphs.txt` beside this script, written for this purpose, none of it from the
calibration paragraphs). Prints one JSON line per model: perplexity, tokens scored, file
size. Needs onnxruntime, numpy and transformers (the tokenizer).
"""
import argparse
import json
import math
import os

import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer

BOS_ID = 0
MAX_TOKENS = 256


def model_bytes(path):
    total = os.path.getsize(path)
    data = path + ".data"
    if os.path.exists(data):
        total += os.path.getsize(data)
    return total


def log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def feeds(session, ids, head_size):
    """The prompt `ids` with a mask of ones, positions from 0 and empty caches."""
    given = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            size = i.shape[3] if isinstance(i.shape[3], int) else head_size
            given[i.name] = np.zeros((1, i.shape[1], 0, size), dtype)
    return {i.name: given[i.name] for i in session.get_inputs()}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--text", default=os.path.join(here, "eval_paragraphs.txt"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--head-size", type=int, help="the cache's head size where the model names it")
    a = p.parse_args()
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    paragraphs = [l.strip() for l in open(a.text, encoding="utf-8") if l.strip()]
    docs = [[BOS_ID] + tok(t)["input_ids"][: MAX_TOKENS - 1] for t in paragraphs]
    for path in a.models:
        options = ort.SessionOptions()
        options.intra_op_num_threads = a.threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        nll, count = 0.0, 0
        for ids in docs:
            x = np.array([ids], dtype=np.int64)
            logits = session.run(["logits"], feeds(session, x, a.head_size))[0]
            lp = log_softmax(logits[0, :-1].astype(np.float64))
            nll -= lp[np.arange(len(ids) - 1), ids[1:]].sum()
            count += len(ids) - 1
        print(json.dumps({
            "model": path,
            "perplexity": round(math.exp(nll / count), 3),
            "tokens": count,
            "paragraphs": len(docs),
            "bytes": model_bytes(path),
        }), flush=True)


if __name__ == "__main__":
    main()
