//! Every op and a whole tiny Llama against central finite differences in f64.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{randn, to_vec_f64};
use proxqat::fused::{self, Kernels};
use proxqat::model::llama::{is_norm_gain, AccumulatorStart, EMBEDDING, HEAD};
use proxqat::model::{ops, Llama, LlamaConfig, Params};

/// Compare autograd's gradient of `f` at `x0` with central differences on up to `probes` entries.
fn check(name: &str, x0: &Tensor, probes: usize, f: impl Fn(&Tensor) -> Tensor) {
    let var = Var::from_tensor(x0).unwrap();
    let grads = f(var.as_tensor()).backward().unwrap();
    let analytic = grads.get(var.as_tensor()).expect("gradient reaches the input");
    check_entries(name, x0, analytic, probes, |x| f(x).to_scalar::<f64>().unwrap());
}

/// Compare `analytic`, the gradient of the scalar `f` at `x0`, with central differences on up to
/// `probes` entries (all of them when there are no more).
fn check_entries(name: &str, x0: &Tensor, analytic: &Tensor, probes: usize, f: impl Fn(&Tensor) -> f64) {
    let (base, analytic) = (to_vec_f64(x0), to_vec_f64(analytic));
    let n = base.len();
    let h = 1e-5;
    let mut rng = proxqat::rng::Rng::new(7);
    let mut worst = 0f64;
    for p in 0..probes.min(n) {
        let i = if probes >= n { p } else { rng.below(n) };
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            f(&Tensor::from_vec(v, x0.shape(), &Device::Cpu).unwrap())
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        let err = (numeric - analytic[i]).abs() / (1e-6 + numeric.abs().max(analytic[i].abs()));
        worst = worst.max(err);
        assert!(
            err < 1e-5,
            "{name}: entry {i}: finite difference {numeric} vs analytic {}",
            analytic[i]
        );
    }
    assert!(
        analytic.iter().any(|g| *g != 0.0),
        "{name}: gradient is identically zero"
    );
    eprintln!("{name}: worst relative error {worst:.2e}");
}

/// A scalar that weighs every output entry differently, so no gradient cancels by symmetry.
fn probe(y: &Tensor, seed: u64) -> Tensor {
    (y * randn(y.dims(), seed, 1.0)).unwrap().sum_all().unwrap()
}

#[test]
fn rms_norm_matches_finite_differences() {
    let x = randn(&[2, 3, 8], 1, 1.0);
    let w = randn(&[8], 2, 1.0);
    check("rms_norm dx", &x, 48, |x| {
        probe(&ops::rms_norm(x, &w, 1e-5).unwrap(), 3)
    });
    check("rms_norm dw", &w, 8, |w| probe(&ops::rms_norm(&x, w, 1e-5).unwrap(), 3));
}

#[test]
fn rope_matches_finite_differences() {
    let mut cfg = LlamaConfig::tiny(32, true);
    cfg.head_dim = 8;
    let (cos, sin) = ops::rope_tables(&cfg, 5, DType::F64, &Device::Cpu).unwrap();
    let x = randn(&[1, 2, 5, 8], 4, 1.0);
    check("rope", &x, 80, |x| probe(&ops::rope(x, &cos, &sin).unwrap(), 5));
}

#[test]
fn llama3_rope_scaling_matches_reference_frequencies() {
    // Reference values of HF's _compute_llama3_parameters for Llama-3.2-1B, recomputed in f64 here.
    let cfg = LlamaConfig::llama_3_2_1b();
    let (cos, _) = ops::rope_tables(&cfg, 2, DType::F64, &Device::Cpu).unwrap();
    let row1 = to_vec_f64(&cos.get(1).unwrap());
    let s = cfg.rope_scaling.clone().unwrap();
    assert_eq!(row1.len(), 32, "one angle per rotated pair");
    for (i, got) in row1.iter().enumerate() {
        let f = 1.0 / 500_000f64.powf(2.0 * i as f64 / 64.0);
        let wl = 2.0 * std::f64::consts::PI / f;
        let (lo, hi) = (8192.0 / s.low_freq_factor, 8192.0 / s.high_freq_factor);
        let expect = if wl < hi {
            f
        } else if wl > lo {
            f / 32.0
        } else {
            let sm = (8192.0 / wl - 1.0) / 3.0;
            (1.0 - sm) * f / 32.0 + sm * f
        };
        assert!((got - expect.cos()).abs() < 1e-12, "frequency {i}");
    }
}

#[test]
fn softmax_matches_finite_differences() {
    let x = randn(&[3, 7], 6, 2.0);
    check("softmax", &x, 21, |x| probe(&ops::softmax_last_dim(x).unwrap(), 7));
}

#[test]
fn causal_attention_matches_finite_differences() {
    let mask = ops::causal_mask(5, DType::F64, &Device::Cpu).unwrap();
    let q = randn(&[1, 4, 5, 6], 8, 1.0);
    let k = randn(&[1, 2, 5, 6], 9, 1.0);
    let v = randn(&[1, 2, 5, 6], 10, 1.0);
    check("attention dq", &q, 40, |q| {
        probe(&ops::attention(q, &k, &v, &mask).unwrap(), 11)
    });
    check("attention dk", &k, 40, |k| {
        probe(&ops::attention(&q, k, &v, &mask).unwrap(), 11)
    });
    check("attention dv", &v, 40, |v| {
        probe(&ops::attention(&q, &k, v, &mask).unwrap(), 11)
    });
}

