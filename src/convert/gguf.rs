//! GGUF reader over an mmap, and dequantization of its tensor types.
//!
//! The file is untrusted input: every count, length, offset and size is checked against the
//! bytes that are actually there before anything is allocated or sliced, so a truncated or
//! lying file gives a one-line [`GgufError`], never a panic or a giant allocation.
//! Layout (little-endian): magic "GGUF", version (2 or 3), tensor count, key/value count,
//! the key/values, the tensor infos, padding to `general.alignment`, the data section.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use thiserror::Error;

pub use super::dequant::{dequantize_into, f16_to_f32};

/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Deepest nesting of metadata arrays accepted; bounds the parser's recursion.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;

/// Fewest bytes a key/value can take: key length, value type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Fewest bytes a tensor info can take: name length, dimension count, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// Everything that can go wrong reading a GGUF file or dequantizing its tensors.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened, sized or mapped.
    #[error("opening GGUF file {path:?}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A parse error inside a named file.
    #[error("GGUF file {path:?}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: Box<GgufError>,
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

/// A ggml tensor element type, with the id GGUF stores for it.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgmlType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16: the top half of an f32.
    BF16,
    /// 64-bit IEEE float.
    F64,
    /// 8-bit signed integer.
    I8,
    /// 16-bit signed integer.
    I16,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// 4-bit, 32 per block, f16 scale.
    Q4_0,
    /// 4-bit, 32 per block, f16 scale and min.
    Q4_1,
    /// 5-bit, 32 per block, f16 scale.
    Q5_0,
    /// 5-bit, 32 per block, f16 scale and min.
    Q5_1,
    /// 8-bit, 32 per block, f16 scale.
    Q8_0,
    /// 8-bit, 32 per block, f16 scale and sum (intermediate type).
    Q8_1,
    /// 2-bit k-quant, 256 per super-block.
    Q2_K,
    /// 3-bit k-quant, 256 per super-block.
    Q3_K,
    /// 4-bit k-quant, 256 per super-block.
    Q4_K,
    /// 5-bit k-quant, 256 per super-block.
    Q5_K,
    /// 6-bit k-quant, 256 per super-block.
    Q6_K,
    /// 8-bit k-quant, 256 per block, f32 scale (intermediate type).
    Q8_K,
    /// i-quant, 2.06 bits per weight.
    IQ2_XXS,
    /// i-quant, 2.31 bits per weight.
    IQ2_XS,
    /// i-quant, 3.06 bits per weight.
    IQ3_XXS,
    /// i-quant, 1.56 bits per weight.
    IQ1_S,
    /// i-quant, 4.5 bits per weight, non-linear.
    IQ4_NL,
    /// i-quant, 3.44 bits per weight.
    IQ3_S,
    /// i-quant, 2.56 bits per weight.
    IQ2_S,
    /// i-quant, 4.25 bits per weight.
    IQ4_XS,
    /// i-quant, 1.75 bits per weight.
    IQ1_M,
    /// ternary, 1.69 bits per weight.
    TQ1_0,
    /// ternary, 2.06 bits per weight.
    TQ2_0,
    /// microscaling FP4, 32 per block, e8m0 scale.
    MXFP4,
}

impl GgmlType {
    /// Every known type, in id order.
    pub const ALL: [GgmlType; 32] = {
        use GgmlType::*;
        [
            F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K,
            IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, I8, I16, I32, I64, F64,
            IQ1_M, BF16, TQ1_0, TQ2_0, MXFP4,
        ]
    };

