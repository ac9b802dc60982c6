//! Chat templates from `tokenizer_config.json`, rendered with minijinja.
