//! The threads that share a decode step's matrix products: workers that
//! spin between products instead of sleeping.
//!
//! Why not rayon here: generating one token runs some 260 parallel
//! regions (seven matrices and the attention per layer, then the output
//! head) separated by short serial steps (norms, rope, quantizing the
//! activations). Rayon's idle workers go to sleep on a futex after a few
//! microseconds of looking for work, so nearly every region began by
//! waking the other thread while the caller worked alone: in a profile the
//! second thread was busy 88% of a token, llama.cpp's (whose threadpool
//! spins) 98%. Here a worker spins for up to [`SPIN`] after a region
//! before it sleeps, so within a token it is always awake; between turns
//! it sleeps as before. On a 7B Q4_K_M file, 2 threads, six interleaved
//! rounds: 5.66 tok/s generation with rayon, 6.64 with this pool (and
//! 6.29 when the spinning thread also yielded to the scheduler every 256
//! turns, which it therefore does not).
//!
//! One region runs at a time: a caller that finds the pool busy (two
//! models in one process, tests in parallel) takes rayon's road instead.
//! The thread count follows rayon's (`--threads`, `RAYON_NUM_THREADS`, or
//! the `install`ed pool the caller runs in), so results split the same way.
//!
//! Spinning threads are at the scheduler's mercy when CPUs are short, so:
//! with more threads than the CPUs the process may use, regions take
//! rayon's road (a first version made `--threads 3` on 2 cores 5x slower,
//! and `taskset -c 0` 30x on a tiny model); and a region ends when its
//! tasks are done, without waiting for a worker the scheduler left off its
//! CPU to check in (with a busy loop on one core, a 7B Q4_K_M generated
//! 3.60 and 3.47 tok/s against rayon's 3.39 and 2.89).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps: longer than the serial
/// steps between a token's products (at most a few hundred microseconds at
/// 7B), short enough that the REPL between turns costs nothing.
pub const SPIN: Duration = Duration::from_millis(2);

/// Runs `task(i)` for every `i` in `0..n`, spread over rayon's current
/// thread count (the caller is one of them); returns when all are done.
/// Tasks are claimed one at a time from a counter, so uneven tasks
/// balance. A panic in a task is raised again here once every thread has
/// stopped touching the caller's data.
pub fn run(n: usize, task: &(dyn Fn(usize) + Sync)) {
    let threads = rayon::current_num_threads();
    if threads.min(n) <= 1 {
        (0..n).for_each(task);
        return;
    }
    if threads > cores() || n > MAX_TASKS {
        // More threads than CPUs: a spinning worker would take the CPU of
        // one that has work (measured: 3.6 -> 0.7 tok/s at 3 threads on 2
        // cores), so rayon's sleeping workers do better.
        return on_rayon(n, task);
    }
    let pool = POOL.get_or_init(Pool::default);
    // A panic in an earlier region poisons the lock; the pool is sound
    // all the same (that region waited for every task).
    let _turn = match pool.dispatch.try_lock() {
        Ok(turn) => turn,
        Err(std::sync::TryLockError::Poisoned(turn)) => turn.into_inner(),
        // Another region is running (a caller on another thread): rayon's road.
        Err(std::sync::TryLockError::WouldBlock) => return on_rayon(n, task),
    };
    pool.run(threads.min(n) - 1, n, task);
}

/// The tasks of a region this pool does not take, on rayon's threads.
fn on_rayon(n: usize, task: &(dyn Fn(usize) + Sync)) {
    use rayon::prelude::*;
    (0..n).into_par_iter().for_each(task);
}

/// [`run`] over `out` cut into chunks of `chunk` items (the last may be
/// shorter): `fill(i, chunk_i)`, each chunk handed to exactly one task.
pub fn for_each_chunk_mut<T: Send>(
    out: &mut [T],
    chunk: usize,
    fill: impl Fn(usize, &mut [T]) + Sync,
) {
    assert!(chunk > 0, "chunks of no items");
    let len = out.len();
    let base = SendPtr(out.as_mut_ptr());
    run(len.div_ceil(chunk), &|i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: task `i` is run exactly once and chunks are disjoint, so
        // this is the only reference to `out[start..end]` while it lives;
        // `run` returns (and `out`'s borrow ends) only after every task.
        let dst = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        fill(i, dst)
    });
}

