//! One optimizer step, in the order of spec §13. The only host read is one pair of scalars (mean loss,
//! grad norm) after the micro-batches: it feeds the NaN guard and the λ controller.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

use super::optim::{AdamW, CopySpec, Update};
use super::{schedule, Trainer};
use crate::dist::{overlap, ReduceOp};
use crate::fused::{self, weight, Kernels};
use crate::model::llama::{is_norm_gain, qkv_name, qkv_parts, AccumulatorStart, EMBEDDING, HEAD};
use crate::quant::grid::TensorGrid;
use crate::quant::{dist_loss, harden, stats, Method, Pull, View};

type StepWeights = BTreeMap<String, Tensor>;

/// A compute copy the optimizer step wrote for the next forward (`Trainer::next_copies`), and the grid
/// it is on (its scale tensor and half-levels), so that a changed view is never read from it.
pub struct WrittenCopy {
    pub copy: Tensor,
    grid: Option<(candle_core::TensorId, f64)>,
}

/// Each layer whose q, k and v compute copies add their gradients straight into their accumulators
/// gets the three side by side as one compute copy (made once per step, not per micro-batch) and the
/// accumulators' common tensor, both under `qkv_name`: the fused block stack's one q/k/v projection.
fn fuse_qkv(
    accumulators: &BTreeMap<String, Tensor>,
    weights: &mut BTreeMap<String, Tensor>,
    direct: &mut BTreeMap<String, Tensor>,
) -> Result<()> {
    // One entry per layer (its q, k and v all name it).
    let fused: BTreeMap<String, [String; 3]> = direct
        .keys()
        .filter_map(|name| Some((qkv_name(name)?, qkv_parts(name)?)))
        .filter(|(_, parts)| parts.iter().all(|p| direct.contains_key(p) && weights.contains_key(p)))
        .collect();
    for (name, parts) in fused {
        let Some(acc) = accumulators.get(&name) else {
            continue;
        };
        let copies: Vec<&Tensor> = parts.iter().map(|p| &weights[p]).collect();
        weights.insert(name.clone(), Tensor::cat(&copies, 0)?.detach());
        direct.insert(name, acc.clone());
    }
    Ok(())
}

fn grid_key(on_grid: &Option<weight::OnGrid>) -> Option<(candle_core::TensorId, f64)> {
    on_grid.as_ref().map(|g| (g.scale.id(), g.half_levels))
}

/// Weights whose compute copy the optimizer step writes for the next forward: variable name →
/// (its name among the step weights, what the copy is).
type CopyPlan = BTreeMap<String, (String, CopySpec)>;

#[derive(Clone, Debug, Default, Serialize)]
pub struct StepReport {
    pub step: usize,
    /// Mean task loss over the step's micro-batches (at the weights the forward used).
    pub loss: f64,
    pub grad_norm: f64,
    /// Mean distillation term `T²·KL(teacher ‖ student)` over the micro-batches (`[distill]` only).
    pub distill_kl: Option<f64>,
    pub lr: f64,
    pub tokens: usize,
    pub skipped: bool,
    pub lambda: Option<f64>,
    pub gamma: Option<f64>,
    pub hit_rate: Option<f64>,
    pub sat_rate: Option<f64>,
    pub prox_clamped: Option<bool>,
}

