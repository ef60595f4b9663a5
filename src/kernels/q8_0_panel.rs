//! Prompt processing over Q8_0 weights, sixteen rows per panel: the Q8_0
//! counterpart of `q4k_panel` (see there for why panels).
//!
//! `vpdpbusd` multiplies unsigned by signed bytes. The row kernel (`q8_0`)
//! takes |w| and moves w's sign onto x, once per token; here the sign bit
//! of each weight is flipped once, at packing, so the panel holds
//! `w + 128` and each block's result is corrected by `128 · Σx`, which the
//! activations carry.
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
/// reference, and what rows outside a whole panel take.
pub fn dot_scalar(row: &[u8], x: &[Q8Sum]) -> f32 {
    row.chunks_exact(BLOCK_BYTES)
        .zip(x)
        .map(|(b, xb)| {
            let d = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            let isum: i32 = b[2..]
                .iter()
                .zip(&xb.qs)
                .map(|(&w, &x)| w as i8 as i32 * x as i32)
                .sum();
            d * xb.d * isum as f32
        })
        .sum()
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
