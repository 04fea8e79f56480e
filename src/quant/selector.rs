//! Which parameters are quantized (spec §3), on HF Llama names.

use anyhow::Result;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectMode {
    /// `mlp.{gate,up,down}_proj.weight` (the seed's default).
    Mlp,
    /// `self_attn.{q,k,v,o}_proj.weight`.
    Attn,
    MlpAttn,
    /// Every `.weight` inside `model.` (what survives the exclusions: the seven projections per layer).
    AllLinear,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SelectorConfig {
    pub mode: SelectMode,
    /// A name containing any of these is never selected (case-sensitive).
    pub exclude: Vec<String>,
    /// If non-empty, a name must contain one of these.
    pub include: Vec<String>,
}

impl Default for SelectorConfig {
    fn default() -> Self {
        SelectorConfig {
            mode: SelectMode::Mlp,
            exclude: ["bias", "norm", "embed_tokens", "lm_head"].map(String::from).to_vec(),
            include: vec![],
        }
    }
}

impl SelectorConfig {
    /// Rules in the spec's order: exclusions, inclusions, then the mode on the lower-cased name.
    pub fn selects(&self, name: &str) -> bool {
        if self.exclude.iter().any(|s| name.contains(s.as_str())) {
            return false;
        }
        if !self.include.is_empty() && !self.include.iter().any(|s| name.contains(s.as_str())) {
            return false;
        }
        let lower = name.to_lowercase();
        if !lower.ends_with(".weight") {
            return false;
        }
        let mlp = lower.contains(".mlp.");
        let attn = lower.contains(".self_attn.") || lower.contains(".attn.");
        match self.mode {
            SelectMode::Mlp => mlp,
            SelectMode::Attn => attn,
            SelectMode::MlpAttn => mlp || attn,
            SelectMode::AllLinear => lower.starts_with("model.") || lower.contains(".model."),
        }
    }

    pub fn select<'a>(&self, names: impl IntoIterator<Item = &'a String>) -> Result<Vec<String>> {
        let chosen: Vec<String> = names.into_iter().filter(|n| self.selects(n)).cloned().collect();
        if chosen.is_empty() {
            anyhow::bail!(
                "the quant selector (mode {:?}, include {:?}, exclude {:?}) selects no parameter",
                self.mode,
                self.include,
                self.exclude
            );
        }
        Ok(chosen)
    }
}
