//! GPU checks run on the GPU machine (no cargo there, so they live in the binary):
//! CUDA vs CPU parity of every op, the grid and a tiny Llama (forward and backward, f32 and bf16);
//! random HF checkpoints and their loss/logits/gradients for the PyTorch comparison
//! (scripts/torch_parity.py).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::BTreeMap;
use std::path::Path;

use crate::fused::{self, Kernels};
use crate::model::llama::{is_norm_gain, AccumulatorStart, EMBEDDING};
use crate::model::{io, ops, Llama, LlamaConfig, Params};
use crate::quant::grid::{GridConfig, TensorGrid};
use crate::train::optim::{AdamW, CopySpec, Update};

/// max|a − b| / max|b|, both read back as f64.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    // NaN wins (a NaN result must fail its row, not vanish in the maximum).
    let diff = (&a - &b)?
        .abs()?
        .flatten_all()?
        .to_vec1::<f64>()?
        .into_iter()
        .fold(
            0.0,
            |m: f64, d| if m.is_nan() || d.is_nan() { f64::NAN } else { m.max(d) },
        );
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30);
    Ok(diff / scale)
}

fn randn(shape: &[usize], seed: u64, scale: f64) -> Result<Tensor> {
    let mut rng = crate::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (scale * rng.normal()) as f32).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Value and input gradients of `f(inputs)·probe` on a device/dtype.
fn value_and_grads(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    device: &Device,
    dtype: DType,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(device)?.to_dtype(dtype)?))
        .collect::<candle_core::Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts)?;
    let probe = randn(out.dims(), 1234, 1.0)?.to_device(device)?.to_dtype(out.dtype())?;
    let grads = (&out * probe)?.sum_all()?.backward()?;
    let g = vars
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .cloned()
                .context("no gradient reached an input")
        })
        .collect::<Result<_>>()?;
    Ok((out, g))
}

struct Row {
    name: String,
    dtype: DType,
    err: f64,
    tol: f64,
}

