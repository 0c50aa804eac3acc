//! Typed, read-only and writable views over caller memory described by
//! DLPack: dtype, shape, stride and device checks, and row loaders that turn
//! any supported element type into the kernel's compute float.
//!
//! Nothing here copies a tensor: a row is either borrowed in place (the
//! dtype is the compute type and the row is contiguous) or converted into a
//! per-thread scratch buffer of at most [`PIECE`] elements; longer rows go
//! through in pieces.

use crate::error::{Error, Result};
use dlpark::ffi::{DLDataTypeCode, DLDeviceType};
use dlpark::TensorRef;
use half::{bf16, f16};
use num_traits::Float;

/// Element types the kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    BF16,
    F16,
    Bool,
    U8,
    I8,
    I16,
    I32,
    I64,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 | DType::I16 => 2,
            DType::Bool | DType::U8 | DType::I8 => 1,
        }
    }

    /// Whether this is one of the floating-point types.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::BF16 | DType::F16)
    }

    /// The torch-style name, for error messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
        }
    }
}

/// Where a tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(i32),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A validated description of one DLPack tensor: data pointer (byte offset
/// applied), element type, shape and strides in elements.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub arg: &'static str,
    pub ptr: *mut u8,
    pub dtype: DType,
    pub device: Device,
    pub shape: Vec<usize>,
    pub strides: Vec<isize>,
    pub read_only: bool,
}

// SAFETY: a `Tensor` is plain metadata plus the address of memory its Python
// owner keeps alive for the whole call; kernels only read it, or write rows
// that no other task touches.
unsafe impl Send for Tensor {}
unsafe impl Sync for Tensor {}

impl Tensor {
    /// Reads a DLPack descriptor. `arg` is the Python argument name used in
    /// every error about it.
    pub fn from_dlpack(arg: &'static str, t: &TensorRef<'_>, read_only: bool) -> Result<Self> {
        let dt = t.dtype();
        if dt.lanes != 1 {
            return Err(Error::type_error(arg, format!("vector dtypes (lanes={}) are not supported", dt.lanes)));
        }
        let dtype = match (dt.code, dt.bits) {
            (DLDataTypeCode::FLOAT, 64) => DType::F64,
            (DLDataTypeCode::FLOAT, 32) => DType::F32,
            (DLDataTypeCode::FLOAT, 16) => DType::F16,
            (DLDataTypeCode::BFLOAT, 16) => DType::BF16,
            (DLDataTypeCode::BOOL, 8) => DType::Bool,
            (DLDataTypeCode::UINT, 8) => DType::U8,
            (DLDataTypeCode::INT, 8) => DType::I8,
            (DLDataTypeCode::INT, 16) => DType::I16,
            (DLDataTypeCode::INT, 32) => DType::I32,
            (DLDataTypeCode::INT, 64) => DType::I64,
            (code, bits) => {
                let name = match code {
                    DLDataTypeCode::COMPLEX => format!("complex{bits}"),
                    DLDataTypeCode::FLOAT => format!("float{bits}"),
                    DLDataTypeCode::INT => format!("int{bits}"),
                    DLDataTypeCode::UINT => format!("uint{bits}"),
                    DLDataTypeCode::BOOL => format!("bool ({bits} bits)"),
                    DLDataTypeCode::BFLOAT => format!("bfloat{bits}"),
                    other => format!("DLPack type code {} ({bits} bits)", other.0),
                };
                return Err(Error::type_error(
                    arg,
                    format!(
                        "unsupported dtype {name}: expected float32, float64, bfloat16 or float16 \
                         (masks: bool or integers up to 64 bits)"
                    ),
                ));
            }
        };
        let device = match t.device().device_type {
            DLDeviceType::CPU => Device::Cpu,
            DLDeviceType::CUDA => Device::Cuda(t.device().device_id),
            other => {
                return Err(Error::value_error(
                    arg,
                    format!("tensors on DLPack device type {} are not supported (cpu or cuda only)", other.0),
                ))
            }
        };
        if let Some(d) = t.shape().iter().find(|&&d| d < 0) {
            return Err(Error::value_error(arg, format!("invalid DLPack shape {:?}: negative size {d}", t.shape())));
        }
        let shape: Vec<usize> = t.shape().iter().map(|&d| d as usize).collect();
        let strides: Vec<isize> = t
            .strides_or_compact()
            .map_err(|e| Error::value_error(arg, format!("invalid DLPack layout: {e}")))?
            .iter()
            .map(|&s| s as isize)
            .collect();
        let ptr = (t.data_ptr() as *mut u8).wrapping_add(t.byte_offset() as usize);
        let tensor = Tensor { arg, ptr, dtype, device, shape, strides, read_only };
        // every offset the kernels form, `sum index * stride` in bytes, must fit an isize
        let (lo, hi) = tensor.span_i128();
        if lo < -(isize::MAX as i128) || hi > isize::MAX as i128 || (tensor.numel_checked().is_none()) {
            return Err(Error::value_error(
                arg,
                format!("shape {:?} with strides {:?} spans more bytes than an address can", tensor.shape, tensor.strides),
            ));
        }
        if tensor.numel() > 0 && (ptr as usize) % dtype.size() != 0 {
            return Err(Error::value_error(
                arg,
                format!("the data pointer {ptr:p} is not aligned to its {}-byte {} elements", dtype.size(), dtype.name()),
            ));
        }
        Ok(tensor)
    }

