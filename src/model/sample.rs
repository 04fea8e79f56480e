//! Sampling continuations (`proxqat synth`, `proxqat eval --prompt`) with a KV cache.
//!
//! The prompts are left-padded to one length, so each step feeds one token per row at one shared
//! column. RoPE makes q·k depend only on the difference of two positions, so a row shifted right by
//! its padding scores as it would alone; the mask keeps the padding out of every row's keys (a padding
//! position attends to itself only, which keeps its values finite; no real position reads them).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use std::collections::BTreeMap;

use super::block::{get, Block, LayerWeights};
use super::llama::{Llama, EMBEDDING};
use super::ops;
use crate::fused::Kernels;
use crate::rng::Rng;

/// The batch's state between steps: each layer's keys and values so far.
struct Decoder<'a> {
    model: &'a Llama,
    w: &'a BTreeMap<String, Tensor>,
    layers: Vec<LayerWeights>,
    /// Per layer, `(B, KV, columns, D)` keys and values (none before the prompts ran).
    cache: Vec<Option<(Tensor, Tensor)>>,
    /// Each row's padding columns, which its keys leave out.
    pads: Vec<usize>,
    /// Columns run so far, padding included.
    columns: usize,
    /// RoPE tables `(prompt width + steps, D / 2)`: every column the batch can reach.
    cos: Tensor,
    sin: Tensor,
}

impl<'a> Decoder<'a> {
    /// Runs `prompts` (left-padded) and returns the decoder with each row's next-token logits,
    /// `(B, V)` f32; at most `steps` tokens per row are fed after them.
    fn start(
        model: &'a Llama,
        w: &'a BTreeMap<String, Tensor>,
        prompts: &[Vec<u32>],
        steps: usize,
    ) -> Result<(Self, Tensor)> {
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
        let ids: Vec<u32> = prompts
            .iter()
            .zip(&pads)
            .flat_map(|(p, &pad)| std::iter::repeat_n(0, pad).chain(p.iter().copied()))
            .collect();
        let (cos, sin) = ops::rope_tables(&model.cfg, width + steps, ops::stat_dtype(model.dtype), &model.device)?;
        let mut decoder = Decoder {
            model,
            w,
            layers: (0..model.cfg.num_hidden_layers)
                .map(|i| LayerWeights::of(i, w, &BTreeMap::new()))
                .collect::<Result<_>>()?,
            cache: vec![None; model.cfg.num_hidden_layers],
            pads,
            columns: 0,
            cos,
            sin,
        };
        let logits = decoder.forward(Tensor::from_vec(ids, (prompts.len(), width), &model.device)?)?;
        Ok((decoder, logits))
    }

