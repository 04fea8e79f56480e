//! Gradient sums started during the last backward of a step, as PyTorch DDP overlaps its bucketed
//! all-reduce with backward: a projection's weight gradient is complete once its fused backward has
//! added the last micro-batch's share into the accumulator (`fused::linear`), while the layers below
//! are still to be differentiated. Ready accumulators are summed in buckets of at least
//! [`BUCKET_BYTES`]; what is never reported ready (norm gains, the embedding table and a tied head,
//! which two ops write) joins the step's final sum, and `Collective::finish` waits for all of them.
//!
//! Every rank runs the same graph, so the ready order, and with it the bucket sequence each rank hands
//! to the collective, is the same on every rank.

use anyhow::Result;
use candle_core::{Tensor, TensorId};
use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;

use super::Collective;

/// Bucket size of training steps: a bucket is started once its ready gradients reach this many bytes
/// (DDP's default is 25 MB).
pub const BUCKET_BYTES: usize = 32 << 20;

struct Buckets {
    collective: Rc<dyn Collective>,
    /// Accumulators one fused backward writes last; removed as they become ready.
    pending: HashSet<TensorId>,
    ready: Vec<Tensor>,
    ready_bytes: usize,
    bucket_bytes: usize,
    started: HashSet<TensorId>,
}

impl Buckets {
    fn flush(&mut self) -> Result<()> {
        if self.ready.is_empty() {
            return Ok(());
        }
        let tensors: Vec<&Tensor> = self.ready.iter().collect();
        self.collective.start_sum(&tensors)?;
        self.started.extend(self.ready.drain(..).map(|t| t.id()));
        self.ready_bytes = 0;
        Ok(())
    }
}

thread_local! {
    // The backward runs on the thread that called it: one tracker per rank, also for in-process ranks.
    static ACTIVE: RefCell<Option<Buckets>> = const { RefCell::new(None) };
}

/// Tracks the backward that follows until [`Tracker::end`] (or drop, on an error path).
pub struct Tracker(());

/// Start tracking: each of `accumulators` is summed over ranks, in buckets of `bucket_bytes`, as soon
/// as it is reported complete.
pub fn begin(collective: Rc<dyn Collective>, accumulators: &[Tensor], bucket_bytes: usize) -> Tracker {
    let buckets = Buckets {
        collective,
        pending: accumulators.iter().map(|t| t.id()).collect(),
        ready: Vec::new(),
        ready_bytes: 0,
        bucket_bytes,
        started: HashSet::new(),
    };
    ACTIVE.with(|a| *a.borrow_mut() = Some(buckets));
    Tracker(())
}

impl Tracker {
    /// Stop tracking, start the last partial bucket, and return the ids of every tensor started.
    pub fn end(self) -> Result<HashSet<TensorId>> {
        let Some(mut buckets) = ACTIVE.with(|a| a.borrow_mut().take()) else {
            return Ok(HashSet::new());
        };
        buckets.flush()?;
        Ok(buckets.started)
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.borrow_mut().take());
    }
}

/// A fused backward's last write to `accumulator` is queued: sum it over ranks with the next bucket
/// (a no-op outside a tracked backward and for accumulators not tracked).
pub fn accumulated(accumulator: &Tensor) -> candle_core::Result<()> {
    ACTIVE.with(|a| {
        let mut active = a.borrow_mut();
        let Some(buckets) = active.as_mut() else {
            return Ok(());
        };
        if !buckets.pending.remove(&accumulator.id()) {
            return Ok(());
        }
        buckets.ready.push(accumulator.clone());
        buckets.ready_bytes += accumulator.elem_count() * accumulator.dtype().size_in_bytes();
        if buckets.ready_bytes >= buckets.bucket_bytes {
            buckets.flush().map_err(candle_core::Error::wrap)?;
        }
        Ok(())
    })
}
