//! Export a checkpoint for use outside proxqat: HF safetensors, GGUF (llama.cpp) or packed int codes.
//!
//! A selected tensor is stored on its grid only when every entry already lies on it (a hardened
//! checkpoint); the codes and scales are then recovered exactly, so the file dequantizes to the very
//! same f32 values. Anything else is stored as floats, and the report says which and why.

pub mod gguf;
pub mod packed;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

use crate::model::io::LoadedModel;
use crate::quant::grid::TensorGrid;
use crate::quant::Quantizer;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// HF directory: safetensors (dequantized), config.json, tokenizer.json, generation_config.json.
    Hf,
    /// One llama.cpp GGUF file; on-grid tensors as Q4_0 / Q8_0.
    Gguf,
    /// HF directory whose on-grid tensors are bit-packed codes + f16 scales (`quantization_config`).
    Packed,
}

/// The float type of tensors that are not stored on a grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatType {
    /// Exact (the master weights are f32).
    F32,
    /// Half the size; rounds every value.
    F16,
    /// Half the size; rounds every value (and most grid points).
    Bf16,
}

impl FloatType {
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "F32",
            FloatType::F16 => "F16",
            FloatType::Bf16 => "BF16",
        }
    }

    /// The `torch_dtype` of an HF config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
            FloatType::Bf16 => "bfloat16",
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            FloatType::F32 => DType::F32,
            FloatType::F16 => DType::F16,
            FloatType::Bf16 => DType::BF16,
        }
    }
}

/// How one tensor was stored.
#[derive(Clone, Debug, Serialize)]
pub struct Stored {
    pub name: String,
    /// "Q4_0", "Q8_0", "F32", "packed 4-bit", ...
    pub storage: String,
    /// The file gives back exactly the checkpoint's f32 values.
    pub exact: bool,
    /// Why a selected tensor is not stored on its grid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub format: Format,
    pub out: std::path::PathBuf,
    pub bytes: u64,
    pub tensors: Vec<Stored>,
}

/// A selected tensor that lies exactly on its grid, as integer codes.
pub enum Codes {
    /// Uniform grid: `w = code · scale`, |code| ≤ L. `scale` is the grid's own scale tensor;
    /// `element_scale` is it broadcast to `w`'s shape.
    Uniform {
        codes: Vec<i8>,
        scale: Tensor,
        element_scale: Vec<f32>,
        half_levels: u32,
    },
    /// Explicit levels: `w = levels[index]`.
    Levels { index: Vec<u8>, levels: Vec<f32> },
}

/// The codes of `w` on `grid`, or why there are none (entries off the grid, too many levels).
pub fn grid_codes(grid: &TensorGrid, w: &Tensor) -> Result<std::result::Result<Codes, String>> {
    let w = w.to_dtype(DType::F32)?;
    let q = grid.quantize(&w)?;
    let off = w.ne(&q)?.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()?;
    if off > 0 {
        return Ok(Err(format!(
            "{off} of {} entries are off the grid (run `proxqat harden --all` first)",
            w.elem_count()
        )));
    }
    match grid {
        TensorGrid::Uniform {
            view,
            scale,
            half_levels,
        } => {
            let element_scale = scale.broadcast_as(view.as_slice())?.reshape(w.shape())?.contiguous()?;
            // q = r·s with s an f16 value and |r| ≤ 127 is exact in f32, so q / s is exactly r.
            let codes: Vec<i8> = (&w / &element_scale)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(|r| r as i8)
                .collect();
            Ok(Ok(Codes::Uniform {
                codes,
                scale: scale.to_dtype(DType::F32)?,
                element_scale: element_scale.flatten_all()?.to_vec1()?,
                half_levels: *half_levels as u32,
            }))
        }
        TensorGrid::Levels(levels) => {
            if levels.len() > 256 {
                return Ok(Err(format!("{} levels do not fit 8-bit codes", levels.len())));
            }
            let values = w.flatten_all()?.to_vec1::<f32>()?;
            let index = values
                .iter()
                .map(|v| levels.iter().position(|l| l == v).expect("every entry is on the grid") as u8)
                .collect();
            Ok(Ok(Codes::Levels {
                index,
                levels: levels.clone(),
            }))
        }
    }
}

/// The codes of every selected tensor of `model`, or the reason a tensor has none.
pub fn selected_codes(
    model: &LoadedModel,
    quantizer: Option<&Quantizer>,
) -> Result<BTreeMap<String, std::result::Result<Codes, String>>> {
    let mut out = BTreeMap::new();
    if let Some(qz) = quantizer {
        for (name, grid) in &qz.grids {
            let w = model
                .tensors
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("no tensor `{name}`"))?;
            // Export is host work: weights and scales on the CPU, wherever training ran.
            let w = w.to_device(&candle_core::Device::Cpu)?;
            out.insert(
                name.clone(),
                grid_codes(&grid.to_device(&candle_core::Device::Cpu)?, &w)?,
            );
        }
    }
    Ok(out)
}

pub struct Options<'a> {
    pub format: Format,
    pub out: &'a Path,
    pub float: FloatType,
    pub overwrite: bool,
}

/// Write `model` in `opts.format`; selected tensors on their grid are stored as codes where the format can.
pub fn export(model: &LoadedModel, quantizer: Option<&Quantizer>, opts: &Options) -> Result<Report> {
    if opts.out.is_dir() && opts.format == Format::Gguf {
        bail!(
            "--out {} is a directory; GGUF export writes one file",
            opts.out.display()
        );
    }
    if opts.out.exists() && !opts.overwrite {
        bail!(
            "{} already exists; choose another --out or pass --overwrite",
            opts.out.display()
        );
    }
    let codes = selected_codes(model, quantizer)?;
    let tensors = match opts.format {
        Format::Hf => {
            crate::fsutil::write_dir_atomic(opts.out, opts.overwrite, |tmp| {
                crate::model::io::save_hf(tmp, &model.cfg, &model.tensors, &model.tokenizer, opts.float.dtype())
            })?;
            float_report(model, &codes, opts.float)
        }
        Format::Gguf => gguf::write(model, &codes, opts.float, opts.out)?,
        Format::Packed => packed::write(model, quantizer, &codes, opts.float, opts.out, opts.overwrite)?,
    };
    Ok(Report {
        format: opts.format,
        out: opts.out.to_path_buf(),
        bytes: size_on_disk(opts.out),
        tensors,
    })
}

/// Every tensor stored as floats of `float`: exact only in f32.
fn float_report(
    model: &LoadedModel,
    codes: &BTreeMap<String, std::result::Result<Codes, String>>,
    float: FloatType,
) -> Vec<Stored> {
    model
        .tensors
        .keys()
        .map(|name| Stored {
            name: name.clone(),
            storage: float.name().into(),
            exact: float == FloatType::F32,
            note: codes.get(name).and_then(|c| c.as_ref().err().cloned()),
        })
        .collect()
}

fn size_on_disk(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}
