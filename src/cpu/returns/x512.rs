//! The scans' float32 kernels in AVX-512 (see `steps`).

use super::{Carry, Col, LaneMoments, LANES};
use std::arch::x86_64::*;
const _: () = assert!(LANES == 16);

/// A lane group's moments in registers: the shift, whether it is
/// set, and the sums, each in two halves of eight float64 lanes.
struct Mom {
    k: [__m512d; 2],
    have: __mmask16,
    n: [__m512d; 2],
    s: [__m512d; 2],
    q: [__m512d; 2],
}

impl Mom {
    #[inline(always)]
    unsafe fn load(m: &LaneMoments) -> Self {
        let ld = |a: &[f64; LANES]| [_mm512_loadu_pd(a.as_ptr()), _mm512_loadu_pd(a.as_ptr().add(8))];
        let mut have = 0u16;
        for (l, &h) in m.have.iter().enumerate() {
            have |= (h as u16) << l;
        }
        Mom { k: ld(&m.k), have, n: ld(&m.n), s: ld(&m.s), q: ld(&m.q) }
    }

    #[inline(always)]
    unsafe fn save(&self, m: &mut LaneMoments) {
        let st = |a: &mut [f64; LANES], v: [__m512d; 2]| {
            _mm512_storeu_pd(a.as_mut_ptr(), v[0]);
            _mm512_storeu_pd(a.as_mut_ptr().add(8), v[1]);
        };
        st(&mut m.k, self.k);
        st(&mut m.n, self.n);
        st(&mut m.s, self.s);
        st(&mut m.q, self.q);
        for (l, h) in m.have.iter_mut().enumerate() {
            *h = (self.have >> l) & 1 == 1;
        }
    }

    /// The values of the kept lanes (0 elsewhere), and the lanes whose first
    /// kept finite value this is (which becomes their shift).
    #[inline(always)]
    unsafe fn kept(&mut self, keep: __mmask16, x: __m512) -> (__m512, __mmask16) {
        let v = _mm512_maskz_mov_ps(keep, x);
        let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(v), _mm512_set1_ps(f32::INFINITY));
        let newly = keep & !self.have & finite;
        self.have |= newly;
        (v, newly)
    }

    /// Half `h` of the values `vh` less the shift, set first where `newly`.
    #[inline(always)]
    unsafe fn shifted(&mut self, h: usize, newly: __mmask16, vh: __m512d) -> __m512d {
        self.k[h] = _mm512_mask_mov_pd(self.k[h], (newly >> (8 * h)) as u8, vh);
        _mm512_sub_pd(vh, self.k[h])
    }

    /// [`Mom::add`] where the weights are 0 or 1, given as the lanes `keep`
    /// (the tile kernels' masks), in fewer operations and to the same bits:
    /// a weight of 1 multiplies exactly, and a weight of 0 adds a zero (of
    /// some sign: the difference from the shift is finite there) to a sum
    /// that is never -0 (it starts at +0, and `a + b` is -0 only when both
    /// are), which leaves the sum as it is: here it is left as it is.
    #[inline(always)]
    unsafe fn add_keep(&mut self, keep: __mmask16, x: __m512) {
        let (v, newly) = self.kept(keep, x);
        let one = _mm512_set1_pd(1.0);
        for h in 0..2 {
            let (kh, vh) = ((keep >> (8 * h)) as u8, half(v, h));
            let d = self.shifted(h, newly, vh);
            self.n[h] = _mm512_mask_add_pd(self.n[h], kh, self.n[h], one);
            self.s[h] = _mm512_mask_add_pd(self.s[h], kh, self.s[h], d);
            self.q[h] = _mm512_mask_add_pd(self.q[h], kh, self.q[h], _mm512_mul_pd(d, d));
        }
    }

    /// [`LaneMoments::add`], sixteen lanes at once.
    #[inline(always)]
    unsafe fn add(&mut self, w: __m512, x: __m512) {
        let keep = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(w, _mm512_setzero_ps());
        let (v, newly) = self.kept(keep, x);
        for h in 0..2 {
            let (wh, vh) = (half(w, h), half(v, h));
            let d = self.shifted(h, newly, vh);
            let wd = _mm512_mul_pd(wh, d);
            self.n[h] = _mm512_add_pd(self.n[h], wh);
            self.s[h] = _mm512_add_pd(self.s[h], wd);
            self.q[h] = _mm512_add_pd(self.q[h], _mm512_mul_pd(wd, d));
        }
    }
}

