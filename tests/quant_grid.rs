//! Grids against hand-computed vectors, and the dist term against finite differences.

mod common;

use candle_core::{DType, Device, Tensor};
use common::to_vec_f64;
use proxqat::quant::dist_loss;
use proxqat::quant::grid::{round_half_even, GridConfig, ScaleKind, ScaleRule, TensorGrid};

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn uniform(bits: u32, scale: ScaleKind, step: Option<f64>) -> GridConfig {
    GridConfig {
        bits,
        scale,
        step,
        ..Default::default()
    }
}

#[test]
fn round_half_even_matches_rust_ties_even() {
    let mut rng = proxqat::rng::Rng::new(3);
    let mut v: Vec<f32> = vec![
        -2.5,
        -1.5,
        -0.5,
        0.5,
        1.5,
        2.5,
        3.5,
        0.49999997,
        1.5000001,
        -0.50000006,
        0.0,
        -0.0,
        1e7 + 0.5,
    ];
    v.extend((0..2000).map(|_| (rng.normal() * 10.0) as f32));
    v.extend((0..200).map(|i| i as f32 * 0.5 - 50.0));
    let got = f32s(&round_half_even(&t(&v, &[v.len()])).unwrap());
    for (x, g) in v.iter().zip(got) {
        assert_eq!(g, x.round_ties_even(), "round_half_even({x})");
    }
}

#[test]
fn uniform_absolute_grid_rounds_ties_to_even_and_clamps() {
    // Δ = 0.25, 3 bits ⇒ L = 3: levels {−0.75 … 0.75}.
    let g = TensorGrid::new(&uniform(3, ScaleKind::Absolute, Some(0.25)), &t(&[0.0; 6], &[2, 3])).unwrap();
    let w = t(&[0.125, 0.375, 0.625, -0.875, 2.0, 0.1], &[2, 3]);
    assert_eq!(f32s(&g.quantize(&w).unwrap()), vec![0.0, 0.5, 0.5, -0.75, 0.75, 0.0]);
}

#[test]
fn explicit_levels_pick_the_nearest_and_ties_go_low() {
    let cfg = GridConfig {
        levels: Some(vec![-0.06, 0.0, 0.06]),
        ..Default::default()
    };
    let g = TensorGrid::new(&cfg, &t(&[0.0; 6], &[6])).unwrap();
    let w = t(&[0.03, -0.03, 0.031, -0.2, 0.5, 0.01], &[6]);
    assert_eq!(f32s(&g.quantize(&w).unwrap()), vec![0.0, -0.06, 0.06, -0.06, 0.06, 0.0]);
    let four = GridConfig {
        levels: Some(vec![-0.09, -0.03, 0.03, 0.09]),
        ..Default::default()
    };
    let g = TensorGrid::new(&four, &t(&[0.0; 4], &[4])).unwrap();
    assert_eq!(
        f32s(&g.quantize(&t(&[0.0, 0.06, 0.061, -1.0], &[4])).unwrap()),
        vec![-0.03, 0.03, 0.09, -0.09]
    );
}