    /// (GGUF id, name, values per block, bytes per block), as in ggml's `type_traits`.
    fn traits(self) -> (u32, &'static str, usize, usize) {
        use GgmlType::*;
        const QK_K: usize = 256;
        match self {
            F32 => (0, "F32", 1, 4),
            F16 => (1, "F16", 1, 2),
            Q4_0 => (2, "Q4_0", 32, 2 + 16),
            Q4_1 => (3, "Q4_1", 32, 2 + 2 + 16),
            Q5_0 => (6, "Q5_0", 32, 2 + 4 + 16),
            Q5_1 => (7, "Q5_1", 32, 2 + 2 + 4 + 16),
            Q8_0 => (8, "Q8_0", 32, 2 + 32),
            // Two f16 (d, s) and 32 int8, as `block_q8_1` is today.
            Q8_1 => (9, "Q8_1", 32, 2 + 2 + 32),
            Q2_K => (10, "Q2_K", QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            Q3_K => (11, "Q3_K", QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            Q4_K => (12, "Q4_K", QK_K, 2 + 2 + QK_K / 2 + 12),
            Q5_K => (13, "Q5_K", QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            Q6_K => (14, "Q6_K", QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            Q8_K => (15, "Q8_K", QK_K, 4 + QK_K + QK_K / 8),
            IQ2_XXS => (16, "IQ2_XXS", QK_K, 2 + QK_K / 4),
            IQ2_XS => (17, "IQ2_XS", QK_K, 2 + QK_K / 4 + QK_K / 32),
            IQ3_XXS => (18, "IQ3_XXS", QK_K, 2 + QK_K / 4 + QK_K / 8),
            IQ1_S => (19, "IQ1_S", QK_K, 2 + QK_K / 8 + QK_K / 16),
            IQ4_NL => (20, "IQ4_NL", 32, 2 + 16),
            IQ3_S => (21, "IQ3_S", QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            IQ2_S => (22, "IQ2_S", QK_K, 2 + QK_K / 4 + QK_K / 16),
            IQ4_XS => (23, "IQ4_XS", QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            I8 => (24, "I8", 1, 1),
            I16 => (25, "I16", 1, 2),
            I32 => (26, "I32", 1, 4),
            I64 => (27, "I64", 1, 8),
            F64 => (28, "F64", 1, 8),
            IQ1_M => (29, "IQ1_M", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            BF16 => (30, "BF16", 1, 2),
            TQ1_0 => (34, "TQ1_0", QK_K, 2 + 4 * 13),
            TQ2_0 => (35, "TQ2_0", QK_K, 2 + 64),
            MXFP4 => (39, "MXFP4", 32, 1 + 16),
        }
    }

    /// The type with this GGUF/ggml id, if known.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The id GGUF stores for this type.
    pub fn id(self) -> u32 {
        self.traits().0
    }

    /// Values per block (1 for plain float and integer types).
    pub fn block_len(self) -> usize {
        self.traits().2
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.traits().3
    }

    /// ggml's name for the type, upper case ("Q4_K").
    pub fn name(self) -> &'static str {
        self.traits().1
    }

    /// Whether [`dequantize_into`] supports this type.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2_K
                | Q3_K
                | Q4_K
                | Q5_K
                | Q6_K
                | Q8_K
        )
    }

    /// Bytes that `n_elements` values take, or `None` on overflow or a partial block.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let block_len = self.block_len() as u64;
        if !n_elements.is_multiple_of(block_len) {
            return None;
        }
        (n_elements / block_len).checked_mul(self.block_bytes() as u64)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value, of one of the GGUF value types.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// A GGUF u8 value.
    U8(u8),
    /// A GGUF i8 value.
    I8(i8),
    /// A GGUF u16 value.
    U16(u16),
    /// A GGUF i16 value.
    I16(i16),
    /// A GGUF u32 value.
    U32(u32),
    /// A GGUF i32 value.
    I32(i32),
    /// A GGUF u64 value.
    U64(u64),
    /// A GGUF i64 value.
    I64(i64),
    /// A GGUF f32 value.
    F32(f32),
    /// A GGUF f64 value.
    F64(f64),
    /// A GGUF bool (stored as one byte, 0 or 1) value.
    Bool(bool),
    /// A GGUF UTF-8 string value.
    String(String),
    /// Elements all of one type; nested arrays allowed.
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value's type as GGUF names it in messages ("u32", "string", "array").
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F32(_) => "f32",
            MetaValue::F64(_) => "f64",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
        }
    }

    /// The value as an i128 if it is of an integer type.
    fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as an f32 if it is F32 or F64 (F64 rounded to nearest).
    fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }
}

/// One tensor's header: name, shape, type and where its data starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. "blk.0.attn_q.weight".
    pub name: String,
    /// GGUF order: dims[0] is the contiguous (innermost) axis.
    pub dims: Vec<u64>,
    /// Element type of the data.
    pub ggml_type: GgmlType,
    /// Byte offset relative to the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of values (1 for a tensor without dimensions).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }

