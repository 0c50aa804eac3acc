//! The loss kernels' launcher (`kernels/loss.cu`): the policy loss, verl's
//! value loss (a rule of the policy loss, `ops::value_loss`) and verl's
//! `agg_loss` share the same two kernels, and backward is
//! [`scale_grad`].
//!
//! A call zeroes two tickets and launches two kernels, then returns: a team
//! of threads per row sums the row's mask (and GSPO's log-ratio) and the
//! last block to finish derives the batch-wide scale; then the token pass
//! writes the final gradient and the row sums, and its last block writes the
//! loss and verl's metrics. [`scale_grad`] leaves the gradient untouched
//! when `grad_output` is 1.

use super::runtime::{
    device_state, driver, dtype_code, grid, launch, rt, view, view_mut, CtxGuard, Result, View,
    NO_VIEW,
};
use super::sys::{self, CUfunction};
use crate::error::Error;
use crate::ops::abi;
use crate::ops::LossOutputs;
use crate::ops::agg_loss::{AggMode, AggProblem, Normalizers};
use crate::ops::policy_loss::{LossMode, ModeKnobs, PolicyLossProblem};
use crate::tensor::{DType, Device, Mat, MatMut, Tensor};
use std::ffi::c_void;

/// The loss kernels' arguments (`LossArgs` in kernels/loss.cu).
#[repr(C)]
struct LossArgs {
    old_lp: View,
    lp: View,
    adv: View,
    mask: View,
    w: View,
    grad: View,
    loss: View,
    metrics: *mut f64,
    scratch: *mut f64,
    factor: *const f64,
    rows: i64,
    cols: i64,
    mode: i64,
    agg: i64,
    lo: f64,
    hi: f64,
    c: f64,
    clamp_closed: i64,
    dp_size: f64,
    batch_num_tokens: f64,
    global_batch_size: f64,
    loss_scale_factor: f64,
    team: i64,
    vec: i64,
    picks: View,
    tau_pos: f64,
    tau_neg: f64,
    beta: f64,
    kl_coef: f64,
}

/// The token kernels' rules, by name suffix: vanilla, GSPO / LUSPO,
/// agg_loss, the value loss, the other token rules (`ext`: CISPO,
/// SAPO, GPG, REINFORCE, DRO, DPPO-TV / KL, Clip-Cov, KL-Cov), and GMPO
/// (`geo`: its row sums are in `loss_rows`, its loss is their mean).
const TOKEN_RULES: [&str; 6] = ["vanilla", "seq", "agg", "value", "ext", "geo"];

/// Which instantiation of the loss kernels runs: 16-byte runs of one float
/// storage type, or element-wise loads of any dtypes (f32 or f64 math).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    F32,
    Bf16,
    F16,
    F64,
    Any32,
    Any64,
}

impl Variant {
    const ALL: [Variant; 6] = [Variant::F32, Variant::Bf16, Variant::F16, Variant::F64, Variant::Any32, Variant::Any64];

    fn suffix(self) -> &'static str {
        match self {
            Variant::F32 => "f32",
            Variant::Bf16 => "bf16",
            Variant::F16 => "f16",
            Variant::F64 => "f64",
            Variant::Any32 => "any32",
            Variant::Any64 => "any64",
        }
    }

    /// Tokens per run (`S::V` in kernels/loss.cu): one 16-byte load of f32 or
    /// f64, one 8-byte load of bf16 or f16.
    fn run(self) -> usize {
        match self {
            Variant::F32 | Variant::Any32 | Variant::Bf16 | Variant::F16 => 4,
            Variant::F64 | Variant::Any64 => 2,
        }
    }

    /// The vector variant for float operands stored as `d`, computing in f64 or f32.
    fn choose(d: DType, f64_math: bool, vector: bool) -> Variant {
        match (vector, d, f64_math) {
            (true, DType::F64, true) => Variant::F64,
            (true, DType::F32, false) => Variant::F32,
            (true, DType::BF16, false) => Variant::Bf16,
            (true, DType::F16, false) => Variant::F16,
            (_, _, true) => Variant::Any64,
            _ => Variant::Any32,
        }
    }
}

