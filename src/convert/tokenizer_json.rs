//! `tokenizer.json` built from a GGUF's `tokenizer.ggml.*` metadata.
//!
//! Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is supported. The pre-tokenizer is
//! chosen from `tokenizer.ggml.pre`:
//!
//! | `pre`                                   | pre-tokenizer                                   |
//! |-----------------------------------------|-------------------------------------------------|
//! | absent, `default`, `gpt-2`, `smollm`    | ByteLevel with the GPT-2 regex                  |
//! | `llama-bpe`, `llama3`, `llama-v3`       | Llama-3 split regex, ByteLevel without regex    |
//! | `qwen2`                                 | NFC, Qwen2 split regex, ByteLevel without regex |
//!
//! Any other value is refused rather than guessed, since a wrong split regex still loads
//! and silently produces ids the model never saw.
//!
//! `smollm` follows transformers' GGUF loader (which ignores `pre`), because that is what our
//! goldens were made with. llama.cpp (and SmolLM's own Hub tokenizer) additionally isolate
//! every digit first, which gives other ids when several spaces precede a digit
//! (`"a  1"`: here `a Ġ Ġ 1`, llama.cpp `a ĠĠ 1`) or a space precedes a non-ASCII numeral.
//! `llama-bpe` sets `ignore_merges` like Meta's tokenizer.json and llama.cpp do.
//!
//! Control and unknown tokens become special added tokens, user-defined tokens non-special
//! ones; both are matched in the raw text before pre-tokenization.
//!
//! Not every byte-level vocabulary has all 256 byte tokens: SmolLM2's lacks 21 (0x04, 0x06,
//! 0x13, 0x14, 0x16, 0x1D, the lead bytes 0xF1 / 0xF2 of planes 4–11, and bytes that never
//! occur in UTF-8). A run of such bytes within a pre-token encodes as one unknown token, as
//! transformers does (llama.cpp drops them); without `unknown_token_id` the vocabulary is
//! refused. The decoder is plain ByteLevel, so `decode(encode(s)) == s` whenever every byte of
//! `s` has a token (for `qwen2`, for NFC `s`).

use std::collections::HashMap;

use serde_json::{json, Map, Value};
use thiserror::Error;

// `tokenizer.ggml.token_type` codes (llama.cpp `llama_token_type`): 0 undefined, 1 normal,
// 5 unused and 6 byte are plain vocabulary entries.
const TYPE_UNDEFINED: i32 = 0;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// Llama-3's pre-tokenizer regex: numbers in groups of up to three digits.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer regex: Llama-3's with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.*` metadata of a GGUF, as the converter reads it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `"gpt2"` is byte-level BPE.
    pub model: String,
    /// `tokenizer.ggml.pre`: which pre-tokenizer regex the vocabulary was trained with.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
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
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

/// Why a GGUF vocabulary cannot become a `tokenizer.json`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenizerJsonError {
    /// `tokenizer.ggml.model` is not byte-level BPE.
    #[error("tokenizer.ggml.model \"{0}\" is not supported (only \"gpt2\", byte-level BPE)")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer we do not know.
    #[error("tokenizer.ggml.pre \"{0}\" is not supported (known: default, gpt-2, smollm, llama-bpe, llama3, llama-v3, qwen2)")]
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
    #[error("byte-level vocabulary has no token {token:?} for byte 0x{byte:02X} and no tokenizer.ggml.unknown_token_id to stand for it")]
    MissingByteToken {
        /// The byte.
        byte: u8,
        /// Its GPT-2 byte-level spelling.
        token: String,
    },
}

/// Pre-tokenizer family named by `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pre {
    Gpt2,
    Llama3,
    Qwen2,
}

impl Pre {
    fn from_gguf(pre: Option<&str>) -> Result<Self, TokenizerJsonError> {
        // llama.cpp reads a missing `pre` as "default".
        match pre.unwrap_or("default") {
            "default" | "gpt-2" | "smollm" => Ok(Pre::Gpt2),
            "llama-bpe" | "llama3" | "llama-v3" => Ok(Pre::Llama3),
            "qwen2" => Ok(Pre::Qwen2),
            other => Err(TokenizerJsonError::UnsupportedPre(other.to_owned())),
        }
    }
}

/// One entry of `added_tokens` (and of `added_tokens_decoder`).
struct Added<'a> {
    id: u32,
    content: &'a str,
    special: bool,
}

impl Added<'_> {
    /// The entry as `added_tokens_decoder` has it; `added_tokens` adds the id.
    fn json(&self) -> Value {
        json!({
            "content": self.content,
            "single_word": false,
            "lstrip": false,
            "rstrip": false,
            "normalized": false,
            "special": self.special,
        })
    }
}