/// A raw pointer the tasks may share (they touch disjoint items).
pub(super) struct SendPtr<T>(pub(super) *mut T);
// SAFETY: each task makes a `&mut` of, or writes through the pointer to,
// its own items only, so sharing the pointer hands each item to one
// thread, which `T: Send` allows.
unsafe impl<T: Send> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(super) fn get(&self) -> *mut T {
        self.0
    }
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// Bits of [`Pool::signal`] that hold the region's helper count.
const HELPER_BITS: u32 = 16;
/// Bits of [`Pool::claim`] that hold the next task (the rest: the epoch).
const NEXT_BITS: u32 = 24;
const NEXT_MASK: u64 = (1 << NEXT_BITS) - 1;
/// Most tasks a region may have (more take rayon's road).
const MAX_TASKS: usize = NEXT_MASK as usize;

/// The CPUs this process may run on (affinity, cgroup quota).
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The regions' shared state. The caller never waits for a worker that has
/// not started a task: a worker the scheduler left off its CPU (a busy
/// machine, more threads than cores) holds nobody up unless it is inside a
/// task, as with rayon. So a region ends when all its tasks are done, not
/// when every worker has checked in.
#[derive(Default)]
struct Pool {
    /// Held by the one caller whose region is running.
    dispatch: Mutex<()>,
    /// `epoch << HELPER_BITS | helpers`, written once per region, after the
    /// rest (SeqCst: a worker going to sleep and the dispatcher deciding
    /// whether to wake it must agree on the order of this and `sleepers`).
    /// Workers with an index under `helpers` join the region.
    signal: AtomicU64,
    /// `epoch << NEXT_BITS | next task`. A task is claimed by moving `next`
    /// on with the epoch unchanged, so a worker that saw an old region can
    /// never claim in a newer one, and one that claims knows its region
    /// is still running (its caller waits for that task).
    claim: AtomicU64,
    /// The region's task: a pointer to the caller's `&dyn Fn` (on its
    /// stack until the region ends). Written after `claim` is reset, so a
    /// worker that reads the next region's task fails its claim.
    task: AtomicPtr<()>,
    /// The region's task count (written with `task`).
    n: AtomicUsize,
    /// Tasks finished in the current region.
    done: AtomicUsize,
    /// The region's first panic, raised again on the caller (kept, never
    /// dropped on a worker: a payload whose drop panics must not kill it).
    payload: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    /// Workers spawned so far (only the dispatcher spawns).
    workers: Mutex<usize>,
    /// Set when the system refused a thread: use the ones there are.
    spawn_failed: AtomicBool,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

type Task<'a> = &'a (dyn Fn(usize) + Sync);

impl Pool {
    /// Runs `task(0..n)` on the caller and up to `helpers` workers. The
    /// caller must hold `dispatch`, and `n` be at most [`MAX_TASKS`].
    fn run(&'static self, helpers: usize, n: usize, task: Task<'_>) {
        debug_assert!(n <= MAX_TASKS);
        let helpers = self.spawn(helpers).min((1 << HELPER_BITS) - 1);
        if let Some(stale) = lock(&self.payload).take() {
            // A panic no caller raised: leaked, as dropping it could panic.
            std::mem::forget(stale);
        }
        let epoch = (self.signal.load(Ordering::Relaxed) >> HELPER_BITS) + 1;
        let tag = epoch & ((1 << (64 - NEXT_BITS)) - 1);
        // Reset the claim first: whoever reads the new task or count below
        // then sees the new epoch when it claims.
        self.claim.store(tag << NEXT_BITS, Ordering::SeqCst);
        self.done.store(0, Ordering::SeqCst);
        // The task stays on this frame until every task is done (below).
        let holder: Task<'_> = task;
        self.task
            .store(&holder as *const Task<'_> as *mut (), Ordering::SeqCst);
        self.n.store(n, Ordering::SeqCst);
        self.signal
            .store(epoch << HELPER_BITS | helpers as u64, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = lock(&self.sleep);
            self.wake.notify_all();
        }
        self.claim_tasks(tag);
        // Tasks claimed by workers may still run: wait for them (yielding
        // now and then, in case one waits for this thread's CPU).
        let mut spins = 0u32;
        while self.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins & 255 == 0 {
                std::thread::yield_now();
            }
        }
        if let Some(payload) = lock(&self.payload).take() {
            std::panic::resume_unwind(payload);
        }
    }