#[test]
fn causal_attention_equals_explicit_gqa_reference() {
    // Independent of the grouping trick: repeat KV heads explicitly and mask by hand.
    let (t, d) = (4, 3);
    let q = randn(&[1, 4, t, d], 12, 1.0);
    let k = randn(&[1, 2, t, d], 13, 1.0);
    let v = randn(&[1, 2, t, d], 14, 1.0);
    let out = to_vec_f64(&ops::attention(&q, &k, &v, &ops::causal_mask(t, DType::F64, &Device::Cpu).unwrap()).unwrap());
    let (qv, kv, vv) = (to_vec_f64(&q), to_vec_f64(&k), to_vec_f64(&v));
    for h in 0..4 {
        let g = h / 2; // heads 0,1 share KV head 0 (HF repeat_kv order)
        for i in 0..t {
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    (0..d)
                        .map(|c| qv[(h * t + i) * d + c] * kv[(g * t + j) * d + c])
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
            for c in 0..d {
                let expect: f64 = (0..=i)
                    .map(|j| (scores[j] - m).exp() / z * vv[(g * t + j) * d + c])
                    .sum();
                assert!((out[(h * t + i) * d + c] - expect).abs() < 1e-12);
            }
        }
    }
}

#[test]
fn swiglu_matches_finite_differences() {
    let g = randn(&[2, 6], 15, 1.5);
    let u = randn(&[2, 6], 16, 1.0);
    check("swiglu dgate", &g, 12, |g| probe(&ops::swiglu(g, &u).unwrap(), 17));
    check("swiglu dup", &u, 12, |u| probe(&ops::swiglu(&g, u).unwrap(), 17));
}

#[test]
fn cross_entropy_matches_finite_differences_and_ignores_minus_100() {
    let logits = randn(&[5, 9], 18, 2.0);
    let targets = [3i64, -100, 0, 8, -100];
    check("cross_entropy", &logits, 45, |l| {
        ops::cross_entropy(l, &targets).unwrap().0
    });
    let (loss, n) = ops::cross_entropy(&logits, &targets).unwrap();
    assert_eq!(n, 3);
    // f64 recomputation of the token mean over the three counted rows.
    let v = to_vec_f64(&logits);
    let expect: f64 = [(0usize, 3usize), (2, 0), (3, 8)]
        .iter()
        .map(|&(r, t)| {
            let row = &v[r * 9..(r + 1) * 9];
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() - row[t]
        })
        .sum::<f64>()
        / 3.0;
    assert!((loss.to_scalar::<f64>().unwrap() - expect).abs() < 1e-12);
}

fn whole_model(tied: bool) {
    let cfg = LlamaConfig::tiny(40, tied);
    let params = Params::random(&cfg, 3, DType::F64, &Device::Cpu).unwrap();
    // Random norm gains, so their gradients are not at a symmetric point.
    for (name, var) in &params.vars {
        if name.ends_with("norm.weight") {
            var.set(&(randn(var.dims(), 99, 0.1) + 1.0).unwrap()).unwrap();
        }
    }
    let model = Llama::new(cfg.clone(), DType::F64, &Device::Cpu);
    let ids = Tensor::new(&[[1u32, 5, 7, 2, 39, 11], [4, 4, 0, 9, 3, 8]], &Device::Cpu).unwrap();
    let labels: Vec<i64> = vec![1, 5, 7, 2, 39, 11, 4, 4, -100, 9, 3, 8];
    let names = [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    ];
    let mut all: Vec<&str> = names.to_vec();
    if !tied {
        all.push("lm_head.weight");
    }
    for name in all {
        let x0 = params.get(name).unwrap().as_tensor().copy().unwrap();
        check(&format!("llama(tied={tied}) {name}"), &x0, 12, |x| {
            let w = params
                .compute_weights(DType::F64, |n, t| Ok(if n == name { x.clone() } else { t.clone() }))
                .unwrap();
            model.loss(&w, &ids, &labels).unwrap().0
        });
    }
}

#[test]
fn tiny_llama_tied_matches_finite_differences() {
    whole_model(true);
}

#[test]
fn tiny_llama_untied_matches_finite_differences() {
    whole_model(false);
}

// The fused kernels' CPU paths (the semantics their CUDA kernels are checked against on the GPU):
// finite differences, and equality with the reference compositions of candle primitives.

/// max |a − b| over two same-shape f64 tensors.
fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    to_vec_f64(a)
        .iter()
        .zip(to_vec_f64(b))
        .map(|(x, y)| (x - y).abs())
        // NaN wins (f64::max would drop it, and a NaN gradient would pass).
        .fold(
            0.0,
            |m: f64, d| if m.is_nan() || d.is_nan() { f64::NAN } else { m.max(d) },
        )
}