/// Lanes `8h .. 8h + 8` of `a` as float64.
#[inline(always)]
unsafe fn half(a: __m512, h: usize) -> __m512d {
    let d = _mm512_castps_pd(a);
    _mm512_cvtps_pd(_mm256_castpd_ps(if h == 0 { _mm512_castpd512_pd256(d) } else { _mm512_extractf64x4_pd::<1>(d) }))
}

#[inline(always)]
unsafe fn col(x: &[Col<f32>], t: usize) -> __m512 {
    _mm512_loadu_ps(x.as_ptr().add(t) as *const f32)
}

#[inline(always)]
unsafe fn put(x: &mut [Col<f32>], t: usize, v: __m512) {
    _mm512_storeu_ps(x.as_mut_ptr().add(t) as *mut f32, v)
}

/// GAE's state in registers: the constants, the next value and advantage
/// carried from column to column, and the moments.
struct Gae {
    one: __m512,
    gamma: __m512,
    k: __m512,
    nv: __m512,
    g: __m512,
    mom: Mom,
}

impl Gae {
    #[inline(always)]
    unsafe fn load(c: &Carry<f32>, gamma: f32, k: f32) -> Self {
        let (one, gamma, k) = (_mm512_set1_ps(1.0), _mm512_set1_ps(gamma), _mm512_set1_ps(k));
        Gae { one, gamma, k, nv: col(&[c.nv], 0), g: col(&[c.g], 0), mom: Mom::load(&c.mom) }
    }

    /// One column (rewards, mask, values): verl's loop step; returns the advantage.
    #[inline(always)]
    unsafe fn step(&mut self, rt: __m512, mt: __m512, vt: __m512) -> __m512 {
        self.advance(rt, mt, vt);
        self.mom.add(mt, self.g);
        self.g
    }

    /// [`Gae::step`] with a mask of 0s and 1s, given as the lanes `keep`.
    #[inline(always)]
    unsafe fn step_keep(&mut self, rt: __m512, keep: __mmask16, vt: __m512) -> __m512 {
        self.advance(rt, _mm512_maskz_mov_ps(keep, self.one), vt);
        self.mom.add_keep(keep, self.g);
        self.g
    }

    #[inline(always)]
    unsafe fn advance(&mut self, rt: __m512, mt: __m512, vt: __m512) {
        let delta = _mm512_sub_ps(_mm512_add_ps(rt, _mm512_mul_ps(self.gamma, self.nv)), vt);
        let g_new = _mm512_add_ps(delta, _mm512_mul_ps(self.k, self.g));
        let om = _mm512_sub_ps(self.one, mt);
        self.nv = _mm512_add_ps(_mm512_mul_ps(vt, mt), _mm512_mul_ps(om, self.nv));
        self.g = _mm512_add_ps(_mm512_mul_ps(g_new, mt), _mm512_mul_ps(om, self.g));
    }

    #[inline(always)]
    unsafe fn save(&self, c: &mut Carry<f32>) {
        put(std::slice::from_mut(&mut c.nv), 0, self.nv);
        put(std::slice::from_mut(&mut c.g), 0, self.g);
        self.mom.save(&mut c.mom);
    }
}

/// REINFORCE++'s state in registers: the running return and the moments.
struct Rfpp {
    one: __m512,
    gamma: __m512,
    run: __m512,
    mom: Mom,
}