    /// Spawns workers up to `helpers` (fewer if the system refuses one);
    /// returns how many there are.
    fn spawn(&'static self, helpers: usize) -> usize {
        let mut spawned = lock(&self.workers);
        while *spawned < helpers && !self.spawn_failed.load(Ordering::Relaxed) {
            // Read under `dispatch`, before this region's signal: the new
            // worker sees the region start.
            let (index, seen) = (*spawned, self.signal.load(Ordering::SeqCst));
            let started = std::thread::Builder::new()
                .name(format!("starling-kernel-{index}"))
                // As the compute pools' threads, whose work this takes over.
                .stack_size(8 << 20)
                .spawn(move || self.work(index, seen));
            match started {
                Ok(_) => *spawned += 1,
                Err(_) => self.spawn_failed.store(true, Ordering::Relaxed),
            }
        }
        (*spawned).min(helpers)
    }

    /// Claims and runs the tasks of the region tagged `tag` until none is
    /// left (or that region is over). A task's panic is kept for the
    /// caller and counts as done, so the region still ends.
    fn claim_tasks(&self, tag: u64) {
        let task = self.task.load(Ordering::SeqCst) as *const Task<'_>;
        let n = self.n.load(Ordering::SeqCst);
        loop {
            let c = self.claim.load(Ordering::SeqCst);
            let i = (c & NEXT_MASK) as usize;
            if c >> NEXT_BITS != tag || i >= n {
                return;
            }
            if self
                .claim
                .compare_exchange_weak(c, c + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                continue;
            }
            // SAFETY: the claim succeeded with this region's tag, so the
            // region is running and its caller waits for task `i` before
            // `holder` goes; `task` and `n` were read after the region's
            // signal and before the claim, so they are this region's (the
            // next region's are written only after `claim` is reset, which
            // would have failed the claim).
            let task = unsafe { *task };
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| task(i))) {
                let mut slot = lock(&self.payload);
                match *slot {
                    None => *slot = Some(payload),
                    Some(_) => std::mem::forget(payload),
                }
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }

    fn work(&self, index: usize, mut seen: u64) {
        let mut helped = true;
        loop {
            // A worker the last region did without sleeps at once: spinning
            // would only take a core from the ones that work.
            seen = self.wait_past(seen, helped);
            helped = index < (seen & ((1 << HELPER_BITS) - 1)) as usize;
            if helped {
                let epoch = seen >> HELPER_BITS;
                self.claim_tasks(epoch & ((1 << (64 - NEXT_BITS)) - 1));
            }
        }
    }

