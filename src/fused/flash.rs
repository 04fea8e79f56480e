//! Causal GQA attention in tiles (flash-attention style): the `(T, T)` scores and probabilities never
//! exist in device memory, only tile by tile in a block's shared memory (kernels/proxqat.cu, `flash_*`).
//! The forward keeps each query row's log-sum-exp; the backward recomputes the probabilities from it.
//!
//! The tensors stay in the layouts the decoder block has, so no head transposes are copied:
//! `q: (B, H, T, D)` and `k: (B, KV, T, D)` as RoPE writes them, `v: (B, T, KV, D)` as its projection
//! writes it, and the output `o` and its gradient in `(B, T, H, D)`, the layout o_proj reads. Query head
//! `h` reads KV head `h / (H / KV)`.
//!
//! CUDA: bf16 with head_dim 64 ([`supported`]). CPU: the same arithmetic in f64 on the host (the
//! reference the CUDA kernels are checked against, and the finite-difference tests' subject).

use candle_core::{DType, Device, Result, Tensor};

/// The head size the CUDA kernels are built for (Llama-3.2-1B's and SmolLM2's).
pub const HEAD_DIM: usize = 64;

/// Whether the tiled CUDA kernels run this attention (CUDA, bf16, head_dim 64).
pub fn supported(q: &Tensor) -> bool {
    q.device().is_cuda() && q.dtype() == DType::BF16 && q.dims().last() == Some(&HEAD_DIM)
}

/// Where `(batch, head, position)` starts, in elements: `b·sb + head·sh + t·st`.
#[derive(Clone, Copy)]
struct Strides {
    b: usize,
    h: usize,
    t: usize,
}

impl Strides {
    /// `(B, heads, T, D)`.
    fn heads_major(heads: usize, t: usize, d: usize) -> Self {
        Strides {
            b: heads * t * d,
            h: t * d,
            t: d,
        }
    }

    /// `(B, T, heads, D)`.
    fn time_major(heads: usize, t: usize, d: usize) -> Self {
        Strides {
            b: t * heads * d,
            h: d,
            t: heads * d,
        }
    }

    fn at(&self, b: usize, h: usize, t: usize) -> usize {
        b * self.b + h * self.h + t * self.t
    }
}

/// The shapes of one attention call and each tensor's strides.
#[derive(Clone, Copy)]
struct Shapes {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    d: usize,
    q: Strides,
    k: Strides,
    v: Strides,
    o: Strides,
}

