//! `proxqat bench`: step throughput of the real training step on a model of a given shape with random
//! weights and synthetic records long enough that every row is exactly `seq` tokens.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

use crate::config::Config;
use crate::data::Record;
use crate::dist::Rank;
use crate::model::io::{load_tokenizer, LoadedModel};
use crate::model::LlamaConfig;
use crate::train::{Profile, Trainer};

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub method: String,
    pub micro_batch: usize,
    pub seq: usize,
    pub global_batch: usize,
    pub devices: usize,
    pub checkpoint_layers: bool,
    /// From one profiled step (synchronized at each phase boundary), on one device: mean forward,
    /// backward (incl. gradient accumulation) and both per micro-step; per optimizer step (devices > 1):
    /// waiting for the slowest rank and for the buckets summed during the last backward, then the
    /// all-reduce of what is left (embedding table, norm gains, loss); clip + the one host read,
    /// optimizer (+ Prox-QAT extras).
    pub ms_forward: f64,
    pub ms_backward: f64,
    pub ms_micro_step: f64,
    /// Of `ms_forward` and `ms_backward`, the host's time before it waited for the device.
    pub ms_forward_host: f64,
    pub ms_backward_host: f64,
    pub ms_rank_wait: f64,
    pub ms_all_reduce: f64,
    pub ms_clip_sync: f64,
    pub ms_optimizer: f64,
    /// From `steps` unprofiled steps: the whole step, and the throughput.
    pub ms_step: f64,
    pub tokens_per_s: f64,
    /// 6·N·tokens / time / (989 TFLOP/s × devices) (H100/H200 dense bf16 peak), N = all parameters.
    pub mfu: f64,
    pub peak_gib: f64,
}

pub struct BenchArgs<'a> {
    pub shape: &'a str,
    pub tokenizer: &'a Path,
    pub micro_batch: usize,
    pub seq: usize,
    pub global_batch: usize,
    pub method: &'a str,
    pub steps: usize,
    pub kernels: &'a str,
    pub checkpoint_layers: bool,
    /// GPUs, data-parallel (this process is one of the ranks `dist::launch` started when > 1).
    pub devices: usize,
}

fn shape(name: &str) -> Result<LlamaConfig> {
    Ok(match name {
        "llama-3.2-1b" => LlamaConfig::llama_3_2_1b(),
        "tiny" => LlamaConfig {
            bos_token_id: Some(128_000),
            eos_token_ids: vec![128_001],
            ..LlamaConfig::tiny(128_256, true)
        },
        other => anyhow::bail!("unknown --shape {other:?}: llama-3.2-1b or tiny"),
    })
}

