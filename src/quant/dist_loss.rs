//! The distance-to-grid term (spec §4): `dist = (1/K)·Σ_i w_i·Σ (x_i − sg[q(x_i)])²` and its gradient
//! `2·w_i·(x − q)/K`, written directly (q is a stop-gradient, so autograd would find the same).

use anyhow::Result;
use candle_core::Tensor;

/// `w_i·Σ(x − q)²` of one tensor, as a 0-d tensor of the weight's dtype.
pub fn term(x: &Tensor, q: &Tensor, weight: &Tensor) -> Result<Tensor> {
    Ok(((x - q)?.sqr()?.sum_all()?.to_dtype(weight.dtype())? * weight)?)
}

/// `coef·∂dist/∂x = coef·2·w_i·(x − q)/K` for one of K tensors (coef = c·γ, an explicit once-per-step
/// coefficient: not divided by the accumulation count, spec §12.3).
pub fn grad(x: &Tensor, q: &Tensor, weight: &Tensor, k: usize, coef: f64) -> Result<Tensor> {
    Ok((x - q)?.broadcast_mul(&grad_coefficient(weight, k, coef)?.to_dtype(x.dtype())?)?)
}

/// The factor of `(x − q)` in `grad`: `2·coef·w_i/K` (0-d, applied inside the fused optimizer step).
pub fn grad_coefficient(weight: &Tensor, k: usize, coef: f64) -> Result<Tensor> {
    Ok((weight * (2.0 * coef / k as f64))?)
}

/// The prox step's contraction `min(c·s_i, 1/η)` (spec §12.8: η·c·s ≤ 1, an exact snap at 1).
pub fn prox_coefficient(c: f64, weight: &Tensor, lr: f64) -> Result<Tensor> {
    Ok((weight * c)?.minimum(1.0 / lr)?)
}
