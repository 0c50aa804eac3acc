//! CUDA backend: the hand-written kernels of `kernels.cu`, compiled at run
//! time by NVRTC for each device's architecture (cached per device), loaded
//! and launched through the CUDA driver API on the caller's stream. Both
//! libraries are opened with `dlopen` ([`sys`]), so nothing here is needed
//! to build or import the crate.
//!
//! A policy loss or `agg_loss` call launches two kernels and returns at
//! once: a block per row writes the gradient (divided by the batch-wide
//! aggregation factor, see `kernels.cu`) and the row's partial sums into a
//! `(rows, 5)` float64 scratch buffer; one block reduces those rows in a
//! fixed order into `out = [loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower,
//! scale]`. `kl_penalty` is one elementwise kernel; the group advantages are
//! three or four (row scores, group statistics in row order, batch
//! statistics, the B×T write; see [`advantage`]). Every buffer is the
//! caller's (torch allocates them); nothing is copied, allocated or
//! synchronised here.

pub mod sys;

use crate::cpu::advantage::{AdvantageProblem, Estimator};
use crate::cpu::agg::AggProblem;
use crate::cpu::kl::{KlKind, KlProblem};
use crate::error::Error;
use crate::policy::PolicyLossProblem;
use crate::spec::{AggMode, LossMode, Normalizers};
use crate::tensor::{DType, Desc, Device, Mat, MatMut};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use sys::{CUcontext, CUfunction, Driver, Nvrtc};

/// The kernel source, embedded in the crate.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Number of values written to `out` and of partials per row.
pub const OUT_LEN: usize = 5;
const NSTAT: usize = 5;

/// A CUDA-side failure.
#[derive(Debug)]
pub enum CudaError {
    /// A bad argument (wrong device, shape, dtype of a buffer).
    Arg(Error),
    /// No driver / NVRTC, unsupported architecture, compile or launch failure.
    Runtime(String),
}

impl From<Error> for CudaError {
    fn from(e: Error) -> Self {
        CudaError::Arg(e)
    }
}

type Result<T> = std::result::Result<T, CudaError>;

fn rt<T>(r: std::result::Result<T, String>) -> Result<T> {
    r.map_err(CudaError::Runtime)
}

// ---------------------------------------------------------------- libraries

static NVRTC_HINTS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static NVRTC: Mutex<Option<Arc<Nvrtc>>> = Mutex::new(None);
static DRIVER: OnceLock<std::result::Result<Arc<Driver>, String>> = OnceLock::new();

/// Directories to search for NVRTC before the system paths (the Python layer
/// passes PyTorch's `site-packages/nvidia/*/lib`).
pub fn set_nvrtc_hints(dirs: Vec<PathBuf>) {
    *NVRTC_HINTS.lock().unwrap() = dirs;
}

/// The loaded NVRTC, loading it on first use (a failure is not cached, so a
/// later call can succeed after the search path changes).
pub fn nvrtc() -> std::result::Result<Arc<Nvrtc>, String> {
    let mut g = NVRTC.lock().unwrap();
    if let Some(n) = g.as_ref() {
        return Ok(n.clone());
    }
    let hints = NVRTC_HINTS.lock().unwrap().clone();
    let n = Arc::new(Nvrtc::load(&hints)?);
    *g = Some(n.clone());
    Ok(n)
}

fn driver() -> Result<Arc<Driver>> {
    let d = DRIVER.get_or_init(|| {
        let d = Driver::load()?;
        // SAFETY: cuInit(0) is the documented first call.
        d.check("cuInit", unsafe { (d.cuInit)(0) })?;
        Ok(Arc::new(d))
    });
    rt(d.clone())
}

// ---------------------------------------------------------------- compile

/// What NVRTC should produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// PTX for the virtual architecture `compute_XY`.
    Ptx,
    /// SASS (a cubin) for the real architecture `sm_XY`.
    Cubin,
}

