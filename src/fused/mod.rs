//! Fused kernels with backward: one CUDA kernel (kernels/proxqat.cu) per op and direction where plain
//! candle launches one kernel per elementwise step and keeps every intermediate alive.
//!
//! Each op is a candle custom op with a CPU path of the same semantics (computed in f64 on the host: the
//! finite-difference tests run through it) and a CUDA path (f32 statistics, f32 or bf16 storage). The
//! reference compositions of candle primitives stay in `model::ops`; tests compare the two on the CPU and
//! `proxqat gpu-check parity` compares the CUDA kernels with them on the GPU.
//!
//! Backward passes are applied with `apply_op*_no_bwd`: a gradient built with tracking would hold the
//! forward's arguments, hence the whole micro-batch graph, alive for as long as the accumulated
//! gradient lives (seen on the GPU: +3.3 GB per micro-batch at Llama-3.2-1B shape).

pub mod accumulate;
pub mod adamw;
pub mod block;
pub mod cross_entropy;
pub mod distill;
pub mod embedding;
pub mod flash;
pub mod gemm;
pub mod grid;
pub mod linear;
pub mod mlp;
pub mod residual;
pub mod rms_norm;
pub mod rope;
pub mod softmax;
pub mod swiglu;
pub mod weight;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// Which implementation the model's building blocks use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// The fused custom ops of this module (the default).
    #[default]
    Fused,
    /// Compositions of candle primitives (`model::ops`): the independent reference.
    Reference,
}

/// A result computed outside a custom op (by ordinary tensor ops, on detached inputs) and handed to
/// autograd once by the op's forward (`node1`, `node3`). The forward copies it out (candle's
/// custom ops return fresh storage).
pub(crate) struct Precomputed {
    out: std::sync::Mutex<Option<Tensor>>,
    op: &'static str,
}

impl Precomputed {
    pub fn new(out: Tensor, op: &'static str) -> Self {
        Precomputed {
            out: std::sync::Mutex::new(Some(out)),
            op,
        }
    }

    fn take(&self) -> Result<Tensor> {
        self.out
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned", self.op)))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward applied twice", self.op)))
    }

    pub fn take_cpu(&self) -> Result<(CpuStorage, candle_core::Shape)> {
        let out = self.take()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) => Ok((s.try_clone(layout)?, out.shape().clone())),
            _ => candle_core::bail!("{}: CPU input, result on another device", self.op),
        }
    }

    #[cfg(feature = "cuda")]
    pub fn take_cuda(&self) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let out = self.take()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) => Ok((s.try_clone(layout)?, out.shape().clone())),
            _ => candle_core::bail!("{}: CUDA input, result on another device", self.op),
        }
    }
}

/// The backward of a one-argument node built by [`node1`].
pub(crate) trait Backward1: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// The argument's gradient from the output's.
    fn bwd(&self, arg: &Tensor, grad: &Tensor) -> Result<Option<Tensor>>;
}

/// `out`, computed by ordinary tensor ops on the detached `arg`, entered into autograd as one node over
/// `arg` whose backward is `backward` (the MLP, the head with its loss, the decoder blocks).
pub(crate) fn node1(out: Tensor, arg: &Tensor, backward: impl Backward1) -> Result<Tensor> {
    let out = Precomputed::new(out, backward.name());
    arg.apply_op1(Node1 { out, backward })
}

struct Node1<B> {
    out: Precomputed,
    backward: B,
}

impl<B: Backward1> candle_core::CustomOp1 for Node1<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, candle_core::Shape)> {
        self.out.take_cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.out.take_cuda()
    }

    fn bwd(&self, arg: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.backward.bwd(arg, grad)
    }
}

/// The backward of a three-argument node built by [`node3`].
pub(crate) trait Backward3: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// The arguments' gradients from the output's.
    fn bwd(&self, args: [&Tensor; 3], grad: &Tensor) -> Result<[Option<Tensor>; 3]>;
}

/// `out`, computed by ordinary tensor ops on detached inputs, entered into autograd as one node over
/// `args` whose backward is `backward` (a node with a written-out backward: the fused attention, a
/// checkpointed block).
pub(crate) fn node3(out: Tensor, args: [&Tensor; 3], backward: impl Backward3) -> Result<Tensor> {
    let out = Precomputed::new(out, backward.name());
    args[0].apply_op3(args[1], args[2], Node3 { out, backward })
}

struct Node3<B> {
    out: Precomputed,
    backward: B,
}

