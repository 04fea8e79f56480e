//! Progress bar and `metrics.jsonl` (one JSON object per logged step, per eval; appended on resume).

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::Path;

use crate::eval::Losses;
use crate::train::step::StepReport;

pub struct Metrics {
    /// None: a data-parallel rank other than 0, which reports nothing.
    file: Option<std::fs::File>,
    bar: ProgressBar,
}

impl Metrics {
    pub fn open(path: &Path, total_steps: usize, start: usize) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let bar = ProgressBar::new(total_steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} step {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .expect("the template is valid"),
        );
        bar.set_position(start as u64);
        Ok(Metrics { file: Some(file), bar })
    }

    /// Metrics that write and print nothing.
    pub fn silent() -> Self {
        Metrics {
            file: None,
            bar: ProgressBar::hidden(),
        }
    }

    fn write(&mut self, v: &serde_json::Value) -> Result<()> {
        let Some(file) = &mut self.file else { return Ok(()) };
        writeln!(file, "{v}").context("writing metrics.jsonl")?;
        file.flush().context("writing metrics.jsonl")
    }

    pub fn step(&mut self, r: &StepReport, extra: serde_json::Value, tokens_per_s: f64) -> Result<()> {
        if self.file.is_none() {
            return Ok(());
        }
        let mut v = serde_json::to_value(r)?;
        v["kind"] = "train".into();
        v["tokens_per_s"] = tokens_per_s.into();
        if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
            obj.extend(more.clone());
        }
        self.write(&v)?;
        self.bar.set_position(r.step as u64);
        let mut msg = format!("loss {:.4} lr {:.2e} {:.0} tok/s", r.loss, r.lr, tokens_per_s);
        if let Some(kl) = r.distill_kl {
            msg += &format!(" kl {kl:.4}");
        }
        if let Some(l) = r.lambda {
            msg += &format!(" λ {l:.3}");
        }
        if let Some(h) = r.hit_rate {
            msg += &format!(" hit {h:.3}");
        }
        self.bar.set_message(msg.clone());
        self.bar.suspend(|| tracing::info!(step = r.step, "{msg}"));
        Ok(())
    }

    pub fn eval(&mut self, step: usize, kind: &str, l: &Losses) -> Result<()> {
        let v = serde_json::json!({"kind": "eval", "eval": kind, "step": step, "val_loss_fp": l.fp, "val_loss_q": l.q, "val_loss_fsq": l.fsq});
        self.write(&v)?;
        let mut msg = format!("eval ({kind}) at step {step}: val_loss_fp {:.4}", l.fp);
        if let (Some(q), Some(fsq)) = (l.q, l.fsq) {
            msg += &format!(" val_loss_q {q:.4} val_loss_fsq {fsq:.4}");
        }
        self.bar.suspend(|| tracing::info!("{msg}"));
        Ok(())
    }

    pub fn note(&self, msg: &str) {
        self.bar.suspend(|| tracing::info!("{msg}"));
    }

    pub fn finish(&self, msg: &str) {
        self.bar.finish_and_clear();
        tracing::info!("{msg}");
    }
}
