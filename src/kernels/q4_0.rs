//! The Q4_0 × Q8 dot product with AVX-512 VNNI: Q8_0's kernel
//! (`q8_0::dot_vnni`) on weights unpacked from nibbles. A Q4_0 block is
//! `d: f16, qs: [u8; 16]` (18 bytes) for 32 values: value `j` is `qs[j]`'s
//! low nibble, value `j + 16` its high nibble, each minus 8. Two blocks
//! fill a 64-byte register; the activations are `q8_0`'s pairs of 32-value
//! halves.

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
        return unsafe { super::q8_0::dot_vnni::<1, 1, true>([row], [x]) }[0][0];
    }
    dot_scalar(row, x)
}

/// Dot products of two rows with one token's activations (generation):
/// two streams read side by side, as `q4k::dot2` does.
pub fn dot2(rows: [&[u8]; 2], x: &[Q8Pair]) -> [f32; 2] {
    #[cfg(target_arch = "x86_64")]
    if super::q4k::have_vnni() {
        // SAFETY: the CPU features were detected above.
        let [[a], [b]] = unsafe { super::q8_0::dot_vnni::<2, 1, true>(rows, [x]) };
        return [a, b];
    }
    rows.map(|row| dot_scalar(row, x))
}

/// Dot products of one row with `N` tokens' activations.
pub fn dot_n<const N: usize>(row: &[u8], xs: [&[Q8Pair]; N]) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    if super::q4k::have_vnni() {
        // SAFETY: the CPU features were detected above.
        return unsafe { super::q8_0::dot_vnni::<1, N, true>([row], xs) }[0];
    }
    xs.map(|x| dot_scalar(row, x))
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
            dot2: Some(dot2),
        }
        .check();
    }
}
