#!/usr/bin/env bash
# Builds the tests for an ARM target (the `cross` profile: dependencies at opt-level 1) and
# runs them under qemu-user (the runners in .cargo/config.toml):
#
#   cross/test.sh aarch64-unknown-linux-gnu [--ci | --board] [--build-only | --run-only]
#   cross/test.sh armv7-unknown-linux-gnueabihf [--ci | --board] [--build-only | --run-only]
#
# --build-only stops after building the test binaries and writing their paths to
# target/TARGET/cross/test-executables; --run-only runs those without calling cargo. CI
# builds in the background and runs the aarch64 tests while armv7 builds: cargo would wait
# for the other build's lock on the shared host directory (target/cross).
#
# aarch64: the int8 kernel tests under QEMU_CPU=max (NEON + dotprod: the SDOT kernels run)
# and QEMU_CPU=cortex-a57 (NEON only, as on the Pi 3/4's A53/A72), then the library and the
# integration tests under QEMU_CPU=max: all of them, or with --ci those whose outcome can
# depend on the architecture (the list below). The --ci set keeps the default-model check
# that matters across architectures: greedy int8 tokens equal to the x86_64 recording
# (tests/integration/golden_cross_arch.rs).
# armv7 (QEMU_CPU=cortex-a7, the Pi 2's core; portable kernels): the library's unit tests
# (kernels, sampler, protocol, ...), the tiny-model tests and the malformed-model table (a
# 32-bit usize meets the oversized fields first); with --ci the same.
#
# --board tests the binary users copy to the board, target/TARGET/pi/edgelm (built by
# cross/build.sh: fat LTO, panic=abort, no unwind tables, identical code folded): the
# integration tests of the --ci set, with every test that spawns `edgelm` running that
# binary (EDGELM_TEST_BIN) instead of the test build's.
#
# Tests that spawn the `edgelm` binary run it through EDGELM_TEST_RUNNER (a test under
# qemu-user cannot exec a foreign binary unless binfmt_misc is set up).
# The default model's bundles are converted by the x86_64 test run into target/test-bundles
# and reused here (converting under qemu works too, but takes minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-}"
ci=0
board=0
build=1
run=1
for arg in "${@:2}"; do
  case "$arg" in
    --ci) ci=1 ;;
    --board) board=1 ;;
    --build-only) run=0 ;;
    --run-only) build=0 ;;
    *)
      echo "cross/test.sh: unknown option $arg" >&2
      exit 2
      ;;
  esac
done
case "$target" in
  aarch64-unknown-linux-gnu)
    export EDGELM_TEST_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
    # The emulated CPU of every step but the kernel tests, which pick theirs.
    cpu=max
    ;;
  armv7-unknown-linux-gnueabihf)
    export EDGELM_TEST_RUNNER="qemu-arm -L /usr/arm-linux-gnueabihf"
    cpu=cortex-a7
    ;;
  *)
    echo "usage: cross/test.sh aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf [--ci | --board] [--build-only | --run-only]" >&2
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
  # Emulation is ten or more times slower: the tests' time limits stretch accordingly.
  env EDGELM_TEST_SLOWDOWN=10 $vars $EDGELM_TEST_RUNNER "$exe" "$@"
}

# The integration tests of --ci: those whose outcome can depend on the architecture
# (arithmetic, kernels, 32/64-bit sizes, ttys and signals, session files); `cargo test`
# runs the rest natively, and a run here without --ci runs them all. aarch64 leaves out
# the f32 bundle against transformers and the 813-position teacher-forced comparison
# (golden_smollm2: half an hour of emulated f32 arithmetic), the perplexity runs and
# constrained generation over the default model (tens of minutes emulated), and the
# text-only modules (tokenizers, chat templates). armv7: the tiny fixture models and the
# malformed-model table.
if [[ "$target" == aarch64-* ]]; then
  ci_integration=(--skip golden_smollm2:: --skip perplexity:: --skip structured::
    --skip llama_vocab:: --skip vocab_fixtures:: --skip chat_templates:: --skip smollm2_text::
    --skip tokenizer_gguf::
    # Stop-string escaping over three default-model generations: protocol text only, and
    # the slowest test under emulation.
    --skip serve::stop_string_with_a_literal_backslash_sequence)
else
  ci_integration=(model_tiny:: kv_ring:: serve:: malformed_model::
    --skip serve::stop_string_with_a_literal_backslash_sequence)
fi

if [[ $build == 1 ]]; then
  step "build" build_tests
fi
[[ $run == 1 ]] || exit 0

if [[ $board == 1 ]]; then
  board_bin="${CARGO_TARGET_DIR:-target}/$target/pi/edgelm"
  if [[ ! -x "$board_bin" ]]; then
    echo "cross/test.sh: no board binary $board_bin; run cross/build.sh $target first" >&2
    exit 1
  fi
  # Absolute: a test may start the binary from another working directory.
  board_bin="$(realpath "$board_bin")"
  step "integration (the --ci set) against the board binary $board_bin" \
    run "QEMU_CPU=$cpu EDGELM_TEST_BIN=$board_bin" integration "${ci_integration[@]}"
  exit 0
fi

if [[ "$target" == aarch64-* ]]; then
  step "kernels, QEMU_CPU=max (NEON + dotprod + i8mm)" \
    run "QEMU_CPU=max EDGELM_EXPECT_KERNELS=scalar,neon,dotprod EDGELM_EXPECT_GEMM_ISAS=scalar,neon,dotprod,i8mm" lib quant
  step "kernel selection, EDGELM_KERNEL=dotprod" \
    run "QEMU_CPU=max EDGELM_KERNEL=dotprod" lib quant::tests::select_follows_the_environment
  step "kernels, QEMU_CPU=cortex-a57 (NEON, no dotprod)" \
    run "QEMU_CPU=cortex-a57 EDGELM_EXPECT_KERNELS=scalar,neon EDGELM_EXPECT_GEMM_ISAS=scalar,neon" lib quant
  step "GEMM kernels, QEMU_CPU=cortex-a76 (the Pi 5: dotprod, no i8mm)" \
    run "QEMU_CPU=cortex-a76 EDGELM_EXPECT_GEMM_ISAS=scalar,neon,dotprod" lib quant::gemm
  step "GEMM kernels, QEMU_CPU=cortex-a53 (the Pi 3 and Zero 2 W: NEON)" \
    run "QEMU_CPU=cortex-a53 EDGELM_EXPECT_GEMM_ISAS=scalar,neon" lib quant::gemm
  step "kernel selection, EDGELM_KERNEL=neon" \
    run "QEMU_CPU=cortex-a57 EDGELM_KERNEL=neon" lib quant::tests::select_follows_the_environment
  step "library" run "QEMU_CPU=$cpu" lib --skip quant::
  if [[ $ci == 1 ]]; then
    step "integration: the --ci set (golden int8 tokens vs x86_64 included)" \
      run "QEMU_CPU=$cpu" integration "${ci_integration[@]}"
  else
    step "integration: all" run "QEMU_CPU=$cpu" integration
  fi
else
  step "kernels (portable)" \
    run "QEMU_CPU=cortex-a7 EDGELM_EXPECT_KERNELS=scalar EDGELM_EXPECT_GEMM_ISAS=scalar" lib quant
  step "library" run "QEMU_CPU=$cpu" lib --skip quant::
  step "integration: tiny models, malformed models" \
    run "QEMU_CPU=$cpu" integration "${ci_integration[@]}"
fi
