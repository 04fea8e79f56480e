"""All-reduce time of Llama-3.2-1B's f32 gradients over NCCL, two ways: one flat buffer, and one tensor
per parameter inside one NCCL group (what proxqat did first). Run with torchrun --nproc_per_node 2."""
import os, time, torch, torch.distributed as dist

dist.init_process_group("nccl")
rank = dist.get_rank()
torch.cuda.set_device(rank)
h, i, L, V, kv = 2048, 8192, 16, 128256, 512
shapes = [(V, h), (h,)] + [s for _ in range(L) for s in [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]]
tensors = [torch.ones(s, device="cuda") for s in shapes]
flat = torch.ones(sum(t.numel() for t in tensors), device="cuda")
def timed(f, n=5):
    f(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3
def grouped():
    with dist._coalescing_manager(async_ops=False):
        for t in tensors:
            dist.all_reduce(t)
ms_flat, ms_grouped = timed(lambda: dist.all_reduce(flat)), timed(grouped)
gb = flat.numel() * 4 / 1e9
if rank == 0:
    print(f"torch NCCL all-reduce of {gb:.2f} GB f32 over {dist.get_world_size()} GPUs: flat {ms_flat:.1f} ms ({gb / ms_flat * 1e3:.0f} GB/s), "
          f"{len(tensors)} tensors in one group {ms_grouped:.1f} ms ({gb / ms_grouped * 1e3:.0f} GB/s)")
dist.destroy_process_group()
