//! Learned grid scales (`quant.scale_lr`): the uniform grid's scales trained by AdamW beside the
//! weights. Under Prox-QAT the pull holds each weight on its grid point `s·r`, so the codes r stop
//! changing; moving the scale moves a whole group of grid points at once (the pull carries the weights
//! along), which is what the task gradient can still adapt. The gradient is exact for the forward at
//! q: `∂L/∂s = Σ_group (∂L/∂q)·r` (`TensorGrid::scale_gradient`), from the already-reduced gradients,
//! so every data-parallel rank makes the same update.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;

use super::Quantizer;
use crate::model::Params;
use crate::train::optim::{AdamW, Update};

/// Checkpoint key prefix of the f32 master scales (the grid's own `scale.` keys hold the f16-exact
/// values the forward, hardening and export use).
pub const MASTER_PREFIX: &str = "master_scale.";

pub struct LearnedScales {
    /// f32 master scales keyed by weight name, flattened to 1-D so AdamW never decays them.
    pub masters: BTreeMap<String, Var>,
}

impl LearnedScales {
    /// Start from the grid's scales, or from the masters a checkpoint stored.
    pub fn new(quantizer: &Quantizer, stored: &BTreeMap<String, Tensor>) -> Result<Self> {
        let mut masters = BTreeMap::new();
        for (name, grid) in &quantizer.grids {
            let scale = grid
                .scale()
                .with_context(|| format!("quant.scale_lr learns uniform-grid scales; `{name}` has explicit levels"))?;
            let start = match stored.get(&format!("{MASTER_PREFIX}{name}")) {
                Some(s) => s.to_device(scale.device())?,
                None => scale.clone(),
            };
            masters.insert(
                name.clone(),
                Var::from_tensor(&start.to_dtype(DType::F32)?.flatten_all()?)?,
            );
        }
        Ok(LearnedScales { masters })
    }

    /// The scales' gradients at the codes the step's forward used (call before the weights move).
    pub fn gradients(
        &self,
        quantizer: &Quantizer,
        params: &Params,
        grads: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for name in self.masters.keys() {
            let x = params.get(name)?.as_tensor();
            let g = quantizer.grids[name]
                .scale_gradient(x, &grads[name])?
                .expect("learned scales exist for uniform grids only");
            out.insert(name.clone(), g.flatten_all()?);
        }
        Ok(out)
    }

    /// One AdamW step of every scale (optimizer state `scale.NAME`, no weight decay), then install the
    /// f16-rounded result in the grid.
    pub fn step(
        &mut self,
        opt: &mut AdamW,
        quantizer: &mut Quantizer,
        grads: &BTreeMap<String, Tensor>,
        clip: &Tensor,
        lr: f64,
    ) -> Result<()> {
        for (name, master) in &self.masters {
            opt.update(
                &format!("scale.{name}"),
                master,
                &grads[name],
                clip,
                lr,
                Update::Plain,
                None,
            )?;
            let grid = quantizer.grids.get_mut(name).expect("a master per grid");
            grid.set_scale(master.as_tensor())?;
        }
        Ok(())
    }

    /// The masters as named tensors (`master_scale.NAME`) for checkpoints.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.masters
            .iter()
            .map(|(n, v)| (format!("{MASTER_PREFIX}{n}"), v.as_tensor().clone()))
            .collect()
    }
}
