//! Packed export: an HF directory whose on-grid tensors are stored as bit-packed integer codes plus
//! their grid's scales, described by `quantization_config` in config.json (and in the safetensors
//! header). `proxqat` loads such a directory back (dequantizing exactly) wherever it takes a checkpoint.
//!
//! Per selected tensor `NAME` of shape `[rows, cols]`:
//! - `NAME.codes` U8 `[rows, ceil(cols·bits/8)]`: unsigned codes, least significant bit first, each row
//!   starting on a byte. Uniform grids store `u = code + L` (L = 2^(bits−1) − 1), so `w = (u − L)·scale`;
//!   level grids store the level's index, so `w = levels[u]`.
//! - `NAME.scales` F16 (F32 if a scale is no f16 value) `[rows or 1, groups or 1]`: per-tensor `[1, 1]`,
//!   per-channel `[rows, 1]`, per-group `[rows, cols / group_size]`.
//! - `NAME.levels` F32 `[n]` for explicit level grids.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::f16;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::{Codes, FloatType, Stored};
use crate::model::io::LoadedModel;
use crate::quant::Quantizer;

pub const QUANT_METHOD: &str = "proxqat";

/// Pack unsigned codes of `bits` bits, row by row, LSB first.
pub fn pack(codes: &[u8], cols: usize, bits: usize) -> Vec<u8> {
    let row_bytes = (cols * bits).div_ceil(8);
    let mut out = Vec::with_capacity(codes.len() / cols * row_bytes);
    for row in codes.chunks(cols) {
        let mut bytes = vec![0u8; row_bytes];
        for (i, &c) in row.iter().enumerate() {
            for b in 0..bits {
                let bit = i * bits + b;
                bytes[bit / 8] |= ((c >> b) & 1) << (bit % 8);
            }
        }
        out.extend_from_slice(&bytes);
    }
    out
}

/// The inverse of `pack`.
pub fn unpack(packed: &[u8], rows: usize, cols: usize, bits: usize) -> Vec<u8> {
    let row_bytes = (cols * bits).div_ceil(8);
    let mut out = Vec::with_capacity(rows * cols);
    for row in packed.chunks(row_bytes).take(rows) {
        for i in 0..cols {
            let mut c = 0u8;
            for b in 0..bits {
                let bit = i * bits + b;
                c |= ((row[bit / 8] >> (bit % 8)) & 1) << b;
            }
            out.push(c);
        }
    }
    out
}

fn bits_for(n: usize) -> usize {
    (usize::BITS - (n.max(2) - 1).leading_zeros()) as usize
}

/// Write the packed directory at `out` (atomically).
pub fn write(
    model: &LoadedModel,
    quantizer: Option<&Quantizer>,
    codes: &BTreeMap<String, std::result::Result<Codes, String>>,
    float: FloatType,
    out: &Path,
    overwrite: bool,
) -> Result<Vec<Stored>> {
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut modules = serde_json::Map::new();
    let mut report = Vec::new();
    for (name, t) in &model.tensors {
        let code = match (codes.get(name), t.dims()) {
            (Some(Ok(c)), &[rows, cols]) => Some((c, rows, cols)),
            _ => None,
        };
        match code {
            Some((c, rows, cols)) => {
                let (kind, bits, unsigned) = match c {
                    Codes::Uniform { codes, half_levels, .. } => {
                        let l = *half_levels as i32;
                        let unsigned = codes.iter().map(|&c| (c as i32 + l) as u8).collect();
                        ("uniform", bits_for(2 * l as usize + 1), unsigned)
                    }
                    Codes::Levels { index, levels } => ("levels", bits_for(levels.len()), index.clone()),
                };
                let packed = pack(&unsigned, cols, bits);
                let row_bytes = packed.len() / rows;
                tensors.insert(
                    format!("{name}.codes"),
                    Tensor::from_vec(packed, (rows, row_bytes), &Device::Cpu)?,
                );
                match c {
                    Codes::Uniform { scale, .. } => {
                        // The grid's scale is [1, 1], [rows, 1] or [rows, groups, 1].
                        let scale_rows = scale.dims()[0];
                        let scale = scale.reshape((scale_rows, scale.elem_count() / scale_rows))?;
                        let values = scale.to_vec2::<f32>()?.concat();
                        let f16_exact = values.iter().all(|s| f16::from_f32(*s).to_f32() == *s);
                        let dtype = if f16_exact { DType::F16 } else { DType::F32 };
                        tensors.insert(format!("{name}.scales"), scale.to_dtype(dtype)?);
                    }
                    Codes::Levels { levels, .. } => {
                        tensors.insert(
                            format!("{name}.levels"),
                            Tensor::from_vec(levels.clone(), levels.len(), &Device::Cpu)?,
                        );
                    }
                }
                modules.insert(
                    name.clone(),
                    serde_json::json!({"shape": [rows, cols], "bits": bits, "grid": kind}),
                );
                report.push(Stored {
                    name: name.clone(),
                    storage: format!("packed {bits}-bit {kind}"),
                    exact: true,
                    note: None,
                });
            }
            None => {
                tensors.insert(name.clone(), t.to_dtype(float.dtype())?);
                report.push(Stored {
                    name: name.clone(),
                    storage: float.name().into(),
                    exact: float == FloatType::F32,
                    note: codes.get(name).and_then(|c| c.as_ref().err().cloned()),
                });
            }
        }
    }
    let grid = quantizer.map(|q| serde_json::to_value(&q.cfg.grid)).transpose()?;
    let qc = serde_json::json!({
        "quant_method": QUANT_METHOD,
        "format": "packed",
        "sym": true,
        "grid": grid,
        "codes": "unsigned, least significant bit first, rows start on a byte; uniform: w = (u - L) * scale with L = 2^(bits-1) - 1; levels: w = levels[u]",
        "modules": modules,
    });
    let mut config: serde_json::Value = serde_json::from_str(&model.cfg.to_hf_json())?;
    config["quantization_config"] = qc.clone();
    config["torch_dtype"] = float.torch_name().into();
    let header = HashMap::from([("quantization_config".to_string(), qc.to_string())]);
    crate::fsutil::write_dir_atomic(out, overwrite, |tmp| {
        crate::model::io::save_hf_side_files(tmp, &model.cfg, &config, &model.tokenizer)?;
        crate::fsutil::write_atomic_with(&tmp.join("model.safetensors"), |file| {
            safetensors::serialize_to_file(&tensors, Some(header), file)
                .with_context(|| format!("writing {}", file.display()))
        })
    })?;
    Ok(report)
}

