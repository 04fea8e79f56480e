#!/usr/bin/env python3
"""PyTorch parity: load a proxqat-written HF checkpoint with transformers, compute loss, last-position
logits and the same named gradients as `proxqat gpu-check dump-grads`, and compare.

usage: torch_parity.py CKPT_DIR DUMP.safetensors f32|bf16    (exit 1 on a failed tolerance)
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

# Stated tolerances, relative to the reference's max |value|: f32 is one implementation against another
# (summation orders differ); bf16 compares two bf16 pipelines (rounding points differ).
TOL = {"f32": {"loss": 1e-5, "logits": 1e-4, "grad": 1e-3}, "bf16": {"loss": 1e-2, "logits": 3e-2, "grad": 1e-1}}


def main():
    ckpt, dump_path, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dump = load_file(dump_path)
    model = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32, attn_implementation="sdpa").cuda()
    ids, labels = dump["ids"].cuda(), dump["labels"].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    params = dict(model.named_parameters())
    rows = [("loss", out.loss.detach().float().reshape(1), dump["loss"], TOL[dtype]["loss"]),
            ("logits_last", out.logits[:, -1:].detach().float(), dump["logits_last"], TOL[dtype]["logits"])]
    for key, ours in dump.items():
        if key.startswith("grad."):
            name = key[len("grad."):]
            rows.append((key, params[name].grad.float(), ours, TOL[dtype]["grad"]))
    ok = True
    for name, ref, ours, tol in rows:
        ref = ref.cpu().double()
        err = ((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        passed = err <= tol
        ok &= passed
        print(f"{ckpt.rstrip('/').split('/')[-1]:>14} {dtype:>5} {name:<58} rel err {err:.3e}  tol {tol:.0e}  {'PASS' if passed else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
