//! The group advantages' launcher (`kernels/advantage.cu`): three or four
//! kernels (row scores, group statistics in row order, batch statistics,
//! the B×T write).

use super::runtime::{
    device_state, driver, grid, launch, threads_per_row, view, view_mut, CtxGuard, Result, View, NO_VIEW,
};
use super::sys::CUfunction;
use crate::error::Error;
use crate::ops::abi;
use crate::ops::advantage::{AdvantageProblem, Estimator};
use crate::tensor::{DType, Device, Tensor};
use std::ffi::c_void;

/// The kernels of one device.
pub struct Kernels {
    scores_f32: CUfunction,
    scores_f64: CUfunction,
    groups: CUfunction,
    batch: CUfunction,
    write_f32: CUfunction,
    write_f64: CUfunction,
}

impl Kernels {
    pub const NAMES: [&'static str; 6] = [
        "advantage_scores_f32",
        "advantage_scores_f64",
        "advantage_groups",
        "advantage_batch",
        "advantage_write_f32",
        "advantage_write_f64",
    ];

    pub fn load(get: &dyn Fn(&str) -> Result<CUfunction>) -> Result<Self> {
        let n = Self::NAMES;
        Ok(Kernels {
            scores_f32: get(n[0])?,
            scores_f64: get(n[1])?,
            groups: get(n[2])?,
            batch: get(n[3])?,
            write_f32: get(n[4])?,
            write_f64: get(n[5])?,
        })
    }
}

/// Threads per block of `advantage_groups` (one thread per sorted row).
const GROUP_THREADS: u32 = 128;

#[repr(C)]
struct AdvArgs {
    rewards: View,
    mask: View,
    out: View,
    index: *const i64,
    index_stride: i64,
    order: *const i64,
    order_stride: i64,
    scratch: *mut f64,
    rows: i64,
    cols: i64,
    estimator: i64,
    epsilon: f64,
    single: f64,
    f_norm: f64,
    need_mask: i64,
    mask_f64: i64,
    scores: View,
    weights: *const f64,
    n_keys: i64,
}

/// Checks an int64 vector of `rows` elements on `device` (any stride).
pub(crate) fn check_i64_vector(device: Device, d: &Tensor, rows: usize) -> Result<()> {
    if d.device != device {
        return Err(Error::value_error(d.arg, format!("is on {} but the inputs are on {device}", d.device)).into());
    }
    if d.dtype != DType::I64 || d.shape != [rows] {
        return Err(Error::value_error(
            d.arg,
            format!("expected an int64 tensor of shape ({rows},) on the device, got {} {:?}", d.dtype.name(), d.shape),
        )
        .into());
    }
    Ok(())
}

