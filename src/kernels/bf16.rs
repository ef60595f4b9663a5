//! bf16 weight matrices on the CPU, multiplied by f32 activations.
//!
//! candle's CPU matmul has no bf16 kernel, and converting a 7B bf16
//! checkpoint to f32 needs 29 GB. Generation is bound by memory bandwidth,
//! so reading 2 bytes per weight and widening in registers (a bf16 is the
//! top half of an f32: a shift) is both the smallest and the fastest way
//! to run it, and its result is exactly f32's on the same weights.
//! Activations, norms and attention stay f32.
//!
//! Prompts are compute-bound instead: on CPUs with AVX512_BF16 prompt
//! positions (however many, see `RowClass`) go through `vdpbf16ps` (32
//! multiply-adds of bf16 pairs per instruction, twice the f32 rate), four
//! weight rows by four tokens per pass. That rounds the activations to bf16
//! (8 significant bits), so a prompt's products differ from f32's by up to
//! about 2⁻⁸ of the sum of the magnitudes of their terms (tested below);
//! generation stays exact.

use super::RowClass;
use super::qmatmul::{RowDot, bands, in_tiles, rows_in_pairs};
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
        self.forward_as(x, RowClass::Prompt)
    }

    /// Whether `Prompt` rows take other kernels than `Rows` rows here.
    pub fn has_prompt_kernel(&self) -> bool {
        self.cols.is_multiple_of(32) && have_avx512_bf16()
    }

    /// `x @ w.T` for `x: [m, in]` through the kernels of `class`, in f32:
    /// `Rows` is exactly f32's result.
    pub fn forward_as(&self, x: &Tensor, class: RowClass) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.cols {
            bail!("input has {k} features, the matrix {}", self.cols);
        }
        let out = super::with_f32(x, |xs| Ok(self.product(xs, m, class)))?;
        Ok(Tensor::from_vec(out, (m, self.rows), &Device::Cpu)?)
    }

    /// `[m, rows]` for the `m × cols` activations `xs` (see `forward_as`).
    fn product(&self, xs: &[f32], m: usize, class: RowClass) -> Vec<f32> {
        let k = self.cols;
        let w = self.values();
        let row = |r: usize| &w[r * k..(r + 1) * k];
        if class == RowClass::Prompt && self.has_prompt_kernel() {
            return self.prompt_product(xs, m);
        }
        let simd = have_avx512_rows(k);
        let rows = Rows { w, k, simd };
        let run = |xs: &[f32]| {
            if m == 1 {
                rows_in_pairs(
                    self.rows,
                    |r| rows.dot_n(r, [xs])[0],
                    |a, b| rows.dot2([row(a), row(b)], xs),
                )
            } else {
                let xr: Vec<&[f32]> = xs.chunks_exact(k).collect();
                in_tiles(self.rows, &xr, &rows)
            }
        };
        if !simd {
            return run(xs);
        }
        // The row kernel's activation order (see `dot_avx512`), made once
        // per product into this thread's reused buffer: generation runs
        // seven bf16 products per layer and token.
        thread_local! {
            static SPLIT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SPLIT.with_borrow_mut(|split| {
            split_pairs(xs, split);
            run(split)
        })
    }
}

/// Whether this CPU has AVX512_BF16 (checked once).
fn have_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

