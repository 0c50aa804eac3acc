//! `kl_penalty`'s launcher (`kernels/kl_penalty.cu`): one elementwise
//! kernel, a block per [`geometry`] chunk of a row, value and gradient in one pass.

use super::runtime::{device_state, driver, grid, launch, threads_per_row, view, view_mut, CtxGuard, Result, View, NO_VIEW};
use super::sys::CUfunction;
use crate::ops::abi;
use crate::ops::kl_penalty::{KlKind, KlProblem};
use crate::tensor::DType;
use std::ffi::c_void;

/// The kernels of one device, by math type.
pub struct Kernels {
    f32: CUfunction,
    f64: CUfunction,
}

impl Kernels {
    pub const NAMES: [&'static str; 2] = ["kl_penalty_f32", "kl_penalty_f64"];

    pub fn load(get: &dyn Fn(&str) -> Result<CUfunction>) -> Result<Self> {
        Ok(Kernels { f32: get(Self::NAMES[0])?, f64: get(Self::NAMES[1])? })
    }
}

#[repr(C)]
struct KlArgs {
    lp: View,
    rf: View,
    out: View,
    grad: View,
    rows: i64,
    cols: i64,
    kind: i64,
    straight_through: i64,
    clamp_closed: i64,
    chunk: i64,
}

/// `(blocks, threads, chunk)`: a block per `chunk` columns of each row
/// (eight elements a thread), so a 1-D input, one long row, fills the device.
fn geometry(rows: usize, cols: usize) -> (usize, u32, usize) {
    let threads = threads_per_row(cols);
    let chunk = threads as usize * 8;
    (rows * cols.div_ceil(chunk).max(1), threads, chunk)
}

/// Enqueues verl's `kl_penalty` on `stream`: the estimate into `p.out` and,
/// when given, `d out / d logprob` into `p.grad`, elementwise (a block per
/// row). Returns as soon as the kernel is queued.
pub fn kl_penalty(p: &KlProblem, stream: usize) -> Result<()> {
    let (rows, cols) = (p.logprob.rows, p.logprob.cols);
    let d = driver()?;
    let s = device_state(&d, p.logprob.tensor.device)?;
    let mut a = KlArgs {
        lp: view(&p.logprob),
        rf: view(&p.ref_logprob),
        out: view_mut(&p.out),
        grad: p.grad.as_ref().map(view_mut).unwrap_or(NO_VIEW),
        rows: rows as i64,
        cols: cols as i64,
        kind: match p.mode.kind {
            KlKind::K1 => abi::KL_K1,
            KlKind::Abs => abi::KL_ABS,
            KlKind::K2 => abi::KL_K2,
            KlKind::K3 => abi::KL_K3,
        },
        straight_through: p.mode.straight_through as i64,
        clamp_closed: p.clamp_closed as i64,
        chunk: 0,
    };
    let (blocks, threads, chunk) = geometry(rows, cols);
    a.chunk = chunk as i64;
    // f64 math when any operand is float64, as `cpu::kl_penalty::compute`.
    let f64_math = [&p.logprob.tensor, &p.ref_logprob.tensor, &p.out.tensor].iter().any(|d| d.dtype == DType::F64);
    let f = if f64_math { s.kl_penalty.f64 } else { s.kl_penalty.f32 };
    let _g = CtxGuard::push(&d, s.ctx)?;
    // SAFETY: the struct matches kernels/kl_penalty.cu; the tensors are kept alive by
    // the caller and used on its stream.
    unsafe { launch(&d, f, grid(blocks)?, threads, stream, &mut a as *mut _ as *mut c_void) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_row_takes_many_blocks() {
        let (blocks, threads, chunk) = geometry(1, 1 << 20);
        assert_eq!((threads, chunk), (512, 4096));
        assert_eq!(blocks, 256);
        assert_eq!(geometry(64, 300).0, 64, "short rows: a block each");
        assert_eq!(geometry(3, 4097).0, 6);
    }

    #[test]
    fn struct_layout_matches_the_kernel() {
        // KlArgs: 4 views + 6 words
        assert_eq!(std::mem::size_of::<KlArgs>(), 4 * 32 + 6 * 8);
        assert_eq!(std::mem::offset_of!(KlArgs, kind), 4 * 32 + 2 * 8);
    }
}
