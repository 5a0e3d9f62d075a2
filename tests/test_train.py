"""Resume, interruption, crash safety, determinism, NaN guard, and pickle-free loading."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import StopAfter, assert_clean_error
from safetensors.torch import load_file

from ncmcli.config.presets import resolve
from ncmcli.runs import checkpoint
from ncmcli.runs.ckfile import read_metadata
from ncmcli.train.loop import train
from ncmcli.train.reporter import Reporter
from ncmcli.train.stopping import Interrupted

REPO = Path(__file__).resolve().parents[1]
# Augmentation and dropout on, so the data and dropout RNG states both matter.
SMALL = [
    "data.limit_train=320",
    "data.limit_test=64",
    "train.batch_size=64",
    "train.deterministic=true",
    "data.augment=true",
    "model.dropout=0.2",
    "train.num_threads=1",
]


def _tensors(path):
    return load_file(str(path))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _run(tmp, name, epochs, resume=False, stop=None, extra=()):
    cfg = resolve("quickstart", SMALL + [f"train.epochs={epochs}", *extra])
    run = tmp / name
    run.mkdir(exist_ok=True)
    return train(cfg, run_dir=run, device=torch.device("cpu"), reporter=Reporter(), resume=resume, stop=stop)


@pytest.mark.parametrize("extra", [(), ("optim.schedule=plateau", "optim.patience=0")])
def test_resume_mid_epoch_and_at_epoch_end_is_bit_identical(tmp_path, extra):
    _run(tmp_path, "full", 3, extra=extra)
    with pytest.raises(Interrupted) as exc:
        _run(tmp_path, "cut", 3, stop=StopAfter(8), extra=extra)  # epoch 2, step 3 (5 steps/epoch)
    assert exc.value.exit_code == 130 and "ncm train --resume" in str(exc.value)
    _run(tmp_path, "cut", 3, resume=True, extra=extra)
    full, cut = (
        _tensors(tmp_path / "full" / "last.safetensors"),
        _tensors(tmp_path / "cut" / "last.safetensors"),
    )
    _same(full, cut)  # weights, anchors, momentum buffers and RNG states
    assert (tmp_path / "full" / "metrics.jsonl").read_text().count("\n") == 3
    m_full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    m_cut = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda m: {k: v for k, v in m.items() if k not in ("epoch_time_s", "images_per_s")}
    assert list(map(strip, m_full)) == list(map(strip, m_cut))


def test_center_and_lsoftmax_state_survive_resume(tmp_path):
    for loss in ("center", "lsoftmax"):
        extra = (f"loss.name={loss}", "optim.schedule=plateau")  # cosine depends on the epoch total
        if loss == "lsoftmax":  # Liu et al.'s BN-ReLU head: its BN buffers must be rebuilt on resume
            extra += ("model.head=linear-bn-relu",)
        _run(tmp_path, f"{loss}-full", 2, extra=extra)
        _run(tmp_path, f"{loss}-cut", 1, extra=extra)
        cfg_path = tmp_path / f"{loss}-cut" / "config.yaml"
        cfg_path.write_text(cfg_path.read_text().replace("epochs: 1", "epochs: 2"))
        _run(tmp_path, f"{loss}-cut", 2, resume=True, extra=extra)
        _same(
            _tensors(tmp_path / f"{loss}-full" / "last.safetensors"),
            _tensors(tmp_path / f"{loss}-cut" / "last.safetensors"),
        )
    assert "criterion.centers" in _tensors(tmp_path / "center-full" / "last.safetensors")
    assert int(_tensors(tmp_path / "lsoftmax-full" / "last.safetensors")["criterion.iteration"]) == 10
    assert "model.head.0.running_mean" in _tensors(tmp_path / "lsoftmax-full" / "last.safetensors")


def test_deterministic_runs_are_identical(tmp_path):
    a, b = _run(tmp_path, "a", 1), _run(tmp_path, "b", 1)
    assert a["final"] == b["final"]
    _same(_tensors(tmp_path / "a" / "best.safetensors"), _tensors(tmp_path / "b" / "best.safetensors"))


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_resume_cli_rules(ncm, tmp_path):
    proc = ncm(
        "train",
        "--preset",
        "quickstart",
        "--set",
        "train.epochs=1",
        "--set",
        "data.limit_train=128",
        "--set",
        "data.limit_test=64",
        "--out",
        tmp_path / "r",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert_clean_error(ncm("train", "--resume", tmp_path / "r"), 2, "already finished 1 epochs")
    assert_clean_error(
        ncm("train", "--resume", tmp_path / "r", "--set", "optim.lr=1"), 2, "only train.epochs may change"
    )
    assert_clean_error(ncm("train", "--resume", tmp_path / "nope"), 2, "not a resumable run folder")
    assert_clean_error(
        ncm("train", "--resume", tmp_path / "r", "--preset", "quickstart"), 2, "--resume takes no"
    )
    ext = ncm("train", "--resume", tmp_path / "r", "--set", "train.epochs=2", "--json", "--quiet")
    assert ext.returncode == 0, ext.stderr
    assert json.loads(ext.stdout)["final"]["epoch"] == 2
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_saves_a_resumable_checkpoint(tmp_path, sig, code):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ncmcli",
            "train",
            "--preset",
            "quickstart",
            "--out",
            str(out),
            "--set",
            "train.epochs=50",
            "--set",
            "data.limit_train=2000",
            "--quiet",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "last.safetensors").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and f"ncm train --resume {out}" in err
    doc = json.loads(stdout)  # an interrupted --json run still prints one JSON document
    assert (
        doc["status"] == "interrupted"
        and doc["exit_code"] == code
        and doc["resume"] == f"ncm train --resume {out}"
    )
    assert doc["epoch"] >= 1
    meta = read_metadata(out / "last.safetensors")
    assert "train_state" in meta
    checkpoint.load(out / "last.safetensors")  # still a valid checkpoint


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(ncm, tmp_path, monkeypatch):
    from ncmcli.train.step import TrainingDiverged, TrainStep

    # Epoch 1 trains normally; in epoch 2 the loss turns NaN.
    real, calls = TrainStep.forward, []

    def poisoned(self, x, y):
        loss, feats = real(self, x, y)
        calls.append(1)
        return (loss * float("nan"), feats) if len(calls) > 4 else (loss, feats)

    monkeypatch.setattr(TrainStep, "forward", poisoned)
    cfg = resolve(
        "quickstart", ["data.limit_train=256", "data.limit_test=64", "train.batch_size=64", "train.epochs=3"]
    )
    run = tmp_path / "run"
    run.mkdir()
    snapshots = {}

    def remember(metrics):  # the checkpoints as they stood after epoch 1
        snapshots.update({p.name: p.read_bytes() for p in run.glob("*.safetensors")})

    reporter = Reporter()
    reporter.epoch_end = remember
    with pytest.raises(TrainingDiverged, match=r"at epoch 2, step 1"):
        train(cfg, run_dir=run, device=torch.device("cpu"), reporter=reporter)
    assert set(snapshots) == {"best.safetensors", "last.safetensors"}
    assert {p.name: p.read_bytes() for p in run.glob("*.safetensors")} == snapshots
    checkpoint.load(run / "last.safetensors")
    # From the CLI: one clean line, and a run that never saved leaves no folder behind.
    fresh = ncm(
        "train",
        "--preset",
        "quickstart",
        "--set",
        "optim.lr=1e12",
        "--set",
        "data.limit_train=256",
        "--set",
        "data.limit_test=64",
        "--quiet",
        "--out",
        tmp_path / "nan",
    )
    assert_clean_error(fresh, 1, "try a lower learning rate")
    assert not (tmp_path / "nan").exists()  # nothing half-made is left


SAVE_LOOP = r"""
import sys, torch
from ncmcli.runs import checkpoint
from ncmcli.config.presets import resolve
from ncmcli.nn.classifier import Classifier
cfg = resolve("quickstart")
clf = Classifier.from_config(cfg, 10, (1, 28, 28), mean=[0.5], std=[0.25])
model = clf.net
i = 0
while True:
    i += 1
    with torch.no_grad():
        model.fc.bias.fill_(float(i))
    checkpoint.save(sys.argv[1], clf, config=cfg, epoch=i, metrics={})
    print(i, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_broken_checkpoint(tmp_path):
    target = tmp_path / "ck.safetensors"
    rng = random.Random(0)
    seen_epochs = set()
    for _ in range(15):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVE_LOOP, str(target)], stdout=subprocess.PIPE, text=True
        )
        proc.stdout.readline()  # at least one save has finished
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = checkpoint.load(target)  # always a complete, valid file
        assert float(ck.model.fc.bias[0].detach()) == ck.epoch
        seen_epochs.add(ck.epoch)
    assert len(seen_epochs) > 1


