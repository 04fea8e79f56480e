//! What each subcommand does: load, call the library, print text or one JSON object.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;

use crate::cli::{CkptArgs, Cli, Command, EvalArgs, ExportArgs, GpuCheck, HardenArgs, PtqArgs, StatsArgs, SynthArgs};
use crate::config::{Config, DeviceChoice, Precision};
use crate::data::{self, Encoder};
use crate::eval;
use crate::model::io::LoadedModel;
use crate::model::{Llama, Params};
use crate::quant::{harden, stats, QuantConfig, Quantizer, View};
use crate::synth;
use crate::train::{self, checkpoint};

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(mut a) => {
            a.overrides.extend(a.devices.map(|n| format!("train.devices={n}")));
            let cfg = Config::load(&a.config, &a.overrides)?;
            let resume = a.resume.map(|dir| dir.unwrap_or_else(|| cfg.train.out_dir.clone()));
            train::train(cfg, resume, a.overwrite)
        }
        Command::Eval(a) => run_eval(a),
        Command::Harden(a) => run_harden(a),
        Command::Ptq(a) => run_ptq(a),
        Command::Synth(a) => run_synth(a),
        Command::Stats(a) => run_stats(a),
        Command::Export(a) => run_export(a),
        Command::Plot(a) => {
            let out = a.out.unwrap_or_else(|| a.run.join("metrics.png"));
            let n = crate::plot::plot(&a.run, &out, a.overwrite)?;
            println!("plotted {n} records of {} into {}", a.run.display(), out.display());
            Ok(())
        }
        Command::Bench(a) => {
            if a.devices > 1 && !crate::dist::is_started_rank() {
                return crate::dist::launch(a.devices, DeviceChoice::Auto);
            }
            let r = crate::bench::run(&crate::bench::BenchArgs {
                shape: &a.shape,
                tokenizer: &a.tokenizer,
                micro_batch: a.micro_batch,
                seq: a.seq,
                global_batch: a.global_batch,
                method: &a.method,
                steps: a.steps,
                kernels: &a.kernels,
                checkpoint_layers: a.checkpoint_layers,
                devices: a.devices,
            })?;
            if let Some(r) = r {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        }
        Command::GpuCheck(c) => run_gpu_check(c),
    }
}

/// A checkpoint opened for eval/stats/harden, with the config that applies to it.
struct Opened {
    /// The path given with --ckpt (a run directory, or the checkpoint itself).
    given: std::path::PathBuf,
    ckpt: checkpoint::Checkpoint,
    config: Option<Config>,
    params: Params,
    model: Llama,
}

fn open(a: &CkptArgs) -> Result<Opened> {
    let choice = match a.device.as_str() {
        "cpu" => DeviceChoice::Cpu,
        "cuda" => DeviceChoice::Cuda,
        "auto" => DeviceChoice::Auto,
        other => bail!("--device {other:?}: use cpu, cuda or auto"),
    };
    open_on(a, &train::pick_device(choice, 0)?)
}

/// `open` on a device already opened: a second checkpoint compared with the first shares its stream.
fn open_on(a: &CkptArgs, device: &candle_core::Device) -> Result<Opened> {
    let ckpt = checkpoint::load(&a.ckpt)?;
    let config = match (&a.config, &ckpt.state) {
        (Some(path), _) => Some(Config::load(path, &[])?),
        (None, Some(s)) => Some(s.config.clone()),
        (None, None) => None,
    };
    let precision = config.as_ref().map(|c| c.train.precision).unwrap_or(Precision::Auto);
    let (master, compute) = train::dtypes(precision, device);
    let tensors: BTreeMap<String, Tensor> = ckpt
        .model
        .tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(device)?)))
        .collect::<Result<_>>()?;
    let params = Params::from_tensors(&ckpt.model.cfg, tensors, master)?;
    let model = Llama::new(ckpt.model.cfg.clone(), compute, device);
    Ok(Opened {
        given: a.ckpt.clone(),
        ckpt,
        config,
        params,
        model,
    })
}

impl Opened {
    fn quant_config(&self) -> Option<&QuantConfig> {
        self.config.as_ref().and_then(|c| c.quant.as_ref())
    }

    /// The quantizer, with the checkpoint's stored scales when it has them.
    fn quantizer(&self) -> Result<Option<Quantizer>> {
        self.quant_config()
            .map(|q| Quantizer::from_scales(q, &self.params, &self.ckpt.quant))
            .transpose()
    }

