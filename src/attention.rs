//! Attention over the ring-buffer KV cache, as a tract op, and the rewrite that puts it in
//! place of the graph's own `past_key_values` → `Concat` → attention → `present` subgraph.
//!
//! [`RingAttention`] takes `(q, k_new, v_new)` of one layer, writes the new keys and values in
//! place at the slots [`crate::kv_cache::RingLayout`] assigned them, and attends every query
//! over the valid, causally visible slots (grouped-query heads share their key/value head).
//! The slots, stamps and storage live in the op's per-conversation state, which
//! [`crate::state::State`] reaches through the plan's op states: nothing is concatenated,
//! nothing proportional to the context is copied.
//!
//! - `op.rs`: the op and its state;
//! - `fuse.rs`: [`fuse`], the graph rewrite;
//! - `attend.rs`: the arithmetic of prefill and decode, split over the process's thread pool;
//! - `kernels.rs`: the row kernels (scalar, AVX2, NEON), chosen by the one
//!   [`crate::quant::Kernel`] the model was loaded with.

mod attend;
mod fuse;
mod kernels;
mod op;
#[cfg(test)]
mod tests;

pub use fuse::{fuse, Fused};
pub use op::{RingAttention, RingState};
