//! A run killed with SIGKILL after a checkpoint and resumed produces the same per-step losses, bit for
//! bit, as an uninterrupted run (CPU, f32; Prox-QAT state included: λ, γ, sensitivity, learned scales
//! with their moments, Adam).

mod common;

use common::{tiny_config, tiny_model_dir};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const QUANT: &str = "[quant]\nmethod = \"prox\"\ndist_scale = 10.0\nstats_every = 1\ngrad_at = \"q\"\nscale_lr_mult = 1.0\n[quant.gamma]\nenable = true\nevery = 2\n[quant.grid]\nbits = 4\nscale = \"group\"\ngroup_size = 16\n";
const SETS: [&str; 6] = [
    "train.max_steps=30",
    "train.save_every=3",
    "train.log_every=1",
    "eval.initial=false",
    "eval.final=false",
    "train.warmup_steps=3",
];

fn args<'a>(cfg: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["train", "--config", cfg];
    for s in SETS {
        a.extend(["--set", s]);
    }
    a.extend(extra);
    a
}

/// Last logged (loss, λ) bits per step.
fn losses(run: &std::path::Path) -> BTreeMap<u64, (u64, u64)> {
    common::metrics(run)
        .iter()
        .filter(|l| l["kind"] == "train")
        .map(|l| {
            let bits = |k: &str| l[k].as_f64().unwrap().to_bits();
            (l["step"].as_u64().unwrap(), (bits("loss"), bits("lambda")))
        })
        .collect()
}

#[test]
fn kill_9_then_resume_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model_dir(&model, 8);
    let a_dir = tmp.path().join("a");
    std::fs::create_dir_all(&a_dir).unwrap();
    let cfg_a = tiny_config(&a_dir, &model, QUANT);
    let out = common::run_bin(&args(cfg_a.to_str().unwrap(), &[]), &a_dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference = losses(&a_dir.join("run"));
    assert_eq!(reference.len(), 30);

    let b_dir = tmp.path().join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    let cfg_b = tiny_config(&b_dir, &model, QUANT);
    let mut child = Command::new(common::bin())
        .args(args(cfg_b.to_str().unwrap(), &[]))
        .current_dir(&b_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let latest = b_dir.join("run/latest");
    let started = Instant::now();
    loop {
        let at = std::fs::read_to_string(&latest).unwrap_or_default();
        if at.as_str() >= "step-000006" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run was killed before it finished");
    let killed_at = std::fs::read_to_string(&latest).unwrap();
    assert!(killed_at.as_str() < "step-000030", "killed mid-run, at {killed_at}");

    let out = common::run_bin(&args(cfg_b.to_str().unwrap(), &["--resume"]), &b_dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed = losses(&b_dir.join("run"));
    assert_eq!(resumed.len(), 30);
    for (step, bits) in &reference {
        assert_eq!(
            resumed[step], *bits,
            "step {step} differs after resuming from {killed_at}"
        );
    }
}
