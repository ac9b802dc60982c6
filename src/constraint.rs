//! Constrained decoding: output that follows a JSON schema, a grammar or a regular
//! expression.
//!
//! llguidance (the engine llama.cpp and vLLM use) does the work: before each token it
//! computes the set of tokens that keep the output a prefix of something the format
//! accepts, and the sampler draws only from that set ([`crate::sampler::Sampler::sample_masked`]).
//! Three things, loaded at three rates:
//!
//! - [`Compiler`]: the vocabulary as byte strings in a trie, once per tokenizer;
//! - [`Constraint`]: one [`Format`] compiled for that vocabulary, once per format;
//! - [`Matcher`]: where one generation stands in the format, one per generation.
//!
//! End-of-sequence tokens are allowed only where the output is complete. Bytes the format
//! forces (a key name after `{`) still go through the sampler, as a mask of the tokens
//! that spell them: forcing whole tokens would need a tokenizer that splits a fragment as
//! it would inside a text, which SentencePiece-style vocabularies (a leading `▁`) do not.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use llguidance::api::{StopReason as LlgStopReason, TopLevelGrammar};
use llguidance::toktrie::{
    ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie, INVALID_TOKEN,
};
use llguidance::ParserFactory;
use serde_json::{json, Value};

use crate::tokenizer::{TokenBytes, Tokenizer};

/// Longest token, in bytes, the trie takes (its nodes hold a 10-bit depth); longer tokens,
/// which no real vocabulary has, are never allowed.
const MAX_TOKEN_BYTES: usize = 512;

/// Largest vocabulary the trie takes (its nodes hold 24-bit ids).
const MAX_VOCAB: usize = 1 << 20;

/// How JSON comes out unless a schema says otherwise (`"x-guidance"`): on one line, with a
/// space after `:` and `,` as models write it, and nothing after the closing brace, so the
/// format is complete there and a line-based reader gets one object per line.
fn json_layout() -> Value {
    json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

/// What the output must follow, before it is compiled for a vocabulary.
#[derive(Clone, Debug)]
pub struct Format {
    spec: Spec,
    origin: String, // how messages name it, e.g. `JSON schema "lamp.json"`
}

#[derive(Clone, Debug)]
enum Spec {
    JsonSchema(Value),
    Lark(String),
    Regex(String),
}

impl Format {
    /// Any JSON object.
    pub fn json() -> Format {
        Format::json_schema(json!({ "type": "object" }), "JSON")
    }

    /// A JSON schema (draft 2020-12 and older; local `$ref`s), named `origin` in messages.
    pub fn json_schema(schema: Value, origin: &str) -> Format {
        let mut schema = schema;
        if let Some(obj) = schema.as_object_mut() {
            obj.entry("x-guidance").or_insert_with(json_layout);
        }
        Format {
            spec: Spec::JsonSchema(schema),
            origin: origin.to_string(),
        }
    }

    /// A JSON schema read from a file.
    pub fn load_json_schema(path: &Path) -> Result<Format> {
        let origin = format!("JSON schema \"{}\"", path.display());
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {origin}"))?;
        let schema: Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("reading {origin}: {e}"))?;
        if !(schema.is_object() || schema.is_boolean()) {
            bail!("reading {origin}: a schema is a JSON object (or true/false)");
        }
        Ok(Format::json_schema(schema, &origin))
    }

    /// A grammar in llguidance's Lark-like syntax (`start: ...`), named `origin` in messages.
    /// llama.cpp's GBNF (`root ::= ...`) is refused with a hint: llguidance only converts
    /// it with a Python script.
    pub fn grammar(text: &str, origin: &str) -> Result<Format> {
        let meaningful = text
            .lines()
            .map(str::trim)
            .any(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("//"));
        if !meaningful {
            bail!("{origin} is empty");
        }
        if let Some(n) = gbnf_line(text) {
            bail!(
                "{origin}, line {n}: \"::=\" is llama.cpp's GBNF, which is not accepted; \
                 write rules as `name: ...` with a `start` rule (llguidance's Lark-like syntax)"
            );
        }
        Ok(Format {
            spec: Spec::Lark(text.to_string()),
            origin: origin.to_string(),
        })
    }

    /// A grammar read from a file.
    pub fn load_grammar(path: &Path) -> Result<Format> {
        let origin = format!("grammar \"{}\"", path.display());
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {origin}"))?;
        Format::grammar(&text, &origin)
    }

    /// A regular expression (Rust `regex` syntax) the whole output must match.
    pub fn regex(rx: &str) -> Format {
        Format {
            spec: Spec::Regex(rx.to_string()),
            origin: format!("regular expression /{rx}/"),
        }
    }

    /// How messages name this format.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

/// The first line (1-based) that defines a rule with GBNF's `::=`, if any.
fn gbnf_line(text: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let name_end = l
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .unwrap_or(l.len());
            name_end > 0 && l[name_end..].trim_start().starts_with("::=")
        })
        .map(|i| i + 1)
}

