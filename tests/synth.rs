//! Sampling from the model (`Llama::sample`) and `proxqat synth`: teacher responses as extra
//! distillation data that join the training split only.

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::{metrics, run_bin, tiny_config, tiny_model_dir};
use proxqat::model::{Llama, LlamaConfig, Params};
use proxqat::rng::Rng;
use std::collections::BTreeMap;

/// A tiny random model whose embedding (also its tied head) is scaled by `spread`: the larger, the
/// further its next-token distributions are from uniform (and greedy choices from ties).
fn peaked_model(vocab: usize, spread: f64) -> (Llama, BTreeMap<String, Tensor>) {
    let cfg = LlamaConfig::tiny(vocab, true);
    let params = Params::random(&cfg, 11, DType::F32, &Device::Cpu).unwrap();
    let mut w = params.compute_weights(DType::F32, |_, x| Ok(x.clone())).unwrap();
    let table = w["model.embed_tokens.weight"].affine(spread, 0.0).unwrap();
    w.insert("model.embed_tokens.weight".into(), table);
    (Llama::new(cfg, DType::F32, &Device::Cpu), w)
}

/// The last position's logits of one unpadded sequence.
fn last_logits(model: &Llama, w: &BTreeMap<String, Tensor>, ids: &[u32]) -> Tensor {
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.logits(w, &input).unwrap().squeeze(0).unwrap();
    logits.get(ids.len() - 1).unwrap()
}

#[test]
fn batched_greedy_sampling_equals_one_sequence_at_a_time() {
    let (model, w) = peaked_model(257, 30.0);
    // Lengths on both sides of the 32-column steps the batch is padded to; the last is already full.
    let prompts: Vec<Vec<u32>> = [3usize, 9, 31, 40, 60]
        .iter()
        .map(|&n| (0..n).map(|i| ((i * 37 + n) % 256) as u32).collect())
        .collect();
    let max_len = 60;
    let limits = vec![max_len; prompts.len()];
    let got = model.sample(&w, &prompts, &limits, &[], 0.0, &mut Rng::new(0)).unwrap();
    for (prompt, continuation) in prompts.iter().zip(&got) {
        let mut row = prompt.clone();
        while row.len() < max_len {
            let next = last_logits(&model, &w, &row).argmax(D::Minus1).unwrap();
            row.push(next.to_scalar::<u32>().unwrap());
        }
        assert_eq!(continuation, &row[prompt.len()..], "prompt of {} tokens", prompt.len());
    }
    assert!(got[4].is_empty(), "a prompt of max_len tokens gets no continuation");

    // A stop token ends a row without being kept, and only that row.
    let stop = got[0][2];
    let stopped = model
        .sample(&w, &prompts[..2], &limits[..2], &[stop], 0.0, &mut Rng::new(0))
        .unwrap();
    assert_eq!(stopped[0], got[0][..got[0].iter().position(|&t| t == stop).unwrap()]);
    let cut = got[1].iter().position(|&t| t == stop).unwrap_or(got[1].len());
    assert_eq!(stopped[1], got[1][..cut]);
}

#[test]
fn sampled_tokens_follow_the_softmax_at_the_temperature() {
    let (model, w) = peaked_model(6, 1.0);
    let prompt: Vec<u32> = vec![1, 4, 2];
    let temperature = 0.7;
    let logits: Vec<f64> = last_logits(&model, &w, &prompt)
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&l| l as f64 / temperature)
        .collect();
    let max = logits.iter().cloned().fold(f64::MIN, f64::max);
    let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
    let p: Vec<f64> = logits.iter().map(|l| (l - max).exp() / z).collect();
    assert!(
        p.iter().cloned().fold(0.0, f64::max) < 0.9 && p.iter().filter(|&&x| x > 0.02).count() >= 3,
        "the test needs a spread distribution, got {p:?}"
    );

    let n = 4000;
    let draws = model
        .sample(
            &w,
            &vec![prompt.clone(); n],
            &vec![prompt.len() + 1; n],
            &[],
            temperature,
            &mut Rng::new(7),
        )
        .unwrap();
    let mut counts = [0usize; 6];
    for d in &draws {
        counts[d[0] as usize] += 1;
    }
    for (k, (&c, &pk)) in counts.iter().zip(&p).enumerate() {
        let freq = c as f64 / n as f64;
        let sigma = (pk * (1.0 - pk) / n as f64).sqrt();
        assert!(
            (freq - pk).abs() < 5.0 * sigma + 1e-3,
            "token {k}: drawn {freq:.4}, softmax {pk:.4} (counts {counts:?})"
        );
    }
    // The same seed draws the same tokens.
    let again = model
        .sample(
            &w,
            &vec![prompt.clone(); 100],
            &vec![prompt.len() + 1; 100],
            &[],
            temperature,
            &mut Rng::new(7),
        )
        .unwrap();
    assert_eq!(draws[..100], again);
}

