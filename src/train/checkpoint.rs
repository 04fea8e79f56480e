//! Checkpoints: an HF model directory (loadable by `transformers`) plus the training state beside it.
//!
//! ```text
//! OUT/step-000100/  config.json model.safetensors tokenizer.json generation_config.json
//!                   optimizer.safetensors (m.NAME, v.NAME; learned scales: m.scale.NAME, v.scale.NAME)
//!                   quant_state.safetensors (scale.NAME, sens.NAME; learned scales: master_scale.NAME)
//!                   trainer_state.json (step, data cursor, controllers, the run's config)
//! OUT/latest        name of the newest complete checkpoint (moved only after it is whole)
//! ```

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::data::Cursor;
use crate::fsutil;
use crate::model::io::{self, LoadedModel};
use crate::quant::{DualState, GammaState};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    pub cursor: Cursor,
    pub adam_t: u64,
    pub dual: Option<DualState>,
    pub gamma: Option<GammaState>,
    pub bad_steps: usize,
    pub config: Config,
}

/// Everything a checkpoint directory holds (training state absent for plain HF dirs and GGUF files).
pub struct Checkpoint {
    pub dir: PathBuf,
    pub model: LoadedModel,
    pub state: Option<TrainerState>,
    pub optimizer: BTreeMap<String, Tensor>,
    pub quant: BTreeMap<String, Tensor>,
}

/// `DIR` itself, or the checkpoint named by `DIR/latest` for a run directory.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let pointer = path.join("latest");
    if path.is_dir() && pointer.is_file() {
        let name = std::fs::read_to_string(&pointer).with_context(|| format!("reading {}", pointer.display()))?;
        return Ok(path.join(name.trim()));
    }
    Ok(path.to_path_buf())
}

pub fn load(path: &Path) -> Result<Checkpoint> {
    let dir = resolve(path)?;
    if !dir.exists() {
        anyhow::bail!("checkpoint {} does not exist", dir.display());
    }
    let model = io::load_model(&dir)?;
    let state_file = dir.join("trainer_state.json");
    let state = if state_file.is_file() {
        let text = std::fs::read_to_string(&state_file).with_context(|| format!("reading {}", state_file.display()))?;
        Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", state_file.display()))?)
    } else {
        None
    };
    let optional = |name: &str| -> Result<BTreeMap<String, Tensor>> {
        let f = dir.join(name);
        if f.is_file() {
            io::load_safetensors_file(&f)
        } else {
            Ok(BTreeMap::new())
        }
    };
    let optimizer = optional("optimizer.safetensors")?;
    let quant = optional("quant_state.safetensors")?;
    Ok(Checkpoint {
        dir,
        model,
        state,
        optimizer,
        quant,
    })
}

/// What `save` writes besides the model.
pub struct SaveParts<'a> {
    pub state: &'a TrainerState,
    pub optimizer: BTreeMap<String, Tensor>,
    pub quant: BTreeMap<String, Tensor>,
}

/// Write a checkpoint directory atomically (an existing `dir` is replaced only with `overwrite`).
pub fn write(dir: &Path, overwrite: bool, model: &LoadedModel, parts: SaveParts) -> Result<()> {
    fsutil::write_dir_atomic(dir, overwrite, |tmp| {
        io::save_hf(tmp, &model.cfg, &model.tensors, &model.tokenizer, DType::F32)?;
        if !parts.optimizer.is_empty() {
            io::save_safetensors(&parts.optimizer, DType::F32, &tmp.join("optimizer.safetensors"))?;
        }
        if !parts.quant.is_empty() {
            io::save_safetensors(&parts.quant, DType::F32, &tmp.join("quant_state.safetensors"))?;
        }
        let json = serde_json::to_string_pretty(parts.state)?;
        fsutil::write_atomic(&tmp.join("trainer_state.json"), json.as_bytes())
    })
}

/// Write `out_dir/step-NNNNNN`, then move `out_dir/latest` to it; then, with `keep_last` > 0, delete
/// the step checkpoints older than it beyond the newest `keep_last − 1` (only once `latest` names the
/// whole new one, so a crash at any point leaves a loadable checkpoint; later steps, left by a run
/// resumed from an earlier checkpoint, are not touched). Partial checkpoints that a killed run left
/// under temporary names are deleted too.
pub fn save(out_dir: &Path, model: &LoadedModel, parts: SaveParts, keep_last: usize) -> Result<PathBuf> {
    let name = format!("step-{:06}", parts.state.step);
    let dir = out_dir.join(&name);
    write(&dir, true, model, parts)?;
    fsutil::write_atomic(&out_dir.join("latest"), name.as_bytes())?;
    if keep_last > 0 {
        let mut older: Vec<String> = step_checkpoints(out_dir)?.into_iter().filter(|n| *n < name).collect();
        older.sort();
        let excess = older.len().saturating_sub(keep_last - 1);
        for old in &older[..excess] {
            std::fs::remove_dir_all(out_dir.join(old))
                .with_context(|| format!("deleting old checkpoint {}", out_dir.join(old).display()))?;
        }
    }
    for partial in fsutil::remove_stale_temps(out_dir)? {
        tracing::warn!(path = %partial.display(), "deleted a partial checkpoint left by a killed run");
    }
    Ok(dir)
}

/// Names of the `step-NNNNNN` checkpoint directories in a run directory.
fn step_checkpoints(out_dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(out_dir).with_context(|| format!("listing {}", out_dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_step = name
            .strip_prefix("step-")
            .is_some_and(|n| n.len() == 6 && n.bytes().all(|b| b.is_ascii_digit()));
        if is_step && entry.file_type()?.is_dir() {
            names.push(name);
        }
    }
    Ok(names)
}
