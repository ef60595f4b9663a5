//! Q8_0 products, sixteen rows per panel: the Q8_0 counterpart of
//! `q4k_panel` (see there for why panels) for prompts, and for decode rows
//! the same sums without a packed panel (`multiply_rows` for a few tokens,
//! `dot_rows` for one), so every Q8_0 row has the same bits whatever the
//! batch.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes. The Q8_0-pair row kernel
//! (`q8_0`) offsets the activations by 128; here the sign bit of each
//! weight is flipped (at packing, or as the rows are loaded), so the
//! kernels multiply `w + 128` and correct each block's result by
//! `128 · Σx`, which the activations carry.
//!
//! Q4_0 blocks (`q4_0_panel`) unpack into the same panel, each value `q − 8`
//! stored as `q − 8 + 128`, and share `multiply`.

#[cfg(target_arch = "x86_64")]
use super::q4k_panel::row_offsets;
use super::q4k_panel::{Line, ROWS, TOKENS, by_groups};
use super::q8_0::BLOCK_BYTES;

/// Values per Q8_0 block.
pub const QK: usize = 32;

/// 32 activations quantized like a Q8_0 block, with their sum (the
/// correction for the weights' offset of 128).
#[derive(Clone)]
#[repr(C)]
pub struct Q8Sum {
    pub(super) qs: [i8; QK],
    pub(super) d: f32,
    sum: i32,
}

impl Q8Sum {
    pub fn zeros() -> Self {
        Self {
            qs: [0; QK],
            d: 0.0,
            sum: 0,
        }
    }
}

/// Quantizes `x` (a multiple of 32 values) into `out`.
pub fn quantize(x: &[f32], out: &mut [Q8Sum]) {
    for (block, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = super::abs_max(xs);
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        for (q, v) in block.qs.iter_mut().zip(xs) {
            *q = super::q4k::nearest_i8(v * id);
        }
        block.d = d;
        block.sum = block.qs.iter().map(|&q| q as i32).sum();
    }
}

/// Plain-Rust dot product of one Q8_0 row with these activations: the
/// reference, and what rows outside a whole panel take. It sums as a
/// panel's lane does, block after block `acc = fma(Σw·x, d_w·d_x, acc)`
/// (the integer sum is exact, so its order does not matter), so every
/// kernel here gives the same bits for a row.
pub fn dot_scalar(row: &[u8], x: &[Q8Sum]) -> f32 {
    row.chunks_exact(BLOCK_BYTES)
        .zip(x)
        .fold(0f32, |acc, (b, xb)| block_scalar(b, xb, acc))
}

/// `acc` continued by one block (`dot_scalar`).
fn block_scalar(b: &[u8], xb: &Q8Sum, acc: f32) -> f32 {
    let d = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    let isum: i32 = b[2..]
        .iter()
        .zip(&xb.qs)
        .map(|(&w, &x)| w as i8 as i32 * x as i32)
        .sum();
    (isum as f32).mul_add(d * xb.d, acc)
}

/// One token's activation scales and `128 · Σx` per block, apart from the
/// values, for `dot_rows` to read sixteen blocks at a time.
pub struct Scales {
    d: Vec<f32>,
    offset: Vec<i32>,
}

impl Scales {
    pub fn new(x: &[Q8Sum]) -> Self {
        Self {
            d: x.iter().map(|b| b.d).collect(),
            offset: x.iter().map(|b| 128 * b.sum).collect(),
        }
    }
}

/// Blocks `dot_rows` takes a step: sixteen integer sums in one register.
const DOT_BLOCKS: usize = 16;

