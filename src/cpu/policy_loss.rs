//! The fused policy loss on the CPU: one pass per row computes the loss
//! terms, verl's metrics and `d loss / d log_prob`. Twin of
//! `cuda/kernels/loss.cu` (the same formulas, token for token).
//!
//! Per token, with `d = lp - old`, `A` the advantage, `w` the rollout IS
//! weight, `[lo, hi] = [1 - clip_ratio_low, 1 + clip_ratio_high]`:
//!
//! * vanilla: `r = exp(clamp(d, -20, 20))`, `l = max(-A r, -A clip(r, lo, hi))`,
//!   and where `A < 0`, `l = min(l, -A c)`;
//! * GSPO / LUSPO: `s_i = exp(min(sum_t m d / max(L_i, 1), 10))` per row, and the
//!   token ratio `s_it = exp(min(lp - sg(lp) + sg(log s_i), 10))` equals `s_i` in
//!   value with `d s_it / d lp_it = s_it` (0 where the clamp at 10 bites);
//!   `l = max(-A s_it, -A clip(s_it, lo, hi))`;
//! * value (verl's critic loss, `ops::value_loss`; `old` holds the old
//!   values, `lp` the predictions, `A` the returns): `vc = max(min(lp,
//!   old + c), old - c)`, `l = 0.5 max((lp - A)^2, (vc - A)^2)`.
//!
//! Gradients follow torch's conventions exactly: `maximum`/`minimum` split it
//! in half on ties, `clamp` passes it strictly inside its bounds or, as older
//! torch does, also on them (`Clip::clamp_closed`).
//!
//! float32 math runs 8 tokens at a time with AVX2 (detected at run time), else
//! 4 with SSE2 (x86-64) or 1; the token formula is written once over
//! [`Lane`] and sums go through [`Lanes8`], so every width gives the same bits.
//! The token loss is `w * l`; the aggregation multiplies `m * l` by the row
//! coefficient of [`AggPlan`], which is also the gradient's factor.

use super::lane::{clamp, Lane, Wide};
#[cfg(target_arch = "x86_64")]
use super::lane::{Avx2, Sse};
#[cfg(any(test, not(target_arch = "x86_64")))]
use super::lane::ScalarF32;
use super::lane::ScalarF64;
use super::{fold_rows, mask_totals};
use crate::error::{Error, Result};
use crate::ops::agg_loss::AggPlan;
use crate::ops::plus_eps;
use crate::ops::policy_loss::{Clip, LengthDiagnostics, LossMode, PolicyLossOutput, PolicyLossProblem, RowLength};
use crate::tensor::{piece_scratch, pieces, DType, Mat, MatMut, Real, PIECE};
use num_traits::Float;

/// One token's loss, its derivative in `lp`, and the metric flags.
#[derive(Clone, Copy)]
struct Tok<L: Lane> {
    loss: L,
    dloss: L,
    clipped: L::Mask,
    lower: L::Mask,
}

// The helpers below are selects and IEEE ops only (see `lane`), so the
// same code runs on a scalar and on a vector of tokens.

/// `torch.maximum(a, b)` with its gradient: NaN propagates (to the value
/// and, through both operands, to the gradient), ties split.
#[inline(always)]
fn maximum<L: Lane>(a: L, da: L, b: L, db: L) -> (L, L) {
    let v = L::select(a.gt(b), a, b);
    let v = L::select(a.is_nan(), a, v);
    // a NaN operand: torch's backward masks neither side, so both gradients pass
    let dv = L::select(a.gt(b), da, L::select(a.lt(b), db, da + db));
    (v, L::select(a.eq(b), (da + db) * L::splat(0.5), dv))
}

/// `torch.minimum(a, b)` with its gradient: NaN propagates, ties split.
#[inline(always)]
fn minimum<L: Lane>(a: L, da: L, b: L, db: L) -> (L, L) {
    let v = L::select(a.lt(b), a, b);
    let v = L::select(a.is_nan(), a, v);
    let dv = L::select(a.lt(b), da, L::select(a.gt(b), db, da + db));
    (v, L::select(a.eq(b), (da + db) * L::splat(0.5), dv))
}

/// `max(-A r, -A clip(r))` given the ratio `r` and `dr = d r / d lp`; the
/// mask is verl's `pg_clipfrac` condition `pl2 > pl1`.
#[inline(always)]
fn clipped_surrogate<L: Lane>(a: L, r: L, dr: L, clip: &Clip) -> (L, L, L::Mask) {
    let na = -a;
    let pl1 = na * r;
    let (rc, pass) = clamp(r, L::splat(1.0 - clip.low), L::splat(1.0 + clip.high), clip.clamp_closed);
    let pl2 = na * rc;
    let (l, dl) = maximum(pl1, na * dr, pl2, L::select(pass, na * dr, L::splat(0.0)));
    (l, dl, pl2.gt(pl1))
}

/// How one token's loss is computed from `(old, lp, A)` and, for Clip-Cov
/// and KL-Cov, whether the token was picked (`pick`: 1 or 0); also returns
/// the term `d` whose masked mean of `-d` is the `ppo_kl` metric.
trait TokenRule: Sync {
    fn eval<L: Lane>(&self, old: L, lp: L, a: L, pick: L) -> (Tok<L>, L);
}

/// A token's loss without metric flags.
#[inline(always)]
fn plain<L: Lane>(loss: L, dloss: L) -> Tok<L> {
    Tok { loss, dloss, clipped: L::mask(false), lower: L::mask(false) }
}

/// verl's `compute_policy_loss_vanilla` (the log-ratio is clamped to ±20,
/// and the metric uses the clamped value, as verl does).
struct Vanilla(Clip);

impl TokenRule for Vanilla {
    #[inline(always)]
    fn eval<L: Lane>(&self, old: L, lp: L, a: L, _pick: L) -> (Tok<L>, L) {
        let (d, pass) = clamp(lp - old, L::splat(-20.0), L::splat(20.0), self.0.clamp_closed);
        let r = d.exp_bounded();
        let zero = L::splat(0.0);
        let (l1, dl1, clipped) = clipped_surrogate(a, r, L::select(pass, r, zero), &self.0);
        let pl3 = -a * L::splat(self.0.c);
        let neg = a.lt(zero);
        let lower = l1.gt(pl3) & neg;
        let (l2, dl2) = minimum(pl3, zero, l1, dl1);
        (Tok { loss: L::select(neg, l2, l1), dloss: L::select(neg, dl2, dl1), clipped, lower }, d)
    }
}

