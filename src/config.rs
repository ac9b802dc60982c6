//! The bundle's `config.json` / `generation_config.json`, validated once.
//!
//! Both Llama-style names (`hidden_size`, `num_hidden_layers`, …) and GPT-2 names (`n_embd`,
//! `n_layer`, `n_head`, `n_positions`) are accepted; unknown fields are ignored so that
//! Hugging Face's many extra keys and our own future `edgelm` section do not break loading.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The file holding the model hyper-parameters inside a bundle.
pub const CONFIG_FILE: &str = "config.json";
/// The optional file holding generation defaults (extra end-of-sequence ids) inside a bundle.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Validated model hyper-parameters and special token ids of a bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `model_type`, e.g. `llama` or `gpt2`.
    pub model_type: String,
    /// First entry of `architectures`, e.g. `LlamaForCausalLM`, when present.
    pub architecture: Option<String>,
    /// Number of rows of the embedding / logits width.
    pub vocab_size: usize,
    /// Width of the residual stream (`hidden_size` / `n_embd`).
    pub hidden_size: usize,
    /// Number of transformer blocks (`num_hidden_layers` / `n_layer`).
    pub num_hidden_layers: usize,
    /// Number of query heads (`num_attention_heads` / `n_head`).
    pub num_attention_heads: usize,
    /// Number of key/value heads; equals `num_attention_heads` unless the model uses GQA.
    pub num_key_value_heads: usize,
    /// Width of one head; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    /// Longest sequence the model was trained for (`max_position_embeddings` / `n_positions`).
    pub max_position_embeddings: usize,
    /// Normalisation epsilon (`rms_norm_eps`, or GPT-2's `layer_norm_epsilon`).
    pub rms_norm_eps: f64,
    /// RoPE base frequency; `None` for models with learned positions (GPT-2).
    pub rope_theta: Option<f64>,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Per layer: the window of a local layer (`layer_types` entry `sliding_attention`,
    /// window `sliding_window`: a query sees its own position and the `window - 1` before
    /// it), `None` for full attention; (layers), or empty when no layer has a window.
    pub layer_windows: Vec<Option<usize>>,
    /// Beginning-of-sequence token id, when the model has one.
    pub bos_token_id: Option<u32>,
    /// Every end-of-sequence id named by either file, sorted, without duplicates.
    pub eos_token_ids: Vec<u32>,
    /// Our converter's own `edgelm` section, kept raw until fields are defined for it.
    pub edgelm: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `eos_token_id` is an int, a list of ints or null depending on the exporter.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(id) => vec![id],
            OneOrMany::Many(ids) => ids,
        }
    }
}

/// `config.json` as written by transformers, every field optional so validation can say
/// which one is missing.
#[derive(Debug, Default, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    n_embd: Option<usize>,
    num_hidden_layers: Option<usize>,
    n_layer: Option<usize>,
    num_attention_heads: Option<usize>,
    n_head: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    n_positions: Option<usize>,
    rms_norm_eps: Option<f64>,
    layer_norm_epsilon: Option<f64>,
    rope_theta: Option<f64>,
    tie_word_embeddings: Option<bool>,
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    edgelm: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The part of `generation_config.json` we use.
#[derive(Debug, Default, Deserialize)]
struct RawGenerationConfig {
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

impl Config {
    /// Layer `l`'s sliding window, `None` for a global layer.
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        self.layer_windows.get(l).copied().flatten()
    }

    /// Reads and validates `config.json` and (if present) `generation_config.json` in `dir`.
    pub fn load(dir: &Path) -> Result<Config> {
        let config_path = dir.join(CONFIG_FILE);
        let text = fs::read_to_string(&config_path)
            .with_context(|| format!("reading {:?}", config_path.display()))?;
        let raw: RawConfig = serde_json::from_str(&text)
            .with_context(|| format!("parsing {:?}", config_path.display()))?;

        let generation_path = dir.join(GENERATION_CONFIG_FILE);
        let generation = match fs::read_to_string(&generation_path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("parsing {:?}", generation_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RawGenerationConfig::default(),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {:?}", generation_path.display()))
            }
        };

        Config::from_raw(raw, generation)
            .with_context(|| format!("invalid {:?}", config_path.display()))
    }

    /// Parses the two files' contents; used by `load` and by tests.
    pub fn from_json(config_json: &str, generation_config_json: Option<&str>) -> Result<Config> {
        let raw: RawConfig = serde_json::from_str(config_json).context("parsing config")?;
        let generation = match generation_config_json {
            Some(text) => serde_json::from_str(text).context("parsing generation config")?,
            None => RawGenerationConfig::default(),
        };
        Config::from_raw(raw, generation)
    }

