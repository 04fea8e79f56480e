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

#[cfg(feature = "cuda")]
use super::gemm;

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
        Ok((Some(input_gradient(&grad, &w)?), None))
    }
}

/// `acc += aᵀ · b` for `a: (m, n)`, `b: (m, k)`, `acc: (n, k)`; `acc = aᵀ · b` (β = 0) on CUDA when
/// `acc` is still unwritten (`accumulate`).
pub(super) fn add_product_into(acc: &Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
    #[cfg(feature = "cuda")]
    if acc.device().is_cuda() {
        if acc.dtype() != DType::F32 {
            candle_core::bail!("fused linear: CUDA accumulators are f32");
        }
        let overwrite = super::accumulate::before_write(acc, true)?;
        return gemm::gemm(acc, &a.contiguous()?, true, &b.contiguous()?, false, !overwrite);
    }
    // CPU: the product in the inputs' dtype, then added (as the compute copy's backward adds it).
    super::weight::add_into(acc, &a.t()?.matmul(b)?)
}

/// `x · wᵀ` for rows `x: (m, k)` and a weight `w: (n, k)` in one dtype: a projection's forward.
pub(super) fn project(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gemm::on_cuda(x) {
        // SAFETY: the GEMM writes every element (β = 0 never reads the buffer).
        let out = unsafe { Tensor::empty((x.dim(0)?, w.dim(0)?), x.dtype(), x.device())? };
        gemm::gemm(&out, &x.contiguous()?, false, &w.contiguous()?, true, false)?;
        return Ok(out);
    }
    x.matmul(&w.t()?)
}

/// `grad · w` for an output gradient `grad: (m, n)` and a weight `w: (n, k)`: a projection's input
/// gradient.
pub(super) fn input_gradient(grad: &Tensor, w: &Tensor) -> Result<Tensor> {
    sum_of_products(&[(grad, w)])
}

/// `Σᵢ aᵢ · bᵢ` for `aᵢ: (m, nᵢ)`, `bᵢ: (nᵢ, k)` in one dtype (the input gradient of a tensor read by
/// several projections). On CUDA the products go into one buffer, each GEMM after the first adding to
/// it (β = 1, f32 accumulation) instead of separate products and an elementwise add each.
pub(super) fn sum_of_products(terms: &[(&Tensor, &Tensor)]) -> Result<Tensor> {
    let Some(((a0, b0), rest)) = terms.split_first() else {
        candle_core::bail!("sum_of_products: no terms");
    };
    #[cfg(feature = "cuda")]
    if gemm::on_cuda(a0) {
        // SAFETY: the first GEMM writes every element (β = 0 never reads the buffer).
        let out = unsafe { Tensor::empty((a0.dim(0)?, b0.dim(1)?), a0.dtype(), a0.device())? };
        for (i, (a, b)) in terms.iter().enumerate() {
            gemm::gemm(&out, &a.contiguous()?, false, &b.contiguous()?, false, i > 0)?;
        }
        return Ok(out);
    }
    rest.iter().try_fold(a0.matmul(b0)?, |sum, (a, b)| sum + a.matmul(b)?)
}
