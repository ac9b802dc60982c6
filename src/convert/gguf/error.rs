//! Everything that can go wrong reading a GGUF file or dequantizing its tensors.

use std::path::PathBuf;

use thiserror::Error;

use super::{MAX_ARRAY_DEPTH, MAX_DIMS};

/// Everything that can go wrong reading a GGUF file or dequantizing its tensors.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened, sized or mapped.
    #[error("opening GGUF file {path:?}: {error}")]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A parse error inside a named file.
    #[error("GGUF file {path:?}: {error}")]
    File {
        path: PathBuf,
        error: Box<GgufError>,
    },
    /// The first four bytes are not "GGUF".
    #[error("not a GGUF file: starts with \"{found}\", expected \"GGUF\"")]
    BadMagic { found: String },
    /// A version this reader does not know.
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    /// A big-endian GGUF file (its version reads byte-swapped).
    #[error("big-endian GGUF files are not supported (version field reads {0})")]
    BigEndian(u32),
    /// A field runs past the end of the file.
    #[error("{context}: {what} at byte {offset} needs {needed} bytes, only {available} remain")]
    Truncated {
        context: String,
        what: &'static str,
        offset: u64,
        needed: u64,
        available: u64,
    },
    /// A count or length larger than the remaining bytes could possibly hold.
    #[error("{context}: {what} {count} at byte {offset} cannot fit in the {available} bytes left")]
    CountTooLarge {
        context: String,
        what: &'static str,
        count: u64,
        offset: u64,
        available: u64,
    },
    /// A metadata value type id outside the GGUF specification.
    #[error("{context}: unknown metadata value type {type_id} at byte {offset}")]
    UnknownValueType {
        context: String,
        type_id: u32,
        offset: u64,
    },
    /// Arrays nested deeper than [`MAX_ARRAY_DEPTH`].
    #[error("{context}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels at byte {offset}")]
    ArrayTooDeep { context: String, offset: u64 },
    /// A string that is not UTF-8.
    #[error("{context}: string at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { context: String, offset: u64 },
    /// A boolean byte other than 0 or 1.
    #[error("{context}: boolean at byte {offset} is {value}, expected 0 or 1")]
    InvalidBool {
        context: String,
        offset: u64,
        value: u8,
    },
    /// The same metadata key twice.
    #[error("metadata key {key:?} appears twice")]
    DuplicateKey { key: String },
    /// The same tensor name twice.
    #[error("tensor {tensor:?} appears twice")]
    DuplicateTensor { tensor: String },
    /// More dimensions than ggml supports.
    #[error("tensor {tensor:?}: {n_dims} dimensions, at most {MAX_DIMS} are supported")]
    TooManyDims { tensor: String, n_dims: u32 },
    /// A ggml type id this reader does not know.
    #[error("tensor {tensor:?}: unknown ggml type id {type_id}")]
    UnknownGgmlType { tensor: String, type_id: u32 },
    /// Dimensions whose product (or byte size) overflows.
    #[error("tensor {tensor:?}: dimensions {dims:?} are too large")]
    ShapeOverflow { tensor: String, dims: Vec<u64> },
    /// Rows that do not hold a whole number of blocks.
    #[error("tensor {tensor:?}: innermost dimension {dim0} is not a multiple of the {ty} block length {block_len}")]
    PartialBlock {
        tensor: String,
        ty: &'static str,
        dim0: u64,
        block_len: usize,
    },
    /// A tensor offset not on the alignment.
    #[error(
        "tensor {tensor:?}: data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    /// Tensor data that does not lie inside the file.
    #[error("tensor {tensor:?}: {size} bytes at data offset {offset} (data section at byte {data_start}) run past the end of the file ({file_len} bytes)")]
    TensorOutOfBounds {
        tensor: String,
        offset: u64,
        size: u64,
        data_start: u64,
        file_len: u64,
    },
    /// `general.alignment` that is not a usable power of two.
    #[error("general.alignment is {0}, expected a power of two below 2^32")]
    BadAlignment(String),
    /// A required metadata key is absent.
    #[error("metadata key {key:?} is missing")]
    MissingKey { key: String },
    /// A metadata value of the wrong type.
    #[error("metadata key {key:?} is {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    /// A tensor whose type cannot be dequantized (yet).
    #[error("tensor {tensor:?}: dequantizing {ty} is not supported")]
    UnsupportedTensorType { tensor: String, ty: &'static str },
    /// A type that cannot be dequantized (yet).
    #[error("dequantizing {ty} is not supported")]
    UnsupportedType { ty: &'static str },
    /// Input bytes and output length that disagree for the type.
    #[error("dequantizing {ty}: {bytes} bytes cannot fill exactly {values} values")]
    SizeMismatch {
        ty: &'static str,
        bytes: usize,
        values: usize,
    },
    /// A tensor with more elements than this platform can address.
    #[error("tensor {tensor:?}: {n_elements} elements do not fit in memory on this platform")]
    TooLarge { tensor: String, n_elements: u64 },
}
