//! Wraps `tokenizers`; an incremental decoder that never splits UTF-8.