    /// Feeds one token per row; returns the next-token logits `(B, V)` f32.
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), &self.model.device)?;
        self.forward(ids)
    }

    /// Keeps only the rows `keep` (indices into the current batch, in order).
    fn retain(&mut self, keep: &[usize]) -> Result<()> {
        let index = Tensor::from_vec(
            keep.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            keep.len(),
            &self.model.device,
        )?;
        for (k, v) in self.cache.iter_mut().flatten() {
            *k = k.index_select(&index, 0)?;
            *v = v.index_select(&index, 0)?;
        }
        self.pads = keep.iter().map(|&i| self.pads[i]).collect();
        Ok(())
    }

    /// `ids: (B, t)` at the next t columns through every block; the last column's logits.
    fn forward(&mut self, ids: Tensor) -> Result<Tensor> {
        let model = self.model;
        let (b, t) = ids.dims2()?;
        let (start, end) = (self.columns, self.columns + t);
        if end > self.cos.dim(0)? {
            bail!(
                "decoding past the {} columns the batch was started for",
                self.cos.dim(0)?
            );
        }
        // Row r's query at column i sees the keys of columns pad_r..=i, and a padding column itself.
        let mask: Vec<f32> = self
            .pads
            .iter()
            .flat_map(|&pad| {
                (start..end).flat_map(move |i| {
                    (0..end).map(move |j| {
                        if (pad <= j && j <= i) || j == i {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
            })
            .collect();
        let block = Block {
            cfg: model.cfg.clone(),
            dtype: model.dtype,
            fused: model.kernels == Kernels::Fused,
            cos: self.cos.narrow(0, start, t)?,
            sin: self.sin.narrow(0, start, t)?,
            mask: Tensor::from_vec(mask, (b, 1, 1, t, end), &model.device)?,
        };
        let mut x =
            get(self.w, EMBEDDING)?
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, t, model.cfg.hidden_size))?;
        for (layer, cache) in self.layers.iter().zip(&mut self.cache) {
            x = block.forward_cached(&x, layer, cache)?;
        }
        self.columns = end;
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        let hidden = block.norm(&last, get(self.w, "model.norm.weight")?)?;
        Ok(model.project(self.w, &BTreeMap::new(), &hidden)?.to_dtype(DType::F32)?)
    }
}

impl Llama {
    /// Continuations of `prompts`, each until a `stop` token (not included) or until row r holds
    /// `max_lens[r]` tokens (prompt included), drawn in one batch from the model's next-token
    /// distribution at `temperature` (0: greedy).
    ///
    /// One forward of the prompts, then one token per live row and step against the cached keys and
    /// values; rows leave the batch when they stop. The draws come from `rng` on the host, so a seed
    /// gives the same samples on every device (up to the logits' rounding).
    pub fn sample(
        &self,
        w: &BTreeMap<String, Tensor>,
        prompts: &[Vec<u32>],
        max_lens: &[usize],
        stop: &[u32],
        temperature: f64,
        rng: &mut Rng,
    ) -> Result<Vec<Vec<u32>>> {
        if prompts.iter().any(|p| p.is_empty()) {
            bail!("a prompt to continue is empty");
        }
        if max_lens.len() != prompts.len() {
            bail!("{} prompts but {} length limits", prompts.len(), max_lens.len());
        }
        let mut rows = prompts.to_vec();
        let mut live: Vec<usize> = (0..rows.len()).filter(|&r| rows[r].len() < max_lens[r]).collect();
        if !live.is_empty() {
            let live_prompts: Vec<Vec<u32>> = live.iter().map(|&r| rows[r].clone()).collect();
            // A row's last token is drawn, never fed: it feeds max_len − prompt − 1 tokens.
            let steps = live.iter().map(|&r| max_lens[r] - rows[r].len() - 1).max().unwrap_or(0);
            let (mut decoder, mut logits) = Decoder::start(self, w, &live_prompts, steps)?;
            loop {
                let mut keep = vec![];
                let mut fed = vec![];
                for (i, (&r, token)) in live.iter().zip(draw(&logits, temperature, rng)?).enumerate() {
                    if stop.contains(&token) {
                        continue;
                    }
                    rows[r].push(token);
                    if rows[r].len() < max_lens[r] {
                        keep.push(i);
                        fed.push(token);
                    }
                }
                if keep.is_empty() {
                    break;
                }
                if keep.len() < live.len() {
                    decoder.retain(&keep)?;
                    live = keep.iter().map(|&i| live[i]).collect();
                }
                logits = decoder.step(&fed)?;
            }
        }
        Ok(rows
            .into_iter()
            .zip(prompts)
            .map(|(row, prompt)| row[prompt.len()..].to_vec())
            .collect())
    }
}

/// Vocabulary entries per block of the two-level inverse-CDF draw.
const DRAW_BLOCK: usize = 256;

/// One token per row of `(rows, V)` f32 logits: the argmax at temperature 0, else a draw from
/// softmax(logits / temperature) by inverse CDF. The softmax stays on the device; the host reads the
/// sums of blocks of [`DRAW_BLOCK`] probabilities, picks a block per row, then reads only that block's
/// entries (two small reads per step instead of the whole `(rows, V)`).
fn draw(logits: &Tensor, temperature: f64, rng: &mut Rng) -> Result<Vec<u32>> {
    if temperature == 0.0 {
        return Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    let (n, vocab) = logits.dims2()?;
    let blocks = vocab.div_ceil(DRAW_BLOCK);
    let probs = ops::softmax_last_dim(&(logits / temperature)?)?
        .pad_with_zeros(1, 0, blocks * DRAW_BLOCK - vocab)?
        .reshape((n * blocks, DRAW_BLOCK))?;
    let block_sums: Vec<Vec<f32>> = probs.sum(1)?.reshape((n, blocks))?.to_vec2()?;
    // Each row's block and how far into it the target falls.
    let picks: Vec<(usize, f64)> = block_sums.iter().map(|sums| inverse_cdf(sums, rng.uniform())).collect();
    let index: Vec<u32> = picks
        .iter()
        .enumerate()
        .map(|(row, &(block, _))| (row * blocks + block) as u32)
        .collect();
    let entries: Vec<Vec<f32>> = probs
        .index_select(&Tensor::from_vec(index, n, logits.device())?, 0)?
        .to_vec2()?;
    Ok(picks
        .iter()
        .zip(&entries)
        // Within the block, the entry at the same fraction of its mass.
        .map(|(&(block, rest), p)| (block * DRAW_BLOCK + inverse_cdf(p, rest).0) as u32)
        .collect())
}

/// The block (or entry) whose cumulative sum first passes `u` × the total of `sums` (the last one with
/// mass when rounding leaves the sum short), and the fraction of that block's own sum the target lies at.
fn inverse_cdf(sums: &[f32], u: f64) -> (usize, f64) {
    let total: f64 = sums.iter().map(|&x| x as f64).sum();
    let target = u * total;
    let mut below = 0.0;
    for (i, &s) in sums.iter().enumerate() {
        let s = s as f64;
        if below + s > target {
            return (i, (target - below) / s);
        }
        below += s;
    }
    // Rounding put the target past the last block: the last block with mass, at its end.
    (sums.iter().rposition(|&x| x > 0.0).unwrap_or(0), 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cached_steps_give_the_logits_of_each_row_run_alone() {
        // f64, so that any difference beyond rounding (a wrong position, a padding key read) shows.
        let cfg = crate::model::LlamaConfig::tiny(97, false);
        let params = crate::model::Params::random(&cfg, 5, DType::F64, &Device::Cpu).unwrap();
        let w = params.compute_weights(DType::F64, |_, x| Ok(x.clone())).unwrap();
        let model = Llama::new(cfg, DType::F64, &Device::Cpu);
        let rows: Vec<Vec<u32>> = [2usize, 7, 12]
            .iter()
            .map(|&n| (0..n + 6).map(|i| ((i * 31 + n) % 97) as u32).collect())
            .collect();
        let prompts: Vec<Vec<u32>> = rows.iter().map(|r| r[..r.len() - 6].to_vec()).collect();
        let alone = |row: &[u32], len: usize| {
            let input = Tensor::new(&row[..len], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            model
                .logits(&w, &input)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .get(len - 1)
                .unwrap()
        };
        let (mut decoder, mut logits) = Decoder::start(&model, &w, &prompts, 6).unwrap();
        let mut live: Vec<usize> = vec![0, 1, 2];
        for step in 0..6 {
            for (i, &r) in live.iter().enumerate() {
                let want = alone(&rows[r], prompts[r].len() + step);
                let err = (logits.get(i).unwrap().to_dtype(DType::F64).unwrap() - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                // The logits come back in f32.
                assert!(err < 1e-5, "row {r}, step {step}: max |Δ| {err}");
            }
            if step == 2 {
                // The middle row leaves the batch.
                decoder.retain(&[0, 2]).unwrap();
                live = vec![0, 2];
            }
            let fed: Vec<u32> = live.iter().map(|&r| rows[r][prompts[r].len() + step]).collect();
            logits = decoder.step(&fed).unwrap();
        }
    }

    #[test]
    fn two_level_draws_follow_probabilities_spread_over_blocks() {
        // Mass in three blocks of a 1000-entry vocabulary (the last block partial), and nowhere else.
        let vocab = 1000;
        let want = [(3usize, 0.2), (300, 0.3), (511, 0.1), (999, 0.4)];
        let mut logits = vec![-1e4f32; vocab];
        for &(i, p) in &want {
            logits[i] = (p as f32).ln();
        }
        let n = 4000;
        let logits = Tensor::from_vec(logits.repeat(n), (n, vocab), &Device::Cpu).unwrap();
        let mut counts = BTreeMap::new();
        for token in draw(&logits, 1.0, &mut Rng::new(3)).unwrap() {
            *counts.entry(token as usize).or_insert(0usize) += 1;
        }
        assert!(counts.keys().all(|k| want.iter().any(|&(i, _)| i == *k)), "{counts:?}");
        for (i, p) in want {
            let freq = counts.get(&i).copied().unwrap_or(0) as f64 / n as f64;
            let sigma = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                (freq - p).abs() < 5.0 * sigma,
                "token {i}: drawn {freq:.4}, probability {p}"
            );
        }
    }

    #[test]
    fn inverse_cdf_lands_on_the_block_and_entry_the_target_falls_in() {
        let sums = [0.25f32, 0.0, 0.5, 0.25];
        assert_eq!(inverse_cdf(&sums, 0.0), (0, 0.0));
        assert_eq!(inverse_cdf(&sums, 0.5), (2, 0.5));
        assert_eq!(inverse_cdf(&sums, 0.999_999).0, 3);
        // A target rounded past the end goes to the last block with mass.
        assert_eq!(inverse_cdf(&[0.5, 0.5, 0.0], 1.0), (1, 1.0));
        let p = [0.0f32, 0.5, 0.0, 0.5, 0.0];
        assert_eq!(inverse_cdf(&p, 0.0).0, 1);
        assert_eq!(inverse_cdf(&p, 0.6).0, 3);
        assert_eq!(inverse_cdf(&p, 1.0).0, 3, "never an entry without mass");
    }
}
