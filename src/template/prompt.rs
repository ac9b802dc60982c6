//! `edgelm template`: the prompt a model's chat template makes of one user turn, and the
//! template of a model (a bundle or a GGUF) or of a `--chat-template-file`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{special_tokens_of, ChatTemplate, Message, SpecialTokens};
use crate::convert::gguf::Gguf;
use crate::convert::vocab::GgufVocab;

/// Options of `edgelm template`.
#[derive(Debug, Clone)]
pub struct TemplateOptions {
    /// A bundle directory or a `.gguf` file: its chat template and special tokens.
    pub model: PathBuf,
    /// A Jinja template file to use instead of the model's (its special tokens still apply).
    pub template_file: Option<PathBuf>,
    /// A system turn before the user's.
    pub system: Option<String>,
    /// The user's turn.
    pub text: String,
    /// The time `strftime_now` reads (Unix seconds, UTC); `None` is the clock.
    pub now: Option<i64>,
}

/// The chat template for `model` (a bundle directory or a `.gguf` file), or the one in
/// `template_file` rendered with the model's special tokens.
pub fn load_template(model: &Path, template_file: Option<&Path>) -> Result<ChatTemplate> {
    let (source, specials) = model_template(model)?;
    if let Some(file) = template_file {
        return ChatTemplate::from_file(file, specials);
    }
    match source {
        Some(Source::Compiled(t)) => Ok(*t),
        Some(Source::Text(text)) => ChatTemplate::with_specials(&text, specials)
            .with_context(|| format!("chat template of \"{}\"", model.display())),
        None => bail!(
            "\"{}\" has no chat template (give one with --chat-template-file)",
            model.display()
        ),
    }
}

/// A model's own template, compiled already (bundle) or as text (GGUF).
enum Source {
    Compiled(Box<ChatTemplate>),
    Text(String),
}

fn model_template(model: &Path) -> Result<(Option<Source>, SpecialTokens)> {
    if model.is_dir() {
        let config = model.join("tokenizer_config.json");
        if !config.is_file() {
            bail!(
                "model bundle \"{}\" has no tokenizer_config.json",
                model.display()
            );
        }
        let specials = special_tokens_of(&config)?;
        let template = ChatTemplate::from_tokenizer_config(&config)?;
        return Ok((template.map(|t| Source::Compiled(Box::new(t))), specials));
    }
    if !model.exists() {
        bail!("model \"{}\" does not exist", model.display());
    }
    let gguf = Gguf::open(model)?;
    let vocab = GgufVocab::from_gguf(&gguf)
        .with_context(|| format!("reading tokenizer of \"{}\"", model.display()))?;
    let mut specials = SpecialTokens::default();
    let ids = [
        ("bos_token", vocab.bos_id),
        ("eos_token", vocab.eos_id),
        ("unk_token", vocab.unk_id),
        ("pad_token", vocab.pad_id),
    ];
    for (key, id) in ids {
        if let Some(token) = id.and_then(|id| vocab.tokens.get(id as usize)) {
            specials.set(key, token);
        }
    }
    Ok((vocab.chat_template.map(Source::Text), specials))
}

/// The rendered prompt: the optional system turn, the user turn, the generation prompt.
pub fn render_prompt(opts: &TemplateOptions) -> Result<String> {
    let mut template = load_template(&opts.model, opts.template_file.as_deref())?;
    if let Some(now) = opts.now {
        template = template.with_fixed_time(now);
    }
    let mut messages = Vec::new();
    if let Some(system) = &opts.system {
        messages.push(Message::new("system", system.as_str()));
    }
    messages.push(Message::new("user", opts.text.as_str()));
    template.render(&messages, true)
}

/// Runs `edgelm template`: the prompt exactly as rendered, nothing added.
pub fn template(opts: &TemplateOptions, out: &mut dyn Write) -> Result<()> {
    let prompt = render_prompt(opts)?;
    out.write_all(prompt.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// Parses `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SS` (UTC) into Unix seconds.
pub fn parse_time(s: &str) -> Result<i64> {
    let bad = || anyhow::anyhow!("{s:?} is not a date (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS)");
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let num = |part: &str, lo: i64, hi: i64| -> Result<i64> {
        let n: i64 = part.parse().map_err(|_| bad())?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) || n < lo || n > hi {
            return Err(bad());
        }
        Ok(n)
    };
    let d: Vec<&str> = date.split('-').collect();
    let [y, m, day] = d.as_slice() else {
        return Err(bad());
    };
    let (y, m) = (num(y, 1, 9999)?, num(m, 1, 12)?);
    let day = num(day, 1, super::strftime::days_in_month(y, m))?;
    let secs = match time {
        None => 0,
        Some(t) => {
            let p: Vec<&str> = t.split(':').collect();
            let [h, min, sec] = p.as_slice() else {
                return Err(bad());
            };
            num(h, 0, 23)? * 3600 + num(min, 0, 59)? * 60 + num(sec, 0, 59)?
        }
    };
    Ok(super::strftime::days_from_civil(y, m, day) * 86_400 + secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_utc() {
        assert_eq!(parse_time("1970-01-01").unwrap(), 0);
        assert_eq!(parse_time("2023-11-14T22:13:20").unwrap(), 1_700_000_000);
        assert_eq!(parse_time("2000-02-29").unwrap(), 951_782_400);
        for bad in [
            "2023-02-29",
            "2023-13-01",
            "2023-1-1x",
            "today",
            "2023-11-14T25:00:00",
            "",
        ] {
            let err = parse_time(bad).unwrap_err().to_string();
            assert!(err.contains("is not a date"), "{bad}: {err}");
        }
    }
}
