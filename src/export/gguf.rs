//! GGUF v3 export in llama.cpp's Llama layout: llama.cpp tensor names, q/k rows re-interleaved for its
//! RoPE, tied embeddings as a missing `output.weight`, Llama-3 RoPE scaling as `rope_freqs.weight`, and
//! the byte-level BPE tokenizer as `tokenizer.ggml.*` metadata.
//!
//! On-grid tensors are written as Q4_0 (codes in −8..7) or Q8_0 (codes in −128..127) when every block of
//! 32 along a row shares one scale that is an exact f16 value: then `d · q` dequantizes to the checkpoint's
//! f32 value bit for bit. A grid of 2 or 3 bits also fits Q4_0 exactly (with unused codes).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use half::f16;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use super::{Codes, FloatType, Stored};
use crate::model::config::LlamaConfig;
use crate::model::gguf::translate_name;
use crate::model::io::LoadedModel;

/// GGML tensor types written here (ids from ggml.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q8_0 = 8,
    Bf16 = 30,
}

/// Elements per quantized block of Q4_0 and Q8_0.
pub const BLOCK: usize = 32;

/// A GGUF metadata value (the subset llama.cpp's Llama metadata needs).
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

/// A tensor ready to write: GGUF dims (innermost first), GGML type id, raw bytes.
pub struct RawTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
}

const ALIGNMENT: usize = 32;

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

impl Value {
    fn type_id(&self) -> u32 {
        match self {
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Strs(_) | Value::I32s(_) => 9,
        }
    }

    fn put(&self, w: &mut impl Write) -> std::io::Result<()> {
        match self {
            Value::U32(x) => w.write_all(&x.to_le_bytes()),
            Value::I32(x) => w.write_all(&x.to_le_bytes()),
            Value::F32(x) => w.write_all(&x.to_le_bytes()),
            Value::Bool(x) => w.write_all(&[*x as u8]),
            Value::Str(s) => put_str(w, s),
            Value::Strs(v) => {
                w.write_all(&8u32.to_le_bytes())?;
                w.write_all(&(v.len() as u64).to_le_bytes())?;
                v.iter().try_for_each(|s| put_str(w, s))
            }
            Value::I32s(v) => {
                w.write_all(&5u32.to_le_bytes())?;
                w.write_all(&(v.len() as u64).to_le_bytes())?;
                v.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
            }
        }
    }
}

/// Write a GGUF v3 file (header, metadata, tensor infos, 32-byte aligned data) to `w`.
pub fn write_gguf(w: &mut impl Write, metadata: &[(&str, Value)], tensors: &[RawTensor]) -> std::io::Result<()> {
    w.write_all(b"GGUF")?;
    w.write_all(&3u32.to_le_bytes())?;
    w.write_all(&(tensors.len() as u64).to_le_bytes())?;
    w.write_all(&(metadata.len() as u64).to_le_bytes())?;
    let mut pos = 24usize;
    for (key, value) in metadata {
        let mut buf = Vec::new();
        put_str(&mut buf, key)?;
        buf.extend_from_slice(&value.type_id().to_le_bytes());
        value.put(&mut buf)?;
        pos += buf.len();
        w.write_all(&buf)?;
    }
    let padded = |n: usize| n.div_ceil(ALIGNMENT) * ALIGNMENT;
    let mut offset = 0usize;
    for t in tensors {
        let mut buf = Vec::new();
        put_str(&mut buf, &t.name)?;
        buf.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| buf.extend_from_slice(&d.to_le_bytes()));
        buf.extend_from_slice(&t.ggml_type.to_le_bytes());
        buf.extend_from_slice(&(offset as u64).to_le_bytes());
        pos += buf.len();
        w.write_all(&buf)?;
        offset = padded(offset + t.data.len());
    }
    w.write_all(&vec![0u8; padded(pos) - pos])?;
    for t in tensors {
        w.write_all(&t.data)?;
        w.write_all(&vec![0u8; padded(t.data.len()) - t.data.len()])?;
    }
    Ok(())
}

