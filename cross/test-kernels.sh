#!/usr/bin/env bash
# Builds the whole crate for aarch64 and armv7 and runs the quant kernel tests under
# qemu-user: aarch64 twice (QEMU_CPU=max has dotprod, cortex-a57 has plain NEON only) so
# both NEON paths execute, armv7 once (portable kernels).
#
# Setup (once):
#   rustup target add aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
#   apt-get update && apt-get install -y gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf qemu-user
# Linkers and runners come from .cargo/config.toml.
#
# ARMV7_NEON=1 builds armv7 with `-C target-feature=+neon` (the target's default is VFP only;
# rustc warns the feature is unstable) so the portable integer dot products vectorize.
set -euo pipefail
cd "$(dirname "$0")/.."

aarch64=aarch64-unknown-linux-gnu
armv7=armv7-unknown-linux-gnueabihf

echo "== aarch64: whole crate (lib + bin)"
cargo build --target "$aarch64" --all-targets
echo "== aarch64, QEMU_CPU=max (NEON + dotprod)"
QEMU_CPU=max EDGELM_EXPECT_KERNELS=scalar,neon,dotprod cargo test --target "$aarch64" --lib quant
QEMU_CPU=max EDGELM_KERNEL=dotprod cargo test --target "$aarch64" --lib quant::tests::select_follows_the_environment
echo "== aarch64, QEMU_CPU=cortex-a57 (NEON, no dotprod)"
QEMU_CPU=cortex-a57 EDGELM_EXPECT_KERNELS=scalar,neon cargo test --target "$aarch64" --lib quant
QEMU_CPU=cortex-a57 EDGELM_KERNEL=neon cargo test --target "$aarch64" --lib quant::tests::select_follows_the_environment

armv7_flags=()
if [[ "${ARMV7_NEON:-0}" == 1 ]]; then
  armv7_flags=(--config "target.$armv7.rustflags=[\"-C\", \"target-feature=+neon\"]")
fi
echo "== armv7: whole crate (lib + bin)"
cargo build "${armv7_flags[@]}" --target "$armv7" --all-targets
echo "== armv7, QEMU_CPU=cortex-a7 (portable kernels)"
QEMU_CPU=cortex-a7 EDGELM_EXPECT_KERNELS=scalar cargo test "${armv7_flags[@]}" --target "$armv7" --lib quant
