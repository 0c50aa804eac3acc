//! CUDA backend: the hand-written kernels of `kernels.cu`, compiled at run
//! time by NVRTC for each device's architecture (cached per device), loaded
//! and launched through the CUDA driver API on the caller's stream. Both
//! libraries are opened with `dlopen` ([`sys`]), so nothing here is needed
//! to build or import the crate.
//!
//! A policy loss or `agg_loss` call zeroes two tickets and launches two
//! kernels, then returns: a team of threads per row sums the row's mask
//! (and GSPO's log-ratio) and the last block to finish derives the
//! batch-wide scale; then the token pass writes the final gradient and the
//! row sums, and its last block writes the loss and verl's metrics (see
//! "the loss kernels" in `kernels.cu`). Backward is [`scale_grad`], which
//! leaves the gradient untouched when `grad_output` is 1. `kl_penalty` is
//! one elementwise kernel; the group advantages are three or four (row
//! scores, group statistics in row order, batch statistics, the B×T write;
//! see [`advantage`]). Every buffer is the caller's (torch allocates them);
//! nothing is copied, allocated or synchronised here.

pub mod sys;

use crate::ops::advantage::{AdvantageProblem, Estimator};
use crate::ops::agg_loss::{AggMode, AggProblem, Normalizers};
use crate::ops::kl_penalty::{KlKind, KlProblem};
use crate::error::Error;
use crate::ops::policy_loss::{LossMode, PolicyLossProblem};
use crate::tensor::{DType, Tensor, Device, Mat, MatMut};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use sys::{CUcontext, CUfunction, Driver, Nvrtc};

/// The kernel source, embedded in the crate.
pub const SOURCE: &str = include_str!("kernels.cu");

/// float64 values of the loss kernels' scratch: a head, then per row
/// (`SCRATCH_HEAD` and `ROW_STRIDE` in kernels.cu).
pub const LOSS_SCRATCH_HEAD: usize = 4;
pub const LOSS_ROW_STRIDE: usize = 8;

/// Length of the float64 scratch [`policy_loss`] and [`agg_loss`] need for `rows` rows.
pub fn loss_scratch_len(rows: usize) -> usize {
    LOSS_SCRATCH_HEAD + LOSS_ROW_STRIDE * rows
}

/// The metrics [`policy_loss`] writes: `[pg_clipfrac, ppo_kl, pg_clipfrac_lower]`.
pub const METRICS_LEN: usize = 3;

/// Largest block of the loss kernels (`MAX_THREADS` in kernels.cu).
const MAX_THREADS: u32 = 512;

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

/// [`SOURCE`] after the `#define`s of `LUSPO_RS_CUDA_DEFINES` (e.g.
/// "LUSPO_RUNS=2 LUSPO_MIN_BLOCKS=1"): the kernels' compile-time tuning
/// knobs, for benchmarking variants without a rebuild.
fn full_source() -> String {
    let defines: String = std::env::var("LUSPO_RS_CUDA_DEFINES")
        .unwrap_or_default()
        .split_whitespace()
        .map(|d| format!("#define {}\n", d.replacen('=', " ", 1)))
        .collect();
    format!("{defines}{SOURCE}")
}

/// Where compiled kernels are kept between processes: `LUSPO_RS_CACHE_DIR`
/// (empty: no cache), else `$XDG_CACHE_HOME/luspo_rs`, else `~/.cache/luspo_rs`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LUSPO_RS_CACHE_DIR") {
        return (!d.is_empty()).then(|| PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("luspo_rs"))
}

