//! Controllers against hand-iterated sequences, sensitivity against f64 recomputation, harden/restore.

mod common;

use candle_core::{DType, Device, Tensor};
use proxqat::model::{LlamaConfig, Params};
use proxqat::quant::sensitivity::{SensConfig, SensMap, Sensitivity};
use proxqat::quant::{harden, DualConfig, GammaConfig, QuantConfig, Quantizer, SelectMode, View};
use std::collections::BTreeMap;

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-12, "{a} vs {b}");
}

#[test]
fn pi_dual_controller_follows_the_hand_iterated_sequence() {
    let cfg = DualConfig {
        beta: 2.0,
        lr: 0.1,
        lambda_init: 1.0,
        lambda_max: Some(1.5),
        pi: true,
        kp: 1.0,
        ki: 0.5,
        i_clamp: 1.0,
    };
    let mut s = cfg.init();
    // loss, expected integral, expected λ (worked by hand: I clamps at ±1, λ at 1.5).
    let steps = [
        (3.0, 1.0, 1.15),
        (3.0, 1.0, 1.30),
        (3.0, 1.0, 1.45),
        (3.0, 1.0, 1.5),
        (1.0, 0.0, 1.4),
        (0.0, -1.0, 1.15),
    ];
    for (loss, integral, lambda) in steps {
        cfg.update(&mut s, loss);
        close(s.integral, integral);
        close(s.lambda, lambda);
    }
}

#[test]
fn plain_dual_ascent_is_projected_at_zero() {
    let cfg = DualConfig {
        beta: 1.0,
        lr: 0.5,
        lambda_init: 0.6,
        lambda_max: None,
        pi: false,
        ..Default::default()
    };
    let mut s = cfg.init();
    for want in [0.1, 0.0, 0.0] {
        cfg.update(&mut s, 0.0);
        close(s.lambda, want);
    }
    cfg.update(&mut s, 5.0);
    close(s.lambda, 2.0);
}

#[test]
fn gamma_is_zero_before_start_then_tracks_the_hit_rate() {
    let cfg = GammaConfig {
        enable: true,
        target: 0.9,
        init: 1.0,
        lr: 0.5,
        max: 0.3,
        start: 3,
        every: 1,
        ema: 0.5,
    };
    let mut s = cfg.init();
    assert_eq!(cfg.gain(&s, 0), 0.0, "γ is 0 before start from step 0 on (spec §12.11)");
    cfg.update(&mut s, 0.1, 2);
    assert_eq!(
        (s.gamma, s.hit_ema),
        (0.0, None),
        "before start: γ forced to 0, EMA untouched"
    );
    cfg.update(&mut s, 0.5, 3); // h̄ = 0.5; γ = 0 + 0.5·0.4 = 0.2
    close(s.gamma, 0.2);
    cfg.update(&mut s, 0.7, 4); // h̄ = 0.6; γ = 0.2 + 0.15 = 0.35 → max 0.3
    close(s.gamma, 0.3);
    cfg.update(&mut s, 1.0, 5); // h̄ = 0.8; γ = 0.3 + 0.05 → 0.3
    close(s.gamma, 0.3);
    cfg.update(&mut s, 1.0, 6); // h̄ = 0.9; γ = 0.3 + 0 = 0.3
    close(s.hit_ema.unwrap(), 0.9);
    assert_eq!(cfg.gain(&s, 6), 0.3);
}

