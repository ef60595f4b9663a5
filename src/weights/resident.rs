//! Moving a model file's mapped pages into the process's own memory, in the
//! background, after the model has started from the map.
//!
//! Why: on this project's machines two threads stream anonymous memory
//! faster than the same bytes mapped from the page cache (a plain two-thread
//! read loop, 4 interleaved rounds: 25.1–27.8 GB/s from the mapped 7B
//! Q4_K_M file, 28.5–35.5 GB/s from an anonymous copy), and generation is
//! bound by that stream: tg32 on the same file went from 6.58 to 7.12 tok/s
//! (means of 6 interleaved rounds, faster in all 6), Q8_0 from 3.85 to 4.02
//! (4 rounds, faster in all 4). llama.cpp gets the same effect from the
//! copies its CPU repacking makes. Copying at load would cost seconds of
//! start-up, so loading stays zero-copy and this runs afterwards.
//!
//! How: a thread at the lowest CPU priority (`SCHED_IDLE`, so it does not
//! take a core from the model's threads; back to normal priority once
//! someone waits for it, as `bench` does) copies the map chunk by chunk into
//! fresh anonymous pages and `mremap`s each copy over the file's pages at the
//! same address. No pointer changes, so the kernels never notice: a reader
//! sees the file's bytes before a chunk moves and the same bytes after, and
//! the kernel swaps the page tables under the address-space lock. The file's
//! pages leave this process as their copy arrives, so the resident set stays
//! the weights plus one chunk. The page cache keeps its copy (the kernel may
//! drop it under pressure), which is why the move needs free memory the size
//! of the file (within a cgroup's limit too) and is skipped when there is
//! not; `--keep-mapped` skips it always. A map the model took nothing from
//! (it copied what it needed at load) is not moved.
//!
//! Q4_K and Q6_K matrices are not moved but replaced: their repacked copies
//! (`kernels::repack`, planned when the move starts) are made first, unless
//! a decode step made them already, and their file pages let go.

use crate::kernels::repack::{Repack, page_size};
use bytes::Bytes;
use memmap2::Mmap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Instant;

/// Bytes moved per `mremap`: large enough that the system calls cost
/// nothing, small enough that the transient second copy stays far inside
/// the 300 MB the resident-set target allows.
pub const CHUNK: usize = 32 << 20;

/// How long after start-up the move begins, unless someone waits for it.
pub const START_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

/// Free memory the move leaves beyond the copy (`MemAvailable` minus the
/// mapped bytes must exceed it): the KV cache and activations come first.
const HEADROOM: u64 = 1 << 30;

/// A whole-file map as the `Bytes` the weights are sliced from, and a weak
/// handle on it for the move: the move follows the map without keeping it
/// alive, so a map the model took nothing from (it copied what it needed at
/// load) is unmapped as usual and the move ends at once. (`Bytes::is_unique`
/// cannot tell: it is always false for `Bytes::from_owner`.)
///
/// While the bytes live, a bus error reading them (the file `path`
/// truncated under the map) ends the process with an error naming the file
/// (`bus_error`), not a crash.
pub fn share(map: Mmap, path: &std::path::Path) -> (Bytes, Weak<Mmap>) {
    // The watch ends before the map does (fields drop in order), so a
    // range the kernel may reuse is never watched.
    struct Owner(#[allow(dead_code)] super::bus_error::Watch, Arc<Mmap>);
    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            &self.1
        }
    }
    let watch = super::bus_error::watch(&map, path);
    let map = Arc::new(map);
    let weak = Arc::downgrade(&map);
    (Bytes::from_owner(Owner(watch, map)), weak)
}

/// What a finished move did.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Bytes now in anonymous memory.
    pub moved: u64,
    /// Bytes of Q4_K and Q6_K matrices now read from their repacked copies
    /// (`kernels::repack`) instead, their file pages let go.
    pub repacked: u64,
    /// Bytes of the maps it was given.
    pub total: u64,
    /// Seconds from the start of the move to its end.
    pub seconds: f64,
    /// Why it stopped early, if a system call failed.
    pub stopped: Option<String>,
    /// Whether it skipped a map nothing held any more: the model copied
    /// what it needed from it at load, or is gone.
    pub unshared: bool,
}

/// A move in progress; dropping it leaves the thread to finish on its own.
pub struct Mover {
    done: Arc<(Mutex<Option<Report>>, Condvar)>,
    /// Set by `wait`: the thread goes back to normal priority, since at idle
    /// priority a busy machine could starve it (and the waiter) for hours.
    urgent: Arc<AtomicBool>,
}