    /// The number of elements, if it fits a usize.
    fn numel_checked(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.numel_checked().unwrap_or(usize::MAX)
    }

    /// Byte offsets from `ptr` of the first and one past the last byte the
    /// elements span (0, 0 when empty), exactly (no overflow in i128).
    fn span_i128(&self) -> (i128, i128) {
        if self.shape.contains(&0) {
            return (0, 0);
        }
        let (mut lo, mut hi) = (0i128, 0i128);
        for (&n, &st) in self.shape.iter().zip(&self.strides) {
            let reach = (n as i128 - 1) * st as i128;
            if reach < 0 {
                lo += reach;
            } else {
                hi += reach;
            }
        }
        let size = self.dtype.size() as i128;
        (lo * size, (hi + 1) * size)
    }

    /// The addresses of the first and one past the last byte the elements
    /// span (`[ptr, ptr)` when empty).
    pub fn span(&self) -> (u64, u64) {
        let (lo, hi) = self.span_i128();
        let p = self.ptr as i128;
        ((p + lo) as u64, (p + hi) as u64)
    }

    /// Whether two elements share memory: the innermost dimension of more
    /// than one element has a stride other than 1, or some dimension's
    /// stride is smaller than the span of the dimensions inside it.
    pub fn overlaps_itself(&self) -> bool {
        let mut dims: Vec<(usize, usize)> =
            self.shape.iter().zip(&self.strides).filter(|(&n, _)| n > 1).map(|(&n, &s)| (n, s.unsigned_abs())).collect();
        if self.shape.contains(&0) || dims.is_empty() {
            return false;
        }
        dims.sort_by_key(|&(_, s)| s);
        let mut reach = 1u128; // elements spanned by the dimensions inside
        for (n, s) in dims {
            if (s as u128) < reach {
                return true;
            }
            reach = (s as u128) * (n as u128 - 1) + reach;
        }
        false
    }

    /// A contiguous CPU description of caller-owned memory (tests and
    /// callers that hold plain slices).
    pub fn from_slice<T: Element>(arg: &'static str, data: &[T], shape: &[usize]) -> Self {
        assert_eq!(data.len(), shape.iter().product::<usize>(), "slice does not match shape");
        let mut strides = vec![1isize; shape.len()];
        for k in (0..shape.len().saturating_sub(1)).rev() {
            strides[k] = strides[k + 1] * shape[k + 1] as isize;
        }
        Tensor {
            arg,
            ptr: data.as_ptr() as *mut u8,
            dtype: T::DTYPE,
            device: Device::Cpu,
            shape: shape.to_vec(),
            strides,
            read_only: true,
        }
    }

