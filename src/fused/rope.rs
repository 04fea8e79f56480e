//! Rotate-half RoPE fused with the head transpose: the projection output `(B, T, H·D)` goes straight to
//! the attention layout `(B, H, T, D)`, rotated. The backward is the same kernel run the other way (the
//! inverse rotation, which is the transpose of a rotation).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::{cpu_storage, host_f64};

/// `x: (B, T, heads·D)` → `(B, heads, T, D)` rotated by the angle tables `cos`, `sin`: `(T, D/2)`.
/// On CUDA `x` may be a column range of wider rows (q or k of the fused q/k/v projection): the kernel
/// reads it in place.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let op = Rope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        heads,
        inverse: false,
        out: x.dtype(),
    };
    let x = if x.device().is_cuda() && row_stride(x.layout()).is_some() {
        x.clone()
    } else {
        x.contiguous()?
    };
    x.apply_op1(op)
}

/// The distance between consecutive positions' rows of a `(B, T, W)` layout whose rows are evenly
/// spaced and each contiguous (a column range of a `(B, T, W')` tensor), if it is one.
fn row_stride(layout: &Layout) -> Option<usize> {
    match (layout.dims(), layout.stride()) {
        (&[_, t, _], &[sb, st, 1]) if sb == t * st => Some(st),
        _ => None,
    }
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
    heads: usize,
    /// false: `(B, T, H·D)` → `(B, H, T, D)`, +angle. true: `(B, H, T, D)` → `(B, T, H·D)`, −angle.
    inverse: bool,
    /// The output's dtype: the input's, or bf16 from f32 (the backward of flash attention's f32 sums).
    out: DType,
}

impl Rope {
    /// (B, T, H, D) of the operation whatever its direction.
    fn dims(&self, layout: &Layout) -> Result<(usize, usize, usize, usize)> {
        let dims = layout.dims();
        if self.inverse {
            let &[b, h, t, d] = dims else {
                candle_core::bail!("fused-rope backward: expected (B, H, T, D), got {dims:?}")
            };
            Ok((b, t, h, d))
        } else {
            let &[b, t, hd] = dims else {
                candle_core::bail!("fused-rope: expected (B, T, H·D), got {dims:?}")
            };
            Ok((b, t, self.heads, hd / self.heads))
        }
    }

