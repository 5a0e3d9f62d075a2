"""What the CLI commands do, as plain functions that return data and raise NcmError."""

from __future__ import annotations

from pathlib import Path

from ncmcli.errors import UsageError


def anchors_command(
    classes: int, dim: int, method: str, *, seed: int = 0, metric: str = "euclidean",
    scale: float = 1.0, out: Path | None = None,
) -> dict:
    """Build anchors, optionally save them, and return their certificate as a dict."""
    from ncmcli.anchors import anchor_certificate, make_anchors, resolve_auto
    from ncmcli.distances import get_distance

    get_distance(metric)
    if not scale > 0:
        raise UsageError(f"--scale must be > 0, got {scale}")
    a = make_anchors(method, classes, dim, seed=seed)
    label = f"auto ({resolve_auto(classes, dim)})" if method == "auto" else method
    cert = anchor_certificate(a, label, metric=metric, scale=scale).to_dict()
    if out is not None:
        from safetensors.torch import save_file

        from ncmcli.checkpoint import atomic_write

        meta = {"method": method, "seed": str(seed), "classes": str(classes), "dim": str(dim)}
        atomic_write(Path(out), lambda tmp: save_file({"anchors": a.contiguous()}, str(tmp), metadata=meta))
    return cert


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


def pick_device(name: str = "auto"):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for, but MPS is not available")
    return dev


# ---------------------------------------------------------------------------------------
# Commands

def setup_distributed(device: str):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU)
    and return (device, rank, world); otherwise (pick_device(device), 0, 1)."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return pick_device(device), 0, 1
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return dev, rank, world


