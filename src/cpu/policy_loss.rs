//! The fused policy loss on the CPU: one pass per row computes the loss
//! terms, verl's metrics and `d loss / d log_prob`.
//!
//! Per token, with `d = lp - old`, `A` the advantage, `w` the rollout IS
//! weight, `[lo, hi] = [1 - clip_ratio_low, 1 + clip_ratio_high]`:
//!
//! * vanilla: `r = exp(clamp(d, -20, 20))`, `l = max(-A r, -A clip(r, lo, hi))`,
//!   and where `A < 0`, `l = min(l, -A c)`;
//! * GSPO / LUSPO: `s_i = exp(min(sum_t m d / max(L_i, 1), 10))` per row, and the
//!   token ratio `s_it = exp(min(lp - sg(lp) + sg(log s_i), 10))` equals `s_i` in
//!   value with `d s_it / d lp_it = s_it` (0 where the clamp at 10 bites);
//!   `l = max(-A s_it, -A clip(s_it, lo, hi))`.
//!
//! Gradients follow torch's conventions exactly: `clamp` passes the gradient
//! strictly inside its bounds, `maximum`/`minimum` split it in half on ties.
//! The token loss is `w * l`; the aggregation multiplies `m * l` by the row
//! coefficient of [`AggPlan`], which is also the gradient's factor.

use super::{mask_totals, min_rows_per_task};
use crate::policy::{PolicyLossOutput, PolicyLossProblem};
use crate::spec::{plus_eps, AggPlan, Clip, LossMode};
use crate::tensor::{DType, Real};
use rayon::prelude::*;

/// One token's loss, its derivative in `lp`, and the metric flags.
#[derive(Clone, Copy)]
struct Tok<F> {
    loss: F,
    dloss: F,
    clipped: bool,
    lower: bool,
}

// The helpers below are written as plain selects (no else-if chains, no
// early exits) so the token loop compiles to vector code.

/// `torch.clamp(x, lo, hi)`: NaN stays NaN; the second value says whether
/// the gradient passes. torch (2.15, the version pinned for the tests)
/// passes it on the open interval only: a value sitting exactly on a bound
/// gets none, and neither does NaN.
#[inline(always)]
fn clamp<F: Real>(x: F, lo: F, hi: F) -> (F, bool) {
    let v = if x < lo { lo } else { x };
    let v = if v > hi { hi } else { v };
    (v, (x > lo) & (x < hi))
}

/// `torch.maximum(a, b)` with its gradient: NaN propagates, ties split.
#[inline(always)]
fn maximum<F: Real>(a: F, da: F, b: F, db: F) -> (F, F) {
    let v = if a > b { a } else { b };
    let v = if a.is_nan() { a } else { v };
    let tie = (da + db) * F::of(0.5);
    let dv = if a > b { da } else { db };
    (v, if a == b { tie } else { dv })
}

/// `torch.minimum(a, b)` with its gradient: NaN propagates, ties split.
#[inline(always)]
fn minimum<F: Real>(a: F, da: F, b: F, db: F) -> (F, F) {
    let v = if a < b { a } else { b };
    let v = if a.is_nan() { a } else { v };
    let tie = (da + db) * F::of(0.5);
    let dv = if a < b { da } else { db };
    (v, if a == b { tie } else { dv })
}

/// The clip bounds in the compute type.
#[derive(Clone, Copy)]
struct Bounds<F> {
    lo: F,
    hi: F,
    c: F,
}

impl<F: Real> Bounds<F> {
    fn new(c: &Clip) -> Self {
        Bounds { lo: F::of(1.0 - c.low), hi: F::of(1.0 + c.high), c: F::of(c.c) }
    }
}

/// `max(-A r, -A clip(r))` given the ratio `r` and `dr = d r / d lp`.
#[inline(always)]
fn clipped_surrogate<F: Real>(a: F, r: F, dr: F, b: &Bounds<F>) -> (F, F, bool) {
    let na = -a;
    let pl1 = na * r;
    let (rc, pass) = clamp(r, b.lo, b.hi);
    let pl2 = na * rc;
    let (l, dl) = maximum(pl1, na * dr, pl2, if pass { na * dr } else { F::zero() });
    (l, dl, pl2 > pl1)
}

