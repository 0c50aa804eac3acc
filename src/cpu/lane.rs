//! One formula, two widths: the token math of the policy loss is written
//! once over [`Lane`], which is a scalar (`f32`, `f64`) or, on x86-64, four
//! `f32` in an SSE2 register ([`F32x4`]). Every operation is a plain IEEE
//! op or a select, in the same order for both widths, so the vector body and
//! the scalar tail give bitwise the same values, and no data-dependent
//! branch is left for random clip / sign / mask patterns to mispredict.

use std::ops::{Add, BitAnd, BitOr, Div, Mul, Neg, Sub};

/// A scalar or a short vector of floats.
pub trait Lane:
    Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> + Neg<Output = Self>
{
    /// Per-lane booleans.
    type Mask: Copy + BitAnd<Output = Self::Mask> + BitOr<Output = Self::Mask>;
    /// Every lane set to `v` (rounded to the lane's float type).
    fn splat(v: f64) -> Self;
    /// Every lane set to `b`.
    fn mask(b: bool) -> Self::Mask;
    fn gt(self, o: Self) -> Self::Mask;
    fn lt(self, o: Self) -> Self::Mask;
    fn ge(self, o: Self) -> Self::Mask;
    fn le(self, o: Self) -> Self::Mask;
    fn eq(self, o: Self) -> Self::Mask;
    /// `self != o`, true when either is NaN (IEEE unordered-or-unequal).
    fn ne(self, o: Self) -> Self::Mask;
    fn is_nan(self) -> Self::Mask;
    /// `m ? a : b`, lane by lane.
    fn select(m: Self::Mask, a: Self, b: Self) -> Self;
    /// `exp(x)` for `|x| <= 20` and NaN: [`exp_f32`] for `f32` lanes
    /// (within 2 ulp), the library `exp` for `f64`.
    fn exp_bounded(self) -> Self;
    /// `exp(x)` for any `x` (0 below the range, inf above, NaN for NaN):
    /// [`exp_any_f32`] for `f32` lanes, the library `exp` for `f64`.
    fn exp_any(self) -> Self;
    /// The natural logarithm, lane by lane with the library `ln` (the same
    /// function for every width, so every width gives the same bits).
    fn ln(self) -> Self;
    /// The value rounded to `f32` (kept in the lane's type): the identity for
    /// `f32` lanes.
    fn narrow(self) -> Self {
        self
    }
}

/// `exp` of `f32` lanes over the whole line from [`exp_f32`]: far from 0
/// (`|x| > 80`) as the square of `exp(x / 2)`, which overflows to inf past
/// `ln(f32::MAX)` and underflows through the subnormals to 0 (a few ulp
/// there); NaN stays NaN.
#[inline(always)]
pub fn exp_any_f32<L: F32Lane>(x: L) -> L {
    let c = L::splat;
    let h = exp_f32(x * c(0.5));
    L::select(x.gt(c(80.0)) | x.lt(c(-80.0)), h * h, exp_f32(x))
}

/// `torch.clamp(x, lo, hi)`: NaN stays NaN; the mask says whether the
/// gradient passes: strictly inside the bounds (torch 2.15), or also on them
/// when `closed` (torch 2.11; see `ops::policy_loss::Clip::clamp_closed`). Never for NaN.
#[inline(always)]
pub fn clamp<L: Lane>(x: L, lo: L, hi: L, closed: bool) -> (L, L::Mask) {
    let v = L::select(x.lt(lo), lo, x);
    let v = L::select(v.gt(hi), hi, v);
    let pass = if closed { x.ge(lo) & x.le(hi) } else { x.gt(lo) & x.lt(hi) };
    (v, pass)
}

/// `f32` lanes that can scale by a power of two given as bits.
pub trait F32Lane: Lane {
    /// `p * 2^n`, where `shifted = n + 1.5 * 2^23` holds the integer `n`
    /// (in [-126, 127]) in its low mantissa bits.
    fn scale_pow2(p: Self, shifted: Self) -> Self;
}