/// (a): every op, the grid and a tiny Llama on CUDA against the CPU in f32 (≤ 1e-4) and bf16 (≤ 2e-2).
pub fn parity(cuda: &Device) -> Result<bool> {
    let mut rows = Vec::new();
    let cfg = LlamaConfig::tiny(64, false);
    let (cos, sin) = ops::rope_tables(&cfg, 12, DType::F32, &Device::Cpu)?;
    let mask = ops::causal_mask(12, DType::F32, &Device::Cpu)?;
    let targets: Vec<i64> = (0..24)
        .map(|i| if i % 5 == 0 { -100 } else { (i * 7 % 64) as i64 })
        .collect();
    type OpFn = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;
    let on = |t: &Tensor, like: &Tensor| -> Result<Tensor> { Ok(t.to_device(like.device())?.to_dtype(like.dtype())?) };
    let (cos2, sin2, cos3, sin3) = (cos.clone(), sin.clone(), cos.clone(), sin.clone());
    let (targets2, targets3, targets4) = (targets.clone(), targets.clone(), targets.clone());
    // The distillation teacher: a constant of the op (no gradient), rows longer than a block.
    let teacher = randn(&[24, 3000], 12, 2.0)?;
    let teacher2 = teacher.clone();
    let f32_of = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?) };
    // `fused::rms_norm` on x of `dims` and a gain (seeds `seed`, `seed + 1`).
    let fused_norm = |name: &'static str, dims: &[usize], seed: u64| -> Result<(&'static str, Vec<Tensor>, OpFn)> {
        let inputs = vec![randn(dims, seed, 1.0)?, randn(&dims[dims.len() - 1..], seed + 1, 1.0)?];
        let op: OpFn = Box::new(move |x| {
            Ok(fused::rms_norm::rms_norm(
                &f32_of(&x[0])?,
                &f32_of(&x[1])?,
                1e-5,
                x[0].dtype(),
            )?)
        });
        Ok((name, inputs, op))
    };
    let cases: Vec<(&str, Vec<Tensor>, OpFn)> = vec![
        // The fused kernels, as the model calls them (f32 residual in, compute dtype out for the norm);
        // rows wider than 4 columns per thread of a 1024-thread block take the norm backward's 2- and
        // 4-group variants (d = 5001 on the scalar path, 9000 on the 16-byte one).
        fused_norm("fused rms_norm", &[2, 12, 64], 1)?,
        fused_norm("fused rms_norm (5001 wide)", &[3, 5001], 70)?,
        fused_norm("fused rms_norm (9000 wide)", &[3, 9000], 72)?,
        (
            "fused rope (+transpose)",
            vec![randn(&[2, 12, 4 * 16], 3, 1.0)?],
            Box::new(move |x| {
                Ok(fused::rope::rope(
                    &x[0],
                    &on(&cos2, &f32_of(&x[0])?)?,
                    &on(&sin2, &f32_of(&x[0])?)?,
                    4,
                )?)
            }),
        ),
        (
            // q or k as the fused q/k/v projection hands them over: a column range of wider rows.
            "fused rope (column range)",
            vec![randn(&[2, 12, 4 * 16 + 2 * 16 + 16], 13, 1.0)?],
            Box::new(move |x| {
                Ok(fused::rope::rope(
                    &x[0].narrow(2, 16, 4 * 16)?,
                    &on(&cos3, &f32_of(&x[0])?)?,
                    &on(&sin3, &f32_of(&x[0])?)?,
                    4,
                )?)
            }),
        ),
        (
            "fused causal_attention",
            vec![
                randn(&[2, 4, 12, 16], 5, 1.0)?,
                randn(&[2, 2, 12, 16], 6, 1.0)?,
                randn(&[2, 2, 12, 16], 7, 1.0)?,
            ],
            Box::new(|x| Ok(fused::softmax::causal_attention(&x[0], &x[1], &x[2])?)),
        ),
        (
            "fused swiglu",
            vec![randn(&[24, 128], 8, 1.0)?, randn(&[24, 128], 9, 1.0)?],
            Box::new(|x| Ok(fused::swiglu::swiglu(&x[0], &x[1])?)),
        ),
        (
            // An odd length at an odd offset: the kernels' one-element path (no four-element accesses).
            "fused swiglu (offset view)",
            vec![randn(&[7, 13], 18, 1.0)?, randn(&[7, 13], 19, 1.0)?],
            Box::new(|x| Ok(fused::swiglu::swiglu(&x[0].narrow(0, 1, 5)?, &x[1].narrow(0, 1, 5)?)?)),
        ),
        (
            "fused cross_entropy",
            vec![randn(&[24, 64], 10, 2.0)?],
            Box::new(move |x| Ok(fused::cross_entropy::cross_entropy(&x[0], &targets2)?.0)),
        ),
        (
            "fused distill kl (T 2)",
            vec![randn(&[24, 3000], 11, 2.0)?],
            Box::new(move |x| Ok(fused::distill::kl(&x[0], &on(&teacher, &x[0])?, &targets3, 2.0)?)),
        ),
        (
            "rms_norm",
            vec![randn(&[2, 12, 64], 1, 1.0)?, randn(&[64], 2, 1.0)?],
            Box::new(|x| Ok(ops::rms_norm(&x[0], &x[1], 1e-5)?)),
        ),
        (
            "rope",
            vec![randn(&[2, 4, 12, 16], 3, 1.0)?],
            Box::new(move |x| Ok(ops::rope(&x[0], &on(&cos, &x[0])?, &on(&sin, &x[0])?)?)),
        ),
        (
            "softmax",
            vec![randn(&[6, 40], 4, 3.0)?],
            Box::new(|x| Ok(ops::softmax_last_dim(&x[0])?)),
        ),
        (
            "causal_attention",
            vec![
                randn(&[2, 4, 12, 16], 5, 1.0)?,
                randn(&[2, 2, 12, 16], 6, 1.0)?,
                randn(&[2, 2, 12, 16], 7, 1.0)?,
            ],
            Box::new(move |x| Ok(ops::attention(&x[0], &x[1], &x[2], &on(&mask, &x[0])?)?)),
        ),
        (
            "swiglu",
            vec![randn(&[24, 128], 8, 1.0)?, randn(&[24, 128], 9, 1.0)?],
            Box::new(|x| Ok(ops::swiglu(&x[0], &x[1])?)),
        ),
        (
            "cross_entropy",
            vec![randn(&[24, 64], 10, 2.0)?],
            Box::new(move |x| Ok(ops::cross_entropy(&x[0], &targets)?.0)),
        ),
        (
            "distill_kl (T 2)",
            vec![randn(&[24, 3000], 11, 2.0)?],
            Box::new(move |x| Ok(ops::distill_kl(&x[0], &on(&teacher2, &x[0])?, &targets4, 2.0)?)),
        ),
    ];
    for (name, inputs, f) in &cases {
        let (ref_out, ref_grads) = value_and_grads(f.as_ref(), inputs, &Device::Cpu, DType::F32)?;
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2)] {
            let (out, grads) = value_and_grads(f.as_ref(), inputs, cuda, dtype)?;
            let mut err = rel_err(&out, &ref_out)?;
            for (g, r) in grads.iter().zip(&ref_grads) {
                err = err.max(rel_err(g, r)?);
            }
            rows.push(Row {
                name: format!("{name} fwd+bwd"),
                dtype,
                err,
                tol,
            });
        }
    }
    // The grid runs as plain tensor ops: identical values expected on both devices.
    let w = randn(&[64, 128], 11, 0.02)?;
    for (label, grid) in [
        ("grid uniform/group", GridConfig::default()),
        (
            "grid levels",
            GridConfig {
                levels: Some(vec![-0.03, -0.01, 0.0, 0.01, 0.03]),
                ..Default::default()
            },
        ),
    ] {
        let g = TensorGrid::new(&grid, &w)?;
        let gc = g.to_device(cuda)?;
        let err = rel_err(&gc.quantize(&w.to_device(cuda)?)?, &g.quantize(&w)?)?;
        rows.push(Row {
            name: label.into(),
            dtype: DType::F32,
            err,
            tol: 0.0,
        });
    }
    // Grid statistics: the fused one-pass counts on CUDA against the candle-ops counts on the CPU.
    let g = TensorGrid::new(&GridConfig::default(), &w)?;
    let moved = (&w + randn(&[64, 128], 12, 0.002)?)?;
    let stack = |c: crate::quant::grid::GridCounts| Tensor::stack(&[c.hit, c.sat_q, c.sat_w, c.abs_err], 0);
    let err = rel_err(
        &stack(g.to_device(cuda)?.counts(&moved.to_device(cuda)?, 1e-3)?)?,
        &stack(g.counts(&moved, 1e-3)?)?,
    )?;
    rows.push(Row {
        name: "fused grid counts".into(),
        dtype: DType::F32,
        err,
        tol: 1e-5,
    });
    // A tiny Llama: loss and every parameter's gradient; then one with head_dim 64 over more than one
    // 64-position tile, where the bf16 blocks run the tiled attention kernels (`fused::flash`).
    tiny_llama_rows(&cfg, 12, "", cuda, &mut rows)?;
    let cfg64 = LlamaConfig {
        hidden_size: 128,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 64,
        ..cfg.clone()
    };
    tiny_llama_rows(&cfg64, 80, " d64", cuda, &mut rows)?;
    sample_row(cuda, &mut rows)?;
    // The fused AdamW (CUDA, in place) against the reference AdamW (CPU), with a clipping factor: steps
    // 0-1 plain, 2 dist-grad (uniform grid), 3 prox (uniform grid), 4 prox (level grid). Then the fused Σx².
    fn how<'a>(k: u64, grid: &'a TensorGrid, levels: &'a TensorGrid, pull: &'a Tensor) -> Update<'a> {
        match k {
            0 | 1 => Update::Plain,
            2 => Update::DistGrad {
                task_scale: 0.7,
                coef: pull,
                grid,
            },
            3 => Update::Prox {
                task_scale: 0.7,
                pull,
                grid,
            },
            _ => Update::Prox {
                task_scale: 0.7,
                pull,
                grid: levels,
            },
        }
    }
    let optimizer = |device: &Device| -> Result<(Tensor, Tensor, Tensor)> {
        let var = Var::from_tensor(&randn(&[64, 128], 30, 0.02)?.to_device(device)?)?;
        let grid = TensorGrid::new(&GridConfig::default(), var.as_tensor())?;
        let levels = TensorGrid::new(
            &GridConfig {
                levels: Some(vec![-0.03, -0.01, 0.0, 0.01, 0.03]),
                ..Default::default()
            },
            var.as_tensor(),
        )?;
        let pull = Tensor::new(200f32, device)?;
        let mut opt = AdamW::new(0.9, 0.95, 1e-8, 0.1);
        let clip = Tensor::new(0.5f32, device)?;
        for k in 0..5u64 {
            opt.begin_step();
            let g = randn(&[64, 128], 31 + k, 1e-3)?.to_device(device)?;
            opt.update("w", &var, &g, &clip, 1e-3, how(k, &grid, &levels, &pull), None)?;
        }
        Ok((var.as_tensor().clone(), opt.m["w"].clone(), opt.v["w"].clone()))
    };
    let (x_ref, m_ref, v_ref) = optimizer(&Device::Cpu)?;
    let (x, m, v) = optimizer(cuda)?;
    let err = rel_err(&x, &x_ref)?.max(rel_err(&m, &m_ref)?).max(rel_err(&v, &v_ref)?);
    rows.push(Row {
        name: "fused adamw (clip, pulls) x,m,v".into(),
        dtype: DType::F32,
        err,
        tol: 1e-5,
    });
    // The next step's bf16 compute copy written by the update's own pass (plain, then on the uniform
    // grid): the same bits as casting the updated weight separately.
    let var = Var::from_tensor(&randn(&[64, 128], 32, 0.02)?.to_device(cuda)?)?;
    let on_grid = match TensorGrid::new(&GridConfig::default(), var.as_tensor())? {
        TensorGrid::Uniform { scale, half_levels, .. } => fused::weight::OnGrid { scale, half_levels },
        TensorGrid::Levels(_) => unreachable!("the default grid is uniform"),
    };
    let mut opt = AdamW::new(0.9, 0.95, 1e-8, 0.1);
    let clip = Tensor::new(0.5f32, cuda)?;
    let mut err = 0f64;
    for (k, grid) in [None, Some(on_grid)].into_iter().enumerate() {
        opt.begin_step();
        let g = randn(&[64, 128], 40 + k as u64, 1e-3)?.to_device(cuda)?;
        let spec = CopySpec {
            dtype: DType::BF16,
            on_grid: grid.clone(),
        };
        let copy = opt
            .update("w", &var, &g, &clip, 1e-3, Update::Plain, Some(&spec))?
            .context("the update wrote no compute copy")?;
        let cast = fused::weight::compute_copy(var.as_tensor(), grid, DType::BF16)?;
        err = err.max(rel_err(&copy, &cast)?);
    }
    rows.push(Row {
        name: "adamw's bf16 copy vs cast".into(),
        dtype: DType::BF16,
        err,
        tol: 0.0,
    });
    // The compute copy (plain, and on its grid): forward values, and two backward passes adding the
    // compute-dtype gradient into the f32 accumulator.
    let w = randn(&[64, 128], 42, 0.02)?;
    let on_grid = match TensorGrid::new(&GridConfig::default(), &w)? {
        TensorGrid::Uniform { scale, half_levels, .. } => fused::weight::OnGrid { scale, half_levels },
        TensorGrid::Levels(_) => unreachable!("the default grid is uniform"),
    };
    for (label, grid) in [("compute copy", None), ("compute copy on grid", Some(on_grid))] {
        let run = |device: &Device| -> Result<(Tensor, Tensor)> {
            let w = Var::from_tensor(&w.to_device(device)?)?;
            let acc = Tensor::zeros((64, 128), DType::F32, device)?;
            let dtype = if device.is_cuda() { DType::BF16 } else { DType::F32 };
            let grid = grid.clone().map(|g| fused::weight::OnGrid {
                scale: g.scale.to_device(device).expect("scale to device"),
                ..g
            });
            let mut copy = None;
            for seed in [43, 44] {
                let c = fused::weight::compute_copy_accumulating(w.as_tensor(), grid.clone(), dtype, &acc)?;
                let probe = randn(&[64, 128], seed, 1.0)?.to_device(device)?.to_dtype(dtype)?;
                let _ = (&c * probe)?.sum_all()?.backward()?;
                copy = Some(c);
            }
            Ok((copy.expect("two passes").to_dtype(DType::F32)?, acc))
        };
        let ((copy, acc), (copy_ref, acc_ref)) = (run(cuda)?, run(&Device::Cpu)?);
        rows.push(Row {
            name: format!("fused {label} + accumulate"),
            dtype: DType::BF16,
            err: rel_err(&copy, &copy_ref)?.max(rel_err(&acc, &acc_ref)?),
            tol: 2e-2,
        });
    }
    // The fused linear: output, input gradient, and the weight gradient added by one cuBLAS GEMM with
    // β = 1 into the f32 accumulator over two backward passes (f32 and bf16 inputs).
    for dtype in [DType::F32, DType::BF16] {
        let (x, w) = (randn(&[2, 96, 128], 45, 1.0)?, randn(&[64, 128], 46, 0.05)?);
        let run = |device: &Device| -> Result<(Tensor, Tensor, Tensor)> {
            let dt = if device.is_cuda() { dtype } else { DType::F32 };
            let x = Var::from_tensor(&x.to_device(device)?.to_dtype(dt)?)?;
            let w = w.to_device(device)?.to_dtype(dt)?;
            let acc = Tensor::zeros((64, 128), DType::F32, device)?;
            let (mut y, mut dx) = (None, None);
            for seed in [47, 48] {
                let out = fused::linear::linear(x.as_tensor(), &w, &acc)?;
                let probe = randn(&[2, 96, 64], seed, 1.0)?.to_device(device)?.to_dtype(dt)?;
                let grads = (&out * probe)?.sum_all()?.backward()?;
                dx = grads.get(x.as_tensor()).cloned();
                y = Some(out);
            }
            let f32 = |t: Option<Tensor>| -> Result<Tensor> { Ok(t.context("computed")?.to_dtype(DType::F32)?) };
            Ok((f32(y)?, f32(dx)?, acc))
        };
        let ((y, dx, acc), (y_ref, dx_ref, acc_ref)) = (run(cuda)?, run(&Device::Cpu)?);
        rows.push(Row {
            name: "fused linear y, dx, accumulated dw".into(),
            dtype,
            err: rel_err(&y, &y_ref)?
                .max(rel_err(&dx, &dx_ref)?)
                .max(rel_err(&acc, &acc_ref)?),
            tol: if dtype == DType::F32 { 1e-4 } else { 2e-2 },
        });
    }
    #[cfg(feature = "cuda")]
    gemm_rows(cuda, &mut rows)?;
    // The fused embedding lookup: rows, and the rows' gradients (ids repeat) added into the table's f32
    // accumulator over two backward passes, for f32 and bf16 tables (and gradients); then 3,000 tokens
    // of 7 ids (more tokens than the ordering kernel's threads, hundreds of rows per id).
    for (dtype, tokens, vocab) in [(DType::F32, 300, 50), (DType::BF16, 300, 50), (DType::F32, 3000, 7)] {
        let table = randn(&[50, 96], 49, 1.0)?;
        let ids: Vec<u32> = (0..tokens as u32).map(|i| (i * 7 + i / 13) % vocab).collect();
        let run = |device: &Device| -> Result<(Tensor, Tensor)> {
            let dt = if device.is_cuda() { dtype } else { DType::F32 };
            let table = Var::from_tensor(&table.to_device(device)?.to_dtype(dt)?)?;
            let ids = Tensor::new(ids.as_slice(), device)?;
            let acc = Tensor::zeros((50, 96), DType::F32, device)?;
            let mut looked_up = None;
            for seed in [50, 51] {
                let out = fused::embedding::embedding(table.as_tensor(), &ids, &acc)?;
                let probe = randn(&[tokens, 96], seed, 1.0)?.to_device(device)?.to_dtype(dt)?;
                let _ = (&out * probe)?.sum_all()?.backward()?;
                looked_up = Some(out.to_dtype(DType::F32)?);
            }
            Ok((looked_up.context("computed")?, acc))
        };
        let ((out, acc), (out_ref, acc_ref)) = (run(cuda)?, run(&Device::Cpu)?);
        rows.push(Row {
            name: format!("fused embedding rows, accumulated grad ({tokens} tokens)"),
            dtype,
            err: rel_err(&out, &out_ref)?.max(rel_err(&acc, &acc_ref)?),
            tol: if dtype == DType::F32 { 1e-5 } else { 2e-2 },
        });
    }
    // RoPE⁻¹ written into a column range of (B·T, W) rows (the fused q/k/v projection's gradient), f32
    // sums rounded to bf16 as the block does it: the whole buffer compared, untouched columns included.
    {
        let (cos, sin) = ops::rope_tables(&cfg, 12, DType::F32, &Device::Cpu)?;
        let grad = randn(&[2, 4, 12, 16], 14, 1.0)?;
        let rows_of = |device: &Device| -> Result<Tensor> {
            let rows = randn(&[24, 112], 15, 1.0)?.to_dtype(DType::BF16)?.to_device(device)?;
            let (c, s) = (cos.to_device(device)?, sin.to_device(device)?);
            fused::rope::rope_backward_into(&grad.to_device(device)?, &c, &s, &rows, 32)?;
            Ok(rows)
        };
        rows.push(Row {
            name: "fused rope backward into columns".into(),
            dtype: DType::BF16,
            err: rel_err(&rows_of(cuda)?, &rows_of(&Device::Cpu)?)?,
            tol: 1e-2,
        });
    }
    // The tiled attention (bf16, head_dim 64) against its f64 CPU twin on the same bf16 inputs: o, the
    // log-sum-exps, dq, dk, dv — GQA over partial 64-position tiles (T 200, 300), and one whole tile;
    // the last with v read in place from the fused q/k/v projection's rows.
    for (b, h, kv, t, v_in_rows) in [
        (2, 8, 2, 200, false),
        (1, 4, 4, 64, false),
        (1, 8, 2, 300, false),
        (2, 8, 2, 200, true),
    ] {
        let bf = |shape: &[usize], seed| -> Result<Tensor> { Ok(randn(shape, seed, 1.0)?.to_dtype(DType::BF16)?) };
        let d = fused::flash::HEAD_DIM;
        let inputs = [
            bf(&[b, h, t, d], 60)?,
            bf(&[b, kv, t, d], 61)?,
            bf(&[b, t, h + 2 * kv, d], 62)?,
            bf(&[b, t, h, d], 63)?,
        ];
        let run = |device: &Device| -> Result<Vec<Tensor>> {
            let [q, k, v, d_o] = inputs.each_ref().map(|x| x.to_device(device));
            let (q, k, v, d_o) = (q?, k?, v?.narrow(2, h + kv, kv)?, d_o?);
            let v = if v_in_rows { v } else { v.contiguous()? };
            let (o, lse) = fused::flash::forward(&q, &k, &v)?;
            let (dq, dk, dv) = fused::flash::backward(&q, &k, &v, &o, &lse, &d_o)?;
            Ok(vec![o, lse, dq, dk, dv])
        };
        let mut err = 0f64;
        for (got, want) in run(cuda)?.iter().zip(&run(&Device::Cpu)?) {
            err = err.max(rel_err(got, want)?);
        }
        rows.push(Row {
            name: format!(
                "flash attention T {t} H {h}/{kv}{}",
                if v_in_rows { ", v in q/k/v rows" } else { "" }
            ),
            dtype: DType::BF16,
            err,
            tol: 2e-2,
        });
    }
    // Three tensors in one launch on CUDA, the third a view starting one row in.
    let rows5 = randn(&[5, 1001], 42, 1.0)?;
    let parts = [
        randn(&[1000, 77], 40, 1.0)?,
        randn(&[3], 41, 1.0)?,
        rows5.narrow(0, 1, 4)?,
    ];
    let on_cuda = [
        parts[0].to_device(cuda)?,
        parts[1].to_device(cuda)?,
        rows5.to_device(cuda)?.narrow(0, 1, 4)?,
    ];
    let err = rel_err(
        &fused::adamw::sums_of_squares(&on_cuda.iter().collect::<Vec<_>>())?,
        &fused::adamw::sums_of_squares(&parts.iter().collect::<Vec<_>>())?,
    )?;
    rows.push(Row {
        name: "fused sum of squares".into(),
        dtype: DType::F32,
        err,
        tol: 1e-5,
    });
    let mut ok = true;
    println!(
        "{:<32} {:>6} {:>11} {:>9}  result",
        "check (CUDA vs CPU f32)", "dtype", "rel err", "tol"
    );
    for r in &rows {
        let pass = r.err <= r.tol;
        ok &= pass;
        println!(
            "{:<32} {:>6} {:>11.3e} {:>9.1e}  {}",
            r.name,
            format!("{:?}", r.dtype),
            r.err,
            r.tol,
            if pass { "PASS" } else { "FAIL" }
        );
    }
    Ok(ok)
}

