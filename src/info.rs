//! `edgelm info`: what a bundle holds and which of edgelm's fast paths it gets once loaded.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;

use crate::engine::Engine;
use crate::kv_cache::KvType;
use crate::model::{LoadOptions, LoadSummary, Model};
use crate::quant::op as q8op;

/// Which bundle `edgelm info` describes, loaded how.
#[derive(Clone, Debug)]
pub struct InfoOptions {
    /// The model bundle directory.
    pub model: PathBuf,
    /// Threads, int8 path and kernel (the fast paths depend on them).
    pub load: LoadOptions,
}

/// Loads the bundle named by `args` and writes one `key: value` line per fact to `out`.
pub fn run(args: &InfoOptions, out: &mut dyn Write) -> Result<()> {
    let engine = Engine::load(&args.model, &args.load)?;
    let c = engine.model.config();
    let s = engine.model.summary();
    let token = |id: u32| match engine.tokenizer.decode(&[id], false) {
        Ok(text) => format!("{id} {text:?}"),
        Err(_) => id.to_string(),
    };
    let arch = match &c.architecture {
        Some(a) => format!("{} ({a})", c.model_type),
        None => c.model_type.clone(),
    };
    let positions = match c.rope_theta {
        Some(theta) => format!("RoPE, theta {theta}"),
        None => "learned absolute positions".to_string(),
    };
    let eos: Vec<String> = c.eos_token_ids.iter().map(|&id| token(id)).collect();
    writeln!(out, "model: {}", args.model.display())?;
    writeln!(out, "architecture: {arch}")?;
    writeln!(
        out,
        "sizes: {} layers, hidden {}, {} heads ({} key/value) of {}, vocab {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size
    )?;
    writeln!(
        out,
        "parameters: {} ({:.1} MB stored)",
        s.parameters,
        s.weight_bytes as f64 / 1e6
    )?;
    writeln!(out, "quantization: {}", quantization(c.edgelm.as_ref(), s))?;
    writeln!(
        out,
        "context: {} positions ({positions})",
        c.max_position_embeddings
    )?;
    writeln!(
        out,
        "special tokens: bos {}, eos [{}]",
        c.bos_token_id.map_or("none".to_string(), token),
        eos.join(", ")
    )?;
    writeln!(
        out,
        "chat template: {}",
        if engine.template.is_some() {
            "yes"
        } else {
            "no"
        }
    )?;
    for line in kv_lines(&engine.model) {
        writeln!(out, "{line}")?;
    }
    for line in fast_paths(s) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// Each layer's ring slots at the default context and the KV bytes a token adds with the
/// default storage: every global layer keeps one more token, a sliding-window layer's ring
/// stays its window.
fn kv_lines(model: &Model) -> Vec<String> {
    let c = model.config();
    let state = model.new_state();
    let slots = state.layer_capacities();
    if slots.is_empty() {
        return vec!["KV ring: none (the graph's explicit past/present tensors)".into()];
    }
    let kv = KvType::default();
    let per_slot = 2 * c.num_key_value_heads * c.head_dim * kv.bytes(); // key and value
    let global = (0..slots.len())
        .filter(|&l| c.layer_window(l).is_none())
        .count();
    let list: Vec<String> = slots.iter().map(usize::to_string).collect();
    let mut lines = vec![format!(
        "KV ring slots per layer (--ctx {}): {}",
        state.capacity(),
        list.join(" ")
    )];
    let local: usize = (0..slots.len())
        .filter(|&l| c.layer_window(l).is_some())
        .map(|l| slots[l] * per_slot)
        .sum();
    let mut bytes = format!(
        "KV bytes per token: {} ({}; {global} of {} layers keep every token)",
        global * per_slot,
        kv.name(),
        slots.len()
    );
    if local > 0 {
        let n = slots.len() - global;
        bytes.push_str(&format!(
            ", plus {local} bytes for the {n} sliding-window layers' rings"
        ));
    }
    lines.push(bytes);
    lines
}

/// How the weights are stored, from our converter's config section or the graph's ops.
fn quantization(
    edgelm: Option<&serde_json::Map<String, serde_json::Value>>,
    s: &LoadSummary,
) -> String {
    let has = |op: &str| s.source_ops.get(op).copied().unwrap_or(0) > 0;
    match edgelm
        .and_then(|e| e.get("quantization"))
        .and_then(|q| q.as_str())
    {
        Some("int8") => match edgelm.and_then(|e| e.get("int8_layout")?.as_str()) {
            Some("tiled") => "int8, blocks of 32 with an f32 scale, tiled layout (edgelm)".into(),
            _ => "int8, blocks of 32 with an f32 scale, row-major layout (edgelm)".into(),
        },
        Some(other) => format!("{other} (edgelm)"),
        None if has("MatMulInteger") => {
            "int8, ONNX Runtime dynamic quantization (DynamicQuantizeLinear + MatMulInteger)".into()
        }
        None if has("DequantizeLinear") => "int8 (QDQ DequantizeLinear)".into(),
        None => "f32".into(),
    }
}

/// The `fast path` lines: int8 operators, KV cache, LM head, and the ops tract runs.
fn fast_paths(s: &LoadSummary) -> Vec<String> {
    let mut lines = Vec::new();
    let source = s.source_ops.get("MatMulInteger").copied().unwrap_or(0);
    let left = source.saturating_sub(s.matmul_integer_rewritten);
    match &s.int8_exec {
        Some(exec) => lines.push(format!(
            "fast path int8: {} matrices in {} Q8MatMul + {} Q8Gather ops ({exec}); {} rewritten \
             from MatMulInteger, {} weights requantized or copied onto the heap (the others \
             mapped in place)",
            s.q8_matmuls,
            s.optimized_ops.get(q8op::MATMUL).copied().unwrap_or(0),
            s.q8_gathers,
            s.matmul_integer_rewritten,
            s.q8_on_heap
        )),
        None => lines.push("fast path int8: off (no int8 weights our operators take)".into()),
    }
    if left > 0 {
        lines.push(format!(
            "slow path: {left} MatMulInteger layers left to tract's integer matmul"
        ));
    }
    if s.dequantize_folded > 0 {
        lines.push(format!(
            "folded: {} blocked DequantizeLinear dequantized to f32 at load",
            s.dequantize_folded
        ));
    }
    lines.push(format!(
        "fast path KV cache: {}",
        if s.ring_cache {
            "ring buffer fused into the attention (RingAttention), f16 keys and values by default"
        } else {
            "off: the graph's explicit past/present tensors, copied every step"
        }
    ));
    lines.push(format!(
        "fast path LM head: {}",
        if s.logit_rows {
            "logits only for the rows asked for"
        } else {
            "off: logits for every row"
        }
    ));
    let mut ops: Vec<(&String, &usize)> = s.optimized_ops.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let ops: Vec<String> = ops.iter().map(|(op, n)| format!("{n} {op}")).collect();
    lines.push(format!("optimized graph: {}", ops.join(", ")));
    lines
}
