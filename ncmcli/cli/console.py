"""What the CLI shows on stderr and stdout: the error console, JSON output, the anchor
certificate table, the training progress and the signal handling that stops training."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape

from ncmcli.train.reporter import Reporter

err = Console(stderr=True, highlight=False, soft_wrap=True)


def strict_json(obj):
    """``obj`` with every NaN or infinite float replaced by None: strict JSON parsers refuse
    NaN and Infinity, which Python's json module would otherwise write."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def out_json(doc) -> None:
    """Data goes to stdout, as one JSON document (never NaN or Infinity)."""
    sys.stdout.write(json.dumps(strict_json(doc), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


_CONTROL = {i: f"\\x{i:02x}" for i in (*range(0x00, 0x20), 0x7F)}
_CONTROL.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x1B: "\\x1b"})


def safe_text(text: str) -> str:
    """A user-provided string (file name, class name) for human-readable output: control
    characters (escape sequences, newlines, carriage returns) are shown escaped, so that a
    crafted name cannot move the cursor, recolour the terminal or forge extra lines. C1
    controls (0x80-0x9f) too. JSON output never goes through this."""
    out = str(text).translate(_CONTROL)
    return "".join(f"\\x{ord(ch):02x}" if 0x80 <= ord(ch) <= 0x9F else ch for ch in out)


def show(text: str) -> str:
    """``safe_text`` and then rich-markup escaped: for strings that rich prints."""
    return escape(safe_text(text))


def render_certificate(cert: dict, console: Console) -> None:
    from rich.table import Table

    best = cert["best_known_min_angle_deg"]
    t = Table(title=f"anchors: {cert['method']}  C={cert['classes']}  d={cert['dim']}", show_header=False)
    t.add_row("min angle", f"{cert['min_angle_deg']:.2f}°" + (f"  (best known {best:.2f}°)" if best else ""))
    t.add_row("mean / max angle", f"{cert['mean_angle_deg']:.2f}° / {cert['max_angle_deg']:.2f}°")
    t.add_row("row norms", f"{cert['norm_min']:.6f} .. {cert['norm_max']:.6f}")
    t.add_row("duplicates", str(len(cert["duplicates"])) if cert["duplicates"] else "none")
    how = f"auto: floor {cert['floor_target']:g} nats" if cert.get("scale_setting") == "auto" else "given"
    t.add_row("scale", f"{cert['scale']:.6g} ({how})")
    t.add_row(
        "loss floor",
        f"{cert['loss_floor']:.4f} nats ({cert['metric']}, scale {cert['scale']:.4g}; "
        "the lowest mean loss any features can reach)",
    )
    t.add_row("top probability", f"{cert['top_probability']:.4f} (e^-floor: the most the true class can get)")
    console.print(t)


class RichReporter(Reporter):
    """Progress and messages on stderr; stdout stays free for data. On a terminal: a live bar
    with the epoch's ETA. Elsewhere (CI logs, ``2> file``): one plain line every
    ``log_every`` seconds with epoch, step, loss, images/s and the run's ETA, so a long CPU
    epoch is never minutes of silence."""

    def __init__(self, quiet: bool = False, log_every: float = 30.0, live: bool | None = None):
        self.quiet = quiet
        self.live = err.is_terminal if live is None else live
        self.log_every = log_every
        self.progress = None
        self.task = None
        self.epoch = self.epochs = self.steps = 0
        self.t_first = self.t_last_line = None
        self.steps_done = 0

    def message(self, text: str) -> None:
        if not self.quiet:
            err.print(show(text))

    def certificate(self, cert: dict) -> None:
        if not self.quiet:
            render_certificate(cert, err)

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        if self.quiet or not self.live:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=err,
                transient=True,
            )
            self.progress.start()
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"epoch {epoch}/{epochs}", total=steps, stats="")

    def eta_s(self, step: int) -> float | None:
        """Seconds left in the run at the pace of the steps so far (evaluation included)."""
        import time

        if self.t_first is None or self.steps_done < 2:
            return None
        per_step = (time.monotonic() - self.t_first) / (self.steps_done - 1)
        left = (self.epochs - self.epoch) * self.steps + (self.steps - step)
        return per_step * left

    def step(self, step, loss, acc, images_per_s) -> None:
        import time

        now = time.monotonic()
        if self.t_first is None:
            self.t_first = self.t_last_line = now
        self.steps_done += 1
        if loss is not None:  # read from the device every train.log_every_steps steps; in between, the last
            self.last_read = f"loss {loss:.4f} acc {acc:.3f}"
        stats = f"{getattr(self, 'last_read', 'loss - acc -')} {images_per_s:,.0f} img/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=stats)
        elif not self.quiet and not self.live and now - self.t_last_line >= self.log_every:
            self.t_last_line = now
            eta = self.eta_s(step)
            err.print(
                f"epoch {self.epoch}/{self.epochs} step {step}/{self.steps}  {stats}  "
                f"ETA {_clock(eta) if eta is not None else '?'}",
                soft_wrap=True,
            )

    def epoch_end(self, m: dict) -> None:
        if not self.quiet:
            err.print(
                f"epoch {m['epoch']:>3}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}  "
                + (f"val acc {m['val_acc']:.4f}  " if "val_acc" in m else "")
                + f"test loss {m['test_loss']:.4f} acc {m['test_acc']:.4f}  lr {m['lr']:.3g}  "
                f"{m['images_per_s']:,.0f} img/s",
                soft_wrap=True,
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class StopOnSignal:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal) ask training to stop at the next step
    boundary (it then saves a resumable checkpoint); a second signal aborts at once, leaving the
    files as they are. Once a stop is under way, further signals are ignored for the rest of the
    process: the way out (the save, the message, interpreter shutdown) is never cut by a third
    one into a traceback, so any storm of signals prints at most three lines."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self):
        self._set = False
        self.signal_name = ""
        self._old = {}

    def is_set(self) -> bool:
        return self._set

    def _handle(self, signum, frame) -> None:
        import signal

        if self._set:
            self._ignore_all()
            raise KeyboardInterrupt  # the second signal: abort now
        self._set = True
        self.signal_name = signal.Signals(signum).name
        err.print(f"[yellow]{self.signal_name}: stopping after this step (again to abort)[/yellow]")

    def _ignore_all(self) -> None:
        import signal

        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), signal.SIG_IGN)

    def __enter__(self):
        import signal

        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._set:  # a stop is under way: the process is on its way out, in peace
            self._ignore_all()
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)


