#!/usr/bin/env python3
"""PyTorch's flash attention (SDPA, FLASH_ATTENTION backend) at the Llama-3.2-1B block shape, as HF
Llama calls it: q (B, T, H, D) and k, v (B, T, KV, D) viewed as (B, heads, T, D), k and v repeated to
the H query heads, causal. Times the forward and forward + backward with CUDA events (mean of `iters`
after warm-up) and prints one JSON line; under `ncu -k regex:flash` it gives the kernels' own times
for a side-by-side with proxqat's flash_fwd_bf16 / flash_bwd_bf16.

usage: attention_reference.py [B] [T] [iters]   (defaults 16 256 50; H 32, KV 8, D 64)
"""
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

b = int(sys.argv[1]) if len(sys.argv) > 1 else 16
t = int(sys.argv[2]) if len(sys.argv) > 2 else 256
iters = int(sys.argv[3]) if len(sys.argv) > 3 else 50
h, kv, d = 32, 8, 64
dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(0)
rows = lambda heads: torch.randn(b, t, heads, d, device=dev, dtype=torch.bfloat16, generator=gen)
q, k, v = rows(h).requires_grad_(), rows(kv).requires_grad_(), rows(kv).requires_grad_()
grad_out = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16, generator=gen)


def attention():
    rep = lambda x: x.transpose(1, 2).repeat_interleave(h // kv, dim=1)
    return F.scaled_dot_product_attention(q.transpose(1, 2), rep(k), rep(v), is_causal=True)


def timed(fn):
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
    with torch.no_grad():
        fwd_us = timed(attention)
    both_us = timed(lambda: attention().backward(grad_out))
print(json.dumps({"impl": "torch-sdpa-flash", "b": b, "t": t, "heads": h, "kv_heads": kv, "head_dim": d,
                  "us_forward": round(fwd_us, 1), "us_forward_backward": round(both_us, 1),
                  "torch": torch.__version__}))