/// The loss kernels of one device: `loss_rows_*` indexed by `Variant`,
/// `loss_tokens_*` by `Variant` and token rule, and `scale_grad`.
pub struct Kernels {
    /// `loss_rows_*`, then GMPO's `loss_rows_*_geo`, by `Variant`.
    rows: [[CUfunction; 2]; 6],
    tokens: [[CUfunction; 6]; 6],
    scale_grad: CUfunction,
}

impl Kernels {
    /// Every entry point, by name.
    pub fn names() -> Vec<String> {
        let mut n: Vec<String> = Variant::ALL.iter().map(|v| format!("loss_rows_{}", v.suffix())).collect();
        n.extend(Variant::ALL.iter().map(|v| format!("loss_rows_{}_geo", v.suffix())));
        for v in Variant::ALL {
            n.extend(TOKEN_RULES.iter().map(|rule| format!("loss_tokens_{}_{rule}", v.suffix())));
        }
        n.push("scale_grad".into());
        n
    }

    pub fn load(get: &dyn Fn(&str) -> Result<CUfunction>) -> Result<Self> {
        let mut rows = [[std::ptr::null_mut(); 2]; 6];
        let mut tokens = [[std::ptr::null_mut(); 6]; 6];
        for (k, v) in Variant::ALL.iter().enumerate() {
            rows[k] = [get(&format!("loss_rows_{}", v.suffix()))?, get(&format!("loss_rows_{}_geo", v.suffix()))?];
            for (j, rule) in TOKEN_RULES.iter().enumerate() {
                tokens[k][j] = get(&format!("loss_tokens_{}_{rule}", v.suffix()))?;
            }
        }
        Ok(Kernels { rows, tokens, scale_grad: get("scale_grad")? })
    }
}

/// Threads per row of the loss kernels: a power of two in [32, 512], about
/// four runs of `run` tokens per thread. Depends on `cols` and the variant
/// only, so the summation order (and every bit of the result) is the same
/// run after run.
fn team_size(cols: usize, run: usize) -> u32 {
    (cols.div_ceil(4 * run)).next_power_of_two().clamp(32, abi::MAX_THREADS as usize) as u32
}

/// Whether a `(rows, cols)` float operand can be read (or written) in
/// 16-byte runs: stored as `dtype`, contiguous rows starting on 16 bytes.
/// An absent or per-row (broadcast) operand is read element-wise either way.
fn runs_ok(v: &View, rows: usize, dtype: DType) -> bool {
    if v.ptr.is_null() || v.cs == 0 {
        return true;
    }
    let size = dtype.size() as i64;
    v.dtype == dtype_code(dtype) && v.cs == 1 && (v.ptr as usize).is_multiple_of(16) && (rows <= 1 || (v.rs * size) % 16 == 0)
}

/// Whether the mask can be read in runs of `run` bytes: a 1-byte dtype,
/// contiguous rows starting on `run` bytes.
fn mask_runs_ok(m: &View, rows: usize, run: usize) -> bool {
    let run = run as i64;
    let one_byte = m.dtype == dtype_code(DType::U8) || m.dtype == dtype_code(DType::I8);
    one_byte && m.cs == 1 && (m.ptr as usize as i64) % run == 0 && (rows <= 1 || m.rs % run == 0)
}

/// Whether a vector kernel's token pass can read the mask (`load_mask_vec`
/// in kernels/loss.cu): in runs of `run` values with no element-wise dtype
/// switch, i.e. a 1-byte mask as [`mask_runs_ok`], or an int64 (verl's
/// `response_mask`) or float32 mask with contiguous rows starting on 16
/// bytes. Any other mask runs the element-wise (`any`) kernels.
fn mask_vec_ok(m: &View, rows: usize, run: usize) -> bool {
    let size = if m.dtype == dtype_code(DType::I64) {
        8
    } else if m.dtype == dtype_code(DType::F32) {
        4
    } else {
        return mask_runs_ok(m, rows, run);
    };
    m.cs == 1 && (m.ptr as usize).is_multiple_of(16) && (rows <= 1 || (m.rs * size) % 16 == 0)
}

