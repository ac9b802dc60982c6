#!/usr/bin/env bash
# Builds the tests for an ARM target (the `cross` profile: dependencies at opt-level 1) and
# runs them under qemu-user (the runners in .cargo/config.toml):
#
#   cross/test.sh aarch64-unknown-linux-gnu [--ci] [--build-only | --run-only]
#   cross/test.sh armv7-unknown-linux-gnueabihf [--ci] [--build-only | --run-only]
#
# --build-only stops after building the test binaries and writing their paths to
# target/TARGET/cross/test-executables; --run-only runs those without calling cargo. CI
# builds in the background and runs the aarch64 tests while armv7 builds: cargo would wait
# for the other build's lock on the shared host directory (target/cross).
#
# aarch64: the int8 kernel tests under QEMU_CPU=max (NEON + dotprod: the SDOT kernels run)
# and QEMU_CPU=cortex-a57 (NEON only, as on the Pi 3/4's A53/A72), then the library and the
# integration tests under QEMU_CPU=max: all of them, or with --ci the tiny-model ones plus
# the one greedy golden run on the default SmolLM2 model (tests/integration/golden_cross_arch.rs).
# armv7 (QEMU_CPU=cortex-a7, the Pi 2's core; portable kernels): the library's unit tests
# (kernels, sampler, protocol, ...), the tiny-model tests and the malformed-model table (a
# 32-bit usize meets the oversized fields first); with --ci the same.
#
# Tests that spawn the `edgelm` binary run it through EDGELM_TEST_RUNNER (a test under
# qemu-user cannot exec a foreign binary unless binfmt_misc is set up).
# The default model's bundles are converted by the x86_64 test run into target/test-bundles
# and reused here (converting under qemu works too, but takes minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-}"
ci=0
build=1
run=1
for arg in "${@:2}"; do
  case "$arg" in
    --ci) ci=1 ;;
    --build-only) run=0 ;;
    --run-only) build=0 ;;
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
    echo "usage: cross/test.sh aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf [--ci] [--build-only | --run-only]" >&2
    exit 2
    ;;
esac
list="${CARGO_TARGET_DIR:-target}/$target/cross/test-executables"

step() {
  local start=$SECONDS
  echo "== $target: $1"
  shift
  "$@"
  echo "   ($((SECONDS - start)) s)"
}

# The library's unit tests and the integration tests (one binary, tests/integration/).
# cargo prints "Executable unittests src/lib.rs (PATH)" and "Executable
# tests/integration/main.rs (PATH)" for --no-run; the paths are kept for the run.
build_tests() {
  local out
  out="$(cargo test --locked --profile cross --target "$target" --lib --test integration --no-run 2>&1)" || {
    echo "$out" >&2
    return 1
  }
  echo "$out"
  mkdir -p "$(dirname "$list")"
  {
    echo "lib $(echo "$out" | sed -n 's/.*Executable unittests src\/lib.rs (\(.*\))$/\1/p')"
    echo "integration $(echo "$out" | sed -n 's/.*Executable tests\/integration\/main.rs (\(.*\))$/\1/p')"
  } >"$list"
}

# `run "VAR=value ..." lib|integration ARGS...`: one test binary under qemu (the runner)
# with those environment variables, from the repository root as cargo would, with ARGS for
# libtest (filters, --skip).
run() {
  local vars="$1" exe
  exe="$(sed -n "s/^$2 //p" "$list")"
  if [[ -z "$exe" || ! -x "$exe" ]]; then
    echo "cross/test.sh: no $2 test binary in $list; build first" >&2
    return 1
  fi
  shift 2
  # shellcheck disable=SC2086 # the variables and the runner are word lists
  env $vars $EDGELM_TEST_RUNNER "$exe" "$@"
}

# Integration test modules on the tiny fixture models only:
tiny=(model_tiny:: kv_ring:: serve::)
# Also tiny-model (or model-free) tests, run on aarch64 with --ci: sessions, `edgelm info`,
# the Hugging Face converter, the fuzz regression inputs, CLI errors, and the one test on
# the default model (golden tokens vs x86_64).
more=(session:: info:: convert_hf:: fuzz_regressions:: cli_errors:: malformed_model::
  golden_cross_arch::)

if [[ $build == 1 ]]; then
  step "build" build_tests
fi
[[ $run == 1 ]] || exit 0

if [[ "$target" == aarch64-* ]]; then
  step "kernels, QEMU_CPU=max (NEON + dotprod)" \
    run "QEMU_CPU=max EDGELM_EXPECT_KERNELS=scalar,neon,dotprod" lib quant
  step "kernel selection, EDGELM_KERNEL=dotprod" \
    run "QEMU_CPU=max EDGELM_KERNEL=dotprod" lib quant::tests::select_follows_the_environment
  step "kernels, QEMU_CPU=cortex-a57 (NEON, no dotprod)" \
    run "QEMU_CPU=cortex-a57 EDGELM_EXPECT_KERNELS=scalar,neon" lib quant
  step "kernel selection, EDGELM_KERNEL=neon" \
    run "QEMU_CPU=cortex-a57 EDGELM_KERNEL=neon" lib quant::tests::select_follows_the_environment
  step "library" run "QEMU_CPU=max" lib --skip quant::
  if [[ $ci == 1 ]]; then
    step "integration: tiny models, sessions, info, converter, fuzz inputs, CLI errors, golden tokens vs x86_64" \
      run "QEMU_CPU=max" integration "${tiny[@]}" "${more[@]}"
  else
    step "integration: all" run "QEMU_CPU=max" integration
  fi
else
  step "kernels (portable)" run "QEMU_CPU=cortex-a7 EDGELM_EXPECT_KERNELS=scalar" lib quant
  step "library" run "QEMU_CPU=cortex-a7" lib --skip quant::
  step "integration: tiny models, malformed models" \
    run "QEMU_CPU=cortex-a7" integration "${tiny[@]}" malformed_model::
fi
