//! The Llama decoder blocks as one autograd node with a written-out backward; each block is
//! `x1 = x + o_proj(attention(rope(q), rope(k), v))` on `a = rms_norm(x)`, then
//! `out = x1 + mlp(rms_norm(x1))`.
//!
//! Composed of the fused ops, a block is some twenty autograd nodes (norms, projections, RoPE, head
//! reshapes and transposes, casts, residual adds), and candle's backward zero-fills and adds a gradient
//! buffer for every input of every one of them: ncu had those adds (`badd_bf16`, `badd_f32`) at a fifth
//! of the GPU time of a micro-step. Here the backward calls the same kernels in the same order as the
//! composed graph's (each op's backward function), adds the seven weight gradients and the two gains'
//! into their step accumulators, and hands each block's `∂L/∂x` straight to the block below; autograd
//! sees one node, and gets only `∂L/∂x` of the first block. The forward keeps what the composed graph
//! kept, less the pre-RoPE q and k (or, checkpointing, each block's input only), and the backward frees
//! each block's tensors as soon as it is done with them.
//!
//! q, k and v run as one projection (their weights' rows side by side, their accumulators row ranges
//! of one tensor): one GEMM each for the forward, the input gradient and the weight gradient instead of
//! three, whose k and v parts (a quarter of q's size) ran far below the GPU's rate: on an H100 a
//! layer's q/k/v GEMMs took 268 → 210 µs at micro-batch 16 and 138 → 65 µs at 4, each timed alone
//! (`scripts/experiments/gemm_algos.py`, `LAYOUT=fused`). RoPE and the attention read q, k and v in
//! place as column ranges of the projection's rows, and RoPE⁻¹ writes dq and dk into theirs.

use candle_core::{DType, Result, Tensor};
use std::sync::Mutex;

use super::linear::{add_product_into, input_gradient, project};
use super::mlp::{mlp_backward, mlp_forward, MlpKept};
use super::rms_norm::{rms_norm, rms_norm_backward_with_residual};
use super::rope::{rope, rope_backward_into};
use super::softmax::{attend, attention_scale, per_kv_head};
use super::weight::add_into;
use super::{flash, node1, residual, softmax, Backward1};
use crate::dist::overlap;

/// The block's shapes and constants.
#[derive(Clone)]
pub struct BlockSpec {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
    /// The matmuls' dtype (the norms write their output in it).
    pub compute: DType,
    /// RoPE angle tables `(T, head_dim / 2)`.
    pub cos: Tensor,
    pub sin: Tensor,
}

/// The forward's tensors the backward reads: the block input, the normed inputs of the projections
/// (`a`, `m`), q and k after RoPE `(B, heads, T, D)`, v `(B, T, KV, D)` (a view of the fused q/k/v
/// projection's rows), the attention output rows `o` and (tiled kernels) their log-sum-exps, the
/// residual after the attention `x1`, and the MLP's `gate`, `up` and SwiGLU product.
struct Saved {
    x: Tensor,
    a: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Option<Tensor>,
    x1: Tensor,
    m: Tensor,
    mlp: MlpKept,
}

fn forward(x: &Tensor, [g_in, g_post]: [&Tensor; 2], w: [&Tensor; 5], spec: &BlockSpec) -> Result<(Tensor, Saved)> {
    let [w_qkv, wo, w_gate, w_up, w_down] = w;
    let (b, t, d) = x.dims3()?;
    let (h, kv, hd) = (spec.heads, spec.kv_heads, spec.head_dim);
    let rows = b * t;
    let x = x.contiguous()?;
    let a = rms_norm(&x, g_in, spec.eps, spec.compute)?.reshape((rows, d))?;
    // One GEMM for q, k and v; each is then read in place as a column range of its rows.
    let qkv = project(&a, w_qkv)?.reshape((b, t, (h + 2 * kv) * hd))?;
    let q = rope(&qkv.narrow(2, 0, h * hd)?, &spec.cos, &spec.sin, h)?;
    let k = rope(&qkv.narrow(2, h * hd, kv * hd)?, &spec.cos, &spec.sin, kv)?;
    let v = qkv.reshape((b, t, h + 2 * kv, hd))?.narrow(2, h + kv, kv)?;
    let (o, lse) = attention(&q, &k, &v)?;
    let x1 = residual::add(&x, &project(&o, wo)?)?;
    let m = rms_norm(&x1, g_post, spec.eps, spec.compute)?.reshape((rows, d))?;
    let (z, mlp) = mlp_forward(&m, [w_gate, w_up, w_down])?;
    let out = residual::add(&x1, &z)?;
    let saved = Saved {
        x,
        a,
        q,
        k,
        v,
        o,
        lse,
        x1,
        m,
        mlp,
    };
    Ok((out, saved))
}

