//! SwiGLU `silu(gate) · up` in one pass each way; the backward writes both input gradients at once.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{cpu_storage, host_f64};

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// `(∂L/∂gate, ∂L/∂up)` from `∂L/∂(silu(gate)·up)`, in one pass (no autograd).
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let both = gate.apply_op3_no_bwd(&up, &grad.contiguous()?, &SwiGluBwd)?;
    let part = |i| both.narrow(0, i, 1)?.reshape(gate.shape());
    Ok((part(0)?, part(1)?))
}

struct SwiGlu;

/// `(gate, up, grad)` → `(2, n)`: d gate, then d up.
struct SwiGluBwd;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (host_f64(gs, gl, self.name())?, host_f64(us, ul, self.name())?);
        let out = g.iter().zip(&u).map(|(g, u)| g * sigmoid(*g) * u).collect();
        Ok((cpu_storage(out, gs.dtype())?, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        let (op, n) = (self.name(), gl.shape().elem_count());
        let (out, o) = cuda::alloc(&gs.device, gs.dtype(), n, op)?;
        let ptrs = [cuda::ptr(gs, gl, op)?, cuda::ptr(us, ul, op)?, o];
        cuda::launch_elementwise(&gs.device, "swiglu_fwd", gs.dtype(), &ptrs, n)?;
        Ok((out, gl.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (d_gate, d_up) = swiglu_backward(gate, up, grad)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        os: &CpuStorage,
        ol: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (g, u, go) = (host_f64(gs, gl, op)?, host_f64(us, ul, op)?, host_f64(os, ol, op)?);
        let n = g.len();
        let mut out = vec![0.0; 2 * n];
        for i in 0..n {
            let s = sigmoid(g[i]);
            out[i] = go[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            out[n + i] = go[i] * g[i] * s;
        }
        Ok((cpu_storage(out, gs.dtype())?, Shape::from((2, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
        os: &candle_core::CudaStorage,
        ol: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        let (op, n) = (self.name(), gl.shape().elem_count());
        let (out, o) = cuda::alloc(&gs.device, gs.dtype(), 2 * n, op)?;
        let args = [
            cuda::ptr(gs, gl, op)?,
            cuda::ptr(us, ul, op)?,
            cuda::ptr(os, ol, op)?,
            o,
        ];
        cuda::launch_elementwise(&gs.device, "swiglu_bwd", gs.dtype(), &args, n)?;
        Ok((out, Shape::from((2, n))))
    }
}