    /// The shape outermost first, as row-major code wants it (dims reversed).
    pub fn shape_row_major(&self) -> Vec<usize> {
        // Each dim was checked to fit usize when the file was opened.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Bytes of data the tensor takes in the file.
    pub fn n_bytes(&self) -> u64 {
        self.ggml_type
            .bytes_for(self.n_elements())
            .unwrap_or(u64::MAX)
    }
}

/// The file's bytes: mapped, or owned (tests, fuzzing, files too small to map).
enum Storage {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A validated GGUF file: metadata, tensor infos and the bytes they point into.
pub struct Gguf {
    storage: Storage,
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    /// Absolute file offset of the data section.
    data_start: u64,
}

impl fmt::Debug for Gguf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_start", &self.data_start)
            .finish()
    }
}

impl Gguf {
    /// Maps and validates the file at `path`; errors name the path.
    pub fn open(path: &Path) -> Result<Gguf, GgufError> {
        let open_err = |source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        let storage = if len == 0 {
            // Some platforms refuse to map an empty file; it fails validation either way.
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the mapping is read-only and every access is bounds-checked against its
            // length; as with any mmap, another process truncating the file meanwhile is outside
            // what we can guard against.
            Storage::Mmap(unsafe { Mmap::map(&file) }.map_err(open_err)?)
        };
        Gguf::from_storage(storage).map_err(|e| GgufError::File {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Validates an in-memory GGUF file (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Gguf, GgufError> {
        Gguf::from_storage(Storage::Owned(bytes))
    }

    fn from_storage(storage: Storage) -> Result<Gguf, GgufError> {
        let p = parse(storage.bytes())?;
        Ok(Gguf {
            storage,
            version: p.version,
            metadata: p.metadata,
            key_index: p.key_index,
            tensors: p.tensors,
            tensor_index: p.tensor_index,
            alignment: p.alignment,
            data_start: p.data_start,
        })
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All key/values, in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_string(),
        })
    }

    /// The string value of `key`; missing key or another type is an error naming the key.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            MetaValue::String(s) => Ok(s),
            v => Err(wrong_type(key, "a string", v)),
        }
    }

