//! [`fuse`]: the rewrite that puts a [`RingAttention`] in place of each layer's
//! `past_key_values` → `Concat` → attention → `present` subgraph.
//!
//! It recognises the Optimum / our converter layout on the typed (not yet decluttered)
//! graph: per layer a `Concat(past, new)` on the key and on the value, view ops (unsqueeze,
//! broadcast for grouped heads, reshape, transpose, scalar scaling) up to `EinSum(q, k)`, an
//! additive or `Where` mask, `Softmax` over the keys (with Optimum's `IsNaN` guard), and
//! `EinSum(p, v)`. Whatever does not match leaves the graph untouched.

use std::sync::Arc;

use anyhow::{Context, Result};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::nn::Softmax;

use super::RingAttention;
use crate::quant::{Kernel, ThreadPool};

/// What [`fuse`] changed: the graph inputs and outputs it removed, by index (ascending).
#[derive(Debug, Default)]
pub struct Fused {
    /// Indices into the model's inputs before the rewrite.
    pub removed_inputs: Vec<usize>,
    /// Indices into the model's outputs before the rewrite.
    pub removed_outputs: Vec<usize>,
}

/// One layer's match.
struct Site {
    layer: usize,
    past: [OutletId; 2],
    concat: [OutletId; 2],
    new: [OutletId; 2],
    q: OutletId,
    attn_out: OutletId,
    scale: f32,
}

/// Replaces each layer's cache concatenation and attention by a [`RingAttention`] running
/// `kernel` on `pool`; `None` (graph untouched) when some layer does not have the expected
/// shape.
pub fn fuse(
    model: &mut TypedModel,
    layers: usize,
    kernel: Kernel,
    pool: &Arc<ThreadPool>,
) -> Result<Option<Fused>> {
    let mut sites = Vec::with_capacity(layers);
    for layer in 0..layers {
        match find_site(model, layer)? {
            Ok(site) => sites.push(site),
            Err(why) => {
                log::info!("layer {layer}: {why}");
                return Ok(None);
            }
        }
    }
    let mut fused = Fused::default();
    for site in &sites {
        for (&past, &concat) in site.past.iter().zip(&site.concat) {
            let i = model
                .inputs
                .iter()
                .position(|&o| o == past)
                .context("cache input vanished")?;
            fused.removed_inputs.push(i);
            if let Some(o) = model.outputs.iter().position(|&o| o == concat) {
                fused.removed_outputs.push(o);
            }
        }
    }
    for site in &sites {
        let mut patch = TypedModelPatch::default();
        let q = patch.tap_model(model, site.q)?;
        let k = patch.tap_model(model, site.new[0])?;
        let v = patch.tap_model(model, site.new[1])?;
        let op = RingAttention {
            layer: site.layer,
            scale: site.scale,
            kernel,
            pool: Arc::clone(pool),
        };
        let out = patch.wire_node(format!("ring_attention.{}", site.layer), op, &[q, k, v])?;
        patch.shunt_outside(model, site.attn_out, out[0])?;
        patch.apply(model)?;
    }
    fused.removed_inputs.sort_unstable();
    fused.removed_outputs.sort_unstable();
    for &i in fused.removed_inputs.iter().rev() {
        model.inputs.remove(i);
    }
    for &o in fused.removed_outputs.iter().rev() {
        model.outputs.remove(o);
    }
    model.compact()?;
    Ok(Some(fused))
}

