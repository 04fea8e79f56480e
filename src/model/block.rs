//! One decoder block (`x + attention(norm(x))`, then `+ mlp(norm(·))`) and the weights it reads.
//!
//! Split from the model's forward so that activation checkpointing (`model::checkpoint`) can run the
//! same block twice: once without an autograd graph, once more inside the backward.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

use super::config::LlamaConfig;
use super::ops;
use crate::fused;

/// The weight `name` of `w`, or an error naming it.
pub(super) fn get<'a>(w: &'a BTreeMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    w.get(name).with_context(|| format!("missing weight `{name}`"))
}

/// What a block needs besides its weights: the shapes, the kernels, and this sequence length's RoPE
/// tables and causal mask.
#[derive(Clone)]
pub(super) struct Block {
    pub cfg: LlamaConfig,
    /// The compute dtype (the fused norm writes the matmul input in it).
    pub dtype: DType,
    pub fused: bool,
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
}

/// The weights of layer `prefix` (each as the forward computes with it) and the accumulators the
/// backward adds the projections' gradients into (`Llama::hidden_into`'s `grads_into`).
#[derive(Clone)]
pub(super) struct LayerWeights {
    prefix: String,
    weights: BTreeMap<String, Tensor>,
    accumulators: BTreeMap<String, Tensor>,
}

