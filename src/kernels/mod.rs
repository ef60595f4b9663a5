//! CPU matrix kernels: quantized blocks (Q4_0, Q4_K, Q5_K, Q6_K and Q8_0 through AVX-512
//! VNNI, with panels for their prompts) and bf16, and the driver that spreads a
//! matrix product over threads; and decode attention over a KV cache read
//! in place (`attention`). Pure functions over slices, each tested against
//! a scalar reference; `model::linear` and the decoder choose among them.

pub(crate) mod attention;
pub(crate) mod bf16;
pub(crate) mod pool;
pub(crate) mod q4_0;
pub(crate) mod q4_0_panel;
pub(crate) mod q4k;
pub(crate) mod q4k_panel;
pub(crate) mod q5k;
pub(crate) mod q5k_panel;
pub(crate) mod q6k;
pub(crate) mod q6k_panel;
pub(crate) mod q8_0;
pub(crate) mod q8_0_panel;
pub(crate) mod qmatmul;
pub(crate) mod repack;

use bytes::Bytes;

/// Which kernels the rows of one product take.
///
/// The row kernels (`dot`, `dot2`, `dot_n` of each format) sum every output
/// in the same order whatever the number of rows and tokens they are given,
/// and so do the prompt kernels (the quantized panels, bf16's `vdpbf16ps`),
/// each token on its own; but the two sum differently (bf16's round the
/// activations). So the class goes with what a row is, never with how many
/// rows share a pass: generated tokens (decode) take `Rows`, prompt
/// positions (prefill) take `Prompt` whatever the chunk's size. A row's
/// result then depends neither on the batch nor on where its prompt was cut.
/// The panels cost about what a dozen tokens' products do to unpack, so a
/// prompt chunk of a few tokens is slower through them than through the row
/// kernels: the price of that independence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowClass {
    /// The row kernels, whatever the count.
    Rows,
    /// The prompt kernels where the format has them, whatever the count;
    /// the row kernels otherwise.
    Prompt,
}

/// Which kernels the rows of a product take when its first `decode` of `m`
/// rows are decode rows and the rest prompt positions: the one rule that
/// keeps each row on the kernels it would take alone, for this crate's
/// quantized and bf16 matrices alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowSplit {
    /// Every row through one class's kernels, in one pass: all decode
    /// rows, all prompt rows, or a matrix without prompt kernels (whose
    /// rows take the row kernels under either class).
    All(RowClass),
    /// Rows `..at` through the row kernels, the rest through the prompt
    /// kernels: two passes over the weights.
    At(usize),
}

impl RowSplit {
    pub fn new(decode: usize, m: usize, prompt_kernel: bool) -> Self {
        if decode == 0 || !prompt_kernel {
            Self::All(RowClass::Prompt)
        } else if decode >= m {
            Self::All(RowClass::Rows)
        } else {
            Self::At(decode)
        }
    }
}

/// `N` values collected in a `Vec` as an array (the caller made exactly `N`).
pub(crate) fn into_array<T, const N: usize>(values: Vec<T>) -> [T; N] {
    let len = values.len();
    values
        .try_into()
        .unwrap_or_else(|_| panic!("{len} values where {N} were made"))
}