#[test]
fn fused_rms_norm_matches_finite_differences_and_reference() {
    let x = randn(&[2, 3, 8], 1, 1.0);
    let w = randn(&[8], 2, 1.0);
    let fused = |x: &Tensor, w: &Tensor| fused::rms_norm::rms_norm(x, w, 1e-5, DType::F64).unwrap();
    check("fused rms_norm dx", &x, 48, |x| probe(&fused(x, &w), 3));
    check("fused rms_norm dw", &w, 8, |w| probe(&fused(&x, w), 3));
    assert!(max_diff(&fused(&x, &w), &ops::rms_norm(&x, &w, 1e-5).unwrap()) < 1e-12);
    // The compute-dtype output is the f64 result rounded once.
    let bf = fused::rms_norm::rms_norm(
        &x.to_dtype(DType::F32).unwrap(),
        &w.to_dtype(DType::F32).unwrap(),
        1e-5,
        DType::BF16,
    )
    .unwrap();
    assert_eq!(bf.dtype(), DType::BF16);
    assert!(max_diff(&bf.to_dtype(DType::F64).unwrap(), &fused(&x, &w)) < 2e-2);
}

#[test]
fn fused_rope_matches_finite_differences_and_reference() {
    let mut cfg = LlamaConfig::tiny(32, true);
    cfg.head_dim = 8;
    let (cos, sin) = ops::rope_tables(&cfg, 5, DType::F64, &Device::Cpu).unwrap();
    // (B, T, H·D) in, (B, H, T, D) out: the head transpose is part of the op.
    let x = randn(&[2, 5, 3 * 8], 4, 1.0);
    check("fused rope", &x, 120, |x| {
        probe(&fused::rope::rope(x, &cos, &sin, 3).unwrap(), 5)
    });
    let heads = x
        .reshape((2, 5, 3, 8))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap();
    let expect = ops::rope(&heads, &cos, &sin).unwrap();
    assert!(max_diff(&fused::rope::rope(&x, &cos, &sin, 3).unwrap(), &expect) < 1e-12);
    // As the fused q/k/v projection hands it over: a column range of wider rows, read in place.
    let wide = randn(&[2, 5, 40], 5, 1.0);
    let range = wide.narrow(2, 8, 24).unwrap();
    let packed = range.contiguous().unwrap();
    assert!(
        max_diff(
            &fused::rope::rope(&range, &cos, &sin, 3).unwrap(),
            &fused::rope::rope(&packed, &cos, &sin, 3).unwrap()
        ) == 0.0
    );
    // The inverse written into columns 8..32 of (B·T, 40) rows: exactly the inverse rotation there
    // (RoPE⁻¹ ∘ RoPE is the identity), every other column untouched.
    let rows = randn(&[10, 40], 6, 1.0);
    let before = to_vec_f64(&rows);
    let rotated = fused::rope::rope(&x, &cos, &sin, 3).unwrap();
    fused::rope::rope_backward_into(&rotated, &cos, &sin, &rows, 8).unwrap();
    let after = to_vec_f64(&rows);
    let x_rows = to_vec_f64(&x.reshape((10, 24)).unwrap());
    for r in 0..10 {
        for c in 0..40 {
            let (got, want) = (after[r * 40 + c], before[r * 40 + c]);
            if (8..32).contains(&c) {
                assert!((got - x_rows[r * 24 + c - 8]).abs() < 1e-12, "row {r} column {c}");
            } else {
                assert_eq!(got, want, "row {r} column {c} was written");
            }
        }
    }
}

#[test]
fn q_k_v_accumulators_are_row_ranges_of_the_fused_one() {
    let cfg = LlamaConfig::tiny(40, true);
    let params = Params::random(&cfg, 5, DType::F32, &Device::Cpu).unwrap();
    let acc = params.gradient_accumulators(AccumulatorStart::Zeros).unwrap();
    let layer = "model.layers.1.self_attn.";
    let fused = &acc[&format!("{layer}qkv_proj.weight")];
    let parts = ["q_proj", "k_proj", "v_proj"].map(|p| acc[&format!("{layer}{p}.weight")].clone());
    let rows: usize = parts.iter().map(|p| p.dim(0).unwrap()).sum();
    assert_eq!(fused.dims(), [rows, cfg.hidden_size]);
    // The parts share the fused tensor's storage: what is written there is what each part reads.
    let pattern = Tensor::arange(0f32, (rows * cfg.hidden_size) as f32, &Device::Cpu)
        .unwrap()
        .reshape(fused.shape())
        .unwrap();
    fused.slice_set(&pattern, 0, 0).unwrap();
    let mut first = 0;
    for part in &parts {
        let n = part.dim(0).unwrap();
        assert_eq!(to_vec_f64(part), to_vec_f64(&pattern.narrow(0, first, n).unwrap()));
        first += n;
    }
    // Not a parameter: every parameter has its accumulator, the fused one is extra.
    assert!(params
        .vars
        .keys()
        .all(|n| acc.contains_key(n) || params.vars[n].rank() != 2));
    assert!(!params.vars.contains_key(&format!("{layer}qkv_proj.weight")));
}

