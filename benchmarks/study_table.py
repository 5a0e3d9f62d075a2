"""Per-cell mean ± std of what a study's runs and their evaluations recorded, grouped exactly
as `ncm report` groups them (every key but the seed).

    python benchmarks/study_table.py RUNS_DIR [--columns error,train_acc,...] [--by KEY ...]

Columns read result.json, the last metrics.jsonl line, and the `ncm eval --json` files that
`reproduce.sh` writes beside a run (eval.json; eval-la1.json with post-hoc logit adjustment).
Accuracies are in %. A cell's n counts the runs that have the column's file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _json(run: Path, name: str):
    path = run / name
    return json.loads(path.read_text()) if path.is_file() else None


def _last_metrics(run: Path):
    lines = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else None


def _pct(x):
    return None if x is None else 100.0 * x


COLUMNS = {  # name -> (header, extractor(run folder) -> number or None)
    "error": ("test error %", lambda r: _json(r, "result.json")["test_error_pct"]),
    "train_acc": ("train acc %", lambda r: _pct((_last_metrics(r) or {}).get("train_acc"))),
    "scale": ("final s", lambda r: ((_json(r, "result.json") or {}).get("scale") or {}).get("value")),
    "ece": ("ECE", lambda r: ((_json(r, "eval.json") or {}).get("diagnostics") or {}).get("ece_15_bins")),
    "norm": (
        "median ‖f‖",
        lambda r: ((_json(r, "eval.json") or {}).get("diagnostics") or {}).get("feature_norm_median"),
    ),
    "auroc_dist": ("AUROC dist", lambda r: _ood(r, "dist")),
    "auroc_margin": ("AUROC margin", lambda r: _ood(r, "margin")),
    "auroc_msp": ("AUROC msp", lambda r: _ood(r, "msp")),
    "auroc_cac": ("AUROC cac", lambda r: _ood(r, "cac")),
    "auroc_maxlogit": ("AUROC maxlogit", lambda r: _ood(r, "maxlogit")),
    "acc": ("acc %", lambda r: _pct((_json(r, "eval.json") or {}).get("accuracy"))),
    "balanced": ("balanced %", lambda r: _pct((_json(r, "eval.json") or {}).get("balanced_accuracy"))),
    "head": ("head %", lambda r: _pct((_json(r, "eval.json") or {}).get("head_accuracy"))),
    "medium": ("medium %", lambda r: _pct((_json(r, "eval.json") or {}).get("medium_accuracy"))),
    "tail": ("tail %", lambda r: _pct((_json(r, "eval.json") or {}).get("tail_accuracy"))),
    "la_acc": ("acc % (post-hoc LA)", lambda r: _pct((_json(r, "eval-la1.json") or {}).get("accuracy"))),
    "la_balanced": (
        "balanced % (post-hoc LA)",
        lambda r: _pct((_json(r, "eval-la1.json") or {}).get("balanced_accuracy")),
    ),
    "la_head": (
        "head % (post-hoc LA)",
        lambda r: _pct((_json(r, "eval-la1.json") or {}).get("head_accuracy")),
    ),
    "la_tail": (
        "tail % (post-hoc LA)",
        lambda r: _pct((_json(r, "eval-la1.json") or {}).get("tail_accuracy")),
    ),
}


def _ood(run: Path, score: str):
    for name in ("eval.json", "ood.json"):  # reproduce.sh names an open-set-only evaluation ood
        found = (
            (((_json(run, name) or {}).get("ood") or {}).get("by_score") or {}).get(score, {}).get("auroc")
        )
        if found is not None:
            return found
    return None


def _stat(values: list[float], digits: int) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{mean:.{digits}f}{sd}"


def table(paths: list[Path], columns: list[str], by: list[str] = ()) -> str:
    from ncmcli.reports.collect import collect

    cells = collect(paths, by=list(by))
    keys = list(dict.fromkeys(k for c in cells for k in c.settings))
    header = ["data set", "method", *keys, "n", *(COLUMNS[c][0] for c in columns)]
    rows = []
    for cell in cells:
        row = [cell.dataset, cell.method, *(str(cell.settings.get(k, "")) for k in keys), str(cell.n)]
        for col in columns:
            vals = [v for v in (COLUMNS[col][1](Path(r)) for r in cell.runs) if v is not None]
            row.append(_stat(vals, 4 if col.startswith(("auroc", "ece")) else 2))
        rows.append(row)
    return "\n".join(
        [
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows),
        ]
    )


def fake_runs(root: Path) -> Path:
    """Two seeds of one cell with every file a column reads (for --dry-run and tests)."""
    from ncmcli.config.overrides import to_yaml
    from ncmcli.config.presets import resolve

    for seed, (err, acc, auroc) in enumerate(((10.0, 0.9, 0.2), (12.0, 0.8, 0.4))):
        run = root / f"run-s{seed}"
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(to_yaml(resolve("quickstart", [f"seed={seed}", "loss.scale=auto"])))
        (run / "result.json").write_text(json.dumps({"test_error_pct": err, "scale": {"value": 3.0 + seed}}))
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_acc": acc}) + "\n")
        (run / "eval.json").write_text(
            json.dumps(
                {
                    "accuracy": acc,
                    "balanced_accuracy": acc,
                    "tail_accuracy": acc / 2,
                    "diagnostics": {"ece_15_bins": 0.01, "feature_norm_median": 5.0},
                    "ood": {"by_score": {"dist": {"auroc": auroc}}},
                }
            )
        )
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="Tabulate two made-up runs (a smoke test).")
    ap.add_argument("--columns", default="error,train_acc,scale,ece,norm,auroc_dist,auroc_margin")
    ap.add_argument("--by", action="append", default=[])
    args = ap.parse_args(argv)
    if args.dry_run:
        import tempfile

        args.runs = [fake_runs(Path(tempfile.mkdtemp()))]
    if not args.runs:
        ap.error("give one or more run folders (or --dry-run)")
    cols = [c for c in args.columns.split(",") if c]
    unknown = [c for c in cols if c not in COLUMNS]
    if unknown:
        print(f"error: unknown column {unknown[0]!r}; choose from {', '.join(COLUMNS)}", file=sys.stderr)
        return 2
    print(table(args.runs, cols, args.by))
    return 0


if __name__ == "__main__":
    sys.exit(main())