    /// The value of `key` if it is an integer of any type and not negative.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_integer()
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(|| wrong_type(key, NON_NEGATIVE, v))
    }

    /// The value of `key` if it is F32 or F64 (F64 rounded to nearest f32).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        let v = self.require(key)?;
        v.as_f32().ok_or_else(|| wrong_type(key, "a float", v))
    }

    /// The boolean value of `key`.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            MetaValue::Bool(b) => Ok(*b),
            v => Err(wrong_type(key, "a bool", v)),
        }
    }

    fn require_array(&self, key: &str, expected: &'static str) -> Result<&[MetaValue], GgufError> {
        match self.require(key)? {
            MetaValue::Array(a) => Ok(a),
            v => Err(wrong_type(key, expected, v)),
        }
    }

    /// The value of `key` if it is an array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        const EXPECTED: &str = "an array of strings";
        self.require_array(key, EXPECTED)?
            .iter()
            .map(|v| match v {
                MetaValue::String(s) => Ok(s.as_str()),
                v => Err(wrong_element_type(key, EXPECTED, v)),
            })
            .collect()
    }

    /// The value of `key` if it is an array of integers of any type that fit in i64.
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        const EXPECTED: &str = "an array of integers";
        self.require_array(key, EXPECTED)?
            .iter()
            .map(|v| {
                v.as_integer()
                    .and_then(|i| i64::try_from(i).ok())
                    .ok_or_else(|| wrong_element_type(key, EXPECTED, v))
            })
            .collect()
    }

    /// The value of `key` if it is an array of F32 or F64 (F64 rounded to nearest f32).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        const EXPECTED: &str = "an array of floats";
        self.require_array(key, EXPECTED)?
            .iter()
            .map(|v| {
                v.as_f32()
                    .ok_or_else(|| wrong_element_type(key, EXPECTED, v))
            })
            .collect()
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The data alignment in bytes (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset where the data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_start
    }

    /// The raw bytes of a tensor of this file (bounds validated at open); a `TensorInfo` from
    /// elsewhere that does not lie inside the file gets an empty slice.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let range = self.data_start.checked_add(t.offset).and_then(|start| {
            let end = start.checked_add(t.n_bytes())?;
            Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
        });
        range
            .and_then(|r| self.storage.bytes().get(r))
            .unwrap_or(&[])
    }

    /// The tensor's values as f32, row-major in `t.shape_row_major()` order.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        if !t.ggml_type.can_dequantize() {
            return Err(GgufError::UnsupportedTensorType {
                tensor: t.name.clone(),
                ty: t.ggml_type.name(),
            });
        }
        let n_elements = t.n_elements();
        let n = usize::try_from(n_elements).map_err(|_| GgufError::TooLarge {
            tensor: t.name.clone(),
            n_elements,
        })?;
        let mut out = vec![0f32; n]; // (n_elements,) = shape_row_major flattened
        dequantize_into(t.ggml_type, self.tensor_bytes(t), &mut out)?;
        Ok(out)
    }
}

const NON_NEGATIVE: &str = "a non-negative integer";

fn wrong_type(key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
    let found = match found.as_integer() {
        Some(i) if i < 0 && expected == NON_NEGATIVE => {
            format!("a negative {} ({i})", found.type_name())
        }
        _ => format!("of type {}", found.type_name()),
    };
    GgufError::WrongType {
        key: key.to_string(),
        expected,
        found,
    }
}

fn wrong_element_type(key: &str, expected: &'static str, element: &MetaValue) -> GgufError {
    let found = match element.as_integer() {
        Some(i) => format!("an array holding {} {i}", element.type_name()),
        None => format!("an array of {}", element.type_name()),
    };
    GgufError::WrongType {
        key: key.to_string(),
        expected,
        found,
    }
}

/// What parsing yields, before it is paired with the bytes' owner.
struct Parsed {
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_start: u64,
}

