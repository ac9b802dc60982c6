//! Byte-level vocabularies, the pre-tokenizers, and what both vocabulary kinds share
//! (validation, added tokens, post-processor, `tokenizer_config.json`), on a synthetic vocabulary.

use std::str::FromStr;

use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer};

use super::bpe::byte_level_chars;
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
        ..GgufVocab::default()
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
fn qwen35_keeps_combining_marks_with_their_letters_and_does_not_compose() {
    let tok = load(&with_pre("qwen35"));
    assert_eq!(pre_tokens(&tok, "e\u{301}t 12"), ["eÌģt", "Ġ", "1", "2"]);
}

#[test]
fn starcoder_isolates_every_digit_before_the_gpt2_regex() {
    for pre in ["starcoder", "refact"] {
        let tok = load(&with_pre(pre));
        assert_eq!(
            pre_tokens(&tok, "a  12 x"),
            ["a", "ĠĠ", "1", "2", "Ġx"],
            "{pre}"
        );
    }
}

#[test]
fn deepseek_llm_splits_lines_letters_punctuation_cjk_and_digits() {
    let tok = load(&with_pre("deepseek-llm"));
    assert_eq!(
        pre_tokens(&tok, "Hi, 你好\n42!"),
        ["Hi", ",", "Ġ", "ä½łå¥½", "Ċ", "4", "2", "!"]
    );
}

#[test]
fn phi3_chat_tokens_swallow_the_whitespace_after_them() {
    let mut v = synthetic();
    v.name = Some("phi-3 mini".to_owned());
    let tok = load(&v);
    assert_eq!(ids(&tok, "<|im_start|>\n the"), [1, byte(b't'), HE]);
    // `<|endoftext|>` keeps it, as llama.cpp and transformers' Phi-3 tokenizer do.
    assert_eq!(ids(&tok, "<|endoftext|> the"), [0, THE_]);
}

#[test]
fn unknown_model_or_pre_is_refused() {
    let v = GgufVocab {
        model: "t5".to_owned(),
        ..synthetic()
    };
    assert_eq!(
        build_tokenizer_json(&v),
        Err(TokenizerJsonError::UnsupportedModel("t5".to_owned()))
    );
    assert_eq!(
        build_tokenizer_json(&with_pre("tekken")),
        Err(TokenizerJsonError::UnsupportedPre("tekken".to_owned()))
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
