//! The Q8_0-pair row kernel with AVX-512 VNNI (see `q4k` for why this
//! crate has its own kernels): Q4_0's generation kernel (`Q4`, `q4_0`),
//! and, on Q8_0 blocks, the tests' reference for it. Q8_0 products
//! themselves take `q8_0_panel` (decode rows too, so they sum as prompt
//! rows do). A Q8_0 block
//! is `d: f16, qs: [i8; 32]` (34 bytes); the kernel takes two blocks per
//! 64-byte register. `vpdpbusd` wants unsigned × signed bytes, so it
//! multiplies the activations offset by 128 (stored so once per token) by
//! the signed weights, starting from −128·Σw (once per block for all
//! tokens): one instruction per token.

#[cfg(test)]
use super::q4k::f16;

/// Bytes of one Q8_0 block (32 weights).
pub const BLOCK_BYTES: usize = 34;
/// Values per pair of blocks, the kernel's step.
pub const PAIR: usize = 64;

/// 64 activations quantized in two halves of 32 (each with its scale),
/// offset by 128 as unsigned bytes (the side `vpdpbusd` takes unsigned),
/// the scales already spread over the 16 lanes the kernel multiplies by:
/// the two cache lines the kernel reads per pair and token. (The signed
/// values, kept beside them for the scalar reference, made it three: when
/// Q8_0 took four tokens a pass, their pairs for a 4096-wide row took 48
/// KiB, all of L1. Without them, eight decode rows of a 7B Q8_0 ran
/// +0.7% to +2.5% faster in each of six interleaved rounds, +1.7% the
/// median.)
#[derive(Clone)]
#[repr(C, align(64))]
pub struct Q8Pair {
    qu: [u8; PAIR],
    d: [f32; 16],
}

impl Q8Pair {
    pub fn zeros() -> Self {
        Self {
            qu: [128; PAIR],
            d: [0.0; 16],
        }
    }

    /// The 64 quantized activations, signed (the scalar kernels').
    pub(super) fn qs(&self) -> [i8; PAIR] {
        self.qu.map(|u| (u ^ 0x80) as i8)
    }

    /// The scale of half `h` (0 or 1).
    pub(super) fn scale(&self, h: usize) -> f32 {
        self.d[8 * h]
    }
}

/// Quantizes `x` (a multiple of 64 values) into `out`.
pub fn quantize(x: &[f32], out: &mut [Q8Pair]) {
    for (pair, xs) in out.iter_mut().zip(x.chunks_exact(PAIR)) {
        for (half, chunk) in xs.chunks_exact(32).enumerate() {
            let amax = super::abs_max(chunk);
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            for (u, v) in pair.qu[32 * half..32 * (half + 1)].iter_mut().zip(chunk) {
                *u = (super::q4k::nearest_i8(v * id) as u8) ^ 0x80;
            }
            pair.d[8 * half..8 * (half + 1)].fill(d);
        }
    }
}

/// `x` quantized into a fresh vector (the kernels' tests).
#[cfg(test)]
pub(super) fn quantized(x: &[f32]) -> Vec<Q8Pair> {
    let mut q = vec![Q8Pair::zeros(); x.len() / PAIR];
    quantize(x, &mut q);
    q
}

#[cfg(test)]
/// Plain-Rust reference (the tests'; Q8_0 products take `q8_0_panel`).
pub fn dot_scalar(row: &[u8], x: &[Q8Pair]) -> f32 {
    let mut sum = 0f32;
    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let pair = &x[b / 2];
        let half = b % 2;
        let isum: i32 = block[2..]
            .iter()
            .zip(&pair.qs()[32 * half..32 * (half + 1)])
            .map(|(&w, &x)| w as i8 as i32 * x as i32)
            .sum();
        sum += f16(&block[..2]) * pair.d[8 * half] * isum as f32;
    }
    sum
}

#[cfg(test)]
pub fn dot(row: &[u8], x: &[Q8Pair]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::q4k::have_vnni() {
        // SAFETY: the CPU features were detected above.
        return unsafe { dot_vnni::<1, 1, false>([row], [x]) }[0][0];
    }
    dot_scalar(row, x)
}