impl Trainer {
    /// The step's compute weights at the training view, and `grads_into`: the accumulators the model
    /// adds gradients into directly (compute copies whose gradient is the identity, and the table).
    /// Projections go through `fused::weight` (one op: grid point for a straight-through view on a
    /// uniform grid, cast, gradient accumulated into `accumulators`); the embedding table stays the
    /// f32 master, looked up by `fused::embedding`, and a tied head gets its own compute copy; other
    /// views of selected tensors are built on an accumulating f32 copy; norm gains are the master
    /// weights or their view.
    /// On the fused kernels (whose ops add the gradients into the accumulators themselves) a copy the
    /// last optimizer step wrote (`written`) is read instead of casting again, and the returned plan
    /// asks this step's optimizer to write the next ones (not with learned scales, which move the grid
    /// after the update).
    fn step_weights(
        &self,
        accumulators: &BTreeMap<String, Tensor>,
        mut written: BTreeMap<String, WrittenCopy>,
    ) -> Result<(StepWeights, StepWeights, CopyPlan)> {
        let view = self.train_view();
        let quantizer = self
            .quant
            .as_ref()
            .map(|q| &q.quantizer)
            .filter(|_| view != View::Float);
        let dtype = self.compute_dtype;
        let mut weights = BTreeMap::new();
        let mut direct = BTreeMap::new();
        let mut plan = CopyPlan::new();
        let reuse = self.model.kernels == Kernels::Fused && self.quant.as_ref().is_none_or(|q| q.scales.is_none());
        // `x`'s compute copy, named `dest` among the step weights, accumulating into `acc`.
        let mut copy_of = |var: &str, dest: &str, x: &Tensor, on_grid: Option<weight::OnGrid>, acc: &Tensor| {
            if reuse {
                let key = grid_key(&on_grid);
                plan.insert(
                    var.to_string(),
                    (
                        dest.to_string(),
                        CopySpec {
                            dtype,
                            on_grid: on_grid.clone(),
                        },
                    ),
                );
                if let Some(w) = written
                    .remove(dest)
                    .filter(|w| w.grid == key && w.copy.dtype() == dtype)
                {
                    return Ok(w.copy);
                }
            }
            weight::compute_copy_accumulating(x, on_grid, dtype, acc)
        };
        for (name, var) in &self.params.vars {
            let x = var.as_tensor();
            let selected = quantizer.and_then(|qz| qz.grids.get(name).map(|grid| (qz, grid)));
            if let (EMBEDDING, Some(acc), None) = (name.as_str(), accumulators.get(name), selected) {
                // The lookup reads the f32 table (as autocast does) and adds its rows' gradients into
                // the accumulator; a tied head gets its own compute copy, accumulating into the same.
                weights.insert(name.clone(), x.clone());
                direct.insert(name.clone(), acc.clone());
                if self.model_cfg.tie_word_embeddings {
                    weights.insert(HEAD.into(), copy_of(name, HEAD, x, None, acc)?);
                    direct.insert(HEAD.into(), acc.clone());
                }
                continue;
            }
            if let (true, Some(acc), None) = (is_norm_gain(name), accumulators.get(name), selected) {
                // The f32 master itself: the fused block stack adds its gradient into `acc`.
                weights.insert(name.clone(), x.clone());
                direct.insert(name.clone(), acc.clone());
                continue;
            }
            let on_grid = match selected {
                Some((_, TensorGrid::Uniform { scale, half_levels, .. })) if view == View::Hard => {
                    Some(weight::OnGrid {
                        scale: scale.clone(),
                        half_levels: *half_levels,
                    })
                }
                _ => None,
            };
            // A selected table is looked up at its view, through autograd.
            let acc = accumulators.get(name).filter(|_| name != EMBEDDING);
            let w = match (acc, selected) {
                (Some(acc), Some((qz, _))) if on_grid.is_none() => {
                    let copy = weight::compute_copy_accumulating(x, None, x.dtype(), acc)?;
                    qz.view(name, &copy, view, true)?.to_dtype(dtype)?
                }
                (Some(acc), _) => {
                    direct.insert(name.clone(), acc.clone());
                    copy_of(name, name, x, on_grid, acc)?
                }
                (None, Some((qz, _))) => qz.view(name, x, view, true)?,
                (None, None) => x.clone(),
            };
            weights.insert(name.clone(), w);
        }
        if self.model.kernels == Kernels::Fused {
            fuse_qkv(accumulators, &mut weights, &mut direct)?;
        }
        Ok((weights, direct, plan))
    }

