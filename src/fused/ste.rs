//! The straight-through quantized view `q(x)` with gradient 1 (STE, and Prox-QAT's task gradient at
//! q(x)) as one op: one pass forward, nothing backward. Written with primitives
//! (`sg(q) + (x − sg(x))`) it costs about six passes over every selected weight and two full-size
//! temporaries per micro-batch in the backward alone.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::host_f64;

/// `q(x)` on a uniform grid (`scale` per `elem_count / scale.elem_count()` consecutive elements, codes
/// clamped to ±`half_levels`, ties to even), with the identity as its gradient. f32 (or f64) in and out.
pub fn quantize_straight_through(x: &Tensor, scale: &Tensor, half_levels: f64) -> Result<Tensor> {
    let op = SteQuantize {
        scale: scale.to_dtype(x.dtype())?.contiguous()?,
        half_levels,
    };
    x.contiguous()?.apply_op1(op)
}

struct SteQuantize {
    scale: Tensor,
    half_levels: f64,
}

impl CustomOp1 for SteQuantize {
    fn name(&self) -> &'static str {
        "fused-ste-quantize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = host_f64(s, l, self.name())?;
        let scale = self.scale.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let group = x.len() / scale.len();
        let l_max = self.half_levels;
        // The grid's own arithmetic in the storage dtype: division, ties-to-even, clamp, product.
        let out = match s.dtype() {
            DType::F32 => CpuStorage::F32(
                x.iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let sc = scale[i / group] as f32;
                        ((v as f32) / sc).round_ties_even().clamp(-l_max as f32, l_max as f32) * sc
                    })
                    .collect(),
            ),
            DType::F64 => CpuStorage::F64(
                x.iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let sc = scale[i / group];
                        (v / sc).round_ties_even().clamp(-l_max, l_max) * sc
                    })
                    .collect(),
            ),
            other => candle_core::bail!("{}: master weights must be f32 or f64, got {other:?}", self.name()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, Arg};
        let op = self.name();
        if s.dtype() != DType::F32 {
            candle_core::bail!("{op}: CUDA path takes f32 master weights");
        }
        let n = l.shape().elem_count();
        let (out, q) = cuda::alloc(&s.device, DType::F32, n, op)?;
        let args = [
            Arg::Ptr(cuda::ptr(s, l, op)?),
            Arg::Ptr(cuda::tensor_ptr(&self.scale, op)?),
            Arg::U64((n / self.scale.elem_count()) as u64),
            Arg::F32(self.half_levels as f32),
            Arg::Ptr(q),
            Arg::Len(n),
        ];
        cuda::launch(&s.device, "ste_quantize_f32", cuda::elementwise(n), &args)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _q: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}
