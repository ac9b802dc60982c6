//! GGUF reader over an mmap, and dequantization of its tensor types.
