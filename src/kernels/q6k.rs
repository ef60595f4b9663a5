//! The Q6_K × Q8_K dot product with AVX-512 VNNI.
//!
//! A Q4_K_M file keeps about a fifth of its bytes in Q6_K (`output.weight`,
//! half of `ffn_down` and `attn_v`); through candle's generic
//! `vec_dot_q6k_q8k` those took 17% of a 7B model's generation profile at
//! roughly half the speed per byte of this crate's Q4_K kernel. This kernel
//! pairs with the same Q8_K activations as `q4k` (quantized once per token
//! for both formats).
//!
//! Block layout (ggml's `block_q6_K`, 210 bytes for 256 values):
//! `ql: [u8; 128]` (low 4 bits), `qh: [u8; 64]` (high 2 bits),
//! `scales: [i8; 16]` (one per 16 values), `d: f16`. In each half of 128
//! values, value `l` (l < 32) takes `ql[l]`'s low nibble and `qh[l]` bits
//! 0-1, value `l + 32` `ql[l + 32]`'s low nibble and bits 2-3, value
//! `l + 64` `ql[l]`'s high nibble and bits 4-5, value `l + 96` `ql[l + 32]`'s
//! high nibble and bits 6-7; the weight is `d · scale · (q − 32)`.
//!
//! VNNI multiplies unsigned by signed bytes: the stored `q` (0..63) is the
//! unsigned side, and the `−32` comes back as `32 · Σx` per 16 values from
//! the activations' block sums.

use super::q4k::{CHUNK_ORDER, Q8K, f16};

/// Bytes of one Q6_K block (256 weights).
pub const BLOCK_BYTES: usize = 210;

/// Plain-Rust dot product of one row of Q6_K blocks with Q8_K activations:
/// the reference the SIMD kernel is tested against, and the fallback.
pub fn dot_scalar(row: &[u8], x: &[Q8K]) -> f32 {
    let mut sum = 0f32;
    for (b, xb) in row.chunks_exact(BLOCK_BYTES).zip(x) {
        let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
        let d = f16(&b[208..210]);
        let xv = |v: usize| xb.qs[CHUNK_ORDER[v / 32] * 32 + v % 32] as i32;
        let mut isum = 0i32;
        for n in 0..2 {
            for l in 0..32 {
                let (lo, hi, h) = (ql[64 * n + l], ql[64 * n + l + 32], qh[32 * n + l]);
                let q = [
                    (lo & 0xF) | ((h & 3) << 4),
                    (hi & 0xF) | (((h >> 2) & 3) << 4),
                    (lo >> 4) | (((h >> 4) & 3) << 4),
                    (hi >> 4) | (((h >> 6) & 3) << 4),
                ];
                for (k, &q) in q.iter().enumerate() {
                    let v = 128 * n + 32 * k + l;
                    let scale = sc[8 * n + 2 * k + l / 16] as i8 as i32;
                    isum += scale * (q as i32 - 32) * xv(v);
                }
            }
        }
        sum += d * xb.d * isum as f32;
    }
    sum
}

/// Dot product of one row with the fastest kernel this CPU has.
pub fn dot(row: &[u8], x: &[Q8K]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::q4k::have_vnni() {
        // SAFETY: the CPU features were detected above.
        return unsafe { dot_vnni::<1>(row, [x]) }[0];
    }
    dot_scalar(row, x)
}

/// Dot products of one row with `N` tokens' activations.
pub fn dot_n<const N: usize>(row: &[u8], xs: [&[Q8K]; N]) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    if super::q4k::have_vnni() {
        // SAFETY: the CPU features were detected above.
        return unsafe { dot_vnni::<N>(row, xs) };
    }
    xs.map(|x| dot_scalar(row, x))
}