/// verl's `compute_policy_loss_gspo` given the row's sequence ratio
/// `s = exp(min(log s_i, 10))` and `ds = d s / d lp` (0 where the clamp
/// bites, or the row's log-ratio is NaN); `lp - sg(lp)` is 0 for finite
/// `lp` and NaN otherwise, as in torch, where the clamp then stops the gradient.
struct Gspo {
    clip: Clip,
    s: f64,
    ds: f64,
}

impl TokenRule for Gspo {
    #[inline(always)]
    fn eval<L: Lane>(&self, old: L, lp: L, a: L, _pick: L) -> (Tok<L>, L) {
        #[allow(clippy::eq_op)] // torch's `lp - lp.detach()`: 0, or NaN for non-finite lp
        let finite = (lp - lp).eq(L::splat(0.0));
        let nan = L::splat(f64::NAN);
        let r = L::select(finite, L::splat(self.s), nan);
        // the clamp at 10 passes no gradient to a NaN token ratio (verl's: 0)
        let dr = L::select(finite, L::splat(self.ds), L::splat(0.0));
        let (loss, dloss, clipped) = clipped_surrogate(a, r, dr, &self.clip);
        (Tok { loss, dloss, clipped, lower: L::mask(false) }, lp - old)
    }
}

/// verl's `compute_value_loss` per token, `c = cliprange_value`: `old` are
/// the values, `lp` the predictions, `a` the returns. The bounds `old -+ c`
/// are rounded to the lane's type, as torch rounds `values -+ c`;
/// `clip_by_value` is torch's `max(min(x, hi), lo)`, so a prediction on a
/// bound gets half the gradient (ties split), and a NaN anywhere passes it.
/// The 0.5 of verl's `0.5 * agg_loss(...)` is applied per token (exact).
/// The metric flag is verl's `vf_clipfrac` condition `l2 > l1`.
struct Value {
    c: f64,
}

impl TokenRule for Value {
    #[inline(always)]
    fn eval<L: Lane>(&self, old: L, lp: L, a: L, _pick: L) -> (Tok<L>, L) {
        let (zero, one, c) = (L::splat(0.0), L::splat(1.0), L::splat(self.c));
        let (lo, hi) = (old - c, old + c);
        let (mn, dmn) = minimum(lp, one, hi, zero);
        let (vc, dvc) = maximum(mn, dmn, lo, zero);
        let (x1, x2) = (lp - a, vc - a);
        let (l1, l2) = (x1 * x1, x2 * x2);
        let (l, dl) = maximum(l1, x1 + x1, l2, (x2 + x2) * dvc);
        let half = L::splat(0.5);
        (Tok { loss: half * l, dloss: half * dl, clipped: l2.gt(l1), lower: L::mask(false) }, zero)
    }
}

/// verl's `compute_policy_loss_cispo`: `l = -sg(clip(r)) A lp` with
/// `r = exp(clamp(lp - old, -20, 20))`; `pg_clipfrac` counts `r != clip(r)`.
struct Cispo(Clip);

impl TokenRule for Cispo {
    #[inline(always)]
    fn eval<L: Lane>(&self, old: L, lp: L, a: L, _pick: L) -> (Tok<L>, L) {
        let closed = self.0.clamp_closed;
        let (d, _) = clamp(lp - old, L::splat(-20.0), L::splat(20.0), closed);
        let r = d.exp_bounded();
        let (rc, _) = clamp(r, L::splat(1.0 - self.0.low), L::splat(1.0 + self.0.high), closed);
        let k = -rc * a;
        (Tok { loss: k * lp, dloss: k, clipped: r.ne(rc), lower: L::mask(false) }, d)
    }
}

/// verl's `compute_policy_loss_sapo`: `l = -g A` with the gate
/// `g = sigmoid(tau (r - 1)) 4 / tau`, `tau = tau_pos` where `A > 0`, else
/// `tau_neg` (rounded to the advantages' type, as verl's `as_tensor`), and
/// `r = exp(clamp(lp - old, -20, 20))`; no clip metrics.
struct Sapo {
    tau_pos: f64,
    tau_neg: f64,
    closed: bool,
}

impl TokenRule for Sapo {
    #[inline(always)]
    fn eval<L: Lane>(&self, old: L, lp: L, a: L, _pick: L) -> (Tok<L>, L) {
        let (zero, one) = (L::splat(0.0), L::splat(1.0));
        let (d, pass) = clamp(lp - old, L::splat(-20.0), L::splat(20.0), self.closed);
        let r = d.exp_bounded();
        let tau = L::select(a.gt(zero), L::splat(self.tau_pos), L::splat(self.tau_neg));
        let y = one / (one + (-(tau * (r - one))).exp_any());
        let k = L::splat(4.0) / tau;
        // torch's chain: d(-g A)/dg = -A, then 4 / tau, sigmoid's (1 - y) y, tau, exp's r
        let dl = ((-a * k) * ((one - y) * y)) * tau * r;
        (plain(-(y * k) * a, L::select(pass, dl, zero)), d)
    }
}

/// verl's `compute_policy_loss_gpg`: `l = -lp A`; no metrics.
struct Gpg;

impl TokenRule for Gpg {
    #[inline(always)]
    fn eval<L: Lane>(&self, _old: L, lp: L, a: L, _pick: L) -> (Tok<L>, L) {
        (plain(-lp * a, -a), L::splat(0.0))
    }
}

/// verl's `compute_policy_loss_reinforce` (bypass mode's REINFORCE):
/// `l = -A lp` (the IS weights multiply it as constants); `ppo_kl` is the
/// masked mean of `old - lp`.
struct Reinforce;

impl TokenRule for Reinforce {
    #[inline(always)]
    fn eval<L: Lane>(&self, old: L, lp: L, a: L, _pick: L) -> (Tok<L>, L) {
        (plain(-a * lp, -a), lp - old)
    }
}

/// verl's `compute_policy_loss_dro`: `l = -(lp A - (beta / 2) (lp - old)^2)`
/// (`beta / 2` rounded once to the lane's type, as torch's scalar).
struct Dro {
    half_beta: f64,
}

impl TokenRule for Dro {
    #[inline(always)]
    fn eval<L: Lane>(&self, old: L, lp: L, a: L, _pick: L) -> (Tok<L>, L) {
        let hb = L::splat(self.half_beta);
        let d = lp - old;
        (plain(-(lp * a - hb * (d * d)), -(a - hb * (d + d))), d)
    }
}

