//! Grid statistics (hits, saturation, Σ|x − q|) of a uniform grid in one CUDA pass per tensor. The CPU
//! path, and the semantics, are `TensorGrid::counts` on candle ops; `proxqat gpu-check parity` compares.

use candle_core::{Result, Tensor};

/// `[hits, q at ±L, |x| > L·s, Σ|x − q|]` as a `(4)` f64 tensor on the device, or None where the
/// kernel does not apply (CPU, or not f32): the caller then runs the reference path.
pub fn uniform_counts(x: &Tensor, scale: &Tensor, half_levels: f64, atol: f64) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = x.device() {
        if x.dtype() == candle_core::DType::F32 {
            use super::cuda::{self, Arg};
            const BLOCKS: usize = cuda::REDUCTION_BLOCKS;
            let op = "fused-grid-counts";
            let (x, scale) = (x.contiguous()?, scale.to_dtype(candle_core::DType::F32)?.contiguous()?);
            let partials = Tensor::zeros((BLOCKS, 4), candle_core::DType::F32, x.device())?;
            let group = (x.elem_count() / scale.elem_count()) as u64;
            let args = [
                Arg::Ptr(cuda::tensor_ptr(&x, op)?),
                Arg::Ptr(cuda::tensor_ptr(&scale, op)?),
                Arg::U64(group),
                Arg::F32(half_levels as f32),
                Arg::F32(atol as f32),
                Arg::Ptr(cuda::tensor_ptr(&partials, op)?),
                Arg::Len(x.elem_count()),
            ];
            let cfg = candle_core::cuda_backend::cudarc::driver::LaunchConfig {
                grid_dim: (BLOCKS as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            cuda::launch(dev, "grid_counts_f32", cfg, &args)?;
            // Per-block counts are exact in f32 (< 2^24 each); their sum is taken in f64, one
            // contiguous row per statistic (candle reduces a row in one block; a strided column
            // reduction is slower).
            let by_statistic = partials.t()?.contiguous()?.to_dtype(candle_core::DType::F64)?;
            return Ok(Some(by_statistic.sum(1)?));
        }
    }
    let _ = (x, scale, half_levels, atol);
    Ok(None)
}
