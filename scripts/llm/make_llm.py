#!/usr/bin/env python3
"""Build the tiny decoder-LLM corpus in testdata/llm/ with real exporters (torch dynamo, and the
legacy TorchScript exporter where it works). Run by hand only, never by CI.

    python3 scripts/llm/make_llm.py            # venv (if needed), every export, batches, checks, manifest

The interpreter: $LLM_PYTHON if set, else /opt/smollm-venv/bin/python when it exists (the venv
shared/llm/build.sh builds: torch 2.15, transformers 5.25, onnx 1.23.2, onnxruntime 1.32), else a
venv created under /work/venvs/llm from scripts/llm/requirements.txt (PyPI only).

Every model: hidden 64, 2 layers, 4 query heads and 2 key/value heads of 16 (grouped-query
attention), SiLU/GELU-gated MLP of 128, vocabulary 256, tied embeddings; every weight random
from a fixed seed, norm weights 1 + N(0, 0.1) and biases N(0, 0.1), so that a fusion that drops
a weight or a bias shows. Each architecture is written
  <arch>.<form>.<exporter><opset>.onnx
with form `prefill` (input_ids, attention_mask -> logits) or `past` (input_ids, attention_mask,
position_ids, past_key_values.N.key/value -> logits, present.N.key/value; the Kv cache as
[batch, kv_heads, past, head_dim]). The same geometry for every model lets them share the
batches in testdata/llm/calib/{prefill,past}/ (`<batch>.<input>.npy`, the corpus layout):
right- and left-padded rows, past of length 0 and > 0, a one-token decode step.
manifest.json records the versions, each file's exporter, size, sha256, op histogram, and
ONNX Runtime vs torch on every batch.
"""
import collections
import hashlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(REPO, "testdata", "llm")
SHARED_VENV_PY = "/opt/smollm-venv/bin/python"
OWN_VENV = "/work/venvs/llm"

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 64, 2, 4, 2, 16, 128, 256
SEED = 16


def interpreter():
    if os.environ.get("LLM_PYTHON"):
        return os.environ["LLM_PYTHON"]
    if os.path.exists(SHARED_VENV_PY):
        return SHARED_VENV_PY
    py = os.path.join(OWN_VENV, "bin", "python")
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", OWN_VENV])
        subprocess.check_call([py, "-m", "pip", "install", "-q", "-r", os.path.join(HERE, "requirements.txt")])
    return py


