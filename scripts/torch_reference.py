#!/usr/bin/env python3
"""PyTorch reference for `proxqat bench`: HF LlamaForCausalLM of Llama-3.2-1B's shape, random weights,
f32 master weights with bf16 autocast, sdpa attention, fused AdamW, global-norm clip 1.0; eager and
torch.compile. Timed as proxqat's bench: one warm-up step, then whole steps (accum micro-steps and the
optimizer step); the micro-step and optimizer times are measured on their own for the breakdown.

usage: torch_reference.py MICRO_BATCH SEQ GLOBAL_BATCH eager|compile|eager-ckpt   -> one JSON line
(eager-ckpt: eager with HF gradient checkpointing per decoder layer, non-reentrant)
"""
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def timed(fn, n):
    """Mean seconds of `n` calls of `fn`, the device drained at the end (and idle at the start)."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main():
    mb, seq, gb, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    accum = gb // mb
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).float()
    if mode == "eager-ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    fwd = torch.compile(model) if mode == "compile" else model
    ids = torch.randint(0, 128256, (mb, seq), device="cuda")

    def micro():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(input_ids=ids, labels=ids).loss
        (loss / accum).backward()

    def optim():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def train_step():
        for _ in range(accum):
            micro()
        optim()

    # Warm-up (compilation, allocator, optimizer state), then whole steps timed as proxqat's bench
    # times them; the breakdown (a micro-step, the optimizer step) is timed on its own afterwards.
    train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step = timed(train_step, 2)
    t_micro = timed(micro, 8)
    t_opt = timed(optim, 1)
    tokens = gb * seq
    print(json.dumps({"impl": f"torch-{mode}", "micro_batch": mb, "seq": seq, "global_batch": gb,
                      "ms_micro_step": 1e3 * t_micro, "ms_optimizer": 1e3 * t_opt, "ms_step": 1e3 * step,
                      "tokens_per_s": tokens / step, "mfu": 6 * n_params * tokens / step / 989e12,
                      "peak_gib": torch.cuda.max_memory_reserved() / 2**30,
                      "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30}), flush=True)


if __name__ == "__main__":
    main()