#[test]
fn fused_attention_matches_finite_differences_and_reference() {
    let mask = ops::causal_mask(5, DType::F64, &Device::Cpu).unwrap();
    let q = randn(&[2, 4, 5, 6], 8, 1.0);
    let k = randn(&[2, 2, 5, 6], 9, 1.0);
    let v = randn(&[2, 2, 5, 6], 10, 1.0);
    let fused = |q: &Tensor, k: &Tensor, v: &Tensor| fused::softmax::causal_attention(q, k, v).unwrap();
    check("fused attention dq", &q, 60, |q| probe(&fused(q, &k, &v), 11));
    check("fused attention dk", &k, 60, |k| probe(&fused(&q, k, &v), 11));
    check("fused attention dv", &v, 60, |v| probe(&fused(&q, &k, v), 11));
    let expect = ops::attention(&q, &k, &v, &mask).unwrap();
    assert!(max_diff(&fused(&q, &k, &v), &expect) < 1e-12);
    // Above the diagonal the probabilities are exactly zero.
    let p = to_vec_f64(&fused::softmax::causal_softmax(&randn(&[2, 5, 5], 3, 4.0), 0.5, DType::F64).unwrap());
    for (r, row) in p.chunks(5).enumerate() {
        assert!(row[r % 5 + 1..].iter().all(|&x| x == 0.0));
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}

#[test]
fn flash_attention_matches_the_reference_its_log_sum_exp_and_finite_differences() {
    // GQA (4 query heads on 2 KV heads), v and o in the (B, T, heads, D) layout the block keeps.
    let (b, h, kv, t, d) = (2, 4, 2, 7, 6);
    let q = randn(&[b, h, t, d], 21, 1.0);
    let k = randn(&[b, kv, t, d], 22, 1.0);
    let v = randn(&[b, t, kv, d], 23, 1.0);
    let (o, lse) = fused::flash::forward(&q, &k, &v).unwrap();
    let mask = ops::causal_mask(t, DType::F64, &Device::Cpu).unwrap();
    let v_heads = v.transpose(1, 2).unwrap().contiguous().unwrap();
    let expect = ops::attention(&q, &k, &v_heads, &mask).unwrap();
    assert!(max_diff(&o, &expect.transpose(1, 2).unwrap().contiguous().unwrap()) < 1e-12);
    // lse = log Σ_{j ≤ i} exp(q_i · k_j / √d), recomputed entry by entry.
    let (qv, kv_, lv) = (to_vec_f64(&q), to_vec_f64(&k), to_vec_f64(&lse));
    for (row, &l) in lv.iter().enumerate() {
        let (bi, hi, i) = (row / (h * t), row / t % h, row % t);
        let qi = &qv[((bi * h + hi) * t + i) * d..][..d];
        let z: f64 = (0..=i)
            .map(|j| {
                let kj = &kv_[((bi * kv + hi / 2) * t + j) * d..][..d];
                (qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()).exp()
            })
            .sum();
        assert!((l - z.ln()).abs() < 1e-12, "lse row {row}: {l} vs {}", z.ln());
    }
    // The backward against central differences of Σ probe·o.
    let probe_o = randn(&[b, t, h, d], 24, 1.0);
    let (dq, dk, dv) = fused::flash::backward(&q, &k, &v, &o, &lse, &probe_o).unwrap();
    let loss = |q: &Tensor, k: &Tensor, v: &Tensor| {
        let (o, _) = fused::flash::forward(q, k, v).unwrap();
        (o * &probe_o).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    check_entries("flash dq", &q, &dq, 60, |q| loss(q, &k, &v));
    check_entries("flash dk", &k, &dk, 60, |k| loss(&q, k, &v));
    check_entries("flash dv", &v, &dv, 60, |v| loss(&q, &k, v));
}

#[test]
fn fused_swiglu_matches_finite_differences_and_reference() {
    let g = randn(&[2, 6], 15, 1.5);
    let u = randn(&[2, 6], 16, 1.0);
    check("fused swiglu dgate", &g, 12, |g| {
        probe(&fused::swiglu::swiglu(g, &u).unwrap(), 17)
    });
    check("fused swiglu dup", &u, 12, |u| {
        probe(&fused::swiglu::swiglu(&g, u).unwrap(), 17)
    });
    assert!(max_diff(&fused::swiglu::swiglu(&g, &u).unwrap(), &ops::swiglu(&g, &u).unwrap()) < 1e-12);
}

/// f64 recomputation of one row's T²·KL(softmax(t/T) ‖ softmax(s/T)).
fn kl_row(s: &[f64], t: &[f64], temperature: f64) -> f64 {
    let log_softmax = |x: &[f64]| -> Vec<f64> {
        let scaled: Vec<f64> = x.iter().map(|v| v / temperature).collect();
        let m = scaled.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + scaled.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        scaled.iter().map(|v| v - lse).collect()
    };
    let (ls, lt) = (log_softmax(s), log_softmax(t));
    temperature * temperature * lt.iter().zip(&ls).map(|(t, s)| t.exp() * (t - s)).sum::<f64>()
}

#[test]
fn distillation_kl_matches_finite_differences_an_f64_recomputation_and_ignores_minus_100() {
    let student = randn(&[5, 9], 51, 2.0);
    let teacher = randn(&[5, 9], 52, 2.0);
    let targets = [3i64, -100, 0, 8, -100];
    for temperature in [1.0, 2.5] {
        check("distill_kl", &student, 45, |s| {
            ops::distill_kl(s, &teacher, &targets, temperature).unwrap()
        });
        check("fused distill kl", &student, 45, |s| {
            fused::distill::kl(s, &teacher, &targets, temperature).unwrap()
        });
        let (s, t) = (to_vec_f64(&student), to_vec_f64(&teacher));
        let expect = [0usize, 2, 3]
            .iter()
            .map(|&r| kl_row(&s[r * 9..(r + 1) * 9], &t[r * 9..(r + 1) * 9], temperature))
            .sum::<f64>()
            / 3.0;
        for got in [
            ops::distill_kl(&student, &teacher, &targets, temperature).unwrap(),
            fused::distill::kl(&student, &teacher, &targets, temperature).unwrap(),
        ] {
            let got = got.to_scalar::<f64>().unwrap();
            assert!((got - expect).abs() < 1e-12, "T {temperature}: {got} vs f64 {expect}");
        }
    }
    // The teacher is a constant: no gradient reaches it, and a student equal to it has KL 0, gradient 0.
    let t_var = Var::from_tensor(&teacher).unwrap();
    let s_var = Var::from_tensor(&teacher).unwrap();
    let loss = fused::distill::kl(s_var.as_tensor(), t_var.as_tensor(), &targets, 1.0).unwrap();
    assert!(loss.to_scalar::<f64>().unwrap().abs() < 1e-14);
    let g = loss.backward().unwrap();
    assert!(g.get(t_var.as_tensor()).is_none(), "the teacher got a gradient");
    assert!(to_vec_f64(g.get(s_var.as_tensor()).unwrap())
        .iter()
        .all(|x| x.abs() < 1e-15));
}

#[test]
fn fused_cross_entropy_matches_finite_differences_and_reference() {
    let logits = randn(&[5, 9], 18, 2.0);
    let targets = [3i64, -100, 0, 8, -100];
    check("fused cross_entropy", &logits, 45, |l| {
        fused::cross_entropy::cross_entropy(l, &targets).unwrap().0
    });
    let (loss, n) = fused::cross_entropy::cross_entropy(&logits, &targets).unwrap();
    let (expect, n_ref) = ops::cross_entropy(&logits, &targets).unwrap();
    assert_eq!((n, n_ref), (3, 3));
    assert!((loss.to_scalar::<f64>().unwrap() - expect.to_scalar::<f64>().unwrap()).abs() < 1e-12);
    // Nothing counted: loss 0 and a zero gradient, not NaN.
    let none = Var::from_tensor(&logits).unwrap();
    let (loss, n) = fused::cross_entropy::cross_entropy(none.as_tensor(), &[-100; 5]).unwrap();
    assert_eq!((n, loss.to_scalar::<f64>().unwrap()), (0, 0.0));
    let g = loss.backward().unwrap();
    assert!(to_vec_f64(g.get(none.as_tensor()).unwrap()).iter().all(|&x| x == 0.0));
}

#[test]
fn fused_and_reference_llama_agree_on_loss_and_every_gradient() {
    for tied in [true, false] {
        let cfg = LlamaConfig::tiny(40, tied);
        let params = Params::random(&cfg, 3, DType::F64, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[1u32, 5, 7, 2, 39, 11], [4, 4, 0, 9, 3, 8]], &Device::Cpu).unwrap();
        let labels: Vec<i64> = vec![1, 5, 7, 2, 39, 11, 4, 4, -100, 9, 3, 8];
        let run = |kernels: Kernels| {
            let model = Llama::new(cfg.clone(), DType::F64, &Device::Cpu).with_kernels(kernels);
            let w = params.compute_weights(DType::F64, |_, t| Ok(t.clone())).unwrap();
            let (loss, _) = model.loss(&w, &ids, &labels).unwrap();
            let grads = loss.backward().unwrap();
            let g: Vec<Tensor> = params
                .vars
                .values()
                .map(|v| grads.get(v.as_tensor()).unwrap().clone())
                .collect();
            (loss.to_scalar::<f64>().unwrap(), g)
        };
        let ((lf, gf), (lr, gr)) = (run(Kernels::Fused), run(Kernels::Reference));
        // A gradient that tracks ops would keep the forward graph alive while it is accumulated.
        assert!(
            gf.iter().all(|g| !g.track_op()),
            "a fused gradient carries an autograd graph"
        );
        assert!((lf - lr).abs() < 1e-12, "loss {lf} vs {lr}");
        for ((name, a), b) in params.vars.keys().zip(&gf).zip(&gr) {
            assert!(max_diff(a, b) < 1e-10, "{name}: {}", max_diff(a, b));
        }
    }
}

#[test]
fn fused_linear_matches_finite_differences_and_accumulates_the_weight_gradient() {
    let x = randn(&[2, 3, 5], 21, 1.0);
    let w = randn(&[4, 5], 22, 1.0);
    let acc = Tensor::zeros((4, 5), DType::F64, &Device::Cpu).unwrap();
    check("fused linear (x)", &x, 30, |x| {
        probe(&fused::linear::linear(x, &w, &acc).unwrap(), 23)
    });
    // The forward equals the matmul; the accumulator holds ∂L/∂w (summed over the backward passes).
    let reference = |x: &Tensor, w: &Tensor| probe(&x.broadcast_matmul(&w.t().unwrap()).unwrap(), 23);
    let y = fused::linear::linear(&x, &w, &acc).unwrap();
    assert!(max_diff(&y, &x.broadcast_matmul(&w.t().unwrap()).unwrap()) < 1e-14);
    let acc = Tensor::zeros((4, 5), DType::F64, &Device::Cpu).unwrap();
    let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
    for _ in 0..2 {
        let y = fused::linear::linear(xv.as_tensor(), wv.as_tensor(), &acc).unwrap();
        let grads = probe(&y, 23).backward().unwrap();
        assert!(
            grads.get(wv.as_tensor()).is_none(),
            "the weight gradient went to autograd too"
        );
        assert!(!grads.get(xv.as_tensor()).unwrap().track_op(), "dx carries a graph");
    }
    let want = (reference(&x, wv.as_tensor())
        .backward()
        .unwrap()
        .get(wv.as_tensor())
        .unwrap()
        * 2.0)
        .unwrap();
    assert!(max_diff(&acc, &want) < 1e-12, "accumulated {}", max_diff(&acc, &want));
    let fd = |i: usize, j: usize| {
        let h = 1e-5;
        let at = |d: f64| {
            let mut v = to_vec_f64(&w);
            v[i * 5 + j] += d;
            let w = Tensor::from_vec(v, (4, 5), &Device::Cpu).unwrap();
            reference(&x, &w).to_scalar::<f64>().unwrap()
        };
        (at(h) - at(-h)) / (2.0 * h)
    };
    let got = to_vec_f64(&acc);
    for (i, j) in [(0, 0), (1, 3), (3, 4)] {
        assert!((got[i * 5 + j] / 2.0 - fd(i, j)).abs() < 1e-6, "w[{i},{j}]");
    }
}

#[test]
fn accumulating_weights_give_the_gradstore_gradients_summed_over_micro_batches() {
    // The projections' gradients land in the accumulators (in place, across two micro-batches); the
    // rest in the GradStore. Both must equal plain autograd's sums, with and without a weight view.
    // The accumulators start unwritten, as the training step's (NaN on the CPU until first written).
    let cfg = LlamaConfig::tiny(40, true);
    let params = Params::random(&cfg, 5, DType::F64, &Device::Cpu).unwrap();
    let model = Llama::new(cfg, DType::F64, &Device::Cpu);
    let batches = [
        Tensor::new(&[[1u32, 5, 7, 2, 39, 11]], &Device::Cpu).unwrap(),
        Tensor::new(&[[4u32, 4, 0, 9, 3, 8]], &Device::Cpu).unwrap(),
    ];
    let labels: Vec<i64> = vec![1, 5, 7, -100, 39, 11];
    // direct: the compute copies go to the model as its `grads_into`, so the fused linear adds the
    // weight gradients into the accumulators itself (the training step's path for plain copies).
    for (scaled, direct) in [(false, false), (true, false), (false, true)] {
        let view = |x: &Tensor| x.affine(if scaled { 2.0 } else { 1.0 }, 0.0);
        let mut want: std::collections::BTreeMap<String, Tensor> = Default::default();
        let plain = params.compute_weights(DType::F64, |_, x| Ok(view(x)?)).unwrap();
        let acc = params.gradient_accumulators(AccumulatorStart::Unwritten).unwrap();
        // As the training step builds them: the view (if any) on an accumulating copy; for `direct`,
        // the embedding table is the master itself (fused lookup) and the tied head its own copy.
        let mut fused: std::collections::BTreeMap<String, Tensor> = params
            .vars
            .iter()
            .map(|(name, var)| {
                let x = var.as_tensor();
                let w = match acc.get(name) {
                    Some(_) if direct && name == EMBEDDING => x.clone(),
                    Some(a) => {
                        let copy = fused::weight::compute_copy_accumulating(x, None, DType::F64, a).unwrap();
                        view(&copy).unwrap()
                    }
                    None => view(x).unwrap(),
                };
                (name.clone(), w)
            })
            .collect();
        let mut into = if direct { acc.clone() } else { Default::default() };
        if direct {
            let (table, a) = (params.vars[EMBEDDING].as_tensor(), &acc[EMBEDDING]);
            fused.insert(
                HEAD.into(),
                fused::weight::compute_copy_accumulating(table, None, DType::F64, a).unwrap(),
            );
            into.insert(HEAD.into(), a.clone());
        }
        let mut rest: std::collections::BTreeMap<String, Tensor> = Default::default();
        for ids in &batches {
            let g = model.loss(&plain, ids, &labels).unwrap().0.backward().unwrap();
            let h = model
                .loss_into(&fused, &into, ids, &labels)
                .unwrap()
                .0
                .backward()
                .unwrap();
            for (name, var) in &params.vars {
                let add = |m: &mut std::collections::BTreeMap<String, Tensor>, t: &Tensor| {
                    let sum = match m.remove(name) {
                        Some(prev) => (prev + t).unwrap(),
                        None => t.clone(),
                    };
                    m.insert(name.clone(), sum);
                };
                add(&mut want, g.get(var.as_tensor()).unwrap());
                match h.get(var.as_tensor()) {
                    Some(t) => add(&mut rest, t),
                    None => assert!(acc.contains_key(name), "{name}: no gradient anywhere"),
                }
            }
        }
        fused::accumulate::finish().unwrap();
        for (name, w) in &want {
            let got = acc.get(name).or(rest.get(name)).unwrap();
            assert!(
                max_diff(got, w) < 1e-12,
                "{name} (scaled view {scaled}, direct {direct}): {}",
                max_diff(got, w)
            );
        }
        assert!(
            acc.keys().all(|n| !rest.contains_key(n)),
            "a projection also reached its Var"
        );
    }
}

/// The tiny model's two training configs, written under `dir`: plain, and Prox-QAT with the prox pull
/// and the task gradient at q(x).
fn plain_and_prox_configs(dir: &std::path::Path) -> [(&'static str, std::path::PathBuf); 2] {
    let model = dir.join("tiny");
    common::tiny_model_dir(&model, 4);
    let prox = "[quant]\nmethod = \"prox\"\npull = \"prox\"\ngrad_at = \"q\"\ndist_scale = 10.0\n";
    [("plain", ""), ("prox", prox)].map(|(label, extra)| (label, common::tiny_config(dir, &model, extra)))
}

fn trainer(cfg: &std::path::Path, kernels: &str, steps: usize) -> proxqat::train::Trainer {
    let sets = [
        format!("train.kernels=\"{kernels}\""),
        format!("train.max_steps={steps}"),
    ];
    proxqat::train::Trainer::new(proxqat::config::Config::load(cfg, &sets).unwrap(), None).unwrap()
}

#[test]
fn fused_and_reference_training_steps_make_the_same_updates() {
    // The whole step on the CPU (f32): fused linear, fused embedding lookup and the tied head's compute
    // copy against candle's autograd through the reference kernels, plain and with Prox-QAT at q(x).
    let tmp = tempfile::tempdir().unwrap();
    for (label, cfg) in plain_and_prox_configs(tmp.path()) {
        let run = |kernels: &str| {
            let mut trainer = trainer(&cfg, kernels, 3);
            let losses: Vec<f64> = (0..3).map(|_| trainer.step().unwrap().loss).collect();
            (losses, trainer.params.to_tensors())
        };
        let ((lf, wf), (lr, wr)) = (run("fused"), run("reference"));
        for (a, b) in lf.iter().zip(&lr) {
            assert!((a - b).abs() < 1e-5 * b.abs(), "loss {a} vs {b} ({label})");
        }
        for (name, a) in &wf {
            let d = max_diff(a, &wr[name]);
            assert!(d < 1e-5, "{name}: {d:.2e} after 3 steps ({label})");
        }
    }
}

#[test]
fn compute_copies_written_by_the_optimizer_equal_casting_the_updated_weights() {
    // The fused step reads the compute copies the last update wrote (plain, and on the grid for
    // Prox-QAT's task gradient at q(x)); dropping them before every step makes it cast instead. The
    // two runs must be the same bits.
    let tmp = tempfile::tempdir().unwrap();
    for (label, cfg) in plain_and_prox_configs(tmp.path()) {
        let run = |reuse: bool| {
            let mut trainer = trainer(&cfg, "fused", 4);
            let mut written = vec![];
            let losses: Vec<f64> = (0..4)
                .map(|_| {
                    if !reuse {
                        trainer.next_copies.clear();
                    }
                    let loss = trainer.step().unwrap().loss;
                    written.push(trainer.next_copies.len());
                    loss
                })
                .collect();
            (losses, trainer.params.to_tensors(), written)
        };
        let ((l_reuse, w_reuse, written), (l_cast, w_cast, _)) = (run(true), run(false));
        // And they are what the next forward reads: zeroed, they change its loss.
        let mut zeroed = trainer(&cfg, "fused", 4);
        zeroed.step().unwrap();
        for w in zeroed.next_copies.values_mut() {
            w.copy = w.copy.zeros_like().unwrap();
        }
        assert_ne!(
            zeroed.step().unwrap().loss,
            l_reuse[1],
            "zeroed copies left the loss as it was ({label})"
        );
        // Every projection of the tiny model (2 layers × 7) and the tied head.
        assert_eq!(written, vec![15; 4], "copies written per step ({label})");
        assert_eq!(l_reuse, l_cast, "losses ({label})");
        for (name, a) in &w_reuse {
            assert_eq!(max_diff(a, &w_cast[name]), 0.0, "{name} ({label})");
        }
    }
}

#[test]
fn checkpointed_blocks_give_the_same_loss_and_gradients_and_keep_no_activations() {
    // As the training step runs it: the projections add their gradients into accumulators (fused:
    // in place; reference: through their compute copy's backward); the norm gains too under the fused
    // kernels (the block stack), through autograd under the reference ones.
    for (kernels, tied) in [
        (Kernels::Fused, true),
        (Kernels::Fused, false),
        (Kernels::Reference, true),
    ] {
        let ids = Tensor::new(&[[1u32, 5, 7, 2, 39, 11], [4, 4, 0, 9, 3, 8]], &Device::Cpu).unwrap();
        let labels: Vec<i64> = vec![1, 5, 7, 2, 39, 11, 4, 4, -100, 9, 3, 8];
        // Loss, every gradient, and the number of nodes the loss's graph keeps alive.
        let run = |checkpoint: bool, layers: usize| {
            let mut cfg = LlamaConfig::tiny(40, tied);
            cfg.num_hidden_layers = layers;
            let params = Params::random(&cfg, 8, DType::F64, &Device::Cpu).unwrap();
            let model = Llama::new(cfg, DType::F64, &Device::Cpu)
                .with_kernels(kernels)
                .with_checkpointing(checkpoint);
            let acc = params.gradient_accumulators(AccumulatorStart::Zeros).unwrap();
            let w: std::collections::BTreeMap<String, Tensor> = params
                .vars
                .iter()
                .map(|(name, var)| {
                    let x = var.as_tensor();
                    let w = match acc.get(name) {
                        Some(a) if !is_norm_gain(name) => {
                            fused::weight::compute_copy_accumulating(x, None, DType::F64, a).unwrap()
                        }
                        _ => x.clone(),
                    };
                    (name.clone(), w)
                })
                .collect();
            let into = acc
                .iter()
                .filter(|(name, _)| name.starts_with("model.layers."))
                .map(|(n, a)| (n.clone(), a.clone()))
                .collect();
            let (loss, _) = model.loss_into(&w, &into, &ids, &labels).unwrap();
            let held = loss.sorted_nodes().iter().filter(|n| !n.is_variable()).count();
            let grads = loss.backward().unwrap();
            let g: Vec<(String, Tensor)> = params
                .vars
                .iter()
                .map(|(name, v)| {
                    // A gain's gradient: in its accumulator (fused) or through autograd (reference).
                    let g = match (acc.get(name), grads.get(v.as_tensor())) {
                        (Some(a), Some(g)) => (a + g).unwrap(),
                        (a, g) => a.or(g).unwrap().clone(),
                    };
                    (name.clone(), g)
                })
                .collect();
            (loss.to_scalar::<f64>().unwrap(), g, held)
        };
        let ((l0, g0, held0), (l1, g1, held1)) = (run(false, 2), run(true, 2));
        assert_eq!(l0, l1, "{kernels:?}: the checkpointed forward computes another loss");
        for ((name, a), (_, b)) in g0.iter().zip(&g1) {
            assert!(to_vec_f64(a).iter().any(|&x| x != 0.0), "{name}: zero gradient");
            assert!(max_diff(a, b) < 1e-12, "{kernels:?} {name}: {:.2e}", max_diff(a, b));
        }
        // The graph the loss keeps alive: under the reference kernels every op of a block, or with
        // checkpointing one node per block (its input alone saved); the fused blocks are one node
        // together (their saved activations, or inputs, inside).
        let (more0, more1) = (run(false, 3).2, run(true, 3).2);
        eprintln!("{kernels:?} tied {tied}: graph nodes at 2 → 3 blocks: {held0} → {more0} plain, {held1} → {more1} checkpointed");
        match kernels {
            Kernels::Reference => {
                assert_eq!(more1, held1 + 1, "nodes kept per checkpointed block");
                assert!(more0 >= held0 + 10, "{held0} → {more0} nodes without checkpointing");
            }
            Kernels::Fused => {
                assert_eq!(more0, held0, "the fused blocks are one node");
                assert_eq!(more1, held1, "the fused blocks are one node, checkpointed too");
            }
        }
    }
    // Projections whose gradient goes to their variable through autograd cannot be checkpointed
    // (the node returns only its input's and the gains' gradients): refused, not dropped.
    let cfg = LlamaConfig::tiny(40, true);
    let params = Params::random(&cfg, 8, DType::F64, &Device::Cpu).unwrap();
    let model = Llama::new(cfg, DType::F64, &Device::Cpu).with_checkpointing(true);
    let w = params.compute_weights(DType::F64, |_, t| Ok(t.clone())).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 7, 2]], &Device::Cpu).unwrap();
    let (loss, _) = model.loss(&w, &ids, &[1, 5, 7, 2]).unwrap();
    let Err(err) = loss.backward() else {
        panic!("a dropped gradient must be an error")
    };
    assert!(err.to_string().contains("accumulate its gradient in place"), "{err}");
}

