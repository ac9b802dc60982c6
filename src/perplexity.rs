//! `edgelm perplexity`: how well a model predicts a text, computed as llama.cpp's
//! `llama-perplexity` does, so a converted or quantized bundle can be checked against
//! llama.cpp's figure for the same weights.
//!
//! The method (llama.cpp's `perplexity()` without `--ppl-stride`): the text, one trailing
//! newline dropped as llama.cpp's `-f` does, is tokenized whole with the tokenizer's
//! special tokens (so it starts with BOS where the tokenizer adds one) and cut into
//! `tokens / ctx` chunks of `ctx` tokens; the rest is not scored. Each chunk runs from an
//! empty cache, its first token replaced by BOS where the tokenizer adds one. The logits
//! at positions `ctx/2 ..= ctx-2` score the token after each, so every scored token has at
//! least `ctx/2` tokens of context and each chunk scores `ctx - 1 - ctx/2` of them. The
//! perplexity is `exp(mean negative log-likelihood)`; its ± is llama.cpp's: the standard
//! error of the mean NLL (sample variance over `n - 1`) times the perplexity.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use crate::engine::Engine;
use crate::kv_cache::KvType;
use crate::model::{CacheOptions, LoadOptions, Model, DEFAULT_KEEP};
use crate::tokenizer::Tokenizer;

/// llama-perplexity's default `--ctx-size`.
pub const DEFAULT_CTX: usize = 512;

/// Smallest chunk: half of it is context, and at least one token is scored.
const MIN_CTX: usize = 4;

/// Scored positions fed per forward pass: their logits, (rows, vocab), are the memory
/// that grows with it (12 MB at 49 152 tokens), and larger batches gain little speed.
const SCORE_ROWS: usize = 64;

/// What `edgelm perplexity` does.
#[derive(Clone, Debug)]
pub struct PerplexityOptions {
    /// The bundle directory.
    pub model: PathBuf,
    /// How to load it.
    pub load: LoadOptions,
    /// The text file.
    pub file: PathBuf,
    /// Tokens per chunk.
    pub ctx: usize,
}

/// The estimate and what it was computed over.
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    /// `exp(mean NLL)`.
    pub ppl: f64,
    /// Standard error of `ppl` (llama.cpp's ±).
    pub ppl_stderr: f64,
    /// Mean negative log-likelihood per scored token, in nats.
    pub mean_nll: f64,
    /// Tokens in the whole text.
    pub tokens: usize,
    /// Chunks evaluated.
    pub chunks: usize,
    /// Tokens scored.
    pub scored: usize,
}

/// Sent after each chunk.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// Chunks done, from 1.
    pub done: usize,
    /// Chunks in all.
    pub chunks: usize,
    /// Perplexity over the chunks done.
    pub ppl: f64,
}

/// Running sums of the negative log-likelihoods.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NllSums {
    sum: f64,
    sum_sq: f64,
    count: usize,
}

impl NllSums {
    /// Adds one scored token's negative log-likelihood.
    pub fn push(&mut self, nll: f64) {
        self.sum += nll;
        self.sum_sq += nll * nll;
        self.count += 1;
    }

    /// Mean NLL (0 before any token).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }

    /// `exp(mean NLL)`.
    pub fn ppl(&self) -> f64 {
        self.mean().exp()
    }

    /// llama.cpp's ±: `sqrt((E[x²] - E[x]²) / (n - 1)) · ppl`; 0 when there is no spread
    /// to measure (fewer than two tokens, or a variance rounded to 0 or below).
    pub fn ppl_stderr(&self) -> f64 {
        if self.count < 2 {
            return 0.0;
        }
        let mean = self.mean();
        let var = self.sum_sq / self.count as f64 - mean * mean;
        if var <= 0.0 {
            return 0.0;
        }
        (var / (self.count - 1) as f64).sqrt() * self.ppl()
    }
}

/// Negative log-likelihood of `target` under one row of logits: `logsumexp(row) -
/// row[target]`, summed in f64 as llama.cpp does.
pub fn nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&l| f64::from(l - max).exp()).sum();
    let at = row
        .get(target as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    f64::from(max) + sum.ln() - f64::from(at)
}

/// The id the tokenizer's post-processor puts before a text (BOS), if any. Refuses a
/// tokenizer that also appends one (EOS), as llama.cpp does.
pub fn added_bos(tokenizer: &Tokenizer) -> Result<Option<u32>> {
    let plain = tokenizer.encode("a", false)?;
    let special = tokenizer.encode("a", true)?;
    let Some(at) = special.windows(plain.len()).position(|w| w == plain) else {
        bail!("the tokenizer's special tokens change the text's own tokens");
    };
    if at + plain.len() != special.len() {
        bail!("the tokenizer appends a token after the text (add_eos), which perplexity does not expect");
    }
    Ok(special[..at].last().copied())
}

/// The perplexity of `text` (see the module doc), calling `on_chunk` after each chunk.
pub fn perplexity(
    model: &Model,
    tokenizer: &Tokenizer,
    text: &str,
    ctx: usize,
    on_chunk: impl FnMut(Progress),
) -> Result<Perplexity> {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let bos = added_bos(tokenizer)?;
    let tokens = tokenizer.encode(text, true)?;
    perplexity_of_tokens(model, &tokens, bos, ctx, on_chunk)
}

