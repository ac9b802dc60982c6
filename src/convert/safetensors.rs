//! A Hugging Face checkpoint directory (`config.json`, `*.safetensors`, `tokenizer.json`)
//! as a [`Checkpoint`], reading tensors straight from memory-mapped safetensors files.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use serde::Deserialize;

use super::family::Family;
use super::gguf::f16_to_f32;
use super::{Checkpoint, Weight, WeightSource};

/// One memory-mapped `.safetensors` file and its parsed header.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorEntry>,
}

#[derive(Deserialize, Clone, Debug)]
struct TensorEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

impl SafetensorsFile {
    /// Maps `path` and checks every tensor's extent against the file.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let ctx = || format!("reading \"{}\"", path.display());
        let file = File::open(path).with_context(ctx)?;
        // SAFETY: the file is opened read-only and we never hand out references that outlive
        // `self`; a concurrent truncation by another process is outside what we can defend.
        let mmap = unsafe { Mmap::map(&file) }.with_context(ctx)?;
        ensure!(
            mmap.len() >= 8,
            "\"{}\": too short for a safetensors header",
            path.display()
        );
        let mut len8 = [0u8; 8];
        len8.copy_from_slice(&mmap[..8]);
        let header_len = u64::from_le_bytes(len8);
        let data_start = 8u64
            .checked_add(header_len)
            .filter(|end| *end <= mmap.len() as u64)
            .with_context(|| {
                format!(
                    "\"{}\": header length {header_len} exceeds the file",
                    path.display()
                )
            })? as usize;
        let header: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&mmap[8..data_start])
                .with_context(|| format!("\"{}\": header is not valid JSON", path.display()))?;
        let data_len = mmap.len() - data_start;
        let mut tensors = BTreeMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                continue;
            }
            let t: TensorEntry = serde_json::from_value(v)
                .with_context(|| format!("\"{}\": tensor \"{name}\" entry", path.display()))?;
            let [start, end] = t.data_offsets;
            let elems = t.shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
            let bytes = elems.and_then(|e| e.checked_mul(dtype_size(&t.dtype).unwrap_or(0)));
            ensure!(
                start <= end && end <= data_len && bytes == Some(end - start),
                "\"{}\": tensor \"{name}\" ({} {:?}) does not fit its offsets {start}..{end} in {data_len} data bytes",
                path.display(),
                t.dtype,
                t.shape
            );
            tensors.insert(name, t);
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start,
            tensors,
        })
    }

    /// Names of the tensors in this file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// The tensor converted to f32, or `None` if absent.
    pub fn tensor_f32(&self, name: &str) -> Result<Option<Weight>> {
        let Some(t) = self.tensors.get(name) else {
            return Ok(None);
        };
        let bytes =
            &self.mmap[self.data_start + t.data_offsets[0]..self.data_start + t.data_offsets[1]];
        let data: Vec<f32> = match t.dtype.as_str() {
            "F32" => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            "F16" => bytes
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            "BF16" => bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
            other => bail!(
                "\"{}\": tensor \"{name}\" has unsupported dtype {other}",
                self.path.display()
            ),
        };
        Ok(Some(Weight {
            shape: t.shape.clone(),
            data,
        }))
    }
}

fn dtype_size(dtype: &str) -> Option<usize> {
    match dtype {
        "F64" | "I64" | "U64" => Some(8),
        "F32" | "I32" | "U32" => Some(4),
        "F16" | "BF16" | "I16" | "U16" => Some(2),
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => Some(1),
        _ => None,
    }
}

/// All safetensors files of a checkpoint directory.
struct HfWeights {
    files: Vec<SafetensorsFile>,
}

impl WeightSource for HfWeights {
    fn tensor(&self, name: &str) -> Result<Option<Weight>> {
        // The original GPT-2 checkpoints name their tensors without the `transformer.` prefix.
        let bare = name.strip_prefix("transformer.");
        for f in &self.files {
            for n in std::iter::once(name).chain(bare) {
                if let Some(w) = f.tensor_f32(n)? {
                    return Ok(Some(w));
                }
            }
        }
        Ok(None)
    }
}

/// The special token ids every family's `config.json` may name.
#[derive(Deserialize)]
struct HfIds {
    bos_token_id: Option<u32>,
    eos_token_id: Option<serde_json::Value>,
}

/// Opens a Hugging Face checkpoint directory of one of `families`.
pub fn open_hf_dir(dir: &Path, families: &[&'static Family]) -> Result<Checkpoint> {
    let read = |name: &str| -> Result<serde_json::Value> {
        let p = dir.join(name);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading \"{}\"", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing \"{}\"", p.display()))
    };
    let cfg = read("config.json")?;
    let cfg_path = dir.join("config.json");
    let model_type = cfg["model_type"].as_str().unwrap_or_default();
    let by_type = |f: &&Family| f.hf_model_types.contains(&model_type);
    let Some(family) = families.iter().copied().find(by_type) else {
        let supported: Vec<&str> = families
            .iter()
            .flat_map(|f| f.hf_model_types)
            .copied()
            .collect();
        bail!(
            "\"{}\": unsupported architecture \"{model_type}\" (supported: {})",
            dir.display(),
            supported.join(", ")
        );
    };
    let params = (family.params_from_hf)(&cfg, model_type)
        .with_context(|| format!("\"{}\"", cfg_path.display()))?;
    let ids = HfIds::deserialize(&cfg)
        .with_context(|| format!("\"{}\": special token ids", cfg_path.display()))?;
    let mut files = vec![];
    let single = dir.join("model.safetensors");
    if single.exists() {
        files.push(SafetensorsFile::open(&single)?);
    } else {
        let index = read("model.safetensors.index.json")?;
        let mut shards: Vec<String> = index["weight_map"]
            .as_object()
            .context("model.safetensors.index.json has no weight_map")?
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        shards.sort();
        shards.dedup();
        for s in shards {
            if s.contains('/') || s.contains('\\') || s.starts_with('.') {
                bail!("shard name \"{s}\" escapes the checkpoint directory");
            }
            files.push(SafetensorsFile::open(&dir.join(&s))?);
        }
    }
    let eos_ids = match &ids.eos_token_id {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        _ => vec![],
    };
    Ok(Checkpoint {
        params,
        family,
        tokenizer_json: read("tokenizer.json")?,
        tokenizer_config: read("tokenizer_config.json").unwrap_or_else(|_| serde_json::json!({})),
        bos_id: ids.bos_token_id,
        eos_ids,
        weights: Box::new(HfWeights { files }),
    })
}
