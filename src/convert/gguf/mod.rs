//! GGUF reader over an mmap: the container (header, metadata, tensor table, data section)
//! and access to its tensors, dequantized by `dequant.rs`.
//!
//! The file is untrusted input: every count, length, offset and size is checked against the
//! bytes that are actually there before anything is allocated or sliced (`parse.rs`), so a
//! truncated or lying file gives a one-line [`GgufError`], never a panic or a giant
//! allocation. Layout (little-endian): magic "GGUF", version (2 or 3), tensor count,
//! key/value count, the key/values, the tensor infos, padding to `general.alignment`, the
//! data section.

mod dequant;
mod error;
mod ggml_type;
mod parse;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use memmap2::Mmap;

pub use dequant::{dequantize_into, f16_to_f32};
pub use error::GgufError;
pub use ggml_type::GgmlType;

/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Deepest nesting of metadata arrays accepted; bounds the parser's recursion.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;

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
        let open_err = |error| GgufError::Open {
            path: path.to_path_buf(),
            error,
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
            error: Box::new(e),
        })
    }

    /// Validates an in-memory GGUF file (tests, fuzzing).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Gguf, GgufError> {
        Gguf::from_storage(Storage::Owned(bytes))
    }

    fn from_storage(storage: Storage) -> Result<Gguf, GgufError> {
        let p = parse::parse(storage.bytes())?;
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