/// [`perplexity`] of an already tokenized text; `bos` replaces each chunk's first token.
pub fn perplexity_of_tokens(
    model: &Model,
    tokens: &[u32],
    bos: Option<u32>,
    ctx: usize,
    mut on_chunk: impl FnMut(Progress),
) -> Result<Perplexity> {
    ensure!(ctx >= MIN_CTX, "--ctx must be at least {MIN_CTX}");
    ensure!(
        tokens.len() >= 2 * ctx,
        "the text has {} tokens; --ctx {ctx} needs at least {} (two chunks)",
        tokens.len(),
        2 * ctx
    );
    let mut state = model.new_state_with(CacheOptions {
        ctx,
        kv: KvType::F32,
        keep: DEFAULT_KEEP.min(ctx / 2),
    })?;
    let vocab = model.config().vocab_size;
    let chunks = tokens.len() / ctx;
    let first = ctx / 2;
    let mut sums = NllSums::default();
    let mut chunk = vec![0u32; ctx]; // (ctx,) the chunk as fed
    for c in 0..chunks {
        chunk.copy_from_slice(&tokens[c * ctx..(c + 1) * ctx]);
        if let Some(bos) = bos {
            chunk[0] = bos;
        }
        state.reset();
        state.forward(&chunk[..first])?;
        // Positions first..ctx-1 in batches; the row at position p scores chunk[p + 1].
        for start in (first..ctx).step_by(SCORE_ROWS) {
            let end = (start + SCORE_ROWS).min(ctx);
            let logits = state.forward_all(&chunk[start..end])?; // (end - start, vocab)
            for (r, row) in logits.chunks_exact(vocab).enumerate() {
                if let Some(&next) = chunk.get(start + r + 1) {
                    sums.push(nll(row, next));
                }
            }
        }
        on_chunk(Progress {
            done: c + 1,
            chunks,
            ppl: sums.ppl(),
        });
    }
    Ok(Perplexity {
        ppl: sums.ppl(),
        ppl_stderr: sums.ppl_stderr(),
        mean_nll: sums.mean(),
        tokens: tokens.len(),
        chunks,
        scored: sums.count,
    })
}

/// Runs `edgelm perplexity`: progress on stderr (a bar on a terminal, a line per chunk
/// otherwise), the estimate on `out`.
pub fn run(opts: &PerplexityOptions, out: &mut dyn Write) -> Result<()> {
    let text = read_text(&opts.file)?;
    let engine = Engine::load(&opts.model, &opts.load)?;
    let t0 = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let result = perplexity(&engine.model, &engine.tokenizer, &text, opts.ctx, |p| {
        let elapsed = t0.elapsed().as_secs_f64();
        let eta = elapsed / p.done as f64 * (p.chunks - p.done) as f64;
        let mut err = std::io::stderr().lock();
        // Progress is best effort: a closed stderr must not stop the computation.
        let _ = if terminal {
            let width = 30;
            let filled = width * p.done / p.chunks;
            write!(
                err,
                "\r[{}{}] {}/{} chunks, PPL {:.4}, ETA {:.0} s ",
                "#".repeat(filled),
                "-".repeat(width - filled),
                p.done,
                p.chunks,
                p.ppl,
                eta
            )
            .and_then(|_| {
                if p.done == p.chunks {
                    writeln!(err)
                } else {
                    Ok(())
                }
            })
        } else {
            writeln!(
                err,
                "perplexity: chunk {}/{}, PPL {:.4}, {:.1} s",
                p.done, p.chunks, p.ppl, elapsed
            )
        };
    })?;
    writeln!(
        out,
        "{} tokens, {} chunks of {}, {} tokens scored, {:.1} s",
        result.tokens,
        result.chunks,
        opts.ctx,
        result.scored,
        t0.elapsed().as_secs_f64()
    )
    .and_then(|_| {
        writeln!(
            out,
            "Final estimate: PPL = {:.4} +/- {:.5}",
            result.ppl, result.ppl_stderr
        )
    })
    .context("writing to stdout")
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading \"{}\"", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "\"{}\" is not UTF-8 text (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_is_log_softmax_of_the_target() {
        // Uniform over 4: -ln(1/4).
        assert!((nll(&[0.0; 4], 2) - 4f64.ln()).abs() < 1e-12);
        // p = e^2 / (e^2 + 1 + 1).
        let e2 = 2f64.exp();
        let want = -(e2 / (e2 + 2.0)).ln();
        assert!((nll(&[2.0, 0.0, 0.0], 0) - want).abs() < 1e-12);
        // Large logits do not overflow.
        assert!((nll(&[1000.0, 1000.0], 1) - 2f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn sums_follow_llama_cpp_formulas() {
        let mut s = NllSums::default();
        for x in [1.0, 2.0, 3.0, 6.0] {
            s.push(x);
        }
        // mean 3, E[x²] = 50/4 = 12.5, variance 12.5 - 9 = 3.5, / (n-1) = 3.5/3.
        assert_eq!(s.mean(), 3.0);
        assert!((s.ppl() - 3f64.exp()).abs() < 1e-9);
        let want = (3.5f64 / 3.0).sqrt() * 3f64.exp();
        assert!((s.ppl_stderr() - want).abs() < 1e-9, "{}", s.ppl_stderr());
        let mut one = NllSums::default();
        one.push(1.0);
        assert_eq!(one.ppl_stderr(), 0.0);
    }
}
