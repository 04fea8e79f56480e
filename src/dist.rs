//! Data parallelism over the GPUs of one host: ranks, and the sums over ranks that keep them in step.
//!
//! One process per GPU, started by `proxqat train --devices N` itself (as torchrun starts DDP ranks):
//! each process owns one device, its CUDA context and its one stream. Threads in one process would share
//! the CUDA driver's per-process state (cudarc documents the lock contention of multi-threaded multi-GPU
//! use), and a rank that crashes would take the others down without saying which one failed.
//!
//! Rank r runs micro-batches r, r + N, r + 2N, … of the step's global stream (the one a single GPU
//! runs), so N GPUs × A micro-batches see exactly the rows that 1 GPU × N·A sees. After a step's last
//! micro-batch the f32 gradient sums and the loss are summed over ranks (NCCL all-reduce in f32, in
//! place): every rank then holds the same bits and applies the same update, so weights, Adam moments, λ,
//! γ, the PI integral and the sensitivity EMAs stay identical without ever being sent. The projections'
//! gradients are summed in buckets while the last micro-batch's backward still runs (`overlap`), on a
//! stream of their own; the rest in one group after it.

pub mod overlap;

use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Barrier, Mutex};

use crate::config::{DeviceChoice, TrainSection};

/// Environment of a process started by [`launch`]: its rank, the number of ranks, the NCCL id (hex).
const RANK_ENV: &str = "PROXQAT_RANK";
const WORLD_ENV: &str = "PROXQAT_WORLD";
const NCCL_ID_ENV: &str = "PROXQAT_NCCL_ID";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// The collective operations a rank needs.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replace each tensor (f32, contiguous, storage owned by the caller alone) by its reduction over
    /// ranks, with the same bits on every rank; later work on the device sees the result.
    fn all_reduce_in_place(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<()> {
        self.reduce_now(tensors, op)?;
        self.finish()
    }
    /// Start summing `tensors` over ranks behind the device work queued so far; the device may go on
    /// with other work meanwhile, which must not touch them until [`Collective::finish`].
    fn start_sum(&self, tensors: &[&Tensor]) -> Result<()> {
        self.reduce_now(tensors, ReduceOp::Sum)
    }
    /// Order the device's later work after every started sum.
    fn finish(&self) -> Result<()> {
        Ok(())
    }
    /// The reduction, done before returning (host collectives) or queued on the device.
    fn reduce_now(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<()>;
}

/// Where one rank runs and how it reaches the others.
pub struct Rank {
    pub device: Device,
    pub collective: Rc<dyn Collective>,
}

impl Rank {
    /// The only rank of a one-device run.
    pub fn single(device: Device) -> Rank {
        Rank {
            device,
            collective: Rc::new(Alone),
        }
    }

    pub fn index(&self) -> usize {
        self.collective.rank()
    }

    pub fn world(&self) -> usize {
        self.collective.world()
    }

    /// Rank 0 logs, evaluates and writes checkpoints.
    pub fn is_lead(&self) -> bool {
        self.index() == 0
    }

    /// This process's rank for a run with `train.devices` devices: the only one, or the one [`launch`]
    /// started it as (device = CUDA ordinal = rank, NCCL communicator joined).
    pub fn open(train: &TrainSection) -> Result<Rank> {
        let Some((rank, world)) = started_as()? else {
            if train.devices > 1 {
                bail!(
                    "train.devices = {}: the ranks are processes started by `proxqat train` (or `bench`) itself; \
                     run through the CLI (library users build each `Rank` from a device and a `Collective`)",
                    train.devices
                );
            }
            return Ok(Rank::single(crate::train::pick_device(train.device, 0)?));
        };
        if world != train.devices {
            bail!(
                "this process was started as rank {rank} of {world}, but the config has train.devices = {}",
                train.devices
            );
        }
        let device = crate::train::pick_device(DeviceChoice::Cuda, rank)?;
        let id = std::env::var(NCCL_ID_ENV).with_context(|| format!("{NCCL_ID_ENV} is not set"))?;
        let collective = nccl::join(&device, rank, world, &id)?;
        Ok(Rank { device, collective })
    }

    /// Stop the run if the ranks' weights differ anywhere: a 64-bit fingerprint of every bit of every
    /// tensor, compared as max = min over ranks. Returns the fingerprint.
    pub fn check_identical(&self, tensors: &BTreeMap<String, Tensor>) -> Result<u64> {
        let print = fingerprint(tensors)?;
        // 16-bit pieces: exact in f32, which is what the collectives reduce.
        let pieces: Vec<f32> = (0..4).map(|i| ((print >> (16 * i)) & 0xffff) as f32).collect();
        let max = Tensor::new(pieces.as_slice(), &self.device)?;
        let min = max.copy()?;
        self.collective.all_reduce_in_place(&[&max], ReduceOp::Max)?;
        self.collective.all_reduce_in_place(&[&min], ReduceOp::Min)?;
        if max.to_vec1::<f32>()? != min.to_vec1::<f32>()? {
            bail!(
                "rank {} of {}: the ranks' weights differ (this rank's fingerprint {print:016x}); \
                 the data-parallel state has diverged, so this run cannot continue",
                self.index(),
                self.world()
            );
        }
        Ok(print)
    }
}

/// A 64-bit fingerprint (FNV-1a) of the names and bit patterns of `tensors` (f64 values as f64, the
/// rest as f32, which f32, bf16 and f16 convert to exactly).
pub fn fingerprint(tensors: &BTreeMap<String, Tensor>) -> Result<u64> {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |word: u64| h = (h ^ word).wrapping_mul(PRIME);
    for (name, t) in tensors {
        name.bytes().for_each(|b| mix(b as u64));
        let t = t.flatten_all()?;
        if t.dtype() == DType::F64 {
            t.to_vec1::<f64>()?.iter().for_each(|x| mix(x.to_bits()));
        } else {
            t.to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .for_each(|x| mix(x.to_bits() as u64));
        }
    }
    Ok(h)
}

/// (rank, world) when this process was started by [`launch`].
fn started_as() -> Result<Option<(usize, usize)>> {
    let (Ok(rank), Ok(world)) = (std::env::var(RANK_ENV), std::env::var(WORLD_ENV)) else {
        return Ok(None);
    };
    let parse = |name: &str, v: &str| {
        v.parse::<usize>()
            .with_context(|| format!("{name}={v:?} is not a number"))
    };
    let (rank, world) = (parse(RANK_ENV, &rank)?, parse(WORLD_ENV, &world)?);
    if rank >= world {
        bail!("{RANK_ENV}={rank} must be below {WORLD_ENV}={world}");
    }
    Ok(Some((rank, world)))
}

/// Whether this process is a rank started by [`launch`] (the launcher's own checks are done).
pub fn is_started_rank() -> bool {
    std::env::var_os(RANK_ENV).is_some()
}

/// Run this very command line as `world` processes, one per GPU (rank r on CUDA device r), and wait for
/// all of them. Rank 0 prints progress and writes the run's files; the first rank to fail stops the
/// others and fails the command.
pub fn launch(world: usize, device: DeviceChoice) -> Result<()> {
    if device == DeviceChoice::Cpu {
        bail!("train.devices = {world} trains on {world} CUDA GPUs, but train.device = \"cpu\": set train.devices = 1 or train.device = \"cuda\"");
    }
    let id = nccl::new_id()?;
    let exe = std::env::current_exe().context("locating the proxqat binary to start the ranks")?;
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let mut ranks = Vec::with_capacity(world);
    for r in 0..world {
        let child = std::process::Command::new(&exe)
            .args(&args)
            .env(RANK_ENV, r.to_string())
            .env(WORLD_ENV, world.to_string())
            .env(NCCL_ID_ENV, &id)
            .stdin(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting rank {r} ({})", exe.display()))?;
        ranks.push(Some(child));
    }
    tracing::info!(world, "started one process per GPU");
    loop {
        for r in 0..world {
            let Some(child) = ranks[r].as_mut() else { continue };
            let Some(status) = child.try_wait()? else { continue };
            ranks[r] = None;
            if !status.success() {
                for other in ranks.iter_mut().flatten() {
                    let _ = other.kill();
                    let _ = other.wait();
                }
                bail!(
                    "rank {r} of {world} failed ({status}); the other ranks were stopped. Its error is printed above"
                );
            }
        }
        if ranks.iter().all(Option::is_none) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The one rank of a one-device run: nothing to exchange.
struct Alone;

impl Collective for Alone {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn reduce_now(&self, _: &[&Tensor], _: ReduceOp) -> Result<()> {
        Ok(())
    }
}

/// Ranks that are threads of one process, exchanging host copies (CPU tensors only): the collective
/// of the CPU tests, which run the training code of several ranks without GPUs.
pub struct InProcess {
    rank: usize,
    world: usize,
    shared: Arc<Exchange>,
}

struct Exchange {
    slots: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

impl InProcess {
    /// `world` connected ranks; hand one to each thread.
    pub fn group(world: usize) -> Vec<InProcess> {
        let shared = Arc::new(Exchange {
            slots: Mutex::new(vec![vec![]; world]),
            barrier: Barrier::new(world),
        });
        (0..world)
            .map(|rank| InProcess {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn reduce_now(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<()> {
        for t in tensors {
            t.inplace_op1(&Exchanged { ranks: self, op })?;
        }
        Ok(())
    }
}

struct Exchanged<'a> {
    ranks: &'a InProcess,
    op: ReduceOp,
}

impl InplaceOp1 for Exchanged<'_> {
    fn name(&self) -> &'static str {
        "in-process-all-reduce"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("all-reduce: tensor must be contiguous".into()))?;
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!(
                "all-reduce: f32 tensors only, got {:?}",
                candle_core::backend::BackendStorage::dtype(storage)
            );
        };
        let shared = &self.ranks.shared;
        let poisoned = |_| candle_core::Error::Msg("all-reduce: another rank panicked".into());
        shared.slots.lock().map_err(poisoned)?[self.ranks.rank] = values[start..end].to_vec();
        shared.barrier.wait();
        {
            // Every rank reduces in rank order: the same bits everywhere.
            let slots = shared.slots.lock().map_err(poisoned)?;
            if slots.iter().any(|s| s.len() != end - start) {
                candle_core::bail!("all-reduce: the ranks passed tensors of different sizes");
            }
            for (i, v) in values[start..end].iter_mut().enumerate() {
                let mut acc = slots[0][i];
                for s in &slots[1..] {
                    acc = match self.op {
                        ReduceOp::Sum => acc + s[i],
                        ReduceOp::Max => acc.max(s[i]),
                        ReduceOp::Min => acc.min(s[i]),
                    };
                }
                *v = acc;
            }
        }
        // Nobody deposits the next tensor before every rank has read this one.
        shared.barrier.wait();
        Ok(())
    }
}

#[cfg(feature = "nccl")]
mod nccl {
    //! NCCL through cudarc (candle-core's `nccl` feature), on the device's one stream.
    use super::{Collective, ReduceOp};
    use anyhow::{Context, Result};
    use candle_core::cuda_backend::cudarc::driver::CudaStream;
    use candle_core::cuda_backend::cudarc::nccl::safe::{group_end, group_start, Comm, Id, ReduceOp as Op};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{Device, InplaceOp1, Layout, Tensor};
    use std::rc::Rc;
    use std::sync::Arc;

    /// The communicator runs on a stream of its own, so sums started during backward overlap with it.
    pub struct Nccl {
        comm: Comm,
        compute: Arc<CudaStream>,
    }

    /// A fresh NCCL id, hex-encoded for the ranks' environment.
    pub fn new_id() -> Result<String> {
        let id =
            Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?} (is libnccl.so.2 on LD_LIBRARY_PATH?)"))?;
        Ok(id.internal().iter().map(|&b| format!("{:02x}", b as u8)).collect())
    }

    /// Join the communicator of `world` ranks (blocks until all have joined).
    pub fn join(device: &Device, rank: usize, world: usize, id_hex: &str) -> Result<Rc<dyn Collective>> {
        let mut internal = [0 as std::ffi::c_char; 128];
        if id_hex.len() != 256 {
            anyhow::bail!("PROXQAT_NCCL_ID must be 256 hex digits, got {}", id_hex.len());
        }
        for (i, byte) in internal.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&id_hex[2 * i..2 * i + 2], 16).context("PROXQAT_NCCL_ID is not hex")? as _;
        }
        let compute = device.as_cuda_device()?.cuda_stream();
        // ncclCommInitRank uses the thread's current device.
        compute.context().bind_to_thread().map_err(candle_core::Error::wrap)?;
        let stream = compute.fork().map_err(candle_core::Error::wrap)?;
        let comm = Comm::from_rank(stream, rank, world, Id::uninit(internal))
            .map_err(|e| anyhow::anyhow!("rank {rank} of {world}: ncclCommInitRank: {e:?}"))?;
        Ok(Rc::new(Nccl { comm, compute }))
    }

    impl Collective for Nccl {
        fn rank(&self) -> usize {
            self.comm.rank()
        }
        fn world(&self) -> usize {
            self.comm.world_size()
        }
        fn finish(&self) -> Result<()> {
            // The compute stream waits for every reduction queued on the communicator's stream.
            self.compute
                .join(&self.comm.stream())
                .map_err(candle_core::Error::wrap)?;
            Ok(())
        }
        fn reduce_now(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<()> {
            // Behind the work that produced the tensors; one group: NCCL launches the reductions
            // together instead of one by one.
            self.comm
                .stream()
                .join(&self.compute)
                .map_err(candle_core::Error::wrap)?;
            group_start().map_err(|e| anyhow::anyhow!("ncclGroupStart: {e:?}"))?;
            let issued = tensors
                .iter()
                .try_for_each(|t| t.inplace_op1(&AllReduce { comm: &self.comm, op }));
            group_end().map_err(|e| anyhow::anyhow!("ncclGroupEnd: {e:?}"))?;
            Ok(issued?)
        }
    }

    struct AllReduce<'a> {
        comm: &'a Comm,
        op: ReduceOp,
    }

    impl InplaceOp1 for AllReduce<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }

        fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
            candle_core::bail!("NCCL all-reduce of a CPU tensor")
        }

        fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("all-reduce: tensor must be contiguous".into()))?;
            let mut view = storage.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
            let op = match self.op {
                ReduceOp::Sum => Op::Sum,
                ReduceOp::Max => Op::Max,
                ReduceOp::Min => Op::Min,
            };
            self.comm
                .all_reduce_in_place(&mut view, &op)
                .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
            Ok(())
        }
    }
}

#[cfg(not(feature = "nccl"))]
mod nccl {
    //! Stand-in for a build without NCCL: multi-GPU runs say how to get it.
    use anyhow::{bail, Result};

    const NO_NCCL: &str = "train.devices > 1 needs a build with NCCL: `cargo build --release --features cuda,nccl` \
                           (scripts/build-cuda.sh builds it)";

    pub fn new_id() -> Result<String> {
        bail!(NO_NCCL)
    }

    pub fn join(_: &candle_core::Device, _: usize, _: usize, _: &str) -> Result<std::rc::Rc<dyn super::Collective>> {
        bail!(NO_NCCL)
    }
}
