//! GEMM tests: the layout, the activation forms, the scalar kernel against a row-major
//! evaluation of the stated arithmetic and against f64, every SIMD variant against the scalar
//! one bit for bit, and threads against one thread.

use proptest::prelude::*;

use super::acts::{Form, QuantRows};
use super::*;
use crate::quant::{quantize_q8, Q8Matrix};

/// A deterministic generator (splitmix64).
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
/// with some zero, activations with some zero blocks and some outliers; the weights in both
/// layouts.
struct Problem {
    n: usize,
    k: usize,
    m: usize,
    q: Vec<i8>,       // (n, k)
    scales: Vec<f32>, // (n, nb)
    tq: Vec<i8>,      // (G, nb, 8, 16, 4)
    ts: Vec<f32>,     // (G, nb, 16)
    x: Vec<f32>,      // (m, k)
}

impl Problem {
    fn new(n: usize, k: usize, m: usize, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let nb = blocks_per_row(k);
        let q: Vec<i8> = (0..n * k).map(|_| rng.next_u64() as i8).collect();
        let scales: Vec<f32> = (0..n * nb)
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
        let (tq, ts) = tile_q8(&q, &scales, n, k);
        Self {
            n,
            k,
            m,
            q,
            scales,
            tq,
            ts,
            x,
        }
    }

    fn tiled(&self) -> Q8Tiled<'_> {
        Q8Tiled::new(&self.tq, &self.ts, self.n, self.k).unwrap()
    }

    fn run(&self, acts: Acts, isa: Isa, pool: &ThreadPool) -> Vec<f32> {
        let mut y = vec![f32::NAN; self.m * self.n]; // (m, n)
        self.tiled()
            .matmul(&self.x, &mut y, acts, isa, pool)
            .unwrap();
        y
    }

    /// The stated arithmetic evaluated on the row-major weights and the activations'
    /// integers, one output at a time.
    fn reference(&self, acts: Acts) -> Vec<f32> {
        let (n, k, m) = (self.n, self.k, self.m);
        let nb = blocks_per_row(k);
        let a = QuantRows::new(&self.x, m, k, acts, Form::Wide, &ThreadPool::single());
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for r in 0..n {
                let mut acc = 0f32;
                for b in 0..nb {
                    let v = a.values(i, b);
                    let idot: i32 = (b * BLOCK..k.min((b + 1) * BLOCK))
                        .map(|j| i32::from(self.q[r * k + j]) * v[j - b * BLOCK])
                        .sum();
                    acc += (self.scales[r * nb + b] * a.scales[i * nb + b]) * idot as f32;
                }
                y[i * n + r] = acc;
            }
        }
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

