//! GGUF import: dequantize every tensor to f32, rename to HF names, undo llama.cpp's interleaved-RoPE
//! row order of attn_q / attn_k, and rebuild the tokenizer from `tokenizer.ggml.*` metadata.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tokenizers::Tokenizer;

use super::config::{Llama3RopeScaling, LlamaConfig};
use super::io::LoadedModel;

/// llama.cpp permutes q/k rows per head so that RoPE pairs are adjacent; HF pairs the two halves.
/// View rows as (heads, head_dim/2, 2, d), swap the middle axes, view back.
pub fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// llama.cpp's names of the whole-model tensors and HF's, both directions of import and export.
const FIXED_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// llama.cpp's names of a layer's tensors (after `blk.N.`) and HF's (after `model.layers.N.`).
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// Translate a tensor name between the two conventions: `to_hf` from llama.cpp to HF, else back.
/// None for names outside the Llama layout.
pub fn translate_name(name: &str, to_hf: bool) -> Option<String> {
    let pick = |pair: &(&'static str, &'static str)| if to_hf { *pair } else { (pair.1, pair.0) };
    if let Some((_, to)) = FIXED_NAMES.iter().map(pick).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (from_prefix, to_prefix) = if to_hf {
        ("blk.", "model.layers.")
    } else {
        ("model.layers.", "blk.")
    };
    let (layer, part) = name.strip_prefix(from_prefix)?.split_once('.')?;
    let (_, to) = LAYER_NAMES.iter().map(pick).find(|(from, _)| *from == part)?;
    Some(format!("{to_prefix}{layer}.{to}"))
}

struct Meta<'a>(&'a HashMap<String, Value>, &'a Path);

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.0
            .get(key)
            .with_context(|| format!("{} lacks GGUF metadata key `{key}`", self.1.display()))
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        Ok(v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))?)
    }
    fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.0.get(key) {
            None => Ok(default),
            // GGUF stores f32; read it as the shortest decimal (1e-5, not 9.99999974e-6), as HF configs hold.
            Some(v) => Ok(v
                .to_f32()
                .map(|x| x.to_string().parse::<f64>().expect("a float's display parses"))
                .or_else(|_| v.to_f64())?),
        }
    }
    fn opt_u32(&self, key: &str) -> Option<u32> {
        self.0.get(key).and_then(|v| v.to_u32().ok())
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.get(key)?
            .to_vec()?
            .iter()
            .map(|v| Ok(v.to_string()?.clone()))
            .collect()
    }
}