/// `dot_n` continuing each token's accumulator lanes (`q4k::dot_n_lanes`).
pub fn dot_n_lanes<const N: usize>(
    row: &[u8],
    xs: [&[Q8K]; N],
    lanes: &mut [super::Lanes; N],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::q4k::have_vnni() {
        // SAFETY: the CPU features were detected above.
        unsafe { dot_vnni_lanes::<N, false>(row, xs, lanes) };
        return true;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (row, xs, lanes);
    false
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_vnni<const N: usize>(row: &[u8], xs: [&[Q8K]; N]) -> [f32; N] {
    let mut lanes = [[0f32; 16]; N];
    // SAFETY: as the caller's.
    unsafe { dot_vnni_lanes::<N, true>(row, xs, &mut lanes) };
    // SAFETY: as the caller's.
    let [out] = unsafe { super::reduce_each(&[lanes]) };
    out
}

/// `dot_vnni`, continuing each token's accumulator lanes; with `PREFETCH`,
/// asking for the weights `PREFETCH_BYTES` on (see `q4k::dot_vnni_lanes`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)]
#[inline]
unsafe fn dot_vnni_lanes<const N: usize, const PREFETCH: bool>(
    row: &[u8],
    xs: [&[Q8K]; N],
    lanes: &mut [super::Lanes; N],
) {
    // SAFETY: every read stays inside `row` (whole blocks) or inside a
    // `Q8K` (checked long enough); the caller guarantees the CPU features.
    unsafe {
        use std::arch::x86_64::*;
        let blocks = row.len() / BLOCK_BYTES;
        for x in &xs {
            assert!(x.len() >= blocks, "activations shorter than the row");
        }
        let zero = _mm512_setzero_si512();
        let nib = _mm512_set1_epi8(0x0F);
        let bits45 = _mm512_set1_epi8(0x30);
        // The activations' stored chunk order (`CHUNK_ORDER`) pairs, in one
        // 64-byte load at 128n + 64h, the 32 values of `ql[64n + 32h..][..32]`'s
        // low nibbles with those of its high nibbles. So each weight vector is
        // those 32 `ql` bytes in both halves, the upper half shifted down 4.
        let ql_shift = _mm512_setr_epi64(
            0,
            0,
            0,
            0,
            0x0004_0004_0004_0004,
            0x0004_0004_0004_0004,
            0x0004_0004_0004_0004,
            0x0004_0004_0004_0004,
        );
        // The two high bits of those values, moved to bits 4-5 by rotating
        // each 32-bit lane (every byte's bits stay inside their byte): for
        // h = 0, bits 0-1 (rotate by 4) and bits 4-5 (by 0); for h = 1,
        // bits 2-3 (by 2) and bits 6-7 (by 30).
        let qh_rot = [
            _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0),
            _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 30, 30, 30, 30, 30, 30, 30, 30),
        ];
        // Which of the 16 scales each dword lane of a product takes: the
        // vector for (n, h) holds values 128n + 32h + [0, 32) and
        // 128n + 32h + [64, 96), 4 lanes per 16 values.
        let i_s = [
            [
                _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 4, 4, 4, 4, 5, 5, 5, 5),
                _mm512_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3, 6, 6, 6, 6, 7, 7, 7, 7),
            ],
            [
                _mm512_setr_epi32(8, 8, 8, 8, 9, 9, 9, 9, 12, 12, 12, 12, 13, 13, 13, 13),
                _mm512_setr_epi32(
                    10, 10, 10, 10, 11, 11, 11, 11, 14, 14, 14, 14, 15, 15, 15, 15,
                ),
            ],
        ];
        let mut facc = lanes.map(|acc| _mm512_loadu_ps(acc.as_ptr()));
        for blk in 0..blocks {
            let b = row.as_ptr().add(blk * BLOCK_BYTES);
            if PREFETCH {
                super::prefetch_ahead(b, &[0, 64, 128, 192]);
            }
            // In registers (F16C): `q4k::f16` is a call into `half` that
            // cannot inline into this function, 6% of a Q4_K_M token.
            let d = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(std::ptr::read_unaligned(
                b.add(208).cast::<u16>(),
            ))));
            // The 16 signed scales as 16-bit lanes, and as 32-bit lanes whose
            // high 16 bits are zero: `madd`/`dpwssd` of a product
            // (|p| <= 4 * 63 * 127, a 16-bit number) with one is exactly
            // p * scale, whatever the signs.
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(192).cast()));
            let sc32 = _mm512_cvtepu16_epi32(sc16);
            // 32 · scale, for the −32 offset of every stored value.
            let sc16x32 = _mm256_slli_epi16::<5>(sc16);
            let mut w = [[zero; 2]; 2];
            let mut s = [[zero; 2]; 2];
            for n in 0..2 {
                let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(128 + 32 * n).cast()));
                for h in 0..2 {
                    let ql =
                        _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(64 * n + 32 * h).cast()));
                    let hi = _mm512_and_si512(_mm512_rolv_epi32(qh, qh_rot[h]), bits45);
                    // (ql >> shift) & 0x0F | hi
                    w[n][h] =
                        _mm512_ternarylogic_epi32::<0xEA>(_mm512_srlv_epi16(ql, ql_shift), nib, hi);
                    s[n][h] = _mm512_permutexvar_epi32(i_s[n][h], sc32);
                }
            }
            for t in 0..N {
                let xb = &xs[t][blk];
                let xq = xb.qs.as_ptr();
                let dp = |n: usize, h: usize| {
                    _mm512_dpbusd_epi32(
                        zero,
                        w[n][h],
                        _mm512_load_si512(xq.add(128 * n + 64 * h).cast()),
                    )
                };
                // The block's integer dot product (exact in integers: |sum| < 2^28),
                // then one conversion and one multiply-add.
                let mut acc = _mm512_madd_epi16(dp(0, 0), s[0][0]);
                acc = _mm512_dpwssd_epi32(acc, dp(0, 1), s[0][1]);
                acc = _mm512_dpwssd_epi32(acc, dp(1, 0), s[1][0]);
                acc = _mm512_dpwssd_epi32(acc, dp(1, 1), s[1][1]);
                // −32 · Σ scale · (sum of the 16 activations it scales).
                let offset =
                    _mm256_madd_epi16(_mm256_load_si256(xb.bsums.as_ptr().cast()), sc16x32);
                acc = _mm512_sub_epi32(acc, _mm512_zextsi256_si512(offset));
                let dx = _mm512_broadcastss_ps(_mm_mul_ps(d, _mm_set1_ps(xb.d)));
                facc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), dx, facc[t]);
            }
        }
        for t in 0..N {
            _mm512_storeu_ps(lanes[t].as_mut_ptr(), facc[t]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::KernelUnderTest;
    use super::super::q4k::QK;
    use super::*;

    #[test]
    fn kernels_compute_the_dequantized_dot_product_and_agree() {
        KernelUnderTest {
            dtype: candle_core::quantized::GgmlDType::Q6K,
            block_bytes: BLOCK_BYTES,
            halves: &[208],
            block_values: QK,
            quantize: super::super::q4k::quantized_q8k,
            scalar: dot_scalar,
            dot,
            dot4: dot_n::<4>,
            dot2: None,
        }
        .check();
    }
}
