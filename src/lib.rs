//! proxqat: quantization-aware training (Prox-QAT) of Llama-family models on candle.
//!
//! Data flows one way: config → (model, data stream, quant state) → step → metrics / checkpoint.
//! Every parameter is known by its HF name everywhere.

pub mod bench;
pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod dist;
pub mod eval;
pub mod export;
pub mod fsutil;
pub mod fused;
pub mod gpu_check;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod quant;
pub mod rng;
pub mod synth;
pub mod train;
