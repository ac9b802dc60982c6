//! Wraps `tokenizers`; an incremental decoder that never splits UTF-8.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use tokenizers::DecoderWrapper;

use crate::convert::gguf::Gguf;
use crate::convert::vocab::{build_tokenizer_json, GgufVocab};

/// A Hugging Face `tokenizer.json`, loaded once and shared read-only.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

/// Words whose BPE split the tokenizer remembers. With the library's default (10 000), a
/// long `serve` session's heap grows by megabytes, word by new word, before the cache is
/// full; the words of a conversation or two fit in this.
const CACHE_WORDS: usize = 1024;

impl Tokenizer {
    /// Loads a `tokenizer.json`; the error names the path.
    pub fn from_file(path: &Path) -> anyhow::Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("loading tokenizer {:?}: {e}", path.display().to_string()))?;
        Ok(Tokenizer::wrap(inner))
    }

    /// The tokenizer of a model: a bundle directory (its `tokenizer.json`) or a `.gguf` file
    /// (its vocabulary, converted as `edgelm convert` converts it; a vocabulary-only GGUF is
    /// enough).
    pub fn from_model(path: &Path) -> anyhow::Result<Tokenizer> {
        if path.is_dir() {
            return Tokenizer::from_file(&path.join("tokenizer.json"));
        }
        if !path.exists() {
            bail!("model \"{}\" does not exist", path.display());
        }
        Tokenizer::from_gguf(path)
    }

    /// The vocabulary of a GGUF file, converted to a `tokenizer.json` in memory.
    pub fn from_gguf(path: &Path) -> anyhow::Result<Tokenizer> {
        let shown = path.display();
        let gguf = Gguf::open(path)?;
        let vocab = GgufVocab::from_gguf(&gguf)
            .with_context(|| format!("reading tokenizer of \"{shown}\""))?;
        let json = build_tokenizer_json(&vocab)
            .with_context(|| format!("converting tokenizer of \"{shown}\""))?;
        let inner = <tokenizers::Tokenizer as std::str::FromStr>::from_str(&json.to_string())
            .map_err(|e| anyhow!("loading the tokenizer converted from \"{shown}\": {e}"))?;
        Ok(Tokenizer::wrap(inner))
    }

    fn wrap(mut inner: tokenizers::Tokenizer) -> Tokenizer {
        let mut model = inner.get_model().clone();
        model.resize_cache(CACHE_WORDS);
        inner.with_model(model);
        Tokenizer { inner }
    }

    /// Whether special-token text in the input (`<|im_start|>`) becomes that token (the
    /// default) or is tokenized as plain text. User-defined added tokens match either way.
    pub fn set_parse_special(&mut self, parse: bool) {
        self.inner.set_encode_special_tokens(!parse);
    }

    /// Token ids of `text`; `add_special_tokens` runs the tokenizer's post-processor
    /// (e.g. a BOS token), which chat prompts must not get twice.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> anyhow::Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("encoding {} bytes of text", text.len()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; incomplete UTF-8 sequences come out as U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> anyhow::Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("decoding {} token ids: {e}", ids.len()))
    }

    /// Id of a token given by its vocabulary string (e.g. `"<|im_end|>"`).
    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// Number of ids the tokenizer knows, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// What each id, `0..vocab_size()`, adds to the output as raw bytes; constrained
    /// decoding matches these against the format. Byte-level vocabularies (GPT-2 style)
    /// spell each byte as one character, mapped back here; SentencePiece-style ones spell a
    /// space as `▁` and a raw byte as `<0xAB>`. Other tokenizers are refused.
    pub fn token_bytes(&self) -> anyhow::Result<Vec<TokenBytes>> {
        let spelling = self.inner.get_decoder().and_then(spelling).ok_or_else(|| {
            anyhow!(
                "the tokenizer's decoder is neither byte-level nor SentencePiece-style, \
                     so its tokens' bytes are unknown"
            )
        })?;
        let added = self.inner.get_added_tokens_decoder();
        let byte_of: HashMap<char, u8> = byte_level_chars().map(|(b, c)| (c, b)).collect();
        let mut out = Vec::with_capacity(self.vocab_size());
        for id in 0..self.vocab_size() as u32 {
            let bytes = match (added.get(&id), self.inner.id_to_token(id)) {
                (Some(t), _) if t.special => TokenBytes::Special(t.content.clone()),
                // Added tokens are matched in the text as they are written.
                (Some(t), _) => TokenBytes::Text(t.content.clone().into_bytes()),
                (None, None) => TokenBytes::Unused,
                (None, Some(piece)) => match spelling {
                    Spelling::ByteLevel => piece
                        .chars()
                        .map(|c| byte_of.get(&c).copied())
                        .collect::<Option<Vec<u8>>>()
                        .map_or(TokenBytes::Unused, TokenBytes::Text),
                    Spelling::Metaspace(space) => match byte_fallback(&piece) {
                        Some(b) => TokenBytes::Text(vec![b]),
                        None => TokenBytes::Text(piece.replace(space, " ").into_bytes()),
                    },
                },
            };
            out.push(bytes);
        }
        Ok(out)
    }
}

