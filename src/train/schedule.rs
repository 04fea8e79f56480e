//! Learning-rate schedule: linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`.

pub fn lr_at(step: usize, lr: f64, min_lr: f64, warmup: usize, max_steps: usize) -> f64 {
    if step < warmup {
        // (step + 1)/warmup: the first step already moves (the seed's LambdaLR starts at 0, §12.17).
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = max_steps.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}
