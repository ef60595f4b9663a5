//! Prompt processing over Q4_K weights: sixteen weight rows at a time,
//! unpacked once into a cache-resident panel that every prompt token then
//! streams through.
//!
//! `q4k::dot_vnni` works one row at a time, so each 32-value sub-block's
//! integer dot product needs its own convert-and-scale, and the block's
//! scales are unpacked again for every four tokens: about four overhead
//! instructions per `vpdpbusd`. Here a zmm lane holds one of sixteen rows,
//! so one `vpdpbusd` advances sixteen rows by four values, against a
//! broadcast of four activation bytes, and the scales are applied once per
//! eight of them. This is what llama.cpp's repacked AVX-512 layout buys it,
//! but the unpacked copy only exists for the sixteen rows being worked on
//! (a few hundred KB, in L2), never for the whole model: memory stays the
//! file's size.
//!
//! Q5_K blocks (`q5k_panel`) unpack into the same panel, each value's fifth
//! bit or-ed in, and share `multiply`.

use super::q4k::{BLOCK_BYTES, CHUNK_ORDER, Q8K};

/// Rows per panel: one 32-bit lane of a zmm register each.
pub const ROWS: usize = 16;

/// Tokens multiplied per pass over a panel block (their accumulators fill
/// the register file: four tokens × four vectors).
pub(super) const TOKENS: usize = 4;

/// Tokens a repacked group's single pass serves (`Repacked::multiply`),
/// `TOKENS` at a time per block: a block's scales are unpacked once for
/// all of them. (Against two passes of four, the 7B Q4_K_M's B=8 decode
/// measured alike: gen 18.3 / 19.8 / 21.6 tok/s two passes, 17.2 / 20.2 /
/// 20.7 one, before the prefetch below.)
pub(super) const WIDE: usize = 8;

/// Blocks ahead of the one being multiplied that `Repacked::multiply`
/// prefetches for two or more tokens (4 × 2304 bytes of a group): 2 and
/// 6 measured about as well, 8 worse.
pub(super) const PREFETCH_BLOCKS: usize = 4;

/// One 64-byte vector, aligned for `vmovdqa64`.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Line(pub(super) [u8; 64]);

/// Lines per unpacked block: 64 of weights (8 sub-blocks × 8 groups of four
/// values), 8 of `d·scale` (f32), 8 of `(min, min)` (i16 pairs), 1 of `dmin`.
const LINES: usize = 64 + 8 + 8 + 1;
const SCALES_AT: usize = 64;
const MINS_AT: usize = 72;
const DMIN_AT: usize = 80;

