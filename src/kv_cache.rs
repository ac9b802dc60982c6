//! The fixed-capacity KV cache: a ring of `capacity` slots per layer, allocated once when a
//! conversation starts, written in place. This is the only file that knows about wrap-around.
//!
//! Contract:
//! - **What is kept.** Slots fill in order `0, 1, …`. Once all `capacity` slots hold a token,
//!   the first `n_keep` slots (the sink tokens: the start of the conversation, StreamingLLM
//!   style) are never overwritten, and each new token overwrites the oldest of the others. So
//!   the cache always holds the first `n_keep` tokens and the latest `capacity - n_keep`.
//! - **How it is attended.** Keys are cached after RoPE, so attention is order-invariant over
//!   them: every query attends over the physical slots `0..len` whose stamp (the token's index
//!   in the conversation) is not after its own; nothing is ever moved or copied.
//! - **Which positions are fed.** RoPE positions keep growing with every token while they stay
//!   below the model's trained context; when the next chunk would pass it, the caller
//!   re-prefills the kept tokens ([`RingLayout::kept_tokens`]) at fresh positions `0..` after a
//!   [`RingLayout::reset`].
//! - **What is lossy.** Evicted tokens are gone: later tokens cannot attend to them (the model
//!   was not trained for that gap, so quality can degrade, which is why every eviction is
//!   reported). Within one chunk that wraps, the earlier tokens of the chunk also lose the old
//!   tokens overwritten by the later ones; chunks are capped at `capacity - n_keep` tokens so a
//!   token never overwrites another of its own chunk. With f16 storage (the default) keys and
//!   values are rounded to half precision; `--kv f32` keeps them exact.

use anyhow::{ensure, Result};
use tract_onnx::prelude::f16;
use tract_onnx::tract_core::tract_data::half::vec::HalfBitsVecExt;

/// Stamp of an empty slot.
pub const EMPTY: u64 = u64::MAX;

/// How keys and values are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// 4 bytes per value (exact).
    F32,
    /// 2 bytes per value: half the memory and half the reads per token, values rounded to
    /// half precision (the default: the golden tokens and the teacher-forced agreement are
    /// those of f32 storage).
    #[default]
    F16,
}

impl KvType {
    /// Every storage type, by the name `--kv` takes.
    pub const ALL: [KvType; 2] = [KvType::F32, KvType::F16];

    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }

    /// The name `--kv` takes.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvType {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<KvType> {
        KvType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown KV cache type {s:?} (f32 or f16)"))
    }
}

/// A change of what the cache holds, reported to the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shift {
    /// Tokens evicted.
    pub dropped: usize,
    /// Tokens held afterwards.
    pub kept: usize,
    /// The kept tokens were re-prefilled at fresh positions (the positions reached the
    /// model's trained context).
    pub repositioned: bool,
}

/// Where one call's new tokens go, and who may see whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Slot of each new token, in order.
    pub slots: Vec<usize>,
    /// Stamp (conversation index) of each new token.
    pub new_stamps: Vec<u64>,
    /// Stamp of every slot once the new tokens are written, [`EMPTY`] if none; (capacity).
    pub stamps: Vec<u64>,
    /// Slots `0..used` may hold tokens; the rest are empty.
    pub used: usize,
    /// Tokens evicted by this step.
    pub dropped: usize,
}

/// Which slot holds which token: the bookkeeping shared by every layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingLayout {
    capacity: usize,
    n_keep: usize,
    /// Token id in each slot; (capacity).
    tokens: Vec<u32>,
    /// Conversation index of the token in each slot, [`EMPTY`] if none; (capacity).
    stamps: Vec<u64>,
    /// Slots used so far (a prefix).
    used: usize,
    /// Next slot to overwrite once full, in `n_keep..capacity`.
    oldest: usize,
    /// Tokens written since the last reset.
    written: u64,
}

impl RingLayout {
    /// An empty ring of `capacity` slots whose first `n_keep` tokens are never evicted.
    pub fn new(capacity: usize, n_keep: usize) -> Result<RingLayout> {
        ensure!(capacity > 0, "the KV cache needs at least one slot");
        ensure!(
            n_keep < capacity,
            "--keep {n_keep} must be smaller than the cache size --ctx {capacity}"
        );
        Ok(RingLayout::clamped(capacity, n_keep))
    }