/// The composed graph's backward, node by node: the MLP (its three weight gradients), the
/// post-attention norm with the residual's gradient added (and its compute copy for o_proj) in the
/// same pass; o_proj, the attention, RoPE⁻¹ on dq and dk, the q/k/v weight gradient, the input norm
/// with the residual added. `grad` is `∂L/∂out` with its copy in the compute dtype; returns `∂L/∂x`
/// and its compute-dtype copy (written by the input norm's backward pass: the block below needs both,
/// and casting again would be one more pass) and the two gains' gradients.
fn backward(
    s: Saved,
    [g_in, g_post]: [&Tensor; 2],
    w: [&Tensor; 5],
    acc: [&Tensor; 5],
    qkv_parts: [&Tensor; 3],
    spec: &BlockSpec,
    [grad, grad_compute]: [&Tensor; 2],
) -> Result<([Tensor; 2], [Tensor; 2])> {
    let [w_qkv, wo, w_gate, w_up, w_down] = w;
    let [a_qkv, ao, a_gate, a_up, a_down] = acc;
    let (b, t, d) = s.x.dims3()?;
    let (h, kv, hd) = (spec.heads, spec.kv_heads, spec.head_dim);
    let rows = b * t;
    let dz = grad_compute.reshape((rows, d))?;
    let dm = mlp_backward(&s.m, &s.mlp, [w_gate, w_up, w_down], [a_gate, a_up, a_down], &dz)?;
    let (dx1, dy, dg_post) = rms_norm_backward_with_residual(
        &s.x1,
        g_post,
        &dm.reshape((b, t, d))?,
        Some(grad),
        spec.eps,
        spec.compute,
    )?;
    let dy = dy.reshape((rows, d))?;
    add_product_into(ao, &dy, &s.o)?;
    overlap::accumulated(ao)?;
    let (dq, dk, dv) = attention_backward(&s.q, &s.k, &s.v, &s.o, s.lse.as_ref(), &input_gradient(&dy, wo)?)?;
    // dq, dk and dv side by side, the fused projection's output gradient: one GEMM for its weight
    // gradient and one for its input's. RoPE⁻¹ writes its columns in place.
    // SAFETY: every column is written below (dq, dk, then dv).
    let dqkv = unsafe { Tensor::empty((rows, (h + 2 * kv) * hd), dv.dtype(), dv.device())? };
    rope_backward_into(&dq, &spec.cos, &spec.sin, &dqkv, 0)?;
    rope_backward_into(&dk, &spec.cos, &spec.sin, &dqkv, h * hd)?;
    dqkv.slice_set(&dv.reshape((rows, kv * hd))?, 1, (h + kv) * hd)?;
    add_product_into(a_qkv, &dqkv, &s.a)?;
    for acc in qkv_parts {
        overlap::accumulated(acc)?;
    }
    let da = input_gradient(&dqkv, w_qkv)?;
    let (dx, dx_compute, dg_in) =
        rms_norm_backward_with_residual(&s.x, g_in, &da.reshape((b, t, d))?, Some(&dx1), spec.eps, spec.compute)?;
    Ok(([dx, dx_compute], [dg_in, dg_post]))
}

/// One layer's tensors for [`decoder_stack`]: the two RMSNorm gains (input, post-attention) and the
/// accumulators of their gradients; the five compute-dtype projections — q, k and v as one
/// (`(heads + 2·kv_heads)·head_dim` rows, in that order), o, gate, up, down — and theirs; and q, k and
/// v's own accumulators, views of the fused one's rows that a data-parallel step sums as soon as the
/// fused one is complete.
#[derive(Clone)]
pub struct LayerTensors {
    pub gains: [Tensor; 2],
    pub gain_acc: [Tensor; 2],
    pub w: [Tensor; 5],
    pub acc: [Tensor; 5],
    pub qkv_parts: [Tensor; 3],
}

