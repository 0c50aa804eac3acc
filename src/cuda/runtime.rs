//! The CUDA runtime the ops' launchers share: the driver and NVRTC
//! (opened with `dlopen`, see [`super::sys`]), compiling the kernel sources
//! for each device's architecture with a cubin cache on disk, the per-device
//! context and loaded kernels, strided views as the kernels take them, and
//! launching on the caller's stream.

use super::sys::{self, CUcontext, CUfunction, Driver, Nvrtc};
use crate::error::Error;
use crate::ops::abi;
use crate::tensor::{DType, Device, Mat, MatMut};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

const COMMON: &str = include_str!("kernels/common.cuh");
const LOSS: &str = include_str!("kernels/loss.cu");
const KL_PENALTY: &str = include_str!("kernels/kl_penalty.cu");
const ADVANTAGE: &str = include_str!("kernels/advantage.cu");
const RETURNS: &str = include_str!("kernels/returns.cu");
const TOKEN_BASELINE: &str = include_str!("kernels/token_baseline.cu");

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

pub type Result<T> = std::result::Result<T, CudaError>;

pub fn rt<T>(r: std::result::Result<T, String>) -> Result<T> {
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
/// later call can succeed after the search path changes); the simulator's
/// when it is on ([`super::sim`]).
pub fn nvrtc() -> std::result::Result<Arc<Nvrtc>, String> {
    if super::sim::enabled() {
        return Ok(super::sim::nvrtc());
    }
    let mut g = NVRTC.lock().unwrap();
    if let Some(n) = g.as_ref() {
        return Ok(n.clone());
    }
    let hints = NVRTC_HINTS.lock().unwrap().clone();
    let n = Arc::new(Nvrtc::load(&hints)?);
    *g = Some(n.clone());
    Ok(n)
}

/// The CUDA driver, loaded and initialised on first use; the simulator's
/// when it is on ([`super::sim`]).
pub fn driver() -> Result<Arc<Driver>> {
    if super::sim::enabled() {
        return Ok(super::sim::driver());
    }
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

/// The kernel sources as one translation unit: the shared constants
/// ([`abi::prelude`]), `common.cuh`, then one source per op. With
/// `LUSPO_RS_KERNEL_DIR` set, the files are read from that directory
/// instead of the copies built into the module: kernels can be edited and
/// run (on a GPU or the simulator) without a rebuild, and the mutation
/// tests (`tests/mutate_kernels.py`) run mutated copies.
pub fn source() -> String {
    let built = [("common.cuh", COMMON), ("loss.cu", LOSS), ("kl_penalty.cu", KL_PENALTY), ("advantage.cu", ADVANTAGE), ("returns.cu", RETURNS), ("token_baseline.cu", TOKEN_BASELINE)];
    let dir = std::env::var_os("LUSPO_RS_KERNEL_DIR").filter(|d| !d.is_empty()).map(PathBuf::from);
    let mut src = abi::prelude();
    for (name, text) in built {
        // (#line: compiler messages, and the simulator's, name the file and its line)
        src += &format!("#line 1 \"{name}\"\n");
        match dir.as_ref().and_then(|d| std::fs::read_to_string(d.join(name)).ok()) {
            Some(t) => src += &t,
            None => src += text,
        }
    }
    src
}

/// [`source`] after the `#define`s of `LUSPO_RS_CUDA_DEFINES` (e.g.
/// "TOKEN_RUNS=2 MIN_BLOCKS=1"): the kernels' compile-time tuning knobs,
/// for benchmarking variants without a rebuild.
fn full_source() -> String {
    let defines: String = std::env::var("LUSPO_RS_CUDA_DEFINES")
        .unwrap_or_default()
        .split_whitespace()
        .map(|d| format!("#define {}\n", d.replacen('=', " ", 1)))
        .collect();
    format!("{defines}{}", source())
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

/// Whether a cache directory or file may be trusted: owned by this user and
/// writable by no one else. On a shared path (NFS, /tmp on a cluster) anyone
/// else could otherwise plant an image under the predictable name, to be
/// loaded into this process's CUDA context.
#[cfg(unix)]
fn trusted(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    m.uid() == unsafe { libc::geteuid() } && m.mode() & 0o022 == 0
}
#[cfg(not(unix))]
fn trusted(_m: &std::fs::Metadata) -> bool {
    true
}

/// One warning per process that the cache is skipped, and why.
fn warn_cache(why: String) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("luspo_rs: not using the kernel cache: {why}"));
}

/// The cache directory, created 0700 if missing; None (with a warning) if
/// it is not trusted.
fn secure_cache_dir(d: &std::path::Path) -> Option<PathBuf> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(d).ok()?;
    match std::fs::metadata(d) {
        Ok(m) if m.is_dir() && trusted(&m) => Some(d.to_path_buf()),
        Ok(_) => {
            warn_cache(format!("{} is not a directory owned by this user and writable only by it", d.display()));
            None
        }
        Err(_) => None,
    }
}