pub fn import(path: &Path) -> Result<LoadedModel> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = Content::read(&mut file).with_context(|| {
        format!(
            "{} is not a readable GGUF file: corrupt, or a tensor type proxqat cannot read (it reads F32, F16, \
BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K..Q8_K; re-quantize the model to one of them)",
            path.display()
        )
    })?;
    let meta = Meta(&content.metadata, path);
    let arch = meta.get("general.architecture")?.to_string()?.clone();
    if arch != "llama" {
        bail!(
            "{}: GGUF architecture {arch:?} is not supported (proxqat imports \"llama\" GGUF files)",
            path.display()
        );
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let heads = meta.usize("llama.attention.head_count")?;
    let kv_heads = meta.usize("llama.attention.head_count_kv").unwrap_or(heads);
    let hidden = meta.usize("llama.embedding_length")?;
    let mut cfg = LlamaConfig {
        vocab_size: tokens.len(),
        hidden_size: hidden,
        intermediate_size: meta.usize("llama.feed_forward_length")?,
        num_hidden_layers: meta.usize("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: meta.usize("llama.attention.key_length").unwrap_or(hidden / heads),
        rms_norm_eps: meta.f64("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
        rope_theta: meta.f64("llama.rope.freq_base", 10_000.0)?,
        rope_scaling: None,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        max_position_embeddings: meta.usize("llama.context_length").unwrap_or(2048),
        bos_token_id: meta.opt_u32("tokenizer.ggml.bos_token_id"),
        eos_token_ids: meta.opt_u32("tokenizer.ggml.eos_token_id").into_iter().collect(),
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        let divisors = content
            .tensor(&mut file, "rope_freqs.weight", &Device::Cpu)?
            .dequantize(&Device::Cpu)?
            .to_vec1::<f32>()?;
        cfg.rope_scaling =
            Some(llama3_scaling_of(&cfg, &divisors).with_context(|| format!("{}: rope_freqs.weight", path.display()))?);
    }
    cfg.validate()
        .with_context(|| format!("GGUF metadata of {}", path.display()))?;

    let mut tensors = BTreeMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = translate_name(name, true) else {
            tracing::warn!(tensor = %name, "GGUF tensor not used by the Llama model; skipped");
            continue;
        };
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .with_context(|| format!("reading tensor `{name}` from {}", path.display()))?;
        let mut t = q
            .dequantize(&Device::Cpu)
            .with_context(|| format!("dequantizing `{name}`"))?;
        if name.ends_with("attn_q.weight") {
            t = unpermute_rows(&t, heads)?;
        } else if name.ends_with("attn_k.weight") {
            t = unpermute_rows(&t, kv_heads)?;
        }
        tensors.insert(hf, t);
    }
    let tokenizer = tokenizer_from_meta(&meta, tokens)?;
    Ok(LoadedModel {
        cfg,
        tensors,
        tokenizer,
    })
}

/// The Llama-3 RoPE scaling whose divisors llama.cpp stored as `rope_freqs.weight`: Meta's published
/// parameters (low 1, high 4, original context 8192) with `factor` the largest divisor. Other per-frequency
/// factors have no HF equivalent and are refused.
fn llama3_scaling_of(cfg: &LlamaConfig, divisors: &[f32]) -> Result<Llama3RopeScaling> {
    let scaling = Llama3RopeScaling {
        factor: divisors.iter().fold(1f32, |a, &b| a.max(b)) as f64,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let expected = crate::model::ops::llama3_rope_divisors(&LlamaConfig {
        rope_scaling: Some(scaling.clone()),
        ..cfg.clone()
    })
    .expect("scaling is set");
    let fits = expected.len() == divisors.len()
        && expected
            .iter()
            .zip(divisors)
            .all(|(e, &d)| ((*e as f32) - d).abs() <= 1e-6 * e.abs() as f32);
    if !fits {
        bail!("per-frequency RoPE factors that are not Llama-3 scaling (factor, low 1, high 4, context 8192) are not supported; load the HF checkpoint instead");
    }
    Ok(scaling)
}

/// llama.cpp's Llama-3 pre-tokenizer regex (the same as HF's Llama-3 tokenizer.json).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Build an HF `tokenizer.json` for a GGUF "gpt2" (byte-level BPE) vocabulary and parse it.
fn tokenizer_from_meta(meta: &Meta, tokens: Vec<String>) -> Result<Tokenizer> {
    let model = meta.get("tokenizer.ggml.model")?.to_string()?.clone();
    if model != "gpt2" {
        bail!(
            "{}: tokenizer model {model:?} is not supported (proxqat rebuilds byte-level BPE, \"gpt2\")",
            meta.1.display()
        );
    }
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match meta.0.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|x| x.to_i32().map(|t| t as i64).unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let pre = meta
        .0
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let byte_level = |use_regex: bool| serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre_tokenizer = match pre.as_str() {
        // SmolLM/StarCoder-style: every digit alone, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]})
        }
        "llama-bpe" | "llama3" => serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        "" | "default" | "gpt2" => byte_level(true),
        other => bail!("{}: GGUF pre-tokenizer {other:?} is not supported", meta.1.display()),
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), (i as u64).into()))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": true})
        })
        .collect();
    let add_bos = meta
        .0
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let post_processor = match (add_bos, meta.opt_u32("tokenizer.ggml.bos_token_id")) {
        (true, Some(bos)) => {
            let bos_tok = tokens
                .get(bos as usize)
                .context("bos_token_id is outside the vocabulary")?;
            serde_json::json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos_tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos_tok.clone(): {"id": bos_tok, "ids": [bos], "tokens": [bos_tok]}}})
        }
        _ => serde_json::Value::Null,
    };
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    });
    json.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| anyhow::anyhow!("{}: rebuilding the tokenizer from GGUF metadata: {e}", meta.1.display()))
}
