//! `tokenizer.json` and `tokenizer_config.json` built from a GGUF's `tokenizer.ggml.*`
//! metadata, for the `tokenizers` crate to run.
//!
//! Two vocabulary kinds, by `tokenizer.ggml.model`:
//!
//! | `model` | tokenizer                                   | file       |
//! |---------|---------------------------------------------|------------|
//! | `gpt2`  | byte-level BPE with its merges              | [`bpe`]    |
//! | `llama` | SentencePiece BPE: scores, byte fallback, ▁ | [`spm`]    |
//!
//! A byte-level vocabulary's pre-tokenizer comes from `tokenizer.ggml.pre` ([`pre`]); an
//! unknown value is refused rather than guessed, since a wrong split regex still loads and
//! silently produces ids the model never saw.
//!
//! The target is llama.cpp's tokenizer on the same file, whose test vectors (made with each
//! model's own Hugging Face tokenizer) the conversion passes. Control and unknown tokens
//! become special added tokens, user-defined tokens non-special ones; both are matched in the
//! raw text before anything else, and special ones only when special-token text is parsed
//! (`tokenizers`' `encode_special_tokens` off), as llama.cpp's `parse_special` does.

mod bpe;
mod pre;
mod spm;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use thiserror::Error;

use super::gguf::Gguf;

// `tokenizer.ggml.token_type` codes (llama.cpp `llama_token_type`): 0 undefined, 1 normal,
// 5 unused and 6 byte are plain vocabulary entries.
const TYPE_UNDEFINED: i32 = 0;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// The `tokenizer.ggml.*` metadata of a GGUF, as the converter reads it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `"gpt2"` is byte-level BPE, `"llama"` SentencePiece.
    pub model: String,
    /// `tokenizer.ggml.pre`: which pre-tokenizer regex a byte-level vocabulary was trained with.
    pub pre: Option<String>,
    /// `general.name`, lowercased (llama.cpp keys Phi-3's token attributes on it).
    pub name: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.scores`: SentencePiece merge priorities, higher first.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.merges`: `"left right"` pairs, highest priority first.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos: bool,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece; llama.cpp's default is true).
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl GgufVocab {
    /// Reads the tokenizer metadata of a GGUF; a vocabulary-only file is enough.
    pub fn from_gguf(g: &Gguf) -> Result<GgufVocab> {
        let opt_id = |k: &str| -> Result<Option<u32>> {
            match g.get(k) {
                Some(_) => {
                    Ok(Some(u32::try_from(g.get_u64(k)?).with_context(|| {
                        format!("{k} does not fit a u32 token id")
                    })?))
                }
                None => Ok(None),
            }
        };
        let opt_bool = |k: &str| -> Result<Option<bool>> {
            match g.get(k) {
                Some(_) => Ok(Some(g.get_bool(k)?)),
                None => Ok(None),
            }
        };
        let opt_str = |k: &str| -> Result<Option<String>> {
            match g.get(k) {
                Some(_) => Ok(Some(g.get_str(k)?.to_string())),
                None => Ok(None),
            }
        };
        let token_types = match g.get("tokenizer.ggml.token_type") {
            // A value past i32 is reported by the validation as an unknown type.
            Some(_) => g
                .get_i64_array("tokenizer.ggml.token_type")?
                .into_iter()
                .map(|t| i32::try_from(t).unwrap_or(i32::MAX))
                .collect(),
            None => vec![],
        };
        let scores = match g.get("tokenizer.ggml.scores") {
            Some(_) => g.get_f32_array("tokenizer.ggml.scores")?,
            None => vec![],
        };
        let merges = match g.get("tokenizer.ggml.merges") {
            Some(_) => g
                .get_str_array("tokenizer.ggml.merges")?
                .into_iter()
                .map(String::from)
                .collect(),
            None => vec![],
        };
        Ok(GgufVocab {
            model: g.get_str("tokenizer.ggml.model")?.to_string(),
            pre: opt_str("tokenizer.ggml.pre")?,
            name: opt_str("general.name")?.map(|n| n.to_lowercase()),
            tokens: g
                .get_str_array("tokenizer.ggml.tokens")?
                .into_iter()
                .map(String::from)
                .collect(),
            token_types,
            scores,
            merges,
            bos_id: opt_id("tokenizer.ggml.bos_token_id")?,
            eos_id: opt_id("tokenizer.ggml.eos_token_id")?,
            unk_id: opt_id("tokenizer.ggml.unknown_token_id")?,
            pad_id: opt_id("tokenizer.ggml.padding_token_id")?,
            add_bos: opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
            add_eos: opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
            add_space_prefix: opt_bool("tokenizer.ggml.add_space_prefix")?,
            chat_template: opt_str("tokenizer.chat_template")?,
        })
    }
}