    /// Like [`Tensor::from_slice`] for an output buffer.
    pub fn from_mut_slice<T: Element>(arg: &'static str, data: &mut [T], shape: &[usize]) -> Self {
        let mut d = Self::from_slice(arg, data, shape);
        d.read_only = false;
        d
    }

    /// Whether the tensor is contiguous (size-1 dimensions may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut expect = 1isize;
        for k in (0..self.shape.len()).rev() {
            if self.shape[k] > 1 && self.strides[k] != expect {
                return false;
            }
            expect *= self.shape[k] as isize;
        }
        true
    }

    /// Checks a caller-allocated float64 buffer: at least `need` elements,
    /// contiguous, writable, on `device`.
    pub fn expect_f64_buffer(&self, device: Device, need: usize) -> Result<()> {
        if self.device != device {
            return Err(Error::value_error(self.arg, format!("is on {} but the inputs are on {device}", self.device)));
        }
        let n: usize = self.shape.iter().product();
        if self.dtype != DType::F64 || n < need || self.read_only || !self.is_contiguous() {
            return Err(Error::value_error(
                self.arg,
                format!("expected a writable contiguous float64 tensor with at least {need} elements"),
            ));
        }
        Ok(())
    }

    /// Requires a floating-point dtype.
    pub fn expect_float(&self) -> Result<()> {
        if self.dtype.is_float() {
            Ok(())
        } else {
            Err(Error::type_error(
                self.arg,
                format!("expected a floating-point tensor (float32, float64, bfloat16, float16), got {}", self.dtype.name()),
            ))
        }
    }

    /// Views a rank-2 `(rows, cols)` tensor.
    pub fn matrix(&self) -> Result<Mat> {
        if self.shape.len() != 2 {
            return Err(Error::value_error(
                self.arg,
                format!("expected a 2-D (batch, response_length) tensor, got shape {:?}", self.shape),
            ));
        }
        Ok(Mat { tensor: self.clone(), rows: self.shape[0], cols: self.shape[1], rs: self.strides[0], cs: self.strides[1] })
    }

    /// Views a tensor of shape `(rows, cols)`, `(rows,)` or `(rows, 1)` as
    /// `(rows, cols)`; per-row shapes are broadcast along the row with a zero
    /// column stride, as `Tensor.expand` would.
    pub fn matrix_or_per_row(&self, rows: usize, cols: usize) -> Result<Mat> {
        let (rs, cs) = match self.shape.as_slice() {
            [r, c] if *r == rows && *c == cols => (self.strides[0], self.strides[1]),
            [r, 1] if *r == rows => (self.strides[0], 0),
            [r] if *r == rows => (self.strides[0], 0),
            _ => {
                return Err(Error::value_error(
                    self.arg,
                    format!(
                        "shape {:?} does not match log_prob: expected ({rows}, {cols}), ({rows},) or ({rows}, 1)",
                        self.shape
                    ),
                ))
            }
        };
        Ok(Mat { tensor: self.clone(), rows, cols, rs, cs })
    }

    /// Requires exactly `shape`.
    pub fn expect_shape(&self, shape: &[usize], like: &str) -> Result<()> {
        if self.shape != shape {
            return Err(Error::value_error(
                self.arg,
                format!("shape {:?} does not match {like} shape {:?}", self.shape, shape),
            ));
        }
        Ok(())
    }
}

/// Scalar types that can be read from a tensor.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
}
macro_rules! element {
    ($($t:ty => $d:ident),*) => { $(impl Element for $t { const DTYPE: DType = DType::$d; })* };
}
element!(f64 => F64, f32 => F32, bf16 => BF16, f16 => F16, bool => Bool, u8 => U8, i8 => I8, i16 => I16, i32 => I32, i64 => I64);