const GAINS: [&str; 2] = ["input_layernorm", "post_attention_layernorm"];
/// The projections q, k and v, which the fused block stack runs as one ([`QKV`]).
pub(super) const QKV_PARTS: [&str; 3] = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"];
/// q, k and v as one projection: the rows of the three, in that order (`model::llama::qkv_name`).
pub(super) const QKV: &str = "self_attn.qkv_proj";
/// The other projections, in the order `fused::block::LayerTensors` holds them after [`QKV`].
const PROJECTIONS: [&str; 4] = ["self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];

impl LayerWeights {
    pub fn of(layer: usize, w: &BTreeMap<String, Tensor>, grads_into: &BTreeMap<String, Tensor>) -> Result<Self> {
        let prefix = format!("model.layers.{layer}.");
        let mine = |m: &BTreeMap<String, Tensor>| -> BTreeMap<String, Tensor> {
            m.range(prefix.clone()..)
                .take_while(|(name, _)| name.starts_with(&prefix))
                .map(|(name, t)| (name.clone(), t.clone()))
                .collect()
        };
        Ok(LayerWeights {
            weights: mine(w),
            accumulators: mine(grads_into),
            prefix,
        })
    }

    fn name(&self, local: &str) -> String {
        format!("{}{local}.weight", self.prefix)
    }

    fn get(&self, local: &str) -> Result<&Tensor> {
        get(&self.weights, &self.name(local))
    }

    fn accumulator(&self, local: &str) -> Option<&Tensor> {
        self.accumulators.get(&self.name(local))
    }

    /// The layer as [`fused::block::decoder_stack`] takes it, when every projection (q/k/v also as
    /// one) and both gains have an accumulator (the training step's weights on the fused kernels).
    /// q/k/v's compute copy is the step's (made once per step) or, where the caller has none, the
    /// three side by side.
    pub fn stack_tensors(&self) -> Result<Option<fused::block::LayerTensors>> {
        let all = |names: &[&str]| {
            names
                .iter()
                .map(|n| self.accumulator(n).cloned())
                .collect::<Option<Vec<_>>>()
        };
        let (Some(acc), Some(parts), Some(gain_acc)) =
            (all(&[&[QKV][..], &PROJECTIONS].concat()), all(&QKV_PARTS), all(&GAINS))
        else {
            return Ok(None);
        };
        let w_qkv = match self.weights.get(&self.name(QKV)) {
            Some(w) => w.clone(),
            None => {
                let parts = QKV_PARTS.iter().map(|n| self.get(n)).collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?
            }
        };
        let mut w = vec![w_qkv];
        for n in PROJECTIONS {
            w.push(self.get(n)?.clone());
        }
        Ok(Some(fused::block::LayerTensors {
            gains: self.gains()?,
            gain_acc: array(gain_acc)?,
            w: array(w)?,
            acc: array(acc)?,
            qkv_parts: array(parts)?,
        }))
    }

    /// The two RMSNorm gains, in the order `with_gains` takes them.
    pub fn gains(&self) -> Result<[Tensor; 2]> {
        Ok([self.get(GAINS[0])?.clone(), self.get(GAINS[1])?.clone()])
    }

    /// These weights with the gains replaced; every other weight detached unless `track` (a forward
    /// that must record no graph).
    pub fn with_gains(&self, gains: [&Tensor; 2], track: bool) -> Self {
        let mut weights: BTreeMap<String, Tensor> = self
            .weights
            .iter()
            .map(|(name, t)| (name.clone(), if track { t.clone() } else { t.detach() }))
            .collect();
        for (local, gain) in GAINS.iter().zip(gains) {
            weights.insert(self.name(local), gain.clone());
        }
        LayerWeights {
            weights,
            ..self.clone()
        }
    }
}

/// A layer's tensors of one kind (its seven projections, its two gains) as an array.
fn array<T, const N: usize>(v: Vec<T>) -> Result<[T; N]> {
    v.try_into()
        .map_err(|v: Vec<T>| anyhow::anyhow!("a decoder block has {N} of these, got {}", v.len()))
}

impl Block {
    /// The fused block's shapes and constants.
    pub fn spec(&self) -> fused::block::BlockSpec {
        let cfg = &self.cfg;
        fused::block::BlockSpec {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps,
            compute: self.dtype,
            cos: self.cos.clone(),
            sin: self.sin.clone(),
        }
    }

    /// `x · wᵀ` in the weight's dtype; fused with in-place weight-gradient accumulation when `w` has
    /// an accumulator.
    fn linear(&self, x: &Tensor, layer: &LayerWeights, local: &str) -> Result<Tensor> {
        let w = layer.get(local)?;
        let x = x.to_dtype(w.dtype())?;
        Ok(match layer.accumulator(local) {
            Some(acc) if self.fused => fused::linear::linear(&x, w, acc)?,
            _ => x.broadcast_matmul(&w.t()?)?,
        })
    }

    /// Fused: the norm writes the matmul input dtype directly. Reference: f32 out, cast by `linear`.
    pub fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        Ok(if self.fused {
            fused::rms_norm::rms_norm(x, w, eps, self.dtype)?
        } else {
            ops::rms_norm(x, w, eps)?
        })
    }

    /// The block's output for input `x: (B, T, d)` (the residual stream's dtype throughout).
    pub fn forward(&self, x: &Tensor, layer: &LayerWeights) -> Result<Tensor> {
        // The composition of the fused (or reference) ops, through autograd; the training step's fused
        // blocks run as one node instead (`fused::block::decoder_stack`, from `Llama::hidden_into`).
        let [q, k, v] = self.queries_keys_values(x, layer)?;
        let att = if self.fused {
            fused::softmax::causal_attention(&q, &k, &v)?
        } else {
            ops::attention(&q, &k, &v, &self.mask)?
        };
        self.mlp_residual(&self.attention_residual(x, &att, layer)?, layer)
    }

    /// The block's output for `x: (B, t, d)`, the t positions after the `L` whose keys and values
    /// `cache` holds (`(B, KV, L, D)` each; none before the first call), which then holds theirs too.
    /// `self.cos`/`self.sin` are the t new positions' RoPE tables and `self.mask` is additive,
    /// broadcastable to `(B, 1, 1, t, L + t)` (`model::sample`). Inference only: no accumulators.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        layer: &LayerWeights,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let [q, k, v] = self.queries_keys_values(x, layer)?;
        let (k, v) = match cache.take() {
            Some((k0, v0)) => (Tensor::cat(&[&k0, &k], 2)?, Tensor::cat(&[&v0, &v], 2)?),
            None => (k, v),
        };
        let att = ops::attention(&q, &k, &v, &self.mask)?;
        *cache = Some((k, v));
        self.mlp_residual(&self.attention_residual(x, &att, layer)?, layer)
    }

    /// The heads of `norm(x)`'s q (RoPE applied), k (RoPE applied) and v, `(B, heads, T, D)` each.
    fn queries_keys_values(&self, x: &Tensor, layer: &LayerWeights) -> Result<[Tensor; 3]> {
        let cfg = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (h, kv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let a = self.norm(x, layer.get(GAINS[0])?)?;
        let proj = |name: &str| self.linear(&a, layer, &format!("self_attn.{name}"));
        let split_heads =
            |y: Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?) };
        let v = split_heads(proj("v_proj")?, kv)?;
        Ok(if self.fused {
            let q = fused::rope::rope(&proj("q_proj")?, &self.cos, &self.sin, h)?;
            let k = fused::rope::rope(&proj("k_proj")?, &self.cos, &self.sin, kv)?;
            [q, k, v]
        } else {
            let q = ops::rope(&split_heads(proj("q_proj")?, h)?, &self.cos, &self.sin)?;
            let k = ops::rope(&split_heads(proj("k_proj")?, kv)?, &self.cos, &self.sin)?;
            [q, k, v]
        })
    }

    /// `x + o_proj(att)` for the heads' outputs `att: (B, H, T, D)`.
    fn attention_residual(&self, x: &Tensor, att: &Tensor, layer: &LayerWeights) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let att = att
            .transpose(1, 2)?
            .reshape((b, t, self.cfg.num_attention_heads * self.cfg.head_dim))?;
        Ok((x + self.linear(&att, layer, "self_attn.o_proj")?.to_dtype(x.dtype())?)?)
    }

    /// `x + mlp(norm(x))`.
    fn mlp_residual(&self, x: &Tensor, layer: &LayerWeights) -> Result<Tensor> {
        let m = self.norm(x, layer.get(GAINS[1])?)?;
        let locals = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
        let out = match locals.map(|n| layer.accumulator(n)) {
            // One node with its own backward when every projection accumulates in place.
            [Some(g), Some(u), Some(d)] if self.fused => {
                let w = [layer.get(locals[0])?, layer.get(locals[1])?, layer.get(locals[2])?];
                fused::mlp::mlp(&m.to_dtype(w[0].dtype())?, w, [g, u, d])?
            }
            _ => {
                let (gate, up) = (self.linear(&m, layer, locals[0])?, self.linear(&m, layer, locals[1])?);
                let act = if self.fused {
                    fused::swiglu::swiglu(&gate, &up)?
                } else {
                    ops::swiglu(&gate, &up)?
                };
                self.linear(&act, layer, locals[2])?
            }
        };
        Ok((x + out.to_dtype(x.dtype())?)?)
    }
}