/// verl's DPPO-Binary losses (`compute_policy_loss_dppo_tv`, `_kl`):
/// `l = -A sg(min(r, c)) lp v`, `r = exp(clamp(lp - old, -20, 20))`, where
/// `v` keeps a token unless its probability moved past the divergence bound
/// in the direction of its advantage: `p - p_old <= high` (`A > 0`),
/// `>= -low` (else) for TV; for KL the binary KL
/// `p_old (old - lp) + (1 - p_old) ln((1 - p_old + 1e-8) / (1 - p + 1e-8))`
/// is `<= high` or `p <= p_old` (`A > 0`), `<= low` or `p >= p_old` (else).
/// `pg_clipfrac` counts the tokens dropped, `pg_clipfrac_lower` the kept ones
/// with `r > c`. Here `Clip::low`/`high` are the divergence bounds.
struct Dppo {
    clip: Clip,
    kl: bool,
}

impl TokenRule for Dppo {
    #[inline(always)]
    fn eval<L: Lane>(&self, old: L, lp: L, a: L, _pick: L) -> (Tok<L>, L) {
        let (zero, one) = (L::splat(0.0), L::splat(1.0));
        let (lo, hi, c) = (L::splat(self.clip.low), L::splat(self.clip.high), L::splat(self.clip.c));
        let (d, _) = clamp(lp - old, L::splat(-20.0), L::splat(20.0), self.clip.clamp_closed);
        let r = d.exp_bounded();
        let tr = L::select(r.gt(c), c, r); // torch.clamp(max=c): NaN stays NaN
        let (p, po) = (lp.exp_any(), old.exp_any());
        let (up, down) = if self.kl {
            let eps = L::splat(1e-8);
            let bkl = po * (old - lp) + (one - po) * ((one - po + eps) / (one - p + eps)).ln();
            (bkl.le(hi) | p.le(po), bkl.le(lo) | p.ge(po))
        } else {
            let moved = p - po;
            (moved.le(hi), moved.ge(-lo))
        };
        let pos = a.gt(zero);
        let v = L::select(pos, L::select(up, one, zero), L::select(down, one, zero));
        let k = -a * tr;
        let keep = v.ne(zero);
        (Tok { loss: (k * lp) * v, dloss: k * v, clipped: v.eq(zero), lower: r.gt(c) & keep }, d)
    }
}

/// verl's `compute_policy_loss_clip_cov` given its choice (`pick`: the
/// tokens whose `corr` is 0): `l = max(-A r, -A clip(r)) corr` with
/// `r = exp(lp - old)` (no clamp, no dual clip); `pg_clipfrac` counts the
/// picked tokens.
struct ClipCov(Clip);

impl TokenRule for ClipCov {
    #[inline(always)]
    fn eval<L: Lane>(&self, old: L, lp: L, a: L, pick: L) -> (Tok<L>, L) {
        let d = lp - old;
        let r = d.exp_any();
        let (l, dl, _) = clipped_surrogate(a, r, r, &self.0);
        let picked = pick.ne(L::splat(0.0));
        let corr = L::select(picked, L::splat(0.0), L::splat(1.0));
        (Tok { loss: l * corr, dloss: dl * corr, clipped: picked, lower: L::mask(false) }, d)
    }
}

/// verl's `compute_policy_loss_kl_cov` given its choice (`pick`: the tokens
/// with the KL term): `l = -A r (+ coef |lp - old|)`, `r = exp(lp - old)`;
/// `ppo_kl` is the masked mean of `|lp - old|` (so `d = -|lp - old|`).
struct KlCov {
    coef: f64,
}

impl TokenRule for KlCov {
    #[inline(always)]
    fn eval<L: Lane>(&self, old: L, lp: L, a: L, pick: L) -> (Tok<L>, L) {
        let (zero, one) = (L::splat(0.0), L::splat(1.0));
        let d = lp - old;
        let r = d.exp_any();
        let abs = L::select(d.lt(zero), -d, d);
        let picked = pick.ne(zero);
        let coef = L::splat(self.coef);
        let l1 = -a * r;
        // abs's gradient is sign(d): 0 at 0, NaN for NaN (as torch's sgn)
        let sign = L::select(d.gt(zero), one, L::select(d.lt(zero), -one, d * zero));
        let loss = L::select(picked, l1 + coef * abs, l1);
        let dloss = L::select(picked, l1 + coef * sign, l1);
        (plain(loss, dloss), -abs)
    }
}

/// GMPO's clipped log-ratio (verl `compute_policy_loss_geo_mean`, see
/// `LossMode::GeoMean`): `dmin = sA min(sA d, sA dc)` with `sA = sign(A)`
/// (0 at 0 and for NaN, as `torch.sign`) and `dc = clamp(d, -low, high)`;
/// returns `dmin`, `up * d dmin / d d` as torch's backward computes it from
/// the upstream gradient `up` (`sA (min's share of sA up)`: ties split,
/// `clamp` passes as [`clamp`] says, both by selection, so a NaN `up` gives
/// an exact 0 where a branch is cut off, as torch's does; `sA` makes it 0,
/// or NaN for a NaN `up`, where `A == 0`) and `dc`.
#[inline(always)]
fn geo_dmin<L: Lane>(d: L, a: L, up: L, clip: &Clip) -> (L, L, L) {
    let (zero, one) = (L::splat(0.0), L::splat(1.0));
    let (dc, pass) = clamp(d, L::splat(-clip.low), L::splat(clip.high), clip.clamp_closed);
    let sa = L::select(a.gt(zero), one, L::select(a.lt(zero), -one, zero));
    let u = up * sa;
    let (mn, dmn) = minimum(sa * d, u, sa * dc, L::select(pass, u, zero));
    (sa * mn, sa * dmn, dc)
}

/// GMPO's token pass (its loss is a row quantity: [`geo_row`]): `dloss` is
/// `coef d dmin / d d`, `coef` the row's coefficient (the token pass's own
/// is 1, so `m dloss` is the gradient); `pg_clipfrac` counts `d != dc`
/// (NaN included) where `A > 0`, `pg_clipfrac_lower` where `A < 0`;
/// `ppo_kl` averages `-d` (unclamped).
struct GeoMean {
    clip: Clip,
    coef: f64,
    /// `d` in `f32` although the math is `f64` (see [`PolicyLossProblem::geo_narrow`]).
    narrow: bool,
}

