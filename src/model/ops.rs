//! The Llama building blocks, each written with candle primitives that carry a backward.
//!
//! candle's fused `rms_norm`, `softmax_last_dim` and `rope` have no backward and silently stop the
//! gradient (../shared/gpu-build.md), so none of them is used here. Statistics (RMS, softmax, the loss)
//! are computed in f32 (or f64 in tests) whatever the compute dtype.

use candle_core::{DType, Device, Result, Tensor, D};

use super::config::LlamaConfig;

/// The dtype statistics are accumulated in: f64 stays f64 (finite-difference tests), else f32.
pub(crate) fn stat_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xs = x.to_dtype(stat_dtype(dtype))?;
    let inv_rms = (xs.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    xs.broadcast_mul(&inv_rms)?.to_dtype(dtype)?.broadcast_mul(weight)
}

/// Llama-3 RoPE scaling as one divisor per frequency (what llama.cpp stores as `rope_freqs.weight`):
/// high frequencies kept, low ones divided by `factor`, a smooth blend between. None without scaling.
pub fn llama3_rope_divisors(cfg: &LlamaConfig) -> Option<Vec<f64>> {
    let s = cfg.rope_scaling.as_ref()?;
    let old = s.original_max_position_embeddings as f64;
    Some(
        base_frequencies(cfg)
            .into_iter()
            .map(|freq| {
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < old / s.high_freq_factor {
                    1.0
                } else if wavelen > old / s.low_freq_factor {
                    s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    1.0 / ((1.0 - smooth) / s.factor + smooth)
                }
            })
            .collect(),
    )
}

fn base_frequencies(cfg: &LlamaConfig) -> Vec<f64> {
    (0..cfg.head_dim / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64))
        .collect()
}

/// RoPE angle tables `(cos, sin)`, each `(seq_len, head_dim / 2)`: one angle per rotated pair
/// (rotate-half layout: element i pairs with i + head_dim/2).
pub fn rope_tables(cfg: &LlamaConfig, seq_len: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let mut inv_freq = base_frequencies(cfg);
    if let Some(divisors) = llama3_rope_divisors(cfg) {
        inv_freq.iter_mut().zip(divisors).for_each(|(f, d)| *f /= d);
    }
    let mut cos = Vec::with_capacity(seq_len * cfg.head_dim);
    let mut sin = Vec::with_capacity(seq_len * cfg.head_dim);
    for t in 0..seq_len {
        for f in &inv_freq {
            let a = t as f64 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let shape = (seq_len, cfg.head_dim / 2);
    Ok((
        Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
    ))
}

/// Rotate-half RoPE on `x: (B, H, T, D)` with the tables of `rope_tables`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let full = |t: &Tensor| Tensor::cat(&[t, t], D::Minus1)?.to_dtype(x.dtype());
    let (cos, sin) = (full(cos)?, full(sin)?);
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Softmax over the last dimension. The max is subtracted detached: softmax does not depend on it.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `(T, T)` additive causal mask: 0 on and below the diagonal, -inf above.
pub fn causal_mask(seq_len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..seq_len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq_len, seq_len), device)?.to_dtype(dtype)
}

/// GQA attention. `q: (B, H, T, D)`, `k, v: (B, KV, Tk, D)`, `mask` additive and broadcastable to
/// `(B, KV, H / KV, T, Tk)`: the `(T, T)` of [`causal_mask`] in training, a per-row one when decoding
/// with a KV cache (`model::sample`). Returns `(B, H, T, D)`. Scores and softmax are in f32 (f64 in
/// tests) whatever the compute dtype.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (kv, tk) = (k.dim(1)?, k.dim(2)?);
    let group = h / kv;
    // Group the query heads that share a KV head so K and V are used without being copied.
    let q = q.reshape((b, kv, group * t, d))?;
    // Scores are accumulated and kept in f32 (as fused attention kernels do): rounding them to bf16
    // before the softmax biases the loss. Only the probabilities go back to bf16 for P·V.
    let stat = stat_dtype(q.dtype());
    let scores = q.to_dtype(stat)?.matmul(&k.to_dtype(stat)?.t()?)?;
    let scores = (scores / (d as f64).sqrt())?.reshape((b, kv, group, t, tk))?;
    let probs = softmax_last_dim(&scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?)?;
    let probs = probs.to_dtype(q.dtype())?.reshape((b, kv, group * t, tk))?;
    probs.matmul(v)?.reshape((b, h, t, d))
}

/// Token mean over the counted targets (−100 = ignore) of `T²·KL(softmax(teacher/T) ‖ softmax(student/T))`
/// for `(N, V)` logits; the teacher is detached. 0 when nothing is counted.
pub fn distill_kl(student: &Tensor, teacher: &Tensor, targets: &[i64], temperature: f64) -> Result<Tensor> {
    let dtype = stat_dtype(student.dtype());
    let log_softmax = |x: &Tensor| -> Result<Tensor> {
        let x = x.to_dtype(dtype)?.affine(1.0 / temperature, 0.0)?;
        let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
        shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
    };
    let (log_ps, log_pt) = (log_softmax(student)?, log_softmax(&teacher.detach())?);
    let rows = (log_pt.exp()? * (&log_pt - log_ps)?)?.sum(D::Minus1)?;
    let keep: Vec<f64> = targets.iter().map(|&t| if t >= 0 { 1.0 } else { 0.0 }).collect();
    let counted = keep.iter().sum::<f64>().max(1.0);
    let keep = Tensor::from_vec(keep, targets.len(), student.device())?.to_dtype(dtype)?;
    (rows * keep)?
        .sum_all()?
        .affine(temperature * temperature / counted, 0.0)
}

/// SwiGLU: `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// Token-mean cross-entropy of `logits: (N, V)` against `targets` (N values, −100 = ignore).
/// Returns `(loss, number of counted targets)`; the loss is 0 when nothing is counted.
pub fn cross_entropy(logits: &Tensor, targets: &[i64]) -> Result<(Tensor, usize)> {
    let device = logits.device();
    let logits = logits.to_dtype(stat_dtype(logits.dtype()))?;
    let counted = targets.iter().filter(|&&t| t >= 0).count();
    let index: Vec<u32> = targets.iter().map(|&t| t.max(0) as u32).collect();
    let keep: Vec<f32> = targets.iter().map(|&t| if t >= 0 { 1.0 } else { 0.0 }).collect();
    let n = targets.len();
    let index = Tensor::from_vec(index, (n, 1), device)?;
    let keep = Tensor::from_vec(keep, n, device)?.to_dtype(logits.dtype())?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum_exp = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&index, D::Minus1)?;
    let nll = (log_sum_exp - picked)?.squeeze(D::Minus1)?;
    let loss = (nll * keep)?.sum_all()?.affine(1.0 / counted.max(1) as f64, 0.0)?;
    Ok((loss, counted))
}
