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

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    let threads = rayon::current_num_threads().min(n);
    if threads <= 1 {
        (0..n).for_each(task);
        return;
    }
    let pool = POOL.get_or_init(Pool::default);
    // A panic in an earlier region poisons the lock; the pool is sound
    // all the same (that region waited for every worker).
    let _turn = match pool.dispatch.try_lock() {
        Ok(turn) => turn,
        Err(std::sync::TryLockError::Poisoned(turn)) => turn.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            use rayon::prelude::*;
            (0..n).into_par_iter().for_each(task);
            return;
        }
    };
    pool.run(threads - 1, n, task);
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
struct SendPtr<T>(*mut T);
unsafe impl<T: Send> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

static POOL: OnceLock<Pool> = OnceLock::new();

#[derive(Default)]
struct Pool {
    /// Held by the one caller whose region is running.
    dispatch: Mutex<()>,
    /// The region to run; written only by the holder of `dispatch` while
    /// no worker reads it (`pending` is zero), read by workers after they
    /// see `epoch` move.
    job: JobCell,
    /// Bumped once per region: a worker that sees it move takes the job.
    epoch: AtomicU64,
    /// The next task to claim.
    next: AtomicUsize,
    /// Workers that have not yet finished with the current region.
    pending: AtomicUsize,
    panicked: AtomicBool,
    /// Workers spawned so far (guarded: only the dispatcher spawns).
    workers: Mutex<usize>,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

#[derive(Default)]
struct JobCell(UnsafeCell<Job>);
// SAFETY: see `Pool::job`: one writer at a time, never while read; the
// task it points to is `Sync` and outlives every read.
unsafe impl Sync for JobCell {}
unsafe impl Send for JobCell {}

struct Job {
    /// The caller's task with its lifetime erased: valid until `pending`
    /// reaches zero, which `run` waits for before it returns or unwinds.
    task: *const (dyn Fn(usize) + Sync),
    n: usize,
    /// Workers that take tasks (the others only report in).
    helpers: usize,
}

impl Default for Job {
    fn default() -> Self {
        Self {
            task: &(|_: usize| {}) as &(dyn Fn(usize) + Sync),
            n: 0,
            helpers: 0,
        }
    }
}

impl Pool {
    fn run(&'static self, helpers: usize, n: usize, task: &(dyn Fn(usize) + Sync)) {
        let workers = {
            let mut spawned = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            while *spawned < helpers {
                let (index, seen) = (*spawned, self.epoch.load(Ordering::Acquire));
                let started = std::thread::Builder::new()
                    .name(format!("starling-kernel-{index}"))
                    .spawn(move || self.work(index, seen));
                if started.is_err() {
                    break;
                }
                *spawned += 1;
            }
            *spawned
        };
        // SAFETY: `pending` is zero (the previous region waited for it) and
        // we hold `dispatch`, so no worker reads the job while it changes.
        unsafe {
            let job = &mut *self.job.0.get();
            // Erase the lifetime: every worker is done with `task` before
            // `Finish` below lets this function return or unwind.
            job.task = std::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                *const (dyn Fn(usize) + Sync + 'static),
            >(task as *const _);
            job.n = n;
            job.helpers = helpers.min(workers);
        }
        self.next.store(0, Ordering::Relaxed);
        self.panicked.store(false, Ordering::Relaxed);
        self.pending.store(workers, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::Release);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
        struct Finish(&'static Pool);
        impl Drop for Finish {
            fn drop(&mut self) {
                while self.0.pending.load(Ordering::Acquire) > 0 {
                    std::hint::spin_loop();
                }
            }
        }
        let finish = Finish(self);
        self.claim(n, task);
        drop(finish);
        if self.panicked.load(Ordering::Relaxed) {
            panic!("a kernel task panicked on a worker thread");
        }
    }

    /// Runs tasks until none is left unclaimed.
    fn claim(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return;
            }
            task(i);
        }
    }

    fn work(&self, index: usize, mut seen: u64) {
        loop {
            seen = self.wait_past(seen);
            // SAFETY: the dispatcher wrote the job before bumping `epoch`
            // (Release, read with Acquire) and leaves it alone until this
            // worker decrements `pending`.
            let (task, n, helpers) = unsafe {
                let job = &*self.job.0.get();
                (job.task, job.n, job.helpers)
            };
            if index < helpers {
                // SAFETY: valid until `pending` reaches zero (see `Job::task`).
                let task = unsafe { &*task };
                if catch_unwind(AssertUnwindSafe(|| self.claim(n, task))).is_err() {
                    self.panicked.store(true, Ordering::Relaxed);
                }
            }
            self.pending.fetch_sub(1, Ordering::Release);
        }
    }

    /// Spins until `epoch` moves past `seen`, for at most [`SPIN`], then
    /// sleeps until it does; returns the new epoch.
    fn wait_past(&self, seen: u64) -> u64 {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let now = self.epoch.load(Ordering::Acquire);
            if now != seen {
                return now;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                break;
            }
        }
        let mut guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        loop {
            let now = self.epoch.load(Ordering::SeqCst);
            if now != seen {
                self.sleepers.fetch_sub(1, Ordering::SeqCst);
                return now;
            }
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_whatever_the_thread_count() {
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for n in [0, 1, 2, 7, 300] {
                let counts: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.install(|| {
                    run(n, &|i| {
                        counts[i].fetch_add(1, Ordering::Relaxed);
                    })
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            }
        }
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
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let done = AtomicUsize::new(0);
            for _ in 0..3 {
                run(64, &|_| {
                    done.fetch_add(1, Ordering::Relaxed);
                });
                std::thread::sleep(SPIN * 3);
            }
            assert_eq!(done.load(Ordering::Relaxed), 192);
        });
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_pool_goes_on() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let caught = catch_unwind(|| run(100, &|i| assert_ne!(i, 57, "task 57")));
            assert!(caught.is_err());
            let done = AtomicUsize::new(0);
            run(100, &|_| {
                done.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(done.load(Ordering::Relaxed), 100);
        });
    }
}
