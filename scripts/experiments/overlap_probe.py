#!/usr/bin/env python3
"""Would running the weight-gradient GEMMs on a second stream, beside the memory-bound passes of the
backward, pay under the power cap?  Per layer of the Llama-3.2-1B shape: the seven ∂W GEMMs (added into
their accumulators, β = 1) and a memory-bound stand-in for the layer's other backward passes
(SwiGLU, RMSNorm, RoPE, casts: COPY_MB megabytes copied, default 1200 ≈ 310 µs at ~4 TB/s), either one
after the other on one stream or on two streams at once; 16 layers back to back for SECONDS, alternating.
usage: overlap_probe.py TOKENS [SECONDS]  -> one JSON line
"""
import json
import os
import sys
import time

import torch

tokens = int(sys.argv[1])
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
copy_mb = float(os.environ.get("COPY_MB", "1200"))
d, ff, kv, layers = 2048, 8192, 512, 16
dev, bf = "cuda", torch.bfloat16
shapes = [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff)]
xs = [torch.randn(tokens, i, device=dev, dtype=bf) for _, i in shapes]
dys = [torch.randn(tokens, o, device=dev, dtype=bf) for o, _ in shapes]
# PyTorch has no bf16 · bf16 product accumulated into f32: the accumulators here are bf16 (a little less
# traffic than proxqat's f32 ones).
acc = [torch.zeros(o, i, device=dev, dtype=bf) for o, i in shapes]
# Three copies per layer, each reading and writing copy_mb / 6 (bf16 elements of 2 bytes).
elems = int(copy_mb * (1 << 20) / 6 / 2)
src, dst = torch.randn(elems, device=dev, dtype=bf), torch.empty(elems, device=dev, dtype=bf)
side = torch.cuda.Stream()


def weight_grads():
    for a, x, dy in zip(acc, xs, dys):
        a.addmm_(dy.t(), x)  # accumulator += product (cuBLAS, β = 1)


def memory_bound():
    for _ in range(3):
        dst.copy_(src)


def step(overlap):
    for _ in range(layers):
        if overlap:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                weight_grads()
            memory_bound()
            torch.cuda.current_stream().wait_stream(side)
        else:
            weight_grads()
            memory_bound()


def sustained(overlap):
    for _ in range(3):
        step(overlap)
    torch.cuda.synchronize()
    start, n = time.time(), 0
    while time.time() - start < seconds:
        step(overlap)
        n += 1
        torch.cuda.synchronize()
    return 1e3 * (time.time() - start) / n


# Each part alone, for the ideal overlap.
def alone(fn):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.time()
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.time() - start) / 200 * layers


rounds = {"serial": [], "overlap": []}
for _ in range(3):
    rounds["serial"].append(sustained(False))
    rounds["overlap"].append(sustained(True))
s_ms, o_ms = (sum(v) / len(v) for v in rounds.values())
print(json.dumps({"tokens": tokens, "copy_mb": copy_mb, "ms_weight_grads_alone": alone(weight_grads),
                  "ms_memory_bound_alone": alone(memory_bound), "ms_serial": rounds["serial"],
                  "ms_overlap": rounds["overlap"], "speedup": s_ms / o_ms}))
