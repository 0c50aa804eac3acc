//! The scan estimators' launcher (`kernels/returns.cu`): GAE, REINFORCE++
//! and ReMax. A block per row scans its row in chunks (one per thread,
//! chained through their affine maps), then, for GAE and REINFORCE++, one
//! block takes the whitening statistics and a block per row whitens.

use super::runtime::{device_state, driver, grid, launch, threads_per_row, view, view_mut, CtxGuard, Result, View, NO_VIEW};
use super::sys::CUfunction;
use crate::ops::abi;
use crate::ops::returns::{ReturnsEstimator, ReturnsProblem};
use crate::tensor::Tensor;
use std::ffi::c_void;

/// The kernels of one device.
pub struct Kernels {
    scan_f32: CUfunction,
    scan_f64: CUfunction,
    batch: CUfunction,
    whiten_f32: CUfunction,
    whiten_f64: CUfunction,
}

impl Kernels {
    pub const NAMES: [&'static str; 5] =
        ["returns_scan_f32", "returns_scan_f64", "returns_batch", "returns_whiten_f32", "returns_whiten_f64"];

    pub fn load(get: &dyn Fn(&str) -> Result<CUfunction>) -> Result<Self> {
        let n = Self::NAMES;
        Ok(Kernels {
            scan_f32: get(n[0])?,
            scan_f64: get(n[1])?,
            batch: get(n[2])?,
            whiten_f32: get(n[3])?,
            whiten_f64: get(n[4])?,
        })
    }
}

#[repr(C)]
struct ScanArgs {
    rewards: View,
    values: View,
    baselines: View,
    mask: View,
    advantages: View,
    returns: View,
    scratch: *mut f64,
    rows: i64,
    cols: i64,
    estimator: i64,
    gamma: f64,
    c: f64,
    mask_f64: i64,
}

/// Enqueues a scan estimator on `stream`, with the semantics of
/// `cpu::returns::compute` (to a few ulps: the chunks' incoming states come
/// from maps composed in float64). `scratch` is float64 of at least
/// `abi::returns_scratch_len(rows)` elements. Returns at once.
pub fn returns(p: &ReturnsProblem, scratch: &Tensor, stream: usize) -> Result<()> {
    let (rows, cols) = (p.rewards.rows, p.rewards.cols);
    let device = p.rewards.tensor.device;
    scratch.expect_f64_buffer(device, abi::returns_scratch_len(rows))?;
    let d = driver()?;
    let s = device_state(&d, device)?;
    let k = &s.returns;
    let (estimator, gamma, lam) = match p.estimator {
        ReturnsEstimator::Gae { gamma, lam } => (abi::SCAN_GAE, gamma, lam),
        ReturnsEstimator::ReinforcePlusPlus { gamma } => (abi::SCAN_RFPP, gamma, 1.0),
        ReturnsEstimator::Remax => (abi::SCAN_REMAX, 1.0, 1.0),
    };
    let mut a = ScanArgs {
        rewards: view(&p.rewards),
        values: p.values.as_ref().map(view).unwrap_or(NO_VIEW),
        baselines: p.baselines.as_ref().map(view).unwrap_or(NO_VIEW),
        mask: view(&p.mask),
        advantages: view_mut(&p.advantages),
        returns: view_mut(&p.returns),
        scratch: scratch.ptr as *mut f64,
        rows: rows as i64,
        cols: cols as i64,
        estimator,
        gamma,
        // verl's `gamma * lam * g`: Python multiplies the two floats first
        c: gamma * lam,
        mask_f64: p.mask_f64() as i64,
    };
    let (scan, whiten) = if p.f64_math() { (k.scan_f64, k.whiten_f64) } else { (k.scan_f32, k.whiten_f32) };
    let g = grid(rows)?;
    let args = &mut a as *mut _ as *mut c_void;
    let _g = CtxGuard::push(&d, s.ctx)?;
    // SAFETY: the struct matches kernels/returns.cu; the tensors are kept alive by
    // the caller and used on its stream, so stream order protects them.
    unsafe {
        launch(&d, scan, g, abi::SCAN_THREADS as u32, stream, args)?;
        if p.estimator.whitens() {
            launch(&d, k.batch, 1, abi::SCAN_THREADS as u32, stream, args)?; // block_merge holds SCAN_THREADS
            launch(&d, whiten, g, threads_per_row(cols), stream, args)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layout_matches_the_kernel() {
        // ScanArgs: 6 views + 1 pointer + 3 words + 2 doubles + 1 word
        assert_eq!(std::mem::size_of::<ScanArgs>(), 6 * 32 + 8 + 3 * 8 + 2 * 8 + 8);
        assert_eq!(std::mem::offset_of!(ScanArgs, scratch), 6 * 32);
        assert_eq!(std::mem::offset_of!(ScanArgs, gamma), 6 * 32 + 4 * 8);
    }
}
