//! A Q4_K or Q6_K matrix's repacked copy ([`q4k_panel::Repacked`],
//! [`q6k_panel::Repacked`]), made in the background after start-up while
//! the model runs from the file's pages.
//!
//! Why in the background: a 7B Q4_K_M file holds 3.5 GB of Q4_K blocks, and
//! interleaving them takes seconds (reading every page, writing as many
//! fresh ones); loading stays zero-copy and under a second, as the move of
//! the weights into memory does (`weights::resident`, which runs these
//! first). Why a copy at all: the repacked groups give every row the
//! panels' sums at any token count, from aligned loads, which measured on a
//! Zen 4 EPYC (in-cache, ns per row-block and token) 2.9 for one token
//! against 5.2 through the row kernel, and 1.67 against 3.2 for eight; the
//! row kernels' per-row scale work is what bound a decode step.
//!
//! A matrix whose copy is *planned* takes the panels' sums for every row
//! from then on, before the copy exists too (a prompt through
//! `Panel::pack`, as prompts always did), so a row's result never changes
//! when the copy arrives: the same request gives the same answer whenever
//! it runs. The first decode step makes the copies it finds missing, over
//! the thread pool, rather than decoding without them (through
//! `Panel::pack`, 3.5 times the row kernels' time per token, which cost a
//! one-shot 64-token answer 6-7 s on a 7B). One that is never planned
//! (`--keep-mapped`, too little memory, no AVX-512) keeps the row kernels
//! for decode rows, as before.

use super::q4k_panel::{self, Line, ROWS};
use super::{q6k, q6k_panel};
use bytes::Bytes;
use candle_core::quantized::GgmlDType;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// A repacked copy, in its format.
pub enum RepackedCopy {
    Q4K(q4k_panel::Repacked),
    Q6K(q6k_panel::Repacked),
}

/// One matrix's repacked copy: planned or not, made or not.
pub struct Repack {
    format: GgmlDType,
    source: Bytes,
    rows: usize,
    row_bytes: usize,
    planned: AtomicBool,
    /// Whether `source` is a file's read-only map, whose pages can be let
    /// go once the copy exists (set by `plan`).
    file_backed: AtomicBool,
    /// The copy; `None` inside when it could not be made.
    copy: OnceLock<Option<RepackedCopy>>,
    /// Set by the first caller of `make`, which makes the copy.
    making: AtomicBool,
    /// Where the copy's bytes are counted as the process's own memory
    /// (`weights::resident`'s tally, which the template renderer's memory
    /// watch discounts), from before they are allocated.
    tally: OnceLock<&'static AtomicU64>,
}

impl Repack {
    /// A slot for the matrix `source` (`rows` rows of `row_bytes`) of
    /// `format`, or `None` where no copy could ever be made: a format
    /// without one (Q4_K and Q6_K have one), a CPU without the panels'
    /// instructions, or fewer than sixteen rows.
    pub fn new(
        format: GgmlDType,
        source: &Bytes,
        rows: usize,
        row_bytes: usize,
    ) -> Option<Arc<Self>> {
        let has_copy = matches!(format, GgmlDType::Q4K | GgmlDType::Q6K);
        (has_copy && q4k_panel::Panel::available() && rows >= ROWS).then(|| {
            Arc::new(Self {
                format,
                source: source.clone(),
                rows,
                row_bytes,
                planned: AtomicBool::new(false),
                file_backed: AtomicBool::new(false),
                copy: OnceLock::new(),
                making: AtomicBool::new(false),
                tally: OnceLock::new(),
            })
        })
    }

    /// Commits every product from now on to the panels' sums, as the copy
    /// will give them. `file_backed`: the source lies in a file's read-only
    /// map (its pages are let go once the copy exists; they come back from
    /// the file if anything reads them). `tally` counts the copy's bytes
    /// from before they are allocated. Call before the first product.
    pub fn plan(&self, file_backed: bool, tally: Option<&'static AtomicU64>) {
        if let Some(tally) = tally {
            let _ = self.tally.set(tally);
        }
        self.file_backed.store(file_backed, Ordering::Release);
        self.planned.store(true, Ordering::Release);
    }

    /// Whether products take the panels' sums (see the module's doc).
    pub fn is_planned(&self) -> bool {
        self.planned.load(Ordering::Acquire)
    }

    /// The copy, once made.
    pub fn copy(&self) -> Option<&RepackedCopy> {
        self.copy.get().and_then(Option::as_ref)
    }

    /// The source bytes the copy replaces: its whole groups of sixteen rows
    /// (rows past them are still read from the source).
    pub fn replaced(&self) -> &[u8] {
        &self.source[..self.rows / ROWS * ROWS * self.row_bytes]
    }

    /// The whole pages of `replaced`, by address: what a file-backed
    /// source lets go once the copy exists.
    pub fn replaced_pages(&self) -> std::ops::Range<usize> {
        let page = page_size();
        let bytes = self.replaced().as_ptr_range();
        let start = (bytes.start as usize).next_multiple_of(page);
        start..(bytes.end as usize / page * page).max(start)
    }