/// verl's `compute_policy_loss_vanilla` for one token; also returns the
/// clamped log-ratio `d` for the `ppo_kl` metric.
#[inline(always)]
fn vanilla_token<F: Real>(old: F, lp: F, a: F, b: &Bounds<F>) -> (Tok<F>, F) {
    let (d, pass) = clamp(lp - old, F::of(-20.0), F::of(20.0));
    let r = d.exp_bounded();
    let (l1, dl1, clipped) = clipped_surrogate(a, r, if pass { r } else { F::zero() }, b);
    let pl3 = -a * b.c;
    let lower = (l1 > pl3) & (a < F::zero());
    let (l2, dl2) = minimum(pl3, F::zero(), l1, dl1);
    let neg = a < F::zero();
    let (loss, dloss) = (if neg { l2 } else { l1 }, if neg { dl2 } else { dl1 });
    (Tok { loss, dloss, clipped, lower }, d)
}

/// Per-row sums, combined across rows in index order.
#[derive(Clone, Copy, Default)]
struct RowStats {
    /// `sum_t m * w * l` (masked positions skipped or multiplied, see `AggMode::is_seq_mode`).
    loss: f64,
    /// `L_i = sum_t m`.
    tokens: f64,
    clipped: f64,
    kl: f64,
    lower: f64,
}

/// Per-thread scratch rows.
struct Scratch<F> {
    old: Vec<F>,
    lp: Vec<F>,
    adv: Vec<F>,
    mask: Vec<F>,
    w: Vec<F>,
    grad: Vec<F>,
}

impl<F: Real> Scratch<F> {
    fn new(cols: usize) -> Self {
        let v = || vec![F::zero(); cols];
        Scratch { old: v(), lp: v(), adv: v(), mask: v(), w: v(), grad: v() }
    }
}

/// Runs the loss on the CPU, writing `d loss / d log_prob` into `p.grad`.
pub fn policy_loss(p: &PolicyLossProblem) -> PolicyLossOutput {
    if p.wants_f64() {
        run::<f64>(p)
    } else {
        run::<f32>(p)
    }
}

fn run<F: Real>(p: &PolicyLossProblem) -> PolicyLossOutput {
    let cols = p.log_prob.cols;
    let totals = p.norm.needs_mask_totals(p.agg).then(|| mask_totals(&p.response_mask));
    let mask_is_f64 = p.response_mask.desc.dtype == DType::F64;
    let plan = AggPlan::new(p.agg, &p.norm, totals, cols, mask_is_f64);
    let bounds = Bounds::<F>::new(&p.clip);

    let rows: Vec<RowStats> = (0..p.log_prob.rows)
        .into_par_iter()
        .with_min_len(min_rows_per_task(cols))
        .map_init(|| Scratch::<F>::new(cols), |s, i| row(p, &plan, &bounds, i, s))
        .collect();

    let mut out = PolicyLossOutput::default();
    let mut tokens = 0.0;
    for r in &rows {
        out.loss += plan.row_contribution(r.loss, r.tokens);
        tokens += r.tokens;
        out.pg_clipfrac += r.clipped;
        out.ppo_kl += r.kl;
        out.pg_clipfrac_lower += r.lower;
    }
    // verl's masked_mean: sum / (sum(mask) + 1e-8)
    let denom = plus_eps(tokens, mask_is_f64);
    out.loss = plan.finish(out.loss);
    out.pg_clipfrac /= denom;
    out.ppo_kl /= denom;
    out.pg_clipfrac_lower /= denom;
    out
}