impl Rfpp {
    #[inline(always)]
    unsafe fn load(c: &Carry<f32>, gamma: f32) -> Self {
        Rfpp { one: _mm512_set1_ps(1.0), gamma: _mm512_set1_ps(gamma), run: col(&[c.run], 0), mom: Mom::load(&c.mom) }
    }

    /// One column (rewards, mask): verl's loop step; returns the return.
    #[inline(always)]
    unsafe fn step(&mut self, rt: __m512, mt: __m512) -> __m512 {
        let x = self.advance(rt, mt);
        self.mom.add(mt, x);
        x
    }

    /// [`Rfpp::step`] with a mask of 0s and 1s, given as the lanes `keep`.
    #[inline(always)]
    unsafe fn step_keep(&mut self, rt: __m512, keep: __mmask16) -> __m512 {
        let x = self.advance(rt, _mm512_maskz_mov_ps(keep, self.one));
        self.mom.add_keep(keep, x);
        x
    }

    #[inline(always)]
    unsafe fn advance(&mut self, rt: __m512, mt: __m512) -> __m512 {
        let new = _mm512_add_ps(rt, _mm512_mul_ps(self.gamma, self.run));
        let x = _mm512_mul_ps(new, mt);
        self.run = _mm512_add_ps(x, _mm512_mul_ps(self.run, _mm512_sub_ps(self.one, mt)));
        x
    }

    #[inline(always)]
    unsafe fn save(&self, c: &mut Carry<f32>) {
        put(std::slice::from_mut(&mut c.run), 0, self.run);
        self.mom.save(&mut c.mom);
    }
}

/// [`super::steps::gae_any`] for float32, on columns.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gae(c: &mut Carry<f32>, gamma: f32, k: f32, r: &[Col<f32>], m: &[Col<f32>], v: &[Col<f32>], adv: &mut [Col<f32>], mut ret: Option<&mut [Col<f32>]>) {
    let len = adv.len();
    assert!(r.len() >= len && m.len() >= len && v.len() >= len && ret.as_ref().is_none_or(|x| x.len() >= len));
    let mut st = Gae::load(c, gamma, k);
    for t in (0..len).rev() {
        let vt = col(v, t);
        let g = st.step(col(r, t), col(m, t), vt);
        put(adv, t, g);
        if let Some(ret) = ret.as_deref_mut() {
            put(ret, t, _mm512_add_ps(g, vt));
        }
    }
    st.save(c);
}

/// [`super::steps::rfpp_any`] for float32, on columns.
#[target_feature(enable = "avx512f")]
pub unsafe fn rfpp(c: &mut Carry<f32>, gamma: f32, r: &[Col<f32>], m: &[Col<f32>], ret: &mut [Col<f32>]) {
    let len = ret.len();
    assert!(r.len() >= len && m.len() >= len);
    let mut st = Rfpp::load(c, gamma);
    for t in (0..len).rev() {
        put(ret, t, st.step(col(r, t), col(m, t)));
    }
    st.save(c);
}

/// A lane group's rows in one block, for the tile kernels: each pointer is
/// at the block's first column of its row, in place (contiguous rows).
/// Lanes past the group's rows read zeros and write into a sink.
pub struct TileRows {
    pub r: [*const f32; LANES],
    /// GAE's values (unused by REINFORCE++)
    pub v: [*const f32; LANES],
    pub m: [*const u8; LANES],
    pub adv: [*mut f32; LANES],
    pub ret: [*mut f32; LANES],
}

/// A mask dtype the tile kernels read as bits.
pub trait MaskBits {
    /// Bytes a value.
    const BYTES: usize;
    /// Bit `j` of the first value: whether column `t0 + j` of the row at `p`
    /// is 1, for the columns in `km`; the second value has a bit set where
    /// it is neither 0 nor 1 (then the tile is left to the column kernels,
    /// which multiply by the mask's value as verl does).
    unsafe fn bits(p: *const u8, t0: usize, km: u16) -> (u32, u32);
}