impl TokenRule for GeoMean {
    #[inline(always)]
    fn eval<L: Lane>(&self, old: L, lp: L, a: L, _pick: L) -> (Tok<L>, L) {
        let zero = L::splat(0.0);
        let d = if self.narrow { (lp - old).narrow() } else { lp - old };
        let (_, ddmin, dc) = geo_dmin(d, a, L::splat(self.coef), &self.clip);
        let clipped = d.ne(dc);
        (Tok { loss: zero, dloss: ddmin, clipped: clipped & a.gt(zero), lower: clipped & a.lt(zero) }, d)
    }
}

/// Per-row sums, combined across rows in index order.
#[derive(Clone, Copy, Default)]
struct RowSums {
    /// `sum_t m * w * l` (masked positions skipped or multiplied, see `AggMode::is_seq_mode`).
    loss: f64,
    /// `L_i = sum_t m`.
    tokens: f64,
    clipped: f64,
    kl: f64,
    lower: f64,
    /// `sum_t m A` and `sum_t |g|`, for [`LengthDiagnostics`].
    adv: f64,
    grad_mass: f64,
}

/// Per-thread scratch: one piece (see [`PIECE`]) of each input and of the gradient.
struct Scratch<F> {
    old: Vec<F>,
    lp: Vec<F>,
    adv: Vec<F>,
    mask: Vec<F>,
    w: Vec<F>,
    picks: Vec<F>,
    grad: Vec<F>,
}

impl<F: Real> Scratch<F> {
    fn new(p: &PolicyLossProblem) -> Result<Self> {
        let v = |m: &Mat| piece_scratch::<F>(m.tensor.arg, m.cols);
        let w = match &p.rollout_is_weights {
            Some(w) => v(w)?,
            None => Vec::new(),
        };
        let picks = match &p.picks {
            Some(k) => v(k)?,
            None => Vec::new(),
        };
        Ok(Scratch {
            picks,
            old: v(&p.old_log_prob)?,
            lp: v(&p.log_prob)?,
            adv: v(&p.advantages)?,
            mask: v(&p.response_mask)?,
            w,
            grad: piece_scratch::<F>(p.grad.tensor.arg, p.grad.cols)?,
        })
    }

    /// Loads columns `start .. start + len` of row `i` (the inputs `what`
    /// names) and hands back beside them where that piece's gradient goes
    /// (its run of the gradient scratch: the fields are borrowed apart, so
    /// both live at once). Every pass of [`row`] and [`geo_row`] loads
    /// through here. (No closures, `Option::map` included: see `row`.)
    #[inline(always)]
    fn load<'s>(&'s mut self, p: &'s PolicyLossProblem, i: usize, start: usize, len: usize, what: Load) -> (Piece<'s, F>, GradOut<'s, F>) {
        let Scratch { old, lp, adv, mask, w, picks, grad } = self;
        let all = what == Load::All;
        let x = Piece {
            old: p.old_log_prob.part(i, start, len, old),
            lp: p.log_prob.part(i, start, len, lp),
            adv: if all { p.advantages.part(i, start, len, adv) } else { &[] },
            mask: p.response_mask.part(i, start, len, mask),
            w: match &p.rollout_is_weights {
                Some(m) if all => Some(m.part(i, start, len, w)),
                _ => None,
            },
            picks: match &p.picks {
                Some(m) if all => Some(m.part(i, start, len, picks)),
                _ => None,
            },
        };
        (x, GradOut { grad: &p.grad, i, start, scratch: &mut grad[..len] })
    }
}

/// Which of a piece's inputs [`Scratch::load`] loads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    /// `old_log_prob`, `log_prob` and `response_mask` (what [`row_sums`]
    /// reads); `adv` is left empty, `w` and `picks` `None`.
    Sums,
    /// All of them, the IS weights and picks where given.
    All,
}

/// One piece of a row's inputs as `F`: in place, or converted into the
/// [`Scratch`] (see [`Mat::part`]).
#[derive(Clone, Copy)]
struct Piece<'a, F> {
    old: &'a [F],
    lp: &'a [F],
    adv: &'a [F],
    mask: &'a [F],
    w: Option<&'a [F]>,
    picks: Option<&'a [F]>,
}

/// Where a piece's gradient goes: columns `start .. start + scratch.len()`
/// of row `i` of `grad`, through `scratch` where they are not a contiguous
/// `F` run (see [`RowCtx::grad_pass`]).
struct GradOut<'a, F> {
    grad: &'a MatMut,
    i: usize,
    start: usize,
    scratch: &'a mut [F],
}

/// Runs the loss on the CPU, writing `d loss / d log_prob` into `p.grad`;
/// a `MemoryError` if its (bounded) working buffers cannot be allocated.
pub fn policy_loss(p: &PolicyLossProblem) -> Result<PolicyLossOutput> {
    if p.wants_f64() {
        return run::<ScalarF64>(p);
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            return match p.diagnostics {
                // SAFETY (both): AVX2 is present.
                false => run_with::<Avx2>(p, |p, plan, i, s| unsafe { row_avx2::<false>(p, plan, i, s) }),
                true => run_with::<Avx2>(p, |p, plan, i, s| unsafe { row_avx2::<true>(p, plan, i, s) }),
            };
        }
        run::<Sse>(p)
    }
    #[cfg(not(target_arch = "x86_64"))]
    run::<ScalarF32>(p)
}

/// [`row`] compiled with AVX2, so the `F32x8` intrinsics inline.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_avx2<const DIAG: bool>(p: &PolicyLossProblem, plan: &AggPlan, i: usize, s: &mut Scratch<f32>) -> RowSums {
    row::<Avx2, DIAG>(p, plan, i, s)
}

/// A row kernel: inputs, plan, row index, per-thread scratch.
type RowFn<F> = fn(&PolicyLossProblem, &AggPlan, usize, &mut Scratch<F>) -> RowSums;

fn run<W: Wide>(p: &PolicyLossProblem) -> Result<PolicyLossOutput> {
    match p.diagnostics {
        false => run_with::<W>(p, row::<W, false>),
        true => run_with::<W>(p, row::<W, true>),
    }
}