/// The float the kernels compute in: `f32` for 16/32-bit inputs, `f64` when
/// an input is float64.
pub trait Real: Float + Send + Sync + Default + std::fmt::Debug + 'static {
    /// The DLPack dtype of this float.
    const DTYPE: DType;
    /// Converts an `f64` (rounding to nearest).
    fn of(v: f64) -> Self;
    /// Converts an `f32` (exact for both types; no trip through f64).
    fn of_f32(v: f32) -> Self;
    /// Widens to `f64`.
    fn f64(self) -> f64;
    /// Reads element `k` of a `dtype` buffer and converts it.
    ///
    /// # Safety
    /// `p` must point at a live element of type `dtype`.
    unsafe fn read(p: *const u8, dtype: DType) -> Self;
    /// Converts and stores into a `dtype` buffer.
    ///
    /// # Safety
    /// `p` must point at a writable element of type `dtype`, a float type.
    unsafe fn write(self, p: *mut u8, dtype: DType);
}

macro_rules! real_impl {
    ($t:ty, $d:ident, $from_f32:expr, $from_f64:expr) => {
        impl Real for $t {
            const DTYPE: DType = DType::$d;
            #[inline(always)]
            fn of(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn of_f32(v: f32) -> Self {
                let f: fn(f32) -> $t = $from_f32;
                f(v)
            }
            #[inline(always)]
            fn f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            unsafe fn read(p: *const u8, dtype: DType) -> Self {
                let f: fn(f32) -> $t = $from_f32;
                let g: fn(f64) -> $t = $from_f64;
                match dtype {
                    DType::F64 => g(*(p as *const f64)),
                    DType::F32 => f(*(p as *const f32)),
                    DType::BF16 => f((*(p as *const bf16)).to_f32()),
                    DType::F16 => f((*(p as *const f16)).to_f32()),
                    DType::Bool | DType::U8 => f(*p as f32),
                    DType::I8 => f(*(p as *const i8) as f32),
                    DType::I16 => f(*(p as *const i16) as f32),
                    DType::I32 => g(*(p as *const i32) as f64),
                    DType::I64 => g(*(p as *const i64) as f64),
                }
            }
            #[inline(always)]
            unsafe fn write(self, p: *mut u8, dtype: DType) {
                match dtype {
                    DType::F64 => *(p as *mut f64) = self as f64,
                    DType::F32 => *(p as *mut f32) = self as f32,
                    DType::BF16 => *(p as *mut bf16) = bf16::from_f64(self as f64),
                    DType::F16 => *(p as *mut f16) = f16::from_f64(self as f64),
                    _ => unreachable!("outputs are validated to be floating point"),
                }
            }
        }
    };
}
real_impl!(f32, F32, |v| v, |v| v as f32);
real_impl!(f64, F64, |v| v as f64, |v| v);

/// A read-only `(rows, cols)` view with element strides (a zero column
/// stride broadcasts one value per row).
#[derive(Debug, Clone)]
pub struct Mat {
    pub tensor: Tensor,
    pub rows: usize,
    pub cols: usize,
    rs: isize,
    cs: isize,
}

impl Mat {
    #[inline(always)]
    fn row_ptr(&self, i: usize) -> *const u8 {
        self.tensor.ptr.wrapping_offset(i as isize * self.rs * self.tensor.dtype.size() as isize)
    }

    /// Whether every row is a contiguous `F` run ([`Mat::direct`] is `Some`).
    #[inline]
    pub fn is_direct<F: Real>(&self) -> bool {
        self.tensor.dtype == F::DTYPE && self.cs == 1
    }

    /// Whether every row is a contiguous run of its dtype.
    #[inline]
    pub fn is_contiguous(&self) -> bool {
        self.cs == 1
    }

    /// The address of column `start` of row `i`, at its dtype (for rows
    /// that are contiguous runs: [`Mat::is_contiguous`]).
    #[inline]
    pub fn run_ptr(&self, i: usize, start: usize) -> *const u8 {
        debug_assert!(self.cs == 1 && i < self.rows && start <= self.cols);
        self.row_ptr(i).wrapping_add(start * self.tensor.dtype.size())
    }

    /// Columns `start .. start + len` of row `i` in place, when the rows are
    /// contiguous `F` runs; otherwise `None`.
    #[inline]
    pub fn direct<F: Real>(&self, i: usize, start: usize, len: usize) -> Option<&[F]> {
        debug_assert!(i < self.rows && start + len <= self.cols);
        let p = self.row_ptr(i).wrapping_offset(start as isize * self.cs * self.tensor.dtype.size() as isize);
        // SAFETY: row i of a validated view holds `cols` elements of `dtype`.
        self.is_direct::<F>().then(|| unsafe { std::slice::from_raw_parts(p as *const F, len) })
    }

    /// Columns `start .. start + len` of row `i` as `F`: borrowed in place
    /// when they already are a contiguous `F` run, otherwise converted into
    /// `scratch` (at least `len` long).
    #[inline]
    pub fn part<'s, F: Real>(&'s self, i: usize, start: usize, len: usize, scratch: &'s mut [F]) -> &'s [F] {
        debug_assert!(i < self.rows && start + len <= self.cols && scratch.len() >= len);
        if let Some(run) = self.direct::<F>(i, start, len) {
            return run;
        }
        let size = self.tensor.dtype.size() as isize;
        let p = self.row_ptr(i).wrapping_offset(start as isize * self.cs * size);
        let scratch = &mut scratch[..len];
        unsafe {
            if self.cs == 0 {
                scratch.fill(F::read(p, self.tensor.dtype));
            } else if self.cs == 1 {
                load_contiguous(p, self.tensor.dtype, scratch);
            } else {
                for (j, s) in scratch.iter_mut().enumerate() {
                    *s = F::read(p.wrapping_offset(j as isize * self.cs * size), self.tensor.dtype);
                }
            }
        }
        scratch
    }

    /// Row `i` as `F` (see [`Mat::part`]); `scratch` holds `cols` elements.
    #[inline]
    pub fn row<'s, F: Real>(&'s self, i: usize, scratch: &'s mut [F]) -> &'s [F] {
        self.part(i, 0, self.cols, scratch)
    }

    /// Whether the view reads a single value per row.
    pub fn is_per_row(&self) -> bool {
        self.cs == 0
    }
}

/// Converts a contiguous run of `dtype` elements; a monomorphised loop per
/// dtype so each one vectorises, compiled a second time for AVX2 on x86-64
/// (the same conversions, so the same values). An int64 run (verl's
/// `response_mask` is the attention mask's int64 slice) goes to float32
/// eight at a time: in AVX-512 (which converts int64) where the CPU has it,
/// else in AVX2 through int32 where they fit.
#[inline]
unsafe fn load_contiguous<F: Real>(p: *const u8, dtype: DType, out: &mut [F]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        let mut done = 0;
        if dtype == DType::I64 && F::DTYPE == DType::F32 {
            let o = std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut f32, out.len());
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq") {
                done = i64_to_f32_avx512(p as *const i64, o);
            }
            if done == 0 {
                done = i64_to_f32_avx2(p as *const i64, o);
            }
        }
        return load_contiguous_avx2(p.add(done * dtype.size()), dtype, &mut out[done..]);
    }
    load_contiguous_any(p, dtype, out)
}

