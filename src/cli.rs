//! Command-line interface (clap).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "proxqat",
    version,
    about = "Quantization-aware training (Prox-QAT) of Llama-family models on candle",
    long_about = "Fine-tune a Llama-family model while pulling selected weights onto a low-bit grid (Prox-QAT), \
then harden, inspect, evaluate and export the result. Checkpoints are HF directories plus training state.",
    after_long_help = "WORKFLOW:
  proxqat train  --config configs/alpaca.toml          fine-tune with Prox-QAT (runs/alpaca/step-N, latest)
  proxqat stats  --ckpt runs/alpaca                    how close the weights are to the grid
  proxqat harden --ckpt runs/alpaca --all --out runs/alpaca-hard
  proxqat eval   --ckpt runs/alpaca-hard --text wiki.txt
  proxqat export --ckpt runs/alpaca-hard --format gguf --out model-q4.gguf
  proxqat plot   --run runs/alpaca

CHECKPOINTS (--ckpt): a checkpoint directory, a run directory (its `latest` is followed), a plain HF
directory, a packed export, or a .gguf file. The last three carry no quant config: give --config.

EXIT STATUS: 0 on success; 1 on any error, with a message naming the file, field or tensor and the fix.
Nothing is left half-written: every output goes to a temporary name and is renamed into place.

ENVIRONMENT: PROXQAT_LOG (tracing filter, default info; e.g. proxqat=debug), NO_COLOR."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train (fine-tune, optionally with Prox-QAT) from a TOML config.
    #[command(after_long_help = "WRITES (in train.out_dir):
  step-NNNNNN/     checkpoint every train.save_every steps and at the end (HF files + optimizer,
                   quant state, trainer_state.json); `latest` names the newest complete one;
                   train.keep_last = N keeps only the newest N
  metrics.jsonl    one JSON object per logged step (kind=train: step, loss, lr, grad_norm, lambda, gamma,
                   hit_rate, sat_rate, sens_mean, sens_max, tokens, tokens_per_s, skipped) and per
                   evaluation (kind=eval: step, val_loss_fp, val_loss_q, val_loss_fsq)

A non-finite loss or gradient norm skips the step; train.max_bad_steps in a row stop the run with the
last good checkpoint intact. --resume continues bit-exactly (weights, Adam moments, schedule, data
cursor, λ, γ, sensitivities, grid scales).")]
    Train(TrainArgs),
    /// Evaluate a checkpoint: val loss (fp / q / fsq), text perplexity, greedy samples.
    Eval(EvalArgs),
    /// Snap a checkpoint's selected weights onto its grid and write a new checkpoint.
    Harden(HardenArgs),
    /// Round-to-nearest post-training quantization: scales from the current weights, all selected snapped.
    Ptq(PtqArgs),
    /// Sample a teacher's own responses to the training instructions: extra distillation data
    /// (`data.extra_train`) that leaves the validation split untouched.
    #[command(
        after_long_help = "EXAMPLE (distill a quantized student on the data plus 4 teacher samples per record):
  proxqat train --config configs/alpaca.toml --set quant.method=fp --set train.out_dir=runs/alpaca-fp
  proxqat synth --ckpt runs/alpaca-fp --samples 4 --out runs/alpaca-fp-synth.json
  proxqat train --config configs/alpaca.toml --set 'data.extra_train=[\"runs/alpaca-fp-synth.json\"]'
      (with [distill] teacher = \"runs/alpaca-fp\" in the config)

The records are the checkpoint's training split (its config's data.path, val_records / val_fraction,
split_seed), or every record of --data. Responses are sampled at --temperature from the float weights
and stop at EOS or at data.max_seq_length tokens with the prompt."
    )]
    Synth(SynthArgs),
    /// Per-tensor grid statistics of a checkpoint (hit rate, saturation, |w − q|, scale).
    Stats(StatsArgs),
    /// Write a checkpoint as HF safetensors, a llama.cpp GGUF file or packed int codes + scales.
    #[command(
        after_long_help = "Selected tensors that lie exactly on their grid (run `harden --all` first) are stored