/// What one token id stands for in the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenBytes {
    /// Ordinary text: these bytes, which need not be whole UTF-8 characters.
    Text(Vec<u8>),
    /// A special token such as `<|im_end|>`: never part of ordinary text.
    Special(String),
    /// An id with no known bytes (a gap in the vocabulary, or a character the byte-level
    /// alphabet does not have).
    Unused,
}

/// How a vocabulary spells bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    /// One character per byte (GPT-2's alphabet).
    ByteLevel,
    /// Text with this character for a space, and `<0xAB>` pieces for raw bytes.
    Metaspace(char),
}

/// The spelling a decoder undoes; a byte-level step anywhere in a sequence decides it.
fn spelling(decoder: &DecoderWrapper) -> Option<Spelling> {
    match decoder {
        DecoderWrapper::ByteLevel(_) => Some(Spelling::ByteLevel),
        DecoderWrapper::Metaspace(m) => Some(Spelling::Metaspace(m.get_replacement())),
        DecoderWrapper::ByteFallback(_) => Some(Spelling::Metaspace('▁')),
        DecoderWrapper::Sequence(seq) => {
            let found: Vec<Spelling> = seq.get_decoders().iter().filter_map(spelling).collect();
            found
                .iter()
                .find(|s| **s == Spelling::ByteLevel)
                .or(found.first())
                .copied()
        }
        _ => None,
    }
}

/// `<0xAB>` → 0xAB.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other
/// 68 bytes for the characters from U+0100 up, in byte order.
fn byte_level_chars() -> impl Iterator<Item = (u8, char)> {
    let mut next = 0x100u32;
    (0..=255u8).map(move |b| {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if printable {
            (b, char::from(b))
        } else {
            let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
            next += 1;
            (b, c)
        }
    })
}

/// Longest run of pending tokens that may end in an unfinished character. A UTF-8
/// character has at most 4 bytes and every token contributes at least one, so anything
/// still ending in U+FFFD after this many tokens is invalid output, not an unfinished
/// character, and is released as is.
const MAX_PENDING: usize = 8;

/// Turns a stream of token ids into text pieces, never splitting a UTF-8 character.
///
/// Each push decodes only a short window: the tokens of the last fully emitted piece
/// (context, so decoders that treat a sequence's first token specially, such as ones that
/// strip a leading space, see the same start every time) plus the pending tokens. The
/// window is cut back whenever the decoded text ends cleanly, so the work per token is
/// O(1) amortised. Byte-level tokens holding part of a character decode to U+FFFD; the
/// text before such a trailing run is emitted and the run is held until the character is
/// complete. Special tokens are kept in the text (callers stop on EOS by id).
#[derive(Debug, Clone, Default)]
pub struct TokenOutputStream {
    ids: Vec<u32>,      // (window,) context tokens, then pending tokens
    context: usize,     // how many leading `ids` are context, already emitted
    context_len: usize, // bytes of decode(ids[..context])
    emitted: usize,     // bytes past `context_len` already emitted from the pending tokens
}