/// int64 masks (verl's `response_mask`).
pub struct I64Mask;
/// One-byte masks: bool, uint8, int8.
pub struct ByteMask;
/// float32 masks: exactly +0.0 or 1.0 (a -0.0 gives other signs of zero in
/// verl's products, so it counts as neither).
pub struct F32Mask;

impl MaskBits for I64Mask {
    const BYTES: usize = 8;
    #[inline(always)]
    unsafe fn bits(p: *const u8, t0: usize, km: u16) -> (u32, u32) {
        let p = (p as *const i64).add(t0);
        let lo = _mm512_maskz_loadu_epi64(km as u8, p);
        let hi = _mm512_maskz_loadu_epi64((km >> 8) as u8, p.add(8));
        let one = _mm512_set1_epi64(1);
        let bits = _mm512_test_epi64_mask(lo, lo) as u32 | (_mm512_test_epi64_mask(hi, hi) as u32) << 8;
        let bad = _mm512_cmpgt_epu64_mask(lo, one) as u32 | (_mm512_cmpgt_epu64_mask(hi, one) as u32) << 8;
        (bits, bad)
    }
}

impl MaskBits for ByteMask {
    const BYTES: usize = 1;
    #[inline(always)]
    unsafe fn bits(p: *const u8, t0: usize, km: u16) -> (u32, u32) {
        let x = _mm_maskz_loadu_epi8(km, p.add(t0) as *const i8);
        (_mm_test_epi8_mask(x, x) as u32, _mm_cmpgt_epu8_mask(x, _mm_set1_epi8(1)) as u32)
    }
}

impl MaskBits for F32Mask {
    const BYTES: usize = 4;
    #[inline(always)]
    unsafe fn bits(p: *const u8, t0: usize, km: u16) -> (u32, u32) {
        let x = _mm512_maskz_loadu_epi32(km, (p as *const i32).add(t0));
        let one = _mm512_cmpeq_epi32_mask(x, _mm512_set1_epi32(1.0f32.to_bits() as i32));
        let zero = _mm512_cmpeq_epi32_mask(x, _mm512_setzero_si512());
        (one as u32, (km & !(one | zero)) as u32)
    }
}

/// The rows' mask bits of the tile at `t0` (columns `km`), or `None` if a
/// value there is neither 0 nor 1.
#[inline(always)]
unsafe fn tile_bits<M: MaskBits>(rows: &TileRows, t0: usize, km: u16) -> Option<[u32; LANES]> {
    let mut bits = [0u32; LANES];
    let mut bad = 0;
    for (b, &p) in bits.iter_mut().zip(&rows.m) {
        let (x, y) = M::bits(p, t0, km);
        *b = x;
        bad |= y;
    }
    (bad == 0).then_some(bits)
}

/// A 16×16 transpose in four stages of four parts, to be spread between
/// the steps of a tile: after parts `0 .. 16`, `x[c]` lane `l` is what
/// `x[l]` lane `c` was. (Loops of constant bounds, which unroll; `a` holds
/// the odd stages.)
struct Transpose {
    x: [__m512; 16],
    a: [__m512; 16],
}

impl Transpose {
    #[inline(always)]
    unsafe fn new() -> Self {
        Transpose { x: [_mm512_setzero_ps(); 16], a: [_mm512_setzero_ps(); 16] }
    }

