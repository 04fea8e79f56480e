# Sourced by the GPU-machine scripts: the machine's CUDA runtime and NCCL (PyTorch's nvidia-nccl wheel)
# on the library path; NVLink multicast stays off (the lent machines require it, ../.library/device).
cuda_lib=/usr/local/cuda/targets/x86_64-linux/lib
nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH=$cuda_lib${nccl_lib:+:$nccl_lib}:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
