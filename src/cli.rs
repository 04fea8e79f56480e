//! Command-line interface (clap).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "proxqat",
    version,
    about = "Quantization-aware training (Prox-QAT) of Llama-family models on candle",
    long_about = "Fine-tune a Llama-family model while pulling selected weights onto a low-bit grid (Prox-QAT), \
then harden, inspect and evaluate the result. Checkpoints are HF directories plus training state."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train (fine-tune, optionally with Prox-QAT) from a TOML config.
    Train(TrainArgs),
    /// Evaluate a checkpoint: val loss (fp / q / fsq), text perplexity, greedy samples.
    Eval(EvalArgs),
    /// Snap a checkpoint's selected weights onto its grid and write a new checkpoint.
    Harden(HardenArgs),
    /// Round-to-nearest post-training quantization: scales from the current weights, all selected snapped.
    Ptq(PtqArgs),
    /// Per-tensor grid statistics of a checkpoint (hit rate, saturation, |w − q|, scale).
    Stats(StatsArgs),
    /// Write a checkpoint as HF safetensors, a llama.cpp GGUF file or packed int codes + scales.
    Export(ExportArgs),
    /// Draw a run's metrics.jsonl (losses, λ, γ, hit/saturation rates, lr) as a PNG or SVG.
    Plot(PlotArgs),
    /// Step throughput of the training step on a random model of a given shape (GPU benchmark).
    Bench(BenchCliArgs),
    /// GPU checks: CUDA vs CPU parity, random checkpoints and gradient dumps for the PyTorch comparison.
    #[command(subcommand)]
    GpuCheck(GpuCheck),
}

#[derive(Args, Debug)]
pub struct BenchCliArgs {
    /// Model shape: llama-3.2-1b or tiny [default: llama-3.2-1b].
    #[arg(long, default_value = "llama-3.2-1b")]
    pub shape: String,
    /// HF tokenizer.json used to build the synthetic rows.
    #[arg(long, default_value = "assets/llama3.2-tokenizer.json")]
    pub tokenizer: PathBuf,
    /// Rows per micro-batch [default: 4].
    #[arg(long, default_value_t = 4)]
    pub micro_batch: usize,
    /// Tokens per row [default: 256].
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Rows per optimizer step [default: 128].
    #[arg(long, default_value_t = 128)]
    pub global_batch: usize,
    /// fp or prox [default: fp].
    #[arg(long, default_value = "fp")]
    pub method: String,
    /// Measured optimizer steps after one warm-up step [default: 2].
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
}

#[derive(Subcommand, Debug)]
pub enum GpuCheck {
    /// Every op, the grid and a tiny Llama on CUDA against the CPU (f32 ≤ 1e-4, bf16 ≤ 2e-2).
    Parity,
    /// Write a random Llama (tiny, small or llama-3.2-1b shape) as an HF checkpoint.
    WriteRandom {
        #[arg(long)]
        shape: String,
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Loss, last-position logits and named gradients for fixed ids, as safetensors.
    DumpGrads {
        #[arg(long)]
        ckpt: PathBuf,
        /// f32 or bf16 compute.
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[arg(long, default_value = "cuda")]
        device: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Run configuration (TOML; see configs/).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config value, e.g. --set train.lr=1e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue from a checkpoint directory (or a run directory's `latest`); default: the config's out_dir.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<Option<PathBuf>>,
    /// Start over in an out_dir that already holds a run (its contents are deleted first).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct CkptArgs {
    /// Checkpoint directory, run directory (follows `latest`), HF directory or .gguf file.
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Config whose [quant] (and [data]) sections apply when the checkpoint carries none.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// cpu, cuda or auto [default: auto].
    #[arg(long, default_value = "auto")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub ckpt: CkptArgs,
    /// Alpaca JSON to evaluate on (all its records); default: the run's validation split.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Raw UTF-8 text for GPTQ-protocol perplexity.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Window length in tokens for --text [default: 2048].
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Prompt for a greedy sample (repeatable).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// Tokens to generate per prompt [default: 50].
    #[arg(long, default_value_t = 50)]
    pub max_new_tokens: usize,
    /// Validation batch size (rows) [default: 4].
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
}

#[derive(Args, Debug)]
pub struct HardenArgs {
    #[command(flatten)]
    pub ckpt: CkptArgs,
    /// Snap entries with |w − q| ≤ atol (default: the quant config's atol).
    #[arg(long)]
    pub atol: Option<f64>,
    /// Snap every selected entry, whatever its distance.
    #[arg(long)]
    pub all: bool,
    /// Output checkpoint directory (never the input).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output directory.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    pub ckpt: CkptArgs,
    /// Hit tolerance (default: the quant config's atol).
    #[arg(long)]
    pub atol: Option<f64>,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub ckpt: CkptArgs,
    /// hf (directory), gguf (one file) or packed (directory with int codes + scales).
    #[arg(long, value_enum)]
    pub format: crate::export::Format,
    /// Output directory (hf, packed) or file (gguf).
    #[arg(long)]
    pub out: PathBuf,
    /// Float type of the tensors not stored on a grid; f32 is exact [default: f32].
    #[arg(long = "dtype", value_enum, default_value = "f32")]
    pub float: crate::export::FloatType,
    /// Replace an existing output.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run directory (the config's out_dir, holding metrics.jsonl).
    #[arg(long)]
    pub run: PathBuf,
    /// Image to write, .png or .svg [default: RUN/metrics.png].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing image.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct PtqArgs {
    #[command(flatten)]
    pub ckpt: CkptArgs,
    /// Output checkpoint directory (never the input).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output directory.
    #[arg(long)]
    pub overwrite: bool,
}