    /// Waits until `signal` moves past `seen` (spinning for up to [`SPIN`]
    /// first when `spin`, then sleeping); returns the new signal.
    fn wait_past(&self, seen: u64, spin: bool) -> u64 {
        if spin {
            let start = Instant::now();
            let mut spins = 0u32;
            loop {
                let now = self.signal.load(Ordering::SeqCst);
                if now != seen {
                    return now;
                }
                std::hint::spin_loop();
                spins = spins.wrapping_add(1);
                if spins & 1023 == 0 && start.elapsed() > SPIN {
                    break;
                }
            }
        }
        let mut guard = lock(&self.sleep);
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        loop {
            let now = self.signal.load(Ordering::SeqCst);
            if now != seen {
                self.sleepers.fetch_sub(1, Ordering::SeqCst);
                return now;
            }
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The data behind `m`, poisoned or not (every holder leaves it consistent).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of its own (the global one may be busy with another test,
    /// which would send `run` down rayon's road), left running.
    fn private() -> &'static Pool {
        Box::leak(Box::default())
    }

    /// Spins until `ready` (a loaded machine may start a worker late), for
    /// at most five seconds.
    fn wait_for(ready: impl Fn() -> bool) {
        let start = Instant::now();
        while !ready() && start.elapsed() < Duration::from_secs(5) {
            std::thread::yield_now();
        }
    }

    fn counted(pool: &'static Pool, helpers: usize, n: usize) -> Vec<usize> {
        let counts: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        pool.run(helpers, n, &|i| {
            counts[i].fetch_add(1, Ordering::Relaxed);
        });
        counts.into_iter().map(AtomicUsize::into_inner).collect()
    }

    #[test]
    fn every_task_runs_once_as_the_helper_count_changes() {
        let pool = private();
        for helpers in [2, 0, 1, 3, 1, 2] {
            for n in [0, 1, 2, 7, 300] {
                assert!(counted(pool, helpers, n).iter().all(|&c| c == 1));
            }
        }
        assert_eq!(*lock(&pool.workers), 3);
    }

    #[test]
    fn a_region_does_not_wait_for_a_worker_that_never_runs() {
        // A worker the scheduler leaves off its CPU: counted, never running.
        let pool = private();
        *lock(&pool.workers) = 1;
        for _ in 0..3 {
            assert!(counted(pool, 1, 50).iter().all(|&c| c == 1));
        }
    }

    #[test]
    fn workers_take_tasks() {
        let pool = private();
        let caller = std::thread::current().id();
        let elsewhere = AtomicUsize::new(0);
        pool.run(1, 64, &|_| {
            if std::thread::current().id() != caller {
                elsewhere.fetch_add(1, Ordering::Relaxed);
            } else {
                wait_for(|| elsewhere.load(Ordering::Relaxed) > 0);
            }
        });
        assert!(elsewhere.into_inner() > 0, "the worker took no task");
    }

    #[test]
    fn chunks_cover_the_slice_and_regions_follow_one_another() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            for round in 0..200 {
                let mut out = vec![0usize; 1000 + round];
                for_each_chunk_mut(&mut out, 64, |i, dst| {
                    for (j, v) in dst.iter_mut().enumerate() {
                        *v = i * 64 + j + round;
                    }
                });
                assert!(out.iter().enumerate().all(|(j, &v)| v == j + round));
            }
        });
    }

    #[test]
    fn a_sleeping_worker_wakes_for_the_next_region() {
        let pool = private();
        for _ in 0..3 {
            assert!(counted(pool, 1, 64).iter().all(|&c| c == 1));
            // It spins for SPIN, then sleeps (a loaded machine may take longer).
            let start = Instant::now();
            while pool.sleepers.load(Ordering::SeqCst) == 0 {
                assert!(start.elapsed() < Duration::from_secs(5), "never slept");
                std::thread::sleep(SPIN);
            }
        }
    }

    #[test]
    fn a_panic_on_a_worker_reaches_the_caller_and_the_pool_goes_on() {
        let pool = private();
        let caller = std::thread::current().id();
        let panicked = AtomicBool::new(false);
        let caught = catch_unwind(AssertUnwindSafe(|| {
            pool.run(1, 100, &|_| {
                if std::thread::current().id() != caller {
                    panicked.store(true, Ordering::Relaxed);
                    panic!("worker task");
                }
                wait_for(|| panicked.load(Ordering::Relaxed));
            })
        }));
        let payload = caught.expect_err("the worker's panic was lost");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"worker task"));
        assert!(counted(pool, 1, 100).iter().all(|&c| c == 1));
        let caught = catch_unwind(AssertUnwindSafe(|| {
            pool.run(1, 100, &|i| assert_ne!(i, 0, "caller task"))
        }));
        assert!(caught.is_err());
        assert!(counted(pool, 1, 100).iter().all(|&c| c == 1));
    }

    #[test]
    fn run_follows_rayons_thread_count() {
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let seen = Mutex::new(std::collections::HashSet::new());
            pool.install(|| {
                run(64, &|_| {
                    lock(&seen).insert(std::thread::current().id());
                    std::thread::sleep(Duration::from_micros(200));
                })
            });
            assert!(lock(&seen).len() <= threads);
        }
    }
}