#[test]
fn sensitivity_ema_and_both_maps_match_f64() {
    let names: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let grads_at = |k: u64| -> BTreeMap<String, Tensor> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                (
                    n.clone(),
                    common::randn(&[5, 4], k * 10 + i as u64, (i + 1) as f64)
                        .to_dtype(DType::F32)
                        .unwrap(),
                )
            })
            .collect()
    };
    let mut sens = Sensitivity::default();
    let mut want = [0f64; 3];
    for k in 0..4 {
        let g = grads_at(k);
        sens.update(
            0.95,
            &g,
            &candle_core::Tensor::new(1f32, &candle_core::Device::Cpu).unwrap(),
        )
        .unwrap();
        for (i, n) in names.iter().enumerate() {
            let v = common::to_vec_f64(&g[n]);
            let g2 = v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64;
            want[i] = if k == 0 { g2 } else { 0.95 * want[i] + 0.05 * g2 };
        }
    }
    for (i, n) in names.iter().enumerate() {
        let got = sens.values[n].to_scalar::<f32>().unwrap() as f64;
        assert!((got - want[i]).abs() < 1e-5 * want[i], "{n}: {got} vs {}", want[i]);
    }
    let inv = sens
        .weights(
            &SensConfig {
                map: SensMap::InvSqrt,
                ..Default::default()
            },
            &names,
        )
        .unwrap();
    let mean = want.iter().sum::<f64>() / 3.0;
    for (i, n) in names.iter().enumerate() {
        let expect = (want[i] / mean).powf(-0.5).clamp(0.2, 5.0);
        assert!((inv[n].to_scalar::<f32>().unwrap() as f64 - expect).abs() < 1e-5, "{n}");
    }
    let sig = sens
        .weights(
            &SensConfig {
                map: SensMap::SigmoidLog,
                ..Default::default()
            },
            &names,
        )
        .unwrap();
    let z: Vec<f64> = want.iter().map(|s| (s + 1e-12).ln()).collect();
    let mu = z.iter().sum::<f64>() / 3.0;
    let sd = (z.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / 2.0).sqrt() + 1e-6;
    let w: Vec<f64> = z.iter().map(|zi| 1.0 + 4.0 / (1.0 + (-(mu - zi) / sd).exp())).collect();
    let mw = w.iter().sum::<f64>() / 3.0;
    for (i, n) in names.iter().enumerate() {
        assert!(
            (sig[n].to_scalar::<f32>().unwrap() as f64 - w[i] / mw).abs() < 1e-5,
            "{n}"
        );
    }
    // More sensitive (larger S) ⇒ weaker pull, under both maps.
    assert!(inv["c"].to_scalar::<f32>().unwrap() < inv["a"].to_scalar::<f32>().unwrap());
    assert!(sig["c"].to_scalar::<f32>().unwrap() < sig["a"].to_scalar::<f32>().unwrap());
    // One tensor: the sigmoid-log std is undefined, so the weight is neutral (spec §12.10).
    let one = sens
        .weights(
            &SensConfig {
                map: SensMap::SigmoidLog,
                ..Default::default()
            },
            &names[..1],
        )
        .unwrap();
    assert!(one["a"].to_scalar::<f32>().unwrap().is_finite());
}

/// A fine-tune's clipped mean g² is 1e-10 … 3e-7 per tensor, all of it below 1e-8 late in a run
/// (SmolLM2, RESULTS.md §22). The inverse-sqrt map must give the weights of its formula at that scale,
/// the same as at any other; the seed's floor of 1e-8 (`floor = 1e-8`) instead makes the mean 1e-8 and
/// sends most weights to w_max.
#[test]
fn inv_sqrt_weights_do_not_depend_on_the_gradient_scale() {
    let fine_tune = [1e-10, 2e-10, 3e-10, 4e-10, 6e-9];
    let weights_at = |scale: f64, floor: f64| -> Vec<f64> {
        let names: Vec<String> = (0..fine_tune.len()).map(|i| format!("t{i}")).collect();
        let sens = Sensitivity {
            values: names
                .iter()
                .zip(fine_tune)
                .map(|(n, s)| (n.clone(), Tensor::new((s * scale) as f32, &Device::Cpu).unwrap()))
                .collect(),
        };
        let cfg = SensConfig {
            floor,
            ..Default::default()
        };
        let w = sens.weights(&cfg, &names).unwrap();
        names.iter().map(|n| w[n].to_scalar::<f32>().unwrap() as f64).collect()
    };
    let mean = fine_tune.iter().sum::<f64>() / fine_tune.len() as f64;
    let formula: Vec<f64> = fine_tune
        .iter()
        .map(|s| (s / mean).powf(-0.5).clamp(0.2, 5.0))
        .collect();
    for scale in [1.0, 1e8] {
        for (got, want) in weights_at(scale, 0.0).iter().zip(&formula) {
            assert!((got - want).abs() < 1e-5 * want, "scale {scale}: {got} vs {want}");
        }
    }
    // The seed's floor: every S is below 1e-8, so the mean is 1e-8 and the weights (S/1e-8)^(−0.5):
    // four of five at w_max (5, 5, 5, 5, 1.29) where the formula gives 3.74, 2.65, 2.16, 1.87, 0.48.
    let seed = weights_at(1.0, 1e-8);
    for (got, s) in seed.iter().zip(fine_tune) {
        let want = (s / 1e-8).powf(-0.5).clamp(0.2, 5.0);
        assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    }
    assert_eq!(seed.iter().filter(|w| **w == 5.0).count(), 4);
    assert!(formula.iter().all(|w| *w < 5.0));
}

