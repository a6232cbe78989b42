#!/usr/bin/env python3
"""Build the "wild corpus" (testdata/wild/): tiny random-weight transformer models exported by real exporters
(torch legacy/dynamo across torch 2.1 .. 2.10, Optimum, tf2onnx), their calibration batches, ORT's fusion counts
and onnxopt's baseline. Run by hand only (never by CI); see scripts/wild/README.md.

    python3 scripts/wild/make_wild.py setup [ENV ...]   # venvs from scripts/wild/req/<env>.txt (pinned, PyPI only)
    python3 scripts/wild/make_wild.py export [ENV ...]  # export in every venv, then `post` (ORT vs torch, manifest)
    python3 scripts/wild/make_wild.py count             # ONNX Runtime's transformers optimizer: fused-op counts
    python3 scripts/wild/make_wild.py baseline --onnxopt /work/onnxopt-wild-snap   # onnxopt vs ORT -> baseline.md

Internal stages: `export-env ENV` (inside the venv ENV), `post` (system python3: onnx + onnxruntime).
Every random number comes from a fixed seed.
"""
import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(REPO, "testdata", "wild")
BUILD = os.path.join(OUT, ".build")
VENVS = os.environ.get("WILD_VENVS", "/work/venvs")
MAX_BYTES = 1 << 20

# env name -> venv folder. t21 reuses the cases venv (same lock file as scripts/cases/requirements-t21.txt).
ENVS = {
    "t21": "cases-t21",
    "t24": "wild-t24",
    "t26": "wild-t26",
    "t27": "wild-t27",
    # torch 2.7.1 with transformers 4.57.3 (masking_utils' masks): optimum-onnx's venv
    "t27x": "wild-optimum-onnx",
    "t210": "wild-t210",
    "optimum": "wild-optimum",
    "optimum-onnx": "wild-optimum-onnx",
    "tf": "wild-tf",
    # `count` only: the system python3's onnxruntime 1.32.0 + onnx 1.23.2 (--system-site-packages) and torch, which
    # onnxruntime.transformers.optimizer imports when it runs ONNX Runtime's own graph optimization (opt_level > 0)
    "ort": "wild-ort",
}
EXPORT_ENVS = ["t21", "t24", "t26", "t27", "t27x", "t210", "optimum", "optimum-onnx", "tf"]
# Stem tags of envs that share a torch version with another (the tag otherwise: `t` + torch's major.minor)
ENV_TAGS = {"t27x": "t27x"}
ENV_TAG = None

# Tiny config (the corpus convention): 2 layers, hidden 64, 4 heads, FFN 128, vocab 1000; images 32x32, 8x8 patches.
L, H, NH, FF, V = 2, 64, 4, 128, 1000
# Models with an LM head (the legacy exporter stores a tied table twice) and DeBERTa-v2 (its dynamo export is
# > 1 MiB at vocab 1000) use a vocabulary of 512, to keep each file under 1 MiB.
V_SMALL = 512
# Text batches: (batch, sequence, real length of each row); rows shorter than `sequence` are right-padded.
TEXT_PLAN = [(1, 8, [8]), (2, 12, [12, 7])]
# Decoders with past: (batch, new tokens, past length, encoder length, real encoder length of each row)
DEC_PLAN = [(1, 1, 6, 8, [8]), (2, 3, 9, 12, [12, 7])]
IMAGE_BATCHES = [1, 2]

# --------------------------------------------------------------------------------------------------
# What each environment exports: (arch, exporter, opset, attn). exporter: ts = torch.onnx.export legacy
# TorchScript exporter (dynamo=False), dynamo = torch.onnx.export(dynamo=True). attn: eager/sdpa/None (the
# transformers version has no attn_implementation for that model, or it has one implementation only).
# --------------------------------------------------------------------------------------------------
PLANS = {
    "t21": [  # torch 2.1.2, transformers 4.36.2 (no SDPA for these models yet), sentence-transformers 2.7.0
        ("bert", "ts", 11, "eager"), ("albert", "ts", 14, "eager"), ("electra", "ts", 11, "eager"),
        ("mpnet", "ts", 14, "eager"), ("xlmr", "ts", 14, "eager"), ("deberta-v2", "ts", 14, "eager"),
        ("clip-text", "ts", 14, "eager"), ("deit", "ts", 11, "eager"), ("whisper-enc", "ts", 14, "eager"),
        ("whisper-dec-past", "ts", 14, "eager"), ("t5-dec-past", "ts", 14, "eager"),
        ("gpt2-past1", "ts", 14, "eager"), ("st-mpnet", "ts", 14, "eager"),
        ("llama-past", "ts", 14, "eager"), ("mistral-past", "ts", 14, "eager"),
        # opsets 9 and 10, torch's default before 1.12: Slice, Clip and Pad take attributes
        ("bert", "ts", 9, "eager"), ("distilbert", "ts", 10, "eager"), ("vit", "ts", 10, "eager"),
    ],
    "t24": [  # torch 2.4.1 (no dynamo= argument), transformers 4.44.2, sentence-transformers 3.0.1
        ("bert", "ts", 17, "sdpa"), ("distilbert", "ts", 14, "eager"), ("roberta", "ts", 17, "eager"),
        ("vit", "ts", 17, "sdpa"), ("dinov2", "ts", 17, "eager"), ("siglip-vision", "ts", 17, "eager"),
        ("clip-text", "ts", 17, "sdpa"), ("clip-vision", "ts", 14, "eager"), ("whisper-enc", "ts", 17, "sdpa"),
        ("bart-dec-past", "ts", 17, "sdpa"), ("gpt2-past", "ts", 17, "eager"), ("st-bert", "ts", 17, "sdpa"),
    ],
    "t26": [  # torch 2.6.0, transformers 4.48.3, onnxscript 0.1.0: the first dynamo exporter people used widely
        ("bert", "dynamo", 18, "sdpa"), ("vit", "dynamo", 18, "sdpa"), ("gpt2-past", "dynamo", 18, "sdpa"),
        ("whisper-dec-past", "dynamo", 18, "sdpa"),
        ("llama-past", "dynamo", 18, "sdpa"), ("qwen2-past", "dynamo", 18, "sdpa"), ("mistral-past", "dynamo", 18, "sdpa"),
        ("phi3-past", "dynamo", 18, "sdpa"), ("gemma2-past", "dynamo", 18, "eager"), ("qwen2-prefill", "dynamo", 18, "sdpa"),
    ],
    "t27": [  # torch 2.7.1, transformers 4.52.4, onnxscript 0.2.5
        ("bert", "dynamo", 18, "sdpa"), ("distilbert", "dynamo", 18, "eager"),
        ("albert", "dynamo", 18, "eager"), ("vit", "dynamo", 18, "eager"), ("clip-vision", "dynamo", 18, "sdpa"),
        ("whisper-enc", "dynamo", 18, "sdpa"), ("gpt2-past", "dynamo", 18, "sdpa"),
        ("bert", "dynamo", 20, "eager"), ("mpnet", "dynamo", 20, "eager"),
        ("bart-dec-past", "dynamo", 20, "eager"), ("xlmr", "ts", 17, "sdpa"), ("deberta-v2", "ts", 17, "eager"),
        ("llama-past", "ts", 17, "sdpa"), ("qwen2-past", "ts", 17, "eager"),
        ("phi-prefill", "ts", 17, "eager"), ("phi3-prefill", "ts", 17, "eager"), ("gpt-neox-prefill", "ts", 17, "eager"),
        ("gptj-prefill", "ts", 17, "eager"), ("codegen-prefill", "ts", 17, "eager"),
        ("qwen3-prefill", "ts", 17, "eager"), ("gemma2-prefill", "ts", 17, "eager"),
        ("stablelm-prefill", "ts", 17, "eager"), ("starcoder2-prefill", "ts", 17, "eager"),
        ("olmo-prefill", "ts", 17, "eager"), ("granite-prefill", "ts", 17, "eager"),
        ("persimmon-prefill", "ts", 17, "eager"), ("falcon-prefill", "ts", 17, "eager"),
        ("falcon-mq-prefill", "ts", 17, "eager"), ("opt-prefill", "ts", 17, "eager"),
        ("gpt-bigcode-prefill", "ts", 17, "eager"), ("bloom-prefill", "ts", 17, "eager"),
        ("mpt-prefill", "ts", 17, "eager"), ("mixtral-prefill", "ts", 17, "eager"),
        ("modernbert", "ts", 17, "eager"), ("modernbert", "dynamo", 18, "sdpa"), ("esm", "ts", 17, "eager"),
        ("roformer", "ts", 17, "eager"), ("beit", "ts", 17, "eager"),
        ("beit", "dynamo", 18, "sdpa"), ("swin", "ts", 17, "eager"), ("swin", "dynamo", 18, "eager"),
        ("convnext", "ts", 17, None), ("wav2vec2", "ts", 17, "eager"), ("wav2vec2", "dynamo", 18, "sdpa"),
        ("hubert", "ts", 17, "sdpa"), ("wavlm", "ts", 17, None),
        ("marian-dec-past", "ts", 17, "eager"), ("m2m100-dec-past", "ts", 17, "sdpa"),
        ("segformer", "ts", 17, None), ("yolos", "ts", 17, "eager"), ("yolos", "dynamo", 18, "sdpa"),
        ("hubert", "dynamo", 18, "eager"), ("wavlm", "dynamo", 18, None), ("esm", "dynamo", 18, "eager"),
        ("roformer", "dynamo", 18, "eager"), ("convnext", "dynamo", 18, None), ("segformer", "dynamo", 18, None),
        ("marian-dec-past", "dynamo", 18, "eager"), ("m2m100-dec-past", "dynamo", 18, "eager"),
        ("qwen3-past", "ts", 17, "eager"), ("gemma2-past", "ts", 17, "eager"), ("phi3-past", "ts", 17, "eager"),
        ("starcoder2-past", "ts", 17, "eager"),
        ("falcon-mq-past", "ts", 17, "eager"), ("stablelm-past", "ts", 17, "eager"), ("gptj-past", "ts", 17, "eager"),
        # decoder LLMs through torch 2.7's dynamo exporter (its default opset, 18)
        ("llama-past", "dynamo", 18, "sdpa"), ("qwen3-past", "dynamo", 18, "sdpa"), ("gemma2-past", "dynamo", 18, "eager"),
        ("phi3-past", "dynamo", 18, "sdpa"), ("gptj-past", "dynamo", 18, "eager"), ("falcon-mq-past", "dynamo", 18, "sdpa"),
    ],
    "t27x": [  # torch 2.7.1, transformers 4.57.3 (its masking_utils), onnxscript 0.2.5
        ("llama-past", "dynamo", 18, "sdpa"), ("qwen3-past", "dynamo", 18, "sdpa"), ("mistral-past", "dynamo", 18, "sdpa"),
        ("phi3-past", "dynamo", 18, "sdpa"), ("gemma2-past", "dynamo", 18, "eager"), ("gpt2-past", "dynamo", 18, "sdpa"),
        ("bert", "dynamo", 18, "sdpa"), ("llama-past", "ts", 17, "sdpa"), ("qwen2-prefill", "dynamo", 18, "sdpa"),
    ],
    "t210": [  # torch 2.10.0, transformers 5.2.0, onnxscript 0.6.2
        ("bert", "dynamo", 23, "sdpa"), ("gpt2-past", "dynamo", 23, "sdpa"), ("vit", "dynamo", 23, "sdpa"),
        ("whisper-dec-past", "dynamo", 23, "sdpa"), ("siglip-vision", "dynamo", 23, "sdpa"),
        ("distilbert", "dynamo", 20, "sdpa"), ("clip-text", "dynamo", 20, "sdpa"), ("electra", "dynamo", 20, "eager"),
        ("t5-dec-past", "dynamo", 20, "eager"), ("deberta-v2", "dynamo", 20, "eager"),
        ("xlmr", "dynamo", 18, "eager"), ("bart-dec-past", "dynamo", 18, "sdpa"),
        ("clip-vision", "ts", 17, "sdpa"), ("dinov2", "dynamo", 20, "sdpa"),
        # decoder LLMs through torch 2.10's dynamo exporter, transformers 5.2's masks
        ("llama-past", "dynamo", 20, "sdpa"), ("qwen3-past", "dynamo", 23, "sdpa"), ("mistral-past", "dynamo", 23, "sdpa"),
        ("gemma2-past", "dynamo", 20, "eager"), ("stablelm-past", "dynamo", 20, "sdpa"),
        ("qwen2-prefill", "dynamo", 20, "sdpa"),
    ],
}


