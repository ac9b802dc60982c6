//! Tests of the ring attention: a wrapped ring against plain attention over the kept
//! tokens, causal prefill chunks, and the same bits from any number of threads.

use super::attend::{attend, decode_attention, group_attention, Scratch, PARALLEL_WORK};
use super::kernels;
use crate::kv_cache::{HeadRows, KvType, LayerKv, RingLayout, Step};
use crate::quant::{Kernel, ThreadPool};
use tract_onnx::prelude::*;
/// Plain causal attention over keys/values given in conversation order.
fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
    let scores: Vec<f32> = keys.iter().map(|k| kernels::dot(q, k) * scale).collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f32 = e.iter().sum();
    let mut out = vec![0f32; q.len()];
    for (p, v) in e.iter().zip(values) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += p / sum * x;
        }
    }
    out
}

/// A tensor's values.
fn floats(t: &Tensor) -> Vec<f32> {
    t.try_as_plain_ram()
        .unwrap()
        .as_slice::<f32>()
        .unwrap()
        .to_vec()
}

fn vector(seed: usize, hd: usize) -> Vec<f32> {
    (0..hd)
        .map(|i| ((seed * 31 + i * 7) % 13) as f32 / 13.0 - 0.5)
        .collect()
}

/// A wrapped ring with sinks gives the same output as attending over exactly the kept
/// tokens in order; grouped heads read their key/value head.
#[test]
fn wrapped_ring_attends_over_sinks_and_window() {
    let (kvh, heads, hd, cap, keep) = (2, 4, 8, 5, 2);
    let mut ring = RingLayout::new(cap, keep).unwrap();
    let mut kv = LayerKv::new(kvh, cap, hd, KvType::F32);
    let mut scratch = Scratch::default();
    let mut history: Vec<usize> = vec![]; // token index per position
    let kv_of = |t: usize, h: usize, which: usize| vector(t * 4 + h * 2 + which, hd);
    for t in 0..12 {
        let step = ring.place(&[t as u32]).unwrap();
        history.push(t);
        let k_new: Vec<f32> = (0..kvh).flat_map(|h| kv_of(t, h, 0)).collect();
        let v_new: Vec<f32> = (0..kvh).flat_map(|h| kv_of(t, h, 1)).collect();
        let q: Vec<f32> = (0..heads)
            .flat_map(|h| vector(100 + t * 5 + h, hd))
            .collect();
        let out = attend(
            &mut kv,
            &step,
            0.3,
            &Tensor::from_shape(&[1, heads, 1, hd], &q).unwrap(),
            &Tensor::from_shape(&[1, kvh, 1, hd], &k_new).unwrap(),
            &Tensor::from_shape(&[1, kvh, 1, hd], &v_new).unwrap(),
            &mut scratch,
            Kernel::best(),
            None,
            0,
        )
        .unwrap();
        let out = floats(&out);
        let kept: Vec<usize> = ring.kept_tokens().iter().map(|&t| t as usize).collect();
        let want_kept: Vec<usize> = if t < cap {
            (0..=t).collect()
        } else {
            (0..keep).chain(t + 1 + keep - cap..=t).collect()
        };
        assert_eq!(kept, want_kept, "step {t}");
        for head in 0..heads {
            let h = head / (heads / kvh);
            let keys: Vec<_> = kept.iter().map(|&k| kv_of(k, h, 0)).collect();
            let values: Vec<_> = kept.iter().map(|&k| kv_of(k, h, 1)).collect();
            let want = reference(&q[head * hd..(head + 1) * hd], &keys, &values, 0.3);
            let got = &out[head * hd..(head + 1) * hd];
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-6,
                    "step {t} head {head}: {got:?} vs {want:?}"
                );
            }
        }
    }
}

/// A chunk of new tokens is causal: token i sees the cache and new tokens 0..=i.
#[test]
fn prefill_chunk_is_causal() {
    let (hd, cap) = (4, 8);
    let mut ring = RingLayout::new(cap, 1).unwrap();
    let mut kv = LayerKv::new(1, cap, hd, KvType::F32);
    let keys: Vec<Vec<f32>> = (0..5).map(|t| vector(t, hd)).collect();
    let values: Vec<Vec<f32>> = (0..5).map(|t| vector(50 + t, hd)).collect();
    let qs: Vec<Vec<f32>> = (0..5).map(|t| vector(90 + t, hd)).collect();
    let mut scratch = Scratch::default();
    let mut run = |ring: &mut RingLayout, kv: &mut LayerKv, range: std::ops::Range<usize>| {
        let ids: Vec<u32> = range.clone().map(|t| t as u32).collect();
        let step = ring.place(&ids).unwrap();
        let n = range.len();
        let flat = |v: &[Vec<f32>]| v[range.clone()].concat();
        let out = attend(
            kv,
            &step,
            0.5,
            &Tensor::from_shape(&[1, 1, n, hd], &flat(&qs)).unwrap(),
            &Tensor::from_shape(&[1, 1, n, hd], &flat(&keys)).unwrap(),
            &Tensor::from_shape(&[1, 1, n, hd], &flat(&values)).unwrap(),
            &mut scratch,
            Kernel::best(),
            None,
            0,
        )
        .unwrap();
        floats(&out)
    };
    let first = run(&mut ring, &mut kv, 0..2);
    let rest = run(&mut ring, &mut kv, 2..5);
    let got = [first, rest].concat();
    for t in 0..5 {
        let want = reference(&qs[t], &keys[..=t], &values[..=t], 0.5);
        for (g, w) in got[t * hd..(t + 1) * hd].iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "token {t}");
        }
    }
}

