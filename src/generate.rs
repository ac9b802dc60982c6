//! The generation loop: prefill the prompt in one pass, then forward, sample and stream one
//! token at a time, reporting each piece of text through a callback that says go on or stop.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::constraint::Matcher;
use crate::kv_cache::Shift;
use crate::model::State;
use crate::sampler::{Sampler, SamplerConfig};
use crate::stop::StopMatcher;
use crate::tokenizer::{sanitize, TokenOutputStream, Tokenizer};

/// What one generation may do.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Cap on generated tokens.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampler: SamplerConfig,
    /// Stop strings: generation ends before the first of them, which is never streamed.
    pub stop: Vec<String>,
    /// End-of-sequence ids (generation ends on them unless `ignore_eos`).
    pub eos_ids: Vec<u32>,
    /// Generate through end-of-sequence tokens (tests, benchmarks).
    pub ignore_eos: bool,
}

/// The callback's answer after each streamed token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep generating.
    Continue,
    /// Stop now (the caller cancelled).
    Stop,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_tokens` reached.
    Length,
    /// A stop string matched.
    Stop,
    /// The callback asked to stop.
    Cancelled,
    /// The output completes its format (JSON schema, grammar) and nothing may follow.
    Grammar,
}

impl StopReason {
    /// The protocol / JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::Length => "length",
            StopReason::Stop => "stop",
            StopReason::Cancelled => "cancelled",
            StopReason::Grammar => "grammar",
        }
    }
}

/// Counts and timings of one generation.
#[derive(Clone, Debug)]
pub struct Generation {
    /// Why it ended.
    pub reason: StopReason,
    /// Prompt tokens prefilled.
    pub prompt_tokens: usize,
    /// Tokens sampled (including a final EOS).
    pub generated_tokens: usize,
    /// Ids sampled, in order.
    pub ids: Vec<u32>,
    /// Time to prefill the prompt and produce the first logits.
    pub prefill: Duration,
    /// Time spent on the forward passes after the first token.
    pub decode: Duration,
}

impl Generation {
    /// Decode speed over the tokens after the first (0 when fewer than two).
    pub fn decode_tok_s(&self) -> f64 {
        let n = self.generated_tokens.saturating_sub(1);
        let s = self.decode.as_secs_f64();
        if n == 0 || s <= 0.0 {
            0.0
        } else {
            n as f64 / s
        }
    }

    /// Prefill speed in prompt tokens per second.
    pub fn prefill_tok_s(&self) -> f64 {
        let s = self.prefill.as_secs_f64();
        if s <= 0.0 {
            0.0
        } else {
            self.prompt_tokens as f64 / s
        }
    }
}

/// What [`generate_events`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A sampled token and the text that became safe to show (possibly empty: a partial
    /// UTF-8 character or a possible stop-string prefix).
    Token(u32, &'a str),
    /// Text held back until the end.
    Tail(&'a str),
    /// The KV cache dropped or re-positioned tokens.
    Shift(Shift),
}

/// Generates from `prompt` (already tokenized) on top of whatever `state` holds.
///
/// `on_token(Some(id), text)` is called once per sampled token with the text that became safe
/// to show, and `on_token(None, text)` once at the end for text that was held back until then.
/// Cache shifts are not reported; see [`generate_events`].
pub fn generate(
    state: &mut State,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(Option<u32>, &str) -> Flow,
) -> Result<Generation> {
    generate_events(state, tokenizer, prompt, opts, |event| match event {
        Event::Token(id, text) => on_token(Some(id), text),
        Event::Tail(text) => on_token(None, text),
        Event::Shift(_) => Flow::Continue,
    })
}

/// [`generate`], also reporting every KV cache shift as it happens.
pub fn generate_events(
    state: &mut State,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_event: impl FnMut(Event) -> Flow,
) -> Result<Generation> {
    generate_constrained(state, tokenizer, prompt, opts, None, on_event)
}

/// [`generate_events`] whose output follows a format when `constraint` is given: each
/// token is drawn from those the matcher allows, and the generation ends with
/// [`StopReason::Grammar`] once the output is complete and nothing may follow. Under a
/// constraint an end-of-sequence token (allowed only where the output is complete) always
/// ends the generation, `ignore_eos` or not.
pub fn generate_constrained(
    state: &mut State,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut constraint: Option<&mut Matcher>,
    mut on_event: impl FnMut(Event) -> Flow,
) -> Result<Generation> {
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let mut sampler = Sampler::new(opts.sampler.clone());
    let mut stream = TokenOutputStream::new();
    let mut stops = StopMatcher::new(&opts.stop);
    let mut history: Vec<u32> = prompt.to_vec();
    let mut ids = vec![];

    let t0 = Instant::now();
    let mut logits = state.forward(prompt)?;
    let prefill = t0.elapsed();
    let mut cancelled = report_shifts(state, &mut on_event);
    let t1 = Instant::now();
    let mut reason = StopReason::Length;
    while !cancelled && ids.len() < opts.max_tokens {
        let id = match constraint.as_deref_mut() {
            None => sampler.sample(&logits, &history),
            Some(matcher) => {
                let Some(allowed) = matcher.allowed()? else {
                    reason = StopReason::Grammar;
                    break;
                };
                let Some(id) = sampler.sample_masked(&logits, &history, allowed) else {
                    bail!("every token the format allows has a NaN logit");
                };
                matcher.accept(id)?;
                id
            }
        };
        ids.push(id);
        history.push(id);
        let ends = !opts.ignore_eos || constraint.is_some();
        if ends && opts.eos_ids.contains(&id) {
            reason = StopReason::Eos;
            break;
        }
        let piece = stream.push(tokenizer, id)?.unwrap_or_default();
        let outcome = stops.push(&sanitize(&piece));
        if on_event(Event::Token(id, &outcome.text)) == Flow::Stop {
            reason = StopReason::Cancelled;
            break;
        }
        if outcome.stopped() {
            reason = StopReason::Stop;
            break;
        }
        if constraint.as_deref().is_some_and(Matcher::is_complete) {
            reason = StopReason::Grammar;
            break;
        }
        if ids.len() == opts.max_tokens {
            break;
        }
        logits = state.forward(&[id])?;
        cancelled = report_shifts(state, &mut on_event);
    }
    if cancelled {
        reason = StopReason::Cancelled;
    }
    if reason != StopReason::Stop && reason != StopReason::Cancelled {
        // Release what was held back (an incomplete character or a partial stop string).
        let mut tail = stream
            .flush(tokenizer)?
            .map(|t| sanitize(&t).into_owned())
            .unwrap_or_default();
        let outcome = stops.push(&tail);
        let stopped = outcome.stopped();
        tail = outcome.text;
        if !stopped {
            tail.push_str(&stops.finish());
        } else {
            reason = StopReason::Stop;
        }
        if !tail.is_empty() {
            on_event(Event::Tail(&tail));
        }
    }
    let decode = t1.elapsed();
    Ok(Generation {
        reason,
        prompt_tokens: prompt.len(),
        generated_tokens: ids.len(),
        ids,
        prefill,
        decode,
    })
}

/// Passes the state's new shifts on; true when the callback asked to stop.
fn report_shifts(state: &mut State, on_event: &mut impl FnMut(Event) -> Flow) -> bool {
    let mut stop = false;
    for shift in state.take_shifts() {
        stop |= on_event(Event::Shift(shift)) == Flow::Stop;
    }
    stop
}
