#!/usr/bin/env python3
"""Build the onnxopt bug-reproduction cases in testdata/cases/ with real (old) exporters.

Run by hand only (never by CI); see scripts/cases/README.md.

    python3 scripts/cases/make_cases.py setup      # create the two venvs (pinned, PyPI only)
    python3 scripts/cases/make_cases.py all        # rebuild testdata/cases/ (exports, post-processing, checks, manifest)
    python3 scripts/cases/make_cases.py evaluate --onnxopt target/release/onnxopt   # run onnxopt on every case

Stages (`all` runs them in order; each runs under the interpreter that has what it needs):
    export-t21    in /work/venvs/cases-t21       torch 2.1.2 + transformers 4.36.2 + sentence-transformers 2.7.0
    export-tf420  in /work/venvs/cases-t21-tf420 torch 2.1.2 + transformers 4.20.1 (the `* -10000.0` mask)
    post          in the system python3         onnx 1.23.2 + onnxruntime 1.32.0: duplicate-producer edit,
                                                quantize_dynamic, ONNX Runtime's transformers optimizer (case 5),
                                                checker, ORT vs torch, manifest.json
    add-ortopt-qdyn  (by hand)                  case 5 alone, recorded in the existing manifest.json
Every random number comes from a fixed seed, so a rebuild writes the same files.
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

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(REPO, "testdata", "cases")
CORPUS_TINY = os.environ.get("CORPUS_TINY", "/work/shared/corpus/tiny")
VENVS = os.environ.get("CASES_VENVS", "/work/venvs")
VENV_T21 = os.path.join(VENVS, "cases-t21")
VENV_TF420 = os.path.join(VENVS, "cases-t21-tf420")

# (batch, sequence, real length of each row): rows shorter than `sequence` are padded with zeros at the end.
TEXT_PLAN = [(1, 8, [8]), (2, 12, [12, 7]), (2, 5, [3, 5])]
# T5 decoder: (batch, decoder sequence, encoder sequence, real encoder length of each row)
T5_PLAN = [(1, 4, 8, [8]), (2, 6, 12, [12, 7]), (2, 3, 5, [3, 5])]
IMAGE_BATCHES = [1, 2, 2]


# --------------------------------------------------------------------------------------------------
# export stages (run inside a torch venv)
# --------------------------------------------------------------------------------------------------

def _torch_env():
    import numpy as np
    import torch
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    return np, torch


def load_config(name, cls, **overrides):
    with open(os.path.join(CORPUS_TINY, name + ".config.json")) as f:
        d = json.load(f)
    d.pop("transformers_version", None)
    d.update(overrides)
    return cls(**d)


def add_noise(model, seed):
    """The corpus convention: N(0, 0.02) added to every 1-D parameter (no bias exactly 0, no norm weight 1)."""
    import torch
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def text_batches(seed, vocab, token_type=False):
    import numpy as np
    rng = np.random.RandomState(seed)
    out = []
    for b, s, lens in TEXT_PLAN:
        ids = rng.randint(5, vocab, size=(b, s)).astype(np.int64)
        mask = np.zeros((b, s), np.int64)
        tt = np.zeros((b, s), np.int64)
        for r, n in enumerate(lens):
            mask[r, :n] = 1
            ids[r, n:] = 0  # pad token
            tt[r, n // 2:n] = 1  # second segment
        d = {"input_ids": ids, "attention_mask": mask}
        if token_type:
            d["token_type_ids"] = tt
        out.append(d)
    return out


def save_batches(stem, batches, kind="calib"):
    import numpy as np
    d = os.path.join(OUT, kind, stem)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for i, batch in enumerate(batches):
        for name, arr in batch.items():
            np.save(os.path.join(d, "batch_%02d.%s.npy" % (i, name)), arr)


def export_and_refs(model, stem, batches, input_names, output_names, dynamic_axes, opset, info, training=None):
    """Legacy TorchScript exporter (torch 2.1's torch.onnx.export, which is what dynamo=False selects in later
    torch releases), constant folding on. Saves the calibration batches and torch's outputs on them."""
    import torch
    model.eval()
    path = os.path.join(OUT, stem + ".onnx")
    args = tuple(torch.from_numpy(batches[1][n]) for n in input_names)
    kw = {}
    if training is not None:
        kw["training"] = training
    with torch.no_grad():
        torch.onnx.export(model, args, path, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, **kw)
    refs = []
    with torch.no_grad():
        for batch in batches:
            outs = model(*[torch.from_numpy(batch[n]) for n in input_names])
            if isinstance(outs, torch.Tensor):
                outs = (outs,)
            refs.append({n: o.detach().numpy() for n, o in zip(output_names, outs)})
    save_batches(stem, batches, "calib")
    save_batches(stem, refs, ".build/refs")
    import transformers
    info = dict(info)
    info.update({
        "file": stem + ".onnx",
        "exporter": "torch.onnx.export (legacy TorchScript exporter; torch %s has no dynamo= argument, this is "
                    "what dynamo=False selects later), do_constant_folding=True, opset %d%s"
                    % (torch.__version__, opset,
                       ", training=TrainingMode.%s" % training.name if training is not None else ""),
        "opset": opset,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "calib": "calib/" + stem,
        "refs": ".build/refs/" + stem,
    })
    try:
        import sentence_transformers
        if info.get("uses_sentence_transformers"):
            info["versions"]["sentence-transformers"] = sentence_transformers.__version__
    except ImportError:
        pass
    info.pop("uses_sentence_transformers", None)
    with open(os.path.join(OUT, ".build", "info", stem + ".json"), "w") as f:
        json.dump(info, f, indent=1)
    print("exported", path)


