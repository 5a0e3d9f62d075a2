"""The ``ncm`` command line. Thin: parse, call one engine function, render the result.

This is the only module that prints or exits. Library errors (``NcmError``) become one red
line on stderr and their exit code (2 usage/config, 1 runtime); ``--debug`` or
``NCM_DEBUG=1`` shows the traceback. torch is imported inside command bodies only, so
``ncm --help`` and argument errors stay fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ncmcli import __version__
from ncmcli.errors import NcmError

app = typer.Typer(
    help="Train and evaluate classifiers with anchor-based Nearest Class Mean losses.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
_state = {"debug": os.environ.get("NCM_DEBUG", "") not in ("", "0")}


def _out(doc) -> None:
    """Data goes to stdout, as one JSON document."""
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"ncm {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
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
    scale: float = typer.Option(1.0, "--scale", help="Loss scale for the loss floor."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the anchors to this .safetensors file (key 'anchors')."),
    as_json: bool = typer.Option(False, "--json", help="Print the certificate as one JSON document."),
) -> None:
    """Build fixed class anchors and print their certificate (angles, loss floor)."""
    from ncmcli import engine

    cert = engine.anchors_command(classes, dim, method, seed=seed, metric=metric, scale=scale, out=out)
    if out is not None:
        err.print(f"wrote {escape(str(out))}")
    if as_json:
        _out(cert)
    else:
        _render_certificate(cert, Console())


def _render_certificate(cert: dict, console: Console) -> None:
    from rich.table import Table

    best = cert["best_known_min_angle_deg"]
    t = Table(title=f"anchors: {cert['method']}  C={cert['classes']}  d={cert['dim']}", show_header=False)
    t.add_row("min angle", f"{cert['min_angle_deg']:.2f}°" + (f"  (best known {best:.2f}°)" if best else ""))
    t.add_row("mean / max angle", f"{cert['mean_angle_deg']:.2f}° / {cert['max_angle_deg']:.2f}°")
    t.add_row("row norms", f"{cert['norm_min']:.6f} .. {cert['norm_max']:.6f}")
    t.add_row("duplicates", str(len(cert["duplicates"])) if cert["duplicates"] else "none")
    t.add_row(
        "loss floor",
        f"{cert['loss_floor']:.4f} nats ({cert['metric']}, scale {cert['scale']:g}; "
        f"features exactly on their anchors)",
    )
    console.print(t)


# ---------------------------------------------------------------------------------------
@app.command()
def presets() -> None:
    """List the presets, each with its one-line description."""
    from ncmcli.config import list_presets

    items = list_presets()
    width = max(map(len, items), default=0)
    for name, desc in items.items():
        sys.stdout.write(f"{name:<{width}}  {desc}\n")


class _RichReporter:
    """Progress and messages on stderr; stdout stays free for data."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.progress = None
        self.task = None

    def message(self, text: str) -> None:
        if not self.quiet:
            err.print(escape(text))

    def certificate(self, cert: dict) -> None:
        if not self.quiet:
            _render_certificate(cert, err)

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        if self.quiet:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=err, transient=True,
            )
            self.progress.start()
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"epoch {epoch}/{epochs}", total=steps, stats="")

    def step(self, step, loss, acc, images_per_s) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step,
                                 stats=f"loss {loss:.4f} acc {acc:.3f} {images_per_s:,.0f} img/s")

    def epoch_end(self, m: dict) -> None:
        if not self.quiet:
            err.print(
                f"epoch {m['epoch']:>3}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}  "
                f"test loss {m['test_loss']:.4f} acc {m['test_acc']:.4f}  lr {m['lr']:.3g}  "
                f"{m['images_per_s']:,.0f} img/s",
                soft_wrap=True,
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class _StopOnSignal:
    """SIGINT/SIGTERM ask training to stop at the next step boundary (it then saves a
    resumable checkpoint); a second signal aborts at once, leaving the files as they are."""

    def __init__(self):
        self._set = False
        self.signal_name = ""
        self._old = {}

    def is_set(self) -> bool:
        return self._set

    def _handle(self, signum, frame) -> None:
        import signal

        if self._set:
            raise KeyboardInterrupt  # the second signal: abort now
        self._set = True
        self.signal_name = signal.Signals(signum).name
        err.print(f"[yellow]{self.signal_name}: stopping after this step (again to abort)[/yellow]")

    def __enter__(self):
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)


