//! The trainable Llama: master parameters as named `Var`s and a forward over a map of effective weights.
//!
//! The forward does not read the `Var`s directly: the caller hands it the weights to compute with
//! (`Params::compute_weights`), which is where the compute dtype cast and the quantized views of
//! Prox-QAT (forward at q(x), selective, STE) come in without copying the model.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use std::collections::BTreeMap;

use super::block::{get, Block, LayerWeights, QKV, QKV_PARTS};
use super::checkpoint;
use super::config::LlamaConfig;
use super::ops;
use crate::data::IGNORE;
use crate::fused::{self, accumulate, Kernels};

/// The master parameters, keyed by HF name. f32 everywhere except f64 in gradient tests.
pub struct Params {
    pub vars: BTreeMap<String, Var>,
}

/// How [`Params::gradient_accumulators`] starts the accumulators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccumulatorStart {
    /// Zero-filled.
    Zeros,
    /// Unwritten, the first write into each overwriting or zero-filling it (`fused::accumulate`;
    /// `accumulate::finish` once the backward passes are done): the training step's.
    Unwritten,
}

impl Params {
    /// Wrap loaded tensors, checking names and shapes against the config (errors name the tensor).
    pub fn from_tensors(cfg: &LlamaConfig, mut tensors: BTreeMap<String, Tensor>, dtype: DType) -> Result<Self> {
        let mut vars = BTreeMap::new();
        for (name, shape) in cfg.param_shapes() {
            let t = tensors
                .remove(&name)
                .with_context(|| format!("the checkpoint lacks tensor `{name}` (expected shape {shape:?})"))?;
            if t.dims() != shape.as_slice() {
                bail!(
                    "tensor `{name}` has shape {:?}, the model config expects {shape:?}",
                    t.dims()
                );
            }
            vars.insert(name, Var::from_tensor(&t.to_dtype(dtype)?)?);
        }
        if cfg.tie_word_embeddings {
            // Some HF exports store the tied head anyway; it is the embedding, so dropping it loses nothing.
            tensors.remove("lm_head.weight");
        }
        if let Some(extra) = tensors.keys().next() {
            bail!(
                "the checkpoint has tensor `{extra}` that the model config does not use ({} unexpected in all)",
                tensors.len()
            );
        }
        Ok(Params { vars })
    }

    /// Random initialisation (normal, std 0.02; norms at 1), deterministic for a seed.
    pub fn random(cfg: &LlamaConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut rng = crate::rng::Rng::new(seed);
        let mut tensors = BTreeMap::new();
        for (name, shape) in cfg.param_shapes() {
            let t = if name.ends_with("norm.weight") {
                Tensor::ones(shape.as_slice(), dtype, device)?
            } else {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n).map(|_| 0.02 * rng.normal() as f32).collect();
                Tensor::from_vec(values, shape.as_slice(), device)?.to_dtype(dtype)?
            };
            tensors.insert(name, t);
        }
        Self::from_tensors(cfg, tensors, dtype)
    }

    pub fn get(&self, name: &str) -> Result<&Var> {
        self.vars
            .get(name)
            .with_context(|| format!("no parameter named `{name}`"))
    }

    /// The weights the forward computes with: each master weight passed through `view` (identity,
    /// or a quantized view for the selected tensors). Projection matrices are cast to the compute
    /// dtype; embeddings and norm gains stay in the master dtype, so that (as under PyTorch autocast)
    /// only matmuls run in bf16 and the residual stream stays f32.
    pub fn compute_weights(
        &self,
        dtype: DType,
        mut view: impl FnMut(&str, &Tensor) -> Result<Tensor>,
    ) -> Result<BTreeMap<String, Tensor>> {
        self.vars
            .iter()
            .map(|(name, var)| {
                let w = view(name, var.as_tensor())?;
                Ok((
                    name.clone(),
                    if is_projection(name, &w) { w.to_dtype(dtype)? } else { w },
                ))
            })
            .collect()
    }

    /// Gradient accumulators (f32; f64 for f64 weights), started as `start` says, for the matrices (projections and the
    /// embedding table), whose compute copies and fused lookups add their gradients into them in place
    /// (`fused::weight`, `fused::linear`, `fused::embedding`), and for the norm gains, which the fused
    /// block stack adds into (`fused::block::decoder_stack`); elsewhere a gain's stays zero and its
    /// gradient comes through autograd.
    ///
    /// A layer's q, k and v accumulators are row ranges of one tensor, which the map also holds under
    /// [`qkv_name`] (not a parameter): the fused block stack adds the three gradients with one GEMM.
    pub fn gradient_accumulators(&self, start: AccumulatorStart) -> Result<BTreeMap<String, Tensor>> {
        let new = |shape: Shape, dtype, device: &Device| match start {
            AccumulatorStart::Zeros => Tensor::zeros(shape, dtype, device),
            AccumulatorStart::Unwritten => accumulate::unwritten(shape, dtype, device),
        };
        if start == AccumulatorStart::Unwritten {
            accumulate::clear();
        }
        let mut acc = BTreeMap::new();
        for (name, var) in self
            .vars
            .iter()
            .filter(|(name, var)| var.rank() == 2 || is_norm_gain(name))
        {
            if acc.contains_key(name) {
                continue;
            }
            let dtype = ops::stat_dtype(var.dtype());
            let parts = qkv_parts(name).map(|names| names.map(|n| self.vars.get(&n).map(|v| (n, v))));
            match parts {
                Some([Some(q), Some(k), Some(v)]) => {
                    let rows: Vec<usize> = [q.1, k.1, v.1]
                        .iter()
                        .map(|v| v.dim(0))
                        .collect::<candle_core::Result<_>>()?;
                    let fused = new((rows.iter().sum::<usize>(), var.dim(1)?).into(), dtype, var.device())?;
                    let mut first = 0;
                    for ((part, _), count) in [q, k, v].into_iter().zip(rows) {
                        let view = fused.narrow(0, first, count)?;
                        if start == AccumulatorStart::Unwritten {
                            accumulate::register_view(&view, &fused);
                        }
                        acc.insert(part, view);
                        first += count;
                    }
                    acc.insert(qkv_name(name).expect("a q/k/v projection"), fused);
                }
                _ => {
                    acc.insert(name.clone(), new(var.shape().clone(), dtype, var.device())?);
                }
            }
        }
        Ok(acc)
    }

    pub fn to_tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }
}