/// [`load_contiguous_any`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn load_contiguous_avx2<F: Real>(p: *const u8, dtype: DType, out: &mut [F]) {
    load_contiguous_any(p, dtype, out)
}

/// Converts the leading whole groups of eight int64 values of `out.len()`
/// at `src` to float32, stopping at the first group with a value outside
/// the int32 range (the caller converts the rest one by one); returns how
/// many were converted. An int32 value rounds to float32 as its int64 does
/// (one rounding to nearest, even on ties).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn i64_to_f32_avx2(src: *const i64, out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    // the low halves of four int64 in dwords 0..4, the high halves in 4..8
    let split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    let mut t = 0;
    while t + 8 <= out.len() {
        let a = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(src.add(t) as *const __m256i), split);
        let b = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(src.add(t + 4) as *const __m256i), split);
        let lo = _mm256_permute2x128_si256::<0x20>(a, b);
        let hi = _mm256_permute2x128_si256::<0x31>(a, b);
        // in the int32 range: the high half is the low half's sign
        if _mm256_movemask_epi8(_mm256_cmpeq_epi32(hi, _mm256_srai_epi32::<31>(lo))) != -1 {
            break;
        }
        _mm256_storeu_ps(out.as_mut_ptr().add(t), _mm256_cvtepi32_ps(lo));
        t += 8;
    }
    t
}

