//! The compute copy of a weight for one optimizer step: cast to the compute dtype, optionally put on
//! its uniform grid (the straight-through view of STE and of Prox-QAT's task gradient at q(x)), with
//! gradient accumulation in its backward.
//!
//! Plain candle turns every micro-batch's weight gradient into a fresh f32 tensor (a bf16→f32 cast, a
//! zeros-then-add at the master weight) that the step then adds to its running sum: three full passes
//! over all weights per micro-batch, and a transient copy of them; a straight-through view written with
//! primitives (`sg(q) + (x − sg(x))`) adds six more. Here the forward is one pass per step and the
//! backward adds the incoming gradient into the step's f32 accumulator in place (PyTorch's
//! `.grad +=`) and passes nothing further: the accumulator is the weight's gradient for the step.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp2, Layout, Result, Shape, Tensor};

/// A uniform grid: `scale` per `elem_count / scale.elem_count()` consecutive elements, codes clamped
/// to ±`half_levels`, ties to even (the grid's own arithmetic, `TensorGrid::quantize`).
#[derive(Clone)]
pub struct OnGrid {
    pub scale: Tensor,
    pub half_levels: f64,
}

/// `w` (f32 or f64 master), put on `grid` if given, cast to `dtype`; its gradient (taken as the
/// identity through the grid) is added into `acc` (f32, or f64 for f64 weights; `w`'s shape) instead
/// of flowing back to `w`.
pub fn compute_copy_accumulating(w: &Tensor, grid: Option<OnGrid>, dtype: DType, acc: &Tensor) -> Result<Tensor> {
    if acc.dims() != w.dims() || !acc.is_contiguous() {
        candle_core::bail!(
            "gradient accumulator for a {:?} weight has shape {:?}",
            w.dims(),
            acc.dims()
        );
    }
    w.contiguous()?
        .apply_op1(ComputeCopy::new(w, grid, dtype, Some(acc.clone()))?)
}

/// [`compute_copy_accumulating`]'s forward alone: `w` put on `grid` if given, cast to `dtype`, no
/// gradient (the optimizer's next-step copy where its kernel does not write one itself).
pub fn compute_copy(w: &Tensor, grid: Option<OnGrid>, dtype: DType) -> Result<Tensor> {
    w.contiguous()?
        .apply_op1_no_bwd(&ComputeCopy::new(w, grid, dtype, None)?)
}

struct ComputeCopy {
    dtype: DType,
    grid: Option<OnGrid>,
    acc: Option<Tensor>,
}

impl ComputeCopy {
    /// The grid's scale in `w`'s dtype, contiguous, as the kernels read it.
    fn new(w: &Tensor, grid: Option<OnGrid>, dtype: DType, acc: Option<Tensor>) -> Result<Self> {
        let grid = match grid {
            Some(g) => Some(OnGrid {
                scale: g.scale.to_dtype(w.dtype())?.contiguous()?,
                half_levels: g.half_levels,
            }),
            None => None,
        };
        Ok(ComputeCopy { dtype, grid, acc })
    }
}

impl CustomOp1 for ComputeCopy {
    fn name(&self) -> &'static str {
        "fused-compute-copy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(grid) = &self.grid else {
            return Ok((s.to_dtype(l, self.dtype)?, l.shape().clone()));
        };
        let x = super::host_f64(s, l, self.name())?;
        let scale = grid.scale.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let group = x.len() / scale.len();
        let top = grid.half_levels;
        // The grid's arithmetic in the storage dtype: division, ties-to-even, clamp, product.
        let q = match s.dtype() {
            DType::F32 => CpuStorage::F32(
                x.iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let sc = scale[i / group] as f32;
                        ((v as f32) / sc).round_ties_even().clamp(-top as f32, top as f32) * sc
                    })
                    .collect(),
            ),
            DType::F64 => CpuStorage::F64(
                x.iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let sc = scale[i / group];
                        (v / sc).round_ties_even().clamp(-top, top) * sc
                    })
                    .collect(),
            ),
            other => candle_core::bail!("{}: master weights must be f32 or f64, got {other:?}", self.name()),
        };
        Ok((
            q.to_dtype(&Layout::contiguous(l.shape()), self.dtype)?,
            l.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, Arg};
        let Some(grid) = &self.grid else {
            return Ok((s.to_dtype(l, self.dtype)?, l.shape().clone()));
        };
        let op = self.name();
        if s.dtype() != DType::F32 {
            candle_core::bail!("{op}: CUDA path takes f32 master weights");
        }
        let n = l.shape().elem_count();
        let (q, address) = cuda::alloc(&s.device, DType::F32, n, op)?;
        let args = [
            Arg::Ptr(cuda::ptr(s, l, op)?),
            Arg::Ptr(cuda::tensor_ptr(&grid.scale, op)?),
            Arg::U64((n / grid.scale.elem_count()) as u64),
            Arg::F32(grid.half_levels as f32),
            Arg::Ptr(address),
            Arg::Len(n),
        ];
        cuda::launch(&s.device, "grid_point_f32", cuda::elementwise(n), &args)?;
        Ok((
            q.to_dtype(&Layout::contiguous(l.shape()), self.dtype)?,
            l.shape().clone(),
        ))
    }

    fn bwd(&self, _w: &Tensor, _copy: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if let Some(acc) = &self.acc {
            add_into(acc, grad)?;
        }
        Ok(None)
    }
}

/// `acc += g` in place (acc f32 or f64, contiguous; g any float dtype, cast on the fly).
pub(crate) fn add_into(acc: &Tensor, g: &Tensor) -> Result<()> {
    super::accumulate::before_write(acc, false)?;
    acc.inplace_op2(&g.contiguous()?, &AddInto)
}

struct AddInto;

impl InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "fused-accumulate"
    }

    fn cpu_fwd(&self, acc: &mut CpuStorage, al: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let g = super::host_f64(g, gl, self.name())?;
        let (start, _) = super::contiguous_range(al, self.name())?;
        super::add_to_host_accumulator(acc, start, g, self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        acc: &mut candle_core::CudaStorage,
        al: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        use super::cuda::{self, Arg};
        let op = self.name();
        if acc.dtype() != DType::F32 {
            candle_core::bail!("{op}: CUDA accumulators are f32");
        }
        let n = al.shape().elem_count();
        let args = [
            Arg::Ptr(cuda::ptr(acc, al, op)?),
            Arg::Ptr(cuda::ptr(g, gl, op)?),
            Arg::Len(n),
        ];
        let kernel = format!("accumulate_{}", cuda::suffix(g.dtype(), op)?);
        cuda::launch(&g.device, &kernel, cuda::elementwise(n), &args)
    }
}
