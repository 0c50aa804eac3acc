//! `kl_penalty` on the CPU: verl's estimators, elementwise, with the derivative in
//! `logprob` written in the same pass (the derivative in `ref_logprob` is
//! its negative: every estimator is a function of `d = logprob - ref_logprob`).
//! Twin of `cuda/kernels/kl_penalty.cu`.
//!
//! * `kl` / `k1`: `d`;
//! * `abs`: `|d|` (torch's `sign(d)` gradient, 0 at 0);
//! * `mse` / `k2`: `d^2 / 2`;
//! * `low_var_kl` / `k3`: `k = clamp(-d, -20, 20)`, `clamp(exp(k) - k - 1, -10, 10)`;
//! * a `+` suffix (`k1+`, `k3+`, ...): the same value, with the gradient of
//!   `k2` (straight-through), as verl.
//!
//! Clamps pass the gradient strictly inside their bounds, as `torch.clamp`
//! does (the clamp shared with the policy loss, `lane::clamp`).

use super::lane::{clamp, Lane};
use super::for_each_row;
use crate::error::Result;
pub use crate::ops::kl_penalty::{KlKind, KlMode, KlProblem};
use crate::tensor::{piece_scratch, DType, Real, PIECE};

/// One element: `(value, d value / d logprob)`.
#[inline(always)]
fn kl_token<F: Real + Lane<Mask = bool>>(mode: KlMode, closed: bool, lp: F, rf: F) -> (F, F) {
    let d = lp - rf;
    let (v, dv) = match mode.kind {
        KlKind::K1 => (d, F::one()),
        KlKind::Abs => {
            let s = if d > F::zero() {
                F::one()
            } else if d < F::zero() {
                -F::one()
            } else {
                F::zero()
            };
            (d.abs(), s)
        }
        KlKind::K2 => (F::of(0.5) * d * d, d),
        KlKind::K3 => {
            let k = rf - lp;
            let (k, pass_k) = clamp(k, F::of(-20.0), F::of(20.0), closed);
            let ratio = k.exp();
            let kld = ratio - k - F::one();
            let (v, pass_v) = clamp(kld, F::of(-10.0), F::of(10.0), closed);
            // d kld / d k = ratio - 1, d k / d lp = -1
            let g = if pass_k && pass_v { F::one() - ratio } else { F::zero() };
            (v, g)
        }
    };
    if mode.straight_through {
        (v, d)
    } else {
        (v, dv)
    }
}


/// Writes the estimate (and its gradient, if asked) on the CPU; a
/// `MemoryError` if its (bounded) working buffers cannot be allocated.
pub fn compute(p: &KlProblem) -> Result<()> {
    let f64_in = [&p.logprob, &p.ref_logprob].iter().any(|m| m.tensor.dtype == DType::F64);
    if f64_in || p.out.tensor.dtype == DType::F64 {
        run::<f64>(p)
    } else {
        run::<f32>(p)
    }
}

/// Columns per rayon task: a row longer than this (a 1-D input is one row)
/// is split, so one long row still runs on every thread.
const CHUNK: usize = 16384;

/// The tasks of a `rows x cols` call: `(row, start, len)` column ranges of
/// at most [`CHUNK`] (and [`PIECE`], the scratch's size), rows in order.
fn tasks(rows: usize, cols: usize) -> (usize, impl Fn(usize) -> (usize, usize, usize)) {
    let chunk = CHUNK.min(PIECE).min(cols.max(1));
    let per_row = cols.div_ceil(chunk).max(1);
    (rows * per_row, move |k| {
        let start = (k % per_row) * chunk;
        (k / per_row, start, chunk.min(cols - start))
    })
}