impl Bf16Matrix {
    /// `[m, rows]` for the `m × cols` activations `xs`, rounded to bf16
    /// once, through `dot_dpbf16`: bands of weight rows (in L2), each swept
    /// once per four tokens, four rows at a time. Only called when
    /// `have_avx512_bf16()` and `cols % 32 == 0`.
    fn prompt_product(&self, xs: &[f32], m: usize) -> Vec<f32> {
        let k = self.cols;
        let xb: Vec<bf16> = xs.iter().map(|&v| bf16::from_f32(v)).collect();
        let x = |t: usize| &xb[t * k..(t + 1) * k];
        let w = self.values();
        let row = |r: usize| &w[r * k..(r + 1) * k];
        // A tile of ROWS × TOKENS accumulators (16 of the 32 vector
        // registers), each weight load used TOKENS times and each
        // activation load ROWS times; rows and tokens left over take
        // single-row or single-token passes.
        const ROWS: usize = 4;
        const TOKENS: usize = 4;
        bands(self.rows, m, |rows, band, width| {
            let mut put = |r: usize, t: usize, v: f32| band[t * width + r - rows.start] = v;
            let mut t = 0;
            while t < m {
                let whole = t + TOKENS <= m;
                let xs: [&[bf16]; TOKENS] = std::array::from_fn(|j| x((t + j).min(m - 1)));
                let mut r = rows.start;
                while r < rows.end {
                    let tile = r + ROWS <= rows.end;
                    let ws: [&[bf16]; ROWS] =
                        std::array::from_fn(|i| row((r + i).min(rows.end - 1)));
                    // SAFETY: `prompt_product` runs only on AVX512_BF16 CPUs
                    // and with rows of a multiple of 32 values.
                    unsafe {
                        match (tile, whole) {
                            (true, true) => {
                                let o = dot_dpbf16::<ROWS, TOKENS>(ws, xs);
                                for (i, v) in o.into_iter().enumerate() {
                                    (0..TOKENS).for_each(|j| put(r + i, t + j, v[j]));
                                }
                            }
                            (true, false) => {
                                let o = dot_dpbf16::<ROWS, 1>(ws, [xs[0]]);
                                (0..ROWS).for_each(|i| put(r + i, t, o[i][0]));
                            }
                            (false, true) => {
                                let o = dot_dpbf16::<1, TOKENS>([ws[0]], xs);
                                (0..TOKENS).for_each(|j| put(r, t + j, o[0][j]));
                            }
                            (false, false) => put(r, t, dot_dpbf16::<1, 1>([ws[0]], [xs[0]])[0][0]),
                        }
                    }
                    r += if tile { ROWS } else { 1 };
                }
                t += if whole { TOKENS } else { 1 };
            }
        })
    }
}

/// `R` weight rows times `N` token rows, all bf16 of one length (a
/// multiple of 32): `vdpbf16ps` multiplies 32 bf16 pairs and adds them
/// into 16 f32 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::needless_range_loop)]
unsafe fn dot_dpbf16<const R: usize, const N: usize>(
    rows: [&[bf16]; R],
    xs: [&[bf16]; N],
) -> [[f32; N]; R] {
    // SAFETY: 32-value chunks of rows and activations, all of length `k`
    // (checked); the caller guarantees the CPU features.
    unsafe {
        use std::arch::x86_64::*;
        let k = rows[0].len();
        assert!(rows.iter().all(|r| r.len() == k) && xs.iter().all(|x| x.len() == k));
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        for c in (0..k).step_by(32) {
            let w: [__m512bh; R] = std::array::from_fn(|r| {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    rows[r].as_ptr().add(c).cast(),
                ))
            });
            for t in 0..N {
                let x = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    xs[t].as_ptr().add(c).cast(),
                ));
                for r in 0..R {
                    acc[r][t] = _mm512_dpbf16_ps(acc[r][t], w[r], x);
                }
            }
        }
        std::array::from_fn(|r| std::array::from_fn(|t| _mm512_reduce_add_ps(acc[r][t])))
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_dpbf16<const R: usize, const N: usize>(
    _rows: [&[bf16]; R],
    _xs: [&[bf16]; N],
) -> [[f32; N]; R] {
    unreachable!("have_avx512_bf16() is false off x86-64")
}

pub fn dot_scalar(w: &[bf16], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(w, x)| w.to_f32() * x).sum()
}

/// Whether rows of `k` values take `dot_avx512` (checked once per product).
fn have_avx512_rows(k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        k.is_multiple_of(32) && std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = k;
        false
    }
}

/// Activations in the order `dot_avx512` reads them: in every 32 values,
/// the 16 at even positions, then the 16 at odd ones, written into `out`.
/// As large as the input: small for generation; a prompt takes this path
/// only on CPUs without AVX512_BF16.
fn split_pairs(xs: &[f32], out: &mut Vec<f32>) {
    out.clear();
    for chunk in xs.chunks_exact(32) {
        out.extend(chunk.iter().step_by(2));
        out.extend(chunk.iter().skip(1).step_by(2));
    }
}

/// The bf16 rows of a matrix, `k` values each; with `simd`, through
/// `dot_avx512` on activations in `split_pairs` order, else in plain
/// order through `dot_scalar`.
struct Rows<'a> {
    w: &'a [bf16],
    k: usize,
    simd: bool,
}

