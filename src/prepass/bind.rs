//! Steps 7, 10 and 12 of the pipeline: the graph's inputs and outputs, the KV-cache fusion
//! that removes some of them, and the final binding of each to its role.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use tract_onnx::pb;
use tract_onnx::prelude::*;

use super::rewrite::LOGIT_ROWS;
use crate::attention;
use crate::config::Config;
use crate::quant::{Kernel, ThreadPool};

/// Where each tensor the decoder exchanges sits among the plan's inputs and outputs.
#[derive(Debug, Clone)]
pub(crate) struct Bindings {
    /// Number of plan inputs.
    pub(crate) inputs: usize,
    pub(crate) input_ids: usize,
    pub(crate) attention_mask: Option<usize>,
    pub(crate) position_ids: Option<usize>,
    /// The rows to compute logits for, if the pre-pass added that input.
    pub(crate) logit_rows: Option<usize>,
    pub(crate) logits: usize,
    /// Where the keys and values go.
    pub(crate) kv: KvIo,
    /// Key/value heads and head width of the cache tensors.
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
}

/// How the graph keeps its keys and values.
#[derive(Debug, Clone)]
pub(crate) enum KvIo {
    /// Fused into ring attention ops: per layer, the plan node of its `RingAttention`.
    Ring { nodes: Vec<usize> },
    /// The graph's own cache I/O: per layer, (key, value) inputs and (key, value) outputs.
    Explicit {
        past: Vec<(usize, usize)>,
        present: Vec<(usize, usize)>,
    },
}

/// The graph's input and output names in tract's order (initializers are not inputs).
pub(super) struct IoNames {
    inputs: Vec<String>,
    outputs: Vec<String>,
}

impl IoNames {
    pub(super) fn of(graph: &pb::GraphProto) -> Result<IoNames> {
        let initializers: HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        Ok(IoNames {
            inputs: graph
                .input
                .iter()
                .filter(|i| !initializers.contains(i.name.as_str()))
                .map(|i| i.name.clone())
                .collect(),
            outputs: graph.output.iter().map(|o| o.name.clone()).collect(),
        })
    }

    /// Folds the cache I/O into ring attention ops when the graph matches (dropping the
    /// names it removed); returns whether it did.
    pub(super) fn fuse_cache(
        &mut self,
        model: &mut TypedModel,
        layers: usize,
        kernel: Kernel,
        pool: &Arc<ThreadPool>,
    ) -> Result<bool> {
        // Checked first: everything below sizes tables by the config's layer count.
        let declared = self
            .inputs
            .iter()
            .filter(|n| n.starts_with("past_key_values.") && n.ends_with(".key"))
            .count();
        ensure!(
            declared == layers,
            "config.json says {layers} layers but the graph has a KV cache for {declared}"
        );
        let Some(fused) = attention::fuse(model, layers, kernel, pool)? else {
            log::info!(
                "the attention does not match the ring-buffer rewrite; keeping the graph's \
                 past/present KV cache (bounded by the model's context, copied every step)"
            );
            return Ok(false);
        };
        for &i in fused.removed_inputs.iter().rev() {
            self.inputs.remove(i);
        }
        for &o in fused.removed_outputs.iter().rev() {
            self.outputs.remove(o);
        }
        Ok(true)
    }

