//! Chat templates from `tokenizer_config.json`, rendered with minijinja.
//!
//! Rendering mimics `transformers`' `apply_chat_template` so that prompts match the ones
//! the model was trained on byte for byte: `trim_blocks` and `lstrip_blocks` on, the final
//! newline of the template dropped, loop controls (`break`/`continue`), Python string and
//! dict methods (`.strip()`, `.startswith()`, `.items()` …) through minijinja-contrib's
//! pycompat, dicts in insertion order, and the helpers transformers adds:
//! `raise_exception(msg)`, `strftime_now(fmt)` and a `tojson` filter that writes what
//! Python's `json.dumps` writes. The `{% generation %}` block tag (used by training code
//! to mark assistant output) renders its body unchanged.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

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

/// A compiled chat template plus the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    specials: BTreeMap<&'static str, String>, // bos_token, eos_token, unk_token, pad_token
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
        let specials = BTreeMap::from([
            ("bos_token", bos_token.to_string()),
            ("eos_token", eos_token.to_string()),
        ]);
        Self::compile(source, specials)
    }

    /// Reads the chat template of a Hugging Face `tokenizer_config.json`: the
    /// `chat_template` string, or the `default` entry of its list-of-named-templates form,
    /// or else a `chat_template.jinja` next to it. `Ok(None)` if there is none.
    pub fn from_tokenizer_config(path: &Path) -> anyhow::Result<Option<ChatTemplate>> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {shown:?}"))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {shown:?}"))?;
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
        let mut specials = BTreeMap::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            let token =
                special_token(config.get(key)).with_context(|| format!("{key} in {shown:?}"))?;
            specials.insert(key, token);
        }
        Self::compile(&source, specials)
            .with_context(|| format!("chat template in {shown:?}"))
            .map(Some)
    }

    fn compile(
        source: &str,
        specials: BTreeMap<&'static str, String>,
    ) -> anyhow::Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, rewrite_generation_tags(source).into_owned())
            .map_err(|e| anyhow!("invalid chat template: {e:#}"))?;
        Ok(ChatTemplate { env, specials })
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends where the
    /// assistant's reply should begin.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> anyhow::Result<String> {
        let mut ctx: BTreeMap<&str, Value> = self
            .specials
            .iter()
            .map(|(k, v)| (*k, Value::from(v.as_str())))
            .collect();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        let template = self.env.get_template(NAME)?;
        template
            .render(ctx)
            .map_err(|e| anyhow!("rendering chat template: {e:#}"))
    }
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

/// A special token written either as a string or as `{"content": …}` (AddedToken).
fn special_token(v: Option<&serde_json::Value>) -> anyhow::Result<String> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(String::new()),
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(obj @ serde_json::Value::Object(_)) => match obj.get("content") {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
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

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// C `strftime` for a UTC Unix time, with the specifiers chat templates use.
fn strftime(format: &str, unix_secs: i64) -> Result<String, Error> {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[month as usize - 1];
    let weekday_name = WEEKDAYS[weekday];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // Writing to a String cannot fail.
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{hour12:02}"),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('j') => write!(out, "{day_of_year:03}"),
            Some('B') => write!(out, "{month_name}"),
            Some('b') | Some('h') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{weekday_name}"),
            Some('a') => write!(out, "{}", &weekday_name[..3]),
            Some('w') => write!(out, "{weekday}"),
            Some('F') => write!(out, "{year}-{month:02}-{day:02}"),
            Some('T') => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            Some('%') => write!(out, "%"),
            other => {
                let spec = other.map_or(String::new(), String::from);
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported format %{spec} in {format:?}"),
                ));
            }
        };
    }
    Ok(out)
}

/// (year, month 1–12, day 1–31) of a day count since 1970-01-01, proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1st
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, keyword arguments only.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (None, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: indent must be an integer or a string, got {v}"),
                ))
            }
        },
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(seps) if seps.len() == 2 => (seps[0].clone(), seps[1].clone()),
        Some(seps) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: separators must be two strings, got {seps:?}"),
            ))
        }
        // Python drops the space after commas when indenting (the newline replaces it).
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        ensure_ascii,
        sort_keys,
        indent,
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    style.write(&mut out, value, 0)?;
    Ok(Value::from(out))
}

/// How Python's `json.dumps` was asked to format.
struct JsonStyle {
    ensure_ascii: bool,
    sort_keys: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
}