/// Does `config.json` describe a packed proxqat export?
pub fn is_packed(config: &serde_json::Value) -> bool {
    config["quantization_config"]["quant_method"] == QUANT_METHOD
}

/// Dequantize a packed directory's tensors (read from `file`) exactly, keyed by HF name.
pub fn load(file: &Path, config: &serde_json::Value) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", file.display()))?;
    let modules = config["quantization_config"]["modules"]
        .as_object()
        .context("config.json: quantization_config.modules is missing")?;
    let raw = |name: &str| -> Result<Tensor> {
        let view = st
            .tensor(name)
            .with_context(|| format!("{} lacks tensor `{name}`", file.display()))?;
        let dtype = match view.dtype() {
            safetensors::Dtype::U8 => DType::U8,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F32 => DType::F32,
            other => bail!("tensor `{name}` in {} has dtype {other:?}", file.display()),
        };
        Ok(Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?)
    };
    let mut out = BTreeMap::new();
    for name in st.names() {
        let is_part = [".codes", ".scales", ".levels"]
            .iter()
            .any(|s| name.strip_suffix(s).is_some_and(|base| modules.contains_key(base)));
        if !is_part {
            out.insert(name.to_string(), raw(name)?.to_dtype(DType::F32)?);
        }
    }
    for (name, m) in modules {
        let shape: Vec<usize> = serde_json::from_value(m["shape"].clone())
            .with_context(|| format!("config.json: quantization_config.modules.{name}.shape"))?;
        let bits = m["bits"].as_u64().context("module without bits")? as usize;
        let [rows, cols] = shape[..] else {
            bail!("config.json: module {name} shape {shape:?} is not 2-D");
        };
        let codes = unpack(
            &raw(&format!("{name}.codes"))?.flatten_all()?.to_vec1::<u8>()?,
            rows,
            cols,
            bits,
        );
        let values: Vec<f32> = match m["grid"].as_str() {
            Some("uniform") => {
                let scales = raw(&format!("{name}.scales"))?.to_dtype(DType::F32)?;
                let (scale_rows, groups) = scales.dims2()?;
                let scales = scales.flatten_all()?.to_vec1::<f32>()?;
                let l = ((1i32 << (bits - 1)) - 1) as f32;
                let group_len = cols / groups;
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &u)| {
                        let (r, c) = (i / cols, i % cols);
                        let r = if scale_rows == 1 { 0 } else { r };
                        (u as f32 - l) * scales[r * groups + c / group_len]
                    })
                    .collect()
            }
            Some("levels") => {
                let levels = raw(&format!("{name}.levels"))?.to_vec1::<f32>()?;
                codes.iter().map(|&u| levels[u as usize]).collect()
            }
            other => bail!("config.json: module {name} has grid {other:?}"),
        };
        out.insert(name.clone(), Tensor::from_vec(values, (rows, cols), &Device::Cpu)?);
    }
    Ok(out)
}
