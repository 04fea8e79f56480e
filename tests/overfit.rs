//! A tiny Llama overfits one batch: the model, its backward and AdamW work together.

use candle_core::{DType, Device, Tensor};
use proxqat::model::{Llama, LlamaConfig, Params};
use proxqat::train::optim::{AdamW, Update};

#[test]
fn tiny_model_overfits_one_batch() {
    let cfg = LlamaConfig::tiny(64, true);
    let params = Params::random(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let model = Llama::new(cfg, DType::F32, &Device::Cpu);
    let mut rng = proxqat::rng::Rng::new(5);
    let ids: Vec<u32> = (0..2 * 16).map(|_| rng.below(64) as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let input = Tensor::from_vec(ids, (2, 16), &Device::Cpu).unwrap();
    let mut opt = AdamW::new(0.9, 0.95, 1e-8, 0.0);
    let one = Tensor::new(1f32, &Device::Cpu).unwrap();
    let mut first = None;
    let mut last = f32::MAX;
    for _ in 0..100 {
        let w = params.compute_weights(DType::F32, |_, x| Ok(x.clone())).unwrap();
        let (loss, _) = model.loss(&w, &input, &labels).unwrap();
        let grads = loss.backward().unwrap();
        last = loss.to_scalar::<f32>().unwrap();
        first.get_or_insert(last);
        opt.begin_step();
        for (name, var) in &params.vars {
            opt.update(
                name,
                var,
                grads.get(var.as_tensor()).unwrap(),
                &one,
                1e-2,
                Update::Plain,
                None,
            )
            .unwrap();
        }
    }
    let first = first.unwrap();
    eprintln!("loss {first} -> {last}");
    assert!(last < 0.1 * first, "loss fell only from {first} to {last}");
}

#[test]
fn adamw_matches_a_hand_computed_pytorch_step() {
    // Two steps of torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01) on a
    // 2-D tensor, computed by hand in f64 from PyTorch's formula.
    let x0 = [0.5f64, -1.0, 2.0, 0.0];
    let grads = [[0.1f64, -0.2, 0.3, 0.0], [0.05, 0.1, -0.4, 1.0]];
    let (lr, b1, b2, eps, wd) = (0.1, 0.9, 0.999, 1e-8, 0.01);
    let (mut x, mut m, mut v) = (x0.to_vec(), vec![0.0; 4], vec![0.0; 4]);
    for (t, g) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        for i in 0..4 {
            x[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let denom = (v[i] / (1.0 - b2.powi(t))).sqrt() + eps;
            x[i] -= lr * (m[i] / (1.0 - b1.powi(t))) / denom;
        }
    }
    let var = candle_core::Var::from_tensor(
        &Tensor::from_vec(x0.to_vec(), (2, 2), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    )
    .unwrap();
    let mut opt = AdamW::new(b1, b2, eps, wd);
    let one = Tensor::new(1f32, &Device::Cpu).unwrap();
    for g in &grads {
        opt.begin_step();
        let g = Tensor::from_vec(g.to_vec(), (2, 2), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        opt.update("w", &var, &g, &one, lr, Update::Plain, None).unwrap();
    }
    let got: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    for i in 0..4 {
        assert!((got[i] as f64 - x[i]).abs() < 1e-6, "entry {i}: {} vs {}", got[i], x[i]);
    }
}

#[test]
fn adam_state_never_holds_an_autograd_graph() {
    // A gradient built from the parameter itself (as the dist term is) must not chain the optimizer's
    // moments to the step's graph: that graph would be kept alive, and grow, step after step.
    let var = candle_core::Var::from_tensor(&Tensor::ones((4, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let grad = (var.as_tensor() * 2.0).unwrap();
    assert!(
        grad.track_op(),
        "precondition: the gradient expression tracks the variable"
    );
    let mut opt = AdamW::new(0.9, 0.95, 1e-8, 0.1);
    let one = Tensor::new(1f32, &Device::Cpu).unwrap();
    opt.begin_step();
    opt.update("w", &var, &grad, &one, 1e-2, Update::Plain, None).unwrap();
    assert!(!opt.m["w"].track_op() && !opt.v["w"].track_op());
}
