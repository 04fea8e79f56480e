#!/usr/bin/env python3
"""Would picking cuBLASLt algorithms by measurement beat cuBLAS's heuristic for the GEMMs of one micro-step
of the Llama-3.2-1B shape (forward, ∂x and ∂W of the 16 blocks' seven projections and the tied head)?

For each distinct GEMM (∂W as proxqat does it: bf16 · bf16 added into an f32 accumulator, β = 1) the
script asks cuBLASLt for up to K heuristic candidates, times each alone, then runs the whole micro-step
sequence back to back for SECONDS with (a) the heuristic's first choice and (b) the fastest measured
candidate, alternating, under the sustained power cap.  usage: gemm_algos.py TOKENS [SECONDS] [K]
-> per-GEMM lines, then one JSON line.  With LAYOUT=fused it instead compares, both on measured
algorithms, the projections as they are (q, k, v, gate, up separate) with q/k/v as one (3072, 2048)
projection and gate/up as one (16384, 2048): one GEMM each for their forward, ∂x (K = 3072 / 16384) and
∂W.  With PICK=energy it compares the choice by time alone (a few runs at boost clocks) with the choice
by energy per call, each candidate run back to back for CAND_SECONDS (default 0.4) under the cap (NVML's
energy counter; under the cap time follows energy), heuristic beside both.  cuBLASLt is driven through ctypes (torch only allocates and times).
"""
import ctypes
import glob
import json
import os
import sys
import time

import torch

tokens = int(sys.argv[1])
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
want = int(sys.argv[3]) if len(sys.argv) > 3 else 16
d, ff, kv, vocab, layers = 2048, 8192, 512, 128256, 16
dev, bf = "cuda", torch.bfloat16


def load_lt():
    try:
        return ctypes.CDLL("libcublasLt.so.13")
    except OSError:
        base = os.path.dirname(torch.__file__)
        for pattern in ("/../nvidia/**/libcublasLt.so*", "/lib/libcublasLt.so*"):
            hits = glob.glob(base + pattern, recursive=True)
            if hits:
                return ctypes.CDLL(hits[0])
        raise


lt = load_lt()
c_void = ctypes.c_void_p
CUDA_R_32F, CUDA_R_16BF, COMPUTE_32F = 0, 14, 68
OP_N, OP_T = 0, 1
DESC_TRANSA, DESC_TRANSB, PREF_MAX_WS = 3, 4, 1


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class Heuristic(ctypes.Structure):
    _fields_ = [
        ("algo", Algo),
        ("workspaceSize", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("wavesCount", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


def check(status, what):
    if status != 0:
        raise RuntimeError(f"{what}: cublasLt status {status}")


handle = c_void()
check(lt.cublasLtCreate(ctypes.byref(handle)), "create")
ws_bytes = 32 << 20
workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=dev)
stream = c_void(torch.cuda.current_stream().cuda_stream)


class Gemm:
    """Column-major D (m × n) = op(A) (m × k) · op(B) (k × n) + β·C, D = C."""

    def __init__(self, name, m, n, k, a, lda, ta, b, ldb, tb, c, beta):
        self.name, self.a, self.b, self.c = name, a, b, c
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(beta)
        self.desc = c_void()
        check(lt.cublasLtMatmulDescCreate(ctypes.byref(self.desc), COMPUTE_32F, CUDA_R_32F), "desc")
        for attr, v in ((DESC_TRANSA, ta), (DESC_TRANSB, tb)):
            val = ctypes.c_int32(v)
            check(lt.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(val), 4), "trans")

        def layout(dtype, rows, cols, ld):
            h = c_void()
            check(lt.cublasLtMatrixLayoutCreate(ctypes.byref(h), dtype, ctypes.c_uint64(rows),
                                                ctypes.c_uint64(cols), ctypes.c_int64(ld)), "layout")
            return h

        self.la = layout(CUDA_R_16BF, *((k, m) if ta == OP_T else (m, k)), lda)
        self.lb = layout(CUDA_R_16BF, *((n, k) if tb == OP_T else (k, n)), ldb)
        cd = CUDA_R_32F if c.dtype == torch.float32 else CUDA_R_16BF
        self.lc = layout(cd, m, n, m)
        pref = c_void()
        check(lt.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "pref")
        wsv = ctypes.c_uint64(ws_bytes)
        check(lt.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WS, ctypes.byref(wsv), 8), "pref ws")
        results = (Heuristic * want)()
        count = ctypes.c_int(0)
        check(lt.cublasLtMatmulAlgoGetHeuristic(handle, self.desc, self.la, self.lb, self.lc, self.lc, pref,
                                                want, results, ctypes.byref(count)), "heuristic")
        self.candidates = [results[i] for i in range(count.value) if results[i].state == 0]
        self.flops = 2.0 * m * n * k
        self.algo = self.candidates[0]

    def run(self, h=None):
        h = h or self.algo
        check(lt.cublasLtMatmul(handle, self.desc, ctypes.byref(self.alpha), c_void(self.a.data_ptr()), self.la,
                                c_void(self.b.data_ptr()), self.lb, ctypes.byref(self.beta),
                                c_void(self.c.data_ptr()), self.lc, c_void(self.c.data_ptr()), self.lc,
                                ctypes.byref(h.algo), c_void(workspace.data_ptr()), ctypes.c_size_t(ws_bytes),
                                stream), self.name)

    def time_us(self, h, reps=20):
        for _ in range(3):
            self.run(h)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            self.run(h)
        end.record()
        torch.cuda.synchronize()
        return 1e3 * start.elapsed_time(end) / reps