# --------------------------------------------------------------------------------------------------
# export stage (runs inside a torch venv)
# --------------------------------------------------------------------------------------------------

def _torch():
    import torch
    torch.set_num_threads(1)
    return torch


def tv():
    """transformers version as a tuple of ints."""
    import transformers
    return tuple(int(x) for x in transformers.__version__.split(".")[:2])


def add_noise(model, seed):
    """The corpus convention: N(0, 0.02) added to every 1-D parameter (no bias exactly 0, no norm weight 1)."""
    import torch
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def make_config(cls, attn, **kw):
    if attn is not None:
        kw["attn_implementation"] = attn
    cfg = cls(**kw)
    if attn is not None:
        try:
            cfg._attn_implementation = attn
        except Exception:  # noqa: BLE001
            pass
    return cfg


def build(cls, cfg, seed, *args, **kw):
    torch = _torch()
    torch.manual_seed(seed)
    m = cls(cfg, *args, **kw)
    add_noise(m, seed)
    return m.eval()


def attn_of(model):
    c = getattr(model, "config", None)
    return getattr(c, "_attn_implementation", None) or "eager"


def text_batches(seed, vocab, token_type=False, pad_id=0, mask_name="attention_mask"):
    import numpy as np
    rng = np.random.RandomState(seed)
    out = []
    for b, s, lens in TEXT_PLAN:
        ids = rng.randint(5, vocab, size=(b, s)).astype(np.int64)
        mask = np.zeros((b, s), np.int64)
        tt = np.zeros((b, s), np.int64)
        for r, n in enumerate(lens):
            mask[r, :n] = 1
            ids[r, n:] = pad_id
            tt[r, n // 2:n] = 1
        d = {"input_ids": ids, mask_name: mask}
        if token_type:
            d["token_type_ids"] = tt
        out.append(d)
    return out


def image_batches(seed, size=32, channels=3):
    import numpy as np
    rng = np.random.RandomState(seed)
    return [{"pixel_values": rng.standard_normal((b, channels, size, size)).astype(np.float32)}
            for b in IMAGE_BATCHES]


TEXT_AXES = {0: "batch", 1: "sequence"}


def wrap(torch, fn):
    class W(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return fn(self.inner, *args)
    return W


# ---- KV cache helpers (legacy tuples for transformers < 4.50, Cache objects from 4.50 on) -------------------

def make_cache(self_kv, cross_kv=None):
    if tv() < (4, 45):  # 4.48 (t26) takes a DynamicCache only; 4.36 and 4.44 take the tuples
        if cross_kv is None:
            return tuple((k, v) for k, v in self_kv)
        return tuple((k, v, ck, cv) for (k, v), (ck, cv) in zip(self_kv, cross_kv))
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    def dyn(kvs):
        c = DynamicCache()
        for i, (k, v) in enumerate(kvs):
            c.update(k, v, i)
        return c
    if cross_kv is None:
        return dyn(self_kv)
    return EncoderDecoderCache(dyn(self_kv), dyn(cross_kv))


def cache_layers(pkv):
    """Self-attention (key, value) per layer of a returned cache."""
    if isinstance(pkv, (tuple, list)):
        return [(x[0], x[1]) for x in pkv]
    if hasattr(pkv, "self_attention_cache"):
        pkv = pkv.self_attention_cache
    if hasattr(pkv, "layers"):
        return [(l.keys, l.values) for l in pkv.layers]
    return list(zip(pkv.key_cache, pkv.value_cache))


# ---- models -----------------------------------------------------------------------------------------------

def enc_spec(model, ins, outs, batches, extra_axes=None):
    axes = {n: dict(TEXT_AXES) for n in ins if n != "pixel_values"}
    for n in outs:
        axes[n] = {0: "batch", 1: "sequence"} if n == "last_hidden_state" and "pixel_values" not in ins \
            else {0: "batch"}
    if "pixel_values" in ins:
        axes["pixel_values"] = {0: "batch"}
    axes.update(extra_axes or {})
    return model, ins, outs, batches, axes


def encoder_fn(ins, outs):
    """Call the model with the inputs by name; return its first len(outs) outputs."""
    def fn(m, *a):
        r = m(**dict(zip(ins, a)), return_dict=False)
        if not isinstance(r, (tuple, list)):
            r = (r,)
        return tuple(r[:len(outs)])
    return fn


def text_encoder(arch, attn, seed):
    """Encoder-only text models: (module, inputs, outputs, batches, dynamic axes, config note)."""
    torch = _torch()
    import transformers as T
    vocab = V_SMALL if arch == "deberta-v2" else V
    common = dict(num_hidden_layers=L, hidden_size=H, num_attention_heads=NH, intermediate_size=FF,
                  vocab_size=vocab)
    tt = False
    pad = 0
    outs = ["last_hidden_state"]
    if arch == "bert":
        cfg = make_config(T.BertConfig, attn, max_position_embeddings=64, **common)
        m = build(T.BertModel, cfg, seed)
        tt, outs = True, ["last_hidden_state", "pooler_output"]
    elif arch == "distilbert":
        cfg = make_config(T.DistilBertConfig, attn, n_layers=L, dim=H, n_heads=NH, hidden_dim=FF, vocab_size=V,
                          max_position_embeddings=64)
        m = build(T.DistilBertModel, cfg, seed)
    elif arch == "roberta":
        cfg = make_config(T.RobertaConfig, attn, max_position_embeddings=66, pad_token_id=1, **common)
        m = build(T.RobertaModel, cfg, seed, add_pooling_layer=False)
        pad = 1
    elif arch == "xlmr":
        cfg = make_config(T.XLMRobertaConfig, attn, max_position_embeddings=66, pad_token_id=1, **common)
        m = build(T.XLMRobertaModel, cfg, seed)
        pad, outs = 1, ["last_hidden_state", "pooler_output"]
    elif arch == "albert":
        cfg = make_config(T.AlbertConfig, attn, embedding_size=32, max_position_embeddings=64,
                          hidden_act="gelu_new", **common)
        m = build(T.AlbertModel, cfg, seed)
        tt, outs = True, ["last_hidden_state", "pooler_output"]
    elif arch == "electra":
        cfg = make_config(T.ElectraConfig, attn, embedding_size=32, max_position_embeddings=64, **common)
        m = build(T.ElectraModel, cfg, seed)
        tt = True
    elif arch == "mpnet":
        cfg = make_config(T.MPNetConfig, attn, max_position_embeddings=66, pad_token_id=1, **common)
        m = build(T.MPNetModel, cfg, seed, add_pooling_layer=False)
        pad = 1
    elif arch == "deberta-v2":
        cfg = make_config(T.DebertaV2Config, attn, max_position_embeddings=64, relative_attention=True,
                          position_buckets=32, pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
                          position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True,
                          type_vocab_size=0, **common)
        m = build(T.DebertaV2Model, cfg, seed)
    elif arch == "clip-text":
        cfg = make_config(T.CLIPTextConfig, attn, max_position_embeddings=32, eos_token_id=2, **common)
        m = build(T.CLIPTextModel, cfg, seed)
        outs = ["last_hidden_state", "pooler_output"]
    elif arch == "modernbert":
        c = dict(common)
        c.pop("intermediate_size")
        cfg = make_config(T.ModernBertConfig, attn, intermediate_size=FF // 2, max_position_embeddings=64,
                          global_attn_every_n_layers=2, local_attention=8, pad_token_id=0, reference_compile=False,
                          **c)
        m = build(T.ModernBertModel, cfg, seed)
    elif arch == "esm":
        cfg = make_config(T.EsmConfig, attn, max_position_embeddings=66, pad_token_id=1, mask_token_id=4,
                          position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                          **common)
        m = build(T.EsmModel, cfg, seed, add_pooling_layer=False)
        pad = 1
    elif arch == "roformer":
        cfg = make_config(T.RoFormerConfig, attn, max_position_embeddings=64, **common)
        m = build(T.RoFormerModel, cfg, seed)
        tt = True
    else:
        raise KeyError(arch)
    batches = text_batches(seed, vocab, tt, pad)
    if arch == "clip-text":  # an EOS token (id 2) ends each row, as the tokenizer writes it
        for b in batches:
            for r in range(b["input_ids"].shape[0]):
                n = int(b["attention_mask"][r].sum())
                b["input_ids"][r, n - 1] = 2
    ins = list(batches[0])
    return enc_spec(wrap(torch, encoder_fn(ins, outs))(m), ins, outs, batches) + (cfg,)


def vision_encoder(arch, attn, seed):
    torch = _torch()
    import transformers as T
    common = dict(num_hidden_layers=L, hidden_size=H, num_attention_heads=NH, intermediate_size=FF,
                  image_size=32, patch_size=8, num_channels=3)
    outs = ["last_hidden_state", "pooler_output"]
    if arch == "vit":
        cfg = make_config(T.ViTConfig, attn, **common)
        m = build(T.ViTModel, cfg, seed)
    elif arch == "deit":
        cfg = make_config(T.DeiTConfig, attn, **common)
        m = build(T.DeiTModel, cfg, seed)
    elif arch == "dinov2":
        c = dict(common)
        c.pop("intermediate_size")
        cfg = make_config(T.Dinov2Config, attn, mlp_ratio=2, **c)
        m = build(T.Dinov2Model, cfg, seed)
    elif arch == "clip-vision":
        cfg = make_config(T.CLIPVisionConfig, attn, **common)
        m = build(T.CLIPVisionModel, cfg, seed)
    elif arch == "siglip-vision":
        cfg = make_config(T.SiglipVisionConfig, attn, **common)
        m = build(T.SiglipVisionModel, cfg, seed)
    elif arch == "beit":
        cfg = make_config(T.BeitConfig, attn, use_relative_position_bias=True, use_mean_pooling=True,
                          layer_scale_init_value=0.1, **common)
        m = build(T.BeitModel, cfg, seed)
    elif arch == "swin":
        cfg = make_config(T.SwinConfig, attn, image_size=32, patch_size=2, num_channels=3, embed_dim=16,
                          depths=[2, 2], num_heads=[2, 4], window_size=4, mlp_ratio=2.0)
        m = build(T.SwinModel, cfg, seed)
    elif arch == "segformer":
        cfg = make_config(T.SegformerConfig, attn, num_channels=3, num_encoder_blocks=2, depths=[1, 1],
                          sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                          num_attention_heads=[1, 2], mlp_ratios=[2, 2])
        m = build(T.SegformerModel, cfg, seed)
        outs = ["last_hidden_state"]
    elif arch == "yolos":
        cfg = make_config(T.YolosConfig, attn, num_detection_tokens=4, **dict(common, image_size=[32, 32]))
        m = build(T.YolosModel, cfg, seed)
    elif arch == "convnext":
        cfg = make_config(T.ConvNextConfig, attn, image_size=32, patch_size=4, num_channels=3, num_stages=2,
                          hidden_sizes=[16, 32], depths=[2, 2])
        m = build(T.ConvNextModel, cfg, seed)
    else:
        raise KeyError(arch)
    # BEiT and Swin start their relative position bias tables at zeros (2-D, so add_noise leaves them): a
    # trained model's are not, and a zero bias would vanish from the graph.
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in sorted(m.named_parameters()):
            if "relative_position_bias_table" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return enc_spec(wrap(torch, encoder_fn(["pixel_values"], outs))(m), ["pixel_values"], outs, image_batches(seed)) + (cfg,)


def whisper_encoder(arch, attn, seed):
    torch = _torch()
    import numpy as np
    import transformers as T
    cfg = make_config(T.WhisperConfig, attn, vocab_size=V, num_mel_bins=80, encoder_layers=L, decoder_layers=L,
                      encoder_attention_heads=NH, decoder_attention_heads=NH, encoder_ffn_dim=FF,
                      decoder_ffn_dim=FF, d_model=H, max_source_positions=16, max_target_positions=32,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    m = build(T.WhisperForConditionalGeneration, cfg, seed).model.get_encoder()
    rng = np.random.RandomState(seed)
    batches = [{"input_features": rng.standard_normal((b, 80, 32)).astype(np.float32)} for b in IMAGE_BATCHES]
    return (wrap(torch, encoder_fn(["input_features"], ["last_hidden_state"]))(m), ["input_features"], ["last_hidden_state"], batches,
            {"input_features": {0: "batch"}, "last_hidden_state": {0: "batch"}}, cfg)


SPEECH_PLAN = [(1, 800, [800]), (2, 1200, [1200, 700])]  # (batch, samples, real samples of each row)


def speech_encoder(arch, attn, seed):
    """Raw-audio encoders: a convolutional feature extractor (GroupNorm after the first layer, or a LayerNorm
    after each with `do_stable_layer_norm`), a grouped positional convolution, then the transformer. Models whose
    extractor uses LayerNorms take the padding mask (wav2vec2-large-lv60, WavLM); the GroupNorm ones are run
    without it (wav2vec2-base, HuBERT base)."""
    torch = _torch()
    import numpy as np
    import transformers as T
    common = dict(num_hidden_layers=L, hidden_size=H, num_attention_heads=NH, intermediate_size=FF,
                  conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 4),
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=32)
    if arch == "wav2vec2":
        cfg = make_config(T.Wav2Vec2Config, attn, feat_extract_norm="layer", do_stable_layer_norm=True, **common)
        m, masked = build(T.Wav2Vec2Model, cfg, seed), True
    elif arch == "hubert":
        cfg = make_config(T.HubertConfig, attn, feat_extract_norm="group", do_stable_layer_norm=False, **common)
        m, masked = build(T.HubertModel, cfg, seed), False
    elif arch == "wavlm":
        cfg = make_config(T.WavLMConfig, attn, feat_extract_norm="layer", do_stable_layer_norm=True, num_buckets=32,
                          max_bucket_distance=64, **common)
        m, masked = build(T.WavLMModel, cfg, seed), True
    else:
        raise KeyError(arch)
    rng = np.random.RandomState(seed)
    batches = []
    for b, n, lens in SPEECH_PLAN:
        x = (0.1 * rng.standard_normal((b, n))).astype(np.float32)
        mask = np.zeros((b, n), np.int64)
        for r, k in enumerate(lens):
            mask[r, :k] = 1
            x[r, k:] = 0.0
        batches.append({"input_values": x, "attention_mask": mask} if masked else {"input_values": x})
    ins = list(batches[0])
    axes = {n: {0: "batch", 1: "samples"} for n in ins}
    axes["last_hidden_state"] = {0: "batch", 1: "frames"}
    return wrap(torch, encoder_fn(ins, ["last_hidden_state"]))(m), ins, ["last_hidden_state"], batches, axes, cfg


def seq2seq_decoder(arch, attn, seed):
    """Decoder step with past (Optimum's decoder_with_past layout): input_ids, encoder_hidden_states,
    [encoder_attention_mask,] past_key_values.<i>.decoder.key/value (self-attention, [b, h, past, d]),
    past_key_values.<i>.encoder.key/value (cross-attention, [b, h, enc, d]) -> logits, present.<i>.decoder.key/value."""
    torch = _torch()
    import numpy as np
    import transformers as T
    vocab = V_SMALL
    if arch == "t5-dec-past":
        cfg = make_config(T.T5Config, attn, vocab_size=vocab, d_model=H, d_kv=H // NH, d_ff=FF, num_layers=L,
                          num_decoder_layers=L, num_heads=NH, feed_forward_proj="gated-gelu",
                          relative_attention_num_buckets=8, decoder_start_token_id=0, is_encoder_decoder=True)
        full = build(T.T5ForConditionalGeneration, cfg, seed)
        dec, head, use_mask = full.get_decoder(), full.get_output_embeddings(), True
        scale = (H ** -0.5) if cfg.tie_word_embeddings else None
        bias = None
    elif arch == "bart-dec-past":
        cfg = make_config(T.BartConfig, attn, vocab_size=vocab, d_model=H, encoder_layers=L, decoder_layers=L,
                          encoder_attention_heads=NH, decoder_attention_heads=NH, encoder_ffn_dim=FF,
                          decoder_ffn_dim=FF, max_position_embeddings=64)
        full = build(T.BartForConditionalGeneration, cfg, seed)
        dec, head, use_mask, scale = full.model.get_decoder(), full.lm_head, True, None
        bias = full.final_logits_bias
    elif arch in ("marian-dec-past", "m2m100-dec-past"):
        cls, model_cls = {"marian-dec-past": (T.MarianConfig, T.MarianMTModel),
                          "m2m100-dec-past": (T.M2M100Config, T.M2M100ForConditionalGeneration)}[arch]
        cfg = make_config(cls, attn, vocab_size=vocab, d_model=H, encoder_layers=L, decoder_layers=L,
                          encoder_attention_heads=NH, decoder_attention_heads=NH, encoder_ffn_dim=FF,
                          decoder_ffn_dim=FF, max_position_embeddings=64, pad_token_id=1, decoder_start_token_id=1,
                          scale_embedding=True)
        full = build(model_cls, cfg, seed)
        dec, head, use_mask, scale = full.model.get_decoder(), full.lm_head, True, None
        bias = getattr(full, "final_logits_bias", None)
    elif arch == "whisper-dec-past":
        cfg = make_config(T.WhisperConfig, attn, vocab_size=vocab, num_mel_bins=80, encoder_layers=L,
                          decoder_layers=L, encoder_attention_heads=NH, decoder_attention_heads=NH,
                          encoder_ffn_dim=FF, decoder_ffn_dim=FF, d_model=H, max_source_positions=16,
                          max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          decoder_start_token_id=1)
        full = build(T.WhisperForConditionalGeneration, cfg, seed)
        dec, head, use_mask, scale, bias = full.model.get_decoder(), full.proj_out, False, None, None
    else:
        raise KeyError(arch)
    nl = L

    class Dec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dec, self.head = dec, head
            self.bias = bias

        def forward(self, input_ids, encoder_hidden_states, *rest):
            if use_mask:
                enc_mask, rest = rest[0], rest[1:]
            flat = list(rest)
            self_kv = [(flat[4 * i], flat[4 * i + 1]) for i in range(nl)]
            cross_kv = [(flat[4 * i + 2], flat[4 * i + 3]) for i in range(nl)]
            kw = dict(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states,
                      past_key_values=make_cache(self_kv, cross_kv), use_cache=True, return_dict=True)
            if use_mask:
                kw["encoder_attention_mask"] = enc_mask
            o = self.dec(**kw)
            h = o.last_hidden_state
            if scale is not None:
                h = h * scale
            logits = self.head(h)
            if self.bias is not None:
                logits = logits + self.bias
            res = [logits]
            for k, v in cache_layers(o.past_key_values):
                res += [k, v]
            return tuple(res)

    rng = np.random.RandomState(seed)
    hd = H // NH
    batches = []
    for b, s, p, e, lens in DEC_PLAN:
        d = {"input_ids": rng.randint(5, vocab, size=(b, s)).astype(np.int64),
             "encoder_hidden_states": rng.standard_normal((b, e, H)).astype(np.float32)}
        if use_mask:
            mask = np.zeros((b, e), np.int64)
            for r, n in enumerate(lens):
                mask[r, :n] = 1
            d["encoder_attention_mask"] = mask
        for i in range(nl):
            for part, ln in (("decoder", p), ("encoder", e)):
                for kv in ("key", "value"):
                    d["past_key_values.%d.%s.%s" % (i, part, kv)] = rng.standard_normal((b, NH, ln, hd)).astype(
                        np.float32)
        batches.append(d)
    ins = list(batches[0])
    outs = ["logits"] + ["present.%d.decoder.%s" % (i, kv) for i in range(nl) for kv in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "encoder_hidden_states": {0: "batch", 1: "encoder_sequence"},
            "encoder_attention_mask": {0: "batch", 1: "encoder_sequence"}, "logits": {0: "batch", 1: "sequence"}}
    for n in ins + outs:
        if n.startswith("past_key_values"):
            axes[n] = {0: "batch", 2: "past_sequence" if ".decoder." in n else "encoder_sequence"}
        elif n.startswith("present"):
            axes[n] = {0: "batch", 2: "past_sequence+sequence"}
    axes = {k: v for k, v in axes.items() if k in ins + outs}
    return Dec().eval(), ins, outs, batches, axes, cfg


def gpt2_past(arch, attn, seed):
    """GPT-2 LM step with a KV cache. gpt2-past: per-layer past_key_values.<i>.key/value -> present.<i>.key/value
    (the corpus layout). gpt2-past1: ONNX Runtime's gpt2_helper layout, one tensor per layer: past_<i>
    [2, batch, heads, past, head] -> present_<i>, plus position_ids."""
    torch = _torch()
    import numpy as np
    import transformers as T
    cfg = make_config(T.GPT2Config, attn, vocab_size=V_SMALL, n_positions=64, n_embd=H, n_layer=L, n_head=NH,
                      n_inner=FF)
    full = build(T.GPT2LMHeadModel, cfg, seed)
    single = arch == "gpt2-past1"
    nl = L

    class G(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = full

        def forward(self, input_ids, *rest):
            if single:
                position_ids, attention_mask = rest[0], rest[1]
                kv = [(p[0], p[1]) for p in rest[2:]]
                kw = dict(position_ids=position_ids)
            else:
                attention_mask = rest[0]
                kv = [(rest[1 + 2 * i], rest[2 + 2 * i]) for i in range(nl)]
                kw = {}
            o = self.m(input_ids=input_ids, attention_mask=attention_mask, past_key_values=make_cache(kv),
                       use_cache=True, return_dict=True, **kw)
            res = [o.logits]
            for k, v in cache_layers(o.past_key_values):
                res += [torch.stack([k, v])] if single else [k, v]
            return tuple(res)

    rng = np.random.RandomState(seed)
    hd = H // NH
    batches = []
    for b, s, p, _, _ in DEC_PLAN:
        mask, positions = left_padded_step(b, s, p)
        d = {"input_ids": rng.randint(5, V_SMALL, size=(b, s)).astype(np.int64)}
        if single:
            d["position_ids"] = positions
        d["attention_mask"] = mask
        for i in range(nl):
            if single:
                d["past_%d" % i] = rng.standard_normal((2, b, NH, p, hd)).astype(np.float32)
            else:
                for kv in ("key", "value"):
                    d["past_key_values.%d.%s" % (i, kv)] = rng.standard_normal((b, NH, p, hd)).astype(np.float32)
        batches.append(d)
    ins = list(batches[0])
    if single:
        outs = ["logits"] + ["present_%d" % i for i in range(nl)]
    else:
        outs = ["logits"] + ["present.%d.%s" % (i, kv) for i in range(nl) for kv in ("key", "value")]
    axes = step_axes(ins, outs, (1, 3) if single else (0, 2))
    return G().eval(), ins, outs, batches, axes, cfg


def left_padded_step(b, s, p):
    """A decoder step of `s` new tokens over `p` past ones: the mask, row 1 left-padded by 2 in its past (as in
    generation with left padding), and the new tokens' positions as transformers' generate computes them (cumsum
    of the mask - 1, 1 where masked)."""
    import numpy as np
    mask = np.ones((b, p + s), np.int64)
    if b > 1:
        mask[1, :2] = 0
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    return mask, pos[:, p:].astype(np.int64)


def step_axes(ins, outs, cache_axes):
    """Dynamic axes of a decoder step whose cache tensors (`past_*`, `present*`) hold the batch and the past
    positions at `cache_axes`."""
    batch_axis, past_axis = cache_axes
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "past_sequence+sequence"}, "logits": {0: "batch", 1: "sequence"}}
    for n in ins + outs:
        if n.startswith("past_"):
            axes[n] = {batch_axis: "batch", past_axis: "past_sequence"}
        elif n.startswith("present"):
            axes[n] = {batch_axis: "batch", past_axis: "past_sequence+sequence"}
    return {k: v for k, v in axes.items() if k in ins + outs}


def decoder_config(family, attn):
    """(config, model class) of a tiny decoder LLM of `family`: Phi-2 and Phi-3 rotate half of each head,
    GPT-NeoX a quarter (partial rotary); GPT-J and CodeGen rotate interleaved pairs of half of each head, before
    the heads are transposed; 4 query heads over 2 key/value heads where the architecture groups them."""
    import transformers as T
    common = dict(vocab_size=V_SMALL, hidden_size=H, intermediate_size=FF, num_hidden_layers=L,
                  num_attention_heads=NH, max_position_embeddings=128)
    grouped = dict(common, num_key_value_heads=NH // 2)
    interleaved = dict(vocab_size=V_SMALL, n_embd=H, n_inner=FF, n_layer=L, n_head=NH, n_positions=128,
                       rotary_dim=H // NH // 2)
    falcon = dict(vocab_size=V_SMALL, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH,
                  max_position_embeddings=128)
    cfg = {
        "llama": lambda: make_config(T.LlamaConfig, attn, **grouped),
        "mistral": lambda: make_config(T.MistralConfig, attn, **grouped),
        "qwen2": lambda: make_config(T.Qwen2Config, attn, **grouped),
        "phi": lambda: make_config(T.PhiConfig, attn, partial_rotary_factor=0.5, **common),
        "phi3": lambda: make_config(T.Phi3Config, attn, partial_rotary_factor=0.5, pad_token_id=0, **grouped),
        "gpt-neox": lambda: make_config(T.GPTNeoXConfig, attn, rotary_pct=0.25, **common),
        "gptj": lambda: make_config(T.GPTJConfig, attn, **interleaved),
        "codegen": lambda: make_config(T.CodeGenConfig, attn, **interleaved),
        "qwen3": lambda: make_config(T.Qwen3Config, attn, head_dim=H // NH, **grouped),
        # a cap the tiny random scores reach (Gemma-2's 50 would leave them as they are)
        "gemma2": lambda: make_config(T.Gemma2Config, attn, head_dim=H // NH, attn_logit_softcapping=0.05,
                                      **grouped),
        "stablelm": lambda: make_config(T.StableLmConfig, attn, partial_rotary_factor=0.25, **grouped),
        "starcoder2": lambda: make_config(T.Starcoder2Config, attn, **grouped),
        "olmo": lambda: make_config(T.OlmoConfig, attn, **grouped),
        "granite": lambda: make_config(T.GraniteConfig, attn, **grouped),
        "persimmon": lambda: make_config(T.PersimmonConfig, attn, **common),
        "falcon": lambda: make_config(T.FalconConfig, attn, num_kv_heads=NH // 2, new_decoder_architecture=True,
                                      **falcon),
        "falcon-mq": lambda: make_config(T.FalconConfig, attn, alibi=False, multi_query=True, parallel_attn=True,
                                         **falcon),
        "opt": lambda: make_config(T.OPTConfig, attn, vocab_size=V_SMALL, hidden_size=H, ffn_dim=FF,
                                   num_hidden_layers=L, num_attention_heads=NH, max_position_embeddings=128,
                                   word_embed_proj_dim=H),
        "gpt-bigcode": lambda: make_config(T.GPTBigCodeConfig, attn, vocab_size=V_SMALL, n_embd=H, n_layer=L,
                                           n_head=NH, n_inner=FF, n_positions=128, multi_query=True),
        "bloom": lambda: make_config(T.BloomConfig, attn, vocab_size=V_SMALL, hidden_size=H, n_layer=L, n_head=NH),
        "mpt": lambda: make_config(T.MptConfig, attn, vocab_size=V_SMALL, d_model=H, n_heads=NH, n_layers=L,
                                   expansion_ratio=FF // H, max_seq_len=128),
        # experts of a quarter of the FFN, to keep the file under 1 MiB
        "mixtral": lambda: make_config(T.MixtralConfig, attn, num_local_experts=4, num_experts_per_tok=2,
                                       **dict(grouped, intermediate_size=FF // 4)),
    }[family]()
    return cfg, T.AutoModelForCausalLM.from_config(cfg).__class__


def cache_heads(cfg):
    """Key/value heads of a decoder's cache."""
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        return 1
    for name in ("num_key_value_heads", "num_kv_heads"):
        n = getattr(cfg, name, None)
        if n:
            return n
    return NH


def llm_past(arch, attn, seed):
    """Decoder LLM step with a KV cache (Llama, Mistral, Qwen2 and the families of `decoder_config`): input_ids,
    attention_mask, position_ids, past_key_values.<i>.key/value -> logits, present.<i>.key/value (the layout of
    Optimum's text-generation-with-past and of testdata/llm's `past` form). Positions follow the mask (cumsum - 1,
    1 where masked), as transformers' generate feeds them."""
    torch = _torch()
    import numpy as np
    cfg, cls = decoder_config(arch[:-len("-past")], attn)
    kv_heads = cache_heads(cfg)
    full = build(cls, cfg, seed)
    nl = L

    class D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = full

        def forward(self, input_ids, attention_mask, position_ids, *past):
            kv = [(past[2 * i], past[2 * i + 1]) for i in range(nl)]
            o = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=make_cache(kv), use_cache=True, return_dict=True)
            res = [o.logits]
            for k, v in cache_layers(o.past_key_values):
                res += [k, v]
            return tuple(res)

    rng = np.random.RandomState(seed)
    hd = H // NH
    batches = []
    for b, s, p, _, _ in DEC_PLAN:
        mask, positions = left_padded_step(b, s, p)
        d = {"input_ids": rng.randint(5, V_SMALL, size=(b, s)).astype(np.int64), "attention_mask": mask,
             "position_ids": positions}
        for i in range(nl):
            for kv in ("key", "value"):
                d["past_key_values.%d.%s" % (i, kv)] = rng.standard_normal((b, kv_heads, p, hd)).astype(np.float32)
        batches.append(d)
    ins = list(batches[0])
    outs = ["logits"] + ["present.%d.%s" % (i, kv) for i in range(nl) for kv in ("key", "value")]
    return D().eval(), ins, outs, batches, step_axes(ins, outs, (0, 2)), cfg


def llm_prefill(arch, attn, seed):
    """Decoder LLM without a cache, as an embedding model or a first step runs it: input_ids, attention_mask ->
    logits, on the text batches (row 1 right-padded); the families of `decoder_config`."""
    torch = _torch()
    cfg, cls = decoder_config(arch[:-len("-prefill")], attn)
    full = build(cls, cfg, seed)

    class P(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = full

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    batches = text_batches(seed, V_SMALL)
    ins = list(batches[0])
    return P().eval(), ins, ["logits"], batches, dict({n: dict(TEXT_AXES) for n in ins + ["logits"]}), cfg


def sentence_transformer(arch, attn, seed):
    """sentence-transformers SentenceTransformer (tiny local model folder) exported whole: transformer -> mean
    pooling -> L2 normalize."""
    torch = _torch()
    import transformers as T
    from sentence_transformers import SentenceTransformer, models as st_models
    common = dict(num_hidden_layers=L, hidden_size=H, num_attention_heads=NH, intermediate_size=FF, vocab_size=V)
    if arch == "st-mpnet":
        cfg = make_config(T.MPNetConfig, attn, max_position_embeddings=66, pad_token_id=1, **common)
        inner = build(T.MPNetModel, cfg, seed)
        tok_cls, tt, pad = T.MPNetTokenizerFast, False, 1
    else:
        cfg = make_config(T.BertConfig, attn, max_position_embeddings=64, **common)
        inner = build(T.BertModel, cfg, seed)
        tok_cls, tt, pad = T.BertTokenizerFast, True, 0
    tmp = tempfile.mkdtemp()
    d = os.path.join(tmp, "hf")
    inner.save_pretrained(d)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + ["tok%d" % i for i in range(V - 5)]
    if arch == "st-mpnet":
        vocab = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + ["tok%d" % i for i in range(V - 5)]
    with open(os.path.join(tmp, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok_cls(os.path.join(tmp, "vocab.txt")).save_pretrained(d)
    word = st_models.Transformer(d, max_seq_length=64)
    pool = st_models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    st = SentenceTransformer(modules=[word, pool, st_models.Normalize()], device="cpu")
    sd = os.path.join(tmp, "st")
    st.save(sd)
    st = SentenceTransformer(sd, device="cpu").eval()
    shutil.rmtree(tmp, ignore_errors=True)
    batches = text_batches(seed, V, tt, pad)
    ins = list(batches[0])

    class S(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.st = st

        def forward(self, *a):
            return self.st(dict(zip(ins, a)))["sentence_embedding"]

    cfg = st[0].auto_model.config
    return S().eval(), ins, ["sentence_embedding"], batches, \
        dict({n: dict(TEXT_AXES) for n in ins}, sentence_embedding={0: "batch"}), cfg


BUILDERS = {}
for _a in ("bert", "distilbert", "roberta", "xlmr", "albert", "electra", "mpnet", "deberta-v2", "clip-text"):
    BUILDERS[_a] = text_encoder
for _a in ("vit", "deit", "dinov2", "clip-vision", "siglip-vision"):
    BUILDERS[_a] = vision_encoder
BUILDERS["whisper-enc"] = whisper_encoder
for _a in ("modernbert", "esm", "roformer"):
    BUILDERS[_a] = text_encoder
for _a in ("beit", "swin", "convnext", "segformer", "yolos"):
    BUILDERS[_a] = vision_encoder
for _a in ("wav2vec2", "hubert", "wavlm"):
    BUILDERS[_a] = speech_encoder
for _a in ("t5-dec-past", "bart-dec-past", "whisper-dec-past", "marian-dec-past", "m2m100-dec-past"):
    BUILDERS[_a] = seq2seq_decoder
BUILDERS["gpt2-past"] = BUILDERS["gpt2-past1"] = gpt2_past
BUILDERS["st-mpnet"] = BUILDERS["st-bert"] = sentence_transformer
for _a in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "starcoder2", "falcon-mq", "stablelm", "gptj"):
    BUILDERS[_a + "-past"] = llm_past
for _a in ("phi", "phi3", "gpt-neox", "gptj", "codegen", "qwen2", "qwen3", "gemma2", "stablelm", "starcoder2", "olmo",
           "granite", "persimmon", "falcon", "falcon-mq", "opt", "gpt-bigcode", "bloom", "mpt", "mixtral"):
    BUILDERS[_a + "-prefill"] = llm_prefill

ARCH_NAMES = {
    "bert": "BERT (BertModel + pooler)", "distilbert": "DistilBERT (DistilBertModel)",
    "roberta": "RoBERTa (RobertaModel, no pooler)", "xlmr": "XLM-RoBERTa (XLMRobertaModel + pooler)",
    "albert": "ALBERT (AlbertModel, embedding 32, gelu_new)", "electra": "ELECTRA (ElectraModel, embedding 32)",
    "mpnet": "MPNet (MPNetModel, relative position bias)", "deberta-v2": "DeBERTa-v2 (DebertaV2Model, p2c+c2p)",
    "clip-text": "CLIP text (CLIPTextModel, causal + padding mask, quick_gelu)",
    "vit": "ViT (ViTModel + pooler)", "deit": "DeiT (DeiTModel, CLS + distillation token)",
    "dinov2": "DINOv2 (Dinov2Model, layer scale)", "clip-vision": "CLIP vision (CLIPVisionModel, quick_gelu)",
    "siglip-vision": "SigLIP vision (SiglipVisionModel, attention-pool head)",
    "whisper-enc": "Whisper encoder (WhisperEncoder, 80 mel bins x 32 frames)",
    "modernbert": "ModernBERT (ModernBertModel: RoPE, GeGLU, a local sliding-window layer and a global one)",
    "esm": "ESM-2 (EsmModel: rotary positions, token-dropout rescaling)",
    "roformer": "RoFormer (RoFormerModel: interleaved rotary positions)",
    "beit": "BEiT (BeitModel: relative position bias, layer scale, mean pooling)",
    "swin": "Swin (SwinModel: shifted windows, relative position bias, patch merging)",
    "convnext": "ConvNeXt (ConvNextModel: depthwise convolutions, channels-last LayerNorm, no attention)",
    "marian-dec-past": "Marian decoder step with past (sinusoidal positions, scaled embeddings) + LM head",
    "m2m100-dec-past": "M2M100 / NLLB decoder step with past (sinusoidal positions, pre-norm) + LM head",
    "segformer": "SegFormer (MiT encoder: overlapping patch embeddings, attention over spatially reduced keys)",
    "yolos": "YOLOS (ViT with detection tokens, interpolated positions)",
    "wav2vec2": "wav2vec 2.0 large-style (LayerNorm feature extractor, padding mask, positional convolution)",
    "hubert": "HuBERT base-style (GroupNorm feature extractor, no mask, positional convolution)",
    "wavlm": "WavLM (gated relative position bias, padding mask)",
    "whisper-dec-past": "Whisper decoder step with past (self + cross KV inputs) + proj_out",
    "llama-past": "Llama LM step with past (grouped KV heads, RoPE, RMSNorm, SiLU-gated MLP)",
    "mistral-past": "Mistral LM step with past (grouped KV heads)",
    "qwen2-past": "Qwen2 LM step with past (grouped KV heads, QKV biases)",
    "qwen3-past": "Qwen3 LM step with past (q/k RMSNorms, grouped KV heads)",
    "gemma2-past": "Gemma-2 LM step with past (soft-capped attention logits)",
    "phi3-past": "Phi-3 LM step with past (packed QKV and gate/up, half of each head rotated)",
    "starcoder2-past": "StarCoder2 LM step with past (grouped KV heads, biases)",
    "falcon-mq-past": "Falcon-RW style LM step with past (multi-query: one KV head)",
    "stablelm-past": "StableLM LM step with past (a quarter of each head rotated)",
    "gptj-past": "GPT-J LM step with past (interleaved rotary pairs)",
    "phi-prefill": "Phi-2 LM without cache (half of each head rotated)",
    "phi3-prefill": "Phi-3 LM without cache (grouped KV heads, half of each head rotated)",
    "gpt-neox-prefill": "GPT-NeoX LM without cache (a quarter of each head rotated, parallel residual)",
    "gptj-prefill": "GPT-J LM without cache (interleaved pairs of half of each head rotated, parallel residual)",
    "codegen-prefill": "CodeGen LM without cache (interleaved pairs of half of each head rotated, packed QKV)",
    "qwen3-prefill": "Qwen3 LM without cache (q/k RMSNorms, grouped KV heads)",
    "qwen2-prefill": "Qwen2 LM without cache, as an embedding model runs it (grouped KV heads, QKV biases)",
    "gemma2-prefill": "Gemma-2 LM without cache (attention logit soft-capping, four norms per layer)",
    "stablelm-prefill": "StableLM LM without cache (a quarter of each head rotated, LayerNorm)",
    "starcoder2-prefill": "StarCoder2 LM without cache (grouped KV heads, biases, LayerNorm, GELU MLP)",
    "olmo-prefill": "OLMo LM without cache (LayerNorm without parameters)",
    "granite-prefill": "Granite LM without cache (scaled embeddings, residuals and logits)",
    "persimmon-prefill": "Persimmon LM without cache (q/k LayerNorms, half of each head rotated)",
    "falcon-prefill": "Falcon LM without cache (new decoder architecture: grouped KV heads, parallel attention)",
    "falcon-mq-prefill": "Falcon-RW style LM without cache (multi-query: one KV head, parallel attention)",
    "opt-prefill": "OPT LM without cache (learned positions offset by 2)",
    "gpt-bigcode-prefill": "GPT-BigCode (StarCoder) LM without cache (multi-query attention)",
    "bloom-prefill": "BLOOM LM without cache (ALiBi)",
    "mpt-prefill": "MPT LM without cache (ALiBi, no biases)",
    "mixtral-prefill": "Mixtral LM without cache (sparse mixture of 4 experts, 2 per token)",
    "t5-dec-past": "T5 v1.1 decoder step with past (self + cross KV inputs) + scaled tied LM head",
    "bart-dec-past": "BART decoder step with past (self + cross KV inputs) + LM head + final_logits_bias",
    "gpt2-past": "GPT-2 LM step, per-layer past key/value inputs, present outputs",
    "gpt2-past1": "GPT-2 LM step, ORT gpt2_helper layout: one past_<i> [2,b,h,p,d] per layer + position_ids",
    "st-mpnet": "sentence-transformers: MPNet -> mean pooling -> Normalize",
    "st-bert": "sentence-transformers: BERT -> mean pooling -> Normalize",
}


def versions():
    import torch
    import transformers
    v = {"torch": torch.__version__, "transformers": transformers.__version__}
    from importlib import metadata  # optimum 2 has no __version__
    for dist in ("onnx", "onnxscript", "sentence-transformers", "optimum", "optimum-onnx"):
        try:
            v[dist] = metadata.version(dist)
        except Exception:  # noqa: BLE001
            pass
    return v


def torch_short():
    if ENV_TAG:
        return ENV_TAG
    import torch
    return "t" + "".join(torch.__version__.split("+")[0].split(".")[:2])


def flat_outputs(r):
    torch = _torch()
    if isinstance(r, torch.Tensor):
        return [r]
    return list(r)


def fixed_arity(torch, model, n):
    """The model behind a forward(self, x0, .., xn-1): the dynamo exporter maps dynamic_axes to dynamic_shapes
    through the forward's signature (a *args forward fails)."""
    names = ", ".join("x%d" % i for i in range(n))
    ns = {}
    exec("def forward(self, %s):\n    return self.m(%s)\n" % (names, names), ns)
    w = type("Fixed%d" % n, (torch.nn.Module,), {"forward": ns["forward"]})()
    w.m = model
    return w.eval()


def export_one(env, arch, exporter, opset, attn, seed):
    torch = _torch()
    import numpy as np
    model, ins, outs, batches, axes, cfg = BUILDERS[arch](arch, attn, seed)
    # inputs first, in the forward's order (the dynamo exporter reads dynamic_axes in insertion order)
    axes = dict([(n, axes[n]) for n in ins if n in axes] + [(n, a) for n, a in axes.items() if n not in ins])
    real_attn = attn_of(model.inner if hasattr(model, "inner") else model) if attn else None
    if hasattr(cfg, "_attn_implementation"):
        real_attn = cfg._attn_implementation
    stem = "%s.%s%d.%s.%s" % (arch, exporter, opset, torch_short(), real_attn or "eager")
    path = os.path.join(OUT, stem + ".onnx")
    args = tuple(torch.from_numpy(batches[1][n]) for n in ins)
    info = {"file": stem + ".onnx", "stem": stem, "env": env, "arch": arch, "arch_name": ARCH_NAMES[arch],
            "exporter": exporter, "opset_requested": opset, "attn_requested": attn, "attn_implementation": real_attn,
            "seed": seed, "versions": versions(), "inputs_declared": ins, "outputs_declared": outs}
    with torch.no_grad():
        refs = [dict(zip(outs, [o.detach().numpy() for o in flat_outputs(model(*[torch.from_numpy(b[n])
                                                                                 for n in ins]))]))
                for b in batches]
    kw = dict(input_names=ins, output_names=outs, opset_version=opset)
    import inspect
    has_dynamo_arg = "dynamo" in inspect.signature(torch.onnx.export).parameters
    if exporter == "ts":
        kw.update(dynamic_axes=axes, do_constant_folding=True)
        if has_dynamo_arg:
            kw["dynamo"] = False
        info["exporter_call"] = "torch.onnx.export(%sopset_version=%d, do_constant_folding=True, dynamic_axes)" % (
            "dynamo=False, " if has_dynamo_arg else "", opset)
    else:
        if not has_dynamo_arg:
            raise RuntimeError("torch %s has no dynamo= argument" % torch.__version__)
        kw.update(dynamo=True, dynamic_axes=axes)
        if env == "t26" and arch.endswith("-past"):
            # torch 2.6 turns dynamic_axes into shapes it then specializes (a layer's past came out
            # static): named dims instead, as a careful user passes them; it still fixes the batch
            # at the example's (transformers 4.48's cache), so only batches of that size are kept
            kw.pop("dynamic_axes")
            dims = {}
            kw["dynamic_shapes"] = tuple(
                {axis: dims.setdefault(name, torch.export.Dim(name.replace("+", "_"), min=1, max=1024))
                 for axis, name in axes.get(n, {}).items()} for n in ins)
            keep = [all(b[n].shape[0] == args[0].shape[0] for n in ins) for b in batches]
            batches = [b for b, k in zip(batches, keep) if k]
            refs = [r for r, k in zip(refs, keep) if k]
            info["batches_kept"] = "batch %d only: the export fixes it" % args[0].shape[0]
        if "external_data" in inspect.signature(torch.onnx.export).parameters:
            kw["external_data"] = False  # its default (True) writes the weights to <file>.data
        info["exporter_call"] = "torch.onnx.export(dynamo=True, opset_version=%d, dynamic_axes, " \
                                "external_data=False) (defaults otherwise: optimize=True)" % opset
    with torch.no_grad():
        r = torch.onnx.export(fixed_arity(torch, model, len(ins)), args, path, **kw)
    if exporter == "dynamo" and r is not None and not os.path.exists(path):
        r.save(path)
    import onnx
    m = onnx.load(path)
    if exporter == "dynamo" and os.path.getsize(path) > MAX_BYTES:
        # torch 2.7's dynamo exporter gives each node its source location (metadata_props), half of a tiny
        # decoder's file: dropped to keep the file under 1 MiB, the graph untouched
        for node in m.graph.node:
            del node.metadata_props[:]
        onnx.save(m, path)
        info["node_metadata_removed"] = True
    # external data written next to the model (dynamo, large models) is not expected here
    real_ins = [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
    info["opset"] = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    save(stem, [{k: v for k, v in b.items() if k in real_ins} for b in batches], "calib")
    save(stem, refs, ".build/refs")
    return stem, info


def save(stem, batches, kind):
    import numpy as np
    d = os.path.join(OUT, kind, stem)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for i, batch in enumerate(batches):
        for name, arr in batch.items():
            np.save(os.path.join(d, "batch_%02d.%s.npy" % (i, name)), arr)


def write_info(stem, info):
    os.makedirs(os.path.join(BUILD, "info"), exist_ok=True)
    with open(os.path.join(BUILD, "info", stem + ".json"), "w") as f:
        json.dump(info, f, indent=1)


def export_env(env, only=None):
    global ENV_TAG
    ENV_TAG = ENV_TAGS.get(env)
    torch = _torch()
    os.makedirs(os.path.join(BUILD, "info"), exist_ok=True)
    for k, (arch, exporter, opset, attn) in enumerate(PLANS[env]):
        if only and arch not in only:
            continue
        tag = "%s.%s%d.%s.%s" % (arch, exporter, opset, torch_short(), attn)
        seed = 2000 + zlib.crc32(tag.encode()) % 8000  # fixed per model, whatever the plan's order
        try:
            stem, info = export_one(env, arch, exporter, opset, attn, seed)
            write_info(stem, info)
            print("exported", stem, flush=True)
        except Exception as e:  # noqa: BLE001 - recorded in the manifest
            msg = "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[0][:400] if str(e).strip() else "")
            write_info(tag + ".FAILED", {"file": None, "stem": tag, "env": env, "arch": arch,
                                         "arch_name": ARCH_NAMES[arch], "exporter": exporter,
                                         "opset_requested": opset, "attn_requested": attn,
                                         "versions": versions(), "error": "export failed: " + msg})
            for p in glob.glob(os.path.join(OUT, tag.rsplit(".", 1)[0] + "*.onnx*")):
                os.remove(p)
            print("FAILED", tag, msg, flush=True)
            traceback.print_exc(limit=3)


# --------------------------------------------------------------------------------------------------
# post stage (system python: onnx + onnxruntime)
# --------------------------------------------------------------------------------------------------

def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_batches(folder):
    import numpy as np
    batches = {}
    for p in sorted(glob.glob(os.path.join(folder, "batch_*.npy"))):
        b, name = os.path.basename(p)[:-4].split(".", 1)
        batches.setdefault(b, {})[name] = np.load(p)
    return [batches[k] for k in sorted(batches)]


def ort_run(path, batches, graph_opts=True):
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if not graph_opts:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    want = {i.name: i.type for i in sess.get_inputs()}
    cast = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32}
    feeds = [{k: v.astype(cast.get(want[k], v.dtype)) for k, v in b.items() if k in want} for b in batches]
    return [dict(zip(names, sess.run(None, f))) for f in feeds]


def max_diff(got, refs):
    import numpy as np
    worst = 0.0
    for a, b in zip(got, refs):
        for k in b:
            if k not in a:
                continue
            worst = max(worst, float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))))
    return worst


def dim_list(vi):
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]


def op_hist(m):
    hist = {}
    for n in m.graph.node:
        k = n.op_type if n.domain in ("", "ai.onnx") else n.domain + "." + n.op_type
        hist[k] = hist.get(k, 0) + 1
    for fn in m.functions:  # dynamo exports may keep local functions
        for n in fn.node:
            k = "(fn)" + (n.op_type if n.domain in ("", "ai.onnx") else n.domain + "." + n.op_type)
            hist[k] = hist.get(k, 0) + 1
    return dict(sorted(hist.items()))


def structure_counts(m):
    """Attention blocks (Softmax nodes; opset 23 Attention ops apart), LayerNorms (LayerNormalization ops +
    decomposed ones: a ReduceMean (tf2onnx: GlobalAveragePool) whose input x also feeds the Sub(x, mean) after it), RMSNorms (RMSNormalization ops + Pow(x,2)->ReduceMean not after
    a Sub), GELUs (Gelu ops + Erf + Tanh-based gelu_new), QuickGELU-like Sigmoid*x."""
    cons = {}
    prod = {}
    for n in m.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
        for o in n.output:
            prod[o] = n
    c = {"softmax": 0, "onnx_attention": 0, "layernorm": 0, "rmsnorm": 0, "gelu": 0, "sigmoid": 0}
    for n in m.graph.node:
        t = n.op_type
        if t == "Softmax":
            c["softmax"] += 1
        elif t == "Attention" and n.domain in ("", "ai.onnx"):
            c["onnx_attention"] += 1
        elif t == "LayerNormalization":
            c["layernorm"] += 1
        elif t in ("RMSNormalization", "SimplifiedLayerNormalization"):
            c["rmsnorm"] += 1
        elif t in ("Gelu", "Erf", "Tanh"):
            c["gelu"] += 1
        elif t == "Sigmoid":
            c["sigmoid"] += 1
        elif t in ("ReduceMean", "GlobalAveragePool"):  # tf2onnx writes the LayerNorm mean as GlobalAveragePool
            x = n.input[0]
            subs = [s for s in cons.get(n.output[0], []) if s.op_type == "Sub" and x in s.input]
            if subs:
                c["layernorm"] += 1
            else:
                p = prod.get(x)
                if p is not None and p.op_type in ("Pow", "Mul") and (p.op_type != "Mul" or p.input[0] == p.input[1]):
                    src = prod.get(p.input[0])
                    if not (src is not None and src.op_type == "Sub"):
                        c["rmsnorm"] += 1
    return c


def describe(path):
    import onnx
    m = onnx.load(path)
    et = onnx.TensorProto.DataType.Name
    init = {i.name for i in m.graph.initializer}
    return {
        "size_bytes": os.path.getsize(path),
        "sha256": sha256(path),
        "ir_version": m.ir_version,
        "producer": "%s %s" % (m.producer_name, m.producer_version),
        "opsets": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
        "num_nodes": len(m.graph.node),
        "num_functions": len(m.functions),
        "inputs": [{"name": i.name, "dtype": et(i.type.tensor_type.elem_type), "shape": dim_list(i)}
                   for i in m.graph.input if i.name not in init],
        "outputs": [{"name": o.name, "dtype": et(o.type.tensor_type.elem_type), "shape": dim_list(o)}
                    for o in m.graph.output],
        "structure": structure_counts(m),
        "op_histogram": op_hist(m),
    }


def check(path):
    import onnx
    try:
        onnx.checker.check_model(onnx.load(path), full_check=True)
        return "ok"
    except Exception as e:  # noqa: BLE001
        return "FAILED: " + str(e).strip().splitlines()[0][:300]


def remove_model(stem):
    for p in [os.path.join(OUT, stem + ".onnx"), os.path.join(OUT, stem + ".onnx.data")]:
        if os.path.exists(p):
            os.remove(p)
    shutil.rmtree(os.path.join(OUT, "calib", stem), ignore_errors=True)


def load_manifest():
    p = os.path.join(OUT, "manifest.json")
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return None


def save_manifest(man):
    man["models"].sort(key=lambda i: (i.get("stem") or ""))
    man["failed"].sort(key=lambda i: (i.get("stem") or ""))
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(man, f, indent=1)
        f.write("\n")


def post():
    import numpy as np
    import onnx
    import onnxruntime as ort
    old = load_manifest() or {}
    old_counts = {m["stem"]: m for m in old.get("models", [])}
    man = {"generated_by": "scripts/wild/make_wild.py", "checked_with": {
        "onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__},
        "models": [], "failed": []}
    for p in sorted(glob.glob(os.path.join(BUILD, "info", "*.json"))):
        with open(p) as f:
            i = json.load(f)
        stem = i["stem"]
        if i.get("error"):
            man["failed"].append(i)
            continue
        path = os.path.join(OUT, i["file"])
        if os.path.exists(path + ".data") or not os.path.exists(path):
            i["error"] = "exporter wrote external data or no file"
            remove_model(stem)
            man["failed"].append(i)
            continue
        i.update(describe(path))
        i["checker"] = check(path)
        i["calib"] = "calib/" + stem
        batches = load_batches(os.path.join(OUT, i["calib"]))
        refs = load_batches(os.path.join(BUILD, "refs", stem))
        err = None
        try:
            got = ort_run(path, batches)
            i["max_abs_diff_vs_torch"] = max_diff(got, refs)
            missing = [o["name"] for o in i["outputs"] if o["name"] not in refs[0]]
            if missing:
                i["outputs_without_reference"] = missing
            if i["max_abs_diff_vs_torch"] > 1e-4:
                err = "ORT vs torch max abs diff %.3g > 1e-4" % i["max_abs_diff_vs_torch"]
        except Exception as e:  # noqa: BLE001
            err = "ORT failed: " + str(e).strip().splitlines()[0][:400]
        if i["size_bytes"] > MAX_BYTES:
            err = (err + "; " if err else "") + "file is %d bytes > 1 MiB" % i["size_bytes"]
        if err:
            i["error"] = err
            remove_model(stem)
            man["failed"].append(i)
            print("%-48s FAILED %s" % (stem, err))
            continue
        for k in ("ort_fused", "onnxopt"):
            if k in old_counts.get(stem, {}) and old_counts[stem].get("sha256") == i["sha256"]:
                i[k] = old_counts[stem][k]
        man["models"].append(i)
        print("%-48s %7d B  diff %.2g  softmax %d  checker %s" % (stem, i["size_bytes"], i["max_abs_diff_vs_torch"],
                                                                 i["structure"]["softmax"], i["checker"][:50]))
    # models exported in an earlier run whose notes are gone (`.build` is not kept) stay as the manifest had them
    noted = {m["stem"] for m in man["models"]} | {f["stem"] for f in man["failed"]}
    for m in old.get("models", []):
        if m["stem"] not in noted and os.path.exists(os.path.join(OUT, m["file"])):
            man["models"].append(m)
    man["failed"] += [f for f in old.get("failed", []) if f.get("stem") not in noted]
    man["models"].sort(key=lambda m: m["stem"])
    # calib folders of models that are gone
    keep = {m["stem"] for m in man["models"]}
    for d in glob.glob(os.path.join(OUT, "calib", "*")):
        if os.path.basename(d) not in keep:
            shutil.rmtree(d)
    for f in glob.glob(os.path.join(OUT, "*.onnx")):
        if os.path.basename(f)[:-5] not in keep:
            os.remove(f)
    save_manifest(man)
    total = sum(m["size_bytes"] for m in man["models"])
    print("%d models, %d failed, %.1f MB of .onnx" % (len(man["models"]), len(man["failed"]), total / 1e6))


# --------------------------------------------------------------------------------------------------
# count stage: ONNX Runtime's transformers optimizer
# --------------------------------------------------------------------------------------------------

FUSED_OPS = ["Attention", "MultiHeadAttention", "GroupQueryAttention", "LayerNormalization",
             "SkipLayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Gelu",
             "FastGelu", "BiasGelu", "QuickGelu", "EmbedLayerNormalization", "RotaryEmbedding"]
ORT_MODEL_TYPE = {
    "bert": "bert", "distilbert": "bert", "roberta": "bert", "xlmr": "bert", "albert": "bert", "electra": "bert",
    "mpnet": "bert", "deberta-v2": "bert", "st-mpnet": "bert", "st-bert": "bert",
    "clip-text": "clip", "clip-vision": "clip", "vit": "vit", "deit": "vit", "dinov2": "vit", "siglip-vision": "vit",
    "whisper-enc": "bart", "whisper-dec-past": "bart", "bart-dec-past": "bart", "t5-dec-past": "t5",
    "gpt2-past": "gpt2", "gpt2-past1": "gpt2",
    # Optimum / tf2onnx
    "optimum-bert": "bert", "optimum-distilbert": "bert", "optimum-vit": "vit", "optimum-gpt2": "gpt2",
    "optimum-t5-enc": "t5", "optimum-t5-dec-past": "t5", "optimum-whisper-enc": "bart",
    "optimum-whisper-dec-past": "bart", "optimum-bart-dec-past": "bart",
    "optimum-marian-enc": "bart", "optimum-marian-dec-past": "bart", "optimum-m2m100-dec-past": "bart",
    "optimum-swin": "swin",
    "tf-bert": "bert_tf", "tf-distilbert": "bert_tf", "tf-roberta": "bert_tf",
    # encoders ONNX Runtime's optimizer has no type of their own for: its BERT fusions
    "modernbert": "bert", "esm": "bert", "roformer": "bert", "wav2vec2": "bert", "hubert": "bert", "wavlm": "bert",
    "convnext": "vit", "beit": "vit", "swin": "swin", "segformer": "vit", "yolos": "vit",
    "marian-dec-past": "bart", "m2m100-dec-past": "bart",
}


def fused_counts(path):
    """Counts of FUSED_OPS: com.microsoft ones by their name, ONNX-domain ones (LayerNormalization, Gelu, and
    opset 23's Attention, RMSNormalization, RotaryEmbedding) as onnx:<op>."""
    import onnx
    m = onnx.load(path)
    c = {}
    for n in m.graph.node:
        if n.op_type in FUSED_OPS + ["RMSNormalization"]:
            k = n.op_type if n.domain == "com.microsoft" else "onnx:" + n.op_type
            c[k] = c.get(k, 0) + 1
    return dict(sorted(c.items()))


def count(only=None):
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model
    import logging
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    man = load_manifest()
    tmp = tempfile.mkdtemp()
    for i in man["models"]:
        if only and i["stem"] not in only:
            continue
        mt = ORT_MODEL_TYPE[i["arch"]]
        res = {"model_type": mt, "num_heads": NH, "hidden_size": H, "onnxruntime": ort.__version__,
               "call": "optimize_model(M, model_type=%r, num_heads=4, hidden_size=64, use_gpu=False) "
                       "(default FusionOptions, opt_level default)" % mt}
        try:
            o = optimize_model(os.path.join(OUT, i["file"]), model_type=mt, num_heads=NH, hidden_size=H,
                               use_gpu=False)
            out = os.path.join(tmp, i["stem"] + ".ort.onnx")
            o.save_model_to_file(out)
            res["counts"] = fused_counts(out)
            try:
                res["fused_operator_statistics"] = {k: v for k, v in o.get_fused_operator_statistics().items() if v}
            except Exception:  # noqa: BLE001
                pass
            try:
                got = ort_run(out, load_batches(os.path.join(OUT, i["calib"])))
                ref = ort_run(os.path.join(OUT, i["file"]), load_batches(os.path.join(OUT, i["calib"])))
                res["runs"] = "ok, max abs diff vs original %.3g" % max_diff(got, ref)
            except Exception as e:  # noqa: BLE001
                res["runs"] = "FAILED: " + str(e).strip().splitlines()[0][:300]
        except Exception as e:  # noqa: BLE001
            res["error"] = "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[0][:300] if str(e) else "")
            res["counts"] = {}
        if mt == "bert_tf":  # bert_tf fuses nothing in tf2onnx's graphs here: also record what `bert` reaches
            try:
                o = optimize_model(os.path.join(OUT, i["file"]), model_type="bert", num_heads=NH, hidden_size=H,
                                   use_gpu=False)
                out = os.path.join(tmp, i["stem"] + ".ort-bert.onnx")
                o.save_model_to_file(out)
                res["with_model_type_bert"] = fused_counts(out)
            except Exception as e:  # noqa: BLE001
                res["with_model_type_bert"] = {"error": str(e).strip().splitlines()[0][:300]}
        i["ort_fused"] = res
        print("%-48s %-7s %s %s" % (i["stem"], mt, res["counts"], res.get("error", res.get("runs", ""))),
              flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    save_manifest(man)


# --------------------------------------------------------------------------------------------------
# baseline: onnxopt vs ORT's optimizer
# --------------------------------------------------------------------------------------------------

ATTN_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
LN_OPS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
          "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization")
GELU_OPS = ("Gelu", "FastGelu", "BiasGelu", "QuickGelu")


def ms_counts(path):
    """(attention, layernorm-family, gelu-family) counts in a model: com.microsoft ops, and the ONNX
    LayerNormalization/Gelu ops too (onnxopt may keep the standard ones for ORT)."""
    import onnx
    m = onnx.load(path)
    a = ln = g = 0
    detail = {}
    for n in m.graph.node:
        t = n.op_type
        key = (n.domain or "ai.onnx") + "." + t
        if t in ATTN_OPS and n.domain == "com.microsoft":
            a += 1
        elif t in LN_OPS or t == "RMSNormalization":
            ln += 1
        elif t in GELU_OPS:
            g += 1
        else:
            continue
        detail[key] = detail.get(key, 0) + 1
    return a, ln, g, detail


def ort_triplet(c):
    """(com.microsoft attention, LN family in any domain, GELU family in any domain) from fused_counts."""
    a = sum(c.get(k, 0) for k in ATTN_OPS)
    ln = sum(c.get(k, 0) + c.get("onnx:" + k, 0) for k in LN_OPS + ("RMSNormalization",))
    g = sum(c.get(k, 0) + c.get("onnx:" + k, 0) for k in GELU_OPS)
    return a, ln, g


def baseline(onnxopt, workdir):
    man = load_manifest()
    os.makedirs(workdir, exist_ok=True)
    rows = []
    for i in man["models"]:
        src = os.path.join(OUT, i["file"])
        out = os.path.join(workdir, i["stem"] + ".onnxopt.onnx")
        if os.path.exists(out):
            os.remove(out)
        p = subprocess.run([onnxopt, "optimize", src, out, "--target", "ort"], capture_output=True, text=True,
                           timeout=900)
        msg = [l for l in (p.stderr + p.stdout).strip().splitlines() if l.strip()]
        r = {"exit": p.returncode, "log_tail": msg[-3:],
             "fusion_report": [" ".join(l.split()) for l in msg if l.strip().startswith("fuse-")]}
        if os.path.exists(out):
            a, ln, g, detail = ms_counts(out)
            r.update(attention=a, layernorm=ln, gelu=g, ops=detail)
            q = subprocess.run([sys.executable, "/work/main/scripts/ort_check.py", src, out,
                                os.path.join(OUT, i["calib"])], capture_output=True, text=True, timeout=900)
            lines = [l for l in (q.stdout + q.stderr).strip().splitlines() if l.strip()]
            r["ort_check"] = ("ok" if q.returncode == 0 else "FAIL") + ": " + (lines[-1][:200] if lines else "")
        else:
            r.update(attention=None, layernorm=None, gelu=None, ort_check="no output (exit %d)" % p.returncode)
        i["onnxopt"] = r
        rows.append(i)
        print("%-48s exit %d attn %s ln %s gelu %s %s" % (i["stem"], p.returncode, r["attention"], r["layernorm"],
                                                          r["gelu"], r["ort_check"][:80]), flush=True)
    save_manifest(man)
    write_baseline(man, onnxopt)


def write_baseline(man, onnxopt):
    notes = os.path.join(HERE, "baseline-notes.md")
    lines = ["# onnxopt vs ONNX Runtime's transformers optimizer on the wild corpus", "",
             "Generated by `python3 scripts/wild/make_wild.py baseline --onnxopt %s` (a copy of "
             "`/work/main/target/release/onnxopt` taken before the run; `onnxopt optimize M OUT --target ort`). "
             "ORT: `onnxruntime.transformers.optimizer.optimize_model(M, model_type, num_heads=4, hidden_size=64, "
             "use_gpu=False)`, default fusion options (onnxruntime %s)." % (
                 onnxopt, man["checked_with"]["onnxruntime"]), "",
             "Columns: blocks = Softmax nodes in the original (attention blocks); attn = com.microsoft "
             "Attention/MultiHeadAttention/GroupQueryAttention; LN = LayerNormalization, SkipLayerNormalization, "
             "Simplified/SkipSimplified, EmbedLayerNormalization (and RMSNormalization); orig LN = LayerNorms in the "
             "original (LayerNormalization ops + decomposed, + RMSNorms); GELU = Gelu/FastGelu/BiasGelu/QuickGelu. "
             "ort_check: `scripts/ort_check.py ORIGINAL OUT calib/<stem>` (1e-4).", "",
             "| model | mt | blocks | attn onnxopt | attn ORT | orig LN | LN onnxopt | LN ORT | GELU onnxopt | "
             "GELU ORT | onnxopt output in ORT |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i in man["models"]:
        s = i["structure"]
        o = i.get("onnxopt", {})
        of = i.get("ort_fused", {})
        oa, oln, og = ort_triplet(of.get("counts", {}))
        if of.get("error"):
            oa = oln = og = "err"
        alt = of.get("with_model_type_bert")
        alt_t = ort_triplet(alt) if alt and "error" not in alt else None

        def mark(mine, theirs):
            if mine is None:
                return "-"
            if isinstance(theirs, int) and mine < theirs:
                return "**%d**" % mine
            return str(mine)
        def both(x, k):
            return "%s (bert: %d)" % (x, alt_t[k]) if alt_t else str(x)
        blocks = s["softmax"] + s.get("onnx_attention", 0)
        lines.append("| %s | %s | %s | %s | %s | %d | %s | %s | %s | %s | %s |" % (
            i["stem"], of.get("model_type", "?"),
            "%d%s" % (blocks, " (%d onnx Attention)" % s["onnx_attention"] if s.get("onnx_attention") else ""),
            mark(o.get("attention"), oa), both(oa, 0), s["layernorm"] + s["rmsnorm"],
            mark(o.get("layernorm"), oln), both(oln, 1), mark(o.get("gelu"), og), both(og, 2),
            o.get("ort_check", "-").replace("|", "/")))
    lines += ["", "Bold: onnxopt fuses fewer than ORT.", ""]
    unf = [(i["stem"], i["structure"]["softmax"] + i["structure"].get("onnx_attention", 0), i["onnxopt"]["attention"],
            ort_triplet(i.get("ort_fused", {}).get("counts", {}))[0]) for i in man["models"] if i.get("onnxopt")]
    lines += ["## Attention blocks onnxopt leaves unfused", "",
              "%d of %d blocks fused by onnxopt, %d by ORT (com.microsoft attention ops; opset-23 ONNX Attention ops "
              "count as blocks). Models with an unfused block (onnxopt / ORT / blocks):" % (
                  sum(u[2] or 0 for u in unf), sum(u[1] for u in unf), sum(u[3] for u in unf)), ""]
    lines += ["- %s: %s / %s / %d" % (st, a, o, b) for st, b, a, o in unf if (a or 0) < b]
    lines.append("")
    if os.path.exists(notes):
        with open(notes) as f:
            lines += [f.read().rstrip(), ""]
    if man["failed"]:
        lines += ["## Not in the corpus (export or check failed)", "", "| model | env | error |", "|---|---|---|"]
        for f in man["failed"]:
            lines.append("| %s | %s | %s |" % (f["stem"], f["env"], (f.get("error") or "").replace("|", "/")[:300]))
    with open(os.path.join(HERE, "baseline.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# setup / export driver (system python)
# --------------------------------------------------------------------------------------------------

def venv_python(env):
    return os.path.join(VENVS, ENVS[env], "bin", "python")


def setup(envs):
    for env in envs:
        venv = os.path.join(VENVS, ENVS[env])
        if not os.path.exists(os.path.join(venv, "bin", "python")):
            subprocess.check_call([sys.executable, "-m", "venv", venv] +
                                  (["--system-site-packages"] if env == "ort" else []))
        # --no-deps: the lock files list every package
        subprocess.check_call([os.path.join(venv, "bin", "pip"), "install", "--no-deps", "-r",
                               os.path.join(HERE, "req", env + ".txt")])


def export_all(envs, only=None):
    env_vars = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0",
                    CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", TOKENIZERS_PARALLELISM="false")
    for env in envs:
        # drop this env's previous results
        for p in glob.glob(os.path.join(BUILD, "info", "*.json")):
            with open(p) as f:
                if json.load(f).get("env") == env:
                    os.remove(p)
        script = os.path.join(HERE, "export_optimum.py") if env.startswith("optimum") else \
            os.path.join(HERE, "export_tf.py") if env == "tf" else os.path.abspath(__file__)
        cmd = [venv_python(env), script, "export-env", env] + (["--only"] + only if only else [])
        print("+", " ".join(cmd), flush=True)
        subprocess.call(cmd, env=env_vars)
    post()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["setup", "export", "export-env", "post", "count", "baseline"])
    ap.add_argument("envs", nargs="*")
    ap.add_argument("--only", nargs="*", help="export-env: these archs only; count: these stems only")
    ap.add_argument("--onnxopt", default="/work/onnxopt-wild-snap")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "onnxopt-wild-baseline"))
    a = ap.parse_args()
    envs = a.envs or (list(ENVS) if a.stage == "setup" else EXPORT_ENVS)
    if a.stage == "count":
        try:
            import torch  # noqa: F401
        except ImportError:  # rerun in the `ort` venv (system onnxruntime + torch)
            sys.exit(subprocess.call([venv_python("ort"), os.path.abspath(__file__)] + sys.argv[1:]))
    if a.stage == "setup":
        setup(envs)
    elif a.stage == "export":
        export_all(envs, a.only)
    elif a.stage == "export-env":
        export_env(envs[0], a.only)
    elif a.stage == "post":
        post()
    elif a.stage == "count":
        count(a.only)
    elif a.stage == "baseline":
        baseline(a.onnxopt, a.workdir)


if __name__ == "__main__":
    main()