/// Decode over a long history: the same bits with any number of threads (whole blocks,
/// then columns, per part) as the per-head prefill path, close to the plain reference;
/// empty slots, including a whole empty block, are skipped. f32 and f16 storage.
#[test]
fn decode_split_over_threads_has_the_bits_of_one_thread() {
    use crate::kv_cache::EMPTY;
    let (kvh, group, hd, cap, used) = (3, 3, 64, 400, 333);
    let heads = kvh * group;
    let empty = |j: usize| j == 70 || (128..192).contains(&j);
    for ty in [KvType::F32, KvType::F16] {
        let mut kv = LayerKv::new(kvh, cap, hd, ty);
        for h in 0..kvh {
            for j in 0..used {
                let (k, v) = (vector(j * 3 + h, hd), vector(7000 + j * 5 + h, hd));
                let k: Vec<f32> = k.iter().map(|x| x * (1.0 + (j % 17) as f32)).collect();
                kv.write(h, j, &k, &v);
            }
        }
        let stamps: Vec<u64> = (0..cap)
            .map(|j| {
                if j < used && !empty(j) {
                    j as u64
                } else {
                    EMPTY
                }
            })
            .collect();
        let step = Step {
            slots: vec![used - 1],
            new_stamps: vec![(used - 1) as u64],
            stamps,
            used,
            dropped: 0,
        };
        let q: Vec<f32> = (0..heads).flat_map(|h| vector(900 + h, hd)).collect();
        let kernel = Kernel::best();
        let run = |pool: Option<&ThreadPool>| {
            let mut out = vec![0f32; heads * hd];
            decode_attention(
                kernel,
                &kv,
                &step,
                0.125,
                &q,
                &mut out,
                &mut Scratch::default(),
                pool,
            );
            out.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        };
        let serial = run(None);
        for threads in 1..=3 {
            let pool = ThreadPool::new(threads).unwrap();
            assert_eq!(run(Some(&pool)), serial, "{ty:?} {threads} threads");
        }
        let mut per_head = vec![0f32; heads * hd];
        let mut scratch = Scratch::default();
        for h in 0..kvh {
            let o = &mut per_head[h * group * hd..(h + 1) * group * hd];
            match kv.head(h) {
                HeadRows::F32(k, v) => {
                    group_attention(kernel, k, v, &q, h, 0, o, &step, 0.125, &mut scratch)
                }
                HeadRows::F16(k, v) => {
                    group_attention(kernel, k, v, &q, h, 0, o, &step, 0.125, &mut scratch)
                }
            }
        }
        let per_head: Vec<u32> = per_head.iter().map(|x| x.to_bits()).collect();
        assert_eq!(
            per_head, serial,
            "{ty:?}: decode and prefill arithmetic differ"
        );
        for head in 0..heads {
            let h = head / group;
            let visible: Vec<usize> = (0..used).filter(|&j| !empty(j)).collect();
            let mut k = vec![0f32; hd];
            let mut v = vec![0f32; hd];
            let keys: Vec<Vec<f32>> = visible
                .iter()
                .map(|&j| kv.key(h, j, &mut k).to_vec())
                .collect();
            let values: Vec<Vec<f32>> = visible
                .iter()
                .map(|&j| kv.value(h, j, &mut v).to_vec())
                .collect();
            let want = reference(&q[head * hd..(head + 1) * hd], &keys, &values, 0.125);
            for (c, w) in want.iter().enumerate() {
                let got = f32::from_bits(serial[head * hd + c]);
                assert!(
                    (got - w).abs() < 1e-5,
                    "{ty:?} head {head} column {c}: {got} vs {w}"
                );
            }
        }
    }
}

/// Enough work to split the prefill units over the pool: the bits of one thread whatever
/// the pool's size, and the plain reference's answers.
#[test]
fn parallel_heads_match_the_reference() {
    let (kvh, heads, hd, n) = (2, 6, 8, 128);
    let mut ring = RingLayout::new(n, 0).unwrap();
    let mut kv = LayerKv::new(kvh, n, hd, KvType::F32);
    let ids: Vec<u32> = (0..n as u32).collect();
    let step = ring.place(&ids).unwrap();
    assert!(n * n >= PARALLEL_WORK);
    let k: Vec<f32> = (0..kvh * n).flat_map(|t| vector(t, hd)).collect(); // (kvh, n, hd)
    let v: Vec<f32> = (0..kvh * n).flat_map(|t| vector(500 + t, hd)).collect();
    let q: Vec<f32> = (0..heads * n).flat_map(|t| vector(900 + t, hd)).collect();
    let mut run = |pool: Option<&ThreadPool>| {
        let out = attend(
            &mut kv,
            &step,
            0.25,
            &Tensor::from_shape(&[1, heads, n, hd], &q).unwrap(),
            &Tensor::from_shape(&[1, kvh, n, hd], &k).unwrap(),
            &Tensor::from_shape(&[1, kvh, n, hd], &v).unwrap(),
            &mut Scratch::default(),
            Kernel::best(),
            pool,
            0,
        )
        .unwrap();
        floats(&out)
    };
    let out = run(None);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    for threads in 1..=3 {
        let pool = ThreadPool::new(threads).unwrap();
        assert_eq!(bits(&run(Some(&pool))), bits(&out), "{threads} threads");
    }
    for head in 0..heads {
        let h = head / (heads / kvh);
        for i in 0..n {
            let row = (head * n + i) * hd;
            let keys: Vec<Vec<f32>> = (0..=i).map(|j| vector(h * n + j, hd)).collect();
            let values: Vec<Vec<f32>> = (0..=i).map(|j| vector(500 + h * n + j, hd)).collect();
            let want = reference(&q[row..row + hd], &keys, &values, 0.25);
            for (g, w) in out[row..row + hd].iter().zip(&want) {
                assert!((g - w).abs() < 1e-6, "head {head} token {i}");
            }
        }
    }
}
