//! `edgelm info -m DIR` on the tiny bundles: the facts a user needs before running a model.

use crate::common;

use common::fixture;
use std::path::Path;

fn info(bundle: &str) -> String {
    info_of(&fixture(bundle))
}

fn info_of(dir: &Path) -> String {
    let out = common::edgelm_command()
        .args(["info", "-t", "1", "-m"])
        .arg(dir)
        .output()
        .unwrap();
    common::assert_success(&out);
    String::from_utf8(out.stdout).unwrap()
}

fn line<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} line in:\n{text}"))
}

#[test]
fn info_describes_an_ort_int8_gpt2_export() {
    let text = info("tiny-gpt2/onnx-int8");
    assert_eq!(line(&text, "architecture: "), "gpt2 (GPT2LMHeadModel)");
    assert_eq!(
        line(&text, "sizes: "),
        "2 layers, hidden 64, 4 heads (4 key/value) of 16, vocab 384"
    );
    assert_eq!(
        line(&text, "quantization: "),
        "int8, ONNX Runtime dynamic quantization (DynamicQuantizeLinear + MatMulInteger)"
    );
    assert_eq!(
        line(&text, "context: "),
        "128 positions (learned absolute positions)"
    );
    assert_eq!(
        line(&text, "special tokens: "),
        "bos 0 \"<|endoftext|>\", eos [0 \"<|endoftext|>\"]"
    );
    assert!(line(&text, "fast path int8: ")
        .starts_with("8 matrices in 8 Q8MatMul + 0 Q8Gather ops (Auto/"));
    assert!(line(&text, "fast path int8: ").contains("8 rewritten from MatMulInteger"));
    assert_eq!(
        line(&text, "fast path KV cache: "),
        "ring buffer fused into the attention (RingAttention), f16 keys and values by default"
    );
    assert!(!text.contains("slow path"), "{text}");
}

#[test]
fn info_describes_an_f32_llama_export() {
    let text = info("tiny-llama/onnx-f32");
    assert_eq!(line(&text, "architecture: "), "llama (LlamaForCausalLM)");
    assert_eq!(line(&text, "quantization: "), "f32");
    assert_eq!(
        line(&text, "context: "),
        "256 positions (RoPE, theta 10000)"
    );
    assert_eq!(
        line(&text, "fast path int8: "),
        "off (no int8 weights our operators take)"
    );
}

/// `edgelm convert HF_DIR` then `info`: every GPT-2 linear layer (Q, K, V split from `c_attn`,
/// both projections, the MLP, the tied LM head) and the embedding run on the int8 operators,
/// their weights mapped in place.
#[test]
fn info_after_converting_the_hf_gpt2_shows_int8_weights_in_place() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("info-converted-gpt2");
    let _ = std::fs::remove_dir_all(&dir);
    let out = common::edgelm_command()
        .arg("convert")
        .arg(fixture("tiny-gpt2/hf"))
        .arg("-o")
        .arg(&dir)
        .args(["--quant", "int8"])
        .output()
        .unwrap();
    common::assert_success(&out);
    let text = info_of(&dir);
    assert_eq!(line(&text, "architecture: "), "gpt2 (GPT2LMHeadModel)");
    assert_eq!(
        line(&text, "quantization: "),
        "int8, blocks of 32 with an f32 scale, tiled layout (edgelm)"
    );
    let int8 = line(&text, "fast path int8: ");
    assert!(
        int8.starts_with("13 matrices in 9 Q8MatMul + 1 Q8Gather ops ("),
        "{int8}"
    );
    assert!(
        int8.contains("0 weights requantized or copied onto the heap"),
        "{int8}"
    );
    assert_eq!(
        line(&text, "fast path KV cache: "),
        "ring buffer fused into the attention (RingAttention), f16 keys and values by default"
    );
}