/// `exp` of `f32` lanes for arguments in [-20, 20] (NaN propagates), the
/// same operations in the same order for every width: Cody-Waite reduction
/// `x = n ln2 + r`, `|r| <= ln2 / 2`, a degree-7 Taylor polynomial for `e^r`
/// (truncation below 1e-8 relative) evaluated by Estrin's scheme (short
/// dependency chains), and `2^n` built from bits. No branches, no calls.
#[inline(always)]
pub fn exp_f32<L: F32Lane>(x: L) -> L {
    const LN2_HI: f64 = 0.693_359_375; // n * LN2_HI is exact in f32 for |n| < 2^15
    const LN2_LO: f64 = -2.121_944_4e-4;
    // round to nearest by adding and removing 1.5 * 2^23 (|x log2 e| < 2^22)
    const SHIFTER: f64 = 12_582_912.0;
    let c = L::splat;
    let x = L::select(x.lt(c(-87.0)), c(-87.0), x); // keeps 2^n normal; NaN stays NaN
    let x = L::select(x.gt(c(88.0)), c(88.0), x);
    let shifted = x * c(std::f64::consts::LOG2_E) + c(SHIFTER);
    let n = shifted - c(SHIFTER);
    let r = (x - n * c(LN2_HI)) - n * c(LN2_LO);
    let r2 = r * r;
    let r4 = r2 * r2;
    let p01 = c(1.0) + r;
    let p23 = c(0.5) + r * c(1.0 / 6.0);
    let p45 = c(1.0 / 24.0) + r * c(1.0 / 120.0);
    let p67 = c(1.0 / 720.0) + r * c(1.0 / 5040.0);
    let p = (p01 + r2 * p23) + r4 * (p45 + r2 * p67);
    L::scale_pow2(p, shifted)
}

