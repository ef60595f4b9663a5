//! Attention of one query row (a generated token's, or on the CPU in f32 a
//! prompt position's) per head against a sequence's KV cache, read in
//! place in its own dtype (f32, or f16 widened in registers), over exactly
//! the keys that row sees: so a row's result does not depend on the chunk
//! it came in.
//!
//! candle has no f16 matmul on the CPU, so through candle an f16 cache is
//! first widened to an f32 copy of every cached position, every layer,
//! every token; and its seven small ops per layer (products, scale,
//! softmax, regrouping) cost more than the arithmetic at short contexts.
//! This is scaled dot-product attention (Vaswani et al. 2017) with grouped
//! query heads (GQA, Ainslie et al. 2023): query head `h` reads kv head
//! `h / (heads / kv_heads)`, as transformers' `repeat_kv` does.

use super::pool;
use half::f16;

/// One layer's key or value buffer, `[kv_heads, capacity, head_dim]`.
#[derive(Clone, Copy)]
pub enum KvBuf<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// The live positions `start..end` of one layer's cache.
#[derive(Clone, Copy)]
pub struct CacheView<'a> {
    pub k: KvBuf<'a>,
    pub v: KvBuf<'a>,
    /// Positions each kv head's buffer holds (the stride between heads).
    pub capacity: usize,
    pub start: usize,
    pub end: usize,
}

/// `softmax(q·kᵀ · scale) · v` for one query per head: `q` is
/// `[heads, head_dim]` (after rope), the result goes into `out`
/// (`[heads, head_dim]`, overwritten; a prompt's rows write theirs side by
/// side, without a vector each), in f32.
///
/// Work is split by kv head: the query heads sharing one read each key and
/// value row once. Every output is summed in position order whatever the
/// thread count, so a sequence's result does not depend on the batch.
///
/// Panics when the slices are shorter than the shapes say (the caller
/// builds both from one cache), or `out` is not `heads × head_dim` long.
pub fn decode(
    q: &[f32],
    view: CacheView<'_>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
) {
    assert_eq!(
        out.len(),
        heads * head_dim,
        "one output per head and dimension"
    );
    out.fill(0.0);
    let n = view.end - view.start;
    let rep = heads / kv_heads;
    thread_local! {
        /// One group's scores, kept between calls (no allocation per layer).
        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    pool::for_each_chunk_mut(out, rep * head_dim, |g, out| {
        SCORES.with_borrow_mut(|scores| {
            scores.clear();
            scores.resize(rep * n, 0.0);
            let q = &q[g * rep * head_dim..(g + 1) * rep * head_dim];
            let base = (g * view.capacity + view.start) * head_dim;
            let rows = base..base + n * head_dim;
            // Scores: each key row once for the group's queries.
            if !grouped::scores(q, view.k, rows.clone(), head_dim, rep, scale, scores) {
                for p in 0..n {
                    let at = p * head_dim;
                    for r in 0..rep {
                        let qr = &q[r * head_dim..(r + 1) * head_dim];
                        scores[r * n + p] = match view.k {
                            KvBuf::F32(k) => dot_f32(qr, &k[rows.clone()][at..at + head_dim]),
                            KvBuf::F16(k) => dot_f16(qr, &k[rows.clone()][at..at + head_dim]),
                        } * scale;
                    }
                }
            }
            for r in 0..rep {
                softmax(&mut scores[r * n..(r + 1) * n]);
            }
            // Values: each row once, added to every query of the group.
            if !grouped::values(scores, view.v, rows.clone(), head_dim, rep, out) {
                for p in 0..n {
                    let at = p * head_dim;
                    for r in 0..rep {
                        let o = &mut out[r * head_dim..(r + 1) * head_dim];
                        let w = scores[r * n + p];
                        match view.v {
                            KvBuf::F32(v) => axpy_f32(o, w, &v[rows.clone()][at..at + head_dim]),
                            KvBuf::F16(v) => axpy_f16(o, w, &v[rows.clone()][at..at + head_dim]),
                        }
                    }
                }
            }
        })
    });
}

/// `s` turned into `softmax(s)` in place; a NaN anywhere makes every
/// weight NaN (as the scalar loop does), so a broken row still ends in "no
/// finite logits" rather than in a plausible answer.
///
/// With AVX-512 the exponentials are sixteen at a time (`x86::exp16`):
/// libm's `expf` one value at a time, with its slow path for the very
/// negative arguments most scores have after the maximum is taken off, was
/// 2% of a step at eight sequences, more than the scores and the values.
fn softmax(s: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: avx512f was detected.
        return unsafe { x86::softmax(s) };
    }
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in s.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in s.iter_mut() {
        *x *= inv;
    }
}

fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd() && a.len().is_multiple_of(16) {
        // SAFETY: avx512f was detected; the lengths are equal multiples of 16.
        return unsafe { x86::dot_f32(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd() && a.len().is_multiple_of(16) {
        // SAFETY: as above.
        return unsafe { x86::dot_f16(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
}

fn axpy_f32(out: &mut [f32], w: f32, v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() && out.len().is_multiple_of(16) {
        // SAFETY: as above.
        return unsafe { x86::axpy_f32(out, w, v) };
    }
    for (o, x) in out.iter_mut().zip(v) {
        *o += w * x;
    }
}

fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
    #[cfg(target_arch = "x86_64")]
    if simd() && out.len().is_multiple_of(16) {
        // SAFETY: as above.
        return unsafe { x86::axpy_f16(out, w, v) };
    }
    for (o, x) in out.iter_mut().zip(v) {
        *o += w * x.to_f32();
    }
}

/// The scores and the weighted values of a group of query heads with the
/// AVX-512 kernels: each key or value chunk of 16 dimensions is loaded
/// (and widened from f16) once for all the group's queries, and the
/// values' sums stay in registers across positions, instead of one
/// `dot_f16` and one `axpy_f16` per query and position (each widening the
/// row again; each `axpy` loading and storing the output). Every output
/// is the same chain of fused multiply-adds as `dot_*` and `axpy_*` give,
/// in the same order, so the bits are theirs (`tests`).
mod grouped {
    use super::KvBuf;

    /// Largest group these kernels take (Mistral and Llama 3 have 4
    /// queries per kv head, Qwen 2.5 7B 7); larger ones take the loops.
    #[cfg(target_arch = "x86_64")]
    const MAX_GROUP: usize = 8;

    /// `scores[r·n + p] = (q_r · k_p) · scale` for the `rep` queries of
    /// `q` and the keys in `rows` of `k` (`n` rows of `head_dim`). False,
    /// and nothing written, without AVX-512 or for a shape it does not take.
    pub(super) fn scores(
        q: &[f32],
        k: KvBuf<'_>,
        rows: std::ops::Range<usize>,
        head_dim: usize,
        rep: usize,
        scale: f32,
        scores: &mut [f32],
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if takes(head_dim, rep) {
            let n = rows.len() / head_dim;
            assert!(q.len() >= rep * head_dim && scores.len() >= rep * n);
            macro_rules! run {
                ($($r:literal)*) => {
                    match (rep, k) {
                        $(
                            ($r, KvBuf::F32(k)) => {
                                let k = &k[rows];
                                // SAFETY: AVX-512 was detected; `k` holds n rows, `q` rep.
                                unsafe { super::x86::scores::<$r, false>(q, k.as_ptr().cast(), n, head_dim, scale, scores) }
                            }
                            ($r, KvBuf::F16(k)) => {
                                let k = &k[rows];
                                // SAFETY: as above.
                                unsafe { super::x86::scores::<$r, true>(q, k.as_ptr().cast(), n, head_dim, scale, scores) }
                            }
                        )*
                        _ => unreachable!("`takes` admits groups of 1 to 8"),
                    }
                };
            }
            run!(1 2 3 4 5 6 7 8);
            return true;
        }
        let _ = (q, k, rows, head_dim, rep, scale, scores);
        false
    }

    /// `out[r] = Σ_p weights[r·n + p] · v_p` (`out` is `rep × head_dim`,
    /// zero on entry) for the values in `rows` of `v`. False, and nothing
    /// written, where `scores` would be.
    pub(super) fn values(
        weights: &[f32],
        v: KvBuf<'_>,
        rows: std::ops::Range<usize>,
        head_dim: usize,
        rep: usize,
        out: &mut [f32],
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if takes(head_dim, rep) {
            let n = rows.len() / head_dim;
            assert!(weights.len() >= rep * n && out.len() >= rep * head_dim);
            // Chunks of 16 dimensions summed at once: a power of two that
            // keeps the group's sums in registers (16 of 32) and divides
            // the head.
            let mut chunks = (16 / rep).min(8).next_power_of_two();
            while chunks > 16 / rep || !head_dim.is_multiple_of(16 * chunks) {
                chunks /= 2;
            }
            macro_rules! run {
                ($($r:literal $c:literal),*) => {
                    match (rep, chunks, v) {
                        $(
                            ($r, $c, KvBuf::F32(v)) => {
                                let v = &v[rows];
                                // SAFETY: AVX-512 was detected; `v` holds n rows,
                                // `out` rep, and 16·C divides head_dim.
                                unsafe { super::x86::values::<$r, $c, false>(weights, v.as_ptr().cast(), n, head_dim, out) }
                            }
                            ($r, $c, KvBuf::F16(v)) => {
                                let v = &v[rows];
                                // SAFETY: as above.
                                unsafe { super::x86::values::<$r, $c, true>(weights, v.as_ptr().cast(), n, head_dim, out) }
                            }
                        )*
                        _ => unreachable!("chunks: a power of two, at most 16 / rep and 8"),
                    }
                };
            }
            run!(
                1 8, 1 4, 1 2, 1 1, 2 8, 2 4, 2 2, 2 1, 3 4, 3 2, 3 1, 4 4, 4 2, 4 1,
                5 2, 5 1, 6 2, 6 1, 7 2, 7 1, 8 2, 8 1
            );
            return true;
        }
        let _ = (weights, v, rows, head_dim, rep, out);
        false
    }

    #[cfg(target_arch = "x86_64")]
    fn takes(head_dim: usize, rep: usize) -> bool {
        super::simd() && head_dim.is_multiple_of(16) && (1..=MAX_GROUP).contains(&rep)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// `e^x` for sixteen values: `x = n·ln 2 + r` with `|r| <= ln 2 / 2`,
    /// `e^r` by its Taylor series to `r^6` (relative error under 2e-7, about
    /// one ulp), and `2^n` applied by `vscalefps`, which also underflows
    /// cleanly to zero (arguments are held at -104 and above, where `e^x`
    /// is already below the smallest subnormal). NaN stays NaN.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn exp16(x: __m512) -> __m512 {
        // `max(floor, x)` returns `x` when `x` is NaN.
        let x = _mm512_max_ps(_mm512_set1_ps(-104.0), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 in two parts, so that n · ln2_hi is exact.
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// `super::softmax` sixteen scores at a time.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax(s: &mut [f32]) {
        let len = s.len();
        let tail = len % 16;
        let last: __mmask16 = (1u32 << tail).wrapping_sub(1) as __mmask16;
        let ptr = s.as_mut_ptr();
        // SAFETY: full chunks below `len - tail`; the tail through `last`.
        unsafe {
            // The maximum ignores NaN (`max(v, m)` keeps `m` then), as
            // `f32::max` does; the exponentials bring the NaN back.
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for i in (0..len - tail).step_by(16) {
                m = _mm512_max_ps(_mm512_loadu_ps(ptr.add(i)), m);
            }
            let t = _mm512_mask_loadu_ps(m, last, ptr.add(len - tail));
            m = _mm512_max_ps(t, m);
            let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
            let mut sum = _mm512_setzero_ps();
            for i in (0..len - tail).step_by(16) {
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(ptr.add(i)), max));
                _mm512_storeu_ps(ptr.add(i), e);
                sum = _mm512_add_ps(sum, e);
            }
            let e = exp16(_mm512_sub_ps(
                _mm512_maskz_loadu_ps(last, ptr.add(len - tail)),
                max,
            ));
            _mm512_mask_storeu_ps(ptr.add(len - tail), last, e);
            sum = _mm512_mask_add_ps(sum, last, sum, e);
            let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
            for i in (0..len - tail).step_by(16) {
                _mm512_storeu_ps(ptr.add(i), _mm512_mul_ps(_mm512_loadu_ps(ptr.add(i)), inv));
            }
            let t = _mm512_maskz_loadu_ps(last, ptr.add(len - tail));
            _mm512_mask_storeu_ps(ptr.add(len - tail), last, _mm512_mul_ps(t, inv));
        }
    }

    /// Sixteen values at `at` as f32: loaded, or widened from f16.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<const F16: bool>(at: *const u8) -> __m512 {
        // SAFETY: the caller's: 16 values of the type at `at`.
        unsafe {
            if F16 {
                _mm512_cvtph_ps(_mm256_loadu_si256(at.cast()))
            } else {
                _mm512_loadu_ps(at.cast())
            }
        }
    }

    /// `grouped::scores` for `R` queries; `k` points at `n` rows of
    /// `head_dim` values (f16 with `F16`, else f32).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores<const R: usize, const F16: bool>(
        q: &[f32],
        k: *const u8,
        n: usize,
        head_dim: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let size = if F16 { 2 } else { 4 };
        assert!(q.len() >= R * head_dim && scores.len() >= R * n);
        for p in 0..n {
            // SAFETY: row p of n, chunks of 16 inside a row of head_dim
            // (a multiple of 16); query r of R.
            unsafe {
                let row = k.add(p * head_dim * size);
                let mut acc = [_mm512_setzero_ps(); R];
                for c in (0..head_dim).step_by(16) {
                    let key = load16::<F16>(row.add(c * size));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let x = _mm512_loadu_ps(q.as_ptr().add(r * head_dim + c));
                        *acc = _mm512_fmadd_ps(x, key, *acc);
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    scores[r * n + p] = _mm512_reduce_add_ps(*acc) * scale;
                }
            }
        }
    }

    /// `grouped::values` for `R` queries, `C` chunks of 16 dimensions at a
    /// time; `v` points at `n` rows of `head_dim` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn values<const R: usize, const C: usize, const F16: bool>(
        weights: &[f32],
        v: *const u8,
        n: usize,
        head_dim: usize,
        out: &mut [f32],
    ) {
        let size = if F16 { 2 } else { 4 };
        assert!(weights.len() >= R * n && out.len() >= R * head_dim);
        assert!(head_dim.is_multiple_of(16 * C));
        for c0 in (0..head_dim).step_by(16 * C) {
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            for p in 0..n {
                // SAFETY: row p of n; chunks c0 + 16j < head_dim.
                unsafe {
                    let row = v.add((p * head_dim + c0) * size);
                    // Each query's weight for this position, once for all C chunks
                    // (a loop: a closure would not take this function's features).
                    let mut w = [_mm512_setzero_ps(); R];
                    for (r, w) in w.iter_mut().enumerate() {
                        *w = _mm512_set1_ps(*weights.get_unchecked(r * n + p));
                    }
                    for j in 0..C {
                        let value = load16::<F16>(row.add(16 * j * size));
                        for (acc, w) in acc.iter_mut().zip(&w) {
                            acc[j] = _mm512_fmadd_ps(*w, value, acc[j]);
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (j, acc) in acc.iter().enumerate() {
                    // SAFETY: r < R, c0 + 16j + 16 <= head_dim.
                    unsafe {
                        _mm512_storeu_ps(out.as_mut_ptr().add(r * head_dim + c0 + 16 * j), *acc)
                    };
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let mut acc = _mm512_setzero_ps();
        for i in (0..a.len()).step_by(16) {
            // SAFETY: i + 16 <= len for both slices.
            unsafe {
                let x = _mm512_loadu_ps(a.as_ptr().add(i));
                let y = _mm512_loadu_ps(b.as_ptr().add(i));
                acc = _mm512_fmadd_ps(x, y, acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
        assert_eq!(a.len(), b.len());
        let mut acc = _mm512_setzero_ps();
        for i in (0..a.len()).step_by(16) {
            // SAFETY: i + 16 <= len; f16 is 16 bits, read unaligned.
            unsafe {
                let x = _mm512_loadu_ps(a.as_ptr().add(i));
                let h = _mm256_loadu_si256(b.as_ptr().add(i).cast());
                acc = _mm512_fmadd_ps(x, _mm512_cvtph_ps(h), acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy_f32(out: &mut [f32], w: f32, v: &[f32]) {
        assert_eq!(out.len(), v.len());
        let w = _mm512_set1_ps(w);
        for i in (0..out.len()).step_by(16) {
            // SAFETY: i + 16 <= len for both slices.
            unsafe {
                let o = out.as_mut_ptr().add(i);
                let x = _mm512_loadu_ps(v.as_ptr().add(i));
                _mm512_storeu_ps(o, _mm512_fmadd_ps(w, x, _mm512_loadu_ps(o)));
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
        assert_eq!(out.len(), v.len());
        let w = _mm512_set1_ps(w);
        for i in (0..out.len()).step_by(16) {
            // SAFETY: as above.
            unsafe {
                let o = out.as_mut_ptr().add(i);
                let x = _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(i).cast()));
                _mm512_storeu_ps(o, _mm512_fmadd_ps(w, x, _mm512_loadu_ps(o)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook formula in f64, query by query.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        cap: usize,
        (start, end): (usize, usize),
        (heads, kv_heads, hd): (usize, usize, usize),
    ) -> Vec<f64> {
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0f64; heads * hd];
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            let row = |t: &[f32], p: usize| -> Vec<f64> {
                let at = (g * cap + p) * hd;
                t[at..at + hd].iter().map(|&x| x as f64).collect()
            };
            let scores: Vec<f64> = (start..end)
                .map(|p| {
                    let key = row(k, p);
                    (0..hd).map(|d| q[h * hd + d] as f64 * key[d]).sum::<f64>() * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (i, p) in (start..end).enumerate() {
                let value = row(v, p);
                for d in 0..hd {
                    out[h * hd + d] += e[i] / sum * value[d];
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8;
                (x as f32 / (1u32 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    #[test]
    fn matches_the_formula_in_f32_and_f16_for_every_shape() {
        // head_dim 64 and 128 take the SIMD path, 6 the scalar one; GQA and MHA.
        for (heads, kv_heads, hd) in [(8, 2, 64), (4, 4, 128), (6, 3, 6)] {
            for (cap, start, end) in [(40, 0, 1), (40, 0, 37), (300, 17, 260)] {
                let q = values(heads * hd, 1);
                let k = values(kv_heads * cap * hd, 2);
                let v = values(kv_heads * cap * hd, 3);
                let want = reference(&q, &k, &v, cap, (start, end), (heads, kv_heads, hd));
                let scale = 1.0 / (hd as f32).sqrt();
                let view = |k: KvBuf<'_>, v: KvBuf<'_>| -> Vec<f32> {
                    let view = CacheView {
                        k,
                        v,
                        capacity: cap,
                        start,
                        end,
                    };
                    let mut out = vec![0f32; heads * hd];
                    decode(&q, view, heads, kv_heads, hd, scale, &mut out);
                    out
                };
                let check = |kind: &str, got: Vec<f32>, want: Vec<f64>| {
                    let worst = got
                        .iter()
                        .zip(&want)
                        .map(|(g, w)| (*g as f64 - w).abs())
                        .fold(0f64, f64::max);
                    assert!(
                        worst < 1e-5,
                        "{kind} {heads}/{kv_heads}/{hd} {start}..{end}: {worst}"
                    );
                };
                check("f32", view(KvBuf::F32(&k), KvBuf::F32(&v)), want);
                // f16 storage: exact against the formula on the rounded values.
                let (k16, v16): (Vec<f16>, Vec<f16>) = (
                    k.iter().map(|&x| f16::from_f32(x)).collect(),
                    v.iter().map(|&x| f16::from_f32(x)).collect(),
                );
                let (kr, vr): (Vec<f32>, Vec<f32>) = (
                    k16.iter().map(|x| x.to_f32()).collect(),
                    v16.iter().map(|x| x.to_f32()).collect(),
                );
                let want = reference(&q, &kr, &vr, cap, (start, end), (heads, kv_heads, hd));
                check("f16", view(KvBuf::F16(&k16), KvBuf::F16(&v16)), want);
            }
        }
    }

    #[test]
    fn the_grouped_kernels_give_the_bits_of_one_query_at_a_time() {
        if !simd() {
            return;
        }
        let n = 37;
        for hd in [16, 64, 80, 96, 128] {
            for rep in 1..=8 {
                let q = values(rep * hd, 7);
                let k = values(n * hd, 8);
                let w = values(rep * n, 9);
                let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
                for kv in [KvBuf::F32(&k), KvBuf::F16(&k16)] {
                    let dtype = if matches!(kv, KvBuf::F16(_)) {
                        "f16"
                    } else {
                        "f32"
                    };
                    let kind = format!("{dtype}, head_dim {hd}, {rep} queries");
                    let mut got = vec![0f32; rep * n];
                    assert!(grouped::scores(&q, kv, 0..n * hd, hd, rep, 0.3, &mut got));
                    for r in 0..rep {
                        for p in 0..n {
                            let (qr, row) = (&q[r * hd..(r + 1) * hd], p * hd..(p + 1) * hd);
                            let want = match kv {
                                KvBuf::F32(k) => dot_f32(qr, &k[row]),
                                KvBuf::F16(k) => dot_f16(qr, &k[row]),
                            } * 0.3;
                            assert_eq!(got[r * n + p].to_bits(), want.to_bits(), "score {kind}");
                        }
                    }
                    let mut got = vec![0f32; rep * hd];
                    assert!(grouped::values(&w, kv, 0..n * hd, hd, rep, &mut got));
                    let mut want = vec![0f32; rep * hd];
                    for p in 0..n {
                        for r in 0..rep {
                            let (o, row) = (&mut want[r * hd..(r + 1) * hd], p * hd..(p + 1) * hd);
                            match kv {
                                KvBuf::F32(v) => axpy_f32(o, w[r * n + p], &v[row]),
                                KvBuf::F16(v) => axpy_f16(o, w[r * n + p], &v[row]),
                            }
                        }
                    }
                    for (g, w) in got.iter().zip(&want) {
                        assert_eq!(g.to_bits(), w.to_bits(), "value {kind}");
                    }
                }
            }
        }
        // Shapes the kernels leave to the loops.
        let mut out = vec![0f32; 9 * 24];
        let k = values(24 * 3, 1);
        assert!(!grouped::scores(
            &k,
            KvBuf::F32(&k),
            0..72,
            24,
            3,
            1.0,
            &mut out
        ));
        assert!(!grouped::values(&k, KvBuf::F32(&k), 0..64, 16, 9, &mut out));
    }

    #[test]
    fn softmax_matches_the_formula_and_keeps_nan() {
        for len in [1, 5, 16, 17, 40, 300] {
            let s: Vec<f32> = values(len, len as u32)
                .iter()
                .map(|v| v * 60.0 - 20.0)
                .collect();
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = s.iter().map(|&x| (x as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            let mut got = s.clone();
            softmax(&mut got);
            for (g, e) in got.iter().zip(&e) {
                let want = e / sum;
                // `s - max` rounds in f32 (half an ulp of 80 is 4e-6),
                // which the exponential carries as a relative error.
                assert!(
                    (*g as f64 - want).abs() <= 1e-5 * want + 1e-30,
                    "{len}: {g} vs {want}"
                );
            }
            let mut nan = s.clone();
            nan[len / 2] = f32::NAN;
            softmax(&mut nan);
            assert!(nan.iter().all(|x| x.is_nan()), "{len}: a NaN score");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp16_is_within_an_ulp_or_two_and_underflows_to_zero() {
        if !simd() {
            return;
        }
        let exp = |x: f32| -> f32 {
            use std::arch::x86_64::*;
            let mut out = [0f32; 16];
            // SAFETY: avx512f was detected.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), x86::exp16(_mm512_set1_ps(x))) };
            out[0]
        };
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            assert!(
                (got - want).abs() <= 2.5e-7 * want,
                "e^{x}: {got} vs {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn a_result_does_not_depend_on_the_thread_count() {
        let (heads, kv_heads, hd, cap) = (8, 2, 64, 200);
        let q = values(heads * hd, 4);
        let k = values(kv_heads * cap * hd, 5);
        let v = values(kv_heads * cap * hd, 6);
        let view = CacheView {
            k: KvBuf::F32(&k),
            v: KvBuf::F32(&v),
            capacity: cap,
            start: 3,
            end: 190,
        };
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    let mut out = vec![0f32; heads * hd];
                    decode(&q, view, heads, kv_heads, hd, 0.125, &mut out);
                    out
                })
        };
        assert_eq!(run(1), run(3));
    }
}