    /// Like [`RingLayout::new`] with the arguments brought into range: at least one slot,
    /// fewer sinks than slots.
    pub fn clamped(capacity: usize, n_keep: usize) -> RingLayout {
        let capacity = capacity.max(1);
        let n_keep = n_keep.min(capacity - 1);
        RingLayout {
            capacity,
            n_keep,
            tokens: vec![0; capacity],
            stamps: vec![EMPTY; capacity],
            used: 0,
            oldest: n_keep,
            written: 0,
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sink tokens kept forever.
    pub fn n_keep(&self) -> usize {
        self.n_keep
    }

    /// Tokens currently held.
    pub fn len(&self) -> usize {
        self.used
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// The longest chunk [`RingLayout::place`] accepts.
    pub fn max_chunk(&self) -> usize {
        self.capacity - self.n_keep
    }

    /// Forgets every token.
    pub fn reset(&mut self) {
        self.stamps.fill(EMPTY);
        self.used = 0;
        self.oldest = self.n_keep;
        self.written = 0;
    }

    /// Assigns slots to `tokens`, evicting the oldest non-sink tokens once full.
    pub fn place(&mut self, tokens: &[u32]) -> Result<Step> {
        ensure!(
            tokens.len() <= self.max_chunk(),
            "{} tokens in one chunk exceed the {} the cache can take at once",
            tokens.len(),
            self.max_chunk()
        );
        let mut slots = Vec::with_capacity(tokens.len());
        let mut new_stamps = Vec::with_capacity(tokens.len());
        let mut dropped = 0;
        for &token in tokens {
            let slot = if self.used < self.capacity {
                self.used += 1;
                self.used - 1
            } else {
                let slot = self.oldest;
                self.oldest = if slot + 1 == self.capacity {
                    self.n_keep
                } else {
                    slot + 1
                };
                dropped += 1;
                slot
            };
            self.tokens[slot] = token;
            self.stamps[slot] = self.written;
            slots.push(slot);
            new_stamps.push(self.written);
            self.written += 1;
        }
        Ok(Step {
            slots,
            new_stamps,
            stamps: self.stamps.clone(),
            used: self.used,
            dropped,
        })
    }

    /// Assigns slots to `tokens` one at a time: one step per token, each with the stamps as
    /// that token sees them. A sliding-window layer's ring of exactly its window needs this
    /// for a chunk: a later token of the chunk overwrites a key an earlier one still sees,
    /// so each token attends before the next is written. Any number of tokens.
    pub fn place_each(&mut self, tokens: &[u32]) -> Result<Vec<Step>> {
        tokens.iter().map(|&t| self.place(&[t])).collect()
    }

    /// Undoes the bookkeeping of a step whose forward failed: back to `before`.
    pub fn restore(&mut self, before: RingLayout) {
        *self = before;
    }

    /// The held tokens in conversation order (sinks first).
    pub fn kept_tokens(&self) -> Vec<u32> {
        let mut held: Vec<(u64, u32)> = (0..self.used)
            .map(|s| (self.stamps[s], self.tokens[s]))
            .collect();
        held.sort_unstable();
        held.into_iter().map(|(_, t)| t).collect()
    }

    /// Token id held in each slot, `None` when empty; (capacity).
    pub fn slots(&self) -> Vec<Option<u32>> {
        (0..self.capacity)
            .map(|s| (self.stamps[s] != EMPTY).then_some(self.tokens[s]))
            .collect()
    }
}

/// A [`RingLayout`]'s fields, as a session file stores them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutParts {
    /// Slots.
    pub capacity: usize,
    /// Sink tokens.
    pub n_keep: usize,
    /// Token id per slot; (capacity).
    pub tokens: Vec<u32>,
    /// Conversation index per slot, [`EMPTY`] if none; (capacity).
    pub stamps: Vec<u64>,
    /// Slots used (a prefix).
    pub used: usize,
    /// Next slot to overwrite once full.
    pub oldest: usize,
    /// Tokens written since the last reset.
    pub written: u64,
}

impl RingLayout {
    /// The layout's fields.
    pub fn to_parts(&self) -> LayoutParts {
        LayoutParts {
            capacity: self.capacity,
            n_keep: self.n_keep,
            tokens: self.tokens.clone(),
            stamps: self.stamps.clone(),
            used: self.used,
            oldest: self.oldest,
            written: self.written,
        }
    }

    /// A layout from stored fields, checked for consistency (used slots form a prefix with
    /// distinct stamps below `written`; the overwrite cursor is past the sinks).
    pub fn from_parts(p: LayoutParts) -> Result<RingLayout> {
        let mut ring = RingLayout::new(p.capacity, p.n_keep)?;
        ensure!(
            p.tokens.len() == p.capacity && p.stamps.len() == p.capacity,
            "{} tokens and {} stamps for {} slots",
            p.tokens.len(),
            p.stamps.len(),
            p.capacity
        );
        ensure!(
            p.used <= p.capacity && (p.n_keep..p.capacity).contains(&p.oldest),
            "slot counters out of range (used {}, oldest {}, capacity {})",
            p.used,
            p.oldest,
            p.capacity
        );
        let mut seen: Vec<u64> = p.stamps[..p.used].to_vec();
        seen.sort_unstable();
        ensure!(
            seen.windows(2).all(|w| w[0] < w[1])
                && seen.last().is_none_or(|&last| last < p.written)
                && p.stamps[p.used..].iter().all(|&s| s == EMPTY),
            "slot stamps are inconsistent"
        );
        ring.tokens = p.tokens;
        ring.stamps = p.stamps;
        ring.used = p.used;
        ring.oldest = p.oldest;
        ring.written = p.written;
        Ok(ring)
    }
}

/// An element of stored keys and values, read as f32.
pub trait Elem: Copy + Send + Sync {
    /// The value as f32.
    fn get(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
}

/// One key/value head's keys and values, (slot, head_dim) each, as stored.
#[derive(Clone, Copy, Debug)]
pub enum HeadRows<'a> {
    /// f32 storage.
    F32(&'a [f32], &'a [f32]),
    /// f16 storage.
    F16(&'a [f16], &'a [f16]),
}

/// One layer's keys and values, each (kv_head, slot, head_dim), in one storage type.
#[derive(Clone, Debug)]
enum Store {
    F32(Vec<f32>, Vec<f32>),
    F16(Vec<f16>, Vec<f16>),
}

/// One layer's keys and values, (kv_head, slot, head_dim) each; allocated once.
#[derive(Clone, Debug)]
pub struct LayerKv {
    kv_heads: usize,
    capacity: usize,
    head_dim: usize,
    store: Store,
}

impl LayerKv {
    /// Zeroed storage for `capacity` slots.
    pub fn new(kv_heads: usize, capacity: usize, head_dim: usize, ty: KvType) -> LayerKv {
        let n = kv_heads * capacity * head_dim;
        let store = match ty {
            KvType::F32 => Store::F32(vec![0.0; n], vec![0.0; n]),
            // Zeroed bits from the allocator: untouched pages cost no memory until written
            // (`vec![f16::ZERO; n]` would write every element).
            KvType::F16 => Store::F16(
                vec![0u16; n].reinterpret_into(),
                vec![0u16; n].reinterpret_into(),
            ),
        };
        LayerKv {
            kv_heads,
            capacity,
            head_dim,
            store,
        }
    }

    /// Bytes held by the keys and values (constant for the life of the cache).
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::F32(k, v) => (k.capacity() + v.capacity()) * 4,
            Store::F16(k, v) => (k.capacity() + v.capacity()) * 2,
        }
    }