#[test]
fn checkpointed_training_steps_make_the_same_updates() {
    // The whole step (f32, CPU) with `train.checkpoint_layers` on and off, for the views whose weights
    // reach the blocks by different paths: plain copies, the fused straight-through grid copy (STE),
    // an f32 view over an accumulating copy (selective), learned scales.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    common::tiny_model_dir(&model, 4);
    let quant = |rest: &str| format!("[quant]\nmethod = \"prox\"\npull = \"prox\"\ndist_scale = 10.0\n{rest}");
    let setups = [
        String::new(),
        "[quant]\nmethod = \"ste\"\n".into(),
        quant("grad_at = \"selective\"\n"),
        quant("grad_at = \"q\"\nscale_lr_mult = 1.0\n"),
    ];
    for extra in &setups {
        let cfg = common::tiny_config(tmp.path(), &model, extra);
        let run = |checkpoint: bool| {
            let sets = [
                format!("train.checkpoint_layers={checkpoint}"),
                "train.max_steps=3".into(),
            ];
            let cfg = proxqat::config::Config::load(&cfg, &sets).unwrap();
            let mut trainer = proxqat::train::Trainer::new(cfg, None).unwrap();
            let losses: Vec<f64> = (0..3).map(|_| trainer.step().unwrap().loss).collect();
            (losses, trainer.params.to_tensors())
        };
        let ((l0, w0), (l1, w1)) = (run(false), run(true));
        assert_eq!(l0, l1, "losses ({extra:?})");
        for (name, a) in &w0 {
            let d = max_diff(a, &w1[name]);
            assert!(d < 1e-6, "{name}: {d:.2e} after 3 steps ({extra:?})");
        }
    }
}
