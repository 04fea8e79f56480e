//! Quantization grids (spec §2): uniform symmetric n-bit `q = clamp(round_half_even(w/s), ±L)·s` with a
//! scale per tensor, per output channel or per group of G input weights (or the seed's one absolute Δ),
//! and explicit sorted level lists (nearest level, ties to the lower one).
//!
//! Every function here is a handful of tensor ops, so the same code runs on CPU and CUDA with the same
//! results; scales are computed once from the starting weights and then held fixed.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

/// How uniform-grid scales are set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleKind {
    /// The seed's single absolute step Δ (`step`) for every selected tensor.
    Absolute,
    Tensor,
    Channel,
    Group,
}

/// How a computed scale is derived from the weights it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRule {
    /// `s = max|w| / L`: the largest weight lands on the outermost level, nothing saturates.
    Absmax,
    /// `s = k·std(w) / L`: clip at k standard deviations, trading saturation for resolution.
    Std,
    /// `s = α·max|w| / L` with α ∈ {1, 0.95, …, 0.5} chosen per scale group to minimise the rounding
    /// error Σ(w − q(w))² of that group: clips outliers where the finer steps pay for it.
    Mse,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GridConfig {
    /// Uniform grid bit width (2..=8): 2^(bits−1)−1 levels each side of zero.
    pub bits: u32,
    /// Explicit sorted levels instead of a uniform grid (then `bits`, `scale` are not used).
    pub levels: Option<Vec<f64>>,
    pub scale: ScaleKind,
    /// Δ for `scale = "absolute"`.
    pub step: Option<f64>,
    pub group_size: usize,
    pub rule: ScaleRule,
    /// k of the `std` rule.
    pub std_k: f64,
}

impl Default for GridConfig {
    fn default() -> Self {
        GridConfig {
            bits: 4,
            levels: None,
            scale: ScaleKind::Group,
            step: None,
            group_size: 32,
            rule: ScaleRule::Absmax,
            std_k: 3.0,
        }
    }
}

impl GridConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(levels) = &self.levels {
            if levels.is_empty() {
                bail!("quant.grid.levels is empty: give at least one level, in ascending order");
            }
            if levels.windows(2).any(|w| w[0] >= w[1]) || levels.iter().any(|l| !l.is_finite()) {
                bail!("quant.grid.levels must be finite and strictly ascending, got {levels:?}");
            }
            return Ok(());
        }
        if !(2..=8).contains(&self.bits) {
            bail!("quant.grid.bits = {} is out of range: use 2..=8", self.bits);
        }
        match (self.scale, self.step) {
            (ScaleKind::Absolute, None) => {
                bail!("quant.grid.scale = \"absolute\" needs quant.grid.step (Δ > 0)")
            }
            (ScaleKind::Absolute, Some(s)) if s <= 0.0 || !s.is_finite() => {
                bail!("quant.grid.step = {s} must be > 0 (it is the grid spacing Δ)")
            }
            _ => {}
        }
        if self.scale == ScaleKind::Group && self.group_size == 0 {
            bail!("quant.grid.group_size must be positive");
        }
        if self.rule == ScaleRule::Std && self.std_k <= 0.0 {
            bail!("quant.grid.std_k must be positive");
        }
        Ok(())
    }

    /// Levels each side of zero of the uniform grid.
    pub fn half_levels(&self) -> f64 {
        ((1u32 << (self.bits - 1)) - 1) as f64
    }
}

/// The grid of one selected tensor: how it is viewed and its fixed scale.
#[derive(Clone, Debug)]
pub enum TensorGrid {
    /// `w` viewed as `view` (scales broadcast over the last axis), `half_levels` = L.
    Uniform {
        view: Vec<usize>,
        scale: Tensor,
        half_levels: f64,
    },
    /// Ascending levels (f32 values as stored).
    Levels(Vec<f32>),
}

