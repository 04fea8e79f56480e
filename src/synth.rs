//! Distillation data from the teacher itself: for each training instruction, responses sampled from
//! the teacher's own next-token distribution (LLM-QAT's data-free idea, conditioned on the user's
//! prompts). A student distilled on the union sees the teacher's distributions on many more sequences
//! than the data holds, while the validation split stays untouched: only training records are used.

use anyhow::Result;
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;

use crate::data::{Encoder, Record};
use crate::model::Llama;
use crate::rng::Rng;

pub struct SynthOptions {
    /// Responses drawn per record.
    pub samples: usize,
    /// Sampling temperature (1: the teacher's distribution as it is; 0: greedy).
    pub temperature: f64,
    /// Prompts continued per forward.
    pub batch: usize,
    /// Tokens per response at most (besides the `max_seq_length` bound).
    pub max_new_tokens: usize,
    pub seed: u64,
}

#[derive(Debug, Serialize)]
pub struct SynthReport {
    pub records: usize,
    pub responses: usize,
    /// Responses that ended with the model's EOS (the rest reached a length limit).
    pub ended: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// `options.samples` responses per record, sampled from `model` with `weights`, each at most
/// `options.max_new_tokens` long and as long as `encoder.max_seq_length` allows (room left for the EOS
/// the encoder appends). Records come back in input order, a record's samples together.
pub fn synthesize(
    model: &Llama,
    weights: &BTreeMap<String, Tensor>,
    encoder: &Encoder,
    records: &[Record],
    options: &SynthOptions,
) -> Result<(Vec<Record>, SynthReport)> {
    let started = std::time::Instant::now();
    let prompts = records
        .iter()
        .map(|r| encoder.prompt_ids(r))
        .collect::<Result<Vec<_>>>()?;
    // Each job is (record, sample); similar prompt lengths share a batch, so padding stays short.
    let mut jobs: Vec<usize> = (0..records.len() * options.samples).collect();
    jobs.sort_by_key(|&j| prompts[j / options.samples].len());
    let bar = ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} synth {pos}/{len} responses [{elapsed_precise}<{eta_precise}]")
            .expect("the template is valid"),
    );
    let mut rng = Rng::new(options.seed);
    let limit = |prompt: &Vec<u32>| (prompt.len() + options.max_new_tokens).min(encoder.max_seq_length - 1);
    let stop = &model.cfg.eos_token_ids;
    let mut responses: Vec<Option<Vec<u32>>> = vec![None; jobs.len()];
    let mut ended = 0;
    for chunk in jobs.chunks(options.batch.max(1)) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&j| prompts[j / options.samples].clone()).collect();
        let limits: Vec<usize> = batch.iter().map(limit).collect();
        let out = model.sample(weights, &batch, &limits, stop, options.temperature, &mut rng)?;
        for ((&j, max_len), response) in chunk.iter().zip(limits).zip(out) {
            let prompt_len = prompts[j / options.samples].len();
            ended += usize::from(prompt_len + response.len() < max_len);
            responses[j] = Some(response);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let tokens = responses.iter().flatten().map(Vec::len).sum();
    let synthetic = responses
        .into_iter()
        .enumerate()
        .map(|(j, response)| {
            let record = &records[j / options.samples];
            let ids = response.expect("every job was sampled");
            Ok(Record {
                output: encoder
                    .tokenizer
                    .decode(&ids, true)
                    .map_err(|e| anyhow::anyhow!("decoding a sampled response: {e}"))?,
                ..record.clone()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let seconds = started.elapsed().as_secs_f64();
    let report = SynthReport {
        records: records.len(),
        responses: synthetic.len(),
        ended,
        tokens,
        seconds,
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
    };
    Ok((synthetic, report))
}

/// Records as an Alpaca JSON array (what `data.path` and `data.extra_train` read).
pub fn to_json(records: &[Record]) -> serde_json::Value {
    records
        .iter()
        .map(|r| serde_json::json!({"instruction": r.instruction, "input": r.input, "output": r.output}))
        .collect()
}
