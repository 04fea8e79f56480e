//! The bad-input catalogue: each case runs the real binary and checks the exit code, that the message
//! names the file/field/tensor, and that nothing was written.

mod common;

use common::{run_bin, tiny_config, tiny_model_dir};
use std::path::Path;

fn fails_with(args: &[&str], cwd: &Path, needles: &[&str]) {
    let out = run_bin(args, cwd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    for n in needles {
        assert!(err.contains(n), "{args:?}: {err:?} does not mention {n:?}");
    }
}

#[test]
fn corrupt_truncated_and_wrong_dtype_safetensors_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model_dir(&model, 1);
    let file = model.join("model.safetensors");
    let good = std::fs::read(&file).unwrap();
    let eval = ["eval", "--ckpt", model.to_str().unwrap(), "--prompt", "a"];

    std::fs::write(&file, &good[..good.len() / 2]).unwrap();
    fails_with(
        &eval,
        tmp.path(),
        &["model.safetensors", "not a valid safetensors file"],
    );
    let mut bad = good.clone();
    bad[..8].copy_from_slice(&[0xFF; 8]);
    std::fs::write(&file, &bad).unwrap();
    fails_with(
        &eval,
        tmp.path(),
        &["model.safetensors", "not a valid safetensors file"],
    );

    let mut tensors = proxqat::model::io::load_safetensors_file(&{
        std::fs::write(&file, &good).unwrap();
        file.clone()
    })
    .unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    let as_int = tensors[name].to_dtype(candle_core::DType::I64).unwrap();
    tensors.insert(name.into(), as_int);
    let map: std::collections::HashMap<_, _> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, &file).unwrap();
    fails_with(&eval, tmp.path(), &[name, "I64", "F32, F16 or BF16"]);
}

#[test]
fn an_out_dir_that_is_a_file_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model_dir(&model, 2);
    let cfg = tiny_config(tmp.path(), &model, "[quant]\n");
    std::fs::write(tmp.path().join("run"), "not a directory").unwrap();
    fails_with(
        &["train", "--config", cfg.to_str().unwrap()],
        tmp.path(),
        &["train.out_dir", "run", "is a file"],
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("run")).unwrap(),
        "not a directory"
    );
    std::fs::write(tmp.path().join("out"), "x").unwrap();
    fails_with(
        &[
            "harden",
            "--ckpt",
            model.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--all",
            "--out",
            "out",
        ],
        tmp.path(),
        &["out", "is a file"],
    );
}

#[test]
fn a_tokenizer_larger_than_the_model_vocabulary_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model_dir(&model, 3);
    std::fs::copy(
        common::assets().join("llama3.2-tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    let cfg = tiny_config(tmp.path(), &model, "");
    fails_with(
        &["train", "--config", cfg.to_str().unwrap()],
        tmp.path(),
        &["128256 tokens", "vocab_size is 257"],
    );
    assert!(!tmp.path().join("run").exists());
}

#[test]
fn a_gguf_of_another_architecture_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("gpt2.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    let arch = candle_core::quantized::gguf_file::Value::String("gpt2".into());
    candle_core::quantized::gguf_file::write(&mut f, &[("general.architecture", &arch)], &[]).unwrap();
    drop(f);
    fails_with(
        &["eval", "--ckpt", path.to_str().unwrap(), "--prompt", "a"],
        tmp.path(),
        &["gpt2.gguf", "\"gpt2\" is not supported"],
    );
}

#[test]
fn records_longer_than_max_seq_length_are_truncated_with_a_count() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model_dir(&model, 4);
    let cfg = tiny_config(tmp.path(), &model, "");
    let out = run_bin(
        &["train", "--config", cfg.to_str().unwrap(), "--set", "train.max_steps=1"],
        tmp.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("truncated to max_seq_length") && err.contains("records=8"),
        "{err}"
    );
}

#[test]
fn a_fresh_run_never_mixes_into_an_existing_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model_dir(&model, 5);
    let cfg = tiny_config(tmp.path(), &model, "");
    let train = |extra: &[&str]| {
        let mut a = vec!["train", "--config", cfg.to_str().unwrap(), "--set", "train.max_steps=2"];
        a.extend(extra);
        run_bin(&a, tmp.path())
    };
    assert!(train(&[]).status.success());
    let metrics = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
    fails_with(
        &["train", "--config", cfg.to_str().unwrap(), "--set", "train.max_steps=2"],
        tmp.path(),
        &["already holds a run", "--resume", "--overwrite"],
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap(),
        metrics,
        "nothing changed"
    );
    assert!(train(&["--overwrite"]).status.success());
    let lines = common::metrics(&tmp.path().join("run"));
    assert_eq!(
        lines.iter().filter(|l| l["kind"] == "train").count(),
        2,
        "--overwrite starts a clean metrics file"
    );
}
