//! A GGUF file as a [`Checkpoint`]: its family's hyper-parameters, the tokenizer rebuilt from
//! its vocabulary, and weights served under their Hugging Face names and layout.

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::family::{Family, GgufChange, GgufTensor};
use super::gguf::{f16_to_f32, GgmlType, Gguf};
use super::split::fill_rows;
use super::vocab::{build_tokenizer_config, build_tokenizer_json, GgufVocab};
use super::{Checkpoint, Q8Blocks, Weight, WeightSource};

/// Opens `path` as a GGUF checkpoint of one of `families`.
pub fn open(path: &Path, families: &[&'static Family]) -> Result<Checkpoint> {
    let gguf = Gguf::open(path)?;
    let arch = gguf
        .get_str("general.architecture")
        .with_context(|| format!("reading \"{}\"", path.display()))?
        .to_string();
    let Some(family) = families
        .iter()
        .copied()
        .find(|f| f.gguf_architecture == arch)
    else {
        let supported: Vec<&str> = families.iter().map(|f| f.gguf_architecture).collect();
        bail!(
            "\"{}\": unsupported architecture \"{arch}\" (supported: {})",
            path.display(),
            supported.join(", ")
        );
    };
    let keys = gguf.metadata().iter().map(|(k, _)| k.as_str());
    if let Some(key) = family.unknown_gguf_key(keys) {
        bail!(
            "\"{}\": metadata key \"{key}\" is not understood (ignoring it could change the model)",
            path.display()
        );
    }
    let params = (family.params_from_gguf)(&gguf)
        .with_context(|| format!("reading \"{}\"", path.display()))?;
    let vocab = GgufVocab::from_gguf(&gguf)
        .with_context(|| format!("reading tokenizer of \"{}\"", path.display()))?;
    if vocab.tokens.len() != params.vocab {
        bail!(
            "\"{}\": tokenizer has {} tokens but the embedding has {} rows",
            path.display(),
            vocab.tokens.len(),
            params.vocab
        );
    }
    let tokenizer_json = build_tokenizer_json(&vocab)?;
    let tokenizer_config = build_tokenizer_config(&vocab, Some(params.max_positions as u64));
    Ok(Checkpoint {
        params,
        family,
        tokenizer_json,
        tokenizer_config,
        bos_id: vocab.bos_id,
        eos_ids: vocab.eos_id.into_iter().collect(),
        weights: Box::new(GgufWeights {
            gguf,
            names: family.gguf_tensor,
            read: RefCell::default(),
        }),
    })
}

/// A non-negative integer metadata value.
pub fn get_usize(g: &Gguf, key: &str) -> Result<usize> {
    Ok(usize::try_from(g.get_u64(key)?)?)
}

/// The vocabulary size: llama.cpp's `token_embd.weight` is (hidden, vocab) in GGUF order.
pub fn embedding_rows(g: &Gguf, hidden: usize) -> Result<usize> {
    let embd = g
        .tensor("token_embd.weight")
        .context("GGUF has no tensor \"token_embd.weight\"")?;
    match embd.dims.as_slice() {
        [d, v] if *d as usize == hidden => Ok(usize::try_from(*v)?),
        dims => bail!("token_embd.weight has dims {dims:?}, expected [{hidden}, vocab]"),
    }
}

/// GGUF tensors served under Hugging Face names.
struct GgufWeights {
    gguf: Gguf,
    names: fn(&str) -> Option<GgufTensor>,
    /// GGUF names of the tensors served so far.
    read: RefCell<HashSet<String>>,
}

impl GgufWeights {
    /// The GGUF tensor behind `hf_name` and how it differs from the Hugging Face layout;
    /// `None` when the file has no such tensor. Marks it read.
    fn find(&self, hf_name: &str) -> Result<Option<(GgufTensor, &super::gguf::TensorInfo)>> {
        let Some(t) = (self.names)(hf_name) else {
            bail!("no GGUF name for tensor \"{hf_name}\"");
        };
        let Some(info) = self.gguf.tensor(&t.name) else {
            return Ok(None);
        };
        self.read.borrow_mut().insert(t.name.clone());
        Ok(Some((t, info)))
    }
}

impl WeightSource for GgufWeights {
    fn tensor(&self, hf_name: &str) -> Result<Option<Weight>> {
        let Some((t, info)) = self.find(hf_name)? else {
            return Ok(None);
        };
        let w = Weight {
            shape: info.shape_row_major(),
            data: self.gguf.dequantize(info)?,
        };
        Ok(Some(match t.change {
            GgufChange::None => w,
            GgufChange::RopeRows { heads_key } => {
                let heads = usize::try_from(self.gguf.get_u64(heads_key)?)?;
                unpermute_rope_rows(&w, heads)?
            }
            GgufChange::Transposed => match w.shape.as_slice() {
                [_, _] => w.transposed(),
                s => bail!("GGUF tensor \"{}\" has shape {s:?}, expected 2-D", t.name),
            },
        }))
    }

    fn q8_0(&self, hf_name: &str, threads: usize) -> Result<Option<Q8Blocks>> {
        let Some(t) = (self.names)(hf_name) else {
            bail!("no GGUF name for tensor \"{hf_name}\"");
        };
        let info = match self.gguf.tensor(&t.name) {
            Some(info) if info.ggml_type == GgmlType::Q8_0 => info,
            _ => return Ok(None),
        };
        let (n, k) = match info.shape_row_major().as_slice() {
            [n, k] => (*n, *k),
            _ => return Ok(None),
        };
        // Each stored row goes to `row_of(row)`: llama.cpp's interleaved Q/K rows back to
        // halves; a transposed tensor cannot keep its blocks.
        let head_dim = match t.change {
            GgufChange::None => None,
            GgufChange::RopeRows { heads_key } => {
                let heads = usize::try_from(self.gguf.get_u64(heads_key)?)?;
                ensure!(
                    heads > 0 && n % (2 * heads) == 0,
                    "Q/K weight \"{}\" with {n} rows cannot be split into {heads} heads",
                    t.name
                );
                Some(n / heads)
            }
            GgufChange::Transposed => return Ok(None),
        };
        self.read.borrow_mut().insert(t.name.clone());
        let bytes = self.gguf.tensor_bytes(info);
        const BLOCK_BYTES: usize = 2 + Q8_BLOCK;
        let nb = k / Q8_BLOCK;
        ensure!(
            k % Q8_BLOCK == 0 && bytes.len() == n * nb * BLOCK_BYTES,
            "Q8_0 tensor \"{}\" has {} bytes, expected {} for shape [{n}, {k}]",
            t.name,
            bytes.len(),
            n * nb * BLOCK_BYTES
        );
        let mut q = vec![0u8; n * k]; // (n, k)
        let mut scales = vec![0f32; n * nb]; // (n, k / 32)
        fill_rows(threads, (&mut q, k), (&mut scales, nb), |first, q, s| {
            for (i, (q_row, s_row)) in q.chunks_mut(k).zip(s.chunks_mut(nb)).enumerate() {
                let row = first + i;
                let src = head_dim.map_or(row, |hd| interleaved_row(row, hd));
                let src = &bytes[src * nb * BLOCK_BYTES..(src + 1) * nb * BLOCK_BYTES];
                for ((block, q), s) in src
                    .chunks_exact(BLOCK_BYTES)
                    .zip(q_row.chunks_exact_mut(Q8_BLOCK))
                    .zip(s_row.iter_mut())
                {
                    *s = f16_to_f32(u16::from_le_bytes([block[0], block[1]]));
                    q.copy_from_slice(&block[2..]);
                }
            }
        });
        Ok(Some(Q8Blocks {
            shape: [n, k],
            q,
            scales,
        }))
    }

    fn unread(&self) -> Vec<String> {
        let read = self.read.borrow();
        self.gguf
            .tensors()
            .iter()
            .map(|t| &t.name)
            .filter(|name| !read.contains(*name))
            .cloned()
            .collect()
    }
}

/// Values in a Q8_0 block.
const Q8_BLOCK: usize = 32;

/// The row llama.cpp stores Hugging Face's Q/K row `row` at, with heads `head_dim` wide.
fn interleaved_row(row: usize, head_dim: usize) -> usize {
    let (h, d) = (row / head_dim, row % head_dim);
    let half = head_dim / 2;
    let (i, j) = (d / half, d % half);
    h * head_dim + 2 * j + i
}

/// Undoes llama.cpp's interleaving of Q/K rows so RoPE is the Hugging Face rotate-half form.
///
/// llama.cpp stores row `h*hd + 2*j + i` what Hugging Face has at row `h*hd + i*hd/2 + j`.
fn unpermute_rope_rows(w: &Weight, heads: usize) -> Result<Weight> {
    let (rows, cols) = match w.shape.as_slice() {
        [r, c] => (*r, *c),
        s => bail!("expected a 2-D Q/K weight, got shape {s:?}"),
    };
    if heads == 0 || rows % (2 * heads) != 0 {
        bail!("Q/K weight with {rows} rows cannot be split into {heads} heads");
    }
    let hd = rows / heads;
    let mut data = vec![0f32; w.data.len()]; // (rows, cols)
    for h in 0..heads {
        for j in 0..hd / 2 {
            for i in 0..2 {
                let src = (h * hd + 2 * j + i) * cols;
                let dst = (h * hd + i * (hd / 2) + j) * cols;
                data[dst..dst + cols].copy_from_slice(&w.data[src..src + cols]);
            }
        }
    }
    Ok(Weight {
        shape: w.shape.clone(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_row_inverts_unpermute() {
        // Two heads of dim 4, one column holding the stored row index.
        let w = Weight {
            shape: vec![8, 1],
            data: (0..8).map(|r| r as f32).collect(),
        };
        let u = unpermute_rope_rows(&w, 2).unwrap();
        let rows: Vec<f32> = (0..8).map(|r| interleaved_row(r, 4) as f32).collect();
        assert_eq!(u.data, rows);
    }

    #[test]
    fn unpermute_maps_interleaved_rows_to_halves() {
        // One head of dim 4, one column: llama.cpp rows [a0, b0, a1, b1] are HF [a0, a1, b0, b1].
        let w = Weight {
            shape: vec![4, 1],
            data: vec![0.0, 10.0, 1.0, 11.0],
        };
        let u = unpermute_rope_rows(&w, 1).unwrap();
        assert_eq!(u.data, vec![0.0, 1.0, 10.0, 11.0]);
    }
}