/// `R` rows of Q8_0 blocks times one token (`x`, its `scales`): each row
/// summed as a panel's lane is (`dot_scalar`), so bit for bit what
/// `multiply` and `multiply_rows` give for it, but streamed as the row
/// kernels stream (`R` rows side by side, `qmatmul::rows_in_pairs`), not
/// sixteen at once: generation at one sequence is bound by memory, and
/// sixteen streams a thread read 20% slower than two (a 7B Q8_0, tg32 4.7–4.9
/// against 6.1–6.2 tok/s). Per sixteen blocks of a row: one `vpdpbusd` per
/// pair of blocks, a tree of shuffles and adds to one sum per block, the
/// block's float work for all sixteen at once, then the sixteen `fma`s of
/// the row's chain (the order the bits depend on) one by one.
///
/// `R` is 1 or 2 (checked when compiled).
///
/// # Panics
/// If the rows differ in length or hold part of a block, `x` is shorter
/// than a row, or `scales` were not made from `x`'s blocks.
pub fn dot_rows<const R: usize>(rows: [&[u8]; R], x: &[Q8Sum], scales: &Scales) -> [f32; R] {
    const { assert!(R == 1 || R == 2, "one row or two (the chains' lanes)") };
    let blocks = rows[0].len() / BLOCK_BYTES;
    for row in &rows {
        assert_eq!(
            row.len(),
            blocks * BLOCK_BYTES,
            "rows of different lengths or part blocks"
        );
    }
    assert!(x.len() >= blocks, "activations shorter than the rows");
    assert_eq!(scales.d.len(), x.len(), "scales of other activations");
    let whole = blocks / DOT_BLOCKS * DOT_BLOCKS;
    let head = |row: &[u8]| dot_scalar(&row[..whole * BLOCK_BYTES], x);
    #[cfg(target_arch = "x86_64")]
    let mut acc = if Panel::available() {
        // SAFETY: the features were checked; `whole` blocks lie in every
        // row, in `x` and in `scales` (checked above).
        unsafe { dot_rows_avx512(rows, x, scales, whole) }
    } else {
        rows.map(head)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let mut acc = rows.map(head);
    for (acc, row) in acc.iter_mut().zip(rows) {
        for b in whole..blocks {
            *acc = block_scalar(&row[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES], &x[b], *acc);
        }
    }
    acc
}

/// `dot_rows` over the first `blocks` blocks (a multiple of `DOT_BLOCKS`),
/// `R` one or two.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
// `j` and `r` index the pairs of blocks and the rows alike.
#[allow(clippy::needless_range_loop)]
unsafe fn dot_rows_avx512<const R: usize>(
    rows: [&[u8]; R],
    x: &[Q8Sum],
    scales: &Scales,
    blocks: usize,
) -> [f32; R] {
    // SAFETY: the caller checked the features and that `blocks` blocks lie
    // in every row, in `x` and in `scales`.
    unsafe {
        use std::arch::x86_64::*;
        let zero = _mm512_setzero_si512();
        let flip = _mm512_set1_epi32(0x8080_8080u32 as i32);
        // A pair of blocks is 68 bytes: `d₀ qs₀ d₁ qs₁`. Its 64 weights,
        // as words, from the pair's first 64 bytes (a) and the 64 from
        // byte 4 (b).
        let weights = _mm512_set_epi16(
            63, 62, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 16, 15, 14, 13, 12, 11,
            10, 9, 8, 7, 6, 5, 4, 3, 2, 1,
        );
        // The scales (words 0 and 17 of each pair's a) gathered in three
        // rounds of two-source word permutes, block order kept.
        let scales_of_pairs = _mm512_set_epi16(
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 49, 32, 17, 0,
        );
        let fours = _mm512_set_epi16(
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
            0, 0, 0, 0, 0, 0, 0, 0, 35, 34, 33, 32, 3, 2, 1, 0,
        );
        let eights = _mm512_set_epi16(
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, //
            39, 38, 37, 36, 35, 34, 33, 32, 7, 6, 5, 4, 3, 2, 1, 0,
        );
        // Where block i's sum lands after the tree below: lane `natural[i]`.
        let natural = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
        let two = |lo: *const u8, hi: *const u8| {
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_loadu_si256(lo.cast())),
                _mm256_loadu_si256(hi.cast()),
            )
        };
        // Lanes 0 (and 1) carry row 0's (and row 1's) chain.
        let mut acc = _mm_setzero_ps();
        let xp = x.as_ptr();
        for b0 in (0..blocks).step_by(DOT_BLOCKS) {
            let xv: [__m512i; 8] = std::array::from_fn(|j| {
                let pair = xp.add(b0 + 2 * j);
                two(
                    (*pair).qs.as_ptr().cast(),
                    (*pair.add(1)).qs.as_ptr().cast(),
                )
            });
            let dx = _mm512_loadu_ps(scales.d.as_ptr().add(b0));
            let offset = _mm512_loadu_si512(scales.offset.as_ptr().add(b0).cast());
            // Row r's sixteen blocks: their sums as floats, and their scales.
            let vs: [(__m512, __m512); R] = std::array::from_fn(|r| {
                let base = rows[r].as_ptr().add(b0 * BLOCK_BYTES);
                for line in (0..DOT_BLOCKS * BLOCK_BYTES).step_by(64) {
                    super::prefetch_ahead(base.add(line), &[0]);
                }
                let a: [__m512i; 8] = std::array::from_fn(|j| {
                    _mm512_loadu_si512(base.add(2 * j * BLOCK_BYTES).cast())
                });
                // Pair j: block 2j's sums of four in lanes 0-7, 2j + 1's in 8-15.
                let p: [__m512i; 8] = std::array::from_fn(|j| {
                    let b = _mm512_loadu_si512(base.add(2 * j * BLOCK_BYTES + 4).cast());
                    let w = _mm512_permutex2var_epi16(a[j], weights, b);
                    _mm512_dpbusd_epi32(zero, _mm512_xor_si512(w, flip), xv[j])
                });
                let t: [__m512i; 4] = std::array::from_fn(|k| {
                    let (e, o) = (p[2 * k], p[2 * k + 1]);
                    _mm512_add_epi32(_mm512_unpacklo_epi32(e, o), _mm512_unpackhi_epi32(e, o))
                });
                let u: [__m512i; 2] = std::array::from_fn(|m| {
                    let (e, o) = (t[2 * m], t[2 * m + 1]);
                    _mm512_add_epi32(_mm512_unpacklo_epi64(e, o), _mm512_unpackhi_epi64(e, o))
                });
                let sums = _mm512_add_epi32(
                    _mm512_shuffle_i32x4::<0b10_00_10_00>(u[0], u[1]),
                    _mm512_shuffle_i32x4::<0b11_01_11_01>(u[0], u[1]),
                );
                let exact = _mm512_sub_epi32(_mm512_permutexvar_epi32(natural, sums), offset);
                let q: [__m512i; 4] = std::array::from_fn(|k| {
                    _mm512_permutex2var_epi16(a[2 * k], scales_of_pairs, a[2 * k + 1])
                });
                let h = [
                    _mm512_permutex2var_epi16(q[0], fours, q[1]),
                    _mm512_permutex2var_epi16(q[2], fours, q[3]),
                ];
                let d = _mm512_permutex2var_epi16(h[0], eights, h[1]);
                let dw = _mm512_cvtph_ps(_mm512_castsi512_si256(d));
                (_mm512_cvtepi32_ps(exact), _mm512_mul_ps(dw, dx))
            });
            // Both rows' chains in lanes 0 and 1: 128-bit lane l of `lo`
            // holds blocks 4l and 4l + 1 of each, of `hi` 4l + 2 and 4l + 3.
            let (v0, s0) = vs[0];
            let (v1, s1) = vs[R - 1];
            let (vlo, vhi) = (_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
            let (slo, shi) = (_mm512_unpacklo_ps(s0, s1), _mm512_unpackhi_ps(s0, s1));
            // Written out: a loop over the lanes compiled to branches.
            macro_rules! lane {
                ($extract:expr) => {
                    for (v, s) in [(vlo, slo), (vhi, shi)] {
                        let (v, s) = ($extract(v), $extract(s));
                        acc = _mm_fmadd_ps(v, s, acc);
                        acc = _mm_fmadd_ps(_mm_movehl_ps(v, v), _mm_movehl_ps(s, s), acc);
                    }
                };
            }
            lane!(_mm512_castps512_ps128);
            lane!(_mm512_extractf32x4_ps::<1>);
            lane!(_mm512_extractf32x4_ps::<2>);
            lane!(_mm512_extractf32x4_ps::<3>);
        }
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), acc);
        std::array::from_fn(|r| out[r])
    }
}

