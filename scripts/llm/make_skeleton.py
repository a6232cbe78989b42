#!/usr/bin/env python3
"""Full-size decoder-LLM skeletons for the speed and memory benchmarks (issue 16), and their
materialization with external data. Run by hand only, never by CI.

    python3 scripts/llm/make_skeleton.py export qwen2.5-0.5b testdata/skeletons/   # the graph only
    python3 scripts/llm/make_skeleton.py materialize testdata/skeletons/llama3.2-1b.dynamo20.skel.onnx \
        /work/llm-skel/1b/model.onnx                                              # + model.onnx.data

`export` builds the model from its transformers config (random weights; the values do not matter,
only the graph does) and exports its prefill form (input_ids, attention_mask -> logits) with torch's
dynamo exporter at opset 20, the way scripts/llm/make_llm.py exports the tiny corpus. The export is
never written with its weights: before serializing, every float initializer of more than 4096
elements is swapped for a reference to a file that does not exist, then emptied and marked with a
fill instruction, which makes the file a skeleton in the format of the shared corpus's
skeletons/materialize.py (version 1; no sha256 recorded, since a model over 2 GB cannot be written
as one protobuf file). The skeleton is a few hundred kB.

`materialize` fills the marked tensors with materialize.py's algorithm (its `fill_bytes`, imported
from $ONNXOPT_CORPUS/skeletons or ../shared/corpus/skeletons), one tensor at a time, appending each
to OUTPUT.data, so that memory stays at one tensor whatever the model size (materialize.py itself
holds the whole model). The result is what the exporter would have written with external data.

Geometries (the real models', tied embeddings like theirs):
  qwen2.5-0.5b  Qwen2: hidden 896, 24 layers, 14 query / 2 key-value heads, MLP 4864, vocab 151936
  llama3.2-1b   Llama: hidden 2048, 16 layers, 32 query / 8 key-value heads of 64, MLP 8192,
                vocab 128256, llama3 RoPE scaling
Interpreter: /opt/smollm-venv/bin/python (torch, transformers, onnx, onnx_ir).
"""
import argparse
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OPSET = 20
# materialize.py's rule: float initializers above this many elements are generated
KEEP_ELEMENTS = 4096
STD = 0.02

GEOMETRIES = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=True)),
    "llama3.2-1b": ("LlamaConfig", dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, intermediate_size=8192, vocab_size=128256, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192})),
}


def export(name, out_dir):
    import onnx
    import onnx_ir as ir
    import torch
    import transformers

    sys.path.insert(0, HERE)
    from make_llm import prefill_module  # the tiny corpus's prefill wrapper

    cls_name, kwargs = GEOMETRIES[name]
    cfg = getattr(transformers, cls_name)(pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)
    torch.manual_seed(16)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("sequence", min=1, max=4096)
    ids = torch.tensor([[5, 17, 42, 99, 7, 8, 9, 10], [11, 12, 13, 14, 15, 0, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    prog = torch.onnx.export(prefill_module(model), (ids, mask), dynamo=True, opset_version=OPSET,
                             input_names=["input_ids", "attention_mask"], output_names=["logits"],
                             dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                             "attention_mask": {0: batch, 1: seq}})
    del model

    # Swap each large float weight for a reference to nowhere: serializing then copies no data.
    big = set()
    for value in prog.model.graph.initializers.values():
        t = value.const_value
        if t is None or t.dtype != ir.DataType.FLOAT or t.size <= KEEP_ELEMENTS:
            continue
        value.const_value = ir.ExternalTensor("nowhere", 0, t.nbytes, t.dtype, shape=t.shape,
                                              name=value.name)
        big.add(value.name)
    proto = ir.serde.serialize_model(prog.model)
    del prog

    elements = 0
    for seed, t in enumerate(proto.graph.initializer, start=1):
        if t.name not in big:
            continue
        del t.external_data[:]
        t.ClearField("data_location")
        t.doc_string = f"materialize:normal(0.0,{STD}),seed={seed}"
        n = 1
        for d in t.dims:
            n *= d
        elements += n
    for node in proto.graph.node:
        # the exporter's debug notes (stack traces, module paths, fx nodes) weigh megabytes and
        # name this machine's paths; the tiny corpus keeps all but the stack traces
        del node.metadata_props[:]
    for key, value in (("onnxopt.skeleton", "v1"), ("onnxopt.skeleton.tensors", str(len(big))),
                       ("onnxopt.skeleton.elements", str(elements))):
        proto.metadata_props.add(key=key, value=value)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.dynamo{OPSET}.skel.onnx")
    onnx.save(proto, path)
    print(f"wrote {path}: {len(big)} tensors, {elements} elements ({elements * 4 / 1e9:.2f} GB as "
          f"float32) to generate; {os.path.getsize(path)} bytes")


def shared_materialize():
    corpus = os.environ.get("ONNXOPT_CORPUS", os.path.join(REPO, "..", "shared", "corpus"))
    for path in (os.path.join(corpus, "skeletons", "materialize.py"), os.path.join(corpus, "materialize.py")):
        if os.path.exists(path):
            spec = importlib.util.spec_from_file_location("materialize", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    sys.exit(f"materialize.py not found under {corpus} (set ONNXOPT_CORPUS)")


def materialize(skeleton, out):
    import onnx

    mat = shared_materialize()
    model = onnx.load(skeleton, load_external_data=False)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    location = os.path.basename(out) + ".data"
    data_path = os.path.join(os.path.dirname(os.path.abspath(out)), location)
    done = 0
    with open(data_path + ".partial", "wb") as data:
        for t, mean, std, seed in mat.skeleton_entries(model):
            offset = data.tell()
            # onnx's own writer aligns every tensor to 4096 bytes in the data file: so do we
            pad = -offset % 4096
            data.write(b"\0" * pad)
            offset += pad
            length = data.write(mat.fill_bytes(t, mean, std, seed))
            t.doc_string = ""
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=key, value=value)
            done += 1
            if done % 20 == 0:
                print(f"  {done} tensors, {data.tell() / 1e9:.2f} GB", file=sys.stderr, flush=True)
    keep = [p for p in model.metadata_props if not p.key.startswith(mat.META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.save(model, out)
    os.replace(data_path + ".partial", data_path)
    print(f"wrote {out} ({os.path.getsize(out)} bytes) + {location} ({os.path.getsize(data_path)} bytes); "
          f"{done} tensors generated")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="export a geometry's skeleton")
    e.add_argument("geometry", choices=sorted(GEOMETRIES))
    e.add_argument("out_dir")
    m = sub.add_parser("materialize", help="fill a skeleton's weights into OUTPUT + OUTPUT.data")
    m.add_argument("skeleton")
    m.add_argument("output")
    a = ap.parse_args()
    if a.command == "export":
        export(a.geometry, a.out_dir)
    else:
        materialize(a.skeleton, a.output)


if __name__ == "__main__":
    main()
