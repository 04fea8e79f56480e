//! The real binary end to end on a tiny model: train → eval → stats → harden, and refusals.

mod common;

use common::{fails_with, run_bin, tiny_config, tiny_model_dir};

fn stdout_json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).expect("stdout is one JSON object")
}

#[test]
fn train_eval_stats_harden_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model_dir(&model, 1);
    let quant = "[quant]\nmethod = \"prox\"\npull = \"prox\"\ndist_scale = 50.0\nstats_every = 1\n[quant.grid]\nbits = 4\nscale = \"channel\"\n";
    let cfg = tiny_config(tmp.path(), &model, quant);
    let out = run_bin(&["train", "--config", cfg.to_str().unwrap()], tmp.path());
    assert!(
        out.status.success(),
        "train failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = tmp.path().join("run");
    let lines = common::metrics(&run);
    let train: Vec<_> = lines.iter().filter(|l| l["kind"] == "train").collect();
    assert_eq!(train.len(), 4);
    for l in &train {
        assert!(l["loss"].as_f64().unwrap().is_finite() && l["lambda"].is_number() && l["hit_rate"].is_number());
    }
    let evals: Vec<_> = lines.iter().filter(|l| l["kind"] == "eval").collect();
    assert_eq!(evals.len(), 2, "initial and final evals");
    assert!(
        evals[1]["val_loss_fp"].as_f64().unwrap() < evals[0]["val_loss_fp"].as_f64().unwrap(),
        "val loss falls"
    );
    assert_eq!(std::fs::read_to_string(run.join("latest")).unwrap(), "step-000004");

    let ev = stdout_json(&run_bin(
        &["eval", "--ckpt", run.to_str().unwrap(), "--json", "--device", "cpu"],
        tmp.path(),
    ));
    for key in ["val_loss", "val_ppl", "val_loss_fp", "val_loss_q", "val_loss_fsq"] {
        assert!(ev[key].as_f64().unwrap().is_finite(), "eval --json lacks {key}: {ev}");
    }
    let final_eval = evals[1]["val_loss_fp"].as_f64().unwrap();
    assert!(
        (ev["val_loss_fp"].as_f64().unwrap() - final_eval).abs() < 1e-5,
        "eval reads back the trained weights"
    );

    let st = stdout_json(&run_bin(
        &["stats", "--ckpt", run.to_str().unwrap(), "--json"],
        tmp.path(),
    ));
    assert_eq!(
        st["tensors"].as_array().unwrap().len(),
        6,
        "mlp mode: 3 projections × 2 layers"
    );
    let hit = st["total"]["hit_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&hit));

    let hard = tmp.path().join("hard");
    let h = stdout_json(&run_bin(
        &[
            "harden",
            "--ckpt",
            run.to_str().unwrap(),
            "--all",
            "--out",
            hard.to_str().unwrap(),
            "--json",
        ],
        tmp.path(),
    ));
    assert!(h["moved"].as_u64().unwrap() > 0);
    let st2 = stdout_json(&run_bin(
        &["stats", "--ckpt", hard.to_str().unwrap(), "--json", "--atol", "0"],
        tmp.path(),
    ));
    assert_eq!(
        st2["total"]["hit_rate"].as_f64().unwrap(),
        1.0,
        "after harden --all every selected weight is on the grid"
    );
    // Codes between checkpoints: hardening keeps every code; 4 steps at lr 3e-3 moved some.
    let same = stdout_json(&run_bin(
        &[
            "stats",
            "--ckpt",
            hard.to_str().unwrap(),
            "--against",
            run.to_str().unwrap(),
            "--json",
        ],
        tmp.path(),
    ));
    assert_eq!(same["total"]["code_change_rate"].as_f64(), Some(0.0), "{same}");
    let moved = stdout_json(&run_bin(
        &[
            "stats",
            "--ckpt",
            run.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--against",
            model.to_str().unwrap(),
            "--json",
        ],
        tmp.path(),
    ));
    let tensors = moved["tensors"].as_array().unwrap();
    let (changed, numel) = tensors.iter().fold((0.0, 0.0), |(c, n), t| {
        let numel = t["numel"].as_f64().unwrap();
        (c + t["code_change_rate"].as_f64().unwrap() * numel, n + numel)
    });
    let total = moved["total"]["code_change_rate"].as_f64().unwrap();
    assert!(
        total > 0.0 && total < 1.0,
        "training moved some codes, not all: {total}"
    );
    assert!(
        (total - changed / numel).abs() < 1e-12,
        "the total is the numel-weighted mean of the tensors'"
    );
    // The pretrained model carries no grid of its own: without --config the refusal says where and how.
    fails_with(
        &[
            "stats",
            "--ckpt",
            run.to_str().unwrap(),
            "--against",
            model.to_str().unwrap(),
        ],
        tmp.path(),
        &["tiny", "carries no quant config", "--config"],
    );
    let ev2 = stdout_json(&run_bin(
        &["eval", "--ckpt", hard.to_str().unwrap(), "--json"],
        tmp.path(),
    ));
    assert!(
        (ev2["val_loss_fp"].as_f64().unwrap() - ev["val_loss_q"].as_f64().unwrap()).abs() < 1e-5,
        "hardened fp loss = q loss before"
    );
    let again = run_bin(
        &[
            "harden",
            "--ckpt",
            run.to_str().unwrap(),
            "--all",
            "--out",
            hard.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--overwrite"));

    // Resume continues from step 4 to 6 and appends to metrics.jsonl.
    let out = run_bin(
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "train.max_steps=6",
            "--resume",
        ],
        tmp.path(),
    );
    assert!(
        out.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = common::metrics(&run);
    assert_eq!(lines.iter().filter(|l| l["kind"] == "train").count(), 6);
    assert_eq!(std::fs::read_to_string(run.join("latest")).unwrap(), "step-000006");
}

#[test]
fn bad_configs_are_refused_with_the_key_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model_dir(&model, 2);
    let cases = [
        ("[quant]\nstpe = 1\n", "stpe"),
        ("[quant]\ndist_sacle = 1.0\n", "did you mean `dist_scale`?"),
        ("[quant.grid]\nscale = \"absolute\"\nstep = 0.0\n", "quant.grid.step"),
        ("[quant.grid]\nlevels = [0.1, -0.1]\n", "ascending"),
        ("[quant.grid]\nbits = 12\n", "quant.grid.bits"),
        ("[quant]\natol = -1.0\n", "quant.atol"),
        // Learned scales need the forward at q(x) (the default Prox-QAT takes the gradient at x).
        ("[quant]\nscale_lr_mult = 1.0\n", "grad_at = \"q\""),
        (
            "[quant]\nmethod = \"ste\"\nscale_lr_mult = -1.0\n",
            "quant.scale_lr_mult",
        ),
        ("[quant.sens]\nfloor = -1e-8\n", "quant.sens.floor"),
    ];
    for (extra, needle) in cases {
        let cfg = tiny_config(tmp.path(), &model, extra);
        let out = run_bin(&["train", "--config", cfg.to_str().unwrap()], tmp.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(
            err.contains(needle) && err.contains("run.toml"),
            "{extra:?}: error {err:?} does not name {needle} and the file"
        );
        assert!(
            !tmp.path().join("run").exists(),
            "nothing is written for a refused config"
        );
    }
    let cfg = tiny_config(tmp.path(), &model, "");
    let out = run_bin(
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "train.global_batch=6",
        ],
        tmp.path(),
    );
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("train.global_batch"));
    // A value outside an option's choices: the error names the key and lists the valid values.
    fails_with(
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "train.gemm=fastest",
        ],
        tmp.path(),
        &["train.gemm", "`measured` or `heuristic`"],
    );
}

