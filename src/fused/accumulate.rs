//! A training step's gradient accumulators start unwritten (allocated, not zero-filled): the first
//! write into each overwrites it — on CUDA the weight-gradient GEMM with β = 0 — or zero-fills it
//! before adding. At Llama-3.2-1B shape that saves writing 4.9 GB of zeros per step and reading them
//! back in the first micro-batch's weight-gradient GEMMs.
//!
//! Every writer into an accumulator (`linear::add_product_into`, `weight::add_into`, the embedding's
//! row adds) asks [`before_write`] first; [`finish`] zero-fills what no backward wrote.

use candle_core::{DType, Device, Result, Shape, Tensor, TensorId};
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    // The backward runs on the thread that called it (as in `dist::overlap`): one registry per rank.
    // Each unwritten accumulator, or view of one, → the whole tensor it lives in.
    static UNWRITTEN: RefCell<HashMap<TensorId, Tensor>> = RefCell::new(HashMap::new());
}

/// Forget a previous step's registry (one that ended in an error before [`finish`]).
pub fn clear() {
    UNWRITTEN.with(|u| u.borrow_mut().clear());
}

/// A new accumulator, unwritten until its first writer overwrites or zero-fills it.
pub fn unwritten(shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
    let whole = if device.is_cpu() {
        // The CPU is for tests, not speed: NaN makes a read before the first write show everywhere.
        Tensor::full(f32::NAN, shape, device)?.to_dtype(dtype)?
    } else {
        // SAFETY: registered below: no writer reads it before `before_write` has zero-filled it or
        // let the writer overwrite it whole, and `finish` zero-fills it if nothing wrote it.
        unsafe { Tensor::empty(shape, dtype, device)? }
    };
    register_view(&whole, &whole);
    Ok(whole)
}

/// `view` lives in the unwritten `whole`: writing it first zero-fills `whole`.
pub fn register_view(view: &Tensor, whole: &Tensor) {
    UNWRITTEN.with(|u| u.borrow_mut().insert(view.id(), whole.clone()));
}

/// Called by a writer about to add into `acc`: true when `acc` is an unwritten whole accumulator and
/// the writer `can_overwrite` it (it then writes every element instead of adding); otherwise `acc`'s
/// storage is zero-filled first if it was unwritten, and the writer adds.
pub fn before_write(acc: &Tensor, can_overwrite: bool) -> Result<bool> {
    // The first write into any view of `whole` ends the unwritten state of all of them.
    let whole = UNWRITTEN.with(|u| {
        let mut u = u.borrow_mut();
        let whole = u.get(&acc.id()).cloned()?;
        u.retain(|_, w| w.id() != whole.id());
        Some(whole)
    });
    let Some(whole) = whole else {
        return Ok(false);
    };
    if can_overwrite && whole.id() == acc.id() {
        return Ok(true);
    }
    whole.zero_set()?;
    Ok(false)
}

/// The step's backward passes are done: zero-fill the accumulators none of them wrote (a parameter no
/// loss reached) and empty the registry.
pub fn finish() -> Result<()> {
    let left: HashMap<TensorId, Tensor> =
        UNWRITTEN.with(|u| u.borrow_mut().drain().map(|(_, whole)| (whole.id(), whole)).collect());
    left.values().try_for_each(|whole| whole.zero_set())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_writer_overwrites_or_zero_fills_the_whole_storage() -> Result<()> {
        clear();
        let cpu = Device::Cpu;
        let whole = unwritten((4, 2), DType::F32, &cpu)?;
        let view = whole.narrow(0, 1, 2)?;
        register_view(&view, &whole);
        // A view written first zero-fills the whole tensor, and only once.
        assert!(!before_write(&view, true)?);
        assert_eq!(whole.sum_all()?.to_scalar::<f32>()?, 0.0);
        whole.const_set(1f32.into())?;
        assert!(!before_write(&whole, true)?);
        assert_eq!(whole.sum_all()?.to_scalar::<f32>()?, 8.0);

        // The whole tensor itself: its writer may overwrite it; one that cannot gets zeros.
        let other = unwritten(3, DType::F32, &cpu)?;
        assert!(other.to_vec1::<f32>()?.iter().all(|x| x.is_nan()));
        assert!(before_write(&other, true)?);
        assert!(!before_write(&other, true)?);
        let adds = unwritten(3, DType::F64, &cpu)?;
        assert!(!before_write(&adds, false)?);
        assert_eq!(adds.to_vec1::<f64>()?, [0.0; 3]);

        // What no writer reached is zero-filled by `finish`, which empties the registry.
        let untouched = unwritten(5, DType::F32, &cpu)?;
        let untouched_view = untouched.narrow(0, 0, 2)?;
        register_view(&untouched_view, &untouched);
        finish()?;
        assert_eq!(untouched.to_vec1::<f32>()?, [0.0; 5]);
        untouched.const_set(2f32.into())?;
        assert!(!before_write(&untouched_view, true)?);
        assert_eq!(untouched.to_vec1::<f32>()?, [2.0; 5]);
        Ok(())
    }
}