/// Sixteen rows of Q4_K (or Q5_K) blocks unpacked for `vpdpbusd`: for block
/// `b`, sub-block `s` and group `g`, line `b·LINES + 8s + g` holds, in lane
/// `r`, the four 4-bit (5-bit) values `4g..4g+4` of sub-block `s` of row `r`,
/// one per byte.
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

    /// Unpacks the `ROWS` rows of Q4_K blocks that start at `rows[0]`,
    /// each `row_bytes` long and `row_bytes` apart.
    ///
    /// # Panics
    /// If `rows` holds fewer than `ROWS` rows, or the CPU lacks the
    /// instructions (check `available` first).
    pub fn pack(&mut self, rows: &[u8], row_bytes: usize) {
        self.pack_format::<false>(rows, row_bytes)
    }

    /// `pack` for Q5_K blocks (`q5k`): the same panel, each value's fifth
    /// bit or-ed in as 16, so `multiply` is the same loop (values up to 31
    /// stay unsigned bytes for `vpdpbusd`).
    pub fn pack_q5k(&mut self, rows: &[u8], row_bytes: usize) {
        self.pack_format::<true>(rows, row_bytes)
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
        // `blocks · 36` aligned lines, and `self.lines` `blocks · LINES`.
        unsafe { unpack_avx512::<false, true>(repacked.group(g), 0, self.blocks, &mut self.lines) }
    }

    fn pack_format<const Q5: bool>(&mut self, rows: &[u8], row_bytes: usize) {
        assert!(Self::available(), "the Q4_K/Q5_K panel needs AVX-512 VNNI");
        let block_bytes = block_bytes::<Q5>();
        assert!(rows.len() >= ROWS * row_bytes, "fewer than {ROWS} rows");
        assert!(row_bytes.is_multiple_of(block_bytes) && row_bytes * ROWS < i32::MAX as usize);
        self.blocks = row_bytes / block_bytes;
        self.lines.resize(self.blocks * LINES, Line([0; 64]));
        // SAFETY: the features were checked above; the reads stay inside
        // `rows` (checked long enough) and the writes inside `self.lines`.
        unsafe { pack_avx512::<Q5>(rows, row_bytes, self.blocks, &mut self.lines) }
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
                let mut macc = [_mm512_setzero_si512(); N];
                // Two sub-blocks at a time: their accumulators are
                // independent, so 2N `vpdpbusd` chains hide the latency.
                for s in (0..8).step_by(2) {
                    let mut iacc = [[_mm512_setzero_si512(); N]; 2];
                    let at = [CHUNK_ORDER[s] * 32, CHUNK_ORDER[s + 1] * 32];
                    for g in 0..8 {
                        for h in 0..2 {
                            let w = _mm512_load_si512(p.add(8 * (s + h) + g).cast());
                            for t in 0..N {
                                let x = xs[t][b].qs.as_ptr().add(at[h] + 4 * g);
                                let x4 =
                                    _mm512_set1_epi32(std::ptr::read_unaligned(x.cast::<i32>()));
                                iacc[h][t] = _mm512_dpbusd_epi32(iacc[h][t], w, x4);
                            }
                        }
                    }
                    for h in 0..2 {
                        let scale = _mm512_load_ps(p.add(SCALES_AT + s + h).cast());
                        let mins = _mm512_load_si512(p.add(MINS_AT + s + h).cast());
                        for t in 0..N {
                            let sum = _mm512_cvtepi32_ps(iacc[h][t]);
                            bacc[t] = _mm512_fmadd_ps(sum, scale, bacc[t]);
                            // The sums of the sub-block's two halves, as one i16 pair.
                            let sums = xs[t][b].bsums.as_ptr().add(2 * (s + h)).cast::<i32>();
                            let sums = _mm512_set1_epi32(std::ptr::read_unaligned(sums));
                            macc[t] = _mm512_dpwssd_epi32(macc[t], mins, sums);
                        }
                    }
                }
                let dmin = _mm512_load_ps(p.add(DMIN_AT).cast());
                for t in 0..N {
                    let block = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(macc[t]), dmin, bacc[t]);
                    facc[t] = _mm512_fmadd_ps(block, _mm512_set1_ps(xs[t][b].d), facc[t]);
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

/// Bytes of a Q4_K block, or with `Q5` of a Q5_K one.
const fn block_bytes<const Q5: bool>() -> usize {
    if Q5 {
        super::q5k::BLOCK_BYTES
    } else {
        BLOCK_BYTES
    }
}

/// Dwords of a Q4_K (Q5_K) block: lines per block of a [`Repacked`] group.
const fn dwords<const Q5: bool>() -> usize {
    block_bytes::<Q5>() / 4
}

/// A Q4_K matrix's whole groups of sixteen rows with their blocks
/// interleaved by dwords, llama.cpp's CPU repacking idea in the panels'
/// terms: for group `g`, block `b` and dword `w` of a block (36 of them),
/// line `(g · blocks + b) · 36 + w` holds, in lane `r`, dword `w` of block
/// `b` of row `16g + r`. The same bytes as the rows (nothing widened), but
/// what `pack` gathers from sixteen rows far apart is one aligned load
/// here: `pack_repacked` costs a fraction of `pack`, which is what lets a
/// few tokens (a decode step) take the panels' sums.
pub struct Repacked {
    lines: Vec<Line>,
    blocks: usize,
    groups: usize,
}

impl Repacked {
    /// The whole groups of sixteen rows of the Q4_K matrix `data` (`rows`
    /// rows of `row_bytes`); rows past the last whole group are left out.
    /// `None` without AVX-512 (the panels' CPUs) or without a whole group.
    ///
    /// # Panics
    /// If `data` is shorter than `rows` rows or `row_bytes` is not whole
    /// blocks.
    /// Over the thread pool when `parallel`, on the calling thread if not.
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
            blocks * dwords::<false>(),
            parallel,
            // SAFETY: `available` checked the features; `interleaved` gives
            // the group's sixteen rows and its `blocks · 36` lines.
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

    /// Group `g`'s lines, as bytes (`pack_repacked`'s input).
    pub fn group(&self, g: usize) -> &[u8] {
        let per_group = self.blocks * dwords::<false>();
        let lines = &self.lines[g * per_group..(g + 1) * per_group];
        // SAFETY: `Line` is 64 plain bytes; the slice covers exactly them.
        unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * 64) }
    }
}

