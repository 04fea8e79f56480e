//! The bad-input catalogue: each case runs the real binary and checks the exit code, that the message
//! names the file/field/tensor, and that nothing was written.

mod common;

use common::{fails_with, run_bin, tiny_config, tiny_model_dir};

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

#[test]
fn a_gguf_tensor_of_a_type_proxqat_cannot_read_is_refused() {
    use proxqat::export::gguf::{write_gguf, RawTensor, Value};
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("iq2.gguf");
    // One tensor of type 16 (IQ2_XXS), which candle's reader does not implement.
    let tensor = RawTensor {
        name: "blk.0.ffn_up.weight".into(),
        dims: vec![256, 1],
        ggml_type: 16,
        data: vec![0; 66],
    };
    let meta = [("general.architecture", Value::Str("llama".into()))];
    write_gguf(&mut std::fs::File::create(&path).unwrap(), &meta, &[tensor]).unwrap();
    fails_with(
        &["eval", "--ckpt", path.to_str().unwrap(), "--prompt", "a"],
        tmp.path(),
        &["iq2.gguf", "unknown dtype for tensor 16", "Q4_0"],
    );
}

#[test]
fn config_json_without_a_field_or_with_an_unsupported_rope_type_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model_dir(&model, 6);
    let file = model.join("config.json");
    let good: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let eval = ["eval", "--ckpt", model.to_str().unwrap(), "--prompt", "a"];

    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&file, missing.to_string()).unwrap();
    fails_with(&eval, tmp.path(), &["config.json", "hidden_size"]);

    let mut yarn = good.clone();
    yarn["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(&file, yarn.to_string()).unwrap();
    fails_with(&eval, tmp.path(), &["config.json", "rope_type", "yarn"]);

    std::fs::write(&file, "{\"hidden_size\": 64,").unwrap();
    fails_with(&eval, tmp.path(), &["config.json"]);
}

#[test]
fn a_failed_checkpoint_write_leaves_the_last_checkpoint_intact() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model_dir(&model, 7);
    let cfg = tiny_config(tmp.path(), &model, "[quant]\nmethod = \"prox\"\n");
    let cfg = cfg.to_str().unwrap();
    let first = run_bin(&["train", "--config", cfg, "--set", "train.max_steps=2"], tmp.path());
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let run = tmp.path().join("run");
    assert_eq!(
        std::fs::read_to_string(run.join("latest")).unwrap().trim(),
        "step-000002"
    );

    // The disk "fills up": the kernel refuses to grow any file past 100 kB (RLIMIT_FSIZE; with SIGXFSZ
    // ignored, write(2) fails with EFBIG, the same error path as ENOSPC).
    let mut child = std::process::Command::new(common::bin());
    child
        .args(["train", "--config", cfg, "--resume", "--set", "train.max_steps=4"])
        .current_dir(tmp.path());
    unsafe {
        child.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 100_000,
                rlim_max: 100_000,
            };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = child.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the write should have failed: {err}");
    assert!(err.contains("File too large") && err.contains("step-000004"), "{err}");

    // The previous checkpoint is still the latest, whole and loadable; no half-written directory is left.
    assert_eq!(
        std::fs::read_to_string(run.join("latest")).unwrap().trim(),
        "step-000002"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') || n == "step-000004")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let ok = run_bin(
        &[
            "eval",
            "--ckpt",
            run.to_str().unwrap(),
            "--prompt",
            "a",
            "--max-new-tokens",
            "1",
        ],
        tmp.path(),
    );
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}

#[test]
fn bad_data_files_are_refused_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model_dir(&model, 8);
    let data = common::assets().join("alpaca_en_demo.json");
    let cases: [(&str, &[&str]); 5] = [
        (
            "[{\"instruction\": \"a\", \"output\": ",
            &["bad.json", "malformed JSON at line 1"],
        ),
        (
            "[{\"instruction\": \"a\"}]",
            &["bad.json", "record 0 has no `output` field"],
        ),
        (
            "[{\"instruction\": \"a\", \"output\": 3}]",
            &["bad.json", "field `output` must be a string"],
        ),
        ("[]", &["bad.json", "no records"]),
        ("[{\"instruction\": \"a\", \"output\": \"b\"}]", &["split is empty"]),
    ];
    for (text, needles) in cases {
        std::fs::write(tmp.path().join("bad.json"), text).unwrap();
        let cfg = tiny_config(tmp.path(), &model, "");
        let toml = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(data.to_str().unwrap(), tmp.path().join("bad.json").to_str().unwrap());
        std::fs::write(&cfg, toml).unwrap();
        fails_with(&["train", "--config", cfg.to_str().unwrap()], tmp.path(), needles);
        assert!(!tmp.path().join("run").exists(), "{text}: nothing may be written");
    }
}

#[test]
fn multi_gpu_requests_that_cannot_run_say_why_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model_dir(&model, 3);
    let cfg = tiny_config(tmp.path(), &model, "");
    let cfg = cfg.to_str().unwrap();
    let run = tmp.path().join("run");
    // The tiny config trains on the CPU: one device only.
    fails_with(
        &["train", "--config", cfg, "--devices", "2"],
        tmp.path(),
        &["train.devices = 2", "train.device = \"cpu\""],
    );
    // 8 rows per step cannot be split into micro-batches of 4 over 3 GPUs.
    fails_with(
        &[
            "train",
            "--config",
            cfg,
            "--devices",
            "3",
            "--set",
            "train.device=\"cuda\"",
        ],
        tmp.path(),
        &["train.global_batch (8)", "train.micro_batch × train.devices (4 × 3)"],
    );
    // This test binary has no NCCL (CI builds without CUDA): the launcher says how to get it.
    #[cfg(not(feature = "nccl"))]
    fails_with(
        &[
            "train",
            "--config",
            cfg,
            "--devices",
            "2",
            "--set",
            "train.device=\"cuda\"",
        ],
        tmp.path(),
        &["--features cuda,nccl"],
    );
    assert!(
        !run.join("metrics.jsonl").exists() && !run.join("latest").exists(),
        "nothing was trained"
    );
}
