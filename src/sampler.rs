//! Logits in, token out: a pure, seeded sampler.
