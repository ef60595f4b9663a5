//! Prompt processing over Q6_K weights: sixteen weight rows at a time,
//! unpacked once into a cache-resident panel that every prompt token then
//! streams through (the scheme of `q4k_panel`, which says why).
//!
//! A Q4_K_M file keeps about a fifth of its bytes in Q6_K (`output.weight`,
//! half of `ffn_down` and `attn_v`); through the row kernel a prompt pays
//! one conversion, scale product and FMA per block, row and token. Here a
//! zmm lane holds one of sixteen rows: one `vpdpbusd` advances sixteen rows
//! by four values, and each 16-value sub-block's scale is applied once for
//! sixteen rows. The stored `q` (0..63) is the unsigned side of the
//! product; the `−32` of every value comes back as `32 · Σx` per sub-block,
//! subtracted in integers from the activations' block sums.

use super::q4k::{CHUNK_ORDER, Q8K};
use super::q4k_panel::{Line, ROWS, TOKENS, by_groups};
use super::q6k::BLOCK_BYTES;

/// Lines per unpacked block: 64 of weights (16 sub-blocks × 4 groups of
/// four values), 16 of `d·scale` (f32).
const LINES: usize = 64 + 16;
const SCALES_AT: usize = 64;

/// Sixteen rows of Q6_K blocks unpacked for `vpdpbusd`: for block `b`,
/// sub-block `s` (16 values) and group `g`, line `b·LINES + 4s + g` holds,
/// in lane `r`, the stored values `q` (0..63) of values `16s + 4g..+4` of
/// row `r`, one per byte.
pub struct Panel {
    lines: Vec<Line>,
    blocks: usize,
}

impl Panel {
    pub fn new() -> Self {
        Self {
            lines: Vec::new(),
            blocks: 0,
        }
    }

    /// Whether this CPU has the instructions (`q4k::have_vnni`).
    pub fn available() -> bool {
        super::q4k::have_vnni()
    }

    /// Unpacks the `ROWS` rows that start at `rows[0]`, each `row_bytes`
    /// long and `row_bytes` apart.
    ///
    /// # Panics
    /// If `rows` holds fewer than `ROWS` rows, or the CPU lacks the
    /// instructions (check `available` first).
    pub fn pack(&mut self, rows: &[u8], row_bytes: usize) {
        assert!(Self::available(), "the Q6_K panel needs AVX-512 VNNI");
        assert!(rows.len() >= ROWS * row_bytes, "fewer than {ROWS} rows");
        assert!(row_bytes.is_multiple_of(BLOCK_BYTES) && row_bytes * ROWS < i32::MAX as usize);
        self.blocks = row_bytes / BLOCK_BYTES;
        self.lines.resize(self.blocks * LINES, Line([0; 64]));
        // SAFETY: the features were checked above; the reads stay inside
        // `rows` (checked long enough) and the writes inside `self.lines`.
        unsafe { pack_avx512(rows, row_bytes, self.blocks, &mut self.lines) }
    }