    /// The Alpaca encoder for this checkpoint's tokenizer and EOS.
    fn encoder(&self, max_seq_length: usize, mask_prompt: bool) -> Result<Encoder> {
        let model = &self.ckpt.model;
        Ok(Encoder {
            tokenizer: model.tokenizer.clone(),
            eos_id: *model
                .cfg
                .eos_token_ids
                .first()
                .context("the model config has no eos_token_id")?,
            max_seq_length,
            mask_prompt,
        })
    }

    fn require_quantizer(&self) -> Result<Quantizer> {
        self.quantizer()?.with_context(|| {
            format!(
                "{} carries no quant config: pass --config FILE with a [quant] section",
                self.ckpt.dir.display()
            )
        })
    }
}

fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("a JSON value always serializes")
    );
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let o = open(&a.ckpt)?;
    let quantizer = o.quantizer()?;
    let mut out = serde_json::json!({});
    let tok = &o.ckpt.model.tokenizer;
    let data_source = match (&a.data, &o.config) {
        (Some(path), _) => Some((
            data::alpaca::load_records(path)?,
            o.config.as_ref().map(|c| c.data.max_seq_length).unwrap_or(256),
            false,
        )),
        (None, Some(cfg)) if a.text.is_none() && a.prompt.is_empty() => {
            let (_, val) = cfg.split_records()?;
            Some((val, cfg.data.max_seq_length, cfg.data.mask_prompt))
        }
        _ => None,
    };
    if let Some((records, max_seq_length, mask_prompt)) = data_source {
        let encoder = o.encoder(max_seq_length, mask_prompt)?;
        let batches = data::val_batches(&records, &encoder, a.batch)?;
        let l = eval::losses(&o.model, &o.params, quantizer.as_ref(), &batches)?;
        out["val_loss"] = l.fp.into();
        out["val_ppl"] = l.fp.exp().into();
        out["val_records"] = records.len().into();
        if let (Some(q), Some(fsq)) = (l.q, l.fsq) {
            out["val_loss_fp"] = l.fp.into();
            out["val_loss_q"] = q.into();
            out["val_loss_fsq"] = fsq.into();
        }
    }
    let weights = o.params.compute_weights(o.model.dtype, |_, x| Ok(x.detach()))?;
    if let Some(path) = &a.text {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading text file {}", path.display()))?;
        let p = eval::text_perplexity(&o.model, &weights, tok, &text, a.seq_len)?;
        out.as_object_mut()
            .expect("object")
            .extend(serde_json::to_value(p)?.as_object().expect("object").clone());
    }
    if !a.prompt.is_empty() {
        let gens = a
            .prompt
            .iter()
            .map(|p| eval::generate(&o.model, &weights, tok, p, a.max_new_tokens))
            .collect::<Result<Vec<_>>>()?;
        out["generations"] = serde_json::to_value(gens)?;
    }
    if out.as_object().is_some_and(|o| o.is_empty()) {
        bail!("nothing to evaluate: the checkpoint carries no data config; pass --data, --text or --prompt");
    }
    if a.ckpt.json {
        print_json(&out);
    } else {
        for (k, v) in out.as_object().expect("object") {
            match v {
                serde_json::Value::Array(gens) => {
                    for g in gens {
                        println!(
                            "prompt: {}\ncompletion: {}",
                            g["prompt"].as_str().unwrap_or(""),
                            g["completion"].as_str().unwrap_or("")
                        );
                    }
                }
                _ => println!("{k:>14}  {v}"),
            }
        }
    }
    Ok(())
}

fn run_stats(a: StatsArgs) -> Result<()> {
    let o = open(&a.ckpt)?;
    let quantizer = o.require_quantizer()?;
    let atol = a.atol.unwrap_or(quantizer.cfg.atol);
    if atol < 0.0 {
        bail!("--atol {atol} must be ≥ 0");
    }
    let mut s = stats::compute(&o.params, &quantizer, atol)?;
    if let Some(path) = &a.against {
        let other = open_on(
            &CkptArgs {
                ckpt: path.clone(),
                ..a.ckpt.clone()
            },
            &o.model.device,
        )?;
        let other_quantizer = other.require_quantizer()?;
        stats::add_code_changes(&mut s, &o.params, &quantizer, &other.params, &other_quantizer)
            .with_context(|| format!("--against {}", path.display()))?;
    }
    if a.ckpt.json {
        print_json(&serde_json::to_value(&s)?);
        return Ok(());
    }
    let changed = |rate: Option<f64>| rate.map(|r| format!(" {r:>8.4}")).unwrap_or_default();
    println!(
        "{:<44} {:>14} {:>10} {:>8} {:>8} {:>10} {:>10}{}",
        "tensor",
        "shape",
        "numel",
        "hit",
        "sat",
        "mean|w-q|",
        "scale",
        if a.against.is_some() { "  changed" } else { "" }
    );
    for t in &s.tensors {
        println!(
            "{:<44} {:>14} {:>10} {:>8.4} {:>8.4} {:>10.3e} {:>10}{}",
            t.name,
            format!("{:?}", t.shape),
            t.numel,
            t.hit_rate,
            t.sat_rate,
            t.mean_abs_err,
            t.scale.map(|s| format!("{s:.3e}")).unwrap_or_else(|| "levels".into()),
            changed(t.code_change_rate)
        );
    }
    println!(
        "total: {} weights in {} tensors, hit_rate {:.4}, sat_rate {:.4} (atol {atol}){}",
        s.total.numel,
        s.tensors.len(),
        s.total.hit_rate,
        s.total.sat_rate,
        s.total
            .code_change_rate
            .map(|r| format!(", codes changed against --against: {r:.4}"))
            .unwrap_or_default()
    );
    Ok(())
}