    /// Matches names to roles, and checks the cache tensors against the config.
    pub(super) fn bind(
        &self,
        model: &TypedModel,
        config: &Config,
        fused: bool,
    ) -> Result<Bindings> {
        ensure!(
            model.inputs.len() == self.inputs.len() && model.outputs.len() == self.outputs.len(),
            "tract sees {} inputs and {} outputs, the graph declares {} and {}",
            model.inputs.len(),
            model.outputs.len(),
            self.inputs.len(),
            self.outputs.len()
        );
        for (ix, name) in self.inputs.iter().enumerate() {
            let node = &model.node(model.inputs[ix].node).name;
            ensure!(
                node == name,
                "input {ix} is {node:?} in tract but {name:?} in the graph"
            );
        }
        let layers = config.num_hidden_layers;
        let mut past = vec![(None, None); layers];
        let (mut input_ids, mut attention_mask, mut position_ids) = (None, None, None);
        let mut logit_rows = None;
        for (ix, name) in self.inputs.iter().enumerate() {
            match name.as_str() {
                "input_ids" => input_ids = Some(ix),
                LOGIT_ROWS => logit_rows = Some(ix),
                "attention_mask" => attention_mask = Some(ix),
                "position_ids" => position_ids = Some(ix),
                _ => {
                    let slot = cache_slot(name, "past_key_values.", layers)
                        .filter(|_| !fused)
                        .with_context(|| format!("unexpected input {name:?}"))?;
                    set_once(&mut past, slot, ix, name)?;
                }
            }
        }
        let mut present = vec![(None, None); layers];
        let mut logits = None;
        for (ix, name) in self.outputs.iter().enumerate() {
            if name == "logits" {
                logits = Some(ix);
            } else if let Some(slot) = cache_slot(name, "present.", layers) {
                set_once(&mut present, slot, ix, name)?;
            }
        }
        let complete = |v: Vec<(Option<usize>, Option<usize>)>, what: &str| {
            v.into_iter()
                .enumerate()
                .map(|(layer, kv)| match kv {
                    (Some(k), Some(v)) => Ok((k, v)),
                    _ => bail!("missing {what}.{layer}.key or .value ({layers} layers in config)"),
                })
                .collect::<Result<Vec<_>>>()
        };
        let input_ids = input_ids.context("no `input_ids` input")?;
        let logits = logits.context("no `logits` output")?;
        let (kv, kv_heads, head_dim) = if fused {
            let mut ring = vec![None; layers];
            for node in model.nodes() {
                if let Some(op) = node.op_as::<attention::RingAttention>() {
                    let slot = ring
                        .get_mut(op.layer)
                        .context("ring op of an unknown layer")?;
                    ensure!(
                        slot.replace(node.id).is_none(),
                        "two ring ops for layer {}",
                        op.layer
                    );
                }
            }
            let nodes = ring
                .into_iter()
                .enumerate()
                .map(|(l, n)| n.with_context(|| format!("layer {l} lost its ring attention")))
                .collect::<Result<Vec<_>>>()?;
            (
                KvIo::Ring { nodes },
                config.num_key_value_heads,
                config.head_dim,
            )
        } else {
            let past = complete(past, "past_key_values")?;
            let present = complete(present, "present")?;

            let fact = model.input_fact(past[0].0)?;
            ensure!(
                fact.datum_type == f32::datum_type() && fact.rank() == 4,
                "past_key_values.0.key is {fact:?}, expected f32 (batch, kv_heads, past, head_dim)"
            );
            let kv_heads = fact.shape[1]
                .as_i64()
                .map(|d| d as usize)
                .context("kv_heads is not a number")?;
            let head_dim = fact.shape[3]
                .as_i64()
                .map(|d| d as usize)
                .context("head_dim is not a number")?;
            ensure!(
                kv_heads == config.num_key_value_heads && head_dim == config.head_dim,
                "the cache has {kv_heads} heads of {head_dim}, config.json says {} of {}",
                config.num_key_value_heads,
                config.head_dim
            );
            let logits_fact = model.output_fact(logits)?;
            if let Some(vocab) = logits_fact
                .shape
                .last()
                .and_then(|d| d.as_i64())
                .map(|d| d as usize)
            {
                ensure!(
                    vocab == config.vocab_size,
                    "logits are {vocab} wide, config.json says vocab_size {}",
                    config.vocab_size
                );
            }
            (KvIo::Explicit { past, present }, kv_heads, head_dim)
        };
        Ok(Bindings {
            inputs: self.inputs.len(),
            input_ids,
            attention_mask,
            position_ids,
            logit_rows,
            logits,
            kv,
            kv_heads,
            head_dim,
        })
    }
}

/// `(layer, is_value)` of a name like `past_key_values.3.value`.
pub(super) fn cache_slot(name: &str, prefix: &str, layers: usize) -> Option<(usize, bool)> {
    let (layer, kind) = name.strip_prefix(prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok().filter(|&l| l < layers)?;
    match kind {
        "key" => Some((layer, false)),
        "value" => Some((layer, true)),
        _ => None,
    }
}

pub(super) fn set_once(
    table: &mut [(Option<usize>, Option<usize>)],
    (layer, is_value): (usize, bool),
    ix: usize,
    name: &str,
) -> Result<()> {
    let slot = if is_value {
        &mut table[layer].1
    } else {
        &mut table[layer].0
    };
    ensure!(slot.replace(ix).is_none(), "{name:?} appears twice");
    Ok(())
}
