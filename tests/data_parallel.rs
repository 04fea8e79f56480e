//! Data parallelism on the CPU: the training code of two ranks, run as two threads joined by the
//! in-process all-reduce (the NCCL path differs only in the transport; `scripts/multi-gpu.sh` runs it
//! on GPUs). Two ranks × 2 micro-batches must make the same run as one rank × 4, keep bit-identical
//! weights, and leave checkpoints that resume on either number of ranks.

mod common;

use candle_core::{Device, Tensor};
use common::{tiny_config, tiny_model_dir};
use proxqat::config::Config;
use proxqat::dist::{overlap, InProcess, Rank, ReduceOp};
use proxqat::train::Trainer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Prox-QAT with every piece of controller state on: λ (PI), γ from the hit rate, sensitivity EMAs.
const QUANT: &str =
    "[quant]\nmethod = \"prox\"\ndist_scale = 10.0\nstats_every = 1\n[quant.gamma]\nenable = true\nevery = 2\n\
[quant.grid]\nbits = 4\nscale = \"group\"\ngroup_size = 16\n";

fn config(dir: &Path, model: &Path, devices: usize, steps: usize) -> Config {
    config_with(dir, model, devices, steps, QUANT)
}

fn config_with(dir: &Path, model: &Path, devices: usize, steps: usize, quant: &str) -> Config {
    std::fs::create_dir_all(dir).unwrap();
    let path = tiny_config(dir, model, quant);
    let sets = [
        format!("train.devices={devices}"),
        "train.micro_batch=2".into(),
        "train.global_batch=8".into(),
        format!("train.max_steps={steps}"),
        "train.save_every=3".into(),
        "eval.initial=false".into(),
        "eval.final=false".into(),
    ];
    Config::load(&path, &sets).unwrap()
}