# ------------------------------------------------------------------------------------------------ models
def configs():
    """(name, transformers config class name, keyword arguments) for each architecture."""
    common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, intermediate_size=FFN, vocab_size=VOCAB,
                  tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  max_position_embeddings=256)
    return [
        ("llama3", "LlamaConfig", dict(common, head_dim=HEAD_DIM, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
        ("qwen2", "Qwen2Config", dict(common)),  # q/k/v projections with biases
        ("qwen3", "Qwen3Config", dict(common, head_dim=HEAD_DIM)),  # RMSNorm on q and k per head
        ("mistral", "MistralConfig", dict(common, head_dim=HEAD_DIM, sliding_window=None)),
        ("phi3", "Phi3Config", dict(common)),  # fused qkv_proj and gate_up_proj
        # q/k norms, four norms per layer, GeGLU, sqrt(hidden)-scaled embeddings (Gemma-2 has no sdpa path in
        # transformers 5.25: "Gemma2ForCausalLM does not support an attention implementation through sdpa")
        ("gemma3", "Gemma3TextConfig", dict(common, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
                                            sliding_window=4096)),
    ]


def build_model(cls_name, kwargs):
    import torch
    import transformers

    cfg = getattr(transformers, cls_name)(**kwargs)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                base = 0.0 if "gemma" in cls_name.lower() else 1.0  # Gemma's norms scale by 1 + w
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model


def prefill_module(model, batch_positions=False):
    import torch

    class Prefill(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            pos = None
            if batch_positions:
                # [batch, sequence] positions, so that cos/sin get the batch dim: without them the opset-23
                # RotaryEmbedding gets cos/sin of [1, S, D/2], which ONNX Runtime 1.32 refuses for batch > 1
                b, s = input_ids.shape
                pos = torch.arange(s, dtype=torch.int64).unsqueeze(0).expand(b, s)
            return self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                          use_cache=False).logits

    return Prefill(model).eval()


def past_module(model):
    import torch
    from transformers import DynamicCache

    class WithPast(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.m.config)
            for i in range(LAYERS):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            pres = []
            for layer in out.past_key_values.layers:
                pres += [layer.keys, layer.values]
            return (out.logits, *pres)

    return WithPast(model).eval()


def past_names():
    ins, outs = [], []
    for i in range(LAYERS):
        ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


# ------------------------------------------------------------------------------------------------ batches
def batches():
    """{form: {batch name: {input: array}}}: the calibration/validation inputs."""
    import numpy as np

    rng = np.random.default_rng(SEED)

    def ids(b, s):
        return rng.integers(3, VOCAB, size=(b, s), dtype=np.int64)

    def past(b, p):
        return {n: (0.5 * rng.standard_normal((b, KV_HEADS, p, HEAD_DIM))).astype(np.float32)
                for n in past_names()[0]}

    def positions(mask, new):
        # what HF's generate does: cumsum of the mask - 1, padding at 1, the last `new` columns
        pos = np.cumsum(mask, axis=1) - 1
        pos = np.where(mask == 0, 1, pos)
        return pos[:, -new:].astype(np.int64)

    right = np.array([[1] * 8, [1] * 5 + [0] * 3], dtype=np.int64)
    left = np.array([[1] * 8, [0] * 3 + [1] * 5], dtype=np.int64)
    prefill = {
        "b0_one": {"input_ids": ids(1, 8), "attention_mask": np.ones((1, 8), np.int64)},
        "b1_right": {"input_ids": ids(2, 8), "attention_mask": right},
        "b2_left": {"input_ids": ids(2, 8), "attention_mask": left},
    }
    with_past = {}
    # prefill through the cache model: past of length 0
    for name, mask in (("p0_right", right), ("p0_left", left)):
        with_past[name] = {"input_ids": ids(2, 8), "attention_mask": mask, "position_ids": positions(mask, 8),
                           **past(2, 0)}
    # one decode step after an 8-token prefill (right padding keeps its holes in the mask)
    for name, mask in (("d8_right", right), ("d8_left", left)):
        m = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        with_past[name] = {"input_ids": ids(2, 1), "attention_mask": m, "position_ids": positions(m, 1),
                           **past(2, 8)}
    # three new tokens after a past of 5, batch 1
    m = np.ones((1, 8), np.int64)
    with_past["c5_three"] = {"input_ids": ids(1, 3), "attention_mask": m, "position_ids": positions(m, 3),
                             **past(1, 5)}
    return {"prefill": prefill, "past": with_past}


# ------------------------------------------------------------------------------------------------ export
def strip_stack_traces(path):
    import onnx

    m = onnx.load(path)
    for nd in m.graph.node:
        keep = [p for p in nd.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del nd.metadata_props[:]
        nd.metadata_props.extend(keep)
    onnx.save(m, path)


def export(model, form, exporter, opset, path):
    import torch

    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("sequence", min=1, max=4096)
    ids = torch.tensor([[5, 17, 42, 99, 7, 8, 9, 10], [11, 12, 13, 14, 15, 0, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    pin, pout = past_names()
    if form == "prefill":
        mod, args = prefill_module(model, batch_positions=opset >= 23), (ids, mask)
        names_in, names_out = ["input_ids", "attention_mask"], ["logits"]
        dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch", 1: "sequence"}}
    else:
        past_len, new = 5, 3
        g = torch.Generator().manual_seed(0)
        past = [0.5 * torch.randn(2, KV_HEADS, past_len, HEAD_DIM, generator=g) for _ in pin]
        mod = past_module(model)
        args = (ids[:, :new], torch.ones(2, past_len + new, dtype=torch.int64),
                torch.arange(past_len, past_len + new).unsqueeze(0).repeat(2, 1), *past)
        names_in, names_out = ["input_ids", "attention_mask", "position_ids", *pin], ["logits", *pout]
        A = torch.export.Dim.AUTO
        dyn = ({0: A, 1: A}, {0: A, 1: A}, {0: A, 1: A}, tuple({0: A, 2: A} for _ in pin))
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
                "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
                **{n: {0: "batch", 2: "past_sequence"} for n in pin},
                **{n: {0: "batch", 2: "total_sequence"} for n in pout}}
    if exporter == "dynamo":
        prog = torch.onnx.export(mod, args, dynamo=True, input_names=names_in, output_names=names_out,
                                 dynamic_shapes=dyn, opset_version=opset)
        prog.save(path, external_data=False)
    else:
        torch.onnx.export(mod, args, path, dynamo=False, opset_version=opset, input_names=names_in,
                          output_names=names_out, dynamic_axes=axes)
    strip_stack_traces(path)


def torch_outputs(model, form, feed):
    import numpy as np
    import torch

    t = {k: torch.from_numpy(v) for k, v in feed.items()}
    with torch.no_grad():
        if form == "prefill":
            return [prefill_module(model)(t["input_ids"], t["attention_mask"]).numpy()]
        past = [t[n] for n in past_names()[0]]
        outs = past_module(model)(t["input_ids"], t["attention_mask"], t["position_ids"], *past)
        return [np.asarray(o) for o in outs]


def op_histogram(path):
    import onnx

    m = onnx.load(path)
    h = collections.Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in m.graph.node)
    return dict(sorted(h.items()))


def ort_vs_torch(path, model, form, feeds):
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    worst = {}
    for bname, feed in feeds.items():
        got = s.run(None, {n: feed[n] for n in names})
        want = torch_outputs(model, form, feed)
        mask = feed["attention_mask"].astype(bool)
        # a padded position's logits and (past layer 0) keys and values come from a softmax over a fully
        # masked row, which each runtime fills its own way: valid positions only
        diff = float(np.abs(got[0] - want[0])[mask[:, -got[0].shape[1]:]].max())
        for g, w in zip(got[1:], want[1:]):
            diff = max(diff, float(np.abs(g - w).transpose(0, 2, 1, 3)[mask].max()))
        worst[bname] = diff
    return worst


def run_all():
    import numpy as np
    import onnx
    import onnxruntime
    import torch
    import transformers

    os.makedirs(OUT, exist_ok=True)
    all_batches = batches()
    for form, bs in all_batches.items():
        d = os.path.join(OUT, "calib", form)
        os.makedirs(d, exist_ok=True)
        for bname, feed in bs.items():
            for n, a in feed.items():
                np.save(os.path.join(d, f"{bname}.{n}.npy"), a)
    manifest = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "geometry": {"hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS,
                     "head_dim": HEAD_DIM, "ffn": FFN, "vocab": VOCAB, "seed": SEED},
        "models": {}, "failed": {},
    }
    # the legacy exporter for Llama only, to keep the set small
    plan = [("dynamo", 20), ("dynamo", 23)]
    only = os.environ.get("LLM_ONLY", "")
    for arch, cls_name, kwargs in configs():
        if only and arch not in only.split(","):
            continue
        try:
            model = build_model(cls_name, kwargs)
        except Exception as e:  # recorded in the manifest like a failed export
            manifest["failed"][arch] = f"{type(e).__name__}: {str(e)[:600]}"
            continue
        for form in ("prefill", "past"):
            for exporter, opset in plan + ([("legacy", 17)] if arch == "llama3" else []):
                fname = f"{arch}.{form}.{exporter}{opset}.onnx"
                path = os.path.join(OUT, fname)
                print("export", fname, flush=True)
                try:
                    export(model, form, exporter, opset, path)
                    onnx.checker.check_model(path, full_check=True)
                    diff = ort_vs_torch(path, model, form, all_batches[form])
                except Exception as e:  # recorded, not hidden: the manifest says what failed and why
                    if os.path.exists(path):
                        os.unlink(path)
                    manifest["failed"][fname] = f"{type(e).__name__}: {str(e)[:600]}"
                    print("  failed:", manifest["failed"][fname][:300], flush=True)
                    continue
                worst = max(diff.values())
                if worst > 1e-4:
                    os.unlink(path)
                    manifest["failed"][fname] = f"ONNX Runtime differs from torch: {diff}"
                    print("  failed:", manifest["failed"][fname], flush=True)
                    continue
                data = open(path, "rb").read()
                manifest["models"][fname] = {
                    "arch": arch, "config": cls_name, "form": form, "exporter": exporter, "opset": opset,
                    "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    "ort_vs_torch_max_abs": diff, "ops": op_histogram(path),
                }
                print(f"  {len(data)} bytes, ORT vs torch {worst:.2e}", flush=True)
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    if os.environ.get("LLM_INNER") != "1":
        env = dict(os.environ, LLM_INNER="1", PYTHONDONTWRITEBYTECODE="1")
        sys.exit(subprocess.call([interpreter(), os.path.abspath(__file__)], env=env))
    run_all()
