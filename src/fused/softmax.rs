//! Scaled causal softmax over attention score rows in one pass each way. The scale, the mask and the
//! softmax never exist as separate `(B, H, T, T)` tensors; the backward recomputes the probabilities
//! in f32 from the scores rather than reading the rounded ones.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::{cpu_storage, host_f64, node3, Backward3};

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
/// Scores in f32 (`scores`), probabilities in the compute dtype for P·V.
///
/// One autograd node that keeps only q, k and v: its backward recomputes the scores (one tensor-core
/// GEMM) and the probabilities instead of holding the f32 scores and the probabilities of every layer
/// from the forward to the backward (6 bytes per score: 3.2 GB at micro-batch 16 of Llama-3.2-1B), and
/// writes the gradients of the three inputs without candle's per-node zero-fill and add.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let [q3, k3, v3] = per_kv_head(q, k, v)?;
    let scale = attention_scale(d);
    let out = attend(&q3.detach(), &k3.detach(), &v3.detach(), scale)?;
    let out = if [q, k, v].iter().any(|x| x.track_op()) {
        node3(out, [&q3, &k3, &v3], Attention { scale })?
    } else {
        out
    };
    out.reshape((b, h, t, d))
}

/// `q: (B, H, T, D)`, `k, v: (B, KV, T, D)` as one batch entry per KV head, which serves the h / kv
/// query heads next to it: `(B·KV, (H/KV)·T, D)`, `(B·KV, T, D)`, `(B·KV, T, D)` (views when contiguous).
pub(super) fn per_kv_head(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<[Tensor; 3]> {
    let (b, h, t, d) = q.dims4()?;
    let kv = k.dim(1)?;
    Ok([
        q.contiguous()?.reshape((b * kv, (h / kv) * t, d))?,
        k.contiguous()?.reshape((b * kv, t, d))?,
        v.contiguous()?.reshape((b * kv, t, d))?,
    ])
}

pub(super) fn attention_scale(head_dim: usize) -> f64 {
    1.0 / (head_dim as f64).sqrt()
}

/// The attention's forward on per-KV-head batch entries (no autograd node of its own).
pub(super) fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    probabilities(q, k, scale)?.0.matmul(v)
}

/// The causal softmax of the scaled scores (in q's dtype) and the f32 scores.
fn probabilities(q: &Tensor, k: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let s = scores(q, k)?;
    Ok((causal_softmax(&s, scale, q.dtype())?, s))
}

struct Attention {
    scale: f64,
}

impl Backward3 for Attention {
    fn name(&self) -> &'static str {
        "fused attention"
    }

    /// The arithmetic of the three-node graph (scores → softmax → P·V), node by node: `dV = Pᵀ·dO`,
    /// `dP = dO·Vᵀ`, `dS` by the softmax backward (f32, from the f32 scores), then through q's dtype
    /// `dq = dS·k`, `dk = dSᵀ·q`.
    fn bwd(&self, [q, k, v]: [&Tensor; 3], grad: &Tensor) -> Result<[Option<Tensor>; 3]> {
        let (dq, dk, dv) = attention_backward(q, k, v, grad, self.scale)?;
        Ok([Some(dq), Some(dk), Some(dv)])
    }
}

/// `(dq, dk, dv)` of the attention on `(N, M, D)` / `(N, T, D)` batch entries (one per KV head) from
/// the output's gradient `(N, M, D)`, recomputing scores and probabilities (no autograd).
pub(super) fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v, grad) = (q.detach(), k.detach(), v.detach(), grad.detach().contiguous()?);
    let (probs, s) = probabilities(&q, &k, scale)?;
    let dv = probs.t()?.matmul(&grad)?;
    let dp = grad.matmul(&v.t()?)?;
    let ds = s
        .apply_op2_no_bwd(&dp, &CausalSoftmaxBwd { scale })?
        .to_dtype(q.dtype())?;
    Ok((ds.matmul(&k)?, ds.t()?.matmul(&q)?, dv))
}

