//! Pre-tokenizers of byte-level BPE vocabularies, chosen by `tokenizer.ggml.pre`.
//!
//! | `pre`                                    | pre-tokenizer                                          |
//! |------------------------------------------|--------------------------------------------------------|
//! | absent, `default`, `gpt-2`, `phi-2`, `smollm` | ByteLevel with the GPT-2 regex                    |
//! | `llama-bpe`, `llama3`, `llama-v3`, `falcon3`, `pixtral`, `lfm2` | Llama-3 split regex, ByteLevel without regex; whole words in the vocabulary skip the merges |
//! | `qwen2`, `deepseek-r1-qwen`               | NFC, Qwen2 split regex, ByteLevel without regex        |
//! | `qwen35`                                 | Qwen3.5 split regex (combining marks join letters), ByteLevel without regex |
//! | `starcoder`, `refact`                    | every digit alone, then ByteLevel with the GPT-2 regex |
//! | `deepseek-llm`                           | DeepSeek LLM's five splits, every digit alone, ByteLevel without regex |
//!
//! These are the Hugging Face pre-tokenizers of the models the names stand for (llama.cpp's
//! test vectors were made with them). `default` and `smollm` follow transformers' GGUF loader
//! (which ignores `pre`), because that is what the SmolLM2 goldens were made with; llama.cpp
//! (and SmolLM's own Hub tokenizer) additionally isolate every digit first, which gives other
//! ids when several spaces precede a digit (`"a  1"`: here `a Ġ Ġ 1`, llama.cpp `a ĠĠ 1`) or
//! a space precedes a non-ASCII numeral. `qwen2` keeps Qwen2's NFC normalizer, which
//! llama.cpp does not apply (it differs on decomposed text only).

use serde_json::{json, Value};

use super::TokenizerJsonError;

/// The names [`Pre::from_gguf`] accepts, for the error message.
pub const KNOWN: &str = "default, gpt-2, phi-2, smollm, llama-bpe, llama3, llama-v3, falcon3, \
pixtral, lfm2, qwen2, deepseek-r1-qwen, qwen35, starcoder, refact, deepseek-llm";

/// Llama-3's split regex: numbers in groups of up to three digits.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex: Llama-3's with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5's split regex: Qwen2's with combining marks counted as letters.
const QWEN35_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// DeepSeek LLM's splits, applied in turn: line breaks, runs of Latin/Greek/Cyrillic/…
/// letters, runs of ASCII and full-width punctuation, trailing whitespace, runs of CJK.
const DEEPSEEK_LLM_REGEXES: [&str; 5] = [
    r"[\r\n]",
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
];

/// Pre-tokenizer family named by `tokenizer.ggml.pre`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pre {
    Gpt2,
    Llama3,
    Qwen2,
    Qwen35,
    Starcoder,
    DeepseekLlm,
}

impl Pre {
    pub fn from_gguf(pre: Option<&str>) -> Result<Self, TokenizerJsonError> {
        // llama.cpp reads a missing `pre` as "default".
        match pre.unwrap_or("default") {
            "default" | "gpt-2" | "phi-2" | "smollm" => Ok(Pre::Gpt2),
            "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "pixtral" | "lfm2" => Ok(Pre::Llama3),
            "qwen2" | "deepseek-r1-qwen" => Ok(Pre::Qwen2),
            "qwen35" => Ok(Pre::Qwen35),
            "starcoder" | "refact" => Ok(Pre::Starcoder),
            "deepseek-llm" => Ok(Pre::DeepseekLlm),
            other => Err(TokenizerJsonError::UnsupportedPre(other.to_owned())),
        }
    }

    /// The `normalizer` entry of `tokenizer.json`.
    pub fn normalizer(self) -> Value {
        match self {
            Pre::Qwen2 => json!({ "type": "NFC" }),
            _ => Value::Null,
        }
    }

    /// The `pre_tokenizer` entry of `tokenizer.json`.
    pub fn pre_tokenizer(self) -> Value {
        let mut steps = match self {
            Pre::Gpt2 => return byte_level(true),
            Pre::Llama3 => vec![split(LLAMA3_REGEX)],
            Pre::Qwen2 => vec![split(QWEN2_REGEX)],
            Pre::Qwen35 => vec![split(QWEN35_REGEX)],
            Pre::Starcoder => vec![digits()],
            Pre::DeepseekLlm => {
                let mut steps: Vec<Value> = DEEPSEEK_LLM_REGEXES.iter().map(|r| split(r)).collect();
                steps.push(digits());
                steps
            }
        };
        steps.push(byte_level(self == Pre::Starcoder));
        json!({ "type": "Sequence", "pretokenizers": steps })
    }

    /// Whether a pre-token that is itself in the vocabulary skips the merges (Llama 3's
    /// tokenizer.json sets `ignore_merges`, and llama.cpp follows it).
    pub fn ignore_merges(self) -> bool {
        self == Pre::Llama3
    }
}

/// GPT-2's byte → char mapping, with or without its split regex first.
pub fn byte_level(use_regex: bool) -> Value {
    json!({
        "type": "ByteLevel",
        "add_prefix_space": false,
        "trim_offsets": false,
        "use_regex": use_regex,
    })
}

fn split(regex: &str) -> Value {
    json!({
        "type": "Split",
        "pattern": { "Regex": regex },
        "behavior": "Isolated",
        "invert": false,
    })
}

fn digits() -> Value {
    json!({ "type": "Digits", "individual_digits": true })
}