TEXT_AXES = {"batch": 0, "sequence": 1}


def axes(names, per_name=None):
    d = {}
    for n in names:
        d[n] = {0: "batch", 1: "sequence"}
    d.update(per_name or {})
    return d


def case_bert(opset, stem, note):
    np, torch = _torch_env()
    from transformers import BertConfig, BertModel
    cfg = load_config("bert-tiny", BertConfig, return_dict=False)
    torch.manual_seed(1001)
    model = BertModel(cfg)
    add_noise(model, 1001)
    ins = ["input_ids", "attention_mask", "token_type_ids"]
    outs = ["last_hidden_state", "pooler_output"]
    export_and_refs(model, stem, text_batches(11, cfg.vocab_size, True), ins, outs,
                    axes(ins + outs[:1], {"pooler_output": {0: "batch"}}), opset,
                    {"case": "1", "arch": "BERT (BertModel + pooler, eager attention)", "description": note,
                     "config": "corpus tiny/bert-tiny.config.json (return_dict=False)", "seed": 1001})


def export_t21():
    np, torch = _torch_env()
    import transformers
    assert transformers.__version__ == "4.36.2", transformers.__version__
    os.makedirs(os.path.join(OUT, ".build", "info"), exist_ok=True)

    # ---- case 1a/1b: BERT, additive mask (1 - mask[:, None, None, :]) * finfo(float32).min
    for opset in (14, 17):
        case_bert(opset, "bert-finfo-mask.ts%d" % opset,
                  "classic BERT additive mask: get_extended_attention_mask gives (1.0 - mask[:, None, None, :]) * "
                  "torch.finfo(float32).min, [batch,1,1,seq], added to the scores before Softmax (transformers "
                  "4.36.2 BertSelfAttention, eager)")

    # ---- case 1d: sentence-transformers: BERT + mean pooling over the mask + L2 normalize, in the graph
    from transformers import BertConfig, BertModel, BertTokenizerFast
    from sentence_transformers import SentenceTransformer, models as st_models
    cfg = load_config("bert-tiny", BertConfig)
    torch.manual_seed(1004)
    bert = BertModel(cfg)
    add_noise(bert, 1004)
    with tempfile.TemporaryDirectory() as tmp:
        bert_dir = os.path.join(tmp, "bert")
        bert.save_pretrained(bert_dir)
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + ["tok%d" % i for i in range(cfg.vocab_size - 5)]
        with open(os.path.join(tmp, "vocab.txt"), "w") as f:
            f.write("\n".join(vocab) + "\n")
        BertTokenizerFast(os.path.join(tmp, "vocab.txt")).save_pretrained(bert_dir)
        word = st_models.Transformer(bert_dir, max_seq_length=128)
        pool = st_models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
        st = SentenceTransformer(modules=[word, pool, st_models.Normalize()], device="cpu")
        st_dir = os.path.join(tmp, "st")
        st.save(st_dir)
        st = SentenceTransformer(st_dir, device="cpu")  # as a user would load it
        st.eval()

        class SentenceEmbedding(torch.nn.Module):
            """The whole SentenceTransformer pipeline (Transformer -> Pooling(mean) -> Normalize) as one graph."""

            def __init__(self, st):
                super().__init__()
                self.st = st

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.st({"input_ids": input_ids, "attention_mask": attention_mask,
                                "token_type_ids": token_type_ids})["sentence_embedding"]

        ins = ["input_ids", "attention_mask", "token_type_ids"]
        export_and_refs(SentenceEmbedding(st), "st-bert-meanpool.ts17", text_batches(14, cfg.vocab_size, True), ins,
                        ["sentence_embedding"], axes(ins, {"sentence_embedding": {0: "batch"}}), 17,
                        {"case": "1d", "arch": "sentence-transformers: BertModel -> Pooling(mean) -> Normalize",
                         "description": "sentence-transformers 2.7.0 SentenceTransformer (tiny local BERT saved to a "
                                        "folder and loaded back) exported whole: finfo additive mask in attention, "
                                        "mean pooling over the mask (Unsqueeze/Expand/Cast/Mul/ReduceSum/Clip 1e-9/"
                                        "Div, then a one-input Concat), L2 normalize written out as Abs/Pow 2/"
                                        "ReduceSum/Pow 0.5/Clip 1e-12/Expand/Div. The exporter names the output's "
                                        "second dim Divsentence_embedding_dim_1 (it is 64)",
                         "config": "corpus tiny/bert-tiny.config.json", "seed": 1004,
                         "uses_sentence_transformers": True})

    # ---- case 1e: DistilBERT, mask as (mask == 0).view(...).expand_as(scores) + masked_fill(finfo.min)
    from transformers import DistilBertConfig, DistilBertModel
    cfg = load_config("distilbert-tiny", DistilBertConfig, return_dict=False)
    torch.manual_seed(1005)
    model = DistilBertModel(cfg)
    add_noise(model, 1005)
    ins = ["input_ids", "attention_mask"]
    export_and_refs(model, "distilbert-where-mask.ts17", text_batches(15, cfg.vocab_size), ins,
                    ["last_hidden_state"], axes(ins + ["last_hidden_state"]), 17,
                    {"case": "1e", "arch": "DistilBERT (DistilBertModel)",
                     "description": "DistilBERT boolean mask: (mask == 0).view(bs,1,1,k).expand_as(scores), "
                                    "scores.masked_fill(mask, finfo(float32).min) -> Equal/Reshape/Expand/Where "
                                    "before Softmax (transformers 4.36.2)",
                     "config": "corpus tiny/distilbert-tiny.config.json", "seed": 1005})

    # ---- case 2: GPT-2 legacy export (the duplicate Constant is added by `post`)
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = load_config("gpt2-tiny", GPT2Config, return_dict=False, use_cache=False)
    torch.manual_seed(1002)
    model = GPT2LMHeadModel(cfg)
    add_noise(model, 1002)

    class GPT2Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]

    ins = ["input_ids", "attention_mask"]
    export_and_refs(GPT2Logits(model), "gpt2-base.ts17", text_batches(12, cfg.vocab_size), ins, ["logits"],
                    axes(ins + ["logits"]), 17,
                    {"case": "2 (source)", "arch": "GPT-2 LM head, no KV cache",
                     "description": "unedited GPT-2 legacy export; source of gpt2-dup-constant (not committed)",
                     "config": "corpus tiny/gpt2-tiny.config.json (use_cache=False)", "seed": 1002})

    # ---- case 3: T5 decoder + LM head (Optimum-style wrapper)
    from transformers import T5Config, T5ForConditionalGeneration
    cfg = load_config("t5-encoder-tiny", T5Config, is_encoder_decoder=True, is_decoder=False, use_cache=False,
                      return_dict=False, decoder_start_token_id=0)
    torch.manual_seed(1003)
    t5 = T5ForConditionalGeneration(cfg)
    add_noise(t5, 1003)

    class T5DecoderWithLMHead(torch.nn.Module):
        """As Optimum's decoder export: decoder stack (causal self-attention, cross-attention) + scaled tied LM head."""

        def __init__(self, t5):
            super().__init__()
            self.decoder = t5.get_decoder()
            self.lm_head = t5.get_output_embeddings()
            self.config = t5.config

        def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask):
            out = self.decoder(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states,
                               encoder_attention_mask=encoder_attention_mask, use_cache=False, return_dict=False)
            seq = out[0]
            if self.config.tie_word_embeddings:
                seq = seq * (self.config.d_model ** -0.5)
            return self.lm_head(seq)

    rng = np.random.RandomState(13)
    batches = []
    for b, ds, es, lens in T5_PLAN:
        ids = rng.randint(5, cfg.vocab_size, size=(b, ds)).astype(np.int64)
        ids[:, 0] = cfg.decoder_start_token_id
        mask = np.zeros((b, es), np.int64)
        for r, n in enumerate(lens):
            mask[r, :n] = 1
        enc = rng.standard_normal((b, es, cfg.d_model)).astype(np.float32)
        batches.append({"input_ids": ids, "encoder_hidden_states": enc, "encoder_attention_mask": mask})
    ins = ["input_ids", "encoder_hidden_states", "encoder_attention_mask"]
    export_and_refs(T5DecoderWithLMHead(t5), "t5-decoder.ts17", batches, ins, ["logits"],
                    {"input_ids": {0: "batch", 1: "sequence"},
                     "encoder_hidden_states": {0: "batch", 1: "encoder_sequence"},
                     "encoder_attention_mask": {0: "batch", 1: "encoder_sequence"},
                     "logits": {0: "batch", 1: "sequence"}}, 17,
                    {"case": "3 (float)", "arch": "T5 decoder stack + LM head (T5ForConditionalGeneration)",
                     "description": "T5 decoder with causal self-attention (mask built inside), cross-attention "
                                    "over encoder_hidden_states with the encoder_attention_mask, tied LM head "
                                    "scaled by d_model**-0.5; Optimum-style wrapper",
                     "config": "corpus tiny/t5-encoder-tiny.config.json (is_encoder_decoder=True, use_cache=False, "
                               "decoder_start_token_id=0)", "seed": 1003})

    # ---- case 4a: ViT + Conv -> BatchNorm -> ReLU head
    from transformers import ViTConfig, ViTModel
    cfg = load_config("vit-tiny", ViTConfig, return_dict=False)
    torch.manual_seed(1006)

    class ViTConvBNHead(torch.nn.Module):
        """ViT tokens (CLS dropped) as a 4x4 grid -> Conv3x3 -> BatchNorm2d -> ReLU -> global average pool
        -> BatchNorm1d -> Linear(10)."""

        def __init__(self, cfg):
            super().__init__()
            self.vit = ViTModel(cfg, add_pooling_layer=False)
            self.conv = torch.nn.Conv2d(cfg.hidden_size, 32, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(32)
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.bn1d = torch.nn.BatchNorm1d(32)
            self.fc = torch.nn.Linear(32, 10)

        def forward(self, pixel_values):
            h = self.vit(pixel_values)[0][:, 1:, :]  # [b, 16, 64]
            b = h.shape[0]
            h = h.transpose(1, 2).reshape(b, -1, 4, 4)
            h = torch.relu(self.bn(self.conv(h)))
            h = self.pool(h).flatten(1)
            return self.fc(self.bn1d(h))

    model = ViTConvBNHead(cfg)
    add_noise(model, 1006)
    g = torch.Generator().manual_seed(1106)
    with torch.no_grad():  # trained-looking running statistics, not the 0/1 defaults
        for bn in (model.bn, model.bn1d):
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.1)
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
    rng = np.random.RandomState(16)
    batches = [{"pixel_values": rng.standard_normal((b, 3, 32, 32)).astype(np.float32)} for b in IMAGE_BATCHES]
    export_and_refs(model, "vit-convbn-head.ts17", batches, ["pixel_values"], ["logits"],
                    {"pixel_values": {0: "batch"}, "logits": {0: "batch"}}, 17,
                    {"case": "4 (BN)", "arch": "ViT (ViTModel, no pooler) + Conv2d/BatchNorm2d/ReLU/GAP/BatchNorm1d/"
                                            "Linear head",
                     "description": "BatchNormalization kept in the graph: exported with training=PRESERVE on an "
                                    "eval() model, which skips the legacy exporter's eval peephole that folds a BN "
                                    "after a Conv into the Conv; so Conv -> BatchNormalization(4-D) -> Relu -> "
                                    "GlobalAveragePool -> Flatten -> BatchNormalization(2-D) -> Gemm. Running "
                                    "mean ~ N(0, 0.1), running var ~ U(0.5, 1.5)",
                     "config": "corpus tiny/vit-tiny.config.json", "seed": 1006},
                    training=torch.onnx.TrainingMode.PRESERVE)

    # ---- case 4b: LSTM over embeddings (quantized by `post`)
    class LSTMEncoder(torch.nn.Module):
        """Embedding(1000, 32) -> LSTM(32, 32) -> masked mean over time -> Linear(32, 8)."""

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(1000, 32, padding_idx=0)
            self.lstm = torch.nn.LSTM(32, 32, batch_first=True)
            self.fc = torch.nn.Linear(32, 8)

        def forward(self, input_ids, attention_mask):
            h, _ = self.lstm(self.emb(input_ids))
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.fc((h * m).sum(1) / m.sum(1).clamp(min=1.0))

    torch.manual_seed(1007)
    model = LSTMEncoder()
    add_noise(model, 1007)
    ins = ["input_ids", "attention_mask"]
    export_and_refs(model, "lstm-tiny.ts17", text_batches(17, 1000), ins, ["logits"],
                    axes(ins, {"logits": {0: "batch"}}), 17,
                    {"case": "4 (LSTM, float)", "arch": "Embedding(1000,32) + LSTM(hidden 32) + masked mean + Linear",
                     "description": "tiny LSTM (plain torch); float source of lstm-tiny.qdyn", "seed": 1007})