#[test]
fn selector_modes_on_llama_names() {
    let cfg = LlamaConfig::tiny(16, false);
    let names: Vec<String> = cfg.param_shapes().into_iter().map(|(n, _)| n).collect();
    let count = |mode| {
        proxqat::quant::SelectorConfig {
            mode,
            ..Default::default()
        }
        .select(&names)
        .unwrap()
        .len()
    };
    assert_eq!(count(SelectMode::Mlp), 6);
    assert_eq!(count(SelectMode::Attn), 8);
    assert_eq!(count(SelectMode::MlpAttn), 14);
    assert_eq!(
        count(SelectMode::AllLinear),
        14,
        "norms, embeddings and lm_head are excluded"
    );
    let only_up = proxqat::quant::SelectorConfig {
        include: vec!["up_proj".into()],
        ..Default::default()
    };
    assert_eq!(
        only_up.select(&names).unwrap(),
        vec!["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    );
}

#[test]
fn harden_restore_is_bit_exact_and_selective_moves_exactly_the_close_entries() {
    let cfg = LlamaConfig::tiny(16, true);
    let params = Params::random(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
    let qcfg = QuantConfig::default();
    let quantizer = Quantizer::new(&qcfg, &params).unwrap();
    let before = params
        .to_tensors()
        .into_iter()
        .map(|(k, v)| (k, v.copy().unwrap()))
        .collect::<BTreeMap<_, _>>();
    let bits = common::bits;

    let atol = 5e-4;
    let h = harden::harden(&params, &quantizer, View::Selective(atol)).unwrap();
    for (name, grid) in &quantizer.grids {
        let x = &before[name];
        let q = grid.quantize(x).unwrap();
        let now = params.get(name).unwrap().as_tensor().clone();
        let (xv, qv, nv) = (
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            q.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            now.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let mut moved = 0;
        for i in 0..xv.len() {
            let close = (xv[i] - qv[i]).abs() <= atol as f32;
            assert_eq!(nv[i], if close { qv[i] } else { xv[i] }, "{name}[{i}]");
            moved += (close && xv[i] != qv[i]) as usize;
        }
        assert_eq!(h.moved[name], moved);
        assert!(
            moved > 0 && moved < xv.len(),
            "{name}: the test needs some but not all entries within atol"
        );
    }
    harden::restore(&params, &h.backup).unwrap();
    for (name, t) in params.to_tensors() {
        assert_eq!(bits(&t), bits(&before[&name]), "{name} not restored bit for bit");
    }
    let h = harden::harden(&params, &quantizer, View::Hard).unwrap();
    for (name, grid) in &quantizer.grids {
        assert_eq!(
            bits(params.get(name).unwrap().as_tensor()),
            bits(&grid.quantize(&before[name]).unwrap())
        );
    }
    harden::restore(&params, &h.backup).unwrap();
    for (name, t) in params.to_tensors() {
        assert_eq!(bits(&t), bits(&before[&name]));
    }
}