impl Repacked {
    /// `out[t·stride + r] = row 16g + r · token t` for every token of `xs`
    /// (each `blocks` Q8_K blocks): `pack_repacked` then `Panel::multiply`
    /// in one pass, each weight line unpacked in registers rather than
    /// stored to a panel and read back, so a single token pays no more
    /// than the row kernel. Bitwise the panel's result: the integer sums
    /// are exact in any order, and every float operation is the panel's,
    /// in its order.
    ///
    /// # Panics
    /// If `g` is not one of the groups, a token holds fewer blocks than a
    /// row, or `out` does not reach the last token's sixteen lanes.
    pub fn multiply(&self, g: usize, xs: &[&[Q8K]], out: &mut [f32], stride: usize) {
        assert!(g < self.groups, "group {g} of {}", self.groups);
        check(xs, self.blocks, out, stride);
        for (c, xs) in xs.chunks(WIDE).enumerate() {
            let out = &mut out[c * WIDE * stride..];
            // SAFETY: `check` checked the features (as `new` did), the
            // activations' lengths and the output's size.
            unsafe {
                match xs.len() {
                    1 => self.multiply_avx512::<1>(g, xs, out, stride),
                    2 => self.multiply_avx512::<2>(g, xs, out, stride),
                    3 => self.multiply_avx512::<3>(g, xs, out, stride),
                    4 => self.multiply_avx512::<4>(g, xs, out, stride),
                    5 => self.multiply_avx512::<5>(g, xs, out, stride),
                    6 => self.multiply_avx512::<6>(g, xs, out, stride),
                    7 => self.multiply_avx512::<7>(g, xs, out, stride),
                    _ => self.multiply_avx512::<WIDE>(g, xs, out, stride),
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
    // `t` indexes the accumulators and the tokens alike.
    #[allow(clippy::needless_range_loop)]
    unsafe fn multiply_avx512<const N: usize>(
        &self,
        g: usize,
        xs: &[&[Q8K]],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: the caller checked the features, that `g` is a group,
        // that each `xs[t]` holds `self.blocks` blocks and that `out`
        // reaches token `N - 1`'s lanes.
        unsafe {
            use std::arch::x86_64::*;
            const DW: usize = dwords::<false>();
            let lines = self.lines.as_ptr().add(g * self.blocks * DW);
            let nib = _mm512_set1_epi32(0x0F0F_0F0F);
            let low6 = _mm512_set1_epi32(0x3F3F_3F3F);
            let low2 = _mm512_set1_epi32(0x0303_0303);
            let byte = _mm512_set1_epi32(0xFF);
            let mut facc = [_mm512_setzero_ps(); N];
            for b in 0..self.blocks {
                // Two or more tokens ask for the lines four blocks ahead
                // into L2: without it the hardware prefetcher left the
                // streamed rate well under the in-cache one with memory to
                // spare (kernels bench, `--rows 8`, Q4_K, rows x GB/s,
                // Zen 4 EPYC, 2 threads: 85-98 streamed against 140-164 in
                // cache; 132-137 with it). One token is memory-bound and
                // the hardware's stream does better alone (tg32 7.32 / 7.90
                // tok/s without, 4.81 / 4.78 asking two blocks ahead).
                let p = lines.add(b * DW);
                if N >= 2 {
                    let ahead = p.wrapping_add(PREFETCH_BLOCKS * DW);
                    for l in 0..DW {
                        // SAFETY: a prefetch never faults, wherever it points.
                        _mm_prefetch::<_MM_HINT_T2>(ahead.wrapping_add(l).cast());
                    }
                }
                // What `unpack_avx512` computes for the panel's scale
                // lines, in the same operations.
                let dd = _mm512_load_si512(p.cast());
                let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dd));
                let dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dd)));
                let s0 = _mm512_load_si512(p.add(1).cast());
                let s1 = _mm512_load_si512(p.add(2).cast());
                let s2 = _mm512_load_si512(p.add(3).cast());
                let u0 = _mm512_and_si512(s0, low6);
                let u1 = _mm512_or_si512(
                    _mm512_and_si512(s2, nib),
                    _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(s0), low2)),
                );
                let u2 = _mm512_and_si512(s1, low6);
                let u3 = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi32::<4>(s2), nib),
                    _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(s1), low2)),
                );
                // `TOKENS` tokens at a time (their accumulators fill the
                // registers), the block's lines read again from L1 for
                // each: one pass over the group serves all N tokens.
                for c in (0..N).step_by(TOKENS) {
                    let count = (N - c).min(TOKENS);
                    let mut bacc = [_mm512_setzero_ps(); TOKENS];
                    let mut macc = [_mm512_setzero_si512(); TOKENS];
                    for s in (0..8).step_by(2) {
                        let mut iacc = [[_mm512_setzero_si512(); TOKENS]; 2];
                        let at = [CHUNK_ORDER[s] * 32, CHUNK_ORDER[s + 1] * 32];
                        for q in 0..8 {
                            // Dword 8(s/2) + q of the nibbles: values 4q..4q+4
                            // of sub-block s (low nibbles) and s + 1 (high).
                            let v = _mm512_load_si512(p.add(4 + 4 * s + q).cast());
                            let w = [
                                _mm512_and_si512(v, nib),
                                _mm512_and_si512(_mm512_srli_epi32::<4>(v), nib),
                            ];
                            for h in 0..2 {
                                for t in 0..count {
                                    let x = xs[c + t][b].qs.as_ptr().add(at[h] + 4 * q);
                                    let x4 = _mm512_set1_epi32(std::ptr::read_unaligned(
                                        x.cast::<i32>(),
                                    ));
                                    iacc[h][t] = _mm512_dpbusd_epi32(iacc[h][t], w[h], x4);
                                }
                            }
                        }
                        for h in 0..2 {
                            let (sc, m) = if s + h < 4 { (u0, u2) } else { (u1, u3) };
                            let shift = _mm512_set1_epi32(8 * ((s + h) as i32 % 4));
                            let sc = _mm512_and_si512(_mm512_srlv_epi32(sc, shift), byte);
                            let m = _mm512_and_si512(_mm512_srlv_epi32(m, shift), byte);
                            let scale = _mm512_mul_ps(_mm512_cvtepi32_ps(sc), d);
                            let mins = _mm512_or_si512(m, _mm512_slli_epi32::<16>(m));
                            for t in 0..count {
                                let sum = _mm512_cvtepi32_ps(iacc[h][t]);
                                bacc[t] = _mm512_fmadd_ps(sum, scale, bacc[t]);
                                let sums =
                                    xs[c + t][b].bsums.as_ptr().add(2 * (s + h)).cast::<i32>();
                                let sums = _mm512_set1_epi32(std::ptr::read_unaligned(sums));
                                macc[t] = _mm512_dpwssd_epi32(macc[t], mins, sums);
                            }
                        }
                    }
                    for t in 0..count {
                        let block = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(macc[t]), dmin, bacc[t]);
                        facc[c + t] =
                            _mm512_fmadd_ps(block, _mm512_set1_ps(xs[c + t][b].d), facc[c + t]);
                    }
                }
            }
            for t in 0..N {
                _mm512_storeu_ps(out.as_mut_ptr().add(t * stride), facc[t]);
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn multiply_avx512<const N: usize>(
        &self,
        _: usize,
        _: &[&[Q8K]],
        _: &mut [f32],
        _: usize,
    ) {
        unreachable!("Repacked::new gives None off x86-64")
    }
}

