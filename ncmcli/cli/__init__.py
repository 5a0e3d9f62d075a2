"""The ``ncm`` command line. Thin: parse, call one engine function, render the result.

This package (with ``console`` and ``plot``) is the only place that prints or exits. Library errors (``NcmError``) become one red
line on stderr and their exit code (2 usage/config, 1 runtime); ``--debug`` or
``NCM_DEBUG=1`` shows the traceback. torch is imported inside command bodies only, so
``ncm --help`` and argument errors stay fast.

This module is long because every command's options are declared here, beside the few
lines that render its result; the work itself is in ``engine`` and ``evaluation``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console


from ncmcli import __version__
from ncmcli.cli.console import (RichReporter, StopOnSignal, err, out_json, render_certificate, render_eval,
                                safe_text, show)
from ncmcli.cli.plot import plot_app
from ncmcli.errors import NcmError

app = typer.Typer(
    help="Train and evaluate classifiers with anchor-based Nearest Class Mean losses.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(plot_app, name="plot")
_state = {"debug": os.environ.get("NCM_DEBUG", "") not in ("", "0")}


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"ncm {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.", metavar=""),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.", metavar=""),
) -> None:
    if debug:
        _state["debug"] = True


# ---------------------------------------------------------------------------------------
@app.command()
def anchors(
    classes: int = typer.Option(..., "--classes", "-C", help="Number of classes C (>= 2)."),
    dim: int = typer.Option(..., "--dim", "-d", help="Feature dimension d (>= 1)."),
    method: str = typer.Option("auto", "--method", "-m", help="auto, orthogonal, polar, simplex, orthoplex, optimized, random, or a .safetensors/.csv file."),
    seed: int = typer.Option(0, "--seed", help="Seed for random and optimized."),
    metric: str = typer.Option("euclidean", "--metric", help="Distance for the loss floor: euclidean, cosine, sqeuclidean."),
    scale: str = typer.Option("1", "--scale", help="Loss scale s for the loss floor: a number, or auto (the s whose floor is --floor-target)."),
    floor_target: float = typer.Option(0.1, "--floor-target", help="With --scale auto: the loss floor, in nats, to solve for."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the anchors to this .safetensors file (key 'anchors')."),
    as_json: bool = typer.Option(False, "--json", help="Print the certificate as one JSON document.", metavar=""),
) -> None:
    """Build fixed class anchors and print their certificate (angles, loss floor)."""
    from ncmcli import engine

    cert = engine.anchors_command(classes, dim, method, seed=seed, metric=metric, scale=scale,
                                  floor_target=floor_target, out=out)
    if out is not None:
        err.print(f"wrote {show(str(out))}")
    if as_json:
        out_json(cert)
    else:
        render_certificate(cert, Console())


# ---------------------------------------------------------------------------------------
@app.command()
def presets() -> None:
    """List the presets, each with its one-line description."""
    from ncmcli.config.presets import list_presets

    items = list_presets()
    width = max(map(len, items), default=0)
    for name, desc in items.items():
        sys.stdout.write(f"{name:<{width}}  {desc}\n")


@app.command()
def train(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset name (see 'ncm presets') or a YAML file."),
    overrides: List[str] = typer.Option([], "--set", "-s", help="Override a config key: --set optim.lr=0.05 (repeatable)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as YAML and exit.", metavar=""),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: a new one under --runs)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Parent of new run folders."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps."),
    force: bool = typer.Option(False, "--force", help="Train into an --out folder that already holds a run.", metavar=""),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run folder exactly (only --set train.epochs=N may change)."),
    name: Optional[str] = typer.Option(None, "--name", help="Prefix of the new run folder (default: the preset's name)."),
    extend: Optional[Path] = typer.Option(None, "--extend", help="Add the classes in data.classes to a trained checkpoint (or run folder): its weights, anchor slots and classes stay."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON document on stdout.", metavar=""),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr.", metavar=""),
    log_every: float = typer.Option(30.0, "--log-every", help="Without a terminal: a progress line every this many seconds."),
) -> None:
    """Train a model; writes config.yaml, metrics.jsonl, best/last.safetensors, result.json."""
    from ncmcli.config import overrides as ov
    from ncmcli.config import presets as presets_mod

    if resume is not None and (preset or out or print_config or name or extend):
        raise typer.BadParameter("--resume takes no --preset, --out, --name, --extend or --print-config: the run "
                                 "folder has them", param_hint="--resume")
    if resume is None and not preset:
        from ncmcli.errors import UsageError

        raise UsageError("ncm train needs --preset NAME or --preset FILE.yaml, e.g. --preset quickstart "
                         "(offline, about a minute); 'ncm presets' lists them all")
    cfg = None if resume is not None else presets_mod.resolve(preset, overrides)
    if cfg is not None:
        from ncmcli.registry import loss_ignores, loss_key_users

        for key in dict.fromkeys(ov.parse_override(text)[0] for text in overrides):
            if loss_ignores(cfg.loss.name, key):
                err.print(f"warning: {key} has no effect on loss {cfg.loss.name} "
                          f"(it is read by {', '.join(loss_key_users(key))})", markup=False, highlight=False)
    if print_config:
        sys.stdout.write(ov.to_yaml(cfg))
        return
    from ncmcli import engine

    from ncmcli.train.loop import Interrupted

    if not log_every > 0:
        raise typer.BadParameter("must be > 0", param_hint="--log-every")
    reporter = RichReporter(quiet, log_every=log_every)
    stop = StopOnSignal()
    try:
        with stop:
            if resume is not None:
                result = engine.resume_command(resume, overrides=list(overrides), device=device,
                                               reporter=reporter, stop=stop)
            else:
                result = engine.train_command(cfg, preset=preset, overrides=list(overrides), out=out,
                                              runs_root=runs, device=device, force=force, reporter=reporter,
                                              stop=stop, name=name, extend=extend)
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
        on = result.get("best_selected_on", "test")
        how = "the last epoch" if on == "last epoch" else f"selected on {on} accuracy"
        err.print(f"test accuracy {result['test_acc']:.4f} at epoch {result['final']['epoch']} (last.safetensors); "
                  f"best.safetensors: epoch {result['best']['epoch']}, test accuracy {result['best']['test_acc']:.4f}, "
                  f"{how}; in {result['wall_time_s']:.1f}s")
        sys.stdout.write(f"{safe_text(result['checkpoint'])}\n")


@app.command("eval")
def eval_(
    target: Path = typer.Argument(..., help="A checkpoint, or a run folder (its best.safetensors)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where the dataset lives, if not where it was trained."),
    device: str = typer.Option("auto", "--device"),
    limit: int = typer.Option(0, "--limit", help="Evaluate on a stratified sample of N test images."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per forward pass (default: the checkpoint's train.eval_batch_size)."),
    ood: Optional[str] = typer.Option(None, "--ood", help="Open-set check against a dataset name or an image folder."),
    ood_limit: Optional[int] = typer.Option(None, "--ood-limit", help="A seeded sample of N open-set images (default: --limit; 0 = all)."),
    ood_score: Optional[str] = typer.Option(None, "--ood-score", help="The open-set score to headline: dist, margin, cac, msp or maxlogit (default: msp, measured best on real pairs); every score's AUROC is reported."),
    logit_adjust: float = typer.Option(0.0, "--logit-adjust", help="Post-hoc logit adjustment tau: predict with logits - tau * log(training prior)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document, with the confusion matrix.", metavar=""),
    which: str = typer.Option("best", "--which", help="With a run folder: best (best.safetensors) or last (the final epoch, last.safetensors)."),
) -> None:
    """Accuracy, error, loss, per-class accuracy, long-tail metrics and feature diagnostics on the test split."""
    from ncmcli import evaluation

    res = evaluation.eval_command(target, data_root=data_root, device=device, limit=limit, ood=ood,
                                  batch_size=batch_size, logit_adjust=logit_adjust, ood_score=ood_score,
                                  which=which, ood_limit=ood_limit)
    for warning in res.get("ood", {}).get("warnings", []):
        err.print(f"warning: {safe_text(warning)}", markup=False)
    if as_json:
        out_json(res)
        return
    render_eval(res, Console(soft_wrap=True))


@app.command()
def predict(
    inputs: List[Path] = typer.Argument(..., help="Image files or folders."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Default: $NCM_CHECKPOINT, else the newest runs/**/best.safetensors."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="How many classes to show per image."),
    reject_above: Optional[float] = typer.Option(None, "--reject-above", help="Label an image 'unknown' when it is farther than this from every anchor."),
    reject_below_margin: Optional[float] = typer.Option(None, "--reject-below-margin", help="Label an image 'unknown' when the second-nearest anchor is less than this farther than the nearest (the margin score; see ncm eval --ood)."),
    device: str = typer.Option("auto", "--device"),
    batch_size: int = typer.Option(256, "--batch-size", help="Images decoded and classified at a time (bounds memory)."),
    resize: Optional[str] = typer.Option(None, "--resize", help="crop (keep the aspect ratio: shorter side, centre crop) or squash; default: the checkpoint's data.resize."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document.", metavar=""),
    which: str = typer.Option("best", "--which", help="With a run folder: best (best.safetensors) or last (the final epoch, last.safetensors)."),
) -> None:
    """Classify images with a checkpoint (preprocessing comes from the checkpoint)."""
    from ncmcli import engine

    from ncmcli.runs.runfiles import find_checkpoint

    path, why = find_checkpoint(checkpoint, dict(os.environ), Path.cwd(), which)
    if why != "--checkpoint":
        err.print(f"using {show(str(path))} ({show(why)})")
    res = engine.predict_command(inputs, checkpoint_path=path, device=device, top_k=top_k, reject_above=reject_above,
                                 reject_below_margin=reject_below_margin,
                                 batch_size=batch_size, resize=resize)
    err.print(f"model: {show(res['checkpoint'])}, epoch {res['epoch']}")
    resized = sum(bool(r.get("resized")) for r in res["predictions"])
    if resized:
        c, h, w = res["input_size"]
        how = "shorter side, centre crop" if res["resize"] == "crop" else "squashed"
        err.print(f"note: {resized} image(s) resized to {h}x{w} ({how}; {'grayscale' if c == 1 else 'RGB'}), "
                  "as the model expects")
    for r in res["predictions"]:
        if "error" in r:
            err.print(f"[red]error:[/red] {show(r['error'])}")
    if as_json:
        out_json(res)
    else:
        for r in res["predictions"]:
            if "error" in r:
                continue
            tops = "  ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"])
            if r["label"] == "unknown":
                tops = "unknown  (" + tops + ")"
            dist, margin = r["nearest_anchor_distance"], r.get("second_anchor_margin")
            sys.stdout.write(f"{safe_text(r['path'])}\t{safe_text(tops)}"
                             + (f"\tdist {dist:.4f}\tmargin {margin:.4f}" if dist is not None else "") + "\n")
    if res["failed"]:
        raise typer.Exit(1)


@app.command()
def export(
    target: Path = typer.Argument(..., help="A checkpoint, or a run folder (its best.safetensors)."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: beside the checkpoint)."),
    which: str = typer.Option("best", "--which", help="With a run folder: best (best.safetensors) or last (the final epoch, last.safetensors)."),
) -> None:
    """A self-contained model: raw uint8 images in; logits, prediction (and anchor distances) out."""
    from ncmcli import engine

    path, shape = engine.export_command(target, fmt=fmt, out=out, which=which)
    err.print(f"wrote {show(str(path))} (input: {shape}; normalisation built in"
              + ("; class names and preprocessing in its metadata_props" if fmt == "onnx" else "") + ")")
    sys.stdout.write(f"{safe_text(str(path))}\n")


@app.command()
def report(
    paths: List[Path] = typer.Argument(..., help="Run folders, or folders that contain them."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, md, csv or json."),
    by: List[str] = typer.Option([], "--by", help="Group runs by this config key (repeatable) instead of by everything but the seed."),
    per_run: bool = typer.Option(False, "--per-run", help="With --format csv: one row per run, with every key that varies.", metavar=""),
    metric: str = typer.Option("test_error_pct", "--metric", help="What to aggregate: test_error_pct, test_acc, train_acc, test_balanced_acc, test_head_acc, test_medium_acc, test_tail_acc or scale (final epoch)."),
) -> None:
    """Final test error per group of runs (mean ± std over seeds), beside the paper's numbers.
    Runs that differ in anything but the seed (and paths) are never averaged together."""
    from ncmcli import report as rep

    if fmt not in rep.FORMATS:
        raise typer.BadParameter(f"choose one of: {', '.join(rep.FORMATS)}", param_hint="--format")
    if per_run:
        if fmt != "csv":
            raise typer.BadParameter("--per-run goes with --format csv", param_hint="--per-run")
        sys.stdout.write(rep.per_run_csv(paths) + "\n")
        return
    text = rep.render(rep.collect(paths, by=list(by), metric=metric), fmt, metric)
    if fmt in ("table", "md"):  # human-readable: no control characters from folder names
        text = "\n".join(safe_text(line) for line in text.split("\n"))
    sys.stdout.write(text + "\n")


# ---------------------------------------------------------------------------------------
def main() -> None:
    """Console entry point: run the app, turning every failure into one line and a code."""
    if sys.stdout is None:  # started with stdout closed (>&-): the work still runs, its data goes nowhere
        sys.stdout = open(os.devnull, "w")
    try:
        rv = app(prog_name="ncm", standalone_mode=False)
    except SystemExit as exc:
        if type(sys.stdout).__name__ == "PacifyFlushWrapper":  # click's own EPIPE handling
            _quiet_broken_pipe()
        raise exc
    except BrokenPipeError:
        _quiet_broken_pipe()
    except NcmError as exc:
        _fail(str(exc), exc.exit_code, exc)
    except (typer.Abort, KeyboardInterrupt):
        err.print("[red]interrupted[/red]")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if _is_click_error(exc):  # bad flags or arguments, from click or typer's copy of it
            ctx = getattr(exc, "ctx", None)
            cmd = ctx.command_path if ctx is not None else "ncm"
            _fail(f"{exc.format_message()} (see '{cmd} --help')", getattr(exc, "exit_code", 2), exc)
        # a bug or an unexpected environment: still one line
        _fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", 1, exc)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_broken_pipe()
    sys.exit(rv if isinstance(rv, int) else 0)


def _quiet_broken_pipe() -> None:
    """The reader went away (``| head -1``, a closed stdout): end quietly, as a program killed by
    SIGPIPE would (exit 141), without a message or a flush error at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    sys.exit(128 + 13)


def _is_click_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__)


def _fail(message: str, code: int, exc: BaseException) -> None:
    if _state["debug"]:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    err.print(f"[red]error:[/red] {show(message)}")
    sys.exit(code)