fn run<F: Real + Lane<Mask = bool>>(p: &KlProblem) -> Result<()> {
    let cols = p.logprob.cols;
    let (mode, closed) = (p.mode, p.clamp_closed);
    let (n, task) = tasks(p.logprob.rows, cols);
    let chunk = CHUNK.min(PIECE).min(cols);
    let scratch = || -> Result<_> {
        let v = |arg| piece_scratch::<F>(arg, chunk);
        Ok((v(p.logprob.tensor.arg)?, v(p.ref_logprob.tensor.arg)?, v(p.out.tensor.arg)?, v(p.out.tensor.arg)?))
    };
    for_each_row(n, chunk, scratch, |(sl, sr, so, sg), k| {
        let (i, start, len) = task(k);
        let lp = p.logprob.part::<F>(i, start, len, sl);
        let rf = p.ref_logprob.part::<F>(i, start, len, sr);
        // SAFETY: this range of row i of each output is written by this task only.
        unsafe {
            p.out.with_part(i, start, len, so, |o| {
                for t in 0..len {
                    o[t] = kl_token(mode, closed, lp[t], rf[t]).0;
                }
            });
            if let Some(g) = &p.grad {
                g.with_part(i, start, len, sg, |g| {
                    for t in 0..len {
                        g[t] = kl_token(mode, closed, lp[t], rf[t]).1;
                    }
                });
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_long_row_is_split_into_tasks_that_cover_it_once() {
        use super::{tasks, CHUNK, PIECE};
        let chunk = CHUNK.min(PIECE);
        for (rows, cols) in [(1usize, 10 * chunk + 3), (3, 2 * chunk), (5, 7), (1, 1)] {
            let (n, task) = tasks(rows, cols);
            assert!(rows * cols <= chunk || n > 1, "{rows}x{cols}: one task");
            let mut seen = vec![0u8; rows * cols];
            for k in 0..n {
                let (i, start, len) = task(k);
                assert!(len > 0 && len <= chunk);
                for t in start..start + len {
                    seen[i * cols + t] += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{rows}x{cols}");
        }
    }

    use super::*;
    use crate::tensor::Tensor;

    fn kl(mode: &str, lp: &[f64], rf: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let n = lp.len();
        let (mut o, mut g) = (vec![0.0; n], vec![0.0; n]);
        let l = Tensor::from_slice("logprob", lp, &[1, n]);
        let r = Tensor::from_slice("ref_logprob", rf, &[1, n]);
        let od = Tensor::from_mut_slice("out", &mut o, &[1, n]);
        let gd = Tensor::from_mut_slice("grad", &mut g, &[1, n]);
        compute(&KlProblem::new(&l, &r, &od, Some(&gd), mode, false).unwrap()).unwrap();
        (o, g)
    }

    #[test]
    fn estimators_and_gradients() {
        let lp = [-1.0, -2.0, -0.5];
        let rf = [-1.5, -1.0, -0.5];
        assert_eq!(kl("k1", &lp, &rf), (vec![0.5, -1.0, 0.0], vec![1.0, 1.0, 1.0]));
        assert_eq!(kl("abs", &lp, &rf), (vec![0.5, 1.0, 0.0], vec![1.0, -1.0, 0.0]));
        assert_eq!(kl("mse", &lp, &rf), (vec![0.125, 0.5, 0.0], vec![0.5, -1.0, 0.0]));
        let (v, g) = kl("low_var_kl", &lp, &rf);
        let k = -0.5f64;
        assert!((v[0] - (k.exp() - k - 1.0)).abs() < 1e-15 && (g[0] - (1.0 - k.exp())).abs() < 1e-15);
        let (v3, g3) = kl("k3+", &lp, &rf);
        assert_eq!(v3, v);
        assert_eq!(g3, vec![0.5, -1.0, 0.0]);
    }

    #[test]
    fn k3_clamps_block_the_gradient() {
        // ref - lp = 30 -> k clamped to 20, value clamped to 10
        let (v, g) = kl("k3", &[0.0], &[30.0]);
        assert_eq!((v[0], g[0]), (10.0, 0.0));
        // ref - lp = 3: exp(3) - 4 = 16.09 -> clamped to 10
        let (v, g) = kl("k3", &[0.0], &[3.0]);
        assert_eq!((v[0], g[0]), (10.0, 0.0));
    }

    #[test]
    fn unknown_mode_is_a_value_error() {
        let a = [0.0f32; 2];
        let mut o = [0.0f32; 2];
        let l = Tensor::from_slice("logprob", &a, &[1, 2]);
        let od = Tensor::from_mut_slice("out", &mut o, &[1, 2]);
        let e = KlProblem::new(&l, &l, &od, None, "full", false).err().unwrap();
        assert_eq!(e.arg, "kl_penalty");
        let b = [0.0f32; 3];
        let r = Tensor::from_slice("ref_logprob", &b, &[1, 3]);
        let e = KlProblem::new(&l, &r, &od, None, "k1", false).err().unwrap();
        assert_eq!(e.arg, "ref_logprob");
    }
}