/// One group's dword interleave (`Repacked`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn interleave_avx512(
    rows: &[u8],
    row_bytes: usize,
    blocks: usize,
    out: &mut [std::mem::MaybeUninit<Line>],
) {
    // SAFETY: the caller checked the features, that `rows` holds ROWS rows
    // of `row_bytes` and that `out` holds `blocks · 36` lines; each is
    // written whole.
    unsafe {
        use std::arch::x86_64::*;
        let index = row_offsets(row_bytes);
        for b in 0..blocks {
            let at = b * BLOCK_BYTES;
            prefetch_rows(rows, row_bytes, at, BLOCK_BYTES);
            for w in 0..dwords::<false>() {
                let v = _mm512_i32gather_epi32::<1>(index, rows.as_ptr().add(at + 4 * w).cast());
                _mm512_store_si512(out.as_mut_ptr().add(b * dwords::<false>() + w).cast(), v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn interleave_avx512(_: &[u8], _: usize, _: usize, _: &mut [std::mem::MaybeUninit<Line>]) {
    unreachable!("available() is false off x86-64")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn pack_avx512<const Q5: bool>(
    rows: &[u8],
    row_bytes: usize,
    blocks: usize,
    lines: &mut [Line],
) {
    // SAFETY: as the caller's.
    unsafe { unpack_avx512::<Q5, false>(rows, row_bytes, blocks, lines) }
}

/// Unpacks sixteen rows into `lines`: from the rows as stored (`rows`,
/// each `row_bytes` long), or with `REPACKED` from one group of a
/// [`Repacked`] matrix (`rows` its `blocks · DWORDS` lines, `row_bytes`
/// unused). Both read the same dwords, so they write the same panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn unpack_avx512<const Q5: bool, const REPACKED: bool>(
    rows: &[u8],
    row_bytes: usize,
    blocks: usize,
    lines: &mut [Line],
) {
    // SAFETY: the caller checked the features, that `rows` holds ROWS rows
    // of `row_bytes` (or, `REPACKED`, `blocks · dwords::<Q5>()` aligned
    // lines), and that `lines` holds `blocks · LINES` lines.
    unsafe {
        use std::arch::x86_64::*;
        let index = row_offsets(row_bytes);
        // Dword `at / 4` of a block of each of the sixteen rows, where the
        // block starts at byte `at - at % block_bytes` of each row.
        let gather = |at: usize| {
            if REPACKED {
                let (b, w) = (at / block_bytes::<Q5>(), at % block_bytes::<Q5>() / 4);
                _mm512_load_si512(rows.as_ptr().add((b * dwords::<Q5>() + w) * 64).cast())
            } else {
                _mm512_i32gather_epi32::<1>(index, rows.as_ptr().add(at).cast())
            }
        };
        let nib = _mm512_set1_epi32(0x0F0F_0F0F);
        let low6 = _mm512_set1_epi32(0x3F3F_3F3F);
        let low2 = _mm512_set1_epi32(0x0303_0303);
        let byte = _mm512_set1_epi32(0xFF);
        let out = lines.as_mut_ptr();
        let ones = _mm512_set1_epi32(0x0101_0101);
        let qs_at = if Q5 { 48 } else { 16 };
        for b in 0..blocks {
            let at = b * block_bytes::<Q5>();
            if !REPACKED {
                prefetch_rows(rows, row_bytes, at, block_bytes::<Q5>());
            }
            let p = out.add(b * LINES);
            // Q5_K: dword g of `qh` holds the fifth bits of values
            // l = 4g..4g+4 of every sub-block (bit s for sub-block s).
            let qh: [__m512i; 8] = if Q5 {
                std::array::from_fn(|g| gather(at + 16 + 4 * g))
            } else {
                [_mm512_setzero_si512(); 8]
            };
            // Weights: dword k of the 128 nibble bytes holds values 4g..4g+4
            // (g = k mod 8) of sub-block 2(k/8) in its low nibbles and of
            // sub-block 2(k/8)+1 in its high ones.
            for k in 0..32 {
                let v = gather(at + qs_at + 4 * k);
                let (s, g) = (2 * (k / 8), k % 8);
                let mut lo = _mm512_and_si512(v, nib);
                let mut hi = _mm512_and_si512(_mm512_srli_epi32::<4>(v), nib);
                if Q5 {
                    let bit = |s: usize| {
                        let shifted = _mm512_srlv_epi32(qh[g], _mm512_set1_epi32(s as i32));
                        _mm512_slli_epi32::<4>(_mm512_and_si512(shifted, ones))
                    };
                    lo = _mm512_or_si512(lo, bit(s));
                    hi = _mm512_or_si512(hi, bit(s + 1));
                }
                _mm512_store_si512(p.add(8 * s + g).cast(), lo);
                _mm512_store_si512(p.add(8 * (s + 1) + g).cast(), hi);
            }
            // d and dmin (two halves), and the 12 scale bytes as ggml
            // unpacks them (`get_scale_min_k4`): u0, u1 hold the eight
            // scales, u2, u3 the eight mins, a byte each.
            let dd = gather(at);
            let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dd));
            let dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dd)));
            let (s0, s1, s2) = (gather(at + 4), gather(at + 8), gather(at + 12));
            let u0 = _mm512_and_si512(s0, low6);
            let u1 = _mm512_or_si512(
                _mm512_and_si512(s2, nib),
                _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(s0), low2)),
            );
            let u2 = _mm512_and_si512(s1, low6);
            let u3 = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi32::<4>(s2), nib),
                _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(s1), low2)),
            );
            for s in 0..8 {
                let (sc, m) = if s < 4 { (u0, u2) } else { (u1, u3) };
                let shift = _mm512_set1_epi32(8 * (s as i32 % 4));
                let sc = _mm512_and_si512(_mm512_srlv_epi32(sc, shift), byte);
                let m = _mm512_and_si512(_mm512_srlv_epi32(m, shift), byte);
                let scale = _mm512_mul_ps(_mm512_cvtepi32_ps(sc), d);
                _mm512_store_ps(p.add(SCALES_AT + s).cast(), scale);
                // (m, m) as two i16: `vpdpwssd` pairs them with the sums of
                // the sub-block's two 16-value halves.
                let mm = _mm512_or_si512(m, _mm512_slli_epi32::<16>(m));
                _mm512_store_si512(p.add(MINS_AT + s).cast(), mm);
            }
            _mm512_store_ps(p.add(DMIN_AT).cast(), dmin);
        }
    }
}