/// Every decoder block, in order, as one autograd node over the first block's input `x: (B, T, d)`
/// (the residual stream's dtype). A node per block cost autograd a zero-filled gradient buffer and an
/// add for each block's input (an f32 `(B, T, d)`), a copy of each block's output into its node, and
/// the same for the gains. With `checkpoint` the forward keeps only each block's input and the
/// backward runs the block's forward again before its backward (`train.checkpoint_layers`).
pub fn decoder_stack(x: &Tensor, layers: Vec<LayerTensors>, spec: &BlockSpec, checkpoint: bool) -> Result<Tensor> {
    let layers: Vec<LayerTensors> = layers
        .into_iter()
        .map(|l| LayerTensors {
            gains: l.gains.map(|g| g.detach()),
            w: l.w.map(|w| w.detach()),
            ..l
        })
        .collect();
    let mut kept = Vec::with_capacity(layers.len());
    let mut h = x.detach().contiguous()?;
    for l in &layers {
        let (out, saved) = forward(&h, l.gains.each_ref(), l.w.each_ref(), spec)?;
        kept.push(if checkpoint { Kept::Input(h) } else { Kept::Saved(saved) });
        h = out;
    }
    if !x.track_op() {
        return Ok(h);
    }
    let node = DecoderStack {
        kept: Mutex::new(Some(kept)),
        layers,
        spec: spec.clone(),
    };
    node1(h, &x.contiguous()?, node)
}

/// A block's forward state in the stack: all of it, or (checkpointing) its input only.
enum Kept {
    Saved(Saved),
    Input(Tensor),
}

struct DecoderStack {
    kept: Mutex<Option<Vec<Kept>>>,
    layers: Vec<LayerTensors>,
    spec: BlockSpec,
}

impl Backward1 for DecoderStack {
    fn name(&self) -> &'static str {
        "fused decoder blocks"
    }

    fn bwd(&self, _x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let kept = self
            .kept
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned", self.name())))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: backward run twice", self.name())))?;
        // ∂L/∂x of the block above and its compute-dtype copy, from block to block.
        let grad = grad.detach().contiguous()?;
        let grad_compute = grad.to_dtype(self.spec.compute)?;
        let mut grads = [grad, grad_compute];
        for (l, k) in self.layers.iter().zip(kept).rev() {
            let (gains, w) = (l.gains.each_ref(), l.w.each_ref());
            let saved = match k {
                Kept::Saved(s) => s,
                Kept::Input(x) => forward(&x, gains, w, &self.spec)?.1,
            };
            let (acc, parts) = (l.acc.each_ref(), l.qkv_parts.each_ref());
            let (dx, dgains) = backward(saved, gains, w, acc, parts, &self.spec, grads.each_ref())?;
            for (acc, g) in l.gain_acc.iter().zip(&dgains) {
                add_into(acc, g)?;
                overlap::accumulated(acc)?;
            }
            grads = dx;
        }
        let [dx, _] = grads;
        Ok(Some(dx))
    }
}

/// The block's attention on `q: (B, H, T, D)`, `k: (B, KV, T, D)`, `v: (B, T, KV, D)`: the output rows
/// `(B·T, H·D)` and, from the tiled kernels where they run, the rows' log-sum-exps; elsewhere the
/// composed scores → softmax → P·V on per-KV-head batch entries (the transposes copied).
fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    let (b, h, t, hd) = q.dims4()?;
    if flash::supported(q) {
        let (o, lse) = flash::forward(q, k, v)?;
        return Ok((o.reshape((b * t, h * hd))?, Some(lse)));
    }
    let [q3, k3, v3] = per_kv_head(q, k, &v.transpose(1, 2)?)?;
    let o = attend(&q3, &k3, &v3, attention_scale(hd))?
        .reshape((b, h, t, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    Ok((o.reshape((b * t, h * hd))?, None))
}

/// `(dq, dk, dv)` in the layouts of q, k and v from the output rows' gradient `d_o: (B·T, H·D)`; dv in
/// the compute dtype, dq and dk in it or (flash) as f32 sums that RoPE's backward rounds.
fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: Option<&Tensor>,
    d_o: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, h, t, hd) = q.dims4()?;
    let kv = k.dim(1)?;
    if let Some(lse) = lse {
        let rows = |x: &Tensor| x.reshape((b, t, h, hd));
        return flash::backward(q, k, v, &rows(o)?, lse, &rows(d_o)?);
    }
    let [q3, k3, v3] = per_kv_head(q, k, &v.transpose(1, 2)?)?;
    let d_o = d_o
        .reshape((b, t, h, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(q3.shape())?;
    let (dq, dk, dv) = softmax::attention_backward(&q3, &k3, &v3, &d_o, attention_scale(hd))?;
    let dv = dv.reshape((b, kv, t, hd))?.transpose(1, 2)?.contiguous()?;
    Ok((dq.reshape((b, h, t, hd))?, dk.reshape((b, kv, t, hd))?, dv))
}
