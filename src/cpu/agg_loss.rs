//! verl's `agg_loss` for any B×T loss matrix (entropy, KL terms): the scalar
//! and `d loss / d loss_mat`, in one pass per row. Twin of
//! `cuda/kernels/loss.cu` (`MODE_AGG`).

use super::{fold_rows, mask_totals, Sum8};
use crate::error::Result;
use crate::ops::agg_loss::{AggPlan, AggProblem};
use crate::tensor::{piece_scratch, pieces, Real, PIECE};

/// Aggregates on the CPU and writes the gradient; returns the loss, or a
/// `MemoryError` if its (bounded) working buffers cannot be allocated.
pub fn agg_loss(p: &AggProblem) -> Result<f64> {
    if p.loss_mat.tensor.dtype == crate::tensor::DType::F64 {
        run::<f64>(p)
    } else {
        run::<f32>(p)
    }
}

fn run<F: Real>(p: &AggProblem) -> Result<f64> {
    let cols = p.loss_mat.cols;
    let totals = match p.norm.needs_mask_totals(p.agg) {
        true => Some(mask_totals(&p.loss_mask)?),
        false => None,
    };
    let plan = AggPlan::new(p.agg, &p.norm, totals, cols, p.loss_mask.tensor.dtype == crate::tensor::DType::F64);
    let seq_mode = p.agg.is_seq_mode();
    let scratch = || -> Result<_> {
        Ok((
            piece_scratch::<F>(p.loss_mat.tensor.arg, cols)?,
            piece_scratch::<F>(p.loss_mask.tensor.arg, cols)?,
            piece_scratch::<F>(p.grad.tensor.arg, cols)?,
        ))
    };
    let mut total = 0.0;
    fold_rows(
        p.loss_mat.tensor.arg,
        p.loss_mat.rows,
        cols,
        scratch,
        |(sl, sm, sg), i| {
            // the row's length first (in pieces when the row is long; a
            // short row's mask is loaded once, below)
            let mut len_sum = Sum8::default();
            if cols > PIECE {
                for (start, len) in pieces(cols) {
                    len_sum.add(p.loss_mask.part(i, start, len, sm));
                }
            }
            let mut sum = 0.0f64;
            let mut tokens = len_sum.total();
            for (start, len) in pieces(cols) {
                let l = p.loss_mat.part(i, start, len, sl);
                let m = p.loss_mask.part(i, start, len, sm);
                if cols <= PIECE {
                    len_sum.add(m);
                    tokens = len_sum.total();
                }
                let coef = F::of(plan.row_coef(tokens));
                // SAFETY: row i is written by this task only.
                unsafe {
                    p.grad.with_part(i, start, len, sg, |g| {
                        for t in 0..len {
                            if m[t] != F::zero() || seq_mode {
                                sum += (l[t] * m[t]).f64();
                            }
                            g[t] = if m[t] != F::zero() { coef * m[t] } else { F::zero() };
                        }
                    })
                };
            }
            (sum, tokens)
        },
        |(s, l)| total += plan.row_contribution(s, l),
    )?;
    Ok(plan.finish(total))
}