@app.command()
def train(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset name (see 'ncm presets') or a YAML file."),
    overrides: List[str] = typer.Option([], "--set", "-s", help="Override a config key: --set optim.lr=0.05 (repeatable)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as YAML and exit."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: a new one under --runs)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Parent of new run folders."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps."),
    force: bool = typer.Option(False, "--force", help="Train into an --out folder that already holds a run."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run folder exactly (only --set train.epochs=N may change)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON document on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """Train a model; writes config.yaml, metrics.jsonl, best/last.safetensors, result.json."""
    from ncmcli import config as cfgmod

    if resume is not None and (preset or out or print_config):
        raise typer.BadParameter("--resume takes no --preset, --out or --print-config: the run folder has them",
                                 param_hint="--resume")
    cfg = None if resume is not None else cfgmod.resolve(preset, overrides)
    if print_config:
        sys.stdout.write(cfgmod.to_yaml(cfg))
        return
    from ncmcli import engine

    reporter = _RichReporter(quiet)
    stop = _StopOnSignal()
    try:
        with stop:
            if resume is not None:
                result = engine.resume_command(resume, overrides=list(overrides), device=device,
                                               reporter=reporter, stop=stop)
            else:
                result = engine.train_command(cfg, preset=preset, overrides=list(overrides), out=out,
                                              runs_root=runs, device=device, force=force, reporter=reporter,
                                              stop=stop)
    finally:
        reporter.close()
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 prints
    if as_json:
        _out(result)
    else:
        err.print(f"test accuracy {result['test_acc']:.4f} (best {result['best']['test_acc']:.4f} "
                  f"at epoch {result['best']['epoch']}) in {result['wall_time_s']:.1f}s")
        sys.stdout.write(f"{result['checkpoint']}\n")


@app.command("eval")
def eval_(
    target: Path = typer.Argument(..., help="A checkpoint, or a run folder (its best.safetensors)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where the dataset lives, if not where it was trained."),
    device: str = typer.Option("auto", "--device"),
    limit: int = typer.Option(0, "--limit", help="Evaluate on the first N test images only."),
    ood: Optional[str] = typer.Option(None, "--ood", help="Open-set check against a dataset name or an image folder."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document, with the confusion matrix."),
) -> None:
    """Accuracy, error, loss, per-class accuracy and feature diagnostics on the test split."""
    from ncmcli import evaluation

    res = evaluation.eval_command(target, data_root=data_root, device=device, limit=limit, ood=ood)
    if as_json:
        _out(res)
        return
    from rich.table import Table

    con = Console(soft_wrap=True)
    con.print(f"{res['checkpoint']}  ({res['dataset']}, epoch {res['epoch']}, {res['n']} test images)")
    con.print(f"accuracy {res['accuracy']:.4f}   error {res['error_pct']:.2f}%   loss {res['loss']:.4f}")
    diag = res["diagnostics"]
    comp = diag.get("compactness", {}).get("per_class", {})
    t = Table("class", "accuracy", *(["mean dist. to own anchor"] if comp else []))
    for name, acc in res["per_class_accuracy"].items():
        t.add_row(name, f"{acc:.4f}", *([f"{comp[name]['mean']:.4f}"] if name in comp else []))
    con.print(t)
    con.print(f"calibration: ECE (15 bins) {diag['ece_15_bins']:.4f}")
    if "compactness" in diag:
        c, sep = diag["compactness"], diag["separation"]
        con.print(f"compactness: distance to own anchor mean {c['mean']:.4f}, median {c['median']:.4f}")
        con.print(f"separation: mean distance to the nearest other anchor {sep['mean_nearest_other_anchor']:.4f}; "
                  f"{sep['own_voronoi_cell_share']:.4f} of features in their own anchor's cell")
        con.print(f"suggested --reject-above {diag['reject_above_at_95_tpr']:.4f} (keeps 95% of test images)")
    if "ood" in res:
        o = res["ood"]
        con.print(f"open-set vs {o['source']} ({o['n_out']} images, score: {o['score']}): "
                  f"AUROC {o['auroc']:.4f}, FPR at 95% TPR {o['fpr_at_95_tpr']:.4f}")


@app.command()
def predict(
    inputs: List[Path] = typer.Argument(..., help="Image files or folders."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Default: $NCM_CHECKPOINT, else the newest runs/**/best.safetensors."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="How many classes to show per image."),
    reject_above: Optional[float] = typer.Option(None, "--reject-above", help="Label an image 'unknown' when it is farther than this from every anchor."),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json", help="One JSON document."),
) -> None:
    """Classify images with a checkpoint (preprocessing comes from the checkpoint)."""
    from ncmcli import engine

    path, why = engine.find_checkpoint(checkpoint, dict(os.environ), Path.cwd())
    if why != "--checkpoint":
        err.print(f"using {escape(str(path))} ({why})")
    res = engine.predict_command(inputs, checkpoint_path=path, device=device, top_k=top_k, reject_above=reject_above)
    resized = sum(bool(r.get("resized")) for r in res["predictions"])
    if resized:
        c, h, w = res["input_size"]
        err.print(f"note: {resized} image(s) resized to {h}x{w} ({'grayscale' if c == 1 else 'RGB'}), as the model expects")
    for r in res["predictions"]:
        if "error" in r:
            err.print(f"[red]error:[/red] {escape(r['error'])}")
    if as_json:
        _out(res)
    else:
        for r in res["predictions"]:
            if "error" in r:
                continue
            tops = "  ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"])
            if r["label"] == "unknown":
                tops = "unknown  (" + tops + ")"
            dist = r["nearest_anchor_distance"]
            sys.stdout.write(f"{r['path']}\t{tops}" + (f"\tdist {dist:.4f}" if dist is not None else "") + "\n")
    if res["failed"]:
        raise typer.Exit(1)


@app.command()
def report(
    paths: List[Path] = typer.Argument(..., help="Run folders, or folders that contain them."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, md, csv or json."),
) -> None:
    """Tables shaped like the paper's Tables 2 and 3 from runs' result.json and config.yaml."""
    from ncmcli import report as rep

    if fmt not in rep.FORMATS:
        raise typer.BadParameter(f"choose one of: {', '.join(rep.FORMATS)}", param_hint="--format")
    sys.stdout.write(rep.render(rep.collect(paths), fmt) + "\n")


plot_app = typer.Typer(help="Draw Figures 2 and 3, confusion matrices and angle histograms (needs matplotlib).",
                       no_args_is_help=True)
app.add_typer(plot_app, name="plot")
_OUT = typer.Option(None, "--out", "-o", help="File or folder to write (default: beside the checkpoint).")
_FMT = typer.Option("png", "--format", help="png, svg or pdf.")


def _plot(kind: str, target, **kw) -> None:
    from ncmcli import evaluation

    path = evaluation.plot_command(kind, target, **kw)
    err.print(f"wrote {escape(str(path))}")


@plot_app.command("features")
def plot_features(
    checkpoint: Path = typer.Argument(..., help="A checkpoint or run folder."),
    split: str = typer.Option("test", "--split", help="train or test."),
    max_points: int = typer.Option(5000, "--max-points", help="Draw at most this many features (0 = all)."),
    data_root: Optional[str] = typer.Option(None, "--data-root"),
    device: str = typer.Option("auto", "--device"),
    out: Optional[Path] = _OUT, fmt: str = _FMT,
) -> None:
    """The paper's Figure 2: deep features by class, anchors as stars (PCA when d > 2)."""
    _plot("features", checkpoint, out=out, fmt=fmt, device=device, split=split, max_points=max_points,
          data_root=data_root)


@plot_app.command("curves")
def plot_curves(
    runs: List[Path] = typer.Argument(..., help="Run folders (or folders that contain them)."),
    out: Optional[Path] = _OUT, fmt: str = _FMT,
) -> None:
    """The paper's Figure 3: training loss and test error per epoch, runs overlaid."""
    _plot("curves", runs, out=out, fmt=fmt)


@plot_app.command("confusion")
def plot_confusion(
    checkpoint: Path = typer.Argument(...), data_root: Optional[str] = typer.Option(None, "--data-root"),
    device: str = typer.Option("auto", "--device"), out: Optional[Path] = _OUT, fmt: str = _FMT,
) -> None:
    """Row-normalised confusion matrix on the test split."""
    _plot("confusion", checkpoint, out=out, fmt=fmt, device=device, data_root=data_root)


@plot_app.command("angles")
def plot_angles(
    checkpoint: Path = typer.Argument(...), data_root: Optional[str] = typer.Option(None, "--data-root"),
    max_points: int = typer.Option(0, "--max-points"), device: str = typer.Option("auto", "--device"),
    out: Optional[Path] = _OUT, fmt: str = _FMT,
) -> None:
    """Angles from each test feature to its own anchor and to the nearest other one."""
    _plot("angles", checkpoint, out=out, fmt=fmt, device=device, data_root=data_root, max_points=max_points)


# ---------------------------------------------------------------------------------------
def main() -> None:
    """Console entry point: run the app, turning every failure into one line and a code."""
    try:
        rv = app(prog_name="ncm", standalone_mode=False)
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
    sys.exit(rv if isinstance(rv, int) else 0)


def _is_click_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__)


def _fail(message: str, code: int, exc: BaseException) -> None:
    if _state["debug"]:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    err.print(f"[red]error:[/red] {escape(message)}")
    sys.exit(code)