/// Tokens matched in raw text before pre-tokenization, in id order.
fn added_tokens(v: &GgufVocab) -> impl Iterator<Item = Added<'_>> {
    v.tokens
        .iter()
        .zip(&v.token_types)
        .zip(0u32..)
        .filter_map(|((content, &ty), id)| match ty {
            TYPE_UNKNOWN | TYPE_CONTROL => Some(Added {
                id,
                content,
                special: true,
            }),
            TYPE_USER_DEFINED => Some(Added {
                id,
                content,
                special: false,
            }),
            _ => None,
        })
}

/// GPT-2's reversible byte → char map: printable Latin-1 bytes stand for themselves, the other
/// 68 bytes take U+0100.. in byte order, so every token is a printable string.
fn byte_level_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    for (byte, slot) in (0u8..=255).zip(table.iter_mut()) {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            u32::from(byte)
        } else {
            shifted += 1;
            255 + shifted
        };
        *slot = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    table
}

/// Checks everything `tokenizers` would otherwise reject or silently mis-encode; returns the
/// token → id map.
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
    if v.unk_id.is_none() {
        // Otherwise `tokenizers` would silently drop the byte.
        for (byte, ch) in (0u8..=255).zip(byte_level_chars()) {
            let token = ch.to_string();
            if !ids.contains_key(token.as_str()) {
                return Err(E::MissingByteToken { byte, token });
            }
        }
    }
    Ok(ids)
}

/// Splits each merge into its two sides, checking both sides and their concatenation exist.
fn parse_merges<'a>(
    v: &'a GgufVocab,
    ids: &HashMap<&str, u32>,
) -> Result<Vec<[&'a str; 2]>, TokenizerJsonError> {
    v.merges
        .iter()
        .enumerate()
        .map(|(index, merge)| {
            // Byte-level tokens never contain a space (it is spelled `Ġ`), so exactly one.
            let pair = merge
                .split_once(' ')
                .filter(|(l, r)| !l.is_empty() && !r.is_empty() && !r.contains(' '));
            let Some((left, right)) = pair else {
                return Err(TokenizerJsonError::MalformedMerge {
                    index,
                    merge: merge.clone(),
                });
            };
            let joined = format!("{left}{right}");
            for token in [left, right, joined.as_str()] {
                if !ids.contains_key(token) {
                    return Err(TokenizerJsonError::MergeUnknownToken {
                        index,
                        merge: merge.clone(),
                        token: token.to_owned(),
                    });
                }
            }
            Ok([left, right])
        })
        .collect()
}

fn byte_level(use_regex: bool) -> Value {
    json!({
        "type": "ByteLevel",
        "add_prefix_space": false,
        "trim_offsets": false,
        "use_regex": use_regex,
    })
}

fn split_then_byte_level(regex: &str) -> Value {
    json!({
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": { "Regex": regex },
                "behavior": "Isolated",
                "invert": false,
            },
            byte_level(false),
        ],
    })
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

