//! RMSNorm `y = x · rsqrt(mean(x²) + eps) · w`, written straight into the compute dtype, with a backward
//! that recomputes the inverse RMS instead of keeping the normalised activations.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::{as_kernel_stat, cpu_storage, host_f64};

/// `x: (.., d)` in the master dtype, `w: (d)`; the result is in `out` (the matmul input dtype).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, out: DType) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps, out })
}

struct RmsNorm {
    eps: f64,
    out: DType,
}

/// `(∂L/∂x, ∂L/∂w)` of `rms_norm(x, w, eps, _)` from `gy` (no autograd): dx in x's dtype, dw in w's.
pub(super) fn rms_norm_backward(x: &Tensor, w: &Tensor, gy: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (dx, _, dw) = rms_norm_backward_with_residual(x, w, gy, None, eps, x.dtype())?;
    Ok((dx, dw))
}

/// The gradient at an `x` that feeds both `rms_norm(x, w, eps, _)` (output gradient `gy`) and a residual
/// connection (gradient `res`, x's shape and dtype): `(res + ∂L/∂x, that sum in the `copy` dtype, ∂L/∂w)`,
/// no autograd. On CUDA the add and a bf16 copy are written by the norm's own backward pass.
pub(super) fn rms_norm_backward_with_residual(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    res: Option<&Tensor>,
    eps: f64,
    copy: DType,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, d) = (x.elem_count() / x.dim(D::Minus1)?, x.dim(D::Minus1)?);
    let res = match res {
        Some(r) if r.dims() != x.dims() || r.dtype() != x.dtype() => candle_core::bail!(
            "rms norm backward: residual gradient {:?} {:?} for x {:?} {:?}",
            r.dims(),
            r.dtype(),
            x.dims(),
            x.dtype()
        ),
        Some(r) => Some(r.detach().contiguous()?),
        None => None,
    };
    let written_copy = if copy == DType::BF16 && x.device().is_cuda() {
        // SAFETY: the dx kernel writes every element of the copy.
        Some(unsafe { Tensor::empty(x.shape(), DType::BF16, x.device())? })
    } else {
        None
    };
    let op = RmsNormBwd {
        eps,
        res,
        copy: written_copy.clone(),
    };
    let packed = x
        .contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &gy.contiguous()?, &op)?;
    let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
    let chunks = packed.dim(0)? - n;
    let dw = packed.narrow(0, n, chunks)?.sum(0)?.reshape(d)?.to_dtype(w.dtype())?;
    let copy = match written_copy {
        Some(c) => c,
        None => dx.to_dtype(copy)?,
    };
    Ok((dx, copy, dw))
}

/// Backward: `(x, w, gy)` → one `(n + chunks, d)` buffer: dx (plus the residual gradient `res`) in the
/// first n rows, partial sums of dw in the last `chunks` rows (summed in a fixed order afterwards:
/// deterministic); on CUDA also dx in bf16 into `copy`.
struct RmsNormBwd {
    eps: f64,
    res: Option<Tensor>,
    /// Written by the CUDA kernel only (the CPU caller casts dx).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    copy: Option<Tensor>,
}

/// `1 / sqrt(mean(x²) + eps)` of one row, the mean kept as the kernel keeps it.
fn inv_rms(row: &[f64], eps: f64, data: DType) -> f64 {
    let mean_square = as_kernel_stat(row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64, data);
    1.0 / (mean_square + eps).sqrt()
}

