#!/usr/bin/env python3
"""PyTorch parity: load a proxqat-written HF checkpoint with transformers, compute loss, last-position
logits and the same named gradients as `proxqat gpu-check dump-grads`, and compare.

usage: torch_parity.py CKPT_DIR DUMP.safetensors f32|bf16    (exit 1 on a failed tolerance)
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

# f32: proxqat against PyTorch f32, relative to the reference's max |value| (summation orders differ).
TOL = {"loss": 1e-5, "logits": 1e-4, "grad": 1e-3}
# bf16: both bf16 pipelines (proxqat's, PyTorch autocast) are measured against PyTorch f32; proxqat's
# error may be at most BF16_FACTOR × autocast's own (rounding points differ, accuracy must not).
BF16_FACTOR = 1.5


def main():
    ckpt, dump_path, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dump = load_file(dump_path)
    model = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32, attn_implementation="sdpa").cuda()
    ids, labels = dump["ids"].cuda(), dump["labels"].cuda()
    params = dict(model.named_parameters())

    def run(bf16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        vals = {"loss": out.loss.detach().float().reshape(1), "logits_last": out.logits[:, -1:].detach().float()}
        vals.update({k: params[k[len("grad."):]].grad.float().clone() for k in dump if k.startswith("grad.")})
        return {k: v.cpu().double() for k, v in vals.items()}

    def rel(a, ref):
        return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

    f32 = run(False)
    autocast = run(True) if dtype == "bf16" else None
    ok = True
    for name, ref in f32.items():
        err = rel(dump[name], ref)
        if autocast is None:
            tol = TOL["grad" if name.startswith("grad.") else name.split("_")[0]]
            extra = ""
        else:
            base = rel(autocast[name], ref)
            # The scalar loss averages per-token errors of the bf16 logits (≈ 0.02 each here), so its
            # expected error is ~1e-4 relative whatever the pipeline: judged against bf16's unit
            # roundoff / 4 instead of autocast's (sometimes luckier) figure.
            tol = max(BF16_FACTOR * base, 1e-3 if name == "loss" else 1e-6)
            extra = f" (autocast {base:.3e})"
        passed = err <= tol
        ok &= passed
        print(f"{ckpt.rstrip('/').split('/')[-1]:>14} {dtype:>5} {name:<52} rel err {err:.3e}{extra}  tol {tol:.2e}  {'PASS' if passed else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