/// Converts the leading whole groups of eight int64 values of `out.len()`
/// at `src` to float32 in AVX-512 (one rounding to nearest, even on ties);
/// returns how many were converted: all of those groups, or none if a value
/// lies outside `[-2^53, 2^53)` (where converting through float64, as the
/// other paths do, could round twice).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn i64_to_f32_avx512(src: *const i64, out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let bias = _mm512_set1_epi64(1 << 53);
    let mut outside = _mm512_setzero_si512();
    let mut t = 0;
    while t + 8 <= out.len() {
        let v = _mm512_loadu_si512(src.add(t) as *const _);
        // v + 2^53 < 2^54 for every v in range
        outside = _mm512_or_si512(outside, _mm512_srli_epi64::<54>(_mm512_add_epi64(v, bias)));
        _mm256_storeu_ps(out.as_mut_ptr().add(t), _mm512_cvtepi64_ps(v));
        t += 8;
    }
    if _mm512_test_epi64_mask(outside, outside) != 0 {
        return 0;
    }
    t
}

/// The conversions of [`load_contiguous`], for any target.
#[inline(always)]
unsafe fn load_contiguous_any<F: Real>(p: *const u8, dtype: DType, out: &mut [F]) {
    #[inline(always)]
    unsafe fn conv<T: Copy, F: Real>(p: *const u8, out: &mut [F], f: impl Fn(T) -> F) {
        let src = std::slice::from_raw_parts(p as *const T, out.len());
        for (o, &s) in out.iter_mut().zip(src) {
            *o = f(s);
        }
    }
    match dtype {
        DType::F64 => conv(p, out, |v: f64| F::of(v)),
        DType::F32 => conv(p, out, |v: f32| F::of_f32(v)),
        DType::BF16 => conv(p, out, |v: bf16| F::of_f32(v.to_f32())),
        DType::F16 => conv(p, out, |v: f16| F::of_f32(v.to_f32())),
        DType::Bool | DType::U8 => conv(p, out, |v: u8| F::of_f32(v as f32)),
        DType::I8 => conv(p, out, |v: i8| F::of_f32(v as f32)),
        DType::I16 => conv(p, out, |v: i16| F::of_f32(v as f32)),
        DType::I32 => conv(p, out, |v: i32| F::of(v as f64)),
        DType::I64 => conv(p, out, |v: i64| F::of(v as f64)),
    }
}

/// A writable `(rows, cols)` float view; rows are handed to one task each.
#[derive(Debug, Clone)]
pub struct MatMut {
    pub tensor: Tensor,
    pub rows: usize,
    pub cols: usize,
    rs: isize,
    cs: isize,
}

impl MatMut {
    /// Views a writable floating-point tensor of exactly `(rows, cols)`.
    pub fn new(tensor: &Tensor, rows: usize, cols: usize, like: &str) -> Result<Self> {
        if tensor.read_only {
            return Err(Error::value_error(tensor.arg, "the output buffer is read-only"));
        }
        tensor.expect_float()?;
        tensor.expect_shape(&[rows, cols], like)?;
        Ok(MatMut { tensor: tensor.clone(), rows, cols, rs: tensor.strides[0], cs: tensor.strides[1] })
    }

