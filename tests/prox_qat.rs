//! Prox-QAT on CPU: on a tiny model the hit rate rises to ≥ 0.9 while the fp loss stays near a plain
//! fine-tune's and the q loss approaches the fp loss; on the real SmolLM2 a short run moves the same way.

mod common;

use common::{metrics, run_bin, tiny_config, tiny_model_dir};
use std::path::Path;

struct Outcome {
    first_eval: serde_json::Value,
    last_eval: serde_json::Value,
    hit: Vec<f64>,
}

fn train(tmp: &Path, name: &str, model: &Path, extra: &str, sets: &[&str]) -> Outcome {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = tiny_config(&dir, model, extra);
    let mut args = vec!["train", "--config", cfg.to_str().unwrap()];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = run_bin(&args, &dir);
    assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    let lines = metrics(&dir.join("run"));
    let evals: Vec<_> = lines.iter().filter(|l| l["kind"] == "eval").cloned().collect();
    let hit = lines.iter().filter_map(|l| l["hit_rate"].as_f64()).collect();
    Outcome {
        first_eval: evals[0].clone(),
        last_eval: evals.last().unwrap().clone(),
        hit,
    }
}

/// The toy's fine-tune: 40 steps, lr 1e-3 → 1e-4.
const TOY_FINE_TUNE: [&str; 5] = [
    "train.max_steps=40",
    "train.warmup_steps=4",
    "train.log_every=5",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
];

/// The toy model pretrained for 60 steps under `tmp` (its checkpoint directory).
fn pretrained_toy(tmp: &Path) -> std::path::PathBuf {
    let init = tmp.join("tiny");
    tiny_model_dir(&init, 3);
    train(
        tmp,
        "pre",
        &init,
        "",
        &["train.max_steps=60", "train.warmup_steps=4", "train.log_every=20"],
    );
    tmp.join("pre/run/step-000060")
}

/// The toy: a 2-layer byte-level model, pretrained 60 steps, then fine-tuned 40 more steps either plainly
/// or with Prox-QAT on a 3-bit per-channel grid (rows of 64 bytes: mostly the shared prompt, which the
/// toy learns fast, so quantization has a measurable cost here: q − fp ≈ 0.02 at the start).
#[test]
fn tiny_model_prox_qat_reaches_the_grid_at_little_cost() {
    let tmp = tempfile::tempdir().unwrap();
    let model = pretrained_toy(tmp.path());
    let grid = "[quant.grid]\nbits = 3\nscale = \"channel\"\n";
    let sets = TOY_FINE_TUNE;
    let v = |o: &serde_json::Value, k: &str| o[k].as_f64().unwrap();
    let fp = train(
        tmp.path(),
        "fp",
        &model,
        &format!("[quant]\nmethod = \"fp\"\nstats_every = 5\n{grid}"),
        &sets,
    );
    // c = 3000 makes η·c ≥ 1 down to η = 3.3e-4: a projected step, with the task direction scaled by λ.
    let prox = train(
        tmp.path(),
        "prox",
        &model,
        &format!("[quant]\nmethod = \"prox\"\npull = \"prox\"\ndist_scale = 3000.0\nstats_every = 5\n[quant.dual]\nbeta = 1.0\n{grid}"),
        &sets,
    );
    let (fp_final, q_final) = (v(&prox.last_eval, "val_loss_fp"), v(&prox.last_eval, "val_loss_q"));
    let first_gap = v(&prox.first_eval, "val_loss_q") - v(&prox.first_eval, "val_loss_fp");
    eprintln!(
        "plain: fp {:.4} (q {:.4}); prox: hit {:?} fp {fp_final:.4} q {q_final:.4}; q-gap {first_gap:.4} -> {:.4}",
        v(&fp.last_eval, "val_loss_fp"),
        v(&fp.last_eval, "val_loss_q"),
        prox.hit,
        q_final - fp_final
    );
    assert!(
        prox.hit.first().unwrap() < &0.9 || fp.hit[0] < 0.2,
        "the toy starts off the grid"
    );
    assert!(
        *prox.hit.last().unwrap() >= 0.9,
        "hit rate {:?} did not reach 0.9",
        prox.hit
    );
    assert!(
        fp_final <= v(&fp.last_eval, "val_loss_fp") + 0.15,
        "fp loss {fp_final} more than 0.15 nats above the plain fine-tune"
    );
    assert!(
        q_final - fp_final < 0.5 * first_gap,
        "q-gap {} did not shrink below half of {first_gap}",
        q_final - fp_final
    );
}