#[cfg(test)]
/// Dot products of two rows with one token's activations (generation):
/// two streams read side by side, as `q4k::dot2` does.
pub fn dot2(rows: [&[u8]; 2], x: &[Q8Pair]) -> [f32; 2] {
    #[cfg(target_arch = "x86_64")]
    if super::q4k::have_vnni() {
        // SAFETY: the CPU features were detected above.
        let [[a], [b]] = unsafe { dot_vnni::<2, 1, false>(rows, [x]) };
        return [a, b];
    }
    rows.map(|row| dot_scalar(row, x))
}

#[cfg(test)]
/// Dot products of one row with `N` tokens' activations.
pub fn dot_n<const N: usize>(row: &[u8], xs: [&[Q8Pair]; N]) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    if super::q4k::have_vnni() {
        // SAFETY: the CPU features were detected above.
        return unsafe { dot_vnni::<1, N, false>([row], xs) }[0];
    }
    xs.map(|x| dot_scalar(row, x))
}

/// `R` rows of Q8_0 blocks (with `Q4`, of Q4_0 blocks) times `N` tokens'
/// activations: `out[r][t]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn dot_vnni<const R: usize, const N: usize, const Q4: bool>(
    rows: [&[u8]; R],
    xs: [&[Q8Pair]; N],
) -> [[f32; N]; R] {
    let mut lanes = [[[0f32; 16]; N]; R];
    // SAFETY: as the caller's.
    unsafe { dot_vnni_lanes::<R, N, Q4, true>(rows, xs, &mut lanes) };
    // SAFETY: as the caller's.
    unsafe { super::reduce_each(&lanes) }
}

/// `dot_vnni`, continuing each row's and token's accumulator lanes; with
/// `PREFETCH`, asking for the weights `PREFETCH_BYTES` on (see
/// `q4k::dot_vnni_lanes`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
// `p`, `r` and `t` index the weight pairs, the rows and the activation rows alike.
#[allow(clippy::needless_range_loop)]
#[inline]
pub(super) unsafe fn dot_vnni_lanes<
    const R: usize,
    const N: usize,
    const Q4: bool,
    const PREFETCH: bool,