/// The cuBLASLt GEMM of the fused projections against f64 on the CPU, each shape planned by
/// measurement and then (another shape) by the heuristic alone: every transpose of both operands,
/// β = 0 and β = 1, f32 and bf16 inputs into their dtype or f32, `a` a view one row in (its pointer
/// aligned to as little as 2 bytes); and a weight gradient's shape, where the measured plan times the
/// heuristic's 8 candidates and may keep another.
#[cfg(feature = "cuda")]
fn gemm_rows(cuda: &Device, rows: &mut Vec<Row>) -> Result<()> {
    use fused::gemm::{gemm, set_algorithm, GemmAlgorithm};
    let f64_of = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F64)?) };
    // `out = opA(a)·opB(b) (+ c)` on both devices for `a` stored (ar, ac) one row into its buffer.
    let check =
        |[ar, ac]: [usize; 2], ta: bool, b_dims: [usize; 2], tb: bool, types: (DType, DType), add: bool, seed| {
            let (input, output) = types;
            let a_buffer = randn(&[ar + 1, ac], seed, 1.0)?.to_dtype(input)?;
            let b = randn(&b_dims, seed + 1, 1.0)?.to_dtype(input)?;
            let m = if ta { ac } else { ar };
            let n = if tb { b_dims[0] } else { b_dims[1] };
            let c = randn(&[m, n], seed + 2, 1.0)?.to_dtype(output)?;
            let op = |t: Tensor, transposed: bool| -> Result<Tensor> { Ok(if transposed { t.t()? } else { t }) };
            let product = op(f64_of(&a_buffer.narrow(0, 1, ar)?)?, ta)?.matmul(&op(f64_of(&b)?, tb)?)?;
            let want = if add { (product + f64_of(&c)?)? } else { product };
            // β = 0 must ignore what `out` holds: it starts as `c` either way.
            let out = c.to_device(cuda)?;
            let a = a_buffer.to_device(cuda)?.narrow(0, 1, ar)?;
            gemm(&out, &a, ta, &b.to_device(cuda)?, tb, add)?;
            rel_err(&out, &want)
        };
    let mut seed = 80;
    for (mode, m) in [(GemmAlgorithm::Measured, 40), (GemmAlgorithm::Heuristic, 41)] {
        set_algorithm(mode);
        for types in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::BF16, DType::F32),
        ] {
            let (k, n) = (67, 24);
            let mut err = 0f64;
            for case in 0..8 {
                let (ta, tb, add) = (case & 1 != 0, case & 2 != 0, case & 4 != 0);
                let a_dims = if ta { [k, m] } else { [m, k] };
                let b_dims = if tb { [n, k] } else { [k, n] };
                err = err.max(check(a_dims, ta, b_dims, tb, types, add, seed)?);
                seed += 3;
            }
            rows.push(Row {
                name: format!("gemm {mode:?} (ᵀ, β 0/1) → {:?}", types.1),
                dtype: types.0,
                err,
                tol: if types.1 == DType::F32 { 1e-5 } else { 1e-2 },
            });
        }
        // A weight gradient of micro-batch 4's 1,024 tokens, `acc (2048 + m, 512) += xᵀ · dy` (a k/v
        // projection's, transposed; `m` gives each mode its own shape).
        let err = check(
            [1024, 2048 + m],
            true,
            [1024, 512],
            false,
            (DType::BF16, DType::F32),
            true,
            seed,
        )?;
        rows.push(Row {
            name: format!("gemm {mode:?} weight gradient"),
            dtype: DType::BF16,
            err,
            tol: 1e-5,
        });
    }
    set_algorithm(GemmAlgorithm::default());
    Ok(())
}