def export_tf420():
    np, torch = _torch_env()
    import transformers
    assert transformers.__version__ == "4.20.1", transformers.__version__
    os.makedirs(os.path.join(OUT, ".build", "info"), exist_ok=True)
    case_bert(14, "bert-10000-mask.ts14",
              "older BERT additive mask: transformers 4.20.1 get_extended_attention_mask gives "
              "(1.0 - mask[:, None, None, :]) * -10000.0, [batch,1,1,seq], added to the scores before Softmax")


# --------------------------------------------------------------------------------------------------
# post stage (system python: onnx 1.23.2, onnxruntime 1.32.0)
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
    if not graph_opts:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    want = {i.name: i.type for i in sess.get_inputs()}
    cast = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32}
    feeds = [{k: v.astype(cast.get(want[k], v.dtype)) for k, v in b.items() if k in want} for b in batches]
    return [dict(zip(names, sess.run(None, f))) for f in feeds]


def max_diff(a_list, b_list):
    import numpy as np
    worst = 0.0
    for a, b in zip(a_list, b_list):
        for k in b:
            worst = max(worst, float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))))
    return worst


def dim_list(vi):
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]


def describe(path):
    import onnx
    m = onnx.load(path)
    hist = {}
    for n in m.graph.node:
        k = n.op_type if n.domain in ("", "ai.onnx") else n.domain + "." + n.op_type
        hist[k] = hist.get(k, 0) + 1
    et = onnx.TensorProto.DataType.Name
    init = {i.name for i in m.graph.initializer}
    return {
        "size_bytes": os.path.getsize(path),
        "sha256": sha256(path),
        "ir_version": m.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
        "num_nodes": len(m.graph.node),
        "inputs": [{"name": i.name, "dtype": et(i.type.tensor_type.elem_type), "shape": dim_list(i)}
                   for i in m.graph.input if i.name not in init],
        "outputs": [{"name": o.name, "dtype": et(o.type.tensor_type.elem_type), "shape": dim_list(o)}
                    for o in m.graph.output],
        "op_histogram": dict(sorted(hist.items())),
    }