fn agg_code(a: AggMode) -> i64 {
    match a {
        AggMode::TokenMean => abi::AGG_TOKEN_MEAN,
        AggMode::TokenSum => abi::AGG_TOKEN_SUM,
        AggMode::SeqMeanTokenSum => abi::AGG_SEQ_SUM,
        AggMode::SeqMeanTokenMean => abi::AGG_SEQ_MEAN,
        AggMode::SeqMeanTokenSumNorm => abi::AGG_SEQ_SUM_NORM,
    }
}

/// What differs between the policy loss and `agg_loss` in one launch of the loss kernels.
struct LossLaunch<'a> {
    old_lp: View,
    lp: &'a Mat,
    adv: View,
    mask: &'a Mat,
    w: Option<&'a Mat>,
    grad: &'a MatMut,
    mode: i64,
    agg: AggMode,
    norm: &'a Normalizers,
    clip: (f64, f64, f64, bool),
    picks: Option<&'a Mat>,
    knobs: ModeKnobs,
    f64_math: bool,
    /// The length diagnostics are wanted (policy loss only).
    diagnostics: bool,
    /// GMPO's `d` rounded to f32 in f64 math (`PolicyLossProblem::geo_narrow`).
    narrow: bool,
}

/// Zeroes the tickets and enqueues both loss kernels on `stream`.
fn launch_loss(l: &LossLaunch<'_>, b: &LossOutputs<'_>, scratch: &Tensor, device: Device, stream: usize) -> Result<()> {
    let (rows, cols) = (l.lp.rows, l.lp.cols);
    b.check(device, l.mode != abi::MODE_AGG)?;
    scratch.expect_f64_buffer(device, abi::loss_scratch_len(rows))?;
    let d = driver()?;
    let s = device_state(&d, device)?;
    let (lp, grad, mask, w) = (view(l.lp), view_mut(l.grad), view(l.mask), l.w.map(view).unwrap_or(NO_VIEW));
    // 16-byte runs when every (rows, cols) float operand, the gradient
    // included, is stored as log_prob is and laid out for them, and the mask
    // and the picks can be read in runs of the vector kernel's tokens.
    let dt = l.lp.tensor.dtype;
    let vector_run = Variant::choose(dt, l.f64_math, true).run();
    let vector = [&lp, &l.old_lp, &l.adv, &w, &grad].iter().all(|v| runs_ok(v, rows, dt))
        && mask_vec_ok(&mask, rows, vector_run)
        && l.picks.is_none_or(|p| mask_runs_ok(&view(p), rows, vector_run));
    let variant = Variant::choose(dt, l.f64_math, vector);
    let run = variant.run();
    let team = team_size(cols, run);
    let block = team.max(256);
    let blocks = grid(rows.div_ceil((block / team) as usize).max(1))?;
    let vec = if mask_runs_ok(&mask, rows, run) { abi::VEC_MASK } else { 0 }
        | if mask_runs_ok(&mask, rows, 16) { abi::VEC_MASK16 } else { 0 }
        | if l.diagnostics { abi::VEC_DIAGNOSTICS } else { 0 }
        | if l.narrow { abi::VEC_NARROW } else { 0 };
    let n = l.norm;
    let (lo, hi, c, closed) = l.clip;
    let mut a = LossArgs {
        old_lp: l.old_lp,
        lp,
        adv: l.adv,
        mask,
        w,
        grad,
        loss: View { ptr: b.loss.ptr, rs: 0, cs: 0, dtype: dtype_code(b.loss.dtype) },
        metrics: b.metrics.map_or(std::ptr::null_mut(), |m| m.ptr as *mut f64),
        scratch: scratch.ptr as *mut f64,
        factor: b.factor.map_or(std::ptr::null(), |f| f.ptr as *const f64),
        rows: rows as i64,
        cols: cols as i64,
        mode: l.mode,
        agg: agg_code(l.agg),
        lo,
        hi,
        c,
        clamp_closed: closed as i64,
        dp_size: n.dp_size,
        batch_num_tokens: n.batch_num_tokens.unwrap_or(-1.0),
        global_batch_size: n.global_batch_size.unwrap_or(-1.0),
        loss_scale_factor: n.loss_scale_factor.unwrap_or(-1.0),
        team: team as i64,
        vec,
        picks: l.picks.map(view).unwrap_or(NO_VIEW),
        tau_pos: l.knobs.tau_pos,
        tau_neg: l.knobs.tau_neg,
        beta: l.knobs.beta,
        kl_coef: l.knobs.kl_coef,
    };
    let k = Variant::ALL.iter().position(|v| *v == variant).unwrap();
    let args = &mut a as *mut _ as *mut c_void;
    let _g = CtxGuard::push(&d, s.ctx)?;
    // SAFETY: the struct matches kernels/loss.cu; the tensors are kept alive by
    // the caller and used on its stream, so stream order protects them.
    unsafe {
        rt(d.check("cuMemsetD32Async", (d.cuMemsetD32Async)(scratch.ptr as u64, 0, 2, stream as sys::CUstream)))?;
        launch(&d, s.loss.rows[k][(l.mode == abi::MODE_GEO_MEAN) as usize], blocks, block, stream, args)?;
        let rule = match l.mode {
            abi::MODE_VANILLA => 0,
            abi::MODE_GSPO | abi::MODE_LUSPO => 1,
            abi::MODE_AGG => 2,
            abi::MODE_VALUE => 3,
            abi::MODE_GEO_MEAN => 5,
            _ => 4,
        };
        launch(&d, s.loss.tokens[k][rule], blocks, block, stream, args)
    }
}

