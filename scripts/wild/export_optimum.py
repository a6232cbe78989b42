#!/usr/bin/env python3
"""Optimum exports (optimum.exporters.onnx.main_export, what `optimum-cli export onnx` runs) of tiny random models
saved to a local folder. Runs inside the `optimum` venv; called by `make_wild.py export optimum`.

The calibration batches and torch's reference outputs are made the way Optimum's own validation makes them
(config.generate_dummy_inputs with our shapes and seed, the model patched as for export, outputs flattened to the
ONNX names), with right padding added to the second batch's attention mask (left padding of the past for GPT-2).

    /work/venvs/wild-optimum/bin/python scripts/wild/export_optimum.py export-env optimum
"""
import copy
import os
import shutil
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_wild as W  # noqa: E402

# (arch, model class, task, submodels kept -> arch name in the corpus)
PLAN = [
    ("bert", "feature-extraction", {"model": "optimum-bert"}),
    ("distilbert", "feature-extraction", {"model": "optimum-distilbert"}),
    ("vit", "feature-extraction", {"model": "optimum-vit"}),
    ("gpt2", "text-generation-with-past", {"model": "optimum-gpt2"}),
    ("t5", "text2text-generation-with-past", {"encoder_model": "optimum-t5-enc",
                                              "decoder_with_past_model": "optimum-t5-dec-past"}),
    ("bart", "text2text-generation-with-past", {"decoder_with_past_model": "optimum-bart-dec-past"}),
    ("whisper", "automatic-speech-recognition-with-past", {"decoder_with_past_model": "optimum-whisper-dec-past"}),
    # decoder LLMs as the Hub's ONNX LLMs were made (one model.onnx whose past may be empty); 4 query heads over 2
    # key/value heads where the architecture has grouped heads
    ("llama", "text-generation-with-past", {"model": "optimum-llama"}),
    ("qwen2", "text-generation-with-past", {"model": "optimum-qwen2"}),
    ("mistral", "text-generation-with-past", {"model": "optimum-mistral"}),
    ("phi3", "text-generation-with-past", {"model": "optimum-phi3"}),
    ("gemma", "text-generation-with-past", {"model": "optimum-gemma"}),
    # partial rotary (the first quarter or half of each head rotated) and GPT-J's interleaved pairs
    ("phi", "text-generation-with-past", {"model": "optimum-phi"}),
    ("gpt_neox", "text-generation-with-past", {"model": "optimum-gpt-neox"}),
    ("gptj", "text-generation-with-past", {"model": "optimum-gptj"}),
    ("codegen", "text-generation-with-past", {"model": "optimum-codegen"}),
    # translation (Marian, M2M100 / NLLB: the files transformers.js ships) and vision beyond ViT
    ("marian", "text2text-generation-with-past", {"encoder_model": "optimum-marian-enc",
                                                  "decoder_with_past_model": "optimum-marian-dec-past"}),
    ("m2m_100", "text2text-generation-with-past", {"decoder_with_past_model": "optimum-m2m100-dec-past"}),
    ("swin", "feature-extraction", {"model": "optimum-swin"}),
]
# optimum-onnx 0.1.0 (optimum 2.1, transformers 4.57: the masks of transformers' masking_utils, traced by the legacy
# exporter): the decoder LLMs people export today, and the families this Optimum added
PLAN_ONNX = [(arch, "text-generation-with-past", {"model": "optimum-" + arch.replace("_", "-")}) for arch in
             ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text", "smollm3", "granite", "olmo2",
              "stablelm", "cohere")] + [
    # encoders and translation / speech decoders through transformers 4.57's masks: the older Optimum's, with
    # Whisper's encoder added and Marian's decoder alone
    (arch, task, {"whisper": {"encoder_model": "optimum-whisper-enc", **keep},
                  "marian": {"decoder_with_past_model": "optimum-marian-dec-past"}}.get(arch, keep))
    for arch, task, keep in PLAN if arch in ("bert", "distilbert", "vit", "gpt2", "t5", "bart", "whisper", "marian")]