/// One row: load, reduce what the row needs first (its length, and the
/// sequence log-ratio for GSPO/LUSPO), then the token pass.
fn row<F: Real>(p: &PolicyLossProblem, plan: &AggPlan, b: &Bounds<F>, i: usize, s: &mut Scratch<F>) -> RowStats {
    let old = p.old_log_prob.row(i, &mut s.old);
    let lp = p.log_prob.row(i, &mut s.lp);
    let adv = p.advantages.row(i, &mut s.adv);
    let mask = p.response_mask.row(i, &mut s.mask);
    let w = p.rollout_is_weights.as_ref().map(|w| w.row(i, &mut s.w));
    let tokens = super::sum_f64(mask);
    let coef = F::of(plan.row_coef(tokens));
    let seq_mode = plan.mode.is_seq_mode();

    let mut st = RowStats { tokens, ..Default::default() };
    let ctx = RowCtx { mask, w, coef, seq_mode };
    // SAFETY: row i is written by this task only.
    unsafe {
        p.grad.with_row(i, &mut s.grad, |g| match p.mode {
            LossMode::Vanilla => ctx.token_pass(g, old, lp, adv, &mut st, |o, l, a| vanilla_token(o, l, a, b)),
            LossMode::Gspo | LossMode::Luspo => {
                // verl: sum(d * m) / clamp(sum(m), min=1), a plain product so NaN propagates.
                let n = old.len();
                let seq = super::sum_map_f64(n, |t| (lp[t] - old[t]) * mask[t]);
                let log_s = F::of(seq / tokens.max(1.0));
                let (x, pass) = clamp(log_s, F::neg_infinity(), F::of(10.0));
                let sr = x.exp();
                let dsr = if pass { sr } else { F::zero() };
                ctx.token_pass(g, old, lp, adv, &mut st, |o, l, a| {
                    // lp - sg(lp) is 0 for finite lp and NaN otherwise, as in torch.
                    let z = l - l;
                    let (r, dr) = if z == F::zero() { (sr, dsr) } else { (F::nan(), F::nan()) };
                    let (loss, dloss, clipped) = clipped_surrogate(a, r, dr, b);
                    (Tok { loss, dloss, clipped, lower: false }, l - o)
                })
            }
        })
    };
    st
}

/// What the token pass of one row shares across tokens.
struct RowCtx<'a, F> {
    mask: &'a [F],
    w: Option<&'a [F]>,
    coef: F,
    seq_mode: bool,
}

impl<F: Real> RowCtx<'_, F> {
    /// Accumulates the row's sums and writes `g[t] = coef * m * w * dl/dlp`
    /// (0 at masked positions); `tok(t)` gives the token loss and the
    /// log-ratio used by the `ppo_kl` metric.
    ///
    /// Tokens go in blocks of [`BLOCK`]: a branch-free elementwise loop the
    /// compiler vectorises fills per-token terms, then each block is summed
    /// into f64 lanes in a fixed order.
    #[inline(always)]
    fn token_pass(
        &self,
        g: &mut [F],
        old: &[F],
        lp: &[F],
        adv: &[F],
        st: &mut RowStats,
        tok: impl Fn(F, F, F) -> (Tok<F>, F),
    ) {
        let n = g.len();
        let zero = F::zero();
        let mut start = 0;
        while start < n {
            let len = BLOCK.min(n - start);
            let end = start + len;
            let (mut bl, mut bk, mut bc, mut bw) = ([zero; BLOCK], [zero; BLOCK], [zero; BLOCK], [zero; BLOCK]);
            // equal-length block slices: no bounds checks in the loop below
            let (g, o, l, a, m) = (&mut g[start..end], &old[start..end], &lp[start..end], &adv[start..end], &self.mask[start..end]);
            let w = self.w.map(|w| &w[start..end]);
            let (bl, bk, bc, bw) = (&mut bl[..len], &mut bk[..len], &mut bc[..len], &mut bw[..len]);
            for j in 0..len {
                let (k, d) = tok(o[j], l[j], a[j]);
                let wt = match w {
                    Some(w) => w[j],
                    None => F::one(),
                };
                let (l, dl) = (k.loss * wt, k.dloss * wt);
                let m = m[j];
                let keep = m != zero;
                // masked positions: dropped (token modes, verl's masked_sum) or
                // multiplied by 0 (sequence modes, so NaN still propagates)
                bl[j] = if keep | self.seq_mode { l * m } else { zero };
                bk[j] = if keep { d * m } else { zero };
                bc[j] = if keep & k.clipped { m } else { zero };
                bw[j] = if keep & k.lower { m } else { zero };
                g[j] = if keep { self.coef * m * dl } else { zero };
            }
            st.loss += super::sum_f64(bl);
            st.kl -= super::sum_f64(bk);
            st.clipped += super::sum_f64(bc);
            st.lower += super::sum_f64(bw);
            start = end;
        }
    }
}

/// Tokens per block of [`RowCtx::token_pass`].
const BLOCK: usize = 64;
