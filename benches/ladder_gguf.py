#!/usr/bin/env python3
"""Writes a random-weight Llama GGUF (Q8_0) at the dimensions of a real model, for the scale
ladder (benches/side_by_side.sh).

    ladder_gguf.py SHAPE OUT.gguf [--tokenizer SMOLLM2.gguf] [--seed N]

SHAPE is one of the keys of SHAPES below. The weights are gaussian (std 0.02, the usual
initialisation) and quantized to Q8_0 by gguf-py's reference quantizer; norm weights are 1.
Weight values do not change the work an engine does per token, only the text it produces,
so these files time exactly what the real models would. The tokenizer (SmolLM2's 49 152-token
BPE vocabulary, its merges and chat template) is copied from the SmolLM2 GGUF, so both
engines tokenize prompts as they do for the real 135M model. The embedding is tied to the
LM head (no `output.weight`), as in all three real models.

Left out on purpose: Llama-3.2's RoPE frequency scaling (`rope_freqs.weight`). It rescales
the rotation frequencies (a per-dimension factor, no extra work per token), and edgelm's
converter does not read it; theta, the norm epsilon and the context length are the real
model's.

Needs numpy, pyyaml and tqdm, and llama.cpp's gguf-py (from the llama-cpp-python sdist:
GGUF_PY=.../vendor/llama.cpp/gguf-py). benches/side_by_side.sh sets both up.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

GGUF_PY = os.environ.get(
    "GGUF_PY",
    str(Path.home() / ".cache/edgelm/llama.cpp/src/vendor/llama.cpp/gguf-py"),
)
sys.path.insert(0, GGUF_PY)
import gguf  # noqa: E402

# Real models' hyper-parameters (their config.json): hidden size, FFN size, layers, query
# heads, KV heads, RoPE theta, RMS norm epsilon, trained context.
SHAPES = {
    # HuggingFaceTB/SmolLM2-360M-Instruct
    "smollm2-360m": dict(hidden=960, ffn=2560, layers=32, heads=15, kv_heads=5,
                         rope_theta=100000.0, eps=1e-5, ctx=8192),
    # meta-llama/Llama-3.2-1B-Instruct (its 128 256-token vocabulary replaced by SmolLM2's)
    "llama3.2-1b": dict(hidden=2048, ffn=8192, layers=16, heads=32, kv_heads=8,
                        rope_theta=500000.0, eps=1e-5, ctx=131072),
}

WEIGHT_STD = 0.02


def default_tokenizer() -> Path:
    return Path.home() / ".cache/edgelm/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"


def copy_tokenizer(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> int:
    """Copies every `tokenizer.*` key; returns the vocabulary size."""
    vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=field.types[1])
            if key == "tokenizer.ggml.tokens":
                vocab = len(value)
        else:
            writer.add_key_value(key, value, field.types[0])
    if vocab == 0:
        sys.exit(f"ladder_gguf.py: no tokenizer.ggml.tokens in the tokenizer GGUF")
    return vocab


def tensor_plan(shape: dict, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape (rows, cols)) of every tensor, in llama.cpp's order and naming."""
    h, f, hd = shape["hidden"], shape["ffn"], shape["hidden"] // shape["heads"]
    q, kv = shape["heads"] * hd, shape["kv_heads"] * hd
    plan = [("token_embd.weight", (vocab, h))]
    for i in range(shape["layers"]):
        plan += [
            (f"blk.{i}.attn_norm.weight", (h,)),
            (f"blk.{i}.attn_q.weight", (q, h)),
            (f"blk.{i}.attn_k.weight", (kv, h)),
            (f"blk.{i}.attn_v.weight", (kv, h)),
            (f"blk.{i}.attn_output.weight", (h, q)),
            (f"blk.{i}.ffn_norm.weight", (h,)),
            (f"blk.{i}.ffn_gate.weight", (f, h)),
            (f"blk.{i}.ffn_up.weight", (f, h)),
            (f"blk.{i}.ffn_down.weight", (h, f)),
        ]
    plan.append(("output_norm.weight", (h,)))
    return plan


def tensor_data(rng: np.random.Generator, dims: tuple[int, ...]) -> np.ndarray:
    """Norm weights (1-D) are ones in f32; matrices are gaussian, quantized to Q8_0."""
    if len(dims) == 1:
        return np.ones(dims, dtype=np.float32)
    w = rng.standard_normal(dims, dtype=np.float32)
    w *= WEIGHT_STD
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", type=Path, default=default_tokenizer())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"]:
        sys.exit(f"ladder_gguf.py: {args.shape}: heads do not divide evenly")
    if not args.tokenizer.is_file():
        sys.exit(f"ladder_gguf.py: tokenizer GGUF {str(args.tokenizer)!r} not found")

    part = args.out.with_name(args.out.name + ".part")
    writer = gguf.GGUFWriter(part, "llama")
    vocab = copy_tokenizer(gguf.GGUFReader(args.tokenizer), writer)
    writer.add_name(f"random-weight {args.shape} shape (edgelm scale ladder)")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(vocab)
    writer.add_context_length(shape["ctx"])
    writer.add_embedding_length(shape["hidden"])
    writer.add_feed_forward_length(shape["ffn"])
    writer.add_block_count(shape["layers"])
    writer.add_head_count(shape["heads"])
    writer.add_head_count_kv(shape["kv_heads"])
    writer.add_rope_dimension_count(shape["hidden"] // shape["heads"])
    writer.add_rope_freq_base(shape["rope_theta"])
    writer.add_layer_norm_rms_eps(shape["eps"])

    # Tensor infos first, then the data one tensor at a time, so memory stays at one tensor.
    plan = tensor_plan(shape, vocab)
    for name, dims in plan:
        if len(dims) == 1:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), 4 * dims[0])
        else:
            rows, cols = dims
            if cols % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
                sys.exit(f"ladder_gguf.py: {name}: {cols} columns is not a multiple of 32")
            nbytes = rows * cols // 32 * 34
            writer.add_tensor_info(name, (rows, cols // 32 * 34), np.dtype(np.uint8), nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(args.seed)
    params = 0
    for name, dims in plan:
        data = tensor_data(rng, dims)
        writer.write_tensor_data(data)
        params += int(np.prod(dims))
    writer.close()
    part.rename(args.out)
    print(f"{args.out}: {params / 1e6:.1f}M parameters, {args.out.stat().st_size / 2**20:.0f} MiB",
          file=sys.stderr)


if __name__ == "__main__":
    main()