/// Why a GGUF vocabulary cannot become a `tokenizer.json`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenizerJsonError {
    /// `tokenizer.ggml.model` is neither byte-level BPE nor SentencePiece.
    #[error("tokenizer.ggml.model \"{0}\" is not supported (supported: \"gpt2\", byte-level BPE; \"llama\", SentencePiece)")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer we do not know.
    #[error("tokenizer.ggml.pre \"{0}\" is not supported (known: {known})", known = pre::KNOWN)]
    UnsupportedPre(String),
    /// `tokenizer.ggml.tokens` is empty.
    #[error("tokenizer.ggml.tokens is empty")]
    EmptyVocab,
    /// The vocabulary has more tokens than a `u32` id can name.
    #[error("tokenizer.ggml.tokens has {0} tokens, more than u32 ids can name")]
    VocabTooLarge(usize),
    /// `tokenizer.ggml.token_type` does not have one entry per token.
    #[error(
        "tokenizer.ggml.token_type has {types} entries but tokenizer.ggml.tokens has {tokens}"
    )]
    TokenTypeCount {
        /// Length of `tokenizer.ggml.tokens`.
        tokens: usize,
        /// Length of `tokenizer.ggml.token_type`.
        types: usize,
    },
    /// `tokenizer.ggml.scores` does not have one entry per token (SentencePiece needs them).
    #[error("tokenizer.ggml.scores has {scores} entries but tokenizer.ggml.tokens has {tokens}")]
    ScoreCount {
        /// Length of `tokenizer.ggml.tokens`.
        tokens: usize,
        /// Length of `tokenizer.ggml.scores`.
        scores: usize,
    },
    /// A `tokenizer.ggml.scores` entry is NaN, so merges cannot be ordered.
    #[error("tokenizer.ggml.scores[{0}] is NaN")]
    NanScore(u32),
    /// A `tokenizer.ggml.token_type` entry is outside 0..=6.
    #[error("tokenizer.ggml.token_type[{id}] is {value}, not a token type (0..=6)")]
    UnknownTokenType {
        /// Token id.
        id: u32,
        /// The stored type code.
        value: i32,
    },
    /// The same token text appears at two ids.
    #[error("tokenizer.ggml.tokens has {token:?} at ids {first} and {second}")]
    DuplicateToken {
        /// The repeated text.
        token: String,
        /// Its first id.
        first: u32,
        /// Its second id.
        second: u32,
    },
    /// A special-token id is not below the vocabulary size.
    #[error("tokenizer.ggml.{key} is {id} but tokenizer.ggml.tokens has only {len} tokens")]
    IdOutOfRange {
        /// Metadata key without the `tokenizer.ggml.` prefix.
        key: &'static str,
        /// The stored id.
        id: u32,
        /// Vocabulary size.
        len: usize,
    },
    /// `add_bos_token` / `add_eos_token` is set without the token id it needs.
    #[error("tokenizer.ggml.{flag} is true but tokenizer.ggml.{key} is missing")]
    MissingSpecialId {
        /// The flag that is set.
        flag: &'static str,
        /// The id key that is missing.
        key: &'static str,
    },
    /// A merge is not two non-empty tokens joined by one space.
    #[error("tokenizer.ggml.merges[{index}] {merge:?} is not two tokens separated by one space")]
    MalformedMerge {
        /// Position in `tokenizer.ggml.merges`.
        index: usize,
        /// The merge text.
        merge: String,
    },
    /// A merge names a token (or produces one) that is not in the vocabulary.
    #[error("tokenizer.ggml.merges[{index}] {merge:?} needs token {token:?}, which is not in tokenizer.ggml.tokens")]
    MergeUnknownToken {
        /// Position in `tokenizer.ggml.merges`.
        index: usize,
        /// The merge text.
        merge: String,
        /// The missing token (a side of the merge, or their concatenation).
        token: String,
    },
    /// A byte has no token and no unknown token can stand for it.
    #[error("vocabulary has no token {token:?} for byte 0x{byte:02X} and no tokenizer.ggml.unknown_token_id to stand for it")]
    MissingByteToken {
        /// The byte.
        byte: u8,
        /// Its spelling in this vocabulary (byte-level char, or `<0xNN>`).
        token: String,
    },
}

