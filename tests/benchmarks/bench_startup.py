"""Start-up benchmark (issue 2): wall time of `wsctl --help` and `wsctl --version`.

Run: `python tests/benchmarks/bench_startup.py [--runs 20]`. Uses the `wsctl`
console script next to this interpreter (the venv's), so it measures what a
cron job or an operator pays before any database work.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(cmd: list[str], runs: int) -> dict:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t)
    return {
        "median_ms": round(statistics.median(times) * 1000, 1),
        "min_ms": round(min(times) * 1000, 1),
        "max_ms": round(max(times) * 1000, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    exe = Path(sys.executable).with_name("wsctl")
    wsctl = str(exe) if exe.exists() else shutil.which("wsctl")
    if not wsctl:
        raise SystemExit("no wsctl console script found: pip install the project first")
    subprocess.run([wsctl, "--help"], stdout=subprocess.DEVNULL, check=True)  # warm the cache
    for label, cmd in (
        ("wsctl --help", [wsctl, "--help"]),
        ("wsctl --version", [wsctl, "--version"]),
    ):
        print(f"{label}: {measure(cmd, args.runs)}")


if __name__ == "__main__":
    main()
