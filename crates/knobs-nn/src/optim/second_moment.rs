//! Adafactor's second moment: one running mean of squared gradients per value (vectors), or,
//! for a parameter of two or more dimensions, factored as one mean per row and one per column
//! of its last two dimensions. A step folds the gradient in, then gives the preconditioner as
//! per-row and per-column factors, so the update `g / sqrt(moment)` is formed value by value
//! where it is used instead of being stored (a full fine-tune's parameters are gigabytes; each
//! pass over them costs more than the arithmetic).
use std::ops::Range;

use rayon::prelude::*;

/// Small matrices per parallel piece: enough that a piece is worth handing to a thread (and
/// a large matrix's rows per piece of its row factors).
const SMALL_MATRICES: usize = 1 << 10;
/// Columns per task of a large matrix's column sums.
const COLUMN_BLOCK: usize = 64;

#[derive(Debug, Clone)]
pub(super) enum SecondMoment {
    /// Over `[.., rows, cols]`: one value per (leading index, row) and per (leading index, col).
    Factored { rows: usize, cols: usize, row: Vec<f32>, col: Vec<f32> },
    Full(Vec<f32>),
}

/// This step's decay: `keep` of the old mean plus `add` of the new one, over squared
/// gradients floored by `eps1`.
#[derive(Clone, Copy)]
pub(super) struct Decay {
    pub keep: f32,
    pub add: f32,
    pub eps1: f32,
}

impl Decay {
    fn square(&self, x: f32) -> f64 {
        (x * x + self.eps1) as f64
    }
    /// The moment `old` decayed towards `sum / n`.
    fn mean(&self, old: f32, sum: f64, n: usize) -> f32 {
        old * self.keep + (sum / n as f64) as f32 * self.add
    }
}

/// The update of each value is `g * factor`: `1 / sqrt(v)` per value, or the product of a row
/// factor `1 / sqrt(row / mean(its matrix's rows))` and a column factor `1 / sqrt(col)`.
pub(super) enum Preconditioner<'a> {
    Full(&'a [f32]),
    Factored { rows: usize, cols: usize, row: Vec<f32>, col: Vec<f32> },
}

impl SecondMoment {
    /// Folds this step's gradient `g` in and returns the preconditioner it gives.
    pub(super) fn fold_in(&mut self, g: &[f32], decay: Decay) -> Preconditioner<'_> {
        match self {
            SecondMoment::Full(v) => {
                v.par_iter_mut().zip(g.par_iter()).for_each(|(v, &x)| *v = *v * decay.keep + (x * x + decay.eps1) * decay.add);
                Preconditioner::Full(v)
            }
            SecondMoment::Factored { rows, cols, row, col } => {
                let (r, c) = (*rows, *cols);
                if g.len() == r * c {
                    fold_into_matrix(g, row, col, decay);
                } else {
                    fold_into_small_matrices(g, row, col, r, c, decay);
                }
                let row_factors = row_factors(row, r);
                let col_factors = col.par_iter().map(|&v| 1.0 / v.sqrt()).collect();
                Preconditioner::Factored { rows: r, cols: c, row: row_factors, col: col_factors }
            }
        }
    }
}

/// Independent partial sums in a long sum (a single f64 sum waits on each addition).
const LANES: usize = 8;

/// The squares of `g` summed in [`LANES`] partial sums.
fn sum_of_squares(g: &[f32], decay: Decay) -> f64 {
    let mut lanes = [0f64; LANES];
    let mut pieces = g.chunks_exact(LANES);
    for piece in &mut pieces {
        for (s, &x) in lanes.iter_mut().zip(piece) {
            *s += decay.square(x);
        }
    }
    for (s, &x) in lanes.iter_mut().zip(pieces.remainder()) {
        *s += decay.square(x);
    }
    lanes.iter().sum()
}