    /// Hands columns `start .. start + len` of row `i` to `f` as a mutable
    /// `F` slice (the buffer itself when it is a contiguous `F` run, else
    /// `scratch`, stored back after `f`).
    ///
    /// # Safety
    /// No other task may access row `i` at the same time.
    #[inline]
    pub unsafe fn with_part<F: Real, R>(
        &self,
        i: usize,
        start: usize,
        len: usize,
        scratch: &mut [F],
        f: impl FnOnce(&mut [F]) -> R,
    ) -> R {
        match self.direct_part::<F>(i, start, len) {
            Some(run) => f(run),
            None => {
                let r = f(&mut scratch[..len]);
                self.store_part(i, start, &scratch[..len]);
                r
            }
        }
    }

    /// Whether every row is a contiguous `F` run ([`MatMut::direct_part`] is `Some`).
    #[inline]
    pub fn is_direct<F: Real>(&self) -> bool {
        self.tensor.dtype == F::DTYPE && self.cs == 1
    }

    /// Columns `start .. start + len` of row `i` as a mutable `F` slice, when
    /// the buffer holds contiguous `F` rows; otherwise `None` (write a scratch
    /// run and [`MatMut::store_part`] it).
    ///
    /// # Safety
    /// No other task may access row `i` while the slice lives.
    #[inline(always)]
    pub unsafe fn direct_part<'a, F: Real>(&'a self, i: usize, start: usize, len: usize) -> Option<&'a mut [F]> {
        debug_assert!(i < self.rows && start + len <= self.cols);
        let p = self.tensor.ptr.wrapping_offset((i as isize * self.rs + start as isize) * self.tensor.dtype.size() as isize);
        self.is_direct::<F>().then(|| std::slice::from_raw_parts_mut(p as *mut F, len))
    }

    /// Converts and stores `src` into row `i` from column `start` on.
    ///
    /// # Safety
    /// No other task may access row `i` at the same time.
    #[inline]
    pub unsafe fn store_part<F: Real>(&self, i: usize, start: usize, src: &[F]) {
        debug_assert!(i < self.rows && start + src.len() <= self.cols);
        let size = self.tensor.dtype.size() as isize;
        let p = self.tensor.ptr.wrapping_offset((i as isize * self.rs + start as isize * self.cs) * size);
        for (j, &v) in src.iter().enumerate() {
            v.write(p.wrapping_offset(j as isize * self.cs * size), self.tensor.dtype);
        }
    }
}

/// The most columns of a row a kernel holds in a scratch buffer at once; long
/// rows go through in pieces of this many. A multiple of every summation
/// block (8 lanes, 64-token blocks), so a row's sums come out bitwise the
/// same as over the whole row. `cargo test` uses 128, so its small batches
/// go through the piecewise path too.
#[cfg(not(test))]
pub const PIECE: usize = 1 << 16;
#[cfg(test)]
pub const PIECE: usize = 128;

/// The `(start, len)` pieces of a row of `cols` columns, in order.
#[inline]
pub fn pieces(cols: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..cols).step_by(PIECE).map(move |start| (start, PIECE.min(cols - start)))
}

/// A per-thread scratch buffer for pieces of rows of `cols` columns (see
/// [`PIECE`]); a `MemoryError` about `arg` if it cannot be allocated.
pub fn piece_scratch<F: Real>(arg: &'static str, cols: usize) -> Result<Vec<F>> {
    crate::error::try_zeros(arg, cols.min(PIECE))
}

