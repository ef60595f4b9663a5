//! The Q4_K × Q8_K dot product with AVX-512 VNNI: the one loop that a
//! 4-bit model's generation spends its time in.
//!
//! candle's `vec_dot_q4k_q8k` is ggml's AVX2 kernel (16-bit multiply-adds);
//! measured on this project's 2-core Xeon it is compute-bound at about half
//! the memory bandwidth (1.10 tok/s on one thread, 2.00 on two, for a
//! Mistral-7B-shaped Q4_K model). `vpdpbusd` multiplies 64 unsigned nibbles
//! by 64 signed activation bytes and accumulates in one instruction, which
//! moves the loop back under the bandwidth limit.
//!
//! Block layouts are ggml's (candle keeps their fields private, so they are
//! read from the bytes): a Q4_K block is `d: f16, dmin: f16, scales: [u8;
//! 12], qs: [u8; 128]` for 256 values; value `i` of sub-block `s` is
//! `d·sc[s]·q − dmin·m[s]`.

/// Bytes of one Q4_K block (256 weights).
pub const BLOCK_BYTES: usize = 144;
/// Values per block.
pub const QK: usize = 256;

/// Activations quantized for the dot product: ggml's Q8_K (`d`, 256 signed
/// bytes, and the sums of each 16 of them for the `dmin` term), with the
/// 32-value chunks stored in the order the kernel consumes them (see
/// `CHUNK_ORDER`), so each 64-byte load is one aligned read.
#[derive(Clone)]
#[repr(C, align(64))]
pub struct Q8K {
    pub(super) qs: [i8; QK],
    pub(super) bsums: [i16; 16],
    pub(super) d: f32,
}

impl Q8K {
    pub fn zeros() -> Self {
        Self {
            qs: [0; QK],
            bsums: [0; 16],
            d: 0.0,
        }
    }
}

/// Where natural 32-value chunk `c` of a block is stored: a weight byte
/// holds values `i` and `i + 32` of a 64-value group, so the kernel pairs
/// chunks (0, 2), (1, 3), (4, 6), (5, 7). The map is its own inverse.
pub(super) const CHUNK_ORDER: [usize; 8] = [0, 2, 1, 3, 4, 6, 5, 7];

/// Quantizes `x` (a multiple of 256 values) into `out`.
pub fn quantize_q8k(x: &[f32], out: &mut [Q8K]) {
    for (block, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = super::abs_max(xs);
        if amax == 0.0 {
            *block = Q8K::zeros();
            continue;
        }
        let id = 127.0 / amax;
        let mut natural = [0i8; QK];
        for (q, v) in natural.iter_mut().zip(xs) {
            *q = nearest_i8(v * id);
        }
        for (j, s) in block.bsums.iter_mut().enumerate() {
            *s = natural[16 * j..16 * (j + 1)]
                .iter()
                .map(|&q| q as i16)
                .sum();
        }
        for (c, chunk) in natural.chunks_exact(32).enumerate() {
            let at = CHUNK_ORDER[c] * 32;
            block.qs[at..at + 32].copy_from_slice(chunk);
        }
        block.d = amax / 127.0;
    }
}

/// `x` quantized into a fresh vector (the kernels' tests).
#[cfg(test)]
pub(super) fn quantized_q8k(x: &[f32]) -> Vec<Q8K> {
    let mut q = vec![Q8K::zeros(); x.len() / QK];
    quantize_q8k(x, &mut q);
    q
}