#[test]
fn per_channel_and_per_group_absmax_scales() {
    let w = t(&[0.7, -0.35, 0.1, 0.0, 0.02, -0.01, 0.005, 0.0], &[2, 4]);
    // 4 bits ⇒ L = 7; per channel: s = absmax/7 rounded to f16.
    let g = TensorGrid::new(&uniform(4, ScaleKind::Channel, None), &w).unwrap();
    let s = f32s(g.scale().unwrap());
    let want = [
        half::f16::from_f64(0.7f32 as f64 / 7.0).to_f32(),
        half::f16::from_f64(0.02f32 as f64 / 7.0).to_f32(),
    ];
    assert_eq!(s, want.to_vec());
    let q = f32s(&g.quantize(&w).unwrap());
    for (i, (&x, &qv)) in f32s(&w).iter().zip(&q).enumerate() {
        let sc = want[i / 4];
        assert_eq!(qv, (x / sc).round_ties_even().clamp(-7.0, 7.0) * sc, "entry {i}");
    }
    // Largest weight of each row lands on the outermost level (up to the f16 rounding of s).
    assert!((q[0] - 0.7).abs() < 1e-3 && (q[4] - 0.02).abs() < 1e-4);
    // Per group of 2 columns: scale shape (rows, cols/2, 1).
    let cfg = GridConfig {
        group_size: 2,
        ..uniform(4, ScaleKind::Group, None)
    };
    let g = TensorGrid::new(&cfg, &w).unwrap();
    assert_eq!(g.scale().unwrap().dims(), &[2, 2, 1]);
    let s = f32s(g.scale().unwrap());
    for (i, absmax) in [0.7f32, 0.1, 0.02, 0.005].iter().enumerate() {
        assert_eq!(s[i], half::f16::from_f64(*absmax as f64 / 7.0).to_f32());
    }
    assert!(
        TensorGrid::new(&GridConfig { group_size: 3, ..cfg }, &w).is_err(),
        "3 does not divide 4 columns"
    );
}

#[test]
fn std_rule_scale_matches_f64_recomputation() {
    let w = common::randn(&[3, 64], 21, 0.02).to_dtype(DType::F32).unwrap();
    let cfg = GridConfig {
        rule: ScaleRule::Std,
        std_k: 3.0,
        ..uniform(4, ScaleKind::Channel, None)
    };
    let g = TensorGrid::new(&cfg, &w).unwrap();
    let s = f32s(g.scale().unwrap());
    let v = to_vec_f64(&w);
    for r in 0..3 {
        let row = &v[r * 64..(r + 1) * 64];
        let mean = row.iter().sum::<f64>() / 64.0;
        let std = (row.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 64.0).sqrt();
        let want = half::f16::from_f64(3.0 * std / 7.0).to_f32();
        assert!((s[r] - want).abs() <= want * 1e-3, "row {r}: {} vs {want}", s[r]);
    }
}