>(
    rows: [&[u8]; R],
    xs: [&[Q8Pair]; N],
    lanes: &mut [[super::Lanes; N]; R],
) {
    // SAFETY: reads stay inside each row (whole pairs of blocks, every row
    // as long as the first) and inside the activation rows (checked long
    // enough); the caller guarantees the CPU features.
    unsafe {
        use std::arch::x86_64::*;
        let block_bytes = if Q4 {
            super::q4_0::BLOCK_BYTES
        } else {
            BLOCK_BYTES
        };
        let pairs = rows[0].len() / (2 * block_bytes);
        for row in &rows {
            assert_eq!(row.len(), rows[0].len(), "rows of different lengths");
        }
        for x in &xs {
            assert!(x.len() >= pairs, "activations shorter than the row");
        }
        let zero = _mm512_setzero_si512();
        let offset = _mm512_set1_epi8(-128);
        // Per 16-byte copy of a Q4_0 block's `qs` (see below): which
        // nibbles it keeps, what is subtracted (8, or 8 × 16 for the high
        // nibbles kept in place), and the scale's factor for its lanes.
        let halves = |lo: u64, hi: u64| {
            _mm512_set_epi64(
                hi as _, hi as _, lo as _, lo as _, hi as _, hi as _, lo as _, lo as _,
            )
        };
        let q4_nibbles = halves(0x0F0F_0F0F_0F0F_0F0F, 0xF0F0_F0F0_F0F0_F0F0);
        let q4_offsets = halves(0x0808_0808_0808_0808, 0x8080_8080_8080_8080);
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let q4_sixteenths = _mm512_setr_ps(
            1.0, 1.0, 1.0, 1.0, 0.0625, 0.0625, 0.0625, 0.0625, 1.0, 1.0, 1.0, 1.0, 0.0625, 0.0625,
            0.0625, 0.0625,
        );
        let mut facc = lanes.map(|row| row.map(|acc| _mm512_loadu_ps(acc.as_ptr())));
        for p in 0..pairs {
            for r in 0..R {
                let b = rows[r].as_ptr().add(p * 2 * block_bytes);
                if PREFETCH {
                    super::prefetch_ahead(b, if Q4 { &[0] } else { &[0, 64] });
                }
                // The pair's 64 signed weights.
                let w = if Q4 {
                    // Each block's 16 bytes twice, by broadcast loads (the
                    // shuffle unit bounds this loop: unpacking with shifts
                    // and inserts ran at 1.25 ns per pair and row, this at
                    // 0.97), the low nibbles of the first copy (values
                    // 0-15) and the high ones of the second (values 16-31)
                    // kept in place by one mask. The high ones stay 16
                    // times their value, and their lanes' scale is divided
                    // by 16 below: both exact (powers of two), so the
                    // products are bitwise those of unpacked nibbles.
                    let q = _mm512_mask_broadcast_i32x4(
                        _mm512_broadcast_i32x4(_mm_loadu_si128(b.add(2).cast())),
                        0xFF00,
                        _mm_loadu_si128(b.add(block_bytes + 2).cast()),
                    );
                    _mm512_sub_epi8(_mm512_and_si512(q, q4_nibbles), q4_offsets)
                } else {
                    _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_loadu_si256(b.add(2).cast())),
                        _mm256_loadu_si256(b.add(block_bytes + 2).cast()),
                    )
                };
                let d0 = std::ptr::read_unaligned(b.cast::<u16>()) as i32;
                let d1 = std::ptr::read_unaligned(b.add(block_bytes).cast::<u16>()) as i32;
                let dw = _mm_cvtph_ps(_mm_cvtsi32_si128(d0 | (d1 << 16)));
                let dw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(dw));
                let dw = if Q4 {
                    _mm512_mul_ps(dw, q4_sixteenths)
                } else {
                    dw
                };
                // −128·Σw per lane: Σ(x + 128)·w from here is Σx·w.
                let start = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, offset, w));
                for t in 0..N {
                    let xp = &xs[t][p];
                    let x = _mm512_load_si512(xp.qu.as_ptr().cast());
                    let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, x, w));
                    let scale = _mm512_mul_ps(dw, _mm512_load_ps(xp.d.as_ptr()));
                    facc[r][t] = _mm512_fmadd_ps(dot, scale, facc[r][t]);
                }
            }
        }
        for r in 0..R {
            for t in 0..N {
                _mm512_storeu_ps(lanes[r][t].as_mut_ptr(), facc[r][t]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::KernelUnderTest;
    use super::*;

    #[test]
    fn kernels_compute_the_dequantized_dot_product_and_agree() {
        KernelUnderTest {
            dtype: candle_core::quantized::GgmlDType::Q8_0,
            block_bytes: BLOCK_BYTES,
            block_values: 32,
            halves: &[0],
            quantize: quantized,
            scalar: dot_scalar,
            dot,
            dot4: dot_n::<4>,
            dot2: Some(dot2),
        }
        .check();
    }

    #[test]
    fn the_offset_activations_are_the_rounded_ones_plus_128() {
        let x = super::super::test_values(128, 9);
        let mut q = vec![Q8Pair::zeros(); 2];
        quantize(&x, &mut q);
        for (pair, xs) in q.iter().zip(x.chunks_exact(PAIR)) {
            for (half, xs) in xs.chunks_exact(32).enumerate() {
                let d = pair.scale(half);
                assert_eq!(d, super::super::abs_max(xs) / 127.0);
                for (i, &v) in xs.iter().enumerate() {
                    let want = super::super::q4k::nearest_i8(v * (1.0 / d));
                    let u = pair.qu[32 * half + i];
                    assert_eq!(u as i32, want as i32 + 128, "value {i} of half {half}");
                    assert_eq!(pair.qs()[32 * half + i], want);
                }
            }
        }
    }
}
