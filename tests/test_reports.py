import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from ncmcli.config.overrides import to_yaml
from ncmcli.config.presets import resolve
from ncmcli.reports.collect import collect
from ncmcli.reports.tables import render

REPO = Path(__file__).resolve().parents[1]


def fake_run(root: Path, name: str, preset: str, error: float, overrides=()):
    run = root / name
    run.mkdir(parents=True)
    cfg = resolve(preset, list(overrides))
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "result.json").write_text(json.dumps({"test_error_pct": error, "test_acc": 1 - error / 100}))
    return run


def test_cells_aggregate_seeds_and_mark_departures(tmp_path):
    fake_run(tmp_path, "a", "cifar10-encm", 10.0)
    fake_run(tmp_path, "b", "cifar10-encm", 12.0, ["seed=1"])
    fake_run(tmp_path, "c", "cifar10-encm", 20.0, ["model.dropout=0.5", "train.epochs=5"])
    fake_run(tmp_path, "d", "cifar100-lsoftmax4", 40.0, ["model.arch=small"])
    cells = {(c.dataset, c.method, c.dropout): c for c in collect([tmp_path])}
    enc = cells[("CIFAR-10", "E-NCM", 0.1)]
    assert enc.n == 2 and enc.mean == 11.0 and enc.std == pytest.approx(statistics.stdev([10, 12]))
    assert enc.marks == set()
    assert cells[("CIFAR-10", "E-NCM", 0.5)].marks == {"epochs"}
    # Liu et al.'s L-Softmax recipe has no dropout and 77 epochs: only the net departs.
    assert cells[("CIFAR-100", "L-Softmax m=4", 0.0)].marks == {"net"}


def test_paper_numbers_sit_beside_ours(tmp_path, monkeypatch):
    fake_run(tmp_path, "a", "cifar10plus-cncm", 7.0)
    paper = tmp_path / "paper.json"
    paper.write_text(
        json.dumps(
            {
                "source": "test",
                "cells": [
                    {
                        "table": "2",
                        "dataset": "CIFAR-10+",
                        "method": "C-NCM",
                        "dropout": 0.1,
                        "error_pct": 6.5,
                    }
                ],
            }
        )
    )
    monkeypatch.setattr("ncmcli.reports.paper.PAPER_FILE", paper)
    cell = collect([tmp_path])[0]
    assert cell.paper == 6.5 and cell.to_dict()["diff"] == pytest.approx(0.5)
    md = render([cell], "md")
    assert "| C-NCM | 0.1 | 7.00 (n=1) | 6.50 | +0.50 |" in md
    assert "6.5" in render([cell], "csv") and json.loads(render([cell], "json"))["cells"][0]["paper"] == 6.5


def test_table3_view_appears_when_dropout_varies(tmp_path):
    for p in (0, 0.25):
        fake_run(tmp_path, f"s{p}", "cifar100-softmax", 30.0 + p, [f"model.dropout={p}"])
    text = render(collect([tmp_path]), "table")
    assert "Table 3" in text and "p=0.25 ours" in text and "30.25 (n=1)" in text


def test_paper_file_has_every_cell_of_tables_2_and_3():
    doc = json.loads((REPO / "ncmcli" / "reports" / "paper_results.json").read_text())
    t2 = [c for c in doc["cells"] if c["table"] == "2"]
    t3 = [c for c in doc["cells"] if c["table"] == "3"]
    fig2 = [c for c in doc["cells"] if c["table"] == "Figure 2"]
    assert len(t2) == 4 * 6 and len(t3) == 3 * 3 * 4 and len(fig2) == 3
    assert all(isinstance(c["error_pct"], float) and 0 < c["error_pct"] < 50 for c in doc["cells"])
    # Cells that Table 2 and Table 3 both print agree.
    seen = {}
    for c in doc["cells"]:
        key = (c["dataset"], c["net"], c["method"], c["dropout"])
        assert seen.setdefault(key, c["error_pct"]) == c["error_pct"], key


