//! The TOML run configuration: schema (unknown keys are errors), defaults, validation, `--set` overrides.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::data::{self, Record, ValSize};
use crate::quant::QuantConfig;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub eval: EvalSection,
    /// Absent: a plain full fine-tune (no quantization).
    pub quant: Option<QuantConfig>,
    /// Absent: no teacher; the loss is the data's cross-entropy alone.
    pub distill: Option<DistillSection>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// HF checkpoint directory or `.gguf` file.
    pub path: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Alpaca JSON file: `[{instruction, input, output}]`.
    pub path: PathBuf,
    /// Validation split: a fraction of the records, or (if set) an exact record count.
    #[serde(default = "d_val_fraction")]
    pub val_fraction: f64,
    pub val_records: Option<usize>,
    #[serde(default = "d_split_seed")]
    pub split_seed: u64,
    #[serde(default = "d_seq")]
    pub max_seq_length: usize,
    /// Put the loss on the response only (LitGPT's Alpaca default in the seed run: false).
    #[serde(default)]
    pub mask_prompt: bool,
    /// More Alpaca JSON files whose records join the training split only (e.g. `proxqat synth`'s
    /// teacher samples); the validation split stays that of `path`.
    #[serde(default)]
    pub extra_train: Vec<PathBuf>,
}

/// Knowledge distillation from a float teacher: the training loss becomes
/// `(1 − weight)·CE(data) + weight·T²·KL(softmax(teacher/T) ‖ softmax(student/T))`, token mean over the
/// positions the cross-entropy counts. A quantized student learns the teacher's whole next-token
/// distribution, not only the data's one token per position.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    /// The teacher: HF checkpoint directory, proxqat run or checkpoint directory, or `.gguf` file. Its
    /// vocabulary must be the student's (same tokenizer); its architecture may differ.
    pub teacher: PathBuf,
    /// The distillation term's share of the loss, in (0, 1].
    #[serde(default = "d_distill_weight")]
    pub weight: f64,
    /// Softmax temperature T of both distributions (the T² keeps gradient sizes comparable across T).
    #[serde(default = "d_temperature")]
    pub temperature: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// bf16 on CUDA (f32 master weights and optimizer state), f32 on CPU.
    Auto,
    F32,
    Bf16Mixed,
    Bf16True,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    pub out_dir: PathBuf,
    pub micro_batch: usize,
    pub global_batch: usize,
    pub max_steps: usize,
    /// Peak learning rate (explicit: the seed's silent torch default of 1e-3 is a pitfall, spec §12.17).
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    pub seed: u64,
    pub precision: Precision,
    /// Allow TF32 tensor cores for f32 matmuls on CUDA (10-bit mantissa inputs; off, as in PyTorch).
    pub tf32: bool,
    /// `fused` (the custom kernels of src/fused, CUDA and CPU) or `reference` (candle primitives).
    pub kernels: crate::fused::Kernels,
    /// How the fused kernels' CUDA GEMMs pick a cuBLASLt algorithm per shape: `measured` (time the
    /// candidates once, keep the fastest) or `heuristic` (cuBLAS's choice: bit-identical reruns).
    pub gemm: crate::fused::gemm::GemmAlgorithm,
    /// Activation checkpointing per decoder block: keep only each block's input and recompute the
    /// block in the backward (one more forward; the activations of all but one block are never kept).
    pub checkpoint_layers: bool,
    pub device: DeviceChoice,
    /// GPUs to train on, data-parallel (one process each, gradients summed over NCCL; `proxqat train`
    /// starts the processes). Each optimizer step still sees `global_batch` rows: every GPU runs
    /// `global_batch / (micro_batch × devices)` micro-batches.
    pub devices: usize,
    /// Log (progress bar + metrics.jsonl) every N optimizer steps.
    pub log_every: usize,
    /// Save a checkpoint every N steps (0 = only at the end).
    pub save_every: usize,
    /// Keep only the newest N step checkpoints, deleting older ones once a newer one is whole
    /// (0 = keep all). A Llama-3.2-1B checkpoint with its optimizer state is ~15 GB.
    pub keep_last: usize,
    /// Stop after this many consecutive non-finite steps (each is skipped).
    pub max_bad_steps: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            out_dir: "runs/default".into(),
            micro_batch: 4,
            global_batch: 128,
            max_steps: 3000,
            lr: 2e-5,
            min_lr: 0.0,
            warmup_steps: 100,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            seed: 1337,
            precision: Precision::Auto,
            tf32: false,
            kernels: crate::fused::Kernels::Fused,
            gemm: crate::fused::gemm::GemmAlgorithm::Measured,
            checkpoint_layers: false,
            device: DeviceChoice::Auto,
            devices: 1,
            log_every: 10,
            save_every: 0,
            keep_last: 0,
            max_bad_steps: 5,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Evaluate every N optimizer steps (0 = only initial/final).
    pub every: usize,
    /// Batches of the fixed validation subset used by periodic evals.
    pub max_batches: usize,
    pub initial: bool,
    /// Final validation over the whole validation split.
    #[serde(rename = "final")]
    pub final_full: bool,
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            every: 100,
            max_batches: 100,
            initial: true,
            final_full: true,
        }
    }
}

fn d_val_fraction() -> f64 {
    0.03865
}
fn d_split_seed() -> u64 {
    42
}
fn d_seq() -> usize {
    256
}
fn d_distill_weight() -> f64 {
    1.0
}
fn d_temperature() -> f64 {
    1.0
}