/// The largest magnitude in `xs` (0 for none), or NaN when one is NaN: the
/// activation quantizers' scale. `f32::max` passes NaN over, so a NaN
/// activation became a block of zeros with a finite scale, and the product
/// hid it: a corrupt weight or an overflow upstream answered garbage instead
/// of ending in "no finite logits".
pub(crate) fn abs_max(xs: &[f32]) -> f32 {
    // Sixteen independent maxima and NaN flags in plain selects, which the
    // compiler keeps in vector registers (`maxps`, `cmpunordps`). A select
    // that let NaN through (`v.is_nan() || v.abs() > m`) compiled to a
    // branch per value: 2.4% of a step at eight sequences, more than the
    // quantizer around it. The maximum is the same in any order.
    let mut lanes = [0f32; 16];
    let mut nan = [0u32; 16];
    let mut chunks = xs.chunks_exact(16);
    for chunk in &mut chunks {
        for ((m, n), &v) in lanes.iter_mut().zip(&mut nan).zip(chunk) {
            let a = v.abs();
            *m = if a > *m { a } else { *m };
            *n |= a.is_nan() as u32;
        }
    }
    // The tail into the lanes, then the lanes halved to one, in the same
    // selects: the fold that ended this with a branch per lane (sixteen
    // compares and jumps a call) cost as much again as the loop above for
    // the 32 values of a Q8_0 block, which is what eight decode rows
    // through a Q8_0 model quantize.
    for ((m, n), &v) in lanes.iter_mut().zip(&mut nan).zip(chunks.remainder()) {
        let a = v.abs();
        *m = if a > *m { a } else { *m };
        *n |= a.is_nan() as u32;
    }
    let mut width = 8;
    while width > 0 {
        for i in 0..width {
            let other = lanes[i + width];
            lanes[i] = if other > lanes[i] { other } else { lanes[i] };
            nan[i] |= nan[i + width];
        }
        width /= 2;
    }
    if nan[0] != 0 { f32::NAN } else { lanes[0] }
}

/// Runs `f` on `x`'s values as one row-major f32 slice: borrowed from the
/// tensor's CPU storage when it is contiguous f32 (with f32 activations,
/// the inputs of the layers' products always are), else converted once. Copying them
/// out, as `to_vec1` does, held a second copy of every product's input
/// (59 MB for the FFN's down projection over a 1024-row prompt step).
pub(crate) fn with_f32<R>(
    x: &candle_core::Tensor,
    f: impl FnOnce(&[f32]) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    use candle_core::{CpuStorage, DType, Storage};
    if x.dtype() == DType::F32 {
        let (storage, layout) = x.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return f(&data[start..end]);
        }
    }
    let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    f(&values)
}

/// `data` itself when it starts on a multiple of `align` bytes, else a copy
/// that does (in a buffer of u64s: `Vec<u8>` promises no alignment). The
/// kernels read weights in place from the model file's memory map, whose
/// tensors a well-formed file aligns; a file that does not costs one copy.
pub(crate) fn aligned(data: Bytes, align: usize) -> Bytes {
    debug_assert!(align.is_power_of_two() && align <= 8);
    if (data.as_ptr() as usize).is_multiple_of(align) {
        return data;
    }
    struct Words(Vec<u64>, usize);
    impl AsRef<[u8]> for Words {
        fn as_ref(&self) -> &[u8] {
            // SAFETY: the u64s are initialised and at least `self.1` bytes long.
            unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.1) }
        }
    }
    let mut words = vec![0u64; data.len().div_ceil(8)];
    // SAFETY: `words` holds at least `data.len()` bytes and does not overlap `data`.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), words.as_mut_ptr().cast::<u8>(), data.len())
    };
    Bytes::from_owner(Words(words, data.len()))
}

#[cfg(test)]
#[test]
fn misaligned_bytes_are_copied_to_an_aligned_buffer_and_aligned_ones_are_not() {
    let buf = Bytes::from((0u8..64).collect::<Vec<u8>>());
    let odd = buf.slice(1..33);
    assert_eq!(odd.as_ptr() as usize % 2, 1);
    let fixed = aligned(odd.clone(), 8);
    assert_eq!(fixed.as_ptr() as usize % 8, 0);
    assert_eq!(fixed, odd);
    let even = buf.slice(8..40);
    if (even.as_ptr() as usize).is_multiple_of(8) {
        assert_eq!(
            aligned(even.clone(), 8).as_ptr(),
            even.as_ptr(),
            "copied needlessly"
        );
    }
}

