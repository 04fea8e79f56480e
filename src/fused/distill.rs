//! The distillation term straight from the compute-dtype logits of student and teacher: per row the
//! KL divergence of the student's softmax from the teacher's at temperature T, in one read of both
//! rows for the loss and one read and one write for the student's gradient (no f32 copy of either
//! `(N, V)` block, no softmax kept).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{cpu_storage, host_f64, host_targets, target_indices, IGNORED};
use crate::model::ops::stat_dtype;

/// Token mean over the counted targets of `T²·KL(softmax(teacher/T) ‖ softmax(student/T))`, both
/// `(N, V)` in one dtype; the teacher gets no gradient. 0 when nothing is counted.
pub fn kl(student: &Tensor, teacher: &Tensor, targets: &[i64], temperature: f64) -> Result<Tensor> {
    if student.dims() != teacher.dims() || student.dtype() != teacher.dtype() {
        candle_core::bail!(
            "distillation: student logits {:?} {:?} and teacher logits {:?} {:?} differ",
            student.dims(),
            student.dtype(),
            teacher.dims(),
            teacher.dtype()
        );
    }
    let (index, counted) = target_indices(targets, student.device())?;
    let op = Distill {
        targets: index,
        inv_temp: 1.0 / temperature,
    };
    let rows = student.contiguous()?.apply_op2(&teacher.detach().contiguous()?, op)?;
    rows.narrow(1, 0, 1)?
        .sum_all()?
        .affine(1.0 / counted.max(1) as f64, 0.0)
}

/// `(student, teacher)` logits `(N, V)` → `(N, 3)`: [T²·KL (0 if ignored), lse(s/T), lse(t/T)], f32
/// (f64 for f64 logits). The log-sum-exps are kept for the backward only: [`kl`] reads column 0, and
/// the backward carries that column's gradient alone.
struct Distill {
    targets: Tensor,
    inv_temp: f64,
}

/// `(student, teacher, [forward result | its gradient] (N, 6))` → the student logits' gradient.
struct DistillBwd {
    targets: Tensor,
    inv_temp: f64,
}

fn log_sum_exp(row: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = row.clone().fold(f64::NEG_INFINITY, f64::max);
    max + row.map(|x| (x - max).exp()).sum::<f64>().ln()
}

impl CustomOp2 for Distill {
    fn name(&self) -> &'static str {
        "fused-distill"
    }

    fn cpu_fwd(&self, ss: &CpuStorage, sl: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (n, v) = sl.shape().dims2()?;
        let (student, teacher) = (host_f64(ss, sl, op)?, host_f64(ts, tl, op)?);
        let targets = host_targets(&self.targets)?;
        let w = self.inv_temp;
        let mut out = Vec::with_capacity(3 * n);
        for ((s, t), &target) in student.chunks(v).zip(teacher.chunks(v)).zip(&targets) {
            let lse_s = log_sum_exp(s.iter().map(|x| x * w));
            let lse_t = log_sum_exp(t.iter().map(|x| x * w));
            let kl: f64 = s
                .iter()
                .zip(t)
                .map(|(s, t)| {
                    let log_pt = t * w - lse_t;
                    log_pt.exp() * (log_pt - (s * w - lse_s))
                })
                .sum();
            out.extend([if target == IGNORED { 0.0 } else { kl / (w * w) }, lse_s, lse_t]);
        }
        Ok((cpu_storage(out, stat_dtype(ss.dtype()))?, Shape::from((n, 3))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, Arg};
        let op = self.name();
        let (n, v) = sl.shape().dims2()?;
        let (student, teacher) = (cuda::ptr(ss, sl, op)?, cuda::ptr(ts, tl, op)?);
        let targets = cuda::tensor_ptr(&self.targets, op)?;
        let (out, res) = cuda::alloc(&ss.device, candle_core::DType::F32, 3 * n, op)?;
        let name = format!("distill_fwd_{}", cuda::suffix(ss.dtype(), op)?);
        let ptrs = [student, teacher, targets, res].map(Arg::Ptr);
        let args: Vec<Arg> = ptrs
            .into_iter()
            .chain([Arg::I32(v as i32), Arg::F32(self.inv_temp as f32)])
            .collect();
        cuda::launch(&ss.device, &name, cuda::rows(n, 1024), &args)?;
        Ok((out, Shape::from((n, 3))))
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = DistillBwd {
            targets: self.targets.clone(),
            inv_temp: self.inv_temp,
        };
        let aux = Tensor::cat(&[res, &grad.to_dtype(res.dtype())?], 1)?;
        Ok((Some(student.apply_op3_no_bwd(teacher, &aux, &op)?), None))
    }
}

impl CustomOp3 for DistillBwd {
    fn name(&self) -> &'static str {
        "fused-distill-bwd"
    }

    fn cpu_fwd(
        &self,
        ss: &CpuStorage,
        sl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        aux_s: &CpuStorage,
        aux_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (_, v) = sl.shape().dims2()?;
        let (student, teacher, aux) = (
            host_f64(ss, sl, op)?,
            host_f64(ts, tl, op)?,
            host_f64(aux_s, aux_l, op)?,
        );
        let targets = host_targets(&self.targets)?;
        let w = self.inv_temp;
        let mut out = Vec::with_capacity(student.len());
        for (((s, t), a), &target) in student
            .chunks(v)
            .zip(teacher.chunks(v))
            .zip(aux.chunks(6))
            .zip(&targets)
        {
            // d(T²·KL)/ds_j = T·(p_s,j − p_t,j).
            let g_kl = if target == IGNORED { 0.0 } else { a[3] / w };
            out.extend(
                s.iter()
                    .zip(t)
                    .map(|(s, t)| g_kl * ((s * w - a[1]).exp() - (t * w - a[2]).exp())),
            );
        }
        Ok((cpu_storage(out, ss.dtype())?, sl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
        aux_s: &candle_core::CudaStorage,
        aux_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, Arg};
        let op = self.name();
        let (n, v) = sl.shape().dims2()?;
        if aux_s.dtype() != candle_core::DType::F32 {
            candle_core::bail!("{op}: the forward result and its gradient must be f32");
        }
        let (student, teacher, aux) = (
            cuda::ptr(ss, sl, op)?,
            cuda::ptr(ts, tl, op)?,
            cuda::ptr(aux_s, aux_l, op)?,
        );
        let targets = cuda::tensor_ptr(&self.targets, op)?;
        let (out, ds) = cuda::alloc(&ss.device, ss.dtype(), n * v, op)?;
        let name = format!("distill_bwd_{}", cuda::suffix(ss.dtype(), op)?);
        let ptrs = [student, teacher, targets, aux, ds].map(Arg::Ptr);
        let args: Vec<Arg> = ptrs
            .into_iter()
            .chain([Arg::I32(v as i32), Arg::F32(self.inv_temp as f32)])
            .collect();
        cuda::launch(&ss.device, &name, cuda::rows(n, 1024), &args)?;
        Ok((out, sl.shape().clone()))
    }
}