def teardown_distributed(ok: bool) -> None:
    """Leave the process group, so that gloo/NCCL threads end before the interpreter does.
    After success the ranks meet at a barrier first; after a failure they do not (the others
    may be blocked in a collective, and torchrun stops them when this rank exits)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            if ok:
                torch.distributed.barrier()  # no rank tears down while another still talks to it
        finally:
            torch.distributed.destroy_process_group()


def _distributed_run(fn):
    """Run ``fn()`` and leave the process group afterwards, however it ends."""
    try:
        result = fn()
    except BaseException:
        teardown_distributed(ok=False)
        raise
    teardown_distributed(ok=True)
    return result


def resume_command(run_dir: Path, *, overrides: list[str], device: str, reporter: Reporter, stop=None) -> dict:
    """Continue an interrupted run exactly; only ``train.epochs`` may change (to extend it)."""
    import dataclasses

    import yaml

    from ncmcli import config as cfgmod
    from ncmcli import trainstate
    from ncmcli.errors import CheckpointError
    from ncmcli.training import train

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "last.safetensors").is_file():
        raise UsageError(f"{run_dir} is not a resumable run folder (needs config.yaml and last.safetensors)")
    try:
        cfg = cfgmod.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {})
    except yaml.YAMLError:
        raise CheckpointError(f"{run_dir / 'config.yaml'} is not valid YAML") from None
    for text in overrides:
        key, value = cfgmod.parse_override(text)
        if key != "train.epochs":
            raise UsageError(f"--resume keeps the run's config; only train.epochs may change, not {key}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=cfgmod.coerce(key, value)))
    cfg = cfgmod.from_dict(cfg.to_dict())  # re-validate the changed epochs
    progress = trainstate.unpack(run_dir / "last.safetensors").progress
    if progress.epoch >= cfg.train.epochs and progress.step == 0:
        raise UsageError(f"{run_dir} already finished {progress.epoch} epochs; extend it with --set train.epochs=N")
    dev, rank, _ = setup_distributed(device)
    if overrides and rank == 0:
        from ncmcli.checkpoint import atomic_write_text

        atomic_write_text(run_dir / "config.yaml", cfgmod.to_yaml(cfg))
    return _distributed_run(lambda: train(cfg, run_dir=run_dir, device=dev, resume=True, stop=stop,
                                          reporter=reporter if rank == 0 else Reporter()))


def train_command(cfg, *, preset: str | None, overrides: list[str], out: Path | None,
                  runs_root: Path, device: str, force: bool, reporter: Reporter, stop=None) -> dict:
    import os
    import shutil

    from ncmcli.training import prepare_run_dir, train

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and out is None:
        raise UsageError("under torchrun, give the run folder with --out (every rank must agree on it)")
    dev, rank, _ = setup_distributed(device)
    if rank == 0:
        run_dir, created = prepare_run_dir(out, runs_root, preset and Path(preset).stem or "custom", force)
    else:  # other ranks write nothing
        run_dir, created, reporter = Path(out), False, Reporter()
    try:
        return _distributed_run(lambda: train(cfg, run_dir=run_dir, device=dev, reporter=reporter, preset=preset,
                                              overrides=overrides, stop=stop))
    except BaseException:
        # A run that fails before its first checkpoint (missing data, bad anchors) leaves
        # no empty folder behind; one with checkpoints keeps them.
        if created and not (run_dir / "last.safetensors").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def resolve_checkpoint(target: Path) -> Path:
    """A checkpoint file, or a run folder meaning its best.safetensors."""
    from ncmcli.errors import CheckpointError

    target = Path(target)
    if target.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (target / name).is_file():
                return target / name
        raise CheckpointError(f"{target} holds no best.safetensors or last.safetensors")
    if not target.exists():
        raise UsageError(f"checkpoint not found: {target}")
    return target


def _test_split(ck, data_root: str | None, limit: int = 0):
    """The test split a checkpoint was trained for, checked against its classes and shape."""
    import dataclasses

    from ncmcli.data import load_dataset
    from ncmcli.errors import DataError

    data_cfg = ck.config.data
    if data_root is not None:
        data_cfg = dataclasses.replace(data_cfg, root=data_root)
    data_cfg = dataclasses.replace(data_cfg, limit_test=limit or data_cfg.limit_test)
    data = load_dataset(data_cfg, train=False)
    if data.classes != ck.classes:
        raise DataError(f"the test data has classes {data.classes[:5]}..., the checkpoint {ck.classes[:5]}...")
    if data.input_shape != ck.input_shape:
        raise DataError(f"the test data has input shape {data.input_shape}, the checkpoint {ck.input_shape}")
    return data


def _ood_images(source: str, ck, data_root: str | None, limit: int):
    """Out-of-distribution test images: a dataset name's test split or an image folder,
    converted to the checkpoint's channels and size."""
    import torch

    from ncmcli.config import DATASETS, DataConfig
    from ncmcli.data import IMAGE_SUFFIXES, load_dataset, load_image

    c, h, _ = ck.input_shape
    if source in DATASETS and source != "folder" and not Path(source).exists():
        ds = load_dataset(DataConfig(name=source, root=data_root or "", limit_test=limit), train=False)
        x = ds.test.images.float()
        if x.shape[1] != c:
            x = x.mean(1, keepdim=True) if c == 1 else x.expand(-1, 3, -1, -1)
        if x.shape[-1] != h:
            x = torch.nn.functional.interpolate(x, size=(h, h), mode="bilinear", align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8)
    folder = Path(source)
    if not folder.is_dir():
        raise UsageError(f"--ood {source!r} is neither a dataset ({', '.join(d for d in DATASETS if d != 'folder')}) nor a folder")
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        files = files[:limit]
    if not files:
        raise UsageError(f"--ood folder {folder} holds no images")
    return torch.stack([load_image(f, c, h)[0] for f in files])


