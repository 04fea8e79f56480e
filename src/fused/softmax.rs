//! Scaled causal softmax over attention score rows in one pass each way. The scale, the mask and the
//! softmax never exist as separate `(B, H, T, T)` tensors; the backward recomputes the probabilities
//! in f32 from the scores rather than reading the rounded ones.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::{cpu_storage, host_f64};

/// `scores: (.., T, T)` (f32, or f64 on the CPU) → probabilities of `softmax(scale·s)` under the causal
/// mask (row i sees columns ≤ i), in `out`.
pub fn causal_softmax(scores: &Tensor, scale: f64, out: DType) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax { scale, out })
}

struct CausalSoftmax {
    scale: f64,
    out: DType,
}

/// `(scores, grad of probabilities)` → grad of scores, in the scores' dtype.
struct CausalSoftmaxBwd {
    scale: f64,
}

/// Row i of a (.., T, T) tensor is query position i % T: its softmax over columns 0..=i % T.
fn row_probs(row: &[f64], last: usize, scale: f64) -> Vec<f64> {
    let max = row[..=last].iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s * scale));
    let e: Vec<f64> = row[..=last].iter().map(|&s| (s * scale - max).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = l.dims()[l.dims().len() - 1];
        let scores = host_f64(s, l, self.name())?;
        let mut out = Vec::with_capacity(scores.len());
        for (r, row) in scores.chunks(t).enumerate() {
            let p = row_probs(row, r % t, self.scale);
            out.extend(p.iter().copied().chain(std::iter::repeat_n(0.0, t - p.len())));
        }
        Ok((cpu_storage(out, self.out)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, Arg};
        let op = self.name();
        if s.dtype() != DType::F32 {
            candle_core::bail!("{op}: CUDA path takes f32 scores");
        }
        let t = l.dims()[l.dims().len() - 1];
        let rows = l.shape().elem_count() / t;
        let scores = cuda::ptr(s, l, op)?;
        let (out, probs) = cuda::alloc(&s.device, self.out, rows * t, op)?;
        let name = format!("causal_softmax_fwd_{}", cuda::suffix(self.out, op)?);
        let args = [
            Arg::Ptr(scores),
            Arg::Ptr(probs),
            Arg::I32(t as i32),
            Arg::F32(self.scale as f32),
        ];
        cuda::launch(&s.device, &name, cuda::rows(rows, cuda::threads_for(t)), &args)?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, scores: &Tensor, _p: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = CausalSoftmaxBwd { scale: self.scale };
        Ok(Some(scores.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-causal-softmax-bwd"
    }

    fn cpu_fwd(&self, ss: &CpuStorage, sl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = sl.dims()[sl.dims().len() - 1];
        let (scores, grad) = (host_f64(ss, sl, self.name())?, host_f64(gs, gl, self.name())?);
        let mut out = Vec::with_capacity(scores.len());
        for (r, (row, g)) in scores.chunks(t).zip(grad.chunks(t)).enumerate() {
            let p = row_probs(row, r % t, self.scale);
            let dot: f64 = p.iter().zip(g).map(|(p, g)| p * g).sum();
            out.extend(p.iter().zip(g).map(|(p, g)| self.scale * p * (g - dot)));
            out.extend(std::iter::repeat_n(0.0, t - p.len()));
        }
        Ok((cpu_storage(out, ss.dtype())?, sl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, Arg};
        let op = self.name();
        let t = sl.dims()[sl.dims().len() - 1];
        let rows = sl.shape().elem_count() / t;
        let (scores, grad) = (cuda::ptr(ss, sl, op)?, cuda::ptr(gs, gl, op)?);
        let (out, ds) = cuda::alloc(&ss.device, DType::F32, rows * t, op)?;
        let name = format!("causal_softmax_bwd_{}", cuda::suffix(gs.dtype(), op)?);
        let args = [scores, grad, ds].map(Arg::Ptr);
        let args: Vec<Arg> = args
            .into_iter()
            .chain([Arg::I32(t as i32), Arg::F32(self.scale as f32)])
            .collect();
        cuda::launch(&ss.device, &name, cuda::rows(rows, cuda::threads_for(t)), &args)?;
        Ok((out, sl.shape().clone()))
    }
}

/// Causal GQA attention on the fused softmax. `q: (B, H, T, D)`, `k, v: (B, KV, T, D)` → `(B, H, T, D)`.
/// Scores in f32 (TF32 on CUDA is exact for bf16 inputs), probabilities in the compute dtype for P·V.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let q = q.reshape((b, kv, (h / kv) * t, d))?;
    let stat = crate::model::ops::stat_dtype(q.dtype());
    let scores = q.to_dtype(stat)?.matmul(&k.to_dtype(stat)?.t()?)?;
    let probs = causal_softmax(&scores, 1.0 / (d as f64).sqrt(), q.dtype())?;
    probs.matmul(v)?.reshape((b, h, t, d))
}