def check(path):
    import onnx
    try:
        onnx.checker.check_model(onnx.load(path), full_check=True)
        return "ok"
    except Exception as e:  # noqa: BLE001 - the message is the result
        return "FAILED: " + str(e).strip().splitlines()[0][:300]


def make_duplicate_constant(src, dst):
    """Insert a copy of a Constant node right after it: same output name, same attributes.

    The Constant chosen is the first one feeding the causal-mask / attention-scale path of the first block, i.e.
    one a pass must look up by output name."""
    import copy
    import onnx
    m = onnx.load(src)
    consumers = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    idx = None
    for k, n in enumerate(m.graph.node):
        if n.op_type == "Constant" and len(n.output) == 1 and n.attribute[0].name == "value" \
                and n.attribute[0].t.data_type == onnx.TensorProto.FLOAT \
                and any(c.op_type in ("Div", "Mul", "Where") for c in consumers.get(n.output[0], [])):
            idx = k
            break
    assert idx is not None, "no float Constant feeding Div/Mul/Where"
    orig = m.graph.node[idx]
    dup = copy.deepcopy(orig)
    dup.name = orig.name + "_dup" if orig.name else "dup_constant"
    m.graph.node.insert(idx + 1, dup)
    m.producer_name = m.producer_name + "+make_cases.duplicate_constant"
    onnx.save(m, dst)
    val = onnx.numpy_helper.to_array(orig.attribute[0].t)
    return {"duplicated_node": orig.name, "duplicated_output": orig.output[0], "value": val.tolist(),
            "consumers": [c.name + " (" + c.op_type + ")" for c in consumers[orig.output[0]]]}