def test_load_paths_never_unpickle():
    for path in (REPO / "ncmcli").rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text, path
        assert "import pickle" not in text and "pickle.load" not in text, path
        assert "yaml.load(" not in text and "unsafe_load" not in text, path


@pytest.mark.slow
def test_second_sigint_aborts_at_once_and_leaves_files_valid(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ncmcli",
            "train",
            "--preset",
            "quickstart",
            "--out",
            str(out),
            "--set",
            "train.epochs=50",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "last.safetensors").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    checkpoint.load(out / "last.safetensors")
    checkpoint.load(out / "best.safetensors")


def test_a_resume_reads_last_once(tmp_path, monkeypatch):
    """``ncm train --resume`` reads last.safetensors from disk once: the integrity check, the
    progress, the weights and the train state all come from that one read. Every way ncm reads
    a safetensors file is counted (Python's open, safe_open, load_file). config.yaml, too, is
    read once (``io.open``, which pathlib's read_text uses)."""
    import builtins
    import io

    import safetensors
    import safetensors.torch

    from ncmcli.commands.train import resume_command

    with pytest.raises(Interrupted):
        _run(tmp_path, "cut", 2, stop=StopAfter(3))  # epoch 1, step 2
    reads = []

    def counted(real, kind):
        def spy(file, *args, **kwargs):
            if str(file).endswith("last.safetensors") and (
                kind != "open" or "r" in (args[0] if args else kwargs.get("mode", "r"))
            ):
                reads.append(kind)
            return real(file, *args, **kwargs)

        return spy

    monkeypatch.setattr(builtins, "open", counted(builtins.open, "open"))
    monkeypatch.setattr(safetensors, "safe_open", counted(safetensors.safe_open, "safe_open"))
    monkeypatch.setattr(safetensors.torch, "load_file", counted(safetensors.torch.load_file, "load_file"))
    config_reads = []

    def io_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("config.yaml") and "r" in mode:
            config_reads.append(file)
        return real_io_open(file, mode, *args, **kwargs)

    real_io_open = io.open
    monkeypatch.setattr(io, "open", io_open)
    result = resume_command(tmp_path / "cut", overrides=[], device="cpu", reporter=Reporter())
    assert result["status"] == "completed" and result["final"]["epoch"] == 2
    assert reads == ["open"], reads
    assert len(config_reads) == 1, config_reads
    # The resumed run's checkpoints keep the folder's run id (taken from the checked checkpoint).
    folder_id = (tmp_path / "cut" / "config.yaml").read_text().splitlines()[0]
    assert folder_id.endswith(read_metadata(tmp_path / "cut" / "last.safetensors")["run_id"])
    reads.clear()
    # The control: reading the file's metadata alone is counted too.
    read_metadata(tmp_path / "cut" / "last.safetensors")
    assert reads == ["open"], reads  # one open of the file, for its header alone