#[cfg(test)]
#[test]
fn abs_max_is_the_largest_magnitude_or_nan_wherever_a_nan_is() {
    for len in [0, 1, 15, 16, 17, 32, 33, 256] {
        let xs = test_values(len, len as u64 + 3);
        let want = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(abs_max(&xs).to_bits(), want.to_bits(), "{len} values");
        // The largest magnitude negative, in the vector lanes and the tail.
        for at in [0, len / 2, len.saturating_sub(1)].into_iter().take(len) {
            let mut ys = xs.clone();
            ys[at] = -7.5;
            assert_eq!(abs_max(&ys), 7.5, "{len} values, -7.5 at {at}");
            ys[at] = f32::NAN;
            assert!(abs_max(&ys).is_nan(), "{len} values, NaN at {at}");
            ys[at] = f32::INFINITY;
            assert_eq!(abs_max(&ys), f32::INFINITY, "{len} values, inf at {at}");
        }
    }
}

/// Whether this CPU executes 512-bit instructions as two 256-bit halves
/// (AMD's Zen 4: family 25 with AVX-512; Zen 5 and Intel's AVX-512 cores
/// run them whole), which doubles the cost of an instruction-bound kernel
/// and so changes which kernel is fastest (`QuantMatrix::q8_0_one_token`).
/// Read once, from CPUID.
pub(crate) fn avx512_on_halves() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HALVES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HALVES.get_or_init(|| {
            use std::arch::x86_64::__cpuid;
            let (vendor, signature) = (__cpuid(0), __cpuid(1).eax);
            let amd =
                (vendor.ebx, vendor.edx, vendor.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163);
            amd && cpu_family(signature) == 25 && std::is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The display family of a CPUID leaf-1 signature: the base family, plus the
/// extended family when the base is 15 (Intel's and AMD's rule).
fn cpu_family(signature: u32) -> u32 {
    let base = (signature >> 8) & 0xF;
    if base == 0xF {
        base + ((signature >> 20) & 0xFF)
    } else {
        base
    }
}

#[test]
fn cpu_families_read_as_cpuinfo_prints_them() {
    // Zen 4 (EPYC 9004), Zen 5 (EPYC 9005), a Sapphire Rapids Xeon.
    assert_eq!(cpu_family(0x00A1_0F11), 25);
    assert_eq!(cpu_family(0x00B0_0F21), 26);
    assert_eq!(cpu_family(0x0008_06F8), 6);
}

/// How far ahead of the block being multiplied the row kernels prefetch,
/// in bytes. Measured on a 7B model (Q4_K_M, Q8_0) on this project's 2-core
/// EPYC: the previous distance of two blocks (288 bytes for Q4_K) left a
/// batch of 8 decode rows waiting on the weight loads (a third of the
/// kernel's samples on the load instructions), at 14.2–14.9 tok/s; 2 KiB
/// gave 15.9–16.5. A longer loop per block (more tokens) hides less of the
/// latency behind the hardware prefetcher, so the distance in bytes has to
/// grow. The machine's memory is shared and its speed drifts; when it is
/// fast (a read probe of 60+ GB/s) one row's generation needs more: 4 KiB
/// against 2 KiB, interleaved, Q4_K_M 12.26–12.39 → 13.45–13.77 tok/s (five
/// rounds in two sittings) and Q8_0 7.62–7.78 → 8.61–8.63 (two rounds of
/// three); when it is slow, within ±3% (Q4_K_M 9.92–10.05 → 10.02–10.16,
/// Q8_0 6.12–6.16 → 5.80–6.04); 6 and 8 KiB were 1–3% slower than 4 there.
/// Eight decode rows: 34.4–35.2 → 35.5–35.9 tok/s.
pub(crate) const PREFETCH_BYTES: usize = 4096;

/// Asks for the cache lines at `PREFETCH_BYTES + offsets[i]` past `at` (a
/// row kernel's block): the blocks a row kernel reads next.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_ahead(at: *const u8, offsets: &[usize]) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    for &offset in offsets {
        // SAFETY: a prefetch never faults, wherever it points.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH_BYTES + offset).cast()) };
    }
}