impl Shapes {
    fn of(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let (b, h, t, d) = q.dims4()?;
        let kv = k.dim(1)?;
        if k.dims() != [b, kv, t, d] || v.dims() != [b, t, kv, d] || kv == 0 || h % kv != 0 {
            candle_core::bail!(
                "flash attention: q {:?}, k {:?}, v {:?}: want (B, H, T, D), (B, KV, T, D), (B, T, KV, D), KV | H",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        Ok(Shapes {
            b,
            h,
            kv,
            t,
            d,
            q: Strides::heads_major(h, t, d),
            k: Strides::heads_major(kv, t, d),
            v: Strides::time_major(kv, t, d),
            o: Strides::time_major(h, t, d),
        })
    }

    fn group(&self) -> usize {
        self.h / self.kv
    }

    fn scale(&self) -> f64 {
        super::softmax::attention_scale(self.d)
    }
}

/// `o: (B, T, H, D)` in q's dtype and the log-sum-exp of every query row's scaled scores,
/// `lse: (B, H, T)` f32 (f64 on the CPU).
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let s = Shapes::of(q, k, v)?;
    #[cfg(feature = "cuda")]
    if supported(q) {
        return cuda::forward(q, k, v, &s);
    }
    let (qh, kh, vh) = (host(q)?, host(k)?, host(v)?);
    let mut o = vec![0.0; s.b * s.t * s.h * s.d];
    let mut lse = vec![0.0; s.b * s.h * s.t];
    for b in 0..s.b {
        for h in 0..s.h {
            let kvh = h / s.group();
            for i in 0..s.t {
                let scores = row_scores(&s, &qh, &kh, (b, h, kvh, i));
                let m = scores.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
                let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                lse[(b * s.h + h) * s.t + i] = m + z.ln();
                let oi = s.o.at(b, h, i);
                for (j, ej) in e.iter().enumerate() {
                    let vj = s.v.at(b, kvh, j);
                    for c in 0..s.d {
                        o[oi + c] += ej / z * vh[vj + c];
                    }
                }
            }
        }
    }
    Ok((
        to_tensor(o, (s.b, s.t, s.h, s.d), q)?,
        Tensor::from_vec(lse, (s.b, s.h, s.t), q.device())?,
    ))
}

/// `(dq, dk, dv)` of shapes `(B, H, T, D)`, `(B, KV, T, D)`, `(B, T, KV, D)` from the forward's `o` and
/// `lse` and the output gradient `d_o: (B, T, H, D)`, in q's dtype (on CUDA dq and dk as the kernel's f32
/// sums, which RoPE's backward rounds once):
/// `P = exp(scale·q·kᵀ − lse)`, `dv = Pᵀ·do`, `dS = P ∘ (do·vᵀ − rowsum(o ∘ do))·scale`,
/// `dq = dS·k`, `dk = dSᵀ·q`.
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let s = Shapes::of(q, k, v)?;
    if o.dims() != d_o.dims() || o.dims() != [s.b, s.t, s.h, s.d] || lse.dims() != [s.b, s.h, s.t] {
        candle_core::bail!(
            "flash attention backward: o {:?}, lse {:?}, do {:?}",
            o.dims(),
            lse.dims(),
            d_o.dims()
        );
    }
    #[cfg(feature = "cuda")]
    if supported(q) {
        return cuda::backward(q, k, v, o, lse, d_o, &s);
    }
    let (qh, kh, vh, oh, lh, gh) = (host(q)?, host(k)?, host(v)?, host(o)?, host(lse)?, host(d_o)?);
    let (mut dq, mut dk, mut dv) = (vec![0.0; qh.len()], vec![0.0; kh.len()], vec![0.0; vh.len()]);
    let scale = s.scale();
    for b in 0..s.b {
        for h in 0..s.h {
            let kvh = h / s.group();
            for i in 0..s.t {
                let row = (b * s.h + h) * s.t + i;
                let p = row_scores(&s, &qh, &kh, (b, h, kvh, i))
                    .into_iter()
                    .map(|x| (x - lh[row]).exp());
                let (oi, qi) = (s.o.at(b, h, i), s.q.at(b, h, i));
                let delta: f64 = (0..s.d).map(|c| oh[oi + c] * gh[oi + c]).sum();
                for (j, pj) in p.enumerate() {
                    let (kj, vj) = (s.k.at(b, kvh, j), s.v.at(b, kvh, j));
                    let dp: f64 = (0..s.d).map(|c| gh[oi + c] * vh[vj + c]).sum();
                    let ds = pj * (dp - delta) * scale;
                    for c in 0..s.d {
                        dv[vj + c] += pj * gh[oi + c];
                        dq[qi + c] += ds * kh[kj + c];
                        dk[kj + c] += ds * qh[qi + c];
                    }
                }
            }
        }
    }
    Ok((
        to_tensor(dq, q.dims(), q)?,
        to_tensor(dk, k.dims(), q)?,
        to_tensor(dv, v.dims(), q)?,
    ))
}

/// Query row `i`'s scaled scores against the keys it sees (positions 0..=i).
fn row_scores(s: &Shapes, q: &[f64], k: &[f64], (b, h, kvh, i): (usize, usize, usize, usize)) -> Vec<f64> {
    let qi = s.q.at(b, h, i);
    (0..=i)
        .map(|j| {
            let kj = s.k.at(b, kvh, j);
            s.scale() * (0..s.d).map(|c| q[qi + c] * k[kj + c]).sum::<f64>()
        })
        .collect()
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()
}