/// Projection matrices run in the compute dtype; embeddings and norm gains stay in the master dtype.
/// The token embedding table (also the output head of a tied model).
pub const EMBEDDING: &str = "model.embed_tokens.weight";
/// The output head: an untied model's own weight, or the step's compute copy of a tied embedding.
pub const HEAD: &str = "lm_head.weight";

/// The layer prefix of `part` (`model.layers.N.`) if it is a q, k or v projection.
fn qkv_layer(part: &str) -> Option<&str> {
    QKV_PARTS
        .iter()
        .find_map(|local| part.strip_suffix(format!("{local}.weight").as_str()))
}

/// The name under which a layer's q, k and v projections are held as one (rows of q, then k, then v):
/// their accumulators' common tensor, and the step's compute copy of the three side by side.
pub fn qkv_name(part: &str) -> Option<String> {
    Some(format!("{}{QKV}.weight", qkv_layer(part)?))
}

/// The names of the q, k and v projections of `part`'s layer, if `part` is one of them.
pub fn qkv_parts(part: &str) -> Option<[String; 3]> {
    let layer = qkv_layer(part)?;
    Some(QKV_PARTS.map(|local| format!("{layer}{local}.weight")))
}

/// An RMSNorm gain (`…layernorm.weight`, `model.norm.weight`).
pub fn is_norm_gain(name: &str) -> bool {
    name.ends_with("norm.weight")
}

fn is_projection(name: &str, w: &Tensor) -> bool {
    w.rank() == 2 && !name.contains("embed_tokens")
}

/// Config plus the constants the forward needs (RoPE tables and causal mask, cached per length).
pub struct Llama {
    pub cfg: LlamaConfig,
    pub device: Device,
    pub dtype: DType,
    /// Fused kernels (default) or the reference compositions of candle primitives.
    pub kernels: Kernels,
    /// Keep only each block's input for the backward and recompute the rest (`model::checkpoint`).
    pub checkpoint_layers: bool,
    cache: std::sync::Mutex<BTreeMap<usize, (Tensor, Tensor, Tensor)>>,
}

