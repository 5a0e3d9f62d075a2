"""The study's convergence check: for each run, how much the final test error moved over the
last fifth of training (max - min of test_error_pct over those epochs). Converged means
<= 0.2 points, the study's criterion.

Beside it, the trend: the least-squares line through those epochs' test errors, as the change
it predicts from the first to the last of them. The range also counts epoch-to-epoch noise
(one image of 4,000 is 0.025 points); the trend says whether the error was still going
somewhere. The final training accuracy says whether the net fits its training data.

    python benchmarks/convergence.py RUN_DIR [RUN_DIR ...]     # or a sweep folder
"""

import math
import sys
from pathlib import Path

from ncmcli.runs.runfiles import METRICS, read_metrics


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--dry-run"]
    if "--dry-run" in sys.argv[1:] and not args:
        print("run  epochs  last-fifth epochs  moved (points)  converged")
        print("(dry run: no runs given)")
        print("ok")
        return
    runs = sorted({p.parent for a in args for p in Path(a).rglob(METRICS)})
    print(
        f"{'run':32} {'epochs':>6} {'last fifth':>10} {'moved':>7} {'converged':>10} {'trend':>7} "
        f"{'train acc':>9}"
    )
    ok = flat = 0
    for run in runs:
        rows = read_metrics(run / METRICS)
        if not rows:
            continue
        tail = rows[-max(1, math.ceil(len(rows) / 5)) :]
        errors = [r["test_error_pct"] for r in tail]
        moved = max(errors) - min(errors)
        change = trend(errors)
        ok += moved <= 0.2
        flat += abs(change) <= 0.2
        span = f"{tail[0]['epoch']}-{tail[-1]['epoch']}"
        train_acc = 100 * rows[-1].get("train_acc", float("nan"))
        print(
            f"{run.name:32} {len(rows):6d} {span:>10} {moved:7.2f} {'yes' if moved <= 0.2 else 'no':>10} "
            f"{change:+7.2f} {train_acc:8.1f}%"
        )
    print(
        f"{ok} of {len(runs)} runs moved by <= 0.2 points over their last fifth; "
        f"{flat} of {len(runs)} had a trend within +-0.2 points"
    )


def trend(values: list[float]) -> float:
    """The change from first to last point along the least-squares line through ``values``."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    slope = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / sum(
        (i - mean_x) ** 2 for i in range(n)
    )
    return slope * (n - 1)


if __name__ == "__main__":
    main()