/// Runs `group` on the tokens `TOKENS` at a time and `one` on each token
/// left over, each with the output from its first token's row on: every
/// panel's `multiply`. It first checks what the panels' SIMD loops rely on
/// (their safety argument): the CPU has the instructions, every token holds
/// the panel's `blocks` blocks, and `out` reaches the last token's `ROWS`
/// lanes.
///
/// # Panics
/// If one of those does not hold.
pub(super) fn by_groups<X>(
    xs: &[&[X]],
    blocks: usize,
    out: &mut [f32],
    stride: usize,
    group: impl Fn(&[&[X]], &mut [f32]),
    one: impl Fn(&[&[X]], &mut [f32]),
) {
    check(xs, blocks, out, stride);
    let mut groups = xs.chunks_exact(TOKENS);
    let mut t = 0;
    for tokens in &mut groups {
        group(tokens, &mut out[t * stride..]);
        t += TOKENS;
    }
    for x in groups.remainder() {
        one(std::slice::from_ref(x), &mut out[t * stride..]);
        t += 1;
    }
}

/// What the panels' SIMD loops rely on (their safety argument): the CPU
/// has the instructions, every token holds `blocks` blocks, and `out`
/// reaches the last token's `ROWS` lanes.
///
/// # Panics
/// If one of those does not hold.
pub(super) fn check<X>(xs: &[&[X]], blocks: usize, out: &[f32], stride: usize) {
    assert!(super::q4k::have_vnni(), "the panels need AVX-512 VNNI");
    for x in xs {
        assert!(x.len() >= blocks, "activations shorter than the rows");
    }
    assert!(xs.is_empty() || out.len() >= (xs.len() - 1) * stride + ROWS);
}

