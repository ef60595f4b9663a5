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
use super::q4k_panel::{Line, PREFETCH_BLOCKS, ROWS, TOKENS, WIDE, by_groups};
use super::q6k::BLOCK_BYTES;

/// Lines per unpacked block: 64 of weights (16 sub-blocks × 4 groups of
/// four values), 16 of `d·scale` (f32).
const LINES: usize = 64 + 16;
const SCALES_AT: usize = 64;

/// Lines per block of a [`Repacked`] group: the 52 dwords of a block's
/// bytes 0..208, then the dword at byte 206 (`d` in its high half).
pub(super) const REPACKED_LINES: usize = 53;

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
        unsafe { pack_avx512::<false>(rows, row_bytes, self.blocks, &mut self.lines) }
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
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
    unsafe fn multiply_avx512<const N: usize>(
        &self,
        xs: &[&[Q8K]],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: as the caller's; the panel holds `blocks · LINES` lines.
        unsafe { multiply_blocks::<N, false>(self.lines.as_ptr(), self.blocks, xs, out, stride) }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn multiply_avx512<const N: usize>(&self, _: &[&[Q8K]], _: &mut [f32], _: usize) {
        unreachable!("available() is false off x86-64")
    }

    /// `pack` of group `g` of a [`Repacked`] matrix: the same panel, from
    /// aligned loads rather than gathers.
    ///
    /// # Panics
    /// If `g` is not one of its groups.
    pub fn pack_repacked(&mut self, repacked: &Repacked, g: usize) {
        assert!(g < repacked.groups, "group {g} of {}", repacked.groups);
        self.blocks = repacked.blocks;
        self.lines.resize(self.blocks * LINES, Line([0; 64]));
        // SAFETY: `Repacked::new` checked the features; the group holds
        // `blocks · REPACKED_LINES` aligned lines, `self.lines` `blocks ·
        // LINES`.
        unsafe { pack_avx512::<true>(repacked.group(g), 0, self.blocks, &mut self.lines) }
    }
}

