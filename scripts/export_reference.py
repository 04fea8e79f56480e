#!/usr/bin/env python3
"""Independent readers for proxqat's exports, compared bit for bit with a checkpoint's f32 tensors.

  export_reference.py gguf   FILE.gguf  CKPT_DIR   # PyPI `gguf` reader + its dequantize, q/k un-permuted here
  export_reference.py packed PACKED_DIR CKPT_DIR   # numpy unpacking of the documented packed layout

Prints one JSON object: tensors compared, how many differ in any bit, and the storage types seen.
Uses only numpy and gguf (no proxqat code).
"""
import json
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I8": np.int8}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        if info["dtype"] == "BF16":
            raw = np.frombuffer(data[a:b], dtype=np.uint16).astype(np.uint32) << 16
            arr = raw.view(np.float32)
        else:
            arr = np.frombuffer(data[a:b], dtype=DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"])
    return out, header.get("__metadata__", {})


def hf_name(g):
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if g in fixed:
        return fixed[g]
    parts = {"attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
             "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
             "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
             "ffn_down.weight": "mlp.down_proj.weight"}
    _, layer, part = g.split(".", 2)
    return f"model.layers.{layer}.{parts[part]}"


def unpermute(w, heads):
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def compare(got, ref, report):
    report["compared"] += 1
    if got.shape != ref.shape or not np.array_equal(got.astype(np.float32).view(np.uint32), ref.view(np.uint32)):
        report["mismatched"] += 1
        report.setdefault("differ", []).append(report["current"])


def check_gguf(path, ckpt):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ref, _ = read_safetensors(f"{ckpt}/model.safetensors")
    reader = GGUFReader(path)
    field = lambda k: reader.fields[k].parts[-1][0]
    heads, kv_heads = int(field("llama.attention.head_count")), int(field("llama.attention.head_count_kv"))
    report = {"compared": 0, "mismatched": 0, "types": {}}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        name = hf_name(t.name)
        report["current"] = name
        kind = t.tensor_type.name
        report["types"][kind] = report["types"].get(kind, 0) + 1
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(ref[name].shape)
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, kv_heads)
        compare(w, ref[name], report)
    report.pop("current", None)
    return report


def check_packed(packed, ckpt):
    ref, _ = read_safetensors(f"{ckpt}/model.safetensors")
    tensors, meta = read_safetensors(f"{packed}/model.safetensors")
    qc = json.load(open(f"{packed}/config.json"))["quantization_config"]
    assert json.loads(meta["quantization_config"]) == qc, "header and config.json disagree"
    report = {"compared": 0, "mismatched": 0, "types": {}}
    for name, want in ref.items():
        report["current"] = name
        if name in qc["modules"]:
            m = qc["modules"][name]
            rows, cols = m["shape"]
            bits = m["bits"]
            packed_rows = tensors[name + ".codes"]
            unpacked = np.unpackbits(packed_rows, axis=1, bitorder="little")[:, : cols * bits]
            codes = (unpacked.reshape(rows, cols, bits).astype(np.int64) << np.arange(bits)).sum(axis=2)
            if m["grid"] == "uniform":
                scales = tensors[name + ".scales"].astype(np.float32)
                s = np.broadcast_to(scales.repeat(cols // scales.shape[1], axis=1), (rows, cols))
                half = 2 ** (bits - 1) - 1
                got = (codes - half).astype(np.float32) * s
            else:
                got = tensors[name + ".levels"][codes]
            kind = f"packed-{bits}bit"
        else:
            got = tensors[name].astype(np.float32)
            kind = str(tensors[name].dtype)
        report["types"][kind] = report["types"].get(kind, 0) + 1
        compare(got, want, report)
    report.pop("current", None)
    return report


if __name__ == "__main__":
    mode, path, ckpt = sys.argv[1:4]
    print(json.dumps(check_gguf(path, ckpt) if mode == "gguf" else check_packed(path, ckpt)))
