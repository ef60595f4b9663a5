//! bf16 weight matrices on the CPU, multiplied by f32 activations.
//!
//! candle's CPU matmul has no bf16 kernel, and converting a 7B bf16
//! checkpoint to f32 needs 29 GB. Generation is bound by memory bandwidth,
//! so reading 2 bytes per weight and widening in registers (a bf16 is the
//! top half of an f32: a shift) is both the smallest and the fastest way
//! to run it. Activations, norms and attention stay f32.

use super::qmatmul::{in_fours, rows_by_tasks};
use anyhow::{Result, bail};
use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use half::bf16;

/// A bf16 `[rows, cols]` matrix: little-endian bf16s, row after row,
/// usually a slice of the model file's memory map (zero-copy).
#[derive(Clone)]
pub struct Bf16Matrix {
    w: Bytes,
    rows: usize,
    cols: usize,
}

impl Bf16Matrix {
    /// A copy of `t` in bf16 (a checkpoint in another dtype, run as bf16).
    pub fn new(t: &Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        let w: Vec<u8> = t
            .to_dtype(DType::BF16)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<bf16>()?
            .into_iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect();
        Self::from_bytes(Bytes::from(w), &[rows, cols])
    }

    /// The matrix in `bytes` as stored; errors unless they are exactly
    /// `shape`'s values.
    pub fn from_bytes(bytes: Bytes, shape: &[usize]) -> Result<Self> {
        let [rows, cols] = shape else {
            bail!("a matrix needs two dimensions, not {shape:?}");
        };
        if Some(bytes.len()) != rows.checked_mul(*cols).and_then(|n| n.checked_mul(2)) {
            bail!(
                "{} bytes do not make a {rows}×{cols} bf16 matrix",
                bytes.len()
            );
        }
        Ok(Self {
            w: super::aligned(bytes, 2),
            rows: *rows,
            cols: *cols,
        })
    }

    pub fn bytes(&self) -> usize {
        self.w.len()
    }

    /// The matrix as stored: little-endian bf16s, row after row.
    pub fn data(&self) -> &[u8] {
        &self.w
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows `ids` widened to f32, `[ids.len(), cols]` row-major (the
    /// embedding lookup of a bf16 table); errors on an id past the last row.
    pub fn rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let w = self.values();
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let r = id as usize;
            if r >= self.rows {
                bail!("token id {id} is past the {} rows of the table", self.rows);
            }
            out.extend(
                w[r * self.cols..(r + 1) * self.cols]
                    .iter()
                    .map(|v| v.to_f32()),
            );
        }
        Ok(out)
    }

    fn values(&self) -> &[bf16] {
        // SAFETY: `from_bytes` aligned the bytes to 2 and checked that they
        // are `rows * cols` bf16s; every bit pattern is a bf16 (x86 is little-endian).
        unsafe { std::slice::from_raw_parts(self.w.as_ptr().cast::<bf16>(), self.w.len() / 2) }
    }

    /// `x @ w.T` for `x: [m, in]`, in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.cols {
            bail!("input has {k} features, the matrix {}", self.cols);
        }
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let w = self.values();
        let row = |r: usize| &w[r * k..(r + 1) * k];
        let out = if m == 1 {
            rows_by_tasks(self.rows, 1, k, &xs, |r, x| dot(row(r), x))
        } else {
            let xr: Vec<&[f32]> = xs.chunks_exact(k).collect();
            in_fours(
                self.rows,
                &xr,
                |r, x| dot(row(r), x),
                |r, x4| dot4(row(r), x4),
            )
        };
        Ok(Tensor::from_vec(out, (m, self.rows), &Device::Cpu)?)
    }
}

pub fn dot_scalar(w: &[bf16], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(w, x)| w.to_f32() * x).sum()
}

fn dot(w: &[bf16], x: &[f32]) -> f32 {
    dot4_any::<1>(w, [x])[0]
}

fn dot4(w: &[bf16], xs: [&[f32]; 4]) -> [f32; 4] {
    dot4_any::<4>(w, xs)
}

fn dot4_any<const N: usize>(w: &[bf16], xs: [&[f32]; N]) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    if w.len().is_multiple_of(32)
        && std::is_x86_feature_detected!("avx512f")
        && xs.iter().all(|x| x.len() >= w.len())
    {
        // SAFETY: the CPU feature was detected; lengths were checked.
        return unsafe { dot_avx512::<N>(w, xs) };
    }
    xs.map(|x| dot_scalar(w, x))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
// `c` indexes the weights and each of the N activation rows alike.
#[allow(clippy::needless_range_loop)]
unsafe fn dot_avx512<const N: usize>(w: &[bf16], xs: [&[f32]; N]) -> [f32; N] {
    // SAFETY: 32-value chunks of `w` and of each `x` (at least as long).
    unsafe {
        use std::arch::x86_64::*;
        let mut acc0 = [_mm512_setzero_ps(); N];
        let mut acc1 = [_mm512_setzero_ps(); N];
        let wp = w.as_ptr().cast::<u8>();
        for c in 0..w.len() / 32 {
            let at = wp.add(c * 64);
            _mm_prefetch::<_MM_HINT_T0>(at.add(512).cast());
            let lo = _mm256_loadu_si256(at.cast());
            let hi = _mm256_loadu_si256(at.add(32).cast());
            let w0 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(lo)));
            let w1 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)));
            for t in 0..N {
                let x = xs[t].as_ptr().add(c * 32);
                acc0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), acc0[t]);
                acc1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x.add(16)), acc1[t]);
            }
        }
        std::array::from_fn(|t| _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_an_f32_matmul_of_the_rounded_weights() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (70, 320), &dev).unwrap();
        let rounded = w
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let matrix = Bf16Matrix::new(&w).unwrap();
        assert_eq!(matrix.bytes(), 70 * 320 * 2);
        for m in [1, 6] {
            let x = Tensor::randn(0f32, 1.0, (m, 320), &dev).unwrap();
            let want = x.matmul(&rounded.t().unwrap()).unwrap();
            let got = matrix.forward(&x).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-3, "m={m}");
        }
    }
}
