"""``ncm train``: its options, and one call to ``commands.train`` (a new run, or ``--resume``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from ncmcli.cli.console import RichReporter, StopOnSignal, err, out_json, safe_text


def train(
    preset: str | None = typer.Option(
        None, "--preset", "-p", help="Preset name (see 'ncm presets') or a YAML file."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", "-s", help="Override a config key: --set optim.lr=0.05 (repeatable)."
    ),
    print_config: bool = typer.Option(
        False, "--print-config", help="Print the resolved config as YAML and exit.", metavar=""
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run folder (default: a new one under --runs)."
    ),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Parent of new run folders."),
    device: str = typer.Option(
        "auto", "--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps."
    ),
    force: bool = typer.Option(
        False, "--force", help="Train into an --out folder that already holds a run.", metavar=""
    ),
    resume: Path | None = typer.Option(
        None,
        "--resume",
        help="Continue an interrupted run folder exactly (only --set train.epochs=N may change).",
    ),
    name: str | None = typer.Option(
        None, "--name", help="Prefix of the new run folder (default: the preset's name)."
    ),
    extend: Path | None = typer.Option(
        None,
        "--extend",
        help="Add the classes in data.classes to a trained checkpoint (or run folder): its weights, anchor slots and classes stay.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the result as one JSON document on stdout.", metavar=""
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr.", metavar=""),
    log_every: float = typer.Option(
        30.0, "--log-every", help="Without a terminal: a progress line every this many seconds."
    ),
) -> None:
    """Train a model; writes config.yaml, metrics.jsonl, best/last.safetensors, result.json."""
    from ncmcli.config import overrides as ov

    cfg = _config(preset, overrides, resume, clash=bool(preset or out or print_config or name or extend))
    if print_config:
        sys.stdout.write(ov.to_yaml(cfg))
        return
    from ncmcli.commands import train as commands_train
    from ncmcli.train.stopping import Interrupted

    if not log_every > 0:
        raise typer.BadParameter("must be > 0", param_hint="--log-every")
    reporter = RichReporter(quiet, log_every=log_every)
    stop = StopOnSignal()
    try:
        with stop:
            if resume is not None:
                result = commands_train.resume_command(
                    resume, overrides=list(overrides), device=device, reporter=reporter, stop=stop
                )
            else:
                result = commands_train.train_command(
                    cfg,
                    preset=preset,
                    overrides=list(overrides),
                    out=out,
                    runs_root=runs,
                    device=device,
                    force=force,
                    reporter=reporter,
                    stop=stop,
                    name=name,
                    extend=extend,
                )
    except Interrupted as exc:
        if as_json and os.environ.get("RANK", "0") == "0":
            out_json(exc.to_dict())  # a pipeline still gets one JSON document
        raise
    finally:
        reporter.close()
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 prints
    if as_json:
        out_json(result)
    else:
        _say(result)


def _config(preset, overrides: list[str], resume, *, clash: bool):
    """The run's config from --preset and --set (None for --resume, whose folder holds it),
    with a warning for each key the loss does not read."""
    from ncmcli.config import presets as presets_mod

    if resume is not None and clash:
        raise typer.BadParameter(
            "--resume takes no --preset, --out, --name, --extend or --print-config: the run folder has them",
            param_hint="--resume",
        )
    if resume is not None:
        return None
    if not preset:
        from ncmcli.errors import UsageError

        raise UsageError(
            "ncm train needs --preset NAME or --preset FILE.yaml, e.g. --preset quickstart "
            "(offline, about a minute); 'ncm presets' lists them all"
        )
    cfg = presets_mod.resolve(preset, overrides)
    _warn_ignored(cfg, overrides)
    return cfg


def _warn_ignored(cfg, overrides: list[str]) -> None:
    """A warning for each --set key the chosen loss does not read."""
    from ncmcli.config import overrides as ov
    from ncmcli.registry import loss_ignores, loss_key_users

    for key in dict.fromkeys(ov.parse_override(text)[0] for text in overrides):
        if loss_ignores(cfg.loss.name, key):
            err.print(
                f"warning: {key} has no effect on loss {cfg.loss.name} "
                f"(it is read by {', '.join(loss_key_users(key))})",
                markup=False,
                highlight=False,
            )


def _say(result: dict) -> None:
    """The result in one line on stderr, and the best checkpoint's path on stdout."""
    on = result.get("best_selected_on", "test")
    how = "the last epoch" if on == "last epoch" else f"selected on {on} accuracy"
    err.print(
        f"test accuracy {result['test_acc']:.4f} at epoch {result['final']['epoch']} (last.safetensors); "
        f"best.safetensors: epoch {result['best']['epoch']}, test accuracy {result['best']['test_acc']:.4f}, "
        f"{how}; in {result['wall_time_s']:.1f}s"
    )
    sys.stdout.write(f"{safe_text(result['checkpoint'])}\n")
