"""The class-incremental table of `benchmarks/incremental.sh`: for each arm, the average
accuracy over every class seen so far after each task, the final average accuracy over all
classes, and the forgetting (per class: the best accuracy it ever had minus its final one,
averaged over the classes of every task but the last), mean ± std over seeds, in %.

    python benchmarks/incremental_table.py OUT [--dry-run]

OUT holds ARM-sSEED/tK/eval.json files (`ncm eval --json` of task K's last checkpoint).
``--dry-run`` builds a tiny fake sweep in a temporary folder and prints its table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path


def chain_scores(chain: Path) -> dict | None:
    """{"after": [acc after task 1..K], "final": acc, "forgetting": mean or None} in %."""
    evals = []
    for t in range(1, 100):
        path = chain / f"t{t}" / "eval.json"
        if not path.is_file():
            break
        evals.append(json.loads(path.read_text()))
    if not evals:
        return None
    after = [100.0 * e["accuracy"] for e in evals]
    final = evals[-1]
    old = [c for task in (final.get("tasks") or [])[:-1] for c in task["classes"]]
    drops = []
    for c in old:
        seen = [e["per_class_accuracy"][c] for e in evals if e["per_class_accuracy"].get(c) is not None]
        drops.append(100.0 * (max(seen) - final["per_class_accuracy"][c]))
    return {"after": after, "final": after[-1], "forgetting": statistics.fmean(drops) if drops else None}


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(out: Path) -> str:
    arms: dict[str, list[dict]] = {}
    for chain in sorted(p for p in out.iterdir() if p.is_dir() and re.search(r"-s\d+$", p.name)):
        scores = chain_scores(chain)
        if scores is not None:
            arms.setdefault(re.sub(r"-s\d+$", "", chain.name), []).append(scores)
    tasks = max((len(s["after"]) for runs in arms.values() for s in runs), default=0)
    head = ["arm", "n"] + [f"after t{t}" for t in range(1, tasks + 1)] + ["final avg acc", "forgetting"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, runs in arms.items():
        per_task = [_cell([r["after"][t] for r in runs if len(r["after"]) > t]) for t in range(tasks)]
        forget = [r["forgetting"] for r in runs if r["forgetting"] is not None]
        row = [arm, str(len(runs)), *per_task, _cell([r["final"] for r in runs]), _cell(forget)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fake_sweep(root: Path) -> None:
    """Two seeds of a 2-task chain and one joint run, with made-up accuracies."""
    for seed, drop in ((0, 0.5), (1, 0.4)):
        chain = root / f"encm-slots10-r0-s{seed}"
        for t, (acc, per) in enumerate(
            [(0.99, {"a": 0.99, "b": 0.99}), (0.5, {"a": 0.99 - drop, "b": 0.99 - drop, "c": 0.9, "d": 0.9})],
            1,
        ):
            (chain / f"t{t}").mkdir(parents=True)
            tasks = [{"classes": ["a", "b"]}] + ([{"classes": ["c", "d"]}] if t == 2 else [])
            (chain / f"t{t}" / "eval.json").write_text(
                json.dumps({"accuracy": acc, "per_class_accuracy": per, "tasks": tasks})
            )
    (root / "joint-encm-s0" / "t1").mkdir(parents=True)
    (root / "joint-encm-s0" / "t1" / "eval.json").write_text(
        json.dumps({"accuracy": 0.9, "per_class_accuracy": {"a": 0.9}, "tasks": None})
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="a tiny fake sweep, to check the script runs")
    args = ap.parse_args(argv)
    if args.dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            _fake_sweep(Path(tmp))
            print(table(Path(tmp)))
        return 0
    if args.out is None or not args.out.is_dir():
        print(
            "incremental_table.py: give the sweep folder (OUT of benchmarks/incremental.sh)", file=sys.stderr
        )
        return 2
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
