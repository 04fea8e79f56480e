//! The fine-tune loop: build everything from the config (or a checkpoint), then step, log, evaluate
//! and save.

pub mod checkpoint;
pub mod distill;
pub mod optim;
pub mod schedule;
pub mod step;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

use crate::config::{Config, DeviceChoice, Precision};
use crate::data::{self, Batch, Encoder, TrainStream};
use crate::dist::{self, Rank};
use crate::eval;
use crate::metrics::Metrics;
use crate::model::io::LoadedModel;
use crate::model::{Llama, LlamaConfig, Params};
use crate::quant::scales::LearnedScales;
use crate::quant::{DualState, GammaState, Quantizer, Sensitivity, View};
use checkpoint::{SaveParts, TrainerState};
use optim::AdamW;

/// The device a config asks for (`ordinal`: which GPU).
pub fn pick_device(choice: DeviceChoice, ordinal: usize) -> Result<Device> {
    let device = match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda => Device::new_cuda(ordinal).with_context(|| {
            format!("train.device = \"cuda\" but CUDA device {ordinal} could not be opened (is this a --features cuda build?)")
        })?,
        DeviceChoice::Auto => Device::cuda_if_available(ordinal)?,
    };
    // Everything runs on the device's one stream, which already orders each use of a buffer before its
    // free: cudarc's per-buffer events (event calls per kernel argument) would be pure launch overhead.
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // SAFETY: one stream only, and no tensor exists on this device yet.
        unsafe { d.disable_event_tracking() };
        keep_freed_memory(d)?;
    }
    Ok(device)
}

/// Keep freed device memory in the stream-ordered pool cudarc allocates from, as PyTorch's caching
/// allocator does. With CUDA's default release threshold (0) every synchronization hands the free
/// memory back to the driver and the next allocations map it again; and memory use read after a
/// synchronization misses the peak in between. With the pool kept, `device_used_bytes` is the pool's
/// high-water mark: what PyTorch reports as `max_memory_reserved`.
#[cfg(feature = "cuda")]
fn keep_freed_memory(device: &candle_core::CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let mut threshold = u64::MAX;
    // SAFETY: the device handle comes from a live context; the attribute takes a u64.
    unsafe {
        let pool = result::device::get_default_mem_pool(device.cuda_stream().context().cu_device())?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )?;
    }
    Ok(())
}

/// (master dtype, compute dtype) for a precision on a device.
pub fn dtypes(precision: Precision, device: &Device) -> (DType, DType) {
    match precision {
        Precision::F32 => (DType::F32, DType::F32),
        Precision::Bf16Mixed => (DType::F32, DType::BF16),
        Precision::Bf16True => (DType::BF16, DType::BF16),
        Precision::Auto if device.is_cuda() => (DType::F32, DType::BF16),
        Precision::Auto => (DType::F32, DType::F32),
    }
}

/// Prox-QAT state that evolves during training.
pub struct QuantRun {
    pub quantizer: Quantizer,
    pub sens: Sensitivity,
    pub dual: DualState,
    pub gamma: GammaState,
    /// Trained grid scales (`quant.scale_lr_mult`).
    pub scales: Option<LearnedScales>,
}

pub struct Trainer {
    pub cfg: Config,
    pub model: Llama,
    pub params: Params,
    pub compute_dtype: DType,
    pub opt: AdamW,
    pub quant: Option<QuantRun>,
    /// The frozen float model of `[distill]`.
    pub teacher: Option<distill::Teacher>,
    pub stream: TrainStream,
    pub val: Vec<Batch>,
    pub val_all: Vec<Batch>,
    pub step: usize,
    pub bad_steps: usize,
    pub tokenizer: Tokenizer,
    pub model_cfg: LlamaConfig,
    /// This process's place in a data-parallel run (the only rank of a one-device run).
    pub rank: Rank,
    /// Phase timings (bench only): each `mark` synchronizes the device, so it is off in training.
    pub profile: Option<Profile>,
    /// The compute copies the last optimizer step wrote with its updates, read by the next step's
    /// forward instead of casting the weights again (`step::Trainer::step_weights`).
    pub next_copies: BTreeMap<String, step::WrittenCopy>,
}