/// The layer's attention subgraph, or why it does not match.
fn find_site(model: &TypedModel, layer: usize) -> Result<std::result::Result<Site, String>> {
    macro_rules! need {
        ($cond:expr, $($why:tt)*) => {
            if !$cond {
                return Ok(Err(format!($($why)*)));
            }
        };
    }
    let mut past = [OutletId::new(0, 0); 2];
    let mut concat = [OutletId::new(0, 0); 2];
    let mut new = [OutletId::new(0, 0); 2];
    for (i, kind) in ["key", "value"].iter().enumerate() {
        let name = format!("past_key_values.{layer}.{kind}");
        let source = model
            .inputs
            .iter()
            .copied()
            .find(|o| model.node(o.node).name == name);
        need!(source.is_some(), "no input {name}");
        let source = source.context("checked")?;
        let succ = model.outlet_successors(source);
        need!(succ.len() == 1, "{name} feeds {} nodes", succ.len());
        let node = model.node(succ[0].node);
        need!(
            node.op_is::<TypedConcat>() && node.inputs.len() == 2 && succ[0].slot == 0,
            "{name} does not feed a Concat as its first input"
        );
        past[i] = source;
        concat[i] = node.id.into();
        new[i] = node.inputs[1];
        let fact = model.outlet_fact(new[i])?;
        need!(
            fact.rank() == 4 && fact.shape[0].as_i64() == Some(1),
            "new {kind}s of layer {layer} are {fact:?}, expected (1, kv_heads, s, head_dim)"
        );
    }

    let Some((qk, k_slot, k_scale)) = follow_views(model, concat[0])? else {
        return Ok(Err(format!("layer {layer}: keys do not reach an EinSum")));
    };
    let qk_node = model.node(qk);
    need!(
        qk_node.inputs.len() == 2,
        "QK EinSum has {} inputs",
        qk_node.inputs.len()
    );
    let q = qk_node.inputs[1 - k_slot];
    let k_fact = model.outlet_fact(new[0])?;
    let q_fact = model.outlet_fact(q)?;
    let scores_fact = &model.node(qk).outputs[0].fact;
    let (s, hd) = (&k_fact.shape[2], &k_fact.shape[3]);
    let total = &model.outlet_fact(concat[0])?.shape[2];
    let qr = q_fact.rank();
    let sr = scores_fact.rank();
    need!(
        qr >= 3 && &q_fact.shape[qr - 2] == s && &q_fact.shape[qr - 1] == hd,
        "layer {layer}: queries {q_fact:?} do not end in (s, head_dim)"
    );
    need!(
        sr == qr && &scores_fact.shape[sr - 2] == s && &scores_fact.shape[sr - 1] == total,
        "layer {layer}: scores {scores_fact:?} are not (…, s, past + s)"
    );

    // Scores → (scale, mask) → Softmax over the keys → PV EinSum.
    let mut scale = k_scale;
    let mut cur: OutletId = qk.into();
    let softmax = loop {
        let succ = model.outlet_successors(cur);
        need!(
            succ.len() == 1,
            "layer {layer}: scores feed {} nodes",
            succ.len()
        );
        let node = model.node(succ[0].node);
        if let Some(sm) = node.op_as::<Softmax>() {
            need!(
                sm.axes.as_slice() == [sr - 1],
                "layer {layer}: softmax is not over the keys"
            );
            break node.id;
        }
        if let Some(k) = scalar_factor(model, node, succ[0].slot)? {
            scale *= k;
        } else {
            let name = node.op.name();
            let masking =
                (name == "Add" && node.inputs.len() == 2) || (name == "Iff" && succ[0].slot >= 1);
            need!(masking, "layer {layer}: unexpected {name} on the scores");
        }
        cur = node.id.into();
    };
    let mut probs: OutletId = softmax.into();
    let succ = model.outlet_successors(probs);
    if succ.len() == 2 {
        // Optimum's guard: Where(IsNaN(p), 0, p).
        let names: Vec<_> = succ.iter().map(|i| model.node(i.node).op.name()).collect();
        let iff = succ.iter().find(|i| model.node(i.node).op.name() == "Iff");
        need!(
            names.iter().any(|n| n == "IsNan") && iff.is_some_and(|i| i.slot == 2),
            "layer {layer}: softmax output feeds {names:?}"
        );
        probs = iff.context("checked")?.node.into();
    }
    let Some((pv, p_slot, p_scale)) = follow_views(model, probs)? else {
        return Ok(Err(format!(
            "layer {layer}: probabilities do not reach an EinSum"
        )));
    };
    need!(p_scale == 1.0, "layer {layer}: scaled probabilities");
    let Some((pv_v, v_slot, v_scale)) = follow_views(model, concat[1])? else {
        return Ok(Err(format!("layer {layer}: values do not reach an EinSum")));
    };
    need!(
        pv_v == pv && v_slot != p_slot && v_scale == 1.0,
        "layer {layer}: values and probabilities meet in different EinSums"
    );
    let attn_out: OutletId = pv.into();
    let out_fact = model.outlet_fact(attn_out)?;
    need!(
        out_fact.shape == q_fact.shape,
        "layer {layer}: attention output {out_fact:?} differs from the queries {q_fact:?}"
    );
    Ok(Ok(Site {
        layer,
        past,
        concat,
        new,
        q,
        attn_out,
        scale,
    }))
}

/// From `outlet`, follows single-consumer view ops (axis ops, broadcasts, scalar factors) to
/// an `EinSum`: returns (its node, the input slot reached, the product of the factors).
fn follow_views(model: &TypedModel, outlet: OutletId) -> Result<Option<(usize, usize, f32)>> {
    let mut cur = outlet;
    let mut scale = 1f32;
    loop {
        let succ = model.outlet_successors(cur);
        if succ.len() != 1 {
            return Ok(None);
        }
        let node = model.node(succ[0].node);
        let name = node.op.name();
        if name == "EinSum" {
            return Ok(Some((node.id, succ[0].slot, scale)));
        }
        let view = node.op_is::<AxisOp>() || name == "MultiBroadcastTo";
        if !view {
            match scalar_factor(model, node, succ[0].slot)? {
                Some(k) => scale *= k,
                None => return Ok(None),
            }
        }
        cur = node.id.into();
    }
}

/// `k` when `node` computes `x * k` or `x / (1/k)` of its input `slot` with a uniform constant.
fn scalar_factor(model: &TypedModel, node: &TypedNode, slot: usize) -> Result<Option<f32>> {
    let Some(bin) = node.op_as::<TypedBinOp>() else {
        return Ok(None);
    };
    let name = bin.0.name();
    if node.inputs.len() != 2 || !(name == "Mul" || (name == "Div" && slot == 0)) {
        return Ok(None);
    }
    let Some(k) = model.outlet_fact(node.inputs[1 - slot])?.konst.clone() else {
        return Ok(None);
    };
    if k.datum_type() != f32::datum_type() {
        return Ok(None);
    }
    let values = k.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let Some(&first) = values.first() else {
        return Ok(None);
    };
    if values.iter().any(|&v| v != first) {
        return Ok(None);
    }
    Ok(Some(if name == "Mul" { first } else { 1.0 / first }))
}