/// A row kernel's sixteen f32 accumulator lanes for one row and token: what
/// its last step sums (`reduce_lanes`), and what it carries from one span
/// of a row's blocks to the next (`qmatmul::in_tiles`).
pub(crate) type Lanes = [f32; 16];

/// The sum of a row kernel's accumulator lanes (`_mm512_reduce_add_ps`):
/// every row kernel's last step, whether it took the row whole or the
/// caller took it in spans, so both give the same bits.
pub(crate) fn reduce_lanes(lanes: &Lanes) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if q4k::have_vnni() {
        // SAFETY: AVX-512F comes with the VNNI kernels' features.
        return unsafe { reduce_lanes_avx512(lanes) };
    }
    // Without AVX-512 no kernel fills lanes (rows are taken whole).
    reduce_lanes_scalar(lanes)
}

/// `reduce_lanes` in plain Rust, in the intrinsic's order: halves,
/// quarters, pairs, the two.
fn reduce_lanes_scalar(lanes: &Lanes) -> f32 {
    let fold = |l: &[f32]| -> Vec<f32> {
        let (a, b) = l.split_at(l.len() / 2);
        a.iter().zip(b).map(|(a, b)| a + b).collect()
    };
    let four = fold(&fold(lanes));
    let two = [four[0] + four[2], four[1] + four[3]];
    two[0] + two[1]
}

#[test]
fn the_plain_lane_sum_has_the_intrinsics_bits() {
    if !q4k::have_vnni() {
        eprintln!("no AVX-512 on this CPU: nothing to compare");
        return;
    }
    for seed in 0..64 {
        // Magnitudes over six decades, so the order of the sums shows.
        let values = test_values(32, seed);
        let lanes: Lanes =
            std::array::from_fn(|i| values[i] * 10f32.powi((values[16 + i] * 3.0) as i32));
        assert_eq!(
            reduce_lanes(&lanes).to_bits(),
            reduce_lanes_scalar(&lanes).to_bits(),
            "seed {seed}"
        );
    }
    // (A left-to-right sum fails this: checked.)
}

/// `reduce_lanes_avx512` of every row's and token's lanes: the row
/// kernels' last step.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn reduce_each<const R: usize, const N: usize>(
    lanes: &[[Lanes; N]; R],
) -> [[f32; N]; R] {
    // Loops, not `map`: a closure does not take this function's features,
    // and the sum would not inline into it.
    let mut out = [[0f32; N]; R];
    for (out, lanes) in out.iter_mut().zip(lanes) {
        for (out, lanes) in out.iter_mut().zip(lanes) {
            // SAFETY: the caller vouches for the CPU.
            *out = unsafe { reduce_lanes_avx512(lanes) };
        }
    }
    out
}

/// `reduce_lanes` inside the kernels, where it inlines (a call per output,
/// with `reduce_lanes`' feature check, was 1.8% of a step of eight
/// sequences).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn reduce_lanes_avx512(lanes: &Lanes) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: 16 f32s read from an array of 16; the caller vouches for
    // the CPU.
    unsafe { _mm512_reduce_add_ps(_mm512_loadu_ps(lanes.as_ptr())) }
}

/// Deterministic values in [-1, 1) for the kernels' tests (an LCG: the same
/// inputs on every run, so a tolerance that holds once holds always).
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// What a row kernel for format `dtype` is held to, on six deterministic
/// rows of 4096 values and four tokens each: its scalar reference equals the
/// dot product with candle's dequantization up to the activations' 8-bit
/// rounding (2% of the products' magnitudes), and its `dot` and `dot4`
/// equal the scalar reference to 1e-4, and to 1e-5 on blocks of extreme
/// bytes against activations of ±127 (the largest products a kernel's
/// integer lanes must hold); its `dot2`, if any, is bitwise `dot` twice.
#[cfg(test)]
pub(crate) struct KernelUnderTest<X> {
    pub dtype: candle_core::quantized::GgmlDType,
    pub block_bytes: usize,
    pub block_values: usize,
    /// Offsets of the block's f16 fields (set to 1.0 in the extreme blocks,
    /// which would otherwise be NaN or zero).
    pub halves: &'static [usize],
    pub quantize: fn(&[f32]) -> Vec<X>,
    pub scalar: fn(&[u8], &[X]) -> f32,
    pub dot: fn(&[u8], &[X]) -> f32,
    pub dot4: fn(&[u8], [&[X]; 4]) -> [f32; 4],
    /// The two-row kernel of generation, where the format has one.
    pub dot2: Option<Dot2<X>>,
}