#[test]
fn shipped_configs_parse() {
    for name in ["alpaca.toml", "demo.toml"] {
        let path = common::repo().join("configs").join(name);
        let cfg = proxqat::config::Config::load(&path, &[]).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(cfg.quant.is_some(), "{name} runs Prox-QAT");
    }
    let seed = proxqat::config::Config::load(&common::repo().join("configs/alpaca.toml"), &[]).unwrap();
    assert_eq!(
        (
            seed.train.micro_batch,
            seed.train.global_batch,
            seed.train.max_steps,
            seed.data.max_seq_length
        ),
        (4, 128, 3000, 256)
    );
    // The γ ramp is RESULTS.md §20's, carried over by the pull per step: η·c·(γ's rise per step) as on
    // SmolLM2 (η = 2e-4, c = 100, γ += 5e-5·(0.95 − hit) per step), so changing lr or c needs a new rate.
    let quant = seed.quant.unwrap();
    let gamma = &quant.gamma;
    let pull_rise_per_step = seed.train.lr * quant.dist_scale * gamma.lr / gamma.every as f64;
    assert!(gamma.enable && gamma.start == 0 && gamma.target == 0.95);
    assert!(
        (pull_rise_per_step / (2e-4 * 100.0 * 5e-5) - 1.0).abs() < 1e-9,
        "{pull_rise_per_step}"
    );
}