    /// Part `S % 4` of stage `S / 4`.
    #[inline(always)]
    unsafe fn part<const S: usize>(&mut self) {
        let (x, a, j) = (&mut self.x, &mut self.a, S % 4);
        match S / 4 {
            // rows 4j .. 4j + 4 interleaved by pairs ...
            0 => {
                for i in 2 * j..2 * j + 2 {
                    a[2 * i] = _mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]);
                    a[2 * i + 1] = _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]);
                }
            }
            // ... then by pairs of pairs: 128-bit lane `q` of `x[4j + k]`
            // holds column `4q + k` of rows `4j .. 4j + 4`
            1 => {
                x[4 * j] = _mm512_shuffle_ps::<0x44>(a[4 * j], a[4 * j + 2]);
                x[4 * j + 1] = _mm512_shuffle_ps::<0xEE>(a[4 * j], a[4 * j + 2]);
                x[4 * j + 2] = _mm512_shuffle_ps::<0x44>(a[4 * j + 1], a[4 * j + 3]);
                x[4 * j + 3] = _mm512_shuffle_ps::<0xEE>(a[4 * j + 1], a[4 * j + 3]);
            }
            // then 128-bit lanes: `a[8p + 2k + o]` holds lanes `o` and `o + 2`
            // of `x[.. + k]` of row quads `2p` and `2p + 1`
            2 => {
                let p = j / 2;
                for k in 2 * (j % 2)..2 * (j % 2) + 2 {
                    a[8 * p + 2 * k] = _mm512_shuffle_f32x4::<0x88>(x[8 * p + k], x[8 * p + 4 + k]);
                    a[8 * p + 2 * k + 1] = _mm512_shuffle_f32x4::<0xDD>(x[8 * p + k], x[8 * p + 4 + k]);
                }
            }
            _ => {
                let k = j;
                x[k] = _mm512_shuffle_f32x4::<0x88>(a[2 * k], a[8 + 2 * k]);
                x[4 + k] = _mm512_shuffle_f32x4::<0x88>(a[2 * k + 1], a[9 + 2 * k]);
                x[8 + k] = _mm512_shuffle_f32x4::<0xDD>(a[2 * k], a[8 + 2 * k]);
                x[12 + k] = _mm512_shuffle_f32x4::<0xDD>(a[2 * k + 1], a[9 + 2 * k]);
            }
        }
    }

    /// All sixteen parts.
    #[inline(always)]
    unsafe fn all(&mut self) {
        macro_rules! parts {
            ($($s:literal)*) => { $( self.part::<$s>(); )* };
        }
        parts!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
    }

    /// The columns of tile `t0` (columns `km`) of the rewards and, where
    /// the scan reads them, the values.
    #[inline(always)]
    unsafe fn columns<S: TileScan>(rows: &TileRows, t0: usize, km: u16) -> (Self, Self) {
        let (mut r, mut v) = (Transpose::new(), Transpose::new());
        r.load(&rows.r, t0, km);
        r.all();
        if S::VALUES {
            v.load(&rows.v, t0, km);
            v.all();
        }
        (r, v)
    }

    /// Loads tile `t0` (columns `km`) of the rows into `x`.
    #[inline(always)]
    unsafe fn load(&mut self, rows: &[*const f32; LANES], t0: usize, km: u16) {
        for (x, &p) in self.x.iter_mut().zip(rows) {
            *x = _mm512_maskz_loadu_ps(km, p.add(t0));
        }
    }
}

/// The rows' bits of a tile of `cnt` columns, shifted so that the last
/// column's is each lane's sign bit (the scan's first).
#[inline(always)]
unsafe fn mask_word(bits: &[u32; LANES], cnt: usize) -> __m512i {
    _mm512_sllv_epi32(_mm512_loadu_si512(bits.as_ptr() as *const _), _mm512_set1_epi32(32 - cnt as i32))
}

/// How many tiles ahead (to the left) GAE's tile kernel prefetches its inputs.
const PREFETCH_TILES: isize = 4;

/// Prefetches the tile at column `t0` (which may lie outside the block, or
/// the row: a prefetch does not fault) of every row's inputs.
#[inline(always)]
unsafe fn prefetch<M: MaskBits>(rows: &TileRows, t0: isize) {
    for l in 0..LANES {
        _mm_prefetch::<_MM_HINT_T0>(rows.r[l].wrapping_offset(t0) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(rows.v[l].wrapping_offset(t0) as *const i8);
        let m = rows.m[l].wrapping_offset(t0 * M::BYTES as isize);
        for b in (0..16 * M::BYTES).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(m.wrapping_add(b) as *const i8);
        }
    }
}