/// Compiles [`SOURCE`] for compute capability `major.minor`. A rejected
/// architecture and any compile error come back with NVRTC's log.
pub fn compile(nvrtc: &Nvrtc, major: i32, minor: i32, target: Target) -> std::result::Result<Vec<u8>, String> {
    let arch = match target {
        Target::Ptx => format!("--gpu-architecture=compute_{major}{minor}"),
        Target::Cubin => format!("--gpu-architecture=sm_{major}{minor}"),
    };
    // No fused multiply-add contraction: closer to the CPU reference, and
    // the kernels are memory-bound anyway.
    let opts: Vec<CString> = [arch.as_str(), "--fmad=false", "--std=c++14"]
        .iter()
        .map(|s| CString::new(*s).unwrap())
        .collect();
    let opt_ptrs: Vec<*const std::ffi::c_char> = opts.iter().map(|s| s.as_ptr()).collect();
    let src = CString::new(SOURCE).unwrap();
    let name = CString::new("luspo_rs_kernels.cu").unwrap();
    let mut prog: sys::NvrtcProgram = std::ptr::null_mut();
    // SAFETY: NVRTC calls with valid C strings and out-parameters; the
    // program is destroyed on every path below.
    unsafe {
        nvrtc.check(
            "nvrtcCreateProgram",
            (nvrtc.nvrtcCreateProgram)(&mut prog, src.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null()),
        )?;
        let r = (nvrtc.nvrtcCompileProgram)(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
        let result = if r != 0 {
            let mut n = 0usize;
            (nvrtc.nvrtcGetProgramLogSize)(prog, &mut n);
            let mut log = vec![0u8; n.max(1)];
            (nvrtc.nvrtcGetProgramLog)(prog, log.as_mut_ptr() as *mut _);
            let log = String::from_utf8_lossy(&log).trim_end_matches('\0').trim().to_string();
            let (ma, mi) = nvrtc.version();
            Err(format!(
                "NVRTC {ma}.{mi} ({}) could not compile the luspo_rs kernels with {arch}: {}{}",
                nvrtc.path.display(),
                nvrtc.check("nvrtcCompileProgram", r).unwrap_err(),
                if log.is_empty() { String::new() } else { format!("\n{log}") }
            ))
        } else {
            let (size_fn, get_fn, what) = match target {
                Target::Ptx => (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX, "nvrtcGetPTX"),
                Target::Cubin => (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN, "nvrtcGetCUBIN"),
            };
            let mut n = 0usize;
            match nvrtc.check(what, size_fn(prog, &mut n)) {
                Ok(()) => {
                    let mut buf = vec![0u8; n];
                    nvrtc.check(what, get_fn(prog, buf.as_mut_ptr() as *mut _)).map(|_| buf)
                }
                Err(e) => Err(e),
            }
        };
        (nvrtc.nvrtcDestroyProgram)(&mut prog);
        result
    }
}

// ---------------------------------------------------------------- devices

/// A device's primary context (the one PyTorch uses) and the loaded kernels.
struct DeviceState {
    ctx: CUcontext,
    policy_f32: CUfunction,
    policy_f64: CUfunction,
    agg_f32: CUfunction,
    agg_f64: CUfunction,
    finalize: CUfunction,
    kl_f32: CUfunction,
    kl_f64: CUfunction,
    adv_rows_f32: CUfunction,
    adv_rows_f64: CUfunction,
    adv_groups: CUfunction,
    adv_batch: CUfunction,
    adv_write_f32: CUfunction,
    adv_write_f64: CUfunction,
}

// SAFETY: context and function handles are process-wide driver objects,
// usable from any thread once the context is made current.
unsafe impl Send for DeviceState {}
unsafe impl Sync for DeviceState {}

static DEVICES: Mutex<Option<HashMap<i32, Arc<DeviceState>>>> = Mutex::new(None);

/// Makes `ctx` current for the scope.
struct CtxGuard<'a>(&'a Driver);

impl<'a> CtxGuard<'a> {
    fn push(d: &'a Driver, ctx: CUcontext) -> Result<Self> {
        // SAFETY: a retained primary context.
        rt(d.check("cuCtxPushCurrent", unsafe { (d.cuCtxPushCurrent_v2)(ctx) }))?;
        Ok(CtxGuard(d))
    }
}

impl Drop for CtxGuard<'_> {
    fn drop(&mut self) {
        let mut c: CUcontext = std::ptr::null_mut();
        // SAFETY: pops the context pushed by `push`.
        unsafe { (self.0.cuCtxPopCurrent_v2)(&mut c) };
    }
}