/// Lines per unpacked block: 8 of weights (groups of four values), 1 of `d`.
const LINES: usize = 9;
const D_AT: usize = 8;

/// Sixteen rows of Q8_0 (or Q4_0) blocks: for block `b` and group `g`, line
/// `b·LINES + g` holds, in lane `r`, values `4g..4g+4` of row `r` plus 128.
#[derive(Default)]
pub struct Panel {
    lines: Vec<Line>,
    blocks: usize,
}

impl Panel {
    /// Whether this CPU has the instructions (`q4k::have_vnni`).
    pub fn available() -> bool {
        super::q4k::have_vnni()
    }

    /// Unpacks the `ROWS` rows of Q8_0 blocks that start at `rows[0]`,
    /// `row_bytes` apart.
    ///
    /// # Panics
    /// If `rows` holds fewer than `ROWS` rows, or the CPU lacks the
    /// instructions (check `available` first).
    pub fn pack(&mut self, rows: &[u8], row_bytes: usize) {
        self.pack_format::<false>(rows, row_bytes)
    }

    /// `pack` for Q4_0 blocks (`q4_0`): each value `q − 8` is stored as
    /// `q − 8 + 128`, the offset a Q8_0 weight gets, so `multiply` and its
    /// `128 · Σx` correction are the same.
    pub fn pack_q4_0(&mut self, rows: &[u8], row_bytes: usize) {
        self.pack_format::<true>(rows, row_bytes)
    }

