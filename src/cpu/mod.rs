//! CPU backend: rayon kernels, one task per row, per-row sums in f64 in a
//! fixed order and combined row by row in index order, so results are
//! bitwise identical whatever the thread count.

pub mod advantage;
pub mod agg;
pub mod lane;
pub mod kl;
pub mod policy_loss;
pub mod pool;

use crate::spec::MaskTotals;
use crate::tensor::{Mat, Real};
use rayon::prelude::*;

/// Rows per rayon task so short rows are not scheduled one by one.
pub(crate) fn min_rows_per_task(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}

/// Sum of a row in f64: eight independent lanes, combined in a fixed order,
/// so the loop vectorises and the result does not depend on threads.
#[inline]
pub(crate) fn sum_f64<F: Real>(xs: &[F]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            lanes[k] += c[k].f64();
        }
    }
    for (k, &x) in tail.iter().enumerate() {
        lanes[k] += x.f64();
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

/// `sum(m)` of every row of a mask (as verl's `loss_mask.sum(-1)`).
pub(crate) fn mask_row_sums(mask: &Mat) -> Vec<f64> {
    (0..mask.rows)
        .into_par_iter()
        .with_min_len(min_rows_per_task(mask.cols))
        .map_init(|| vec![0.0f64; mask.cols], |s, i| sum_f64(mask.row::<f64>(i, s)))
        .collect()
}

/// Totals of a mask: all tokens and the rows with at least one.
pub(crate) fn mask_totals(mask: &Mat) -> MaskTotals {
    let sums = mask_row_sums(mask);
    MaskTotals { tokens: sums.iter().sum(), rows: sums.iter().filter(|&&l| l > 0.0).count() as f64 }
}