/// A scan the tile kernels run: its step on one column, and how it stores a
/// tile's results once they are rows again.
trait TileScan {
    /// Whether the step reads the values.
    const VALUES: bool;
    /// One column (rewards, the mask's lanes of 1s, values): the result.
    unsafe fn step(&mut self, rt: __m512, keep: __mmask16, vt: __m512) -> __m512;
    /// Stores the results of tile `t0` (columns `km`): `x[l]` is row `l`'s.
    unsafe fn store(&self, rows: &TileRows, t0: usize, km: u16, x: &[__m512; 16], bits: &[u32; LANES]);
}

impl TileScan for Gae {
    const VALUES: bool = true;

    #[inline(always)]
    unsafe fn step(&mut self, rt: __m512, keep: __mmask16, vt: __m512) -> __m512 {
        self.step_keep(rt, keep, vt)
    }

    /// The advantages, and the returns `adv + v`.
    #[inline(always)]
    unsafe fn store(&self, rows: &TileRows, t0: usize, km: u16, x: &[__m512; 16], _: &[u32; LANES]) {
        for (l, &x) in x.iter().enumerate() {
            _mm512_mask_storeu_ps(rows.adv[l].add(t0), km, x);
            let v = _mm512_maskz_loadu_ps(km, rows.v[l].add(t0));
            _mm512_mask_storeu_ps(rows.ret[l].add(t0), km, _mm512_add_ps(x, v));
        }
    }
}

impl TileScan for Rfpp {
    const VALUES: bool = false;

    #[inline(always)]
    unsafe fn step(&mut self, rt: __m512, keep: __mmask16, _: __m512) -> __m512 {
        self.step_keep(rt, keep)
    }

    /// The returns, and the mask as float32 into the advantages (the
    /// whitening pass reads it there).
    #[inline(always)]
    unsafe fn store(&self, rows: &TileRows, t0: usize, km: u16, x: &[__m512; 16], bits: &[u32; LANES]) {
        for (l, &x) in x.iter().enumerate() {
            _mm512_mask_storeu_ps(rows.ret[l].add(t0), km, x);
            _mm512_mask_storeu_ps(rows.adv[l].add(t0), km, _mm512_maskz_mov_ps(bits[l] as u16, self.one));
        }
    }
}

/// One tile of `cnt` columns at `t0` on its own: false (nothing done) if
/// its mask holds a value that is neither 0 nor 1.
#[inline(always)]
unsafe fn tile_once<S: TileScan, M: MaskBits>(st: &mut S, rows: &TileRows, t0: usize, cnt: usize) -> bool {
    let km = ((1u32 << cnt) - 1) as u16;
    let Some(bits) = tile_bits::<M>(rows, t0, km) else { return false };
    let (r, v) = Transpose::columns::<S>(rows, t0, km);
    let mut x = Transpose::new();
    let mut w = mask_word(&bits, cnt);
    for c in (0..cnt).rev() {
        x.x[c] = st.step(r.x[c], _mm512_movepi32_mask(w), v.x[c]);
        w = _mm512_slli_epi32::<1>(w);
    }
    x.all();
    st.store(rows, t0, km, &x.x, &bits);
    true
}