/// Accumulated wall time per phase of the step, and the peak device memory seen at the marks.
#[derive(Debug, Default)]
pub struct Profile {
    pub seconds: BTreeMap<&'static str, f64>,
    /// The part of each phase's time the host spent before it waited for the device (tokenizing,
    /// building the graph, launching): a phase whose host time is close to its wall time keeps the GPU
    /// waiting.
    pub host_seconds: BTreeMap<&'static str, f64>,
    pub peak_bytes: usize,
    last: Option<std::time::Instant>,
}

/// Bytes in use on the device (CUDA: total − free, the allocator's pools included).
pub fn device_used_bytes(device: &Device) -> Option<usize> {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        return Some(total - free);
    }
    let _ = device;
    None
}

impl Trainer {
    /// Build a fresh run from the config, or continue the checkpoint at `resume`.
    pub fn new(cfg: Config, resume: Option<&Path>) -> Result<Self> {
        let rank = Rank::open(&cfg.train)?;
        Self::on_rank(cfg, resume, rank)
    }

    /// [`Trainer::new`] on a given rank of a data-parallel run.
    pub fn on_rank(cfg: Config, resume: Option<&Path>, rank: Rank) -> Result<Self> {
        let ckpt = resume.map(checkpoint::load).transpose()?;
        if ckpt.as_ref().is_some_and(|c| c.state.is_none()) {
            bail!(
                "--resume: {} has no trainer_state.json (it is not a proxqat training checkpoint)",
                resume.unwrap_or(Path::new("")).display()
            );
        }
        let loaded = match &ckpt {
            Some(c) => LoadedModel {
                cfg: c.model.cfg.clone(),
                tensors: c.model.tensors.clone(),
                tokenizer: c.model.tokenizer.clone(),
            },
            // A run directory stands for its latest checkpoint.
            None => crate::model::io::load_model(&checkpoint::resolve(&cfg.model.path)?)?,
        };
        let records = data::alpaca::load_records(&cfg.data.path)?;
        Self::from_parts(cfg, loaded, records, ckpt.as_ref(), rank)
    }

