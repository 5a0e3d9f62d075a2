"""What the CLI commands do, as plain functions that return data and raise NcmError."""

from __future__ import annotations

from pathlib import Path

from ncmcli.errors import NcmError, UsageError, config_boundary
from ncmcli.runtime import distributed_run, setup_distributed

MAX_ANCHOR_CLASSES = 10_000  # the certificate compares all pairs: (C, C) float64 is 800 MB at the bound
MAX_ANCHOR_DIM = 65_536
MAX_ANCHOR_NUMBERS = 2**26


def anchors_command(
    classes: int,
    dim: int,
    method: str,
    *,
    seed: int = 0,
    metric: str = "euclidean",
    scale: float | str = 1.0,
    floor_target: float = 0.1,
    out: Path | None = None,
) -> dict:
    """Build anchors, optionally save them, and return their certificate as a dict.
    ``scale``: a number, or "auto" for the scale whose loss floor is ``floor_target`` nats."""
    from ncmcli.nn.anchors import make_anchors, resolve_auto
    from ncmcli.nn.certificate import anchor_certificate
    from ncmcli.nn.distances import get_distance

    with config_boundary():
        get_distance(metric)
    raw, scale = scale, "auto" if str(scale).strip().lower() == "auto" else _number(scale)
    if scale != "auto" and not (scale > 0 and scale != float("inf")):
        raise UsageError(f"--scale must be a finite number > 0 or auto, got {str(raw)[:40]!r}")
    if not 0 < floor_target < 10:
        raise UsageError(f"--floor-target must be in (0, 10) nats, got {floor_target}")
    # The certificate compares every pair of anchors: bound C and d before allocating.
    if not 2 <= classes <= MAX_ANCHOR_CLASSES:
        raise UsageError(f"--classes must be in [2, {MAX_ANCHOR_CLASSES}], got {classes}")
    if not 1 <= dim <= MAX_ANCHOR_DIM or classes * dim > MAX_ANCHOR_NUMBERS:
        raise UsageError(
            f"--dim must be in [1, {MAX_ANCHOR_DIM}] with classes x dim <= {MAX_ANCHOR_NUMBERS:,}, "
            f"got {classes} x {dim}"
        )
    if out is not None and (Path(out).is_dir() or str(out).endswith(("/", "\\"))):
        raise UsageError(
            f"--out {out} is a folder; give a file name such as {Path(out) / 'anchors.safetensors'}"
        )
    with config_boundary():
        a = make_anchors(method, classes, dim, seed=seed)
    label = f"auto ({resolve_auto(classes, dim)})" if method == "auto" else method
    if scale == "auto":
        from ncmcli.nn.floors import scale_for_floor

        try:
            value = scale_for_floor(a, metric, floor_target)
        except ValueError as exc:
            raise UsageError(f"--scale auto: {exc}") from None
    else:
        value = scale
    cert = anchor_certificate(a, label, metric=metric, scale=value).to_dict()
    if scale == "auto":
        cert["scale_setting"], cert["floor_target"] = "auto", floor_target
    if out is not None:
        from safetensors.torch import save_file

        from ncmcli.storage import atomic_write

        meta = {"method": method, "seed": str(seed), "classes": str(classes), "dim": str(dim)}
        try:
            atomic_write(
                Path(out), lambda tmp: save_file({"anchors": a.contiguous()}, str(tmp), metadata=meta)
            )
        except OSError as exc:
            raise UsageError(f"cannot write --out {out} ({exc.strerror or exc})") from None
    return cert


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


# ---------------------------------------------------------------------------------------
# Shared helpers


class Reporter:
    """How the engine tells the outside world what it is doing. The default says nothing;
    the CLI passes one that draws progress on stderr."""

    def message(self, text: str) -> None: ...
    def certificate(self, cert: dict) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, step: int, loss: float | None, acc: float | None, images_per_s: float) -> None: ...
    def epoch_end(self, metrics: dict) -> None: ...


# ---------------------------------------------------------------------------------------
# Commands


def _check_resume_integrity(run, cfg, config_text: str, meta: dict) -> None:
    """The checkpoint is the truth: refuse a ``last`` whose config differs from config.yaml
    (a hand edit) or that another run wrote (a copied file)."""
    from ncmcli.config.overrides import from_dict
    from ncmcli.errors import CheckpointError
    from ncmcli.runs.rundir import run_id_of_config
    from ncmcli.storage import bounded_json

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

    from ncmcli.config import overrides as ov
    from ncmcli.config import values
    from ncmcli.config.presets import load_yaml_text
    from ncmcli.errors import CheckpointError
    from ncmcli.runs import trainstate
    from ncmcli.runs.ckfile import CheckpointFile
    from ncmcli.runs.rundir import RunDir
    from ncmcli.train.loop import train

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
    if progress.epoch >= cfg.train.epochs and progress.step == 0:
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
            from ncmcli.runs.rundir import run_id_of_config

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
    from ncmcli.runs.runfiles import FolderLock

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

    from ncmcli.runs.rundir import RunDir
    from ncmcli.runs.runfiles import FolderLock, prepare_run_dir
    from ncmcli.train.loop import train

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
            run_dir, created = prepare_run_dir(out, runs_root, prefix, force)
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


def export_command(target: Path, *, fmt: str, out: Path | None, which: str = "best") -> tuple[Path, str]:
    """Export a checkpoint (or a run folder's best) as ONNX or TorchScript; returns the file
    and its input, e.g. ``(B, 3, 64, 64) uint8, RGB``."""
    from ncmcli.export import FORMATS, export, input_description
    from ncmcli.runs import checkpoint
    from ncmcli.runs.runfiles import resolve_checkpoint

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = resolve_checkpoint(Path(target), which)
    if out is None:
        out = path.with_suffix(".onnx" if fmt == "onnx" else ".torchscript.pt")
    elif Path(out).is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name")
    ck = checkpoint.load(path, "cpu")
    return export(ck, fmt, Path(out)), input_description(ck)
