//! Grid statistics (spec §9): hit rate, saturation and mean |w − q| per selected tensor, reduced on the
//! device and read back with one host transfer per call; and, between two checkpoints of one model, the
//! share of each tensor's codes that changed.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;

use super::{Quantizer, TensorGrid};
use crate::model::Params;

#[derive(Clone, Debug, Serialize)]
pub struct TensorStats {
    pub name: String,
    pub shape: Vec<usize>,
    pub numel: usize,
    pub hit_rate: f64,
    /// q(w) at an outermost level.
    pub sat_rate: f64,
    /// |w| beyond the grid's range.
    pub sat_w_rate: f64,
    pub mean_abs_err: f64,
    /// Mean scale of the tensor's grid (uniform grids).
    pub scale: Option<f64>,
    /// Share of weights whose code differs in the checkpoint compared against (`stats --against`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_change_rate: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TotalStats {
    pub hit_rate: f64,
    pub sat_rate: f64,
    pub sat_w_rate: f64,
    pub numel: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_change_rate: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub tensors: Vec<TensorStats>,
    pub total: TotalStats,
}

/// Σ of a large tensor as row sums, then one small sum: candle reduces each output element in one
/// block, so a plain `sum_all` over a tensor's 0.5 M scales ran on one SM (ncu: ~0.3 ms per tensor,
/// most of Prox-QAT's per-step overhead with statistics every step).
fn sum_in_rows(t: &Tensor) -> Result<Tensor> {
    let n = t.elem_count();
    let row = (0..=11)
        .rev()
        .map(|p| 1usize << p)
        .find(|k| n.is_multiple_of(*k))
        .unwrap_or(1);
    Ok(t.reshape((n / row, row))?.sum(1)?.sum_all()?)
}

pub fn compute(params: &Params, quantizer: &Quantizer, atol: f64) -> Result<Stats> {
    let mut rows = Vec::new();
    for (name, grid) in &quantizer.grids {
        let c = grid.counts(&params.get(name)?.as_tensor().detach(), atol)?;
        let scale = match grid.scale() {
            Some(s) => (sum_in_rows(&s.to_dtype(candle_core::DType::F64)?)? / s.elem_count() as f64)?,
            None => Tensor::new(f64::NAN, c.hit.device())?,
        };
        rows.push(Tensor::stack(&[c.hit, c.sat_q, c.sat_w, c.abs_err, scale], 0)?);
    }
    // One device → host transfer for all tensors.
    let values = Tensor::stack(&rows, 0)?.to_vec2::<f64>()?;
    let mut tensors = Vec::new();
    let (mut hit, mut sat, mut sat_w, mut numel) = (0.0, 0.0, 0.0, 0usize);
    for ((name, _), v) in quantizer.grids.iter().zip(values) {
        let t = params.get(name)?;
        let n = t.elem_count();
        hit += v[0];
        sat += v[1];
        sat_w += v[2];
        numel += n;
        tensors.push(TensorStats {
            name: name.clone(),
            shape: t.dims().to_vec(),
            numel: n,
            hit_rate: v[0] / n as f64,
            sat_rate: v[1] / n as f64,
            sat_w_rate: v[2] / n as f64,
            mean_abs_err: v[3] / n as f64,
            scale: v[4].is_finite().then_some(v[4]),
            code_change_rate: None,
        });
    }
    let total = TotalStats {
        hit_rate: hit / numel as f64,
        sat_rate: sat / numel as f64,
        sat_w_rate: sat_w / numel as f64,
        numel,
        code_change_rate: None,
    };
    Ok(Stats { tensors, total })
}

/// How many weights have another grid level in (`w_other`, `grid_other`) than in (`w`, `grid`): the
/// weights that crossed a rounding boundary, or were relabelled by a scale change, between two
/// checkpoints. Uniform grids compare integer codes (so a learned scale that moves while the code
/// stays counts as no change); explicit levels compare the level itself. Both weights on one device;
/// an f64 scalar there.
fn changed_codes(grid: &TensorGrid, w: &Tensor, grid_other: &TensorGrid, w_other: &Tensor) -> Result<Tensor> {
    let level = |g: &TensorGrid, w: &Tensor| -> Result<Tensor> {
        let w = w.to_dtype(DType::F32)?;
        Ok(match g.codes(&w)? {
            Some(codes) => codes,
            None => g.quantize(&w)?,
        })
    };
    let (a, b) = (level(grid, w)?, level(grid_other, w_other)?);
    if a.dims() != b.dims() {
        bail!("the two grids differ (levels {:?} against {:?})", a.dims(), b.dims());
    }
    // Summed as u32: f32 sums of ones stop being exact past 2^24 entries.
    Ok(a.ne(&b)?.to_dtype(DType::U32)?.sum_all()?.to_dtype(DType::F64)?)
}