/// `v` (within ±127.5) rounded to the nearest integer, ties to even, as
/// ggml's `nearest_int` does it: adding 1.5·2²³ leaves the integer in the
/// low mantissa bits. Plain adds and masks vectorise; `f32::round` is a
/// libm call per value on baseline x86-64 (6% of a 7B prompt's time).
#[inline]
pub(super) fn nearest_i8(v: f32) -> i8 {
    let f = v + 12_582_912.0;
    ((f.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000).clamp(-127, 127) as i8
}

pub(super) fn f16(bytes: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

/// The 8 six-bit scales and 8 six-bit mins of a block, as ggml packs them
/// into 12 bytes (`get_scale_min_k4`).
pub(super) fn scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            sc[j] = s[j] & 63;
            m[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            m[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    (sc, m)
}

/// Plain-Rust dot product of one row of Q4_K blocks with Q8_K activations:
/// the reference the SIMD kernel is tested against, and the fallback.
pub fn dot_scalar(row: &[u8], x: &[Q8K]) -> f32 {
    let mut sum = 0f32;
    for (b, xb) in row.chunks_exact(BLOCK_BYTES).zip(x) {
        let (d, dmin) = (f16(&b[0..2]), f16(&b[2..4]));
        let (sc, m) = scales_mins(&b[4..16]);
        let qs = &b[16..];
        let mut isum = 0i32;
        let mut msum = 0i32;
        for j in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            let (lo_at, hi_at) = (CHUNK_ORDER[2 * j] * 32, CHUNK_ORDER[2 * j + 1] * 32);
            for l in 0..32 {
                let q = qs[32 * j + l];
                lo += (q & 0xF) as i32 * xb.qs[lo_at + l] as i32;
                hi += (q >> 4) as i32 * xb.qs[hi_at + l] as i32;
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

/// Whether this CPU runs the VNNI kernel (checked once).
pub fn have_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Dot product of one row with the fastest kernel this CPU has.
pub fn dot(row: &[u8], x: &[Q8K]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if have_vnni() {
        // SAFETY: the CPU features were detected above.
        return unsafe { dot_vnni::<1, 1, false>([row], [x]) }[0][0];
    }
    dot_scalar(row, x)
}

/// Dot products of one row with the activations of `N` tokens (a batch's
/// rows), each weight block unpacked once for all of them.
pub fn dot_n<const N: usize>(row: &[u8], xs: [&[Q8K]; N]) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    if have_vnni() {
        // SAFETY: the CPU features were detected above.
        return unsafe { dot_vnni::<1, N, false>([row], xs) }[0];
    }
    xs.map(|x| dot_scalar(row, x))
}

/// Dot products of two rows with one token's activations (generation):
/// the two rows' blocks are unpacked side by side, sharing the activation
/// loads and giving the core two independent chains to overlap.
pub fn dot2(rows: [&[u8]; 2], x: &[Q8K]) -> [f32; 2] {
    #[cfg(target_arch = "x86_64")]
    if have_vnni() {
        // SAFETY: the CPU features were detected above.
        let [[a], [b]] = unsafe { dot_vnni::<2, 1, false>(rows, [x]) };
        return [a, b];
    }
    rows.map(|row| dot_scalar(row, x))
}

/// `pshufb` indices that spread scales `j..j + 4` (bytes of the 16 unpacked
/// scales and mins) as 16-bit lanes against `packs(p_lo, p_hi)` of two
/// products: per 128-bit lane, 4 dwords of the low nibbles' product, then 4
/// of the high ones'; lanes 0-1 cover sub-blocks `j` and `j + 1`, lanes 2-3
/// `j + 2` and `j + 3`. Every high byte is -1 (zero).
const fn scale_index(j: i8) -> [i8; 64] {
    let mut out = [-1i8; 64];
    let mut i = 0;
    while i < 32 {
        let (lane, high) = (i / 8, (i % 8) / 4);
        out[2 * i] = j + 2 * (lane / 2) as i8 + high as i8;
        i += 1;
    }
    out
}
const SCALES_0_3: [i8; 64] = scale_index(0);
const SCALES_4_7: [i8; 64] = scale_index(4);

/// Dot products of one row with `N` tokens' activations, continuing each
/// token's accumulator lanes (`super::Lanes`): a row taken in spans of
/// blocks, each span's lanes carried into the next, ends with the bits of
/// the row taken whole (`super::reduce_lanes` finishes it). False, and
/// nothing done, without the VNNI kernel.
pub fn dot_n_lanes<const N: usize>(
    row: &[u8],
    xs: [&[Q8K]; N],
    lanes: &mut [super::Lanes; N],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if have_vnni() {
        // SAFETY: the CPU features were detected above.
        unsafe { dot_vnni_lanes::<1, N, false, false>([row], xs, std::array::from_mut(lanes)) };
        return true;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (row, xs, lanes);
    false
}

/// The VNNI kernel for Q4_K, and with `Q5` for Q5_K: the same block with a
/// fifth bit per value (`qh: [u8; 32]` after the scales, the 4-bit `qs`
/// moved 32 bytes on; see `q5k`). `R` rows (of equal length) times `N`
/// tokens' activations: `out[r][t]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn dot_vnni<const R: usize, const N: usize, const Q5: bool>(
    rows: [&[u8]; R],
    xs: [&[Q8K]; N],
) -> [[f32; N]; R] {
    let mut lanes = [[[0f32; 16]; N]; R];
    // SAFETY: as the caller's.
    unsafe { dot_vnni_lanes::<R, N, Q5, true>(rows, xs, &mut lanes) };
    // SAFETY: as the caller's.
    unsafe { super::reduce_each(&lanes) }
}

/// `dot_vnni`, continuing each row's and token's accumulator lanes; with
/// `PREFETCH`, asking for the weights `PREFETCH_BYTES` on (a row taken
/// whole; a row taken in spans has its next span prefetched by the caller).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
// `blk`, `r` and `t` index the weight rows and the activation rows alike.
#[allow(clippy::needless_range_loop)]
#[inline]
pub(super) unsafe fn dot_vnni_lanes<
    const R: usize,
    const N: usize,
    const Q5: bool,
    const PREFETCH: bool,
>(
    rows: [&[u8]; R],
    xs: [&[Q8K]; N],
    lanes: &mut [[super::Lanes; N]; R],
) {
    // SAFETY: every pointer read stays inside a row (`blocks` whole blocks,
    // every row as long as the first) or inside a `Q8K` (checked long
    // enough); the caller guarantees the CPU features.
    unsafe {
        use std::arch::x86_64::*;
        let (block_bytes, qs_at) = if Q5 {
            (super::q5k::BLOCK_BYTES, 48)
        } else {
            (BLOCK_BYTES, 16)
        };
        let blocks = rows[0].len() / block_bytes;
        for row in &rows {
            assert_eq!(row.len(), rows[0].len(), "rows of different lengths");
        }
        for x in &xs {
            assert!(x.len() >= blocks, "activations shorter than the row");
        }
        let nib = _mm512_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        let zero = _mm512_setzero_si512();
        let i_a = _mm512_loadu_si512(SCALES_0_3.as_ptr().cast());
        let i_b = _mm512_loadu_si512(SCALES_4_7.as_ptr().cast());
        // ggml's unpacking of the 12 scale bytes (`get_scale_min_k4`, as
        // u32 words s0, s1, s2) in one 128-bit pass rather than a dozen
        // scalar operations: lanes u0, u1 = the 8 scales, u2, u3 = the 8 mins.
        //   u0 = s0 & K1                  u1 = (s2 & K2) | ((s0 >> 6) & K3) << 4
        //   u2 = s1 & K1                  u3 = ((s2 >> 4) & K2) | ((s1 >> 6) & K3) << 4
        const K1: i32 = 0x3f3f3f3f;
        const K2: i32 = 0x0f0f0f0f;
        const K3_4: i32 = 0x30303030;
        let shift_a = _mm_setr_epi32(0, 0, 0, 4);
        let mask_a = _mm_setr_epi32(K1, K2, K1, K2);
        let mask_b = _mm_setr_epi32(0, K3_4, 0, K3_4);
        // Each min twice, as 16-bit lanes against the 16 sums of 16 activations.
        let i_m = _mm256_setr_epi8(
            8, -1, 8, -1, 9, -1, 9, -1, 10, -1, 10, -1, 11, -1, 11, -1, 12, -1, 12, -1, 13, -1, 13,
            -1, 14, -1, 14, -1, 15, -1, 15, -1,
        );
        // Per row and token: lanes 0-7 sum d·xd·(the block's scaled
        // products), lanes 8-15 −dmin·xd·(its mins times the sums).
        let mut facc = lanes.map(|row| row.map(|acc| _mm512_loadu_ps(acc.as_ptr())));
        // [d ×8, dmin ×8] from [d, dmin, ..], then dmin's sign flipped.
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let negate_high = _mm512_setr_epi32(
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            i32::MIN,
            i32::MIN,
            i32::MIN,
            i32::MIN,
            i32::MIN,
            i32::MIN,
            i32::MIN,
            i32::MIN,
        );
        for blk in 0..blocks {
            for r in 0..R {
                let b = rows[r].as_ptr().add(blk * block_bytes);
                // `PREFETCH_BYTES` ahead: the hardware prefetcher alone
                // leaves the threads waiting on memory between blocks.
                if PREFETCH {
                    let lines: &[usize] = if Q5 {
                        &[0, 64, 128, 175]
                    } else {
                        &[0, 64, 128]
                    };
                    super::prefetch_ahead(b, lines);
                }
                // [d, dmin, 0, 0], converted together, spread to [d ×8, −dmin ×8].
                let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(b.cast::<i32>())));
                let dd = _mm512_castsi512_ps(_mm512_xor_si512(
                    _mm512_permutexvar_epi32(spread, _mm512_castsi128_si512(_mm_castps_si128(dd))),
                    negate_high,
                ));
                // 16 bytes from the scales on: 12 scale bytes and 4 of `qs`/`qh`
                // (ignored), all inside the block.
                let v = _mm_loadu_si128(b.add(4).cast());
                let a = _mm_and_si128(
                    _mm_srlv_epi32(_mm_shuffle_epi32::<0b10_01_10_00>(v), shift_a),
                    mask_a,
                );
                let c = _mm_and_si128(
                    _mm_srli_epi32::<2>(_mm_shuffle_epi32::<0b01_01_00_00>(v)),
                    mask_b,
                );
                let u = _mm_or_si128(a, c);
                let u4 = _mm512_broadcast_i32x4(u);
                let (s_a, s_b) = (_mm512_shuffle_epi8(u4, i_a), _mm512_shuffle_epi8(u4, i_b));
                let m16 = _mm256_shuffle_epi8(_mm512_castsi512_si256(u4), i_m);
                let qa = _mm512_loadu_si512(b.add(qs_at).cast());
                let qb = _mm512_loadu_si512(b.add(qs_at + 64).cast());
                let mut w_al = _mm512_and_si512(qa, nib);
                let mut w_ah = _mm512_and_si512(_mm512_srli_epi16::<4>(qa), nib);
                let mut w_bl = _mm512_and_si512(qb, nib);
                let mut w_bh = _mm512_and_si512(_mm512_srli_epi16::<4>(qb), nib);
                if Q5 {
                    // Bit k of qh[l] is the fifth bit of value 32k + l: worth 16.
                    let qh = _mm256_loadu_si256(b.add(16).cast());
                    macro_rules! fifth {
                        ($k:literal) => {
                            _mm256_slli_epi16::<4>(_mm256_and_si256(
                                _mm256_srli_epi16::<$k>(qh),
                                one,
                            ))
                        };
                    }
                    macro_rules! pair {
                        ($lo:expr, $hi:expr) => {
                            _mm512_inserti64x4::<1>(_mm512_castsi256_si512($lo), $hi)
                        };
                    }
                    w_al = _mm512_or_si512(w_al, pair!(fifth!(0), fifth!(2)));
                    w_ah = _mm512_or_si512(w_ah, pair!(fifth!(1), fifth!(3)));
                    w_bl = _mm512_or_si512(w_bl, pair!(fifth!(4), fifth!(6)));
                    w_bh = _mm512_or_si512(w_bh, pair!(fifth!(5), fifth!(7)));
                }
                for t in 0..N {
                    let xb = &xs[t][blk];
                    let xq = xb.qs.as_ptr();
                    macro_rules! dp {
                        ($w:expr, $at:expr) => {
                            _mm512_dpbusd_epi32(zero, $w, _mm512_load_si512(xq.add($at).cast()))
                        };
                    }
                    // The block's integer dot product, sub-block scales
                    // applied in integers (exact: |sum| < 2^23), then one
                    // conversion and one multiply-add per block. A product
                    // fits 16 bits (|p| <= 4 * 31 * 127), so `packs` of two
                    // never saturates.
                    let pa = _mm512_packs_epi32(dp!(w_al, 0), dp!(w_ah, 64));
                    let pb = _mm512_packs_epi32(dp!(w_bl, 128), dp!(w_bh, 192));
                    let acc = _mm512_dpwssd_epi32(_mm512_madd_epi16(pa, s_a), pb, s_b);
                    // Its 16 lanes folded to 8, beside the 8 mins times the
                    // sums of their 32 activations; one conversion and one
                    // multiply-add for both. Still exact: a folded lane holds
                    // at most 32 · 31 · 127 · 63 < 2^23 (Q5_K's values), a
                    // mins product 63 · 2 · 16 · 127 < 2^18.
                    let acc8 = _mm256_add_epi32(
                        _mm512_castsi512_si256(acc),
                        _mm512_extracti64x4_epi64::<1>(acc),
                    );
                    let bs = _mm256_load_si256(xb.bsums.as_ptr().cast());
                    let mins = _mm256_madd_epi16(bs, m16);
                    let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(acc8), mins);
                    facc[r][t] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(both),
                        _mm512_mul_ps(dd, _mm512_set1_ps(xb.d)),
                        facc[r][t],
                    );
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
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn row_and_x(cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
        let dev = Device::Cpu;
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let w: Vec<f32> = (0..cols).map(|_| next()).collect();
        let w = Tensor::from_vec(w, (1, cols), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let deq = q.dequantize(&dev).unwrap().flatten_all().unwrap();
        let x: Vec<f32> = (0..cols).map(|_| next()).collect();
        (q.data().unwrap().into_owned(), deq.to_vec1().unwrap(), x)
    }

    #[test]
    fn nearest_i8_rounds_half_to_even_and_saturates() {
        let cases = [
            (0.4, 0),
            (0.5, 0),
            (1.5, 2),
            (-2.5, -2),
            (-0.6, -1),
            (126.7, 127),
            (127.4, 127),
        ];
        for (v, want) in cases {
            assert_eq!(nearest_i8(v), want, "{v}");
        }
        assert_eq!(nearest_i8(-127.4), -127);
    }

    #[test]
    fn the_scalar_kernel_computes_the_dequantized_dot_product() {
        let (row, w, x) = row_and_x(1024, 1);
        let mut xq = vec![Q8K::zeros(); 4];
        quantize_q8k(&x, &mut xq);
        let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
        let norm: f32 = w.iter().map(|a| a.abs()).sum::<f32>() / 127.0 * 4.0;
        let got = dot_scalar(&row, &xq);
        assert!((got - exact).abs() < norm, "{got} vs {exact}");
    }

    #[test]
    fn kernels_compute_the_dequantized_dot_product_and_agree() {
        super::super::KernelUnderTest {
            dtype: GgmlDType::Q4K,
            block_bytes: BLOCK_BYTES,
            block_values: QK,
            halves: &[0, 2],
            quantize: quantized_q8k,
            scalar: dot_scalar,
            dot,
            dot4: dot_n::<4>,
            dot2: Some(dot2),
        }
        .check();
    }

    #[test]
    fn the_vnni_kernel_equals_the_scalar_one() {
        if !have_vnni() {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        }
        for seed in 0..8 {
            let (row, _, x) = row_and_x(4096, seed);
            let mut xq = vec![Q8K::zeros(); 16];
            quantize_q8k(&x, &mut xq);
            let (a, b) = (dot_scalar(&row, &xq), dot(&row, &xq));
            assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} vs {b}");
            // Four tokens at once give each token's own product.
            let others: Vec<Vec<Q8K>> = (1..4)
                .map(|k| {
                    let (_, _, x) = row_and_x(4096, seed * 10 + k);
                    let mut q = vec![Q8K::zeros(); 16];
                    quantize_q8k(&x, &mut q);
                    q
                })
                .collect();
            let four = dot_n(&row, [&xq, &others[0], &others[1], &others[2]]);
            assert_eq!(four[0], b);
            // Two rows at once give each row's own product, exactly.
            let (other_row, _, _) = row_and_x(4096, seed + 100);
            let two = dot2([&row, &other_row], &xq);
            assert_eq!(two, [b, dot(&other_row, &xq)]);
            for (k, x) in others.iter().enumerate() {
                let want = dot_scalar(&row, x);
                assert!((four[k + 1] - want).abs() <= 1e-4 * want.abs().max(1.0));
            }
        }
    }
}
