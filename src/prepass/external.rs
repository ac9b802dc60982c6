//! Step 1 and 2 of the pipeline: reading `model.onnx` and its external data.
//!
//! The graph file is memory-mapped and decoded once. Every external-data reference of an
//! initializer is checked before anything reads it: a relative location inside the bundle,
//! an offset and length inside the file, a length matching the tensor. Each file is mapped
//! once; the int8 operators use their weights in place from these maps, and tract's loader
//! copies the other tensors straight from them.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::Mmap;
use prost::Message;
use tract_onnx::data_resolver::ModelDataResolver;
use tract_onnx::pb::{self, tensor_proto::DataType};
use tract_onnx::tract_core::internal::TractResult;

/// Memory-maps and decodes `path`, checking that it looks like an ONNX decoder.
pub(super) fn read_model_proto(path: &Path) -> Result<pb::ModelProto> {
    let file = File::open(path).with_context(|| format!("opening {path:?}"))?;
    // SAFETY: read-only map, dropped when this function returns; the bundle must not be
    // modified while loading (a concurrent truncation could fault, as with any mmap reader).
    let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {path:?}"))?;
    decode_model_proto(&map, path)
}

/// Decodes `bytes` (read from `path`), checking that it looks like an ONNX decoder.
pub(super) fn decode_model_proto(bytes: &[u8], path: &Path) -> Result<pb::ModelProto> {
    let proto = pb::ModelProto::decode(bytes)
        .map_err(|e| anyhow!("{path:?} is not a valid ONNX model: {e}"))?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| anyhow!("{path:?} is not a valid ONNX model: no graph"))?;
    ensure!(
        !graph.node.is_empty() && !proto.opset_import.is_empty(),
        "{path:?} is not a valid ONNX model (truncated?): no nodes or no opset"
    );
    Ok(proto)
}

/// Byte size of one element of an ONNX data type, for the types a decoder stores.
pub(super) fn elem_size(data_type: i32) -> Option<usize> {
    Some(match DataType::try_from(data_type).ok()? {
        DataType::Bool | DataType::Int8 | DataType::Uint8 => 1,
        DataType::Int16 | DataType::Uint16 | DataType::Float16 | DataType::Bfloat16 => 2,
        DataType::Int32 | DataType::Uint32 | DataType::Float => 4,
        DataType::Int64 | DataType::Uint64 | DataType::Double => 8,
        _ => return None,
    })
}

/// Element count of a tensor, refusing negative dims and overflow.
pub(super) fn element_count(t: &pb::TensorProto) -> Result<usize> {
    t.dims.iter().try_fold(1usize, |acc, &d| {
        let d = u64::try_from(d).map_err(|_| anyhow!("tensor {:?} has dim {d}", t.name))?;
        // A dim past usize (32-bit boards) is as impossible to hold as an overflowing product.
        let d = usize::try_from(d).map_err(|_| anyhow!("tensor {:?} is too large", t.name))?;
        acc.checked_mul(d)
            .ok_or_else(|| anyhow!("tensor {:?} is too large", t.name))
    })
}

pub(super) fn is_external(t: &pb::TensorProto) -> bool {
    t.data_location == Some(pb::tensor_proto::DataLocation::External as i32)
}

/// The value of `key` in a tensor's `external_data` entries.
pub(super) fn external_entry<'a>(t: &'a pb::TensorProto, key: &str) -> Option<&'a str> {
    t.external_data
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.value.as_str())
}

/// The bundle's external-data files, each memory-mapped once, with every reference checked.
///
/// Also serves tract's loader, so tensors are copied straight from the maps.
pub(super) struct ExternalData {
    /// The canonical bundle directory; `None` when nothing is external.
    pub(super) root: Option<PathBuf>,
    /// Canonical path → map.
    pub(super) files: HashMap<PathBuf, Arc<Mmap>>,
}