    pub fn step(&mut self) -> Result<StepReport> {
        self.mark("outside step")?;
        let k = self.step;
        let t = self.cfg.train.clone();
        // Micro-batches per step over all devices (the loss scale) and on this one.
        let accum = self.cfg.accum();
        let (rank, world) = (self.rank.index(), self.rank.world());
        // 1. Learning rate; the one-shot hardening.
        let lr = schedule::lr_at(k, t.lr, t.min_lr, t.warmup_steps, t.max_steps);
        if let Some(q) = &self.quant {
            if q.quantizer.cfg.harden_at == Some(k) {
                harden::harden(&self.params, &q.quantizer, View::Hard)?;
                self.next_copies.clear();
            }
        }

        // 2. Micro-batches: forward at the training view, backward f/accum, accumulate gradients.
        // The weights do not change within a step: cast (and quantize, for STE / grad at q) once, or
        // take the copies the last update wrote, and let every micro-batch's backward run through the
        // same graph nodes. The matrices' backward adds their gradients into `accumulators` in place
        // (the norm gains' too in the fused block stack); what comes through autograd is summed here.
        // Data-parallel: this rank runs micro-batches rank, rank + world, … of the step's stream.
        // Unwritten: each one's first writer overwrites it (no 4.9 GB zero-fill per step at 1B).
        let accumulators = self.params.gradient_accumulators(AccumulatorStart::Unwritten)?;
        let written = std::mem::take(&mut self.next_copies);
        let (weights, grads_into, copy_plan) = self.step_weights(&accumulators, written)?;
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = Tensor::zeros((), DType::F32, &self.model.device)?;
        let mut kl_sum = Tensor::zeros((), DType::F32, &self.model.device)?;
        let mut tokens = 0;
        // In a data-parallel step the projections' accumulators are summed over ranks as soon as the
        // last micro-batch's backward completes each one (`dist::overlap`); the rest after it.
        let early: Vec<Tensor> = grads_into
            .iter()
            .filter(|(name, _)| {
                name.as_str() != EMBEDDING && name.as_str() != HEAD && self.params.vars.contains_key(*name)
            })
            .map(|(_, acc)| acc.clone())
            .collect();
        let mut summed_early = HashSet::new();
        let accum_per_device = self.cfg.accum_per_device();
        for micro in 0..accum_per_device {
            self.stream.skip(rank * t.micro_batch);
            let batch = self.stream.next_batch(t.micro_batch);
            self.stream.skip((world - 1 - rank) * t.micro_batch);
            tokens += batch.rows * batch.cols;
            let ids = Tensor::from_slice(&batch.ids, (batch.rows, batch.cols), &self.model.device)?;
            // The data loss (reported, and what λ is controlled on) and the objective backward runs on.
            let (loss, objective) = match &self.teacher {
                None => {
                    let (loss, _) = self.model.loss_into(&weights, &grads_into, &ids, &batch.labels)?;
                    (loss.clone(), loss)
                }
                Some(teacher) => {
                    let terms = teacher.losses(&self.model, &weights, &grads_into, &ids, &batch.labels)?;
                    kl_sum = (kl_sum + terms.kl.detach().to_dtype(DType::F32)?)?;
                    (terms.cross_entropy, terms.objective)
                }
            };
            self.mark("forward")?;
            let last = micro + 1 == accum_per_device;
            let tracker = (last && world > 1)
                .then(|| overlap::begin(self.rank.collective.clone(), &early, overlap::BUCKET_BYTES));
            let step_grads = (&objective / accum as f64)?.backward()?;
            if let Some(tracker) = tracker {
                summed_early = tracker.end()?;
            }
            for (name, var) in &self.params.vars {
                if let Some(g) = step_grads.get(var.as_tensor()) {
                    let g = g.to_dtype(DType::F32)?;
                    let sum = match grads.remove(name) {
                        Some(prev) => (prev + g)?,
                        None => g,
                    };
                    grads.insert(name.clone(), sum);
                }
            }
            loss_sum = (loss_sum + loss.detach().to_dtype(DType::F32)?)?;
            self.mark("backward")?;
        }
        drop((early, weights, grads_into));
        fused::accumulate::finish()?;
        // Per parameter (the fused q/k/v accumulators are their parts' storage, not parameters).
        for (name, acc) in accumulators
            .into_iter()
            .filter(|(name, _)| self.params.vars.contains_key(name))
        {
            if summed_early.contains(&acc.id()) && grads.contains_key(&name) {
                bail!("`{name}`: summed over ranks during backward, yet autograd also produced a gradient");
            }
            // Under the reference kernels a table's lookup gradient went through autograd.
            let total = match grads.remove(&name) {
                Some(g) => (g + acc)?,
                None => acc,
            };
            grads.insert(name, total);
        }
        // Sum the gradients, the loss and the token count over ranks (f32; a no-op on one device):
        // from here on every rank holds the same values and makes the same update.
        let totals = Tensor::stack(&[loss_sum, Tensor::new(tokens as f32, &self.model.device)?, kl_sum], 0)?;
        if self.profile.is_some() && world > 1 {
            // Profiling only: meet the slowest rank first, so that "all-reduce" times the transfer.
            let probe = Tensor::zeros(1, DType::F32, &self.model.device)?;
            self.rank.collective.all_reduce_in_place(&[&probe], ReduceOp::Sum)?;
            self.mark("rank wait")?;
        }
        let mut reduced: Vec<&Tensor> = grads.values().filter(|g| !summed_early.contains(&g.id())).collect();
        reduced.push(&totals);
        self.rank.collective.all_reduce_in_place(&reduced, ReduceOp::Sum)?;
        self.mark("all-reduce")?;

        // 3. Global gradient norm and clipping factor, both 0-d on the device; the optimizer applies the
        // factor inside its update (no scaled copy of the gradients).
        let sums_of_squares = fused::adamw::sums_of_squares(&grads.values().collect::<Vec<_>>())?;
        let norm = sums_of_squares.sum_all()?.sqrt()?;
        let clip = if t.grad_clip > 0.0 {
            ((&norm + 1e-6)?.recip()? * t.grad_clip)?.minimum(1.0)?
        } else {
            Tensor::ones((), DType::F32, &self.model.device)?
        };
        // Token counts stay exact in f32 up to 2^24 per step.
        let host = Tensor::cat(
            &[
                (totals.get(0)? / accum as f64)?.reshape(1)?,
                norm.reshape(1)?,
                totals.get(1)?.reshape(1)?,
                (totals.get(2)? / accum as f64)?.reshape(1)?,
            ],
            0,
        )?
        .to_vec1::<f32>()?;
        let (loss, grad_norm, tokens) = (host[0] as f64, host[1] as f64, host[2] as usize);
        self.mark("clip+sync")?;
        let mut report = StepReport {
            step: k + 1,
            loss,
            grad_norm,
            distill_kl: self.teacher.is_some().then_some(host[3] as f64),
            lr,
            tokens,
            ..Default::default()
        };
        if !loss.is_finite() || !grad_norm.is_finite() {
            // NaN/Inf guard: skip the update entirely (the prox override included, spec §12.13).
            self.bad_steps += 1;
            report.skipped = true;
            tracing::warn!(
                step = k + 1,
                loss,
                grad_norm,
                "non-finite loss or gradient: step skipped"
            );
            self.step += 1;
            return Ok(report);
        }
        self.bad_steps = 0;

        self.opt.begin_step();
        let mut updates = Updates {
            opt: &mut self.opt,
            plan: &copy_plan,
            written: &mut self.next_copies,
        };
        match &mut self.quant {
            None => {
                for (name, var) in &self.params.vars {
                    updates.apply(name, var, &grads[name], &clip, lr, Update::Plain)?;
                }
            }
            Some(q) => {
                let qc = q.quantizer.cfg.clone();
                let names = q.quantizer.names();
                // 4. Sensitivity EMA from the clipped task gradients; pull weights s_i.
                if qc.method == Method::Prox && qc.sens.enable {
                    // Σg² per tensor is at hand from the global norm (same order as `grads`).
                    let squares = grads
                        .iter()
                        .enumerate()
                        .filter(|(_, (name, _))| q.quantizer.grids.contains_key(*name))
                        .map(|(i, (name, g))| Ok((name.clone(), (sums_of_squares.get(i)?, g.elem_count()))))
                        .collect::<Result<_>>()?;
                    q.sens.update_from_squares(qc.sens.ema, &squares, &clip)?;
                }
                let weights = q.sens.weights(&qc.sens, &names)?;
                // Learned scales: their gradients at the codes this step's forward used.
                let scale_grads = match &q.scales {
                    Some(scales) => Some(scales.gradients(&q.quantizer, &self.params, &grads)?),
                    None => None,
                };
                // 5. Pull gain c_k = c·γ_k (γ off: c).
                let gain = qc.gamma.gain(&q.gamma, k);
                let pull = qc.dist_scale * gain;
                let lambda = q.dual.lambda;
                // Under `pull = "loss"` λ scales every task gradient: folded into the clip factor.
                let lambda_clip = (&clip * lambda)?;
                // 6. Optimizer step with the method's treatment of the selected tensors (the grid point
                // q(x) and the pull are computed inside the fused update).
                for (name, var) in &self.params.vars {
                    let weight = || weights[name].to_device(var.device());
                    let coef; // the pull's coefficient, which the update borrows
                    let (how, clip) = match (qc.method, qc.pull, q.quantizer.grids.get(name)) {
                        (Method::Prox, Pull::Loss, Some(grid)) if pull > 0.0 => {
                            coef = dist_loss::grad_coefficient(&weight()?, names.len(), pull)?;
                            let how = Update::DistGrad {
                                task_scale: lambda,
                                coef: &coef,
                                grid,
                            };
                            (how, &clip)
                        }
                        (Method::Prox, Pull::Loss, _) => (Update::Plain, &lambda_clip),
                        (Method::Prox, Pull::Prox, Some(grid)) => {
                            coef = dist_loss::prox_coefficient(pull, &weight()?, lr)?;
                            let how = Update::Prox {
                                task_scale: lambda,
                                pull: &coef,
                                grid,
                            };
                            (how, &clip)
                        }
                        _ => (Update::Plain, &clip),
                    };
                    updates.apply(name, var, &grads[name], clip, lr, how)?;
                }
                if let (Some(scales), Some(scale_grads), Some(mult)) = (&mut q.scales, &scale_grads, qc.scale_lr_mult) {
                    scales.step(updates.opt, &mut q.quantizer, scale_grads, &clip, lr * mult)?;
                }
                if qc.method == Method::Prox {
                    // Whether the η·c·s ≤ 1 clamp can bind this step (for the most weakly sensitive tensor).
                    report.prox_clamped = (qc.pull == Pull::Prox).then_some(pull * qc.sens.w_max * lr >= 1.0);
                    // 7. λ from the mean micro-batch loss this step already computed.
                    qc.dual.update(&mut q.dual, loss);
                    report.lambda = Some(q.dual.lambda);
                    report.gamma = qc.gamma.enable.then_some(q.gamma.gamma);
                }
                // 8. Stats every `stats_every` steps, feeding γ.
                let done = k + 1;
                let gamma_due = qc.gamma.enable && done.is_multiple_of(qc.gamma.every);
                if done.is_multiple_of(qc.stats_every) || gamma_due {
                    let s = stats::compute(&self.params, &q.quantizer, qc.atol)?;
                    report.hit_rate = Some(s.total.hit_rate);
                    report.sat_rate = Some(s.total.sat_rate);
                    if gamma_due && qc.method == Method::Prox {
                        qc.gamma.update(&mut q.gamma, s.total.hit_rate, done);
                    }
                }
            }
        }
        self.mark("optimizer+quant")?;
        self.step += 1;
        Ok(report)
    }
}

/// The optimizer step's updates, each writing the next step's compute copy of its weight when the
/// step's plan asks for one.
struct Updates<'a> {
    opt: &'a mut AdamW,
    plan: &'a CopyPlan,
    written: &'a mut BTreeMap<String, WrittenCopy>,
}

impl Updates<'_> {
    fn apply(&mut self, name: &str, var: &Var, grad: &Tensor, clip: &Tensor, lr: f64, how: Update) -> Result<()> {
        let plan = self.plan.get(name);
        let copy = self
            .opt
            .update(name, var, grad, clip, lr, how, plan.map(|(_, spec)| spec))?;
        if let (Some((dest, spec)), Some(copy)) = (plan, copy) {
            let grid = grid_key(&spec.on_grid);
            self.written.insert(dest.clone(), WrittenCopy { copy, grid });
        }
        Ok(())
    }
}