/// Builds a Hugging Face `tokenizer.json` (load it with `tokenizers::Tokenizer::from_str`)
/// equivalent to the GGUF's tokenizer; see the module doc for what is supported.
pub fn build_tokenizer_json(v: &GgufVocab) -> Result<Value, TokenizerJsonError> {
    let parts = match v.model.as_str() {
        "gpt2" => {
            let pre = pre::Pre::from_gguf(v.pre.as_deref())?;
            let ids = validate(v)?;
            bpe::parts(v, &ids, pre)?
        }
        "llama" => {
            let ids = validate(v)?;
            spm::parts(v, &ids)?
        }
        other => return Err(TokenizerJsonError::UnsupportedModel(other.to_owned())),
    };
    let added: Vec<Value> = added_tokens(v)
        .map(|t| {
            let mut entry = t.json();
            entry["id"] = t.id.into();
            entry
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": parts.normalizer,
        "pre_tokenizer": parts.pre_tokenizer,
        "post_processor": post_processor(v),
        "decoder": parts.decoder,
        "model": parts.model,
    }))
}

/// What differs between the vocabulary kinds: everything but the added tokens and the
/// post-processor.
struct Parts {
    normalizer: Value,
    pre_tokenizer: Value,
    decoder: Value,
    model: Value,
}

/// The vocabulary in id order, so the file is deterministic whatever map serde_json is built
/// with.
fn vocab_json(v: &GgufVocab) -> Map<String, Value> {
    v.tokens
        .iter()
        .zip(0u32..)
        .map(|(token, id)| (token.clone(), id.into()))
        .collect()
}

/// One entry of `added_tokens` (and of `added_tokens_decoder`).
struct Added<'a> {
    id: u32,
    content: &'a str,
    special: bool,
    /// Whitespace after the token is part of it (Phi-3's chat tokens).
    rstrip: bool,
}

impl Added<'_> {
    /// The entry as `added_tokens_decoder` has it; `added_tokens` adds the id.
    fn json(&self) -> Value {
        json!({
            "content": self.content,
            "single_word": false,
            "lstrip": false,
            "rstrip": self.rstrip,
            "normalized": false,
            "special": self.special,
        })
    }
}

/// Tokens matched in raw text before pre-tokenization, in id order.
///
/// llama.cpp gives Phi-3's special and user-defined tokens (but `<unk>`, `<s>` and
/// `<|endoftext|>`) the right-strip attribute, keyed on `general.name`, as its Hugging Face
/// tokenizer has them.
fn added_tokens(v: &GgufVocab) -> impl Iterator<Item = Added<'_>> {
    let phi3 = v
        .name
        .as_deref()
        .is_some_and(|n| n.contains("phi-3") || n.contains("phi3"));
    v.tokens
        .iter()
        .zip(&v.token_types)
        .zip(0u32..)
        .filter_map(move |((content, &ty), id)| {
            let special = match ty {
                TYPE_UNKNOWN | TYPE_CONTROL => true,
                TYPE_USER_DEFINED => false,
                _ => return None,
            };
            let rstrip = phi3 && !matches!(content.as_str(), "<unk>" | "<s>" | "<|endoftext|>");
            Some(Added {
                id,
                content,
                special,
                rstrip,
            })
        })
}

