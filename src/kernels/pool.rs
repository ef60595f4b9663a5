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

/// Bits of [`Pool::signal`] that hold the region's helper count.
const HELPER_BITS: u32 = 16;

#[derive(Default)]
struct Pool {
    /// Held by the one caller whose region is running.
    dispatch: Mutex<()>,
    /// The region to run; written only by the holder of `dispatch` after
    /// it saw `pending` reach zero (with Acquire), so while no worker reads
    /// it; read by the region's helpers after they see `signal` move.
    job: JobCell,
    /// `epoch << HELPER_BITS | helpers`, written once per region (SeqCst:
    /// a worker going to sleep and the dispatcher deciding whether to wake
    /// it must agree on the order of this and `sleepers`). Workers with an
    /// index under `helpers` take the region's job; the others sit it out
    /// without touching it.
    signal: AtomicU64,
    /// The next task to claim.
    next: AtomicUsize,
    /// Helpers that have not yet finished with the current region.
    pending: AtomicUsize,
    /// The first panic of a helper's task in the current region, raised
    /// again on the caller (kept, never dropped on the worker: a payload
    /// whose drop panics must not kill the worker).
    payload: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    /// Workers spawned so far (only the dispatcher spawns).
    workers: Mutex<usize>,
    /// Set when the system refused a thread: use the ones there are.
    spawn_failed: AtomicBool,
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
}

impl Default for Job {
    fn default() -> Self {
        Self {
            task: &(|_: usize| {}) as &(dyn Fn(usize) + Sync),
            n: 0,
        }
    }
}

impl Pool {
    /// Runs `task(0..n)` on the caller and up to `helpers` workers. The
    /// caller must hold `dispatch`.
    fn run(&'static self, helpers: usize, n: usize, task: &(dyn Fn(usize) + Sync)) {
        let helpers = self.spawn(helpers).min((1 << HELPER_BITS) - 1);
        if let Some(stale) = lock(&self.payload).take() {
            // A panic the caller did not see (its own came first): leaked,
            // as dropping it could panic here.
            std::mem::forget(stale);
        }
        // SAFETY: the previous region ended when `Finish` saw `pending`
        // reach zero (Acquire), and we hold `dispatch`: no worker reads the
        // job while it changes.
        unsafe {
            let job = &mut *self.job.0.get();
            // Erase the lifetime: every helper is done with `task` before
            // `Finish` below lets this function return or unwind.
            job.task = std::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                *const (dyn Fn(usize) + Sync + 'static),
            >(task as *const _);
            job.n = n;
        }
        self.next.store(0, Ordering::Relaxed);
        self.pending.store(helpers, Ordering::Relaxed);
        let epoch = (self.signal.load(Ordering::Relaxed) >> HELPER_BITS) + 1;
        self.signal
            .store(epoch << HELPER_BITS | helpers as u64, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = lock(&self.sleep);
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
        let mut helped = true;
        loop {
            // A worker the last region did without sleeps at once: spinning
            // would only take a core from the ones that work.
            seen = self.wait_past(seen, helped);
            helped = index < (seen & ((1 << HELPER_BITS) - 1)) as usize;
            if !helped {
                continue;
            }
            // SAFETY: the dispatcher wrote the job before the signal (SeqCst
            // store, read here with SeqCst) and leaves it alone until this
            // helper decrements `pending`.
            let (task, n) = unsafe {
                let job = &*self.job.0.get();
                (&*job.task, job.n)
            };
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| self.claim(n, task))) {
                let mut slot = lock(&self.payload);
                match *slot {
                    None => *slot = Some(payload),
                    Some(_) => std::mem::forget(payload),
                }
            }
            self.pending.fetch_sub(1, Ordering::Release);
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
    fn workers_take_tasks() {
        let pool = private();
        let caller = std::thread::current().id();
        let elsewhere = AtomicUsize::new(0);
        pool.run(1, 64, &|_| {
            if std::thread::current().id() != caller {
                elsewhere.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_micros(200));
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
        let caught = catch_unwind(AssertUnwindSafe(|| {
            pool.run(1, 100, &|_| {
                if std::thread::current().id() != caller {
                    panic!("worker task");
                }
                std::thread::sleep(Duration::from_micros(200));
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