fn run_with<W: Wide>(p: &PolicyLossProblem, row_fn: RowFn<W::F>) -> Result<PolicyLossOutput> {
    let cols = p.log_prob.cols;
    // GMPO averages its rows itself (geo_row): no aggregation, no mask totals
    let geo = p.mode == LossMode::GeoMean;
    let totals = match !geo && p.norm.needs_mask_totals(p.agg) {
        true => Some(mask_totals(&p.response_mask)?),
        false => None,
    };
    let mask_is_f64 = p.response_mask.tensor.dtype == DType::F64;
    let plan = AggPlan::new(p.agg, &p.norm, totals, cols, mask_is_f64);

    let mut out = PolicyLossOutput::default();
    let mut tokens = 0.0;
    let rows = if p.diagnostics { p.log_prob.rows } else { 0 };
    let mut lengths: Vec<RowLength> = Vec::new();
    lengths
        .try_reserve_exact(rows)
        .map_err(|_| Error::memory(p.log_prob.tensor.arg, format!("cannot allocate per-row lengths for {rows} rows")))?;
    fold_rows(
        p.log_prob.tensor.arg,
        p.log_prob.rows,
        cols,
        || Scratch::<W::F>::new(p),
        |s, i| row_fn(p, &plan, i, s),
        |r| {
            out.loss += if geo { r.loss } else { plan.row_contribution(r.loss, r.tokens) };
            tokens += r.tokens;
            out.pg_clipfrac += r.clipped;
            out.ppo_kl += r.kl;
            out.pg_clipfrac_lower += r.lower;
            if p.diagnostics {
                lengths.push(RowLength { tokens: r.tokens, clipped: r.clipped, grad_mass: r.grad_mass, adv: r.adv });
            }
        },
    )?;
    if p.diagnostics {
        out.length = LengthDiagnostics::of(&lengths);
    }
    // verl's masked_mean: sum / (sum(mask) + 1e-8)
    let denom = plus_eps(tokens, mask_is_f64);
    out.loss = if geo { out.loss * geo_scale(p) } else { plan.finish(out.loss) };
    out.pg_clipfrac /= denom;
    out.ppo_kl /= denom;
    out.pg_clipfrac_lower /= denom;
    Ok(out)
}

/// One row: reduce what the row needs first (its length, and the sequence
/// log-ratio for GSPO/LUSPO), then the token pass. A row longer than
/// [`PIECE`] goes through in pieces, each pass loading its own; a shorter
/// one is loaded once for both passes.
#[inline(always)]
fn row<W: Wide, const DIAG: bool>(p: &PolicyLossProblem, plan: &AggPlan, i: usize, s: &mut Scratch<W::F>) -> RowSums {
    if p.mode == LossMode::GeoMean {
        return geo_row::<W, DIAG>(p, i, s);
    }
    let cols = p.log_prob.cols;
    let with_seq = p.with_seq();
    let mut sums = (0.0, 0.0);
    if cols > PIECE {
        for (start, len) in pieces(cols) {
            let (x, _) = s.load(p, i, start, len, Load::Sums);
            row_sums::<W>(&x, with_seq, &mut sums);
        }
    }
    let mut st = RowSums::default();
    for (start, len) in pieces(cols) {
        let (x, out) = s.load(p, i, start, len, Load::All);
        if cols <= PIECE {
            row_sums::<W>(&x, with_seq, &mut sums);
        }
        let (tokens, seq) = sums;
        st.tokens = tokens;
        let seq_mode = plan.mode.is_seq_mode();
        // a row whose mask sums to NaN: dropped by the sequence modes (verl's
        // `sum(m) > 0` is false), loss, count and gradient (see `terms`)
        let dropped = seq_mode && tokens.is_nan();
        let coef = W::F::of(plan.row_coef(tokens));
        let ctx = RowCtx { x, coef, seq_mode, dropped };
        // No closure here: `row` is inlined into `row_avx2`, and a closure
        // would be compiled without AVX2 (its intrinsics would become calls).
        match p.mode {
            LossMode::Vanilla => ctx.grad_pass::<W, _, DIAG>(out, &mut st, &Vanilla(p.clip)),
            LossMode::Gspo | LossMode::Luspo => {
                // verl: sum(d * m) / clamp(sum(m), min=1)
                let log_s = W::F::of(seq / tokens.max(1.0));
                let (x, pass) = clamp(log_s, W::F::neg_infinity(), W::F::of(10.0), p.clip.clamp_closed);
                let sr = x.exp();
                let ds = <W::F as Lane>::select(pass, sr, <W::F as Lane>::splat(0.0));
                ctx.grad_pass::<W, _, DIAG>(out, &mut st, &Gspo { clip: p.clip, s: sr.f64(), ds: ds.f64() })
            }
            LossMode::Value => ctx.grad_pass::<W, _, DIAG>(out, &mut st, &Value { c: p.clip.c }),
            LossMode::Cispo => ctx.grad_pass::<W, _, DIAG>(out, &mut st, &Cispo(p.clip)),
            LossMode::Sapo => {
                let rule = Sapo { tau_pos: p.knobs.tau_pos, tau_neg: p.knobs.tau_neg, closed: p.clip.clamp_closed };
                ctx.grad_pass::<W, _, DIAG>(out, &mut st, &rule)
            }
            LossMode::Gpg => ctx.grad_pass::<W, _, DIAG>(out, &mut st, &Gpg),
            LossMode::Reinforce => ctx.grad_pass::<W, _, DIAG>(out, &mut st, &Reinforce),
            LossMode::Dro => ctx.grad_pass::<W, _, DIAG>(out, &mut st, &Dro { half_beta: 0.5 * p.knobs.beta }),
            LossMode::DppoTv => ctx.grad_pass::<W, _, DIAG>(out, &mut st, &Dppo { clip: p.clip, kl: false }),
            LossMode::DppoKl => ctx.grad_pass::<W, _, DIAG>(out, &mut st, &Dppo { clip: p.clip, kl: true }),
            LossMode::ClipCov => ctx.grad_pass::<W, _, DIAG>(out, &mut st, &ClipCov(p.clip)),
            LossMode::KlCov => ctx.grad_pass::<W, _, DIAG>(out, &mut st, &KlCov { coef: p.knobs.kl_coef }),
            LossMode::GeoMean => unreachable!("GMPO runs its own row pass (geo_row)"),
        }
    }
    st
}

