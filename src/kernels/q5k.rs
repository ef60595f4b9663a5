//! The Q5_K × Q8_K dot product: Q4_K's block with a fifth bit per value,
//! so the VNNI kernel is `q4k`'s with the high bits or-ed in (values 0..31
//! stay unsigned, as `vpdpbusd` wants). Q5_K_M files keep most of their
//! matrices in this format; candle's generic `vec_dot` was their path before.
//!
//! Block layout (ggml's `block_q5_K`, 176 bytes for 256 values): `d: f16`,
//! `dmin: f16`, `scales: [u8; 12]` (packed as Q4_K's), `qh: [u8; 32]`,
//! `qs: [u8; 128]`. In 64-value group `j`, value `l` is `qs[32j + l]`'s low
//! nibble plus 16 if bit `2j` of `qh[l]` is set, value `32 + l` the high
//! nibble plus bit `2j + 1`; the weight is `d·sc·q − dmin·m`.

use super::q4k::{CHUNK_ORDER, Q8K, f16, scales_mins};

/// Bytes of one Q5_K block (256 weights).
pub const BLOCK_BYTES: usize = 176;

/// Plain-Rust dot product of one row of Q5_K blocks with Q8_K activations:
/// the reference the SIMD kernel is tested against, and the fallback.
pub fn dot_scalar(row: &[u8], x: &[Q8K]) -> f32 {
    let mut sum = 0f32;
    for (b, xb) in row.chunks_exact(BLOCK_BYTES).zip(x) {
        let (d, dmin) = (f16(&b[0..2]), f16(&b[2..4]));
        let (sc, m) = scales_mins(&b[4..16]);
        let (qh, qs) = (&b[16..48], &b[48..176]);
        let (mut isum, mut msum) = (0i32, 0i32);
        for j in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            let (lo_at, hi_at) = (CHUNK_ORDER[2 * j] * 32, CHUNK_ORDER[2 * j + 1] * 32);
            for l in 0..32 {
                let q = qs[32 * j + l];
                let lo_q = (q & 0xF) as i32 + if qh[l] >> (2 * j) & 1 == 1 { 16 } else { 0 };
                let hi_q = (q >> 4) as i32 + if qh[l] >> (2 * j + 1) & 1 == 1 { 16 } else { 0 };
                lo += lo_q * xb.qs[lo_at + l] as i32;
                hi += hi_q * xb.qs[hi_at + l] as i32;
            }
            isum += lo * sc[2 * j] as i32 + hi * sc[2 * j + 1] as i32;
        }
        for (&m, pair) in m.iter().zip(xb.bsums.chunks_exact(2)) {
            msum += m as i32 * (pair[0] as i32 + pair[1] as i32);
        }
        sum += xb.d * (d * isum as f32 - dmin * msum as f32);
    }
    sum
}

/// Dot product of one row with the fastest kernel this CPU has.
pub fn dot(row: &[u8], x: &[Q8K]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::q4k::have_vnni() {
        // SAFETY: the CPU features were detected above.
        return unsafe { super::q4k::dot_vnni::<1, 1, true>([row], [x]) }[0][0];
    }
    dot_scalar(row, x)
}

/// Dot products of two rows with one token's activations (generation):
/// two streams read side by side, as `q4k::dot2` does.
pub fn dot2(rows: [&[u8]; 2], x: &[Q8K]) -> [f32; 2] {
    #[cfg(target_arch = "x86_64")]
    if super::q4k::have_vnni() {
        // SAFETY: the CPU features were detected above.
        let [[a], [b]] = unsafe { super::q4k::dot_vnni::<2, 1, true>(rows, [x]) };
        return [a, b];
    }
    rows.map(|row| dot_scalar(row, x))
}

/// Dot products of one row with `N` tokens' activations.
pub fn dot_n<const N: usize>(row: &[u8], xs: [&[Q8K]; N]) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    if super::q4k::have_vnni() {
        // SAFETY: the CPU features were detected above.
        return unsafe { super::q4k::dot_vnni::<1, N, true>([row], xs) }[0];
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
        let lanes = std::array::from_mut(lanes);
        unsafe { super::q4k::dot_vnni_lanes::<1, N, true, false>([row], xs, lanes) };
        return true;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (row, xs, lanes);
    false
}

#[cfg(test)]
mod tests {
    use super::super::KernelUnderTest;
    use super::super::q4k::QK;
    use super::*;

    #[test]
    fn kernels_compute_the_dequantized_dot_product_and_agree() {
        KernelUnderTest {
            dtype: candle_core::quantized::GgmlDType::Q5K,
            block_bytes: BLOCK_BYTES,
            halves: &[0, 2],
            block_values: QK,
            quantize: super::super::q4k::quantized_q8k,
            scalar: dot_scalar,
            dot,
            dot4: dot_n::<4>,
            dot2: Some(dot2),
        }
        .check();
    }
}