/// Bytes ahead of the block being packed that `prefetch_rows` asks for:
/// a block or two (measured on the 7B Q4_K_M, pp4/pp128 tok/s: 1024 bytes
/// 9.5/51, 512 11.2/51, 256 12.7/53, 128 12.5/53).
const PACK_AHEAD: usize = 256;

/// Prefetches, in each of the sixteen rows `row_bytes` apart from `rows`,
/// the `bytes` from `PACK_AHEAD` past byte `at`. The packs' gathers read one
/// dword from each of sixteen rows far apart, which the hardware prefetcher
/// does not follow, so every gather waited on sixteen misses: 90% of the
/// Q4_K pack's samples sat on them, and a 4-token prompt on the 7B Q4_K_M
/// spent 73% of its time packing. With this, pp4 went from 6.9 to 12.7
/// tok/s and pp128 from 49.7 to 53 (Q8_0: 5.6 to 10.6, 44.8 to 49.5).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn prefetch_rows(rows: &[u8], row_bytes: usize, at: usize, bytes: usize) {
    use std::arch::x86_64::*;
    let base = rows.as_ptr().wrapping_add(at + PACK_AHEAD);
    for r in 0..ROWS {
        let row = base.wrapping_add(r * row_bytes);
        for line in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults, wherever it points.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(line).cast()) };
        }
    }
}

