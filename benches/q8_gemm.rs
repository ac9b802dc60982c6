//! The tiled int8 GEMM (`quant::gemm`) against the row-major kernels, at SmolLM2-135M's and
//! Llama-3.2-1B's linear-layer shapes.
//!
//! - `gemm64`: 64 activation rows (a 64-token prefill), weights cache-resident after the first
//!   pass as in prefill (each layer's weights are read once per prompt); throughput in
//!   multiply-adds (elements/s = MAC/s).
//! - `gemv`: one activation row (decode) over rotating copies of the weights (> 64 MiB, so
//!   they come from DRAM); throughput in weight bytes. `rows-q8f32` (row-major) against
//!   `tiled-q8f32` (the same arithmetic on the tiled layout) is decode's comparison.
//!
//! One thread is timed in thread CPU time, not wall time, so builds sharing the machine
//! preempt but do not slow the figure (they still share caches and memory bandwidth);
//! `-t2` variants run on the pool and are timed in wall time. Divide MAC/s by the core's clock
//! (a dependent `imul` chain measures it: printed at start) for MACs per cycle.
//!
//! `cargo bench --bench q8_gemm -- <filter>`, e.g. `-- gemm64/.*1b` or `-- 'gemv/q15'`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgelm::quant::gemm::{tile_q8, Acts, Isa, Q8Tiled};
use edgelm::quant::{blocks_per_row, Kernel, Q8Matrix, Scheme, ThreadPool};

/// (name, k, n) of the linear layers.
const SHAPES: [(&str, usize, usize); 8] = [
    ("135m_q_576x576", 576, 576),
    ("135m_kv_576x192", 576, 192),
    ("135m_up_576x1536", 576, 1536),
    ("135m_down_1536x576", 1536, 576),
    ("1b_q_2048x2048", 2048, 2048),
    ("1b_kv_2048x512", 2048, 512),
    ("1b_up_2048x8192", 2048, 8192),
    ("1b_down_8192x2048", 8192, 2048),
];

/// This thread's CPU time.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant Linux knows.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The core clock in GHz, from a chain of dependent `imul`s (3 cycles each on every recent
/// x86 core) timed in thread CPU time.
#[cfg(target_arch = "x86_64")]
fn clock_ghz() -> f64 {
    let n = 100_000_000u64;
    let start = thread_cpu_time();
    let mut x = 1u64;
    // SAFETY: arithmetic on two registers only; the loop ends when the counter reaches 0.
    unsafe {
        std::arch::asm!(
            "2:",
            "imul {x}, {x}, 3",
            "imul {x}, {x}, 3",
            "dec {n}",
            "jnz 2b",
            x = inout(reg) x,
            n = inout(reg) n => _,
            options(nomem, nostack),
        )
    };
    black_box(x);
    6.0 * n as f64 / (thread_cpu_time() - start).as_secs_f64() / 1e9
}

/// Copies of one weight matrix in both layouts.
struct Weights {
    q: Vec<i8>,   // (copies, n, k)
    s: Vec<f32>,  // (copies, n, nb)
    tq: Vec<i8>,  // (copies, G, nb, 8, 16, 4)
    ts: Vec<f32>, // (copies, G, nb, 16)
    copies: usize,
    n: usize,
    k: usize,
}

impl Weights {
    fn new(k: usize, n: usize, min_bytes: usize) -> Self {
        let nb = blocks_per_row(k);
        let copies = min_bytes.div_ceil(n * k + 4 * n * nb).max(1);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let q0: Vec<i8> = (0..n * k).map(|_| next() as i8).collect();
        let s0: Vec<f32> = (0..n * nb).map(|_| (next() % 1000) as f32 * 1e-5).collect();
        let (tq0, ts0) = tile_q8(&q0, &s0, n, k);
        Self {
            q: q0.repeat(copies),
            s: s0.repeat(copies),
            tq: tq0.repeat(copies),
            ts: ts0.repeat(copies),
            copies,
            n,
            k,
        }
    }

