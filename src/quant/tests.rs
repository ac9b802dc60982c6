//! Kernel tests: every SIMD variant against the scalar twin, threads against one thread,
//! both schemes against an f64 product of the dequantized weights, and quantizer goldens.

use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;

use super::format::QuantActs;
use super::*;

/// A deterministic generator (splitmix64), so a proptest seed fixes a whole problem.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// A random problem: weights over the whole i8 range (-128 included), scales of both signs
/// with some zero, activations with some zero blocks and some outliers.
struct Problem {
    n: usize,
    k: usize,
    m: usize,
    q: Vec<i8>,       // (n, k)
    scales: Vec<f32>, // (n, nb)
    x: Vec<f32>,      // (m, k)
}

impl Problem {
    fn new(n: usize, k: usize, m: usize, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let nb = blocks_per_row(k);
        let q = (0..n * k).map(|_| rng.next_u64() as i8).collect();
        let scales = (0..n * nb)
            .map(|_| {
                if rng.next_u64().is_multiple_of(16) {
                    0.0
                } else {
                    rng.unit() * 0.02
                }
            })
            .collect();
        let mut x: Vec<f32> = (0..m * k)
            .map(|_| match rng.next_u64() % 64 {
                0 => rng.unit() * 40.0,
                _ => rng.unit() * 2.0,
            })
            .collect();
        for xr in x.chunks_mut(k) {
            if rng.next_u64().is_multiple_of(4) {
                let b = (rng.next_u64() as usize) % nb;
                let end = ((b + 1) * BLOCK).min(k);
                xr[b * BLOCK..end].fill(0.0);
            }
        }
        Self {
            n,
            k,
            m,
            q,
            scales,
            x,
        }
    }

