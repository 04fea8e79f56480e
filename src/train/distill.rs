//! The distillation teacher (`[distill]`): a frozen float model whose next-token distributions the
//! student is trained toward, beside (or instead of) the data's cross-entropy.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

use crate::config::DistillSection;
use crate::fused::Kernels;
use crate::model::{Llama, LlamaConfig, Params};

pub struct Teacher {
    model: Llama,
    /// Detached compute weights: projections in the compute dtype, the rest as loaded (f32).
    weights: BTreeMap<String, Tensor>,
    pub cfg: DistillSection,
}

/// One micro-batch's loss terms, 0-d on the device.
pub struct Distilled {
    /// The data's cross-entropy (what `loss` reports and the λ controller sees).
    pub cross_entropy: Tensor,
    /// `T²·KL(teacher ‖ student)`, token mean.
    pub kl: Tensor,
    /// What the backward runs on: `(1 − weight)·cross_entropy + weight·kl`.
    pub objective: Tensor,
}

impl Teacher {
    /// Load the teacher for a student of config `student` (the vocabularies must agree).
    pub fn load(
        cfg: &DistillSection,
        student: &LlamaConfig,
        compute: DType,
        kernels: Kernels,
        device: &Device,
    ) -> Result<Self> {
        let path = &cfg.teacher;
        let loaded = crate::train::checkpoint::load(path)
            .with_context(|| format!("loading the distillation teacher distill.teacher = {}", path.display()))?
            .model;
        if loaded.cfg.vocab_size != student.vocab_size {
            bail!(
                "distill.teacher = {}: its vocabulary has {} entries, the student's {}: a teacher must share the student's tokenizer",
                path.display(),
                loaded.cfg.vocab_size,
                student.vocab_size
            );
        }
        let tensors = loaded
            .tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(device)?)))
            .collect::<Result<_>>()?;
        let params = Params::from_tensors(&loaded.cfg, tensors, DType::F32)
            .with_context(|| format!("distill.teacher = {}", path.display()))?;
        let weights = params.compute_weights(compute, |_, x| Ok(x.detach()))?;
        Ok(Teacher {
            model: Llama::new(loaded.cfg, compute, device).with_kernels(kernels),
            weights,
            cfg: cfg.clone(),
        })
    }

    /// The student's loss terms on one micro-batch: its forward (with `grads_into`, as
    /// [`Llama::loss_into`]) and the teacher's, untracked, on the same tokens.
    pub fn losses(
        &self,
        student: &Llama,
        weights: &BTreeMap<String, Tensor>,
        grads_into: &BTreeMap<String, Tensor>,
        ids: &Tensor,
        labels: &[i64],
    ) -> Result<Distilled> {
        let (logits, targets) = student.next_token_logits_into(weights, grads_into, ids, labels)?;
        let (teacher_logits, _) = self
            .model
            .next_token_logits_into(&self.weights, &BTreeMap::new(), ids, labels)?;
        let teacher_logits = teacher_logits.to_dtype(logits.dtype())?;
        let (cross_entropy, _) = student.cross_entropy(&logits, &targets)?;
        let kl = student.distill_kl(&logits, &teacher_logits, &targets, self.cfg.temperature)?;
        let alpha = self.cfg.weight;
        let objective = if alpha == 1.0 {
            kl.clone()
        } else {
            ((&cross_entropy * (1.0 - alpha))? + (&kl * alpha)?)?
        };
        Ok(Distilled {
            cross_entropy,
            kl,
            objective,
        })
    }
}