/// A scan over a block of `len` columns of a lane group, sixteen columns
/// at a time: each tile's rows are loaded and transposed in registers, the
/// mask is read as bits, each column takes the scan's step (the same
/// operations as the column kernels, so the same bits), and the results
/// are transposed back and stored.
///
/// A tile's work is more than the out-of-order window holds, so the loop is
/// software-pipelined: each of the sixteen steps of a tile (a chain of
/// dependent operations) is followed by a part of the next tile's
/// transposes and of the previous tile's results', for the out-of-order
/// core to run beside the chain. (Measured, the loop is bound by
/// throughput, the transposes' stack traffic most: docs/speed.md.)
///
/// Returns the columns left at the front (`0 .. returned`) from the first
/// tile, from the end, whose mask holds a value that is neither 0 nor 1.
///
/// # Safety
/// AVX-512F, BW, VL and DQ are present; each pointer of `rows` is valid for
/// `len` elements (the mask's at its dtype); no other task touches the
/// outputs' rows.
#[inline(always)]
unsafe fn scan_tiles<S: TileScan, M: MaskBits>(st: &mut S, rows: &TileRows, len: usize) -> usize {
    let full = len / 16;
    // a last tile of fewer columns on its own, first
    if !len.is_multiple_of(16) && !tile_once::<S, M>(st, rows, 16 * full, len % 16) {
        return len;
    }
    if full == 0 {
        return 0;
    }
    let mut q = full - 1;
    let Some(mut bits) = tile_bits::<M>(rows, 16 * q, !0) else { return 16 * full };
    // the tile whose steps run (columns), the next one (rows, being
    // transposed) and the previous one's results (being transposed back)
    let (mut r, mut v) = Transpose::columns::<S>(rows, 16 * q, !0);
    let (mut rc, mut vc) = (r.x, v.x);
    let mut x = Transpose::new();
    let mut prev: Option<(usize, [u32; LANES])> = None;
    loop {
        if S::VALUES {
            // GAE's three input streams per row: software prefetch helps
            // there (measured: about 7% at 256x4096), not REINFORCE++'s two
            prefetch::<M>(rows, 16 * q as isize - 16 * PREFETCH_TILES);
        }
        let next = match q {
            0 => None,
            _ => tile_bits::<M>(rows, 16 * (q - 1), !0),
        };
        if next.is_some() {
            r.load(&rows.r, 16 * (q - 1), !0);
            if S::VALUES {
                v.load(&rows.v, 16 * (q - 1), !0);
            }
        }
        let mut w = mask_word(&bits, 16);
        let mut out = [_mm512_setzero_ps(); 16];
        macro_rules! slot {
            ($($s:literal)*) => { $(
                {
                    const C: usize = 15 - $s;
                    out[C] = st.step(rc[C], _mm512_movepi32_mask(w), vc[C]);
                    w = _mm512_slli_epi32::<1>(w);
                    r.part::<$s>();
                    if S::VALUES {
                        v.part::<$s>();
                    }
                    x.part::<$s>();
                }
            )* };
        }
        slot!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        if let Some((t0, b)) = prev {
            st.store(rows, t0, !0, &x.x, &b);
        }
        prev = Some((16 * q, bits));
        x.x = out;
        match next {
            Some(b) => {
                (rc, vc, bits) = (r.x, v.x, b);
                q -= 1;
            }
            None => break,
        }
    }
    x.all();
    let (t0, b) = prev.expect("one tile at least");
    st.store(rows, t0, !0, &x.x, &b);
    t0
}

/// GAE over a block of `len` columns on tiles ([`scan_tiles`]): the
/// advantages and the returns `adv + v`; the columns left at the front.
///
/// # Safety
/// As [`scan_tiles`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub unsafe fn gae_tiles<M: MaskBits>(c: &mut Carry<f32>, gamma: f32, k: f32, rows: &TileRows, len: usize) -> usize {
    let mut st = Gae::load(c, gamma, k);
    let left = scan_tiles::<Gae, M>(&mut st, rows, len);
    st.save(c);
    left
}

/// REINFORCE++ over a block on tiles ([`scan_tiles`]): the returns, and the
/// mask as float32 in the advantages; the columns left at the front.
///
/// # Safety
/// As [`scan_tiles`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub unsafe fn rfpp_tiles<M: MaskBits>(c: &mut Carry<f32>, gamma: f32, rows: &TileRows, len: usize) -> usize {
    let mut st = Rfpp::load(c, gamma);
    let left = scan_tiles::<Rfpp, M>(&mut st, rows, len);
    st.save(c);
    left
}