impl JsonStyle {
    fn write(&self, out: &mut String, v: &Value, depth: usize) -> Result<(), Error> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => {
                let _ = write!(out, "{v}");
            }
            ValueKind::Number => {
                let f = f64::try_from(v.clone())?;
                out.push_str(&python_float_repr(f));
            }
            ValueKind::String => self.write_str(out, v.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.write_container(out, '[', ']', items.len(), depth, |out, i| {
                    self.write(out, &items[i], depth + 1)
                })?;
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in v.try_iter()? {
                    let item = v.get_item(&key)?;
                    entries.push((self.key_string(&key)?, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(out, '{', '}', entries.len(), depth, |out, i| {
                    self.write_str(out, &entries[i].0);
                    out.push_str(&self.key_sep);
                    self.write(out, &entries[i].1, depth + 1)
                })?;
            }
            ValueKind::Undefined => {
                return Err(Error::new(
                    ErrorKind::UndefinedError,
                    "tojson: value is undefined",
                ))
            }
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: cannot serialise a value of type {other}"),
                ))
            }
        }
        Ok(())
    }

    fn write_container(
        &self,
        out: &mut String,
        open: char,
        close: char,
        len: usize,
        depth: usize,
        mut item: impl FnMut(&mut String, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, level: usize| {
            if let Some(ind) = &self.indent {
                out.push('\n');
                for _ in 0..level {
                    out.push_str(ind);
                }
            }
        };
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            newline(out, depth + 1);
            item(out, i)?;
        }
        newline(out, depth);
        out.push(close);
        Ok(())
    }

    /// Python converts non-string keys the way it prints them as JSON values.
    fn key_string(&self, key: &Value) -> Result<String, Error> {
        match key.kind() {
            ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
            ValueKind::None | ValueKind::Bool | ValueKind::Number => {
                let mut s = String::new();
                self.write(&mut s, key, 0)?;
                Ok(s)
            }
            other => Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be strings or numbers, got {other}"),
            )),
        }
    }

    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{u:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)` as `json.dumps` writes it: shortest round-trip digits, exponent
/// form below 1e-4 or from 1e16 on, and `NaN`/`Infinity` for the non-finite.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the same shortest digits: "-1.25e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    if !(-4..16).contains(&exp) {
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{mantissa}e{esign}{:02}", exp.abs());
    }
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let point = exp + 1; // digits before the decimal point
    if point <= 0 {
        let zeros = "0".repeat((-point) as usize);
        return format!("{sign}0.{zeros}{digits}");
    }
    let point = point as usize;
    if digits.len() <= point {
        let zeros = "0".repeat(point - digits.len());
        format!("{sign}{digits}{zeros}.0")
    } else {
        format!("{sign}{}.{}", &digits[..point], &digits[point..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_str(source: &str, ctx: Value) -> anyhow::Result<String> {
        let t = ChatTemplate::new(source, "<s>", "</s>")?;
        let template = t.env.get_template(NAME)?;
        Ok(template.render(ctx)?)
    }

    #[test]
    fn python_float_repr_matches_python() {
        // Expected strings are Python 3.11's repr() of the same floats.
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e15, "1000000000000000.0"),
            (123456789.125, "123456789.125"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-1.25e-7, "-1.25e-07"),
            (1e100, "1e+100"),
            (0.0, "0.0"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (f, want) in cases {
            assert_eq!(python_float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        // A template dict literal, so the keys keep their insertion order.
        let ctx = Value::from_serialize(serde_json::json!({"q": "a\"b\\\n\u{1}"}));
        let set =
            r#"{% set x = {"name": "café <b>", "n": [1, 2.5, true, none], "e": {}, "q": q} %}"#;
        // Expected strings: Python json.dumps with the same arguments (insertion order).
        assert_eq!(
            render_str(&format!("{set}{{{{ x | tojson }}}}"), ctx.clone()).unwrap(),
            r#"{"name": "café <b>", "n": [1, 2.5, true, null], "e": {}, "q": "a\"b\\\n\u0001"}"#
        );
        assert_eq!(
            render_str(
                &format!("{set}{{{{ x.n | tojson(indent=2) }}}}"),
                ctx.clone()
            )
            .unwrap(),
            "[\n  1,\n  2.5,\n  true,\n  null\n]"
        );
        assert_eq!(
            render_str(
                &format!(
                    "{set}{{{{ x | tojson(sort_keys=true, ensure_ascii=true, separators=[',', ':']) }}}}"
                ),
                ctx
            )
            .unwrap(),
            r#"{"e":{},"n":[1,2.5,true,null],"name":"caf\u00e9 <b>","q":"a\"b\\\n\u0001"}"#
        );
    }

    #[test]
    fn strftime_matches_python_time_strftime_in_utc() {
        // Python: time.strftime(fmt, time.gmtime(t)).
        let f = "%Y-%m-%d %H:%M:%S %a %A %b %B %j %I%p %y %e %w %F %T %%";
        assert_eq!(
            strftime(f, 0).unwrap(),
            "1970-01-01 00:00:00 Thu Thursday Jan January 001 12AM 70  1 4 1970-01-01 00:00:00 %"
        );
        assert_eq!(
            strftime(f, 1_700_000_000).unwrap(),
            "2023-11-14 22:13:20 Tue Tuesday Nov November 318 10PM 23 14 2 2023-11-14 22:13:20 %"
        );
        assert_eq!(
            strftime("%d %B %Y", 951_782_400).unwrap(),
            "29 February 2000"
        );
        assert!(strftime("%Q", 0).is_err());
    }

    #[test]
    fn civil_days_round_trip() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

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
