//! CPU backend: rayon kernels, one task per row, per-row sums in f64 in a
//! fixed order and combined row by row in index order, so results are
//! bitwise identical whatever the thread count.

pub mod advantage;
pub mod agg_loss;
pub mod lane;
pub mod outputs;
pub mod kl_penalty;
pub mod policy_loss;
pub mod pool;
pub mod returns;
pub mod token_baseline;

use crate::error::{Error, Result};
use crate::ops::agg_loss::MaskTotals;
use crate::tensor::{piece_scratch, pieces, Mat, Real};
use rayon::prelude::*;

/// Rows per rayon task so short rows are not scheduled one by one.
pub(crate) fn min_rows_per_task(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}

/// Rows handed to rayon per step of [`fold_rows`]: the per-row results of
/// one step are all that is held at once, however many rows there are.
const ROWS_PER_STEP: usize = 1 << 16;

/// Runs `f` on every row in parallel (each rayon task with its own state
/// from `init`, e.g. scratch buffers) and hands the results to `fold` in row
/// order, so sums over rows are the same whatever the thread count. Memory
/// stays bounded: results are gathered [`ROWS_PER_STEP`] rows at a time. An
/// error from `init` (a scratch buffer that cannot be allocated) is returned,
/// as is a `MemoryError` about `arg` if the results' buffer cannot be.
pub(crate) fn fold_rows<S, T: Send>(
    arg: &'static str,
    rows: usize,
    cols: usize,
    init: impl Fn() -> Result<S> + Sync + Send,
    f: impl Fn(&mut S, usize) -> T + Sync + Send,
    mut fold: impl FnMut(T),
) -> Result<()> {
    let mut buf: Vec<Result<T>> = Vec::new();
    buf.try_reserve_exact(rows.min(ROWS_PER_STEP))
        .map_err(|_| Error::memory(arg, format!("cannot allocate per-row results for {rows} rows")))?;
    if pool::inline() {
        // a small call on the caller's thread: the rows in order, one state
        let mut s = init();
        for i in 0..rows {
            fold(match &mut s {
                Ok(s) => f(s, i),
                Err(e) => return Err(e.clone()),
            });
        }
        return Ok(());
    }
    let mut lo = 0;
    while lo < rows {
        let hi = rows.min(lo + ROWS_PER_STEP);
        (lo..hi)
            .into_par_iter()
            .with_min_len(min_rows_per_task(cols))
            .map_init(&init, |s, i| match s {
                Ok(s) => Ok(f(s, i)),
                Err(e) => Err(e.clone()),
            })
            .collect_into_vec(&mut buf);
        for r in buf.drain(..) {
            fold(r?);
        }
        lo = hi;
    }
    Ok(())
}

/// Runs `f` on every row in parallel, each rayon task with its own state
/// from `init`; an error from `init` is returned.
pub(crate) fn for_each_row<S>(
    rows: usize,
    cols: usize,
    init: impl Fn() -> Result<S> + Sync + Send,
    f: impl Fn(&mut S, usize) + Sync + Send,
) -> Result<()> {
    if pool::inline() {
        let mut s = init()?;
        (0..rows).for_each(|i| f(&mut s, i));
        return Ok(());
    }
    (0..rows).into_par_iter().with_min_len(min_rows_per_task(cols)).try_for_each_init(&init, |s, i| match s {
        Ok(s) => {
            f(s, i);
            Ok(())
        }
        Err(e) => Err(e.clone()),
    })
}

/// A sum in f64 over eight lanes: element `k` of the whole sequence goes to
/// lane `k % 8`, whatever pieces it arrives in (each but the last a multiple
/// of 8 long), and the lanes are combined in a fixed order, so the loop
/// vectorises and the result depends neither on threads nor on pieces.
#[derive(Default)]
pub(crate) struct Sum8 {
    lanes: [f64; 8],
}

impl Sum8 {
    #[inline]
    pub fn add<F: Real>(&mut self, xs: &[F]) {
        let chunks = xs.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            for k in 0..8 {
                self.lanes[k] += c[k].f64();
            }
        }
        for (k, &x) in tail.iter().enumerate() {
            self.lanes[k] += x.f64();
        }
    }

    #[inline]
    pub fn total(&self) -> f64 {
        let l = &self.lanes;
        ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
    }
}

/// `sum(m)` of row `i` of a mask (verl's `loss_mask.sum(-1)`), in pieces
/// through `scratch`.
pub(crate) fn mask_row_sum(mask: &Mat, i: usize, scratch: &mut [f64]) -> f64 {
    let mut s = Sum8::default();
    for (start, len) in pieces(mask.cols) {
        s.add(mask.part::<f64>(i, start, len, scratch));
    }
    s.total()
}

/// Totals of a mask: all tokens and the rows with at least one.
pub(crate) fn mask_totals(mask: &Mat) -> Result<MaskTotals> {
    let mut t = MaskTotals { tokens: 0.0, rows: 0.0 };
    fold_rows(
        mask.tensor.arg,
        mask.rows,
        mask.cols,
        || piece_scratch::<f64>(mask.tensor.arg, mask.cols),
        |s, i| mask_row_sum(mask, i, s),
        |l| {
            t.tokens += l;
            t.rows += (l > 0.0) as u8 as f64;
        },
    )?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The row helpers on the pool and inline (a small call on the caller's
    /// thread) visit every row once and fold in row order.
    #[test]
    fn row_helpers_fold_in_row_order_inline_and_on_the_pool() {
        for bytes in [1, u64::MAX] {
            let (folded, seen) = pool::install(bytes, || {
                assert_eq!(pool::inline(), bytes == 1);
                let mut folded = Vec::new();
                fold_rows("x", 1000, 3, || Ok(()), |_, i| i * 2, |v| folded.push(v)).unwrap();
                let seen = Mutex::new(vec![0u32; 1000]);
                for_each_row(1000, 3, || Ok(()), |_, i| seen.lock().unwrap()[i] += 1).unwrap();
                (folded, seen.into_inner().unwrap())
            });
            assert_eq!(folded, (0..1000).map(|i| i * 2).collect::<Vec<_>>());
            assert!(seen.iter().all(|&n| n == 1));
        }
        assert!(!pool::inline());
    }
}
