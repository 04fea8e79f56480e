//! Grid statistics (spec §9): hit rate, saturation and mean |w − q| per selected tensor, reduced on the
//! device and read back with one host transfer per call.

use anyhow::Result;
use candle_core::Tensor;
use serde::Serialize;

use super::Quantizer;
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
}

#[derive(Clone, Debug, Serialize)]
pub struct TotalStats {
    pub hit_rate: f64,
    pub sat_rate: f64,
    pub sat_w_rate: f64,
    pub numel: usize,
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
        });
    }
    let total = TotalStats {
        hit_rate: hit / numel as f64,
        sat_rate: sat / numel as f64,
        sat_w_rate: sat_w / numel as f64,
        numel,
    };
    Ok(Stats { tensors, total })
}