def eval_command(target: Path, *, data_root: str | None, device: str, batch_size: int = 1024,
                 limit: int = 0, ood: str | None = None) -> dict:
    """Accuracy, loss, per-class accuracy, confusion, and feature diagnostics on the test split."""
    import torch

    from ncmcli import checkpoint, diagnostics
    from ncmcli.data import Split
    from ncmcli.training import evaluate

    path = resolve_checkpoint(target)
    dev = pick_device(device)
    ck = checkpoint.load(path, dev)
    data = _test_split(ck, data_root, limit)
    test = data.test.to(dev)
    ev = evaluate(ck.model, ck.criterion, test, mean=ck.mean, std=ck.std, device=dev,
                  batch_size=batch_size, num_classes=len(ck.classes))
    feats, logits, labels = diagnostics.extract(ck.model, ck.criterion, test, mean=ck.mean, std=ck.std, device=dev,
                                                batch_size=batch_size)
    diag = {"ece_15_bins": diagnostics.expected_calibration_error(torch.softmax(logits, 1), labels)}
    has_anchors = ck.criterion.uses_anchors
    if has_anchors:
        with torch.no_grad():
            dist = ck.criterion.distances(feats.to(dev)).cpu()  # (N, C)
        diag.update(diagnostics.anchor_report(dist, labels, ck.classes))
        nearest = dist.min(1).values
        diag["reject_above_at_95_tpr"] = torch.quantile(nearest.double(), 0.95).item()
    result = {
        "checkpoint": str(path), "dataset": data.name, "epoch": ck.epoch,
        "accuracy": ev["accuracy"], "error_pct": ev["error_pct"], "loss": ev["loss"], "n": ev["n"],
        "per_class_accuracy": dict(zip(ck.classes, ev["per_class_accuracy"])),
        "classes": ck.classes, "confusion": ev["confusion"], "diagnostics": diag,
    }
    if ood is not None:
        images = _ood_images(ood, ck, data_root, limit)
        ood_split = Split(images, torch.zeros(len(images), dtype=torch.int64)).to(dev)
        f_ood, l_ood, _ = diagnostics.extract(ck.model, ck.criterion, ood_split, mean=ck.mean, std=ck.std,
                                              device=dev, batch_size=batch_size)
        if has_anchors:  # in-distribution = close to some anchor: score = -nearest distance
            with torch.no_grad():
                s_in = -nearest
                s_out = -ck.criterion.distances(f_ood.to(dev)).min(1).values.cpu()
            score = "negative distance to the nearest anchor"
        else:  # no anchors: the maximum softmax probability
            s_in, s_out = torch.softmax(logits, 1).max(1).values, torch.softmax(l_ood, 1).max(1).values
            score = "maximum softmax probability"
        fpr, thr = diagnostics.fpr_at_tpr(s_in, s_out, 0.95)
        result["ood"] = {"source": ood, "n_in": len(s_in), "n_out": len(s_out), "score": score,
                         "auroc": diagnostics.auroc(s_in, s_out), "fpr_at_95_tpr": fpr}
    return result