fn run_harden(a: HardenArgs) -> Result<()> {
    let o = open(&a.ckpt)?;
    let quantizer = o.require_quantizer()?;
    let atol = a.atol.unwrap_or(quantizer.cfg.atol);
    if atol < 0.0 {
        bail!("--atol {atol} must be ≥ 0");
    }
    let (view, mode) = if a.all {
        (View::Hard, "all")
    } else {
        (View::Selective(atol), "selective")
    };
    write_hardened(&o, &quantizer, view, mode, &a.out, a.overwrite, a.ckpt.json)
}

/// Round-to-nearest PTQ: scales computed from the checkpoint's current weights, every selected weight
/// snapped. The baseline every QAT result is measured against.
fn run_ptq(a: PtqArgs) -> Result<()> {
    let o = open(&a.ckpt)?;
    let cfg = o.quant_config().with_context(|| {
        format!(
            "{} carries no quant config: pass --config FILE with a [quant] section (the grid to round to)",
            o.ckpt.dir.display()
        )
    })?;
    let quantizer = Quantizer::new(cfg, &o.params)?;
    write_hardened(&o, &quantizer, View::Hard, "rtn", &a.out, a.overwrite, a.ckpt.json)
}

/// The teacher's own responses to the training instructions, as an Alpaca JSON file.
fn run_synth(a: SynthArgs) -> Result<()> {
    if a.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature {} must be ≥ 0 (0: greedy)", a.temperature);
    }
    if a.out.exists() && !a.overwrite {
        bail!(
            "{} already exists; choose another --out or pass --overwrite",
            a.out.display()
        );
    }
    let o = open(&a.ckpt)?;
    let (records, max_seq_length) = match (&a.data, &o.config) {
        (Some(path), cfg) => (
            data::alpaca::load_records(path)?,
            cfg.as_ref().map(|c| c.data.max_seq_length).unwrap_or(256),
        ),
        (None, Some(cfg)) => {
            let (train, _) = cfg.split_records()?;
            (train, cfg.data.max_seq_length)
        }
        (None, None) => bail!(
            "{} carries no data config: pass --data FILE (the records to answer) or --config FILE",
            o.ckpt.dir.display()
        ),
    };
    let encoder = o.encoder(max_seq_length, false)?;
    let weights = o.params.compute_weights(o.model.dtype, |_, x| Ok(x.detach()))?;
    let options = synth::SynthOptions {
        samples: a.samples,
        temperature: a.temperature,
        batch: a.batch,
        max_new_tokens: a.max_new_tokens,
        seed: a.seed,
    };
    let (synthetic, report) = synth::synthesize(&o.model, &weights, &encoder, &records, &options)?;
    crate::fsutil::write_atomic(
        &a.out,
        serde_json::to_string_pretty(&synth::to_json(&synthetic))?.as_bytes(),
    )?;
    tracing::info!(responses = report.responses, ended = report.ended, tokens = report.tokens,
        tokens_per_s = report.tokens_per_s, out = %a.out.display(), "synthesized");
    if a.ckpt.json {
        print_json(&serde_json::to_value(&report)?);
    } else {
        println!(
            "{} responses to {} records ({} ended at EOS), {} tokens in {:.1} s, written to {}",
            report.responses,
            report.records,
            report.ended,
            report.tokens,
            report.seconds,
            a.out.display()
        );
    }
    Ok(())
}