/// Eight f32 summation lanes, whatever the vector width: token `j` of a
/// block always goes to lane `j % 8`, each lane adds its tokens in order,
/// and the lanes are folded in order in f64. So the scalar, SSE2 and AVX2
/// paths give bitwise the same sums (and each lane adds at most
/// `BLOCK / 8` terms in f32).
struct Lanes8<W: Wide> {
    /// `8 / W::WIDTH` vectors hold lanes `[k W, (k + 1) W)`.
    v: [W::V; 8],
}

impl<W: Wide> Lanes8<W> {
    #[inline(always)]
    fn new() -> Self {
        Lanes8 { v: [W::V::splat(0.0); 8] }
    }

    /// Adds the vector of tokens `j .. j + WIDTH` (`j` a multiple of WIDTH).
    #[inline(always)]
    fn add(&mut self, j: usize, x: W::V) {
        let k = (j / W::WIDTH) % (8 / W::WIDTH);
        self.v[k] = self.v[k] + x;
    }

    /// The eight lanes, for the scalar tail to add into.
    #[inline(always)]
    fn lanes(&self) -> [W::F; 8] {
        let mut out = [<W::F as Lane>::splat(0.0); 8];
        for k in 0..8 / W::WIDTH {
            W::store(self.v[k], &mut out[k * W::WIDTH..]);
        }
        out
    }
}

/// Lanes folded in order, in f64.
#[inline(always)]
fn fold8<F: Real>(lanes: &[F; 8]) -> f64 {
    let mut t = 0.0;
    for x in lanes {
        t += x.f64();
    }
    t
}

/// Adds `(sum_t m, sum_t (lp - old) m)` of a row's piece to `sums` (the
/// second only `with_seq`), a plain product so a NaN anywhere in the row
/// propagates, as in verl. Summed in [`Lanes8`] within blocks of [`BLOCK`],
/// then block by block in f64 (so pieces that are whole blocks add up to
/// bitwise the whole row's sums).
#[inline(always)]
fn row_sums<W: Wide>(x: &Piece<'_, W::F>, with_seq: bool, sums: &mut (f64, f64)) {
    let (old, lp, mask) = (x.old, x.lp, x.mask);
    let n = mask.len();
    let (tokens, seq) = (&mut sums.0, &mut sums.1);
    let mut start = 0;
    while start < n {
        let end = (start + BLOCK).min(n);
        let (o, l, m) = (&old[start..end], &lp[start..end], &mask[start..end]);
        let (mut am, mut ad) = (Lanes8::<W>::new(), Lanes8::<W>::new());
        let mut j = 0;
        while j + W::WIDTH <= m.len() {
            let mv = W::load(&m[j..]);
            am.add(j, mv);
            if with_seq {
                ad.add(j, (W::load(&l[j..]) - W::load(&o[j..])) * mv);
            }
            j += W::WIDTH;
        }
        let (mut bm, mut bd) = (am.lanes(), ad.lanes());
        for j in j..m.len() {
            bm[j % 8] = bm[j % 8] + m[j];
            bd[j % 8] = bd[j % 8] + (l[j] - o[j]) * m[j];
        }
        *tokens += fold8(&bm);
        if with_seq {
            *seq += fold8(&bd);
        }
        start = end;
    }
}

/// GMPO's `(1 / B) factor`: the loss is `geo_scale * sum_i pg_i` and the
/// gradient of row `i` carries it (verl's `torch.mean` over all rows; the
/// aggregation and its normalisers are not used, see `LossMode::GeoMean`).
fn geo_scale(p: &PolicyLossProblem) -> f64 {
    (1.0 / p.log_prob.rows as f64) * p.norm.factor
}

/// Adds GMPO's row sums of a row's piece to `s`: `sum m`, `sum dmin m`,
/// `sum A m` and, with IS weights `w`, `sum ln(w + 1e-10) m`: plain products,
/// so a NaN anywhere in the row (masked or not) propagates, as in verl.
/// Summed as [`row_sums`] sums (eight lanes per block, blocks in f64).
#[inline(always)]
fn geo_row_sums<W: Wide>(x: &Piece<'_, W::F>, clip: &Clip, narrow: bool, s: &mut [f64; 4]) {
    let (old, lp, adv, mask, w) = (x.old, x.lp, x.adv, x.mask, x.w);
    let n = mask.len();
    let mut start = 0;
    while start < n {
        let end = (start + BLOCK).min(n);
        let (o, l, a, m) = (&old[start..end], &lp[start..end], &adv[start..end], &mask[start..end]);
        let w = w.map(|w| &w[start..end]);
        let mut acc = [Lanes8::<W>::new(), Lanes8::new(), Lanes8::new(), Lanes8::new()];
        let eps = W::V::splat(1e-10);
        let mut j = 0;
        while j + W::WIDTH <= m.len() {
            let (mv, av) = (W::load(&m[j..]), W::load(&a[j..]));
            let d = W::load(&l[j..]) - W::load(&o[j..]);
            let (dmin, _, _) = geo_dmin(if narrow { d.narrow() } else { d }, av, W::V::splat(1.0), clip);
            acc[0].add(j, mv);
            acc[1].add(j, dmin * mv);
            acc[2].add(j, av * mv);
            if let Some(w) = w {
                acc[3].add(j, (W::load(&w[j..]) + eps).ln() * mv);
            }
            j += W::WIDTH;
        }
        let mut lanes = [acc[0].lanes(), acc[1].lanes(), acc[2].lanes(), acc[3].lanes()];
        let eps = <W::F as Lane>::splat(1e-10);
        for j in j..m.len() {
            let d = l[j] - o[j];
            let (dmin, _, _) = geo_dmin(if narrow { d.narrow() } else { d }, a[j], <W::F as Lane>::splat(1.0), clip);
            let k = j % 8;
            lanes[0][k] = lanes[0][k] + m[j];
            lanes[1][k] = lanes[1][k] + dmin * m[j];
            lanes[2][k] = lanes[2][k] + a[j] * m[j];
            if let Some(w) = w {
                lanes[3][k] = lanes[3][k] + Lane::ln(w[j] + eps) * m[j];
            }
        }
        for k in 0..4 {
            s[k] += fold8(&lanes[k]);
        }
        start = end;
    }
}

