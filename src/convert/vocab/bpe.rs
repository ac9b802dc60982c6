//! Byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`): GPT-2's byte → char map,
//! the merges as stored, the pre-tokenizer of [`super::pre`].
//!
//! Not every byte-level vocabulary has all 256 byte tokens: SmolLM2's lacks 21 (0x04, 0x06,
//! 0x13, 0x14, 0x16, 0x1D, the lead bytes 0xF1 / 0xF2 of planes 4–11, and bytes that never
//! occur in UTF-8). A run of such bytes within a pre-token encodes as one unknown token, as
//! transformers does (llama.cpp drops them); without `unknown_token_id` the vocabulary is
//! refused. The decoder is plain ByteLevel, so `decode(encode(s)) == s` whenever every byte of
//! `s` has a token (for `qwen2`, for NFC `s`).

use std::collections::HashMap;

use serde_json::json;

use super::pre::{byte_level, Pre};
use super::{vocab_json, GgufVocab, Parts, TokenizerJsonError};

/// GPT-2's reversible byte → char map: printable Latin-1 bytes stand for themselves, the other
/// 68 bytes take U+0100.. in byte order, so every token is a printable string.
pub fn byte_level_chars() -> [char; 256] {
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

/// Normalizer, pre-tokenizer, decoder and BPE model of a byte-level vocabulary.
pub(super) fn parts(
    v: &GgufVocab,
    ids: &HashMap<&str, u32>,
    pre: Pre,
) -> Result<Parts, TokenizerJsonError> {
    if v.unk_id.is_none() {
        // Otherwise `tokenizers` would silently drop the byte.
        for (byte, ch) in (0u8..=255).zip(byte_level_chars()) {
            let token = ch.to_string();
            if !ids.contains_key(token.as_str()) {
                return Err(TokenizerJsonError::MissingByteToken { byte, token });
            }
        }
    }
    let merges = parse_merges(v, ids)?; // (n_merges, 2)
    let unk_token = v.unk_id.and_then(|id| v.tokens.get(id as usize));
    Ok(Parts {
        normalizer: pre.normalizer(),
        pre_tokenizer: pre.pre_tokenizer(),
        decoder: byte_level(false),
        model: json!({
            "type": "BPE",
            "dropout": null,
            // Only bytes without a token are unknown (see the module doc).
            "unk_token": unk_token,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": false,
            "ignore_merges": pre.ignore_merges(),
            "vocab": vocab_json(v),
            "merges": merges,
        }),
    })
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
