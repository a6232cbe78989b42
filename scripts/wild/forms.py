#!/usr/bin/env python3
"""Model forms users bring that no exporter of the wild corpus writes, and onnxopt on each:
vision and speech encoders exported with every input dim free (as Optimum exports them),
float16 models, models already quantized by ONNX Runtime's tools (QDQ, QOperator, dynamic),
an ONNX Runtime GenAI decoder, and Optimum's merged-decoder layout (an `If` per branch). Run by hand (minutes; never by CI).

    python3 scripts/wild/forms.py make OUT_DIR [--torch-python PY]   # build the forms
    python3 scripts/wild/forms.py run OUT_DIR [--onnxopt BIN]         # onnxopt on each, a line per run
    python3 scripts/wild/forms.py merged DECODER.onnx OUT.onnx        # Optimum's merged layout of DECODER

`make` exports with `--torch-python` (a venv with torch and transformers: the wild corpus's
`wild-t210`), and quantizes and converts with this interpreter's onnxruntime; with
onnxruntime-genai installed in the torch venv it also builds SmolLM2 from `--genai-hf DIR`.
`run` runs `onnxopt optimize` in the modes users ask for and prints, per run, its exit code
and the validation's first output line (or the check, or the error).
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MINILM = os.path.join(REPO, "..", "shared", "corpus", "minilm-l6", "all-minilm-l6-v2.ts.onnx")
MINILM_CALIB = os.path.join(REPO, "..", "shared", "corpus", "calib", "minilm", "dynamic")

# Tiny random encoders, every input dim named (Optimum's names), the legacy exporter.
TORCH_EXPORTS = r'''
import sys, torch, transformers as T, warnings
warnings.filterwarnings("ignore")
torch.manual_seed(0)
out = sys.argv[1]
small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
class Pixels(torch.nn.Module):
    def __init__(s, m): super().__init__(); s.m = m
    def forward(s, x): return s.m(pixel_values=x).last_hidden_state
class Features(torch.nn.Module):
    def __init__(s, m): super().__init__(); s.m = m
    def forward(s, x): return s.m(input_features=x).last_hidden_state
class Waves(torch.nn.Module):
    def __init__(s, m): super().__init__(); s.m = m
    def forward(s, x): return s.m(input_values=x).last_hidden_state
def export(model, example, name, input_name, dims):
    torch.onnx.export(model.eval(), (example,), f"{out}/{name}.onnx", input_names=[input_name],
                      output_names=["last_hidden_state"], dynamic_axes={input_name: dims},
                      opset_version=17, dynamo=False)
image = {0: "batch_size", 1: "num_channels", 2: "height", 3: "width"}
export(Pixels(T.ViTModel(T.ViTConfig(image_size=224, patch_size=16, **small))),
       torch.randn(1, 3, 224, 224), "vit224", "pixel_values", image)
export(Pixels(T.DeiTModel(T.DeiTConfig(image_size=32, patch_size=8, **small))),
       torch.randn(1, 3, 32, 32), "deit", "pixel_values", image)
export(Pixels(T.CLIPVisionModel(T.CLIPVisionConfig(image_size=32, patch_size=8, **small))),
       torch.randn(1, 3, 32, 32), "clip-vision", "pixel_values", image)
export(Pixels(T.SiglipVisionModel(T.SiglipVisionConfig(image_size=32, patch_size=8, **small))),
       torch.randn(1, 3, 32, 32), "siglip-vision", "pixel_values", image)
export(Pixels(T.Dinov2Model(T.Dinov2Config(image_size=518, patch_size=14, **small))),
       torch.randn(1, 3, 224, 224), "dinov2", "pixel_values", image)
whisper = T.WhisperConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                          vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          decoder_start_token_id=1)
export(Features(T.WhisperModel(whisper).get_encoder()), torch.randn(1, 80, 3000), "whisper-encoder",
       "input_features", {0: "batch_size", 1: "feature_size", 2: "encoder_sequence_length"})
w2v = T.Wav2Vec2Config(conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, **small)
export(Waves(T.Wav2Vec2Model(w2v)), torch.randn(1, 16000), "wav2vec2", "input_values",
       {0: "batch_size", 1: "sequence_length"})
'''


def make(args):
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    subprocess.run([args.torch_python, "-c", TORCH_EXPORTS, out], check=True, stderr=subprocess.DEVNULL)
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.transformers.float16 import convert_float_to_float16
    onnx.save(convert_float_to_float16(onnx.load(MINILM), keep_io_types=False), f"{out}/minilm-fp16.onnx")
    onnx.save(convert_float_to_float16(onnx.load(MINILM), keep_io_types=True), f"{out}/minilm-fp16-io32.onnx")
    quantize_dynamic(MINILM, f"{out}/minilm-ort-dynamic.onnx", weight_type=QuantType.QUInt8)
    names = [i.name for i in ort.InferenceSession(MINILM, providers=["CPUExecutionProvider"]).get_inputs()]
    stems = sorted({os.path.basename(p).split(".")[0] for p in glob.glob(f"{MINILM_CALIB}/*.npy")})[:4]
    batches = [{n: np.load(f"{MINILM_CALIB}/{b}.{n}.npy") for n in names} for b in stems]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    quantize_static(MINILM, f"{out}/minilm-ort-qdq.onnx", Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    quantize_static(MINILM, f"{out}/minilm-ort-qoperator.onnx", Reader(), quant_format=QuantFormat.QOperator)
    if args.genai_hf:
        subprocess.run([args.torch_python, "-m", "onnxruntime_genai.models.builder", "-i", args.genai_hf,
                        "-o", f"{out}/genai-fp32", "-p", "fp32", "-e", "cpu", "-c", f"{out}/genai-cache"],
                       check=True, capture_output=True)


def merged(decoder, out):
    """Optimum's merged-decoder layout (`decoder_model_merged.onnx`): the weights in the main
    graph, the decoder in each branch of an `If` on a `use_cache_branch` input. Both branches
    are `decoder` (with a cache) here, renamed apart; Optimum's `else` branch is the decoder
    without one. Writes calibration batches beside: `decoder`'s own (wild corpus), one per
    branch."""
    import copy

    import numpy as np
    import onnx
    from onnx import TensorProto, helper
    m = onnx.load(decoder)
    g = m.graph

    def branch(prefix):
        nodes = copy.deepcopy(list(g.node))
        produced = {o for n in nodes for o in n.output if o}
        for n in nodes:
            n.name = prefix + n.name
            n.output[:] = [prefix + o if o else o for o in n.output]
            n.input[:] = [prefix + i if i in produced else i for i in n.input]
        outputs = copy.deepcopy(list(g.output))
        for o in outputs:
            o.name = prefix + o.name
        return helper.make_graph(nodes, prefix + "branch", [], outputs)

    use = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    node = helper.make_node("If", ["use_cache_branch"], [o.name for o in g.output], name="optimum::if",
                            then_branch=branch("with_past/"), else_branch=branch("no_past/"))
    graph = helper.make_graph([node], "merged", list(g.input) + [use], list(g.output), list(g.initializer))
    model = helper.make_model(graph, opset_imports=m.opset_import, ir_version=m.ir_version)
    onnx.checker.check_model(model, full_check=True)
    stem = os.path.splitext(os.path.basename(out))[0]
    onnx.save(model, out)
    calib = os.path.join(os.path.dirname(out), "calib", stem)
    source = os.path.join(REPO, "testdata", "wild", "calib", os.path.splitext(os.path.basename(decoder))[0])
    os.makedirs(calib, exist_ok=True)
    for f in glob.glob(f"{source}/batch_0[01].*.npy"):
        shutil.copy(f, calib)
    for batch, use_cache in (("batch_00", True), ("batch_01", False)):
        np.save(f"{calib}/{batch}.use_cache_branch.npy", np.array([use_cache]))


MODES = {
    "float": [],
    "fp16": ["--fp16"],
    "int8-dynamic": ["--int8-dynamic"],
    "int4-weights": ["--weights", "int4", "--weights-method", "rtn"],
}


def run(args):
    models = sorted(glob.glob(f"{args.out}/*.onnx")) + sorted(glob.glob(f"{args.out}/genai-fp32/model.onnx"))
    failures = 0
    scratch = tempfile.mkdtemp()
    for model in models:
        for mode, flags in MODES.items():
            out = os.path.join(scratch, "out.onnx")
            r = subprocess.run([args.onnxopt, "optimize", model, out, *flags], capture_output=True, text=True)
            lines = (r.stdout + r.stderr).splitlines()
            said = [l.strip() for l in lines if l.startswith(("check:", "error:"))]
            table = [l.strip() for i, l in enumerate(lines) if i > 0 and lines[i - 1].lstrip().startswith("output ")]
            print(f"{r.returncode} {os.path.relpath(model, args.out):32s} {mode:13s} {(said or table or [''])[0][:150]}")
            failures += r.returncode != 0 or any("not done" in s for s in said)
    shutil.rmtree(scratch)
    print(f"{failures} runs refused or left unchecked")
    return 1 if failures else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out")
    m.add_argument("--torch-python", default="/work/venvs/wild-t210/bin/python")
    m.add_argument("--genai-hf", help="a Hugging Face model folder for ONNX Runtime GenAI's builder")
    g = sub.add_parser("merged", help="Optimum's merged-decoder layout of a decoder with a cache")
    g.add_argument("decoder")
    g.add_argument("out")
    r = sub.add_parser("run")
    r.add_argument("out")
    r.add_argument("--onnxopt", default=os.path.join(REPO, "target", "release", "onnxopt"))
    args = p.parse_args()
    if args.cmd == "merged":
        return merged(args.decoder, args.out)
    return make(args) if args.cmd == "make" else run(args)


if __name__ == "__main__":
    sys.exit(main())