    /// Build from a model and records already in memory (the checkpoint, if any, supplies the state), on
    /// `rank` (its device, and its peers when `train.devices` > 1).
    pub fn from_parts(
        cfg: Config,
        loaded: LoadedModel,
        records: Vec<data::Record>,
        ckpt: Option<&checkpoint::Checkpoint>,
        rank: Rank,
    ) -> Result<Self> {
        if rank.world() != cfg.train.devices {
            bail!(
                "train.devices = {} but this rank belongs to a run of {}",
                cfg.train.devices,
                rank.world()
            );
        }
        let device = rank.device.clone();
        let (master, compute) = dtypes(cfg.train.precision, &device);
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            candle_core::cuda_backend::set_gemm_reduced_precision_f32(cfg.train.tf32);
            crate::fused::gemm::set_algorithm(cfg.train.gemm);
        }
        let state = ckpt.and_then(|c| c.state.clone());
        let vocab = loaded.tokenizer.get_vocab_size(true);
        if vocab > loaded.cfg.vocab_size {
            bail!(
                "the tokenizer has {vocab} tokens but the model's vocab_size is {}: they do not belong together (check model.path)",
                loaded.cfg.vocab_size
            );
        }
        let tensors: BTreeMap<String, Tensor> = loaded
            .tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(&device)?)))
            .collect::<Result<_>>()?;
        let params = Params::from_tensors(&loaded.cfg, tensors, master)?;
        let model = Llama::new(loaded.cfg.clone(), compute, &device)
            .with_kernels(cfg.train.kernels)
            .with_checkpointing(cfg.train.checkpoint_layers);

        let (mut train, val) = data::split(records, cfg.val_size(), cfg.data.split_seed)
            .with_context(|| format!("splitting {}", cfg.data.path.display()))?;
        for path in &cfg.data.extra_train {
            train.extend(data::alpaca::load_records(path).context("a data.extra_train file")?);
        }
        let eos_id = *loaded
            .cfg
            .eos_token_ids
            .first()
            .context("the model config has no eos_token_id; the data needs one to end responses")?;
        let encoder = Encoder {
            tokenizer: loaded.tokenizer.clone(),
            eos_id,
            max_seq_length: cfg.data.max_seq_length,
            mask_prompt: cfg.data.mask_prompt,
        };
        let mb = cfg.train.micro_batch;
        let val_all = data::val_batches(&val, &encoder, mb)?;
        let val_subset = val_all[..val_all.len().min(cfg.eval.max_batches)].to_vec();
        let cursor = state.as_ref().map(|s| s.cursor).unwrap_or_default();
        let tokenizing = std::time::Instant::now();
        let stream = TrainStream::new(data::encode_all(&train, &encoder)?, cfg.train.seed, cursor);
        tracing::info!(
            records = train.len(),
            seconds = tokenizing.elapsed().as_secs_f64(),
            "training records tokenized"
        );

        let t = &cfg.train;
        let mut opt = AdamW::new(t.beta1, t.beta2, t.eps, t.weight_decay);
        let quant = match &cfg.quant {
            None => None,
            Some(qcfg) => {
                let empty = BTreeMap::new();
                let stored = ckpt.map(|c| &c.quant).unwrap_or(&empty);
                let quantizer = Quantizer::from_scales(qcfg, &params, stored)?;
                let mut sens = Sensitivity::default();
                for name in quantizer.grids.keys() {
                    if let Some(s) = stored.get(&format!("sens.{name}")) {
                        sens.values.insert(name.clone(), s.to_device(&device)?.reshape(())?);
                    }
                }
                let dual = state
                    .as_ref()
                    .and_then(|s| s.dual.clone())
                    .unwrap_or_else(|| qcfg.dual.init());
                let gamma = state
                    .as_ref()
                    .and_then(|s| s.gamma.clone())
                    .unwrap_or_else(|| qcfg.gamma.init());
                let scales = match qcfg.scale_lr_mult {
                    Some(_) => Some(LearnedScales::new(&quantizer, stored)?),
                    None => None,
                };
                Some(QuantRun {
                    quantizer,
                    sens,
                    dual,
                    gamma,
                    scales,
                })
            }
        };
        let teacher = (cfg.distill.as_ref())
            .map(|d| distill::Teacher::load(d, &loaded.cfg, compute, cfg.train.kernels, &device))
            .transpose()?;
        if let (Some(c), Some(s)) = (ckpt, &state) {
            opt.t = s.adam_t;
            // Moments of the weights and of learned scales (`scale.NAME`) alike.
            for (key, t) in &c.optimizer {
                let (slot, name) = key.split_once('.').context("optimizer state key without a slot")?;
                let map = match slot {
                    "m" => &mut opt.m,
                    "v" => &mut opt.v,
                    _ => bail!("optimizer.safetensors holds `{key}`: only m.* and v.* belong there"),
                };
                map.insert(name.to_string(), t.to_device(&device)?);
            }
        }
        Ok(Trainer {
            step: state.as_ref().map(|s| s.step).unwrap_or(0),
            bad_steps: state.as_ref().map(|s| s.bad_steps).unwrap_or(0),
            cfg,
            model,
            params,
            compute_dtype: compute,
            opt,
            quant,
            teacher,
            stream,
            val: val_subset,
            val_all,
            tokenizer: loaded.tokenizer,
            model_cfg: loaded.cfg,
            rank,
            profile: None,
            next_copies: BTreeMap::new(),
        })
    }

    /// Validation losses (fp, and q / fsq when quantizing) on the given batches.
    pub fn evaluate(&self, batches: &[Batch]) -> Result<eval::Losses> {
        eval::losses(
            &self.model,
            &self.params,
            self.quant.as_ref().map(|q| &q.quantizer),
            batches,
        )
    }

    pub fn save(&self) -> Result<PathBuf> {
        let state = TrainerState {
            step: self.step,
            cursor: self.stream.cursor,
            adam_t: self.opt.t,
            dual: self.quant.as_ref().map(|q| q.dual.clone()),
            gamma: self.quant.as_ref().map(|q| q.gamma.clone()),
            bad_steps: self.bad_steps,
            config: self.cfg.clone(),
        };
        let mut optimizer = BTreeMap::new();
        for (slot, map) in [("m", &self.opt.m), ("v", &self.opt.v)] {
            for (name, t) in map {
                optimizer.insert(format!("{slot}.{name}"), t.clone());
            }
        }
        let mut quant = BTreeMap::new();
        if let Some(q) = &self.quant {
            quant.extend(q.quantizer.scale_tensors());
            if let Some(scales) = &q.scales {
                quant.extend(scales.tensors());
            }
            for (name, s) in &q.sens.values {
                quant.insert(format!("sens.{name}"), s.reshape(1)?);
            }
        }
        let model = LoadedModel {
            cfg: self.model_cfg.clone(),
            tensors: self.params.to_tensors(),
            tokenizer: self.tokenizer.clone(),
        };
        checkpoint::save(
            &self.cfg.train.out_dir,
            &model,
            SaveParts {
                state: &state,
                optimizer,
                quant,
            },
            self.cfg.train.keep_last,
        )
    }

    /// Train to `max_steps` with progress, metrics, evals and checkpoints. In a data-parallel run every
    /// rank steps; rank 0 alone logs, evaluates and saves, after the ranks have checked that their
    /// weights are identical.
    pub fn run(&mut self) -> Result<()> {
        let t = self.cfg.train.clone();
        let lead = self.rank.is_lead();
        let mut metrics = if lead {
            std::fs::create_dir_all(&t.out_dir).with_context(|| format!("creating out_dir {}", t.out_dir.display()))?;
            Metrics::open(&t.out_dir.join("metrics.jsonl"), t.max_steps, self.step)?
        } else {
            Metrics::silent()
        };
        tracing::info!(params = self.model_cfg.num_params(), device = ?self.model.device, dtype = ?self.compute_dtype,
            rank = self.rank.index(), devices = self.rank.world(), micro_batches_per_device = self.cfg.accum_per_device(),
            selected = self.quant.as_ref().map(|q| q.quantizer.grids.len()).unwrap_or(0), "training");
        if lead && self.step == 0 && self.cfg.eval.initial {
            let losses = self.evaluate(&self.val_all)?;
            metrics.eval(self.step, "initial", &losses)?;
        }
        let started = std::time::Instant::now();
        let mut tokens_since = 0usize;
        while self.step < t.max_steps {
            let report = self.step()?;
            tokens_since += report.tokens;
            let done = self.step;
            if report.skipped || done.is_multiple_of(t.log_every.max(1)) || done == t.max_steps {
                let extra = self.log_extras()?;
                metrics.step(
                    &report,
                    extra,
                    tokens_since as f64 / started.elapsed().as_secs_f64().max(1e-9),
                )?;
            }
            if self.bad_steps >= t.max_bad_steps {
                bail!(
                    "{} consecutive steps had a non-finite loss or gradient norm (last: loss {}, grad norm {}); stopping. \
                     The last checkpoint is intact. Likely causes: train.lr too high, or a quant grid step too small for the weights",
                    self.bad_steps,
                    report.loss,
                    report.grad_norm
                );
            }
            if lead && self.cfg.eval.every > 0 && done.is_multiple_of(self.cfg.eval.every) && done < t.max_steps {
                let losses = self.evaluate(&self.val)?;
                metrics.eval(done, "periodic", &losses)?;
            }
            if t.save_every > 0 && done.is_multiple_of(t.save_every) && done < t.max_steps {
                self.check_ranks_identical()?;
                if lead {
                    let dir = self.save()?;
                    metrics.note(&format!("saved {}", dir.display()));
                }
            }
        }
        self.check_ranks_identical()?;
        if !lead {
            return Ok(());
        }
        if self.stream.truncated > 0 {
            tracing::warn!(
                records = self.stream.truncated,
                max_seq_length = self.cfg.data.max_seq_length,
                "training records were truncated to max_seq_length"
            );
        }
        if self.cfg.eval.final_full {
            let losses = self.evaluate(&self.val_all)?;
            metrics.eval(self.step, "final", &losses)?;
        }
        let dir = self.save()?;
        metrics.finish(&format!("saved {}", dir.display()));
        Ok(())
    }

    /// Data-parallel runs: stop unless every rank holds the same weights (a no-op on one device).
    fn check_ranks_identical(&self) -> Result<()> {
        if self.rank.world() > 1 {
            let print = self.rank.check_identical(&self.params.to_tensors())?;
            tracing::info!(
                rank = self.rank.index(),
                step = self.step,
                fingerprint = format!("{print:016x}"),
                "ranks hold identical weights"
            );
        }
        Ok(())
    }

    /// Values only read at log steps (each costs a device sync): sensitivity mean/max.
    fn log_extras(&self) -> Result<serde_json::Value> {
        let mut out = serde_json::json!({});
        if let Some(q) = &self.quant {
            if let Some((mean, max)) = q.sens.mean_max()? {
                out["sens_mean"] = (mean.to_dtype(DType::F64)?.to_scalar::<f64>()?).into();
                out["sens_max"] = (max.to_dtype(DType::F64)?.to_scalar::<f64>()?).into();
            }
        }
        Ok(out)
    }

    /// Profiling only: wait for the device, charge the time since the last mark to `phase`.
    pub fn mark(&mut self, phase: &'static str) -> Result<()> {
        if let Some(p) = &mut self.profile {
            let enqueued = std::time::Instant::now();
            self.model.device.synchronize()?;
            let now = std::time::Instant::now();
            if let Some(last) = p.last {
                *p.seconds.entry(phase).or_default() += (now - last).as_secs_f64();
                *p.host_seconds.entry(phase).or_default() += (enqueued - last).as_secs_f64();
            }
            p.last = Some(now);
            let used = device_used_bytes(&self.model.device).unwrap_or(0);
            tracing::debug!(phase, used_gib = used as f64 / (1u64 << 30) as f64, "profile mark");
            p.peak_bytes = p.peak_bytes.max(used);
        }
        Ok(())
    }

    /// The forward view of the selected weights during training.
    pub fn train_view(&self) -> View {
        use crate::quant::{GradAt, Method};
        match &self.quant {
            None => View::Float,
            Some(q) => match (q.quantizer.cfg.method, q.quantizer.cfg.grad_at) {
                (Method::Fp, _) => View::Float,
                (Method::Ste, _) | (Method::Prox, GradAt::Q) => View::Hard,
                (Method::Prox, GradAt::Selective) => View::Selective(q.quantizer.cfg.atol),
                (Method::Prox, GradAt::X) => View::Float,
            },
        }
    }
}

