//! Model checkpoints in HF layout: `config.json`, `model.safetensors` (or a sharded index) and
//! `tokenizer.json`. A `.gguf` path is imported through `gguf.rs`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

use super::config::LlamaConfig;

/// A model as read from disk: its config, f32 tensors on the CPU keyed by HF name, and its tokenizer.
pub struct LoadedModel {
    pub cfg: LlamaConfig,
    pub tensors: BTreeMap<String, Tensor>,
    pub tokenizer: Tokenizer,
}

/// Load an HF directory or a `.gguf` file.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        return super::gguf::import(path);
    }
    if !path.is_dir() {
        bail!(
            "model path {} is neither an HF checkpoint directory nor a .gguf file (check `model` in the config or --ckpt)",
            path.display()
        );
    }
    let config_file = path.join("config.json");
    let text = std::fs::read_to_string(&config_file).with_context(|| format!("reading {}", config_file.display()))?;
    let cfg = LlamaConfig::from_hf_json(&text).with_context(|| format!("in {}", config_file.display()))?;
    let tokenizer = load_tokenizer(&path.join("tokenizer.json"))?;
    // Valid JSON by now: from_hf_json parsed it.
    let raw: serde_json::Value = serde_json::from_str(&text)?;
    let tensors = if crate::export::packed::is_packed(&raw) {
        crate::export::packed::load(&path.join("model.safetensors"), &raw)?
    } else {
        load_safetensors_dir(path)?
    };
    Ok(LoadedModel {
        cfg,
        tensors,
        tokenizer,
    })
}

pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        bail!(
            "{} is missing: an HF checkpoint directory needs its tokenizer.json",
            path.display()
        );
    }
    Tokenizer::from_file(path).map_err(|e| anyhow::anyhow!("reading tokenizer {}: {e}", path.display()))
}

/// The safetensors files of an HF directory: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        bail!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no `weight_map` object", index.display()))?;
    let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Read every tensor of an HF directory as f32 on the CPU (bf16, f16 and f32 accepted).
pub fn load_safetensors_dir(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for file in weight_files(dir)? {
        for (name, t) in load_safetensors_file(&file)? {
            if out.insert(name.clone(), t).is_some() {
                bail!(
                    "tensor `{name}` appears in more than one shard (second in {})",
                    file.display()
                );
            }
        }
    }
    Ok(out)
}

pub fn load_safetensors_file(file: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| {
        format!(
            "{} is not a valid safetensors file (truncated or corrupt header?)",
            file.display()
        )
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => bail!(
                "tensor `{name}` in {} has dtype {other:?}; model weights must be F32, F16 or BF16",
                file.display()
            ),
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
            .with_context(|| format!("tensor `{name}` in {}", file.display()))?;
        out.insert(name, t.to_dtype(DType::F32)?);
    }
    Ok(out)
}

/// Write tensors as one safetensors file (through a temporary name, then renamed into place).
pub fn save_safetensors(tensors: &BTreeMap<String, Tensor>, dtype: DType, path: &Path) -> Result<()> {
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    crate::fsutil::write_atomic_with(path, |tmp| {
        candle_core::safetensors::save(&cpu, tmp).with_context(|| format!("writing {}", tmp.display()))
    })
}

/// Write an HF checkpoint's model files into `dir` (which must exist). Weights are stored as `dtype`
/// (f32 is exact; the master weights are f32).
pub fn save_hf(
    dir: &Path,
    cfg: &LlamaConfig,
    tensors: &BTreeMap<String, Tensor>,
    tok: &Tokenizer,
    dtype: DType,
) -> Result<()> {
    save_safetensors(tensors, dtype, &dir.join("model.safetensors"))?;
    let mut config: serde_json::Value = serde_json::from_str(&cfg.to_hf_json())?;
    config["torch_dtype"] = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
    .into();
    save_hf_side_files(dir, cfg, &config, tok)
}

/// config.json (as given), tokenizer.json and generation_config.json.
pub fn save_hf_side_files(dir: &Path, cfg: &LlamaConfig, config: &serde_json::Value, tok: &Tokenizer) -> Result<()> {
    crate::fsutil::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(config)?.as_bytes(),
    )?;
    let tok_json = tok
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serialising tokenizer: {e}"))?;
    crate::fsutil::write_atomic(&dir.join("tokenizer.json"), tok_json.as_bytes())?;
    let mut gen = serde_json::json!({ "do_sample": false });
    if let Some(b) = cfg.bos_token_id {
        gen["bos_token_id"] = b.into();
    }
    if !cfg.eos_token_ids.is_empty() {
        gen["eos_token_id"] = cfg.eos_token_ids.clone().into();
    }
    crate::fsutil::write_atomic(&dir.join("generation_config.json"), gen.to_string().as_bytes())
}
