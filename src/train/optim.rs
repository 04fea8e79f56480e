//! AdamW with f32 state (PyTorch's formula), plus the Prox-QAT override for selected tensors (spec §7):
//! the same moments advance from the same gradient, but the applied update is
//! `x − η·(pull·(x − q) + λ·(AdamDir + wd·x))`.
//!
//! On CUDA with f32 master weights the update is one in-place kernel per tensor (`fused::adamw`); the
//! candle-ops version below is its CPU path and reference.

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;

#[cfg(feature = "cuda")]
use crate::fused;

#[derive(Clone, Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken (the bias-correction exponent).
    pub t: u64,
    pub m: BTreeMap<String, Tensor>,
    pub v: BTreeMap<String, Tensor>,
}

pub use crate::fused::adamw::Update;
use crate::fused::weight::{self, OnGrid};

/// The compute copy of a weight that the next step's forward reads: its dtype, and the uniform grid it
/// is put on (the straight-through view), if any.
#[derive(Clone)]
pub struct CopySpec {
    pub dtype: DType,
    pub on_grid: Option<OnGrid>,
}

impl AdamW {
    pub fn new(beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            t: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        }
    }

    /// Weight decay applies to matrices only (≥ 2-D: embeddings and projections), never to norm gains.
    pub fn decays(x: &Tensor) -> bool {
        x.rank() >= 2
    }

    /// Call once per optimizer step, before the `update`s of that step.
    pub fn begin_step(&mut self) {
        self.t += 1;
    }

    /// One AdamW step of `var` from `grad` scaled by the 0-d clipping factor `clip`; with `copy`, also
    /// the next step's compute copy of the updated weight (on CUDA in bf16 the update's own pass writes
    /// it; elsewhere it is cast after the update).
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        name: &str,
        var: &Var,
        grad: &Tensor,
        clip: &Tensor,
        lr: f64,
        how: Update,
        copy: Option<&CopySpec>,
    ) -> Result<Option<Tensor>> {
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        let wd = if Self::decays(var.as_tensor()) {
            self.weight_decay
        } else {
            0.0
        };
        #[cfg(feature = "cuda")]
        if fused::adamw::applies(var.as_tensor(), grad) {
            let x = var.as_tensor();
            for state in [&mut self.m, &mut self.v] {
                if !state.contains_key(name) {
                    state.insert(name.to_string(), x.zeros_like()?);
                }
            }
            let args = fused::adamw::AdamWArgs::new(lr, b1, b2, bc1, bc2, self.eps, wd);
            let out = match copy {
                // SAFETY: the kernel writes every element of the copy.
                Some(c) if c.dtype == DType::BF16 => {
                    Some(unsafe { Tensor::empty(x.shape(), DType::BF16, x.device())? })
                }
                _ => None,
            };
            let target = out.as_ref().zip(copy).map(|(o, c)| (o, c.on_grid.as_ref()));
            fused::adamw::step_in_place(x, &self.m[name], &self.v[name], grad, clip, &how, args, target)?;
            return match out {
                Some(out) => Ok(Some(out)),
                None => cast_copy(x, copy),
            };
        }
        // Detached: optimizer state must never hold an autograd graph (it would grow every step).
        let x = var.as_tensor().detach().to_dtype(DType::F32)?;
        let mut g = grad
            .detach()
            .to_dtype(DType::F32)?
            .broadcast_mul(&clip.to_dtype(DType::F32)?)?;
        if let Update::DistGrad { task_scale, coef, grid } = how {
            let toward_grid = (&x - grid.quantize(&x)?)?.broadcast_mul(&coef.to_dtype(DType::F32)?)?;
            g = ((g * task_scale)? + toward_grid)?;
        }
        let m = match self.m.get(name) {
            Some(m) => ((m * b1)? + (&g * (1.0 - b1))?)?,
            None => (&g * (1.0 - b1))?,
        };
        let v = match self.v.get(name) {
            Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
            None => (g.sqr()? * (1.0 - b2))?,
        };
        let dir = ((&m / bc1)? / ((v.sqrt()? / bc2.sqrt())? + self.eps)?)?;
        let task = if wd > 0.0 { (dir + (&x * wd)?)? } else { dir };
        let next = match how {
            Update::Plain | Update::DistGrad { .. } => (&x - (task * lr)?)?,
            Update::Prox { task_scale, pull, grid } => {
                let toward_grid = (&x - grid.quantize(&x)?)?.broadcast_mul(&pull.to_dtype(DType::F32)?)?;
                (&x - ((toward_grid + (task * task_scale)?)? * lr)?)?
            }
        };
        var.set(&next.to_dtype(var.dtype())?)?;
        self.m.insert(name.to_string(), m);
        self.v.insert(name.to_string(), v);
        cast_copy(var.as_tensor(), copy)
    }
}

/// The compute copy of `x` as `copy` asks, by the separate cast (the CPU path, and other dtypes).
fn cast_copy(x: &Tensor, copy: Option<&CopySpec>) -> Result<Option<Tensor>> {
    Ok(match copy {
        Some(c) => Some(weight::compute_copy(x, c.on_grid.clone(), c.dtype)?),
        None => None,
    })
}