/// `proxqat train`: build and run (with `train.devices` > 1: start one process per GPU running this).
pub fn train(cfg: Config, resume: Option<PathBuf>, overwrite: bool) -> Result<()> {
    // The processes of a data-parallel run find out_dir already checked (and cleared) by their launcher.
    let launcher = !dist::is_started_rank();
    if launcher {
        prepare_out_dir(&cfg.train.out_dir, resume.is_some(), overwrite)?;
    }
    let resume = resume.map(|p| checkpoint::resolve(&p)).transpose()?;
    if launcher && cfg.train.devices > 1 {
        return dist::launch(cfg.train.devices, cfg.train.device);
    }
    Trainer::new(cfg, resume.as_deref())?.run()
}

/// Refuse to mix a new run into an old one: an existing run needs --resume or --overwrite.
fn prepare_out_dir(out: &Path, resuming: bool, overwrite: bool) -> Result<()> {
    if out.is_file() {
        bail!(
            "train.out_dir {} is a file; point train.out_dir at a directory",
            out.display()
        );
    }
    let has_run = out.join("latest").exists() || out.join("metrics.jsonl").exists();
    if !resuming && has_run {
        if !overwrite {
            bail!(
                "train.out_dir {} already holds a run: pass --resume to continue it or --overwrite to start over",
                out.display()
            );
        }
        std::fs::remove_dir_all(out).with_context(|| format!("clearing {}", out.display()))?;
    }
    Ok(())
}