/// `out[t·stride + r] = row r · token t` over `blocks` blocks of sixteen
/// rows, for the `N` tokens of `xs` (up to `WIDE`), from a panel's lines
/// or, `REPACKED`, from a repacked group's (each block unpacked into a
/// panel block in L1 first, with the same operations `pack` uses, so the
/// bits are the panel's).
///
/// # Safety
/// The CPU has the features; `lines` holds `blocks` blocks of `LINES`
/// lines (`REPACKED_LINES` when `REPACKED`); each `xs[t]` holds `blocks`
/// blocks; `out` reaches token `N - 1`'s sixteen lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
// `t` indexes the accumulators and the tokens alike.
#[allow(clippy::needless_range_loop)]
unsafe fn multiply_blocks<const N: usize, const REPACKED: bool>(
    lines: *const Line,
    blocks: usize,
    xs: &[&[Q8K]],
    out: &mut [f32],
    stride: usize,
) {
    // SAFETY: as the caller's.
    unsafe {
        use std::arch::x86_64::*;
        let mut block = [Line([0; 64]); LINES];
        let mut facc = [_mm512_setzero_ps(); N];
        for b in 0..blocks {
            let p = if REPACKED {
                // The lines four blocks ahead into L2, as
                // `q4k_panel::Repacked::multiply` asks for them, here for
                // one token too: a block's unpack left the hardware's
                // stream behind (kernels bench, `--rows 1 --cols 14336`,
                // Q6_K, GB/s streamed, 2 threads, Zen 4 EPYC: 13.6 without,
                // 26 with, the row kernel 20-25).
                let src = lines.add(b * REPACKED_LINES);
                {
                    let ahead = src.wrapping_add(PREFETCH_BLOCKS * REPACKED_LINES);
                    for l in 0..REPACKED_LINES {
                        // SAFETY: a prefetch never faults, wherever it points.
                        _mm_prefetch::<_MM_HINT_T2>(ahead.wrapping_add(l).cast());
                    }
                }
                unpack_block::<true>(src.cast(), 0, 0, block.as_mut_ptr());
                block.as_ptr()
            } else {
                lines.add(b * LINES)
            };
            // `TOKENS` at a time (their accumulators fill the registers),
            // the block's lines read again from L1 for each.
            for c in (0..N).step_by(TOKENS) {
                let count = (N - c).min(TOKENS);
                let mut bacc = [_mm512_setzero_ps(); TOKENS];
                // Two sub-blocks at a time: 2N independent `vpdpbusd` chains.
                for s in (0..16).step_by(2) {
                    let mut iacc = [[_mm512_setzero_si512(); TOKENS]; 2];
                    for g in 0..4 {
                        for h in 0..2 {
                            let w = _mm512_load_si512(p.add(4 * (s + h) + g).cast());
                            let v = 16 * (s + h) + 4 * g;
                            let at = CHUNK_ORDER[v / 32] * 32 + v % 32;
                            for t in 0..count {
                                let x = xs[c + t][b].qs.as_ptr().add(at);
                                let x4 =
                                    _mm512_set1_epi32(std::ptr::read_unaligned(x.cast::<i32>()));
                                iacc[h][t] = _mm512_dpbusd_epi32(iacc[h][t], w, x4);
                            }
                        }
                    }
                    for h in 0..2 {
                        let scale = _mm512_load_ps(p.add(SCALES_AT + s + h).cast());
                        for t in 0..count {
                            // Σ(q − 32)·x = Σq·x − 32·Σx, exact in integers.
                            let sums = i32::from(xs[c + t][b].bsums[s + h]);
                            let offset = _mm512_set1_epi32(32 * sums);
                            let sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(iacc[h][t], offset));
                            bacc[t] = _mm512_fmadd_ps(sum, scale, bacc[t]);
                        }
                    }
                }
                for t in 0..count {
                    let d = _mm512_set1_ps(xs[c + t][b].d);
                    facc[c + t] = _mm512_fmadd_ps(bacc[t], d, facc[c + t]);
                }
            }
        }
        for t in 0..N {
            _mm512_storeu_ps(out.as_mut_ptr().add(t * stride), facc[t]);
        }
    }
}

impl Default for Panel {
    fn default() -> Self {
        Self::new()
    }
}

/// A Q6_K matrix's whole groups of sixteen rows with their blocks
/// interleaved by dwords (`q4k_panel::Repacked`'s scheme): for group `g`,
/// block `b` and line `w` of a block (`REPACKED_LINES`), line
/// `(g · blocks + b) · 53 + w` holds, in lane `r`, dword `w` of block `b`
/// of row `16g + r`. One line a block more than the rows' bytes (the
/// 2-byte `d` gets a lane each): 3392 bytes a group-block against 3360,
/// 1% more.
pub struct Repacked {
    lines: Vec<Line>,
    blocks: usize,
    groups: usize,
}

impl Repacked {
    /// The whole groups of sixteen rows of the Q6_K matrix `data` (`rows`
    /// rows of `row_bytes`), over the thread pool when `parallel`; rows past
    /// the last whole group are left out. `None` without AVX-512 (the
    /// panels' CPUs), without a whole group, or without memory for it.
    ///
    /// # Panics
    /// If `data` is shorter than `rows` rows or `row_bytes` is not whole
    /// blocks.
    pub fn new(data: &[u8], rows: usize, row_bytes: usize, parallel: bool) -> Option<Self> {
        assert!(row_bytes.is_multiple_of(BLOCK_BYTES) && data.len() >= rows * row_bytes);
        let groups = rows / ROWS;
        if !Panel::available() || groups == 0 || row_bytes * ROWS >= i32::MAX as usize {
            return None;
        }
        let blocks = row_bytes / BLOCK_BYTES;
        let lines = super::repack::interleaved(
            data,
            groups,
            row_bytes,
            blocks * REPACKED_LINES,
            parallel,
            // SAFETY: `available` checked the features; `interleaved` gives
            // the group's sixteen rows and its `blocks · 53` lines.
            |rows, out| unsafe { interleave_avx512(rows, row_bytes, blocks, out) },
        )?;
        Some(Self {
            lines,
            blocks,
            groups,
        })
    }