/// Enqueues a group advantage estimator on `stream`, with the semantics of
/// `cpu::advantage::compute`. `p.index` holds int64 group labels on the
/// device and `order` a stable argsort of them (int64, on the device), so
/// that each group is a contiguous run of `order` in row order; `scratch`
/// is float64 of at least `abi::advantage_scratch_len(rows)` elements. Launches three
/// or four kernels (scores, group statistics, batch statistics for `gpg`,
/// `reinforce_plus_plus_baseline` and `gdpo`, the B×T write) and returns at
/// once. `grpo_passk` cannot raise for a group of one row here (that would
/// need the labels on the host): such a row gets NaN; callers whose labels
/// are on the host refuse it first.
pub fn advantage(p: &AdvantageProblem, order: &Tensor, scratch: &Tensor, stream: usize) -> Result<()> {
    let (rows, cols) = (p.rewards.rows, p.rewards.cols);
    let device = p.rewards.tensor.device;
    check_i64_vector(device, &p.index, rows)?;
    check_i64_vector(device, order, rows)?;
    scratch.expect_f64_buffer(device, abi::advantage_scratch_len(rows))?;
    let d = driver()?;
    let s = device_state(&d, device)?;
    let k = &s.advantage;
    let estimator = match p.estimator {
        Estimator::Grpo { norm_by_std: true } => abi::EST_GRPO,
        Estimator::Grpo { norm_by_std: false } => abi::EST_GRPO_NOSTD,
        Estimator::Rloo => abi::EST_RLOO,
        Estimator::RlooVectorized => abi::EST_RLOO_VEC,
        Estimator::ReinforcePlusPlusBaseline => abi::EST_RFPP,
        Estimator::Opo => abi::EST_OPO,
        Estimator::Gpg => abi::EST_GPG,
        Estimator::GrpoPassk { norm_by_std: true } => abi::EST_PASSK,
        Estimator::GrpoPassk { norm_by_std: false } => abi::EST_PASSK_NOSTD,
        Estimator::Gdpo { norm_by_std: true } => abi::EST_GDPO,
        Estimator::Gdpo { norm_by_std: false } => abi::EST_GDPO_NOSTD,
    };
    let mut a = AdvArgs {
        rewards: view(&p.rewards),
        mask: view(&p.mask),
        out: view_mut(&p.out),
        index: p.index.ptr as *const i64,
        index_stride: p.index.strides[0] as i64,
        order: order.ptr as *const i64,
        order_stride: order.strides[0] as i64,
        scratch: scratch.ptr as *mut f64,
        rows: rows as i64,
        cols: cols as i64,
        estimator,
        epsilon: p.epsilon,
        // verl's singleton std is a float32 `tensor(1.0)`: `std + eps` is float32.
        single: (1.0f32 + p.epsilon as f32) as f64,
        f_norm: p.f_norm,
        need_mask: p.estimator.needs_mask_stats() as i64,
        mask_f64: (p.mask.tensor.dtype == DType::F64) as i64,
        scores: p.keys.as_ref().map_or(NO_VIEW, |k| view(&k.scores)),
        weights: p.keys.as_ref().map_or(std::ptr::null(), |k| k.weights.ptr as *const f64),
        n_keys: p.keys.as_ref().map_or(0, |k| k.scores.cols as i64),
    };
    // f64 math when the rewards or the output are float64, as `cpu::advantage::compute`.
    let f64_math = p.rewards.tensor.dtype == DType::F64 || p.out.tensor.dtype == DType::F64;
    let (rows_fn, write_fn) =
        if f64_math { (k.scores_f64, k.write_f64) } else { (k.scores_f32, k.write_f32) };
    let batch = p.estimator == Estimator::Gpg || p.estimator.whitens();
    let (g, tpr) = (grid(rows)?, threads_per_row(cols));
    let args = &mut a as *mut _ as *mut c_void;
    let _g = CtxGuard::push(&d, s.ctx)?;
    // SAFETY: the struct matches kernels/advantage.cu; the tensors are kept alive by
    // the caller and used on its stream, so stream order protects them.
    unsafe {
        launch(&d, rows_fn, g, tpr, stream, args)?;
        launch(&d, k.groups, g.div_ceil(GROUP_THREADS), GROUP_THREADS, stream, args)?;
        if batch {
            launch(&d, k.batch, 1, 256, stream, args)?;
        }
        launch(&d, write_fn, g, tpr, stream, args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layout_matches_the_kernel() {
        // AdvArgs: 3 views + 5 pointers/strides + 3 words + 3 doubles + 2 words,
        // then the per-key scores' view, the weights pointer and n_keys
        assert_eq!(std::mem::size_of::<AdvArgs>(), 3 * 32 + 5 * 8 + 3 * 8 + 3 * 8 + 2 * 8 + 32 + 2 * 8);
        assert_eq!(std::mem::offset_of!(AdvArgs, scratch), 3 * 32 + 4 * 8);
        assert_eq!(std::mem::offset_of!(AdvArgs, epsilon), 3 * 32 + 8 * 8);
        assert_eq!(std::mem::offset_of!(AdvArgs, scores), 3 * 32 + 13 * 8);
        assert_eq!(std::mem::offset_of!(AdvArgs, n_keys), 4 * 32 + 14 * 8);
    }
}
