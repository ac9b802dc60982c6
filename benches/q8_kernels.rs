//! Int8 weight kernels at SmolLM2-135M's shapes, as GB/s of weight bytes (int8 + scales)
//! streamed, beside a plain read of the same bytes (the memory limit).
//!
//! Each shape is replicated until the copies exceed 64 MiB and every iteration uses the next
//! copy, so weights come from DRAM as in decode (135 MB of weights per token: nothing stays
//! cached). Copies start at 64-byte aligned addresses, like tensors in the mmapped bundle.
//!
//! `cargo bench --bench q8_kernels -- <filter>`; groups: `matvec`, `matmul64`, `pool`.
//! `EDGELM_BENCH_ARENA_MB=0` benches cache-resident weights instead (the compute ceiling).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgelm::quant::{blocks_per_row, Kernel, Q8Matrix, Scheme, ThreadPool};

/// (name, k, n) of the model's linear layers.
const SHAPES: [(&str, usize, usize); 4] = [
    ("qo_576x576", 576, 576),
    ("gate_up_576x1536", 576, 1536),
    ("down_1536x576", 1536, 576),
    ("lm_head_576x49152", 576, 49152),
];

/// Total size of the rotating copies of one shape: well above the 8 MiB L3.
/// `EDGELM_BENCH_ARENA_MB=0` keeps small shapes in cache instead (compute ceiling).
fn arena_bytes() -> usize {
    std::env::var("EDGELM_BENCH_ARENA_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(64)
        << 20
}

/// Copies of one weight matrix, each at a 64-byte aligned address.
struct Arena {
    q: Vec<i8>,  // (copies, stride_q) with the copies at `q_start + c * stride_q`
    s: Vec<f32>, // (copies, stride_s) likewise
    q_start: usize,
    s_start: usize,
    stride_q: usize,
    stride_s: usize,
    copies: usize,
    n: usize,
    k: usize,
}

impl Arena {
    fn new(k: usize, n: usize, min_bytes: usize) -> Self {
        let nb = blocks_per_row(k);
        let stride_q = (n * k).next_multiple_of(64);
        let stride_s = (n * nb).next_multiple_of(16);
        let copies = min_bytes.div_ceil(stride_q + 4 * stride_s).max(2);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let q: Vec<i8> = (0..copies * stride_q + 64).map(|_| next() as i8).collect();
        let s: Vec<f32> = (0..copies * stride_s + 16)
            .map(|_| (next() % 1000) as f32 * 1e-5)
            .collect();
        let q_start = q.as_ptr().align_offset(64);
        let s_start = s.as_ptr().align_offset(64);
        Self {
            q,
            s,
            q_start,
            s_start,
            stride_q,
            stride_s,
            copies,
            n,
            k,
        }
    }

    fn matrix(&self, c: usize) -> Q8Matrix<'_> {
        let nb = blocks_per_row(self.k);
        let q = &self.q[self.q_start + c * self.stride_q..][..self.n * self.k];
        let s = &self.s[self.s_start + c * self.stride_s..][..self.n * nb];
        Q8Matrix::new(q, s, self.n, self.k).unwrap()
    }
}

/// Sums the bytes of copy `c` of the arena over the pool's threads (the memory baseline).
fn read_all(arena: &Arena, c: usize, pool: &ThreadPool) -> u64 {
    let w = arena.matrix(c);
    let parts = pool.threads();
    let total = AtomicU64::new(0);
    pool.run(parts, |p| {
        let (q, s) = (w.q(), w.scales());
        let q = &q[q.len() * p / parts..q.len() * (p + 1) / parts];
        let s = &s[s.len() * p / parts..s.len() * (p + 1) / parts];
        // Read as u64 words: one vector add per 16 bytes keeps this at the memory limit.
        // SAFETY: i8 and u8 have the same size and alignment; the bytes are only read.
        let bytes: &[u8] = unsafe { std::slice::from_raw_parts(q.as_ptr().cast(), q.len()) };
        let mut acc = [0u64; 8];
        let mut chunks = bytes.chunks_exact(64);
        for c in &mut chunks {
            for (l, a) in acc.iter_mut().enumerate() {
                let word: [u8; 8] = c[8 * l..8 * l + 8].try_into().unwrap();
                *a = a.wrapping_add(u64::from_le_bytes(word));
            }
        }
        let mut sum = acc.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        for &v in chunks.remainder() {
            sum = sum.wrapping_add(u64::from(v));
        }
        for v in s {
            sum = sum.wrapping_add(u64::from(v.to_bits()));
        }
        total.fetch_add(sum, Ordering::Relaxed);
    });
    total.into_inner()
}