/// A cursor over untrusted bytes; `context` names what is being read, for error messages.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    context: String,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        let available = self.remaining();
        match usize::try_from(n) {
            Ok(n) if n <= available => {
                let s = &self.bytes[self.pos..self.pos + n];
                self.pos += n;
                Ok(s)
            }
            _ => Err(GgufError::Truncated {
                context: self.context.clone(),
                what,
                offset: self.pos as u64,
                needed: n,
                available: available as u64,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Reads a count and checks that `count` items of at least `min_bytes` each could fit.
    fn count(&mut self, what: &'static str, min_bytes: u64) -> Result<usize, GgufError> {
        let offset = self.pos as u64;
        let count = self.u64(what)?;
        let available = self.remaining() as u64;
        match count.checked_mul(min_bytes) {
            // Bounded by the remaining bytes, so it fits usize.
            Some(need) if need <= available => Ok(count as usize),
            _ => Err(GgufError::CountTooLarge {
                context: self.context.clone(),
                what,
                count,
                offset,
                available,
            }),
        }
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let offset = self.pos as u64;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 {
                context: self.context.clone(),
                offset,
            }),
        }
    }

    /// A value of GGUF value type `ty`; `depth` counts enclosing arrays.
    fn value(&mut self, ty: u32, type_offset: u64, depth: usize) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            0 => MetaValue::U8(self.u8("u8 value")?),
            1 => MetaValue::I8(i8::from_le_bytes(self.array("i8 value")?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array("u16 value")?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array("i16 value")?)),
            4 => MetaValue::U32(self.u32("u32 value")?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array("i32 value")?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array("f32 value")?)),
            7 => {
                let offset = self.pos as u64;
                match self.u8("bool value")? {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    value => {
                        return Err(GgufError::InvalidBool {
                            context: self.context.clone(),
                            offset,
                            value,
                        })
                    }
                }
            }
            8 => MetaValue::String(self.string("string value")?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::ArrayTooDeep {
                        context: self.context.clone(),
                        offset: type_offset,
                    });
                }
                let elem_offset = self.pos as u64;
                let elem_ty = self.u32("array element type")?;
                let min_bytes =
                    min_value_bytes(elem_ty).ok_or_else(|| GgufError::UnknownValueType {
                        context: self.context.clone(),
                        type_id: elem_ty,
                        offset: elem_offset,
                    })?;
                let n = self.count("array length", min_bytes)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, elem_offset, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64("u64 value")?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array("i64 value")?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array("f64 value")?)),
            _ => {
                return Err(GgufError::UnknownValueType {
                    context: self.context.clone(),
                    type_id: ty,
                    offset: type_offset,
                })
            }
        })
    }
}

/// Fewest bytes a value of GGUF value type `ty` takes, or `None` for an unknown type.
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 => 8,     // length
        9 => 4 + 8, // element type and length
        _ => return None,
    })
}

fn parse(bytes: &[u8]) -> Result<Parsed, GgufError> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        context: "header".to_string(),
    };
    let magic: [u8; 4] = c.array("magic")?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic {
            found: magic.escape_ascii().to_string(),
        });
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        v if matches!(v.swap_bytes(), 2 | 3) => return Err(GgufError::BigEndian(v)),
        v => return Err(GgufError::UnsupportedVersion(v)),
    }
    let n_tensors_offset = c.pos as u64;
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.count("key/value count", MIN_KV_BYTES)?;
    // Tensor infos come after the key/values: checked again there against what is left then.
    let tensor_count_too_large = |available: usize, context: String| GgufError::CountTooLarge {
        context,
        what: "tensor count",
        count: n_tensors,
        offset: n_tensors_offset,
        available: available as u64,
    };
    if n_tensors.saturating_mul(MIN_TENSOR_INFO_BYTES) > c.remaining() as u64 {
        return Err(tensor_count_too_large(c.remaining(), c.context));
    }

    let mut metadata = Vec::with_capacity(n_kv);
    let mut key_index = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        c.context = format!("metadata key/value #{i}");
        let key = c.string("key")?;
        c.context = format!("metadata key {key:?}");
        let type_offset = c.pos as u64;
        let ty = c.u32("value type")?;
        let value = c.value(ty, type_offset, 0)?;
        if key_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(GgufError::DuplicateKey { key });
        }
        metadata.push((key, value));
    }

    c.context = "tensor infos".to_string();
    let n_tensors = match n_tensors.checked_mul(MIN_TENSOR_INFO_BYTES) {
        // Bounded by the remaining bytes, so it fits usize.
        Some(need) if need <= c.remaining() as u64 => n_tensors as usize,
        _ => return Err(tensor_count_too_large(c.remaining(), c.context)),
    };
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut tensor_index = HashMap::with_capacity(n_tensors);
    for i in 0..n_tensors {
        c.context = format!("tensor info #{i}");
        let name = c.string("tensor name")?;
        c.context = format!("tensor info {name:?}");
        let n_dims = c.u32("dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                tensor: name,
                n_dims,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64("dimension")?);
        }
        let type_id = c.u32("tensor type")?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownGgmlType {
            tensor: name.clone(),
            type_id,
        })?;
        let offset = c.u64("tensor data offset")?;
        if tensor_index.insert(name.clone(), tensors.len()).is_some() {
            return Err(GgufError::DuplicateTensor { tensor: name });
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }

    let alignment = match key_index.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(&i) => {
            let v = &metadata[i].1;
            match v.as_integer().and_then(|a| u32::try_from(a).ok()) {
                Some(a) if a.is_power_of_two() => u64::from(a),
                _ => {
                    let shown = match v.as_integer() {
                        Some(a) => a.to_string(),
                        None => format!("of type {}", v.type_name()),
                    };
                    return Err(GgufError::BadAlignment(shown));
                }
            }
        }
    };
    // Alignment < 2^32 and pos < 2^64 - 2^32 (it indexes a slice), so this cannot overflow.
    let data_start = (c.pos as u64).next_multiple_of(alignment);
    let file_len = bytes.len() as u64;
    for t in &tensors {
        validate_tensor(t, alignment, data_start, file_len)?;
    }
    Ok(Parsed {
        version,
        metadata,
        key_index,
        tensors,
        tensor_index,
        alignment,
        data_start,
    })
}