/// The digest a cache entry stores in front of its image (integrity only:
/// who may write the entry is what [`trusted`] checks).
fn digest(img: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    img.hash(&mut h);
    h.finish()
}

/// A cache entry's image, if the file is trusted and its digest matches.
fn read_entry(p: &std::path::Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).ok()?;
    let m = f.metadata().ok()?;
    if !trusted(&m) {
        warn_cache(format!("{} is not owned by this user or is writable by others", p.display()));
        return None;
    }
    let mut b = Vec::new();
    f.read_to_end(&mut b).ok()?;
    let (head, img) = (b.get(..8)?, b.get(8..)?);
    (u64::from_le_bytes(head.try_into().ok()?) == digest(img) && img.starts_with(b"\x7fELF")).then(|| img.to_vec())
}

/// Writes a cache entry (mode 0600, by a rename, so a reader never sees half a file).
fn write_entry(p: &std::path::Path, img: &[u8]) {
    use std::io::Write;
    let tmp = p.with_extension(format!("{}.tmp", std::process::id()));
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let written = o.open(&tmp).and_then(|mut f| f.write_all(&digest(img).to_le_bytes()).and_then(|_| f.write_all(img)));
    if !(written.is_ok() && std::fs::rename(&tmp, p).is_ok()) {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The image of `src` for `target` on `major.minor` (a cubin for
/// `sm_{major}{minor}`, or PTX for `compute_{major}{minor}`), and its cache
/// entry: read from the cache when a process compiled the same source with
/// the same NVRTC and options before (NVRTC takes seconds, a read
/// milliseconds), else compiled and written there. A cache that cannot be
/// read, written or trusted is skipped. `fresh`: compile even if an entry
/// exists (it failed to load), and replace it.
fn image(nvrtc: &Nvrtc, src: &str, target: Target, major: i32, minor: i32, fresh: bool) -> std::result::Result<Vec<u8>, String> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let opts = options(major, minor, target);
    (src, &opts, nvrtc.version(), &nvrtc.path, env!("CARGO_PKG_VERSION")).hash(&mut h);
    let name = match target {
        Target::Cubin => format!("kernels-sm_{major}{minor}-{:016x}.cubin", h.finish()),
        Target::Ptx => format!("kernels-compute_{major}{minor}-{:016x}.ptx", h.finish()),
    };
    let path = cache_dir().and_then(|d| secure_cache_dir(&d)).map(|d| d.join(name));
    if !fresh {
        if let Some(img) = path.as_deref().and_then(read_entry) {
            return Ok(img);
        }
    }
    let (img, _) = compile_source(nvrtc, src, major, minor, target, false)?;
    if let Some(p) = path {
        write_entry(&p, &img);
    }
    Ok(img)
}

/// The architectures this NVRTC can compile for, as `10 * major + minor`.
fn supported_archs(nv: &Nvrtc) -> std::result::Result<Vec<i32>, String> {
    let mut n = 0;
    // SAFETY: NVRTC fills `n`, then `n` values.
    unsafe {
        nv.check("nvrtcGetNumSupportedArchs", (nv.nvrtcGetNumSupportedArchs)(&mut n))?;
        let mut archs = vec![0; n.max(0) as usize];
        nv.check("nvrtcGetSupportedArchs", (nv.nvrtcGetSupportedArchs)(archs.as_mut_ptr()))?;
        Ok(archs)
    }
}

/// What to build for a GPU of compute capability `major.minor`: its cubin
/// when this NVRTC knows `sm_{major}{minor}`; for a GPU newer than NVRTC,
/// PTX for the newest architecture NVRTC knows below it, which the driver
/// compiles for the GPU when it loads the module (PTX runs on every later
/// architecture). An error when NVRTC knows none at or below the GPU.
fn build_target(nv: &Nvrtc, major: i32, minor: i32) -> std::result::Result<(Target, i32, i32), String> {
    let archs = supported_archs(nv)?;
    let cc = 10 * major + minor;
    if archs.contains(&cc) {
        return Ok((Target::Cubin, major, minor));
    }
    match archs.iter().copied().filter(|&a| a < cc).max() {
        Some(a) => Ok((Target::Ptx, a / 10, a % 10)),
        None => {
            let (ma, mi) = nv.version();
            Err(format!("NVRTC {ma}.{mi} knows no architecture at or below sm_{major}{minor} (it knows {archs:?})"))
        }
    }
}

/// NVRTC's options for `target` on compute capability `major.minor`. No
/// fused multiply-add contraction: closer to the CPU reference, and the
/// kernels are memory-bound anyway.
fn options(major: i32, minor: i32, target: Target) -> Vec<String> {
    let arch = match target {
        Target::Ptx => format!("--gpu-architecture=compute_{major}{minor}"),
        Target::Cubin => format!("--gpu-architecture=sm_{major}{minor}"),
    };
    vec![arch, "--fmad=false".into(), "--std=c++14".into()]
}

/// Compiles [`full_source`] for compute capability `major.minor`. A rejected
/// architecture and any compile error come back with NVRTC's log.
pub fn compile(nvrtc: &Nvrtc, major: i32, minor: i32, target: Target) -> std::result::Result<Vec<u8>, String> {
    compile_source(nvrtc, &full_source(), major, minor, target, false).map(|(img, _)| img)
}

/// [`compile`] to a cubin with ptxas's `--verbose` report: the image and
/// NVRTC's log, which gives each kernel's registers and spill bytes (the
/// test suite's spill check; the cached images are built without it).
pub fn compile_with_ptxas_log(nvrtc: &Nvrtc, major: i32, minor: i32) -> std::result::Result<(Vec<u8>, String), String> {
    compile_source(nvrtc, &full_source(), major, minor, Target::Cubin, true)
}

fn program_log(nvrtc: &Nvrtc, prog: sys::NvrtcProgram) -> String {
    let mut n = 0usize;
    // SAFETY: a live program; the buffer holds the size NVRTC reported.
    unsafe {
        (nvrtc.nvrtcGetProgramLogSize)(prog, &mut n);
        let mut log = vec![0u8; n.max(1)];
        (nvrtc.nvrtcGetProgramLog)(prog, log.as_mut_ptr() as *mut _);
        String::from_utf8_lossy(&log).trim_end_matches('\0').trim().to_string()
    }
}

fn compile_source(
    nvrtc: &Nvrtc,
    src: &str,
    major: i32,
    minor: i32,
    target: Target,
    verbose: bool,
) -> std::result::Result<(Vec<u8>, String), String> {
    let mut opts = options(major, minor, target);
    if verbose {
        opts.push("--ptxas-options=--verbose".into());
    }
    let arch = opts[0].clone();
    let opts: Vec<CString> = opts.iter().map(|s| CString::new(s.as_str()).unwrap()).collect();
    let opt_ptrs: Vec<*const std::ffi::c_char> = opts.iter().map(|s| s.as_ptr()).collect();
    let src = CString::new(src).map_err(|e| e.to_string())?;
    let name = CString::new("kernels.cu").unwrap();
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
            let log = program_log(nvrtc, prog);
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
                    let log = if verbose { program_log(nvrtc, prog) } else { String::new() };
                    nvrtc.check(what, get_fn(prog, buf.as_mut_ptr() as *mut _)).map(|_| (buf, log))
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
pub struct DeviceState {
    pub ctx: CUcontext,
    pub loss: super::loss::Kernels,
    pub kl_penalty: super::kl_penalty::Kernels,
    pub advantage: super::advantage::Kernels,
    pub returns: super::returns::Kernels,
    pub token_baseline: super::token_baseline::Kernels,
}

// SAFETY: context and function handles are process-wide driver objects,
// usable from any thread once the context is made current.
unsafe impl Send for DeviceState {}
unsafe impl Sync for DeviceState {}

/// A device's kernels: not loaded yet (None), loaded, or the error their
/// loading gave (remembered: a module without our kernels will not gain them).
type Slot = Arc<Mutex<Option<std::result::Result<Arc<DeviceState>, String>>>>;

/// The devices by (simulated, ordinal). The map's lock is held only to find
/// a device's slot; a first compile holds only that device's lock, so it
/// blocks no call on another device.
static DEVICES: Mutex<Option<HashMap<(bool, i32), Slot>>> = Mutex::new(None);

/// Makes `ctx` current for the scope.
pub struct CtxGuard<'a>(&'a Driver);

impl<'a> CtxGuard<'a> {
    pub fn push(d: &'a Driver, ctx: CUcontext) -> Result<Self> {
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
    let slot: Slot = {
        let mut g = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert_with(HashMap::new).entry((d.lib.is_none(), ordinal)).or_default().clone()
    };
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    match slot.as_ref() {
        Some(Ok(s)) => return Ok(s.clone()),
        Some(Err(e)) => return Err(CudaError::Runtime(e.clone())),
        None => {}
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
        let mut ctx: CUcontext = std::ptr::null_mut();
        rt(d.check("cuDevicePrimaryCtxRetain", (d.cuDevicePrimaryCtxRetain)(&mut ctx, dev)))?;
        let _g = CtxGuard::push(d, ctx)?;
        let module = load_module(d, &nv, &full_source(), major, minor).map_err(|e| {
            CudaError::Runtime(format!(
                "cuda:{ordinal} (sm_{major}{minor}) is not supported by this NVRTC, or the kernels failed to compile: {e}"
            ))
        })?;
        let get = |name: &str| -> Result<CUfunction> {
            let mut f: CUfunction = std::ptr::null_mut();
            let c = CString::new(name).unwrap();
            rt(d.check("cuModuleGetFunction", (d.cuModuleGetFunction)(&mut f, module, c.as_ptr())))?;
            Ok(f)
        };
        let kernels = (|| {
            Ok::<_, CudaError>((
                super::loss::Kernels::load(&get)?,
                super::kl_penalty::Kernels::load(&get)?,
                super::advantage::Kernels::load(&get)?,
                super::returns::Kernels::load(&get)?,
                super::token_baseline::Kernels::load(&get)?,
            ))
        })();
        match kernels {
            Ok((loss, kl_penalty, advantage, returns, token_baseline)) => {
                DeviceState { ctx, loss, kl_penalty, advantage, returns, token_baseline }
            }
            Err(e) => {
                (d.cuModuleUnload)(module);
                let msg = match e {
                    CudaError::Runtime(m) => m,
                    CudaError::Arg(e) => e.to_string(),
                };
                *slot = Some(Err(msg.clone()));
                return Err(CudaError::Runtime(msg));
            }
        }
    };
    let s = Arc::new(state);
    *slot = Some(Ok(s.clone()));
    Ok(s)
}

/// Loads the image of `src` for the GPU (see [`build_target`]) into the
/// current context. A cached image that
/// the driver refuses (damaged, or from a driver that no longer takes it) is
/// a miss: it is compiled again and its entry replaced.
///
/// # Safety
/// A context must be current.
unsafe fn load_module(d: &Driver, nv: &Nvrtc, src: &str, major: i32, minor: i32) -> std::result::Result<sys::CUmodule, String> {
    let mut module: sys::CUmodule = std::ptr::null_mut();
    let (target, major, minor) = build_target(nv, major, minor)?;
    let image = self::image(nv, src, target, major, minor, false)?;
    if d.check("cuModuleLoadData", (d.cuModuleLoadData)(&mut module, image.as_ptr() as *const c_void)).is_ok() {
        return Ok(module);
    }
    let image = self::image(nv, src, target, major, minor, true)?;
    d.check("cuModuleLoadData", (d.cuModuleLoadData)(&mut module, image.as_ptr() as *const c_void))?;
    Ok(module)
}

// ---------------------------------------------------------------- launch

/// A strided view as the kernels take it (`View` / `ViewMut` in kernels/common.cuh).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct View {
    pub ptr: *const u8,
    pub rs: i64,
    pub cs: i64,
    pub dtype: i64,
}

pub fn dtype_code(d: DType) -> i64 {
    match d {
        DType::F64 => abi::DT_F64,
        DType::F32 => abi::DT_F32,
        DType::BF16 => abi::DT_BF16,
        DType::F16 => abi::DT_F16,
        DType::Bool | DType::U8 => abi::DT_U8,
        DType::I8 => abi::DT_I8,
        DType::I16 => abi::DT_I16,
        DType::I32 => abi::DT_I32,
        DType::I64 => abi::DT_I64,
    }
}

pub fn view(m: &Mat) -> View {
    let cs = if m.is_per_row() { 0 } else { m.tensor.strides[1] as i64 };
    View { ptr: m.tensor.ptr, rs: m.tensor.strides[0] as i64, cs, dtype: dtype_code(m.tensor.dtype) }
}

pub fn view_mut(m: &MatMut) -> View {
    View { ptr: m.tensor.ptr, rs: m.tensor.strides[0] as i64, cs: m.tensor.strides[1] as i64, dtype: dtype_code(m.tensor.dtype) }
}

pub const NO_VIEW: View = View { ptr: std::ptr::null(), rs: 0, cs: 0, dtype: 1 };

/// Threads per row block: a power of two, about 8 elements per thread,
/// between 64 and 512. Depends on `cols` only, so the reduction order (and
/// so every bit of the result) is the same run after run.
pub fn threads_per_row(cols: usize) -> u32 {
    (cols.div_ceil(8)).next_power_of_two().clamp(64, 512) as u32
}

pub fn ordinal(device: Device) -> Result<i32> {
    match device {
        Device::Cuda(i) => Ok(i),
        Device::Cpu => Err(CudaError::Runtime("internal: CPU tensors reached the CUDA backend".into())),
    }
}

/// # Safety
/// `args` must point at the argument struct `f` takes; every pointer in it
/// must stay valid until the stream reaches the kernel.
pub unsafe fn launch(d: &Driver, f: CUfunction, grid: u32, block: u32, stream: usize, args: *mut c_void) -> Result<()> {
    let mut params = [args];
    rt(d.check(
        "cuLaunchKernel",
        (d.cuLaunchKernel)(f, grid, 1, 1, block, 1, 1, 0, stream as sys::CUstream, params.as_mut_ptr(), std::ptr::null_mut()),
    ))
}

pub fn device_state(d: &Driver, dev: Device) -> Result<Arc<DeviceState>> {
    device(d, ordinal(dev)?)
}

pub fn grid(rows: usize) -> Result<u32> {
    u32::try_from(rows)
        .ok()
        .filter(|&r| r < (1u32 << 31))
        .ok_or_else(|| CudaError::Runtime(format!("batch of {rows} rows exceeds the CUDA grid limit")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn block_sizes_are_powers_of_two_in_range() {
        for cols in [1, 7, 64, 513, 4096, 16384, 1 << 20] {
            let t = threads_per_row(cols);
            assert!(t.is_power_of_two() && (64..=512).contains(&t), "{cols} -> {t}");
        }
    }

    #[test]
    fn kernel_sources_define_no_shared_constant() {
        for src in [COMMON, LOSS, KL_PENALTY, ADVANTAGE] {
            for (_, items) in abi::ALL {
                for (name, _) in *items {
                    assert!(!src.contains(&format!("{name} =")), "{name} is defined in a kernel source, not only in ops/abi.rs");
                    assert!(!src.contains(&format!("#define {name} ")), "{name} is #defined in a kernel source");
                }
            }
        }
    }

    /// Every entry point the launchers load.
    pub(crate) fn kernel_names() -> Vec<String> {
        let mut names = super::super::loss::Kernels::names();
        names.extend(super::super::kl_penalty::Kernels::NAMES.iter().map(|s| s.to_string()));
        names.extend(super::super::advantage::Kernels::NAMES.iter().map(|s| s.to_string()));
        names.extend(super::super::returns::Kernels::NAMES.iter().map(|s| s.to_string()));
        names.extend(super::super::token_baseline::Kernels::NAMES.iter().map(|s| s.to_string()));
        names
    }
    /// A small unit for the cache tests, compiled by the simulator's NVRTC in a second.
    const TINY: &str = "struct A { int *p; };\nextern \"C\" __global__ void tiny(A a) { *GLOBAL(a.p) = 1; }\n";

    #[cfg(unix)]
    fn mode(p: &std::path::Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// The on-disk cache (issue 20 C), through the simulator's tables: a
    /// private directory, entries with a digest, untrusted directories and
    /// files skipped, damaged or unloadable entries compiled again and replaced.
    #[cfg(unix)]
    #[test]
    fn the_kernel_cache_is_private_verified_and_self_repairing() {
        use std::os::unix::fs::PermissionsExt;
        let _env = CACHE_ENV.lock().unwrap_or_else(|e| e.into_inner());
        let nv = super::super::sim::nvrtc();
        let d = super::super::sim::driver();
        let root = std::env::temp_dir().join(format!("luspo_rs_cache_sec_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("a/b");
        std::env::set_var("LUSPO_RS_CACHE_DIR", &dir);
        let first = image(&nv, TINY, Target::Cubin, 9, 0, false).unwrap();
        assert_eq!(mode(&dir), 0o700, "created private");
        let entries: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(entries.len(), 1, "{entries:?}");
        let entry = &entries[0];
        assert_eq!(mode(entry), 0o600);
        assert_eq!(read_entry(entry).unwrap(), first, "digest + image");
        // a read is a hit: the entry's bytes come back, even when planted (same digest)
        let mut planted = first.clone();
        planted.extend_from_slice(b"planted");
        write_entry(entry, &planted);
        assert_eq!(image(&nv, TINY, Target::Cubin, 9, 0, false).unwrap(), planted);
        // ... but not from a file others may write, nor with a wrong digest
        std::fs::set_permissions(entry, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(image(&nv, TINY, Target::Cubin, 9, 0, false).unwrap(), first, "a world-writable entry is not read");
        let mut bytes = std::fs::read(entry).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        std::fs::write(entry, &bytes).unwrap();
        assert!(read_entry(entry).is_none(), "a damaged image fails its digest");
        assert_eq!(image(&nv, TINY, Target::Cubin, 9, 0, false).unwrap(), first, "and is compiled again");
        assert_eq!(read_entry(entry).unwrap(), first, "and replaced");
        // an entry the driver refuses to load is a miss, compiled again and replaced
        let mut bad = b"\x7fELF not a loadable image".to_vec();
        bad.resize(256, 0); // (the driver reads an image's header without knowing its length)
        write_entry(entry, &bad);
        let m = unsafe { load_module(&d, &nv, TINY, 9, 0) }.unwrap();
        assert_eq!(unsafe { (d.cuModuleUnload)(m) }, 0);
        assert_eq!(read_entry(entry).unwrap(), first);
        // a directory others may write is not used at all
        let open = root.join("open");
        std::fs::create_dir_all(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::env::set_var("LUSPO_RS_CACHE_DIR", &open);
        assert_eq!(image(&nv, TINY, Target::Cubin, 9, 0, false).unwrap(), first);
        assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0, "nothing written into a world-writable directory");
        // the key holds the options: another architecture is another entry
        std::env::set_var("LUSPO_RS_CACHE_DIR", &dir);
        image(&nv, TINY, Target::Cubin, 8, 0, false).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        std::env::remove_var("LUSPO_RS_CACHE_DIR");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A GPU newer than NVRTC (issue 20 C3), through the simulator's tables:
    /// PTX for the newest architecture NVRTC knows, loaded (the driver
    /// compiles it); the GPU's own cubin when NVRTC knows it; an error
    /// naming both when NVRTC knows nothing at or below the GPU.
    #[test]
    fn a_gpu_newer_than_nvrtc_gets_ptx_for_the_newest_architecture_nvrtc_knows() {
        use super::super::sim;
        let _env = CACHE_ENV.lock().unwrap_or_else(|e| e.into_inner());
        std::env::set_var("LUSPO_RS_CACHE_DIR", ""); // no cache: every load compiles
        let (nv, d) = (sim::nvrtc(), sim::driver());
        sim::set_supported_archs(&[75, 80, 86, 89, 90]);
        let load = |ma, mi| unsafe { load_module(&d, &nv, TINY, ma, mi) };
        let m = load(12, 0).unwrap();
        assert_eq!(sim::last_arch(), "--gpu-architecture=compute_90");
        assert_eq!(unsafe { (d.cuModuleUnload)(m) }, 0);
        let m = load(8, 7).unwrap();
        assert_eq!(sim::last_arch(), "--gpu-architecture=compute_86", "sm_87 is not known: the newest below it");
        assert_eq!(unsafe { (d.cuModuleUnload)(m) }, 0);
        let m = load(9, 0).unwrap();
        assert_eq!(sim::last_arch(), "--gpu-architecture=sm_90");
        assert_eq!(unsafe { (d.cuModuleUnload)(m) }, 0);
        sim::set_supported_archs(&[100, 120]);
        let e = load(9, 0).unwrap_err();
        assert!(e.contains("no architecture at or below sm_90") && e.contains("[100, 120]"), "{e}");
        sim::set_supported_archs(&[]);
        std::env::remove_var("LUSPO_RS_CACHE_DIR");
    }

    /// The tests that set LUSPO_RS_CACHE_DIR take turns.
    static CACHE_ENV: Mutex<()> = Mutex::new(());

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
        let _env = CACHE_ENV.lock().unwrap_or_else(|e| e.into_inner());
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
            for k in kernel_names() {
                assert!(ptx.contains(&format!(".entry {k}(")), "sm_{ma}{mi}: {k} missing from PTX");
            }
            assert!(!compile(&nv, ma, mi, Target::Cubin).unwrap().is_empty());
        }
    }
}