impl Config {
    /// Read a TOML file, apply `key=value` overrides, resolve paths relative to the file, validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let mut cfg = Self::parse(&text, overrides).with_context(|| format!("in config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let teacher = cfg.distill.as_mut().map(|d| &mut d.teacher);
        let paths = [&mut cfg.model.path, &mut cfg.data.path].into_iter();
        for p in paths.chain(&mut cfg.data.extra_train).chain(teacher) {
            if p.is_relative() && !p.exists() && base.join(&*p).exists() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    pub fn parse(text: &str, overrides: &[String]) -> Result<Config> {
        let mut value: toml::Value = toml::from_str(text).context("invalid TOML")?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let cfg: Config = value
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{}", explain(e.message(), &value)))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.micro_batch == 0 || t.global_batch == 0 || !t.global_batch.is_multiple_of(t.micro_batch) {
            bail!(
                "train.global_batch ({}) must be a positive multiple of train.micro_batch ({})",
                t.global_batch,
                t.micro_batch
            );
        }
        if t.devices == 0 || !t.global_batch.is_multiple_of(t.micro_batch * t.devices) {
            bail!(
                "train.global_batch ({}) must be a multiple of train.micro_batch × train.devices ({} × {}): \
                 every GPU runs the same number of micro-batches",
                t.global_batch,
                t.micro_batch,
                t.devices
            );
        }
        if t.lr <= 0.0 || !t.lr.is_finite() || t.min_lr < 0.0 || t.min_lr > t.lr {
            bail!(
                "train.lr must be positive and train.min_lr in [0, lr] (lr {}, min_lr {})",
                t.lr,
                t.min_lr
            );
        }
        if !(0.0..1.0).contains(&t.beta1) || !(0.0..1.0).contains(&t.beta2) || t.eps <= 0.0 {
            bail!("train.beta1/beta2 must be in [0, 1) and train.eps positive");
        }
        if self.data.max_seq_length < 2 {
            bail!("data.max_seq_length must be at least 2");
        }
        if t.max_steps == 0 {
            bail!("train.max_steps must be at least 1");
        }
        if let Some(q) = &self.quant {
            q.validate()?;
        }
        if let Some(d) = &self.distill {
            if !(d.weight > 0.0 && d.weight <= 1.0) {
                bail!(
                    "distill.weight must be in (0, 1], got {} (remove [distill] to train without a teacher)",
                    d.weight
                );
            }
            if !(d.temperature > 0.0 && d.temperature.is_finite()) {
                bail!("distill.temperature must be positive, got {}", d.temperature);
            }
        }
        Ok(())
    }

    pub fn val_size(&self) -> ValSize {
        match self.data.val_records {
            Some(n) => ValSize::Records(n),
            None => ValSize::Fraction(self.data.val_fraction),
        }
    }

    /// The records of `data.path`, split into (train, val) as training splits them.
    pub fn split_records(&self) -> Result<(Vec<Record>, Vec<Record>)> {
        data::split(
            data::alpaca::load_records(&self.data.path)?,
            self.val_size(),
            self.data.split_seed,
        )
    }

    /// Micro-batches per optimizer step, over all devices.
    pub fn accum(&self) -> usize {
        self.train.global_batch / self.train.micro_batch
    }

    /// Micro-batches per optimizer step on each device.
    pub fn accum_per_device(&self) -> usize {
        self.accum() / self.train.devices
    }
}

/// serde's message made to name the field: "unknown field `x`, expected one of `a`, `b`" gets the
/// closest valid key, if one is close; "unknown variant `x`, expected …" (a value outside an option's
/// choices, which serde reports without its key) gets the key that holds it.
fn explain(message: &str, value: &toml::Value) -> String {
    let quoted: Vec<&str> = message.split('`').skip(1).step_by(2).collect();
    if message.starts_with("unknown variant") && !quoted.is_empty() {
        let mut keys = Vec::new();
        keys_holding(value, quoted[0], "", &mut keys);
        if let [key] = keys.as_slice() {
            return format!("{key}: {message}");
        }
    }
    if !message.starts_with("unknown field") || quoted.len() < 2 {
        return message.to_string();
    }
    let (typo, valid) = (quoted[0], &quoted[1..]);
    match valid.iter().map(|v| (edit_distance(typo, v), *v)).min() {
        Some((d, v)) if d <= 2.max(typo.len() / 3) => format!("{message} (did you mean `{v}`?)"),
        _ => message.to_string(),
    }
}

/// The dotted keys under `path` whose value is the string `text`.
fn keys_holding(value: &toml::Value, text: &str, path: &str, keys: &mut Vec<String>) {
    match value {
        toml::Value::String(s) if s == text => keys.push(path.to_string()),
        toml::Value::Table(table) => {
            for (k, v) in table {
                let key = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                keys_holding(v, text, &key, keys);
            }
        }
        _ => {}
    }
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + (ca != *cb) as usize).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// `section.key=value` (dotted path, TOML value; a bare word is taken as a string).
pub fn apply_override(root: &mut toml::Value, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .with_context(|| format!("--set {assignment:?} must look like section.key=value"))?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut node = root;
    for part in &parts[..parts.len() - 1] {
        let table = node
            .as_table_mut()
            .with_context(|| format!("--set {key}: `{part}` is not a table"))?;
        node = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
    let table = node
        .as_table_mut()
        .with_context(|| format!("--set {key}: parent is not a table"))?;
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}
