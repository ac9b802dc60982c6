#!/usr/bin/env bash
# Builds the board binary with the `pi` profile (fat LTO, one codegen unit, stripped, panic
# = abort) and prints its path and size:
#
#   cross/build.sh aarch64-unknown-linux-gnu      # 64-bit Pi OS: Pi 3, 4, 5, Zero 2 W
#   cross/build.sh armv7-unknown-linux-gnueabihf  # 32-bit Pi OS: Pi 2, 3, 4, Zero 2 W
#
# Linkers (and the armv7 +neon flag) come from .cargo/config.toml. Setup, once:
#   rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
#   apt-get install gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-}"
case "$target" in
  aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf) ;;
  *)
    echo "usage: cross/build.sh aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf" >&2
    exit 2
    ;;
esac

cargo build --locked --profile pi --target "$target" --bin edgelm
bin="$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/$target/pi/edgelm"
echo "$bin: $(stat -c %s "$bin") bytes"
