//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`: Llama 2, TinyLlama, Phi-3,
//! Gemma) as a `tokenizers` BPE model.
//!
//! llama.cpp's SentencePiece tokenizer turns spaces into `▁`, puts a `▁` in front of each
//! piece of text (at the start and after every added token) unless
//! `tokenizer.ggml.add_space_prefix` is false (Gemma), then merges adjacent symbols, the pair
//! whose merged token scores highest first and the leftmost among equal scores; a character
//! no token covers falls back to its `<0xNN>` byte tokens.
//!
//! In `tokenizer.json` terms: the normalizer prepends `▁` and replaces spaces (`tokenizers`
//! normalizes each piece between added tokens on its own, so the prefix lands where
//! llama.cpp puts it, also before text that starts with a space); no pre-tokenizer (a piece
//! is one word); a BPE model with byte fallback whose merges are every split of every token
//! into two tokens, ranked by the merged token's score, then its id, then the two sides' ids
//! (the order of transformers' SentencePiece converter). BPE applies the lowest-ranked
//! adjacent pair first and the leftmost among equal ranks, which is the SentencePiece rule
//! except where two different tokens share a score: there the id decides, not the position.
//! Vocabularies converted from a `tokenizer.json` without scores (every score -1000, as in
//! the SentencePiece test fixture) rank by id, that is in the order the BPE trainer made them.
//!
//! transformers' own Llama tokenizers (Metaspace, `prepend_scheme: "first"`) put no `▁` in
//! front of text that already starts with a space, nor after a special token; for a GGUF we
//! follow llama.cpp. The decoder undoes the `▁`s, joins byte tokens and, with the prefix,
//! strips the first leading space.

use std::cmp::Ordering;
use std::collections::HashMap;

use serde_json::{json, Value};

use super::{vocab_json, GgufVocab, Parts, TokenizerJsonError};

/// SentencePiece's visible space.
const SPACE: &str = "\u{2581}";

/// Normalizer, decoder and BPE model of a SentencePiece vocabulary.
pub(super) fn parts(v: &GgufVocab, ids: &HashMap<&str, u32>) -> Result<Parts, TokenizerJsonError> {
    if v.scores.len() != v.tokens.len() {
        return Err(TokenizerJsonError::ScoreCount {
            tokens: v.tokens.len(),
            scores: v.scores.len(),
        });
    }
    if let Some(id) = (0u32..).zip(&v.scores).find(|(_, s)| s.is_nan()) {
        return Err(TokenizerJsonError::NanScore(id.0));
    }
    if v.unk_id.is_none() {
        // Byte fallback needs every byte's token, or an unknown token to stand in.
        for byte in 0u8..=255 {
            let token = byte_token(byte);
            if !ids.contains_key(token.as_str()) {
                return Err(TokenizerJsonError::MissingByteToken { byte, token });
            }
        }
    }
    let prefix = v.add_space_prefix.unwrap_or(true);
    let replace_space = json!({
        "type": "Replace",
        "pattern": { "String": " " },
        "content": SPACE,
    });
    let normalizer = if prefix {
        json!({
            "type": "Sequence",
            "normalizers": [{ "type": "Prepend", "prepend": SPACE }, replace_space],
        })
    } else {
        replace_space
    };
    let mut decoders = vec![
        json!({ "type": "Replace", "pattern": { "String": SPACE }, "content": " " }),
        json!({ "type": "ByteFallback" }),
        json!({ "type": "Fuse" }),
    ];
    if prefix {
        decoders.push(json!({ "type": "Strip", "content": " ", "start": 1, "stop": 0 }));
    }
    let unk_token = v.unk_id.and_then(|id| v.tokens.get(id as usize));
    Ok(Parts {
        normalizer,
        pre_tokenizer: Value::Null,
        decoder: json!({ "type": "Sequence", "decoders": decoders }),
        model: json!({
            "type": "BPE",
            "dropout": null,
            "unk_token": unk_token,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab_json(v),
            "merges": merges(v, ids),
        }),
    })
}

/// `<0xNN>`, SentencePiece's token for a byte.
pub fn byte_token(byte: u8) -> String {
    format!("<0x{byte:02X}>")
}