fn to_tensor(values: Vec<f64>, shape: impl Into<candle_core::Shape>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(values, shape, like.device())?.to_dtype(like.dtype())
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{Shapes, Strides};
    use crate::fused::cuda::{launch, tensor_view_ptr, Arg};
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::{DType, Result, Tensor};

    const THREADS: u32 = 128;
    /// The backward's dynamic shared memory: seven (64, 72) bf16 tiles (k, v, dSᵀ, two of q, two of do)
    /// and two buffers each of 64 log-sum-exps and deltas.
    const BWD_SHARED_BYTES: u32 = 7 * 64 * 72 * 2 + 4 * 64 * 4;

    fn strides(s: Strides) -> [Arg; 3] {
        [s.b, s.h, s.t].map(|v| Arg::U64(v as u64))
    }

    fn cuda_device(t: &Tensor) -> Result<candle_core::cuda_backend::CudaDevice> {
        match t.device() {
            candle_core::Device::Cuda(d) => Ok(d.clone()),
            _ => candle_core::bail!("flash attention: not a CUDA tensor"),
        }
    }

    /// Device addresses of the tensors' first elements (each read with the strides the kernel is given);
    /// the kernels read bf16 rows as 16-byte vectors.
    fn ptrs<const N: usize>(ts: [&Tensor; N], op: &str) -> Result<[u64; N]> {
        let mut out = [0u64; N];
        for (o, t) in out.iter_mut().zip(ts) {
            *o = tensor_view_ptr(t, op)?;
            if t.dtype() == DType::BF16 && *o % 16 != 0 {
                candle_core::bail!("{op}: a bf16 input is not 16-byte aligned");
            }
        }
        Ok(out)
    }

    /// `v: (B, T, KV, D)` as the kernels read it, and its strides: in place when each (position, head)
    /// row is contiguous and 16-byte aligned (v within the fused q/k/v projection's rows), else a
    /// contiguous copy.
    fn v_rows(v: &Tensor) -> Result<(Tensor, Strides)> {
        let v = match v.stride() {
            &[sb, st, sh, 1] if [sb, st, sh].iter().all(|s| s % 8 == 0) => v.clone(),
            _ => v.contiguous()?,
        };
        let &[b, t, h, _] = v.stride() else {
            candle_core::bail!("flash attention: v {:?} is not (B, T, KV, D)", v.dims())
        };
        Ok((v, Strides { b, h, t }))
    }

    fn tiles(rows: usize, tile: usize, y: usize, z: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(tile) as u32, y as u32, z as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn ints(s: &Shapes) -> [Arg; 4] {
        [
            Arg::I32(s.t as i32),
            Arg::I32(s.h as i32),
            Arg::I32(s.group() as i32),
            Arg::F32(s.scale() as f32),
        ]
    }

    pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, s: &Shapes) -> Result<(Tensor, Tensor)> {
        let op = "flash attention";
        let (q, k) = (q.contiguous()?, k.contiguous()?);
        let (v, v_strides) = v_rows(v)?;
        let s = &Shapes { v: v_strides, ..*s };
        let dev = cuda_device(&q)?;
        // SAFETY: the kernel writes every row of o and every log-sum-exp.
        let o = unsafe { Tensor::empty((s.b, s.t, s.h, s.d), DType::BF16, q.device())? };
        let lse = unsafe { Tensor::empty((s.b, s.h, s.t), DType::F32, q.device())? };
        let p = ptrs([&q, &k, &v, &o, &lse], op)?;
        let args: Vec<Arg> = p
            .map(Arg::Ptr)
            .into_iter()
            .chain(ints(s))
            .chain([s.q, s.k, s.v, s.o].into_iter().flat_map(strides))
            .collect();
        launch(&dev, "flash_fwd_bf16", tiles(s.t, 64, s.h, s.b), &args)?;
        Ok((o, lse))
    }

    pub fn backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        lse: &Tensor,
        d_o: &Tensor,
        s: &Shapes,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let op = "flash attention backward";
        let (q, k, o, d_o) = (q.contiguous()?, k.contiguous()?, o.contiguous()?, d_o.contiguous()?);
        let (v, v_strides) = v_rows(v)?;
        // dv is written packed, (B, T, KV, D).
        let dv_strides = s.v;
        let s = &Shapes { v: v_strides, ..*s };
        let dev = cuda_device(&q)?;
        let rows = s.b * s.h * s.t;
        // SAFETY: the delta kernel writes every row's sum.
        let delta = unsafe { Tensor::empty(rows, DType::F32, q.device())? };
        let dq = Tensor::zeros(q.dims(), DType::F32, q.device())?;
        // f32 sums: the query heads of a KV head (one block each) add their shares of dk and dv.
        let dk = Tensor::zeros(k.dims(), DType::F32, q.device())?;
        let dv = Tensor::zeros(v.dims(), DType::F32, q.device())?;
        let [qp, kp, vp, op_, lp, dop, deltap, dqp, dkp, dvp] =
            ptrs([&q, &k, &v, &o, lse, &d_o, &delta, &dq, &dk, &dv], op)?;
        let delta_args: Vec<Arg> = [op_, dop, deltap]
            .map(Arg::Ptr)
            .into_iter()
            .chain([Arg::I32(rows as i32), Arg::I32(s.t as i32), Arg::I32(s.h as i32)])
            .chain([s.o, s.o].into_iter().flat_map(strides))
            .collect();
        // Eight lanes per row (one 16-byte vector of o and of do each).
        let cfg = LaunchConfig {
            grid_dim: ((rows * 8).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(&dev, "flash_delta_bf16", cfg, &delta_args)?;
        let args: Vec<Arg> = [qp, kp, vp, dop, lp, deltap, dqp, dkp, dvp]
            .map(Arg::Ptr)
            .into_iter()
            .chain(ints(s))
            .chain([s.q, s.k, s.v, s.o, s.q, s.k, dv_strides].into_iter().flat_map(strides))
            .collect();
        let grid = LaunchConfig {
            grid_dim: (s.h as u32, s.b as u32, s.t.div_ceil(64) as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: BWD_SHARED_BYTES,
        };
        launch(&dev, "flash_bwd_bf16", grid, &args)?;
        // dq and dk stay f32: RoPE's backward reads them and rounds once, to bf16.
        Ok((dq, dk, dv.to_dtype(DType::BF16)?))
    }
}