    fn pack_format<const Q4: bool>(&mut self, rows: &[u8], row_bytes: usize) {
        assert!(Self::available(), "the Q8_0/Q4_0 panel needs AVX-512 VNNI");
        let block_bytes = block_bytes::<Q4>();
        assert!(rows.len() >= ROWS * row_bytes, "fewer than {ROWS} rows");
        assert!(row_bytes.is_multiple_of(block_bytes) && row_bytes * ROWS < i32::MAX as usize);
        self.blocks = row_bytes / block_bytes;
        self.lines.resize(self.blocks * LINES, Line([0; 64]));
        // SAFETY: the features were checked above; the reads stay inside
        // `rows` (checked long enough) and the writes inside `self.lines`.
        unsafe { pack_avx512::<Q4>(rows, row_bytes, self.blocks, &mut self.lines) }
    }

    /// `out[t·stride + r] = row r · token t` for every token of `xs` (each
    /// `blocks` blocks) and the `ROWS` rows of the last `pack`.
    pub fn multiply(&self, xs: &[&[Q8Sum]], out: &mut [f32], stride: usize) {
        by_groups(
            xs,
            self.blocks,
            out,
            stride,
            // SAFETY: `by_groups` checked the features, the activations'
            // lengths and the output's size.
            |four, out| unsafe { self.multiply_avx512::<TOKENS>(four, out, stride) },
            |one, out| unsafe { self.multiply_avx512::<1>(one, out, stride) },
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    // `t` indexes the accumulators and the tokens alike.
    #[allow(clippy::needless_range_loop)]
    unsafe fn multiply_avx512<const N: usize>(
        &self,
        xs: &[&[Q8Sum]],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the caller checked the features, that each `xs[t]` holds
        // `self.blocks` blocks and that `out` reaches row `N - 1`'s lanes.
        unsafe {
            use std::arch::x86_64::*;
            let lines = self.lines.as_ptr();
            let mut facc = [_mm512_setzero_ps(); N];
            // Two blocks at a time where possible: their accumulators are
            // independent, so 2N `vpdpbusd` chains hide the latency.
            let mut b = 0;
            while b + 2 <= self.blocks {
                blocks::<2, N>(lines.add(b * LINES), xs, b, &mut facc);
                b += 2;
            }
            if b < self.blocks {
                blocks::<1, N>(lines.add(b * LINES), xs, b, &mut facc);
            }
            for t in 0..N {
                _mm512_storeu_ps(out.as_mut_ptr().add(t * stride), facc[t]);
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn multiply_avx512<const N: usize>(&self, _: &[&[Q8Sum]], _: &mut [f32], _: usize) {
        unreachable!("available() is false off x86-64")
    }
}

/// Adds blocks `b..b + H` (lines from `p`) of N tokens to `facc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
#[inline]
// `t` indexes the accumulators and the tokens alike.
#[allow(clippy::needless_range_loop)]
unsafe fn blocks<const H: usize, const N: usize>(
    p: *const Line,
    xs: &[&[Q8Sum]],
    b: usize,
    facc: &mut [std::arch::x86_64::__m512; N],
) {
    // SAFETY: the caller guarantees the features, that `p` points at H
    // blocks' lines and that each `xs[t]` holds blocks `b..b + H`.
    unsafe {
        use std::arch::x86_64::*;
        let mut iacc = [[_mm512_setzero_si512(); N]; H];
        for g in 0..8 {
            for h in 0..H {
                let w = _mm512_load_si512(p.add(h * LINES + g).cast());
                for t in 0..N {
                    let x = xs[t][b + h].qs.as_ptr().add(4 * g);
                    let x4 = _mm512_set1_epi32(std::ptr::read_unaligned(x.cast::<i32>()));
                    iacc[h][t] = _mm512_dpbusd_epi32(iacc[h][t], w, x4);
                }
            }
        }
        for h in 0..H {
            let d = _mm512_load_ps(p.add(h * LINES + D_AT).cast());
            for t in 0..N {
                let xb = &xs[t][b + h];
                let exact = _mm512_sub_epi32(iacc[h][t], _mm512_set1_epi32(128 * xb.sum));
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(xb.d));
                facc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, facc[t]);
            }
        }
    }
}

/// Tokens one pass of `multiply_rows` takes at most: their accumulators,
/// the block's eight lines and the temporaries fill the 32 registers.
const ROW_TOKENS: usize = 8;

/// `out[t·stride + r] = row r · token t` for every token of `xs` (each
/// `blocks` blocks) and the `ROWS` rows of Q8_0 blocks that start at
/// `rows[0]`, `row_bytes` apart: bit for bit what `pack` then `multiply`
/// give, without the panel. Each block's sixteen rows are loaded as they
/// lie and transposed into the panel's lines in registers, once per pass
/// of up to `ROW_TOKENS` tokens, and the lines meet the tokens exactly as
/// in `multiply` (the same integer sums, the same float operations in the
/// same order).
///
/// Why: decode rows then take the prompts' sums, so a Q8_0 row's result
/// no longer depends on whether it was a prompt position or a generated
/// token, and a few tokens pay neither the panel's write and re-read nor
/// the row kernel's per-token float work. The former row kernel (`q8_0`)
/// converts, scales and accumulates every four products of every token
/// (sixteen lanes of one row); here one lane is one row, so each token's
/// float work is once per block of 32 values for sixteen rows.
///
/// # Panics
/// If `rows` holds fewer than `ROWS` rows of `row_bytes` (whole Q8_0
/// blocks), a token holds fewer blocks, `out` does not reach the last
/// token's sixteen outputs, or the CPU lacks the instructions (check
/// `Panel::available` first).
pub fn multiply_rows(
    rows: &[u8],
    row_bytes: usize,
    xs: &[&[Q8Sum]],
    out: &mut [f32],
    stride: usize,
) {
    assert!(Panel::available(), "the Q8_0 panel needs AVX-512 VNNI");
    assert!(row_bytes.is_multiple_of(BLOCK_BYTES));
    let group = row_bytes.checked_mul(ROWS);
    assert!(
        group.is_some_and(|bytes| rows.len() >= bytes),
        "fewer than {ROWS} rows"
    );
    let blocks = row_bytes / BLOCK_BYTES;
    for x in xs {
        assert!(x.len() >= blocks, "activations shorter than the rows");
    }
    assert!(xs.is_empty() || out.len() >= (xs.len() - 1) * stride + ROWS);
    let mut t = 0;
    while t < xs.len() {
        let (tokens, out) = (&xs[t..], &mut out[t * stride..]);
        let first = t == 0;
        // SAFETY: checked above: the features, sixteen whole rows, every
        // token's blocks, and `out` up to the last token's sixteen lanes.
        t += unsafe {
            match tokens.len() {
                ROW_TOKENS.. => {
                    rows_avx512::<ROW_TOKENS>(rows, row_bytes, blocks, tokens, out, stride, first)
                }
                4..ROW_TOKENS => {
                    rows_avx512::<4>(rows, row_bytes, blocks, tokens, out, stride, first)
                }
                2..4 => rows_avx512::<2>(rows, row_bytes, blocks, tokens, out, stride, first),
                _ => rows_avx512::<1>(rows, row_bytes, blocks, tokens, out, stride, first),
            }
        };
    }
}

/// `multiply_rows` for the first `N` tokens of `xs` (at most eight);
/// returns `N`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn rows_avx512<const N: usize>(
    rows: &[u8],
    row_bytes: usize,
    blocks: usize,
    xs: &[&[Q8Sum]],
    out: &mut [f32],
    stride: usize,
    first_pass: bool,
) -> usize {
    // SAFETY: the caller checked the features, that `rows` holds ROWS rows
    // of `blocks` blocks, that `xs` holds N tokens of `blocks` blocks, and
    // that `out` reaches token N − 1's sixteen lanes.
    unsafe {
        use std::arch::x86_64::*;
        let flip = _mm512_set1_epi32(0x8080_8080u32 as i32);
        let zero = _mm512_setzero_si512();
        // Quad-words of two 128-bit-lane transposes that make the lines.
        let low = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
        let high = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
        let base = rows.as_ptr();
        let tokens: [*const Q8Sum; N] = std::array::from_fn(|t| xs[t].as_ptr());
        let mut facc = [_mm512_setzero_ps(); N];
        // The next group into L2 during the first pass over this one (the
        // later passes, for more than eight tokens, find it there already):
        // eight Q8_0 decode rows on the 7B went from 35.6–38.0 to 37.0–41.6
        // tok/s (four interleaved rounds, faster in each).
        let group_bytes = ROWS * row_bytes;
        let slice = ROWS * BLOCK_BYTES;
        for b in 0..blocks {
            let at = b * BLOCK_BYTES;
            if at % 64 < BLOCK_BYTES {
                super::q4k_panel::prefetch_rows(rows, row_bytes, at, 1);
            }
            if first_pass {
                super::q4k_panel::prefetch_next_group(
                    rows,
                    group_bytes,
                    b * slice,
                    (b + 1) * slice,
                );
            }
            let row = base.add(at);
            // Rows k and k + 8, dwords 0-7 of each block's 32 weights.
            let z: [__m512i; 8] = std::array::from_fn(|k| {
                let a = _mm256_loadu_si256(row.add(k * row_bytes + 2).cast());
                let c = _mm256_loadu_si256(row.add((k + 8) * row_bytes + 2).cast());
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), c)
            });
            // An 8 × 8 dword transpose in each 256-bit half: after it, line g
            // holds dword g of rows 0-15 in lanes 0-15, `pack`'s line g.
            // t[i]: rows 2m and 2m + 1 (m = i / 2) interleaved, low dwords
            // of each 128-bit lane for even i, high for odd.
            let t: [__m512i; 8] = std::array::from_fn(|i| {
                let (a, b) = (z[i & !1], z[i | 1]);
                if i % 2 == 0 {
                    _mm512_unpacklo_epi32(a, b)
                } else {
                    _mm512_unpackhi_epi32(a, b)
                }
            });
            // u[g] (g < 4): rows 0-3 and 8-11; u[g + 4]: rows 4-7 and 12-15;
            // dwords g and g + 4 in alternate 128-bit lanes.
            let u: [__m512i; 8] = std::array::from_fn(|i| {
                let first = (i & 4) + i % 4 / 2;
                let (a, b) = (t[first], t[first + 2]);
                if i % 2 == 0 {
                    _mm512_unpacklo_epi64(a, b)
                } else {
                    _mm512_unpackhi_epi64(a, b)
                }
            });
            let line: [__m512i; 8] = std::array::from_fn(|g| {
                let idx = if g < 4 { low } else { high };
                let w = _mm512_permutex2var_epi64(u[g % 4], idx, u[g % 4 + 4]);
                _mm512_xor_si512(w, flip)
            });
            // The sixteen f16 scales through general registers, four to a
            // quad-word: a gather of them held up the loop (its result was
            // 12% of the samples at eight tokens).
            let h =
                |r: usize| std::ptr::read_unaligned(row.add(r * row_bytes).cast::<u16>()) as u64;
            let q = |r: usize| h(r) | h(r + 1) << 16 | h(r + 2) << 32 | h(r + 3) << 48;
            let lo = _mm_insert_epi64::<1>(_mm_cvtsi64_si128(q(0) as i64), q(4) as i64);
            let hi = _mm_insert_epi64::<1>(_mm_cvtsi64_si128(q(8) as i64), q(12) as i64);
            let d = _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi));
            // Each token written out, so its accumulator stays in a
            // register (a loop over them kept the accumulators in memory).
            macro_rules! token {
                ($($t:literal)*) => {$(
                    if $t < N {
                        let xb = &*tokens[$t % N].add(b);
                        let q = xb.qs.as_ptr().cast::<i32>();
                        let x = |g: usize| _mm512_set1_epi32(std::ptr::read_unaligned(q.add(g)));
                        // Two chains, so fewer tokens still overlap the latency.
                        let mut even = _mm512_dpbusd_epi32(zero, line[0], x(0));
                        let mut odd = _mm512_dpbusd_epi32(zero, line[1], x(1));
                        for g in (2..8).step_by(2) {
                            even = _mm512_dpbusd_epi32(even, line[g], x(g));
                            odd = _mm512_dpbusd_epi32(odd, line[g + 1], x(g + 1));
                        }
                        let iacc = _mm512_add_epi32(even, odd);
                        let exact = _mm512_sub_epi32(iacc, _mm512_set1_epi32(128 * xb.sum));
                        let scale = _mm512_mul_ps(d, _mm512_set1_ps(xb.d));
                        facc[$t % N] =
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, facc[$t % N]);
                    }
                )*};
            }
            token!(0 1 2 3 4 5 6 7);
        }
        for (t, facc) in facc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(t * stride), *facc);
        }
        N
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn rows_avx512<const N: usize>(
    _: &[u8],
    _: usize,
    _: usize,
    _: &[&[Q8Sum]],
    _: &mut [f32],
    _: usize,
    _: bool,
) -> usize {
    unreachable!("available() is false off x86-64")
}

