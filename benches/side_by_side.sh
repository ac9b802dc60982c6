#!/usr/bin/env bash
# edgelm vs llama.cpp on SmolLM2-135M-Instruct, same machine, same run: prints both and the
# ratios (edgelm / llama.cpp) for decode, prefill and cold start to the first token.
#
#   benches/side_by_side.sh [THREADS]
#
# llama.cpp is built from the sources bundled in the PyPI sdist of llama-cpp-python
# (models/fetch-llama-cpp.sh, cached under ~/.cache/edgelm/llama.cpp; needs gcc/g++ and
# downloads cmake from PyPI), and the model is re-quantized from the Q4_1 GGUF to Q8_0 with
# its llama-quantize. edgelm runs the default int8 bundle with `edgelm bench` from a release
# build.
set -euo pipefail
cd "$(dirname "$0")/.."

threads="${1:-$(nproc)}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/edgelm/llama.cpp"
mkdir -p "$cache"

# --- llama.cpp -----------------------------------------------------------------------------
# Native build without AMX: on CPUs that have it (Xeon Sapphire Rapids and later) ggml's AMX
# matmul crashes in llama-bench on our VMs (SIGSEGV in ggml_backend_amx_mul_mat); every other
# instruction set the CPU has (AVX-512, VNNI) stays on.
build="$cache/build-noamx"
bin="$build/bin"
native_flags=""
[[ "$(uname -m)" == x86_64 ]] && native_flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [[ ! -x "$bin/llama-bench" || ! -x "$bin/llama-quantize" ]]; then
  tree="$(models/fetch-llama-cpp.sh)"
  if [[ ! -x "$cache/venv/bin/cmake" ]]; then
    python3 -m venv "$cache/venv"
    "$cache/venv/bin/pip" install --quiet cmake
  fi
  echo "== building llama-bench and llama-quantize" >&2
  "$cache/venv/bin/cmake" -S "$tree" -B "$build" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DCMAKE_C_FLAGS="$native_flags" -DCMAKE_CXX_FLAGS="$native_flags" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
  "$cache/venv/bin/cmake" --build "$build" -j "$(nproc)" \
    --target llama-bench llama-quantize >&2
fi

# --- models --------------------------------------------------------------------------------
gguf="$(models/fetch-smollm2.sh --gguf-only)"
q8="$cache/SmolLM2-135M-Instruct.Q8_0.gguf"
if [[ ! -f "$q8" ]]; then
  "$bin/llama-quantize" --allow-requantize "$gguf" "$q8" Q8_0 >&2
fi
bundle=models/smollm2-135m-instruct
[[ -f "$bundle/model.onnx" ]] || models/fetch-smollm2.sh >&2

cargo build --release --quiet
edgelm=target/release/edgelm
[[ -n "${CARGO_TARGET_DIR:-}" ]] && edgelm="$CARGO_TARGET_DIR/release/edgelm"

# --- runs ----------------------------------------------------------------------------------
echo "== llama.cpp Q8_0, $threads threads" >&2
llama_json="$("$bin/llama-bench" -m "$q8" -t "$threads" -p 64 -n 64 -r 3 -o json)"
# Cold start: load + a 16-token prompt + the first token, as a process would see it.
llama_cold="$( { /usr/bin/time -f %e "$bin/llama-bench" -m "$q8" -t "$threads" -p 16 -n 1 -r 1 \
  -o json >/dev/null; } 2>&1 | tail -1)"

echo "== edgelm int8, $threads threads" >&2
edgelm_json="$("$edgelm" bench -m "$bundle" -t "$threads" --prompt-tokens 64 --gen-tokens 64 --json)"
edgelm_cold_json="$("$edgelm" bench -m "$bundle" -t "$threads" --prompt-tokens 16 --gen-tokens 1 --json)"

python3 - "$llama_json" "$llama_cold" "$edgelm_json" "$edgelm_cold_json" <<'EOF'
import json, sys
llama, llama_cold, ours, ours_cold = sys.argv[1:5]
llama = json.loads(llama)
pp = next(r["avg_ts"] for r in llama if r["n_prompt"] > 0 and r["n_gen"] == 0)
tg = next(r["avg_ts"] for r in llama if r["n_gen"] > 0 and r["n_prompt"] == 0)
ours, cold = json.loads(ours), json.loads(ours_cold)
ours_cold_s = (cold["load_ms"] + cold["ttft_ms"]) / 1000
rows = [
    ("decode tok/s", ours["decode_tok_s"], tg),
    ("prefill tok/s (64)", ours["prefill_tok_s"], pp),
]
print(f"{'':24}{'edgelm':>10}{'llama.cpp':>12}{'ratio':>8}")
for name, a, b in rows:
    print(f"{name:24}{a:10.1f}{b:12.1f}{a / b:8.2f}")
# llama-bench's wall time includes its warm-up run, so it overstates llama.cpp's cold start.
print(f"{'cold start, 16 tok (s)':24}{ours_cold_s:10.2f}{float(llama_cold):12.2f}"
      f"{float(llama_cold) / ours_cold_s:8.2f}  (llama.cpp process wall time)")
print(f"decode at 1024 cached: {ours['decode_tok_s_at_1024']:.1f} tok/s "
      f"({ours['decode_tok_s_at_1024'] / ours['decode_tok_s']:.2f}x of decode at 64)")
print(f"edgelm peak RSS {ours['peak_rss_kb'] // 1024} MB, anonymous {ours['anon_rss_kb'] // 1024} MB, "
      f"model files {ours['model_bytes'] // 2**20} MB")
EOF
