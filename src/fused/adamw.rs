//! The optimizer's fused passes on CUDA: one in-place AdamW kernel per f32 tensor (gradient clipping,
//! the grid point q(x) and the Prox-QAT pull folded in, factors read on the device, the next step's
//! bf16 compute copy written in the same pass) and a deterministic Σx² (global norm, sensitivity EMA).
//! Their CPU path is the reference AdamW of `train::optim` (candle ops, the same formula), which
//! `proxqat gpu-check parity` compares them with.

use candle_core::{DType, Result, Tensor};

use crate::quant::grid::TensorGrid;

/// The scalars of one AdamW step (the kernel's `AdamWArgs`, field for field).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AdamWArgs {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// Bias corrections 1 − β^t.
    pub bc1: f32,
    pub bc2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// λ: scales the task gradient (dist-grad mode) or the task step (prox mode).
    pub task_scale: f32,
    mode: i32,
    half_levels: f32,
    group: u64,
    copy_group: u64,
    copy_half_levels: f32,
}

#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for AdamWArgs {}

impl AdamWArgs {
    #[allow(clippy::too_many_arguments)]
    pub fn new(lr: f64, beta1: f64, beta2: f64, bc1: f64, bc2: f64, eps: f64, weight_decay: f64) -> Self {
        AdamWArgs {
            lr: lr as f32,
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            bc1: bc1 as f32,
            bc2: bc2 as f32,
            eps: eps as f32,
            weight_decay: weight_decay as f32,
            task_scale: 1.0,
            mode: 0,
            half_levels: 0.0,
            group: 0,
            copy_group: 0,
            copy_half_levels: 0.0,
        }
    }
}

/// How a parameter's AdamW step is applied: plainly, or with the Prox-QAT pull toward its grid point.
pub enum Update<'a> {
    /// `x − η·(AdamDir + wd·x)`.
    Plain,
    /// `g ← task_scale·g + coef·(x − q)` before AdamW (`pull = "loss"`).
    DistGrad {
        task_scale: f64,
        coef: &'a Tensor,
        grid: &'a TensorGrid,
    },
    /// `x ← x − lr·(pull·(x − q) + task_scale·(AdamDir + wd·x))` (`pull = "prox"`); `pull` is already
    /// clamped so that lr·pull ≤ 1.
    Prox {
        task_scale: f64,
        pull: &'a Tensor,
        grid: &'a TensorGrid,
    },
}

/// Whether the in-place CUDA kernel takes this update (f32 weight and gradient on a CUDA device).
pub fn applies(x: &Tensor, g: &Tensor) -> bool {
    cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::F32 && g.dtype() == DType::F32
}

