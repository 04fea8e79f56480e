//! The two controllers of spec §6: λ (dual ascent, optionally PI) and γ (the pull gain, driven by the
//! hit rate). Scalar host arithmetic: they run once per optimizer step on one number.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DualConfig {
    /// Loss budget β: λ grows while the loss is above it.
    pub beta: f64,
    pub lr: f64,
    pub lambda_init: f64,
    pub lambda_max: Option<f64>,
    /// PI control (`kp·e + ki·I`) instead of plain projected ascent (`e`).
    pub pi: bool,
    pub kp: f64,
    pub ki: f64,
    pub i_clamp: f64,
}

impl Default for DualConfig {
    fn default() -> Self {
        DualConfig {
            beta: 2.9,
            lr: 1e-3,
            lambda_init: 1.0,
            lambda_max: Some(30.0),
            pi: true,
            kp: 1.0,
            ki: 0.2,
            i_clamp: 10.0,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DualState {
    pub lambda: f64,
    pub integral: f64,
}

impl DualConfig {
    pub fn init(&self) -> DualState {
        DualState {
            lambda: self.lambda_init,
            integral: 0.0,
        }
    }

    /// One update from the step's loss estimate f̂ (spec §6.2 with `pi`, §6.3 without).
    pub fn update(&self, s: &mut DualState, loss: f64) {
        let e = loss - self.beta;
        if self.pi {
            s.integral = (s.integral + e).clamp(-self.i_clamp, self.i_clamp);
            s.lambda += self.lr * (self.kp * e + self.ki * s.integral);
        } else {
            s.lambda += self.lr * e;
        }
        s.lambda = s.lambda.max(0.0);
        if let Some(max) = self.lambda_max {
            s.lambda = s.lambda.min(max);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GammaConfig {
    pub enable: bool,
    /// Target hit rate.
    pub target: f64,
    pub init: f64,
    pub lr: f64,
    pub max: f64,
    /// γ is 0 before this step (from step 0 on: the seed's gamma_init quirk is fixed, spec §12.11).
    pub start: usize,
    /// Update every N optimizer steps (with the hit rate measured then).
    pub every: usize,
    /// EMA factor of the hit rate.
    pub ema: f64,
}

impl Default for GammaConfig {
    fn default() -> Self {
        GammaConfig {
            enable: false,
            target: 0.95,
            init: 0.0,
            lr: 0.5,
            max: 5.0,
            start: 0,
            every: 10,
            ema: 0.9,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GammaState {
    pub gamma: f64,
    pub hit_ema: Option<f64>,
}

impl GammaConfig {
    pub fn init(&self) -> GammaState {
        GammaState {
            gamma: if self.start > 0 { 0.0 } else { self.init },
            hit_ema: None,
        }
    }

    /// The gain in force at `step` (held between updates; 0 before `start`).
    pub fn gain(&self, s: &GammaState, step: usize) -> f64 {
        if !self.enable {
            1.0
        } else if step < self.start {
            0.0
        } else {
            s.gamma
        }
    }

    /// Spec §6.1, called with the hit rate measured at `step`.
    pub fn update(&self, s: &mut GammaState, hit_rate: f64, step: usize) {
        if step < self.start {
            s.gamma = 0.0;
            return;
        }
        let h = match s.hit_ema {
            None => hit_rate,
            Some(prev) => self.ema * prev + (1.0 - self.ema) * hit_rate,
        };
        s.hit_ema = Some(h);
        s.gamma = (s.gamma + self.lr * (self.target - h)).clamp(0.0, self.max);
    }
}