    /// Whole groups of sixteen rows held.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Group `g`'s lines, as bytes (`Panel::pack_repacked`'s input).
    pub fn group(&self, g: usize) -> &[u8] {
        let per_group = self.blocks * REPACKED_LINES;
        let lines = &self.lines[g * per_group..(g + 1) * per_group];
        // SAFETY: `Line` is 64 plain bytes; the slice covers exactly them.
        unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * 64) }
    }

    /// `out[t·stride + r] = row 16g + r · token t` for every token of `xs`
    /// (each `blocks` Q8_K blocks), up to eight tokens a pass over the
    /// group: up to four with each line's values built in registers as
    /// they are multiplied (`multiply_direct`), five to eight from each
    /// block unpacked once into an L1 panel block (`multiply_blocks`), then
    /// multiplied as the panel does. Bitwise the panel's result. In cache
    /// (kernels bench, `--rows M`, 2 threads, Zen 4 EPYC, rows x GB/s):
    /// one token 70 built in registers, 51 through the unpacked block (the
    /// row kernel 48-51); four 168 and 141.
    ///
    /// # Panics
    /// If `g` is not one of the groups, a token holds fewer blocks than a
    /// row, or `out` does not reach the last token's sixteen lanes.
    pub fn multiply(&self, g: usize, xs: &[&[Q8K]], out: &mut [f32], stride: usize) {
        assert!(g < self.groups, "group {g} of {}", self.groups);
        super::q4k_panel::check(xs, self.blocks, out, stride);
        let lines = self.group(g).as_ptr().cast::<Line>();
        for (c, xs) in xs.chunks(WIDE).enumerate() {
            let out = &mut out[c * WIDE * stride..];
            let blocks = self.blocks;
            // SAFETY: `check` checked the features (as `new` did), the
            // activations' lengths and the output's size; the group holds
            // `blocks · REPACKED_LINES` lines.
            unsafe {
                match xs.len() {
                    1 => multiply_direct::<1>(lines, blocks, xs, out, stride),
                    2 => multiply_direct::<2>(lines, blocks, xs, out, stride),
                    3 => multiply_direct::<3>(lines, blocks, xs, out, stride),
                    4 => multiply_direct::<4>(lines, blocks, xs, out, stride),
                    5 => multiply_blocks::<5, true>(lines, blocks, xs, out, stride),
                    6 => multiply_blocks::<6, true>(lines, blocks, xs, out, stride),
                    7 => multiply_blocks::<7, true>(lines, blocks, xs, out, stride),
                    _ => multiply_blocks::<WIDE, true>(lines, blocks, xs, out, stride),
                }
            }
        }
    }
}

