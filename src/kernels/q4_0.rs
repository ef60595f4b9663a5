//! The Q4_0 × Q8 dot product with AVX-512 VNNI: Q8_0's kernel (`q8_0`) on
//! weights unpacked from nibbles. A Q4_0 block is `d: f16, qs: [u8; 16]`
//! (18 bytes) for 32 values: value `j` is `qs[j]`'s low nibble, value
//! `j + 16` its high nibble, each minus 8. Two blocks fill a 64-byte
//! register; the activations are `q8_0`'s pairs of 32-value halves.

use super::q4k::f16;
use super::q8_0::Q8Pair;

/// Bytes of one Q4_0 block (32 weights).
pub const BLOCK_BYTES: usize = 18;

/// Plain-Rust reference and fallback.
pub fn dot_scalar(row: &[u8], x: &[Q8Pair]) -> f32 {
    let mut sum = 0f32;
    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let pair = &x[b / 2];
        let half = b % 2;
        let xs = &pair.qs()[32 * half..32 * (half + 1)];
        let mut isum = 0i32;
        for (j, &q) in block[2..].iter().enumerate() {
            isum += ((q & 0xF) as i32 - 8) * xs[j] as i32;
            isum += ((q >> 4) as i32 - 8) * xs[j + 16] as i32;
        }
        sum += f16(&block[..2]) * pair.scale(half) * isum as f32;
    }
    sum
}

pub fn dot(row: &[u8], x: &[Q8Pair]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::q4k::have_vnni() {
        // SAFETY: the CPU features were detected above.
        return unsafe { dot_vnni::<1>(row, [x]) }[0];
    }
    dot_scalar(row, x)
}

/// Dot products of one row with `N` tokens' activations.
pub fn dot_n<const N: usize>(row: &[u8], xs: [&[Q8Pair]; N]) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    if super::q4k::have_vnni() {
        // SAFETY: the CPU features were detected above.
        return unsafe { dot_vnni::<N>(row, xs) };
    }
    xs.map(|x| dot_scalar(row, x))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)]
unsafe fn dot_vnni<const N: usize>(row: &[u8], xs: [&[Q8Pair]; N]) -> [f32; N] {
    // SAFETY: reads stay inside `row` (whole pairs of blocks) and inside
    // the activation rows (checked long enough); the caller guarantees the
    // CPU features.
    unsafe {
        use std::arch::x86_64::*;
        let pairs = row.len() / (2 * BLOCK_BYTES);
        for x in &xs {
            assert!(x.len() >= pairs, "activations shorter than the row");
        }
        let zero = _mm512_setzero_si512();
        let nib = _mm_set1_epi8(0x0F);
        let eight = _mm512_set1_epi8(8);
        let offset = _mm512_set1_epi8(-128);
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let mut facc = [_mm512_setzero_ps(); N];
        for p in 0..pairs {
            let b = row.as_ptr().add(p * 2 * BLOCK_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(super::PREFETCH_BYTES).cast());
            // One block's 32 values: the 16 low nibbles, then the 16 high.
            macro_rules! block {
                ($at:expr) => {{
                    let q = _mm_loadu_si128(b.add($at + 2).cast());
                    let lo = _mm_and_si128(q, nib);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), nib);
                    _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi)
                }};
            }
            let w = _mm512_sub_epi8(
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(block!(0)), block!(BLOCK_BYTES)),
                eight,
            );
            let d0 = std::ptr::read_unaligned(b.cast::<u16>()) as i32;
            let d1 = std::ptr::read_unaligned(b.add(BLOCK_BYTES).cast::<u16>()) as i32;
            let dw = _mm_cvtph_ps(_mm_cvtsi32_si128(d0 | (d1 << 16)));
            let dw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(dw));
            // vpdpbusd wants unsigned × signed: the activations offset by
            // 128 times w, from −128·Σw per lane (see `q8_0`).
            let start = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, offset, w));
            for t in 0..N {
                let xp = &xs[t][p];
                let x = _mm512_load_si512(xp.qu().as_ptr().cast());
                let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, x, w));
                let scale = _mm512_mul_ps(dw, _mm512_load_ps(xp.scales().as_ptr()));
                facc[t] = _mm512_fmadd_ps(dot, scale, facc[t]);
            }
        }
        facc.map(|acc| _mm512_reduce_add_ps(acc))
    }
}

#[cfg(test)]
mod tests {
    use super::super::KernelUnderTest;
    use super::*;

    #[test]
    fn kernels_compute_the_dequantized_dot_product_and_agree() {
        KernelUnderTest {
            dtype: candle_core::quantized::GgmlDType::Q4_0,
            block_bytes: BLOCK_BYTES,
            halves: &[0],
            block_values: 32,
            quantize: super::super::q8_0::quantized,
            scalar: dot_scalar,
            dot,
            dot4: dot_n::<4>,
        }
        .check();
    }
}
