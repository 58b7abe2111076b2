"""Sums a CubeCL profiler log (`| <duration> | <kernel>` a line, a summary table at each
device sync) into where the device's time went: the kernels of the timed steps (the last
STEPS of WARMUP + STEPS, taken as that share of the log's kernel lines), by name, against
the steps' wall time from `knobs bench --json`.

    python3 scripts/kernel_profile.py LOG BENCH_JSON --steps N --warmup W [--top K]
"""
import argparse
import json
import re
from collections import defaultdict

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def seconds(text):
    m = re.fullmatch(r"([0-9.]+)(ns|µs|us|ms|s)", text.strip())
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def kernels(path):
    """(seconds, name) of each profiled kernel, in order; summary rows are skipped."""
    out = []
    for line in open(path, encoding="utf-8", errors="replace"):
        # A kernel's name may hold " | " itself; a summary row starts with a name, not a time.
        parts = line.strip().strip("|").split("|", 1)
        if len(parts) == 2 and (s := seconds(parts[0])) is not None:
            out.append((s, parts[1].strip()))
    return out


def short(name):
    """The kernel's name without its type parameters: what groups its launches."""
    depth, kept = 0, []
    for ch in name:
        depth += ch == "<"
        if depth == 0:
            kept.append(ch)
        depth -= ch == ">" and depth > 0
    return "".join(kept)[:150]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("bench_json")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    bench = json.load(open(a.bench_json))[0]
    runs = a.steps + a.warmup
    lines = kernels(a.log)
    timed = lines[len(lines) - len(lines) * a.steps // runs:]
    total = sum(s for s, _ in timed)
    wall = bench["median_s"] * a.steps
    print(f"{bench['mode']}: {len(lines)} kernels profiled in all; timed steps: {len(timed)} kernels, "
          f"device {total:.3f} s against wall {wall:.3f} s ({100 * total / max(wall, 1e-9):.0f}% busy)")
    by = defaultdict(lambda: [0.0, 0])
    for s, name in timed:
        by[short(name)][0] += s
        by[short(name)][1] += 1
    for name, (s, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:a.top]:
        print(f"{100 * s / max(total, 1e-12):5.1f}%  {s * 1e3 / a.steps:9.2f} ms/step  {n // a.steps:6d}x  {name}")


main()