/// `multiply_blocks::<N, true>` for up to `TOKENS` tokens without the
/// unpacked block: each line's values built in registers as they are
/// multiplied (the `vpdpbusd` sums are exact integers, so their order is
/// free; every float operation is the panel's, in its order).
///
/// # Safety
/// As `multiply_blocks`, with `N <= TOKENS`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
#[allow(clippy::needless_range_loop)]
unsafe fn multiply_direct<const N: usize>(
    lines: *const Line,
    blocks: usize,
    xs: &[&[Q8K]],
    out: &mut [f32],
    stride: usize,
) {
    // SAFETY: as the caller's.
    unsafe {
        use std::arch::x86_64::*;
        let nib = _mm512_set1_epi32(0x0F0F_0F0F);
        let high = _mm512_set1_epi32(0x3030_3030);
        let mut facc = [_mm512_setzero_ps(); N];
        for b in 0..blocks {
            let p = lines.add(b * REPACKED_LINES);
            // The block `PREFETCH_BLOCKS` ahead into L2, one line per line
            // multiplied rather than all at the block's start: in a burst,
            // one token streamed at about half the row kernel's rate
            // (kernels bench, `--rows 1`, Q6_K, 2 threads, Zen 4 EPYC, GB/s:
            // 14.8-17.3 in a burst, 29.7-31.3 spread, the row kernel 26-33).
            let ahead = p.wrapping_add(PREFETCH_BLOCKS * REPACKED_LINES);
            let line = |w: usize| _mm512_load_si512(p.add(w).cast());
            let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(line(
                REPACKED_LINES - 1,
            ))));
            let mut bacc = [_mm512_setzero_ps(); N];
            // Sub-blocks 8n + 2k and 8n + 2k + 1: values 128n + 32k + 4j
            // (j < 8) from dword 16n + 8(k mod 2) + j of `ql` and 32 + 8n +
            // j of `qh` (see `unpack_block`).
            for n in 0..2 {
                for k in 0..4 {
                    let s = 8 * n + 2 * k;
                    let mut iacc = [[_mm512_setzero_si512(); N]; 2];
                    for j in 0..8 {
                        let i = 32 * n + 8 * k + j;
                        if i < REPACKED_LINES {
                            // SAFETY: a prefetch never faults, wherever it
                            // points.
                            _mm_prefetch::<_MM_HINT_T2>(ahead.wrapping_add(i).cast());
                        }
                        let ql = line(16 * n + 8 * (k % 2) + j);
                        let qh = line(32 + 8 * n + j);
                        let low = match k < 2 {
                            true => _mm512_and_si512(ql, nib),
                            false => _mm512_and_si512(_mm512_srli_epi32::<4>(ql), nib),
                        };
                        // Bits 2k, 2k+1 of each byte moved to bits 4, 5.
                        let up = match k {
                            0 => _mm512_slli_epi32::<4>(qh),
                            1 => _mm512_slli_epi32::<2>(qh),
                            2 => qh,
                            _ => _mm512_srli_epi32::<2>(qh),
                        };
                        // low | (up & 0x30)
                        let q = _mm512_ternarylogic_epi32::<0xF8>(low, up, high);
                        let v = 128 * n + 32 * k + 4 * j;
                        let at = CHUNK_ORDER[v / 32] * 32 + v % 32;
                        for t in 0..N {
                            let x = xs[t][b].qs.as_ptr().add(at);
                            let x4 = _mm512_set1_epi32(std::ptr::read_unaligned(x.cast::<i32>()));
                            iacc[j / 4][t] = _mm512_dpbusd_epi32(iacc[j / 4][t], q, x4);
                        }
                    }
                    for h in 0..2 {
                        // What `unpack_block` computes for the scale line.
                        let (i, byte) = ((s + h) / 4, (s + h) % 4);
                        let shift = _mm512_set1_epi32(24 - 8 * byte as i32);
                        let sc = _mm512_srai_epi32::<24>(_mm512_sllv_epi32(line(48 + i), shift));
                        let scale = _mm512_mul_ps(_mm512_cvtepi32_ps(sc), d);
                        for t in 0..N {
                            let sums = i32::from(xs[t][b].bsums[s + h]);
                            let offset = _mm512_set1_epi32(32 * sums);
                            let sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(iacc[h][t], offset));
                            bacc[t] = _mm512_fmadd_ps(sum, scale, bacc[t]);
                        }
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

/// The panel of `blocks` blocks of sixteen rows: from the rows (`rows[0]`
/// on, `row_bytes` apart) by gathers, or, `REPACKED`, from a repacked
/// group's lines (`rows`; `row_bytes` unused) by aligned loads.
///
/// # Safety
/// The CPU has the features; `rows` holds sixteen rows of `row_bytes`
/// (`blocks · REPACKED_LINES` lines when `REPACKED`); `lines` holds
/// `blocks · LINES` lines.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn pack_avx512<const REPACKED: bool>(
    rows: &[u8],
    row_bytes: usize,
    blocks: usize,
    lines: &mut [Line],
) {
    // SAFETY: as the caller's.
    unsafe {
        for b in 0..blocks {
            if !REPACKED {
                super::q4k_panel::prefetch_rows(rows, row_bytes, b * BLOCK_BYTES, BLOCK_BYTES);
            }
            let (src, at) = match REPACKED {
                true => (rows.as_ptr().add(b * REPACKED_LINES * 64), 0),
                false => (rows.as_ptr(), b * BLOCK_BYTES),
            };
            unpack_block::<REPACKED>(src, row_bytes, at, lines.as_mut_ptr().add(b * LINES));
        }
    }
}

/// One block of sixteen rows into a panel block's `LINES` lines at `out`:
/// from the block that starts at byte `at` of each row (`src` the first
/// row, rows `row_bytes` apart) by gathers, or, `REPACKED`, from the
/// block's `REPACKED_LINES` aligned lines at `src`.
///
/// # Safety
/// The CPU has the features; `src` holds what is read (every gather reads 4
/// bytes inside a block, the last at byte 206..210); `out` holds `LINES`
/// lines.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
#[inline]
unsafe fn unpack_block<const REPACKED: bool>(
    src: *const u8,
    row_bytes: usize,
    at: usize,
    out: *mut Line,
) {
    // SAFETY: as the caller's.
    unsafe {
        use std::arch::x86_64::*;
        let index = super::q4k_panel::row_offsets(row_bytes);
        // Dword `o / 4` of the block of each of the sixteen rows (`o` a
        // multiple of 4, or 206: the dword whose high half is `d`).
        let gather = |o: usize| {
            if REPACKED {
                let line = if o == 206 { REPACKED_LINES - 1 } else { o / 4 };
                _mm512_load_si512(src.add(line * 64).cast())
            } else {
                _mm512_i32gather_epi32::<1>(index, src.add(at + o).cast())
            }
        };
        let nib = _mm512_set1_epi32(0x0F0F_0F0F);
        let low2 = _mm512_set1_epi32(0x0303_0303);
        // Value 128n + 32k + l (l < 32): the low (k < 2) or high nibble
        // of ql[64n + 32(k mod 2) + l], and bits 2k, 2k+1 of qh[32n + l]
        // (see `q6k`); four consecutive l per dword.
        for n in 0..2 {
            for k in 0..4 {
                for j in 0..8 {
                    let l = 4 * j;
                    let ql = gather(64 * n + 32 * (k % 2) + l);
                    let low = if k < 2 {
                        _mm512_and_si512(ql, nib)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi32::<4>(ql), nib)
                    };
                    let qh = gather(128 + 32 * n + l);
                    let shift = _mm512_set1_epi32(2 * k as i32);
                    let high = _mm512_and_si512(_mm512_srlv_epi32(qh, shift), low2);
                    let q = _mm512_or_si512(low, _mm512_slli_epi32::<4>(high));
                    let v = 128 * n + 32 * k + l;
                    _mm512_store_si512(out.add(4 * (v / 16) + (v % 16) / 4).cast(), q);
                }
            }
        }
        // d: the high half of the dword at byte 206.
        let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(gather(206))));
        // The 16 signed scales, four per dword, each sign-extended.
        for i in 0..4 {
            let sc = gather(192 + 4 * i);
            for (j, shift) in [24, 16, 8, 0].into_iter().enumerate() {
                let v = _mm512_srai_epi32::<24>(_mm512_sllv_epi32(sc, _mm512_set1_epi32(shift)));
                let scale = _mm512_mul_ps(_mm512_cvtepi32_ps(v), d);
                _mm512_store_ps(out.add(SCALES_AT + 4 * i + j).cast(), scale);
            }
        }
    }
}

