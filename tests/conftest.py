import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (``-n auto``, the README's command) each worker is one process on one core:
# one intra-op thread each, inherited by the CLI subprocesses, instead of every worker spinning
# up a thread per core. Set before any test imports torch.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"


def run_ncm(*args, cwd=None, env=None, timeout=300):
    """Run the real CLI in a subprocess, as a user's shell would."""
    full_env = dict(os.environ)
    full_env.pop("NCM_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "ncmcli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
    )


def assert_clean_error(proc, code, fragment=None):
    """One line on stderr, the expected exit code, and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), proc.stderr
    if fragment:
        assert fragment in proc.stderr, proc.stderr


CAP = 6 * 2**30  # torch's own import needs about 4 GiB of address space


def capped(*args, timeout=120, cwd=None, stdin=None):
    """``python -m ncmcli ARGS`` under an address-space cap and a timeout: adversarial inputs
    (RELIABILITY.md) fail fast instead of taking the machine down or hanging CI."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))

    env = {k: v for k, v in os.environ.items() if k != "NCM_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "ncmcli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
        cwd=cwd,
        env=env,
        stdin=stdin,
    )


@pytest.fixture
def ncm():
    return run_ncm


def run_in_process(*args, env=None):
    """``ncm ARGS`` in this process, through typer's CliRunner (its isolated stdin, stdout and
    stderr): the same exit codes and streams as ``run_ncm`` without a new interpreter. For
    help, bad flags and errors; end-to-end paths (signals, torchrun, import time) keep
    ``run_ncm``."""
    from typer.testing import CliRunner

    from ncmcli.cli import run

    environ = {"NCM_DEBUG": None, **(env or {})}
    with CliRunner().isolation(env=environ) as (out, err, _):
        code = run([str(a) for a in args])
        sys.stdout.flush()
        sys.stderr.flush()
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    return subprocess.CompletedProcess(list(args), code, stdout, stderr)


@pytest.fixture
def cli():
    return run_in_process


class StopAfter:
    """A stop request (what the CLI's signal handler is) that arrives after ``n`` checks, i.e.
    about ``n`` training steps: mid-epoch interruption without a signal."""

    signal_name = "SIGINT"

    def __init__(self, n):
        self.n, self.calls = n, 0

    def is_set(self):
        self.calls += 1
        return self.calls >= self.n


def save_untrained(
    path, preset="quickstart", *, classes=None, mean=(0.3,), std=(0.2,), epoch=3, metrics=None
):
    """An untrained quickstart-shaped checkpoint (10 classes, 1x28x28) at ``path``, seeded;
    returns (path, model in eval mode, criterion)."""
    import torch

    from ncmcli.config.presets import resolve
    from ncmcli.nn.classifier import Classifier
    from ncmcli.runs import checkpoint

    cfg = resolve(preset)
    torch.manual_seed(0)
    clf = Classifier.from_config(
        cfg, classes or [f"c{i}" for i in range(10)], (1, 28, 28), mean=list(mean), std=list(std)
    )
    checkpoint.save(
        path, clf, config=cfg, epoch=epoch, metrics={"test_acc": 0.5} if metrics is None else metrics
    )
    model, crit = clf.parts()
    return path, model.eval(), crit


def untrained_file(folder, preset="quickstart", name="ck.safetensors", classes=None):
    """``save_untrained`` into ``folder / name``; the file's path."""
    return save_untrained(Path(folder) / name, preset, classes=classes)[0]


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """A run folder of quickstart trained for 2 epochs on 1,000 images, shared (read-only) by
    the plot and eval tests of one process."""
    out = tmp_path_factory.mktemp("quickstart") / "run"
    proc = run_ncm(
        "train",
        "--preset",
        "quickstart",
        "--set",
        "train.epochs=2",
        "--set",
        "data.limit_train=1000",
        "--set",
        "data.limit_test=300",
        "--out",
        out,
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """An untrained quickstart checkpoint file (see ``save_untrained``)."""
    return save_untrained(tmp_path / "ck.safetensors")[0]


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A run with train.num_threads sets torch's thread count for the whole process; put it
    back after each test, so that in-process runs do not slow every later test to one thread."""
    before = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None:
        want = before if before is not None else torch.get_num_threads()
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