/// One AdamW step of `x` in place, with `m`, `v` (f32, x's shape) updated in place too; `clip` is the
/// 0-d clipping factor. A uniform grid's q(x) is computed inside the kernel; a level grid's is passed.
/// With `copy`, the same pass writes the updated x (or its point on the grid given) in bf16 into the
/// copy's tensor (x's shape, contiguous). Only when `applies(x, g)`.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub fn step_in_place(
    x: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    clip: &Tensor,
    update: &Update,
    mut args: AdamWArgs,
    copy: Option<(&Tensor, Option<&super::weight::OnGrid>)>,
) -> Result<()> {
    use super::cuda::{self, Arg};
    let op = "fused-adamw";
    let candle_core::Device::Cuda(dev) = x.device() else {
        candle_core::bail!("{op}: not a CUDA tensor")
    };
    let f32_contiguous = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let (coef, grid) = match *update {
        Update::Plain => (None, None),
        Update::DistGrad { task_scale, coef, grid } => {
            (args.mode, args.task_scale) = (1, task_scale as f32);
            (Some(f32_contiguous(coef)?), Some(grid))
        }
        Update::Prox { task_scale, pull, grid } => {
            (args.mode, args.task_scale) = (2, task_scale as f32);
            (Some(f32_contiguous(pull)?), Some(grid))
        }
    };
    let (q, scale) = match grid {
        Some(TensorGrid::Uniform { scale, half_levels, .. }) => {
            args.half_levels = *half_levels as f32;
            args.group = (x.elem_count() / scale.elem_count()) as u64;
            (None, Some(f32_contiguous(scale)?))
        }
        Some(levels) => (
            Some(f32_contiguous(&levels.quantize(x).map_err(candle_core::Error::wrap)?)?),
            None,
        ),
        None => (None, None),
    };
    let (copy, copy_scale) = match copy {
        Some((out, on_grid)) => {
            if out.dtype() != DType::BF16 || out.dims() != x.dims() || !out.is_contiguous() {
                candle_core::bail!("{op}: the compute copy must be a contiguous bf16 tensor of x's shape");
            }
            let scale = match on_grid {
                Some(grid) => {
                    args.copy_half_levels = grid.half_levels as f32;
                    args.copy_group = (x.elem_count() / grid.scale.elem_count()) as u64;
                    Some(f32_contiguous(&grid.scale)?)
                }
                None => None,
            };
            (Some(out.clone()), scale)
        }
        None => (None, None),
    };
    let g = g.contiguous()?;
    let clip = f32_contiguous(clip)?;
    let address = |t: &Option<Tensor>| t.as_ref().map_or(Ok(0u64), |t| cuda::tensor_ptr(t, op));
    // SAFETY (aliasing): x, m and v are written through their addresses while candle sees them as
    // immutable. Nothing else reads them in between: the step's graph is dropped and the single stream
    // orders this kernel after every earlier use.
    let mut all: Vec<Arg> = [x, m, v, &g, &clip]
        .into_iter()
        .map(|t| Ok(Arg::Ptr(cuda::tensor_ptr(t, op)?)))
        .collect::<Result<_>>()?;
    all.extend(
        [
            address(&coef)?,
            address(&q)?,
            address(&scale)?,
            address(&copy)?,
            address(&copy_scale)?,
        ]
        .map(Arg::Ptr),
    );
    all.extend([Arg::AdamW(args), Arg::Len(x.elem_count())]);
    cuda::launch(dev, "adamw_f32", cuda::elementwise(x.elem_count()), &all)
}

/// Σ x² of each tensor, as an `(n)` f32 tensor on their device (nothing read back): one pass over
/// the step's gradients serves both the global norm and the sensitivity EMA. On CUDA one launch for
/// all of them, with 16-byte loads (a launch per tensor, scalar loads: 2.35 ms per step at
/// Llama-3.2-1B shape; one launch, scalar: 1.9 ms).
pub fn sums_of_squares(tensors: &[&Tensor]) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(candle_core::Device::Cuda(dev)) = tensors.first().map(|t| t.device()) {
        if tensors.iter().all(|t| t.dtype() == DType::F32) && tensors.len() <= u16::MAX as usize {
            use super::cuda::{self, Arg};
            use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
            let op = "fused-sum-squares";
            const SUM_BLOCKS: usize = cuda::REDUCTION_BLOCKS;
            let device = tensors[0].device();
            let contiguous = tensors.iter().map(|t| t.contiguous()).collect::<Result<Vec<_>>>()?;
            // The table the kernel reads: every tensor's address, then every tensor's length.
            let mut table = contiguous
                .iter()
                .map(|t| Ok(cuda::tensor_ptr(t, op)? as i64))
                .collect::<Result<Vec<_>>>()?;
            table.extend(contiguous.iter().map(|t| t.elem_count() as i64));
            let table = Tensor::from_vec(table, 2 * contiguous.len(), device)?;
            let partials = Tensor::zeros((tensors.len(), SUM_BLOCKS), DType::F32, device)?;
            let cfg = LaunchConfig {
                grid_dim: (SUM_BLOCKS as u32, tensors.len() as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let args = [cuda::tensor_ptr(&table, op)?, cuda::tensor_ptr(&partials, op)?].map(Arg::Ptr);
            cuda::launch(dev, "sum_squares_many_f32", cfg, &args)?;
            return partials.sum(1);
        }
    }
    let sums = tensors
        .iter()
        .map(|t| t.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&sums, 0)
}
