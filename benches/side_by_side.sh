#!/usr/bin/env bash
# The scale ladder: edgelm against llama.cpp (Q8_0 and Q4_0) on one or more model shapes,
# same machine, same run, alternating; prints a table per shape with medians, ranges and
# ratios (edgelm / llama.cpp).
#
#   benches/side_by_side.sh [-t THREADS] [-r ROUNDS] SHAPE...
#   EDGELM=path/to/edgelm benches/side_by_side.sh ...   (another build of edgelm)
#
# SHAPE (or `all`):
#   smollm2-135m  SmolLM2-135M-Instruct, the real model (its Q4_1 GGUF, models/fetch-smollm2.sh)
#   smollm2-360m  random weights at SmolLM2-360M's dimensions (960 hidden, 2560 FFN, 32 layers,
#                 15/5 heads)
#   llama3.2-1b   random weights at Llama-3.2-1B's dimensions (2048 hidden, 8192 FFN,
#                 16 layers, 32/8 heads), with SmolLM2's 49 152-token vocabulary
# Random-weight GGUFs are written in Q8_0 by benches/ladder_gguf.py (llama.cpp's gguf-py).
# llama.cpp runs each shape as Q8_0 and as Q4_0 (`llama-quantize --allow-requantize --pure`:
# every matrix Q4_0, the tied embedding/LM head included, where its default mix would keep
# that one in Q6_K); on aarch64 with SDOT both are repacked at load into its interleaved GEMM
# layouts, on x86 with AVX2 Q4_0 is. edgelm runs its own conversion (`edgelm convert`, int8)
# with `edgelm bench`.
# What one round measures, and how: benches/side_by_side.py. Default: 2 threads, 3 rounds.
#
# Files are cached under ~/.cache/edgelm/ladder (GGUFs, converted bundles: reconverted when
# the edgelm binary is newer than the bundle); every round's raw figures are appended to
# target/ladder/side_by_side.jsonl. llama.cpp is built from the sources in the PyPI sdist of
# llama-cpp-python (cached under ~/.cache/edgelm/llama.cpp; needs gcc/g++ and downloads
# cmake from PyPI), numpy for the GGUF writer likewise into ~/.cache/edgelm/ladder/venv.
# Not run by CI.
set -euo pipefail
shopt -s inherit_errexit  # command substitutions (the model helpers below) stop on errors too
cd "$(dirname "$0")/.."

threads=2
rounds=3
shapes=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -t) threads="$2"; shift ;;
    -r) rounds="$2"; shift ;;
    all) shapes+=(smollm2-135m smollm2-360m llama3.2-1b) ;;
    smollm2-135m | smollm2-360m | llama3.2-1b) shapes+=("$1") ;;
    *)
      echo "usage: benches/side_by_side.sh [-t THREADS] [-r ROUNDS] smollm2-135m|smollm2-360m|llama3.2-1b|all..." >&2
      exit 2
      ;;
  esac
  shift
done
[[ ${#shapes[@]} -gt 0 ]] || shapes=(smollm2-135m)

cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/edgelm"
cache="$cache_root/llama.cpp"
ladder="$cache_root/ladder"
mkdir -p "$cache" "$ladder"

# --- llama.cpp -----------------------------------------------------------------------------
# Native build without AMX: on CPUs that have it (Xeon Sapphire Rapids and later) ggml's AMX
# matmul crashes in llama-bench on our VMs (SIGSEGV in ggml_backend_amx_mul_mat); every other
# instruction set the CPU has (AVX-512, VNNI) stays on.
build="$cache/build-noamx"
bin="$build/bin"
native_flags=""
[[ "$(uname -m)" == x86_64 ]] && native_flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
tree="$(models/fetch-llama-cpp.sh)"
if [[ ! -x "$bin/llama-bench" || ! -x "$bin/llama-quantize" ]]; then
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

# --- edgelm --------------------------------------------------------------------------------
# EDGELM=path/to/edgelm runs that binary instead of this tree's release build.
edgelm="${EDGELM:-}"
if [[ -z "$edgelm" ]]; then
  cargo build --release --quiet
  edgelm="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/edgelm"
fi
edgelm="$(realpath "$edgelm")"

# --- models --------------------------------------------------------------------------------
# The GGUF writer's Python packages (numpy, pyyaml, tqdm), once.
venv="$ladder/venv"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import numpy, yaml, tqdm' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet numpy pyyaml tqdm
fi
smollm2_gguf="$(models/fetch-smollm2.sh --gguf-only)"

# Prints the Q8_0 GGUF of a shape, writing it first if needed.
q8_gguf() {
  local shape="$1" out="$ladder/$1.Q8_0.gguf"
  if [[ ! -s "$out" ]]; then
    if [[ "$shape" == smollm2-135m ]]; then
      "$bin/llama-quantize" --allow-requantize "$smollm2_gguf" "$out.part" Q8_0 >&2
      mv "$out.part" "$out"
    else
      echo "== writing $out" >&2
      GGUF_PY="$tree/gguf-py" "$venv/bin/python" benches/ladder_gguf.py \
        "$shape" "$out" --tokenizer "$smollm2_gguf" >&2
    fi
  fi
  echo "$out"
}

# Prints the Q4_0 GGUF of a shape (every matrix Q4_0), writing it if needed.
q4_gguf() {
  local shape="$1" out="$ladder/$1.Q4_0.gguf" from
  if [[ ! -s "$out" ]]; then
    from="$smollm2_gguf"
    [[ "$shape" == smollm2-135m ]] || from="$(q8_gguf "$shape")"
    "$bin/llama-quantize" --allow-requantize --pure "$from" "$out.part" Q4_0 >&2
    mv "$out.part" "$out"
  fi
  echo "$out"
}

# Prints edgelm's int8 bundle of a shape, converted from the GGUF edgelm would be given
# (the 135M's original Q4_1, the ladder's Q8_0), again whenever the binary is newer.
bundle() {
  local shape="$1" out="$ladder/$1-int8" from
  if [[ ! -s "$out/model.onnx" || "$edgelm" -nt "$out/model.onnx" ]]; then
    from="$smollm2_gguf"
    [[ "$shape" == smollm2-135m ]] || from="$(q8_gguf "$shape")"
    echo "== edgelm convert $from" >&2
    rm -rf "$out.part"
    "$edgelm" convert "$from" -o "$out.part" >&2
    rm -rf "$out"
    mv "$out.part" "$out"
  fi
  echo "$out"
}

# --- runs ----------------------------------------------------------------------------------
mkdir -p target/ladder
for shape in "${shapes[@]}"; do
  # Assignments, so that a failure here stops the script (set -e).
  q8="$(q8_gguf "$shape")"
  q4="$(q4_gguf "$shape")"
  ours="$(bundle "$shape")"
  python3 benches/side_by_side.py --shape "$shape" --threads "$threads" --rounds "$rounds" \
    --llama-bin "$bin" --q8 "$q8" --q4 "$q4" --edgelm "$edgelm" --bundle "$ours" \
    --json-out target/ladder/side_by_side.jsonl
done