/// GMPO's row (see `LossMode::GeoMean`): its sums ([`geo_row_sums`]), then
/// `ratio_i`, `adv_i`, `sw_i` and `pg_i = (-adv_i ratio_i) sw_i` in the
/// lane's type (the means `sum / (L_i + 1e-8)` rounded to it once, as verl's
/// division in the inputs' type), then the token pass writes
/// `g_t = m_t (coef_i d dmin_t / d d_t)`, `coef_i = pg_i / (L_i + 1e-8) * (1 / B) factor`
/// (in torch's order, see [`geo_dmin`]), and the metric sums. Returns `pg_i` as the row's loss. Loads a row of
/// at most [`PIECE`] tokens once for both passes, as [`row`].
#[inline(always)]
fn geo_row<W: Wide, const DIAG: bool>(p: &PolicyLossProblem, i: usize, s: &mut Scratch<W::F>) -> RowSums {
    let cols = p.log_prob.cols;
    let mut sums = [0.0; 4];
    if cols > PIECE {
        for (start, len) in pieces(cols) {
            let (x, _) = s.load(p, i, start, len, Load::All);
            geo_row_sums::<W>(&x, &p.geo_clip(), p.geo_narrow(), &mut sums);
        }
    }
    let mut st = RowSums::default();
    let zero = <W::F as Lane>::splat(0.0);
    let (mut coef, mut pg) = (zero, zero);
    for (start, len) in pieces(cols) {
        let (x, out) = s.load(p, i, start, len, Load::All);
        if cols <= PIECE {
            geo_row_sums::<W>(&x, &p.geo_clip(), p.geo_narrow(), &mut sums);
        }
        if start == 0 {
            let den = plus_eps(sums[0], p.response_mask.tensor.dtype == DType::F64);
            let ratio = W::F::of(sums[1] / den).exp();
            let adv_i = W::F::of(sums[2] / den);
            let sw = match x.w {
                Some(_) => W::F::of(sums[3] / den).exp(),
                None => <W::F as Lane>::splat(1.0),
            };
            pg = (-adv_i * ratio) * sw;
            coef = W::F::of(pg.f64() / den * geo_scale(p));
        }
        let one = <W::F as Lane>::splat(1.0);
        // (the IS weights are in `pg`, not per token; GMPO takes no picks)
        let ctx = RowCtx { x: Piece { w: None, picks: None, ..x }, coef: one, seq_mode: false, dropped: false };
        ctx.grad_pass::<W, _, DIAG>(out, &mut st, &GeoMean { clip: p.geo_clip(), coef: coef.f64(), narrow: p.geo_narrow() });
    }
    st.tokens = sums[0];
    st.loss = pg.f64();
    st
}

/// One piece of a row's inputs and what its token pass shares across tokens.
struct RowCtx<'a, F> {
    x: Piece<'a, F>,
    coef: F,
    seq_mode: bool,
    /// The row is out of the loss although its mask has nonzero entries
    /// (a NaN among them, in a sequence mode): no token is kept.
    dropped: bool,
}

/// Sums the token pass keeps per row (the gradient is the sixth term).
const SUMS: usize = 6;

/// The per-token terms of one lane: `m*w*l` (or 0 where masked, see
/// `AggMode::is_seq_mode`), `m*d`, `m*[clipped]`, `m*[lower]`, `m*A`,
/// `|g|`, and the gradient `g = coef*m*w*dl` (0 where masked).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn terms<L: Lane, R: TokenRule>(rule: &R, o: L, l: L, a: L, m: L, w: L, pick: L, coef: L, seq_mode: bool, dropped: bool) -> [L; SUMS + 1] {
    let (k, d) = rule.eval(o, l, a, pick);
    let zero = L::splat(0.0);
    let keep = m.ne(zero) & L::mask(!dropped);
    let g = L::select(keep, coef * m * (k.dloss * w), zero);
    [
        L::select(keep | L::mask(seq_mode), k.loss * w * m, zero),
        L::select(keep, d * m, zero),
        L::select(keep & k.clipped, m, zero),
        L::select(keep & k.lower, m, zero),
        L::select(keep, a * m, zero),
        L::select(g.lt(zero), -g, g),
        g,
    ]
}

impl<F: Real + Lane> RowCtx<'_, F> {
    /// [`RowCtx::token_pass`] writing the piece's gradient to `out`: in place
    /// where it is a contiguous `F` run, else into `out.scratch`, then
    /// stored (converted).
    #[inline(always)]
    fn grad_pass<W: Wide<F = F>, R: TokenRule, const DIAG: bool>(&self, out: GradOut<'_, F>, st: &mut RowSums, rule: &R) {
        let GradOut { grad, i, start, scratch } = out;
        // SAFETY: row i is written by this task only (`fold_rows` hands each
        // row to one task, and `row` / `geo_row` write only theirs).
        let direct = unsafe { grad.direct_part::<F>(i, start, scratch.len()) };
        let converted = direct.is_none();
        let g = direct.unwrap_or(&mut *scratch);
        self.token_pass::<W, R, DIAG>(g, st, rule);
        if converted {
            // SAFETY: as above.
            unsafe { grad.store_part(i, start, scratch) };
        }
    }

    /// Accumulates the row's sums and writes `g[t] = d loss / d lp_t`.
    ///
    /// Tokens go in blocks of [`BLOCK`]: `W::WIDTH` tokens at a time through
    /// [`terms`] (the tail one by one through the same code), summed in
    /// [`Lanes8`] within the block, then into the f64 row sums.
    /// `DIAG`: also the sums of [`LengthDiagnostics`] (`m A`, `|g|`).
    #[inline(always)]
    fn token_pass<W: Wide<F = F>, R: TokenRule, const DIAG: bool>(&self, g: &mut [F], st: &mut RowSums, rule: &R) {
        let sums = if DIAG { SUMS } else { SUMS - 2 };
        let n = g.len();
        let (coef, coef_v) = (self.coef, W::V::splat(self.coef.f64()));
        let mut start = 0;
        while start < n {
            let len = BLOCK.min(n - start);
            let end = start + len;
            let x = &self.x;
            let (o, l, a, m) = (&x.old[start..end], &x.lp[start..end], &x.adv[start..end], &x.mask[start..end]);
            let w = x.w.map(|w| &w[start..end]);
            let pk = x.picks.map(|k| &k[start..end]);
            let g = &mut g[start..end];
            // (no closures here: see `row`)
            let mut acc = [Lanes8::<W>::new(), Lanes8::new(), Lanes8::new(), Lanes8::new(), Lanes8::new(), Lanes8::new()];
            let mut j = 0;
            while j + W::WIDTH <= len {
                let wv = match w {
                    Some(w) => W::load(&w[j..]),
                    None => W::V::splat(1.0),
                };
                let kv = match pk {
                    Some(k) => W::load(&k[j..]),
                    None => W::V::splat(0.0),
                };
                let t = terms(rule, W::load(&o[j..]), W::load(&l[j..]), W::load(&a[j..]), W::load(&m[j..]), wv, kv, coef_v, self.seq_mode, self.dropped);
                for k in 0..sums {
                    acc[k].add(j, t[k]);
                }
                W::store(t[SUMS], &mut g[j..]);
                j += W::WIDTH;
            }
            let mut lanes = [acc[0].lanes(), acc[1].lanes(), acc[2].lanes(), acc[3].lanes(), acc[4].lanes(), acc[5].lanes()];
            for j in j..len {
                let wj = match w {
                    Some(w) => w[j],
                    None => F::one(),
                };
                let kj = match pk {
                    Some(k) => k[j],
                    None => F::zero(),
                };
                let t = terms(rule, o[j], l[j], a[j], m[j], wj, kj, coef, self.seq_mode, self.dropped);
                for k in 0..sums {
                    lanes[k][j % 8] = lanes[k][j % 8] + t[k];
                }
                g[j] = t[SUMS];
            }
            st.loss += fold8(&lanes[0]);
            st.kl -= fold8(&lanes[1]);
            st.clipped += fold8(&lanes[2]);
            st.lower += fold8(&lanes[3]);
            if DIAG {
                st.adv += fold8(&lanes[4]);
                st.grad_mass += fold8(&lanes[5]);
            }
            start = end;
        }
    }
}