/// `f` on `world` CPU ranks joined by the in-process all-reduce, one thread each; results in rank order.
fn on_ranks<T: Send>(world: usize, f: impl Fn(Rank) -> T + Sync) -> Vec<T> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = InProcess::group(world)
            .into_iter()
            .map(|peer| {
                s.spawn(move || {
                    f(Rank {
                        device: Device::Cpu,
                        collective: std::rc::Rc::new(peer),
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Train `world` ranks to the end; each returns its final weights' bit patterns.
fn run_ranks(cfg: &Config, resume: Option<&Path>, world: usize) -> Vec<BTreeMap<String, Vec<u32>>> {
    on_ranks(world, |rank| {
        let mut trainer = Trainer::on_rank(cfg.clone(), resume, rank).unwrap();
        trainer.run().unwrap();
        let tensors = trainer.params.to_tensors();
        tensors.iter().map(|(k, t)| (k.clone(), common::bits(t))).collect()
    })
}

/// Per-step (loss, grad norm, λ, hit rate) of a run directory.
fn curve(run: &Path) -> Vec<[f64; 4]> {
    common::metrics(run)
        .iter()
        .filter(|l| l["kind"] == "train")
        .map(|l| ["loss", "grad_norm", "lambda", "hit_rate"].map(|k| l[k].as_f64().unwrap()))
        .collect()
}

fn assert_same_curve(a: &[[f64; 4]], b: &[[f64; 4]], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for (step, (x, y)) in a.iter().zip(b).enumerate() {
        for (k, (u, v)) in x.iter().zip(y).enumerate() {
            let rel = (u - v).abs() / u.abs().max(1e-12);
            assert!(
                rel <= tol,
                "{what}: step {} value {k}: {u} vs {v} (rel {rel:.2e} > {tol:.0e})",
                step + 1
            );
        }
    }
}

fn max_rel_diff(a: &BTreeMap<String, Vec<u32>>, b: &BTreeMap<String, Vec<u32>>) -> f64 {
    let mut worst: f64 = 0.0;
    for (name, x) in a {
        for (u, v) in x.iter().zip(&b[name]) {
            let (u, v) = (f32::from_bits(*u) as f64, f32::from_bits(*v) as f64);
            worst = worst.max((u - v).abs() / u.abs().max(1e-3));
        }
    }
    worst
}

#[test]
fn two_ranks_match_one_and_stay_identical_and_resume_on_either_count() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model_dir(&model, 8);
    let run = |name: &str| -> PathBuf { tmp.path().join(name) };

    // One rank × 4 micro-batches per step, and two ranks × 2.
    let one = config(&run("one"), &model, 1, 6);
    let weights_one = run_ranks(&one, None, 1).remove(0);
    let two = config(&run("two"), &model, 2, 6);
    let weights_two = run_ranks(&two, None, 2);

    // The ranks never diverge: same bits at the end (and `run` checked it at every save).
    assert_eq!(weights_two[0], weights_two[1], "rank 0 and rank 1 weights differ");
    // Same rows, same update: only the order of the f32 gradient sums differs.
    let (curve_one, curve_two) = (curve(&one.train.out_dir), curve(&two.train.out_dir));
    assert_eq!(curve_one.len(), 6);
    assert_same_curve(&curve_one, &curve_two, 1e-4, "1 rank × 4 vs 2 ranks × 2");
    let drift = max_rel_diff(&weights_one, &weights_two[0]);
    assert!(drift < 1e-3, "weights of 1 rank vs 2 ranks differ by {drift:.2e}");
    // Rank 0 alone wrote the run.
    assert!(two.train.out_dir.join("step-000003").is_dir() && two.train.out_dir.join("step-000006").is_dir());

    // The 2-rank checkpoint at step 3 resumes on 1 rank, and the 1-rank one on 2 ranks.
    for (from, ranks, name) in [(&two, 1, "two-then-one"), (&one, 2, "one-then-two")] {
        let mut cfg = config(&run(name), &model, ranks, 6);
        cfg.train.out_dir = run(name).join("run");
        let ckpt = from.train.out_dir.join("step-000003");
        let weights = run_ranks(&cfg, Some(&ckpt), ranks);
        let continued = curve(&cfg.train.out_dir);
        assert_eq!(continued.len(), 3, "{name}: steps 4..6 logged");
        assert_same_curve(&curve(&from.train.out_dir)[3..], &continued, 1e-4, name);
        let drift = max_rel_diff(&weights_one, &weights[0]);
        assert!(
            drift < 1e-3,
            "{name}: final weights differ from the 1-rank run by {drift:.2e}"
        );
    }
}

/// Learned scales are updated from the reduced gradients: the ranks stay bit-identical and follow the
/// one-rank curve. (Weights are not compared with the one-rank run element by element: a scale whose
/// f32 master differs in the last bit can round to a neighbouring f16 value.)
#[test]
fn learned_scales_stay_identical_across_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    tiny_model_dir(&model, 8);
    let quant = QUANT.replacen("[quant]\n", "[quant]\ngrad_at = \"q\"\nscale_lr_mult = 1.0\n", 1);
    let one = config_with(&tmp.path().join("one"), &model, 1, 6, &quant);
    run_ranks(&one, None, 1);
    let two = config_with(&tmp.path().join("two"), &model, 2, 6, &quant);
    let weights_two = run_ranks(&two, None, 2);
    assert_eq!(weights_two[0], weights_two[1], "rank 0 and rank 1 weights differ");
    let (curve_one, curve_two) = (curve(&one.train.out_dir), curve(&two.train.out_dir));
    assert_same_curve(
        &curve_one,
        &curve_two,
        1e-4,
        "learned scales: 1 rank × 4 vs 2 ranks × 2",
    );
}

#[test]
fn diverged_ranks_are_caught() {
    let results = on_ranks(2, |r| {
        // Rank 1 holds one weight one ulp away.
        let x = if r.index() == 0 {
            1.0f32
        } else {
            f32::from_bits(1.0f32.to_bits() + 1)
        };
        let tensor = |v: [f32; 2]| BTreeMap::from([("w".to_string(), Tensor::new(&v, &Device::Cpu).unwrap())]);
        let agreed = r.check_identical(&tensor([0.5, 2.0])).unwrap();
        let err = r.check_identical(&tensor([0.5, x])).unwrap_err().to_string();
        (agreed, err)
    });
    assert_eq!(results[0].0, results[1].0, "identical weights give one fingerprint");
    for (_, err) in &results {
        assert!(err.contains("weights differ"), "{err}");
    }
}

#[test]
fn in_process_all_reduce_sums_in_rank_order_and_takes_max_min() {
    let results = on_ranks(3, |r| {
        let v = (r.index() + 1) as f32;
        let sum = Tensor::new(&[v, 0.1 * v, 1e8], &Device::Cpu).unwrap();
        let max = Tensor::new(&[v, -v], &Device::Cpu).unwrap();
        let min = max.copy().unwrap();
        r.collective.all_reduce_in_place(&[&sum], ReduceOp::Sum).unwrap();
        r.collective.all_reduce_in_place(&[&max], ReduceOp::Max).unwrap();
        r.collective.all_reduce_in_place(&[&min], ReduceOp::Min).unwrap();
        let get = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        (get(&sum), get(&max), get(&min))
    });
    let expected_sum = vec![6.0, (0.1f32 + 0.2f32) + 0.3f32, 3e8];
    for (sum, max, min) in &results {
        assert_eq!(sum, &expected_sum);
        assert_eq!(max, &vec![3.0, -1.0]);
        assert_eq!(min, &vec![1.0, -3.0]);
    }
}

/// The backward-overlap buckets: an accumulator reported complete is summed once its bucket is full
/// (here: two 16-byte tensors per bucket), untracked or repeated reports change nothing, and `end`
/// starts the last partial bucket and names every tensor it summed.
#[test]
fn ready_accumulators_are_summed_in_buckets_during_backward() {
    let results = on_ranks(2, |r| {
        let v = (r.index() + 1) as f32;
        let accs: Vec<Tensor> = (0..3)
            .map(|i| Tensor::new(&[v * (i + 1) as f32; 4], &Device::Cpu).unwrap())
            .collect();
        let other = Tensor::new(&[v; 4], &Device::Cpu).unwrap();
        let first = |t: &Tensor| t.to_vec1::<f32>().unwrap()[0];
        let tracker = overlap::begin(r.collective.clone(), &accs, 32);
        overlap::accumulated(&accs[1]).unwrap();
        overlap::accumulated(&other).unwrap();
        let after_one = first(&accs[1]);
        overlap::accumulated(&accs[0]).unwrap();
        let after_bucket = (first(&accs[1]), first(&accs[0]));
        overlap::accumulated(&accs[0]).unwrap();
        overlap::accumulated(&accs[2]).unwrap();
        let partial = first(&accs[2]);
        let started = tracker.end().unwrap();
        let named = accs.iter().all(|t| started.contains(&t.id())) && !started.contains(&other.id());
        // Outside a tracked backward a report is a no-op.
        overlap::accumulated(&other).unwrap();
        (
            v,
            after_one,
            after_bucket,
            partial,
            first(&accs[2]),
            first(&other),
            named,
        )
    });
    // Rank r holds (i + 1)·v in accumulator i, v = r + 1; the sums over ranks are 3·(i + 1).
    for (v, after_one, after_bucket, partial, last, other, named) in results {
        assert_eq!(after_one, 2.0 * v, "one ready tensor waits for its bucket");
        assert_eq!(after_bucket, (6.0, 3.0), "a full bucket is summed over ranks");
        assert_eq!(partial, 3.0 * v, "the partial bucket waits for end");
        assert_eq!(last, 9.0, "end sums the partial bucket");
        assert_eq!(other, v, "an untracked tensor is never summed");
        assert!(named, "end names exactly the summed tensors");
    }
}
