//! The loss ops' outputs on the CPU, as the CUDA kernels write them: the
//! loss into a 0-d tensor of its dtype and verl's metrics into a float64
//! buffer (a `factor` is already in the loss and the gradient: it is part of
//! the aggregation's scale, `Normalizers::factor`); and backward, which
//! scales the saved gradient in place by `grad_output` (nothing to do for
//! `loss.backward()`'s seed of 1).

use crate::error::{Error, Result};
use crate::ops::{abi, LossOutputs};
use crate::tensor::{DType, Device, Real, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// The value of a 1-element float tensor on the CPU.
pub fn scalar(t: &Tensor) -> Result<f64> {
    if t.device != Device::Cpu || !t.dtype.is_float() || t.shape.iter().product::<usize>() != 1 {
        return Err(Error::value_error(t.arg, "expected a 1-element float tensor on the CPU"));
    }
    // SAFETY: a validated 1-element float tensor.
    Ok(unsafe { f64::read(t.ptr, t.dtype) })
}

/// Writes `loss` and the metrics.
pub fn write(out: &LossOutputs<'_>, loss: f64, metrics: Option<&[f64; abi::METRICS_LEN as usize]>) -> Result<()> {
    out.check(Device::Cpu, metrics.is_some())?;
    // SAFETY: `check` validated a writable 0-d float tensor and a writable
    // contiguous float64 buffer of METRICS_LEN values.
    unsafe {
        match out.loss.dtype {
            // torch converts float64 to a 16-bit float through float32, and
            // any NaN to the positive quiet NaN; so do we
            DType::BF16 | DType::F16 => {
                let x = if loss.is_nan() { f32::NAN } else { loss as f32 };
                x.write(out.loss.ptr, out.loss.dtype)
            }
            _ => loss.write(out.loss.ptr, out.loss.dtype),
        }
        if let (Some(m), Some(v)) = (out.metrics, metrics) {
            std::ptr::copy_nonoverlapping(v.as_ptr(), m.ptr as *mut f64, v.len());
        }
    }
    Ok(())
}

/// `grad *= grad_output` in place, as torch's `grad * grad_output` rounds
/// it (in f32 for 16- and 32-bit gradients, in f64 for float64). Returns
/// whether `grad` changed: a `grad_output` of exactly 1 leaves it untouched.
pub fn scale_grad(grad: &Tensor, grad_output: &Tensor) -> Result<bool> {
    let g = scalar(grad_output)?;
    if g == 1.0 {
        return Ok(false);
    }
    scale(grad, None, g)?;
    Ok(true)
}

/// `out = grad * grad_output` out of place, rounded as [`scale_grad`]
/// rounds it (a `grad_output` of 1 copies): the backward of the losses'
/// `torch.library` ops, which must not change the gradient they saved.
pub fn grad_times(grad: &Tensor, grad_output: &Tensor, out: &Tensor) -> Result<()> {
    let g = scalar(grad_output)?;
    if grad.device != Device::Cpu || !grad.dtype.is_float() || !grad.is_contiguous() {
        return Err(Error::value_error(grad.arg, "expected a contiguous float tensor on the CPU"));
    }
    if out.shape != grad.shape || out.dtype != grad.dtype {
        return Err(Error::value_error(
            out.arg,
            format!("expected grad's shape {:?} and dtype {:?}, got {:?} and {:?}", grad.shape, grad.dtype, out.shape, out.dtype),
        ));
    }
    scale(out, Some(grad), g)
}

/// Elements per rayon task of [`scale`].
const CHUNK: usize = 1 << 16;

/// `out = src * g` (`src`: `out` itself when `None`), `src` and `out` of one
/// shape and dtype.
fn scale(out: &Tensor, src: Option<&Tensor>, g: f64) -> Result<()> {
    if out.device != Device::Cpu || !out.dtype.is_float() || out.read_only || !out.is_contiguous() {
        return Err(Error::value_error(out.arg, "expected a writable contiguous float tensor on the CPU"));
    }
    let n: usize = out.shape.iter().product();
    if n == 0 {
        return Ok(()); // (an empty tensor's pointer may be null: no slice of it)
    }
    let from = src.map_or(out.ptr as *const u8, |s| s.ptr as *const u8);
    /// # Safety: `p` holds `n` contiguous writable `T`, used by no one else
    /// now; `q` holds `n` readable `T`, either `p` itself or disjoint from it.
    unsafe fn each<T: Copy + Send + Sync>(p: *mut u8, q: *const u8, n: usize, f: impl Fn(T) -> T + Sync) {
        let xs = std::slice::from_raw_parts_mut(p as *mut T, n);
        if q == p as *const u8 {
            if super::pool::inline() {
                xs.iter_mut().for_each(|x| *x = f(*x));
            } else {
                xs.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|x| *x = f(*x)));
            }
            return;
        }
        let ys = std::slice::from_raw_parts(q as *const T, n);
        let run = |c: &mut [T], d: &[T]| c.iter_mut().zip(d).for_each(|(x, &y)| *x = f(y));
        if super::pool::inline() {
            run(xs, ys);
        } else {
            xs.par_chunks_mut(CHUNK).zip(ys.par_chunks(CHUNK)).for_each(|(c, d)| run(c, d));
        }
    }
    let g32 = g as f32;
    // SAFETY: validated: contiguous, `n` elements of `dtype` each, `out`
    // writable; the Python layer refuses an output that shares memory with an input.
    unsafe {
        match out.dtype {
            DType::F64 => each(out.ptr, from, n, |x: f64| x * g),
            DType::F32 => each(out.ptr, from, n, |x: f32| x * g32),
            DType::BF16 => each(out.ptr, from, n, |x: bf16| bf16::from_f32(x.to_f32() * g32)),
            DType::F16 => each(out.ptr, from, n, |x: f16| f16::from_f32(x.to_f32() * g32)),
            _ => unreachable!("checked to be floating point"),
        }
    }
    Ok(())
}
