//! The Q4_0 × Q8 dot product with AVX-512 VNNI: Q8_0's kernel
//! (`q8_0::dot_vnni`) on the nibbles (each high one kept in place, 16
//! times its value, against a scale divided by 16). A Q4_0 block is
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
        let qs = pair.qs();
        let xs = &qs[32 * half..32 * (half + 1)];
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

/// `dot_n` continuing each token's accumulator lanes (`q4k::dot_n_lanes`).
pub fn dot_n_lanes<const N: usize>(
    row: &[u8],
    xs: [&[Q8Pair]; N],
    lanes: &mut [super::Lanes; N],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::q4k::have_vnni() {
        // SAFETY: the CPU features were detected above.
        let lanes = std::array::from_mut(lanes);
        unsafe { super::q8_0::dot_vnni_lanes::<1, N, true, false>([row], xs, lanes) };
        return true;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (row, xs, lanes);
    false
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

    /// The VNNI kernel keeps each high nibble 16 times its value and
    /// divides its lanes' scale by 16: the products must be bitwise those
    /// of unpacked nibbles, which is Q8_0's kernel on the same values
    /// written as a Q8_0 row (`q - 8` as bytes, the same `d`).
    #[test]
    fn the_vnni_kernel_is_bitwise_q8_0s_on_the_unpacked_values() {
        use super::super::q8_0;
        if !super::super::q4k::have_vnni() {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        }
        let cols = 512;
        let blocks = cols / 32;
        // Two rows of every nibble pattern, scales from tiny to large.
        let rows: Vec<Vec<u8>> = (0..2u32)
            .map(|r| {
                let mut row = Vec::with_capacity(blocks * BLOCK_BYTES);
                for b in 0..blocks as u32 {
                    let d =
                        half::f16::from_f32((b as f32 - 5.5) * 0.37 * 10f32.powi(b as i32 % 5 - 2));
                    row.extend_from_slice(&d.to_le_bytes());
                    row.extend((0..16u32).map(|j| ((j * 37 + b * 11 + r * 101) % 256) as u8));
                }
                row
            })
            .collect();
        let as_q8_0 = |row: &[u8]| -> Vec<u8> {
            row.chunks_exact(BLOCK_BYTES)
                .flat_map(|block| {
                    let mut out = block[..2].to_vec();
                    out.extend(block[2..].iter().map(|&q| ((q & 0xF) as i8 - 8) as u8));
                    out.extend(block[2..].iter().map(|&q| ((q >> 4) as i8 - 8) as u8));
                    out
                })
                .collect()
        };
        let wide: Vec<Vec<u8>> = rows.iter().map(|r| as_q8_0(r)).collect();
        let xs: Vec<Vec<Q8Pair>> = (0..4)
            .map(|s| q8_0::quantized(&super::super::test_values(cols, s)))
            .collect();
        for x in &xs {
            let got = dot2([&rows[0], &rows[1]], x);
            let want = q8_0::dot2([&wide[0], &wide[1]], x);
            assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits));
        }
        let got = dot_n::<4>(&rows[1], std::array::from_fn(|t| &xs[t][..]));
        let want = q8_0::dot_n::<4>(&wide[1], std::array::from_fn(|t| &xs[t][..]));
        assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits));
    }
}
