//! Hardening (spec §8): snap selected weights onto the grid (all, or only within atol), keeping a
//! backup that restores them bit for bit.

use anyhow::Result;
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

use super::{Quantizer, View};
use crate::model::Params;

pub struct Hardened {
    pub backup: BTreeMap<String, Tensor>,
    /// Per tensor: how many entries changed value.
    pub moved: BTreeMap<String, usize>,
}

/// Snap in place. `View::Hard` snaps everything, `View::Selective(atol)` only |w − q| ≤ atol.
pub fn harden(params: &Params, quantizer: &Quantizer, view: View) -> Result<Hardened> {
    let mut backup = BTreeMap::new();
    let mut moved = BTreeMap::new();
    for name in quantizer.grids.keys() {
        let var = params.get(name)?;
        let old = var.as_tensor().detach().copy()?;
        let new = quantizer.view(name, &old, view, false)?;
        moved.insert(
            name.clone(),
            old.ne(&new)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as usize,
        );
        var.set(&new)?;
        backup.insert(name.clone(), old);
    }
    Ok(Hardened { backup, moved })
}

pub fn restore(params: &Params, backup: &BTreeMap<String, Tensor>) -> Result<()> {
    for (name, t) in backup {
        params.get(name)?.set(t)?;
    }
    Ok(())
}
