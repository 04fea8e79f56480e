#!/usr/bin/env python3
"""Independent reference: a float64 numpy forward of a llama GGUF read with PyPI `gguf`.

usage: gguf_reference.py MODEL.gguf ID [ID ...]   ->  JSON {"logits": [[...] per position]} on stdout
Shares no code with proxqat: dequantization is gguf's, the forward is written out here.
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def main():
    path, ids = sys.argv[1], [int(x) for x in sys.argv[2:]]
    r = GGUFReader(path)
    meta = {f.name: f for f in r.fields.values()}

    def scalar(key, default=None):
        if key not in meta:
            return default
        f = meta[key]
        return f.parts[f.data[0]][0].item()

    n_layer = scalar("llama.block_count")
    n_head = scalar("llama.attention.head_count")
    n_kv = scalar("llama.attention.head_count_kv", n_head)
    eps = scalar("llama.attention.layer_norm_rms_epsilon", 1e-5)
    theta = scalar("llama.rope.freq_base", 10000.0)
    w = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        w[t.name] = a.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))

    def unpermute(m, heads):
        rows, cols = m.shape
        return m.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    x = w["token_embd.weight"][ids]
    T, d = x.shape
    hd = d // n_head
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(h):  # (heads, T, hd), rotate-half
        h1, h2 = h[..., : hd // 2], h[..., hd // 2 :]
        return h * cos + np.concatenate([-h2, h1], -1) * sin

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n_layer):
        p = f"blk.{i}."
        a = rms(x, w[p + "attn_norm.weight"])
        q = (a @ unpermute(w[p + "attn_q.weight"], n_head).T).reshape(T, n_head, hd).transpose(1, 0, 2)
        k = (a @ unpermute(w[p + "attn_k.weight"], n_kv).T).reshape(T, n_kv, hd).transpose(1, 0, 2)
        v = (a @ w[p + "attn_v.weight"].T).reshape(T, n_kv, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        rep = n_head // n_kv
        k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(1, 0, 2).reshape(T, d)
        x = x + o @ w[p + "attn_output.weight"].T
        m = rms(x, w[p + "ffn_norm.weight"])
        g, u = m @ w[p + "ffn_gate.weight"].T, m @ w[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
    x = rms(x, w["output_norm.weight"])
    head = w.get("output.weight", w["token_embd.weight"])
    json.dump({"logits": (x @ head.T).tolist()}, sys.stdout)


if __name__ == "__main__":
    main()