/// Checks what both vocabulary kinds need and `tokenizers` would otherwise reject or
/// silently mis-encode; returns the token → id map.
fn validate(v: &GgufVocab) -> Result<HashMap<&str, u32>, TokenizerJsonError> {
    use TokenizerJsonError as E;
    let len = v.tokens.len();
    if len == 0 {
        return Err(E::EmptyVocab);
    }
    if u32::try_from(len).is_err() {
        return Err(E::VocabTooLarge(len));
    }
    if v.token_types.len() != len {
        return Err(E::TokenTypeCount {
            tokens: len,
            types: v.token_types.len(),
        });
    }
    for (id, &value) in (0u32..).zip(&v.token_types) {
        if !(TYPE_UNDEFINED..=TYPE_BYTE).contains(&value) {
            return Err(E::UnknownTokenType { id, value });
        }
    }
    let mut ids = HashMap::with_capacity(len);
    for (id, token) in (0u32..).zip(&v.tokens) {
        if let Some(first) = ids.insert(token.as_str(), id) {
            return Err(E::DuplicateToken {
                token: token.clone(),
                first,
                second: id,
            });
        }
    }
    let keys = [
        ("bos_token_id", v.bos_id),
        ("eos_token_id", v.eos_id),
        ("unknown_token_id", v.unk_id),
        ("padding_token_id", v.pad_id),
    ];
    for (key, id) in keys {
        if let Some(id) = id.filter(|&id| id as usize >= len) {
            return Err(E::IdOutOfRange { key, id, len });
        }
    }
    if v.add_bos && v.bos_id.is_none() {
        return Err(E::MissingSpecialId {
            flag: "add_bos_token",
            key: "bos_token_id",
        });
    }
    if v.add_eos && v.eos_id.is_none() {
        return Err(E::MissingSpecialId {
            flag: "add_eos_token",
            key: "eos_token_id",
        });
    }
    Ok(ids)
}

/// `TemplateProcessing` adding BOS / EOS as `add_bos_token` / `add_eos_token` ask, in the
/// layout transformers' Llama tokenizers use for pairs.
fn post_processor(v: &GgufVocab) -> Value {
    let token = |id: Option<u32>| id.and_then(|id| Some((id, v.tokens.get(id as usize)?)));
    let bos = token(v.bos_id).filter(|_| v.add_bos);
    let eos = token(v.eos_id).filter(|_| v.add_eos);
    let special =
        |t: &str, type_id: u32| json!({ "SpecialToken": { "id": t, "type_id": type_id } });
    let sequence = |s: &str, type_id: u32| json!({ "Sequence": { "id": s, "type_id": type_id } });
    let piece = |seq: &str, type_id: u32| {
        let mut out = Vec::new();
        if let Some((_, t)) = bos {
            out.push(special(t, type_id));
        }
        out.push(sequence(seq, type_id));
        if let Some((_, t)) = eos {
            out.push(special(t, type_id));
        }
        out
    };
    let single = piece("A", 0);
    let mut pair = single.clone();
    pair.extend(piece("B", 1));
    let mut special_tokens = Map::new();
    for (id, t) in bos.into_iter().chain(eos) {
        special_tokens.insert(t.clone(), json!({ "id": t, "ids": [id], "tokens": [t] }));
    }
    json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    })
}

/// Builds the matching Hugging Face `tokenizer_config.json`. Ids outside the vocabulary give
/// `null` tokens; run [`build_tokenizer_json`] first to have them reported as errors.
/// `model_max_length` is omitted when `None`.
pub fn build_tokenizer_config(v: &GgufVocab, model_max_length: Option<u64>) -> Value {
    let name = |id: Option<u32>| {
        id.and_then(|id| v.tokens.get(id as usize))
            .map_or(Value::Null, |t| Value::String(t.clone()))
    };
    let decoder: Map<String, Value> = added_tokens(v)
        .map(|t| (t.id.to_string(), t.json()))
        .collect();
    let mut config = Map::new();
    config.insert("add_bos_token".to_owned(), v.add_bos.into());
    config.insert("add_eos_token".to_owned(), v.add_eos.into());
    config.insert("added_tokens_decoder".to_owned(), Value::Object(decoder));
    config.insert("bos_token".to_owned(), name(v.bos_id));
    config.insert("eos_token".to_owned(), name(v.eos_id));
    config.insert("unk_token".to_owned(), name(v.unk_id));
    config.insert("pad_token".to_owned(), name(v.pad_id));
    if let Some(template) = &v.chat_template {
        config.insert("chat_template".to_owned(), template.clone().into());
    }
    // Decoding is exact; transformers' clean-up would delete spaces before punctuation.
    config.insert("clean_up_tokenization_spaces".to_owned(), false.into());
    if let Some(n) = model_max_length {
        config.insert("model_max_length".to_owned(), n.into());
    }
    // The generic fast class takes tokenizer.json as it is, with no model-specific rewriting.
    config.insert(
        "tokenizer_class".to_owned(),
        "PreTrainedTokenizerFast".into(),
    );
    Value::Object(config)
}