/// The four reductions stats need, per tensor: hits, sat_q, sat_w, Σ|w−q|.
pub struct GridCounts {
    pub hit: Tensor,
    pub sat_q: Tensor,
    pub sat_w: Tensor,
    pub abs_err: Tensor,
}

/// Round half to even (PyTorch's `round`), from floor: Rust's and candle's `round` go half away from 0.
pub fn round_half_even(y: &Tensor) -> Result<Tensor> {
    let f = y.floor()?;
    let frac = (y - &f)?;
    let up = frac.gt(0.5)?.to_dtype(y.dtype())?;
    let tie = frac.eq(0.5)?.to_dtype(y.dtype())?;
    let odd = (&f - (f.affine(0.5, 0.0)?.floor()?.affine(2.0, 0.0)?))?;
    Ok((f + up + (tie * odd)?)?)
}

/// Round a scale to the nearest f16 value (so export to GGUF's f16 block scales is exact), never 0.
fn f16_exact(s: &Tensor) -> Result<Tensor> {
    let min = 2f64.powi(-24);
    Ok(s.to_dtype(DType::F16)?.to_dtype(s.dtype())?.maximum(min)?)
}

/// The clip ratios α the `mse` rule tries, largest first (a tie keeps the larger α: no clipping
/// without a gain).
pub const MSE_CLIP_RATIOS: [f64; 11] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5];

/// Per group (last axis of `wv`): the f16 scale `α·max|w|/L` of least rounding error over
/// [`MSE_CLIP_RATIOS`], compared after the f16 rounding (the error of the scale that ships).
fn mse_scale(wv: &Tensor, half_levels: f64) -> Result<Tensor> {
    let absmax = wv.abs()?.max_keepdim(D::Minus1)?;
    let error = |s: &Tensor| -> Result<Tensor> {
        let r = round_half_even(&wv.broadcast_div(s)?)?.clamp(-half_levels, half_levels)?;
        Ok((wv - r.broadcast_mul(s)?)?.sqr()?.sum_keepdim(D::Minus1)?)
    };
    let mut best = f16_exact(&(&absmax / half_levels)?)?;
    let mut best_error = error(&best)?;
    for alpha in &MSE_CLIP_RATIOS[1..] {
        let s = f16_exact(&(&absmax * (alpha / half_levels))?)?;
        let e = error(&s)?;
        let better = e.lt(&best_error)?;
        best = better.where_cond(&s, &best)?;
        best_error = better.where_cond(&e, &best_error)?;
    }
    Ok(best)
}

impl TensorGrid {
    /// Build the grid of weight `w` from the config (computing scales from `w` if the rule says so).
    pub fn new(cfg: &GridConfig, w: &Tensor) -> Result<TensorGrid> {
        if let Some(levels) = &cfg.levels {
            return Ok(TensorGrid::Levels(levels.iter().map(|&l| l as f32).collect()));
        }
        let half_levels = cfg.half_levels();
        let dims = w.dims().to_vec();
        let numel = w.elem_count();
        let view = match cfg.scale {
            ScaleKind::Absolute | ScaleKind::Tensor => vec![1, numel],
            ScaleKind::Channel if dims.len() == 2 => dims.clone(),
            ScaleKind::Group if dims.len() == 2 => {
                let (rows, cols) = (dims[0], dims[1]);
                if cols % cfg.group_size != 0 {
                    bail!(
                        "quant.grid.group_size {} does not divide the {cols} columns of a selected tensor",
                        cfg.group_size
                    );
                }
                vec![rows, cols / cfg.group_size, cfg.group_size]
            }
            _ => bail!("per-channel and per-group scales need 2-D weights, got shape {dims:?}"),
        };
        let wv = w.to_dtype(DType::F32)?.reshape(view.as_slice())?;
        let scale = match (cfg.scale, cfg.rule) {
            (ScaleKind::Absolute, _) => {
                let mut shape = view.clone();
                *shape.last_mut().expect("view is never empty") = 1;
                Tensor::full(cfg.step.expect("validated") as f32, shape.as_slice(), w.device())?
            }
            (_, ScaleRule::Absmax) => f16_exact(&(wv.abs()?.max_keepdim(D::Minus1)? / half_levels)?)?,
            (_, ScaleRule::Std) => {
                let mean = wv.mean_keepdim(D::Minus1)?;
                let var = wv.broadcast_sub(&mean)?.sqr()?.mean_keepdim(D::Minus1)?;
                f16_exact(&(var.sqrt()? * (cfg.std_k / half_levels))?)?
            }
            (_, ScaleRule::Mse) => mse_scale(&wv, half_levels)?,
        };
        Ok(TensorGrid::Uniform {
            view,
            scale,
            half_levels,
        })
    }

