//! The projection `y = x · wᵀ` whose backward adds the weight gradient straight into the step's f32
//! accumulator (PyTorch's `.grad +=`), for a `w` that is a step's compute copy (`weight.rs`).
//!
//! Through candle's autograd, `x.broadcast_matmul(&w.t())` makes each micro-batch's weight gradient a
//! batched GEMM over the broadcast batch, a reduction over that batch, and a zeros-then-add at each of
//! the matmul, broadcast and transpose nodes (weight-sized, one of them strided): 40 % of the GPU time of
//! a Llama-3.2-1B micro-step (ncu). Here it is one GEMM, `acc += gradᵀ · x` with β = 1 (cuBLAS: bf16 or
//! f32 inputs, f32 output and accumulation), and `dx = grad · w`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `x · wᵀ` for `x: (.., in)` and `w: (out, in)` in one dtype; the backward adds `∂L/∂w` into `acc`
/// (`(out, in)`, f32 or f64, contiguous). `w` enters detached: autograd never sees a gradient for it
/// (a node left without one would stop candle's backward).
pub fn linear(x: &Tensor, w: &Tensor, acc: &Tensor) -> Result<Tensor> {
    let (outputs, inputs) = w.dims2()?;
    if acc.dims() != w.dims() || !acc.is_contiguous() || !matches!(acc.dtype(), DType::F32 | DType::F64) {
        candle_core::bail!(
            "fused linear: the accumulator of a {:?} weight must be a contiguous f32/f64 tensor of that shape, got {:?} {:?}",
            w.dims(),
            acc.dims(),
            acc.dtype()
        );
    }
    if !x.track_op() {
        // No backward will run through this node: the weight's gradient can only come through its own
        // graph (the compute copy's backward accumulates it).
        return x.broadcast_matmul(&w.t()?);
    }
    let mut dims = x.dims().to_vec();
    let rows = x.elem_count() / inputs;
    let y = x
        .contiguous()?
        .reshape((rows, inputs))?
        .apply_op2(&w.detach().contiguous()?, Linear { acc: acc.clone() })?;
    *dims.last_mut().expect("x has at least one dimension") = outputs;
    y.reshape(dims)
}

struct Linear {
    acc: Tensor,
}