/// A tiny Llama on CUDA against the CPU reference (f32): loss and every parameter's gradient, through
/// both kernel sets and through the fused blocks of the training step.
fn tiny_llama_rows(cfg: &LlamaConfig, seq: usize, label: &str, cuda: &Device, rows: &mut Vec<Row>) -> Result<()> {
    let params_cpu = Params::random(cfg, 21, DType::F32, &Device::Cpu)?;
    let ids: Vec<u32> = (0..2 * seq).map(|i| (i * 13 % 64) as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    // `accumulating`: the weights as the training step passes them (projections and the head as compute
    // copies that add their gradients into accumulators, the f32 embedding table looked up into its
    // own), so the fused path runs each block as one node (`fused::block`) and the head with the loss
    // as another (`fused::cross_entropy::head_cross_entropy`). Accumulating runs two backward passes
    // into unwritten accumulators, as a training step of two micro-batches does (the first pass's
    // weight-gradient GEMMs overwrite them with β = 0, `fused::accumulate`), and reports their mean.
    let run = |device: &Device,
               dtype: DType,
               kernels: Kernels,
               accumulating: bool|
     -> Result<(Tensor, BTreeMap<String, Tensor>)> {
        let tensors = params_cpu
            .to_tensors()
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(device)?)))
            .collect::<Result<_>>()?;
        let params = Params::from_tensors(cfg, tensors, DType::F32)?;
        let model = Llama::new(cfg.clone(), dtype, device).with_kernels(kernels);
        let (acc, passes) = if accumulating {
            (params.gradient_accumulators(AccumulatorStart::Unwritten)?, 2)
        } else {
            (BTreeMap::new(), 1)
        };
        let w = params.compute_weights(dtype, |n, x| match acc.get(n) {
            Some(a) if n != EMBEDDING && !is_norm_gain(n) => {
                Ok(fused::weight::compute_copy_accumulating(x, None, dtype, a)?)
            }
            _ => Ok(x.clone()),
        })?;
        let input = Tensor::from_vec(ids.clone(), (2, seq), device)?;
        let mut loss = None;
        let mut autograd: BTreeMap<String, Tensor> = BTreeMap::new();
        for _ in 0..passes {
            let (pass_loss, _) = model.loss_into(&w, &acc, &input, &labels)?;
            let grads = pass_loss.backward()?;
            for (n, v) in &params.vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    let sum = match autograd.remove(n) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    autograd.insert(n.clone(), sum);
                }
            }
            loss.get_or_insert(pass_loss);
        }
        fused::accumulate::finish()?;
        let g = params
            .vars
            .keys()
            .map(|n| {
                // A norm gain's gradient is in its accumulator (the block stack) or comes through
                // autograd (the final norm, the composed blocks), the other holding none.
                let g = match (acc.get(n), autograd.get(n)) {
                    (Some(a), Some(g)) => (a + g)?,
                    (a, g) => a.or(g).context("missing grad")?.clone(),
                };
                Ok((n.clone(), (g / passes as f64)?))
            })
            .collect::<Result<_>>()?;
        Ok((loss.context("no pass")?, g))
    };
    // Reference on the CPU; both kernel sets on CUDA, and the fused blocks of the training step.
    let (ref_loss, ref_grads) = run(&Device::Cpu, DType::F32, Kernels::Reference, false)?;
    for (kernels, accumulating) in [
        (Kernels::Fused, false),
        (Kernels::Reference, false),
        (Kernels::Fused, true),
    ] {
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 2e-2)] {
            let (loss, grads) = run(cuda, dtype, kernels, accumulating)?;
            let mut err = rel_err(&loss, &ref_loss)?;
            for (n, g) in &grads {
                err = err.max(rel_err(g, &ref_grads[n])?);
            }
            let what = if accumulating { " (block nodes, 2 passes)" } else { "" };
            rows.push(Row {
                name: format!("tiny llama{label} {kernels:?}{what} loss+grads"),
                dtype,
                err,
                tol,
            });
        }
    }
    Ok(())
}

