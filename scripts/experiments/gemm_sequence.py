#!/usr/bin/env python3
"""The GEMMs of one micro-step of the Llama-3.2-1B shape (forward, data and weight gradients of the 16
blocks' seven projections and the tied head), run back to back through PyTorch's cuBLAS for a few seconds:
their time under sustained load, to set beside ncu's per-kernel times (each kernel in isolation) and the
bench's measured micro-step.  usage: gemm_sequence.py TOKENS [SECONDS]  -> one JSON line
"""
import json
import sys
import time

import torch

tokens, seconds = int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
d, ff, kv, vocab, layers = 2048, 8192, 512, 128256, 16
dev, bf = "cuda", torch.bfloat16
weights = {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d), "gate": (ff, d), "up": (ff, d), "down": (d, ff)}
w = {n: torch.randn(s, device=dev, dtype=bf) * 0.02 for n, s in weights.items()}
x = {n: torch.randn(tokens, s[1], device=dev, dtype=bf) for n, s in weights.items()}
dy = {n: torch.randn(tokens, s[0], device=dev, dtype=bf) for n, s in weights.items()}
head = torch.randn(vocab, d, device=dev, dtype=bf) * 0.02
hx, hdy = torch.randn(tokens, d, device=dev, dtype=bf), torch.randn(tokens, vocab, device=dev, dtype=bf)


# ∂W: proxqat adds the product into an f32 accumulator inside the GEMM (β = 1); PyTorch has no
# bf16 · bf16 → f32 accumulating product, so here it is written in bf16 (a little less traffic).
def micro_step():
    for _ in range(layers):
        for n in weights:
            torch.mm(x[n], w[n].t())                       # forward
            torch.mm(dy[n], w[n])                          # ∂x
            torch.mm(dy[n].t(), x[n])                      # ∂W
    torch.mm(hx, head.t())
    torch.mm(hdy, head)
    torch.mm(hdy.t(), hx)


flops = 3 * 2 * tokens * (layers * sum(a * b for a, b in weights.values()) + vocab * d)
for _ in range(3):
    micro_step()
torch.cuda.synchronize()
start, n = time.time(), 0
while time.time() - start < seconds:
    micro_step()
    n += 1
    torch.cuda.synchronize()
ms = 1e3 * (time.time() - start) / n
print(json.dumps({"tokens": tokens, "micro_steps": n, "ms_per_micro_step": ms, "tflops": flops / ms / 1e9}))
