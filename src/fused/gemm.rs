//! The CUDA GEMMs of the projections, the head and their gradients, through cuBLASLt with each shape's
//! algorithm picked by measurement (`train.gemm`).
//!
//! cuBLAS's heuristic picks one algorithm per shape from a model of the GPU. Timing its candidates on
//! the GPU itself (as torch.compile's max-autotune or PyTorch's TunableOp do) finds faster ones for the
//! small GEMMs of micro-batch 4: on an H100 the k/v projections ran 1.9× faster, the MLP weight
//! gradients 1.15–1.2×, a whole micro-step's GEMM sequence 6 % faster under the sustained power cap
//! (`scripts/experiments/gemm_algos.py`; at micro-batch 16 the sequence gained nothing); whole training
//! steps on an H200 +3 % at micro-batch 4, unchanged at 16 (BENCHMARKS.md, session 14). Each shape is
//! planned once per device: descriptors, then (measured) every candidate timed a few times on the real
//! inputs, the fastest kept for the rest of the run.

#[cfg(feature = "cuda")]
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};

/// How the CUDA GEMMs choose their cuBLASLt algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GemmAlgorithm {
    /// Time the heuristic's candidates on first use of each shape, keep the fastest. Runs of one
    /// config may then pick different algorithms, whose sums round differently in the last bits.
    #[default]
    Measured,
    /// The heuristic's first choice: the same algorithms, hence bit-identical results, in every run.
    Heuristic,
}

static HEURISTIC_ONLY: AtomicBool = AtomicBool::new(false);

/// Set for the process (the trainer does it from `train.gemm`; plans made before keep their choice).
pub fn set_algorithm(choice: GemmAlgorithm) {
    HEURISTIC_ONLY.store(choice == GemmAlgorithm::Heuristic, Ordering::Relaxed);
}

#[cfg(feature = "cuda")]
pub use lt::gemm;

/// Is a product with this input one [`gemm`] runs (CUDA, bf16 or f32)?
#[cfg(feature = "cuda")]
pub(super) fn on_cuda(t: &Tensor) -> bool {
    t.device().is_cuda() && matches!(t.dtype(), DType::BF16 | DType::F32)
}

#[cfg(feature = "cuda")]
mod lt {
    use super::HEURISTIC_ONLY;
    use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
    use candle_core::cuda_backend::{CudaDevice, DeviceId};
    use candle_core::{DType, Result, Tensor};
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;

    /// cuBLASLt's recommended workspace on Hopper.
    const WORKSPACE_BYTES: usize = 32 << 20;
    /// Candidates asked of the heuristic (it offered 8 for every shape of the Llama-3.2-1B step).
    const CANDIDATES: usize = 8;
    /// Timed runs per candidate, after one untimed.
    const TIMED_RUNS: usize = 5;
    /// An accumulating GEMM is timed into a scratch output; above this size the heuristic's choice is
    /// kept rather than allocate it (the tied head's 1 GB accumulator: its candidates were within 2 %).
    const MAX_SCRATCH_BYTES: usize = 256 << 20;
    /// A candidate replaces the heuristic's choice only if this much faster (timing noise is ~1 %).
    const MIN_GAIN: f32 = 0.97;

    /// One device's cuBLASLt handle, workspace and plans.
    struct Device {
        handle: sys::cublasLtHandle_t,
        workspace: CudaSlice<u8>,
        plans: HashMap<Key, Plan>,
    }

    // SAFETY: the handle is used only under `DEVICES`' lock, on the device's one stream.
    unsafe impl Send for Device {}