# (preset, overrides) -> the paper's number, as printed in Tables 2 and 3 and Section 4.3.
PAPER_SPOT_CHECKS = [
    ("mnist-lsoftmax4", [], 0.31),  # Table 2, Liu et al.'s row
    ("cifar10-hinge", [], 9.91),  # Table 2
    ("cifar100-encm", [], 28.14),  # Table 2 / Table 3, p=0.1
    ("mnist-cncm", [], 0.25),  # Table 2
    ("cifar10plus-softmax", ["model.dropout=0"], 6.60),  # Table 3
    ("cifar10-encm", ["model.dropout=0.25"], 8.43),  # Table 3
    ("cifar100-softmax", ["model.dropout=0.25"], 37.26),  # Table 3, printed twice
    ("cifar100-cncm", ["model.dropout=0.5"], 31.31),  # Table 3
    ("mnist2d-softmax", [], 0.68),  # Figure 2: 99.32% accuracy
    ("mnist2d-encm", [], 0.47),  # Figure 2: 99.53%
]


@pytest.mark.parametrize("preset,overrides,paper", PAPER_SPOT_CHECKS)
def test_report_reads_the_papers_number_for_each_cell(tmp_path, preset, overrides, paper):
    fake_run(tmp_path, "a", preset, 1.0, overrides)
    (cell,) = collect([tmp_path])
    assert cell.paper == pytest.approx(paper)
    assert cell.to_dict()["diff"] == pytest.approx(1.0 - paper)
    assert f"{paper:.2f}" in render([cell], "table")


def test_figure2_runs_form_their_own_row_and_never_join_mnist(tmp_path):
    fake_run(tmp_path, "a", "mnist2d-encm", 1.0)
    fake_run(tmp_path, "b", "mnist-encm", 0.3, ["model.dropout=0"])
    fake_run(tmp_path, "c", "mnist-encm", 0.5, ["model.dropout=0", "seed=1"])
    cells = collect([tmp_path])
    by_net = {c.net: c for c in cells}
    assert set(by_net) == {"mnist2d", "mnist"} and by_net["mnist2d"].errors == [1.0]
    assert by_net["mnist"].n == 2 and by_net["mnist2d"].paper == pytest.approx(0.47)
    text = render(cells, "table")
    assert text.startswith("Figure 2 (MNIST, 2-D features)")


def test_a_cpu_net_gets_the_paper_nets_number_marked(tmp_path):
    fake_run(tmp_path, "a", "cifar10-encm", 12.0, ["model.arch=small", "train.epochs=5"])
    (cell,) = collect([tmp_path])
    assert cell.paper == pytest.approx(8.89) and cell.marks == {"net", "epochs"}
    text = render([cell], "table")
    assert "CIFAR-10 [small]" in text and "net = not the paper's net" in text


def test_no_footnote_when_nothing_is_marked(tmp_path):
    fake_run(tmp_path, "a", "quickstart", 12.0)
    text = render(collect([tmp_path]), "table")
    assert "marks" not in text and "Paper column" not in text


def test_report_cli_errors(cli, tmp_path):
    from conftest import assert_clean_error

    assert_clean_error(cli("report", tmp_path), 2, "no result.json")
    assert_clean_error(cli("report", tmp_path / "missing"), 2, "no such run folder")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["1", "2"])
def test_reproduce_script_sweep_aggregates(tmp_path, parallel):
    env = dict(
        os.environ,
        SEEDS="0 1",
        EPOCHS="1",
        NCM=str(Path(sys.executable).parent / "ncm"),
        PARALLEL=parallel,
        EXTRA="--set data.limit_train=300 --set data.limit_test=100",
    )
    out = tmp_path / "sweep"
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "reproduce.sh"), "smoke", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    runs = sorted(p.name for p in out.iterdir() if (p / "result.json").exists())
    assert runs == ["quickstart-s0", "quickstart-s1", "quickstart-softmax-s0", "quickstart-softmax-s1"]
    errors = {n: json.loads((out / "logs" / f"{n}.json").read_text())["test_error_pct"] for n in runs}
    cells = {c.method: c for c in collect([out])}
    assert cells["E-NCM"].n == 2 and cells["E-NCM"].mean == pytest.approx(
        (errors["quickstart-s0"] + errors["quickstart-s1"]) / 2
    )
    assert cells["SoftMax"].errors == pytest.approx(
        [errors["quickstart-softmax-s0"], errors["quickstart-softmax-s1"]]
    )
    assert (out / "report.md").read_text().strip() == proc.stdout.strip()
    again = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "reproduce.sh"), "smoke", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert again.returncode == 0 and again.stderr.count("skip") == 4  # resumable


