#!/usr/bin/env python3
"""An ARM cycle model of edgelm's and llama.cpp's int8 inner loops, and from it an ESTIMATE of
prefill and decode speed on Raspberry Pi boards (no board is measured here).

    benches/arm_model.py [--out DIR] [--no-build] [--show-loops]

What it does:
1. Compiles edgelm's library for aarch64 to assembly (`cargo rustc --release --target
   aarch64-unknown-linux-gnu --lib -- --emit asm -C codegen-units=1 -C
   debuginfo=line-tables-only`; one codegen unit, as the board profile `pi` builds; the
   dependencies at opt-level 0, which does not touch our kernels and builds much faster)
   and llama.cpp's ARM kernels (ggml-cpu/arch/arm/quants.c and repack.cpp from the
   llama-cpp-python 0.3.36 sdist) with aarch64-linux-gnu-gcc -O3 -mcpu=<core>, as a native
   build on the board would.
2. Finds each kernel's hot loop among the innermost loops (a label and a backward branch to
   it) that contain the kernel's dot-product instruction: for llama.cpp, the loops of the
   named function; for edgelm, whose kernels are inlined into their dispatcher, the loops
   made from the named source function (`src/quant/neon.rs:rows_q8f32`: the loop's `.loc`
   line entries fall in that function's text; the library is compiled with line tables for
   this). Then one of them by the rule in KERNELS (`max`: most dot-product instructions,
   i.e. the largest tile; `min`: fewest, the one-row tile; `ratio:RE=V`: those where
   RE-matching instructions per dot-product instruction equal V, then the largest).
   `--show-loops` prints every candidate.
3. Runs llvm-mca (LLVM 16: `apt-get install llvm-16`) on each loop body for each core's
   scheduling model, and divides the steady-state cycles per iteration by the 32-weight
   blocks x activation rows the iteration computes. That work is counted from the loop
   itself: every kernel needs a fixed number of its dot-product instructions per block and
   activation row (KERNELS' `per_block`), so compiler unrolling cannot skew the figure.
4. Writes the cycle table and the estimate table (markdown) to stdout and DIR/arm_model.md,
   with the llvm-mca reports and loop bodies in DIR (default target/arm-model).

To add a kernel: one line in KERNELS (engine configuration it belongs to, phase, source,
function (regex, or `file.rs:function` for ours), dot-product instruction regex and count
per block-row, loop rule).

Scheduling models (llvm-mca -mcpu; LLVM 16 has no Cortex-A72 or A76 model of its own):
- Cortex-A53 (Pi 3, Zero 2 W): `cortex-a53`, its own in-order model.
- Cortex-A72 (Pi 4): `cortex-a72`, which LLVM maps to the Cortex-A57 model (the A72's
  predecessor, same pipeline layout).
- Cortex-A76 (Pi 5): `neoverse-n2`, the nearest model LLVM 16 has with the A76's vector
  layout (two 128-bit ASIMD pipes, SDOT and FMLA at two per cycle, integer multiplies on one
  pipe). LLVM itself maps `-mcpu=cortex-a76` to the A57 model (one ASIMD integer-multiply
  and FP-convert pipe slower, and no SDOT model of its own); that figure is in the cycle
  table as a second opinion ("A76/A57").
llvm-mca assumes every load hits L1 and the loop runs long; it models one core. Where the
compiler keeps a tile's innermost loop over single blocks (edgelm q8q16's 4-row tile), the
work after it (the scale arithmetic once per group of 4 blocks) is not counted. LLVM's A53
model is coarse (most 128-bit ASIMD operations at one per cycle).

Estimate (per board, shape and engine): min(compute bound, bandwidth bound), 4 threads.
- compute: cores x clock / (weight blocks per token x cycles per block-row). Decode runs
  every weight block once per token (the LM head included); prefill runs every layer's
  blocks per prompt token and the LM head once per 64-token prompt. Attention, norms, RoPE,
  activation quantization, thread hand-offs and the sampler are left out: the compute bound
  is an upper bound, and x86 measurements put edgelm's end-to-end decode at 60-80% of its
  kernel-only bound.
- bandwidth: the weights (edgelm int8: 1 + 4/32 bytes per weight; Q8_0: 34/32; Q4_0:
  18/32) and the KV cache at 64 cached tokens (edgelm f32, llama.cpp f16) are read once per
  decoded token; a 64-token prefill reads the weights once.
- llama.cpp Q4_0 is modelled as `llama-quantize --pure` (every matrix Q4_0, the LM head
  too); its default Q4_0 mix keeps the tied embedding/LM head in Q6_K.
- Which kernels run: edgelm picks NEON+SDOT for q8q8 where the CPU has dot products and
  plain NEON otherwise (q8f32 and q8q16 are NEON on every core); llama.cpp repacks Q8_0 and
  Q4_0 into its 4x4 interleaved layout where the CPU has dot products (A76: ggml_gemv_* for
  decode, ggml_gemm_* for prefill) and otherwise runs ggml_vec_dot_* for both.

Memory bandwidth (effective read bandwidth of all four cores streaming the weights):
- Pi 5 (BCM2712, LPDDR4X-4267, 32-bit: 17 GB/s peak): tinymembench memcpy 5.5-6.3 GB/s
  (geerlingguy/sbc-reviews#21; ThomasKaiser in raspberrypi/firmware#1876: C copy 5.6-6.2
  GB/s on 4 and 8 GB boards); a copy reads and writes every byte, so reads alone are taken
  at twice that, 12 GB/s (a single-core NEON read figure of ~15 GB/s is quoted for the
  Pi 5; no source for it was found, so it is not used).
- Pi 4 (LPDDR4-3200, 32-bit: 12.8 GB/s peak): sbc-bench memcpy 2.2-2.8 GB/s
  (ThomasKaiser/sbc-bench Results.md) -> 5 GB/s read.
- Pi 3 B+ (LPDDR2, 3.6 GB/s peak): sbc-bench memcpy 1.0-1.2 GB/s -> 2.2 GB/s read.
- Zero 2 W (LPDDR2, 512 MB): sbc-bench memcpy 1.3 GB/s at 1 GHz -> 2.6 GB/s read.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA = Path(os.environ.get(
    "LLAMA_CPP_SRC", Path.home() / ".cache/edgelm/llama.cpp/src/vendor/llama.cpp"))
TARGET = "aarch64-unknown-linux-gnu"
GCC = "aarch64-linux-gnu-gcc"
GXX = "aarch64-linux-gnu-g++"
MCA_ITERATIONS = 400


def find_mca() -> str:
    for cand in (os.environ.get("LLVM_MCA"), "/usr/lib/llvm-16/bin/llvm-mca", "llvm-mca-16"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    sys.exit("arm_model.py: needs llvm-mca from LLVM 16 (apt-get install llvm-16), "
             "or LLVM_MCA=/path/to/llvm-mca")


@dataclass(frozen=True)
class Core:
    name: str
    mcpu: str  # llvm-mca -mcpu
    gcc: str  # aarch64-linux-gnu-gcc -mcpu for llama.cpp
    dotprod: bool


CORES = [
    Core("A53", "cortex-a53", "cortex-a53", False),
    Core("A72", "cortex-a72", "cortex-a72", False),
    Core("A76", "neoverse-n2", "cortex-a76", True),
    Core("A76/A57", "cortex-a76", "cortex-a76", True),  # LLVM's own choice, second opinion
]


@dataclass(frozen=True)
class Board:
    name: str
    core: str
    ghz: float
    cores: int
    read_gbs: float
    memcpy: str  # the published figure the read bandwidth comes from


BOARDS = [
    Board("Pi 5", "A76", 2.4, 4, 12.0, "memcpy 5.5-6.3 GB/s"),
    Board("Pi 4", "A72", 1.8, 4, 5.0, "memcpy 2.2-2.8 GB/s"),
    Board("Pi 3 B+", "A53", 1.4, 4, 2.2, "memcpy 1.0-1.2 GB/s"),
    Board("Zero 2 W", "A53", 1.0, 4, 2.6, "memcpy 1.3 GB/s"),
]


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 49152

    @property
    def layer_weights(self) -> int:
        hd = self.hidden // self.heads
        attn = self.hidden * (2 * self.heads * hd + 2 * self.kv_heads * hd)
        return self.layers * (attn + 3 * self.hidden * self.ffn)

    @property
    def head_weights(self) -> int:
        return self.vocab * self.hidden

    def kv_values_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * (self.hidden // self.heads)


SHAPES = [
    Shape("SmolLM2-135M", 576, 1536, 30, 9, 3),
    Shape("SmolLM2-360M shape", 960, 2560, 32, 15, 5),
    Shape("Llama-3.2-1B shape", 2048, 8192, 16, 32, 8),
]

# Dot-product instruction patterns (mnemonic and operands, lower case).
FMUL = r"^f(mla|mul)\s+v\d+\.4s,"  # f32 multiply(-add), 4 lanes
SMULL_8H = r"^s(mull|mlal)2?\s+v\d+\.8h,"  # int8 x int8 -> int16, 8 products
SMULL_4S = r"^s(mull|mlal)2?\s+v\d+\.4s,\s*v\d+\.[48]h,"  # int16 x int16 -> int32, 4 products
SDOT = r"^sdot\s"  # 16 products

# Sources: "rust" is edgelm's library (one compile, kernels picked at run time by CPU
# feature); "quants"/"repack" are llama.cpp's files, compiled per core.


@dataclass(frozen=True)
class Kernel:
    engine: str  # engine configuration of the estimate table
    phase: str  # decode (one activation row) or prefill (a prompt)
    source: str
    symbol: str  # regex on the demangled function name
    prim: str  # dot-product instruction regex
    per_block: int  # of those per 32-weight block and activation row
    pick: str  # loop rule (module doc)
    needs_dotprod: bool = False  # the core must have SDOT
    where: str = "any"  # "any", or "no-dotprod": only on cores without SDOT (llama.cpp's plain path)


KERNELS = [
    # edgelm: src/quant/neon.rs, tiles.rs
    # q8f32: per block and row 8 multiply(-add)s of products, 2 of the block scale.
    Kernel("edgelm q8f32", "decode", "rust", "src/quant/neon.rs:rows_q8f32", FMUL, 10, "max"),
    Kernel("edgelm q8f32", "prefill", "rust", "src/quant/neon.rs:acts_q8f32", FMUL, 10, "max"),
    # q8q16 widens each weight block once (4 sshll) for all the rows of its tile.
    Kernel("edgelm q8q16", "decode", "rust", "src/quant/neon.rs:dot_q8q8,full_group", SMULL_4S, 8, r"ratio:^sshll=0.5"),
    Kernel("edgelm q8q16", "prefill", "rust", "src/quant/neon.rs:dot_q8q8,full_group", SMULL_4S, 8, r"ratio:^sshll=0.125"),
    Kernel("edgelm q8q8", "decode", "rust", "src/quant/neon.rs:dot_q8q8", SMULL_8H, 4, "min", where="no-dotprod"),
    Kernel("edgelm q8q8", "prefill", "rust", "src/quant/neon.rs:dot_q8q8", SMULL_8H, 4, "max", where="no-dotprod"),
    Kernel("edgelm q8q8", "decode", "rust", "src/quant/neon.rs:dot_q8q8", SDOT, 2, "min", needs_dotprod=True),
    Kernel("edgelm q8q8", "prefill", "rust", "src/quant/neon.rs:dot_q8q8", SDOT, 2, "max", needs_dotprod=True),
    # q8q15: prompts on the tiled GEMM (src/quant/gemm/), 15-bit activations; decode as q8f32.
    # Per block and row: 8 int16 `smlal` by element (4 products each) without SDOT; with
    # SDOT two passes (high and low parts) of 2 `sdot` (16 products each).
    Kernel("edgelm q8q15", "decode", "rust", "src/quant/neon.rs:rows_q8f32", FMUL, 10, "max"),
    # (The NEON kernel inlines into run_groups without line entries of its own.)
    Kernel("edgelm q8q15", "prefill", "rust", r"^edgelm::quant::gemm::run_groups$", SMULL_4S, 8, "max", where="no-dotprod"),
    Kernel("edgelm q8q15", "prefill", "rust", "src/quant/gemm/dotprod.rs:tile", SDOT, 4, r"ratio:^scvtf=0", needs_dotprod=True),
    # llama.cpp: ggml/src/ggml-cpu/arch/arm/quants.c, repack.cpp
    Kernel("llama.cpp Q8_0", "decode", "quants", r"^ggml_vec_dot_q8_0_q8_0$", SMULL_8H, 4, "max", where="no-dotprod"),
    Kernel("llama.cpp Q8_0", "prefill", "quants", r"^ggml_vec_dot_q8_0_q8_0$", SMULL_8H, 4, "max", where="no-dotprod"),
    Kernel("llama.cpp Q8_0", "decode", "repack", r"^ggml_gemv_q8_0_4x4_q8_0$", SDOT, 2, "max", needs_dotprod=True),
    Kernel("llama.cpp Q8_0", "prefill", "repack", r"^ggml_gemm_q8_0_4x4_q8_0$", SDOT, 2, "max", needs_dotprod=True),
    Kernel("llama.cpp Q4_0", "decode", "quants", r"^ggml_vec_dot_q4_0_q8_0$", SMULL_8H, 4, "max", where="no-dotprod"),
    Kernel("llama.cpp Q4_0", "prefill", "quants", r"^ggml_vec_dot_q4_0_q8_0$", SMULL_8H, 4, "max", where="no-dotprod"),
    Kernel("llama.cpp Q4_0", "decode", "repack", r"^ggml_gemv_q4_0_4x4_q8_0$", SDOT, 2, "max", needs_dotprod=True),
    Kernel("llama.cpp Q4_0", "prefill", "repack", r"^ggml_gemm_q4_0_4x4_q8_0$", SDOT, 2, "max", needs_dotprod=True),
    # For the cycle table only: llama.cpp's plain (not repacked) Q8_0 dot product with SDOT.
    Kernel("llama.cpp Q8_0 plain", "decode", "quants", r"^ggml_vec_dot_q8_0_q8_0$", SDOT, 2, "max", needs_dotprod=True),
]

# Bytes per weight as stored, and per cached KV value, per engine configuration.
ENGINE_BYTES = {
    "edgelm q8f32": (1 + 4 / 32, 4),
    "edgelm q8q16": (1 + 4 / 32, 4),
    "edgelm q8q8": (1 + 4 / 32, 4),
    "edgelm q8q15": (1 + 4 / 32, 4),
    "llama.cpp Q8_0": (34 / 32, 2),
    "llama.cpp Q4_0": (18 / 32, 2),
}
PROMPT = 64
# What a tiled bundle runs by default (`--int8 auto`): prompts on the Q15 GEMM, decode with f32
# activations (the tiled one-row kernel has the row-major q8f32 kernel's per-block arithmetic,
# and its loop is modelled by that one).
DEFAULT = "edgelm q8q15"


def applies(k: Kernel, core: Core) -> bool:
    if k.needs_dotprod and not core.dotprod:
        return False
    return not (k.where == "no-dotprod" and core.dotprod)


# --- assembly ---------------------------------------------------------------------------

def run(cmd: list[str], **kw) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        sys.exit(f"arm_model.py: {' '.join(cmd[:6])}... failed:\n{res.stderr[-3000:]}")
    return res.stdout


def build_rust_asm(out: Path, build: bool) -> Path:
    target_dir = Path(json.loads(run(["cargo", "metadata", "--format-version", "1", "--no-deps"],
                                     cwd=ROOT))["target_directory"])
    deps = target_dir / TARGET / "release" / "deps"
    if build:
        print(f"== cargo rustc --target {TARGET} --emit asm", file=sys.stderr)
        run(["cargo", "rustc", "--locked", "--release", "--target", TARGET, "--lib",
             "--config", 'profile.release.package."*".opt-level=0',
             "--config", 'profile.release.package."*".debug-assertions=false',
             "--", "--emit", "asm", "-C", "codegen-units=1", "-C", "debuginfo=line-tables-only"],
            cwd=ROOT)
    files = sorted(deps.glob("edgelm-*.s"), key=lambda p: p.stat().st_mtime)
    if not files:
        sys.exit(f"arm_model.py: no edgelm-*.s under {deps} (run without --no-build)")
    dst = out / "edgelm.s"
    shutil.copyfile(files[-1], dst)
    return dst


def build_llama_asm(out: Path, core: Core) -> dict[str, Path]:
    src = LLAMA / "ggml/src/ggml-cpu/arch/arm"
    inc = ["-I", str(LLAMA / "ggml/include"), "-I", str(LLAMA / "ggml/src"),
           "-I", str(LLAMA / "ggml/src/ggml-cpu")]
    flags = ["-O3", f"-mcpu={core.gcc}", "-D_GNU_SOURCE", "-DNDEBUG", "-S"]
    paths = {}
    for name, compiler, std, file in (("quants", GCC, "-std=gnu11", "quants.c"),
                                      ("repack", GXX, "-std=gnu++17", "repack.cpp")):
        dst = out / f"llama-{name}-{core.gcc}.s"
        if not dst.exists() or dst.stat().st_mtime < (src / file).stat().st_mtime:
            run([compiler, *flags, std, *inc, str(src / file), "-o", str(dst)])
        paths[name] = dst
    return paths


LABEL = re.compile(r"^\s*([A-Za-z_.$][\w.$]*|\d+):\s*(.*)$")
CONDS = "eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le|al"
BRANCH = re.compile(rf"^(b|b\.(?:{CONDS})|b(?:{CONDS})|cbn?z|tbn?z)\s+(.*)$")


def demangle(names: list[str]) -> dict[str, str]:
    text = run(["c++filt"], input="\n".join(names))
    return dict(zip(names, text.splitlines()))


@dataclass
class Function:
    name: str  # demangled, without Rust's hash; generic instances of one function share it
    body: list[str]
    files: dict[str, str]  # DWARF file number -> path, for `.loc` lines


def functions(asm: Path) -> list[Function]:
    lines = asm.read_text().splitlines()
    files, starts = {}, {}
    for i, line in enumerate(lines):
        m = re.match(r'^\s*\.file\s+(\d+)\s+"([^"]*)"(?:\s+"([^"]*)")?', line)
        if m:
            files[m.group(1)] = os.path.normpath(os.path.join(m.group(2), m.group(3) or ""))
        m = re.match(r"^\s*\.type\s+([^,]+),\s*[@%]function", line)
        if m:
            starts[m.group(1).strip().strip('"')] = i
    bodies = {}
    for name, i in starts.items():
        j = i
        while j < len(lines) and not re.match(rf"^\s*\.size\s+\"?{re.escape(name)}\"?,", lines[j]):
            j += 1
        bodies[name] = lines[i:j]
    names = demangle(list(bodies))
    out = []
    for raw, body in bodies.items():
        clean = re.sub(r"::h[0-9a-f]{16}$", "", names[raw])
        clean = re.sub(r"\(.*\)$", "", clean)  # C++ parameter lists
        out.append(Function(clean, body, files))
    return out


Item = tuple[str | None, str | None, tuple[str, int] | None]  # label, instruction, source


def parse(f: Function) -> list[Item]:
    """(label, instruction, source file and line) per line; directives and comments dropped."""
    items = []
    loc = None
    for line in f.body:
        m = re.match(r"^\s*\.loc\s+(\d+)\s+(\d+)", line)
        if m:
            loc = (f.files.get(m.group(1), "?"), int(m.group(2)))
            continue
        # Hand-written kernels spell newer instructions as `.inst 0x...  // sdot ...`.
        m = re.match(r"^(\s*(?:[\w.$]+:)?)\s*\.inst\s+0x[0-9a-fA-F]+\s*//\s*(\S.*)$", line)
        if m:
            line = f"{m.group(1)} {m.group(2)}"
        line = line.split("//")[0].rstrip()
        if not line.strip() or line.strip().startswith((".", "#")) and not LABEL.match(line):
            continue
        label, rest = None, line.strip()
        m = LABEL.match(line)
        if m:
            label, rest = m.group(1), m.group(2).strip()
        if rest.startswith((".", "#")):
            rest = ""
        items.append((label, rest or None, loc if rest else None))
    return items


def source_ranges(spec: str) -> tuple[str, list[tuple[int, int]]]:
    """`path/file.rs:f,g` -> (path, [(first line, last line)] of those functions' text, each
    up to the next `fn` at any depth or the end of the file)."""
    path, names = spec.rsplit(":", 1)
    text = (ROOT / path).read_text().splitlines()
    fn = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(unsafe\s+)?fn\s+(\w+)")
    starts = [(i + 1, m.group(5)) for i, line in enumerate(text) if (m := fn.match(line))]
    ranges = []
    for name in names.split(","):
        found = [(line, starts[n + 1][0] - 1 if n + 1 < len(starts) else len(text))
                 for n, (line, fname) in enumerate(starts) if fname == name]
        if not found:
            sys.exit(f"arm_model.py: no fn {name} in {path}")
        ranges += found
    return str(ROOT / path), ranges


def resolve(target: str, labels: dict[str, list[int]], at: int) -> int | None:
    """Index of the label `target` as seen from item `at` (GNU numeric labels: 1b, 1f)."""
    m = re.fullmatch(r"(\d+)([bf])", target)
    if m:
        idx = labels.get(m.group(1), [])
        if m.group(2) == "b":
            before = [i for i in idx if i <= at]
            return before[-1] if before else None
        after = [i for i in idx if i > at]
        return after[0] if after else None
    idx = labels.get(target)
    return idx[0] if idx else None


@dataclass
class Loop:
    start: int
    end: int
    label: str
    body: list[str]  # llvm-mca input lines
    sources: set[tuple[str, int]]  # (file, line) of the loop's instructions
    func: str  # the function it was compiled into


def innermost_loops(items: list[Item], func: str) -> list[Loop]:
    labels: dict[str, list[int]] = {}
    for i, (label, _, _) in enumerate(items):
        if label is not None:
            labels.setdefault(label, []).append(i)
    spans = []
    for i, (_, ins, _) in enumerate(items):
        m = BRANCH.match(ins or "")
        if not m:
            continue
        target = m.group(2).split(",")[-1].strip()
        j = resolve(target, labels, i)
        if j is not None and j <= i:
            spans.append((j, i))
    spans = sorted(set(spans))
    inner = [s for s in spans
             if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    loops = []
    for j, i in inner:
        head = items[j][0]
        name = f"{head}" if not head.isdigit() else f"{head}_{j}"
        local = {items[t][0] for t in range(j, i + 1) if items[t][0] is not None}
        body = [f"{name}:"]
        for t in range(j, i + 1):
            label, ins, _ = items[t]
            if label is not None and t != j:
                body.append(f"{label}_{t}:" if label.isdigit() else f"{label}:")
            if ins is None:
                continue
            m = BRANCH.match(ins)
            if m:
                mnem = m.group(1)
                cond = mnem[1:] if re.fullmatch(rf"b(?:{CONDS})", mnem) else None
                if cond:
                    mnem = f"b.{cond}"
                ops = m.group(2).split(",")
                tgt = ops[-1].strip()
                k = resolve(tgt, labels, t)
                if k is not None and j < k <= i and items[k][0] in local:
                    lab = items[k][0]
                    tgt = f"{lab}_{k}" if lab.isdigit() else lab
                else:
                    tgt = name  # leaves the loop: point it at the loop head so it assembles
                ins = f"{mnem} " + ", ".join([*(o.strip() for o in ops[:-1]), tgt])
            body.append(f"\t{ins}")
        sources = {items[t][2] for t in range(j, i + 1) if items[t][2] is not None}
        loops.append(Loop(j, i, name, body, sources, func))
    return loops


def count(body: list[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return sum(1 for line in body if rx.search(line.strip().lower()))


def kernel_loops(k: Kernel, funcs: list[Function]) -> list[Loop]:
    """The innermost loops of the kernel: of the functions named by `k.symbol`, or, for
    `file.rs:function`, those made from that source function wherever it was inlined."""
    if ".rs:" not in k.symbol:
        return [lp for f in funcs if re.search(k.symbol, f.name)
                for lp in innermost_loops(parse(f), f.name)]
    path, ranges = source_ranges(k.symbol)
    ids = {i for i, p in funcs[0].files.items() if p == path} if funcs else set()
    loc = re.compile(r"^\s*\.loc\s+(" + "|".join(sorted(ids)) + r")\s") if ids else None
    loops = []
    for f in funcs:
        if loc is None or not any(loc.match(line) for line in f.body):
            continue
        for lp in innermost_loops(parse(f), f.name):
            if any(s[0] == path and lo <= s[1] <= hi for s in lp.sources for lo, hi in ranges):
                loops.append(lp)
    return loops


def pick_loop(loops: list[Loop], k: Kernel) -> tuple[Loop | None, list[tuple[Loop, int]]]:
    cands = [(lp, count(lp.body, k.prim)) for lp in loops]
    cands = [(lp, n) for lp, n in cands if n > 0]
    chosen = cands
    if k.pick.startswith("ratio:"):
        rx, value = k.pick[len("ratio:"):].rsplit("=", 1)
        chosen = [(lp, n) for lp, n in cands if abs(count(lp.body, rx) / n - float(value)) < 0.01]
    if not chosen:
        return None, cands
    key = (lambda c: c[1]) if k.pick != "min" else (lambda c: -c[1])
    return max(chosen, key=key)[0], cands


# --- llvm-mca ---------------------------------------------------------------------------

@dataclass
class Mca:
    cycles_per_iter: float
    bound: str  # the busiest resources and what loads them
    report: str


def mca(tool: str, mcpu: str, body: list[str], dump: Path) -> Mca:
    dump.write_text("\n".join(body) + "\n")
    report = run([tool, "-mtriple=aarch64-linux-gnu", f"-mcpu={mcpu}",
                  "-mattr=+neon,+dotprod,+fullfp16,+i8mm", f"-iterations={MCA_ITERATIONS}",
                  "-bottleneck-analysis", str(dump)])
    dump.with_suffix(".mca.txt").write_text(report)
    total = int(re.search(r"Total Cycles:\s+(\d+)", report).group(1))
    iters = int(re.search(r"Iterations:\s+(\d+)", report).group(1))
    return Mca(total / iters, bottleneck(report), report)


def bottleneck(report: str) -> str:
    """The resources with the highest pressure per iteration and the instruction kinds on them."""
    res = dict(re.findall(r"^\[(\d+(?:\.\d+)?)\]\s+-\s+(\S+)", report, re.M))
    m = re.search(r"Resource pressure per iteration:\n(.*)\n(.*)\n", report)
    if not m:
        return "?"
    heads = re.findall(r"\[([\d.]+)\]", m.group(1))
    vals = m.group(2).split()
    pressure = {}
    for h, v in zip(heads, vals):
        if v != "-":
            pressure[res.get(h, h)] = float(v)
    if not pressure:
        return "?"
    top = max(pressure.values())
    busiest = [r for r, v in pressure.items() if v >= 0.9 * top]
    # Which instructions use the busiest resource (by mnemonic).
    m = re.search(r"Resource pressure by instruction:\n(.*?)\n(.*?)(?:\n\n|\Z)", report, re.S)
    users: dict[str, float] = {}
    if m:
        heads = re.findall(r"\[([\d.]+)\]", m.group(1))
        idx = [i for i, h in enumerate(heads) if res.get(h, h) == busiest[0]]
        for line in m.group(2).splitlines():
            cols = line.split()
            if len(cols) <= len(heads) or not idx:
                continue
            v = cols[idx[0]]
            if v != "-":
                mnem = cols[len(heads)]
                users[mnem] = users.get(mnem, 0) + float(v)
    top_users = ", ".join(f"{u} {v:.1f}" for u, v in
                          sorted(users.items(), key=lambda x: -x[1])[:3])
    return f"{'/'.join(busiest)} {top:.1f}/iter ({top_users})"


# --- report -----------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-build", action="store_true", help="use the last edgelm assembly")
    ap.add_argument("--show-loops", action="store_true")
    args = ap.parse_args()
    tool = find_mca()
    if not args.out:
        meta = json.loads(run(["cargo", "metadata", "--format-version", "1", "--no-deps"],
                              cwd=ROOT))
        args.out = Path(meta["target_directory"]) / "arm-model"
    args.out.mkdir(parents=True, exist_ok=True)

    rust = functions(build_rust_asm(args.out, not args.no_build))
    llama = {c.gcc: {name: functions(p) for name, p in build_llama_asm(args.out, c).items()}
             for c in CORES}

    # cycles[(engine, phase, core)] = (cycles per block-row, bound, kernel function)
    cycles: dict[tuple[str, str, str], tuple[float, str, str]] = {}
    notes = []
    for k in KERNELS:
        for core in CORES:
            if not applies(k, core):
                continue
            loops = kernel_loops(k, rust if k.source == "rust" else llama[core.gcc][k.source])
            loop, cands = pick_loop(loops, k)
            tag = f"{k.engine} {k.phase} on {core.name}"
            if args.show_loops or loop is None:
                print(f"-- {tag}: {k.symbol}", file=sys.stderr)
                for lp, n in cands:
                    mark = "*" if lp is loop else " "
                    print(f"   {mark} {lp.func}, loop {lp.label}: {len(lp.body) - 1} lines, "
                          f"{n} dot instructions", file=sys.stderr)
            if loop is None:
                sys.exit(f"arm_model.py: no loop found for {tag} (symbol {k.symbol!r})")
            safe = re.sub(r"[^\w.-]+", "_", f"{k.engine}-{k.phase}-{core.name}")
            res = mca(tool, core.mcpu, loop.body, args.out / f"{safe}.s")
            block_rows = count(loop.body, k.prim) / k.per_block
            func = loop.func
            cycles[(k.engine, k.phase, core.name)] = (res.cycles_per_iter / block_rows,
                                                       res.bound, func)
            notes.append(f"{tag}: {func}, loop {loop.label}, {block_rows:g} block-rows per "
                         f"iteration, {res.cycles_per_iter:.2f} cycles per iteration; "
                         f"busiest: {res.bound}")

    lines = ["## ARM cycle model (llvm-mca; an estimate, not a measurement)", ""]
    lines.append("Cycles per 32-weight block and activation row, one core, steady state "
                 "(decode: one activation row; prefill: per block per prompt row).")
    lines.append("")
    core_names = [c.name for c in CORES]
    lines.append("| engine | phase | " + " | ".join(core_names) + " |")
    lines.append("| --- " * (len(core_names) + 2) + "|")
    for engine, phase in dict.fromkeys((k.engine, k.phase) for k in KERNELS):
        cells = []
        for c in core_names:
            v = cycles.get((engine, phase, c))
            cells.append(f"{v[0]:.2f}" if v else "-")
        lines.append(f"| {engine} | {phase} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("A76 = `-mcpu=neoverse-n2`, A76/A57 = `-mcpu=cortex-a76` (LLVM's A57 model), "
                 "A72 = `-mcpu=cortex-a72` (A57 model), A53 = `-mcpu=cortex-a53`.")
    lines.append("")
    lines.append("Loops and what bounds them:")
    lines.append("")
    lines += [f"- {n}" for n in notes]
    lines.append("")

    lines.append("## Estimated tok/s per board (min of compute and bandwidth bounds; "
                 "ESTIMATE, see benches/arm_model.py)")
    lines.append("")
    engines = list(ENGINE_BYTES)
    for board in BOARDS:
        lines.append(f"### {board.name}: {board.cores}x Cortex-{board.core} {board.ghz} GHz, "
                     f"{board.read_gbs:g} GB/s read ({board.memcpy})")
        lines.append("")
        lines.append("| shape | phase | " + " | ".join(engines) + " |")
        lines.append("| --- " * (len(engines) + 2) + "|")
        hz = board.ghz * 1e9 * board.cores
        for shape in SHAPES:
            layer_blocks = shape.layer_weights / 32
            head_blocks = shape.head_weights / 32
            for phase in ("prefill", "decode"):
                cells = []
                for engine in engines:
                    c = cycles.get((engine, phase, board.core))
                    if c is None:
                        cells.append("-")
                        continue
                    wbytes, kvbytes = ENGINE_BYTES[engine]
                    weights = (shape.layer_weights + shape.head_weights) * wbytes
                    if phase == "decode":
                        compute = hz / ((layer_blocks + head_blocks) * c[0])
                        traffic = weights + shape.kv_values_per_token() * PROMPT * kvbytes
                        memory = board.read_gbs * 1e9 / traffic
                    else:
                        compute = hz / ((layer_blocks + head_blocks / PROMPT) * c[0])
                        memory = board.read_gbs * 1e9 * PROMPT / weights
                    est = min(compute, memory)
                    which = "C" if compute <= memory else "B"
                    cells.append(f"{est:.1f} {which}" if est < 100 else f"{est:.0f} {which}")
                lines.append(f"| {shape.name} | {phase} | " + " | ".join(cells) + " |")
        lines.append("")
        ours = cycles.get((DEFAULT, "prefill", board.core))
        if ours:
            vs = [f"{cycles[(e, 'prefill', board.core)][0] / ours[0]:.2f}x {e}'s"
                  for e in ("llama.cpp Q8_0", "llama.cpp Q4_0")
                  if (e, "prefill", board.core) in cycles]
            lines.append(f"{DEFAULT} (the default) prefill kernel speed per block-row: "
                         f"{', '.join(vs)}; busiest resource in its loop: {ours[1]}.")
            lines.append("")
    lines.append("C: compute-bound (kernel cycles only: an upper bound), B: bandwidth-bound. "
                 "4 threads, perfect scaling assumed; prefill for a 64-token prompt.")
    text = "\n".join(lines)
    (args.out / "arm_model.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