    fn from_raw(raw: RawConfig, generation: RawGenerationConfig) -> Result<Config> {
        let model_type = raw.model_type.context("missing model_type")?;
        let vocab_size = required("vocab_size", raw.vocab_size, None)?;
        let hidden_size = required("hidden_size", raw.hidden_size, raw.n_embd)?;
        let num_hidden_layers = required("num_hidden_layers", raw.num_hidden_layers, raw.n_layer)?;
        let num_attention_heads =
            required("num_attention_heads", raw.num_attention_heads, raw.n_head)?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        let max_position_embeddings = required(
            "max_position_embeddings",
            raw.max_position_embeddings,
            raw.n_positions,
        )?;

        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "num_attention_heads ({num_attention_heads}) is not a multiple of \
                 num_key_value_heads ({num_key_value_heads})"
            );
        }
        let head_dim = match raw.head_dim {
            Some(0) => bail!("head_dim is 0"),
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => bail!(
                "hidden_size ({hidden_size}) is not a multiple of num_attention_heads \
                 ({num_attention_heads}) and head_dim is not given"
            ),
        };

        let is_gpt2 = model_type == "gpt2";
        let rms_norm_eps = raw
            .rms_norm_eps
            .or(raw.layer_norm_epsilon)
            .unwrap_or(if is_gpt2 { 1e-5 } else { 1e-6 });
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            bail!("rms_norm_eps ({rms_norm_eps}) is not a non-negative number");
        }
        // transformers' Llama default; GPT-2 has learned positions and no RoPE.
        let rope_theta = raw
            .rope_theta
            .or(if is_gpt2 { None } else { Some(10_000.0) });
        if let Some(theta) = rope_theta {
            if !(theta.is_finite() && theta > 0.0) {
                bail!("rope_theta ({theta}) is not a positive number");
            }
        }

        let layer_windows = match &raw.layer_types {
            // Not sized by `num_hidden_layers`: it is checked against the graph later.
            None => Vec::new(),
            Some(types) => {
                if types.len() != num_hidden_layers {
                    bail!(
                        "layer_types has {} entries for {num_hidden_layers} layers",
                        types.len()
                    );
                }
                let window = || match raw.sliding_window {
                    Some(0) => bail!("sliding_window is 0"),
                    Some(w) => Ok(Some(w)),
                    None => bail!("layer_types has sliding_attention but no sliding_window"),
                };
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "full_attention" => Ok(None),
                        "sliding_attention" => window(),
                        other => bail!(
                            "layer type \"{other}\" is not supported \
                             (supported: full_attention, sliding_attention)"
                        ),
                    })
                    .collect::<Result<_>>()?
            }
        };

        let bos_token_id = raw.bos_token_id.or(generation.bos_token_id);
        let mut eos_token_ids: Vec<u32> = raw
            .eos_token_id
            .into_iter()
            .chain(generation.eos_token_id)
            .flat_map(OneOrMany::into_vec)
            .collect();
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();
        for (name, id) in bos_token_id
            .iter()
            .map(|id| ("bos_token_id", *id))
            .chain(eos_token_ids.iter().map(|id| ("eos_token_id", *id)))
        {
            if id as usize >= vocab_size {
                bail!("{name} {id} is outside the vocabulary (vocab_size {vocab_size})");
            }
        }

        Ok(Config {
            model_type,
            architecture: raw.architectures.and_then(|a| a.into_iter().next()),
            vocab_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            layer_windows,
            bos_token_id,
            eos_token_ids,
            edgelm: raw.edgelm,
        })
    }

    /// Whether `token` ends generation.
    pub fn is_eos(&self, token: u32) -> bool {
        self.eos_token_ids.contains(&token)
    }
}

/// A positive size taken from its Llama-style name or, failing that, its GPT-2 alias.
fn required(name: &str, value: Option<usize>, alias: Option<usize>) -> Result<usize> {
    match value.or(alias) {
        Some(0) => bail!("{name} is 0"),
        Some(v) => Ok(v),
        None => bail!("missing {name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2,
        "rope_scaling": null, "some_future_key": {"x": 1}
    }"#;

    #[test]
    fn llama_config_is_read_with_generation_eos_union() {
        let c = Config::from_json(
            LLAMA,
            Some(r#"{"eos_token_id": [2, 7], "bos_token_id": 1}"#),
        )
        .unwrap();
        assert_eq!(c.model_type, "llama");
        assert_eq!(c.architecture.as_deref(), Some("LlamaForCausalLM"));
        assert_eq!(
            (c.vocab_size, c.hidden_size, c.num_hidden_layers),
            (49152, 576, 30)
        );
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (9, 3, 64)
        );
        assert_eq!(c.max_position_embeddings, 8192);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert_eq!(c.rope_theta, Some(100000.0));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.bos_token_id, Some(1));
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        assert!(c.is_eos(7) && !c.is_eos(1));
        assert_eq!(c.edgelm, None);
    }

    #[test]
    fn gpt2_names_and_defaults() {
        let c = Config::from_json(
            r#"{"model_type": "gpt2", "vocab_size": 384, "n_embd": 64, "n_layer": 2,
                "n_head": 4, "n_positions": 128, "n_ctx": 128, "layer_norm_epsilon": 1e-5,
                "eos_token_id": 0, "bos_token_id": 0}"#,
            None,
        )
        .unwrap();
        assert_eq!((c.hidden_size, c.num_hidden_layers), (64, 2));
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (4, 4, 16)
        );
        assert_eq!(c.max_position_embeddings, 128);
        assert_eq!(c.rope_theta, None);
        assert_eq!(c.eos_token_ids, vec![0]);
        assert_eq!(c.architecture, None);
    }

    #[test]
    fn edgelm_section_is_kept() {
        let text = LLAMA.replacen('{', r#"{"edgelm": {"format": 1},"#, 1);
        let c = Config::from_json(&text, None).unwrap();
        assert_eq!(c.edgelm.unwrap()["format"], 1);
    }

    #[test]
    fn invalid_configs_say_why() {
        let cases = [
            (
                LLAMA.replace("\"num_key_value_heads\": 3", "\"num_key_value_heads\": 4"),
                "multiple of num_key_value_heads",
            ),
            (
                LLAMA.replace("\"hidden_size\": 576,", ""),
                "missing hidden_size",
            ),
            (
                LLAMA.replace("\"eos_token_id\": 2", "\"eos_token_id\": 49152"),
                "eos_token_id 49152 is outside",
            ),
            (
                LLAMA.replace("\"vocab_size\": 49152", "\"vocab_size\": 0"),
                "vocab_size is 0",
            ),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", Config::from_json(&text, None).unwrap_err());
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn load_names_the_file() {
        let err = Config::load(Path::new("/nonexistent/bundle")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("/nonexistent/bundle/config.json"), "{msg}");
    }
}