impl ExternalData {
    /// Validates every external reference of `graph`'s initializers (location inside `dir`,
    /// range inside the file, length matching the tensor) and maps the files. A missing
    /// `length` entry is filled in so tract reads exactly the tensor's bytes.
    pub(super) fn collect(graph: &mut pb::GraphProto, dir: &Path) -> Result<ExternalData> {
        let mut files = HashMap::new();
        if !graph.initializer.iter().any(is_external) {
            return Ok(ExternalData { root: None, files });
        }
        let root = dir
            .canonicalize()
            .with_context(|| format!("resolving {dir:?}"))?;
        for t in graph.initializer.iter_mut().filter(|t| is_external(t)) {
            let name = t.name.clone();
            let location = external_entry(t, "location")
                .with_context(|| format!("tensor {name:?}: external data without a location"))?
                .to_string();
            let relative = Path::new(&location);
            ensure!(
                relative
                    .components()
                    .all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
                "tensor {name:?}: external data location {location:?} must be a relative path \
                 inside the bundle"
            );
            let path = root
                .join(relative)
                .canonicalize()
                .with_context(|| format!("tensor {name:?}: opening external data {location:?}"))?;
            ensure!(
                path.starts_with(&root),
                "tensor {name:?}: external data {location:?} resolves outside the bundle"
            );
            let offset: usize = match external_entry(t, "offset") {
                Some(s) => {
                    let offset: u64 = s
                        .parse()
                        .with_context(|| format!("tensor {name:?}: offset {s:?}"))?;
                    // Past usize (32-bit boards) is past the end of any file we can map.
                    usize::try_from(offset).unwrap_or(usize::MAX)
                }
                None => 0,
            };
            let size = elem_size(t.data_type)
                .with_context(|| format!("tensor {name:?}: unsupported external data type"))?;
            let needed = element_count(t)?
                .checked_mul(size)
                .with_context(|| format!("tensor {name:?} is too large"))?;
            match external_entry(t, "length") {
                Some(s) => {
                    let length: usize = s
                        .parse()
                        .with_context(|| format!("tensor {name:?}: length {s:?}"))?;
                    ensure!(
                        length == needed,
                        "tensor {name:?}: external length {length} but the tensor needs {needed} bytes"
                    );
                }
                None => t.external_data.push(pb::StringStringEntryProto {
                    key: "length".into(),
                    value: needed.to_string(),
                }),
            }
            if !files.contains_key(&path) {
                let file = File::open(&path).with_context(|| format!("opening {path:?}"))?;
                // SAFETY: read-only map of a bundle file; the bundle must not be modified while
                // loading (a concurrent truncation could fault, as with any mmap reader).
                let map =
                    unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {path:?}"))?;
                files.insert(path.clone(), Arc::new(map));
            }
            let file_len = files[&path].len();
            ensure!(
                offset
                    .checked_add(needed)
                    .is_some_and(|end| end <= file_len),
                "tensor {name:?}: external data {offset}..{} is past the end of {location:?} \
                 ({file_len} bytes)",
                offset.saturating_add(needed)
            );
        }
        Ok(ExternalData {
            root: Some(root),
            files,
        })
    }

    /// The bytes of a tensor whose external reference `collect` validated.
    pub(super) fn bytes_of(&self, t: &pb::TensorProto) -> Result<&[u8]> {
        let (map, range) = self.locate(t)?;
        Ok(&map[range])
    }

    /// Where a tensor's bytes sit, for using them in place: its mapped file and range.
    pub(super) fn mapped(
        &self,
        t: &pb::TensorProto,
    ) -> Result<(Arc<Mmap>, std::ops::Range<usize>)> {
        let (map, range) = self.locate(t)?;
        Ok((Arc::clone(map), range))
    }

    /// The map and byte range of a tensor whose external reference `collect` validated.
    fn locate(&self, t: &pb::TensorProto) -> Result<(&Arc<Mmap>, std::ops::Range<usize>)> {
        let root = self
            .root
            .as_ref()
            .context("external data was not validated")?;
        let location = external_entry(t, "location").context("no location")?;
        let path = root.join(location).canonicalize()?;
        let offset: usize = external_entry(t, "offset").map_or(Ok(0), str::parse)?;
        let length: usize = external_entry(t, "length").context("no length")?.parse()?;
        let map = self
            .files
            .get(&path)
            .with_context(|| format!("external data {path:?} was not validated"))?;
        let end = offset
            .checked_add(length)
            .context("external range overflows")?;
        ensure!(
            end <= map.len(),
            "external range {offset}..{end} is past the end of {path:?}"
        );
        Ok((map, offset..end))
    }