impl<B: Backward3> candle_core::CustomOp3 for Node3<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        self.out.take_cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.out.take_cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [da, db, dc] = self.backward.bwd([a, b, c], grad)?;
        Ok((da, db, dc))
    }
}

fn contiguous_range(layout: &Layout, op: &str) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))
}

/// The target index that means "not counted" (HF's −100) in the loss ops' index tensors.
pub(crate) const IGNORED: u32 = u32::MAX;

/// Next-token targets (−100 = not counted) as the loss kernels read them, and how many are counted.
pub(crate) fn target_indices(targets: &[i64], device: &candle_core::Device) -> Result<(Tensor, usize)> {
    let counted = targets.iter().filter(|&&t| t >= 0).count();
    let index: Vec<u32> = targets
        .iter()
        .map(|&t| if t >= 0 { t as u32 } else { IGNORED })
        .collect();
    Ok((Tensor::from_vec(index, targets.len(), device)?, counted))
}

/// A target index tensor back on the host (the CPU paths).
pub(crate) fn host_targets(t: &Tensor) -> Result<Vec<u32>> {
    t.to_device(&candle_core::Device::Cpu)?.to_vec1::<u32>()
}

/// The elements of a contiguous CPU tensor as f64.
pub(crate) fn host_f64(storage: &CpuStorage, layout: &Layout, op: &str) -> Result<Vec<f64>> {
    let (start, end) = contiguous_range(layout, op)?;
    Ok(match storage {
        CpuStorage::F64(v) => v[start..end].to_vec(),
        CpuStorage::F32(v) => v[start..end].iter().map(|&x| x as f64).collect(),
        CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f64()).collect(),
        CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f64()).collect(),
        other => candle_core::bail!("{op}: unsupported dtype {:?}", other.dtype()),
    })
}

/// A statistic kept in the precision the CUDA kernels keep it in: f32, unless the data is f64. This is
/// what makes overflow behave alike on both paths (a row of 1e30s has mean square inf, not 1e60).
pub(crate) fn as_kernel_stat(v: f64, data: DType) -> f64 {
    if data == DType::F64 {
        v
    } else {
        v as f32 as f64
    }
}

/// `acc[start + i] += values[i]` on a CPU accumulator (f32 or f64), the values computed in f64.
pub(crate) fn add_to_host_accumulator(
    acc: &mut CpuStorage,
    start: usize,
    values: impl IntoIterator<Item = f64>,
    op: &str,
) -> Result<()> {
    match acc {
        CpuStorage::F32(a) => a[start..].iter_mut().zip(values).for_each(|(a, v)| *a += v as f32),
        CpuStorage::F64(a) => a[start..].iter_mut().zip(values).for_each(|(a, v)| *a += v),
        other => candle_core::bail!("{op}: accumulator must be f32 or f64, got {:?}", other.dtype()),
    }
    Ok(())
}