/// Tokens per block of [`RowCtx::token_pass`].
const BLOCK: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::agg_loss::Normalizers;
    use crate::ops::policy_loss::{ModeKnobs, PolicyLossArgs};
    use crate::tensor::Tensor;

    /// Runs one width on a random batch with masked tails, clipping on both
    /// sides, negative advantages and IS weights; returns outputs and grad.
    fn run_width(mode: &str, agg: &str, width: &str) -> (PolicyLossOutput, Vec<f32>) {
        let (b, t) = (7usize, 301usize);
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32
        };
        let old: Vec<f32> = (0..b * t).map(|_| -3.0 * rnd()).collect();
        // per-row offsets push GSPO's sequence ratio out of the clip range too
        let lp: Vec<f32> = old.iter().enumerate().map(|(k, &o)| o + 0.2 * ((k / t) as f32 - 3.0) + 1.5 * (rnd() - 0.5)).collect();
        let adv: Vec<f32> = (0..b * t).map(|_| 2.0 * (rnd() - 0.5)).collect();
        let w: Vec<f32> = (0..b * t).map(|_| 0.5 + rnd()).collect();
        let mask: Vec<bool> = (0..b * t).map(|k| (k % t) < 40 * (k / t) + 3).collect();
        let mut grad = vec![0f32; b * t];
        let d = |a: &'static str, v: &[f32]| Tensor::from_slice(a, v, &[b, t]);
        let (o, l, a, ww) = (d("old_log_prob", &old), d("log_prob", &lp), d("advantages", &adv), d("rollout_is_weights", &w));
        let m = Tensor::from_slice("response_mask", &mask, &[b, t]);
        let picks: Vec<bool> = (0..b * t).map(|k| k % 7 == 3).collect();
        let pk = Tensor::from_slice("picks", &picks, &[b, t]);
        let g = Tensor::from_mut_slice("grad", &mut grad, &[b, t]);
        let p = if mode == "value" {
            // old as the values, lp as the predictions, adv as the returns
            crate::ops::value_loss::problem(&crate::ops::value_loss::ValueLossArgs {
                vpreds: &l,
                values: &o,
                returns: &a,
                response_mask: &m,
                grad: &g,
                cliprange_value: 0.2,
                loss_agg_mode: agg,
                norm: Normalizers::default(),
            })
            .unwrap()
        } else {
            PolicyLossProblem::new(&PolicyLossArgs {
            old_log_prob: &o,
            log_prob: &l,
            advantages: &a,
            response_mask: &m,
            rollout_is_weights: Some(&ww),
            picks: if mode.ends_with("_cov") { Some(&pk) } else { None },
            grad: &g,
            mode,
            loss_agg_mode: agg,
            clip_ratio: 0.2,
            clip_ratio_low: None,
            clip_ratio_high: Some(0.28),
            clip_ratio_c: 3.0,
            clamp_closed: false,
            knobs: ModeKnobs { beta: 0.3, ..ModeKnobs::default() },
            norm: Normalizers::default(),
            diagnostics: true,
        })
        .unwrap()
        };
        let out = match width {
            "scalar" => run::<ScalarF32>(&p),
            #[cfg(target_arch = "x86_64")]
            "sse" => run::<Sse>(&p),
            #[cfg(target_arch = "x86_64")]
            "avx2" => run_with::<Avx2>(&p, |p, plan, i, s| unsafe { row_avx2::<true>(p, plan, i, s) }),
            _ => unreachable!(),
        }
        .unwrap();
        drop(p);
        (out, grad)
    }

    #[test]
    fn every_simd_width_gives_bitwise_the_scalar_result() {
        let mut widths = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            widths.push("sse");
            if std::is_x86_feature_detected!("avx2") {
                widths.push("avx2");
            }
        }
        let modes = [
            "vanilla", "gspo", "luspo", "value", "cispo", "sapo", "gpg", "dro", "dppo_tv", "dppo_kl", "reinforce", "clip_cov",
            "kl_cov", "geo_mean",
        ];
        for mode in modes {
            for agg in ["token-mean", "seq-mean-token-mean"] {
                let (want, want_g) = run_width(mode, agg, "scalar");
                let clips = !matches!(mode, "sapo" | "gpg" | "dro" | "reinforce" | "kl_cov");
                assert!(want.loss.is_finite() && (!clips || want.pg_clipfrac > 0.0), "{mode}: the batch must clip");
                for w in &widths {
                    let (got, got_g) = run_width(mode, agg, w);
                    if mode == "value" {
                        // (no length diagnostics: NaN on both sides)
                        assert_eq!((got.loss, got.pg_clipfrac), (want.loss, want.pg_clipfrac), "{mode} {agg} {w}");
                    } else {
                        assert_eq!(got, want, "{mode} {agg} {w}");
                    }
                    let same = got_g.iter().zip(&want_g).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{mode} {agg} {w}: gradients differ");
                }
            }
        }
    }
}