def test_runs_that_differ_in_lr_are_never_averaged(tmp_path):
    fake_run(tmp_path, "a", "cifar10-encm", 40.0, ["optim.lr=0.01"])
    fake_run(tmp_path, "b", "cifar10-encm", 50.0, ["optim.lr=0.2"])
    fake_run(tmp_path, "c", "cifar10-encm", 52.0, ["optim.lr=0.2", "seed=1"])
    cells = collect([tmp_path])
    assert sorted((c.settings["optim.lr"], c.n) for c in cells) == [(0.01, 1), (0.2, 2)]
    text = render(cells, "table")
    assert "optim.lr" in text.splitlines()[1] and "45.10" not in text and "51.00 ± 1.41 (n=2)" in text
    assert text.startswith("Test error % per setting")
    # --by chooses the grouping explicitly: here, averaging over lr on purpose.
    (merged,) = collect([tmp_path], by=["loss.name"])
    assert merged.n == 3 and merged.settings == {"loss.name": "encm"}


def test_keys_that_only_follow_the_method_keep_the_paper_shape(tmp_path):
    # Liu's baselines differ from the NCM runs in head, batch, schedule...: but within a
    # (data set, method, p) cell nothing varies, so the paper-shaped table stays.
    fake_run(tmp_path, "a", "cifar10-encm", 9.0)
    fake_run(tmp_path, "b", "cifar10-lsoftmax2", 8.0)
    cells = collect([tmp_path])
    assert all(c.settings == {} for c in cells)
    assert render(cells, "table").startswith("Test error % by method and data set")


def test_per_run_csv_lists_every_varying_key(tmp_path):
    import csv
    import io

    fake_run(tmp_path, "a", "quickstart", 12.0, ["optim.lr=0.01"])
    fake_run(tmp_path, "b", "quickstart", 13.0, ["optim.lr=0.02", "seed=4"])
    rows = list(
        csv.DictReader(
            io.StringIO(__import__("ncmcli.reports.tables", fromlist=["x"]).per_run_csv([tmp_path]))
        )
    )
    assert [r["optim.lr"] for r in rows] == ["0.01", "0.02"] and [r["seed"] for r in rows] == ["0", "4"]
    assert "seed" not in list(rows[0])[7:]  # the seed is a column of its own, not a "varying key"


def test_loss_keys_a_loss_ignores_neither_split_nor_show(tmp_path):
    import csv
    import io

    from ncmcli.reports.tables import per_run_csv

    # Two SoftMax runs that differ only in lambda_gamma (which SoftMax never reads) are one cell
    # of n=2; the L-Softmax runs, which read it, keep it as a per-run column.
    fake_run(tmp_path, "s1", "quickstart-softmax", 12.0, ["loss.lambda_gamma=0.1"])
    fake_run(tmp_path, "s2", "quickstart-softmax", 14.0, ["loss.lambda_gamma=0.2"])
    fake_run(tmp_path, "l1", "quickstart-softmax", 15.0, ["loss.name=lsoftmax", "loss.lambda_gamma=0.1"])
    fake_run(tmp_path, "l2", "quickstart-softmax", 16.0, ["loss.name=lsoftmax", "loss.lambda_gamma=0.3"])
    cells = {(c.method, tuple(c.settings.items())): c for c in collect([tmp_path])}
    assert cells[("SoftMax", ())].n == 2
    assert {k for k in cells if k[0] != "SoftMax"} == {
        ("L-Softmax m=2", (("loss.lambda_gamma", 0.1),)),
        ("L-Softmax m=2", (("loss.lambda_gamma", 0.3),)),
    }
    rows = {Path(r["run"]).name: r for r in csv.DictReader(io.StringIO(per_run_csv([tmp_path])))}
    assert rows["s1"]["loss.lambda_gamma"] == "" and rows["l2"]["loss.lambda_gamma"] == "0.3"


def test_report_cli_per_run_and_by(cli, tmp_path):
    fake_run(tmp_path, "a", "quickstart", 12.0, ["optim.lr=0.01"])
    fake_run(tmp_path, "b", "quickstart", 13.0, ["optim.lr=0.02"])
    out = cli("report", tmp_path, "--format", "csv", "--per-run")
    assert out.returncode == 0 and out.stdout.count("\n") == 3, out.stderr
    by = cli("report", tmp_path, "--by", "loss.name", "--format", "json")
    assert by.returncode == 0 and json.loads(by.stdout)["cells"][0]["n"] == 2
    from conftest import assert_clean_error

    assert_clean_error(cli("report", tmp_path, "--by", "optim.lrr"), 2, "not a config key")


