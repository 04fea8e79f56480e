//! Activation checkpointing per decoder block (`train.checkpoint_layers`): the forward keeps only each
//! block's input; the backward runs the block again, with a graph, and differentiates through that.
//!
//! The block's first forward runs on detached inputs and weights, so candle records no node and frees
//! every intermediate as soon as it is used. The block then enters the model's graph as one node whose
//! arguments are the block input and the two RMSNorm gains (the tensors whose gradients autograd
//! carries; the projections' gradients go into their step accumulators from inside the recomputation,
//! as they do without checkpointing). Memory per block drops from all its activations to its input,
//! for one more forward of each block in the backward: PyTorch's `torch.utils.checkpoint`.

use candle_core::{Result, Tensor, Var};

use crate::fused::{node3, Backward3};

/// `block(x, gains, track)` without its activations kept. `block` must compute the same values at
/// every call (no dropout here); with `track = false` it must record no graph (detach its weights).
pub fn checkpointed(
    x: &Tensor,
    gains: [&Tensor; 2],
    block: impl Fn(&Tensor, [&Tensor; 2], bool) -> anyhow::Result<Tensor> + Send + Sync + 'static,
) -> anyhow::Result<Tensor> {
    let out = block(&x.detach(), gains.map(Tensor::detach).each_ref(), false)?;
    anyhow::ensure!(!out.track_op(), "a checkpointed block recorded a graph in its forward");
    let node = Checkpoint { block: Box::new(block) };
    Ok(node3(out, [x, gains[0], gains[1]], node)?)
}

type BlockFn = dyn Fn(&Tensor, [&Tensor; 2], bool) -> anyhow::Result<Tensor> + Send + Sync;

struct Checkpoint {
    block: Box<BlockFn>,
}

impl Backward3 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpointed block"
    }

    fn bwd(&self, [x, gain_in, gain_post]: [&Tensor; 3], grad: &Tensor) -> Result<[Option<Tensor>; 3]> {
        // Fresh leaves, so the recomputation's backward stops here and reports their gradients.
        let [x, gain_in, gain_post] = [x, gain_in, gain_post].map(|t| Var::from_tensor(&t.detach()));
        let (x, gain_in, gain_post) = (x?, gain_in?, gain_post?);
        let out = (self.block)(x.as_tensor(), [gain_in.as_tensor(), gain_post.as_tensor()], true)
            .map_err(|e| candle_core::Error::Msg(format!("recomputing a checkpointed block: {e:#}")))?;
        // Seeding the backward with `grad`: d(Σ out·grad)/d(out) = grad, exactly.
        let root = (out * grad.detach())?.sum_all()?;
        let grads = root.backward()?;
        // Only the three arguments' gradients can leave this node: a weight whose gradient reaches a
        // variable of its own (rather than its step accumulator) would be dropped here, silently.
        let ours = [&x, &gain_in, &gain_post].map(|v| v.as_tensor().id());
        if root
            .sorted_nodes()
            .iter()
            .any(|n| n.is_variable() && !ours.contains(&n.id()) && grads.get(n).is_some())
        {
            candle_core::bail!(
                "checkpointed block: a weight's gradient goes to its variable through autograd; \
                 activation checkpointing needs every projection to accumulate its gradient in place \
                 (the training step's compute copies)"
            );
        }
        let of = |v: &Var| grads.get(v.as_tensor()).cloned();
        Ok([of(&x), of(&gain_in), of(&gain_post)])
    }
}
