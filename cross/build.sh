#!/usr/bin/env bash
# Builds the board binary with the `pi` profile (fat LTO, one codegen unit, stripped, panic
# = abort) and prints its path and size:
#
#   cross/build.sh aarch64-unknown-linux-gnu      # 64-bit Pi OS: Pi 3, 4, 5, Zero 2 W
#   cross/build.sh armv7-unknown-linux-gnueabihf  # 32-bit Pi OS: Pi 2, 3, 4, Zero 2 W
#
# On top of the profile, for size (measured in cross/README.md, "Binary size"):
# - no unwind tables in our code and the dependencies: with panic = "abort" nothing unwinds
#   (std's prebuilt tables stay, so a panic still prints its message);
# - packed relative relocations (DT_RELR): the position-independent binary's relocations
#   shrink to a bitmap, address randomization kept. Needs glibc 2.36, as the binary does
#   anyway (Pi OS Bookworm);
# - identical code folding in the linker: generic code instantiated for types with the same
#   layout is kept once. Rust gives no guarantee that two functions have distinct
#   addresses, so folding them changes no behaviour; `cross/test.sh TARGET --board` runs the
#   integration tests against this binary. The GNU linker cannot fold, so the link goes
#   through the lld that ships with the Rust toolchain (rust-lld, through the `gcc-ld`
#   shim directory gcc is pointed at with -B, as rustc itself does for x86_64).
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

host="$(rustc -vV | sed -n 's/^host: //p')"
gcc_ld="$(rustc --print sysroot)/lib/rustlib/$host/bin/gcc-ld"
if [[ ! -x "$gcc_ld/ld.lld" ]]; then
  echo "cross/build.sh: no $gcc_ld/ld.lld (rustup's rustc component ships it)" >&2
  exit 1
fi
# The rustflags join those of .cargo/config.toml (armv7's +neon); the link arguments go to
# the final link only.
cargo rustc --locked --profile pi --target "$target" --bin edgelm \
  --config "target.$target.rustflags=[\"-C\", \"force-unwind-tables=no\"]" \
  -- -C link-arg=-fuse-ld=lld -C "link-arg=-B$gcc_ld" \
  -C link-arg=-Wl,-z,pack-relative-relocs -C link-arg=-Wl,--icf=all
bin="$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/$target/pi/edgelm"
echo "$bin: $(stat -c %s "$bin") bytes"
