//! Evaluation: validation loss at the float, hardened (q) and selectively hardened (fsq) weights on the
//! same batches; text perplexity under the GPTQ protocol; greedy generation.

use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::collections::BTreeMap;
use tokenizers::Tokenizer;

use crate::data::Batch;
use crate::model::{Llama, Params};
use crate::quant::{Quantizer, View};

#[derive(Clone, Debug, Serialize)]
pub struct Losses {
    pub fp: f64,
    pub q: Option<f64>,
    pub fsq: Option<f64>,
}

/// Token-weighted mean loss over `batches` (one host read at the end).
pub fn mean_loss(model: &Llama, weights: &BTreeMap<String, Tensor>, batches: &[Batch]) -> Result<f64> {
    let mut total = Tensor::zeros((), DType::F64, &model.device)?;
    let mut count = 0usize;
    for b in batches {
        let ids = Tensor::from_vec(b.ids.clone(), (b.rows, b.cols), &model.device)?;
        let (loss, n) = model.loss(weights, &ids, &b.labels)?;
        total = (total + (loss.to_dtype(DType::F64)? * n as f64)?)?;
        count += n;
    }
    Ok(total.to_scalar::<f64>()? / count.max(1) as f64)
}

/// The loss of the weights seen through `view` (no copy of the model, nothing to restore).
pub fn view_loss(
    model: &Llama,
    params: &Params,
    quantizer: Option<&Quantizer>,
    view: View,
    batches: &[Batch],
) -> Result<f64> {
    // Detached: evaluation needs no graph, and a tracked forward would keep every activation alive.
    let weights = params.compute_weights(model.dtype, |name, x| match quantizer {
        Some(q) => q.view(name, &x.detach(), view, false),
        None => Ok(x.detach()),
    })?;
    mean_loss(model, &weights, batches)
}

pub fn losses(model: &Llama, params: &Params, quantizer: Option<&Quantizer>, batches: &[Batch]) -> Result<Losses> {
    let fp = view_loss(model, params, quantizer, View::Float, batches)?;
    let (q, fsq) = match quantizer {
        None => (None, None),
        Some(qz) => (
            Some(view_loss(model, params, quantizer, View::Hard, batches)?),
            Some(view_loss(
                model,
                params,
                quantizer,
                View::Selective(qz.cfg.atol),
                batches,
            )?),
        ),
    };
    Ok(Losses { fp, q, fsq })
}

#[derive(Clone, Debug, Serialize)]
pub struct TextPerplexity {
    pub text_ppl: f64,
    pub text_mean_ce: f64,
    pub text_windows: usize,
    pub text_tokens: usize,
}

/// GPTQ protocol: tokenize without special tokens or BOS, cut floor(N/seq_len) non-overlapping windows,
/// mean CE over each window's seq_len−1 shifted targets, ppl = exp(mean of the window means).
pub fn text_perplexity(
    model: &Llama,
    weights: &BTreeMap<String, Tensor>,
    tok: &Tokenizer,
    text: &str,
    seq_len: usize,
) -> Result<TextPerplexity> {
    let ids = tok
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("tokenizing the text: {e}"))?
        .get_ids()
        .to_vec();
    let windows = ids.len() / seq_len;
    if windows == 0 || seq_len < 2 {
        anyhow::bail!(
            "the text has {} tokens, fewer than one window of --seq-len {seq_len}",
            ids.len()
        );
    }
    // Every window has the same number of targets, so the token mean of a batch of windows is the
    // mean of their window means.
    let rows_per_batch = 4;
    let mut sum = 0.0;
    for chunk in ids[..windows * seq_len].chunks(rows_per_batch * seq_len) {
        let rows = chunk.len() / seq_len;
        let labels: Vec<i64> = chunk.iter().map(|&i| i as i64).collect();
        let input = Tensor::from_vec(chunk.to_vec(), (rows, seq_len), &model.device)?;
        let (loss, _) = model.loss(weights, &input, &labels)?;
        sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * rows as f64;
    }
    let mean = sum / windows as f64;
    Ok(TextPerplexity {
        text_ppl: mean.exp(),
        text_mean_ce: mean,
        text_windows: windows,
        text_tokens: ids.len(),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub prompt: String,
    pub completion: String,
    pub token_ids: Vec<u32>,
}

/// Greedy continuation: the prompt is encoded without special tokens (no BOS).
pub fn generate(
    model: &Llama,
    weights: &BTreeMap<String, Tensor>,
    tok: &Tokenizer,
    prompt: &str,
    max_new: usize,
) -> Result<Generation> {
    let ids = tok
        .encode(prompt, false)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        anyhow::bail!("the prompt is empty");
    }
    let out = model
        .sample(
            weights,
            std::slice::from_ref(&ids),
            &[ids.len() + max_new],
            &model.cfg.eos_token_ids,
            0.0,
            &mut crate::rng::Rng::new(0),
        )?
        .remove(0);
    let completion = tok.decode(&out, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    Ok(Generation {
        prompt: prompt.to_string(),
        completion,
        token_ids: out,
    })
}