#[test]
fn synth_answers_the_training_split_and_extra_train_joins_only_the_training_split() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("teacher");
    tiny_model_dir(&model, 5);
    // 12 demo records, 4 of them the validation split; 320 byte tokens leave room after the prompts.
    let records = proxqat::data::alpaca::load_records(&common::assets().join("alpaca_en_demo.json")).unwrap();
    let small = tmp.path().join("small.json");
    std::fs::write(&small, proxqat::synth::to_json(&records[..12]).to_string()).unwrap();
    let (train, val) = proxqat::data::split(records[..12].to_vec(), proxqat::data::ValSize::Records(4), 42).unwrap();
    let train_run = |dir: &std::path::Path, sets: &[String]| {
        std::fs::create_dir_all(dir).unwrap();
        let cfg = tiny_config(dir, &model, "");
        let mut args = vec!["train".to_string(), "--config".into(), cfg.display().to_string()];
        let data = format!("data.path=\"{}\"", small.display());
        for s in [
            "train.max_steps=1",
            "data.val_records=4",
            "data.max_seq_length=320",
            &data,
        ]
        .into_iter()
        .chain(sets.iter().map(String::as_str))
        {
            args.extend(["--set".into(), s.to_string()]);
        }
        let out = run_bin(&args.iter().map(String::as_str).collect::<Vec<_>>(), dir);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        metrics(&dir.join("run"))
    };
    let teacher_run = train_run(tmp.path(), &[]);

    let synth = |out: &str, seed: &str| {
        let args = [
            "synth",
            "--ckpt",
            "run",
            "--out",
            out,
            "--samples",
            "2",
            "--seed",
            seed,
            "--max-new-tokens",
            "12",
            "--json",
        ];
        let o = run_bin(&args, tmp.path());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (
            report,
            proxqat::data::alpaca::load_records(&tmp.path().join(out)).unwrap(),
        )
    };
    let (report, synthetic) = synth("synth.json", "1");
    assert_eq!(
        (report["records"].as_u64(), report["responses"].as_u64()),
        (Some(8), Some(16))
    );
    assert!((1..=16 * 12).contains(&report["tokens"].as_u64().unwrap()), "{report}");
    for (i, r) in synthetic.iter().enumerate() {
        // The training split's records in split order, each twice; never a validation record.
        let source = &train[i / 2];
        assert_eq!((&r.instruction, &r.input), (&source.instruction, &source.input));
        assert!(!val.iter().any(|v| v.instruction == r.instruction));
        assert_ne!(
            r.output, source.output,
            "a random byte model does not reproduce the demo answer"
        );
    }
    assert_eq!(synth("again.json", "1").1, synthetic, "a seed gives the same samples");
    assert_ne!(synth("other.json", "2").1, synthetic);
    let exists = run_bin(&["synth", "--ckpt", "run", "--out", "synth.json"], tmp.path());
    assert!(!exists.status.success());
    assert!(String::from_utf8_lossy(&exists.stderr).contains("--overwrite"));

    // Training with the samples: the validation loss before any step is the one without them (the
    // validation split is data.path's); the training stream is not.
    let extra = format!("data.extra_train=[\"{}\"]", tmp.path().join("synth.json").display());
    let extra_run = train_run(&tmp.path().join("with-extra"), &[extra]);
    let first = |m: &[serde_json::Value], kind: &str| m.iter().find(|l| l["kind"] == kind).unwrap().clone();
    assert_eq!(
        first(&teacher_run, "eval")["val_loss_fp"],
        first(&extra_run, "eval")["val_loss_fp"]
    );
    assert_ne!(first(&teacher_run, "train")["loss"], first(&extra_run, "train")["loss"]);
    let missing = run_bin(
        &[
            "train",
            "--config",
            "with-extra/run.toml",
            "--set",
            "data.extra_train=[\"nope.json\"]",
            "--overwrite",
        ],
        tmp.path(),
    );
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && err.contains("data.extra_train") && err.contains("nope.json"),
        "{err}"
    );
}
