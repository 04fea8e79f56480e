//! Prox-QAT (../shared/spec/prox-qat-algorithm.md): one module per concept of the method.

pub mod controllers;
pub mod dist_loss;
pub mod grid;
pub mod harden;
pub mod scales;
pub mod selector;
pub mod sensitivity;
pub mod stats;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::model::Params;
pub use controllers::{DualConfig, DualState, GammaConfig, GammaState};
pub use grid::{GridConfig, TensorGrid};
pub use selector::{SelectMode, SelectorConfig};
pub use sensitivity::{SensConfig, SensMap, Sensitivity};

/// What training does to the selected weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Plain fine-tune (the grid is still reported by eval and stats).
    Fp,
    /// Straight-through fake-quant: forward at q(w), gradient applied to w, no pull (seed baseline).
    Ste,
    /// Prox-QAT: λ-weighted task gradient plus a sensitivity-weighted pull toward the grid.
    Prox,
}

/// How the pull toward the grid enters the update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pull {
    /// dist loss term `c·γ·dist(x)` added once per step beside λ·f, preconditioned by Adam (V2).
    Loss,
    /// post-step prox update `x − η(min(c·s, 1/η)(x − q) + λ·AdamDir)` (FX, spec §7.3).
    Prox,
}

/// Where the task gradient is evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GradAt {
    X,
    Q,
    /// At x with the entries within atol snapped (D5).
    Selective,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuantConfig {
    pub method: Method,
    pub pull: Pull,
    pub grad_at: GradAt,
    /// A weight "hits" the grid when |w − q(w)| ≤ atol.
    pub atol: f64,
    /// Pull coefficient c.
    pub dist_scale: f64,
    /// Snap every selected weight onto the grid once, at the start of this step.
    pub harden_at: Option<usize>,
    /// Compute hit/sat stats (and update γ) every N optimizer steps.
    pub stats_every: usize,
    /// Learn the uniform grid's scales with AdamW at this multiple of the weights' learning rate
    /// (absent: scales stay those computed from the starting weights).
    pub scale_lr_mult: Option<f64>,
    pub grid: GridConfig,
    pub select: SelectorConfig,
    pub dual: DualConfig,
    pub gamma: GammaConfig,
    pub sens: SensConfig,
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            method: Method::Prox,
            pull: Pull::Loss,
            grad_at: GradAt::X,
            atol: 1e-3,
            dist_scale: 1.0,
            harden_at: None,
            stats_every: 10,
            scale_lr_mult: None,
            grid: GridConfig::default(),
            select: SelectorConfig::default(),
            dual: DualConfig::default(),
            gamma: GammaConfig::default(),
            sens: SensConfig::default(),
        }
    }
}

impl QuantConfig {
    pub fn validate(&self) -> Result<()> {
        self.grid.validate()?;
        if self.atol.is_nan() || self.atol < 0.0 {
            bail!(
                "quant.atol = {} must be ≥ 0 (it is the hit tolerance |w − q| ≤ atol)",
                self.atol
            );
        }
        if self.dist_scale < 0.0 {
            bail!("quant.dist_scale must be ≥ 0");
        }
        if self.stats_every == 0 || (self.gamma.enable && self.gamma.every == 0) {
            bail!("quant.stats_every and quant.gamma.every must be ≥ 1");
        }
        if let Some(mult) = self.scale_lr_mult {
            if !(mult > 0.0 && mult.is_finite()) {
                bail!("quant.scale_lr_mult = {mult} must be > 0 (or left out to keep the scales fixed)");
            }
            if self.grid.levels.is_some() {
                bail!("quant.scale_lr_mult learns uniform-grid scales: remove it or quant.grid.levels");
            }
            // The scale gradient Σ(∂L/∂q)·r needs the task gradient taken at q(x).
            if !(self.method == Method::Ste || (self.method == Method::Prox && self.grad_at == GradAt::Q)) {
                bail!(
                    "quant.scale_lr_mult needs the forward at q(x): method = \"ste\", or method = \"prox\" \
                     with grad_at = \"q\""
                );
            }
        }
        if !(0.0..1.0).contains(&self.sens.ema) {
            bail!("quant.sens.ema must be in [0, 1)");
        }
        if !(self.sens.floor >= 0.0 && self.sens.floor.is_finite()) {
            bail!(
                "quant.sens.floor must be a finite number ≥ 0 (0: none; 1e-8: the seed's), got {}",
                self.sens.floor
            );
        }
        Ok(())
    }
}

/// Which weights a forward computes with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum View {
    Float,
    /// Every selected weight at q(w).
    Hard,
    /// Selected weights snapped where |w − q| ≤ atol.
    Selective(f64),
}

/// The grids of the selected tensors (scales fixed at construction) and the views built from them.
pub struct Quantizer {
    pub cfg: QuantConfig,
    pub grids: BTreeMap<String, TensorGrid>,
}

impl Quantizer {
    /// Select tensors and compute their scales from the current weights.
    pub fn new(cfg: &QuantConfig, params: &Params) -> Result<Self> {
        let names = cfg.select.select(params.vars.keys())?;
        let mut grids = BTreeMap::new();
        for n in names {
            let grid = TensorGrid::new(&cfg.grid, &params.get(&n)?.as_tensor().detach())
                .with_context(|| format!("grid of `{n}`"))?;
            grids.insert(n, grid);
        }
        Ok(Quantizer {
            cfg: cfg.clone(),
            grids,
        })
    }

    /// Rebuild from stored scales (`scale.{name}` tensors), so a resumed run keeps its grid.
    pub fn from_scales(cfg: &QuantConfig, params: &Params, scales: &BTreeMap<String, Tensor>) -> Result<Self> {
        if cfg.grid.levels.is_some() || scales.is_empty() {
            return Self::new(cfg, params);
        }
        let names = cfg.select.select(params.vars.keys())?;
        let mut grids = BTreeMap::new();
        for n in names {
            let scale = scales
                .get(&format!("scale.{n}"))
                .with_context(|| format!("the checkpoint's quant state lacks the scale of `{n}`"))?;
            let dev = params.get(&n)?.device().clone();
            grids.insert(
                n.clone(),
                TensorGrid::with_scale(&cfg.grid, params.get(&n)?.dims(), scale.to_device(&dev)?)?,
            );
        }
        Ok(Quantizer {
            cfg: cfg.clone(),
            grids,
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.grids.keys().cloned().collect()
    }

    /// The weight a forward uses for parameter `name` under `view` (unselected names pass through).
    /// The value is exactly the target; with `straight_through` the gradient still reaches x:
    /// `target.detach() + (x − x.detach())` adds an exact zero that carries d/dx = 1.
    pub fn view(&self, name: &str, x: &Tensor, view: View, straight_through: bool) -> Result<Tensor> {
        let Some(grid) = self.grids.get(name) else {
            return Ok(x.clone());
        };
        let target = match view {
            View::Float => return Ok(x.clone()),
            View::Hard => grid.quantize(x)?,
            View::Selective(atol) => {
                let q = grid.quantize(x)?;
                (x - &q)?.abs()?.le(atol)?.where_cond(&q, x)?
            }
        };
        if straight_through {
            Ok((target.detach() + (x - x.detach())?)?)
        } else {
            Ok(target)
        }
    }

    /// Scales as named tensors (`scale.{name}`) for checkpoints.
    pub fn scale_tensors(&self) -> BTreeMap<String, Tensor> {
        self.grids
            .iter()
            .filter_map(|(n, g)| g.scale().map(|s| (format!("scale.{n}"), s.clone())))
            .collect()
    }
}