def post(keep_sources):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    sysv = {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__}
    infos = {}
    for p in sorted(glob.glob(os.path.join(OUT, ".build", "info", "*.json"))):
        with open(p) as f:
            i = json.load(f)
        infos[i["file"][:-5]] = i

    def derived(stem, src_stem, **kw):
        i = dict(infos[src_stem])
        i.update(kw)
        i["file"] = stem + ".onnx"
        i["calib"] = "calib/" + stem
        i["source"] = src_stem + ".onnx"
        d = os.path.join(OUT, "calib", stem)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(os.path.join(OUT, "calib", src_stem), d)
        infos[stem] = i
        return i

    # case 2: duplicate producers
    i = derived("gpt2-dup-constant.ts17", "gpt2-base.ts17", case="2",
                description="GPT-2 legacy export with a Constant node duplicated: the copy is inserted right after "
                            "the original with the same output name and attributes, so two nodes produce one value "
                            "(invalid SSA; onnx.checker rejects it, ONNX Runtime loads and runs it)")
    i["edit"] = make_duplicate_constant(os.path.join(OUT, "gpt2-base.ts17.onnx"),
                                        os.path.join(OUT, "gpt2-dup-constant.ts17.onnx"))
    i["post_processing"] = "onnx %s Python API: copy of a Constant node inserted after it" % onnx.__version__

    # case 3 and 4b: dynamic quantization
    for src, dst, case, what in [
            ("t5-decoder.ts17", "t5-decoder.qdyn", "3",
             "T5 decoder + LM head, dynamically quantized: MatMul -> DynamicQuantizeLinear + MatMulInteger"),
            ("lstm-tiny.ts17", "lstm-tiny.qdyn", "4 (LSTM)",
             "tiny LSTM dynamically quantized: LSTM -> com.microsoft.DynamicQuantizeLSTM (int8 weights)")]:
        quantize_dynamic(os.path.join(OUT, src + ".onnx"), os.path.join(OUT, dst + ".onnx"),
                         weight_type=QuantType.QInt8)
        i = derived(dst, src, case=case, description=what)
        i["post_processing"] = ("onnxruntime %s quantization.quantize_dynamic(weight_type=QuantType.QInt8), "
                                "defaults otherwise" % ort.__version__)
        i["refs"] = None
    # case 5: ONNX Runtime's own pipeline before us
    ortopt_qdyn(derived)
    for stale in glob.glob(os.path.join(OUT, "*-opt.onnx")):
        os.remove(stale)

    manifest = {"generated_by": "scripts/cases/make_cases.py", "post_processing_versions": sysv, "models": []}
    failures = []
    for stem in sorted(infos):
        i = infos[stem]
        path = os.path.join(OUT, i["file"])
        if stem == "gpt2-base.ts17" and not keep_sources:
            continue
        i.update(describe(path))
        i["checker"] = check(path)
        batches = load_batches(os.path.join(OUT, i["calib"]))
        try:
            got = ort_run(path, batches)
            i["ort"] = "ok (%d batches)" % len(batches)
        except Exception as e:  # noqa: BLE001
            i["ort"] = "FAILED: " + str(e).strip().splitlines()[0][:300]
            failures.append(stem + ": " + i["ort"])
            got = None
        if got is not None and i.get("refs"):
            i["max_abs_diff_vs_torch"] = max_diff(got, load_batches(os.path.join(OUT, i["refs"])))
            if i["max_abs_diff_vs_torch"] > 1e-4:
                failures.append("%s: ORT vs torch %.3g > 1e-4" % (stem, i["max_abs_diff_vs_torch"]))
        if got is not None and i.get("source") and "qdyn" in stem:
            i["max_abs_diff_vs_float_model"] = max_diff(got, ort_run(os.path.join(OUT, i["source"]), batches))
        i["versions"] = dict(i["versions"], **({"onnx (post)": onnx.__version__, "onnxruntime (post)":
                                                 ort.__version__} if i.get("post_processing") else {}))
        i["checked_with"] = {"onnx": onnx.__version__, "onnxruntime": ort.__version__}
        manifest["models"].append(i)
        print("%-28s %-6s checker=%s ort=%s diff=%s" % (stem, i["size_bytes"], i["checker"][:60], i["ort"][:40],
                                                      i.get("max_abs_diff_vs_torch",
                                                            i.get("max_abs_diff_vs_float_model"))))
    if not keep_sources:
        os.replace(os.path.join(OUT, "gpt2-base.ts17.onnx"), os.path.join(OUT, ".build", "gpt2-base.ts17.onnx"))
        shutil.rmtree(os.path.join(OUT, "calib", "gpt2-base.ts17"))
        # the refs of the unedited export are the refs of the edited one
        d = os.path.join(OUT, ".build", "refs", "gpt2-dup-constant.ts17")
        shutil.rmtree(d, ignore_errors=True)
        os.rename(os.path.join(OUT, ".build", "refs", "gpt2-base.ts17"), d)
        for m in manifest["models"]:
            if m["file"].startswith("gpt2-dup"):
                m["refs"] = ".build/refs/gpt2-dup-constant.ts17"
                m["source"] = "gpt2-base.ts17.onnx (not committed: testdata/cases/.build/)"
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    if failures:
        sys.exit("FAILED:\n  " + "\n  ".join(failures))