/// Shapes that are not multiples of the group or block widths: k = 32 a + tail.
fn shapes() -> impl Strategy<Value = (usize, usize, usize, u64)> {
    (1usize..40, 0usize..10, 0usize..32, 1usize..20, any::<u64>())
        .prop_filter("k > 0", |&(_, a, tail, _, _)| 32 * a + tail > 0)
        .prop_map(|(n, a, tail, m, seed)| (n, 32 * a + tail, m, seed))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn scalar_kernel_computes_the_stated_arithmetic((n, k, m, seed) in shapes()) {
        let p = Problem::new(n, k, m, seed);
        let pool = ThreadPool::single();
        for acts in [Acts::Q8, Acts::Q15] {
            prop_assert_eq!(bits(&p.run(acts, Isa::Scalar, &pool)), bits(&p.reference(acts)), "{:?}", acts);
        }
    }

    #[test]
    fn every_isa_equals_scalar_bit_for_bit((n, k, m, seed) in shapes()) {
        let p = Problem::new(n, k, m, seed);
        let pool = ThreadPool::single();
        for acts in [Acts::Q8, Acts::Q15] {
            let reference = bits(&p.run(acts, Isa::Scalar, &pool));
            for isa in Isa::available() {
                prop_assert_eq!(&bits(&p.run(acts, isa, &pool)), &reference, "{:?} {}", acts, isa);
            }
        }
    }

    #[test]
    fn activation_forms_hold_the_same_integers((k, m, seed) in (1usize..200, 1usize..5, any::<u64>())) {
        let p = Problem::new(1, k, m, seed);
        for acts in [Acts::Q8, Acts::Q15] {
            let wide = QuantRows::new(&p.x, m, k, acts, Form::Wide, &ThreadPool::single());
            let qmax = match acts { Acts::Q8 => 127, Acts::Q15 => 16256 };
            for form in [Form::Signed, Form::Unsigned] {
                let a = QuantRows::new(&p.x, m, k, acts, form, &ThreadPool::single());
                prop_assert_eq!(bits(&a.scales), bits(&wide.scales));
                for i in 0..m {
                    for b in 0..blocks_per_row(k) {
                        let v = wide.values(i, b);
                        prop_assert_eq!(a.values(i, b), v);
                        prop_assert!(v.iter().all(|x| x.abs() <= qmax));
                        prop_assert!(v[k.min((b + 1) * BLOCK) - b * BLOCK..].iter().all(|&x| x == 0));
                        if form == Form::Unsigned {
                            let sum: i32 = v.iter().sum();
                            let bias = match acts { Acts::Q8 => -128 * sum, Acts::Q15 => -sum };
                            prop_assert_eq!(a.bias[i * a.nb + b], bias);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn both_schemes_are_within_stated_bounds_of_f64((n, k, m, seed) in shapes()) {
        let p = Problem::new(n, k, m, seed);
        let nb = blocks_per_row(k);
        let y8 = p.run(Acts::Q8, Isa::Scalar, &ThreadPool::single());
        let y15 = p.run(Acts::Q15, Isa::Scalar, &ThreadPool::single());
        for (y, acts, qmax) in [(&y8, Acts::Q8, 127.0), (&y15, Acts::Q15, 16256.0)] {
            let a = QuantRows::new(&p.x, m, k, acts, Form::Wide, &ThreadPool::single());
            for i in 0..m {
                for r in 0..n {
                    let exact: f64 = (0..k).map(|j| p.w(r, j) * f64::from(p.x[i * k + j])).sum();
                    // Each activation moves by at most half a step (max|x| / QMAX of its
                    // block, plus the rounding of x / scale); the f32 evaluation then adds at
                    // most (nb + 2) roundings of the absolute sum.
                    let step: f64 = (0..k).map(|j| p.w(r, j).abs() * 0.5001 * f64::from(a.scales[i * nb + j / BLOCK])).sum();
                    let abs: f64 = (0..k).map(|j| (p.w(r, j) * f64::from(p.x[i * k + j])).abs()).sum::<f64>() * (1.0 + 1.0 / qmax);
                    let bound = step + (nb + 2) as f64 * f64::from(f32::EPSILON) * abs + 1e-30;
                    let err = (f64::from(y[i * n + r]) - exact).abs();
                    prop_assert!(err <= bound, "{:?} ({}, {}): error {}, bound {}", acts, i, r, err, bound);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn threaded_equals_single_thread_bit_for_bit(n in 200usize..400, a in 16usize..32, tail in 0usize..32, m in 1usize..12, seed: u64) {
        // Large enough (>= 64 KiB of weights) that the work is really split.
        let p = Problem::new(n, 32 * a + tail, m, seed);
        let single = ThreadPool::single();
        let pools = [ThreadPool::new(2).unwrap(), ThreadPool::new(3).unwrap()];
        for isa in Isa::available() {
            for acts in [Acts::Q8, Acts::Q15] {
                let reference = bits(&p.run(acts, isa, &single));
                for pool in &pools {
                    prop_assert_eq!(&bits(&p.run(acts, isa, pool)), &reference, "{:?} {} threads {}", acts, isa, pool.threads());
                }
            }
        }
    }
}

#[test]
fn every_isa_equals_scalar_at_model_shapes() {
    let pool = ThreadPool::new(2).unwrap();
    for (k, n) in [(576, 192), (1536, 576), (2048, 512)] {
        for m in [1, 3, 17, 64] {
            let p = Problem::new(n, k, m, (k * n + m) as u64);
            for acts in [Acts::Q8, Acts::Q15] {
                let reference = bits(&p.run(acts, Isa::Scalar, &ThreadPool::single()));
                for isa in Isa::available() {
                    assert_eq!(
                        bits(&p.run(acts, isa, &pool)),
                        reference,
                        "{acts:?} {isa} k={k} n={n} m={m}"
                    );
                }
            }
        }
    }
}

#[test]
fn tiled_layout_places_each_value() {
    // W (17, 40): value (r, j) = r + 3 j (mod 256); scale of (r, b) = r + 100 b.
    let (n, k) = (17, 40);
    let q: Vec<i8> = (0..n * k)
        .map(|i| ((i / k) + 3 * (i % k)) as u8 as i8)
        .collect();
    let scales: Vec<f32> = (0..n * 2)
        .map(|i| ((i / 2) + 100 * (i % 2)) as f32)
        .collect();
    let (tq, ts) = tile_q8(&q, &scales, n, k);
    // 2 groups x 2 blocks x 512 bytes; 2 x 2 x 16 scales.
    assert_eq!((tq.len(), ts.len()), (2048, 64));
    // Group 0, block 0, chunk 1, row 2, value 3: W[2][7] = 2 + 21.
    assert_eq!(tq[64 + 2 * 4 + 3], 23);
    // Group 0, block 1, chunk 0, row 5, value 2: W[5][34] = 5 + 102.
    assert_eq!(tq[512 + 5 * 4 + 2], 107);
    // Block 1 ends at k = 40: chunk 2 of block 1 is padding.
    assert!(tq[512 + 2 * 64..1024].iter().all(|&v| v == 0));
    // Group 1 holds row 16 only: W[16][0] = 16, rows 17.. are zero.
    assert_eq!(tq[1024], 16);
    assert!(tq[1024 + 4..1024 + 64].iter().all(|&v| v == 0));
    assert_eq!(ts[..3], [0.0, 1.0, 2.0]);
    assert_eq!(ts[16..19], [100.0, 101.0, 102.0]);
    assert_eq!(ts[32..35], [16.0, 0.0, 0.0]);
    assert_eq!(ts[48], 116.0);
    // Rows read back equal the row-major matrix dequantized.
    let t = Q8Tiled::new(&tq, &ts, n, k).unwrap();
    let w = Q8Matrix::new(&q, &scales, n, k).unwrap();
    let mut row = vec![0f32; k];
    for r in 0..n {
        t.dequantize_row(r, &mut row);
        let want: Vec<f32> = (0..k)
            .map(|j| f32::from(w.q()[r * k + j]) * w.scales()[r * 2 + j / 32])
            .collect();
        assert_eq!(row, want, "row {r}");
    }
}

#[test]
fn q15_split_goldens() {
    // One block with max|x| = 16256: scale 1, so v = x rounded half away from zero.
    let mut x = vec![0f32; 32];
    x[..6].copy_from_slice(&[16256.0, -16256.0, 129.5, -129.5, -1.0, 127.0]);
    let a = QuantRows::new(&x, 1, 32, Acts::Q15, Form::Unsigned, &ThreadPool::single());
    assert_eq!(a.scales, [1.0]);
    // 16256 = 127 * 128 + 0; -16256 = -127 * 128 + 0; 130 = 1 * 128 + 2;
    // -130 = -2 * 128 + 126; -1 = -1 * 128 + 127; 127 = 0 * 128 + 127.
    assert_eq!(a.bytes[..6], [127, -127, 1, -2, -1, 0]);
    assert_eq!(a.bytes[32..38], [0, 0, 2, 126, 127, 127]);
    // bias = -sum(v) = -(16256 - 16256 + 130 - 130 - 1 + 127).
    assert_eq!(a.bias, [-126]);
    let a = QuantRows::new(&x, 1, 32, Acts::Q8, Form::Unsigned, &ThreadPool::single());
    assert_eq!(a.scales, [16256.0 / 127.0]);
    // 129.5 / 128 -> 1.01 -> 1; 127 / 128 -> 0.99 -> 1; -1 / 128 -> 0.
    assert_eq!(a.bytes[..6], [127, -127, 1, -1, 0, 1]);
    assert_eq!(a.bias, [-128]);
}

#[test]
fn scheme_errors_are_reported() {
    let (q, s) = quantize_q8(&[0.5; 70], 2, 35);
    let (tq, ts) = tile_q8(&q, &s, 2, 35);
    assert_eq!(
        Q8Tiled::new(&tq[1..], &ts, 2, 35).unwrap_err(),
        QuantError::WeightsLen {
            n: 2,
            k: 35,
            expected: 1024,
            got: 1023
        }
    );
    assert_eq!(
        Q8Tiled::new(&tq, &ts[1..], 2, 35).unwrap_err(),
        QuantError::ScalesLen {
            n: 16,
            nb: 2,
            expected: 32,
            got: 31
        }
    );
    let t = Q8Tiled::new(&tq, &ts, 2, 35).unwrap();
    let pool = ThreadPool::single();
    let mut y = [0f32; 2];
    assert_eq!(
        t.matmul(&[0.0; 36], &mut y, Acts::Q15, Isa::Scalar, &pool)
            .unwrap_err(),
        QuantError::InputLen { k: 35, got: 36 }
    );
    assert_eq!(
        t.matmul(&[0.0; 70], &mut y, Acts::Q15, Isa::Scalar, &pool)
            .unwrap_err(),
        QuantError::OutputLen {
            m: 2,
            n: 2,
            expected: 4,
            got: 2
        }
    );
    let missing = Isa::ALL.into_iter().find(|i| !i.is_available());
    if let Some(isa) = missing {
        assert_eq!(
            t.matmul(&[0.0; 35], &mut y, Acts::Q15, isa, &pool)
                .unwrap_err(),
            QuantError::IsaUnavailable(isa.name())
        );
    }
}

#[test]
fn quantizer_routes_agree_including_ties() {
    // max|x| = 16256 and 127 * 16 make scale 1 (Q15) and 16 (Q8) in some blocks, so x.5
    // steps are exact ties (rounded away from zero); the rest is random with outliers. The
    // routes: one thread (vector code where the CPU has it), rows split over 2 and 3 threads.
    let mut rng = Rng(3);
    let (m, k) = (170, 100); // over MIN_VALUES_PER_PART, so the rows are really split
    let mut x: Vec<f32> = (0..m * k).map(|_| rng.unit() * 3.0).collect(); // (m, k)
    for (j, v) in x[..32].iter_mut().enumerate() {
        *v = j as f32 * 2.5 - 40.0;
    }
    x[31] = 16256.0;
    for (j, v) in x[100..132].iter_mut().enumerate() {
        *v = j as f32 * 8.0 - 120.0;
    }
    x[131] = 127.0 * 16.0;
    let pools = [
        ThreadPool::single(),
        ThreadPool::new(2).unwrap(),
        ThreadPool::new(3).unwrap(),
    ];
    for acts in [Acts::Q8, Acts::Q15] {
        for form in [Form::Wide, Form::Signed, Form::Unsigned] {
            let a = QuantRows::new(&x, m, k, acts, form, &pools[0]);
            let nb = blocks_per_row(k);
            for i in 0..m {
                for b in 0..nb {
                    // Each block against the rule evaluated here in scalar f32.
                    let xb = &x[i * k + b * BLOCK..i * k + k.min((b + 1) * BLOCK)];
                    let qmax = match acts {
                        Acts::Q8 => 127.0,
                        Acts::Q15 => 16256.0,
                    };
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = amax / qmax;
                    assert_eq!(a.scales[i * nb + b], scale);
                    let mut want = [0i32; BLOCK];
                    for (w, &v) in want.iter_mut().zip(xb) {
                        if scale != 0.0 {
                            *w = (v / scale).round().clamp(-qmax, qmax) as i32;
                        }
                    }
                    assert_eq!(a.values(i, b), want, "{acts:?} {form:?} row {i} block {b}");
                }
            }
            for pool in &pools[1..] {
                let b = QuantRows::new(&x, m, k, acts, form, pool);
                assert_eq!(bits(&a.scales), bits(&b.scales), "{acts:?} {form:?}");
                assert_eq!((&a.wide, &a.bytes, &a.bias), (&b.wide, &b.bytes, &b.bias));
            }
        }
    }
    let single = &pools[0];
    let a = QuantRows::new(&x, m, k, Acts::Q15, Form::Wide, single);
    assert_eq!(a.scales[0], 1.0);
    assert_eq!(a.wide[..4], [-40, -38, -35, -33]); // -40, -37.5, -35, -32.5
    let a = QuantRows::new(&x, m, k, Acts::Q8, Form::Wide, single);
    assert_eq!(a.scales[4], 16.0);
    assert_eq!(a.wide[128..132], [-8, -7, -7, -6]); // -7.5, -7, -6.5 away from zero
}

#[test]
fn expected_isas_are_detected() {
    // cross/test.sh names what each emulated CPU must offer; natively, the machines we build
    // on have AVX2 (x86_64) or NEON (aarch64).
    let available: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
    match std::env::var("EDGELM_EXPECT_GEMM_ISAS") {
        Ok(expected) => assert_eq!(available.join(","), expected),
        Err(_) if cfg!(target_arch = "x86_64") => assert_eq!(available[..2], ["scalar", "avx2"]),
        Err(_) if cfg!(target_arch = "aarch64") => assert!(available.contains(&"neon")),
        Err(_) => assert_eq!(available, ["scalar"]),
    }
    assert_eq!(Isa::best().name(), *available.last().unwrap());
}

#[test]
fn the_kernel_choice_runs_its_familys_best_gemm_variant() {
    // Kernel::best is the last available of its list, as Isa::best is of its own, and every
    // kernel family holds the Isa variants its CPU features imply.
    assert_eq!(Isa::for_kernel(Kernel::best()), Isa::best());
    assert_eq!(Isa::for_kernel(Kernel::Scalar), Isa::Scalar);
    for kernel in Kernel::available() {
        assert!(Isa::for_kernel(kernel).is_available(), "{kernel}");
    }
}

#[test]
fn tiled_layout_reads_back_through_standard_onnx_ops() {
    // The bundle form of the layout (module documentation): the tiled initializers, then
    // Transpose, Reshape and Slice, evaluated by tract-onnx, give the row-major int8 values
    // and scales (what `DequantizeLinear(axis = 1, block_size = 32)` takes today). Padding in
    // both directions: n = 37 (3 groups), k = 70 (3 blocks).
    use crate::convert::onnx::{Attr, Dim, Elem, ExternalData, GraphBuilder};
    use tract_onnx::prelude::*;

    let (n, k) = (37usize, 70usize);
    let p = Problem::new(n, k, 1, 5);
    let (groups, nb) = (n.div_ceil(GROUP) as i64, blocks_per_row(k) as i64);
    let dir = std::env::temp_dir().join(format!("edgelm-gemm-onnx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut g = GraphBuilder::new(ExternalData::create(&dir, "model.onnx_data").unwrap());
    let bytes: Vec<u8> = p.tq.iter().map(|&v| v as u8).collect();
    let q = g
        .weight("w.q8", Elem::I8, &[groups, nb, 8, 16, 4], &bytes)
        .unwrap();
    let s = g.weight_f32("w.scale", &[groups, nb, 16], &p.ts).unwrap();
    let q = g.node(
        "Transpose",
        &[&q],
        vec![("perm", Attr::Ints(vec![0, 3, 1, 2, 4]))],
    );
    let s = g.node(
        "Transpose",
        &[&s],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    );
    let q_shape = g.const_i64("q_shape", &[2], &[16 * groups, 32 * nb]);
    let s_shape = g.const_i64("s_shape", &[2], &[16 * groups, nb]);
    let q = g.node("Reshape", &[&q, &q_shape], vec![]);
    let s = g.node("Reshape", &[&s, &s_shape], vec![]);
    let starts = g.const_i64("starts", &[2], &[0, 0]);
    let q_ends = g.const_i64("q_ends", &[2], &[n as i64, k as i64]);
    let s_ends = g.const_i64("s_ends", &[2], &[n as i64, nb]);
    let q = g.node("Slice", &[&q, &starts, &q_ends], vec![]);
    let s = g.node("Slice", &[&s, &starts, &s_ends], vec![]);
    let fixed = |a: usize, b: usize| [Dim::Fixed(a as i64), Dim::Fixed(b as i64)];
    g.output(&q, "q", Elem::I8, &fixed(n, k));
    g.output(&s, "scales", Elem::F32, &fixed(n, nb as usize));
    g.finish(&dir.join("model.onnx"), "tiled").unwrap();

    let outputs = tract_onnx::onnx()
        .model_for_path(dir.join("model.onnx"))
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap()
        .run(tvec![])
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(outputs[0].shape(), [n, k]);
    assert_eq!(outputs[1].shape(), [n, nb as usize]);
    let q = outputs[0].try_as_plain_ram().unwrap();
    assert_eq!(q.as_slice::<i8>().unwrap(), &p.q[..]);
    let s = outputs[1].try_as_plain_ram().unwrap();
    assert_eq!(bits(s.as_slice::<f32>().unwrap()), bits(&p.scales));
}

/// Decode on the tiled layout against the row-major Q8F32 product of the same kernel.
fn matvec_equals_row_major(n: usize, k: usize, seed: u64, pool: &ThreadPool) {
    let p = Problem::new(n, k, 1, seed);
    let rows = Q8Matrix::new(&p.q, &p.scales, n, k).unwrap();
    for kernel in Kernel::available() {
        let mut want = vec![f32::NAN; n];
        rows.matmul(&p.x, &mut want, crate::quant::Scheme::Q8F32, kernel, pool)
            .unwrap();
        let mut got = vec![f32::NAN; n];
        p.tiled().matvec_f32(&p.x, &mut got, kernel, pool).unwrap();
        assert_eq!(bits(&got), bits(&want), "{kernel} n={n} k={k}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn matvec_gives_the_row_major_bits_of_every_kernel((n, k, _, seed) in shapes()) {
        matvec_equals_row_major(n, k, seed, &ThreadPool::single());
    }
}

#[test]
fn matvec_gives_the_row_major_bits_at_model_shapes_on_two_threads() {
    let pool = ThreadPool::new(2).unwrap();
    // 576 = 18 blocks: two spans of blocks, the second short; 1000: a short last block.
    for (k, n) in [(576, 192), (1536, 40), (1000, 300)] {
        matvec_equals_row_major(n, k, (k * n) as u64, &pool);
    }
}

#[test]
fn matvec_reports_bad_lengths() {
    let p = Problem::new(20, 64, 1, 7);
    let pool = ThreadPool::single();
    let mut y = vec![0f32; 20];
    assert_eq!(
        p.tiled()
            .matvec_f32(&p.x[..63], &mut y, Kernel::Scalar, &pool),
        Err(QuantError::InputLen { k: 64, got: 63 })
    );
    assert_eq!(
        p.tiled()
            .matvec_f32(&p.x, &mut y[..19], Kernel::Scalar, &pool),
        Err(QuantError::OutputLen {
            m: 1,
            n: 20,
            expected: 20,
            got: 19
        })
    );
}

/// Products sharing their input (query/key/value, gate/up: same k, different n, one of them
/// not a whole number of groups) in one call give each matrix the bits it gets alone, on
/// every variant, whatever the thread count (the split between threads crosses matrices).
#[test]
fn products_sharing_an_input_equal_each_product_alone() {
    let k = 32 * 20 + 7;
    let ps = [(200, 1), (64, 2), (88, 3)].map(|(n, seed)| Problem::new(n, k, 5, seed));
    let ws = ps.each_ref().map(Problem::tiled);
    let x = &ps[0].x; // (5, k)
    let single = ThreadPool::single();
    let pools = [
        ThreadPool::single(),
        ThreadPool::new(2).unwrap(),
        ThreadPool::new(3).unwrap(),
    ];
    for pool in &pools {
        for isa in Isa::available() {
            for acts in [Acts::Q8, Acts::Q15] {
                let mut got = ps.each_ref().map(|p| vec![f32::NAN; 5 * p.n]);
                let mut ys: Vec<&mut [f32]> = got.iter_mut().map(|y| &mut y[..]).collect();
                matmul_many(&ws, x, &mut ys, acts, isa, pool).unwrap();
                for (w, y) in ws.iter().zip(&got) {
                    let mut alone = vec![f32::NAN; y.len()];
                    w.matmul(x, &mut alone, acts, isa, &single).unwrap();
                    assert_eq!(bits(y), bits(&alone), "{isa} {acts:?} n={}", w.n());
                }
            }
        }
        for kernel in Kernel::available() {
            let x1 = &x[..k];
            let mut got = ps.each_ref().map(|p| vec![f32::NAN; p.n]);
            let mut ys: Vec<&mut [f32]> = got.iter_mut().map(|y| &mut y[..]).collect();
            matvec_f32_many(&ws, x1, &mut ys, kernel, pool).unwrap();
            for (w, y) in ws.iter().zip(&got) {
                let mut alone = vec![f32::NAN; y.len()];
                w.matvec_f32(x1, &mut alone, kernel, &single).unwrap();
                assert_eq!(bits(y), bits(&alone), "{kernel} n={}", w.n());
            }
        }
    }
    // Matrices that do not read the same input length are refused.
    let other = Problem::new(16, k + 1, 1, 4);
    let mut y0 = vec![0f32; 200];
    let mut y1 = vec![0f32; 16];
    assert_eq!(
        matvec_f32_many(
            &[ws[0], other.tiled()],
            &x[..k],
            &mut [&mut y0, &mut y1],
            Kernel::Scalar,
            &single
        ),
        Err(QuantError::InputLen { k: k + 1, got: k })
    );
}
