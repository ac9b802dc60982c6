#!/usr/bin/env bash
# Builds the tests for an ARM target (the `cross` profile: dependencies at opt-level 1) and
# runs them under qemu-user (the runners in .cargo/config.toml):
#
#   cross/test.sh aarch64-unknown-linux-gnu [--ci] [--build-only]
#   cross/test.sh armv7-unknown-linux-gnueabihf [--ci] [--build-only]
#
# --build-only stops after building the test binaries (CI builds them in the background).
#
# aarch64: the int8 kernel tests under QEMU_CPU=max (NEON + dotprod: the SDOT kernels run)
# and QEMU_CPU=cortex-a57 (NEON only, as on the Pi 3/4's A53/A72), then the whole suite
# under QEMU_CPU=max. With --ci, of the tests that load the default SmolLM2 model only the
# cross-architecture greedy golden runs (tests/golden_cross_arch.rs); the other tests run
# on the tiny fixture models (list below), and only those test binaries are built.
# armv7 (QEMU_CPU=cortex-a7, the Pi 2's core; portable kernels): the library's unit tests
# (kernels, sampler, protocol, ...) and the tiny-model tests; with --ci the same.
#
# Tests that spawn the `edgelm` binary run it through EDGELM_TEST_RUNNER (a test under
# qemu-user cannot exec a foreign binary unless binfmt_misc is set up).
# The default model's bundles are converted by the x86_64 test run into target/test-bundles
# and reused here (converting under qemu works too, but takes minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-}"
ci=0
build_only=0
for arg in "${@:2}"; do
  case "$arg" in
    --ci) ci=1 ;;
    --build-only) build_only=1 ;;
    *)
      echo "cross/test.sh: unknown option $arg" >&2
      exit 2
      ;;
  esac
done
case "$target" in
  aarch64-unknown-linux-gnu) export EDGELM_TEST_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu" ;;
  armv7-unknown-linux-gnueabihf) export EDGELM_TEST_RUNNER="qemu-arm -L /usr/arm-linux-gnueabihf" ;;
  *)
    echo "usage: cross/test.sh aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf [--ci] [--build-only]" >&2
    exit 2
    ;;
esac
build=(--locked --profile cross --target "$target")

step() {
  local start=$SECONDS
  echo "== $target: $1"
  shift
  "$@"
  echo "   ($((SECONDS - start)) s)"
}

# Integration tests on the tiny fixture models only.
tiny=(--test model_tiny --test kv_ring --test serve)
# Also tiny-model (or model-free) tests, run on aarch64 with --ci: sessions, `edgelm info`,
# the Hugging Face converter, the fuzz regression inputs. (malformed_model and faults set
# rlimits, which would apply to qemu itself, so they stay on the x86_64 run.)
more=(--test session --test info --test convert_hf --test fuzz_regressions)
# With --ci, only the test binaries that run are built.
ci_aarch64=(--lib "${tiny[@]}" "${more[@]}" --test cli_errors --test golden_cross_arch)

if [[ "$target" == aarch64-* ]]; then
  if [[ $ci == 1 ]]; then
    step "build" cargo test "${build[@]}" "${ci_aarch64[@]}" --no-run
  else
    step "build" cargo test "${build[@]}" --no-run
  fi
  [[ $build_only == 1 ]] && exit 0
  step "kernels, QEMU_CPU=max (NEON + dotprod)" \
    env QEMU_CPU=max EDGELM_EXPECT_KERNELS=scalar,neon,dotprod cargo test "${build[@]}" --lib quant
  step "kernel selection, EDGELM_KERNEL=dotprod" \
    env QEMU_CPU=max EDGELM_KERNEL=dotprod cargo test "${build[@]}" --lib quant::tests::select_follows_the_environment
  step "kernels, QEMU_CPU=cortex-a57 (NEON, no dotprod)" \
    env QEMU_CPU=cortex-a57 EDGELM_EXPECT_KERNELS=scalar,neon cargo test "${build[@]}" --lib quant
  step "kernel selection, EDGELM_KERNEL=neon" \
    env QEMU_CPU=cortex-a57 EDGELM_KERNEL=neon cargo test "${build[@]}" --lib quant::tests::select_follows_the_environment
  if [[ $ci == 1 ]]; then
    step "library, tiny-model tests, CLI errors, golden tokens vs x86_64" \
      env QEMU_CPU=max cargo test "${build[@]}" "${ci_aarch64[@]}" -- --skip quant::
  else
    step "whole suite" env QEMU_CPU=max cargo test "${build[@]}" -- --skip quant::
  fi
else
  step "build" cargo test "${build[@]}" --lib "${tiny[@]}" --no-run
  [[ $build_only == 1 ]] && exit 0
  step "kernels (portable)" \
    env QEMU_CPU=cortex-a7 EDGELM_EXPECT_KERNELS=scalar cargo test "${build[@]}" --lib quant
  step "library, tiny models" \
    env QEMU_CPU=cortex-a7 cargo test "${build[@]}" --lib "${tiny[@]}" -- --skip quant::
fi
