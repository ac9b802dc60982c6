//! One f32 activation row (decode) against the tiled layout, with the arithmetic of the
//! row-major Q8F32 kernels: for every kernel choice, [`Q8Tiled::matvec_f32`] gives the same
//! bits as [`Q8Matrix::matmul`](crate::quant::Q8Matrix::matmul) with `Scheme::Q8F32` and the
//! same [`Kernel`], so decode reads either layout with the same result.
//!
//! A SIMD lane holds one weight row: a chunk (16 rows x 4 values, one cache line) read as 16
//! i32 gives, by a pair of shifts per value position, 4 vectors of 16 rows' weights, each
//! multiplied by one activation broadcast to every lane. The per-row lanes of the row-major
//! kernels become registers here:
//! - AVX2 and NEON: 8 lanes per row, `s[l] = w[l] x[l]`, then `s[l] += w[j] x[j]` fused for
//!   j = l + 8, l + 16, l + 24, then `acc[l] += s[l] sw` fused (8 rows per ymm, 4 per NEON
//!   register, so a group's accumulators are worked on a half or a quarter at a time, over
//!   spans of [`SPAN`] blocks that stay in L1);
//! - AVX-512: 16 lanes per row, `s[l] = w[l] x[l] + w[l + 16] x[l + 16]` (fused), `acc[l] +=
//!   s[l] sw` fused, lanes l and l + 8 folded at the end;
//! - scalar: the portable block routine itself (`quant::scalar`), unfused.
//!
//! Then, per row, the short last block (if k is not a multiple of 32) by the portable block
//! routine and the lanes reduced by `reduce8`, as the row-major kernels finish.

// Kernels index several arrays (lanes, rows, chunks) with one counter; index loops say that
// most plainly and always inline into the `target_feature` functions.
#![allow(clippy::needless_range_loop)]

use super::{check_many, shared_outs, Q8Tiled, Split, CHUNK, CHUNKS, GROUP, QUAD};
use crate::quant::format::BLOCK;
use crate::quant::{reduce8, scalar, Kernel, QuantError, ThreadPool};

/// Blocks of one group worked on before the next part of the group's rows (a span is
/// `SPAN * 512` bytes, which stays in L1 while the other rows of the group reuse it).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const SPAN: usize = 8;

impl Q8Tiled<'_> {
    /// `y = W x` for one activation vector x (k), y (n), with f32 activations: the same bits
    /// as the row-major Q8F32 product with `kernel` (see the module documentation).
    pub fn matvec_f32(
        &self,
        x: &[f32],
        y: &mut [f32],
        kernel: Kernel,
        pool: &ThreadPool,
    ) -> Result<(), QuantError> {
        matvec_f32_many(&[*self], x, &mut [y], kernel, pool)
    }
}