/// Checks a tensor's shape, type and data range against the file.
fn validate_tensor(
    t: &TensorInfo,
    alignment: u64,
    data_start: u64,
    file_len: u64,
) -> Result<(), GgufError> {
    let overflow = || GgufError::ShapeOverflow {
        tensor: t.name.clone(),
        dims: t.dims.clone(),
    };
    // ggml keeps dims and element counts in i64; we also index them with usize.
    let limit = (usize::MAX as u64).min(i64::MAX as u64);
    let mut n_elements = 1u64;
    for &d in &t.dims {
        n_elements = n_elements.checked_mul(d).ok_or_else(overflow)?;
        if d > limit || n_elements > limit {
            return Err(overflow());
        }
    }
    let block_len = t.ggml_type.block_len();
    let dim0 = t.dims.first().copied().unwrap_or(1);
    if !dim0.is_multiple_of(block_len as u64) {
        return Err(GgufError::PartialBlock {
            tensor: t.name.clone(),
            ty: t.ggml_type.name(),
            dim0,
            block_len,
        });
    }
    let size = t.ggml_type.bytes_for(n_elements).ok_or_else(overflow)?;
    if !t.offset.is_multiple_of(alignment) {
        return Err(GgufError::MisalignedTensor {
            tensor: t.name.clone(),
            offset: t.offset,
            alignment,
        });
    }
    let end = data_start
        .checked_add(t.offset)
        .and_then(|start| start.checked_add(size));
    match end {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(GgufError::TensorOutOfBounds {
            tensor: t.name.clone(),
            offset: t.offset,
            size,
            data_start,
            file_len,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips_through_its_id() {
        let ids: Vec<u32> = GgmlType::ALL.iter().map(|t| t.id()).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ALL is in id order, ids unique"
        );
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(format!("{t:?}"), t.name());
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::from_id(u32::MAX), None);
    }

    /// Sizes from ggml's block structs, written out.
    #[test]
    fn block_sizes_match_ggml() {
        use GgmlType::*;
        let sizes = [
            (F32, 1, 4),
            (F16, 1, 2),
            (BF16, 1, 2),
            (Q4_0, 32, 18),
            (Q4_1, 32, 20),
            (Q5_0, 32, 22),
            (Q5_1, 32, 24),
            (Q8_0, 32, 34),
            (Q2_K, 256, 84),
            (Q3_K, 256, 110),
            (Q4_K, 256, 144),
            (Q5_K, 256, 176),
            (Q6_K, 256, 210),
            (Q8_K, 256, 292),
        ];
        for (t, len, bytes) in sizes {
            assert_eq!((t.block_len(), t.block_bytes()), (len, bytes), "{t}");
        }
    }
}