/// All `tensors` must be on `device`; the error names the first that is not.
pub fn same_device(device: Device, tensors: &[&Tensor]) -> Result<()> {
    for d in tensors {
        if d.device != device {
            return Err(Error::value_error(
                d.arg,
                format!("is on {} but log_prob is on {device}; all tensors must be on one device", d.device),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_row_broadcasts_and_strided_rows_load() {
        let a = [1.0f32, 2.0, 3.0];
        let m = Tensor::from_slice("advantages", &a, &[3]).matrix_or_per_row(3, 4).unwrap();
        assert!(m.is_per_row());
        let mut s = vec![0.0f64; 4];
        assert_eq!(m.row(1, &mut s), &[2.0, 2.0, 2.0, 2.0]);

        let b: Vec<i64> = (0..6).collect();
        let mut d = Tensor::from_slice("response_mask", &b, &[3, 2]);
        // transpose: view (2, 3) with strides (1, 2)
        d.shape = vec![2, 3];
        d.strides = vec![1, 2];
        let m = d.matrix().unwrap();
        let mut s = vec![0.0f32; 3];
        assert_eq!(m.row(1, &mut s), &[1.0, 3.0, 5.0]);
    }

    #[test]
    fn int64_runs_convert_as_each_value_does() {
        // groups of eight in the int32 range, one outside it (the rest go one
        // by one from there), values that round, and tails of every length
        let big = [1i64 << 40, -(1i64 << 33) - 1, i64::MAX, i64::MIN, (1 << 31) + 3];
        let mut vals: Vec<i64> = (-20..20).collect();
        vals.extend([16_777_217, -16_777_219, i32::MAX as i64, i32::MIN as i64, 0, 1, -1, 2]);
        vals.extend(big);
        vals.extend((0..19).map(|k| k * 1_000_003 - 7));
        for skip in 0..9 {
            let src = &vals[skip..];
            let m = Tensor::from_slice("response_mask", src, &[1, src.len()]).matrix().unwrap();
            let mut s32 = vec![0.0f32; src.len()];
            let want: Vec<f32> = src.iter().map(|&v| v as f32).collect();
            assert_eq!(m.row(0, &mut s32), &want[..], "skip {skip}");
            let mut s64 = vec![0.0f64; src.len()];
            let want: Vec<f64> = src.iter().map(|&v| v as f64).collect();
            assert_eq!(m.row(0, &mut s64), &want[..], "skip {skip}");
        }
    }

    /// The AVX-512 conversion on its own: every whole group of eight where
    /// all values lie in [-2^53, 2^53) (values that round included), none
    /// where one does not (the other paths then round through float64).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn int64_runs_convert_in_avx512_only_where_one_rounding_is_theirs() {
        if !(std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq")) {
            eprintln!("no AVX-512DQ on this CPU: nothing to check");
            return;
        }
        let mut vals: Vec<i64> = (-20..20).collect();
        vals.extend([16_777_217, -16_777_219, (1 << 53) - 1, -(1 << 53), 0, 1, -1, 2, 1 << 40, 3]);
        for len in [0, 7, 8, 19, vals.len()] {
            let mut out = vec![f32::NAN; len];
            // SAFETY: AVX-512F and DQ are present; `vals` holds `len` values.
            let done = unsafe { i64_to_f32_avx512(vals.as_ptr(), &mut out) };
            assert_eq!(done, len / 8 * 8);
            let want: Vec<f32> = vals[..done].iter().map(|&v| v as f32).collect();
            assert_eq!(&out[..done], &want[..]);
        }
        for outside in [1i64 << 53, -(1 << 53) - 1, i64::MAX, i64::MIN] {
            let mut v = vals.clone();
            v[11] = outside;
            let mut out = vec![0.0f32; v.len()];
            // SAFETY: as above.
            assert_eq!(unsafe { i64_to_f32_avx512(v.as_ptr(), &mut out) }, 0, "{outside}");
        }
    }

    #[test]
    fn shape_errors_name_the_argument() {
        let a = [0.0f32; 6];
        let e = Tensor::from_slice("advantages", &a, &[6]).matrix_or_per_row(2, 3).unwrap_err();
        assert_eq!(e.arg, "advantages");
        let e = Tensor::from_slice("log_prob", &a, &[6]).matrix().unwrap_err();
        assert_eq!(e.arg, "log_prob");
    }

    #[test]
    fn bf16_rows_convert() {
        let a: Vec<bf16> = [1.5f32, -2.0].iter().map(|&v| bf16::from_f32(v)).collect();
        let m = Tensor::from_slice("log_prob", &a, &[1, 2]).matrix().unwrap();
        let mut s = vec![0.0f32; 2];
        assert_eq!(m.row(0, &mut s), &[1.5, -2.0]);
    }
}
