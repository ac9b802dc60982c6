//! What a decoder is made of, whatever family it comes from: [`DecoderParams`] (sizes and
//! block features), the [`Tensor`]s a block reads and the [`Layout`] that says where a
//! checkpoint keeps them. `decoder.rs` writes the graph they describe.

use anyhow::{ensure, Result};

use super::rope::RopeScaling;

/// Hyper-parameters and block structure of a decoder, whatever family it comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderParams {
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden size (embedding width).
    pub hidden: usize,
    /// Number of decoder layers.
    pub layers: usize,
    /// Number of query heads.
    pub heads: usize,
    /// Number of key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Inner width of the MLP.
    pub ffn: usize,
    /// Trained context length.
    pub max_positions: usize,
    /// How token positions enter the model.
    pub positions: Positions,
    /// How RoPE's frequencies are rescaled (rotary models only).
    pub rope_scaling: RopeScaling,
    /// RMSNorm over each head's query and key before RoPE (Qwen3's and Gemma's
    /// `q_norm`/`k_norm`).
    pub qk_norm: bool,
    /// The normalization before attention, before the MLP and after the last block.
    pub norm: Norm,
    /// The normalization's epsilon.
    pub norm_eps: f32,
    /// Added to every RMSNorm weight as read: 1 for Gemma's Hugging Face checkpoints, whose
    /// norms scale by `1 + w`; 0 elsewhere (llama.cpp's Gemma GGUF files store `1 + w`).
    pub norm_offset: f32,
    /// A norm on the attention output and on the MLP output before each joins the residual
    /// (Gemma's four norms per block).
    pub post_norms: bool,
    /// Multiplies the token embeddings (Gemma's `sqrt(hidden)`).
    pub embed_scale: Option<f32>,
    /// Multiplies `q·k`; `None` for `1 / sqrt(head_dim)`.
    pub attn_scale: Option<f32>,
    /// Local (sliding-window) layers, if any.
    pub window: Option<SlidingWindow>,
    /// The MLP's shape and activation.
    pub mlp: Mlp,
    /// Which linear layers carry a bias.
    pub bias: Biases,
    /// Whether the LM head shares the embedding matrix.
    pub tied_embeddings: bool,
}

/// Sliding-window attention on some layers (Gemma 3's local layers).
#[derive(Clone, Debug, PartialEq)]
pub struct SlidingWindow {
    /// Keys a query on a local layer sees: its own position and the `size - 1` before it.
    pub size: usize,
    /// Per layer, whether it is local; (layers).
    pub local: Vec<bool>,
    /// RoPE base frequency of the local layers, never rescaled; global layers use
    /// [`Positions::Rope`] with [`DecoderParams::rope_scaling`].
    pub rope_theta: f32,
}

/// How token positions enter the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Positions {
    /// Rotary embeddings (rotate-half form) on Q and K, with this base frequency.
    Rope { theta: f32 },
    /// A learned (max_positions, hidden) table added to the token embeddings.
    Learned,
}

/// A normalization layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// RMSNorm: `x / sqrt(mean(x^2) + eps) * weight`.
    Rms,
    /// LayerNorm: `(x - mean) / sqrt(var + eps) * weight + bias`.
    Layer,
}

/// The MLP: `down(act(gate(x)) * up(x))` when gated, else `down(act(up(x)))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mlp {
    /// The activation.
    pub activation: Activation,
    /// Whether a gate projection multiplies the activation (SwiGLU, GeGLU).
    pub gated: bool,
}

/// An MLP activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)`.
    Silu,
    /// The tanh approximation of GELU (GPT-2's `gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

/// Which linear layers carry a bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Biases {
    /// The Q, K and V projections.
    pub qkv: bool,
    /// The attention output projection.
    pub output: bool,
    /// The MLP projections.
    pub mlp: bool,
}

impl DecoderParams {
    /// The RoPE base frequency, for rotary models.
    pub fn rope_theta(&self) -> Option<f32> {
        match self.positions {
            Positions::Rope { theta } => Some(theta),
            Positions::Learned => None,
        }
    }

    /// Checks the shapes agree with each other.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.vocab > 0 && self.hidden > 0 && self.layers > 0 && self.ffn > 0,
            "model has a zero dimension: {self:?}"
        );
        ensure!(
            self.heads > 0 && self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
            "{} attention heads is not a multiple of {} key/value heads",
            self.heads,
            self.kv_heads
        );
        let rope = matches!(self.positions, Positions::Rope { .. });
        ensure!(
            self.head_dim > 0 && (!rope || self.head_dim.is_multiple_of(2)),
            "head dimension {} must be even for RoPE",
            self.head_dim
        );
        if let Some(w) = &self.window {
            ensure!(w.size > 0, "a sliding window of 0 tokens");
            ensure!(
                w.local.len() == self.layers,
                "{} layer types for {} layers",
                w.local.len(),
                self.layers
            );
            ensure!(rope, "sliding windows need RoPE");
        }
        Ok(())
    }

    /// Whether layer `l` is a local (sliding-window) layer, and its window.
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        let w = self.window.as_ref()?;
        w.local.get(l).copied().unwrap_or(false).then_some(w.size)
    }
}

/// A tensor of the decoder, by what it does. Weights are `{prefix}.weight` in the
/// checkpoint, biases `{prefix}.bias`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tensor {
    /// Token embedding (vocab, hidden).
    Embedding,
    /// Learned position table (max_positions, hidden).
    Positions,
    /// Norm after the last block.
    FinalNorm,
    /// LM head (vocab, hidden), when not tied.
    LmHead,
    /// Per-pair RoPE frequency divisors (head_dim / 2), with [`RopeScaling::FreqFactors`];
    /// only llama.cpp's checkpoints have one.
    RopeFreqs,
    /// Layer `l`'s norm before attention.
    AttnNorm(usize),
    /// Layer `l`'s query projection.
    Q(usize),
    /// Layer `l`'s key projection.
    K(usize),
    /// Layer `l`'s value projection.
    V(usize),
    /// Layer `l`'s Q, K and V projections as one tensor, rows in that order.
    Qkv(usize),
    /// Layer `l`'s attention output projection.
    O(usize),
    /// Layer `l`'s RMSNorm weight (head_dim) over each query head.
    QNorm(usize),
    /// Layer `l`'s RMSNorm weight (head_dim) over each key head.
    KNorm(usize),
    /// Layer `l`'s norm on the attention output, with [`DecoderParams::post_norms`].
    PostAttnNorm(usize),
    /// Layer `l`'s norm before the MLP.
    MlpNorm(usize),
    /// Layer `l`'s norm on the MLP output, with [`DecoderParams::post_norms`].
    PostMlpNorm(usize),
    /// Layer `l`'s MLP gate projection.
    Gate(usize),
    /// Layer `l`'s MLP up projection.
    Up(usize),
    /// Layer `l`'s MLP down projection.
    Down(usize),
}

/// Where a family's checkpoints keep the decoder's tensors, in the Hugging Face layout.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// The checkpoint prefix of a tensor, `None` for one the family does not have.
    pub prefix: fn(Tensor) -> Option<String>,
    /// Linear weights stored (in, out) as `Conv1D` rather than `nn.Linear`'s (out, in).
    pub conv1d: bool,
    /// Q, K and V stored as one [`Tensor::Qkv`] rather than three.
    pub fused_qkv: bool,
}