    /// `out[t·stride + r] = row r · token t` for every token of `xs` (each
    /// `blocks` Q8_K blocks) and the `ROWS` rows of the last `pack`.
    pub fn multiply(&self, xs: &[&[Q8K]], out: &mut [f32], stride: usize) {
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
        xs: &[&[Q8K]],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the caller checked the features, that each `xs[t]` holds
        // `self.blocks` blocks and that `out` reaches row `N - 1`'s lanes.
        unsafe {
            use std::arch::x86_64::*;
            let lines = self.lines.as_ptr();
            let mut facc = [_mm512_setzero_ps(); N];
            for b in 0..self.blocks {
                let p = lines.add(b * LINES);
                let mut bacc = [_mm512_setzero_ps(); N];
                // Two sub-blocks at a time: 2N independent `vpdpbusd` chains.
                for s in (0..16).step_by(2) {
                    let mut iacc = [[_mm512_setzero_si512(); N]; 2];
                    for g in 0..4 {
                        for h in 0..2 {
                            let w = _mm512_load_si512(p.add(4 * (s + h) + g).cast());
                            let v = 16 * (s + h) + 4 * g;
                            let at = CHUNK_ORDER[v / 32] * 32 + v % 32;
                            for t in 0..N {
                                let x = xs[t][b].qs.as_ptr().add(at);
                                let x4 =
                                    _mm512_set1_epi32(std::ptr::read_unaligned(x.cast::<i32>()));
                                iacc[h][t] = _mm512_dpbusd_epi32(iacc[h][t], w, x4);
                            }
                        }
                    }
                    for h in 0..2 {
                        let scale = _mm512_load_ps(p.add(SCALES_AT + s + h).cast());
                        for t in 0..N {
                            // Σ(q − 32)·x = Σq·x − 32·Σx, exact in integers.
                            let offset = _mm512_set1_epi32(32 * i32::from(xs[t][b].bsums[s + h]));
                            let sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(iacc[h][t], offset));
                            bacc[t] = _mm512_fmadd_ps(sum, scale, bacc[t]);
                        }
                    }
                }
                for t in 0..N {
                    facc[t] = _mm512_fmadd_ps(bacc[t], _mm512_set1_ps(xs[t][b].d), facc[t]);
                }
            }
            for t in 0..N {
                _mm512_storeu_ps(out.as_mut_ptr().add(t * stride), facc[t]);
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn multiply_avx512<const N: usize>(&self, _: &[&[Q8K]], _: &mut [f32], _: usize) {
        unreachable!("available() is false off x86-64")
    }
}

impl Default for Panel {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn pack_avx512(rows: &[u8], row_bytes: usize, blocks: usize, lines: &mut [Line]) {
    // SAFETY: the caller checked the features, that `rows` holds ROWS rows
    // of `row_bytes`, and that `lines` holds `blocks · LINES` lines; every
    // gather reads 4 bytes inside a block (the last at byte 206..210).
    unsafe {
        use std::arch::x86_64::*;
        let index = super::q4k_panel::row_offsets(row_bytes);
        // One dword of each of the sixteen rows, at byte `at` of each row.
        let gather = |at: usize| _mm512_i32gather_epi32::<1>(index, rows.as_ptr().add(at).cast());
        let nib = _mm512_set1_epi32(0x0F0F_0F0F);
        let low2 = _mm512_set1_epi32(0x0303_0303);
        let out = lines.as_mut_ptr();
        for b in 0..blocks {
            let at = b * BLOCK_BYTES;
            super::q4k_panel::prefetch_rows(rows, row_bytes, at, BLOCK_BYTES);
            let p = out.add(b * LINES);
            // Value 128n + 32k + l (l < 32): the low (k < 2) or high nibble
            // of ql[64n + 32(k mod 2) + l], and bits 2k, 2k+1 of qh[32n + l]
            // (see `q6k`); four consecutive l per dword.
            for n in 0..2 {
                for k in 0..4 {
                    for j in 0..8 {
                        let l = 4 * j;
                        let ql = gather(at + 64 * n + 32 * (k % 2) + l);
                        let low = if k < 2 {
                            _mm512_and_si512(ql, nib)
                        } else {
                            _mm512_and_si512(_mm512_srli_epi32::<4>(ql), nib)
                        };
                        let qh = gather(at + 128 + 32 * n + l);
                        let shift = _mm512_set1_epi32(2 * k as i32);
                        let high = _mm512_and_si512(_mm512_srlv_epi32(qh, shift), low2);
                        let q = _mm512_or_si512(low, _mm512_slli_epi32::<4>(high));
                        let v = 128 * n + 32 * k + l;
                        _mm512_store_si512(p.add(4 * (v / 16) + (v % 16) / 4).cast(), q);
                    }
                }
            }
            // d: the high half of the dword at byte 206.
            let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(gather(
                at + 206,
            ))));
            // The 16 signed scales, four per dword, each sign-extended.
            for i in 0..4 {
                let sc = gather(at + 192 + 4 * i);
                for (j, shift) in [24, 16, 8, 0].into_iter().enumerate() {
                    let v =
                        _mm512_srai_epi32::<24>(_mm512_sllv_epi32(sc, _mm512_set1_epi32(shift)));
                    let scale = _mm512_mul_ps(_mm512_cvtepi32_ps(v), d);
                    _mm512_store_ps(p.add(SCALES_AT + 4 * i + j).cast(), scale);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_avx512(_: &[u8], _: usize, _: usize, _: &mut [Line]) {
    unreachable!("available() is false off x86-64")
}

#[cfg(test)]
mod tests {
    use super::super::q6k::dot_scalar;
    use super::super::qmatmul::check_panel;
    use super::*;

    /// Extreme blocks: stored values all 63, all 0, or mixed; every scale
    /// −128, or sixteen different scales of both signs, so a scale sent to
    /// the wrong sub-block shows.
    #[test]
    fn a_panel_computes_what_the_scalar_kernel_does() {
        let extreme = |i: usize, block: &mut [u8]| {
            block[..192].fill([0xFFu8, 0x00, 0x80, 0x7F, 0xAA, 0x55][i % 6]);
            for (s, scale) in block[192..208].iter_mut().enumerate() {
                *scale = if i.is_multiple_of(2) {
                    0x80
                } else {
                    (37 * s) as u8
                };
            }
            block[208..].copy_from_slice(&half::f16::ONE.to_le_bytes());
        };
        check_panel::<Panel>(
            candle_core::quantized::GgmlDType::Q6K,
            1024,
            extreme,
            dot_scalar,
        );
    }
}