fn configs() -> Vec<(Scheme, Kernel)> {
    let mut v = Vec::new();
    for kernel in Kernel::available() {
        // Only their own code: Dotprod has Q8Q8 code (Q8F32 and Q8Q16 run NEON's), Avx512
        // has Q8F32 code (the integer schemes run AVX2's).
        if kernel != Kernel::Avx512 {
            v.push((Scheme::Q8Q8, kernel));
        }
        if kernel != Kernel::Dotprod {
            v.push((Scheme::Q8F32, kernel));
        }
        if kernel != Kernel::Dotprod && kernel != Kernel::Avx512 {
            v.push((Scheme::Q8Q16, kernel));
        }
    }
    v
}

fn bench_products(c: &mut Criterion, group_name: &str, m: usize) {
    let pools = [ThreadPool::new(1).unwrap(), ThreadPool::new(2).unwrap()];
    let mut group = c.benchmark_group(group_name);
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    if m > 1 {
        group.sample_size(10);
    }
    for (name, k, n) in SHAPES {
        let arena = Arena::new(k, n, if m > 1 { 0 } else { arena_bytes() });
        group.throughput(Throughput::Bytes(arena.matrix(0).weight_bytes() as u64));
        let x: Vec<f32> = (0..m * k)
            .map(|j| ((j * 7919) % 200) as f32 / 100.0 - 1.0)
            .collect(); // (m, k)
        let mut y = vec![0f32; m * n]; // (m, n)
        for pool in &pools {
            let t = pool.threads();
            let mut c = 0;
            group.bench_function(BenchmarkId::new(format!("memread-t{t}"), name), |b| {
                b.iter(|| {
                    c = (c + 1) % arena.copies;
                    black_box(read_all(&arena, c, pool))
                })
            });
            for (scheme, kernel) in configs() {
                let id = BenchmarkId::new(format!("{scheme:?}-{kernel}-t{t}"), name);
                group.bench_function(id, |b| {
                    b.iter(|| {
                        c = (c + 1) % arena.copies;
                        arena
                            .matrix(c)
                            .matmul(&x, &mut y, scheme, kernel, pool)
                            .unwrap();
                        black_box(&y);
                    })
                });
            }
        }
    }
    group.finish();
}

fn matvec(c: &mut Criterion) {
    bench_products(c, "matvec", 1);
}

fn matmul64(c: &mut Criterion) {
    bench_products(c, "matmul64", 64);
}

/// The cost of handing an empty job to the pool: with the worker spinning (back-to-back
/// calls, as in decode) and with it parked (1 ms idle before each call).
fn pool(c: &mut Criterion) {
    let mut group = c.benchmark_group("pool");
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    let single = ThreadPool::new(1).unwrap();
    let pool = ThreadPool::new(2).unwrap();
    group.bench_function("dispatch-t1", |b| {
        b.iter(|| {
            single.run(1, |p| {
                black_box(p);
            })
        })
    });
    group.bench_function("dispatch-t2-spinning", |b| {
        b.iter(|| {
            pool.run(2, |p| {
                black_box(p);
            })
        })
    });
    group.bench_function("dispatch-t2-parked", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                std::thread::sleep(Duration::from_millis(1));
                let start = Instant::now();
                pool.run(2, |p| {
                    black_box(p);
                });
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, pool, matvec, matmul64);
criterion_main!(benches);
