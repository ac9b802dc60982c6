//! `edgelm tokenize`: the token ids of a text, on one line.
//!
//! By default nothing is added and special-token text is tokenized as plain text, as in
//! llama.cpp's tokenizer tests (`common_tokenize(ctx, text, false, false)`); user-defined
//! added tokens still match.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::tokenizer::Tokenizer;

/// Where the text comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizeInput {
    /// The text itself.
    Text(String),
    /// A UTF-8 file, taken as it is (a final newline is part of the text).
    File(PathBuf),
}

/// Options of `edgelm tokenize`.
#[derive(Debug, Clone)]
pub struct TokenizeOptions {
    /// A bundle directory or a `.gguf` file (a vocabulary-only GGUF is enough).
    pub model: PathBuf,
    /// The text.
    pub input: TokenizeInput,
    /// Add what the model adds around a raw prompt (its BOS token, for models that use one),
    /// as `edgelm run` does.
    pub bos: bool,
    /// Turn special-token text (`<|im_start|>`) into its token.
    pub special: bool,
}

/// The ids of the text as `opts` asks.
pub fn token_ids(opts: &TokenizeOptions) -> Result<Vec<u32>> {
    let text = match &opts.input {
        TokenizeInput::Text(text) => text.clone(),
        TokenizeInput::File(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading \"{}\"", path.display()))?;
            String::from_utf8(bytes)
                .with_context(|| format!("\"{}\" is not UTF-8 text", path.display()))?
        }
    };
    let mut tokenizer = Tokenizer::from_model(&opts.model)?;
    tokenizer.set_parse_special(opts.special);
    tokenizer.encode(&text, opts.bos)
}

/// Runs `edgelm tokenize`: the ids, space-separated, on one line of `out`.
pub fn tokenize(opts: &TokenizeOptions, out: &mut dyn Write) -> Result<()> {
    let ids = token_ids(opts)?;
    let line: Vec<String> = ids.iter().map(u32::to_string).collect();
    writeln!(out, "{}", line.join(" ")).context("writing to stdout")?;
    out.flush().context("writing to stdout")
}