def projection(name, out_f, in_f, count):
    """forward, ∂x, ∂W (into f32) of a row-major weight (out_f, in_f) over row-major (tokens, ·) tensors."""
    w = torch.randn(out_f, in_f, device=dev, dtype=bf) * 0.02
    x = torch.randn(tokens, in_f, device=dev, dtype=bf)
    dy = torch.randn(tokens, out_f, device=dev, dtype=bf)
    y = torch.empty(tokens, out_f, device=dev, dtype=bf)
    dx = torch.empty(tokens, in_f, device=dev, dtype=bf)
    dw = torch.zeros(out_f, in_f, device=dev, dtype=torch.float32)
    # Row-major R (r × c) is column-major Rᵀ (c × r, ld c).
    return [
        (Gemm(f"{name}.fwd", out_f, tokens, in_f, w, in_f, OP_T, x, in_f, OP_N, y, 0.0), count),
        (Gemm(f"{name}.dx", in_f, tokens, out_f, w, in_f, OP_N, dy, out_f, OP_N, dx, 0.0), count),
        (Gemm(f"{name}.dw", in_f, out_f, tokens, x, in_f, OP_N, dy, out_f, OP_T, dw, 1.0), count),
    ]


gemms = (projection("q|o", d, d, 2 * layers) + projection("k|v", kv, d, 2 * layers)
         + projection("gate|up", ff, d, 2 * layers) + projection("down", d, ff, layers)
         + projection("head", vocab, d, 1))
fused_layout = os.environ.get("LAYOUT") == "fused"
if fused_layout:
    separate = gemms
    gemms = (projection("qkv", d + 2 * kv, d, layers) + projection("o", d, d, layers)
             + projection("gate+up", 2 * ff, d, layers) + projection("down", d, ff, layers)
             + projection("head", vocab, d, 1))
total_flops = sum(g.flops * c for g, c in gemms)

# Each GEMM alone: the heuristic's first choice against every candidate.
def measured(gemms):
    chosen = []
    for g, count in gemms:
        times = [g.time_us(h) for h in g.candidates]
        best = min(range(len(times)), key=times.__getitem__)
        chosen.append(g.candidates[best])
        print(f"{g.name:14s} x{count:3d} candidates {len(times):2d}  heuristic {times[0]:8.1f} us  "
              f"best #{best:2d} {times[best]:8.1f} us  ({times[0] / times[best]:.3f}x)", flush=True)
    return chosen


chosen = measured(gemms)


class Nvml:
    """The board's energy counter (mJ), through libnvidia-ml."""

    def __init__(self):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        check(self.lib.nvmlInit_v2(), "nvmlInit")
        self.dev = c_void()
        index = torch.cuda.current_device()
        check(self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.dev)), "nvml handle")

    def mj(self):
        e = ctypes.c_ulonglong(0)
        check(self.lib.nvmlDeviceGetTotalEnergyConsumption(self.dev, ctypes.byref(e)), "nvml energy")
        return e.value


def by_energy(gemms, cand_seconds):
    """Each candidate back to back for cand_seconds: the one of least energy per call (and its time)."""
    nvml = Nvml()
    chosen = []
    for g, count in gemms:
        rows = []
        for h in g.candidates:
            for _ in range(20):
                g.run(h)
            torch.cuda.synchronize()
            start, e0, n = time.time(), nvml.mj(), 0
            while time.time() - start < cand_seconds:
                for _ in range(10):
                    g.run(h)
                n += 10
                torch.cuda.synchronize()
            rows.append((1e6 * (time.time() - start) / n, (nvml.mj() - e0) / n))
        best = min(range(len(rows)), key=lambda i: rows[i][1])
        chosen.append(g.candidates[best])
        print(f"{g.name:14s} sustained: heuristic {rows[0][0]:8.1f} us {rows[0][1]:7.3f} mJ  least energy "
              f"#{best:2d} {rows[best][0]:8.1f} us {rows[best][1]:7.3f} mJ  all " +
              " ".join(f"{t:.1f}/{e:.3f}" for t, e in rows), flush=True)
    return chosen


def sequence(pick, gemms):
    for (g, count), h in zip(gemms, pick):
        for _ in range(count):
            g.run(h)


def sustained(pick, gemms=gemms):
    for _ in range(3):
        sequence(pick, gemms)
    torch.cuda.synchronize()
    start, n = time.time(), 0
    while time.time() - start < seconds:
        sequence(pick, gemms)
        n += 1
        torch.cuda.synchronize()
    return 1e3 * (time.time() - start) / n


def compare(contenders, rounds):
    """Each contender's (picks, gemms) sequence sustained, alternating: one JSON line, ratios to the first."""
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, (pick, gs) in contenders.items():
            times[name].append(sustained(pick, gs))
    ms = {name: sum(v) / len(v) for name, v in times.items()}
    first = next(iter(ms))
    print(json.dumps({"tokens": tokens, **{f"ms_{n}": v for n, v in times.items()},
                      **{f"tflops_{n}": total_flops / v / 1e9 for n, v in ms.items()},
                      **{f"speedup_{n}": ms[first] / v for n, v in ms.items() if n != first}}))


heuristic = [g.candidates[0] for g, _ in gemms]
if fused_layout:
    compare({"separate": (measured(separate), separate), "fused": (chosen, gemms)}, 3)
elif os.environ.get("PICK") == "energy":
    frugal = by_energy(gemms, float(os.environ.get("CAND_SECONDS", "0.4")))
    compare({"heuristic": (heuristic, gemms), "measured": (chosen, gemms), "energy": (frugal, gemms)}, 3)
else:
    compare({"heuristic": (heuristic, gemms), "measured": (chosen, gemms)}, 2)