as codes: in GGUF as Q4_0 (codes in -8..7, so 2-, 3- and 4-bit grids) or Q8_0 (up to 8 bits) when every
block of 32 along a row has one f16 scale (per-group sizes that are multiples of 32, per-channel,
per-tensor); in packed as bit-packed codes + scales for any grid. They read back bit for bit. Every other
tensor is stored as --dtype; the report names each tensor's storage, whether it is exact, and why a
selected tensor could not be stored on its grid."
    )]
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
    /// Model shape: llama-3.2-1b or tiny.
    #[arg(long, default_value = "llama-3.2-1b")]
    pub shape: String,
    /// HF tokenizer.json used to build the synthetic rows.
    #[arg(long, default_value = "assets/llama3.2-tokenizer.json")]
    pub tokenizer: PathBuf,
    /// Rows per micro-batch.
    #[arg(long, value_name = "ROWS", default_value_t = 4)]
    pub micro_batch: usize,
    /// Tokens per row.
    #[arg(long, value_name = "TOKENS", default_value_t = 256)]
    pub seq: usize,
    /// Rows per optimizer step.
    #[arg(long, value_name = "ROWS", default_value_t = 128)]
    pub global_batch: usize,
    /// fp, prox (pull = "prox", grad_at = "q": configs/alpaca.toml) or prox-loss (pull = "loss").
    #[arg(long, default_value = "fp")]
    pub method: String,
    /// Timed optimizer steps after one warm-up step (then one profiled step; 0: that one only).
    #[arg(long, value_name = "STEPS", default_value_t = 2)]
    pub steps: usize,
    /// fused (the custom kernels) or reference (candle primitives), as `train.kernels`.
    #[arg(long, default_value = "fused")]
    pub kernels: String,
    /// Activation checkpointing per decoder block, as `train.checkpoint_layers`.
    #[arg(long)]
    pub checkpoint_layers: bool,
    /// GPUs, data-parallel as `train.devices` (one process each; --global-batch rows over all).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub devices: usize,
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
    /// Run configuration (TOML; see configs/ and the README's key table).
    #[arg(long, value_name = "FILE")]
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
    /// GPUs to train on, data-parallel: one process per GPU, gradients summed over NCCL (the same as
    /// --set train.devices=N; a checkpoint resumes on any number).
    #[arg(long, value_name = "N")]
    pub devices: Option<usize>,
}

#[derive(Args, Clone, Debug)]
pub struct CkptArgs {
    /// Checkpoint directory, run directory (follows `latest`), HF or packed directory, or .gguf file.
    #[arg(long, value_name = "PATH")]
    pub ckpt: PathBuf,
    /// TOML whose [quant] (and [data]) sections apply instead of the checkpoint's own.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Where to run: auto picks CUDA when the binary has it and a GPU is present.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub ckpt: CkptArgs,
    /// Alpaca JSON to evaluate on (all its records); default: the run's validation split.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Raw UTF-8 text for perplexity under the GPTQ protocol (no BOS, non-overlapping windows).
    #[arg(long, value_name = "FILE")]
    pub text: Option<PathBuf>,
    /// Window length for --text, in tokens.
    #[arg(long, value_name = "TOKENS", default_value_t = 2048)]
    pub seq_len: usize,
    /// Prompt for a greedy sample (repeatable).
    #[arg(long, value_name = "TEXT")]
    pub prompt: Vec<String>,
    /// Tokens to generate per prompt (greedy; stops early at EOS).
    #[arg(long, value_name = "TOKENS", default_value_t = 50)]
    pub max_new_tokens: usize,
    /// Validation batch size, in rows (records).
    #[arg(long, value_name = "ROWS", default_value_t = 4)]
    pub batch: usize,
}

#[derive(Args, Debug)]
pub struct HardenArgs {
    #[command(flatten)]
    pub ckpt: CkptArgs,
    /// Snap entries with |w − q| ≤ ATOL, an absolute weight distance; default: the quant config's atol.
    #[arg(long, value_name = "ATOL")]
    pub atol: Option<f64>,
    /// Snap every selected entry, whatever its distance.
    #[arg(long)]
    pub all: bool,
    /// Output checkpoint directory (never the input).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Replace an existing output directory.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    pub ckpt: CkptArgs,
    /// Hit tolerance, an absolute weight distance; default: the quant config's atol.
    #[arg(long, value_name = "ATOL")]
    pub atol: Option<f64>,
    /// Another checkpoint of the same model (e.g. an earlier step of the run): adds the share of each
    /// tensor's weights whose grid code differs between the two, each under its own scales.
    #[arg(long, value_name = "PATH")]
    pub against: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub ckpt: CkptArgs,
    /// hf (directory), gguf (one file) or packed (directory with int codes + scales).
    #[arg(long, value_enum)]
    pub format: crate::export::Format,
    /// Output directory (hf, packed) or file (gguf).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Float type of the tensors not stored on a grid; f32 is exact.
    #[arg(long = "dtype", value_enum, default_value = "f32")]
    pub float: crate::export::FloatType,
    /// Replace an existing output.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run directory (the config's out_dir, holding metrics.jsonl).
    #[arg(long, value_name = "DIR")]
    pub run: PathBuf,
    /// Image to write, .png or .svg; default: RUN/metrics.png.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Replace an existing image.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    #[command(flatten)]
    pub ckpt: CkptArgs,
    /// Alpaca JSON whose records (all of them) are answered; default: the run's training split.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Output Alpaca JSON: each record's instruction and input with a sampled output.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Responses per record.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub samples: usize,
    /// Sampling temperature: 1 draws from the model's distribution as it is, 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Prompts continued together per forward.
    #[arg(long, value_name = "ROWS", default_value_t = 64)]
    pub batch: usize,
    /// Longest response, in tokens (responses also end where data.max_seq_length does).
    #[arg(long, value_name = "TOKENS", default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Seed of the draws: the same seed, records and weights give the same responses.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Replace an existing output file.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct PtqArgs {
    #[command(flatten)]
    pub ckpt: CkptArgs,
    /// Output checkpoint directory (never the input).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Replace an existing output directory.
    #[arg(long)]
    pub overwrite: bool,
}