def find_checkpoint(explicit: Path | None, env: dict, cwd: Path) -> tuple[Path, str]:
    """(checkpoint, why): --checkpoint, else $NCM_CHECKPOINT, else the newest
    runs/**/best.safetensors under the current folder."""
    if explicit is not None:
        return resolve_checkpoint(explicit), "--checkpoint"
    if env.get("NCM_CHECKPOINT"):
        return resolve_checkpoint(Path(env["NCM_CHECKPOINT"])), "$NCM_CHECKPOINT"
    found = sorted((cwd / "runs").glob("**/best.safetensors"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UsageError("no checkpoint: pass --checkpoint, set $NCM_CHECKPOINT, or train one into ./runs")
    return found[-1], "the newest under ./runs"


def predict_command(inputs: list[Path], *, checkpoint_path: Path, device: str, top_k: int = 3,
                    reject_above: float | None = None) -> dict:
    """Top-k classes for each image; unreadable files are reported, the rest go on."""
    import torch

    from ncmcli import checkpoint
    from ncmcli.data import IMAGE_SUFFIXES, load_image, normalize

    if top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    if reject_above is not None and not reject_above > 0:
        raise UsageError(f"--reject-above must be > 0, got {reject_above}")
    files: list[Path] = []
    for p in inputs:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"{p} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise UsageError(f"no such file or folder: {p}")
    dev = pick_device(device)
    ck = checkpoint.load(checkpoint_path, dev)
    if reject_above is not None and not ck.criterion.uses_anchors:
        raise UsageError("--reject-above needs an anchor model (encm, cncm); this checkpoint has none")
    c, h, _ = ck.input_shape
    results, good, tensors = [], [], []
    for f in files:
        try:
            t, resized = load_image(f, c, h)
        except Exception as exc:  # ImageError: report it and go on with the rest
            results.append({"path": str(f), "error": str(exc)})
            continue
        results.append({"path": str(f), "resized": resized})
        good.append(len(results) - 1)
        tensors.append(t)
    k = min(top_k, len(ck.classes))
    for start in range(0, len(tensors), 256):
        x = normalize(torch.stack(tensors[start:start + 256]).to(dev), ck.mean, ck.std)
        with torch.no_grad():
            feats = ck.model(x)
            probs = torch.softmax(ck.criterion.logits(feats), 1)
            dist = ck.criterion.distances(feats).min(1).values if ck.criterion.uses_anchors else None
        top_p, top_i = probs.topk(k, 1)
        for row in range(len(x)):
            rec = results[good[start + row]]
            rec["top"] = [{"class": ck.classes[i], "prob": round(p, 6)}
                          for p, i in zip(top_p[row].tolist(), top_i[row].tolist())]
            rec["label"] = rec["top"][0]["class"]
            rec["nearest_anchor_distance"] = None if dist is None else round(dist[row].item(), 6)
            if reject_above is not None and dist[row].item() > reject_above:
                rec["label"] = "unknown"  # farther than the threshold from every anchor
    return {"checkpoint": str(checkpoint_path), "input_size": [c, h, h], "predictions": results,
            "failed": sum("error" in r for r in results)}


def _plot_out(out: Path | None, default_dir: Path, stem: str, fmt: str) -> Path:
    from ncmcli.plots import FORMATS

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if out is None:
        return default_dir / f"{stem}.{fmt}"
    out = Path(out)
    if out.is_dir():
        return out / f"{stem}.{fmt}"
    return out if out.suffix else out.with_suffix(f".{fmt}")


def plot_command(kind: str, target: Path | list[Path], *, out: Path | None, fmt: str = "png",
                 device: str = "auto", split: str = "test", max_points: int = 5000,
                 data_root: str | None = None) -> Path:
    """Draw one plot and return the file written."""
    import dataclasses

    import torch

    from ncmcli import checkpoint, diagnostics, plots
    from ncmcli.data import load_dataset
    from ncmcli.training import evaluate

    plots._pyplot()  # fail early, with the install hint, before any work
    if kind == "curves":
        runs = []
        for t in target:
            t = Path(t)
            found = [t] if (t / "metrics.jsonl").is_file() else sorted(p.parent for p in t.rglob("metrics.jsonl"))
            if not found:
                raise UsageError(f"no metrics.jsonl in {t}")
            runs += found
        return plots.curves(runs, _plot_out(out, Path("."), "curves", fmt))
    if split not in ("train", "test"):
        raise UsageError(f"--split must be train or test, got {split!r}")
    path = resolve_checkpoint(target)
    dev = pick_device(device)
    ck = checkpoint.load(path, dev)
    name = f"{ck.config.loss.name} {ck.config.model.arch} on {ck.config.data.name}, epoch {ck.epoch}"
    if split == "train" and kind == "features":
        data_cfg = ck.config.data if data_root is None else dataclasses.replace(ck.config.data, root=data_root)
        data = load_dataset(data_cfg)
        s = data.train
    else:
        s = _test_split(ck, data_root).test
    if kind == "confusion":
        ev = evaluate(ck.model, ck.criterion, s.to(dev), mean=ck.mean, std=ck.std, device=dev,
                      batch_size=1024, num_classes=len(ck.classes))
        return plots.confusion(ev["confusion"], ck.classes, f"{name}: accuracy {ev['accuracy']:.4f}",
                               _plot_out(out, path.parent, "confusion", fmt))
    if max_points and len(s) > max_points:
        idx = torch.randperm(len(s), generator=torch.Generator().manual_seed(0))[:max_points]
        s = s.subset(idx)
    feats, _, labels = diagnostics.extract(ck.model, ck.criterion, s.to(dev), mean=ck.mean, std=ck.std, device=dev)
    directions, direction_kind = diagnostics.class_directions(ck.criterion)
    if kind == "features":
        metric = getattr(ck.criterion, "metric", None)
        return plots.features(feats, labels, directions, direction_kind, ck.classes, metric=metric,
                              title=f"{name} ({split})", out=_plot_out(out, path.parent, f"features-{split}", fmt))
    if kind == "angles":
        if directions is None:
            raise UsageError("this checkpoint has neither anchors nor class weight vectors to measure angles to")
        return plots.angles(feats, labels, directions, direction_kind, name, _plot_out(out, path.parent, "angles", fmt))
    raise UsageError(f"unknown plot {kind!r}")