    fn slice(&self, path: &Path, offset: usize, length: Option<usize>) -> Result<&[u8]> {
        let map = self
            .files
            .get(path)
            .with_context(|| format!("external data {path:?} was not validated"))?;
        let end = match length {
            Some(l) => offset.checked_add(l).context("external range overflows")?,
            None => map.len(),
        };
        map.get(offset..end)
            .with_context(|| format!("external range {offset}..{end} is past the end of {path:?}"))
    }
}

impl ModelDataResolver for ExternalData {
    fn read_bytes_from_path(
        &self,
        buf: &mut Vec<u8>,
        p: &Path,
        offset: usize,
        length: Option<usize>,
    ) -> TractResult<()> {
        buf.extend_from_slice(self.slice(p, offset, length)?);
        Ok(())
    }
}

/// The raw little-endian bytes of an initializer, or `None` if it uses the typed fields.
pub(super) fn raw_bytes<'a>(
    t: &'a pb::TensorProto,
    external: &'a ExternalData,
) -> Result<Option<&'a [u8]>> {
    if is_external(t) {
        Ok(Some(external.bytes_of(t)?))
    } else if !t.raw_data.is_empty() {
        Ok(Some(&t.raw_data))
    } else {
        Ok(None)
    }
}

/// An integer initializer (int8/uint8/int16/uint16/int32) widened to i32.
pub(super) fn tensor_ints(t: &pb::TensorProto, external: &ExternalData) -> Result<Vec<i32>> {
    let dt = DataType::try_from(t.data_type).ok();
    let count = element_count(t)?;
    let values: Vec<i32> = match raw_bytes(t, external)? {
        Some(bytes) => match dt {
            Some(DataType::Int8) => bytes.iter().map(|&b| i32::from(b as i8)).collect(),
            Some(DataType::Uint8) => bytes.iter().map(|&b| i32::from(b)).collect(),
            Some(DataType::Int16) => bytes
                .chunks_exact(2)
                .map(|c| i32::from(i16::from_le_bytes([c[0], c[1]])))
                .collect(),
            Some(DataType::Uint16) => bytes
                .chunks_exact(2)
                .map(|c| i32::from(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            Some(DataType::Int32) => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            _ => bail!(
                "tensor {:?}: data type {} is not an integer type",
                t.name,
                t.data_type
            ),
        },
        None => match dt {
            Some(DataType::Int8) => t.int32_data.iter().map(|&v| i32::from(v as i8)).collect(),
            Some(DataType::Uint8) => t.int32_data.iter().map(|&v| i32::from(v as u8)).collect(),
            Some(DataType::Int16) => t.int32_data.iter().map(|&v| i32::from(v as i16)).collect(),
            Some(DataType::Uint16) => t.int32_data.iter().map(|&v| i32::from(v as u16)).collect(),
            Some(DataType::Int32) => t.int32_data.clone(),
            _ => bail!(
                "tensor {:?}: data type {} is not an integer type",
                t.name,
                t.data_type
            ),
        },
    };
    holds_its_shape(t, values.len(), count)?;
    Ok(values)
}

/// Checks that `t`, whose shape needs `count` values, holds `len`.
fn holds_its_shape(t: &pb::TensorProto, len: usize, count: usize) -> Result<()> {
    ensure!(
        len == count,
        "tensor {:?} holds {len} values, its shape {:?} needs {count}",
        t.name,
        t.dims
    );
    Ok(())
}

/// An f32 initializer.
pub(super) fn tensor_floats(t: &pb::TensorProto, external: &ExternalData) -> Result<Vec<f32>> {
    ensure!(
        t.data_type == DataType::Float as i32,
        "tensor {:?}: data type {} is not float32",
        t.name,
        t.data_type
    );
    let count = element_count(t)?;
    let values: Vec<f32> = match raw_bytes(t, external)? {
        Some(bytes) => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        None => t.float_data.clone(),
    };
    holds_its_shape(t, values.len(), count)?;
    Ok(values)
}