/// The result, on the rank that reports it (rank 0).
pub fn run(a: &BenchArgs) -> Result<Option<BenchResult>> {
    let cfg_model = shape(a.shape)?;
    let quant = match a.method {
        "fp" => "",
        // The shipped setting (configs/alpaca.toml): prox pull, task gradient at q(x). Grid statistics
        // every step (the default is every 10): the worst case of the method's overhead.
        "prox" => "[quant]\nmethod = \"prox\"\npull = \"prox\"\ngrad_at = \"q\"\nstats_every = 1\n",
        "prox-loss" => "[quant]\nmethod = \"prox\"\npull = \"loss\"\nstats_every = 1\n",
        other => anyhow::bail!("unknown --method {other:?}: fp, prox or prox-loss"),
    };
    let toml = format!(
        "[model]\npath = \"random\"\n[data]\npath = \"synthetic\"\nval_records = 1\nmax_seq_length = {seq}\n\
         [train]\nout_dir = \"bench\"\nmicro_batch = {mb}\nglobal_batch = {gb}\nmax_steps = 1000\nwarmup_steps = 1\nlr = 1e-5\nkernels = \"{kernels}\"\ncheckpoint_layers = {ckpt}\ndevices = {devices}\n\
         [eval]\nevery = 0\ninitial = false\nfinal = false\nmax_batches = 1\n{quant}",
        seq = a.seq,
        mb = a.micro_batch,
        gb = a.global_batch,
        kernels = a.kernels,
        ckpt = a.checkpoint_layers,
        devices = a.devices
    );
    let cfg = Config::parse(&toml, &[])?;
    let rank = Rank::open(&cfg.train)?;
    let device = rank.device.clone();
    // Random weights generated on the device (the CPU would take minutes at 1.2B parameters).
    let mut tensors = BTreeMap::new();
    for (name, dims) in cfg_model.param_shapes() {
        let t = if name.ends_with("norm.weight") {
            Tensor::ones(dims.as_slice(), DType::F32, &device)?
        } else {
            Tensor::randn(0f32, 0.02, dims.as_slice(), &device)?
        };
        tensors.insert(name, t);
    }
    let tokenizer = load_tokenizer(a.tokenizer)?;
    // Records of ~600 random words: every row is truncated to exactly `seq` tokens.
    let mut rng = crate::rng::Rng::new(5);
    let words = [
        "alpha",
        "quantized",
        "weights",
        "grid",
        "train",
        "model",
        "the",
        "of",
        "Rust",
        "loss",
        "7",
        "prox",
    ];
    let records: Vec<Record> = (0..512)
        .map(|_| Record {
            instruction: (0..600)
                .map(|_| words[rng.below(words.len())])
                .collect::<Vec<_>>()
                .join(" "),
            input: String::new(),
            output: "done".into(),
        })
        .collect();
    let loaded = LoadedModel {
        cfg: cfg_model.clone(),
        tensors,
        tokenizer,
    };
    let mut trainer = Trainer::from_parts(cfg, loaded, records, None, rank).context("building the bench trainer")?;
    // Warm-up (kernels, allocator pools, Adam state), then the throughput of plain steps, as in
    // training (no synchronization beyond the step's one host read).
    trainer.step()?;
    let started = std::time::Instant::now();
    for _ in 0..a.steps {
        trainer.step()?;
    }
    trainer.model.device.synchronize()?;
    // (`--steps 0`: only the profiled step, e.g. under a profiler; the throughput is then NaN.)
    let step_s = started.elapsed().as_secs_f64() / a.steps as f64;
    // Breakdown and peak memory: one more step, synchronized at every phase boundary.
    trainer.profile = Some(Profile::default());
    trainer.step()?;
    let p = trainer.profile.take().expect("profiling was on");
    if trainer.rank.world() > 1 {
        // Not timed: the ranks still hold the same weights after the measured steps.
        let print = trainer.rank.check_identical(&trainer.params.to_tensors())?;
        tracing::info!(
            rank = trainer.rank.index(),
            fingerprint = format!("{print:016x}"),
            "ranks hold identical weights"
        );
    }
    if !trainer.rank.is_lead() {
        return Ok(None);
    }
    let accum = (a.global_batch / a.micro_batch / a.devices) as f64;
    let per_step = |k: &str| 1e3 * p.seconds.get(k).copied().unwrap_or(0.0);
    let host = |k: &str| 1e3 * p.host_seconds.get(k).copied().unwrap_or(0.0);
    let tokens = (a.global_batch * a.seq) as f64;
    let flops = 6.0 * cfg_model.num_params() as f64 * tokens;
    Ok(Some(BenchResult {
        method: a.method.into(),
        micro_batch: a.micro_batch,
        seq: a.seq,
        global_batch: a.global_batch,
        checkpoint_layers: a.checkpoint_layers,
        ms_forward: per_step("forward") / accum,
        ms_backward: per_step("backward") / accum,
        ms_micro_step: (per_step("forward") + per_step("backward")) / accum,
        ms_forward_host: host("forward") / accum,
        ms_backward_host: host("backward") / accum,
        ms_all_reduce: per_step("all-reduce"),
        ms_rank_wait: per_step("rank wait"),
        ms_clip_sync: per_step("clip+sync"),
        ms_optimizer: per_step("optimizer+quant"),
        ms_step: 1e3 * step_s,
        tokens_per_s: tokens / step_s,
        mfu: flops / step_s / (989e12 * a.devices as f64),
        devices: a.devices,
        peak_gib: p.peak_bytes as f64 / (1u64 << 30) as f64,
    }))
}