impl Llama {
    pub fn new(cfg: LlamaConfig, dtype: DType, device: &Device) -> Self {
        Llama {
            cfg,
            device: device.clone(),
            dtype,
            kernels: Kernels::default(),
            checkpoint_layers: false,
            cache: Default::default(),
        }
    }

    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Llama { kernels, ..self }
    }

    pub fn with_checkpointing(self, checkpoint_layers: bool) -> Self {
        Llama {
            checkpoint_layers,
            ..self
        }
    }

    fn constants(&self, seq_len: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let mut cache = self.cache.lock().expect("constant cache poisoned");
        if let Some(c) = cache.get(&seq_len) {
            return Ok(c.clone());
        }
        let (cos, sin) = ops::rope_tables(&self.cfg, seq_len, ops::stat_dtype(self.dtype), &self.device)?;
        let mask = ops::causal_mask(seq_len, self.dtype, &self.device)?;
        cache.insert(seq_len, (cos.clone(), sin.clone(), mask.clone()));
        Ok((cos, sin, mask))
    }

    /// Hidden states after the final norm, `(B, T, d)`.
    pub fn hidden(&self, w: &BTreeMap<String, Tensor>, ids: &Tensor) -> Result<Tensor> {
        self.hidden_into(w, &BTreeMap::new(), ids)
    }

    /// [`Llama::hidden`], where the weights named in `grads_into` (each a compute copy whose gradient
    /// is the identity into its f32 accumulator) have their gradient added straight into that
    /// accumulator by the backward (fused kernels only; otherwise it flows through autograd).
    fn hidden_into(
        &self,
        w: &BTreeMap<String, Tensor>,
        grads_into: &BTreeMap<String, Tensor>,
        ids: &Tensor,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = ids.dims2()?;
        let (cos, sin, mask) = self.constants(t)?;
        let block = Block {
            cfg: cfg.clone(),
            dtype: self.dtype,
            fused: self.kernels == Kernels::Fused,
            cos,
            sin,
            mask,
        };
        let table = get(w, EMBEDDING)?;
        let mut x = match grads_into.get(EMBEDDING) {
            Some(acc) if block.fused => fused::embedding::embedding(table, &ids.flatten_all()?, acc)?,
            _ => table.index_select(&ids.flatten_all()?, 0)?,
        };
        x = x.reshape((b, t, cfg.hidden_size))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LayerWeights::of(i, w, grads_into))
            .collect::<Result<Vec<_>>>()?;
        // The training step on the fused kernels: all blocks as one node (checkpointing included).
        if block.fused && x.track_op() {
            let stack = layers
                .iter()
                .map(LayerWeights::stack_tensors)
                .collect::<Result<Option<Vec<_>>>>()?;
            if let Some(stack) = stack {
                let x = fused::block::decoder_stack(&x, stack, &block.spec(), self.checkpoint_layers)?;
                return block.norm(&x, get(w, "model.norm.weight")?);
            }
        }
        for layer in layers {
            x = if self.checkpoint_layers && x.track_op() {
                let gains = layer.gains()?;
                let block = block.clone();
                checkpoint::checkpointed(&x, [&gains[0], &gains[1]], move |x, gains, track| {
                    block.forward(x, &layer.with_gains(gains, track))
                })?
            } else {
                block.forward(&x, &layer)?
            };
        }
        block.norm(&x, get(w, "model.norm.weight")?)
    }

    /// The LM head in the compute dtype and the accumulator its gradient goes into: the step's compute
    /// copy (`HEAD`, also for a tied model) when there is one, else the tied embedding cast here.
    fn head<'a>(
        &self,
        w: &BTreeMap<String, Tensor>,
        grads_into: &'a BTreeMap<String, Tensor>,
    ) -> Result<(Tensor, Option<&'a Tensor>)> {
        let tied = self.cfg.tie_word_embeddings;
        let weight = match w.get(HEAD) {
            Some(head) => head,
            None if tied => get(w, EMBEDDING)?,
            None => bail!("missing weight `{HEAD}`"),
        };
        let acc = grads_into
            .get(HEAD)
            .or(if tied { grads_into.get(EMBEDDING) } else { None });
        Ok((weight.to_dtype(self.dtype)?, acc))
    }

    /// `hidden · headᵀ` in the compute dtype.
    pub(super) fn project(
        &self,
        w: &BTreeMap<String, Tensor>,
        grads_into: &BTreeMap<String, Tensor>,
        hidden: &Tensor,
    ) -> Result<Tensor> {
        let (head, acc) = self.head(w, grads_into)?;
        let hidden = hidden.to_dtype(self.dtype)?;
        Ok(match acc {
            Some(acc) if self.kernels == Kernels::Fused => fused::linear::linear(&hidden, &head, acc)?,
            _ => hidden.broadcast_matmul(&head.t()?)?,
        })
    }

    /// Logits `(B, T, V)` in the compute dtype.
    pub fn logits(&self, w: &BTreeMap<String, Tensor>, ids: &Tensor) -> Result<Tensor> {
        self.project(w, &BTreeMap::new(), &self.hidden(w, ids)?)
    }

    /// Token-mean next-token cross-entropy: position t predicts `labels[t + 1]` (−100 = ignored).
    /// `labels` is row-major `(B, T)`. Returns the loss and the number of counted targets.
    pub fn loss(&self, w: &BTreeMap<String, Tensor>, ids: &Tensor, labels: &[i64]) -> Result<(Tensor, usize)> {
        self.loss_into(w, &BTreeMap::new(), ids, labels)
    }

    /// [`Llama::loss`] with the weight gradients of `grads_into` added straight into their accumulators
    /// (see [`Llama::hidden_into`]): the training step's forward.
    pub fn loss_into(
        &self,
        w: &BTreeMap<String, Tensor>,
        grads_into: &BTreeMap<String, Tensor>,
        ids: &Tensor,
        labels: &[i64],
    ) -> Result<(Tensor, usize)> {
        let (hidden, targets) = self.next_token_hidden_into(w, grads_into, ids, labels)?;
        if let (Kernels::Fused, (head, Some(acc))) = (self.kernels, self.head(w, grads_into)?) {
            // The head and the loss as one node: the (N, V) logits' gradient stays out of autograd.
            let hidden = hidden.to_dtype(self.dtype)?;
            return Ok(fused::cross_entropy::head_cross_entropy(&hidden, &head, acc, &targets)?);
        }
        self.cross_entropy(&self.project(w, grads_into, &hidden)?, &targets)
    }

    /// The logits `(B·T, V)` and the targets they are scored against: position t predicts
    /// `labels[t + 1]` (row-major `(B, T)`, −100 = ignored), a row's last position nothing (−100).
    pub fn next_token_logits_into(
        &self,
        w: &BTreeMap<String, Tensor>,
        grads_into: &BTreeMap<String, Tensor>,
        ids: &Tensor,
        labels: &[i64],
    ) -> Result<(Tensor, Vec<i64>)> {
        let (hidden, targets) = self.next_token_hidden_into(w, grads_into, ids, labels)?;
        Ok((self.project(w, grads_into, &hidden)?, targets))
    }

    /// The final hidden states `(B·T, d)` and their targets, −100 at each row's last position (which
    /// predicts nothing): the head then reads the norm's output as it is, where leaving the last
    /// positions out cost a copy of the hidden states and, in the backward, a zero-padded copy of
    /// their gradient (0.2 ms per micro-batch of 16 × 256 on the H200), for 1/T fewer head rows.
    fn next_token_hidden_into(
        &self,
        w: &BTreeMap<String, Tensor>,
        grads_into: &BTreeMap<String, Tensor>,
        ids: &Tensor,
        labels: &[i64],
    ) -> Result<(Tensor, Vec<i64>)> {
        let (b, t) = ids.dims2()?;
        let hidden = self.hidden_into(w, grads_into, ids)?;
        let targets: Vec<i64> = (0..b)
            .flat_map(|r| labels[r * t + 1..(r + 1) * t].iter().copied().chain([IGNORE]))
            .collect();
        Ok((hidden.reshape((b * t, self.cfg.hidden_size))?, targets))
    }

    /// Token-mean cross-entropy of `(N, V)` logits against `targets`, and the number counted.
    pub fn cross_entropy(&self, logits: &Tensor, targets: &[i64]) -> Result<(Tensor, usize)> {
        Ok(match self.kernels {
            Kernels::Fused => fused::cross_entropy::cross_entropy(logits, targets)?,
            Kernels::Reference => ops::cross_entropy(logits, targets)?,
        })
    }

    /// Token mean over the counted `targets` of `T²·KL(teacher ‖ student)` at temperature T.
    pub fn distill_kl(&self, student: &Tensor, teacher: &Tensor, targets: &[i64], temperature: f64) -> Result<Tensor> {
        Ok(match self.kernels {
            Kernels::Fused => fused::distill::kl(student, teacher, targets, temperature)?,
            Kernels::Reference => ops::distill_kl(student, teacher, targets, temperature)?,
        })
    }
}