    fn out_shape(&self, (b, t, h, d): (usize, usize, usize, usize)) -> Shape {
        if self.inverse {
            Shape::from((b, t, h * d))
        } else {
            Shape::from((b, h, t, d))
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, h, d) = self.dims(l)?;
        let x = host_f64(s, l, self.name())?;
        let cos = self
            .cos
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        let sin = self
            .sin
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        let half = d / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut out = vec![0.0; x.len()];
        for bb in 0..b {
            for tt in 0..t {
                for hh in 0..h {
                    let bthd = ((bb * t + tt) * h + hh) * d;
                    let bhtd = ((bb * h + hh) * t + tt) * d;
                    let (src, dst) = if self.inverse { (bhtd, bthd) } else { (bthd, bhtd) };
                    for i in 0..half {
                        let (c, s) = (cos[tt * half + i], sign * sin[tt * half + i]);
                        let (x1, x2) = (x[src + i], x[src + i + half]);
                        out[dst + i] = x1 * c - x2 * s;
                        out[dst + i + half] = x2 * c + x1 * s;
                    }
                }
            }
        }
        Ok((cpu_storage(out, self.out)?, self.out_shape((b, t, h, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        let op = self.name();
        let (b, t, h, d) = self.dims(l)?;
        // The forward may read a column range of wider rows; the inverse reads (B, H, T, D) whole.
        let (input, row) = match (self.inverse, row_stride(l)) {
            (false, Some(row)) => (cuda::view_ptr(s, l, op)?, row),
            _ => (cuda::ptr(s, l, op)?, h * d),
        };
        let (out, output) = cuda::alloc(&s.device, self.out, b * t * h * d, op)?;
        self.launch(s.dtype(), input, output, (b, t, h, d), row)?;
        Ok((out, self.out_shape((b, t, h, d))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            heads: self.heads,
            inverse: !self.inverse,
            out: grad.dtype(),
        };
        // Each direction's output layout is the other's input layout.
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

#[cfg(feature = "cuda")]
impl Rope {
    /// The kernel from `input` to `output` (device addresses); `row`: the (B, T, H·D) side's distance
    /// between positions.
    fn launch(
        &self,
        input_dtype: DType,
        input: u64,
        output: u64,
        bthd: (usize, usize, usize, usize),
        row: usize,
    ) -> Result<()> {
        use super::cuda::{self, Arg};
        let op = "fused-rope";
        let (b, t, h, d) = bthd;
        if b * t * h * d / 2 > u32::MAX as usize {
            candle_core::bail!("{op}: {b}×{t}×{h}×{d} elements exceed the kernel's 32-bit indexing");
        }
        let name = match (input_dtype, self.out) {
            (input, out) if input == out => format!("rope_{}", cuda::suffix(input, op)?),
            (DType::F32, DType::BF16) => "rope_f32_bf16".into(),
            (input, out) => candle_core::bail!("{op}: no CUDA kernel from {input:?} to {out:?}"),
        };
        let dev = match self.cos.device() {
            candle_core::Device::Cuda(dev) => dev.clone(),
            _ => candle_core::bail!("{op}: the angle tables are not on the CUDA device"),
        };
        let (cos, sin) = (cuda::tensor_ptr(&self.cos, op)?, cuda::tensor_ptr(&self.sin, op)?);
        let sizes = [b, t, h, d, row, self.inverse as usize].map(|v| Arg::I32(v as i32));
        let args: Vec<Arg> = [input, output, cos, sin]
            .map(Arg::Ptr)
            .into_iter()
            .chain(sizes)
            .collect();
        cuda::launch(&dev, &name, cuda::elementwise(b * t * h * d / 2), &args)
    }
}

/// `∂L/∂x: (B, T, H·D)` in `out` (`grad`'s dtype, or bf16 from f32) of `rope(x, cos, sin, _)` from
/// `∂L/∂y: (B, H, T, D)` (no autograd).
pub(super) fn rope_backward(grad: &Tensor, cos: &Tensor, sin: &Tensor, out: DType) -> Result<Tensor> {
    grad.contiguous()?.apply_op1_no_bwd(&inverse(grad, cos, sin, out)?)
}

fn inverse(grad: &Tensor, cos: &Tensor, sin: &Tensor, out: DType) -> Result<Rope> {
    Ok(Rope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        heads: grad.dim(1)?,
        inverse: true,
        out,
    })
}

/// [`rope_backward`] written into columns `col..col + H·D` of `rows: (B·T, W)` (contiguous, in the
/// output dtype): the fused q/k/v projection's input gradient takes dq and dk side by side. On CUDA
/// the kernel writes there directly.
pub fn rope_backward_into(grad: &Tensor, cos: &Tensor, sin: &Tensor, rows: &Tensor, col: usize) -> Result<()> {
    let (b, h, t, d) = grad.dims4()?;
    let (n, width) = rows.dims2()?;
    if n != b * t || col + h * d > width || !rows.is_contiguous() {
        candle_core::bail!(
            "fused-rope backward: {:?} into columns {col}.. of {:?} (contiguous (B·T, W))",
            grad.dims(),
            rows.dims()
        );
    }
    #[cfg(feature = "cuda")]
    if rows.device().is_cuda() {
        let op = "fused-rope backward";
        let grad = grad.contiguous()?;
        let input = super::cuda::tensor_ptr(&grad, op)?;
        let output = super::cuda::tensor_ptr(rows, op)? + (col * rows.dtype().size_in_bytes()) as u64;
        return inverse(&grad, cos, sin, rows.dtype())?.launch(grad.dtype(), input, output, (b, t, h, d), width);
    }
    let dx = rope_backward(grad, cos, sin, rows.dtype())?.reshape((n, h * d))?;
    rows.slice_set(&dx, 1, col)
}
