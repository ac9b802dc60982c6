#!/usr/bin/env bash
# Perplexity of SmolLM2-135M-Instruct, edgelm beside llama.cpp, same text, same --ctx:
#   edgelm f32 bundle   vs llama-perplexity on the F32 GGUF   (must agree within 0.5%)
#   edgelm int8 bundle  vs llama-perplexity on the Q8_0 GGUF  (reported side by side)
# Both GGUFs are made from the Q4_1 GGUF the bundles are converted from
# (llama-quantize --allow-requantize), so all four runs start from the same weights.
#
#   benches/perplexity.sh [TEXT] [CTX] [THREADS]
#
# TEXT defaults to tests/fixtures/ulysses_telemachus.txt (the first episode of Joyce's
# Ulysses, public domain, as in the llguidance crate's tests/data/ulysses.md; about 11k
# tokens), CTX to 512. llama.cpp's tools come from the
# build benches/side_by_side.sh makes under ~/.cache/edgelm/llama.cpp/build-noamx; a missing
# llama-perplexity is built there.
set -euo pipefail
cd "$(dirname "$0")/.."

text="${1:-tests/fixtures/ulysses_telemachus.txt}"
ctx="${2:-512}"
threads="${3:-$(nproc)}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/edgelm/llama.cpp"
build="$cache/build-noamx"
bin="$build/bin"

if [[ ! -x "$bin/llama-perplexity" || ! -x "$bin/llama-quantize" ]]; then
  if [[ ! -f "$build/CMakeCache.txt" ]]; then
    echo "llama.cpp is not configured under $build: run benches/side_by_side.sh once" >&2
    exit 1
  fi
  echo "== building llama-perplexity and llama-quantize" >&2
  "$cache/venv/bin/cmake" --build "$build" -j "$(nproc)" \
    --target llama-perplexity llama-quantize >&2
fi

# --- models --------------------------------------------------------------------------------
gguf="$(models/fetch-smollm2.sh --gguf-only)"
for q in F32 Q8_0; do
  out="$cache/SmolLM2-135M-Instruct.$q.gguf"
  [[ -f "$out" ]] || "$bin/llama-quantize" --allow-requantize "$gguf" "$out" "$q" >&2
done
models/fetch-smollm2.sh >&2
models/fetch-smollm2.sh --quant f32 >&2

cargo build --release --quiet
edgelm=target/release/edgelm
[[ -n "${CARGO_TARGET_DIR:-}" ]] && edgelm="$CARGO_TARGET_DIR/release/edgelm"

# --- runs ----------------------------------------------------------------------------------
# llama.cpp prints "Final estimate: PPL = 25.1234 +/- 0.56789"; so does edgelm.
final() { grep -o 'PPL = [0-9.]* +/- [0-9.]*' | tail -1 | awk '{print $3, $5}'; }

declare -A ppl
for q in F32 Q8_0; do
  echo "== llama.cpp $q, ctx $ctx, $threads threads" >&2
  ppl[llama_$q]="$("$bin/llama-perplexity" -m "$cache/SmolLM2-135M-Instruct.$q.gguf" \
    -f "$text" -c "$ctx" -b "$ctx" -t "$threads" -ctk f32 -ctv f32 2>&1 | final)"
done
for b in f32 int8; do
  dir=models/smollm2-135m-instruct
  [[ "$b" = int8 ]] || dir="$dir-$b"
  echo "== edgelm $b, ctx $ctx, $threads threads" >&2
  ppl[edgelm_$b]="$("$edgelm" perplexity -m "$dir" -f "$text" --ctx "$ctx" -t "$threads" | final)"
done

python3 - "$text" "$ctx" "${ppl[edgelm_f32]}" "${ppl[llama_F32]}" "${ppl[edgelm_int8]}" \
  "${ppl[llama_Q8_0]}" <<'EOF'
import sys
text, ctx = sys.argv[1:3]
ef, lf, eq, lq = ([float(x) for x in a.split()] for a in sys.argv[3:7])
print(f"perplexity of {text}, ctx {ctx}")
print(f"{'':10}{'edgelm':>20}{'llama.cpp':>20}{'difference':>12}")
for name, e, l in (("f32", ef, lf), ("int8/Q8_0", eq, lq)):
    print(f"{name:10}{e[0]:11.4f} ± {e[1]:<6.4f}{l[0]:11.4f} ± {l[1]:<6.4f}"
          f"{100 * (e[0] - l[0]) / l[0]:+11.3f}%")
ok = abs(ef[0] - lf[0]) / lf[0] <= 0.005
print("f32 within 0.5% of llama.cpp:", "yes" if ok else "NO")
sys.exit(0 if ok else 1)
EOF
