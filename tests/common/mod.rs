//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The real assets; fetched by scripts/fetch-assets.sh (registries only) when missing.
/// A test that needs them fails loudly if they cannot be had: it never passes silently.
pub fn assets() -> PathBuf {
    let dir = repo().join("assets");
    let needed = [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "alpaca_en_demo.json",
        "llama3.2-tokenizer.json",
        "llama3-tokenizer.model",
    ];
    if !needed.iter().all(|f| dir.join(f).is_file()) {
        eprintln!("assets missing: running scripts/fetch-assets.sh");
        let ok = Command::new("bash")
            .arg(repo().join("scripts/fetch-assets.sh"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "scripts/fetch-assets.sh failed: these tests need the real assets (../shared/assets.md)"
        );
    }
    dir
}

/// The Python that has numpy, gguf and tiktoken (scripts/test.sh sets PROXQAT_PYTHON to its venv).
pub fn python() -> String {
    let py = std::env::var("PROXQAT_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import numpy, gguf, tiktoken"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{py} lacks numpy/gguf/tiktoken: run the tests through scripts/test.sh, which installs them"
    );
    py
}

pub fn run_python(args: &[&str]) -> String {
    let out = Command::new(python()).args(args).output().expect("running python");
    assert!(
        out.status.success(),
        "python {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Deterministic pseudo-random f64 tensor.
pub fn randn(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let mut rng = proxqat::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| scale * rng.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A tiny word-level tokenizer (`w0 .. w{n-1}`), enough for checkpoint round trips.
pub fn tiny_tokenizer(n: usize) -> tokenizers::Tokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..n).map(|i| (format!("w{i}"), (i as u64).into())).collect();
    let json = serde_json::json!({"version": "1.0", "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null, "truncation": null, "padding": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}});
    json.to_string().parse().unwrap()
}

pub fn to_vec_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_proxqat")
}

pub fn run_bin(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .output()
        .expect("running proxqat")
}

/// Runs the binary and asserts that it fails with a message naming each of `needles`.
pub fn fails_with(args: &[&str], cwd: &Path, needles: &[&str]) {
    let out = run_bin(args, cwd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    for n in needles {
        assert!(err.contains(n), "{args:?}: {err:?} does not mention {n:?}");
    }
}

/// A byte-level BPE tokenizer with no merges: 256 byte tokens plus `<eos>` (id 256).
pub fn byte_tokenizer() -> tokenizers::Tokenizer {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort();
    let mut vocab: serde_json::Map<String, serde_json::Value> = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), (i as u64).into()))
        .collect();
    vocab.insert("<eos>".into(), 256u64.into());
    let json = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "normalizer": null,
        "added_tokens": [{"id": 256, "content": "<eos>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}});
    json.to_string().parse().unwrap()
}

/// A tiny random Llama (byte-level vocabulary) saved as an HF checkpoint directory.
pub fn tiny_model_dir(dir: &Path, seed: u64) {
    let mut cfg = proxqat::model::LlamaConfig::tiny(257, true);
    cfg.eos_token_ids = vec![256];
    let params = proxqat::model::Params::random(&cfg, seed, DType::F32, &Device::Cpu).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    proxqat::model::io::save_hf(dir, &cfg, &params.to_tensors(), &byte_tokenizer(), DType::F32).unwrap();
}

/// A run config for the tiny model on the Alpaca demo data; `extra` is appended TOML.
pub fn tiny_config(dir: &Path, model: &Path, extra: &str) -> PathBuf {
    let text = format!(
        r#"[model]
path = "{model}"
[data]
path = "{data}"
val_records = 16
max_seq_length = 64
[train]
out_dir = "{out}"
micro_batch = 4
global_batch = 8
max_steps = 4
lr = 3e-3
min_lr = 3e-4
warmup_steps = 2
log_every = 1
device = "cpu"
[eval]
every = 0
max_batches = 4
initial = true
final = true
{extra}
"#,
        model = model.display(),
        data = assets().join("alpaca_en_demo.json").display(),
        out = dir.join("run").display(),
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The JSON lines of a run's metrics.jsonl.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The bit patterns of an f32 tensor, for bit-exact comparisons.
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}