/// The vocabulary as byte strings, ready to compile formats for; built once per
/// tokenizer.
pub struct Compiler {
    factory: ParserFactory,
}

impl Compiler {
    /// Builds the token trie for a model whose logits have `vocab_size` entries (ids past
    /// the tokenizer's are never allowed); `eos_ids` end a generation where the format is
    /// complete.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize, eos_ids: &[u32]) -> Result<Compiler> {
        let t0 = Instant::now();
        if vocab_size > MAX_VOCAB {
            bail!(
                "constrained decoding takes at most {MAX_VOCAB} tokens, the model has {vocab_size}"
            );
        }
        if tokenizer.vocab_size() > vocab_size {
            bail!(
                "the tokenizer has {} tokens but the model's vocabulary has {vocab_size}",
                tokenizer.vocab_size()
            );
        }
        let mut words: Vec<Vec<u8>> = tokenizer // (vocab_size,) bytes of each token
            .token_bytes()
            .context("preparing the vocabulary for constrained decoding")?
            .into_iter()
            .map(|t| match t {
                TokenBytes::Text(b) if b.len() <= MAX_TOKEN_BYTES => b,
                // The marker byte (0xFF, never in UTF-8 text) keeps special tokens out of
                // ordinary text while grammars can still name them (`<|im_end|>`).
                TokenBytes::Special(name) if name.len() < MAX_TOKEN_BYTES => {
                    let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    b.extend_from_slice(name.as_bytes());
                    b
                }
                _ => Vec::new(),
            })
            .collect();
        words.resize(vocab_size, Vec::new());
        let eos: Vec<u32> = eos_ids
            .iter()
            .copied()
            .filter(|&id| (id as usize) < vocab_size)
            .collect();
        let info = TokRxInfo {
            vocab_size: vocab_size as u32,
            tok_eos: eos.first().copied().unwrap_or(INVALID_TOKEN),
            tok_bos: None,
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| anyhow!("preparing the vocabulary for constrained decoding: {e}"))?;
        // Warnings come back through `Constraint::warnings`; nothing goes to stderr.
        factory.quiet();
        log::debug!(
            "constrained decoding: {vocab_size}-token trie in {} ms",
            t0.elapsed().as_millis()
        );
        Ok(Compiler { factory })
    }

    /// Compiles `format`. Errors are one line naming the format and, for grammars, the
    /// line and column. A format that allows no output at all is an error too.
    pub fn compile(&self, format: &Format) -> Result<Constraint> {
        let t0 = Instant::now();
        let grammar = match &format.spec {
            Spec::JsonSchema(schema) => TopLevelGrammar::from_json_schema(schema.clone()),
            Spec::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            Spec::Regex(rx) => TopLevelGrammar::from_regex(rx),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| anyhow!("compiling {}: {}", format.origin, one_line(&e.to_string())))?;
        let mut start = llguidance::Matcher::new(Ok(parser));
        let warnings = start.grammar_warnings();
        // The first mask also fills the lexer's caches, which every matcher shares.
        let first = start.clone().compute_mask();
        match first {
            Err(e) => bail!(
                "{} allows no output: {}",
                format.origin,
                one_line(&e.to_string())
            ),
            Ok(mask) if mask.num_set() == 0 => bail!("{} allows no output", format.origin),
            Ok(_) => {}
        }
        log::debug!(
            "compiled {} in {} ms",
            format.origin,
            t0.elapsed().as_millis()
        );
        Ok(Constraint {
            start,
            origin: format.origin.clone(),
            warnings,
        })
    }
}