/// Bytes of a Q8_0 block, or with `Q4` of a Q4_0 one.
const fn block_bytes<const Q4: bool>() -> usize {
    if Q4 {
        super::q4_0::BLOCK_BYTES
    } else {
        BLOCK_BYTES
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn pack_avx512<const Q4: bool>(
    rows: &[u8],
    row_bytes: usize,
    blocks: usize,
    lines: &mut [Line],
) {
    // SAFETY: the caller checked the features, that `rows` holds ROWS rows
    // of `row_bytes`, and that `lines` holds `blocks · LINES` lines.
    unsafe {
        use std::arch::x86_64::*;
        let index = row_offsets(row_bytes);
        let gather = |at: usize| _mm512_i32gather_epi32::<1>(index, rows.as_ptr().add(at).cast());
        let flip = _mm512_set1_epi32(0x8080_8080u32 as i32);
        let nib = _mm512_set1_epi32(0x0F0F_0F0F);
        // q − 8 + 128 for a Q4_0 value q (at most 135: no byte carries over).
        let q4_offset = _mm512_set1_epi32(0x7878_7878);
        let out = lines.as_mut_ptr();
        for b in 0..blocks {
            let at = b * block_bytes::<Q4>();
            // A 64-byte line holds two blocks or more: one prefetch a line.
            if at % 64 < block_bytes::<Q4>() {
                super::q4k_panel::prefetch_rows(rows, row_bytes, at, 1);
            }
            let p = out.add(b * LINES);
            for g in 0..8 {
                let w = if Q4 {
                    // Values 4g..4g+4: low nibbles of qs[4g..] for g < 4,
                    // high nibbles of qs[4(g − 4)..] after.
                    let v = gather(at + 2 + 4 * (g % 4));
                    let v = if g < 4 { v } else { _mm512_srli_epi32::<4>(v) };
                    _mm512_add_epi32(_mm512_and_si512(v, nib), q4_offset)
                } else {
                    _mm512_xor_si512(gather(at + 2 + 4 * g), flip)
                };
                _mm512_store_si512(p.add(g).cast(), w);
            }
            let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(gather(at)));
            _mm512_store_ps(p.add(D_AT).cast(), d);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_avx512<const Q4: bool>(_: &[u8], _: usize, _: usize, _: &mut [Line]) {
    unreachable!("available() is false off x86-64")
}

#[cfg(test)]
mod tests {
    use super::super::qmatmul::check_panel;
    use super::*;

    /// `multiply_rows` gives `pack` then `multiply`'s bits for every count
    /// of tokens (passes of eight, four, two and one), and so do `dot_rows`
    /// (one row and two) and `dot_scalar` for one token, on 33 blocks a row
    /// (two steps of `dot_rows`, then one block alone),
    /// sixteen rows from row 3 of 19, random and extreme weights, and
    /// writes nothing past its sixteen rows.
    #[test]
    fn multiplying_the_rows_in_place_gives_the_panels_bits() {
        if !Panel::available() {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        }
        let (blocks, stride) = (33, ROWS + 5);
        let cols = blocks * QK;
        let row_bytes = blocks * BLOCK_BYTES;
        let w = candle_core::Tensor::from_vec(
            super::super::test_values(19 * cols, 21),
            (19, cols),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let q =
            candle_core::quantized::QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q8_0)
                .unwrap();
        let random = q.data().unwrap().into_owned();
        let mut extremes = random.clone();
        for (i, block) in extremes.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            if i % 3 == 0 {
                block[2..].fill([0x7Fu8, 0x80, 0xFF][i % 9 / 3]);
            }
        }
        let mut x = super::super::test_values(13 * cols, 22);
        x[..cols].fill(-1.0);
        let mut xq = vec![Q8Sum::zeros(); 13 * blocks];
        quantize(&x, &mut xq);
        let all: Vec<&[Q8Sum]> = xq.chunks_exact(blocks).collect();
        for bytes in [&random, &extremes] {
            let rows = &bytes[3 * row_bytes..];
            let mut panel = Panel::default();
            panel.pack(rows, row_bytes);
            for tokens in [1, 2, 3, 5, 7, 8, 11, 13] {
                let xs = &all[..tokens];
                let mut want = vec![f32::NAN; tokens * stride];
                panel.multiply(xs, &mut want, stride);
                let mut got = vec![f32::NAN; tokens * stride];
                multiply_rows(rows, row_bytes, xs, &mut got, stride);
                if tokens == 1 {
                    let scales = Scales::new(xs[0]);
                    let row = |r: usize| &rows[r * row_bytes..(r + 1) * row_bytes];
                    for r in 0..ROWS {
                        let [one] = dot_rows([row(r)], xs[0], &scales);
                        let [a, b] = dot_rows([row(r), row(ROWS - 1 - r)], xs[0], &scales);
                        let scalar = dot_scalar(row(r), xs[0]);
                        let want = [want[r], want[r], want[ROWS - 1 - r], want[r]];
                        for (g, w) in [one, a, b, scalar].into_iter().zip(want) {
                            assert_eq!(g.to_bits(), w.to_bits(), "row {r}: {g} vs {w}");
                        }
                    }
                }
                for t in 0..tokens {
                    assert!(got[t * stride + ROWS].is_nan(), "wrote past the rows");
                    for r in 0..ROWS {
                        let (g, w) = (got[t * stride + r], want[t * stride + r]);
                        assert!(w.is_finite() && w != 0.0, "token {t} row {r}: {w}");
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{tokens} tokens: token {t} row {r}"
                        );
                    }
                }
            }
        }
    }

    /// 17 blocks a row (pairs of blocks, then one alone); extreme blocks of
    /// weights all 127, all −128, all −1, 0 or mixed.
    #[test]
    fn a_panel_computes_what_the_scalar_dot_does() {
        let extreme = |i: usize, block: &mut [u8]| {
            block[2..].fill([0x7Fu8, 0x80, 0xFF, 0x00, 0x5A][i % 5]);
            block[..2].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
        };
        check_panel::<Panel>(
            candle_core::quantized::GgmlDType::Q8_0,
            17 * QK,
            extreme,
            dot_scalar,
        );
    }
}
