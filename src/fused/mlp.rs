//! The SwiGLU MLP `down(silu(gate(m)) · up(m))` as one autograd node with a written-out backward.
//!
//! As three fused linears and a fused SwiGLU it is four nodes, and candle's backward zero-fills and adds
//! a gradient buffer for every input of every node (the `(rows, intermediate)` ones are the large
//! ones). Here the node keeps `gate`, `up` and `silu(gate)·up` (the down projection's weight gradient
//! reads it), the backward adds the three weight gradients into their step accumulators
//! (`acc += gradᵀ · input`, as `fused::linear`) and returns `∂L/∂m` — the same arithmetic, kernel by
//! kernel, as the four-node version.

use candle_core::{Result, Tensor, D};

use super::linear::{add_product_into, input_gradient, project, sum_of_products};
use super::swiglu::{swiglu, swiglu_backward};
use super::{node1, Backward1};
use crate::dist::overlap;

/// `m: (.., hidden)` through the MLP with compute-dtype weights `[gate, up, down]` (`(inter, hidden)`,
/// `(inter, hidden)`, `(hidden, inter)`); the backward adds each weight's gradient into the matching
/// f32/f64 accumulator of `acc`.
pub fn mlp(m: &Tensor, w: [&Tensor; 3], acc: [&Tensor; 3]) -> Result<Tensor> {
    let [w_gate, w_up, w_down] = w.map(Tensor::detach);
    let hidden = m.dim(D::Minus1)?;
    let rows = m.elem_count() / hidden;
    let x = m.detach().contiguous()?.reshape((rows, hidden))?;
    let (out, kept) = mlp_forward(&x, [&w_gate, &w_up, &w_down])?;
    if !m.track_op() {
        return out.reshape(m.shape());
    }
    let node = Mlp {
        kept,
        w: [w_gate, w_up, w_down],
        acc: acc.map(Tensor::clone),
    };
    node1(out, &m.contiguous()?.reshape((rows, hidden))?, node)?.reshape(m.shape())
}

/// What the MLP's backward reads of its forward: `gate`, `up` and their SwiGLU product `act`.
pub(super) struct MlpKept {
    pub gate: Tensor,
    pub up: Tensor,
    pub act: Tensor,
}

/// The MLP's output on detached rows `x: (rows, hidden)` and what its backward reads (no autograd node).
pub(super) fn mlp_forward(x: &Tensor, [w_gate, w_up, w_down]: [&Tensor; 3]) -> Result<(Tensor, MlpKept)> {
    let gate = project(x, w_gate)?;
    let up = project(x, w_up)?;
    let act = swiglu(&gate, &up)?;
    Ok((project(&act, w_down)?, MlpKept { gate, up, act }))
}

struct Mlp {
    kept: MlpKept,
    w: [Tensor; 3],
    acc: [Tensor; 3],
}

impl Backward1 for Mlp {
    fn name(&self) -> &'static str {
        "fused mlp"
    }

    fn bwd(&self, m: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let w = self.w.each_ref();
        let acc = self.acc.each_ref();
        Ok(Some(mlp_backward(m, &self.kept, w, acc, grad)?))
    }
}

/// `∂L/∂m` of the MLP on rows `m: (rows, hidden)` with what its forward kept, from the output's
/// gradient; the three weight gradients are added into `acc` (no autograd).
pub(super) fn mlp_backward(
    m: &Tensor,
    kept: &MlpKept,
    [w_gate, w_up, w_down]: [&Tensor; 3],
    [acc_gate, acc_up, acc_down]: [&Tensor; 3],
    grad: &Tensor,
) -> Result<Tensor> {
    let (m, grad) = (m.detach(), grad.detach().contiguous()?);
    let (d_gate, d_up) = swiglu_backward(&kept.gate, &kept.up, &input_gradient(&grad, w_down)?)?;
    add_product_into(acc_down, &grad, &kept.act)?;
    overlap::accumulated(acc_down)?;
    add_product_into(acc_gate, &d_gate, &m)?;
    overlap::accumulated(acc_gate)?;
    add_product_into(acc_up, &d_up, &m)?;
    overlap::accumulated(acc_up)?;
    sum_of_products(&[(&d_gate, w_gate), (&d_up, w_up)])
}