macro_rules! scalar_lane {
    ($t:ty, $exp:expr, $exp_any:expr) => {
        impl Lane for $t {
            type Mask = bool;
            #[inline(always)]
            fn splat(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn mask(b: bool) -> bool {
                b
            }
            #[inline(always)]
            fn gt(self, o: Self) -> bool {
                self > o
            }
            #[inline(always)]
            fn lt(self, o: Self) -> bool {
                self < o
            }
            #[inline(always)]
            fn ge(self, o: Self) -> bool {
                self >= o
            }
            #[inline(always)]
            fn le(self, o: Self) -> bool {
                self <= o
            }
            #[inline(always)]
            fn eq(self, o: Self) -> bool {
                self == o
            }
            #[inline(always)]
            fn ne(self, o: Self) -> bool {
                self != o
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                self != self
            }
            #[inline(always)]
            fn select(m: bool, a: Self, b: Self) -> Self {
                if m {
                    a
                } else {
                    b
                }
            }
            #[inline(always)]
            fn exp_bounded(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn exp_any(self) -> Self {
                $exp_any(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn narrow(self) -> Self {
                self as f32 as $t
            }
        }
    };
}
scalar_lane!(f32, exp_f32, exp_any_f32);
scalar_lane!(f64, f64::exp, f64::exp);

impl F32Lane for f32 {
    #[inline(always)]
    fn scale_pow2(p: f32, shifted: f32) -> f32 {
        // integer ops on the bits, not a float-to-int cast (which would not
        // vectorise); for NaN, p is NaN and so is the product
        let n = shifted.to_bits().wrapping_sub((12_582_912.0f32).to_bits());
        p * f32::from_bits(n.wrapping_add(127) << 23)
    }
}

#[cfg(target_arch = "x86_64")]
pub use sse::F32x4;

#[cfg(target_arch = "x86_64")]
mod sse {
    //! SSE2 is part of the x86-64 baseline, so these intrinsics need no
    //! run-time feature detection.
    use super::Lane;
    use std::arch::x86_64::*;
    use std::ops::{Add, BitAnd, BitOr, Div, Mul, Neg, Sub};

    /// Four `f32` lanes.
    #[derive(Clone, Copy)]
    pub struct F32x4(pub __m128);

    /// Four lane masks (all-ones or all-zeros bits).
    #[derive(Clone, Copy)]
    pub struct M4(__m128);

    impl F32x4 {
        /// Loads `s[0..4]`.
        #[inline(always)]
        pub fn load(s: &[f32]) -> Self {
            assert!(s.len() >= 4);
            // SAFETY: 4 readable f32 checked above; unaligned load.
            F32x4(unsafe { _mm_loadu_ps(s.as_ptr()) })
        }
        /// Stores into `s[0..4]`.
        #[inline(always)]
        pub fn store(self, s: &mut [f32]) {
            assert!(s.len() >= 4);
            // SAFETY: 4 writable f32 checked above; unaligned store.
            unsafe { _mm_storeu_ps(s.as_mut_ptr(), self.0) }
        }
    }

    macro_rules! binop {
        ($tr:ident, $f:ident, $intr:ident) => {
            impl $tr for F32x4 {
                type Output = F32x4;
                #[inline(always)]
                fn $f(self, o: F32x4) -> F32x4 {
                    // SAFETY: SSE2 is always available on x86-64.
                    F32x4(unsafe { $intr(self.0, o.0) })
                }
            }
        };
    }
    binop!(Add, add, _mm_add_ps);
    binop!(Sub, sub, _mm_sub_ps);
    binop!(Mul, mul, _mm_mul_ps);
    binop!(Div, div, _mm_div_ps);

    impl Neg for F32x4 {
        type Output = F32x4;
        #[inline(always)]
        fn neg(self) -> F32x4 {
            // flip the sign bit, exactly as scalar negation does
            F32x4(unsafe { _mm_xor_ps(self.0, _mm_set1_ps(-0.0)) })
        }
    }
    impl BitAnd for M4 {
        type Output = M4;
        #[inline(always)]
        fn bitand(self, o: M4) -> M4 {
            M4(unsafe { _mm_and_ps(self.0, o.0) })
        }
    }
    impl BitOr for M4 {
        type Output = M4;
        #[inline(always)]
        fn bitor(self, o: M4) -> M4 {
            M4(unsafe { _mm_or_ps(self.0, o.0) })
        }
    }

    impl Lane for F32x4 {
        type Mask = M4;
        #[inline(always)]
        fn splat(v: f64) -> Self {
            F32x4(unsafe { _mm_set1_ps(v as f32) })
        }
        #[inline(always)]
        fn mask(b: bool) -> M4 {
            M4(unsafe { _mm_castsi128_ps(_mm_set1_epi32(if b { -1 } else { 0 })) })
        }
        #[inline(always)]
        fn gt(self, o: Self) -> M4 {
            M4(unsafe { _mm_cmpgt_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn lt(self, o: Self) -> M4 {
            M4(unsafe { _mm_cmplt_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn ge(self, o: Self) -> M4 {
            M4(unsafe { _mm_cmpge_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn le(self, o: Self) -> M4 {
            M4(unsafe { _mm_cmple_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn eq(self, o: Self) -> M4 {
            M4(unsafe { _mm_cmpeq_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn ne(self, o: Self) -> M4 {
            M4(unsafe { _mm_cmpneq_ps(self.0, o.0) })
        }
        #[inline(always)]
        fn is_nan(self) -> M4 {
            M4(unsafe { _mm_cmpunord_ps(self.0, self.0) })
        }
        #[inline(always)]
        fn select(m: M4, a: Self, b: Self) -> Self {
            F32x4(unsafe { _mm_or_ps(_mm_and_ps(m.0, a.0), _mm_andnot_ps(m.0, b.0)) })
        }
        #[inline(always)]
        fn exp_bounded(self) -> Self {
            super::exp_f32(self)
        }
        #[inline(always)]
        fn exp_any(self) -> Self {
            super::exp_any_f32(self)
        }
        #[inline(always)]
        fn ln(self) -> Self {
            let mut x = [0.0f32; 4];
            self.store(&mut x);
            F32x4::load(&x.map(f32::ln))
        }
    }

    impl super::F32Lane for F32x4 {
        #[inline(always)]
        fn scale_pow2(p: Self, shifted: Self) -> Self {
            // SAFETY: integer ops on the bits, SSE2.
            let scale = unsafe {
                let n = _mm_sub_epi32(_mm_castps_si128(shifted.0), _mm_set1_epi32((12_582_912.0f32).to_bits() as i32));
                _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(n, _mm_set1_epi32(127)), 23))
            };
            p * F32x4(scale)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn vector_exp_is_bitwise_the_scalar_exp() {
            let xs: Vec<f32> = (-2000..2000).map(|k| k as f32 * 0.0101).chain([f32::NAN, 0.0, -0.0, 20.0, -20.0]).collect();
            for c in xs.chunks_exact(4) {
                let mut out = [0.0f32; 4];
                F32x4::load(c).exp_bounded().store(&mut out);
                for (x, y) in c.iter().zip(out) {
                    let s = <f32 as Lane>::exp_bounded(*x);
                    assert!(s.to_bits() == y.to_bits() || (s.is_nan() && y.is_nan()), "{x}: {s} vs {y}");
                }
            }
        }
    }
}

/// A kernel width: the compute float `F` and the vector `V` of `WIDTH`
/// lanes the token loop runs on (the scalar tail runs on `F`).
pub trait Wide: Copy + Send + Sync + 'static {
    type F: crate::tensor::Real + Lane;
    type V: Lane;
    const WIDTH: usize;
    fn load(s: &[Self::F]) -> Self::V;
    fn store(v: Self::V, s: &mut [Self::F]);
}

/// Scalar `f64`: float64 inputs are rare and not the speed target.
#[derive(Clone, Copy)]
pub struct ScalarF64;

impl Wide for ScalarF64 {
    type F = f64;
    type V = f64;
    const WIDTH: usize = 1;
    #[inline(always)]
    fn load(s: &[f64]) -> f64 {
        s[0]
    }
    #[inline(always)]
    fn store(v: f64, s: &mut [f64]) {
        s[0] = v
    }
}

/// Scalar `f32`, where no vector width is implemented (and in tests, as the
/// reference the vector widths must equal bit for bit).
#[cfg(any(test, not(target_arch = "x86_64")))]
#[derive(Clone, Copy)]
pub struct ScalarF32;

#[cfg(any(test, not(target_arch = "x86_64")))]
impl Wide for ScalarF32 {
    type F = f32;
    type V = f32;
    const WIDTH: usize = 1;
    #[inline(always)]
    fn load(s: &[f32]) -> f32 {
        s[0]
    }
    #[inline(always)]
    fn store(v: f32, s: &mut [f32]) {
        s[0] = v
    }
}

/// Four `f32` lanes in SSE2 (every x86-64 CPU).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct Sse;

#[cfg(target_arch = "x86_64")]
impl Wide for Sse {
    type F = f32;
    type V = F32x4;
    const WIDTH: usize = 4;
    #[inline(always)]
    fn load(s: &[f32]) -> F32x4 {
        F32x4::load(s)
    }
    #[inline(always)]
    fn store(v: F32x4, s: &mut [f32]) {
        v.store(s)
    }
}

/// Eight `f32` lanes in AVX2. Used only from functions compiled with
/// `target_feature(enable = "avx2")` after run-time detection (see
/// `policy_loss::row_avx2`); every method is `inline(always)` and the hot
/// path has no closures, so the intrinsics inline into that function.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Wide for Avx2 {
    type F = f32;
    type V = avx::F32x8;
    const WIDTH: usize = 8;
    #[inline(always)]
    fn load(s: &[f32]) -> avx::F32x8 {
        avx::F32x8::load(s)
    }
    #[inline(always)]
    fn store(v: avx::F32x8, s: &mut [f32]) {
        v.store(s)
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx {
    //! The AVX2 twin of `sse::F32x4`: the same IEEE operations in the same
    //! order, eight lanes wide (no FMA, so results equal the SSE2 and scalar
    //! paths bit for bit).
    use super::Lane;
    use std::arch::x86_64::*;
    use std::ops::{Add, BitAnd, BitOr, Div, Mul, Neg, Sub};

    #[derive(Clone, Copy)]
    pub struct F32x8(__m256);

    #[derive(Clone, Copy)]
    pub struct M8(__m256);

    impl F32x8 {
        #[inline(always)]
        pub fn load(s: &[f32]) -> Self {
            assert!(s.len() >= 8);
            // SAFETY: 8 readable f32; AVX is enabled wherever this inlines.
            F32x8(unsafe { _mm256_loadu_ps(s.as_ptr()) })
        }
        #[inline(always)]
        pub fn store(self, s: &mut [f32]) {
            assert!(s.len() >= 8);
            // SAFETY: 8 writable f32.
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), self.0) }
        }
    }

    impl Add for F32x8 {
        type Output = F32x8;
        #[inline(always)]
        fn add(self, o: F32x8) -> F32x8 {
            F32x8(unsafe { _mm256_add_ps(self.0, o.0) })
        }
    }
    impl Sub for F32x8 {
        type Output = F32x8;
        #[inline(always)]
        fn sub(self, o: F32x8) -> F32x8 {
            F32x8(unsafe { _mm256_sub_ps(self.0, o.0) })
        }
    }
    impl Mul for F32x8 {
        type Output = F32x8;
        #[inline(always)]
        fn mul(self, o: F32x8) -> F32x8 {
            F32x8(unsafe { _mm256_mul_ps(self.0, o.0) })
        }
    }
    impl Div for F32x8 {
        type Output = F32x8;
        #[inline(always)]
        fn div(self, o: F32x8) -> F32x8 {
            F32x8(unsafe { _mm256_div_ps(self.0, o.0) })
        }
    }
    impl Neg for F32x8 {
        type Output = F32x8;
        #[inline(always)]
        fn neg(self) -> F32x8 {
            F32x8(unsafe { _mm256_xor_ps(self.0, _mm256_set1_ps(-0.0)) })
        }
    }
    impl BitAnd for M8 {
        type Output = M8;
        #[inline(always)]
        fn bitand(self, o: M8) -> M8 {
            M8(unsafe { _mm256_and_ps(self.0, o.0) })
        }
    }
    impl BitOr for M8 {
        type Output = M8;
        #[inline(always)]
        fn bitor(self, o: M8) -> M8 {
            M8(unsafe { _mm256_or_ps(self.0, o.0) })
        }
    }

    impl Lane for F32x8 {
        type Mask = M8;
        #[inline(always)]
        fn splat(v: f64) -> Self {
            F32x8(unsafe { _mm256_set1_ps(v as f32) })
        }
        #[inline(always)]
        fn mask(b: bool) -> M8 {
            M8(unsafe { _mm256_castsi256_ps(_mm256_set1_epi32(if b { -1 } else { 0 })) })
        }
        #[inline(always)]
        fn gt(self, o: Self) -> M8 {
            M8(unsafe { _mm256_cmp_ps::<_CMP_GT_OQ>(self.0, o.0) })
        }
        #[inline(always)]
        fn lt(self, o: Self) -> M8 {
            M8(unsafe { _mm256_cmp_ps::<_CMP_LT_OQ>(self.0, o.0) })
        }
        #[inline(always)]
        fn ge(self, o: Self) -> M8 {
            M8(unsafe { _mm256_cmp_ps::<_CMP_GE_OQ>(self.0, o.0) })
        }
        #[inline(always)]
        fn le(self, o: Self) -> M8 {
            M8(unsafe { _mm256_cmp_ps::<_CMP_LE_OQ>(self.0, o.0) })
        }
        #[inline(always)]
        fn eq(self, o: Self) -> M8 {
            M8(unsafe { _mm256_cmp_ps::<_CMP_EQ_OQ>(self.0, o.0) })
        }
        #[inline(always)]
        fn ne(self, o: Self) -> M8 {
            M8(unsafe { _mm256_cmp_ps::<_CMP_NEQ_UQ>(self.0, o.0) })
        }
        #[inline(always)]
        fn is_nan(self) -> M8 {
            M8(unsafe { _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0) })
        }
        #[inline(always)]
        fn select(m: M8, a: Self, b: Self) -> Self {
            F32x8(unsafe { _mm256_blendv_ps(b.0, a.0, m.0) })
        }
        #[inline(always)]
        fn exp_bounded(self) -> Self {
            super::exp_f32(self)
        }
        #[inline(always)]
        fn exp_any(self) -> Self {
            super::exp_any_f32(self)
        }
        #[inline(always)]
        fn ln(self) -> Self {
            let mut x = [0.0f32; 8];
            self.store(&mut x);
            F32x8::load(&x.map(f32::ln))
        }
    }

    impl super::F32Lane for F32x8 {
        #[inline(always)]
        fn scale_pow2(p: Self, shifted: Self) -> Self {
            let scale = unsafe {
                let n = _mm256_sub_epi32(_mm256_castps_si256(shifted.0), _mm256_set1_epi32((12_582_912.0f32).to_bits() as i32));
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n, _mm256_set1_epi32(127))))
            };
            p * F32x8(scale)
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_on_its_domain() {
        let mut worst = 0.0f64;
        for k in -200_000..=200_000 {
            let x = k as f32 * 1e-4;
            let exact = (x as f64).exp();
            let got = exp_f32(x) as f64;
            let ulp = (exact as f32).abs() as f64 * f32::EPSILON as f64;
            worst = worst.max((got - exact).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0f32), 1.0);
    }

    #[test]
    fn exp_any_f32_covers_the_line() {
        let mut worst = 0.0f64;
        for k in -1_100..=900 {
            let x = k as f32 * 0.1;
            let exact = (x as f64).exp();
            let got = exp_any_f32(x) as f64;
            if exact < f32::MIN_POSITIVE as f64 {
                // subnormal or 0: within the subnormal spacing
                assert!((got - exact).abs() <= 4.0 * 1.5e-45, "{x}: {got} vs {exact}");
                continue;
            }
            if exact > f32::MAX as f64 {
                assert_eq!(got, f64::INFINITY, "{x}");
                continue;
            }
            let ulp = (exact as f32).abs() as f64 * f32::EPSILON as f64;
            worst = worst.max((got - exact).abs() / ulp);
        }
        assert!(worst <= 5.0, "worst error {worst} ulp");
        assert_eq!(exp_any_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_any_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_any_f32(f32::NAN).is_nan());
    }
}