    /// A GEMM shape: M, N, K, the two transposes, input and output dtypes, β = 1, TF32 allowed, and the
    /// pointers' common alignment (views start anywhere; the heuristic assumes 256 bytes unless told).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    struct Key {
        m: usize,
        n: usize,
        k: usize,
        transpose_a: bool,
        transpose_b: bool,
        input: DType,
        output: DType,
        add: bool,
        tf32: bool,
        align: u32,
    }

    /// One shape's descriptors (destroyed with it) and its algorithm.
    struct Plan {
        desc: sys::cublasLtMatmulDesc_t,
        /// A, B, C = D, in cuBLASLt's column-major terms (see [`plan`]).
        layouts: [sys::cublasLtMatrixLayout_t; 3],
        algo: sys::cublasLtMatmulAlgo_t,
    }

    impl Drop for Plan {
        fn drop(&mut self) {
            // SAFETY: created by `plan` for this plan only; cuBLASLt reads descriptors at enqueue time.
            unsafe {
                let _ = result::destroy_matmul_desc(self.desc);
                for l in self.layouts {
                    let _ = result::destroy_matrix_layout(l);
                }
            }
        }
    }

    static DEVICES: Mutex<Option<HashMap<DeviceId, Device>>> = Mutex::new(None);

    fn err(e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("GEMM: cuBLASLt: {e:?}"))
    }

    fn data_type(dtype: DType) -> Result<sys::cudaDataType> {
        Ok(match dtype {
            DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
            DType::F32 => sys::cudaDataType::CUDA_R_32F,
            other => candle_core::bail!("GEMM: no CUDA path for {other:?} (bf16 and f32)"),
        })
    }

    /// Row-major `out (M, N) = opA(a) · opB(b)` is column-major `outᵀ (N × M) = opB(b)ᵀ · opA(a)ᵀ`:
    /// cuBLASLt's A is `b` (stored N × K column-major, or K × N transposed), its B is `a` (K × M, or
    /// M × K transposed), C = D is `outᵀ` with leading dimension N. Returns the descriptors and the
    /// heuristic's candidates, best first.
    fn plan(handle: sys::cublasLtHandle_t, key: &Key) -> Result<(Plan, Vec<sys::cublasLtMatmulAlgo_t>)> {
        let Key { m, n, k, .. } = *key;
        let input = data_type(key.input)?;
        let layout = |t, rows: usize, cols: usize| {
            result::create_matrix_layout(t, rows as u64, cols as u64, rows as i64).map_err(err)
        };
        let (a_rows, a_cols) = if key.transpose_b { (k, n) } else { (n, k) };
        let (b_rows, b_cols) = if key.transpose_a { (m, k) } else { (k, m) };
        let compute = if key.tf32 {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        // Owned as soon as made, so that an error below destroys what exists.
        let mut plan = Plan {
            desc: result::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F).map_err(err)?,
            layouts: [std::ptr::null_mut(); 3],
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        plan.layouts[0] = layout(input, a_rows, a_cols)?;
        plan.layouts[1] = layout(input, b_rows, b_cols)?;
        plan.layouts[2] = layout(data_type(key.output)?, n, m)?;
        let op = |t: bool| -> i32 { i32::from(t) };
        let pref = result::create_matmul_pref().map_err(err)?;
        // SAFETY: plain C data; all zeros is a valid value (state 0 is CUBLAS_STATUS_SUCCESS).
        let mut found: Vec<sys::cublasLtMatmulHeuristicResult_t> =
            (0..CANDIDATES).map(|_| unsafe { std::mem::zeroed() }).collect();
        let mut count = 0i32;
        use sys::cublasLtMatmulDescAttributes_t as D;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        // SAFETY: valid descriptors, attribute buffers of the sizes cuBLASLt documents, a result array
        // of the requested count.
        let status = unsafe {
            let set_desc = |attr, v: i32| {
                result::set_matmul_desc_attribute(
                    plan.desc,
                    attr,
                    (&v as *const i32).cast(),
                    std::mem::size_of::<i32>(),
                )
            };
            let set_pref = |attr, v: *const c_void, size| result::set_matmul_pref_attribute(pref, attr, v, size);
            set_desc(D::CUBLASLT_MATMUL_DESC_TRANSA, op(key.transpose_b))
                .and_then(|_| set_desc(D::CUBLASLT_MATMUL_DESC_TRANSB, op(key.transpose_a)))
                .and_then(|_| {
                    let bytes = WORKSPACE_BYTES as u64;
                    set_pref(
                        P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                        (&bytes as *const u64).cast(),
                        8,
                    )
                })
                .and_then(|_| {
                    [
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                    ]
                    .into_iter()
                    .try_for_each(|attr| set_pref(attr, (&key.align as *const u32).cast(), 4))
                })
                .and_then(|_| {
                    sys::cublasLtMatmulAlgoGetHeuristic(
                        handle,
                        plan.desc,
                        plan.layouts[0],
                        plan.layouts[1],
                        plan.layouts[2],
                        plan.layouts[2],
                        pref,
                        found.len() as i32,
                        found.as_mut_ptr(),
                        &mut count,
                    )
                    .result()
                })
        };
        // SAFETY: created above, used by nothing else.
        unsafe { result::destroy_matmul_pref(pref).map_err(err)? };
        status.map_err(err)?;
        let candidates: Vec<_> = found[..count.max(0) as usize]
            .iter()
            .filter(|h| h.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|h| h.algo)
            .collect();
        let Some(&first) = candidates.first() else {
            candle_core::bail!("GEMM: cuBLASLt has no algorithm for {key:?}");
        };
        plan.algo = first;
        Ok((plan, candidates))
    }

    /// Pointers of one GEMM call: A, B (cuBLASLt's), C and D.
    #[derive(Clone, Copy)]
    struct Operands {
        a: u64,
        b: u64,
        c: u64,
        d: u64,
    }

    /// Enqueue `D = A·B (+ C)` with `algo`.
    fn enqueue(
        device: &Device,
        dev: &CudaDevice,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        ops: Operands,
        add: bool,
    ) -> Result<()> {
        let stream = dev.cuda_stream();
        let (workspace, _sync) = device.workspace.device_ptr(&stream);
        let (alpha, beta) = (1f32, if add { 1f32 } else { 0f32 });
        // SAFETY: the pointers address live contiguous tensors of the planned shapes (checked by `gemm`)
        // and the workspace; all of it on the device's one stream, after the inputs' producers.
        unsafe {
            result::matmul(
                device.handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                ops.a as *const c_void,
                plan.layouts[0],
                ops.b as *const c_void,
                plan.layouts[1],
                ops.c as *const c_void,
                plan.layouts[2],
                ops.d as *mut c_void,
                plan.layouts[2],
                algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(err)
    }

    /// The fastest of `candidates` on these operands (the first unless another is clearly faster), or
    /// `None` when an accumulating GEMM's scratch output would be too large to time it. A β = 0 GEMM is
    /// timed into its real output (the real call overwrites it); a β = 1 one reads its real C and
    /// writes a scratch D, so the accumulator is untouched.
    fn fastest(
        device: &Device,
        dev: &CudaDevice,
        plan: &Plan,
        candidates: &[sys::cublasLtMatmulAlgo_t],
        ops: Operands,
        key: &Key,
    ) -> Result<Option<sys::cublasLtMatmulAlgo_t>> {
        let bytes = key.m * key.n * key.output.size_in_bytes();
        if key.add && bytes > MAX_SCRATCH_BYTES {
            return Ok(None);
        }
        let stream = dev.cuda_stream();
        // SAFETY: written by the timed GEMMs only, never read.
        let scratch = if key.add {
            Some(unsafe { stream.alloc::<u8>(bytes) }.map_err(err)?)
        } else {
            None
        };
        let ops = match &scratch {
            Some(s) => Operands {
                d: s.device_ptr(&stream).0,
                ..ops
            },
            None => ops,
        };
        use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
        let mut times = Vec::with_capacity(candidates.len());
        for algo in candidates {
            // A candidate that fails to launch (it should not: the heuristic offered it) is skipped.
            if enqueue(device, dev, plan, algo, ops, key.add).is_err() {
                times.push(f32::INFINITY);
                continue;
            }
            let start = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(err)?;
            for _ in 0..TIMED_RUNS {
                enqueue(device, dev, plan, algo, ops, key.add)?;
            }
            let end = stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(err)?;
            times.push(start.elapsed_ms(&end).map_err(err)?);
        }
        let (best, best_ms) = times
            .iter()
            .enumerate()
            .fold((0, times[0]), |(i, t), (j, &u)| if u < t { (j, u) } else { (i, t) });
        let best = if best_ms < MIN_GAIN * times[0] { best } else { 0 };
        tracing::debug!(
            ?key,
            heuristic_us = 1e3 * times[0] / TIMED_RUNS as f32,
            chosen_us = 1e3 * times[best] / TIMED_RUNS as f32,
            chosen = best,
            "GEMM algorithm"
        );
        Ok(Some(candidates[best]))
    }

    /// `out = opA(a) · opB(b)`, or `out += …` with `add` (β = 1), for contiguous row-major 2-D CUDA
    /// tensors: opA(a) is `(M, K)` (`a` stored `(K, M)` when `transpose_a`), opB(b) is `(K, N)` (`b`
    /// stored `(N, K)` when `transpose_b`), `out` is `(M, N)`. Inputs bf16 or f32 (one dtype), `out` in
    /// their dtype or f32; accumulation in f32.
    pub fn gemm(out: &Tensor, a: &Tensor, transpose_a: bool, b: &Tensor, transpose_b: bool, add: bool) -> Result<()> {
        let op = "GEMM";
        let dim = |t: &Tensor, transposed: bool| -> Result<(usize, usize)> {
            let (r, c) = t.dims2()?;
            Ok(if transposed { (c, r) } else { (r, c) })
        };
        let ((m, k), (k_b, n)) = (dim(a, transpose_a)?, dim(b, transpose_b)?);
        let output = out.dtype();
        if out.dims() != [m, n]
            || k_b != k
            || a.dtype() != b.dtype()
            || !(output == a.dtype() || output == DType::F32)
            || ![a, b, out].iter().all(|t| t.is_contiguous())
        {
            candle_core::bail!(
                "{op}: {:?} {:?}{} · {:?} {:?}{} into {:?} {:?} (contiguous, one input dtype)",
                a.dims(),
                a.dtype(),
                if transpose_a { "ᵀ" } else { "" },
                b.dims(),
                b.dtype(),
                if transpose_b { "ᵀ" } else { "" },
                out.dims(),
                output
            );
        }
        let ptr = |t: &Tensor| super::super::cuda::tensor_ptr(t, op);
        let (a_ptr, b_ptr, out_ptr) = (ptr(a)?, ptr(b)?, ptr(out)?);
        let ops = Operands {
            a: b_ptr,
            b: a_ptr,
            c: out_ptr,
            d: out_ptr,
        };
        let align = [a_ptr, b_ptr, out_ptr]
            .iter()
            .fold(256u32, |al, p| al.min(1 << p.trailing_zeros().min(8)));
        let key = Key {
            m,
            n,
            k,
            transpose_a,
            transpose_b,
            input: a.dtype(),
            output,
            add,
            tf32: a.dtype() == DType::F32 && candle_core::cuda_backend::gemm_reduced_precision_f32(),
            align,
        };
        let dev: &CudaDevice = out.device().as_cuda_device()?;
        let mut devices = DEVICES.lock().map_err(|_| err("poisoned lock"))?;
        let device = match devices.get_or_insert_with(HashMap::new).entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let stream = dev.cuda_stream();
                // cuBLASLt binds a handle to the current device: make it this one's (one thread may
                // drive several in tests).
                stream.context().bind_to_thread().map_err(err)?;
                e.insert(Device {
                    handle: result::create_handle().map_err(err)?,
                    // SAFETY: cuBLASLt's scratch space, never read by us.
                    workspace: unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.map_err(err)?,
                    plans: HashMap::new(),
                })
            }
        };
        if !device.plans.contains_key(&key) {
            let (mut plan, candidates) = plan(device.handle, &key)?;
            if !HEURISTIC_ONLY.load(Ordering::Relaxed) && candidates.len() > 1 {
                if let Some(algo) = fastest(device, dev, &plan, &candidates, ops, &key)? {
                    plan.algo = algo;
                }
            }
            device.plans.insert(key, plan);
        }
        let plan = &device.plans[&key];
        enqueue(device, dev, plan, &plan.algo, ops, add)
    }
}