/// Builds a Hugging Face `tokenizer.json` (load it with `tokenizers::Tokenizer::from_str`)
/// equivalent to the GGUF's tokenizer; see the module doc for what is supported.
pub fn build_tokenizer_json(v: &GgufVocab) -> Result<Value, TokenizerJsonError> {
    if v.model != "gpt2" {
        return Err(TokenizerJsonError::UnsupportedModel(v.model.clone()));
    }
    let pre = Pre::from_gguf(v.pre.as_deref())?;
    let ids = validate(v)?;
    let merges = parse_merges(v, &ids)?; // (n_merges, 2)

    let (normalizer, pre_tokenizer) = match pre {
        Pre::Gpt2 => (Value::Null, byte_level(true)),
        Pre::Llama3 => (Value::Null, split_then_byte_level(LLAMA3_REGEX)),
        Pre::Qwen2 => (json!({ "type": "NFC" }), split_then_byte_level(QWEN2_REGEX)),
    };
    let added: Vec<Value> = added_tokens(v)
        .map(|t| {
            let mut entry = t.json();
            entry["id"] = t.id.into();
            entry
        })
        .collect();
    let unk_token = v.unk_id.and_then(|id| v.tokens.get(id as usize));
    // Id order keeps the file deterministic whatever map serde_json is built with.
    let vocab: Map<String, Value> = v
        .tokens
        .iter()
        .zip(0u32..)
        .map(|(token, id)| (token.clone(), id.into()))
        .collect();

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(v),
        "decoder": byte_level(false),
        "model": {
            "type": "BPE",
            "dropout": null,
            // Only bytes without a token are unknown (see the module doc).
            "unk_token": unk_token,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": false,
            "ignore_merges": pre == Pre::Llama3,
            "vocab": vocab,
            "merges": merges,
        },
    }))
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
    // Byte-level decoding is exact; transformers' clean-up would delete spaces before punctuation.
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

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

    use super::*;

    const BYTE0: u32 = 2; // id of byte 0x00 in `synthetic()`
    const T_: u32 = 258; // "Ġt"
    const HE: u32 = 259; // "he"
    const THE_: u32 = 260; // "Ġthe"
    const LL: u32 = 261; // "ll"
    const TOOL: u32 = 262; // "<tool>", user-defined
    const ABC: u32 = 264; // "abc", in the vocabulary but no merge builds it

    fn byte(b: u8) -> u32 {
        BYTE0 + u32::from(b)
    }

    /// Two control tokens, the 256 byte tokens, four merges, a user-defined and an unused
    /// token, and a word no merge reaches.
    fn synthetic() -> GgufVocab {
        let mut tokens = vec!["<|endoftext|>".to_owned(), "<|im_start|>".to_owned()];
        tokens.extend(byte_level_chars().iter().map(char::to_string));
        for t in ["Ġt", "he", "Ġthe", "ll", "<tool>", "[PAD263]", "abc"] {
            tokens.push(t.to_owned());
        }
        let mut token_types = vec![3, 3];
        token_types.extend([1; 256]);
        token_types.extend([1, 1, 1, 1, 4, 5, 1]);
        GgufVocab {
            model: "gpt2".to_owned(),
            pre: Some("smollm".to_owned()),
            tokens,
            token_types,
            merges: ["Ġ t", "h e", "Ġt he", "l l"].map(str::to_owned).to_vec(),
            bos_id: Some(1),
            eos_id: Some(0),
            unk_id: Some(0),
            pad_id: None,
            add_bos: false,
            add_eos: false,
            chat_template: Some("{{ messages }}".to_owned()),
        }
    }

    /// `synthetic()` with the token for byte 0x0A replaced by an unused one.
    fn without_byte_0a() -> GgufVocab {
        let mut v = synthetic();
        v.tokens[byte(0x0A) as usize] = "[UNUSED12]".to_owned();
        v.token_types[byte(0x0A) as usize] = 5;
        v
    }

    fn load(v: &GgufVocab) -> Tokenizer {
        Tokenizer::from_str(&build_tokenizer_json(v).unwrap().to_string()).unwrap()
    }

    fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, true).unwrap().get_ids().to_vec()
    }

    fn with_pre(pre: &str) -> GgufVocab {
        GgufVocab {
            pre: Some(pre.to_owned()),
            ..synthetic()
        }
    }

    fn pre_tokens(tok: &Tokenizer, text: &str) -> Vec<String> {
        let mut s = PreTokenizedString::from(text);
        tok.get_pre_tokenizer()
            .unwrap()
            .pre_tokenize(&mut s)
            .unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(piece, _, _)| piece.to_owned())
            .collect()
    }

    #[test]
    fn byte_level_chars_are_gpt2s() {
        let t = byte_level_chars();
        assert_eq!((t[0x00], t[0x09], t[0x0A], t[0x20]), ('Ā', 'ĉ', 'Ċ', 'Ġ'));
        assert_eq!((t[0x21], t[0x7E], t[0x7F], t[0xA0]), ('!', '~', 'ġ', 'ł'));
        assert_eq!((t[0xA1], t[0xAC], t[0xAD], t[0xAE]), ('¡', '¬', 'Ń', '®'));
        assert_eq!(t[0xFF], 'ÿ');
    }

    #[test]
    fn merges_apply_in_rank_order() {
        let tok = load(&synthetic());
        assert_eq!(ids(&tok, "the"), [byte(b't'), HE]);
        assert_eq!(ids(&tok, " the"), [THE_]);
        assert_eq!(ids(&tok, "hello"), [HE, LL, byte(b'o')]);
        assert_eq!(
            ids(&tok, "the hello"),
            [byte(b't'), HE, byte(b' '), HE, LL, byte(b'o')]
        );
        assert_eq!(ids(&tok, " t"), [T_]);
    }

    #[test]
    fn non_ascii_and_whitespace_fall_back_to_byte_tokens() {
        let tok = load(&synthetic());
        assert_eq!(ids(&tok, "é\n"), [byte(0xC3), byte(0xA9), byte(b'\n')]);
        assert_eq!(
            ids(&tok, "\t 👍"),
            [
                byte(b'\t'),
                byte(b' '),
                byte(0xF0),
                byte(0x9F),
                byte(0x91),
                byte(0x8D)
            ]
        );
    }

    #[test]
    fn control_and_user_defined_tokens_match_inside_text() {
        let tok = load(&synthetic());
        assert_eq!(
            ids(&tok, "<|im_start|>the<|endoftext|>"),
            [1, byte(b't'), HE, 0]
        );
        assert_eq!(ids(&tok, "x<tool>y"), [byte(b'x'), TOOL, byte(b'y')]);
        let not_special: Vec<u32> = "<|im_start|".bytes().map(byte).collect();
        assert_eq!(ids(&tok, "<|im_start|"), not_special);
    }

    #[test]
    fn bytes_without_a_token_become_one_unknown_token_per_run() {
        let tok = load(&without_byte_0a());
        // Pre-tokens: "a", "\n\n", "\n", "b".
        assert_eq!(ids(&tok, "a\n\n\nb"), [byte(b'a'), 0, 0, byte(b'b')]);
        assert_eq!(ids(&tok, "\t\n"), [byte(b'\t'), 0]);
    }

    #[test]
    fn unused_tokens_are_not_matched_in_text() {
        let tok = load(&synthetic());
        let plain: Vec<u32> = "[PAD263]".bytes().map(byte).collect();
        assert_eq!(ids(&tok, "[PAD263]"), plain);
    }

    #[test]
    fn decode_inverts_encode() {
        let tok = load(&synthetic());
        let texts = [
            "",
            "the hello",
            "  two  spaces\t\ttabs \n\n trailing  ",
            "café 日本 👍🏽 e\u{301}",
            "<|im_start|>user\nhi<tool><|endoftext|>",
        ];
        for text in texts {
            let ids = ids(&tok, text);
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
    }

    #[test]
    fn skipping_special_tokens_keeps_user_defined_ones() {
        let tok = load(&synthetic());
        let ids = [1, byte(b't'), HE, TOOL, 0];
        assert_eq!(tok.decode(&ids, true).unwrap(), "the<tool>");
    }

    #[test]
    fn add_bos_and_add_eos_wrap_the_sequence() {
        let v = GgufVocab {
            add_bos: true,
            add_eos: true,
            ..synthetic()
        };
        let tok = load(&v);
        assert_eq!(ids(&tok, "the"), [1, byte(b't'), HE, 0]);
        let bare = tok.encode("the", false).unwrap();
        assert_eq!(bare.get_ids(), [byte(b't'), HE]);
        let pair = tok.encode(("the", " the"), true).unwrap();
        assert_eq!(pair.get_ids(), [1, byte(b't'), HE, 0, 1, THE_, 0]);
        assert_eq!(pair.get_type_ids(), [0, 0, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn without_add_bos_nothing_is_added() {
        let tok = load(&synthetic());
        let pair = tok.encode(("the", " the"), true).unwrap();
        assert_eq!(pair.get_ids(), [byte(b't'), HE, THE_]);
    }

    #[test]
    fn gpt2_family_keeps_digit_runs_and_space_runs_together() {
        for pre in [None, Some("default"), Some("gpt-2"), Some("smollm")] {
            let v = GgufVocab {
                pre: pre.map(str::to_owned),
                ..synthetic()
            };
            let tok = load(&v);
            assert_eq!(
                pre_tokens(&tok, "a  12345"),
                ["a", "Ġ", "Ġ12345"],
                "{pre:?}"
            );
            assert_eq!(
                ids(&tok, "abc"),
                "abc".bytes().map(byte).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn llama3_splits_digits_in_threes_and_ignores_merges_for_whole_words() {
        for pre in ["llama-bpe", "llama3", "llama-v3"] {
            let tok = load(&with_pre(pre));
            assert_eq!(
                pre_tokens(&tok, "a  12345\n\nIt'S"),
                ["a", "Ġ", "Ġ", "123", "45", "ĊĊ", "It", "'S"],
                "{pre}"
            );
            assert_eq!(ids(&tok, "abc"), [ABC]);
        }
    }

    #[test]
    fn qwen2_splits_single_digits_and_composes_nfc() {
        let tok = load(&with_pre("qwen2"));
        assert_eq!(
            pre_tokens(&tok, "a  12345"),
            ["a", "Ġ", "Ġ", "1", "2", "3", "4", "5"]
        );
        assert_eq!(ids(&tok, "e\u{301}"), [byte(0xC3), byte(0xA9)]);
        assert_eq!(
            ids(&tok, "abc"),
            "abc".bytes().map(byte).collect::<Vec<_>>()
        );
    }

    #[test]
    fn unknown_model_or_pre_is_refused() {
        let v = GgufVocab {
            model: "llama".to_owned(),
            ..synthetic()
        };
        assert_eq!(
            build_tokenizer_json(&v),
            Err(TokenizerJsonError::UnsupportedModel("llama".to_owned()))
        );
        assert_eq!(
            build_tokenizer_json(&with_pre("starcoder")),
            Err(TokenizerJsonError::UnsupportedPre("starcoder".to_owned()))
        );
    }

    #[test]
    fn inconsistent_vocabularies_are_refused() {
        use TokenizerJsonError as E;
        let cases: Vec<(GgufVocab, E)> = vec![
            (
                GgufVocab {
                    tokens: vec![],
                    token_types: vec![],
                    ..synthetic()
                },
                E::EmptyVocab,
            ),
            (
                {
                    let mut v = synthetic();
                    v.token_types.pop();
                    v
                },
                E::TokenTypeCount {
                    tokens: 265,
                    types: 264,
                },
            ),
            (
                {
                    let mut v = synthetic();
                    v.token_types[7] = 9;
                    v
                },
                E::UnknownTokenType { id: 7, value: 9 },
            ),
            (
                {
                    let mut v = synthetic();
                    v.tokens[264] = "he".to_owned();
                    v
                },
                E::DuplicateToken {
                    token: "he".to_owned(),
                    first: 259,
                    second: 264,
                },
            ),
            (
                GgufVocab {
                    eos_id: Some(265),
                    ..synthetic()
                },
                E::IdOutOfRange {
                    key: "eos_token_id",
                    id: 265,
                    len: 265,
                },
            ),
            (
                GgufVocab {
                    add_bos: true,
                    bos_id: None,
                    ..synthetic()
                },
                E::MissingSpecialId {
                    flag: "add_bos_token",
                    key: "bos_token_id",
                },
            ),
            (
                GgufVocab {
                    unk_id: None,
                    ..without_byte_0a()
                },
                E::MissingByteToken {
                    byte: 0x0A,
                    token: "Ċ".to_owned(),
                },
            ),
            (
                {
                    let mut v = synthetic();
                    v.merges[1] = "he".to_owned();
                    v
                },
                E::MalformedMerge {
                    index: 1,
                    merge: "he".to_owned(),
                },
            ),
            (
                {
                    let mut v = synthetic();
                    v.merges.push("a  b".to_owned());
                    v
                },
                E::MalformedMerge {
                    index: 4,
                    merge: "a  b".to_owned(),
                },
            ),
            (
                {
                    let mut v = synthetic();
                    v.merges.push("he llo".to_owned());
                    v
                },
                E::MergeUnknownToken {
                    index: 4,
                    merge: "he llo".to_owned(),
                    token: "llo".to_owned(),
                },
            ),
            (
                {
                    let mut v = synthetic();
                    v.merges.push("he ll".to_owned());
                    v
                },
                E::MergeUnknownToken {
                    index: 4,
                    merge: "he ll".to_owned(),
                    token: "hell".to_owned(),
                },
            ),
        ];
        for (v, want) in cases {
            assert_eq!(build_tokenizer_json(&v), Err(want));
        }
    }

    #[test]
    fn errors_read_as_one_line_naming_the_input() {
        let mut v = synthetic();
        v.merges.push("he llo".to_owned());
        let err = build_tokenizer_json(&v).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tokenizer.ggml.merges[4] \"he llo\" needs token \"llo\", which is not in tokenizer.ggml.tokens"
        );
    }

    #[test]
    fn tokenizer_config_has_the_transformers_fields() {
        let entry = |content: &str, special: bool| {
            json!({
                "content": content,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": special,
            })
        };
        let want = json!({
            "add_bos_token": false,
            "add_eos_token": false,
            "added_tokens_decoder": {
                "0": entry("<|endoftext|>", true),
                "1": entry("<|im_start|>", true),
                "262": entry("<tool>", false),
            },
            "bos_token": "<|im_start|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": null,
            "chat_template": "{{ messages }}",
            "clean_up_tokenization_spaces": false,
            "model_max_length": 8192,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        assert_eq!(build_tokenizer_config(&synthetic(), Some(8192)), want);
    }

    #[test]
    fn tokenizer_config_omits_what_the_gguf_lacks() {
        let v = GgufVocab {
            chat_template: None,
            ..synthetic()
        };
        let config = build_tokenizer_config(&v, None);
        assert_eq!(config.get("chat_template"), None);
        assert_eq!(config.get("model_max_length"), None);
    }
}
