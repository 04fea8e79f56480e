//! Alpaca records → LitGPT's prompt template → token ids and labels.

use anyhow::{bail, Context, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// Label value that the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub instruction: String,
    pub input: String,
    pub output: String,
}

/// Read an Alpaca JSON file: an array of `{instruction, input?, output}` objects with string values.
pub fn load_records(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading data file {}", path.display()))?;
    parse_records(&text).with_context(|| format!("in data file {}", path.display()))
}

pub fn parse_records(text: &str) -> Result<Vec<Record>> {
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| anyhow::anyhow!("malformed JSON at line {} column {}: {e}", e.line(), e.column()))?;
    let items = json
        .as_array()
        .context("the top level must be a JSON array of {instruction, input, output} records")?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let obj = item
            .as_object()
            .with_context(|| format!("record {i} is not a JSON object"))?;
        let field = |name: &str, required: bool| -> Result<String> {
            match obj.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                None | Some(serde_json::Value::Null) if !required => Ok(String::new()),
                None => bail!("record {i} has no `{name}` field (each record needs `instruction` and `output`)"),
                Some(other) => bail!("record {i}: field `{name}` must be a string, found {other}"),
            }
        };
        out.push(Record {
            instruction: field("instruction", true)?,
            input: field("input", false)?,
            output: field("output", true)?,
        });
    }
    if out.is_empty() {
        bail!("the dataset has no records");
    }
    Ok(out)
}

/// LitGPT's Alpaca prompt (spec §10.8), with and without input.
pub fn prompt(r: &Record) -> String {
    if r.input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{}\n\n### Response:\n",
            r.instruction
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n",
            r.instruction, r.input
        )
    }
}

/// One tokenized example. `labels[t]` is the target of position t (equal to `ids[t]` or `IGNORE`);
/// the model predicts `labels[t + 1]` from position t.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub truncated: bool,
}

#[derive(Clone, Debug)]
pub struct Encoder {
    pub tokenizer: Tokenizer,
    pub eos_id: u32,
    pub max_seq_length: usize,
    pub mask_prompt: bool,
}

impl Encoder {
    fn tokens(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, special)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// `[BOS if the tokenizer adds one] + prompt`: what a response to `r` continues.
    pub fn prompt_ids(&self, r: &Record) -> Result<Vec<u32>> {
        self.tokens(&prompt(r), true)
    }

    /// `[BOS if the tokenizer adds one] + prompt + response + EOS`, truncated to `max_seq_length`.
    pub fn encode(&self, r: &Record) -> Result<Example> {
        let prompt_ids = self.prompt_ids(r)?;
        let mut ids = prompt_ids.clone();
        ids.extend(self.tokens(&r.output, false)?);
        ids.push(self.eos_id);
        let truncated = ids.len() > self.max_seq_length;
        ids.truncate(self.max_seq_length);
        let labels = ids
            .iter()
            .enumerate()
            .map(|(t, &id)| {
                if self.mask_prompt && t < prompt_ids.len() {
                    IGNORE
                } else {
                    id as i64
                }
            })
            .collect();
        Ok(Example { ids, labels, truncated })
    }
}