/// One large matrix: row sums split by rows, column sums by blocks of columns (each column
/// summed top to bottom; the bits do not depend on the thread count).
fn fold_into_matrix(g: &[f32], row: &mut [f32], col: &mut [f32], decay: Decay) {
    let (r, c) = (row.len(), col.len());
    row.par_iter_mut().zip(g.par_chunks(c)).for_each(|(v, gr)| *v = decay.mean(*v, sum_of_squares(gr, decay), c));
    col.par_chunks_mut(COLUMN_BLOCK).enumerate().for_each(|(b, cols)| {
        let first = b * COLUMN_BLOCK;
        let mut sums = [0f64; COLUMN_BLOCK];
        for gr in g.chunks(c) {
            for (s, &x) in sums.iter_mut().zip(&gr[first..first + cols.len()]) {
                *s += decay.square(x);
            }
        }
        for (v, s) in cols.iter_mut().zip(sums) {
            *v = decay.mean(*v, s, r);
        }
    });
}

/// Many small matrices (a 3x3 kernel per channel pair), in pieces of [`SMALL_MATRICES`]: first
/// every sum of a piece, then its moments in one flat loop, so that the divisions of one
/// matrix do not wait on the sums of the next.
fn fold_into_small_matrices(g: &[f32], row: &mut [f32], col: &mut [f32], rows: usize, cols: usize, decay: Decay) {
    g.par_chunks(SMALL_MATRICES * rows * cols)
        .zip(row.par_chunks_mut(SMALL_MATRICES * rows).zip(col.par_chunks_mut(SMALL_MATRICES * cols)))
        .for_each(|(g, (row, col))| {
            let mut row_sums = vec![0f64; row.len()];
            let mut col_sums = vec![0f64; col.len()];
            for ((g, row_sums), col_sums) in g.chunks(rows * cols).zip(row_sums.chunks_mut(rows)).zip(col_sums.chunks_mut(cols)) {
                for (gr, total) in g.chunks(cols).zip(row_sums.iter_mut()) {
                    for (&x, s) in gr.iter().zip(col_sums.iter_mut()) {
                        let sq = decay.square(x);
                        *total += sq;
                        *s += sq;
                    }
                }
            }
            for (v, &s) in row.iter_mut().zip(&row_sums) {
                *v = decay.mean(*v, s, cols);
            }
            for (v, &s) in col.iter_mut().zip(&col_sums) {
                *v = decay.mean(*v, s, rows);
            }
        });
}

/// `1 / sqrt(row / mean(its matrix's rows))` for every row moment, matrices of `rows` rows.
fn row_factors(row: &[f32], rows: usize) -> Vec<f32> {
    let mut factors = vec![0f32; row.len()];
    factors.par_chunks_mut(SMALL_MATRICES * rows).zip(row.par_chunks(SMALL_MATRICES * rows)).for_each(|(factors, row)| {
        let means: Vec<f32> = row.chunks(rows).map(|m| (m.iter().map(|&x| x as f64).sum::<f64>() / rows as f64) as f32).collect();
        for ((f, v), &mean) in factors.chunks_mut(rows).zip(row.chunks(rows)).zip(&means) {
            for (f, &v) in f.iter_mut().zip(v) {
                *f = 1.0 / (v / mean).sqrt();
            }
        }
    });
    factors
}

impl Preconditioner<'_> {
    /// Calls `f(k, u)` with the update `u` of each value `k` in `range` of the gradient `g`.
    #[inline(always)]
    pub(super) fn each(&self, g: &[f32], range: Range<usize>, mut f: impl FnMut(usize, f32)) {
        match self {
            Preconditioner::Full(v) => {
                for k in range {
                    f(k, (1.0 / v[k].sqrt()) * g[k]);
                }
            }
            &Preconditioner::Factored { rows, cols, ref row, ref col } => {
                // Value k is in row i of the rows of every matrix, matrix i / rows; both are
                // counted along rather than divided out per row (a 3x3 kernel's rows are short).
                let mut k = range.start;
                let mut i = k / cols;
                let (mut matrix, mut row_in) = (i / rows, i % rows);
                while k < range.end {
                    let end = ((i + 1) * cols).min(range.end);
                    let (rf, cf) = (row[i], &col[matrix * cols..][..cols]);
                    for (k, &cf) in (k..end).zip(&cf[k - i * cols..]) {
                        f(k, rf * cf * g[k]);
                    }
                    k = end;
                    i += 1;
                    row_in += 1;
                    if row_in == rows {
                        (matrix, row_in) = (matrix + 1, 0);
                    }
                }
            }
        }
    }
}
