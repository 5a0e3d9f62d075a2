"""Benchmark 4: `ncm --help` (and `ncm presets`) wall time minus a bare `python -c pass`,
median of 7 runs each. Goal: <= 0.3 s. None of them may import torch.

    python benchmarks/startup.py
"""

import statistics
import subprocess
import sys
import time


def wall(cmd: list[str], runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    runs = 1 if "--dry-run" in sys.argv[1:] else 7
    base = wall([sys.executable, "-c", "pass"], runs)
    print(f"python -c pass: {base:.3f} s")
    for args in (["--help"], ["presets"], ["train", "--help"]):
        t = wall([sys.executable, "-m", "ncmcli", *args], runs)
        print(f"ncm {' '.join(args):14} {t:.3f} s   minus python: {t - base:.3f} s")


if __name__ == "__main__":
    main()
