//! The block rotation: PEFT's `OFTRotationModule` (`weight` `[blocks, bs(bs-1)/2]`, the upper
//! triangle of each skew-symmetric block, row by row).
use knobs_nn::Tensor;
use knobs_nn::burn::tensor::{IndexingUpdateOp, Int, TensorData};

#[derive(Debug, Clone)]
pub struct Rotation {
    pub block_size: usize,
    /// Blocks along the input axis; with `block_share` one parameter row serves them all.
    pub blocks: usize,
    pub block_share: bool,
    pub coft: bool,
    pub eps: f64,
    /// `None`: the exact Cayley transform; `Some(n)`: PEFT's n-term Neumann series.
    pub neumann_terms: Option<usize>,
    /// Where each parameter of a row lands in its flattened block: the `n` upper-triangle
    /// positions `i * bs + j`, then their mirrors `j * bs + i` (which take the negated value).
    positions: Vec<i64>,
}

impl Rotation {
    pub fn new(block_size: usize, blocks: usize, block_share: bool, coft: bool, eps: f64, neumann_terms: Option<usize>) -> Self {
        let bs = block_size as i64;
        let upper: Vec<(i64, i64)> = (0..bs).flat_map(|i| (i + 1..bs).map(move |j| (i, j))).collect();
        let positions = upper.iter().map(|(i, j)| i * bs + j).chain(upper.iter().map(|(i, j)| j * bs + i)).collect();
        Rotation { block_size, blocks, block_share, coft, eps, neumann_terms, positions }
    }

    pub fn n_elements(&self) -> usize {
        self.block_size * (self.block_size - 1) / 2
    }
    pub fn param_rows(&self) -> usize {
        if self.block_share { 1 } else { self.blocks }
    }

    /// COFT's projection: each block's `Q` scaled back onto the ball of radius
    /// `eps / sqrt(rows)` (Frobenius norm of the skew matrix, `sqrt(2) |q|`). PEFT writes the
    /// projection into the parameter under `no_grad` and trains it from there; here the
    /// projected value is used with the gradient passing straight through.
    fn project(&self, q: Tensor<2>) -> Tensor<2> {
        if !self.coft {
            return q;
        }
        let rows = q.dims()[0];
        let radius = self.eps / (rows as f64).sqrt();
        let fixed = q.clone().detach();
        let norm = (fixed.clone().powi_scalar(2).sum_dim(1) * 2.0).sqrt(); // [rows, 1]
        let inside = norm.clone().lower_equal_elem(radius);
        let scaled = fixed.clone() * (norm.recip() * radius);
        let projected = scaled.mask_where(inside.expand([rows, self.n_elements()]), fixed.clone());
        q + (projected - fixed)
    }

    /// The skew-symmetric blocks `[rows, bs, bs]` from the parameter `[rows, n]`.
    fn skew(&self, q: Tensor<2>) -> Tensor<3> {
        let bs = self.block_size;
        let [rows, n] = q.dims();
        let device = q.device();
        let idx: Vec<i64> = (0..rows).flat_map(|_| self.positions.iter().copied()).collect();
        let idx = Tensor::<2, Int>::from_data(TensorData::new(idx, [rows, 2 * n]), &device);
        let values = Tensor::cat(vec![q.clone(), q.neg()], 1);
        Tensor::<2>::zeros([rows, bs * bs], &device).scatter(1, idx, values, IndexingUpdateOp::Add).reshape([rows, bs, bs])
    }

    /// The rotation blocks `[blocks, bs, bs]` for parameter `q` scaled by `weight` (the
    /// adapter's weight scales the rotation's generator; 1 is PEFT's only value).
    pub fn blocks(&self, q: &Tensor<2>, weight: f32) -> Tensor<3> {
        let q = self.project(q.clone());
        let q = if weight == 1.0 { q } else { q * weight as f64 };
        let s = self.skew(q);
        let [rows, bs, _] = s.dims();
        let eye = Tensor::<2>::eye(bs, &s.device()).reshape([1, bs, bs]).expand([rows, bs, bs]);
        let r = match self.neumann_terms {
            Some(terms) => neumann(s, eye, terms),
            None => cayley_exact(s, eye),
        };
        if self.block_share { r.expand([self.blocks, bs, bs]) } else { r }
    }
}

/// PEFT's series: `I + 2Q + 2Q^2 + ... ` with the last term's factor 1, term by term as its loop.
fn neumann(q: Tensor<3>, eye: Tensor<3>, terms: usize) -> Tensor<3> {
    let mut r = eye;
    if terms > 1 {
        r = r + q.clone() * 2.0;
        if terms > 2 {
            let q2 = q.clone().matmul(q.clone());
            r = r + q2.clone() * 2.0;
            let mut power = q2;
            for _ in 3..terms.saturating_sub(1) {
                power = power.matmul(q.clone());
                r = r + power.clone() * 2.0;
            }
            power = power.matmul(q);
            r = r + power;
        }
    }
    r
}

/// `(I - Q)(I + Q)^-1`, block by block on the host (no gradient: training asks for the series).
fn cayley_exact(q: Tensor<3>, eye: Tensor<3>) -> Tensor<3> {
    let [rows, bs, _] = q.dims();
    let plus: Vec<f32> = (eye.clone() + q.clone()).into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
    let minus = eye - q;
    let inv: Vec<f32> = (0..rows).flat_map(|b| invert(&plus[b * bs * bs..(b + 1) * bs * bs], bs)).collect();
    let inv = Tensor::<3>::from_data(TensorData::new(inv, [rows, bs, bs]), &minus.device());
    minus.matmul(inv)
}

/// The inverse of the row-major `n x n` matrix `m`, by Gauss-Jordan with partial pivoting in
/// f64. Rotation blocks `I + Q` (Q skew) are always invertible.
pub fn invert(m: &[f32], n: usize) -> Vec<f32> {
    let mut a: Vec<f64> = m.iter().map(|&v| v as f64).collect();
    let mut inv: Vec<f64> = (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
    for col in 0..n {
        let pivot = (col..n).max_by(|&x, &y| a[x * n + col].abs().total_cmp(&a[y * n + col].abs())).expect("n > 0");
        for k in 0..n {
            a.swap(col * n + k, pivot * n + k);
            inv.swap(col * n + k, pivot * n + k);
        }
        let p = a[col * n + col];
        for k in 0..n {
            a[col * n + k] /= p;
            inv[col * n + k] /= p;
        }
        for row in 0..n {
            if row != col {
                let f = a[row * n + col];
                if f != 0.0 {
                    for k in 0..n {
                        a[row * n + k] -= f * a[col * n + k];
                        inv[row * n + k] -= f * inv[col * n + k];
                    }
                }
            }
        }
    }
    inv.into_iter().map(|v| v as f32).collect()
}

/// The inverse of each block `[blocks, bs, bs]`, on the host.
pub fn invert_blocks(r: Tensor<3>) -> Tensor<3> {
    let [blocks, bs, _] = r.dims();
    let device = r.device();
    let v: Vec<f32> = r.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
    let inv: Vec<f32> = (0..blocks).flat_map(|b| invert(&v[b * bs * bs..(b + 1) * bs * bs], bs)).collect();
    Tensor::from_data(TensorData::new(inv, [blocks, bs, bs]), &device)
}
