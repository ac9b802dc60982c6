//! A session's generation settings: what `SET` changes and how `GET` shows it.

use crate::protocol::{self, Setting, StreamMode};
use crate::sampler::SamplerConfig;

/// Per-session generation settings (`SET`/`GET`).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Sampling.
    pub sampler: SamplerConfig,
    /// Cap on generated tokens per request.
    pub max_tokens: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Output mode.
    pub stream: StreamMode,
    /// Gather streamed text for this long per `TOK` line (0 = a line per token).
    pub coalesce_ms: u64,
    /// Generate through end-of-sequence tokens.
    pub ignore_eos: bool,
}

impl Settings {
    /// Applies `SET`; returns the key's name.
    pub(super) fn apply(&mut self, setting: Setting) -> &'static str {
        let s = self;
        match setting {
            Setting::Temp(v) => {
                s.sampler.temperature = v;
                "temp"
            }
            Setting::TopK(v) => {
                s.sampler.top_k = v;
                "top_k"
            }
            Setting::TopP(v) => {
                s.sampler.top_p = v;
                "top_p"
            }
            Setting::MinP(v) => {
                s.sampler.min_p = v;
                "min_p"
            }
            Setting::RepeatPenalty(v) => {
                s.sampler.repeat_penalty = v;
                "repeat_penalty"
            }
            Setting::Seed(v) => {
                s.sampler.seed = v;
                "seed"
            }
            Setting::MaxTokens(v) => {
                s.max_tokens = v;
                "max_tokens"
            }
            Setting::Stop(list) => {
                s.stop = list;
                "stop"
            }
            Setting::Stream(m) => {
                s.stream = m;
                "stream"
            }
            Setting::CoalesceMs(ms) => {
                s.coalesce_ms = ms;
                "coalesce_ms"
            }
            Setting::IgnoreEos(b) => {
                s.ignore_eos = b;
                "ignore_eos"
            }
        }
    }

    /// `key=value` as `GET` shows it.
    pub(super) fn show(&self, key: &str) -> String {
        let s = self;
        let value = match key {
            "temp" => s.sampler.temperature.to_string(),
            "top_k" => s.sampler.top_k.to_string(),
            "top_p" => s.sampler.top_p.to_string(),
            "min_p" => s.sampler.min_p.to_string(),
            "repeat_penalty" => s.sampler.repeat_penalty.to_string(),
            "seed" => s.sampler.seed.to_string(),
            "max_tokens" => s.max_tokens.to_string(),
            "stop" => {
                let mut out = String::new();
                let _ = protocol::write_stop_list(&mut out, &s.stop);
                out
            }
            "stream" => s.stream.as_str().to_string(),
            "coalesce_ms" => s.coalesce_ms.to_string(),
            "ignore_eos" => if s.ignore_eos { "on" } else { "off" }.to_string(),
            _ => "?".to_string(),
        };
        format!("{key}={value}")
    }
}