#[test]
fn eval_text_perplexity_follows_the_gptq_protocol_and_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model_dir(&model, 5);
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(8); // 360 bytes = byte tokens
    std::fs::write(tmp.path().join("t.txt"), &text).unwrap();
    let ev = stdout_json(&run_bin(
        &[
            "eval",
            "--ckpt",
            model.to_str().unwrap(),
            "--text",
            "t.txt",
            "--seq-len",
            "64",
            "--prompt",
            "The",
            "--max-new-tokens",
            "5",
            "--json",
        ],
        tmp.path(),
    ));
    assert_eq!(ev["text_tokens"].as_u64(), Some(360));
    assert_eq!(
        ev["text_windows"].as_u64(),
        Some(5),
        "floor(360 / 64) non-overlapping windows"
    );
    // Independent recomputation: mean over windows of each window's token-mean CE.
    let loaded = proxqat::model::io::load_model(&model).unwrap();
    let params = proxqat::model::Params::from_tensors(&loaded.cfg, loaded.tensors, candle_core::DType::F32).unwrap();
    let llama = proxqat::model::Llama::new(loaded.cfg.clone(), candle_core::DType::F32, &candle_core::Device::Cpu);
    let w = params
        .compute_weights(candle_core::DType::F32, |_, x| Ok(x.clone()))
        .unwrap();
    let ids = loaded
        .tokenizer
        .encode(text.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    let mut means = vec![];
    for win in ids.chunks(64).take(5) {
        let input = candle_core::Tensor::new(win, &candle_core::Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let labels: Vec<i64> = win.iter().map(|&i| i as i64).collect();
        means.push(llama.loss(&w, &input, &labels).unwrap().0.to_scalar::<f32>().unwrap() as f64);
    }
    let mean = means.iter().sum::<f64>() / 5.0;
    assert!((ev["text_mean_ce"].as_f64().unwrap() - mean).abs() < 1e-5);
    assert!((ev["text_ppl"].as_f64().unwrap() - mean.exp()).abs() < 1e-3 * mean.exp());
    let g = &ev["generations"][0];
    assert_eq!(g["prompt"], "The");
    assert!(g["token_ids"].as_array().unwrap().len() <= 5);
}

#[test]
fn nan_guard_skips_then_stops_with_the_last_checkpoint_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model_dir(&model, 6);
    let cfg = tiny_config(tmp.path(), &model, "");
    let sets = [
        "train.lr=1e30",
        "train.min_lr=1e30",
        "train.warmup_steps=0",
        "train.save_every=1",
        "train.max_steps=20",
    ];
    let mut args = vec!["train", "--config", cfg.to_str().unwrap()];
    for s in &sets {
        args.extend(["--set", s]);
    }
    let out = run_bin(&args, tmp.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run must stop");
    assert!(
        err.contains("consecutive steps had a non-finite loss") && err.contains("train.lr"),
        "{err}"
    );
    let lines = common::metrics(&tmp.path().join("run"));
    let skipped = lines.iter().filter(|l| l["skipped"] == true).count();
    assert_eq!(skipped, 5, "train.max_bad_steps = 5 skipped steps before stopping");
    // The last checkpoint (from before the first bad step) is whole and loads.
    let ev = stdout_json(&run_bin(
        &["eval", "--ckpt", tmp.path().join("run").to_str().unwrap(), "--json"],
        tmp.path(),
    ));
    assert!(ev["val_loss"].is_number());
}

#[test]
fn keep_last_deletes_older_checkpoints_and_the_run_still_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model_dir(&model, 6);
    let cfg = tiny_config(tmp.path(), &model, "");
    let train = |sets: &[&str], extra: &[&str]| {
        let mut args = vec!["train", "--config", cfg.to_str().unwrap()];
        for s in sets {
            args.extend(["--set", s]);
        }
        args.extend(extra);
        run_bin(&args, tmp.path())
    };
    let sets = [
        "train.save_every=1",
        "train.keep_last=2",
        "eval.initial=false",
        "eval.final=false",
    ];
    let out = train(&[&sets[..], &["train.max_steps=5"]].concat(), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = tmp.path().join("run");
    let steps = |run: &std::path::Path| {
        let mut names: Vec<String> = std::fs::read_dir(run)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("step-"))
            .collect();
        names.sort();
        names
    };
    assert_eq!(steps(&run), ["step-000004", "step-000005"]);
    assert_eq!(std::fs::read_to_string(run.join("latest")).unwrap(), "step-000005");
    // A save killed mid-write leaves its temporary directory (named for the dead process).
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    let partial = run.join(format!(".step-000006.tmp-{}", child.id()));
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join("model.safetensors"), b"cut short").unwrap();
    // The kept newest checkpoint resumes: two more steps, and again only the newest two remain;
    // the killed save's leftover is gone.
    let out = train(&[&sets[..], &["train.max_steps=7"]].concat(), &["--resume"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(steps(&run), ["step-000006", "step-000007"]);
    assert!(!partial.exists(), "the partial checkpoint of a killed run is deleted");
    let trained: Vec<u64> = common::metrics(&run)
        .iter()
        .filter(|l| l["kind"] == "train")
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(trained, [1, 2, 3, 4, 5, 6, 7], "the resumed run continues at step 6");
    // Resumed from the older of the two and saved there again: the later step-000007 (another
    // branch of the run) is left alone, and keep_last = 1 deletes nothing older than the new one.
    let older = run.join("step-000006");
    let out = train(
        &[&sets[..], &["train.max_steps=6", "train.keep_last=1"]].concat(),
        &["--resume", older.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(steps(&run), ["step-000006", "step-000007"]);
    assert_eq!(std::fs::read_to_string(run.join("latest")).unwrap(), "step-000006");
}