/// `ys[i] = ws[i] x` for matrices that read the same activation vector x (k), in one pool
/// round; each output has the bits [`Q8Tiled::matvec_f32`] gives it alone.
pub fn matvec_f32_many(
    ws: &[Q8Tiled<'_>],
    x: &[f32],
    ys: &mut [&mut [f32]],
    kernel: Kernel,
    pool: &ThreadPool,
) -> Result<(), QuantError> {
    let (k, m) = check_many(ws, x, ys)?;
    if m != 1 {
        return Err(QuantError::InputLen { k, got: x.len() });
    }
    let kernel = kernel.checked()?;
    let outs = shared_outs(ws, ys, 1);
    let split = Split::new(ws, pool.threads());
    pool.run(split.parts, |p| {
        for (i, groups) in split.ranges(p) {
            let (w, n) = (&ws[i], ws[i].n());
            let cols = (groups.start * GROUP).min(n)..(groups.end * GROUP).min(n);
            // SAFETY: part p writes only columns `cols` of output i (the rows of its groups
            // of matrix i); the ranges of distinct parts are disjoint, and `pool.run`
            // returns only after every part has finished.
            let mut out = unsafe { outs[i].part(cols) };
            for g in groups {
                let ys = group(w, g, x, kernel);
                for (l, &v) in ys[..GROUP.min(n - g * GROUP)].iter().enumerate() {
                    out.set(0, g * GROUP + l, v);
                }
            }
        }
    });
    Ok(())
}

/// The 16 outputs of group g (padded rows past n included) with `kernel` (checked
/// available).
fn group(w: &Q8Tiled<'_>, g: usize, x: &[f32], kernel: Kernel) -> [f32; GROUP] {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `kernel` was checked available, so the CPU has AVX2 and FMA.
        Kernel::Avx2 => unsafe { avx2::group(w, g, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `kernel` was checked available, so the CPU has AVX-512F, AVX2 and FMA.
        Kernel::Avx512 => unsafe { avx512::group(w, g, x) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `kernel` was checked available, so the CPU has NEON.
        Kernel::Neon | Kernel::Dotprod => unsafe { neon::group(w, g, x) },
        _ => scalar_group(w, g, x),
    }
}

/// Row l of group g, block b: its (up to 32) values, as the row-major layout holds them.
#[inline(always)]
fn row_block(w: &Q8Tiled<'_>, g: usize, b: usize, l: usize) -> ([i8; BLOCK], usize) {
    let (q, _) = w.group_block(g, b);
    let mut v = [0i8; BLOCK];
    for c in 0..CHUNKS {
        v[c * QUAD..(c + 1) * QUAD].copy_from_slice(&q[c * CHUNK + l * QUAD..][..QUAD]);
    }
    (v, BLOCK.min(w.k() - b * BLOCK))
}

/// The portable twin: each row through `scalar::block_q8f32`, block by block.
fn scalar_group(w: &Q8Tiled<'_>, g: usize, x: &[f32]) -> [f32; GROUP] {
    let mut ys = [0f32; GROUP];
    for (l, y) in ys.iter_mut().enumerate() {
        let mut acc = [0f32; 8];
        for b in 0..w.blocks() {
            let (v, len) = row_block(w, g, b, l);
            let s = w.group_block(g, b).1[l];
            scalar::block_q8f32(&mut acc, &v[..len], &x[b * BLOCK..][..len], s);
        }
        *y = reduce8(&acc);
    }
    ys
}

/// Per row: the lanes (lane, row) of the full blocks, plus the short last block, reduced.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn finish(w: &Q8Tiled<'_>, g: usize, x: &[f32], lanes: &[[f32; GROUP]; 8]) -> [f32; GROUP] {
    let full = w.k() / BLOCK;
    let mut ys = [0f32; GROUP];
    for (l, y) in ys.iter_mut().enumerate() {
        let mut acc = [0f32; 8];
        for (a, lane) in acc.iter_mut().zip(lanes) {
            *a = lane[l];
        }
        if full < w.blocks() {
            let (v, len) = row_block(w, g, full, l);
            let s = w.group_block(g, full).1[l];
            scalar::block_q8f32(&mut acc, &v[..len], &x[full * BLOCK..], s);
        }
        *y = reduce8(&acc);
    }
    ys
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{finish, Q8Tiled, BLOCK, CHUNK, GROUP};
    use crate::quant::gemm::GROUP_BLOCK;

    /// Group-blocks ahead whose weights are prefetched.
    const PREFETCH_BLOCKS: usize = 4;

    /// The 4 value positions of a chunk (16 rows' i32 words), each as 16 rows' f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn widen_chunk(v: __m512i) -> [__m512; 4] {
        [
            _mm512_cvtepi32_ps(_mm512_srai_epi32::<24>(_mm512_slli_epi32::<24>(v))),
            _mm512_cvtepi32_ps(_mm512_srai_epi32::<24>(_mm512_slli_epi32::<16>(v))),
            _mm512_cvtepi32_ps(_mm512_srai_epi32::<24>(_mm512_slli_epi32::<8>(v))),
            _mm512_cvtepi32_ps(_mm512_srai_epi32::<24>(v)),
        ]
    }

    /// Group g against x, as the row-major AVX-512 Q8F32 kernel computes each row.
    ///
    /// # Safety
    /// The CPU must support AVX-512F, AVX2 and FMA; g < groups and `x.len() == k`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn group(w: &Q8Tiled<'_>, g: usize, x: &[f32]) -> [f32; GROUP] {
        assert!(x.len() == w.k());
        let full = w.k() / BLOCK;
        let mut acc = [_mm512_setzero_ps(); 16]; // (lane l of 16), 16 rows each
        for b in 0..full {
            let (q, s) = w.group_block(g, b);
            let qp = q.as_ptr();
            // Prefetches never fault; `wrapping_add` keeps the address arithmetic defined
            // past the matrix end.
            let ahead = qp.wrapping_add(PREFETCH_BLOCKS * GROUP_BLOCK);
            for c in 0..8 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(c * CHUNK));
            }
            // SAFETY: a group-block is 8 chunks of 64 bytes and 16 scales; block b is full,
            // so b * 32 + 32 <= k floats of x.
            unsafe {
                let xp = x.as_ptr().add(b * BLOCK);
                let sw = _mm512_loadu_ps(s.as_ptr());
                for c in 0..4 {
                    let lo = widen_chunk(_mm512_loadu_si512(qp.add(c * CHUNK).cast()));
                    let hi = widen_chunk(_mm512_loadu_si512(qp.add((c + 4) * CHUNK).cast()));
                    for e in 0..4 {
                        let j = 4 * c + e;
                        let s = _mm512_mul_ps(lo[e], _mm512_set1_ps(*xp.add(j)));
                        let s = _mm512_fmadd_ps(hi[e], _mm512_set1_ps(*xp.add(j + 16)), s);
                        acc[j] = _mm512_fmadd_ps(s, sw, acc[j]);
                    }
                }
            }
        }
        let mut lanes = [[0f32; GROUP]; 8];
        for l in 0..8 {
            // SAFETY: `lanes[l]` holds 16 floats.
            unsafe { _mm512_storeu_ps(lanes[l].as_mut_ptr(), _mm512_add_ps(acc[l], acc[l + 8])) };
        }
        finish(w, g, x, &lanes)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{finish, Q8Tiled, BLOCK, CHUNK, GROUP, SPAN};

    /// Value position E of 8 rows' i32 words, as f32.
    #[inline(always)]
    unsafe fn widen<const E: i32>(v: __m256i) -> __m256 {
        // SAFETY: the caller's `target_feature` context has AVX2.
        unsafe {
            match E {
                0 => _mm256_cvtepi32_ps(_mm256_srai_epi32::<24>(_mm256_slli_epi32::<24>(v))),
                1 => _mm256_cvtepi32_ps(_mm256_srai_epi32::<24>(_mm256_slli_epi32::<16>(v))),
                2 => _mm256_cvtepi32_ps(_mm256_srai_epi32::<24>(_mm256_slli_epi32::<8>(v))),
                _ => _mm256_cvtepi32_ps(_mm256_srai_epi32::<24>(v)),
            }
        }
    }

    /// Lanes 4 c0 + E of 8 rows: `s = w x` for the 4 chunks c0, c0 + 2, c0 + 4, c0 + 6
    /// (values l, l + 8, l + 16, l + 24), then `acc += s sw`.
    #[inline(always)]
    unsafe fn lane<const E: i32>(
        acc: &mut __m256,
        v: &[__m256i; 4],
        xp: *const f32,
        l: usize,
        sw: __m256,
    ) {
        // SAFETY: the caller's `target_feature` context has AVX2 and FMA; xp + l + 24 is
        // inside the block.
        unsafe {
            let mut s = _mm256_mul_ps(widen::<E>(v[0]), _mm256_set1_ps(*xp.add(l)));
            for i in 1..4 {
                s = _mm256_fmadd_ps(widen::<E>(v[i]), _mm256_set1_ps(*xp.add(l + 8 * i)), s);
            }
            *acc = _mm256_fmadd_ps(s, sw, *acc);
        }
    }

    /// Group g against x, as the row-major AVX2 Q8F32 kernel computes each row.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; g < groups and `x.len() == k`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn group(w: &Q8Tiled<'_>, g: usize, x: &[f32]) -> [f32; GROUP] {
        assert!(x.len() == w.k());
        let full = w.k() / BLOCK;
        let mut acc = [[_mm256_setzero_ps(); 8]; 2]; // (half, lane), 8 rows each
        for b0 in (0..full).step_by(SPAN) {
            for h in 0..2 {
                let mut a = acc[h];
                for b in b0..(b0 + SPAN).min(full) {
                    let (q, s) = w.group_block(g, b);
                    // SAFETY: a group-block is 8 chunks of 64 bytes (this half is the 32
                    // bytes at 32 h of each) and 16 scales; block b is full, so
                    // b * 32 + 32 <= k floats of x.
                    unsafe {
                        let qp = q.as_ptr().add(32 * h);
                        let xp = x.as_ptr().add(b * BLOCK);
                        let sw = _mm256_loadu_ps(s.as_ptr().add(8 * h));
                        for c0 in 0..2 {
                            let mut v = [_mm256_setzero_si256(); 4];
                            for i in 0..4 {
                                v[i] = _mm256_loadu_si256(qp.add((c0 + 2 * i) * CHUNK).cast());
                            }
                            let l = 4 * c0;
                            lane::<0>(&mut a[l], &v, xp, l, sw);
                            lane::<1>(&mut a[l + 1], &v, xp, l + 1, sw);
                            lane::<2>(&mut a[l + 2], &v, xp, l + 2, sw);
                            lane::<3>(&mut a[l + 3], &v, xp, l + 3, sw);
                        }
                    }
                }
                acc[h] = a;
            }
        }
        let mut lanes = [[0f32; GROUP]; 8];
        for l in 0..8 {
            for h in 0..2 {
                // SAFETY: `lanes[l]` holds 16 floats.
                unsafe { _mm256_storeu_ps(lanes[l].as_mut_ptr().add(8 * h), acc[h][l]) };
            }
        }
        finish(w, g, x, &lanes)
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{finish, Q8Tiled, BLOCK, CHUNK, GROUP, SPAN};

    /// Value position E of 4 rows' i32 words, as f32.
    #[inline(always)]
    unsafe fn widen<const E: i32>(v: int32x4_t) -> float32x4_t {
        // SAFETY: the caller's `target_feature` context has NEON.
        unsafe {
            match E {
                0 => vcvtq_f32_s32(vshrq_n_s32::<24>(vshlq_n_s32::<24>(v))),
                1 => vcvtq_f32_s32(vshrq_n_s32::<24>(vshlq_n_s32::<16>(v))),
                2 => vcvtq_f32_s32(vshrq_n_s32::<24>(vshlq_n_s32::<8>(v))),
                _ => vcvtq_f32_s32(vshrq_n_s32::<24>(v)),
            }
        }
    }

    /// Lanes 4 c0 + E of 4 rows: `s = w x` for the 4 chunks c0, c0 + 2, c0 + 4, c0 + 6
    /// (values l, l + 8, l + 16, l + 24), then `acc += s sw`.
    #[inline(always)]
    unsafe fn lane<const E: i32>(
        acc: &mut float32x4_t,
        v: &[int32x4_t; 4],
        xp: *const f32,
        l: usize,
        sw: float32x4_t,
    ) {
        // SAFETY: the caller's `target_feature` context has NEON; xp + l + 24 is inside the
        // block.
        unsafe {
            let mut s = vmulq_n_f32(widen::<E>(v[0]), *xp.add(l));
            for i in 1..4 {
                s = vfmaq_n_f32(s, widen::<E>(v[i]), *xp.add(l + 8 * i));
            }
            *acc = vfmaq_f32(*acc, s, sw);
        }
    }

    /// Group g against x, as the row-major NEON Q8F32 kernel computes each row.
    ///
    /// # Safety
    /// The CPU must support NEON; g < groups and `x.len() == k`.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn group(w: &Q8Tiled<'_>, g: usize, x: &[f32]) -> [f32; GROUP] {
        assert!(x.len() == w.k());
        let full = w.k() / BLOCK;
        let mut acc = [[vdupq_n_f32(0.0); 8]; 4]; // (quarter, lane), 4 rows each
        for b0 in (0..full).step_by(SPAN) {
            for h in 0..4 {
                let mut a = acc[h];
                for b in b0..(b0 + SPAN).min(full) {
                    let (q, s) = w.group_block(g, b);
                    // SAFETY: a group-block is 8 chunks of 64 bytes (this quarter is the 16
                    // bytes at 16 h of each) and 16 scales; block b is full, so
                    // b * 32 + 32 <= k floats of x.
                    unsafe {
                        let qp = q.as_ptr().add(16 * h);
                        let xp = x.as_ptr().add(b * BLOCK);
                        let sw = vld1q_f32(s.as_ptr().add(4 * h));
                        for c0 in 0..2 {
                            let mut v = [vdupq_n_s32(0); 4];
                            for i in 0..4 {
                                v[i] = vreinterpretq_s32_s8(vld1q_s8(qp.add((c0 + 2 * i) * CHUNK)));
                            }
                            let l = 4 * c0;
                            lane::<0>(&mut a[l], &v, xp, l, sw);
                            lane::<1>(&mut a[l + 1], &v, xp, l + 1, sw);
                            lane::<2>(&mut a[l + 2], &v, xp, l + 2, sw);
                            lane::<3>(&mut a[l + 3], &v, xp, l + 3, sw);
                        }
                    }
                }
                acc[h] = a;
            }
        }
        let mut lanes = [[0f32; GROUP]; 8];
        for l in 0..8 {
            for h in 0..4 {
                // SAFETY: `lanes[l]` holds 16 floats.
                unsafe { vst1q_f32(lanes[l].as_mut_ptr().add(4 * h), acc[h][l]) };
            }
        }
        finish(w, g, x, &lanes)
    }
}