impl TokenOutputStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the newly completed text, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> anyhow::Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, false)?;
        let new = self.unseen(&text);
        let pending = self.ids.len() - self.context;
        let complete = new.trim_end_matches('\u{FFFD}');
        if complete.len() == new.len() || pending > MAX_PENDING {
            let piece = new.to_string();
            self.rotate(tok)?;
            return Ok(nonempty(piece));
        }
        // Show what precedes the unfinished character; hold the rest.
        let piece = complete.to_string();
        self.emitted += piece.len();
        Ok(nonempty(piece))
    }

    /// Releases whatever is held (an unfinished character comes out as U+FFFD) and
    /// starts afresh.
    pub fn flush(&mut self, tok: &Tokenizer) -> anyhow::Result<Option<String>> {
        if self.ids.len() == self.context {
            return Ok(None);
        }
        let text = tok.decode(&self.ids, false)?;
        let piece = self.unseen(&text).to_string();
        self.reset();
        Ok(nonempty(piece))
    }

    /// Forgets all tokens, e.g. between conversations.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Decoded text past what was already emitted. A decoder whose output for the window
    /// does not extend its output for the context (none of the byte-level or
    /// sentencepiece decoders) could leave the offset past the end or inside a character;
    /// that text is skipped rather than split.
    fn unseen<'t>(&self, text: &'t str) -> &'t str {
        text.get(self.context_len + self.emitted..).unwrap_or("")
    }

    /// Makes the pending tokens the new context and drops the old one.
    fn rotate(&mut self, tok: &Tokenizer) -> anyhow::Result<()> {
        self.ids.drain(..self.context);
        self.context = self.ids.len();
        self.context_len = tok.decode(&self.ids, false)?.len();
        self.emitted = 0;
        Ok(())
    }
}

fn nonempty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Drops control characters other than `\n` and `\t` from model output. The text goes to a
/// terminal over a serial line, where escape sequences, carriage returns, backspaces or
/// NULs from the model could move the cursor, rewrite earlier lines, ring the bell or
/// confuse line-based framing; newlines and tabs are ordinary layout.
pub fn sanitize(text: &str) -> Cow<'_, str> {
    let bad = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.contains(bad) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(text.chars().filter(|&c| !bad(c)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_window_stays_short_over_a_long_text() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/smollm2-135m-instruct/tokenizer.json");
        let tok = Tokenizer::from_file(&path).unwrap();
        let text = "Long text with émojis 🙂 and 中文, again and again. ".repeat(100);
        let ids = tok.encode(&text, false).unwrap();
        let mut s = TokenOutputStream::new();
        let mut out = String::new();
        let mut widest = 0;
        for &id in &ids {
            out.push_str(&s.push(&tok, id).unwrap().unwrap_or_default());
            widest = widest.max(s.ids.len());
        }
        out.push_str(&s.flush(&tok).unwrap().unwrap_or_default());
        assert_eq!(out, text);
        assert!(ids.len() > 1500, "{}", ids.len());
        // Context (the last piece's tokens) plus pending ones, never the whole history.
        assert!(widest <= 2 * MAX_PENDING, "window grew to {widest} tokens");
    }

    #[test]
    fn sanitize_keeps_newlines_tabs_and_unicode() {
        assert!(matches!(sanitize("a\tb\nc é 你 🙂"), Cow::Borrowed(_)));
        assert_eq!(sanitize("a\x1b[2Jb\r\n\x07c\x00\u{7f}\u{85}d"), "a[2Jb\ncd");
    }
}
