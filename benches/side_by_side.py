#!/usr/bin/env python3
"""The runs of benches/side_by_side.sh: llama.cpp (Q8_0 and Q4_0) and edgelm on one model
shape, alternating, with a table of medians and ratios. side_by_side.sh prepares the files
and calls this; it is not meant to be run by hand (see `--help` all the same).

Per round, in this order: llama.cpp Q8_0, edgelm, llama.cpp Q4_0, each as
- a bench run (llama-bench -p 64 -n 64 -d 0,1024; edgelm bench --prompt-tokens 64
  --gen-tokens 64), with the process's peak RSS (getrusage) and its peak anonymous RSS
  (RssAnon in /proc/PID/status, sampled every 20 ms);
- a cold start: the wall time of a fresh process from exec to its first generated token
  after a 64-token prompt, load included (llama-bench -pg 64,1 -r 1 --no-warmup; edgelm
  run -n 1 on a text of 64 tokens).
Every figure is the median over the rounds, with the range beside it.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# 64 tokens with SmolLM2's tokenizer (the ladder's three shapes share it); the run checks the
# count edgelm reports.
PROMPT_64 = (
    "The history of the Raspberry Pi begins in 2006, when a group at the University of "
    "Cambridge noticed that fewer students arrived with hands-on experience of programming. "
    "They set out to build a computer cheap enough to give away, small enough to carry in a "
    "pocket, and open enough to be taken apart."
)
PROMPT_TOKENS = 64
DEPTH = 1024
SAMPLE_S = 0.02


def run_watched(cmd: list[str]) -> tuple[str, float, int, int]:
    """Runs `cmd`; returns (stdout, wall seconds, peak RSS kB, peak anonymous RSS kB).

    Fails with the command's stderr if it exits non-zero."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        anon = 0
        status_path = f"/proc/{proc.pid}/status"
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            try:
                with open(status_path) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            anon = max(anon, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(SAMPLE_S)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
            sys.exit(f"side_by_side: {' '.join(cmd)} exited with {proc.returncode}:\n"
                     + "\n".join(tail))
        return out.read().decode(), wall, usage.ru_maxrss, anon


def llama_bench(bin_dir: str, model: str, threads: int) -> dict:
    cmd = [f"{bin_dir}/llama-bench", "-m", model, "-t", str(threads), "-p", str(PROMPT_TOKENS),
           "-n", "64", "-d", f"0,{DEPTH}", "-r", "3", "-o", "json"]
    out, _, peak, anon = run_watched(cmd)
    tests = json.loads(out)

    def pick(n_prompt: int, n_gen: int, depth: int) -> float:
        for t in tests:
            if (t["n_prompt"], t["n_gen"], t["n_depth"]) == (n_prompt, n_gen, depth):
                return t["avg_ts"]
        sys.exit(f"side_by_side: llama-bench gave no pp{n_prompt}/tg{n_gen} at depth {depth}")

    return {
        "prefill": pick(PROMPT_TOKENS, 0, 0),
        "decode": pick(0, 64, 0),
        "decode_1024": pick(0, 64, DEPTH),
        "peak_mb": peak / 1024,
        "anon_mb": anon / 1024,
        "info": {k: tests[0].get(k) for k in
                 ("build_commit", "cpu_info", "backends", "model_type", "model_size",
                  "n_threads", "type_k", "type_v", "flash_attn")},
    }


def llama_cold(bin_dir: str, model: str, threads: int) -> float:
    cmd = [f"{bin_dir}/llama-bench", "-m", model, "-t", str(threads), "-p", "0", "-n", "0",
           "-pg", f"{PROMPT_TOKENS},1", "-r", "1", "--no-warmup", "-o", "json"]
    return run_watched(cmd)[1]


def edgelm_bench(edgelm: str, bundle: str, threads: int) -> dict:
    cmd = [edgelm, "bench", "-m", bundle, "-t", str(threads), "--prompt-tokens",
           str(PROMPT_TOKENS), "--gen-tokens", "64", "--json"]
    out, _, peak, anon = run_watched(cmd)
    r = json.loads(out)
    if r.get("decode_tok_s_at_1024") is None:
        sys.exit(f"side_by_side: edgelm bench gave no decode_tok_s_at_1024 for {bundle}")
    return {
        "prefill": r["prefill_tok_s"],
        "decode": r["decode_tok_s"],
        "decode_1024": r["decode_tok_s_at_1024"],
        # edgelm's own ratio, its two decodes taking turns in one run (bench.rs).
        "ratio_1024": r["decode_ratio_at_1024"],
        "peak_mb": peak / 1024,
        "anon_mb": anon / 1024,
        "info": {k: r.get(k) for k in ("int8", "threads", "load_ms", "ttft_ms", "ctx",
                                        "model_bytes", "kv_bytes_per_token")},
    }


def edgelm_cold(edgelm: str, bundle: str, threads: int) -> float:
    cmd = [edgelm, "run", "-m", bundle, "-t", str(threads), "-n", "1", "--ignore-eos",
           "--json", PROMPT_64]
    out, wall, _, _ = run_watched(cmd)
    summary = json.loads(out.strip().splitlines()[-1])
    if summary.get("prompt_tokens") != PROMPT_TOKENS:
        sys.exit(f"side_by_side: the cold-start prompt is {summary.get('prompt_tokens')} "
                 f"tokens for edgelm, not {PROMPT_TOKENS}; fix PROMPT_64")
    return wall


ROWS = [
    # key, label, unit, higher is better
    ("prefill", f"prefill ({PROMPT_TOKENS}-token prompt)", "tok/s", True),
    ("decode", f"decode ({PROMPT_TOKENS} cached)", "tok/s", True),
    ("decode_1024", f"decode ({DEPTH} cached)", "tok/s", True),
    ("cold_s", f"time to first token, {PROMPT_TOKENS}-token prompt, load incl.", "s", False),
    ("peak_mb", "peak RSS (bench run)", "MB", False),
    ("anon_mb", "peak anonymous RSS (bench run)", "MB", False),
]


def fmt(values: list[float]) -> str:
    med = statistics.median(values)
    digits = 2 if med < 10 else 1 if med < 100 else 0
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", required=True)
    ap.add_argument("--llama-bin", required=True, help="directory with llama-bench")
    ap.add_argument("--q8", required=True, help="llama.cpp's Q8_0 GGUF")
    ap.add_argument("--q4", required=True, help="llama.cpp's Q4_0 GGUF")
    ap.add_argument("--edgelm", required=True, help="the edgelm binary")
    ap.add_argument("--bundle", required=True, help="edgelm's bundle")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json-out", help="append every round's raw figures here (JSON lines)")
    args = ap.parse_args()

    engines = {
        "llama.cpp Q8_0": lambda: {**llama_bench(args.llama_bin, args.q8, args.threads),
                                   "cold_s": llama_cold(args.llama_bin, args.q8, args.threads)},
        "edgelm int8": lambda: {**edgelm_bench(args.edgelm, args.bundle, args.threads),
                                "cold_s": edgelm_cold(args.edgelm, args.bundle, args.threads)},
        "llama.cpp Q4_0": lambda: {**llama_bench(args.llama_bin, args.q4, args.threads),
                                   "cold_s": llama_cold(args.llama_bin, args.q4, args.threads)},
    }
    results: dict[str, list[dict]] = {name: [] for name in engines}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for name, run in engines.items():
            print(f"== {args.shape}: round {r + 1}/{args.rounds}, {name}", file=sys.stderr)
            fig = run()
            results[name].append(fig)
            if args.json_out:
                with open(args.json_out, "a") as f:
                    f.write(json.dumps({"shape": args.shape, "round": r + 1, "engine": name,
                                        "threads": args.threads, **fig}) + "\n")
    load_after = os.getloadavg()

    ours = results["edgelm int8"]
    names = list(engines)
    print(f"\n### {args.shape}: {args.threads} threads, median of {args.rounds} alternating "
          f"rounds (range)\n")
    print("| figure | " + " | ".join(names) + " | edgelm / Q8_0 | edgelm / Q4_0 |")
    print("| --- " * (len(names) + 3) + "|")
    for key, label, unit, higher in ROWS:
        cells = [fmt([f[key] for f in results[n]]) for n in names]
        med = {n: statistics.median(f[key] for f in results[n]) for n in names}
        ratios = [med["edgelm int8"] / med[n] for n in ("llama.cpp Q8_0", "llama.cpp Q4_0")]
        better = "higher" if higher else "lower"
        print(f"| {label}, {unit} ({better} is better) | " + " | ".join(cells) + " | "
              + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    d = [f["ratio_1024"] for f in ours]
    print(f"\nedgelm decode at {DEPTH} cached / decode at {PROMPT_TOKENS} (taking turns in "
          f"one run): {fmt(d)}")
    d = [f["decode_1024"] / f["decode"] for f in ours]
    print(f"edgelm decode at {DEPTH} cached / decode at {PROMPT_TOKENS} (the two figures "
          f"above): {fmt(d)}")
    for n in ("llama.cpp Q8_0", "llama.cpp Q4_0"):
        d = [f["decode_1024"] / f["decode"] for f in results[n]]
        print(f"{n} decode at {DEPTH} cached / decode at {PROMPT_TOKENS}: {fmt(d)}")
    info = results["llama.cpp Q8_0"][0]["info"]
    flash = {-1: "auto", 0: "off", 1: "on"}.get(info["flash_attn"], info["flash_attn"])
    print(f"llama.cpp {info['build_commit']} ({info['backends']}, KV {info['type_k']}, "
          f"flash attention {flash}); Q8_0 {info['model_size'] / 2**20:.0f} MiB, "
          f"Q4_0 {results['llama.cpp Q4_0'][0]['info']['model_size'] / 2**20:.0f} MiB "
          f"({results['llama.cpp Q4_0'][0]['info']['model_type']})")
    e = ours[0]["info"]
    print(f"edgelm --int8 {e['int8'].lower()}, ctx {e['ctx'] or 'default'}, "
          f"bundle {e['model_bytes'] / 2**20:.0f} MiB; "
          f"bench load {fmt([f['info']['load_ms'] / 1000 for f in ours])} s, "
          f"first prefill {fmt([f['info']['ttft_ms'] / 1000 for f in ours])} s")
    print(f"CPU: {info['cpu_info']} ({platform.machine()}, {os.cpu_count()} logical CPUs); "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")


if __name__ == "__main__":
    main()