/// The compiled kernels for device `ordinal`, compiling them on first use.
fn device(d: &Driver, ordinal: i32) -> Result<Arc<DeviceState>> {
    let mut g = DEVICES.lock().unwrap();
    let map = g.get_or_insert_with(HashMap::new);
    if let Some(s) = map.get(&ordinal) {
        return Ok(s.clone());
    }
    // SAFETY: driver calls with valid out-parameters; the context is
    // retained for the life of the process (it is PyTorch's as well).
    let state = unsafe {
        let mut count = 0;
        rt(d.check("cuDeviceGetCount", (d.cuDeviceGetCount)(&mut count)))?;
        if ordinal < 0 || ordinal >= count {
            return Err(CudaError::Runtime(format!("cuda:{ordinal} does not exist ({count} CUDA devices visible)")));
        }
        let mut dev = 0;
        rt(d.check("cuDeviceGet", (d.cuDeviceGet)(&mut dev, ordinal)))?;
        let (mut major, mut minor) = (0, 0);
        rt(d.check(
            "cuDeviceGetAttribute",
            (d.cuDeviceGetAttribute)(&mut major, sys::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
        ))?;
        rt(d.check(
            "cuDeviceGetAttribute",
            (d.cuDeviceGetAttribute)(&mut minor, sys::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
        ))?;
        if major < 7 {
            return Err(CudaError::Runtime(format!(
                "cuda:{ordinal} has compute capability {major}.{minor}; luspo_rs needs 7.0 or newer"
            )));
        }
        let nv = rt(nvrtc())?;
        let image = rt(compile(&nv, major, minor, Target::Cubin).map_err(|e| {
            format!("cuda:{ordinal} (sm_{major}{minor}) is not supported by this NVRTC, or the kernels failed to compile: {e}")
        }))?;
        let mut ctx: CUcontext = std::ptr::null_mut();
        rt(d.check("cuDevicePrimaryCtxRetain", (d.cuDevicePrimaryCtxRetain)(&mut ctx, dev)))?;
        let _g = CtxGuard::push(d, ctx)?;
        let mut module: sys::CUmodule = std::ptr::null_mut();
        rt(d.check("cuModuleLoadData", (d.cuModuleLoadData)(&mut module, image.as_ptr() as *const c_void)))?;
        let get = |name: &str| -> Result<CUfunction> {
            let mut f: CUfunction = std::ptr::null_mut();
            let c = CString::new(name).unwrap();
            rt(d.check("cuModuleGetFunction", (d.cuModuleGetFunction)(&mut f, module, c.as_ptr())))?;
            Ok(f)
        };
        DeviceState {
            ctx,
            policy_f32: get("luspo_policy_rows_f32")?,
            policy_f64: get("luspo_policy_rows_f64")?,
            agg_f32: get("luspo_agg_rows_f32")?,
            agg_f64: get("luspo_agg_rows_f64")?,
            finalize: get("luspo_finalize")?,
            kl_f32: get("luspo_kl_f32")?,
            kl_f64: get("luspo_kl_f64")?,
            adv_rows_f32: get("luspo_adv_rows_f32")?,
            adv_rows_f64: get("luspo_adv_rows_f64")?,
            adv_groups: get("luspo_adv_groups")?,
            adv_batch: get("luspo_adv_batch")?,
            adv_write_f32: get("luspo_adv_write_f32")?,
            adv_write_f64: get("luspo_adv_write_f64")?,
        }
    };
    let s = Arc::new(state);
    map.insert(ordinal, s.clone());
    Ok(s)
}

// ---------------------------------------------------------------- launch

/// A strided view as the kernels take it (`View` / `ViewMut` in kernels.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct View {
    ptr: *const u8,
    rs: i64,
    cs: i64,
    dtype: i64,
}

fn dtype_code(d: DType) -> i64 {
    match d {
        DType::F64 => 0,
        DType::F32 => 1,
        DType::BF16 => 2,
        DType::F16 => 3,
        DType::Bool | DType::U8 => 4,
        DType::I8 => 5,
        DType::I16 => 6,
        DType::I32 => 7,
        DType::I64 => 8,
    }
}

fn view(m: &Mat) -> View {
    let cs = if m.is_per_row() { 0 } else { m.desc.strides[1] as i64 };
    View { ptr: m.desc.ptr, rs: m.desc.strides[0] as i64, cs, dtype: dtype_code(m.desc.dtype) }
}

fn view_mut(m: &MatMut) -> View {
    View { ptr: m.desc.ptr, rs: m.desc.strides[0] as i64, cs: m.desc.strides[1] as i64, dtype: dtype_code(m.desc.dtype) }
}

const NO_VIEW: View = View { ptr: std::ptr::null(), rs: 0, cs: 0, dtype: 1 };

#[repr(C)]
struct PolicyArgs {
    old_lp: View,
    lp: View,
    adv: View,
    mask: View,
    w: View,
    grad: View,
    partials: *mut f64,
    rows: i64,
    cols: i64,
    mode: i64,
    agg: i64,
    lo: f64,
    hi: f64,
    c: f64,
    clamp_closed: i64,
}

#[repr(C)]
struct AggArgs {
    loss: View,
    mask: View,
    grad: View,
    partials: *mut f64,
    rows: i64,
    cols: i64,
    agg: i64,
}

#[repr(C)]
struct FinalizeArgs {
    partials: *const f64,
    out: *mut f64,
    rows: i64,
    cols: i64,
    agg: i64,
    dp_size: f64,
    batch_num_tokens: f64,
    global_batch_size: f64,
    loss_scale_factor: f64,
    mask_f64: i64,
}

fn agg_code(a: AggMode) -> i64 {
    match a {
        AggMode::TokenMean => 0,
        AggMode::TokenSum => 1,
        AggMode::SeqMeanTokenSum => 2,
        AggMode::SeqMeanTokenMean => 3,
        AggMode::SeqMeanTokenSumNorm => 4,
    }
}

/// Threads per row block: a power of two, about 8 elements per thread,
/// between 64 and 512. Depends on `cols` only, so the reduction order (and
/// so every bit of the result) is the same run after run.
pub fn threads_per_row(cols: usize) -> u32 {
    (cols.div_ceil(8)).next_power_of_two().clamp(64, 512) as u32
}

/// Checks the caller-allocated `out` (>= 5 float64) and `scratch`
/// (>= 5 * rows float64) buffers: contiguous, writable, on `device`.
fn check_buffers(device: Device, rows: usize, out: &Desc, scratch: &Desc) -> Result<()> {
    check_f64(device, out, OUT_LEN)?;
    check_f64(device, scratch, NSTAT * rows)
}

/// Whether `d` is a contiguous tensor (size-1 dimensions may have any stride).
fn is_contiguous(d: &Desc) -> bool {
    let mut expect = 1isize;
    for k in (0..d.shape.len()).rev() {
        if d.shape[k] > 1 && d.strides[k] != expect {
            return false;
        }
        expect *= d.shape[k] as isize;
    }
    true
}

/// Checks a caller-allocated float64 buffer: at least `need` elements,
/// contiguous, writable, on `device`.
fn check_f64(device: Device, d: &Desc, need: usize) -> Result<()> {
    if d.device != device {
        return Err(Error::value_error(d.arg, format!("is on {} but the inputs are on {device}", d.device)).into());
    }
    let n: usize = d.shape.iter().product();
    if d.dtype != DType::F64 || n < need || d.read_only || !is_contiguous(d) {
        return Err(Error::value_error(
            d.arg,
            format!("expected a writable contiguous float64 tensor with at least {need} elements"),
        )
        .into());
    }
    Ok(())
}

fn ordinal(device: Device) -> Result<i32> {
    match device {
        Device::Cuda(i) => Ok(i),
        Device::Cpu => Err(CudaError::Runtime("internal: CPU tensors reached the CUDA backend".into())),
    }
}

/// # Safety
/// `args` must point at the argument struct `f` takes; every pointer in it
/// must stay valid until the stream reaches the kernel.
unsafe fn launch(d: &Driver, f: CUfunction, grid: u32, block: u32, stream: usize, args: *mut c_void) -> Result<()> {
    let mut params = [args];
    rt(d.check(
        "cuLaunchKernel",
        (d.cuLaunchKernel)(f, grid, 1, 1, block, 1, 1, 0, stream as sys::CUstream, params.as_mut_ptr(), std::ptr::null_mut()),
    ))
}

fn finalize_args(partials: &Desc, out: &Desc, mask: &Mat, agg: AggMode, n: &Normalizers) -> FinalizeArgs {
    FinalizeArgs {
        partials: partials.ptr as *const f64,
        out: out.ptr as *mut f64,
        rows: mask.rows as i64,
        cols: mask.cols as i64,
        agg: agg_code(agg),
        dp_size: n.dp_size,
        batch_num_tokens: n.batch_num_tokens.unwrap_or(-1.0),
        global_batch_size: n.global_batch_size.unwrap_or(-1.0),
        loss_scale_factor: n.loss_scale_factor.unwrap_or(-1.0),
        mask_f64: (mask.desc.dtype == DType::F64) as i64,
    }
}

/// Enqueues the fused policy loss on `stream` (a `CUstream` of the inputs'
/// device, 0 for the legacy default stream). Writes `d loss / d log_prob`
/// divided by `out[4]` into `p.grad`, the row partials into `scratch`, and
/// `[loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower, scale]` into `out`.
/// Returns as soon as both kernels are queued.
pub fn policy_loss(p: &PolicyLossProblem, scratch: &Desc, out: &Desc, stream: usize) -> Result<()> {
    let (rows, cols) = (p.log_prob.rows, p.log_prob.cols);
    check_buffers(p.device, rows, out, scratch)?;
    let d = driver()?;
    let s = device(&d, ordinal(p.device)?)?;
    let mut a = PolicyArgs {
        old_lp: view(&p.old_log_prob),
        lp: view(&p.log_prob),
        adv: view(&p.advantages),
        mask: view(&p.response_mask),
        w: p.rollout_is_weights.as_ref().map(view).unwrap_or(NO_VIEW),
        grad: view_mut(&p.grad),
        partials: scratch.ptr as *mut f64,
        rows: rows as i64,
        cols: cols as i64,
        mode: match p.mode {
            LossMode::Vanilla => 0,
            LossMode::Gspo => 1,
            LossMode::Luspo => 2,
        },
        agg: agg_code(p.agg),
        lo: 1.0 - p.clip.low,
        hi: 1.0 + p.clip.high,
        c: p.clip.c,
        clamp_closed: p.clip.clamp_closed as i64,
    };
    let mut f = finalize_args(scratch, out, &p.response_mask, p.agg, &p.norm);
    let rows_fn = if p.wants_f64() { s.policy_f64 } else { s.policy_f32 };
    let _g = CtxGuard::push(&d, s.ctx)?;
    // SAFETY: the structs match kernels.cu; the tensors are kept alive by
    // the caller and used on its stream, so stream order protects them.
    unsafe {
        launch(&d, rows_fn, grid(rows)?, threads_per_row(cols), stream, &mut a as *mut _ as *mut c_void)?;
        launch(&d, s.finalize, 1, 256, stream, &mut f as *mut _ as *mut c_void)
    }
}

/// Enqueues verl's `agg_loss` on `stream`: `d loss / d loss_mat` divided by
/// `out[4]` into `p.grad`, and `[loss, 0, 0, 0, scale]` into `out`.
pub fn agg_loss(p: &AggProblem, scratch: &Desc, out: &Desc, stream: usize) -> Result<()> {
    let (rows, cols) = (p.loss_mat.rows, p.loss_mat.cols);
    let device = p.loss_mat.desc.device;
    check_buffers(device, rows, out, scratch)?;
    let d = driver()?;
    let s = device_state(&d, device)?;
    let mut a = AggArgs {
        loss: view(&p.loss_mat),
        mask: view(&p.loss_mask),
        grad: view_mut(&p.grad),
        partials: scratch.ptr as *mut f64,
        rows: rows as i64,
        cols: cols as i64,
        agg: agg_code(p.agg),
    };
    let mut f = finalize_args(scratch, out, &p.loss_mask, p.agg, &p.norm);
    let rows_fn = if p.loss_mat.desc.dtype == DType::F64 { s.agg_f64 } else { s.agg_f32 };
    let _g = CtxGuard::push(&d, s.ctx)?;
    // SAFETY: as in `policy_loss`.
    unsafe {
        launch(&d, rows_fn, grid(rows)?, threads_per_row(cols), stream, &mut a as *mut _ as *mut c_void)?;
        launch(&d, s.finalize, 1, 256, stream, &mut f as *mut _ as *mut c_void)
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
}

/// Enqueues verl's `kl_penalty` on `stream`: the estimate into `p.out` and,
/// when given, `d out / d logprob` into `p.grad`, elementwise (a block per
/// row). Returns as soon as the kernel is queued.
pub fn kl_penalty(p: &KlProblem, stream: usize) -> Result<()> {
    let (rows, cols) = (p.logprob.rows, p.logprob.cols);
    let d = driver()?;
    let s = device_state(&d, p.logprob.desc.device)?;
    let mut a = KlArgs {
        lp: view(&p.logprob),
        rf: view(&p.ref_logprob),
        out: view_mut(&p.out),
        grad: p.grad.as_ref().map(view_mut).unwrap_or(NO_VIEW),
        rows: rows as i64,
        cols: cols as i64,
        kind: match p.mode.kind {
            KlKind::K1 => 0,
            KlKind::Abs => 1,
            KlKind::K2 => 2,
            KlKind::K3 => 3,
        },
        straight_through: p.mode.straight_through as i64,
        clamp_closed: p.clamp_closed as i64,
    };
    // f64 math when any operand is float64, as `cpu::kl::compute`.
    let f64_math = [&p.logprob.desc, &p.ref_logprob.desc, &p.out.desc].iter().any(|d| d.dtype == DType::F64);
    let f = if f64_math { s.kl_f64 } else { s.kl_f32 };
    let _g = CtxGuard::push(&d, s.ctx)?;
    // SAFETY: the struct matches kernels.cu; the tensors are kept alive by
    // the caller and used on its stream.
    unsafe { launch(&d, f, grid(rows)?, threads_per_row(cols), stream, &mut a as *mut _ as *mut c_void) }
}

/// float64 values of the advantage scratch per row (`ADV_NSTAT` in kernels.cu),
/// after which come 2 batch values.
pub const ADV_NSTAT: usize = 5;

/// Length of the float64 scratch [`advantage`] needs for `rows` rows.
pub fn advantage_scratch_len(rows: usize) -> usize {
    ADV_NSTAT * rows + 2
}

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
}

/// Checks an int64 vector of `rows` elements on `device` (any stride).
fn check_i64_vector(device: Device, d: &Desc, rows: usize) -> Result<()> {
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
/// is float64 of at least [`advantage_scratch_len`] elements. Launches three
/// or four kernels (scores, group statistics, batch statistics for `gpg` and
/// `reinforce_plus_plus_baseline`, the B×T write) and returns at once.
pub fn advantage(p: &AdvantageProblem, order: &Desc, scratch: &Desc, stream: usize) -> Result<()> {
    let (rows, cols) = (p.rewards.rows, p.rewards.cols);
    let device = p.rewards.desc.device;
    check_i64_vector(device, &p.index, rows)?;
    check_i64_vector(device, order, rows)?;
    check_f64(device, scratch, advantage_scratch_len(rows))?;
    let d = driver()?;
    let s = device_state(&d, device)?;
    let estimator = match p.estimator {
        Estimator::Grpo { norm_by_std: true } => 0,
        Estimator::Grpo { norm_by_std: false } => 1,
        Estimator::Rloo => 2,
        Estimator::RlooVectorized => 3,
        Estimator::ReinforcePlusPlusBaseline => 4,
        Estimator::Opo => 5,
        Estimator::Gpg => 6,
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
        need_mask: matches!(p.estimator, Estimator::Opo | Estimator::ReinforcePlusPlusBaseline) as i64,
    };
    // f64 math when the rewards or the output are float64, as `cpu::advantage::compute`.
    let f64_math = p.rewards.desc.dtype == DType::F64 || p.out.desc.dtype == DType::F64;
    let (rows_fn, write_fn) =
        if f64_math { (s.adv_rows_f64, s.adv_write_f64) } else { (s.adv_rows_f32, s.adv_write_f32) };
    let batch = matches!(p.estimator, Estimator::Gpg | Estimator::ReinforcePlusPlusBaseline);
    let (g, tpr) = (grid(rows)?, threads_per_row(cols));
    let args = &mut a as *mut _ as *mut c_void;
    let _g = CtxGuard::push(&d, s.ctx)?;
    // SAFETY: the struct matches kernels.cu; the tensors are kept alive by
    // the caller and used on its stream, so stream order protects them.
    unsafe {
        launch(&d, rows_fn, g, tpr, stream, args)?;
        launch(&d, s.adv_groups, g.div_ceil(GROUP_THREADS), GROUP_THREADS, stream, args)?;
        if batch {
            launch(&d, s.adv_batch, 1, 256, stream, args)?;
        }
        launch(&d, write_fn, g, tpr, stream, args)
    }
}

/// Threads per block of `luspo_adv_groups` (one thread per sorted row).
const GROUP_THREADS: u32 = 128;

fn device_state(d: &Driver, dev: Device) -> Result<Arc<DeviceState>> {
    device(d, ordinal(dev)?)
}

fn grid(rows: usize) -> Result<u32> {
    u32::try_from(rows)
        .ok()
        .filter(|&r| r < (1u32 << 31))
        .ok_or_else(|| CudaError::Runtime(format!("batch of {rows} rows exceeds the CUDA grid limit")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_are_powers_of_two_in_range() {
        for cols in [1, 7, 64, 513, 4096, 16384, 1 << 20] {
            let t = threads_per_row(cols);
            assert!(t.is_power_of_two() && (64..=512).contains(&t), "{cols} -> {t}");
        }
    }

    #[test]
    fn struct_layouts_match_kernels_cu() {
        // View: 4 x 8 bytes; PolicyArgs: 6 views + 5 words + 3 doubles + 1 word.
        assert_eq!(std::mem::size_of::<View>(), 32);
        assert_eq!(std::mem::size_of::<PolicyArgs>(), 6 * 32 + 5 * 8 + 3 * 8 + 8);
        assert_eq!(std::mem::size_of::<AggArgs>(), 3 * 32 + 4 * 8);
        assert_eq!(std::mem::size_of::<FinalizeArgs>(), 10 * 8);
        // KlArgs: 4 views + 5 words; AdvArgs: 3 views + 5 pointers/strides
        // + 3 words + 3 doubles + 1 word.
        assert_eq!(std::mem::size_of::<KlArgs>(), 4 * 32 + 5 * 8);
        assert_eq!(std::mem::size_of::<AdvArgs>(), 3 * 32 + 5 * 8 + 3 * 8 + 3 * 8 + 8);
        assert_eq!(std::mem::offset_of!(AdvArgs, scratch), 3 * 32 + 4 * 8);
        assert_eq!(std::mem::offset_of!(AdvArgs, epsilon), 3 * 32 + 8 * 8);
        assert_eq!(std::mem::offset_of!(KlArgs, kind), 4 * 32 + 2 * 8);
    }

    /// Every entry point [`device`] loads.
    const KERNELS: [&str; 13] = [
        "luspo_policy_rows_f32",
        "luspo_policy_rows_f64",
        "luspo_agg_rows_f32",
        "luspo_agg_rows_f64",
        "luspo_finalize",
        "luspo_kl_f32",
        "luspo_kl_f64",
        "luspo_adv_rows_f32",
        "luspo_adv_rows_f64",
        "luspo_adv_groups",
        "luspo_adv_batch",
        "luspo_adv_write_f32",
        "luspo_adv_write_f64",
    ];

    /// Compiles the kernels to PTX for sm_80 and sm_90 when an NVRTC is
    /// found (`LUSPO_RS_NVRTC`, CUDA_HOME, system paths, or the venv's
    /// PyTorch wheels next to this checkout); skipped with a message if none.
    #[test]
    fn kernels_compile_with_nvrtc_when_present() {
        let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
        let mut hints = Vec::new();
        if let Ok(pys) = std::fs::read_dir(&venv) {
            for py in pys.flatten() {
                if let Ok(nv) = std::fs::read_dir(py.path().join("site-packages/nvidia")) {
                    hints.extend(nv.flatten().map(|e| e.path().join("lib")));
                }
            }
        }
        set_nvrtc_hints(hints);
        let nv = match nvrtc() {
            Ok(n) => n,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        for (ma, mi) in [(8, 0), (9, 0)] {
            let ptx = compile(&nv, ma, mi, Target::Ptx).unwrap();
            let ptx = String::from_utf8_lossy(&ptx);
            for k in KERNELS {
                assert!(ptx.contains(&format!(".entry {k}")), "sm_{ma}{mi}: {k} missing from PTX");
            }
            assert!(!compile(&nv, ma, mi, Target::Cubin).unwrap().is_empty());
        }
    }
}