/// `(lo, hi, c, closed)` of `LossArgs`: the ratio's clip bounds
/// `[1 - low, 1 + high]`, except for DPPO, whose bounds are the divergence
/// thresholds `low` and `high` themselves, and GMPO, which clamps the
/// log-ratio to `[-low, high]`.
fn clip_of(p: &PolicyLossProblem) -> (f64, f64, f64, bool) {
    let c = &p.clip;
    match p.mode {
        LossMode::DppoTv | LossMode::DppoKl => (c.low, c.high, c.c, c.clamp_closed),
        LossMode::GeoMean => {
            let g = p.geo_clip();
            (-g.low, g.high, g.c, g.clamp_closed)
        }
        _ => (1.0 - c.low, 1.0 + c.high, c.c, c.clamp_closed),
    }
}

/// Enqueues the fused policy loss (or, in `LossMode::Value`, verl's value
/// loss, with `vf_clipfrac` as the first metric) on `stream` (a `CUstream` of the inputs'
/// device, 0 for the legacy default stream): the final `d loss / d log_prob`
/// into `p.grad`, the loss into `b.loss`, verl's metrics into `b.metrics`;
/// `scratch` is float64, `abi::loss_scratch_len(rows)` values on the device.
/// Returns as soon as the work is queued (a memset and two kernels).
pub fn policy_loss(p: &PolicyLossProblem, b: &LossOutputs<'_>, scratch: &Tensor, stream: usize) -> Result<()> {
    let mode = match p.mode {
        LossMode::Vanilla => abi::MODE_VANILLA,
        LossMode::Gspo => abi::MODE_GSPO,
        LossMode::Luspo => abi::MODE_LUSPO,
        LossMode::Value => abi::MODE_VALUE,
        LossMode::Cispo => abi::MODE_CISPO,
        LossMode::Sapo => abi::MODE_SAPO,
        LossMode::GeoMean => abi::MODE_GEO_MEAN,
        LossMode::Gpg => abi::MODE_GPG,
        LossMode::ClipCov => abi::MODE_CLIP_COV,
        LossMode::KlCov => abi::MODE_KL_COV,
        LossMode::DppoTv => abi::MODE_DPPO_TV,
        LossMode::DppoKl => abi::MODE_DPPO_KL,
        LossMode::Dro => abi::MODE_DRO,
        LossMode::Reinforce => abi::MODE_REINFORCE,
    };
    let l = LossLaunch {
        old_lp: view(&p.old_log_prob),
        lp: &p.log_prob,
        adv: view(&p.advantages),
        mask: &p.response_mask,
        w: p.rollout_is_weights.as_ref(),
        grad: &p.grad,
        mode,
        agg: p.agg,
        norm: &p.norm,
        clip: clip_of(p),
        picks: p.picks.as_ref(),
        knobs: p.knobs,
        f64_math: p.wants_f64(),
        diagnostics: p.diagnostics,
        narrow: p.geo_narrow(),
    };
    launch_loss(&l, b, scratch, p.device, stream)
}