/// A group's block interleave (`Repacked`): dword `w` of the block of each
/// of the sixteen rows in lane `r` of line `w`, for the 52 dwords of bytes
/// 0..208, and the dword at byte 206 (`d` in its high half) last.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn interleave_avx512(
    rows: &[u8],
    row_bytes: usize,
    blocks: usize,
    out: &mut [std::mem::MaybeUninit<Line>],
) {
    // SAFETY: the caller checked the features, that `rows` holds ROWS rows
    // of `row_bytes` and that `out` holds `blocks · REPACKED_LINES` lines;
    // each is written whole, every gather reads inside a block.
    unsafe {
        use std::arch::x86_64::*;
        let index = super::q4k_panel::row_offsets(row_bytes);
        for b in 0..blocks {
            let at = b * BLOCK_BYTES;
            super::q4k_panel::prefetch_rows(rows, row_bytes, at, BLOCK_BYTES);
            for w in 0..REPACKED_LINES {
                let o = if w + 1 == REPACKED_LINES { 206 } else { 4 * w };
                let v = _mm512_i32gather_epi32::<1>(index, rows.as_ptr().add(at + o).cast());
                _mm512_store_si512(out.as_mut_ptr().add(b * REPACKED_LINES + w).cast(), v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_avx512<const REPACKED: bool>(_: &[u8], _: usize, _: usize, _: &mut [Line]) {
    unreachable!("available() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn interleave_avx512(_: &[u8], _: usize, _: usize, _: &mut [std::mem::MaybeUninit<Line>]) {
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

    /// `n` rows of `blocks` Q6_K blocks of random bytes with finite `d`
    /// (up to 7/64, differing from block to block and row to row, so a
    /// block's `d` sent to another block or row shows).
    fn random_rows(n: usize, blocks: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut data: Vec<u8> = (0..n * blocks * BLOCK_BYTES)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as u8
            })
            .collect();
        for (i, block) in data.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            let d = (1 + i % 7) as f32 / 64.0;
            block[208..].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        }
        data
    }

    #[test]
    fn a_repacked_group_packs_the_panel_of_its_rows() {
        if !Panel::available() {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        }
        // Two whole groups and three rows left over.
        let (rows, blocks) = (2 * ROWS + 3, 5);
        let row_bytes = blocks * BLOCK_BYTES;
        let data = random_rows(rows, blocks, 7);
        let repacked = Repacked::new(&data, rows, row_bytes, false).unwrap();
        assert_eq!(repacked.groups(), 2);
        assert_eq!(repacked.group(1).len(), blocks * REPACKED_LINES * 64);
        let (mut from_rows, mut from_lines) = (Panel::new(), Panel::new());
        for g in 0..2 {
            from_rows.pack(&data[g * ROWS * row_bytes..], row_bytes);
            from_lines.pack_repacked(&repacked, g);
            let bytes = |p: &Panel| p.lines.iter().flat_map(|l| l.0).collect::<Vec<u8>>();
            assert!(bytes(&from_rows) == bytes(&from_lines), "group {g}");
        }
        assert!(
            Repacked::new(&data[..(ROWS - 1) * row_bytes], ROWS - 1, row_bytes, true).is_none()
        );
    }

    #[test]
    fn a_repacked_group_multiplies_bitwise_as_its_panel() {
        if !Panel::available() {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        }
        let (rows, blocks) = (2 * ROWS, 6);
        let row_bytes = blocks * BLOCK_BYTES;
        let data = random_rows(rows, blocks, 11);
        let repacked = Repacked::new(&data, rows, row_bytes, true).unwrap();
        let xs: Vec<Vec<Q8K>> = (0..21)
            .map(|t| super::super::q4k::quantized_q8k(&super::super::test_values(blocks * 256, t)))
            .collect();
        let xs: Vec<&[Q8K]> = xs.iter().map(|x| x.as_slice()).collect();
        let mut panel = Panel::new();
        for g in 0..2 {
            panel.pack(&data[g * ROWS * row_bytes..], row_bytes);
            // One to 21 tokens: passes of eight and what is left.
            for n in 1..=xs.len() {
                let mut want = vec![0f32; n * ROWS];
                let mut got = vec![f32::NAN; n * ROWS];
                panel.multiply(&xs[..n], &mut want, ROWS);
                repacked.multiply(g, &xs[..n], &mut got, ROWS);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "group {g}, {n} tokens");
            }
        }
    }
}