PLANS = {"optimum": PLAN, "optimum-onnx": PLAN_ONNX}
# decoder-only models whose second batch has a left-padded past
DECODER_ONLY = ("gpt2", "llama", "qwen2", "mistral", "phi3", "gemma", "phi", "gpt_neox", "gptj", "codegen") + \
    tuple(arch for arch, task, _ in PLAN_ONNX if task == "text-generation-with-past")
# (batch_size, sequence_length): Optimum's dummy-input shapes for the two batches (for a decoder with past,
# sequence_length is the past length and the new tokens are 1)
SHAPES = [(1, 8), (2, 12)]
NAMES = {
    "optimum-bert": "BERT (BertModel, feature-extraction)", "optimum-distilbert": "DistilBERT (feature-extraction)",
    "optimum-vit": "ViT (ViTModel, feature-extraction)",
    "optimum-gpt2": "GPT-2 LM with past (text-generation-with-past, one model: past may be empty)",
    "optimum-t5-enc": "T5 v1.1 encoder (encoder_model)", "optimum-t5-dec-past": "T5 v1.1 decoder_with_past_model",
    "optimum-bart-dec-past": "BART decoder_with_past_model", "optimum-whisper-enc": "Whisper encoder_model",
    "optimum-whisper-dec-past": "Whisper decoder_with_past_model",
    "optimum-llama": "Llama LM with past (text-generation-with-past, grouped KV heads)",
    "optimum-qwen2": "Qwen2 LM with past (text-generation-with-past, grouped KV heads, QKV biases)",
    "optimum-mistral": "Mistral LM with past (text-generation-with-past, grouped KV heads)",
    "optimum-phi3": "Phi-3 LM with past (text-generation-with-past, packed QKV and gate/up)",
    "optimum-gemma": "Gemma LM with past (text-generation-with-past, GeGLU, scaled embeddings)",
    "optimum-phi": "Phi-2 LM with past (parallel attention and MLP, half of each head rotated)",
    "optimum-gpt-neox": "GPT-NeoX (Pythia) LM with past (packed QKV per head, a quarter of each head rotated)",
    "optimum-gptj": "GPT-J LM with past (interleaved rotary pairs on half of each head)",
    "optimum-codegen": "CodeGen LM with past (packed QKV, interleaved rotary pairs on half of each head)",
    "optimum-marian-enc": "Marian encoder_model (sinusoidal positions, scaled embeddings)",
    "optimum-marian-dec-past": "Marian decoder_with_past_model",
    "optimum-m2m100-dec-past": "M2M100 / NLLB decoder_with_past_model (pre-norm, ReLU)",
    "optimum-swin": "Swin (SwinModel, feature-extraction: shifted windows)",
    "optimum-qwen3": "Qwen3 LM with past (grouped KV heads, q/k norms)",
    "optimum-gemma2": "Gemma-2 LM with past (soft caps, sandwich norms)",
    "optimum-gemma3-text": "Gemma-3 text LM with past (q/k norms, sliding and global layers)",
    "optimum-smollm3": "SmolLM3 LM with past (grouped KV heads, layers without RoPE)",
    "optimum-granite": "Granite LM with past (embedding, residual, attention and logits multipliers)",
    "optimum-olmo2": "OLMo-2 LM with past (norms after attention and MLP, q/k norms over all heads)",
    "optimum-stablelm": "StableLM LM with past (LayerNorm, a quarter of each head rotated)",
    "optimum-cohere": "Cohere LM with past (parallel attention and MLP, interleaved rotary, LayerNorm without bias)",
}
# families built with make_wild.decoder_config (name there)
DECODER_FAMILIES = {"qwen3": "qwen3", "gemma2": "gemma2", "granite": "granite", "stablelm": "stablelm"}


