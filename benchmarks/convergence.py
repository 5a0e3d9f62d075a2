"""The study's convergence check: for each run, how much the final test error moved over the
last fifth of training (max - min of test_error_pct over those epochs). Converged means
<= 0.2 points, the study's criterion.

    python benchmarks/convergence.py RUN_DIR [RUN_DIR ...]     # or a sweep folder
"""

import math
import sys
from pathlib import Path

from ncmcli.runfiles import METRICS, read_metrics


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--dry-run"]
    if "--dry-run" in sys.argv[1:] and not args:
        print("run  epochs  last-fifth epochs  moved (points)  converged")
        print("(dry run: no runs given)")
        print("ok")
        return
    runs = sorted({p.parent for a in args for p in Path(a).rglob(METRICS)})
    print(f"{'run':32} {'epochs':>6} {'last fifth':>10} {'moved':>7} {'converged':>10}")
    ok = 0
    for run in runs:
        rows = read_metrics(run / METRICS)
        if not rows:
            continue
        tail = rows[-max(1, math.ceil(len(rows) / 5)):]
        errors = [r["test_error_pct"] for r in tail]
        moved = max(errors) - min(errors)
        ok += moved <= 0.2
        span = f"{tail[0]['epoch']}-{tail[-1]['epoch']}"
        print(f"{run.name:32} {len(rows):6d} {span:>10} {moved:7.2f} {'yes' if moved <= 0.2 else 'no':>10}")
    print(f"{ok} of {len(runs)} runs moved by <= 0.2 points over their last fifth")


if __name__ == "__main__":
    main()