/// Every split of every token into two tokens, in rank order (see the module doc).
fn merges<'a>(v: &'a GgufVocab, ids: &HashMap<&str, u32>) -> Vec<[&'a str; 2]> {
    struct Merge<'a> {
        score: f32,
        id: u32,
        sides: [u32; 2],
        pair: [&'a str; 2],
    }
    let mut merges = Vec::new();
    for (id, token) in (0u32..).zip(&v.tokens) {
        for (at, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(at);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                merges.push(Merge {
                    score: v.scores[id as usize],
                    id,
                    sides: [l, r],
                    pair: [left, right],
                });
            }
        }
    }
    // Scores were checked for NaN; -0.0 and 0.0 tie, as in Python.
    merges.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(Ordering::Equal)
            .then(a.id.cmp(&b.id))
            .then(a.sides.cmp(&b.sides))
    });
    merges.into_iter().map(|m| m.pair).collect()
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use tokenizers::Tokenizer;

    use super::*;
    use crate::convert::vocab::build_tokenizer_json;

    const UNK: u32 = 0;
    const BOS: u32 = 1;
    const BYTE0: u32 = 3; // `<0x00>`; the 256 byte tokens follow
    const SP: u32 = 259; // "▁"

    /// `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then pieces with their scores.
    fn vocab(pieces: &[(&str, f32)]) -> GgufVocab {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
        tokens.extend((0..=255).map(byte_token));
        let mut token_types = vec![2, 3, 3];
        token_types.extend([6; 256]);
        let mut scores = vec![0.0; tokens.len()];
        for (piece, score) in pieces {
            tokens.push(piece.to_string());
            token_types.push(1);
            scores.push(*score);
        }
        GgufVocab {
            model: "llama".to_owned(),
            tokens,
            token_types,
            scores,
            bos_id: Some(BOS),
            eos_id: Some(2),
            unk_id: Some(UNK),
            add_bos: true,
            ..GgufVocab::default()
        }
    }

    fn load(v: &GgufVocab) -> Tokenizer {
        Tokenizer::from_str(&build_tokenizer_json(v).unwrap().to_string()).unwrap()
    }

    fn ids(tok: &Tokenizer, text: &str, bos: bool) -> Vec<u32> {
        tok.encode(text, bos).unwrap().get_ids().to_vec()
    }

    /// ▁=259, a=260, b=261, c=262, then merged pieces.
    fn abc(extra: &[(&str, f32)]) -> GgufVocab {
        let mut pieces = vec![("▁", -1.0), ("a", -2.0), ("b", -3.0), ("c", -4.0)];
        pieces.extend_from_slice(extra);
        vocab(&pieces)
    }

    #[test]
    fn the_highest_scoring_merge_wins() {
        // "abc": ab (263) scores above bc (264), so a+b first, then ab+c is not a token.
        let tok = load(&abc(&[("ab", -5.0), ("bc", -6.0), ("▁a", -7.0)]));
        assert_eq!(ids(&tok, "abc", false), [SP, 263, 262]);
        // With bc above ab, b+c first.
        let tok = load(&abc(&[("ab", -6.0), ("bc", -5.0), ("▁a", -7.0)]));
        assert_eq!(ids(&tok, "abc", false), [265, 264]);
    }

    #[test]
    fn a_space_mark_goes_before_every_piece_of_text() {
        let tok = load(&abc(&[("▁a", -5.0)]));
        assert_eq!(ids(&tok, "a b", false), [263, SP, 261]);
        // Also before text that starts with a space, as llama.cpp does.
        assert_eq!(ids(&tok, " a", false), [SP, 263]);
        assert_eq!(ids(&tok, "a", true), [BOS, 263]);
        // And after a special token.
        assert_eq!(ids(&tok, "<s>a", false), [BOS, 263]);
        assert_eq!(tok.decode(&[BOS, 263, SP, 261], true).unwrap(), "a b");
    }

    #[test]
    fn without_add_space_prefix_no_mark_is_added() {
        let v = GgufVocab {
            add_space_prefix: Some(false),
            ..abc(&[("▁a", -5.0)])
        };
        let tok = load(&v);
        assert_eq!(ids(&tok, "a a", false), [260, 263]);
        assert_eq!(tok.decode(&[SP, 260], false).unwrap(), " a");
    }

    #[test]
    fn characters_without_a_token_fall_back_to_bytes() {
        let tok = load(&abc(&[]));
        let e_acute = [BYTE0 + 0xC3, BYTE0 + 0xA9];
        assert_eq!(ids(&tok, "é", false), [SP, e_acute[0], e_acute[1]]);
        assert_eq!(
            tok.decode(&[SP, e_acute[0], e_acute[1]], false).unwrap(),
            "é"
        );
    }

    #[test]
    fn merges_rank_by_score_then_id_then_sides() {
        let v = abc(&[("ab", -5.0), ("abc", -5.0), ("bc", -4.5)]);
        let ids: HashMap<&str, u32> = v.tokens.iter().map(String::as_str).zip(0u32..).collect();
        assert_eq!(
            merges(&v, &ids),
            [["b", "c"], ["a", "b"], ["a", "bc"], ["ab", "c"]]
        );
    }

    #[test]
    fn missing_scores_bytes_or_nan_are_refused() {
        let mut v = abc(&[]);
        v.scores.pop();
        assert_eq!(
            build_tokenizer_json(&v),
            Err(TokenizerJsonError::ScoreCount {
                tokens: 263,
                scores: 262
            })
        );
        let mut v = abc(&[]);
        v.scores[261] = f32::NAN;
        assert_eq!(
            build_tokenizer_json(&v),
            Err(TokenizerJsonError::NanScore(261))
        );
        let mut v = GgufVocab {
            unk_id: None,
            ..abc(&[])
        };
        v.tokens[(BYTE0 + 0x0A) as usize] = "<newline>".to_owned();
        assert_eq!(
            build_tokenizer_json(&v),
            Err(TokenizerJsonError::MissingByteToken {
                byte: 0x0A,
                token: "<0x0A>".to_owned()
            })
        );
    }
}
