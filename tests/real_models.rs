//! The real assets: SmolLM2-135M-Instruct from its GGUF and the Llama-3.2 tokenizer.

mod common;

use candle_core::{DType, Device, Tensor};
use proxqat::model::io::{load_model, load_tokenizer};
use proxqat::model::{Llama, Params};

fn smollm2() -> (Llama, Params, tokenizers::Tokenizer) {
    let loaded = load_model(&common::assets().join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    assert_eq!(
        (
            loaded.cfg.num_hidden_layers,
            loaded.cfg.hidden_size,
            loaded.cfg.num_key_value_heads
        ),
        (30, 576, 3)
    );
    assert!(loaded.cfg.tie_word_embeddings);
    let params = Params::from_tensors(&loaded.cfg, loaded.tensors, DType::F32).unwrap();
    (
        Llama::new(loaded.cfg, DType::F32, &Device::Cpu),
        params,
        loaded.tokenizer,
    )
}

#[test]
fn smollm2_knows_the_capital_of_france_and_matches_numpy() {
    let (model, params, tok) = smollm2();
    let w = params.compute_weights(DType::F32, |_, x| Ok(x.clone())).unwrap();
    let g = proxqat::eval::generate(&model, &w, &tok, "The capital of France is", 4).unwrap();
    assert!(
        g.completion.starts_with(" Paris"),
        "greedy continuation was {:?}",
        g.completion
    );

    // Logits of a fixed prompt against an independent float64 numpy forward over the same GGUF.
    let ids = tok
        .encode("The capital of France is", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let ours: Vec<Vec<f32>> = model.logits(&w, &input).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    let mut args = vec![common::repo().join("scripts/gguf_reference.py").display().to_string()];
    args.push(
        common::assets()
            .join("SmolLM2-135M-Instruct.Q4_1.gguf")
            .display()
            .to_string(),
    );
    args.extend(ids.iter().map(|i| i.to_string()));
    let out = common::run_python(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let reference: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut worst = 0f64;
    for (t, row) in reference["logits"].as_array().unwrap().iter().enumerate() {
        let row: Vec<f64> = row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let scale = row.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (a, b) in ours[t].iter().zip(&row) {
            worst = worst.max((*a as f64 - b).abs() / scale);
        }
    }
    eprintln!("max relative logit difference vs numpy: {worst:.2e}");
    assert!(
        worst < 1e-4,
        "logits differ from the numpy reference by {worst:.2e} (relative to the row max)"
    );
}

#[test]
fn llama32_tokenizer_matches_meta_tiktoken_ranks() {
    let tok = load_tokenizer(&common::assets().join("llama3.2-tokenizer.json")).unwrap();
    let texts = [
        "Hello, world!",
        "The capital of France is Paris.",
        "  leading spaces and 12345 digits\n\nnew lines\ttabs",
        "Ünïcödé — ça marche? 日本語のテキスト 😀",
        "def f(x):\n    return x**2  # comment",
    ];
    let script = r#"
import json, sys
import tiktoken
from tiktoken.load import load_tiktoken_bpe
pat = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
enc = tiktoken.Encoding("llama3", pat_str=pat, mergeable_ranks=load_tiktoken_bpe(sys.argv[1]), special_tokens={})
print(json.dumps([enc.encode(t) for t in json.loads(sys.argv[2])]))
"#;
    let model = common::assets().join("llama3-tokenizer.model").display().to_string();
    let texts_json = serde_json::to_string(&texts).unwrap();
    let expect: Vec<Vec<u32>> =
        serde_json::from_str(&common::run_python(&["-c", script, &model, &texts_json])).unwrap();
    for (text, want) in texts.iter().zip(expect) {
        let got = tok.encode(*text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "{text:?}");
    }
    // The text model's special tokens (../shared/assets.md).
    assert_eq!(tok.token_to_id("<|begin_of_text|>"), Some(128000));
    assert_eq!(tok.token_to_id("<|reserved_special_token_2|>"), Some(128005));
    assert_eq!(tok.token_to_id("<|eot_id|>"), Some(128009));
    assert_eq!(tok.token_to_id("<|reserved_special_token_247|>"), Some(128255));
    assert_eq!(tok.token_to_id("<|image|>"), None);
    assert_eq!(tok.get_vocab_size(true), 128256);
    assert_eq!(tok.encode("Hi", true).unwrap().get_ids()[0], 128000);
}

#[test]
fn stats_of_a_bare_gguf_take_the_quant_section_from_config() {
    let gguf = common::assets().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let cfg = common::repo().join("configs/demo.toml");
    let out = common::run_bin(
        &[
            "stats",
            "--ckpt",
            gguf.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--json",
        ],
        &common::repo(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["tensors"].as_array().unwrap().len(), 90, "mlp mode on 30 layers");
    assert_eq!(s["total"]["numel"].as_u64(), Some(30 * 3 * 576 * 1536));
    let without = common::run_bin(&["stats", "--ckpt", gguf.to_str().unwrap()], &common::repo());
    assert!(!without.status.success() && String::from_utf8_lossy(&without.stderr).contains("--config"));
}

#[test]
fn hardened_smollm2_exports_to_gguf_bit_exact_and_still_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = common::assets().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let cfg = common::repo().join("configs/demo.toml");
    let hard = tmp.path().join("hard");
    let run = |args: &[&str]| {
        let out = common::run_bin(args, tmp.path());
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let (gguf, cfg, hard_s) = (gguf.to_str().unwrap(), cfg.to_str().unwrap(), hard.to_str().unwrap());
    run(&["harden", "--ckpt", gguf, "--config", cfg, "--all", "--out", hard_s]);
    let out = tmp.path().join("smol-q4.gguf");
    let report: serde_json::Value = serde_json::from_str(&run(&[
        "export",
        "--ckpt",
        hard_s,
        "--format",
        "gguf",
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "f16",
        "--json",
    ]))
    .unwrap();
    let q4 = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["storage"] == "Q4_0")
        .count();
    assert_eq!(q4, 90, "the 90 hardened MLP matrices are Q4_0: {report}");

    // candle's reader (through proxqat's importer) and PyPI gguf both give the hardened values back.
    let (back, hardened) = (load_model(&out).unwrap(), load_model(&hard).unwrap());
    for (name, t) in &hardened.tensors {
        if name.contains(".mlp.") {
            assert!(common::bits(t) == common::bits(&back.tensors[name]), "{name} differs");
        }
    }
    let checked: serde_json::Value = serde_json::from_str(&common::run_python(&[
        common::repo().join("scripts/export_reference.py").to_str().unwrap(),
        "gguf",
        out.to_str().unwrap(),
        hard_s,
    ]))
    .unwrap();
    assert_eq!(checked["types"]["Q4_0"], 90, "{checked}");
    // f16 storage rounds the rest (the report says so); the Q4_0 tensors must all match.
    assert!(
        checked["differ"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|n| !n.as_str().unwrap().contains(".mlp.")),
        "{checked}"
    );
    let said = run(&[
        "eval",
        "--ckpt",
        out.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "3",
        "--json",
    ]);
    assert!(said.contains("Paris"), "{said}");
}