/// `(1, m, n, k)` and the layout of `wᵀ` for `x: (m, k)`, `w: (n, k)`.
fn gemm_shape(xl: &Layout, wl: &Layout) -> Result<((usize, usize, usize, usize), Layout)> {
    let (m, k) = xl.shape().dims2()?;
    let (n, _) = wl.shape().dims2()?;
    Ok(((1, m, n, k), wl.transpose(0, 1)?))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (bmnk, wt) = gemm_shape(xl, wl)?;
        Ok((x.matmul(w, bmnk, xl, &wt)?, Shape::from((bmnk.1, bmnk.2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (bmnk, wt) = gemm_shape(xl, wl)?;
        Ok((x.matmul(w, bmnk, xl, &wt)?, Shape::from((bmnk.1, bmnk.2))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached: a gradient that recorded its inputs would keep the micro-batch's graph alive.
        let (x, w, grad) = (x.detach(), w.detach(), grad.detach().contiguous()?);
        add_product_into(&self.acc, &grad, &x)?;
        // In a step's last backward the accumulator is now complete: a data-parallel run may start
        // summing it over ranks while the layers below are differentiated.
        crate::dist::overlap::accumulated(&self.acc)?;
        Ok((Some(grad.matmul(&w)?), None))
    }
}

/// `acc += aᵀ · b` for `a: (m, n)`, `b: (m, k)`, `acc: (n, k)`.
pub(super) fn add_product_into(acc: &Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
    #[cfg(feature = "cuda")]
    if acc.device().is_cuda() {
        return cuda::gemm_accumulate(acc, a, b);
    }
    // CPU: the product in the inputs' dtype, then added (as the compute copy's backward adds it).
    super::weight::add_into(acc, &a.t()?.matmul(b)?)
}

/// `Σᵢ aᵢ · bᵢ` for `aᵢ: (m, nᵢ)`, `bᵢ: (nᵢ, k)` in one dtype (the input gradient of a tensor read by
/// several projections). On CUDA the products go into one buffer, each GEMM after the first adding to it
/// (β = 1, f32 accumulation) instead of separate products and an elementwise add each.
pub(super) fn sum_of_products(terms: &[(&Tensor, &Tensor)]) -> Result<Tensor> {
    let Some(((a0, b0), rest)) = terms.split_first() else {
        candle_core::bail!("sum_of_products: no terms");
    };
    #[cfg(feature = "cuda")]
    if a0.device().is_cuda() && a0.dtype() == candle_core::DType::BF16 {
        // SAFETY: the first GEMM writes every element (β = 0 never reads the buffer).
        let out = unsafe { Tensor::empty((a0.dim(0)?, b0.dim(1)?), a0.dtype(), a0.device())? };
        for (i, (a, b)) in terms.iter().enumerate() {
            cuda::gemm_into(&out, &a.contiguous()?, &b.contiguous()?, i > 0)?;
        }
        return Ok(out);
    }
    rest.iter().try_fold(a0.matmul(b0)?, |sum, (a, b)| sum + a.matmul(b)?)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::cublas::{result, sys};
    use candle_core::{DType, Result, Tensor};

    fn data_type(dtype: DType) -> Result<sys::cudaDataType> {
        Ok(match dtype {
            DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
            DType::F32 => sys::cudaDataType::CUDA_R_32F,
            other => candle_core::bail!("fused linear: no CUDA weight gradient for {other:?} (bf16 and f32)"),
        })
    }

    /// `out += a · b` with `add`, else `out = a · b` (row-major `a: (m, n)`, `b: (n, k)`, `out: (m, k)`,
    /// all bf16 or all f32).
    pub fn gemm_into(out: &Tensor, a: &Tensor, b: &Tensor, add: bool) -> Result<()> {
        if out.dtype() != a.dtype() {
            candle_core::bail!("sum of products: the sum is in the factors' dtype");
        }
        gemm_add("sum of products", out, a, b, false, add)
    }

    /// `acc += aᵀ · b` into an f32 accumulator (`a: (m, n)`, `b: (m, k)`, `acc: (n, k)`).
    pub fn gemm_accumulate(acc: &Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
        if acc.dtype() != DType::F32 {
            candle_core::bail!("fused linear: CUDA accumulators are f32");
        }
        gemm_add("fused linear", acc, a, b, true, true)
    }

    /// `out += a · b`, or `out += aᵀ · b` with `transpose_a`, for contiguous row-major tensors, as one
    /// cuBLAS GEMM with β = 1 (β = 0 without `add`: `out` is overwritten, never read) and f32
    /// accumulation on the device's stream (`out` in its own dtype).
    fn gemm_add(op: &str, out: &Tensor, a: &Tensor, b: &Tensor, transpose_a: bool, add: bool) -> Result<()> {
        let (a_rows, a_cols) = a.dims2()?;
        let (rows, inner) = if transpose_a {
            (a_cols, a_rows)
        } else {
            (a_rows, a_cols)
        };
        let k = b.dim(1)?;
        if out.dims() != [rows, k] || b.dim(0)? != inner || a.dtype() != b.dtype() {
            candle_core::bail!(
                "{op}: {:?} {:?}{} · {:?} {:?} into {:?}",
                a.dims(),
                a.dtype(),
                if transpose_a { "ᵀ" } else { "" },
                b.dims(),
                b.dtype(),
                out.dims()
            );
        }
        let (input, output) = (data_type(a.dtype())?, data_type(out.dtype())?);
        let (out_ptr, a_ptr, b_ptr) = (
            super::super::cuda::tensor_ptr(out, op)?,
            super::super::cuda::tensor_ptr(a, op)?,
            super::super::cuda::tensor_ptr(b, op)?,
        );
        let blas = out.device().as_cuda_device()?.cublas_handle();
        let (alpha, beta) = (1f32, if add { 1f32 } else { 0f32 });
        // f32 inputs use TF32 tensor cores when candle's f32 matmuls do (`train.tf32`).
        let compute = if a.dtype() == DType::F32 && candle_core::cuda_backend::gemm_reduced_precision_f32() {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let transpose = if transpose_a {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        };
        let int = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: {v} exceeds i32")));
        // Column-major view: outᵀ (k × rows, ld k) += bᵀ (k × inner, ld k) · op(a as stored: a_cols × a_rows,
        // ld a_cols), op transposing it when `a` is read as aᵀ.
        // SAFETY: the three pointers address live contiguous tensors of the stated shapes; the handle
        // runs on the device's one stream, which orders the GEMM after their producers.
        unsafe {
            result::gemm_ex(
                *blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_N,
                transpose,
                int(k)?,
                int(rows)?,
                int(inner)?,
                (&alpha as *const f32).cast(),
                b_ptr as *const std::ffi::c_void,
                input,
                int(k)?,
                a_ptr as *const std::ffi::c_void,
                input,
                int(a_cols)?,
                (&beta as *const f32).cast(),
                out_ptr as *mut std::ffi::c_void,
                output,
                int(k)?,
                compute,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| candle_core::Error::Msg(format!("{op}: cublasGemmEx: {e:?}")))
    }
}