    fn rows(&self, c: usize) -> Q8Matrix<'_> {
        let (len_q, len_s) = (self.q.len() / self.copies, self.s.len() / self.copies);
        Q8Matrix::new(
            &self.q[c * len_q..(c + 1) * len_q],
            &self.s[c * len_s..(c + 1) * len_s],
            self.n,
            self.k,
        )
        .unwrap()
    }

    fn tiled(&self, c: usize) -> Q8Tiled<'_> {
        let (len_q, len_s) = (self.tq.len() / self.copies, self.ts.len() / self.copies);
        Q8Tiled::new(
            &self.tq[c * len_q..(c + 1) * len_q],
            &self.ts[c * len_s..(c + 1) * len_s],
            self.n,
            self.k,
        )
        .unwrap()
    }
}

/// What one benchmark runs.
#[derive(Clone, Copy)]
enum Config {
    Rows(Scheme, Kernel),
    Tiled(Acts, Isa),
    /// One f32 activation row on the tiled layout (decode).
    TiledF32(Kernel),
}

impl Config {
    fn name(self) -> String {
        match self {
            Config::Rows(s, k) => format!("rows-{s:?}-{k}").to_lowercase(),
            Config::Tiled(a, i) => format!("{a:?}-{i}").to_lowercase(),
            Config::TiledF32(k) => format!("tiled-q8f32-{k}"),
        }
    }
}

fn configs(m: usize) -> Vec<Config> {
    let best = Kernel::best();
    let mut v = vec![
        Config::Rows(Scheme::Q8F32, best),
        Config::Rows(Scheme::Q8Q16, best),
    ];
    if m == 1 {
        v.push(Config::TiledF32(best));
    }
    for isa in Isa::available() {
        if isa != Isa::Scalar {
            v.push(Config::Tiled(Acts::Q15, isa));
            v.push(Config::Tiled(Acts::Q8, isa));
        }
    }
    v
}

fn bench_group(c: &mut Criterion, group_name: &str, m: usize, arena: usize) {
    let pools = [ThreadPool::new(1).unwrap(), ThreadPool::new(2).unwrap()];
    let mut group = c.benchmark_group(group_name);
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(2000))
        .sample_size(20);
    for (name, k, n) in SHAPES {
        let w = Weights::new(k, n, arena);
        if m > 1 {
            group.throughput(Throughput::Elements((m * n * k) as u64));
        } else {
            group.throughput(Throughput::Bytes(w.tiled(0).weight_bytes() as u64));
        }
        let x: Vec<f32> = (0..m * k)
            .map(|j| ((j * 7919) % 200) as f32 / 100.0 - 1.0)
            .collect(); // (m, k)
        let mut y = vec![0f32; m * n]; // (m, n)
        for pool in &pools {
            let t = pool.threads();
            for config in configs(m) {
                let mut copy = 0;
                let mut run = |y: &mut [f32]| {
                    copy = (copy + 1) % w.copies;
                    match config {
                        Config::Rows(s, kern) => w.rows(copy).matmul(&x, y, s, kern, pool),
                        Config::Tiled(a, i) => w.tiled(copy).matmul(&x, y, a, i, pool),
                        Config::TiledF32(kern) => w.tiled(copy).matvec_f32(&x, y, kern, pool),
                    }
                    .unwrap();
                };
                let id = BenchmarkId::new(format!("{}-t{t}", config.name()), name);
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let (wall, cpu) = (Instant::now(), thread_cpu_time());
                        for _ in 0..iters {
                            run(&mut y);
                            black_box(&y);
                        }
                        if t == 1 {
                            thread_cpu_time() - cpu
                        } else {
                            wall.elapsed()
                        }
                    })
                });
            }
        }
    }
    group.finish();
}

fn gemm64(c: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    eprintln!(
        "core clock (imul chain, thread CPU time): {:.2} GHz",
        clock_ghz()
    );
    bench_group(c, "gemm64", 64, 0);
}

fn gemv(c: &mut Criterion) {
    bench_group(c, "gemv", 1, 64 << 20);
}

criterion_group!(benches, gemm64, gemv);
criterion_main!(benches);