def test_a_broken_result_json_names_the_run(cli, tmp_path):
    run = fake_run(tmp_path, "broken", "quickstart", 12.0)
    (run / "result.json").write_text("{not json")
    from conftest import assert_clean_error

    assert_clean_error(cli("report", tmp_path), 1, "broken: unreadable run")


def _fake_run(root, name, sets, err):
    import json

    from ncmcli.config.overrides import to_yaml
    from ncmcli.config.presets import resolve

    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(resolve("quickstart", sets)))
    (run / "result.json").write_text(json.dumps({"test_error_pct": err}))


def test_repeated_seeds_and_pooled_by_are_said_plainly(tmp_path):
    from ncmcli.reports.collect import collect
    from ncmcli.reports.tables import render

    _fake_run(tmp_path, "a", ["seed=0"], 10.0)
    _fake_run(tmp_path, "b", ["seed=0"], 12.0)
    _fake_run(tmp_path, "c", ["seed=1", "optim.lr=0.01", "model.dropout=0.2"], 11.0)
    text = render(collect([tmp_path]), "table")
    assert "(n=2 runs, 1 seed)" in text and "not independent seeds" in text
    assert "(n=1)" in text
    text = render(collect([tmp_path], by=["loss.name"]), "md")
    assert "(n=3 runs, 2 seeds)" in text
    assert "pooled over: optim.lr, model.dropout" in text or "pooled over: model.dropout, optim.lr" in text
    # Distinct seeds and no pooling: neither note.
    other = tmp_path / "other"
    other.mkdir()
    _fake_run(other, "a", ["seed=0"], 10.0)
    _fake_run(other, "b", ["seed=1"], 12.0)
    text = render(collect([other], by=["loss.name"]), "table")
    assert "pooled over" not in text and "runs," not in text and "(n=2)" in text


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_resuming_a_cosine_run_longer_says_it_re_spans(tmp_path, ncm):
    out = tmp_path / "run"
    assert (
        ncm(
            "train",
            "--preset",
            "quickstart",
            "--set",
            "train.epochs=1",
            "--set",
            "data.limit_train=200",
            "--set",
            "data.limit_test=50",
            "--out",
            out,
        ).returncode
        == 0
    )
    proc = ncm("train", "--resume", out, "--set", "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert "re-spans it" in proc.stderr


def test_keys_that_differ_between_rows_get_a_column_in_a_settings_table(tmp_path):
    from ncmcli.reports.collect import collect
    from ncmcli.reports.tables import render

    _fake_run(tmp_path, "a", ["seed=0", "optim.lr=0.1", "data.hflip=true"], 10.0)
    _fake_run(tmp_path, "b", ["seed=0", "optim.lr=0.05", "data.hflip=true"], 12.0)
    _fake_run(tmp_path, "c", ["seed=0", "loss.name=softmax", "data.hflip=false"], 11.0)
    header = render(collect([tmp_path]), "table").splitlines()[1]
    assert "optim.lr" in header and "data.hflip" in header  # hflip never splits a cell, but differs by row


def test_reports_and_legends_show_resolved_values(tmp_path):
    import json

    from ncmcli.reports.collect import collect
    from ncmcli.reports.figures import curve_labels
    from ncmcli.reports.tables import render

    for name, side, err in (("a", 28, 10.0), ("b", 32, 12.0)):
        _fake_run(
            tmp_path, name, ["data.name=folder", "data.root=/x", "data.image_size=0", f"seed={side}"], err
        )
        res = json.loads((tmp_path / name / "result.json").read_text())
        res["resolved"] = {"data.image_size": side, "loss.scale": "auto=3.146"}
        (tmp_path / name / "result.json").write_text(json.dumps(res))
        (tmp_path / name / "metrics.jsonl").write_text(
            json.dumps({"epoch": 1, "train_loss": 1.0, "test_error_pct": err}) + "\n"
        )
    text = render(collect([tmp_path]), "table")
    assert "data.image_size" in text and " 28 " in text and " 32 " in text
    assert curve_labels([tmp_path / "a", tmp_path / "b"]) == [
        "image_size=28, seed=28",
        "image_size=32, seed=32",
    ]