    fn matrix(&self) -> Q8Matrix<'_> {
        Q8Matrix::new(&self.q, &self.scales, self.n, self.k).unwrap()
    }

    fn run(&self, scheme: Scheme, kernel: Kernel, pool: &ThreadPool) -> Vec<f32> {
        let mut y = vec![f32::NAN; self.m * self.n]; // (m, n)
        self.matrix()
            .matmul(&self.x, &mut y, scheme, kernel, pool)
            .unwrap();
        y
    }

    /// Weight (r, j) dequantized.
    fn w(&self, r: usize, j: usize) -> f64 {
        f64::from(self.q[r * self.k + j])
            * f64::from(self.scales[r * blocks_per_row(self.k) + j / BLOCK])
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Rounding bound between two f32 evaluations of a blocked dot product whose terms have
/// absolute sum `abs_sum`: each path is within `depth * u * abs_sum` of the exact value,
/// `depth <= nb + 16` roundings deep, u = EPSILON / 2.
fn rounding_bound(nb: usize, abs_sum: f64) -> f64 {
    (nb + 16) as f64 * f64::from(f32::EPSILON) * abs_sum + 1e-30
}

/// Shapes that are not multiples of the block or vector widths: n odd, k = 32 a + tail.
fn shapes() -> impl Strategy<Value = (usize, usize, usize, u64)> {
    (0usize..9, 0usize..21, 0usize..32, 1usize..10, any::<u64>())
        .prop_filter("k > 0", |&(_, a, tail, _, _)| 32 * a + tail > 0)
        .prop_map(|(n2, a, tail, m, seed)| (2 * n2 + 1, 32 * a + tail, m, seed))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_integer_kernel_equals_scalar_bit_for_bit((n, k, m, seed) in shapes()) {
        let p = Problem::new(n, k, m, seed);
        let pool = ThreadPool::single();
        for scheme in [Scheme::Q8Q8, Scheme::Q8Q16] {
            let reference = bits(&p.run(scheme, Kernel::Scalar, &pool));
            for kernel in Kernel::available() {
                prop_assert_eq!(&bits(&p.run(scheme, kernel, &pool)), &reference, "{:?} kernel {}", scheme, kernel);
            }
        }
    }

    #[test]
    fn every_q8f32_kernel_is_within_rounding_of_scalar((n, k, m, seed) in shapes()) {
        let p = Problem::new(n, k, m, seed);
        let pool = ThreadPool::single();
        let reference = p.run(Scheme::Q8F32, Kernel::Scalar, &pool);
        for kernel in Kernel::available() {
            let y = p.run(Scheme::Q8F32, kernel, &pool);
            for i in 0..m {
                for r in 0..n {
                    let abs_sum: f64 = (0..k).map(|j| (p.w(r, j) * f64::from(p.x[i * k + j])).abs()).sum();
                    let (a, b) = (y[i * n + r], reference[i * n + r]);
                    let bound = 2.0 * rounding_bound(blocks_per_row(k), abs_sum);
                    prop_assert!(f64::from(a - b).abs() <= bound, "kernel {kernel} ({i}, {r}): {a} vs {b}, bound {bound}");
                }
            }
        }
    }

    #[test]
    fn all_schemes_are_within_stated_bounds_of_f64_dequantized_product((n, k, m, seed) in shapes()) {
        let p = Problem::new(n, k, m, seed);
        let pool = ThreadPool::single();
        let acts8 = QuantActs::<i8>::quantize_scalar(&p.x, m, k);
        let acts16 = QuantActs::<i16>::quantize_scalar(&p.x, m, k);
        let nb = blocks_per_row(k);
        for kernel in Kernel::available() {
            let y8 = p.run(Scheme::Q8Q8, kernel, &pool);
            let y16 = p.run(Scheme::Q8Q16, kernel, &pool);
            let yf = p.run(Scheme::Q8F32, kernel, &pool);
            for i in 0..m {
                let (xq8, xs8) = acts8.row(i);
                let (xq16, xs16) = acts16.row(i);
                let xq8: Vec<f64> = xq8.iter().map(|&v| f64::from(v)).collect();
                let xq16: Vec<f64> = xq16.iter().map(|&v| f64::from(v)).collect();
                for r in 0..n {
                    let exact: f64 = (0..k).map(|j| p.w(r, j) * f64::from(p.x[i * k + j])).sum();
                    let abs_f32: f64 = (0..k).map(|j| (p.w(r, j) * f64::from(p.x[i * k + j])).abs()).sum();
                    prop_assert!((f64::from(yf[i * n + r]) - exact).abs() <= rounding_bound(nb, abs_f32));
                    // Q8Q8, Q8Q16: each activation moves by at most half its block's step (plus
                    // the rounding of x / scale), then the quantized product is rounded as above.
                    for (y, xq, xs, name) in [(&y8, &xq8, xs8, "Q8Q8"), (&y16, &xq16, xs16, "Q8Q16")] {
                        let step: f64 = (0..k).map(|j| p.w(r, j).abs() * 0.5001 * f64::from(xs[j / BLOCK])).sum();
                        let abs_q: f64 = (0..k)
                            .map(|j| (p.w(r, j) * xq[j] * f64::from(xs[j / BLOCK])).abs())
                            .sum();
                        let bound = step + rounding_bound(nb, abs_q);
                        let err = (f64::from(y[i * n + r]) - exact).abs();
                        prop_assert!(err <= bound, "{name} kernel {kernel} ({i}, {r}): error {err}, bound {bound}");
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn threaded_equals_single_thread_bit_for_bit(n2 in 32usize..160, a in 8usize..24, tail in 0usize..32, m in 1usize..6, seed: u64) {
        // Large enough (>= 64 KiB of weights) that the work is really split.
        let p = Problem::new(2 * n2 + 1, 32 * a + tail, m, seed);
        let single = ThreadPool::single();
        let pools = [ThreadPool::new(2).unwrap(), ThreadPool::new(3).unwrap()];
        for kernel in Kernel::available() {
            for scheme in [Scheme::Q8Q8, Scheme::Q8Q16, Scheme::Q8F32] {
                let reference = bits(&p.run(scheme, kernel, &single));
                for pool in &pools {
                    prop_assert_eq!(&bits(&p.run(scheme, kernel, pool)), &reference, "{:?} {} threads {}", scheme, kernel, pool.threads());
                }
            }
        }
    }
}

#[test]
fn simd_variants_match_scalar_at_model_shapes() {
    let pool = ThreadPool::new(2).unwrap();
    for (k, n) in [(576, 1536), (1536, 576)] {
        for (m, scheme) in [1, 5]
            .into_iter()
            .flat_map(|m| [(m, Scheme::Q8Q8), (m, Scheme::Q8Q16)])
        {
            let p = Problem::new(n, k, m, (k * n + m) as u64);
            let reference = bits(&p.run(scheme, Kernel::Scalar, &ThreadPool::single()));
            for kernel in Kernel::available() {
                assert_eq!(
                    bits(&p.run(scheme, kernel, &pool)),
                    reference,
                    "{scheme:?} {kernel} k={k} n={n} m={m}"
                );
            }
        }
    }
}

#[test]
fn expected_simd_kernels_are_detected() {
    // The cross-test script names what each emulated CPU must offer; natively, the machines
    // we build on have AVX2 (x86_64) or NEON (aarch64).
    let available: Vec<&str> = Kernel::available().iter().map(|k| k.name()).collect();
    match std::env::var("EDGELM_EXPECT_KERNELS") {
        Ok(expected) => assert_eq!(available.join(","), expected),
        Err(_) if cfg!(target_arch = "x86_64") => {
            assert_eq!(available[..2], ["scalar", "avx2"]);
            #[cfg(target_arch = "x86_64")]
            assert_eq!(
                available.contains(&"avx512"),
                is_x86_feature_detected!("avx512f")
            );
        }
        Err(_) if cfg!(target_arch = "aarch64") => assert!(available.contains(&"neon")),
        Err(_) => assert_eq!(available, ["scalar"]),
    }
}

#[test]
fn quantizer_goldens() {
    // Block 0: max|x| = 127, so scale 1 and q = x rounded half away from zero.
    // Block 1: max|x| = 63.5, scale 0.5: 0.25 -> 0.5 -> 1, -0.75 -> -1.5 -> -2, 10 -> 20.
    // Block 2 (the short last block, 3 values): all zero -> scale 0, q 0.
    let mut w = vec![0f32; 67];
    w[..6].copy_from_slice(&[0.5, -0.5, 1.5, -2.5, 126.49, -127.0]);
    w[32..37].copy_from_slice(&[0.25, -0.75, 10.0, 63.5, -63.5]);
    let (q, s) = quantize_q8(&w, 1, 67);
    assert_eq!(s, [1.0, 0.5, 0.0]);
    assert_eq!(&q[..7], &[1, -1, 2, -3, 126, -127, 0]);
    assert_eq!(&q[32..38], &[1, -2, 20, 127, -127, 0]);
    assert!(q[64..].iter().all(|&v| v == 0));

    // Two rows of k = 3: each row is its own (short) block.
    // Row 0: max 2.54 -> scale 0.02 (f32); in f32, 1.27 / 0.02 = 63.5 -> 64 and
    // -0.01 / 0.02 = -0.5 -> -1 (ties away from zero).
    let (q, s) = quantize_q8(&[2.54, 1.27, -0.01, 0.0, 0.0, -3.0], 2, 3);
    assert_eq!(s, [2.54f32 / 127.0, 3.0f32 / 127.0]);
    assert_eq!(q, [127, 64, -1, 0, 0, -127]);
}

#[test]
fn activation_quantizer_variants_agree_including_ties() {
    // Each row's max|x| is 127, so scale 1 and every x.5 is an exact tie (rounded away
    // from zero): x = 2.5 j - 120.
    let mut x: Vec<f32> = (0..96).map(|j| j as f32 * 2.5 - 120.0).collect(); // (3, 32)
    x[0] = 127.0;
    x[32] = -127.0;
    x[64] = 127.0;
    let a = QuantActs::<i8>::quantize_scalar(&x, 3, 32);
    assert_eq!(a.scales, [1.0, 1.0, 1.0]);
    assert_eq!(a.q[..5], [127, -118, -115, -113, -110]);
    assert_eq!(a.q[32..36], [-127, -38, -35, -33]);
    assert_eq!(a.q[64..68], [127, 43, 45, 48]);

    let mut rng = Rng(7);
    let y: Vec<f32> = (0..5 * 45).map(|_| rng.unit() * 3.0).collect(); // (5, 45)
    for (x, m, k) in [(&x[..], 3, 32), (&y[..], 5, 45)] {
        let reference = QuantActs::<i8>::quantize_scalar(x, m, k);
        let reference16 = QuantActs::<i16>::quantize_scalar(x, m, k);
        for kernel in Kernel::available() {
            let got: QuantActs<i8> = quantize_acts(x, m, k, kernel);
            assert_eq!(got.q, reference.q, "{kernel}");
            assert_eq!(bits(&got.scales), bits(&reference.scales), "{kernel}");
            let got: QuantActs<i16> = quantize_acts(x, m, k, kernel);
            assert_eq!(got.q, reference16.q, "{kernel}");
            assert_eq!(bits(&got.scales), bits(&reference16.scales), "{kernel}");
        }
    }
}

#[test]
fn int16_activation_quantizer_goldens() {
    // max|x| = 32767 gives scale 1: q = x rounded half away from zero, within ±32767.
    // The second row's max|x| = 1 gives scale 1 / 32767, so 0.75 -> 24575.25 -> 24575 and
    // -1 -> -32767; a short all-zero block gets scale 0.
    let mut x = vec![0f32; 2 * 40]; // (2, 40)
    x[..5].copy_from_slice(&[32767.0, -32767.0, 0.5, -1.5, 12345.49]);
    x[40..43].copy_from_slice(&[0.75, -1.0, 0.25]);
    let a = QuantActs::<i16>::quantize_scalar(&x, 2, 40);
    assert_eq!(a.scales, [1.0, 0.0, 1.0 / 32767.0, 0.0]);
    assert_eq!(a.q[..6], [32767, -32767, 1, -2, 12345, 0]);
    assert_eq!(a.q[40..43], [24575, -32767, 8192]);
    assert!(a.q[32..40].iter().chain(&a.q[72..]).all(|&v| v == 0));
}

#[test]
fn matrix_rejects_mismatched_lengths() {
    let q = [0i8; 70];
    let s = [0f32; 6];
    assert!(Q8Matrix::new(&q, &s[..4], 2, 35).is_ok());
    assert_eq!(
        Q8Matrix::new(&q[..69], &s[..4], 2, 35).unwrap_err(),
        QuantError::WeightsLen {
            n: 2,
            k: 35,
            expected: 70,
            got: 69
        }
    );
    assert_eq!(
        Q8Matrix::new(&q, &s[..5], 2, 35).unwrap_err(),
        QuantError::ScalesLen {
            n: 2,
            nb: 2,
            expected: 4,
            got: 5
        }
    );
    assert_eq!(
        Q8Matrix::new(&q, &s[..0], 0, 35).unwrap_err(),
        QuantError::EmptyShape { n: 0, k: 35 }
    );
    let w = Q8Matrix::new(&q, &s[..4], 2, 35).unwrap();
    let pool = ThreadPool::single();
    let mut y = [0f32; 2];
    assert_eq!(
        w.matmul(&[0.0; 36], &mut y, Scheme::Q8Q8, Kernel::Scalar, &pool)
            .unwrap_err(),
        QuantError::InputLen { k: 35, got: 36 }
    );
    assert_eq!(
        w.matmul(&[0.0; 70], &mut y, Scheme::Q8Q8, Kernel::Scalar, &pool)
            .unwrap_err(),
        QuantError::OutputLen {
            m: 2,
            n: 2,
            expected: 4,
            got: 2
        }
    );
}

#[test]
fn kernel_names_parse() {
    assert_eq!("avx2".parse::<Kernel>().unwrap(), Kernel::Avx2);
    assert_eq!("AVX512".parse::<Kernel>().unwrap(), Kernel::Avx512);
    assert_eq!(" DotProd ".parse::<Kernel>().unwrap(), Kernel::Dotprod);
    assert_eq!(
        "sse".parse::<Kernel>().unwrap_err(),
        QuantError::UnknownKernel("sse".into())
    );
    assert!(Kernel::Scalar.checked().is_ok());
    for kernel in Kernel::ALL {
        assert_eq!(kernel.to_string().parse::<Kernel>().unwrap(), kernel);
    }
}

#[test]
fn scheme_names_parse() {
    assert_eq!("auto".parse::<Scheme>().unwrap(), Scheme::Auto);
    assert_eq!("q8f32".parse::<Scheme>().unwrap(), Scheme::Q8F32);
    assert_eq!(" Q8Q16".parse::<Scheme>().unwrap(), Scheme::Q8Q16);
    assert_eq!("q8q8".parse::<Scheme>().unwrap(), Scheme::Q8Q8);
    assert_eq!("q8q15".parse::<Scheme>().unwrap(), Scheme::Q8Q15);
    assert_eq!("fold".parse::<Scheme>().unwrap(), Scheme::Fold);
    assert_eq!(
        "q4".parse::<Scheme>().unwrap_err().to_string(),
        "unknown int8 scheme \"q4\": expected auto, q8f32, q8q16, q8q8, q8q15 or fold"
    );
    for scheme in Scheme::ALL {
        assert_eq!(scheme.to_string().parse::<Scheme>().unwrap(), scheme);
    }
    assert_eq!(Scheme::default(), Scheme::Auto);
}

#[test]
fn fold_is_no_product() {
    let (q, s) = (vec![1i8; 32], vec![1f32; 1]);
    let w = Q8Matrix::new(&q, &s, 1, 32).unwrap();
    let mut y = [0f32; 1];
    assert_eq!(
        w.matmul(
            &[1.0; 32],
            &mut y,
            Scheme::Fold,
            Kernel::Scalar,
            &ThreadPool::single()
        )
        .unwrap_err(),
        QuantError::NoProduct
    );
}

#[test]
fn a_requested_kernel_wins_over_the_environment() {
    assert_eq!(
        Kernel::select(Some(Kernel::Scalar)).unwrap(),
        Kernel::Scalar
    );
    if let Some(&missing) = Kernel::ALL.iter().find(|k| !k.is_available()) {
        assert_eq!(
            Kernel::select(Some(missing)).unwrap_err(),
            QuantError::KernelUnavailable(missing)
        );
    }
}

#[test]
fn pool_runs_every_part_exactly_once() {
    let pool = ThreadPool::new(3).unwrap();
    for parts in 0..7 {
        for _ in 0..200 {
            let hits: Vec<AtomicUsize> = (0..6).map(|_| AtomicUsize::new(0)).collect();
            pool.run(parts, |p| {
                hits[p].fetch_add(1, Ordering::Relaxed);
            });
            let got: Vec<usize> = hits.iter().map(|h| h.load(Ordering::Relaxed)).collect();
            let want: Vec<usize> = (0..6).map(|p| usize::from(p < parts)).collect();
            assert_eq!(got, want, "{parts} parts");
        }
    }
}

#[test]
fn pool_wakes_parked_workers() {
    let pool = ThreadPool::with_spin(2, std::time::Duration::ZERO).unwrap();
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_micros(200));
        let hits = AtomicUsize::new(0);
        pool.run(2, |_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }
}

#[test]
fn pool_reraises_a_worker_panic_and_stays_usable() {
    let pool = ThreadPool::new(2).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pool.run(2, |p| assert!(p != 1, "part 1 fails"));
    }));
    assert!(caught.is_err());
    let hits = AtomicUsize::new(0);
    pool.run(2, |_| {
        hits.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(hits.load(Ordering::Relaxed), 2);
}

#[test]
fn pool_shared_by_two_callers_gives_the_same_results() {
    let pool = ThreadPool::new(2).unwrap();
    let p = Problem::new(301, 333, 3, 11);
    let reference = bits(&p.run(Scheme::Q8Q8, Kernel::Scalar, &ThreadPool::single()));
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..20 {
                    assert_eq!(bits(&p.run(Scheme::Q8Q8, Kernel::best(), &pool)), reference);
                }
            });
        }
    });
}

#[test]
fn select_follows_the_environment() {
    // The cross-test script sets EDGELM_KERNEL to force a variant; unset, the best one wins.
    match std::env::var(KERNEL_ENV) {
        Ok(name) => assert_eq!(Kernel::select(None).unwrap().name(), name),
        Err(_) => assert_eq!(Kernel::select(None).unwrap(), Kernel::best()),
    }
}