/// llguidance's messages span several lines (the grammar around the error, the parser
/// state); the first line holds the error. Its position, `at 3(5): ...` or `3(5): ...`,
/// becomes `line 3, column 5: ...`.
fn one_line(msg: &str) -> String {
    let first = msg
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let rest = first.strip_prefix("at ").unwrap_or(first);
    let position = rest.split_once("): ").and_then(|(pos, text)| {
        let (line, col) = pos.split_once('(')?;
        let line: usize = line.parse().ok()?;
        let col: usize = col.parse().ok()?;
        Some(format!("line {line}, column {col}: {text}"))
    });
    position.unwrap_or_else(|| first.to_string())
}

/// A format compiled for one vocabulary; start as many generations from it as needed.
pub struct Constraint {
    start: llguidance::Matcher, // fresh parser state, never advanced
    origin: String,
    warnings: Vec<String>,
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constraint")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// A matcher at the start of the format, for one generation. Matchers share the
    /// compiled lexer and its caches.
    pub fn matcher(&self) -> Matcher {
        Matcher {
            inner: self.start.clone(),
            mask: SimpleVob::new(),
            origin: self.origin.clone(),
            consumed: 0,
        }
    }

    /// How messages name the format.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// What the compiler noticed but accepted (e.g. schema keywords it ignores).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// Where one generation stands in its format.
pub struct Matcher {
    inner: llguidance::Matcher,
    mask: SimpleVob, // (vocab,) bits: the tokens allowed next
    origin: String,
    consumed: usize,
}

impl fmt::Debug for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Matcher")
            .field("origin", &self.origin)
            .field("consumed", &self.consumed)
            .finish_non_exhaustive()
    }
}

impl Matcher {
    /// The tokens allowed next, as [`crate::sampler::Sampler::sample_masked`] takes them, or
    /// `None` when the output is complete and nothing may follow. An error when the format
    /// has no way on (which a compiled format should never reach).
    pub fn allowed(&mut self) -> Result<Option<&[u32]>> {
        if self.is_complete() {
            return Ok(None);
        }
        match self.inner.compute_mask() {
            Ok(mask) => {
                self.mask = mask;
                Ok(Some(self.mask.as_slice()))
            }
            Err(_) if self.is_complete() => Ok(None),
            Err(e) => bail!(
                "{} allows no token after {} tokens: {}",
                self.origin,
                self.consumed,
                one_line(&e.to_string())
            ),
        }
    }

    /// Moves past `id`, which must have been allowed.
    pub fn accept(&mut self, id: u32) -> Result<()> {
        self.inner.consume_token(id).map_err(|e| {
            anyhow!(
                "{} rejected token {id} after {} tokens: {}",
                self.origin,
                self.consumed,
                one_line(&e.to_string())
            )
        })?;
        self.consumed += 1;
        Ok(())
    }

    /// True when the output so far is a complete match and nothing may follow it (an
    /// end-of-sequence token, if one was accepted, also completes it).
    pub fn is_complete(&self) -> bool {
        matches!(
            self.inner.stop_reason(),
            LlgStopReason::NoExtension
                | LlgStopReason::NoExtensionBias
                | LlgStopReason::EndOfSentence
        )
    }
}
