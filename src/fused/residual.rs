//! The residual stream's add inside the decoder block: `x + y` in f32, where `y` is a projection's
//! output in the compute dtype — the cast and the add in one pass (a forward-only op: the block node
//! writes its own backward).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::{cpu_storage, host_f64};

/// `x + y` in `x`'s dtype (the residual's: f32, f64 in gradient tests), `y` of `x`'s element count in
/// any float dtype, the result shaped as `x`.
pub fn add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    if x.elem_count() != y.elem_count() {
        candle_core::bail!("residual add: x {:?} and y {:?} differ in size", x.shape(), y.shape());
    }
    x.contiguous()?.apply_op2_no_bwd(&y.contiguous()?, &ResidualAdd)
}

struct ResidualAdd;

impl CustomOp2 for ResidualAdd {
    fn name(&self) -> &'static str {
        "fused-residual-add"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ys: &CpuStorage, yl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, y) = (host_f64(xs, xl, self.name())?, host_f64(ys, yl, self.name())?);
        let out = x.iter().zip(&y).map(|(x, y)| x + y).collect();
        Ok((cpu_storage(out, xs.dtype())?, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        let (op, n) = (self.name(), xl.shape().elem_count());
        if xs.dtype() != candle_core::DType::F32 {
            candle_core::bail!("{op}: the residual stream is f32 on CUDA, got {:?}", xs.dtype());
        }
        let (out, o) = cuda::alloc(&xs.device, candle_core::DType::F32, n, op)?;
        let ptrs = [cuda::ptr(xs, xl, op)?, cuda::ptr(ys, yl, op)?, o];
        cuda::launch_elementwise(&xs.device, "residual_add", ys.dtype(), &ptrs, n)?;
        Ok((out, xl.shape().clone()))
    }
}