impl Rows<'_> {
    /// Two rows times one token (generation): two streams in flight.
    fn dot2(&self, ws: [&[bf16]; 2], x: &[f32]) -> [f32; 2] {
        #[cfg(target_arch = "x86_64")]
        if self.simd {
            // SAFETY: `simd` means AVX-512F was detected and rows are whole
            // 32-value chunks; `product` gives every row and token `k` values.
            return unsafe { dot_avx512::<2, 1>(ws, [x]) }.map(|[v]| v);
        }
        ws.map(|w| dot_scalar(w, x))
    }
}

impl RowDot for Rows<'_> {
    type X = [f32];
    fn dot_n<const N: usize>(&self, r: usize, xs: [&[f32]; N]) -> [f32; N] {
        let w = &self.w[r * self.k..(r + 1) * self.k];
        #[cfg(target_arch = "x86_64")]
        if self.simd {
            // SAFETY: as in `dot2`.
            return unsafe { dot_avx512::<1, N>([w], xs) }[0];
        }
        xs.map(|x| dot_scalar(w, x))
    }
}

/// `R` rows (of one length, whole 32-value chunks) times `N` tokens' f32
/// activations in `split_pairs` order: `out[r][t]`. Each 64-byte load of
/// 32 bf16s holds value pairs in its 32-bit lanes; a bf16 is the top half
/// of an f32, so the lanes shifted left 16 bits are the even values in f32
/// and the lanes with the low half cleared are the odd ones: two
/// operations widen 32 values (zero-extending two halves took four). Every
/// product is exact and summed in f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
// `c`, `r` and `t` index the weights and the activation rows alike.
#[allow(clippy::needless_range_loop)]
unsafe fn dot_avx512<const R: usize, const N: usize>(
    ws: [&[bf16]; R],
    xs: [&[f32]; N],
) -> [[f32; N]; R] {
    // SAFETY: 32-value chunks of each row and of each `x`, all checked to
    // be at least as long as the first row.
    unsafe {
        use std::arch::x86_64::*;
        let k = ws[0].len();
        assert!(ws.iter().all(|w| w.len() == k) && xs.iter().all(|x| x.len() >= k));
        let high = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
        let mut acc0 = [[_mm512_setzero_ps(); N]; R];
        let mut acc1 = [[_mm512_setzero_ps(); N]; R];
        for c in 0..k / 32 {
            for r in 0..R {
                let at = ws[r].as_ptr().cast::<u8>().add(c * 64);
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(super::PREFETCH_BYTES).cast());
                let v = _mm512_loadu_si512(at.cast());
                let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                let odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));
                for t in 0..N {
                    let x = xs[t].as_ptr().add(c * 32);
                    acc0[r][t] = _mm512_fmadd_ps(even, _mm512_loadu_ps(x), acc0[r][t]);
                    acc1[r][t] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x.add(16)), acc1[r][t]);
                }
            }
        }
        std::array::from_fn(|r| {
            std::array::from_fn(|t| _mm512_reduce_add_ps(_mm512_add_ps(acc0[r][t], acc1[r][t])))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random `[n, k]` matrix in bf16, and its values in f32.
    fn random_matrix(n: usize, k: usize) -> (Bf16Matrix, Tensor) {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let rounded = w.to_dtype(DType::BF16).unwrap();
        let rounded = rounded.to_dtype(DType::F32).unwrap();
        (Bf16Matrix::new(&w).unwrap(), rounded)
    }

    /// No rows in, no rows out, through both classes' kernels (a step
    /// whose rows are all decode rows has an empty prompt part).
    #[test]
    fn an_empty_input_gives_an_empty_product() {
        let (matrix, _) = random_matrix(37, 64);
        let x = Tensor::zeros((0, 64), DType::F32, &Device::Cpu).unwrap();
        for class in [RowClass::Rows, RowClass::Prompt] {
            let out = matrix.forward_as(&x, class).unwrap();
            assert_eq!(out.dims(), [0, 37], "{class:?}");
        }
    }

    /// The row kernels (generation's) against f32's product.
    #[test]
    fn matches_an_f32_matmul_of_the_rounded_weights() {
        let dev = Device::Cpu;
        // 71 rows: a task of 64 and one of 7 (generation's odd row out);
        // 320 columns take the AVX-512 kernel, 100 the scalar one.
        for k in [320, 100] {
            let (matrix, rounded) = random_matrix(71, k);
            assert_eq!(matrix.bytes(), 71 * k * 2);
            for m in [1, 6] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let want = x.matmul(&rounded.t().unwrap()).unwrap();
                let got = matrix.forward_as(&x, RowClass::Rows).unwrap();
                let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
                assert!(diff.to_scalar::<f32>().unwrap() < 1e-3, "k={k} m={m}");
            }
        }
    }

    /// The AVX-512 row kernel on `split_pairs` activations against the
    /// scalar kernel on plain ones (on CPUs that have AVX-512F).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_row_kernel_equals_the_scalar_one() {
        if !have_avx512_rows(32) {
            eprintln!("no AVX-512F on this CPU: nothing to compare");
            return;
        }
        let k = 320;
        let (matrix, _) = random_matrix(3, k);
        let w = matrix.values();
        let x = crate::kernels::test_values(2 * k, 5);
        for r in 0..3 {
            let row = &w[r * k..(r + 1) * k];
            for t in 0..2 {
                let plain = &x[t * k..(t + 1) * k];
                let want = dot_scalar(row, plain);
                let mut split = Vec::new();
                split_pairs(plain, &mut split);
                // SAFETY: AVX-512F was detected; the row and token hold k values.
                let got = unsafe { dot_avx512::<1, 1>([row], [&split]) }[0][0];
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
    }

    /// Prompts: with AVX512_BF16 the activations are rounded to bf16, and
    /// each product stays within 2⁻⁸ of the sum of its terms' magnitudes
    /// of f32's (the stated tolerance); rows and tokens that do not fill a
    /// tile of four (71 rows, 23 tokens) take the single-row and
    /// single-token passes.
    #[test]
    fn prompts_stay_within_the_stated_tolerance_of_f32() {
        let dev = Device::Cpu;
        let k = 320;
        let (matrix, rounded) = random_matrix(71, k);
        for m in [1, 5, 23] {
            prompt_within_tolerance(
                &matrix,
                &rounded,
                &Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap(),
            );
        }
    }

    fn prompt_within_tolerance(matrix: &Bf16Matrix, rounded: &Tensor, x: &Tensor) {
        let want = x.matmul(&rounded.t().unwrap()).unwrap();
        let magnitude = x
            .abs()
            .unwrap()
            .matmul(&rounded.abs().unwrap().t().unwrap())
            .unwrap();
        let got = matrix.forward(x).unwrap();
        let excess = ((got - &want).unwrap().abs().unwrap() - (magnitude / 256.0).unwrap())
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(excess <= 0.0, "past the tolerance by {excess}");
    }

    /// Generation rows give exactly f32's result, bitwise the same however
    /// many rows share the pass; prompt rows are the same for any count.
    #[test]
    fn each_row_is_bitwise_independent_of_the_batch() {
        let dev = Device::Cpu;
        let (matrix, _) = random_matrix(71, 320);
        let x = Tensor::randn(0f32, 1.0, (37, 320), &dev).unwrap();
        let bits = |t: Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.into_iter().map(f32::to_bits).collect()
        };
        let rows = |from: usize, m: usize, class| {
            bits(
                matrix
                    .forward_as(&x.narrow(0, from, m).unwrap(), class)
                    .unwrap(),
            )
        };
        let alone: Vec<Vec<u32>> = (0..37).map(|i| rows(i, 1, RowClass::Rows)).collect();
        for m in [2, 3, 4, 5, 16, 37] {
            for (i, row) in rows(0, m, RowClass::Rows).chunks(71).enumerate() {
                assert_eq!(row, alone[i], "row {i} of {m}");
            }
        }
        let prompt = rows(0, 37, RowClass::Prompt);
        for m in [1, 2, 5, 16] {
            assert_eq!(
                rows(0, m, RowClass::Prompt)[..],
                prompt[..m * 71],
                "{m} prompt rows"
            );
        }
        assert_eq!(rows(7, 1, RowClass::Prompt)[..], prompt[7 * 71..8 * 71]);
    }
}