/// Greedy continuations with the KV cache (`Llama::sample`: left-padded prompts of different lengths,
/// rows finishing at different steps) on CUDA against the CPU: the share of tokens that differ. The
/// embedding (also the tied head) is scaled up so that no two logits are close enough to swap.
fn sample_row(cuda: &Device, rows: &mut Vec<Row>) -> Result<()> {
    let cfg = &LlamaConfig::tiny(64, true);
    let params = Params::random(cfg, 23, DType::F32, &Device::Cpu)?;
    let prompts: Vec<Vec<u32>> = [3usize, 17, 40]
        .iter()
        .map(|&n| (0..n).map(|i| ((i * 29 + n) % 64) as u32).collect())
        .collect();
    let limits = [30, 60, 45];
    let tokens = |device: &Device| -> Result<Vec<Vec<u32>>> {
        let mut w = params.compute_weights(DType::F32, |_, x| Ok(x.to_device(device)?))?;
        let table = w[EMBEDDING].affine(30.0, 0.0)?;
        w.insert(EMBEDDING.into(), table);
        let model = Llama::new(cfg.clone(), DType::F32, device);
        model.sample(&w, &prompts, &limits, &[], 0.0, &mut crate::rng::Rng::new(0))
    };
    let (on_cuda, on_cpu) = (tokens(cuda)?, tokens(&Device::Cpu)?);
    let total: usize = on_cpu.iter().map(Vec::len).sum();
    let differ: usize = on_cuda
        .iter()
        .zip(&on_cpu)
        .map(|(a, b)| a.iter().zip(b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len()))
        .sum();
    rows.push(Row {
        name: "tiny llama greedy sample (KV cache)".into(),
        dtype: DType::F32,
        err: differ as f64 / total.max(1) as f64,
        tol: 0.0,
    });
    Ok(())
}

