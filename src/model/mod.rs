//! The trainable Llama family and its checkpoint formats.

mod block;
pub mod checkpoint;
pub mod config;
pub mod gguf;
pub mod io;
pub mod llama;
pub mod ops;
mod sample;

pub use config::LlamaConfig;
pub use llama::{Llama, Params};