    /// Nearest grid point of `w` (same shape and dtype as `w`).
    pub fn quantize(&self, w: &Tensor) -> Result<Tensor> {
        match self {
            TensorGrid::Uniform { scale, .. } => {
                let r = self.codes(w)?.expect("uniform grids have codes");
                Ok(r.broadcast_mul(&scale.to_dtype(w.dtype())?)?.reshape(w.shape())?)
            }
            TensorGrid::Levels(levels) => {
                // Walk the midpoints upwards; `>` keeps a tie at the lower level.
                let mut q = Tensor::full(levels[0], w.shape(), w.device())?.to_dtype(w.dtype())?;
                for pair in levels.windows(2) {
                    let mid = ((pair[0] as f64 + pair[1] as f64) / 2.0) as f32;
                    let upper = Tensor::full(pair[1], w.shape(), w.device())?.to_dtype(w.dtype())?;
                    q = w.gt(mid as f64)?.where_cond(&upper, &q)?;
                }
                Ok(q)
            }
        }
    }

    /// The integer level of each weight, `clamp(round_half_even(w/s), ±L)`, in the grid's view shape
    /// (`None` for explicit levels).
    pub fn codes(&self, w: &Tensor) -> Result<Option<Tensor>> {
        let TensorGrid::Uniform {
            view,
            scale,
            half_levels,
        } = self
        else {
            return Ok(None);
        };
        let y = w.reshape(view.as_slice())?.broadcast_div(&scale.to_dtype(w.dtype())?)?;
        Ok(Some(round_half_even(&y)?.clamp(-half_levels, *half_levels)?))
    }

    /// `∂/∂s Σ g·q(w)` at fixed `w`: q = s·r with the code r piecewise constant in s, so the derivative
    /// is `Σ_group g·r`, exact wherever no weight sits on a rounding boundary. Shaped like the scale;
    /// `None` for explicit levels.
    pub fn scale_gradient(&self, w: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // Summed in f32 at least (bf16 master weights), in f64 for f64 references.
        let dtype = if w.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let (Some(r), TensorGrid::Uniform { view, .. }) = (self.codes(&w.detach().to_dtype(dtype)?)?, self) else {
            return Ok(None);
        };
        let g = g.to_dtype(dtype)?.reshape(view.as_slice())?;
        Ok(Some((g * r)?.sum_keepdim(D::Minus1)?))
    }

    /// Replace a uniform grid's scale (learned scales), rounded to f16 as computed scales are, and
    /// detached: a scale computed from a variable must not pull autograd through every use.
    pub fn set_scale(&mut self, new: &Tensor) -> Result<()> {
        if let TensorGrid::Uniform { scale, .. } = self {
            *scale = f16_exact(&new.detach().reshape(scale.shape())?)?;
        }
        Ok(())
    }

    /// The largest representable magnitude per scale group (`L·s`), broadcastable over the view.
    fn clip(&self) -> Result<Option<Tensor>> {
        match self {
            TensorGrid::Uniform { scale, half_levels, .. } => Ok(Some((scale * *half_levels)?)),
            TensorGrid::Levels(_) => Ok(None),
        }
    }