def build(arch, seed):
    import transformers as T
    torch = W._torch()
    common = dict(num_hidden_layers=W.L, hidden_size=W.H, num_attention_heads=W.NH, intermediate_size=W.FF,
                  vocab_size=W.V)
    if arch == "bert":
        cfg, cls = T.BertConfig(max_position_embeddings=64, **common), T.BertModel
    elif arch == "distilbert":
        cfg, cls = T.DistilBertConfig(n_layers=W.L, dim=W.H, n_heads=W.NH, hidden_dim=W.FF, vocab_size=W.V,
                                      max_position_embeddings=64), T.DistilBertModel
    elif arch == "vit":
        c = dict(common)
        c.pop("vocab_size")
        cfg, cls = T.ViTConfig(image_size=32, patch_size=8, **c), T.ViTModel
    elif arch == "gpt2":
        cfg, cls = T.GPT2Config(vocab_size=W.V_SMALL, n_positions=64, n_embd=W.H, n_layer=W.L, n_head=W.NH,
                                n_inner=W.FF), T.GPT2LMHeadModel
    elif arch == "t5":
        cfg, cls = T.T5Config(vocab_size=W.V_SMALL, d_model=W.H, d_kv=W.H // W.NH, d_ff=W.FF, num_layers=W.L,
                              num_decoder_layers=W.L, num_heads=W.NH, feed_forward_proj="gated-gelu",
                              relative_attention_num_buckets=8, decoder_start_token_id=0), \
            T.T5ForConditionalGeneration
    elif arch == "bart":
        cfg, cls = T.BartConfig(vocab_size=W.V_SMALL, d_model=W.H, encoder_layers=W.L, decoder_layers=W.L,
                                encoder_attention_heads=W.NH, decoder_attention_heads=W.NH, encoder_ffn_dim=W.FF,
                                decoder_ffn_dim=W.FF, max_position_embeddings=64), T.BartForConditionalGeneration
    elif arch == "whisper":
        cfg, cls = T.WhisperConfig(vocab_size=W.V_SMALL, num_mel_bins=80, encoder_layers=W.L, decoder_layers=W.L,
                                   encoder_attention_heads=W.NH, decoder_attention_heads=W.NH, encoder_ffn_dim=W.FF,
                                   decoder_ffn_dim=W.FF, d_model=W.H, max_source_positions=16,
                                   max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                   decoder_start_token_id=1), T.WhisperForConditionalGeneration
    elif arch in ("marian", "m2m_100"):
        c = {"marian": T.MarianConfig, "m2m_100": T.M2M100Config}[arch]
        cfg, cls = c(vocab_size=W.V_SMALL, d_model=W.H, encoder_layers=W.L, decoder_layers=W.L,
                     encoder_attention_heads=W.NH, decoder_attention_heads=W.NH, encoder_ffn_dim=W.FF,
                     decoder_ffn_dim=W.FF, max_position_embeddings=64, pad_token_id=1, decoder_start_token_id=1,
                     scale_embedding=True), \
            {"marian": T.MarianMTModel, "m2m_100": T.M2M100ForConditionalGeneration}[arch]
    elif arch == "swin":
        cfg, cls = T.SwinConfig(image_size=32, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2],
                                num_heads=[2, 4], window_size=4, mlp_ratio=2.0), T.SwinModel
    elif arch in ("llama", "qwen2", "mistral", "phi3", "gemma"):
        llm = dict(vocab_size=W.V_SMALL, hidden_size=W.H, intermediate_size=W.FF, num_hidden_layers=W.L,
                   num_attention_heads=W.NH, num_key_value_heads=W.NH // 2, max_position_embeddings=128,
                   tie_word_embeddings=arch in ("qwen2", "gemma"))
        if arch == "phi3":
            llm.update(num_key_value_heads=W.NH, pad_token_id=0)  # Phi-3's packed QKV: as many KV heads as queries
        if arch == "gemma":
            llm.update(head_dim=W.H // W.NH)
        cfg, cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
                    "mistral": (T.MistralConfig, T.MistralForCausalLM), "phi3": (T.Phi3Config, T.Phi3ForCausalLM),
                    "gemma": (T.GemmaConfig, T.GemmaForCausalLM)}[arch]
        cfg = cfg(**llm)
    elif arch in DECODER_FAMILIES:
        cfg, cls = W.decoder_config(DECODER_FAMILIES[arch], None)
    elif arch in ("gemma3_text", "smollm3", "olmo2", "cohere"):
        llm = dict(vocab_size=W.V_SMALL, hidden_size=W.H, intermediate_size=W.FF, num_hidden_layers=W.L,
                   num_attention_heads=W.NH, num_key_value_heads=W.NH // 2, max_position_embeddings=128)
        if arch == "gemma3_text":  # one sliding layer of 4 tokens, then a global one
            llm.update(head_dim=W.H // W.NH, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
        if arch == "smollm3":  # the second layer without RoPE
            llm.update(no_rope_layers=[1, 0], pad_token_id=0)
        cfg = {"gemma3_text": T.Gemma3TextConfig, "smollm3": T.SmolLM3Config, "olmo2": T.Olmo2Config,
               "cohere": T.CohereConfig}[arch](**llm)
        cls = T.AutoModelForCausalLM.from_config(cfg).__class__
    elif arch == "phi":
        cfg, cls = T.PhiConfig(vocab_size=W.V_SMALL, hidden_size=W.H, intermediate_size=W.FF, num_hidden_layers=W.L,
                               num_attention_heads=W.NH, partial_rotary_factor=0.5,
                               max_position_embeddings=128), T.PhiForCausalLM
    elif arch == "gpt_neox":
        cfg, cls = T.GPTNeoXConfig(vocab_size=W.V_SMALL, hidden_size=W.H, intermediate_size=W.FF,
                                   num_hidden_layers=W.L, num_attention_heads=W.NH, rotary_pct=0.25,
                                   max_position_embeddings=128), T.GPTNeoXForCausalLM
    elif arch == "gptj":
        cfg, cls = T.GPTJConfig(vocab_size=W.V_SMALL, n_positions=128, n_embd=W.H, n_layer=W.L, n_head=W.NH,
                                rotary_dim=8, n_inner=W.FF), T.GPTJForCausalLM
    elif arch == "codegen":
        cfg, cls = T.CodeGenConfig(vocab_size=W.V_SMALL, n_positions=128, n_embd=W.H, n_layer=W.L, n_head=W.NH,
                                   rotary_dim=8, n_inner=W.FF), T.CodeGenForCausalLM
    torch.manual_seed(seed)
    m = cls(cfg)
    W.add_noise(m, seed)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # Swin's relative position tables start at zeros (make_wild.vision_encoder)
        for name, p in sorted(m.named_parameters()):
            if "relative_position_bias_table" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def pad_inputs(inputs, decoder_with_past):
    """Padding in the second batch: right padding of the (encoder) attention mask's row 1, or left padding of the
    past for a decoder-only model with past."""
    for k in ("attention_mask", "encoder_attention_mask"):
        v = inputs.get(k)
        if v is None or v.shape[0] < 2:
            continue
        if decoder_with_past and k == "attention_mask":
            v[1, :2] = 0
        else:
            v[1, -3:] = 0


def refs_for(config, model, shapes, seed, decoder_only_past, onnx_input_names):
    """Optimum's own validation recipe (optimum.exporters.onnx.convert._run_validation) with our shapes."""
    torch = W._torch()
    import random
    import numpy as np
    torch.manual_seed(seed)
    random.seed(seed)  # Optimum's random_mask_tensor draws the masks' lengths from python's random
    np.random.seed(seed % (1 << 32))
    b, s = shapes
    kw = dict(batch_size=b, sequence_length=s, nb_max_frames=32, height=32, width=32, num_channels=3)
    inputs = config.generate_dummy_inputs(framework="pt", **kw)
    pad_inputs(inputs, decoder_only_past)
    if "cache_position" in inputs:
        # the dummy generator draws a random cache_position; a real step's is past_length + 0..new-1 (with a random
        # one torch and the export disagree by 0.04-0.17 on Whisper: the graph takes positions from the past length)
        past = inputs["past_key_values"][0][0].shape[2]
        n = inputs["cache_position"].shape[0]
        inputs["cache_position"] = torch.arange(past, past + n, dtype=inputs["cache_position"].dtype)
    ref_in = config.rename_ambiguous_inputs(copy.deepcopy(inputs))
    with config.patch_model_for_export(model, model_kwargs={}):
        with torch.inference_mode():
            out = model(**ref_in)
    refs = {}
    for name, value in out.items():
        if value is None:
            continue
        if name == "past_key_values":
            name = "present"
        if isinstance(value, (list, tuple)):
            value = config.flatten_output_collection_property(config.torch_to_onnx_output_map.get(name, name), value)
            refs.update({k: v.numpy() for k, v in value.items() if v is not None})
        else:
            refs[name] = value.numpy()
    # as Optimum's validation feeds ONNX Runtime: renamed (decoder_input_ids -> input_ids, ...) and flattened
    inputs = config.generate_dummy_inputs_for_validation(inputs, onnx_input_names=onnx_input_names)
    feeds = {}
    for name, value in inputs.items():
        if isinstance(value, (list, tuple)):
            value = config.flatten_output_collection_property(name, value)
            feeds.update({k: v.numpy() for k, v in value.items() if v is not None})
        else:
            feeds[name] = value.numpy()
    return feeds, refs


def export_arch(env, arch, task, keep, seed):
    import onnx
    from optimum.exporters.onnx import main_export
    from optimum.exporters.onnx.utils import _get_submodels_and_onnx_configs
    from optimum.exporters.tasks import TasksManager
    torch = W._torch()
    tmp = tempfile.mkdtemp()
    model_dir, out_dir = os.path.join(tmp, "model"), os.path.join(tmp, "onnx")
    build(arch, seed).save_pretrained(model_dir)
    main_export(model_dir, out_dir, task=task, no_post_process=True, library_name="transformers",
                nb_max_frames=32, height=32, width=32, num_channels=3)
    model = TasksManager.get_model_from_task(task, model_dir, framework="pt", library_name="transformers")
    model.eval()
    _, subs = _get_submodels_and_onnx_configs(model=model, task=task, monolith=False, custom_onnx_configs={},
                                              custom_architecture=False, _variant="default",
                                              library_name="transformers")
    res = []
    for sub, corpus_arch in keep.items():
        submodel, config = subs[sub]
        src = os.path.join(out_dir, sub + ".onnx")
        m = onnx.load(src)
        opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
        stem = "%s.optimum%d.%s" % (corpus_arch, opset, W.torch_short())
        shutil.copy(src, os.path.join(W.OUT, stem + ".onnx"))
        onnx_ins = [i.name for i in m.graph.input]
        onnx_outs = [o.name for o in m.graph.output]
        feeds, refs = [], []
        for k, shp in enumerate(SHAPES):
            f, r = refs_for(config, submodel, shp, seed + 10 * k, arch in DECODER_ONLY, onnx_ins)
            feeds.append({n: v for n, v in f.items() if n in onnx_ins})
            refs.append({n: v for n, v in r.items() if n in onnx_outs})
        W.save(stem, feeds, "calib")
        W.save(stem, refs, ".build/refs")
        info = {"file": stem + ".onnx", "stem": stem, "env": env, "arch": corpus_arch,
                "arch_name": NAMES[corpus_arch], "exporter": "optimum", "opset_requested": None, "opset": opset,
                "attn_requested": None, "attn_implementation": getattr(model.config, "_attn_implementation", None),
                "seed": seed, "versions": W.versions(), "optimum_task": task, "optimum_submodel": sub,
                "exporter_call": "optimum.exporters.onnx.main_export(<local folder>, task=%r, no_post_process=True) "
                                 "(default opset; = optimum-cli export onnx --task %s --no-post-process); "
                                 "file %s.onnx" % (task, task, sub),
                "inputs_declared": onnx_ins, "outputs_declared": onnx_outs}
        res.append((stem, info))
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def main():
    os.makedirs(os.path.join(W.BUILD, "info"), exist_ok=True)
    only = sys.argv[sys.argv.index("--only") + 1:] if "--only" in sys.argv else None
    env = sys.argv[2]
    for k, (arch, task, keep) in enumerate(PLANS[env]):
        if only and arch not in only:
            continue
        seed = (2500 if env == "optimum" else 2600) + k
        try:
            for stem, info in export_arch(env, arch, task, keep, seed):
                W.write_info(stem, info)
                print("exported", stem, flush=True)
        except Exception as e:  # noqa: BLE001
            msg = "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[0][:400] if str(e).strip() else "")
            for corpus_arch in keep.values():
                tag = "%s.optimum.%s" % (corpus_arch, W.torch_short())
                W.write_info(tag + ".FAILED", {"file": None, "stem": tag, "env": env, "arch": corpus_arch,
                                               "exporter": "optimum", "optimum_task": task,
                                               "versions": W.versions(), "error": "export failed: " + msg})
            print("FAILED", arch, msg, flush=True)
            traceback.print_exc(limit=5)


if __name__ == "__main__":
    main()