/// Prefetches into L2 the bytes `from..to` of the next group of sixteen
/// rows (the one `group_bytes` past the start of `rows`), if `rows` holds
/// it. A kernel that reads its group as sixteen row streams calls this
/// once per block with consecutive slices (each rounded up to whole lines,
/// so every line is asked for once), and so reads the next group as one
/// stream while it works on this one.
///
/// Why: a thread gets less from memory over sixteen streams than over one.
/// A read loop over 70 KB groups of sixteen 4352-byte rows (Q8_0 rows of
/// 4096 values) on this project's EPYC, 2 threads, three rounds: 41–51
/// GB/s row by row, 60–76 reading the same bytes in order, 53–65 row by
/// row with this prefetch beside it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn prefetch_next_group(rows: &[u8], group_bytes: usize, from: usize, to: usize) {
    use std::arch::x86_64::*;
    if rows.len() < 2 * group_bytes {
        return;
    }
    let next = rows.as_ptr().wrapping_add(group_bytes);
    // Each line once: slices' ends round up to whole lines.
    let up = |at: usize| at.min(group_bytes).next_multiple_of(64);
    for line in (up(from)..up(to)).step_by(64) {
        // SAFETY: a prefetch never faults, wherever it points.
        unsafe { _mm_prefetch::<_MM_HINT_T2>(next.wrapping_add(line).cast()) };
    }
}

/// The byte offsets of the sixteen rows, `row_bytes` apart, as gather indices.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) fn row_offsets(row_bytes: usize) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(row_bytes as i32),
    )
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_avx512<const Q5: bool>(_: &[u8], _: usize, _: usize, _: &mut [Line]) {
    unreachable!("available() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn unpack_avx512<const Q5: bool, const REPACKED: bool>(
    _: &[u8],
    _: usize,
    _: usize,
    _: &mut [Line],
) {
    unreachable!("available() is false off x86-64")
}

/// A Q4_K (or Q5_K) block of extreme bytes for `check_panel`: values all
/// 15 (31), all 0, or mixed; scales and mins all 63, or different from
/// sub-block to sub-block in odd blocks (so a scale sent to the wrong
/// sub-block shows); d = 1, dmin = 0.5.
#[cfg(test)]
pub(super) fn extreme_block(i: usize, block: &mut [u8]) {
    block[4..].fill([0xFFu8, 0x00, 0x55, 0xAA, 0x0F, 0xF0][i % 6]);
    if i % 2 == 1 {
        for (s, byte) in block[4..16].iter_mut().enumerate() {
            *byte = (41 * s + 7) as u8;
        }
    }
    block[0..2].copy_from_slice(&half::f16::ONE.to_le_bytes());
    block[2..4].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::super::q4k::dot_scalar;
    use super::super::qmatmul::check_panel;
    use super::*;

    /// `n` rows of `blocks` Q4_K blocks of random bytes with finite
    /// scales (d up to 7/64, dmin up to 5/128: sums far from overflow).
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
        // d and dmin differ from block to block (and row to row), so a
        // block's scales sent to another block or row show.
        for (i, block) in data.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            let d = (1 + i % 7) as f32 / 64.0;
            let dmin = (1 + i % 5) as f32 / 128.0;
            block[0..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
            block[2..4].copy_from_slice(&half::f16::from_f32(dmin).to_le_bytes());
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
        assert_eq!(
            repacked.group(1).len(),
            ROWS * row_bytes,
            "as many bytes as the rows"
        );
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
        let repacked = Repacked::new(&data, rows, row_bytes, false).unwrap();
        let xs: Vec<Vec<Q8K>> = (0..21)
            .map(|t| super::super::q4k::quantized_q8k(&super::super::test_values(blocks * 256, t)))
            .collect();
        let xs: Vec<&[Q8K]> = xs.iter().map(|x| x.as_slice()).collect();
        let mut panel = Panel::new();
        for g in 0..2 {
            panel.pack(&data[g * ROWS * row_bytes..], row_bytes);
            // One to 21 tokens: passes of eight, of four and single ones.
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

    #[test]
    fn a_panel_computes_what_the_scalar_kernel_does() {
        check_panel::<Panel>(
            candle_core::quantized::GgmlDType::Q4K,
            1024,
            extreme_block,
            dot_scalar,
        );
    }
}