/// Bytes this process has moved so far, all moves together: what the
/// template renderer's memory watch discounts (`template::jinja`), since a
/// move turns file pages into anonymous ones while a template renders.
static MOVED: AtomicU64 = AtomicU64::new(0);

/// Bytes moved into anonymous memory so far in this process.
pub fn bytes_moved() -> u64 {
    MOVED.load(Ordering::Relaxed)
}

impl Mover {
    /// Starts moving `maps` (from `share`) on a background thread. `None`
    /// when there is nothing to move, the platform has no `mremap`, or the
    /// thread cannot start.
    ///
    /// The matrices of `repacks` whose bytes lie in the maps get their
    /// repacked copies first (`kernels::repack`; planned here, so call this
    /// before the model's first product), and their file pages are let go
    /// rather than moved.
    pub fn start(maps: Vec<Weak<Mmap>>, repacks: Vec<Weak<Repack>>) -> Option<Self> {
        if !cfg!(target_os = "linux") || maps.iter().all(|m| m.strong_count() == 0) {
            return None;
        }
        let repacks = in_maps(&maps, repacks);
        let done = Arc::new((Mutex::new(None), Condvar::new()));
        let urgent = Arc::new(AtomicBool::new(false));
        let (signal, hurry) = (done.clone(), urgent.clone());
        let jobs: Vec<Weak<Repack>> = repacks.iter().map(Arc::downgrade).collect();
        // Planned before the thread runs (which reads the plans), and before
        // the model's first product. Should the thread not start, the first
        // decode step still makes the copies.
        for repack in &repacks {
            repack.plan(true, Some(&MOVED));
        }
        drop(repacks);
        std::thread::Builder::new()
            .name("weights-move".into())
            .spawn(move || {
                set_idle_priority(true);
                // A one-shot run is over before this: it would only pay for
                // the copy (measured: `run -n 1` on the 7B took 1.1-3.3 s
                // wall with the move starting at once, 1.0-1.1 s without).
                let start = Instant::now();
                while start.elapsed() < START_AFTER && !hurry.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                // A panic here must still end `wait` (with the reason).
                let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let (repacked, holes) = make_repacks(jobs, &hurry);
                    let mut report = move_maps(maps, CHUNK, &hurry, &holes);
                    report.repacked = repacked;
                    report
                }))
                .unwrap_or_else(|_| Report {
                    moved: 0,
                    repacked: 0,
                    total: 0,
                    seconds: 0.0,
                    stopped: Some("the move failed (a panic, reported above)".into()),
                    unshared: false,
                });
                if let Some(why) = &report.stopped {
                    // The run goes on from the file's pages; say why once.
                    eprintln!(
                        "note: the weights stay memory-mapped after {:.2} GB moved: {why}",
                        report.moved as f64 / 1e9
                    );
                }
                let (lock, cond) = &*signal;
                *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
                cond.notify_all();
            })
            .ok()?;
        Some(Self { done, urgent })
    }

    /// Blocks until the move has ended and says what it did; the move runs
    /// at normal priority from here on.
    pub fn wait(&self) -> Report {
        self.urgent.store(true, Ordering::Relaxed);
        let (lock, cond) = &*self.done;
        let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(report) = state.as_ref() {
                return report.clone();
            }
            state = cond.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The repacks (still alive) whose replaced bytes lie inside one of `maps`:
/// their pages can be let go, since they come back from the file if read.
fn in_maps(maps: &[Weak<Mmap>], repacks: Vec<Weak<Repack>>) -> Vec<Arc<Repack>> {
    let live: Vec<Arc<Mmap>> = maps.iter().filter_map(Weak::upgrade).collect();
    repacks
        .iter()
        .filter_map(Weak::upgrade)
        .filter(|r| {
            let bytes = r.replaced().as_ptr_range();
            live.iter().any(|m| {
                let map = m.as_ptr_range();
                map.start <= bytes.start && bytes.end <= map.end
            })
        })
        .collect()
}

/// Makes each repacked copy in turn, unless a decode step made it first,
/// and so lets go of the file pages it replaces (`Repack::make`); says the
/// bytes repacked and the page ranges let go, which the move then skips.
/// Switches to normal priority once `urgent` is set.
fn make_repacks(
    jobs: Vec<Weak<Repack>>,
    urgent: &AtomicBool,
) -> (u64, Vec<std::ops::Range<usize>>) {
    let (mut repacked, mut holes) = (0u64, Vec::new());
    let mut hurried = false;
    for job in jobs {
        if !hurried && urgent.load(Ordering::Relaxed) {
            set_idle_priority(false);
            hurried = true;
        }
        // Held for one matrix only: the move never keeps the model alive.
        let Some(repack) = job.upgrade() else {
            continue;
        };
        // Counted in `MOVED` by `make` (`plan` gave it the tally).
        let made = repack.make(false, true);
        if made == 0 {
            continue;
        }
        repacked += made as u64;
        let pages = repack.replaced_pages();
        if !pages.is_empty() {
            holes.push(pages);
        }
    }
    holes.sort_by_key(|h| h.start);
    (repacked, holes)
}

/// Starts moving `maps` into the process's own memory in the background,
/// when the model runs on the CPU and the machine has the memory (`fits`).
/// Call it once the `Weights` are dropped, so a map the model took nothing
/// from is already gone.
pub fn move_into_memory(
    maps: Vec<Weak<Mmap>>,
    repacks: Vec<Weak<Repack>>,
    device: &candle_core::Device,
) -> Option<Mover> {
    let bytes: u64 = maps
        .iter()
        .filter_map(Weak::upgrade)
        .map(|m| m.len() as u64)
        .sum();
    if !device.is_cpu() || bytes == 0 || !fits(bytes, crate::loader::memory_available()) {
        return None;
    }
    Mover::start(maps, repacks)
}

/// Whether a move of `bytes` leaves `HEADROOM` free (`available`:
/// `MemAvailable`, which counts the page cache holding the file; unknown
/// means no).
pub fn fits(bytes: u64, available: Option<u64>) -> bool {
    match (bytes.checked_add(HEADROOM), available) {
        (Some(need), Some(a)) => a >= need,
        _ => false,
    }
}

/// `SCHED_IDLE` (it runs only on a core nobody else wants) or back to
/// `SCHED_OTHER` for the calling thread. Failure leaves the priority as it
/// was (the move still works).
fn set_idle_priority(idle: bool) {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system call on the calling thread with a valid parameter.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        let policy = if idle {
            libc::SCHED_IDLE
        } else {
            libc::SCHED_OTHER
        };
        libc::sched_setscheduler(0, policy, &param);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = idle;
}

/// Moves each map in steps that end on `chunk`-aligned addresses (so a
/// huge page is never split between two steps); stops early at the first
/// failure; skips a map that is gone (nothing holds a slice of it any
/// more: a shard the model copied everything from). Switches the calling
/// thread to normal priority once `urgent` is set.
pub(crate) fn move_maps(
    maps: Vec<Weak<Mmap>>,
    chunk: usize,
    urgent: &AtomicBool,
    holes: &[std::ops::Range<usize>],
) -> Report {
    let start = Instant::now();
    let total = maps
        .iter()
        .filter_map(Weak::upgrade)
        .map(|m| m.len() as u64)
        .sum();
    let mut moved = 0u64;
    let (mut stopped, mut unshared) = (None, false);
    let mut hurried = false;
    'maps: for weak in maps {
        let mut at = 0;
        loop {
            if !hurried && urgent.load(Ordering::Relaxed) {
                set_idle_priority(false);
                hurried = true;
            }
            // Held for one step only: the move never keeps a map alive.
            let Some(map) = weak.upgrade() else {
                unshared = true;
                continue 'maps;
            };
            if at >= map.len() {
                break;
            }
            let addr = map.as_ptr() as usize + at;
            let len = (chunk - addr % chunk).min(map.len() - at);
            for piece in outside(addr..addr + len, holes) {
                // SAFETY: `map` starts on a page boundary (it is a whole-file
                // map), every step but the last ends on a multiple of
                // `chunk` (a multiple of the page size) and the holes are
                // whole pages, so each piece starts on a page; it lies
                // inside the map, which stays alive for the call.
                if let Err(e) = unsafe { move_range(piece.start as *const u8, piece.len()) } {
                    stopped = Some(e);
                    break 'maps;
                }
                moved += piece.len() as u64;
                MOVED.fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
            at += len;
        }
    }
    Report {
        moved,
        repacked: 0,
        total,
        seconds: start.elapsed().as_secs_f64(),
        stopped,
        unshared,
    }
}

/// The parts of `range` outside every one of `holes` (sorted by start,
/// not overlapping), in order.
fn outside(
    range: std::ops::Range<usize>,
    holes: &[std::ops::Range<usize>],
) -> Vec<std::ops::Range<usize>> {
    let mut pieces = Vec::new();
    let mut at = range.start;
    for hole in holes {
        if hole.end <= at || hole.start >= range.end {
            continue;
        }
        if hole.start > at {
            pieces.push(at..hole.start);
        }
        at = at.max(hole.end);
    }
    if at < range.end {
        pieces.push(at..range.end);
    }
    pieces
}

/// The huge-page size the copies are aligned to (x86-64's and arm64's 2 MiB).
const HUGE: usize = 2 << 20;

/// Replaces the read-only mapping at `[at, at + len)` (page-aligned start,
/// the last page possibly partial: the rest of it reads as zeros in both
/// mappings) with an anonymous copy at the same address.
///
/// The copy is placed at the same offset within a huge page as `at`, so
/// where `at` is huge-page aligned the kernel can back it with huge pages
/// and `mremap` moves them whole (fewer faults while copying, fewer TLB
/// misses while the kernels stream it).
///
/// # Safety
/// `at` must be page-aligned and `[at, at + len)` inside one live read-only
/// mapping that nobody writes.
#[cfg(target_os = "linux")]
unsafe fn move_range(at: *const u8, len: usize) -> Result<(), String> {
    let page = page_size();
    if !(at as usize).is_multiple_of(page) {
        return Err("the map does not start on a page boundary".into());
    }
    let span = len.div_ceil(page) * page;
    let errno = || std::io::Error::last_os_error();
    // SAFETY: a fresh private anonymous reservation `HUGE` bytes larger
    // than needed, trimmed to `span` bytes at `at`'s offset within a huge
    // page; `len` bytes are copied into it from the live range the caller
    // vouches for; it is made read-only and then moved over the range (the
    // kernel unmaps the old pages and moves the new ones under one lock, so
    // the range is never empty), or unmapped again on failure.
    unsafe {
        let raw = libc::mmap(
            std::ptr::null_mut(),
            span + HUGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if raw == libc::MAP_FAILED {
            return Err(format!("allocating {span} bytes: {}", errno()));
        }
        let lead = (at as usize % HUGE + HUGE - raw as usize % HUGE) % HUGE;
        let copy = raw.cast::<u8>().add(lead).cast::<libc::c_void>();
        if lead > 0 {
            libc::munmap(raw, lead);
        }
        libc::munmap(copy.cast::<u8>().add(span).cast(), HUGE - lead);
        libc::madvise(copy, span, libc::MADV_HUGEPAGE);
        // Every page in one call rather than one fault per page (Linux
        // 5.14+; on older kernels the copy faults them in).
        libc::madvise(copy, span, libc::MADV_POPULATE_WRITE);
        std::ptr::copy_nonoverlapping(at, copy.cast::<u8>(), len);
        if libc::mprotect(copy, span, libc::PROT_READ) != 0 {
            let e = errno();
            libc::munmap(copy, span);
            return Err(format!("protecting the copy: {e}"));
        }
        let put = libc::mremap(
            copy,
            span,
            span,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            at as *mut libc::c_void,
        );
        if put == libc::MAP_FAILED {
            let e = errno();
            // Linux unmaps the destination before it moves the pages in, and
            // a few of its failures (memory accounting, page tables) come
            // after that: if the range is empty now, fill it with the copy's
            // bytes at once, so the window in which a reader could find a
            // hole is microseconds rather than the rest of the run. (Never
            // seen here; the usual failures come before the unmap and leave
            // the file's pages in place, which `MAP_FIXED_NOREPLACE` sees.)
            let fill = libc::mmap(
                at as *mut libc::c_void,
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            );
            if fill != libc::MAP_FAILED {
                if fill != at as *mut libc::c_void {
                    // A kernel older than 4.17 took the flag as a hint.
                    libc::munmap(fill, span);
                } else {
                    std::ptr::copy_nonoverlapping(copy.cast::<u8>(), fill.cast::<u8>(), len);
                    libc::mprotect(fill, span, libc::PROT_READ);
                }
            }
            libc::munmap(copy, span);
            return Err(format!("moving the copy over the map: {e}"));
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
unsafe fn move_range(_at: *const u8, _len: usize) -> Result<(), String> {
    Err("moving mapped pages needs Linux's mremap".into())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file of `len` pattern bytes, mapped read-only.
    fn mapped(len: usize) -> (tempfile::NamedTempFile, Bytes, Weak<Mmap>, Vec<u8>) {
        let want: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&want).unwrap();
        file.flush().unwrap();
        // SAFETY: the test owns the file and never changes it.
        let map = unsafe { memmap2::Mmap::map(file.as_file()) }.unwrap();
        let (map, weak) = share(map, file.path());
        (file, map, weak, want)
    }

    /// Whether any mapping of this process covering `addr` is backed by `path`.
    fn file_backed(addr: usize, path: &std::path::Path) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let name = path.to_str().unwrap();
        maps.lines().any(|line| {
            let range = line.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let (a, b) = (
                usize::from_str_radix(a, 16).unwrap(),
                usize::from_str_radix(b, 16).unwrap(),
            );
            a <= addr && addr < b && line.ends_with(name)
        })
    }

    #[test]
    fn moved_pages_hold_the_same_bytes_at_the_same_address_and_leave_the_file() {
        let page = page_size();
        // Three chunks of two pages and a partial page.
        let len = 6 * page + 100;
        let (file, map, weak, want) = mapped(len);
        let keep = map.slice(page..2 * page + 10);
        let addr = map.as_ptr() as usize;
        assert!(file_backed(addr, file.path()));
        let report = move_maps(vec![weak], 2 * page, &AtomicBool::new(false), &[]);
        assert_eq!((report.stopped, report.unshared), (None, false));
        assert_eq!((report.moved, report.total), (len as u64, len as u64));
        assert_eq!(map.as_ptr() as usize, addr);
        assert_eq!(&map[..], &want[..]);
        assert_eq!(&keep[..], &want[page..2 * page + 10]);
        for at in (0..len).step_by(page) {
            assert!(
                !file_backed(addr + at, file.path()),
                "page at {at} still mapped from the file"
            );
        }
    }

    #[test]
    fn readers_see_the_same_bytes_while_the_pages_move() {
        let page = page_size();
        let len = 64 * page;
        let (_file, map, weak, want) = mapped(len);
        let want_sum: u64 = want.iter().map(|&b| b as u64).sum();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (map, stop) = (map.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut passes = 0;
                while !stop.load(Ordering::Relaxed) || passes == 0 {
                    let sum: u64 = map.iter().map(|&b| b as u64).sum();
                    assert_eq!(sum, want_sum);
                    passes += 1;
                }
                passes
            })
        };
        let report = move_maps(vec![weak], page, &AtomicBool::new(false), &[]);
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        assert_eq!(report.moved, len as u64);
        assert_eq!(&map[..], &want[..]);
    }

    #[test]
    fn a_move_stops_when_the_model_is_gone_and_the_thread_reports() {
        // Nothing holds a slice: the map is gone and nothing moves.
        let (_file, map, weak, _) = mapped(3 * page_size());
        drop(map);
        assert!(Mover::start(vec![weak.clone()], Vec::new()).is_none());
        let report = move_maps(
            vec![weak.clone()],
            page_size(),
            &AtomicBool::new(false),
            &[],
        );
        assert_eq!((report.moved, report.unshared), (0, true));
        assert_eq!(report.stopped, None);
        // A gone map (a shard the model copied everything from) is skipped;
        // the next one still moves.
        let (file, other, other_weak, want) = mapped(3 * page_size());
        let report = move_maps(
            vec![weak, other_weak],
            page_size(),
            &AtomicBool::new(false),
            &[],
        );
        assert_eq!((report.moved, report.unshared), (want.len() as u64, true));
        assert_eq!(&other[..], &want[..]);
        assert!(!file_backed(other.as_ptr() as usize, file.path()));
        // The move does not keep a map alive: a slice is enough for it.
        let (_file, map, weak, want) = mapped(5 * CHUNK / 4);
        let slice = map.slice(100..200);
        drop(map);
        let mover = Mover::start(vec![weak.clone()], Vec::new()).unwrap();
        let report = mover.wait();
        assert_eq!((report.moved, report.stopped), (want.len() as u64, None));
        assert_eq!(&slice[..], &want[100..200]);
        drop(slice);
        assert_eq!(weak.strong_count(), 0, "the mover kept the map alive");
    }

    #[test]
    fn the_parts_outside_the_holes_are_what_is_left_in_order() {
        let holes = [10..20, 30..40, 50..60];
        assert_eq!(
            outside(0..100, &holes),
            vec![0..10, 20..30, 40..50, 60..100]
        );
        assert_eq!(outside(15..35, &holes), vec![20..30]);
        assert_eq!(
            outside(12..18, &holes),
            Vec::<std::ops::Range<usize>>::new()
        );
        assert_eq!(outside(60..70, &holes), vec![60..70]);
        assert_eq!(outside(0..10, &holes), vec![0..10]);
        assert_eq!(outside(5..25, &[]), vec![5..25]);
    }

    /// A Q4_K matrix sliced from a mapped file: the move plans its copy,
    /// makes it first (the model's products give the same bits before and
    /// after), lets its whole pages go instead of moving them (they stay
    /// the file's, faulted back in if read) and moves the rest.
    #[test]
    fn a_repacked_matrix_is_copied_first_and_its_pages_let_go_not_moved() {
        use crate::kernels::qmatmul::QuantMatrix;
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let page = page_size();
        let (rows, cols) = (64, 4096);
        let values = crate::kernels::test_values(rows * cols, 3);
        let w = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        let blocks = q.data().unwrap().into_owned();
        // The matrix a page and a bit into the file, more file after it.
        let at = page + 96;
        let mut bytes = vec![7u8; at];
        bytes.extend_from_slice(&blocks);
        bytes.extend(std::iter::repeat_n(9u8, 3 * page));
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&bytes).unwrap();
        file.flush().unwrap();
        // SAFETY: the test owns the file and never changes it.
        let map = unsafe { memmap2::Mmap::map(file.as_file()) }.unwrap();
        let (map, weak) = share(map, file.path());
        let data = map.slice(at..at + blocks.len());
        let matrix = QuantMatrix::new(GgmlDType::Q4K, data, rows, cols)
            .unwrap()
            .unwrap();
        let Some(repack) = matrix.repack() else {
            eprintln!("no AVX-512 VNNI on this CPU: no repacked copies");
            return;
        };
        let mover = Mover::start(vec![weak], vec![Arc::downgrade(repack)]).unwrap();
        assert!(repack.is_planned());
        let x = Tensor::from_vec(
            crate::kernels::test_values(3 * cols, 4),
            (3, cols),
            &Device::Cpu,
        )
        .unwrap();
        let product = |class| {
            let out = matrix.forward_as(&x, class).unwrap();
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        use crate::kernels::RowClass::{Prompt, Rows};
        // A prompt reads the rows as stored and makes no copy.
        let before = product(Prompt);
        assert!(repack.copy().is_none());
        let tally = bytes_moved();
        let report = mover.wait();
        assert_eq!(report.stopped, None);
        assert_eq!(report.repacked, blocks.len() as u64);
        assert!(bytes_moved() >= tally + report.moved + report.repacked);
        let hole = (map.as_ptr() as usize + at).next_multiple_of(page)
            ..(map.as_ptr() as usize + at + blocks.len()) / page * page;
        assert_eq!(report.moved, (bytes.len() - hole.len()) as u64);
        // Let go: not in this process any more (until something reads it).
        // A page in the middle: the kernel's fault-around maps up to 16
        // page-cache pages beside any file page faulted in, so pages near
        // the hole's edges come back when the move reads its neighbours
        // (a few per matrix, the page cache's, never a second copy).
        let middle = (hole.start + hole.len() / 2) / page * page;
        assert!(hole.len() >= 32 * page, "the hole must outlast two windows");
        assert_ne!(
            present(middle),
            Some(true),
            "a let-go page is still resident"
        );
        assert_eq!(product(Rows), before);
        assert_eq!(product(Prompt), before);
        assert!(
            file_backed(hole.start, file.path()),
            "a let-go page was moved"
        );
        assert!(file_backed(hole.end - 1, file.path()));
        assert!(
            !file_backed(map.as_ptr() as usize, file.path()),
            "the head stayed"
        );
        assert!(!file_backed(hole.end, file.path()), "the tail stayed");
        assert_eq!(&map[..], &bytes[..], "the bytes changed");
    }

    /// Whether the page at `addr` is in this process's memory (the present
    /// bit of `/proc/self/pagemap`), if that file can be read.
    fn present(addr: usize) -> Option<bool> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open("/proc/self/pagemap").ok()?;
        file.seek(SeekFrom::Start((addr / page_size()) as u64 * 8))
            .ok()?;
        let mut entry = [0u8; 8];
        file.read_exact(&mut entry).ok()?;
        Some(u64::from_le_bytes(entry) >> 63 == 1)
    }

    #[test]
    fn a_move_needs_the_file_size_free_and_a_gigabyte_more() {
        assert!(fits(4 << 30, Some(6 << 30)));
        assert!(!fits(4 << 30, Some((5 << 30) - 1)));
        assert!(!fits(4 << 30, None));
        assert!(!fits(u64::MAX, Some(u64::MAX)));
    }
}