/// The real SmolLM2-135M on the Alpaca demo data: a short Prox-QAT run raises the hit rate and shrinks
/// the gap between the loss at q(x) and at x.
#[test]
fn smollm2_short_prox_qat_run_moves_toward_the_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::assets().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let quant = "[quant]\nmethod = \"prox\"\npull = \"prox\"\ndist_scale = 15000.0\nstats_every = 1\n\
                 [quant.grid]\nbits = 4\nscale = \"group\"\ngroup_size = 32\n[quant.dual]\nbeta = 1.5\n";
    let r = train(
        tmp.path(),
        "smol",
        &model,
        quant,
        &[
            "train.max_steps=5",
            "train.micro_batch=2",
            "train.global_batch=2",
            "train.lr=2e-5",
            "train.min_lr=2e-5",
            "train.warmup_steps=0",
            "data.val_records=4",
            "data.max_seq_length=128",
            "data.mask_prompt=true",
            "eval.max_batches=2",
        ],
    );
    let v = |o: &serde_json::Value, k: &str| o[k].as_f64().unwrap();
    let gap0 = v(&r.first_eval, "val_loss_q") - v(&r.first_eval, "val_loss_fp");
    let gap1 = v(&r.last_eval, "val_loss_q") - v(&r.last_eval, "val_loss_fp");
    eprintln!(
        "smollm2: hit {:?}; fp {:.4} -> {:.4}; q-gap {gap0:.4} -> {gap1:.4}",
        r.hit,
        v(&r.first_eval, "val_loss_fp"),
        v(&r.last_eval, "val_loss_fp")
    );
    assert!(
        r.hit.windows(2).all(|w| w[1] >= w[0]) && r.hit.last() > r.hit.first(),
        "hit rate {:?} does not rise",
        r.hit
    );
    assert!(gap1 < gap0, "q-gap did not shrink: {gap0} -> {gap1}");
}

/// Every training variant runs through the one step function: STE, gradient at q(x) or selective,
/// the prox pull, γ control, the sigmoid-log sensitivity map, and a one-shot harden.
#[test]
fn every_variant_trains_and_harden_at_snaps_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model_dir(&model, 4);
    let grid = "[quant.grid]\nbits = 4\nscale = \"channel\"\n";
    let variants = [
        ("ste", "method = \"ste\""),
        ("grad-q", "grad_at = \"q\""),
        ("selective", "grad_at = \"selective\"\natol = 2e-3"),
        (
            "prox-gamma",
            "pull = \"prox\"\ndist_scale = 100.0\n[quant.gamma]\nenable = true\nstart = 2\nevery = 1",
        ),
        ("sigmoid-log", "[quant.sens]\nmap = \"sigmoid_log\""),
    ];
    for (name, q) in variants {
        let r = train(
            tmp.path(),
            name,
            &model,
            &format!("{grid}[quant]\nstats_every = 1\n{q}\n"),
            &["train.max_steps=3"],
        );
        let last = r.last_eval["val_loss_fp"].as_f64().unwrap();
        assert!(
            last.is_finite() && last < r.first_eval["val_loss_fp"].as_f64().unwrap(),
            "{name}: val loss did not fall"
        );
    }
    // harden_at = 2: after step 2 starts every selected weight is on the grid, so the step's stats see
    // only the distance one optimizer step can open (lr 1e-6 keeps it below atol).
    let r = train(
        tmp.path(),
        "harden",
        &model,
        &format!("{grid}[quant]\nharden_at = 2\nstats_every = 1\n"),
        &["train.max_steps=3", "train.lr=1e-6", "train.min_lr=1e-6"],
    );
    assert!(
        r.hit[0] < 0.9,
        "before hardening the weights are off the grid: {:?}",
        r.hit
    );
    assert!(
        r.hit[2] == 1.0,
        "after harden_at every selected weight hits: {:?}",
        r.hit
    );
    let gap = r.last_eval["val_loss_q"].as_f64().unwrap() - r.last_eval["val_loss_fp"].as_f64().unwrap();
    assert!(gap.abs() < 1e-4, "hardened: q loss = fp loss, got gap {gap}");
}