/// `q · kᵀ` per batch entry in f32 (f64 stays f64): `q: (N, M, D)`, `k: (N, T, D)` → `(N, M, T)`. On
/// CUDA a bf16 pair runs on the tensor cores with f32 output, which equals the f32 product (products of
/// bf16 values are exact in f32, sums accumulate in f32) instead of a SIMT f32 GEMM on upcast copies.
/// The backward passes the score gradient through the inputs' dtype, as autocast and flash-attention
/// do: `dq = dS·k`, `dk = dSᵀ·q`.
pub fn scores(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    q.contiguous()?.apply_op2(&k.contiguous()?, Scores)
}

struct Scores;

impl Scores {
    /// `(N, M, T, D)` and the layout of `kᵀ`.
    fn shape(ql: &Layout, kl: &Layout) -> Result<((usize, usize, usize, usize), Layout)> {
        let (n, m, d) = ql.shape().dims3()?;
        let t = kl.shape().dims3()?.1;
        Ok(((n, m, t, d), kl.transpose(1, 2)?))
    }

    fn out_dtype(input: DType) -> DType {
        if input == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }
}

impl CustomOp2 for Scores {
    fn name(&self) -> &'static str {
        "fused-attention-scores"
    }

    fn cpu_fwd(&self, q: &CpuStorage, ql: &Layout, k: &CpuStorage, kl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (shape, kt) = Self::shape(ql, kl)?;
        if q.dtype() != Self::out_dtype(q.dtype()) {
            candle_core::bail!("{}: the CPU path takes f32 or f64 inputs", self.name());
        }
        Ok((q.matmul(k, shape, ql, &kt)?, Shape::from((shape.0, shape.1, shape.2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (shape, kt) = Self::shape(ql, kl)?;
        let out = Shape::from((shape.0, shape.1, shape.2));
        if q.dtype() != DType::BF16 {
            return Ok((q.matmul(k, shape, ql, &kt)?, out));
        }
        Ok((cuda::bf16_scores(q, ql, k, kl, shape, self.name())?, out))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, _s: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (q, k) = (q.detach(), k.detach());
        let grad = grad.detach().to_dtype(q.dtype())?;
        Ok((Some(grad.matmul(&k)?), Some(grad.t()?.matmul(&q)?)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::cublas::{result, sys};
    use candle_core::{CudaStorage, DType, Layout, Result};

    /// `S = q · kᵀ` for bf16 `q: (N, M, D)`, `k: (N, T, D)` into a fresh f32 `(N, M, T)`: one strided
    /// batched cublasGemmEx with f32 accumulation, on the device's stream.
    pub fn bf16_scores(
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        (n, m, t, d): (usize, usize, usize, usize),
        op: &str,
    ) -> Result<CudaStorage> {
        let (q_ptr, k_ptr) = (super::super::cuda::ptr(q, ql, op)?, super::super::cuda::ptr(k, kl, op)?);
        let (out, s_ptr) = super::super::cuda::alloc(&q.device, DType::F32, n * m * t, op)?;
        let int = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: {v} exceeds i32")));
        let (alpha, beta) = (1f32, 0f32);
        let bf16 = sys::cudaDataType::CUDA_R_16BF;
        // Column-major view: S is (T × M) with ld T, k is (D × T) with ld D (used transposed), q is (D × M)
        // with ld D, and S = kᵀ·q per batch entry.
        // SAFETY: the pointers address live contiguous buffers of the stated shapes (S freshly
        // allocated, fully written with β = 0); the handle runs on the device's one stream.
        unsafe {
            result::gemm_strided_batched_ex(
                *q.device.cublas_handle().handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                int(t)?,
                int(m)?,
                int(d)?,
                (&alpha as *const f32).cast(),
                k_ptr as *const std::ffi::c_void,
                bf16,
                int(d)?,
                (t * d) as i64,
                q_ptr as *const std::ffi::c_void,
                bf16,
                int(d)?,
                (m * d) as i64,
                (&beta as *const f32).cast(),
                s_ptr as *mut std::ffi::c_void,
                sys::cudaDataType::CUDA_R_32F,
                int(t)?,
                (m * t) as i64,
                int(n)?,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| candle_core::Error::Msg(format!("{op}: cublasGemmStridedBatchedEx: {e:?}")))?;
        Ok(out)
    }
}