/// Fill in `code_change_rate` of every row and of the total: `stats` of (`params`, `quantizer`)
/// against another checkpoint of the same model, each with its own grid scales. One host transfer.
pub fn add_code_changes(
    stats: &mut Stats,
    params: &Params,
    quantizer: &Quantizer,
    other: &Params,
    other_quantizer: &Quantizer,
) -> Result<()> {
    let counts = stats
        .tensors
        .iter()
        .map(|t| {
            let grid_other = other_quantizer.grids.get(&t.name).with_context(|| {
                format!(
                    "{} is selected for quantization here but not in the checkpoint compared against",
                    t.name
                )
            })?;
            changed_codes(
                &quantizer.grids[&t.name],
                &params.get(&t.name)?.as_tensor().detach(),
                grid_other,
                &other.get(&t.name)?.as_tensor().detach(),
            )
            .with_context(|| format!("comparing the codes of {}", t.name))
        })
        .collect::<Result<Vec<_>>>()?;
    let counts = Tensor::stack(&counts, 0)?.to_vec1::<f64>()?;
    for (t, changed) in stats.tensors.iter_mut().zip(&counts) {
        t.code_change_rate = Some(changed / t.numel as f64);
    }
    stats.total.code_change_rate = Some(counts.iter().sum::<f64>() / stats.total.numel as f64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::grid::ScaleKind;
    use crate::quant::GridConfig;
    use candle_core::Device;

    /// 3 bits (codes −3..3) at the fixed step `scale`, for six weights.
    fn grid(scale: f64) -> TensorGrid {
        let cfg = GridConfig {
            bits: 3,
            scale: ScaleKind::Absolute,
            step: Some(scale),
            ..GridConfig::default()
        };
        TensorGrid::new(&cfg, &Tensor::zeros((1, 6), DType::F32, &Device::Cpu).unwrap()).unwrap()
    }

    fn changed(g: &TensorGrid, w: &[f32], g_other: &TensorGrid, w_other: &[f32]) -> f64 {
        let t = |v: &[f32]| Tensor::from_slice(v, (1, v.len()), &Device::Cpu).unwrap();
        changed_codes(g, &t(w), g_other, &t(w_other))
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn counts_the_weights_that_crossed_a_rounding_boundary() {
        // Codes by hand: [0, 1, −1, 2, 3, −3] against [1, 1, −2, 3, 3, −3] (9.0 and −7.0 clamp to ±3 as
        // 5.0 and −4.0 do): three changes, the clamped pair none.
        let w = [0.4, 0.6, -1.2, 2.4, 5.0, -4.0];
        let w_other = [0.6, 0.6, -1.6, 2.6, 9.0, -7.0];
        assert_eq!(changed(&grid(1.0), &w, &grid(1.0), &w_other), 3.0);
        assert_eq!(changed(&grid(1.0), &w, &grid(1.0), &w), 0.0);
    }

    #[test]
    fn a_scale_change_relabels_codes_and_an_equal_rescale_does_not() {
        // Same weights, scale 1 → 2: codes [0, 1, −1, 2, 3, −3] become [0, 0, −1, 1, 2, −2] (round half
        // to even: 0.3 → 0, −0.6 → −1, 1.2 → 1, 2.5 → 2, −2.0 → −2): four changes.
        let w = [0.4, 0.6, -1.2, 2.4, 5.0, -4.0];
        assert_eq!(changed(&grid(1.0), &w, &grid(2.0), &w), 4.0);
        // Weights and scale both doubled: every code the same.
        let doubled: Vec<f32> = w.iter().map(|x| 2.0 * x).collect();
        assert_eq!(changed(&grid(1.0), &w, &grid(2.0), &doubled), 0.0);
    }
}