/// Snap `o`'s selected weights per `view` and write the result as a new checkpoint at `out`.
fn write_hardened(
    o: &Opened,
    quantizer: &Quantizer,
    view: View,
    mode: &str,
    out: &std::path::Path,
    overwrite: bool,
    json: bool,
) -> Result<()> {
    let same = |p: &std::path::Path| {
        p.canonicalize()
            .ok()
            .is_some_and(|p| Some(p) == out.canonicalize().ok())
    };
    if same(&o.ckpt.dir) || same(&o.given) {
        bail!(
            "--out {} is the input checkpoint; write the result to a new directory",
            out.display()
        );
    }
    let hardened = harden::harden(&o.params, quantizer, view)?;
    let model = LoadedModel {
        cfg: o.ckpt.model.cfg.clone(),
        tensors: o.params.to_tensors(),
        tokenizer: o.ckpt.model.tokenizer.clone(),
    };
    let state = checkpoint::TrainerState {
        step: o.ckpt.state.as_ref().map(|s| s.step).unwrap_or(0),
        cursor: Default::default(),
        adam_t: 0,
        dual: None,
        gamma: None,
        bad_steps: 0,
        config: o.config.clone().context("hardening needs a config")?,
    };
    let parts = checkpoint::SaveParts {
        state: &state,
        optimizer: BTreeMap::new(),
        quant: quantizer.scale_tensors(),
    };
    checkpoint::write(out, overwrite, &model, parts)?;
    let total: usize = hardened.moved.values().sum();
    let numel: usize = quantizer.grids.keys().map(|n| o.params.vars[n].elem_count()).sum();
    if json {
        print_json(&serde_json::json!({
            "out": out, "mode": mode, "atol": match view { View::Selective(atol) => Some(atol), _ => None },
            "moved": total, "numel": numel,
            "tensors": hardened.moved.iter().map(|(n, m)| serde_json::json!({"name": n, "moved": m, "numel": o.params.vars[n].elem_count()})).collect::<Vec<_>>(),
        }));
    } else {
        for (n, m) in &hardened.moved {
            println!("{n:<44} moved {m:>10} of {:>10}", o.params.vars[n].elem_count());
        }
        println!(
            "hardened {} ({mode}): moved {total} of {numel} selected weights; wrote {}",
            o.ckpt.dir.display(),
            out.display()
        );
    }
    Ok(())
}

fn run_export(a: ExportArgs) -> Result<()> {
    let o = open(&a.ckpt)?;
    let quantizer = o.quantizer()?;
    let model = LoadedModel {
        cfg: o.ckpt.model.cfg.clone(),
        tensors: o.params.to_tensors(),
        tokenizer: o.ckpt.model.tokenizer.clone(),
    };
    let report = crate::export::export(
        &model,
        quantizer.as_ref(),
        &crate::export::Options {
            format: a.format,
            out: &a.out,
            float: a.float,
            overwrite: a.overwrite,
        },
    )?;
    if a.ckpt.json {
        print_json(&serde_json::to_value(&report)?);
        return Ok(());
    }
    for t in &report.tensors {
        let exact = if t.exact { "exact" } else { "rounded" };
        let note = t.note.as_deref().map(|n| format!("  ({n})")).unwrap_or_default();
        println!("{:<44} {:<22} {exact}{note}", t.name, t.storage);
    }
    let inexact = report.tensors.iter().filter(|t| !t.exact).count();
    let off_grid = report.tensors.iter().filter(|t| t.note.is_some()).count();
    println!(
        "wrote {} ({:.1} MB, {:?}): {} tensors, {inexact} not bit-exact, {off_grid} selected tensors not stored on their grid",
        report.out.display(),
        report.bytes as f64 / 1e6,
        report.format,
        report.tensors.len()
    );
    Ok(())
}

fn run_gpu_check(c: GpuCheck) -> Result<()> {
    match c {
        GpuCheck::Parity => {
            let cuda = train::pick_device(DeviceChoice::Cuda, 0)?;
            if !crate::gpu_check::parity(&cuda)? {
                bail!("CUDA vs CPU parity failed (see the table)");
            }
            Ok(())
        }
        GpuCheck::WriteRandom { shape, tokenizer, out } => crate::gpu_check::write_random(&shape, &tokenizer, &out, 1),
        GpuCheck::DumpGrads {
            ckpt,
            dtype,
            device,
            out,
        } => {
            let choice = if device == "cpu" {
                DeviceChoice::Cpu
            } else {
                DeviceChoice::Cuda
            };
            let dev = train::pick_device(choice, 0)?;
            let compute = match dtype.as_str() {
                "f32" => candle_core::DType::F32,
                "bf16" => candle_core::DType::BF16,
                other => bail!("--dtype {other:?}: f32 or bf16"),
            };
            crate::gpu_check::dump_grads(&ckpt, &dev, compute, &out)
        }
    }
}
