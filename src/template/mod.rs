//! Chat templates, rendered with minijinja as transformers renders them with jinja2.
//!
//! Rendering mimics `transformers`' `apply_chat_template` so that prompts match the ones
//! the model was trained on byte for byte: `trim_blocks` and `lstrip_blocks` on, the final
//! newline of the template dropped, loop controls (`break`/`continue`), Python string and
//! dict methods (`.strip()`, `.startswith()`, `.items()` …) through minijinja-contrib's
//! pycompat, dicts in insertion order, and the helpers transformers adds:
//! `raise_exception(msg)`, `strftime_now(fmt)` ([`strftime`]) and a `tojson` filter that
//! writes what Python's `json.dumps` writes ([`json`]). Values print as Python's `str()`
//! prints them, and `round`, `string` and `is sequence` behave as in Python ([`python`]).
//! Like transformers, rendering passes `tools` and `documents` as none and only the special
//! tokens the model has. The `{% generation %}` block tag (used by training code to mark
//! assistant output) renders its body unchanged.
//!
//! Known differences from jinja2, none used by the templates tested: no `%` string
//! formatting, no tuples (`dictsort`, `items` and `(a, b)` print as lists), no `batch`,
//! `wordcount` or `sum(start=…)`, and error messages in minijinja's words (a
//! `raise_exception` message is kept as it is).

mod json;
pub mod prompt;
mod python;
mod strftime;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

use json::tojson;
use strftime::strftime;

const NAME: &str = "chat_template";

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates may accept others).
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl Message {
    /// A message with this role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The special tokens a template may refer to (`bos_token`, `eos_token`, `unk_token`,
/// `pad_token`); one the model does not have is left undefined, as transformers leaves it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens(BTreeMap<&'static str, String>);

impl SpecialTokens {
    /// Beginning- and end-of-sequence tokens.
    pub fn new(bos_token: Option<&str>, eos_token: Option<&str>) -> SpecialTokens {
        let mut map = BTreeMap::new();
        for (key, token) in [("bos_token", bos_token), ("eos_token", eos_token)] {
            if let Some(t) = token {
                map.insert(key, t.to_string());
            }
        }
        SpecialTokens(map)
    }

    /// Sets `key` (`bos_token`, `eos_token`, `unk_token` or `pad_token`).
    pub fn set(&mut self, key: &'static str, token: &str) {
        self.0.insert(key, token.to_string());
    }

    /// The special tokens named in a Hugging Face `tokenizer_config.json` (parsed).
    fn from_config(config: &serde_json::Value) -> anyhow::Result<SpecialTokens> {
        let mut map = BTreeMap::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(token) = special_token(config.get(key)).with_context(|| key.to_string())? {
                map.insert(key, token);
            }
        }
        Ok(SpecialTokens(map))
    }
}

/// A compiled chat template plus the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    specials: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("specials", &self.specials)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are exposed to it as variables.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> anyhow::Result<ChatTemplate> {
        Self::compile(source, SpecialTokens::new(Some(bos_token), Some(eos_token)))
    }

    /// Compiles `source` with these special tokens.
    pub fn with_specials(source: &str, specials: SpecialTokens) -> anyhow::Result<ChatTemplate> {
        Self::compile(source, specials)
    }

    /// Reads a template file (`--chat-template-file`), to render with `specials` (the
    /// model's); errors name the file.
    pub fn from_file(path: &Path, specials: SpecialTokens) -> anyhow::Result<ChatTemplate> {
        let shown = path.display().to_string();
        let source = std::fs::read_to_string(path)
            .with_context(|| format!("reading chat template {shown:?}"))?;
        Self::compile(&source, specials).with_context(|| format!("chat template {shown:?}"))
    }

    /// Reads the chat template of a Hugging Face `tokenizer_config.json`: the
    /// `chat_template` string, or the `default` entry of its list-of-named-templates form,
    /// or else a `chat_template.jinja` next to it. `Ok(None)` if there is none.
    pub fn from_tokenizer_config(path: &Path) -> anyhow::Result<Option<ChatTemplate>> {
        let shown = path.display().to_string();
        let config = read_tokenizer_config(path)?;
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => {
                let sibling = path.with_file_name("chat_template.jinja");
                match std::fs::read_to_string(&sibling) {
                    Ok(s) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => {
                        return Err(e).with_context(|| format!("reading {:?}", sibling.display()))
                    }
                }
            }
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => {
                pick_default(named).with_context(|| format!("chat_template in {shown:?}"))?
            }
            Some(other) => bail!(
                "chat_template in {shown:?} is neither a string nor a list of named \
                 templates: {other}"
            ),
        };
        let specials =
            SpecialTokens::from_config(&config).with_context(|| format!("in {shown:?}"))?;
        Self::compile(&source, specials)
            .with_context(|| format!("chat template in {shown:?}"))
            .map(Some)
    }

    fn compile(source: &str, specials: SpecialTokens) -> anyhow::Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(python::unknown_method);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_formatter(python::formatter);
        env.add_filter("string", python::string);
        env.add_filter("round", python::round);
        env.add_test("sequence", python::is_sequence);
        env.add_template_owned(NAME, rewrite_generation_tags(source).into_owned())
            .map_err(|e| anyhow!("invalid chat template: {}", one_line(&e)))?;
        Ok(ChatTemplate { env, specials })
    }

    /// Makes `strftime_now` read this fixed time (Unix seconds, UTC) instead of the clock,
    /// for reproducible prompts from date-dependent templates (Llama 3's).
    pub fn with_fixed_time(mut self, unix_secs: i64) -> ChatTemplate {
        self.env
            .add_function("strftime_now", move |format: String| {
                strftime(&format, unix_secs)
            });
        self
    }

    /// The special tokens the template is rendered with.
    pub fn specials(&self) -> &SpecialTokens {
        &self.specials
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends where the
    /// assistant's reply should begin. A template that raises (`raise_exception`) gives its
    /// message as a one-line error.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> anyhow::Result<String> {
        let mut ctx: BTreeMap<&str, Value> = self
            .specials
            .0
            .iter()
            .map(|(k, v)| (*k, Value::from(v.as_str())))
            .collect();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        self.render_with(Value::from_serialize(&ctx))
    }

    /// Renders with an arbitrary context.
    fn render_with(&self, ctx: Value) -> anyhow::Result<String> {
        let template = self.env.get_template(NAME)?;
        template
            .render(ctx)
            .map_err(|e| anyhow!("rendering chat template: {}", one_line(&e)))
    }
}

