//! The embedding lookup whose backward adds the rows' gradients straight into the step's f32
//! accumulator of the table (PyTorch's `.grad +=`).
//!
//! Through candle's autograd, each micro-batch's gradient of the lookup is a zero-filled table-sized
//! tensor (128256 × 2048 in f32 for Llama-3.2-1B: 1 GB) with the rows index-added, then added to the
//! step's running sum: three table-sized passes per micro-batch for a gradient that touches a few
//! hundred rows. Here each id's rows are summed in token order and added in place (deterministic).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, InplaceOp3, Layout, Result, Shape, Tensor};

/// `table[ids]` for `ids: (n)` u32 and `table: (V, d)`; the backward adds the gradient of each row
/// into `acc` (`(V, d)`, f32 or f64, contiguous) and passes none to `table`. `table` is a `Var` (a
/// master weight): a table computed from one keeps its gradient in autograd (plain lookup).
pub fn embedding(table: &Tensor, ids: &Tensor, acc: &Tensor) -> Result<Tensor> {
    if !table.is_variable() {
        return table.index_select(ids, 0);
    }
    if acc.dims() != table.dims() || !acc.is_contiguous() || !matches!(acc.dtype(), DType::F32 | DType::F64) {
        candle_core::bail!(
            "fused embedding: the accumulator of a {:?} table must be a contiguous f32/f64 tensor of that shape, got {:?} {:?}",
            table.dims(),
            acc.dims(),
            acc.dtype()
        );
    }
    table
        .contiguous()?
        .apply_op2(&ids.contiguous()?, Lookup { acc: acc.clone() })
}

struct Lookup {
    acc: Tensor,
}

impl CustomOp2 for Lookup {
    fn name(&self) -> &'static str {
        "fused-embedding"
    }

    fn cpu_fwd(&self, t: &CpuStorage, tl: &Layout, ids: &CpuStorage, il: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((il.shape().elem_count(), tl.shape().dims2()?.1));
        Ok((t.index_select(ids, tl, il, 0)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        t: &candle_core::CudaStorage,
        tl: &Layout,
        ids: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = Shape::from((il.shape().elem_count(), tl.shape().dims2()?.1));
        Ok((t.index_select(ids, tl, il, 0)?, shape))
    }

    fn bwd(
        &self,
        _table: &Tensor,
        ids: &Tensor,
        _rows: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        super::accumulate::before_write(&self.acc, false)?;
        self.acc.inplace_op3(&grad.detach().contiguous()?, ids, &AddRows)?;
        Ok((None, None))
    }
}

/// `acc[id] += Σ g[t]` over the tokens with `ids[t] = id`, summed in token order (the CUDA kernel's
/// order: one writer per row).
struct AddRows;

impl InplaceOp3 for AddRows {
    fn name(&self) -> &'static str {
        "fused-embedding-backward"
    }

    fn cpu_fwd(
        &self,
        acc: &mut CpuStorage,
        al: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        ids: &CpuStorage,
        il: &Layout,
    ) -> Result<()> {
        let g = super::host_f64(g, gl, self.name())?;
        let (start, _) = super::contiguous_range(al, self.name())?;
        let (i0, i1) = super::contiguous_range(il, self.name())?;
        let CpuStorage::U32(ids) = ids else {
            candle_core::bail!("{}: ids must be u32", self.name())
        };
        let dim = al.shape().dims2()?.1;
        let ids = &ids[i0..i1];
        for (t, &id) in ids.iter().enumerate() {
            if ids[..t].contains(&id) {
                continue;
            }
            let mut sum = g[t * dim..(t + 1) * dim].to_vec();
            for (u, _) in ids.iter().enumerate().skip(t + 1).filter(|(_, &other)| other == id) {
                sum.iter_mut()
                    .zip(&g[u * dim..(u + 1) * dim])
                    .for_each(|(s, g)| *s += g);
            }
            super::add_to_host_accumulator(acc, start + id as usize * dim, sum, self.name())?;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        acc: &mut candle_core::CudaStorage,
        al: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        ids: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<()> {
        use super::cuda::{self, Arg};
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let op = self.name();
        if acc.dtype() != DType::F32 {
            candle_core::bail!("{op}: CUDA accumulators are f32");
        }
        let dim = al.shape().dims2()?.1;
        let tokens = il.shape().elem_count();
        if tokens > i32::MAX as usize {
            candle_core::bail!("{op}: {tokens} tokens exceed the kernel's 32-bit token index");
        }
        let ids = cuda::ptr(ids, il, op)?;
        // Per token: its id's first token, its rank among that id's tokens, their count, the id's
        // offset in `order`, and `order` (the tokens grouped by id) — see the kernels.
        let (_scratch, first) = cuda::alloc(&g.device, DType::U32, 5 * tokens, op)?;
        let [rank, count, offset, order] = [1u64, 2, 3, 4].map(|k| first + 4 * k * tokens as u64);
        let warps_per_block = 8;
        let cfg = LaunchConfig {
            grid_dim: (tokens.div_ceil(warps_per_block).max(1) as u32, 1, 1),
            block_dim: (32 * warps_per_block as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [
            Arg::Ptr(ids),
            Arg::Ptr(first),
            Arg::Ptr(rank),
            Arg::Ptr(count),
            Arg::I32(tokens as i32),
        ];
        cuda::launch(&g.device, "embedding_ranks", cfg, &args)?;
        let args = [
            Arg::Ptr(first),
            Arg::Ptr(rank),
            Arg::Ptr(count),
            Arg::Ptr(offset),
            Arg::Ptr(order),
            Arg::I32(tokens as i32),
        ];
        cuda::launch(&g.device, "embedding_order", cuda::rows(1, 1024), &args)?;
        let args = [
            Arg::Ptr(cuda::ptr(acc, al, op)?),
            Arg::Ptr(cuda::ptr(g, gl, op)?),
            Arg::Ptr(ids),
            Arg::Ptr(first),
            Arg::Ptr(count),
            Arg::Ptr(offset),
            Arg::Ptr(order),
            Arg::Len(tokens),
            Arg::Len(dim),
        ];
        let kernel = format!("embedding_bwd_{}", cuda::suffix(g.dtype(), op)?);
        let columns = 128;
        let cfg = LaunchConfig {
            grid_dim: (
                tokens.clamp(1, cuda::REDUCTION_BLOCKS) as u32,
                dim.div_ceil(columns) as u32,
                1,
            ),
            block_dim: (columns as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        cuda::launch(&g.device, &kernel, cfg, &args)
    }
}