    /// Makes the copy, once, over the thread pool when `parallel` (a decode
    /// step that needs it now) or on the calling thread (the background
    /// move, which must not take the model's cores); then lets go of a
    /// file-backed source's pages. A caller that finds another making it
    /// waits for it with `wait` (the move), and goes on without it
    /// otherwise (a decode step, which must not wait on an idle-priority
    /// thread; it takes `Panel::pack`, the same bits). Says how many source
    /// bytes the copy replaces (`replaced`; the Q6_K copy is 1% larger), 0
    /// while it does not exist or when memory for it ran out (products then
    /// go on from the source, with the same bits).
    pub fn make(&self, parallel: bool, wait: bool) -> usize {
        let first = !self.making.swap(true, Ordering::AcqRel);
        if first || wait {
            self.copy.get_or_init(|| self.make_now(parallel));
        }
        self.copy().map_or(0, |_| self.replaced().len())
    }

    /// Bytes the copy takes: the replaced bytes for Q4_K; for Q6_K 53
    /// lines of 64 bytes per 16-row block where the rows hold 3360.
    fn copy_bytes(&self) -> usize {
        let replaced = self.replaced().len();
        match self.format {
            GgmlDType::Q6K => replaced / q6k::BLOCK_BYTES / ROWS * q6k_panel::REPACKED_LINES * 64,
            _ => replaced,
        }
    }

    fn make_now(&self, parallel: bool) -> Option<RepackedCopy> {
        let bytes = self.copy_bytes() as u64;
        let tally = self.tally.get();
        if let Some(tally) = tally {
            tally.fetch_add(bytes, Ordering::Relaxed);
        }
        let (source, rows, row_bytes) = (&self.source[..], self.rows, self.row_bytes);
        let copy =
            match self.format {
                GgmlDType::Q4K => q4k_panel::Repacked::new(source, rows, row_bytes, parallel)
                    .map(RepackedCopy::Q4K),
                GgmlDType::Q6K => q6k_panel::Repacked::new(source, rows, row_bytes, parallel)
                    .map(RepackedCopy::Q6K),
                other => unreachable!("`new` gives no slot for {other:?}"),
            };
        let Some(copy) = copy else {
            if let Some(tally) = tally {
                tally.fetch_sub(bytes, Ordering::Relaxed);
            }
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                eprintln!(
                    "note: no memory for a repacked copy of the weights: they stay on the slower path"
                )
            });
            return None;
        };
        let pages = self.replaced_pages();
        #[cfg(target_os = "linux")]
        if self.file_backed.load(Ordering::Acquire) && !pages.is_empty() {
            // SAFETY: whole pages inside a live read-only file map (what
            // `plan` was told; `self.source` holds a slice of it): dropping
            // them loses nothing, a reader faults them in from the file
            // again.
            unsafe {
                libc::madvise(
                    pages.start as *mut libc::c_void,
                    pages.len(),
                    libc::MADV_DONTNEED,
                )
            };
        }
        #[cfg(not(target_os = "linux"))]
        let _ = pages;
        Some(copy)
    }
}

/// The lines of a repacked copy of `groups` groups of sixteen rows of
/// `data` (rows of `row_bytes`), `per_group` lines each, filled group by
/// group by `group(rows, lines)` (the group's sixteen rows, its lines):
/// over the thread pool when `parallel`, on the calling thread if not.
/// `None` when memory for it runs out (products then go on without the
/// copy), not an abort.
///
/// Every line is written once, by `group` (no zero fill first: on a 7B that
/// was a serial 3.4 GB memset, most of a 5-9 s first decode step), so the
/// pages are first touched by the threads that fill them.
///
/// # Panics
/// If `data` is shorter than `groups` groups.
pub(super) fn interleaved(
    data: &[u8],
    groups: usize,
    row_bytes: usize,
    per_group: usize,
    parallel: bool,
    group: impl Fn(&[u8], &mut [std::mem::MaybeUninit<Line>]) + Sync,
) -> Option<Vec<Line>> {
    let group_bytes = ROWS * row_bytes;
    assert!(data.len() >= groups * group_bytes);
    let mut lines: Vec<Line> = Vec::new();
    lines.try_reserve_exact(groups * per_group).ok()?;
    // Huge pages where the kernel gives them (`madvise` mode), for the
    // 2 MiB-aligned part of the allocation (it starts just past a page
    // boundary): fewer TLB misses as a decode step streams it.
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let at = lines.as_mut_ptr() as usize;
        let (start, end) = (
            at.next_multiple_of(HUGE),
            (at + groups * per_group * 64) / HUGE * HUGE,
        );
        if start < end {
            // SAFETY: advice on whole huge pages inside the untouched
            // allocation just made.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    let fill = |g: usize, out: &mut [std::mem::MaybeUninit<Line>]| {
        group(&data[g * group_bytes..(g + 1) * group_bytes], out)
    };
    let spare = &mut lines.spare_capacity_mut()[..groups * per_group];
    if parallel {
        super::pool::for_each_chunk_mut(spare, per_group, fill);
    } else {
        for (g, out) in spare.chunks_exact_mut(per_group).enumerate() {
            fill(g, out);
        }
    }
    // SAFETY: the capacity was reserved above and `group` wrote every line
    // of it (each group's `per_group`, all groups).
    unsafe { lines.set_len(groups * per_group) };
    Some(lines)
}

/// The system's page size (4 KiB where it cannot be asked).
pub(crate) fn page_size() -> usize {
    #[cfg(target_os = "linux")]
    // SAFETY: plain query.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    #[cfg(not(target_os = "linux"))]
    let size = 4096;
    usize::try_from(size)
        .ok()
        .filter(|s| *s > 0)
        .unwrap_or(4096)
}
