#!/usr/bin/env bash
# Fetches llama.cpp's sources as the llama-cpp-python sdist from PyPI bundles them, and unpacks
# them under ${XDG_CACHE_HOME:-~/.cache}/edgelm/llama.cpp/src (cached and idempotent). Prints
# the llama.cpp source directory (…/src/vendor/llama.cpp): its models/ has llama.cpp's
# tokenizer test vectors (ggml-vocab-*.gguf with .inp/.out) and models/templates/ the chat
# templates the tests use; benches/side_by_side.sh builds llama.cpp from it.
#
#   models/fetch-llama-cpp.sh
set -euo pipefail

cache="${XDG_CACHE_HOME:-$HOME/.cache}/edgelm/llama.cpp"
version=0.3.36
sdist="$cache/llama_cpp_python-$version.tar.gz"
src="$cache/src"
tree="$src/vendor/llama.cpp"
mkdir -p "$cache"

if [[ ! -s "$sdist" ]]; then
  echo "== downloading llama-cpp-python $version (sdist) from PyPI" >&2
  python3 - "$sdist.part" "$version" <<'PY'
import json, sys, urllib.parse, urllib.request
out, version = sys.argv[1], sys.argv[2]
index = "https://pypi.org/pypi/llama-cpp-python/json"
releases = json.load(urllib.request.urlopen(index, timeout=60))["releases"][version]
sdist = next(f for f in releases if f["packagetype"] == "sdist")
urllib.request.urlretrieve(urllib.parse.urljoin(index, sdist["url"]), out)
PY
  mv "$sdist.part" "$sdist"
fi

# Unpacked into a temporary directory and moved into place whole, so a tree that has these
# files is complete.
needed=(CMakeLists.txt models/ggml-vocab-qwen35.gguf.out models/templates/Qwen-Qwen3-0.6B.jinja)
complete=1
for f in "${needed[@]}"; do [[ -f "$tree/$f" ]] || complete=0; done
if [[ "$complete" == 0 ]]; then
  tmp="$(mktemp -d "$cache/src.XXXXXX")"
  tar xzf "$sdist" -C "$tmp" --strip-components=1
  rm -rf "$src"
  mv "$tmp" "$src"
fi
echo "$tree"