/// A Hugging Face `tokenizer_config.json`, parsed; errors name the file.
pub fn read_tokenizer_config(path: &Path) -> anyhow::Result<serde_json::Value> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {shown:?}"))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {shown:?}"))
}

/// The special tokens of a Hugging Face `tokenizer_config.json`.
pub fn special_tokens_of(path: &Path) -> anyhow::Result<SpecialTokens> {
    let config = read_tokenizer_config(path)?;
    SpecialTokens::from_config(&config).with_context(|| format!("in {:?}", path.display()))
}

/// A minijinja error on one line: its kind and message, and where in the template.
fn one_line(e: &Error) -> String {
    let what = match (e.kind(), e.detail()) {
        // raise_exception's message is the template's own words.
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        (kind, Some(detail)) => format!("{kind}: {detail}"),
        (kind, None) => kind.to_string(),
    };
    let mut line = match e.line() {
        Some(n) => format!("{what} (line {n})"),
        None => what,
    };
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        line.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    line.replace('\n', " ")
}

/// The template named `default` from HF's `[{"name": …, "template": …}]` form.
fn pick_default(named: &[serde_json::Value]) -> anyhow::Result<String> {
    let mut names = Vec::new();
    for entry in named {
        let name = entry.get("name").and_then(|n| n.as_str());
        let template = entry.get("template").and_then(|t| t.as_str());
        match (name, template) {
            (Some("default"), Some(t)) => return Ok(t.to_string()),
            (Some(n), Some(_)) => names.push(n.to_string()),
            _ => bail!("an entry lacks a string \"name\" or \"template\": {entry}"),
        }
    }
    bail!("no template named \"default\" among {names:?}")
}

/// A special token written either as a string or as `{"content": …}` (AddedToken); `None`
/// when absent or null.
fn special_token(v: Option<&serde_json::Value>) -> anyhow::Result<Option<String>> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(obj @ serde_json::Value::Object(_)) => match obj.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => bail!("token object without a string \"content\": {obj}"),
        },
        Some(other) => bail!("expected a string or {{\"content\": …}}, got {other}"),
    }
}

/// Replaces the `generation`/`endgeneration` block tags (a transformers extension
/// minijinja does not know) with `if true`/`endif`, keeping whitespace-control markers so
/// trimming stays the same.
fn rewrite_generation_tags(source: &str) -> Cow<'_, str> {
    if !source.contains("generation") {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let (before, tag) = rest.split_at(open);
        out.push_str(before);
        let body = &tag[2..];
        let marker = body.len() - body.trim_start_matches(['-', '+']).len();
        let inner = body[marker..].trim_start();
        let keyword = ["endgeneration", "generation"].into_iter().find(|k| {
            inner.strip_prefix(k).is_some_and(|after| {
                let after = after.trim_start().trim_start_matches(['-', '+']);
                after.starts_with("%}")
            })
        });
        match keyword {
            Some(k) => {
                let replacement = if k == "generation" {
                    "if true"
                } else {
                    "endif"
                };
                out.push_str("{%");
                out.push_str(&body[..marker]);
                out.push(' ');
                out.push_str(replacement);
                rest = &inner[k.len()..];
            }
            None => {
                out.push_str("{%");
                rest = body;
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// transformers' `raise_exception`: aborts rendering with the template's message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `strftime_now`: the current time, formatted. Uses UTC (Python uses the
/// local zone; boards running this are usually on UTC anyway).
fn strftime_now(format: String) -> Result<String, Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("clock: {e}")))?;
    strftime(&format, now.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_render_their_body() {
        assert_eq!(
            rewrite_generation_tags("a{%- generation %}b{% endgeneration -%}c"),
            "a{%- if true %}b{% endif -%}c"
        );
        assert_eq!(
            rewrite_generation_tags("{% if x %}generation{% endif %}"),
            "{% if x %}generation{% endif %}"
        );
    }
}