/// Learned scales on the toy of the first test: with the prox pull holding the codes, training the
/// per-channel scales lowers the loss at q below the same run with fixed scales; the stored scales
/// moved, stay exact in f16, and the grid the checkpoint records is the one the weights sit on.
#[test]
fn learned_scales_lower_the_loss_at_q_under_the_prox_pull() {
    let tmp = tempfile::tempdir().unwrap();
    let model = pretrained_toy(tmp.path());
    let sets = TOY_FINE_TUNE;
    let quant = |extra: &str| {
        format!(
            "[quant]\nmethod = \"prox\"\npull = \"prox\"\ngrad_at = \"q\"\ndist_scale = 3000.0\nstats_every = 5\n{extra}\n\
             [quant.dual]\nbeta = 1.0\n[quant.grid]\nbits = 3\nscale = \"channel\"\n"
        )
    };
    let fixed = train(tmp.path(), "fixed", &model, &quant(""), &sets);
    let learned = train(tmp.path(), "learned", &model, &quant("scale_lr_mult = 1.0"), &sets);
    let q = |o: &Outcome| o.last_eval["val_loss_q"].as_f64().unwrap();
    eprintln!(
        "val loss at q: start {:.4}, fixed scales {:.4}, learned {:.4}; hit {:?}",
        fixed.first_eval["val_loss_q"].as_f64().unwrap(),
        q(&fixed),
        q(&learned),
        learned.hit
    );
    assert!(
        *learned.hit.last().unwrap() >= 0.9,
        "the pull still reaches the grid: {:?}",
        learned.hit
    );
    assert!(
        q(&learned) < q(&fixed) - 0.02,
        "learned scales {} vs fixed {}",
        q(&learned),
        q(&fixed)
    );

    let load = |run: &str, file: &str| {
        let dir = tmp.path().join(run).join("run/step-000040");
        candle_core::safetensors::load(dir.join(file), &candle_core::Device::Cpu).unwrap()
    };
    let (start, end) = (
        load("fixed", "quant_state.safetensors"),
        load("learned", "quant_state.safetensors"),
    );
    let weights = load("learned", "model.safetensors");
    let mut moved = 0;
    for (key, scale) in &end {
        let Some(name) = key.strip_prefix("scale.") else {
            continue;
        };
        let s = common::to_vec_f64(scale);
        let s16 = common::to_vec_f64(&scale.to_dtype(candle_core::DType::F16).unwrap());
        assert_eq!(s, s16, "{key} is not f16-exact");
        moved += usize::from(s != common::to_vec_f64(&start[key]));
        assert!(
            end.contains_key(&format!("master_scale.{name}")),
            "{name}: master scale stored"
        );
        // The checkpoint's weights sit on the grid of the checkpoint's scales (hit rate ≥ 0.9 above).
        let w = common::to_vec_f64(&weights[name]);
        let cols = w.len() / s.len();
        let on_grid = w
            .iter()
            .enumerate()
            .filter(|(i, v)| {
                let step = s[i / cols];
                ((*v / step).round() * step - *v).abs() < 1e-3
            })
            .count();
        assert!(
            on_grid as f64 >= 0.9 * w.len() as f64,
            "{name}: {on_grid} of {} on the learned grid",
            w.len()
        );
    }
    assert!(moved > 0, "no scale moved");
}