/// The `mse` rule against an f64 brute force over the same clip ratios: the same scale per group, never
/// a larger rounding error than absmax, and strictly smaller where a group has an outlier.
#[test]
fn mse_rule_scale_matches_an_f64_search_and_beats_absmax_on_outliers() {
    let mut v = to_vec_f64(&common::randn(&[4, 64], 23, 0.02));
    for (r, i) in [(0usize, 5usize), (2, 40)] {
        v[r * 64 + i] = 0.2; // one outlier of 10 std in groups (0, 0) and (2, 1)
    }
    let w = Tensor::from_vec(v.clone(), (4, 64), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let v: Vec<f64> = to_vec_f64(&w);
    let cfg = |rule| GridConfig {
        rule,
        group_size: 32,
        ..uniform(4, ScaleKind::Group, None)
    };
    let mse = f32s(TensorGrid::new(&cfg(ScaleRule::Mse), &w).unwrap().scale().unwrap());
    let absmax = f32s(TensorGrid::new(&cfg(ScaleRule::Absmax), &w).unwrap().scale().unwrap());
    let error = |group: &[f64], s: f64| -> f64 {
        group
            .iter()
            .map(|x| {
                let r = (x / s).round_ties_even().clamp(-7.0, 7.0);
                (x - r * s).powi(2)
            })
            .sum()
    };
    for (g, group) in v.chunks(32).enumerate() {
        let max = group.iter().fold(0f64, |m, x| m.max(x.abs()));
        let mut want = (f64::INFINITY, 0.0);
        for alpha in proxqat::quant::grid::MSE_CLIP_RATIOS {
            let s = half::f16::from_f64(alpha * max / 7.0).to_f64();
            let e = error(group, s);
            if e < want.0 {
                want = (e, s);
            }
        }
        assert_eq!(mse[g] as f64, want.1, "group {g}: scale");
        let (e_mse, e_absmax) = (error(group, mse[g] as f64), error(group, absmax[g] as f64));
        assert!(e_mse <= e_absmax, "group {g}: mse error {e_mse} > absmax {e_absmax}");
        if g == 0 || g == 5 {
            assert!(
                e_mse < 0.95 * e_absmax,
                "group {g} (outlier): {e_mse} vs absmax {e_absmax}"
            );
        }
    }
}

#[test]
fn invalid_grids_are_refused_with_the_field_named() {
    let err = |c: GridConfig| format!("{:#}", c.validate().expect_err("must be refused"));
    assert!(err(uniform(4, ScaleKind::Absolute, Some(0.0))).contains("quant.grid.step"));
    assert!(err(uniform(4, ScaleKind::Absolute, Some(-0.1))).contains("quant.grid.step"));
    assert!(err(uniform(4, ScaleKind::Absolute, None)).contains("quant.grid.step"));
    assert!(err(uniform(1, ScaleKind::Channel, None)).contains("quant.grid.bits"));
    assert!(err(uniform(9, ScaleKind::Channel, None)).contains("quant.grid.bits"));
    assert!(err(GridConfig {
        levels: Some(vec![]),
        ..Default::default()
    })
    .contains("empty"));
    assert!(err(GridConfig {
        levels: Some(vec![0.1, -0.1]),
        ..Default::default()
    })
    .contains("ascending"));
    assert!(err(GridConfig {
        levels: Some(vec![0.1, 0.1]),
        ..Default::default()
    })
    .contains("ascending"));
}

#[test]
fn dist_gradient_matches_finite_differences() {
    let x = common::randn(&[4, 8], 5, 0.1);
    let grid = TensorGrid::new(&uniform(3, ScaleKind::Absolute, Some(0.05)), &x).unwrap();
    let q = grid.quantize(&x).unwrap(); // held fixed: stop-gradient
    let weight = Tensor::new(1.7f64, &Device::Cpu).unwrap();
    let (k, coef) = (3, 0.4);
    let value = |x: &Tensor| {
        coef / k as f64
            * dist_loss::term(x, &q, &weight)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
    };
    let analytic = to_vec_f64(&dist_loss::grad(&x, &q, &weight, k, coef).unwrap());
    let base = to_vec_f64(&x);
    for i in 0..base.len() {
        let at = |d: f64| {
            let mut v = base.clone();
            v[i] += d;
            value(&Tensor::from_vec(v, (4, 8), &Device::Cpu).unwrap())
        };
        let numeric = (at(1e-6) - at(-1e-6)) / 2e-6;
        assert!(
            (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
            "entry {i}: {numeric} vs {}",
            analytic[i]
        );
    }
}

#[test]
fn counts_hits_and_both_saturations() {
    // Δ = 0.25, L = 3, clip 0.75; atol 0.01.
    let g = TensorGrid::new(&uniform(3, ScaleKind::Absolute, Some(0.25)), &t(&[0.0; 6], &[6])).unwrap();
    let w = t(&[0.25, 0.255, 0.3, 0.7, 0.8, -2.0], &[6]);
    let c = g.counts(&w, 0.01).unwrap();
    let get = |t: Tensor| t.to_scalar::<f64>().unwrap();
    assert_eq!(get(c.hit), 2.0); // 0.25, 0.255
    assert_eq!(get(c.sat_q), 3.0); // 0.7, 0.8, -2.0 quantize to ±0.75
    assert_eq!(get(c.sat_w), 2.0); // 0.8, -2.0 lie beyond the clip
    let want_err = 0.0 + 0.005 + 0.05 + 0.05 + 0.05 + 1.25;
    assert!((get(c.abs_err) - want_err).abs() < 1e-6);
}

#[test]
fn compute_copy_on_grid_is_the_grid_point_and_accumulates_the_gradient() {
    // Ties (x/s exactly k + 0.5), values beyond the clamp, and ordinary values, per-group scales.
    let mut rng = proxqat::rng::Rng::new(3);
    let mut v: Vec<f32> = (0..4 * 64).map(|_| 0.05 * rng.normal() as f32).collect();
    v[0] = 0.5;
    v[1] = -3.0;
    let grid = TensorGrid::new(&uniform(3, ScaleKind::Group, None), &t(&v, &[4, 64])).unwrap();
    let TensorGrid::Uniform { scale, half_levels, .. } = &grid else {
        unreachable!()
    };
    // A tie at code 1.5 in the first group: x = 1.5·s must round to 2 (even).
    let s0 = scale.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    v[2] = 1.5 * s0;
    let x = candle_core::Var::from_tensor(&t(&v, &[4, 64])).unwrap();
    let acc = Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap();
    let on_grid = proxqat::fused::weight::OnGrid {
        scale: scale.clone(),
        half_levels: *half_levels,
    };
    let q = proxqat::fused::weight::compute_copy_accumulating(x.as_tensor(), Some(on_grid), DType::F32, &acc).unwrap();
    assert_eq!(
        f32s(&q),
        f32s(&grid.quantize(x.as_tensor()).unwrap()),
        "bit-identical to the grid"
    );
    assert_eq!(f32s(&q)[2], 2.0 * s0);
    let probe = common::randn(&[4, 64], 9, 1.0).to_dtype(DType::F32).unwrap();
    for _ in 0..2 {
        let grads = (&q * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(x.as_tensor()).is_none(),
            "the gradient goes to the accumulator, not the Var"
        );
    }
    let twice: Vec<f32> = f32s(&probe).iter().map(|p| 2.0 * p).collect();
    assert_eq!(
        f32s(&acc),
        twice,
        "straight-through: the identity, summed over two passes"
    );
}

/// The learned-scale gradient `Σ_group g·r` is the derivative of `Σ L(q(x; s))` in each group's scale
/// (central differences in f64, saturated entries included: the std rule at k = 1.5 clips some).
#[test]
fn scale_gradient_matches_finite_differences() {
    let x = common::randn(&[4, 64], 9, 0.1).to_dtype(DType::F64).unwrap();
    let cfg = GridConfig {
        bits: 3,
        scale: ScaleKind::Group,
        group_size: 32,
        rule: ScaleRule::Std,
        std_k: 1.5,
        ..Default::default()
    };
    let grid = TensorGrid::new(&cfg, &x).unwrap();
    let scale = grid.scale().unwrap().to_dtype(DType::F64).unwrap();
    let phase = Tensor::arange(0u32, 256, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .reshape((4, 64))
        .unwrap()
        .affine(0.1, 0.0)
        .unwrap();
    // L(q) = Σ sin(7q + phase), ∂L/∂q = 7·cos(7q + phase).
    let loss = |s: &Tensor| {
        let q = TensorGrid::with_scale(&cfg, &[4, 64], s.clone())
            .unwrap()
            .quantize(&x)
            .unwrap();
        let y = ((q * 7.0).unwrap() + &phase).unwrap();
        (y.sin().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap(), y)
    };
    let (_, y) = loss(&scale);
    let g = (y.cos().unwrap() * 7.0).unwrap();
    let grid64 = TensorGrid::with_scale(&cfg, &[4, 64], scale.clone()).unwrap();
    let analytic = to_vec_f64(&grid64.scale_gradient(&x, &g).unwrap().unwrap());
    let codes = to_vec_f64(&grid64.codes(&x).unwrap().unwrap());
    assert!(codes.iter().any(|r| r.abs() == 3.0), "some entries saturate");
    let base = to_vec_f64(&scale);
    assert_eq!(analytic.len(), base.len());
    for i in 0..base.len() {
        let at = |d: f64| {
            let mut v = base.clone();
            v[i] += d;
            loss(&Tensor::from_vec(v, scale.shape(), &Device::Cpu).unwrap()).0
        };
        let h = base[i] * 1e-7;
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (numeric - analytic[i]).abs() < 1e-5 * (1.0 + numeric.abs()),
            "group {i}: {numeric} vs {}",
            analytic[i]
        );
    }
}
