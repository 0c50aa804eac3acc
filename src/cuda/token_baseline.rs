//! The optimal token baselines' launcher (`kernels/token_baseline.cu`): a
//! block per row for the returns and lengths, then a block per position of
//! `order` that does the group starting there (columns or valid-token ranks
//! in tiles of `abi::TB_THREADS`). Twin of `cpu/token_baseline.rs`.

use super::advantage::check_i64_vector;
use super::runtime::{device_state, driver, grid, launch, view, view_mut, CtxGuard, Result, View, NO_VIEW};
use super::sys::CUfunction;
use crate::ops::abi;
use crate::ops::token_baseline::{TokenBaseline, TokenBaselineProblem};
use crate::tensor::Tensor;
use std::ffi::c_void;

/// The kernels of one device.
pub struct Kernels {
    rows_f32: CUfunction,
    rows_f64: CUfunction,
    groups_f32: CUfunction,
    groups_f64: CUfunction,
}

impl Kernels {
    pub const NAMES: [&'static str; 4] =
        ["token_baseline_rows_f32", "token_baseline_rows_f64", "token_baseline_groups_f32", "token_baseline_groups_f64"];

    pub fn load(get: &dyn Fn(&str) -> Result<CUfunction>) -> Result<Self> {
        let n = Self::NAMES;
        Ok(Kernels { rows_f32: get(n[0])?, rows_f64: get(n[1])?, groups_f32: get(n[2])?, groups_f64: get(n[3])? })
    }
}

#[repr(C)]
struct TbArgs {
    rewards: View,
    mask: View,
    old: View,
    sp: View,
    rho: View,
    advantages: View,
    returns: View,
    index: *const i64,
    index_stride: i64,
    order: *const i64,
    order_stride: i64,
    scratch: *mut f64,
    rows: i64,
    cols: i64,
    tir: i64,
    has_rho: i64,
    zero_tail: i64,
    rounding: i64,
    mask_sum_f32: i64,
    epsilon: f64,
}

/// Enqueues a token baseline on `stream`, with the semantics of
/// `cpu::token_baseline::compute` (W to a few float64 ulps: its running sums
/// go through block scans). `p.index` holds int64 group labels on the
/// device and `order` a stable argsort of them (int64, on the device);
/// `scratch` is float64 of at least `abi::token_baseline_scratch_len(rows)`
/// elements. Launches two kernels and returns at once.
pub fn token_baseline(p: &TokenBaselineProblem, order: &Tensor, scratch: &Tensor, stream: usize) -> Result<()> {
    let (rows, cols) = (p.rewards.rows, p.rewards.cols);
    let device = p.rewards.tensor.device;
    check_i64_vector(device, &p.index, rows)?;
    check_i64_vector(device, order, rows)?;
    scratch.expect_f64_buffer(device, abi::token_baseline_scratch_len(rows))?;
    let d = driver()?;
    let s = device_state(&d, device)?;
    let k = &s.token_baseline;
    let rn = p.rounding();
    let bits = [(rn.pi, abi::TB_RD_PI), (rn.wp, abi::TB_RD_WP), (rn.q, abi::TB_RD_Q), (rn.w, abi::TB_RD_W), (rn.wc, abi::TB_RD_WC), (rn.r, abi::TB_RD_R)];
    let mut a = TbArgs {
        rewards: view(&p.rewards),
        mask: view(&p.mask),
        old: view(&p.old_log_probs),
        sp: view(&p.sum_pi_squared),
        rho: p.rollout_is_weights.as_ref().map(view).unwrap_or(NO_VIEW),
        advantages: view_mut(&p.advantages),
        returns: view_mut(&p.returns),
        index: p.index.ptr as *const i64,
        index_stride: p.index.strides[0] as i64,
        order: order.ptr as *const i64,
        order_stride: order.strides[0] as i64,
        scratch: scratch.ptr as *mut f64,
        rows: rows as i64,
        cols: cols as i64,
        tir: (p.estimator == TokenBaseline::Tir) as i64,
        has_rho: p.rollout_is_weights.is_some() as i64,
        zero_tail: p.handle_zero_tail as i64,
        rounding: bits.iter().filter(|(on, _)| *on).map(|(_, b)| b).sum(),
        mask_sum_f32: p.mask_sum_f32() as i64,
        epsilon: p.epsilon,
    };
    let (rows_fn, groups_fn) = if p.f64_math() { (k.rows_f64, k.groups_f64) } else { (k.rows_f32, k.groups_f32) };
    let g = grid(rows)?;
    let args = &mut a as *mut _ as *mut c_void;
    let _g = CtxGuard::push(&d, s.ctx)?;
    // SAFETY: the struct matches kernels/token_baseline.cu; the tensors are kept alive
    // by the caller and used on its stream, so stream order protects them.
    unsafe {
        launch(&d, rows_fn, g, abi::TB_THREADS as u32, stream, args)?;
        launch(&d, groups_fn, g, abi::TB_THREADS as u32, stream, args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layout_matches_the_kernel() {
        // TbArgs: 7 views + 5 pointers/strides + 7 words + 1 double
        assert_eq!(std::mem::size_of::<TbArgs>(), 7 * 32 + 5 * 8 + 7 * 8 + 8);
        assert_eq!(std::mem::offset_of!(TbArgs, scratch), 7 * 32 + 4 * 8);
        assert_eq!(std::mem::offset_of!(TbArgs, epsilon), 7 * 32 + 12 * 8);
    }
}