    /// Writes the `head_dim` values of one key and one value into `slot` of `kv_head`.
    pub fn write(&mut self, kv_head: usize, slot: usize, key: &[f32], value: &[f32]) {
        let at = (kv_head * self.capacity + slot) * self.head_dim;
        let range = at..at + self.head_dim;
        match &mut self.store {
            Store::F32(k, v) => {
                k[range.clone()].copy_from_slice(key);
                v[range].copy_from_slice(value);
            }
            Store::F16(k, v) => {
                for (d, &x) in k[range.clone()].iter_mut().zip(key) {
                    *d = f16::from_f32(x);
                }
                for (d, &x) in v[range].iter_mut().zip(value) {
                    *d = f16::from_f32(x);
                }
            }
        }
    }

    /// Key of `slot` in `kv_head`, widened to f32 into `out` (head_dim).
    pub fn key<'a>(&self, kv_head: usize, slot: usize, out: &'a mut [f32]) -> &'a [f32] {
        self.read(kv_head, slot, out, true)
    }

    /// Value of `slot` in `kv_head`, like [`LayerKv::key`].
    pub fn value<'a>(&self, kv_head: usize, slot: usize, out: &'a mut [f32]) -> &'a [f32] {
        self.read(kv_head, slot, out, false)
    }

    fn read<'a>(&self, kv_head: usize, slot: usize, out: &'a mut [f32], key: bool) -> &'a [f32] {
        let at = (kv_head * self.capacity + slot) * self.head_dim;
        match &self.store {
            Store::F32(k, v) => {
                let src = if key { k } else { v };
                out.copy_from_slice(&src[at..at + out.len()]);
            }
            Store::F16(k, v) => {
                let src = if key { k } else { v };
                for (o, h) in out.iter_mut().zip(&src[at..]) {
                    *o = h.to_f32();
                }
            }
        }
        out
    }

    /// Keys and values of `kv_head`, every slot, (slot, head_dim) each.
    pub fn head(&self, kv_head: usize) -> HeadRows<'_> {
        let n = self.capacity * self.head_dim;
        let range = kv_head * n..(kv_head + 1) * n;
        match &self.store {
            Store::F32(k, v) => HeadRows::F32(&k[range.clone()], &v[range]),
            Store::F16(k, v) => HeadRows::F16(&k[range.clone()], &v[range]),
        }
    }

    /// Storage type.
    pub fn kv_type(&self) -> KvType {
        match self.store {
            Store::F32(..) => KvType::F32,
            Store::F16(..) => KvType::F16,
        }
    }

    /// Little-endian bytes of slots `0..used` of every head, keys then values.
    pub fn export(&self, used: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.export_len(used));
        let (cap, hd) = (self.capacity, self.head_dim);
        let ranges = (0..self.kv_heads).map(|h| h * cap * hd..(h * cap + used) * hd);
        match &self.store {
            Store::F32(k, v) => {
                for src in [k, v] {
                    for r in ranges.clone() {
                        src[r].iter().for_each(|x| out.extend(x.to_le_bytes()));
                    }
                }
            }
            Store::F16(k, v) => {
                for src in [k, v] {
                    for r in ranges.clone() {
                        src[r].iter().for_each(|x| out.extend(x.to_le_bytes()));
                    }
                }
            }
        }
        out
    }

    /// Bytes [`LayerKv::export`] writes for `used` slots.
    pub fn export_len(&self, used: usize) -> usize {
        2 * self.kv_heads * used * self.head_dim * self.kv_type().bytes()
    }

    /// Reads back what [`LayerKv::export`] wrote for `used` slots.
    pub fn import(&mut self, used: usize, bytes: &[u8]) -> Result<()> {
        ensure!(
            used <= self.capacity && bytes.len() == self.export_len(used),
            "{} bytes of keys and values for {used} slots, expected {}",
            bytes.len(),
            self.export_len(used)
        );
        let (cap, hd) = (self.capacity, self.head_dim);
        let ranges = (0..self.kv_heads).map(|h| h * cap * hd..(h * cap + used) * hd);
        match &mut self.store {
            Store::F32(k, v) => {
                let mut src = bytes.chunks_exact(4);
                for dst in [k, v] {
                    for r in ranges.clone() {
                        for (d, b) in dst[r].iter_mut().zip(&mut src) {
                            *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        }
                    }
                }
            }
            Store::F16(k, v) => {
                let mut src = bytes.chunks_exact(2);
                for dst in [k, v] {
                    for r in ranges.clone() {
                        for (d, b) in dst[r].iter_mut().zip(&mut src) {
                            *d = f16::from_le_bytes([b[0], b[1]]);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds tokens `first..first+n` one chunk at a time.
    fn feed(ring: &mut RingLayout, tokens: std::ops::Range<u32>) -> Vec<Step> {
        tokens.map(|t| ring.place(&[t]).unwrap()).collect()
    }

    /// A sliding-window ring (4 slots, no sinks) takes a chunk of 7 one token at a time:
    /// each step sees exactly its own token and the 3 before it.
    #[test]
    fn place_each_gives_every_token_exactly_its_window() {
        let mut ring = RingLayout::new(4, 0).unwrap();
        let steps = ring.place_each(&[10, 11, 12, 13, 14, 15, 16]).unwrap();
        for (i, step) in steps.iter().enumerate() {
            let i = i as u64;
            let mut seen: Vec<u64> = step
                .stamps
                .iter()
                .copied()
                .filter(|&s| s != EMPTY)
                .collect();
            seen.sort_unstable();
            let want: Vec<u64> = (i.saturating_sub(3)..=i).collect();
            assert_eq!(seen, want, "token {i}");
            assert_eq!(step.new_stamps, [i]);
        }
        assert_eq!(ring.kept_tokens(), [13, 14, 15, 16]);
    }

    #[test]
    fn fills_in_order_then_wraps_past_the_sinks() {
        let mut ring = RingLayout::new(6, 2).unwrap();
        let steps = feed(&mut ring, 0..6);
        assert_eq!(
            steps.iter().map(|s| s.slots[0]).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5]
        );
        assert!(steps.iter().all(|s| s.dropped == 0));
        assert_eq!(ring.slots(), [0, 1, 2, 3, 4, 5].map(Some));

        // First wrap: 6..10 overwrite slots 2, 3, 4, 5 (the sinks 0 and 1 stay).
        let steps = feed(&mut ring, 6..10);
        assert_eq!(
            steps.iter().map(|s| s.slots[0]).collect::<Vec<_>>(),
            [2, 3, 4, 5]
        );
        assert!(steps.iter().all(|s| s.dropped == 1));
        assert_eq!(ring.slots(), [0, 1, 6, 7, 8, 9].map(Some));
        assert_eq!(ring.kept_tokens(), [0, 1, 6, 7, 8, 9]);

        // Second and third wraps, mid-ring.
        feed(&mut ring, 10..13);
        assert_eq!(ring.slots(), [0, 1, 10, 11, 12, 9].map(Some));
        assert_eq!(ring.kept_tokens(), [0, 1, 9, 10, 11, 12]);
        feed(&mut ring, 13..19);
        assert_eq!(ring.slots(), [0, 1, 18, 15, 16, 17].map(Some));
        assert_eq!(ring.kept_tokens(), [0, 1, 15, 16, 17, 18]);
        assert_eq!(ring.len(), 6);
    }

    #[test]
    fn a_chunk_that_wraps_gets_consecutive_slots_and_stamps() {
        let mut ring = RingLayout::new(5, 1).unwrap();
        ring.place(&[10, 11, 12]).unwrap();
        let step = ring.place(&[13, 14, 15, 16]).unwrap();
        assert_eq!(step.slots, [3, 4, 1, 2]);
        assert_eq!(step.new_stamps, [3, 4, 5, 6]);
        assert_eq!(step.stamps, [0, 5, 6, 3, 4]);
        assert_eq!((step.used, step.dropped), (5, 2));
        assert_eq!(ring.slots(), [10, 15, 16, 13, 14].map(Some));
        assert_eq!(ring.kept_tokens(), [10, 13, 14, 15, 16]);
    }

    #[test]
    fn no_sinks_is_a_plain_sliding_window() {
        let mut ring = RingLayout::new(3, 0).unwrap();
        feed(&mut ring, 0..8);
        assert_eq!(ring.slots(), [6, 7, 5].map(Some));
        assert_eq!(ring.kept_tokens(), [5, 6, 7]);
    }

    #[test]
    fn empty_slots_have_no_token_and_reset_forgets() {
        let mut ring = RingLayout::new(4, 1).unwrap();
        let step = ring.place(&[7, 8]).unwrap();
        assert_eq!(step.stamps, [0, 1, EMPTY, EMPTY]);
        assert_eq!(step.used, 2);
        assert_eq!(ring.slots(), [Some(7), Some(8), None, None]);
        ring.reset();
        assert!(ring.is_empty());
        assert_eq!(ring.slots(), [None; 4]);
        assert_eq!(ring.place(&[9]).unwrap().slots, [0]);
    }

    #[test]
    fn chunks_longer_than_the_free_window_and_bad_sizes_are_refused() {
        let mut ring = RingLayout::new(4, 1).unwrap();
        let err = ring.place(&[1, 2, 3, 4]).unwrap_err().to_string();
        assert_eq!(
            err,
            "4 tokens in one chunk exceed the 3 the cache can take at once"
        );
        assert!(RingLayout::new(4, 4).is_err());
        assert!(RingLayout::new(0, 0).is_err());
    }

    #[test]
    fn layer_storage_never_grows_and_f16_rounds() {
        let mut kv = LayerKv::new(2, 3, 4, KvType::F16);
        let bytes = kv.bytes();
        assert_eq!(bytes, 2 * 2 * 3 * 4 * 2);
        kv.write(1, 2, &[1.0, 2.0, 3.0, 1.0 / 3.0], &[4.0; 4]);
        let mut tmp = [0f32; 4];
        assert_eq!(kv.key(1, 2, &mut tmp), [1.0, 2.0, 3.0, 0.333_251_95]);
        assert_eq!(kv.value(1, 2, &mut tmp), [4.0; 4]);
        assert_eq!(kv.key(0, 2, &mut tmp), [0.0; 4]);
        assert_eq!(kv.bytes(), bytes);

        let mut kv = LayerKv::new(1, 2, 2, KvType::F32);
        kv.write(0, 1, &[0.1, 0.2], &[0.3, 0.4]);
        assert_eq!(kv.key(0, 1, &mut [0.0; 2]), [0.1, 0.2]);
        assert_eq!(kv.value(0, 1, &mut [0.0; 2]), [0.3, 0.4]);
    }
}