ORTOPT_QDYN = ("bert-finfo-mask.ts17", "bert-ortopt.qdyn")


def ortopt_qdyn(derived):
    """Case 5: BERT through ONNX Runtime's transformers optimizer (its python fusions only, opt_level=0, which needs
    no torch), then quantize_dynamic: QEmbedLayerNormalization, QAttention, MatMulInteger. `derived(stem, src_stem,
    **info)` records the new file's info."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    src, dst = ORTOPT_QDYN
    os.makedirs(os.path.join(OUT, ".build"), exist_ok=True)
    fused = os.path.join(OUT, ".build", src + ".ortopt.onnx")
    optimize_model(os.path.join(OUT, src + ".onnx"), model_type="bert", num_heads=0, hidden_size=0, opt_level=0,
                   use_gpu=False).save_model_to_file(fused)
    quantize_dynamic(fused, os.path.join(OUT, dst + ".onnx"), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    i = derived(dst, src, case="5", description="BERT through ONNX Runtime's transformers optimizer "
                                               "(EmbedLayerNormalization, Attention), then quantize_dynamic: "
                                               "QEmbedLayerNormalization, QAttention, MatMulInteger")
    i["post_processing"] = ("onnxruntime %s transformers.optimizer.optimize_model(model_type='bert', opt_level=0), "
                            "then quantization.quantize_dynamic(weight_type=QuantType.QInt8)" % ort.__version__)
    i["refs"] = None
    return i


def add_ortopt_qdyn():
    """Makes case 5 alone and records it in manifest.json (the other cases' build folder need not exist)."""
    import numpy as np
    import onnxruntime as ort
    path = os.path.join(OUT, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    src, dst = ORTOPT_QDYN
    by_file = {m["file"][:-5]: m for m in manifest["models"]}

    def derived(stem, src_stem, **kw):
        i = dict(by_file[src_stem], **kw)
        i.update(file=stem + ".onnx", calib="calib/" + stem, source=src_stem + ".onnx")
        for k in ("max_abs_diff_vs_torch", "sha256", "size_bytes", "num_nodes", "ops"):
            i.pop(k, None)
        d = os.path.join(OUT, "calib", stem)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(os.path.join(OUT, "calib", src_stem), d)
        return i
    i = ortopt_qdyn(derived)
    out = os.path.join(OUT, i["file"])
    i.update(describe(out))
    i["checker"] = check(out)
    batches = load_batches(os.path.join(OUT, i["calib"]))
    i["ort"] = "ok (%d batches)" % len(ort_run(out, batches))
    i["max_abs_diff_vs_float_model"] = max_diff(ort_run(out, batches), ort_run(os.path.join(OUT, i["source"]), batches))
    i["checked_with"] = {"onnx": __import__("onnx").__version__, "onnxruntime": ort.__version__, "numpy": np.__version__}
    manifest["models"] = [m for m in manifest["models"] if m["file"] != i["file"]] + [i]
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(dst, i["ort"], "diff vs float", i["max_abs_diff_vs_float_model"])


# --------------------------------------------------------------------------------------------------
# setup / all / evaluate (system python)
# --------------------------------------------------------------------------------------------------

def setup():
    for venv, req in [(VENV_T21, "requirements-t21.txt"), (VENV_TF420, "requirements-t21-tf420.txt")]:
        if not os.path.exists(os.path.join(venv, "bin", "python")):
            subprocess.check_call([sys.executable, "-m", "venv", venv])
        # --no-deps: the lock files list every package (transformers 4.20.1 declares tokenizers<0.13, which has
        # no Python 3.11 wheel; BertModel does not need it, so that venv has no tokenizers)
        subprocess.check_call([os.path.join(venv, "bin", "pip"), "install", "--no-deps", "-r",
                               os.path.join(HERE, req)])


def run_all(keep_sources):
    for d in glob.glob(os.path.join(OUT, "*.onnx")) + [os.path.join(OUT, x) for x in ("calib", ".build")]:
        if os.path.isdir(d):
            shutil.rmtree(d)
        elif os.path.exists(d):
            os.remove(d)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0",
               CUBLAS_WORKSPACE_CONFIG=":4096:8", CUDA_VISIBLE_DEVICES="")
    for venv, stage in [(VENV_T21, "export-t21"), (VENV_TF420, "export-tf420")]:
        subprocess.check_call([os.path.join(venv, "bin", "python"), os.path.abspath(__file__), stage], env=env)
    post(keep_sources)


def evaluate(onnxopt, workdir):
    """Run onnxopt on every case and compare each output it writes with the original in ONNX Runtime."""
    with open(os.path.join(OUT, "manifest.json")) as f:
        manifest = json.load(f)
    os.makedirs(workdir, exist_ok=True)
    rows = []
    for m in manifest["models"]:
        stem = m["file"][:-5]
        src = os.path.join(OUT, m["file"])
        calib = os.path.join(OUT, m["calib"])
        batches = load_batches(calib)
        try:
            ref = ort_run(src, batches)
            ref_plain = ort_run(src, batches, graph_opts=False)
        except Exception:  # noqa: BLE001
            ref = ref_plain = None
        variants = []
        for target in ("ort", "onnx"):
            variants.append((target, []))
            variants.append((target, ["--validate", "--inputs", calib]))
            if m["file"].startswith("vit-convbn"):
                variants.append((target, ["--fp16"]))
                variants.append((target, ["--fp16", "--validate", "--inputs", calib]))
        for target, extra in variants:
            tag = target + "".join(x for x in extra if x.startswith("--")).replace("--", "+")
            out = os.path.join(workdir, "%s.%s.onnx" % (stem, tag))
            if os.path.exists(out):
                os.remove(out)
            cmd = [onnxopt, "optimize", src, out, "--target", target] + extra
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            msg = [l for l in (p.stderr + p.stdout).strip().splitlines() if l.strip()]
            if p.returncode == 0:
                one = msg[-1] if msg else ""
            else:
                errs = [l for l in msg if "error" in l.lower()]
                one = (errs[0] if errs else (msg[-1] if msg else ""))
            if os.path.exists(out):
                try:
                    got = ort_run(out, batches)
                    got_plain = ort_run(out, batches, graph_opts=False)
                    res = ("runs, max abs diff %.3g (ORT graph opts off on both: %.3g)"
                           % (max_diff(got, ref), max_diff(got_plain, ref_plain))) if ref else "runs (original does not)"
                except Exception as e:  # noqa: BLE001
                    res = "ORT FAILS: " + str(e).strip().splitlines()[0][:200]
                ops = describe(out)["op_histogram"]
                res += "; ops: " + ", ".join("%s %d" % (k, v) for k, v in ops.items()
                                             if "." in k or k in ("Attention", "BatchNormalization", "Conv"))
            else:
                res = "no output written"
            rows.append({"case": stem, "target": tag, "exit": p.returncode, "message": one[:240], "ort": res,
                         "log": msg})
            print("| %s | %s | %d: %s | %s |" % (stem, tag, p.returncode, one[:160].replace("|", "/"), res),
                  flush=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["setup", "all", "export-t21", "export-tf420", "post", "add-ortopt-qdyn",
                                      "evaluate"])
    ap.add_argument("--keep-sources", action="store_true",
                    help="keep gpt2-base.ts17.onnx (the unedited GPT-2 export) in testdata/cases/")
    ap.add_argument("--onnxopt", default=os.path.join(REPO, "target", "release", "onnxopt"))
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "onnxopt-cases-eval"))
    a = ap.parse_args()
    if a.stage == "setup":
        setup()
    elif a.stage == "all":
        run_all(a.keep_sources)
    elif a.stage == "export-t21":
        export_t21()
    elif a.stage == "export-tf420":
        export_tf420()
    elif a.stage == "add-ortopt-qdyn":
        add_ortopt_qdyn()
    elif a.stage == "post":
        post(a.keep_sources)
    elif a.stage == "evaluate":
        evaluate(a.onnxopt, a.workdir)


if __name__ == "__main__":
    main()