fn rows_and_width(layout: &Layout) -> Result<(usize, usize)> {
    let d = layout.dims().last().copied().unwrap_or(1);
    Ok((layout.shape().elem_count() / d.max(1), d))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (host_f64(xs, xl, self.name())?, host_f64(ws, wl, self.name())?);
        let (_, d) = rows_and_width(xl)?;
        let mut y = Vec::with_capacity(x.len());
        for row in x.chunks(d) {
            let inv = inv_rms(row, self.eps, xs.dtype());
            y.extend(row.iter().zip(&w).map(|(v, g)| v * inv * g));
        }
        Ok((cpu_storage(y, self.out)?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, Arg};
        let op = self.name();
        if xs.dtype() != DType::F32 || ws.dtype() != DType::F32 {
            candle_core::bail!("{op}: CUDA path takes f32 x and w");
        }
        let (n, d) = rows_and_width(xl)?;
        let dev = &xs.device;
        let (x, w) = (cuda::ptr(xs, xl, op)?, cuda::ptr(ws, wl, op)?);
        let (out, y) = cuda::alloc(dev, self.out, n * d, op)?;
        let name = format!("rms_norm_fwd_{}", cuda::suffix(self.out, op)?);
        let args = [
            Arg::Ptr(x),
            Arg::Ptr(w),
            Arg::Ptr(y),
            Arg::I32(d as i32),
            Arg::F32(self.eps as f32),
        ];
        cuda::launch(dev, &name, cuda::rows(n, cuda::threads_for(d)), &args)?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = rms_norm_backward(x, w, gy, self.eps)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Rows per block of the GPU backward (each block also writes one row of dw partial sums): 512 blocks
/// for a micro-batch of 4,096 rows, about four per SM on an H100/H200.
#[cfg(feature = "cuda")]
const ROWS_PER_BLOCK: usize = 8;

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (x, w, gy) = (host_f64(xs, xl, op)?, host_f64(ws, wl, op)?, host_f64(gs, gl, op)?);
        let (n, d) = rows_and_width(xl)?;
        let res = match &self.res {
            Some(r) => r.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            None => vec![0.0; n * d],
        };
        let mut packed = Vec::with_capacity((n + 1) * d);
        let mut dw = vec![0.0; d];
        for ((row, grow), rrow) in x.chunks(d).zip(gy.chunks(d)).zip(res.chunks(d)) {
            let inv = inv_rms(row, self.eps, xs.dtype());
            let dot = as_kernel_stat((0..d).map(|i| grow[i] * w[i] * row[i]).sum(), xs.dtype());
            let mean_dot = dot * inv * inv / d as f64;
            packed.extend((0..d).map(|i| inv * (grow[i] * w[i] - row[i] * mean_dot) + rrow[i]));
            (0..d).for_each(|i| dw[i] += grow[i] * row[i] * inv);
        }
        packed.extend(dw);
        Ok((cpu_storage(packed, xs.dtype())?, Shape::from((n + 1, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, Arg};
        let op = self.name();
        let (n, d) = rows_and_width(xl)?;
        let threads = cuda::threads_for(d);
        // Groups of four columns per thread (the kernel's template variants).
        let groups = match d.div_ceil(4).div_ceil(threads as usize) {
            1 => 1,
            2 => 2,
            3 | 4 => 4,
            _ => candle_core::bail!("{op}: rows of {d} exceed the kernel's 16 columns per thread"),
        };
        let chunks = n.div_ceil(ROWS_PER_BLOCK);
        let dev = &xs.device;
        let (x, w, gy) = (cuda::ptr(xs, xl, op)?, cuda::ptr(ws, wl, op)?, cuda::ptr(gs, gl, op)?);
        let (out, dx) = cuda::alloc(dev, DType::F32, (n + chunks) * d, op)?;
        let part = dx + (n * d * 4) as u64;
        // Null where absent: the kernel adds no residual gradient, writes no copy.
        let optional = |t: &Option<Tensor>| t.as_ref().map_or(Ok(0), |t| cuda::tensor_ptr(t, op));
        let (res, copy) = (optional(&self.res)?, optional(&self.copy)?);
        let args: Vec<Arg> = [x, w, gy, res, dx, copy, part]
            .map(Arg::Ptr)
            .into_iter()
            .chain([n, d, ROWS_PER_BLOCK].map(|v| Arg::I32(v as i32)))
            .chain([Arg::F32(self.eps as f32)])
            .collect();
        let kernel = format!("rms_norm_bwd_{}_x{groups}", cuda::suffix(gs.dtype(), op)?);
        cuda::launch(dev, &kernel, cuda::rows(chunks, threads), &args)?;
        Ok((out, Shape::from((n + chunks, d))))
    }
}
