//! `[distill]`: training toward a frozen teacher's next-token distributions, through the real binary.

mod common;

use common::{metrics, run_bin, tiny_config, tiny_model_dir};
use std::path::Path;

/// Train the tiny model at `model` with `extra` TOML; the run's step lines.
fn train(dir: &Path, model: &Path, extra: &str, sets: &[&str]) -> Vec<serde_json::Value> {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = tiny_config(dir, model, extra);
    let mut args = vec!["train", "--config", cfg.to_str().unwrap()];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = run_bin(&args, dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    metrics(&dir.join("run"))
        .into_iter()
        .filter(|l| l["kind"] == "train")
        .collect()
}

fn distill_toml(teacher: &Path, weight: f64) -> String {
    format!(
        "[distill]\nteacher = \"{}\"\nweight = {weight}\ntemperature = 1.0\n",
        teacher.display()
    )
}

#[test]
fn a_student_distilled_from_itself_starts_at_zero_kl() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model_dir(&model, 5);
    let steps = train(
        &tmp.path().join("self"),
        &model,
        &distill_toml(&model, 1.0),
        &["train.max_steps=1", "train.kernels=\"reference\""],
    );
    let kl = steps[0]["distill_kl"].as_f64().unwrap();
    assert!(kl.abs() < 1e-6, "student == teacher, yet KL {kl}");
    // The data loss is still what `loss` reports (a random byte model: about ln 257).
    let loss = steps[0]["loss"].as_f64().unwrap();
    assert!((loss - 257f64.ln()).abs() < 0.5, "loss {loss}");
}

/// A random student distilled from another random model (whose distributions the data do not teach):
/// the KL falls under distillation, a 50/50 mix with the data loss lands between, and the data loss
/// alone does not approach the teacher.
#[test]
fn distillation_moves_the_student_toward_the_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let (teacher, student) = (tmp.path().join("teacher"), tmp.path().join("student"));
    tiny_model_dir(&teacher, 3);
    tiny_model_dir(&student, 4);
    let sets = [
        "train.max_steps=12",
        "train.warmup_steps=2",
        "train.lr=3e-3",
        "train.min_lr=3e-4",
    ];
    let kl = |name: &str, weight: f64| -> (f64, f64) {
        let steps = train(&tmp.path().join(name), &student, &distill_toml(&teacher, weight), &sets);
        let kl: Vec<f64> = steps.iter().map(|l| l["distill_kl"].as_f64().unwrap()).collect();
        eprintln!("{name}: KL by step {kl:.4?}");
        (kl[0], *kl.last().unwrap())
    };
    let (first, pure) = kl("pure", 1.0);
    let (_, mixed) = kl("mixed", 0.5);
    let (_, data) = kl("data", 1e-6);
    assert!(pure < 0.5 * first, "pure distillation: KL {first} -> {pure}");
    assert!(
        pure < mixed && mixed < data && data > 0.8 * first,
        "KL after 12 steps should fall with the distillation weight: {pure} (1.0), {mixed} (0.5), {data} (1e-6), from {first}"
    );
}

#[test]
fn a_teacher_with_another_vocabulary_or_a_bad_weight_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model_dir(&model, 1);
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let cfg = proxqat::model::LlamaConfig::tiny(300, true);
    let params = proxqat::model::Params::random(&cfg, 2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    proxqat::model::io::save_hf(
        &other,
        &cfg,
        &params.to_tensors(),
        &common::byte_tokenizer(),
        candle_core::DType::F32,
    )
    .unwrap();
    for (extra, needles) in [
        (
            distill_toml(&other, 1.0),
            vec!["distill.teacher", "300", "257", "tokenizer"],
        ),
        (distill_toml(&model, 0.0), vec!["distill.weight", "(0, 1]"]),
        (
            distill_toml(&tmp.path().join("missing"), 1.0),
            vec!["distill.teacher", "missing"],
        ),
    ] {
        let cfg = tiny_config(tmp.path(), &model, &extra);
        let out = run_bin(&["train", "--config", cfg.to_str().unwrap()], tmp.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra}: succeeded");
        for n in needles {
            assert!(err.contains(n), "{extra}: {err:?} does not mention {n:?}");
        }
        assert!(!tmp.path().join("run").exists(), "{extra}: a run directory was written");
    }
}
