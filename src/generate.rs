//! The generation loop: prefill, forward, sample, stream.