/// Host values rounded to `dtype`.
pub(crate) fn cpu_storage(values: Vec<f64>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F64 => CpuStorage::F64(values),
        DType::F32 => CpuStorage::F32(values.into_iter().map(|x| x as f32).collect()),
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(half::bf16::from_f64).collect()),
        DType::F16 => CpuStorage::F16(values.into_iter().map(half::f16::from_f64).collect()),
        other => candle_core::bail!("fused ops: unsupported output dtype {other:?}"),
    })
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    //! Loading kernels/proxqat.cu and handing raw device addresses to its kernels.
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice};
    use candle_core::{DType, Layout, Result, Storage, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/proxqat.ptx"));

    /// A kernel argument (device addresses as raw u64).
    pub enum Arg {
        Ptr(u64),
        U64(u64),
        I32(i32),
        F32(f32),
        Len(usize),
        AdamW(super::adamw::AdamWArgs),
    }

    /// Launch kernel `name` of kernels/proxqat.cu on the device's stream.
    pub fn launch(device: &CudaDevice, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let f = device.get_or_load_custom_func(name, "proxqat", PTX)?;
        if cfg.shared_mem_bytes > 48 * 1024 {
            // Dynamic shared memory beyond 48 KiB must be allowed per kernel.
            use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
            let attribute = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            f.set_attribute(attribute, cfg.shared_mem_bytes as i32)
                .map_err(candle_core::Error::wrap)?;
        }
        let mut b = f.builder();
        for a in args {
            match a {
                Arg::Ptr(v) | Arg::U64(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::Len(v) => b.arg(v),
                Arg::AdamW(v) => b.arg(v),
            };
        }
        // SAFETY: every kernel's parameter list matches the Arg list its caller builds.
        unsafe { b.launch(cfg) }.map_err(candle_core::Error::wrap)?;
        Ok(())
    }

    /// The kernel-name suffix of a storage dtype (the kernels exist for f32 and bf16).
    pub fn suffix(dtype: DType, op: &str) -> Result<&'static str> {
        match dtype {
            DType::F32 => Ok("f32"),
            DType::BF16 => Ok("bf16"),
            other => candle_core::bail!("{op}: no CUDA kernel for {other:?} (f32 and bf16 only)"),
        }
    }

    /// Device address of the first element of a contiguous tensor's view.
    pub fn ptr(storage: &CudaStorage, layout: &Layout, op: &str) -> Result<u64> {
        super::contiguous_range(layout, op)?;
        view_ptr(storage, layout, op)
    }

    /// Device address of the first element of a view, whatever its strides (the kernel that reads it
    /// is given them).
    pub fn view_ptr(storage: &CudaStorage, layout: &Layout, op: &str) -> Result<u64> {
        let start = layout.start_offset();
        let (base, size) = match &storage.slice {
            CudaStorageSlice::F32(s) => (s.device_ptr(s.stream()).0, 4),
            CudaStorageSlice::BF16(s) => (s.device_ptr(s.stream()).0, 2),
            CudaStorageSlice::U32(s) => (s.device_ptr(s.stream()).0, 4),
            CudaStorageSlice::I64(s) => (s.device_ptr(s.stream()).0, 8),
            _ => candle_core::bail!("{op}: unsupported dtype {:?}", storage.dtype()),
        };
        Ok(base + (start * size) as u64)
    }

    /// Device address of a (contiguous, CUDA) tensor held outside the op's arguments. The caller keeps
    /// the tensor alive until the launch is enqueued; the single stream orders everything after it.
    pub fn tensor_ptr(t: &Tensor, op: &str) -> Result<u64> {
        super::contiguous_range(t.layout(), op)?;
        tensor_view_ptr(t, op)
    }

    /// [`view_ptr`] of a tensor held outside the op's arguments.
    pub fn tensor_view_ptr(t: &Tensor, op: &str) -> Result<u64> {
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => view_ptr(s, layout, op),
            _ => candle_core::bail!("{op}: tensor is not on the CUDA device"),
        }
    }

    /// A fresh uninitialised buffer of `n` elements and its address.
    pub fn alloc(device: &CudaDevice, dtype: DType, n: usize, op: &str) -> Result<(CudaStorage, u64)> {
        // SAFETY: every kernel that receives a buffer from here writes all of its elements.
        let storage = match dtype {
            DType::F32 => CudaStorage::wrap_cuda_slice(unsafe { device.alloc::<f32>(n)? }, device.clone()),
            DType::BF16 => CudaStorage::wrap_cuda_slice(unsafe { device.alloc::<half::bf16>(n)? }, device.clone()),
            DType::U32 => CudaStorage::wrap_cuda_slice(unsafe { device.alloc::<u32>(n)? }, device.clone()),
            other => candle_core::bail!("{op}: no CUDA kernel for {other:?}"),
        };
        let address = ptr(&storage, &Layout::contiguous(n), op)?;
        Ok((storage, address))
    }

    pub fn rows(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Kernel `NAME_SUFFIX` (the suffix of `dtype`) over `n` elements, grid-stride, with the device
    /// addresses `ptrs` and then `n` as its arguments.
    pub fn launch_elementwise(device: &CudaDevice, name: &str, dtype: DType, ptrs: &[u64], n: usize) -> Result<()> {
        let kernel = format!("{name}_{}", suffix(dtype, name)?);
        let args: Vec<Arg> = ptrs.iter().map(|&p| Arg::Ptr(p)).chain([Arg::Len(n)]).collect();
        launch(device, &kernel, elementwise(n), &args)
    }

    /// Grid-stride launch over `n` elements.
    pub fn elementwise(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, 132 * 16) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Blocks of 256 threads for the fixed-grid reductions (Σx², grid counts): 8 per SM of an
    /// H100/H200, enough loads in flight for memory bandwidth (264 left them latency-bound: ncu
    /// measured Σx² over the 1.2 B gradients at 8 ms). Fixed, so partial sums add in a fixed order.
    pub const REDUCTION_BLOCKS: usize = 132 * 8;

    /// Threads per block for a row of `len` elements: a warp multiple, at most 1024.
    pub fn threads_for(len: usize) -> u32 {
        (len.div_ceil(4).div_ceil(32) * 32).clamp(32, 1024) as u32
    }
}