def render_eval(res: dict, con: Console) -> None:
    """``ncm eval``'s human-readable report (``--json`` prints ``res`` itself)."""

    con.print(
        f"{show(res['checkpoint'])}  ({show(res['dataset'])}, epoch {res['epoch']}, {res['n']} test images)"
    )
    top5 = f"   top-5 {res['top5_accuracy']:.4f}" if res.get("top5_accuracy") is not None else ""
    macro = f"   macro-F1 {res['macro_f1']:.4f}" if res.get("macro_f1") is not None else ""
    con.print(
        f"accuracy {res['accuracy']:.4f}{top5}   error {res['error_pct']:.2f}%   loss {res['loss']:.4f}{macro}"
    )
    if res.get("logit_adjust"):
        la = res["logit_adjust"]
        con.print(
            f"post-hoc logit adjustment tau={la['tau']:g}: accuracy {la['unadjusted_accuracy']:.4f} "
            f"-> {res['accuracy']:.4f} (prediction: argmax of logits - tau log prior)"
        )
    tail = "   ".join(
        f"{k} {res[f'{k}_accuracy']:.4f}"
        for k in ("head", "medium", "tail")
        if res.get(f"{k}_accuracy") is not None
    )
    con.print(
        f"balanced accuracy {res['balanced_accuracy']:.4f}"
        + (f"   {tail} (thirds by training count)" if tail else "")
        + (f"   (long-tailed training data: {res['imbalance']})" if res.get("imbalance") else "")
    )
    diag = res["diagnostics"]
    con.print(_per_class_table(res, diag))
    con.print(f"calibration: ECE (15 bins) {diag['ece_15_bins']:.4f}")
    if "compactness" in diag:
        c, sep = diag["compactness"], diag["separation"]
        con.print(f"compactness: distance to own anchor mean {c['mean']:.4f}, median {c['median']:.4f}")
        con.print(
            f"separation: mean distance to the nearest other anchor {sep['mean_nearest_other_anchor']:.4f}; "
            f"{sep['own_voronoi_cell_share']:.4f} of features in their own anchor's cell"
        )
        con.print(
            f"suggested --reject-below-margin {diag['reject_below_margin_at_95_tpr']:.4f} or --reject-above "
            f"{diag['reject_above_at_95_tpr']:.4f} (each keeps 95% of test images; check them with --ood)"
        )
    if "ood" in res:
        o = res["ood"]
        con.print(
            f"open-set vs {show(o['source'])} ({o['n_out']} images, score: {o['score']}, {o['score_description']}): "
            f"AUROC {o['auroc']:.4f}, FPR at 95% TPR {o['fpr_at_95_tpr']:.4f}"
        )
        con.print("  AUROC by score: " + ", ".join(f"{n} {v['auroc']:.4f}" for n, v in o["by_score"].items()))


def _per_class_table(res: dict, diag: dict):
    """The per-class rows of ``ncm eval``: accuracy, precision, recall, F1 (and the mean
    distance to the own anchor for anchor models)."""
    from rich.table import Table

    comp = diag.get("compactness", {}).get("per_class", {})
    t = Table(
        "class", "n", "accuracy", "precision", "recall", "F1", *(["mean dist. to own anchor"] if comp else [])
    )
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    for name, acc in res["per_class_accuracy"].items():
        sc = res["per_class"][name]
        t.add_row(
            show(name),
            str(sc["n"]),
            "n/a (no images)" if acc is None else f"{acc:.4f}",
            fmt(sc["precision"]),
            fmt(sc["recall"]),
            fmt(sc["f1"]),
            *([f"{comp[name]['mean']:.4f}"] if name in comp else []),
        )
    return t