    /// Per-tensor counts in one pass: hits (|w−q| ≤ atol), q at an outermost level (`sat_q`),
    /// |w| beyond the grid's range (`sat_w`), and Σ|w−q|. All stay on the device.
    pub fn counts(&self, w: &Tensor, atol: f64) -> Result<GridCounts> {
        let w = w.to_dtype(DType::F32)?;
        if let TensorGrid::Uniform { scale, half_levels, .. } = self {
            if let Some(c) = crate::fused::grid::uniform_counts(&w, scale, *half_levels, atol)? {
                let at = |i| c.get(i);
                return Ok(GridCounts {
                    hit: at(0)?,
                    sat_q: at(1)?,
                    sat_w: at(2)?,
                    abs_err: at(3)?,
                });
            }
        }
        let q = self.quantize(&w)?;
        let err = (&w - &q)?.abs()?;
        // Counts are summed as u32: f32 sums of ones stop being exact past 2^24 entries.
        let f = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::U32)?.sum_all()?.to_dtype(DType::F64)?) };
        let (sat_q, sat_w) = match self {
            TensorGrid::Uniform { view, .. } => {
                let clip = self.clip()?.expect("uniform grids have a clip");
                let qv = q.reshape(view.as_slice())?.abs()?;
                let wv = w.reshape(view.as_slice())?.abs()?;
                // q sits at ±L·s exactly when its level index is ±L; compare with half a step of margin.
                let edge = (&clip - (&clip / (2.0 * self.half_levels()))?)?;
                (f(qv.broadcast_ge(&edge)?)?, f(wv.broadcast_gt(&clip)?)?)
            }
            TensorGrid::Levels(levels) => {
                let (lo, hi) = (levels[0] as f64, levels[levels.len() - 1] as f64);
                let at_edge = (f(q.eq(lo)?)? + f(q.eq(hi)?)?)?;
                let beyond = (f(w.lt(lo)?)? + f(w.gt(hi)?)?)?;
                (at_edge, beyond)
            }
        };
        Ok(GridCounts {
            hit: f(err.le(atol)?)?,
            sat_q,
            sat_w,
            abs_err: err.to_dtype(DType::F64)?.sum_all()?,
        })
    }

    fn half_levels(&self) -> f64 {
        match self {
            TensorGrid::Uniform { half_levels, .. } => *half_levels,
            TensorGrid::Levels(l) => l.len() as f64,
        }
    }

    /// The scale tensor (uniform grids), for checkpoints, stats and export.
    pub fn scale(&self) -> Option<&Tensor> {
        match self {
            TensorGrid::Uniform { scale, .. } => Some(scale),
            TensorGrid::Levels(_) => None,
        }
    }

    /// The same grid with its scale on `device`.
    pub fn to_device(&self, device: &candle_core::Device) -> Result<TensorGrid> {
        Ok(match self {
            TensorGrid::Uniform {
                view,
                scale,
                half_levels,
            } => TensorGrid::Uniform {
                view: view.clone(),
                scale: scale.to_device(device)?,
                half_levels: *half_levels,
            },
            levels => levels.clone(),
        })
    }

    /// Rebuild a uniform grid from a stored scale (checkpoint resume).
    pub fn with_scale(cfg: &GridConfig, w_dims: &[usize], scale: Tensor) -> Result<TensorGrid> {
        let numel: usize = w_dims.iter().product();
        let view = match cfg.scale {
            ScaleKind::Absolute | ScaleKind::Tensor => vec![1, numel],
            ScaleKind::Channel => w_dims.to_vec(),
            ScaleKind::Group => vec![w_dims[0], w_dims[1] / cfg.group_size, cfg.group_size],
        };
        Ok(TensorGrid::Uniform {
            view,
            scale,
            half_levels: cfg.half_levels(),
        })
    }
}