/// Enqueues verl's `agg_loss` on `stream`: the final `d loss / d loss_mat`
/// into `p.grad` and the loss into `b.loss` (`b.metrics` must be none).
pub fn agg_loss(p: &AggProblem, b: &LossOutputs<'_>, scratch: &Tensor, stream: usize) -> Result<()> {
    let l = LossLaunch {
        old_lp: NO_VIEW,
        lp: &p.loss_mat,
        adv: NO_VIEW,
        mask: &p.loss_mask,
        w: None,
        grad: &p.grad,
        mode: abi::MODE_AGG,
        agg: p.agg,
        norm: &p.norm,
        clip: (0.0, 0.0, 0.0, false),
        picks: None,
        knobs: ModeKnobs::default(),
        f64_math: p.loss_mat.tensor.dtype == DType::F64,
        diagnostics: false,
        narrow: false,
    };
    launch_loss(&l, b, scratch, p.loss_mat.tensor.device, stream)
}

#[repr(C)]
struct ScaleArgs {
    grad: View,
    grad_output: View,
    n: i64,
}

/// Enqueues `grad *= grad_output` in place (backward of the loss kernels):
/// `grad` a contiguous float tensor on the device, `grad_output` a 1-element
/// float tensor there. Where `grad_output` is 1 the kernel leaves `grad`
/// untouched (no pass over it), which is the `loss.backward()` case.
pub fn scale_grad(grad: &Tensor, grad_output: &Tensor, stream: usize) -> Result<()> {
    let device = grad.device;
    if !grad.dtype.is_float() || grad.read_only || !grad.is_contiguous() || (grad.ptr as usize) % 16 != 0 {
        return Err(Error::value_error(grad.arg, "expected a writable contiguous float tensor, 16-byte aligned").into());
    }
    let n: usize = grad.shape.iter().product();
    if grad_output.device != device || !grad_output.dtype.is_float() || grad_output.shape.iter().product::<usize>() != 1 {
        return Err(Error::value_error(
            grad_output.arg,
            format!("expected a 1-element float tensor on {device}"),
        )
        .into());
    }
    if n == 0 {
        return Ok(());
    }
    let d = driver()?;
    let s = device_state(&d, device)?;
    let mut a = ScaleArgs {
        grad: View { ptr: grad.ptr, rs: 0, cs: 1, dtype: dtype_code(grad.dtype) },
        grad_output: View { ptr: grad_output.ptr, rs: 0, cs: 0, dtype: dtype_code(grad_output.dtype) },
        n: n as i64,
    };
    // a grid-stride loop: a few blocks per multiprocessor are enough for a stream
    let blocks = grid(n.div_ceil(256 * 8).clamp(1, 1024))?;
    let _g = CtxGuard::push(&d, s.ctx)?;
    // SAFETY: the struct matches kernels/loss.cu; the caller keeps both tensors alive on its stream.
    unsafe { launch(&d, s.loss.scale_grad, blocks, 256, stream, &mut a as *mut _ as *mut c_void) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teams_are_powers_of_two_in_range() {
        for cols in [1, 7, 64, 300, 513, 4096, 16384, 1 << 20] {
            for run in [2, 4, 8] {
                let t = team_size(cols, run);
                assert!(t.is_power_of_two() && (32..=abi::MAX_THREADS as u32).contains(&t), "{cols} {run} -> {t}");
            }
        }
        assert_eq!(team_size(16384, 4), 512);
        assert_eq!(team_size(300, 4), 32);
    }

    #[test]
    fn runs_need_one_dtype_contiguous_rows_and_alignment() {
        let v = |ptr: usize, rs: i64, cs: i64, dt: DType| View { ptr: ptr as *const u8, rs, cs, dtype: dtype_code(dt) };
        assert!(runs_ok(&v(4096, 1024, 1, DType::F32), 8, DType::F32));
        assert!(!runs_ok(&v(4096, 1024, 1, DType::BF16), 8, DType::F32));
        assert!(!runs_ok(&v(4100, 1024, 1, DType::F32), 8, DType::F32));
        assert!(!runs_ok(&v(4096, 1023, 1, DType::F32), 8, DType::F32));
        assert!(runs_ok(&v(4096, 1023, 1, DType::F32), 1, DType::F32));
        assert!(!runs_ok(&v(4096, 1, 1024, DType::F32), 8, DType::F32));
        assert!(runs_ok(&v(4100, 1, 0, DType::BF16), 8, DType::F32), "per-row views are read once per row");
        assert!(runs_ok(&NO_VIEW, 8, DType::F32));
        assert!(mask_runs_ok(&v(4096, 300, 1, DType::Bool), 8, 4));
        assert!(!mask_runs_ok(&v(4096, 301, 1, DType::Bool), 8, 4));
        assert!(!mask_runs_ok(&v(4096, 300, 1, DType::F32), 8, 4));
        assert!(mask_vec_ok(&v(4096, 300, 1, DType::Bool), 8, 4));
        assert!(!mask_vec_ok(&v(4096, 301, 1, DType::U8), 8, 4));
        assert!(mask_vec_ok(&v(4096, 302, 1, DType::I64), 8, 4));
        assert!(!mask_vec_ok(&v(4096, 301, 1, DType::I64), 8, 4), "rows off 16 bytes");
        assert!(mask_vec_ok(&v(4096, 301, 1, DType::I64), 1, 4), "one row");
        assert!(!mask_vec_ok(&v(4104, 302, 1, DType::I64), 8, 4));
        assert!(mask_vec_ok(&v(4096, 300, 1, DType::F32), 8, 4));
        assert!(!mask_vec_ok(&v(4096, 302, 1, DType::F32), 8, 4));
        assert!(!mask_vec_ok(&v(4096, 300, 2, DType::F32), 8, 4), "strided columns");
        assert!(!mask_vec_ok(&v(4096, 300, 0, DType::I64), 8, 4), "broadcast");
        for dt in [DType::F64, DType::I32, DType::I16, DType::F16, DType::BF16] {
            assert!(!mask_vec_ok(&v(4096, 256, 1, dt), 8, 4), "{dt:?}: element-wise kernels");
        }
    }

    #[test]
    fn struct_layouts_match_kernels() {
        // View: 4 x 8 bytes; LossArgs: 7 views + 3 pointers + 4 words + 3 doubles
        // + 1 word + 4 doubles + 2 words, then a view and 4 doubles; ScaleArgs: 2 views + 1 word.
        assert_eq!(std::mem::size_of::<View>(), 32);
        assert_eq!(std::mem::size_of::<LossArgs>(), 7 * 32 + 3 * 8 + 4 * 8 + 3 * 8 + 8 + 4 * 8 + 2 * 8 + 32 + 4 * 8);
        assert_eq!(std::mem::offset_of!(LossArgs, picks), 7 * 32 + 3 * 8 + 4 * 8 + 3 * 8 + 8 + 4 * 8 + 2 * 8);
        assert_eq!(std::mem::offset_of!(LossArgs, rows), 7 * 32 + 3 * 8);
        assert_eq!(std::mem::offset_of!(LossArgs, dp_size), 7 * 32 + 3 * 8 + 4 * 8 + 4 * 8);
        assert_eq!(std::mem::size_of::<ScaleArgs>(), 2 * 32 + 8);
    }
}
