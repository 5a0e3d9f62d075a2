"""``ncm train``: start a run in a new or given folder, or ``--resume`` one exactly; both hold
the run folder's lock and run under torchrun when it started them."""

from __future__ import annotations

from pathlib import Path

from ncmcli.config import overrides as ov
from ncmcli.config import values
from ncmcli.config.overrides import from_dict
from ncmcli.config.presets import load_yaml_text
from ncmcli.errors import CheckpointError, NcmError, UsageError
from ncmcli.runs import trainstate
from ncmcli.runs.ckfile import CheckpointFile
from ncmcli.runs.rundir import RunDir, run_id_of_config
from ncmcli.runs.runfiles import FolderLock, prepare_run_dir
from ncmcli.storage import bounded_json
from ncmcli.train.loop import train
from ncmcli.train.reporter import Reporter
from ncmcli.train.runtime import distributed_run, setup_distributed


def _check_resume_integrity(run, cfg, config_text: str, meta: dict) -> None:
    """The checkpoint is the truth: refuse a ``last`` whose config differs from config.yaml
    (a hand edit) or that another run wrote (a copied file)."""

    folder_id = run_id_of_config(config_text)
    if folder_id and meta.get("run_id") != folder_id:
        raise CheckpointError(
            f"{run.last} belongs to another run (run id {meta.get('run_id')!s:.20}, "
            f"this folder's is {folder_id}); refusing to resume from it"
        )
    try:
        saved = from_dict(bounded_json(meta["config"]))
    except (KeyError, ValueError, NcmError):
        raise CheckpointError(f"{run.last}: no readable config in the checkpoint") from None
    a, b = saved.to_dict(), cfg.to_dict()
    a["train"]["epochs"] = b["train"]["epochs"]  # the one key --resume may change
    if a != b:
        diff = _first_difference(a, b)
        raise CheckpointError(
            f"{run.config} differs from the config in {run.last.name} ({diff}); "
            "the checkpoint is the truth: restore config.yaml or start a new run"
        )


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for k in a:
        if isinstance(a[k], dict):
            found = _first_difference(a[k], b.get(k, {}), f"{prefix}{k}.")
            if found:
                return found
        elif a[k] != b.get(k):
            return f"{prefix}{k}: {str(a[k])[:40]} in the checkpoint, {str(b.get(k))[:40]} in config.yaml"
    return ""


def resume_command(
    run_dir: Path, *, overrides: list[str], device: str, reporter: Reporter, stop=None
) -> dict:
    """Continue an interrupted run exactly; only ``train.epochs`` may change (to extend it)."""
    import dataclasses

    import yaml

    run_dir = Path(run_dir)
    folder = RunDir(run_dir)
    if not folder.is_resumable():
        raise UsageError(
            f"{run_dir} is not a resumable run folder (needs {folder.config.name} and {folder.last.name})"
        )
    config_text = folder.config_text()
    try:
        cfg = ov.from_dict(load_yaml_text(config_text, str(folder.config)) or {})
    except yaml.YAMLError:
        raise CheckpointError(f"{folder.config} is not valid YAML") from None
    last = CheckpointFile.read(folder.last)  # the one read of last.safetensors
    _check_resume_integrity(folder, cfg, config_text, last.meta)
    old_epochs = cfg.train.epochs
    for text in overrides:
        key, value = ov.parse_override(text)
        if key != "train.epochs":
            raise UsageError(f"--resume keeps the run's config; only train.epochs may change, not {key}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=values.coerce(key, value)))
    cfg = ov.from_dict(cfg.to_dict())  # re-validate the changed epochs
    progress = trainstate.unpack(last).progress
    if cfg.train.epochs < progress.epoch or (cfg.train.epochs == progress.epoch and progress.step > 0):
        raise UsageError(
            f"{run_dir} has already trained {progress.epoch} epochs"
            + (f" and {progress.step} steps of the next" if progress.step else "")
            + f"; train.epochs={cfg.train.epochs} would shorten it (give N > {progress.epoch})"
        )
    if progress.epoch >= cfg.train.epochs and progress.step == 0 and folder.has_result():
        raise UsageError(
            f"{run_dir} already finished {progress.epoch} epochs; extend it with --set train.epochs=N"
        )
    dev, rank, _ = setup_distributed(device)

    def run() -> dict:  # under the folder's lock: a refused resume says nothing else
        if cfg.train.epochs != old_epochs and cfg.optim.schedule == "cosine" and rank == 0:
            reporter.message(
                f"note: the cosine schedule spans train.epochs, so extending {old_epochs} -> "
                f"{cfg.train.epochs} epochs re-spans it: the lr jumps to where the longer cosine "
                f"is at step {progress.global_step}, not where the old one would have ended"
            )
        if overrides and rank == 0:
            folder.write_config(ov.to_yaml(cfg), run_id_of_config(config_text))
        return train(
            cfg,
            run_dir=run_dir,
            device=dev,
            resume=last,
            stop=stop,
            reporter=reporter if rank == 0 else Reporter(),
        )

    return distributed_run(lambda: _locked(run_dir, rank, run))


def _locked(run_dir: Path, rank: int, fn):
    """Run ``fn`` holding the run folder's lock (rank 0 writes; other ranks write nothing)."""

    if rank != 0:
        return fn()
    with FolderLock(run_dir):
        return fn()


def train_command(
    cfg,
    *,
    preset: str | None,
    overrides: list[str],
    out: Path | None,
    runs_root: Path,
    device: str,
    force: bool,
    reporter: Reporter,
    stop=None,
    name: str | None = None,
    extend: Path | None = None,
) -> dict:
    import contextlib
    import os
    import shutil

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and out is None:
        raise UsageError("under torchrun, give the run folder with --out (every rank must agree on it)")
    dev, rank, _ = setup_distributed(device)
    with contextlib.ExitStack() as held:
        if rank == 0:
            locked = out is not None and Path(out).is_dir()
            if locked:  # an existing folder is locked before --force clears anything in it
                held.enter_context(FolderLock(Path(out)))
            prefix = name or (preset and Path(preset).stem) or "custom"
            if not name and cfg.data.name == "folder" and cfg.data.root:
                prefix = f"{prefix}-{Path(cfg.data.root).expanduser().resolve().name}"  # named after the data
            try:
                run_dir, created = prepare_run_dir(out, runs_root, prefix, force)
            except PermissionError as exc:
                raise UsageError(f"cannot write --out {exc.filename or out}: permission denied") from None
            if not locked:
                held.enter_context(FolderLock(run_dir))
        else:  # other ranks write nothing
            run_dir, created, reporter = Path(out), False, Reporter()
        try:
            return distributed_run(
                lambda: train(
                    cfg,
                    run_dir=run_dir,
                    device=dev,
                    reporter=reporter,
                    preset=preset,
                    overrides=overrides,
                    stop=stop,
                    extend=extend,
                )
            )
        except BaseException:
            # A run that fails before its first checkpoint (missing data, bad anchors) leaves
            # no empty folder behind; one with checkpoints keeps them.
            if created and not RunDir(run_dir).last.exists():
                held.close()
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