/// A random Llama of a named shape as an HF checkpoint directory (tokenizer copied from `tokenizer`).
pub fn write_random(shape: &str, tokenizer: &Path, out: &Path, seed: u64) -> Result<()> {
    let cfg = match shape {
        "tiny" => LlamaConfig {
            vocab_size: 128_256,
            bos_token_id: Some(128_000),
            eos_token_ids: vec![128_001],
            ..LlamaConfig::tiny(128_256, true)
        },
        "small" => LlamaConfig {
            num_hidden_layers: 4,
            hidden_size: 256,
            intermediate_size: 1024,
            num_attention_heads: 8,
            num_key_value_heads: 2,
            head_dim: 32,
            rope_scaling: LlamaConfig::llama_3_2_1b().rope_scaling,
            rope_theta: 500_000.0,
            ..LlamaConfig::llama_3_2_1b()
        },
        "llama-3.2-1b" => LlamaConfig::llama_3_2_1b(),
        other => bail!("unknown shape {other:?}: tiny, small or llama-3.2-1b"),
    };
    let tok = io::load_tokenizer(tokenizer)?;
    let params = Params::random(&cfg, seed, DType::F32, &Device::Cpu)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    io::save_hf(out, &cfg, &params.to_tensors(), &tok, DType::F32)
}