def _ema_run(tmp_path, name, epochs, resume=False, stop=None):
    from ncmcli.train.loop import train
    from ncmcli.train.reporter import Reporter

    cfg = resolve(
        "quickstart-softmax",
        [
            "data.limit_train=256",
            "data.limit_test=64",
            "train.batch_size=64",
            "train.deterministic=true",
            "train.num_threads=1",
            "model.dropout=0.2",
            "train.ema_decay=0.9",
            f"train.epochs={epochs}",
        ],
    )
    run = tmp_path / name
    run.mkdir(exist_ok=True)
    return train(cfg, run_dir=run, device=torch.device("cpu"), reporter=Reporter(), resume=resume, stop=stop)


def test_ema_weights_follow_the_formula_and_are_what_is_checkpointed(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from ncmcli.train import loop as training

    seen = []
    real = training.update_ema

    def spy(run):
        seen.append({k: v.detach().clone() for k, v in run.criterion.named_parameters()})  # the live head
        real(run)

    monkeypatch.setattr(training, "update_ema", spy)
    _ema_run(tmp_path, "a", 1)
    d, ema = 0.9, None
    for w in seen:  # the first update copies; then e = d e + (1 - d) w
        ema = (
            {k: v.clone() for k, v in w.items()}
            if ema is None
            else {k: d * ema[k] + (1 - d) * w[k] for k in w}
        )
    saved = load_file(str(tmp_path / "a" / "last.safetensors"))
    assert len(seen) == 4
    for k, v in ema.items():
        assert torch.allclose(saved[f"criterion.{k}"], v, atol=1e-6)
        assert not torch.allclose(saved[f"state.raw.criterion.{k}"], v)  # the live weights differ


def test_ema_resumes_exactly(tmp_path):
    from conftest import StopAfter
    from safetensors.torch import load_file

    from ncmcli.train.stopping import Interrupted

    _ema_run(tmp_path, "straight", 3)
    with pytest.raises(Interrupted):
        _ema_run(tmp_path, "resumed", 3, stop=StopAfter(6))  # stops mid-epoch 2
    _ema_run(tmp_path, "resumed", 3, resume=True)
    a = load_file(str(tmp_path / "straight" / "last.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("state.raw.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_weights_are_checked_for_nan_before_every_save():
    from ncmcli.train.step import TrainingDiverged, check_finite

    net, crit = torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)
    check_finite(net, crit, "epoch 1")  # finite: no error
    crit.running_var[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="NaN or infinite at epoch 1"):
        check_finite(net, crit, "epoch 1")
    crit.running_var[0] = 1.0
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged):
        check_finite(net, crit, "epoch 2")


@pytest.mark.slow
@pytest.mark.parametrize(
    "storm", [("SIGTERM", "SIGTERM", "SIGINT"), ("SIGHUP", "SIGINT", "SIGTERM", "SIGINT")]
)
def test_a_storm_of_signals_prints_at_most_three_lines_and_no_traceback(tmp_path, storm):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ncmcli", "train", "--preset", "quickstart", "--out", str(out)]
        + ["--set", "train.epochs=50", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "last.safetensors").exists() and time.time() < deadline:
        time.sleep(0.2)
    for name in storm:
        proc.send_signal(getattr(signal, name))
        time.sleep(0.01)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= 3 and "Traceback" not in err and "Exception ignored" not in err, err
    assert proc.returncode in (130, 128 + int(getattr(signal, storm[0]))), (proc.returncode, err)
    checkpoint.load(out / "last.safetensors")


def test_an_unwritable_run_folder_is_a_usage_error_that_names_it(tmp_path, cli, monkeypatch):
    from ncmcli.runs import runfiles

    def refuse(path, *args, **kwargs):  # the folder's first write, its lock file, is refused
        if str(path).endswith(runfiles.LOCK):
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(runfiles, "open", refuse, raising=False)
    out = tmp_path / "ro"
    out.mkdir()
    proc = cli("train", "--preset", "quickstart", "--out", out)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot write the run folder {out}" in proc.stderr


def test_a_folder_that_turns_unwritable_mid_run_is_one_line_exit_1(tmp_path, cli, monkeypatch):
    from ncmcli.runs import runfiles

    def refuse(path, line):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(runfiles, "append_line", refuse)
    out = tmp_path / "run"
    proc = cli(
        "train",
        "--preset",
        "quickstart",
        "--out",
        out,
        "--set",
        "train.epochs=1",
        "--set",
        "data.limit_train=200",
    )
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: cannot write")
    assert str(out / "metrics.jsonl") in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_a_read_only_out_folder_is_refused_with_exit_2(tmp_path, ncm):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        proc = ncm("train", "--preset", "quickstart", "--out", out)
    finally:
        out.chmod(0o755)
    assert proc.returncode == 2 and "permission denied" in proc.stderr and str(out) in proc.stderr