/// The cubin for `sm_{major}{minor}`: read from the cache when a process
/// compiled the same source with the same NVRTC before (NVRTC takes
/// seconds, a read milliseconds), else compiled and written there (by a
/// rename, so a reader never sees half a file). A cache that cannot be read
/// or written is skipped.
fn cubin(nvrtc: &Nvrtc, major: i32, minor: i32) -> std::result::Result<Vec<u8>, String> {
    use std::hash::{Hash, Hasher};
    let src = full_source();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (src.as_str(), nvrtc.version(), major, minor, env!("CARGO_PKG_VERSION")).hash(&mut h);
    let path = cache_dir().map(|d| d.join(format!("kernels-sm_{major}{minor}-{:016x}.cubin", h.finish())));
    if let Some(img) = path.as_ref().and_then(|p| std::fs::read(p).ok()).filter(|b| b.starts_with(b"\x7fELF")) {
        return Ok(img);
    }
    let img = compile(nvrtc, major, minor, Target::Cubin)?;
    if let Some(p) = path {
        let tmp = p.with_extension(format!("{}.tmp", std::process::id()));
        let written = p.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok()) && std::fs::write(&tmp, &img).is_ok();
        if !(written && std::fs::rename(&tmp, &p).is_ok()) {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(img)
}

/// Compiles [`full_source`] for compute capability `major.minor`. A rejected
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
    let src = CString::new(full_source()).map_err(|e| e.to_string())?;
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
    /// `luspo_loss_rows_*` indexed by [`Variant`], and `luspo_loss_tokens_*`
    /// by [`Variant`] and token rule (vanilla, GSPO / LUSPO, agg_loss).
    loss_rows: [CUfunction; 6],
    loss_tokens: [[CUfunction; 3]; 6],
    scale_grad: CUfunction,
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
        let image = rt(cubin(&nv, major, minor).map_err(|e| {
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
            loss_rows: {
                let mut f = [std::ptr::null_mut(); 6];
                for (k, v) in Variant::ALL.iter().enumerate() {
                    f[k] = get(&format!("luspo_loss_rows_{}", v.suffix()))?;
                }
                f
            },
            loss_tokens: {
                let mut f = [[std::ptr::null_mut(); 3]; 6];
                for (k, v) in Variant::ALL.iter().enumerate() {
                    for (j, rule) in TOKEN_RULES.iter().enumerate() {
                        f[k][j] = get(&format!("luspo_loss_tokens_{}_{rule}", v.suffix()))?;
                    }
                }
                f
            },
            scale_grad: get("luspo_scale_grad")?,
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
    let cs = if m.is_per_row() { 0 } else { m.tensor.strides[1] as i64 };
    View { ptr: m.tensor.ptr, rs: m.tensor.strides[0] as i64, cs, dtype: dtype_code(m.tensor.dtype) }
}

fn view_mut(m: &MatMut) -> View {
    View { ptr: m.tensor.ptr, rs: m.tensor.strides[0] as i64, cs: m.tensor.strides[1] as i64, dtype: dtype_code(m.tensor.dtype) }
}

const NO_VIEW: View = View { ptr: std::ptr::null(), rs: 0, cs: 0, dtype: 1 };

/// The loss kernels' arguments (`LossArgs` in kernels.cu).
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
}

/// `MODE_AGG` in kernels.cu: the loss kernels computing verl's `agg_loss`.
const MODE_AGG: i64 = 3;
/// The token kernels' rules, by name suffix: vanilla, GSPO / LUSPO, agg_loss.
const TOKEN_RULES: [&str; 3] = ["vanilla", "seq", "agg"];
/// `LossArgs.vec` bits (`VEC_MASK`, `VEC_MASK16` in kernels.cu).
const VEC_MASK: i64 = 2;
const VEC_MASK16: i64 = 4;

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

    /// Tokens per run (`S::V` in kernels.cu): one 16-byte load of f32 or
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

/// Threads per row of the loss kernels: a power of two in [32, 512], about
/// four runs of `run` tokens per thread. Depends on `cols` and the variant
/// only, so the summation order (and every bit of the result) is the same
/// run after run.
fn team_size(cols: usize, run: usize) -> u32 {
    (cols.div_ceil(4 * run)).next_power_of_two().clamp(32, MAX_THREADS as usize) as u32
}

/// Whether a `(rows, cols)` float operand can be read (or written) in
/// 16-byte runs: stored as `dtype`, contiguous rows starting on 16 bytes.
/// An absent or per-row (broadcast) operand is read element-wise either way.
fn runs_ok(v: &View, rows: usize, dtype: DType) -> bool {
    if v.ptr.is_null() || v.cs == 0 {
        return true;
    }
    let size = dtype.size() as i64;
    v.dtype == dtype_code(dtype) && v.cs == 1 && (v.ptr as usize) % 16 == 0 && (rows <= 1 || (v.rs * size) % 16 == 0)
}

/// Whether the mask can be read in runs of `run` bytes: a 1-byte dtype,
/// contiguous rows starting on `run` bytes.
fn mask_runs_ok(m: &View, rows: usize, run: usize) -> bool {
    let run = run as i64;
    let one_byte = m.dtype == dtype_code(DType::U8) || m.dtype == dtype_code(DType::I8);
    one_byte && m.cs == 1 && (m.ptr as usize as i64) % run == 0 && (rows <= 1 || m.rs % run == 0)
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

/// Whether `d` is a contiguous tensor (size-1 dimensions may have any stride).
fn is_contiguous(d: &Tensor) -> bool {
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
fn check_f64(device: Device, d: &Tensor, need: usize) -> Result<()> {
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

/// The caller's buffers of one loss-kernel call (torch allocates them).
pub struct LossBuffers<'a> {
    /// 0-d, the loss, in any float dtype (the Python layer picks verl's:
    /// the promotion of the inputs' dtypes).
    pub loss: &'a Tensor,
    /// float64, [`METRICS_LEN`] values (policy loss only).
    pub metrics: Option<&'a Tensor>,
    /// float64, [`loss_scratch_len`] values.
    pub scratch: &'a Tensor,
    /// A device float64 scalar multiplying the loss and the gradient (the
    /// normalisers given as CUDA tensors), or none.
    pub factor: Option<&'a Tensor>,
}

impl LossBuffers<'_> {
    fn check(&self, device: Device, rows: usize, metrics: bool) -> Result<()> {
        let l = self.loss;
        if l.device != device || !l.dtype.is_float() || !l.shape.is_empty() || l.read_only {
            return Err(Error::value_error(l.arg, format!("expected a writable 0-d float tensor on {device}")).into());
        }
        match (self.metrics, metrics) {
            (Some(m), true) => check_f64(device, m, METRICS_LEN)?,
            (None, false) => {}
            (_, want) => {
                return Err(Error::value_error("out", if want { "required" } else { "unexpected" }).into());
            }
        }
        check_f64(device, self.scratch, loss_scratch_len(rows))?;
        if let Some(f) = self.factor {
            check_f64(device, f, 1)?;
        }
        Ok(())
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
    f64_math: bool,
}

/// Zeroes the tickets and enqueues both loss kernels on `stream`.
fn launch_loss(l: &LossLaunch<'_>, b: &LossBuffers<'_>, device: Device, stream: usize) -> Result<()> {
    let (rows, cols) = (l.lp.rows, l.lp.cols);
    b.check(device, rows, l.mode != MODE_AGG)?;
    let d = driver()?;
    let s = device_state(&d, device)?;
    let (lp, grad, mask, w) = (view(l.lp), view_mut(l.grad), view(l.mask), l.w.map(view).unwrap_or(NO_VIEW));
    // 16-byte runs when every (rows, cols) float operand, the gradient
    // included, is stored as log_prob is and laid out for them.
    let dt = l.lp.tensor.dtype;
    let vector = [&lp, &l.old_lp, &l.adv, &w, &grad].iter().all(|v| runs_ok(v, rows, dt));
    let variant = Variant::choose(dt, l.f64_math, vector);
    let run = variant.run();
    let team = team_size(cols, run);
    let block = team.max(256);
    let blocks = grid(rows.div_ceil((block / team) as usize).max(1))?;
    let vec = if mask_runs_ok(&mask, rows, run) { VEC_MASK } else { 0 }
        | if mask_runs_ok(&mask, rows, 16) { VEC_MASK16 } else { 0 };
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
        scratch: b.scratch.ptr as *mut f64,
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
    };
    let k = Variant::ALL.iter().position(|v| *v == variant).unwrap();
    let args = &mut a as *mut _ as *mut c_void;
    let _g = CtxGuard::push(&d, s.ctx)?;
    // SAFETY: the struct matches kernels.cu; the tensors are kept alive by
    // the caller and used on its stream, so stream order protects them.
    unsafe {
        rt(d.check("cuMemsetD32Async", (d.cuMemsetD32Async)(b.scratch.ptr as u64, 0, 2, stream as sys::CUstream)))?;
        launch(&d, s.loss_rows[k], blocks, block, stream, args)?;
        let rule = match l.mode {
            0 => 0,
            MODE_AGG => 2,
            _ => 1,
        };
        launch(&d, s.loss_tokens[k][rule], blocks, block, stream, args)
    }
}

fn clip_of(p: &PolicyLossProblem) -> (f64, f64, f64, bool) {
    (1.0 - p.clip.low, 1.0 + p.clip.high, p.clip.c, p.clip.clamp_closed)
}

/// Enqueues the fused policy loss on `stream` (a `CUstream` of the inputs'
/// device, 0 for the legacy default stream): the final `d loss / d log_prob`
/// into `p.grad`, the loss into `b.loss`, verl's metrics into `b.metrics`.
/// Returns as soon as the work is queued (a memset and two kernels).
pub fn policy_loss(p: &PolicyLossProblem, b: &LossBuffers<'_>, stream: usize) -> Result<()> {
    let mode = match p.mode {
        LossMode::Vanilla => 0,
        LossMode::Gspo => 1,
        LossMode::Luspo => 2,
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
        f64_math: p.wants_f64(),
    };
    launch_loss(&l, b, p.device, stream)
}

/// Enqueues verl's `agg_loss` on `stream`: the final `d loss / d loss_mat`
/// into `p.grad` and the loss into `b.loss` (`b.metrics` must be none).
pub fn agg_loss(p: &AggProblem, b: &LossBuffers<'_>, stream: usize) -> Result<()> {
    let l = LossLaunch {
        old_lp: NO_VIEW,
        lp: &p.loss_mat,
        adv: NO_VIEW,
        mask: &p.loss_mask,
        w: None,
        grad: &p.grad,
        mode: MODE_AGG,
        agg: p.agg,
        norm: &p.norm,
        clip: (0.0, 0.0, 0.0, false),
        f64_math: p.loss_mat.tensor.dtype == DType::F64,
    };
    launch_loss(&l, b, p.loss_mat.tensor.device, stream)
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
    if !grad.dtype.is_float() || grad.read_only || !is_contiguous(grad) || (grad.ptr as usize) % 16 != 0 {
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
    // SAFETY: the struct matches kernels.cu; the caller keeps both tensors alive on its stream.
    unsafe { launch(&d, s.scale_grad, blocks, 256, stream, &mut a as *mut _ as *mut c_void) }
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
    let s = device_state(&d, p.logprob.tensor.device)?;
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
    // f64 math when any operand is float64, as `cpu::kl_penalty::compute`.
    let f64_math = [&p.logprob.tensor, &p.ref_logprob.tensor, &p.out.tensor].iter().any(|d| d.dtype == DType::F64);
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
    mask_f64: i64,
}

/// Checks an int64 vector of `rows` elements on `device` (any stride).
fn check_i64_vector(device: Device, d: &Tensor, rows: usize) -> Result<()> {
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
pub fn advantage(p: &AdvantageProblem, order: &Tensor, scratch: &Tensor, stream: usize) -> Result<()> {
    let (rows, cols) = (p.rewards.rows, p.rewards.cols);
    let device = p.rewards.tensor.device;
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
        mask_f64: (p.mask.tensor.dtype == DType::F64) as i64,
    };
    // f64 math when the rewards or the output are float64, as `cpu::advantage::compute`.
    let f64_math = p.rewards.tensor.dtype == DType::F64 || p.out.tensor.dtype == DType::F64;
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
    fn teams_are_powers_of_two_in_range() {
        for cols in [1, 7, 64, 300, 513, 4096, 16384, 1 << 20] {
            for run in [2, 4, 8] {
                let t = team_size(cols, run);
                assert!(t.is_power_of_two() && (32..=MAX_THREADS).contains(&t), "{cols} {run} -> {t}");
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
    }

    #[test]
    fn block_sizes_are_powers_of_two_in_range() {
        for cols in [1, 7, 64, 513, 4096, 16384, 1 << 20] {
            let t = threads_per_row(cols);
            assert!(t.is_power_of_two() && (64..=512).contains(&t), "{cols} -> {t}");
        }
    }

    #[test]
    fn struct_layouts_match_kernels_cu() {
        // View: 4 x 8 bytes; LossArgs: 7 views + 3 pointers + 4 words + 3 doubles
        // + 1 word + 4 doubles + 2 words; ScaleArgs: 2 views + 1 word.
        assert_eq!(std::mem::size_of::<View>(), 32);
        assert_eq!(std::mem::size_of::<LossArgs>(), 7 * 32 + 3 * 8 + 4 * 8 + 3 * 8 + 8 + 4 * 8 + 2 * 8);
        assert_eq!(std::mem::offset_of!(LossArgs, rows), 7 * 32 + 3 * 8);
        assert_eq!(std::mem::offset_of!(LossArgs, dp_size), 7 * 32 + 3 * 8 + 4 * 8 + 4 * 8);
        assert_eq!(std::mem::size_of::<ScaleArgs>(), 2 * 32 + 8);
        // KlArgs: 4 views + 5 words; AdvArgs: 3 views + 5 pointers/strides
        // + 3 words + 3 doubles + 2 words.
        assert_eq!(std::mem::size_of::<KlArgs>(), 4 * 32 + 5 * 8);
        assert_eq!(std::mem::size_of::<AdvArgs>(), 3 * 32 + 5 * 8 + 3 * 8 + 3 * 8 + 2 * 8);
        assert_eq!(std::mem::offset_of!(AdvArgs, scratch), 3 * 32 + 4 * 8);
        assert_eq!(std::mem::offset_of!(AdvArgs, epsilon), 3 * 32 + 8 * 8);
        assert_eq!(std::mem::offset_of!(KlArgs, kind), 4 * 32 + 2 * 8);
    }

    /// Every entry point [`device`] loads.
    const KERNELS: [&str; 13] = [
        "luspo_loss_rows_f32",
        "luspo_loss_tokens_f32_vanilla",
        "luspo_loss_tokens_bf16_seq",
        "luspo_loss_tokens_any64_agg",
        "luspo_scale_grad",
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
        // the cubin cache: written on the first call, read on the second,
        // and a damaged entry is compiled again
        let dir = std::env::temp_dir().join(format!("luspo_rs_cache_test_{}", std::process::id()));
        std::env::set_var("LUSPO_RS_CACHE_DIR", &dir);
        let first = cubin(&nv, 9, 0).unwrap();
        let entries: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(std::fs::read(&entries[0]).unwrap(), first);
        assert_eq!(cubin(&nv, 9, 0).unwrap(), first);
        std::fs::write(&entries[0], b"not a cubin").unwrap();
        assert!(cubin(&nv, 9, 0).unwrap().starts_with(b"\x7fELF"));
        std::fs::remove_dir_all(&dir).unwrap();
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
