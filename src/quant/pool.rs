//! The process's compute threads: a small persistent pool on which the int8 products and
//! the attention split their work. A model loaded with `-t N` makes one pool of N threads,
//! the caller's included, and tract runs its plan on the caller alone, so N bounds every
//! compute thread. `run(parts, f)` calls `f(p)` once for each part p, part 0 on the calling
//! thread, and returns when all have finished.
//!
//! Decode calls the kernels ~200 times per token at 10–100 µs each, so dispatch must cost a
//! few µs: workers spin on an atomic epoch for a while after each job (a new job then starts
//! within nanoseconds) and only then park on a condvar (waking takes tens of µs).
//! The closure is borrowed, not `'static`: `run` erases its lifetime to hand it to the
//! workers and does not return (or unwind) before every worker is done with it.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long an idle worker spins waiting for the next job before parking.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(200);

/// A job as the workers see it: a lifetime-erased borrowed closure.
type JobFn = *const (dyn Fn(usize) + Sync + 'static);

/// The current job, read by workers under `Shared::job`.
#[derive(Clone, Copy)]
struct Job {
    epoch: u64,
    parts: usize,
    f: Option<SendPtr>,
}

/// [`JobFn`] made sendable; only dereferenced while the owning `run` call waits.
#[derive(Clone, Copy)]
struct SendPtr(JobFn);

// SAFETY: the pointee is `Sync`, and `run` keeps it alive while any worker may use it.
unsafe impl Send for SendPtr {}

/// State shared by the caller and the workers.
struct Shared {
    /// Latest published epoch; workers poll it without locking.
    hint: AtomicU64,
    job: Mutex<Job>,
    /// Worker parts of the current job not yet finished.
    remaining: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
    spin: Duration,
}

/// A fixed set of worker threads (`threads - 1` of them; the caller is thread 0).
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One job at a time; a concurrent caller runs its parts inline instead.
    dispatch: Mutex<()>,
    threads: usize,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ThreadPool({} threads)", self.threads)
    }
}

impl Shared {
    fn new(spin: Duration) -> Self {
        Self {
            hint: AtomicU64::new(0),
            job: Mutex::new(Job {
                epoch: 0,
                parts: 0,
                f: None,
            }),
            remaining: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            spin,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while these locks are held, and the data stays valid if it did.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ThreadPool {
    /// A pool running jobs on `threads` threads (the caller plus `threads - 1` workers).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        Self::with_spin(threads, DEFAULT_SPIN)
    }

    /// Like [`ThreadPool::new`], with idle workers spinning for `spin` before parking.
    pub fn with_spin(threads: usize, spin: Duration) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared::new(spin));
        let mut pool = Self {
            shared,
            workers: Vec::with_capacity(threads - 1),
            dispatch: Mutex::new(()),
            threads,
        };
        for index in 1..threads {
            let shared = Arc::clone(&pool.shared);
            let handle = thread::Builder::new()
                .name(format!("edgelm-compute-{index}"))
                .spawn(move || worker(&shared, index, threads))?;
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// A pool that runs everything on the calling thread.
    pub fn single() -> Self {
        Self {
            shared: Arc::new(Shared::new(Duration::ZERO)),
            workers: Vec::new(),
            dispatch: Mutex::new(()),
            threads: 1,
        }
    }

    /// Number of threads a job can use, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f(p)` once for every `p` in `0..parts` and returns when all calls have returned.
    ///
    /// With T = min(parts, threads) threads, thread i runs parts i, i + T, i + 2T, … in order;
    /// thread 0 is the caller. If another thread is using the pool, all parts run on the
    /// calling thread, one after another. A panic in any part is re-raised here after every
    /// part has finished.
    pub fn run<F: Fn(usize) + Sync>(&self, parts: usize, f: F) {
        let active = parts.min(self.threads);
        if active <= 1 {
            (0..parts).for_each(&f);
            return;
        }
        let Ok(_busy) = self.dispatch.try_lock() else {
            (0..parts).for_each(&f);
            return;
        };
        let f_ref: &(dyn Fn(usize) + Sync) = &f;
        // SAFETY: only the lifetime is erased. Workers dereference the pointer only while
        // running a part of this job, and this function waits below until `remaining` is 0
        // (all parts done) before returning or unwinding, so `f` outlives every use.
        let f_ptr: JobFn =
            unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), JobFn>(f_ref) };
        let sh = &*self.shared;
        sh.panicked.store(false, Ordering::Relaxed);
        sh.remaining.store(active - 1, Ordering::Relaxed);
        let epoch = {
            let mut job = lock(&sh.job);
            job.epoch += 1;
            job.parts = parts;
            job.f = Some(SendPtr(f_ptr));
            job.epoch
        };
        // SeqCst pairs with the workers' `sleepers` increment: either we see the sleeper and
        // notify it, or it sees the new epoch and does not sleep.
        sh.hint.store(epoch, Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = lock(&sh.sleep_lock);
            sh.wake.notify_all();
        }
        let own = panic::catch_unwind(AssertUnwindSafe(|| (0..parts).step_by(active).for_each(&f)));
        let mut spins = 0u32;
        while sh.remaining.load(Ordering::Acquire) != 0 {
            if spins < 1 << 14 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        lock(&sh.job).f = None;
        if let Err(payload) = own {
            panic::resume_unwind(payload);
        }
        if sh.panicked.load(Ordering::Relaxed) {
            panic!("a kernel thread-pool worker panicked");
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let sh = &*self.shared;
        sh.shutdown.store(true, Ordering::SeqCst);
        sh.hint.fetch_add(1, Ordering::SeqCst);
        {
            let _g = lock(&sh.sleep_lock);
            sh.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            // A worker cannot panic outside `catch_unwind`; nothing to report if it did.
            let _ = w.join();
        }
    }
}

/// The loop of worker `index` (1-based; thread 0 is the caller) of a pool of `threads`.
fn worker(sh: &Shared, index: usize, threads: usize) {
    let mut seen = 0u64;
    loop {
        if !wait_for_job(sh, seen) {
            return;
        }
        let job = *lock(&sh.job);
        seen = job.epoch;
        let Some(SendPtr(f)) = job.f else { continue };
        let active = job.parts.min(threads);
        if index >= active {
            continue;
        }
        // SAFETY: `f` belongs to the job of epoch `seen`, whose `run` call is still waiting
        // for this thread (it counted it in `remaining`), so the closure is alive.
        let f = unsafe { &*f };
        let mine = (index..job.parts).step_by(active);
        if panic::catch_unwind(AssertUnwindSafe(|| mine.for_each(f))).is_err() {
            sh.panicked.store(true, Ordering::Relaxed);
        }
        sh.remaining.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits until an epoch other than `seen` is published; false on shutdown.
fn wait_for_job(sh: &Shared, seen: u64) -> bool {
    let mut start = Instant::now();
    let mut spins = 0u32;
    loop {
        if sh.shutdown.load(Ordering::Acquire) {
            return false;
        }
        if sh.hint.load(Ordering::Acquire) != seen {
            return true;
        }
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(256) || start.elapsed() < sh.spin {
            std::hint::spin_loop();
            continue;
        }
        let guard = lock(&sh.sleep_lock);
        sh.sleepers.fetch_add(1, Ordering::SeqCst);
        if sh.hint.load(Ordering::SeqCst) == seen && !sh.shutdown.load(Ordering::SeqCst) {
            // Spurious wake-ups just go round the loop again.
            drop(sh.wake.wait(guard).unwrap_or_else(PoisonError::into_inner));
        }
        sh.sleepers.fetch_sub(1, Ordering::SeqCst);
        start = Instant::now();
    }
}