/// llama.cpp pairs RoPE dimensions (2i, 2i+1); HF pairs (i, i + d/2). The inverse of `unpermute_rows`,
/// applied to any per-row data laid out as `rows × cols`.
fn permute_rows<T: Copy>(data: &[T], rows: usize, cols: usize, heads: usize) -> Vec<T> {
    let hd = rows / heads;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..heads {
        for i in 0..hd / 2 {
            for half in 0..2 {
                let src = h * hd + half * (hd / 2) + i;
                out.extend_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Q4_0 or Q8_0 bytes of on-grid codes, or why they do not fit.
fn quantized_blocks(codes: &[i8], scales: &[f32], cols: usize) -> std::result::Result<(GgmlType, Vec<u8>), String> {
    if !cols.is_multiple_of(BLOCK) {
        return Err(format!("rows of {cols} are not a multiple of GGUF's block of {BLOCK}"));
    }
    for (b, block) in scales.chunks(BLOCK).enumerate() {
        if block.iter().any(|s| *s != block[0]) {
            return Err(format!(
                "block {b} of {BLOCK} spans two scales (group_size must be a multiple of {BLOCK})"
            ));
        }
        if f16::from_f32(block[0]).to_f32() != block[0] {
            return Err(format!("scale {} of block {b} is not an f16 value", block[0]));
        }
    }
    let (lo, hi) = codes.iter().fold((0i8, 0i8), |(lo, hi), &c| (lo.min(c), hi.max(c)));
    let fits_q4 = lo >= -8 && hi <= 7;
    let mut out = Vec::new();
    for (block, s) in codes.chunks(BLOCK).zip(scales.chunks(BLOCK)) {
        out.extend_from_slice(&f16::from_f32(s[0]).to_le_bytes());
        if fits_q4 {
            // Q4_0: byte j holds element j (low nibble) and element j + 16 (high nibble), offset by 8.
            for j in 0..BLOCK / 2 {
                out.push(((block[j] + 8) as u8) | (((block[j + BLOCK / 2] + 8) as u8) << 4));
            }
        } else {
            out.extend(block.iter().map(|&c| c as u8));
        }
    }
    Ok((if fits_q4 { GgmlType::Q4_0 } else { GgmlType::Q8_0 }, out))
}

/// `t` as little-endian bytes of the GGML float type `float` stands for.
fn float_bytes(t: &Tensor, float: FloatType) -> Result<(GgmlType, Vec<u8>)> {
    let ggml_type = match float {
        FloatType::F32 => GgmlType::F32,
        FloatType::F16 => GgmlType::F16,
        FloatType::Bf16 => GgmlType::Bf16,
    };
    let cpu = t
        .to_dtype(float.dtype())?
        .to_device(&candle_core::Device::Cpu)?
        .contiguous()?;
    Ok((ggml_type, safetensors::View::data(&cpu).into_owned()))
}

/// llama.cpp's per-frequency RoPE divisors for Llama-3 scaling (what its converter writes).
fn rope_freqs(cfg: &LlamaConfig) -> Option<RawTensor> {
    let factors = crate::model::ops::llama3_rope_divisors(cfg)?;
    Some(RawTensor {
        name: "rope_freqs.weight".into(),
        dims: vec![factors.len() as u64],
        ggml_type: GgmlType::F32 as u32,
        data: factors.iter().flat_map(|&f| (f as f32).to_le_bytes()).collect(),
    })
}

/// Write `model` as a GGUF file at `out` (atomically); on-grid selected tensors in Q4_0 / Q8_0.
pub fn write(
    model: &LoadedModel,
    codes: &BTreeMap<String, std::result::Result<Codes, String>>,
    float: FloatType,
    out: &Path,
) -> Result<Vec<Stored>> {
    let cfg = &model.cfg;
    let mut tensors = Vec::new();
    let mut report = Vec::new();
    for (name, t) in &model.tensors {
        let dims = t.dims().to_vec();
        let heads = match name {
            n if n.ends_with("q_proj.weight") => Some(cfg.num_attention_heads),
            n if n.ends_with("k_proj.weight") => Some(cfg.num_key_value_heads),
            _ => None,
        };
        let reorder = |v: Vec<f32>| match heads {
            Some(h) => permute_rows(&v, dims[0], dims[1], h),
            None => v,
        };
        let mut note = None;
        let mut quantized = None;
        match codes.get(name) {
            Some(Ok(Codes::Uniform {
                codes, element_scale, ..
            })) if dims.len() == 2 => {
                let (c, s) = match heads {
                    Some(h) => (
                        permute_rows(codes, dims[0], dims[1], h),
                        permute_rows(element_scale, dims[0], dims[1], h),
                    ),
                    None => (codes.clone(), element_scale.clone()),
                };
                match quantized_blocks(&c, &s, dims[1]) {
                    Ok(q) => quantized = Some(q),
                    Err(why) => note = Some(why),
                }
            }
            Some(Ok(Codes::Levels { .. })) => note = Some("explicit level lists have no GGUF type".into()),
            Some(Ok(_)) => note = Some("not a matrix".into()),
            Some(Err(why)) => note = Some(why.clone()),
            None => {}
        }
        // Norms stay f32 whatever `float` says: llama.cpp expects them so, and they are tiny.
        let float = if dims.len() == 1 { FloatType::F32 } else { float };
        let (ggml_type, data) = match quantized {
            Some(q) => q,
            None => {
                let t = Tensor::from_vec(
                    reorder(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
                    t.shape(),
                    t.device(),
                )?;
                float_bytes(&t, float)?
            }
        };
        report.push(Stored {
            name: name.clone(),
            storage: format!("{ggml_type:?}").to_uppercase(),
            exact: ggml_type != GgmlType::F16 && ggml_type != GgmlType::Bf16,
            note,
        });
        tensors.push(RawTensor {
            name: translate_name(name, false).with_context(|| format!("tensor `{name}` has no llama.cpp name"))?,
            dims: dims.iter().rev().map(|&d| d as u64).collect(),
            ggml_type: ggml_type as u32,
            data,
        });
    }
    tensors.extend(rope_freqs(cfg));
    let metadata = metadata(model, &tensors)?;
    crate::fsutil::write_atomic_with(out, |tmp| {
        let file = std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        write_gguf(&mut w, &metadata, &tensors).with_context(|| format!("writing {}", tmp.display()))?;
        w.flush().with_context(|| format!("writing {}", tmp.display()))
    })?;
    Ok(report)
}

/// llama.cpp's `general.file_type`: the type most weights have.
fn file_type(tensors: &[RawTensor]) -> u32 {
    let mut bytes_by_type: BTreeMap<u32, usize> = BTreeMap::new();
    for t in tensors.iter().filter(|t| t.dims.len() == 2) {
        *bytes_by_type.entry(t.ggml_type).or_default() += t.dims.iter().product::<u64>() as usize;
    }
    let most = bytes_by_type.into_iter().max_by_key(|(_, n)| *n).map(|(t, _)| t);
    match most {
        Some(1) => 1,   // MOSTLY_F16
        Some(2) => 2,   // MOSTLY_Q4_0
        Some(8) => 7,   // MOSTLY_Q8_0
        Some(30) => 32, // MOSTLY_BF16
        _ => 0,         // ALL_F32
    }
}

fn metadata(model: &LoadedModel, tensors: &[RawTensor]) -> Result<Vec<(&'static str, Value)>> {
    let cfg = &model.cfg;
    let tok = TokenizerMeta::from_tokenizer(&model.tokenizer, cfg.vocab_size)?;
    let mut m = vec![
        ("general.architecture", Value::Str("llama".into())),
        ("general.name", Value::Str("proxqat export".into())),
        ("general.file_type", Value::U32(file_type(tensors))),
        ("general.quantization_version", Value::U32(2)),
        ("general.alignment", Value::U32(ALIGNMENT as u32)),
        ("llama.vocab_size", Value::U32(cfg.vocab_size as u32)),
        ("llama.context_length", Value::U32(cfg.max_position_embeddings as u32)),
        ("llama.embedding_length", Value::U32(cfg.hidden_size as u32)),
        ("llama.block_count", Value::U32(cfg.num_hidden_layers as u32)),
        ("llama.feed_forward_length", Value::U32(cfg.intermediate_size as u32)),
        ("llama.attention.head_count", Value::U32(cfg.num_attention_heads as u32)),
        (
            "llama.attention.head_count_kv",
            Value::U32(cfg.num_key_value_heads as u32),
        ),
        ("llama.attention.key_length", Value::U32(cfg.head_dim as u32)),
        ("llama.attention.value_length", Value::U32(cfg.head_dim as u32)),
        ("llama.rope.dimension_count", Value::U32(cfg.head_dim as u32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
        ("tokenizer.ggml.model", Value::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Value::Str(tok.pre.into())),
        ("tokenizer.ggml.tokens", Value::Strs(tok.tokens)),
        ("tokenizer.ggml.token_type", Value::I32s(tok.types)),
        ("tokenizer.ggml.merges", Value::Strs(tok.merges)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(tok.adds_bos)),
    ];
    if let Some(b) = cfg.bos_token_id {
        m.push(("tokenizer.ggml.bos_token_id", Value::U32(b)));
    }
    if let Some(&e) = cfg.eos_token_ids.first() {
        m.push(("tokenizer.ggml.eos_token_id", Value::U32(e)));
    }
    Ok(m)
}

/// A byte-level BPE tokenizer as llama.cpp's `tokenizer.ggml.*` arrays.
struct TokenizerMeta {
    pre: &'static str,
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    adds_bos: bool,
}

impl TokenizerMeta {
    fn from_tokenizer(tok: &tokenizers::Tokenizer, vocab_size: usize) -> Result<Self> {
        let json: serde_json::Value = serde_json::from_str(
            &tok.to_string(false)
                .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?,
        )?;
        let model = &json["model"];
        if model["type"] != "BPE" {
            bail!(
                "GGUF export writes byte-level BPE tokenizers (llama.cpp \"gpt2\"); this one is {}",
                model["type"]
            );
        }
        let vocab = model["vocab"]
            .as_object()
            .context("tokenizer.json: model.vocab is not an object")?;
        let mut tokens = vec![None; vocab_size];
        let mut types = vec![5i32; vocab_size]; // UNUSED until named
        let mut place = |id: u64, text: &str, ty: i32| -> Result<()> {
            let slot = tokens.get_mut(id as usize).with_context(|| {
                format!("token {text:?} has id {id}, outside the model's vocabulary of {vocab_size}")
            })?;
            *slot = Some(text.to_string());
            types[id as usize] = ty;
            Ok(())
        };
        for (text, id) in vocab {
            place(
                id.as_u64().context("tokenizer.json: a vocab id is not an integer")?,
                text,
                1,
            )?;
        }
        for added in json["added_tokens"].as_array().into_iter().flatten() {
            let ty = if added["special"] == true { 3 } else { 4 };
            let id = added["id"]
                .as_u64()
                .context("tokenizer.json: an added token has no id")?;
            place(id, added["content"].as_str().unwrap_or_default(), ty)?;
        }
        // llama.cpp needs one token per embedding row; unnamed rows get placeholder names.
        let tokens = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
            .collect();
        let merges = model["merges"]
            .as_array()
            .context("tokenizer.json: model.merges is not a list")?
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Array(pair) if pair.len() == 2 => Ok(format!(
                    "{} {}",
                    pair[0].as_str().unwrap_or_default(),
                    pair[1].as_str().unwrap_or_default()
                )),
                other => bail!("tokenizer.json: merge {other} is neither \"a b\" nor [a, b]"),
            })
            .collect::<Result<_>>()?;
        let adds_bos = json["post_processor"].to_string().contains("SpecialToken");
        Ok(TokenizerMeta {
            pre: pre_tokenizer_name(&json["pre_tokenizer"])?,
            tokens,
            types,
            merges,
            adds_bos,
        })
    }
}

/// llama.cpp's name for the pre-tokenizers proxqat knows (the inverse of the importer's table).
fn pre_tokenizer_name(pre: &serde_json::Value) -> Result<&'static str> {
    let text = pre.to_string();
    if text.contains("\"Split\"") && text.contains(r"\\p{N}{1,3}") {
        Ok("llama-bpe")
    } else if text.contains("\"Digits\"") && text.contains("\"individual_digits\":true") {
        Ok("smollm")
    } else if pre["type"] == "ByteLevel" {
        Ok("gpt2")
    } else {
        bail!("the tokenizer's pre-tokenizer {text} has no llama.cpp name proxqat knows (llama-bpe, smollm, gpt2)")
    }
}