/// Loss, last-position logits and the gradients of a few named tensors for fixed token ids.
pub fn dump_grads(ckpt: &Path, device: &Device, compute: DType, out: &Path) -> Result<()> {
    let loaded = io::load_model(ckpt)?;
    let tensors = loaded
        .tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(device)?)))
        .collect::<Result<_>>()?;
    let params = Params::from_tensors(&loaded.cfg, tensors, DType::F32)?;
    let model = Llama::new(loaded.cfg.clone(), compute, device);
    let (b, t) = (2, 64);
    let mut rng = crate::rng::Rng::new(77);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.below(loaded.cfg.vocab_size) as u32).collect();
    let labels: Vec<i64> = ids
        .iter()
        .enumerate()
        .map(|(i, &x)| if i % 17 == 3 { -100 } else { x as i64 })
        .collect();
    let w = params.compute_weights(compute, |_, x| Ok(x.clone()))?;
    let input = Tensor::from_vec(ids.clone(), (b, t), device)?;
    let (loss, _) = model.loss(&w, &input, &labels)?;
    let grads = loss.backward()?;
    let logits = model.logits(&w, &input)?.narrow(1, t - 1, 1)?;
    let mut dump = BTreeMap::new();
    dump.insert(
        "ids".to_string(),
        Tensor::from_vec(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), (b, t), &Device::Cpu)?,
    );
    dump.insert("labels".to_string(), Tensor::from_vec(labels, (b, t), &Device::Cpu)?);
    dump.insert("loss".to_string(), loss.to_dtype(DType::F32)?.reshape(1)?);
    dump.insert("logits_last".to_string(), logits.to_dtype(DType::F32)?);
    let last = loaded.cfg.num_hidden_layers - 1;
    for name in [
        "model.embed_tokens.weight".to_string(),
        "model.layers.0.self_attn.q_proj.weight".to_string(),
        "model.layers.0.self_attn.k_proj.weight".to_string(),
        "model.layers.0.mlp.down_proj.weight".to_string(),
        format!("model.layers.{last}.mlp.up_proj.weight"),
        format!("model.layers.{last}.input_layernorm.weight"),
        "model.norm.weight".to_string(),
    ] {
        let g = grads
            .get(params.get(&name)?.as_tensor())
            .with_context(|| format!("no gradient for {name}"))?;
        dump.insert(format!("grad.{name}"), g.to_dtype(DType::F32)?);
    }
    let dump: BTreeMap<String, Tensor> = dump
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let cpu: std::collections::HashMap<String, Tensor> = dump.into_iter().collect();
    candle_core::safetensors::save(&cpu, out).with_context(|| format!("writing {}", out.display()))
}
