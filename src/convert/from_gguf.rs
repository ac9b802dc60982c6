//! A GGUF file as a [`Checkpoint`]: its family's hyper-parameters, the tokenizer rebuilt from
//! its vocabulary, and weights served under their Hugging Face names and layout.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::family::{Family, GgufChange, GgufTensor};
use super::gguf::Gguf;
use super::vocab::{build_tokenizer_config, build_tokenizer_json, GgufVocab};
use super::{Checkpoint, Weight, WeightSource};

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
}

impl WeightSource for GgufWeights {
    fn tensor(&self, hf_name: &str) -> Result<Option<Weight>> {
        let Some(t) = (self.names)(hf_name) else {
            bail!("no GGUF name for tensor \"{hf_name}\"");
        };
        let Some(info) = self.gguf.tensor(&t.name) else {
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
