//! Parsing and validating a GGUF file's header, metadata and tensor table from untrusted
//! bytes: every count and size is checked against what remains before it is used.

use std::collections::HashMap;

use super::{
    GgmlType, GgufError, MetaValue, TensorInfo, DEFAULT_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS,
};

/// Fewest bytes a key/value can take: key length, value type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Fewest bytes a tensor info can take: name length, dimension count, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// What parsing yields, before it is paired with the bytes' owner.
pub(super) struct Parsed {
    pub(super) version: u32,
    pub(super) metadata: Vec<(String, MetaValue)>,
    pub(super) key_index: HashMap<String, usize>,
    pub(super) tensors: Vec<TensorInfo>,
    pub(super) tensor_index: HashMap<String, usize>,
    pub(super) alignment: u64,
    pub(super) data_start: u64,
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

/// Parses and validates a whole GGUF file.
pub(super) fn parse(bytes: &[u8]) -> Result<Parsed, GgufError> {
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
