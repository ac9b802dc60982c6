#!/usr/bin/env bash
# Constrained against unconstrained decode speed, side by side with `edgelm bench`:
# rounds alternate no format, `--format json` (any JSON object) and `--json-schema
# lamp.json`, and the medians of decode tok/s give the ratios (the target is >= 0.9).
#
#   benches/constrained_decode.sh [ROUNDS] [THREADS] [GEN_TOKENS]
#
# Defaults: 5 rounds, 2 threads, 128 tokens; the default int8 bundle
# (EDGELM_MODEL or target/test-bundles/smollm2-int8, which `cargo test` converts) and the
# release build (EDGELM=path/to/edgelm runs another). Run it on a quiet machine. Not run by
# CI.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds="${1:-5}"
threads="${2:-2}"
gen="${3:-128}"
model="${EDGELM_MODEL:-target/test-bundles/smollm2-int8}"
edgelm="${EDGELM:-target/release/edgelm}"
[[ -n "${EDGELM:-}" ]] || cargo build --release --quiet

run() {
  "$edgelm" bench -m "$model" -t "$threads" --gen-tokens "$gen" --json "$@"
}
out="target/constrained_decode.jsonl"
: >"$out"
for ((r = 1; r <= rounds; r++)); do
  run | sed 's/^{/{"case":"none",/' >>"$out"
  run --format json | sed 's/^{/{"case":"json",/' >>"$out"
  run --json-schema tests/fixtures/formats/lamp.json | sed 's/^{/{"case":"lamp",/' >>"$out"
  echo "round $r/$rounds done" >&2
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = {}
for case in ("none", "json", "lamp"):
    rs = [r for r in rows if r["case"] == case]
    tps = [r["decode_tok_s"] for r in rs]
    mask = [r["mask_us"] for r in rs if r.get("mask_us") is not None]
    med[case] = statistics.median(tps)
    line = f"{case:5} decode {med[case]:7.1f} tok/s (range {min(tps):.1f}-{max(tps):.1f})"
    if mask:
        line += f", mask+pick {statistics.median(mask):6.0f} us/token"
    if case != "none":
        line += f", ratio {med[case] / med['none']:.3f}"
    print(line)
PY
