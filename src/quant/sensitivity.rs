//! Per-tensor sensitivity (spec §5): an EMA of mean(g²) of the clipped task gradient, and its map to
//! pull weights (more sensitive ⇒ weaker pull). Values stay on the device as 0-d tensors.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SensMap {
    /// `s_i = clamp((S_i / mean S)^(−power), w_min, w_max)` (newest seed code, spec §5(b), without its
    /// absolute floor on S unless `floor` asks for it).
    InvSqrt,
    /// `w_i = 1 + 4·sigmoid((μ − ln S_i)/σ)`, `rel_i = w_i / mean w` (spec §4 / §5(a)).
    SigmoidLog,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SensConfig {
    pub enable: bool,
    pub ema: f64,
    pub map: SensMap,
    pub power: f64,
    pub w_min: f64,
    pub w_max: f64,
    /// `inv_sqrt`: floor on each S_i and on their mean before the ratio; 0 = none. The seed floors both
    /// at 1e-8 (spec §5(b)), above most of a fine-tune's clipped mean g² (~1e-10 … 3e-7 on
    /// SmolLM2): the mean becomes 1e-8 and most weights sit at `w_max`. Every Prox-QAT run in
    /// RESULTS.md through §22 ran with 1e-8.
    pub floor: f64,
}

impl Default for SensConfig {
    fn default() -> Self {
        SensConfig {
            enable: true,
            ema: 0.95,
            map: SensMap::InvSqrt,
            power: 0.5,
            w_min: 0.2,
            w_max: 5.0,
            floor: 0.0,
        }
    }
}

/// The EMA state: one f32 scalar per selected tensor, keyed by parameter name.
#[derive(Clone, Debug, Default)]
pub struct Sensitivity {
    pub values: BTreeMap<String, Tensor>,
}

impl Sensitivity {
    /// `S ← m·S + (1−m)·mean((clip·g)²)` (first time: `S = mean((clip·g)²)`), for every tensor in
    /// `grads`; `clip` is the step's 0-d clipping factor (no clipped copy of the gradients is made).
    pub fn update(&mut self, ema: f64, grads: &BTreeMap<String, Tensor>, clip: &Tensor) -> Result<()> {
        let sums = crate::fused::adamw::sums_of_squares(&grads.values().collect::<Vec<_>>())?;
        let squares = grads
            .iter()
            .enumerate()
            .map(|(i, (name, g))| Ok((name.clone(), (sums.get(i)?, g.elem_count()))))
            .collect::<Result<_>>()?;
        self.update_from_squares(ema, &squares, clip)
    }

    /// As `update`, from each gradient's Σg² (0-d) and element count, already computed (the step has
    /// them from the global norm).
    pub fn update_from_squares(
        &mut self,
        ema: f64,
        squares: &BTreeMap<String, (Tensor, usize)>,
        clip: &Tensor,
    ) -> Result<()> {
        let clip2 = clip.to_dtype(DType::F32)?.sqr()?;
        for (name, (sum, n)) in squares {
            let g2 = (sum / *n as f64)?.mul(&clip2)?;
            let next = match self.values.get(name) {
                None => g2,
                Some(prev) => ((prev * ema)? + (g2 * (1.0 - ema))?)?,
            };
            self.values.insert(name.clone(), next);
        }
        Ok(())
    }

    /// (mean, max) of all S_i as 0-d tensors.
    pub fn mean_max(&self) -> Result<Option<(Tensor, Tensor)>> {
        if self.values.is_empty() {
            return Ok(None);
        }
        let all = Tensor::stack(&self.values.values().collect::<Vec<_>>(), 0)?;
        Ok(Some((all.mean_all()?, all.max_keepdim(0)?.squeeze(0)?)))
    }

    /// Pull weights for `names` (0-d tensors). Tensors without an S get the map's neutral value.
    pub fn weights(&self, cfg: &SensConfig, names: &[String]) -> Result<BTreeMap<String, Tensor>> {
        let known: Vec<&String> = names.iter().filter(|n| self.values.contains_key(*n)).collect();
        let device = match self.values.values().next() {
            Some(t) => t.device().clone(),
            None => candle_core::Device::Cpu,
        };
        let one = Tensor::new(1f32, &device)?;
        let mut out: BTreeMap<String, Tensor> = names.iter().map(|n| (n.clone(), one.clone())).collect();
        if !cfg.enable || known.is_empty() {
            return Ok(out);
        }
        let s = Tensor::stack(&known.iter().map(|n| &self.values[*n]).collect::<Vec<_>>(), 0)?;
        let w = match cfg.map {
            SensMap::InvSqrt => {
                // Only a zero mean (no gradient yet) needs a floor when `floor` is 0.
                let mean = s.maximum(cfg.floor)?.mean_all()?.maximum(cfg.floor.max(1e-30))?;
                s.broadcast_div(&mean)?
                    .maximum(1e-8)?
                    .powf(-cfg.power)?
                    .clamp(cfg.w_min, cfg.w_max)?
            }
            SensMap::SigmoidLog => {
                if known.len() < 2 {
                    // std of one value is undefined (NaN in the seed, spec §12.10): neutral weight.
                    s.ones_like()?
                } else {
                    let z = (s + 1e-12)?.log()?;
                    let mu = z.mean_all()?;
                    let n = known.len() as f64;
                    let var = (z.broadcast_sub(&mu)?.sqr()?.sum_all()? / (n - 1.0))?;
                    let sigma = (var.sqrt()? + 1e-6)?;
                    let arg = z.broadcast_sub(&mu)?.neg()?.broadcast_div(&sigma)?;
                    let w = ((candle_core::Tensor::ones_like(&arg)? + arg.neg()?.exp()?)?.recip()? * 4.0)? + 1.0;
                    let w = w?;
                    let mean_w = (w.mean_all()? + 1e-12)?;
                    w.broadcast_div(&mean_w)?
                }
            }
        };
        for (i, n) in known.iter().enumerate() {
            out.insert((*n).clone(), w.get(i).with_context(|| format!("weight of {n}"))?);
        }
        Ok(out)
    }
}