/// A format's two-row kernel (`dot2`).
#[cfg(test)]
pub(crate) type Dot2<X> = fn([&[u8]; 2], &[X]) -> [f32; 2];

#[cfg(test)]
impl<X> KernelUnderTest<X> {
    pub fn check(&self) {
        use candle_core::quantized::QTensor;
        use candle_core::{Device, Tensor};
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * b.abs().max(1.0);
        for seed in 0..6 {
            let cols = 4096;
            let w = Tensor::from_vec(test_values(cols, seed), (1, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, self.dtype).unwrap();
            let deq: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let row = q.data().unwrap().into_owned();
            assert_eq!(row.len(), cols / self.block_values * self.block_bytes);
            let xs: Vec<Vec<f32>> = (0..4)
                .map(|k| test_values(cols, 100 + seed * 4 + k))
                .collect();
            let xq: Vec<Vec<X>> = xs.iter().map(|x| (self.quantize)(x)).collect();
            for (x, xq) in xs.iter().zip(&xq) {
                let exact: f32 = deq.iter().zip(x).map(|(a, b)| a * b).sum();
                let scale: f32 = deq.iter().zip(x).map(|(a, b)| (a * b).abs()).sum();
                let scalar = (self.scalar)(&row, xq);
                assert!((scalar - exact).abs() < 0.02 * scale, "{scalar} vs {exact}");
                let one = (self.dot)(&row, xq);
                assert!(close(one, scalar), "{one} vs {scalar}");
            }
            // Two rows at once give each row's own product, bitwise (a
            // row's result must not depend on what shares its pass).
            if let Some(dot2) = self.dot2 {
                let other = QTensor::quantize(&w.neg().unwrap(), self.dtype).unwrap();
                let other = other.data().unwrap().into_owned();
                let want = [(self.dot)(&row, &xq[0]), (self.dot)(&other, &xq[0])];
                assert_eq!(dot2([&row, &other], &xq[0]), want, "dot2");
            }
            let four = (self.dot4)(&row, [&xq[0], &xq[1], &xq[2], &xq[3]]);
            for (got, xq) in four.iter().zip(&xq) {
                let scalar = (self.scalar)(&row, xq);
                assert!(close(*got, scalar), "{got} vs {scalar}");
            }
        }
        let cols = 1024;
        let blocks = cols / self.block_values;
        let xs = [1f32, -1.0].map(|v| (self.quantize)(&vec![v; cols]));
        for fill in [0xFFu8, 0x7F, 0x80, 0xAA, 0x55, 0x00] {
            let mut row = vec![fill; blocks * self.block_bytes];
            for block in row.chunks_exact_mut(self.block_bytes) {
                for &at in self.halves {
                    block[at..at + 2].copy_from_slice(&half::f16::ONE.to_le_bytes());
                }
            }
            for x in &xs {
                // Integer products are exact, so only the float sums' order
                // differs: 1e-5 (an off-by-one in a lane's product is 6e-5).
                let (scalar, one) = ((self.scalar)(&row, x), (self.dot)(&row, x));
                let tight = (one - scalar).abs() <= 1e-5 * scalar.abs().max(1.0);
                assert!(tight, "fill {fill:#x}: {one} vs {scalar}");
                let four = (self.dot4)(&row, [x, x, x, x]);
                assert!(
                    four.iter().all(|&v| v == one),
                    "fill {fill:#x}: {four:?} vs {one}"
                );
            }
        }
    }
}
