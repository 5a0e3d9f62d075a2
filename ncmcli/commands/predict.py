"""``ncm predict``: the top-k classes of image files with a checkpoint's own preprocessing,
and, for anchor models, the distances that reject an image as unknown."""

from __future__ import annotations

from pathlib import Path

from ncmcli.data.batching import Split
from ncmcli.data.images import IMAGE_SUFFIXES, load_image
from ncmcli.errors import UsageError
from ncmcli.nn.metrics import nearest_two
from ncmcli.runs import checkpoint
from ncmcli.train.forward import forward_split
from ncmcli.train.runtime import pick_device


def predict_command(
    inputs: list[Path],
    *,
    checkpoint_path: Path,
    device: str,
    top_k: int = 3,
    reject_above: float | None = None,
    batch_size: int = 256,
    resize: str | None = None,
    reject_below_margin: float | None = None,
) -> dict:
    """Top-k classes for each image; unreadable files are reported, the rest go on."""

    _check_options(top_k, batch_size, resize, reject_above, reject_below_margin)
    files = image_files(inputs)
    dev = pick_device(device)
    ck = checkpoint.load(checkpoint_path, dev)
    if reject_below_margin is not None and not ck.criterion.uses_anchors:
        raise UsageError("--reject-below-margin needs an anchor model (encm, cncm); this checkpoint has none")
    if reject_above is not None and not ck.criterion.uses_anchors:
        raise UsageError("--reject-above needs an anchor model (encm, cncm); this checkpoint has none")
    c, h, _ = ck.input_shape
    resize = resize or ck.config.data.resize  # as the checkpoint's folder images were prepared
    results: list[dict] = []
    # Decoded one batch at a time: memory stays bounded however many files are given.
    for start in range(0, len(files), batch_size):
        _predict_batch(
            ck,
            files[start : start + batch_size],
            results,
            dev,
            resize=resize,
            top_k=top_k,
            reject_above=reject_above,
            reject_below_margin=reject_below_margin,
        )
    return {
        "checkpoint": str(checkpoint_path),
        "epoch": ck.epoch,
        "input_size": [c, h, h],
        "resize": resize,
        "predictions": results,
        "failed": sum("error" in r for r in results),
    }


def _check_options(top_k, batch_size, resize, reject_above, reject_below_margin) -> None:
    if top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if resize not in (None, "crop", "squash"):
        raise UsageError(f"--resize must be crop or squash, got {resize!r}")
    if reject_above is not None and not reject_above > 0:
        raise UsageError(f"--reject-above must be > 0, got {reject_above}")
    if reject_below_margin is not None and not reject_below_margin >= 0:
        raise UsageError(f"--reject-below-margin must be >= 0, got {reject_below_margin}")


def image_files(inputs: list[Path]) -> list[Path]:
    """The files given, with each folder replaced by the images under it (sorted)."""

    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"{p} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise UsageError(f"no such file or folder: {p}")
    return files


def _predict_batch(
    ck,
    files: list[Path],
    results: list[dict],
    dev,
    *,
    resize: str,
    top_k: int,
    reject_above: float | None,
    reject_below_margin: float | None,
) -> None:
    """Decode ``files`` (an unreadable one becomes an error record) and append a record for each."""
    import torch

    c, h, _ = ck.input_shape
    good, tensors = [], []
    for f in files:
        try:
            t, resized = load_image(f, c, h, resize)
        except Exception as exc:  # ImageError: report it and go on with the rest
            results.append({"path": str(f), "error": str(exc)})
            continue
        results.append({"path": str(f), "resized": resized})
        good.append(len(results) - 1)
        tensors.append(t)
    if not tensors:
        return
    chunk = Split(torch.stack(tensors), torch.zeros(len(tensors), dtype=torch.int64))
    ((feats, logits, _),) = forward_split(ck.classifier, chunk.to(dev), device=dev, batch_size=len(tensors))
    probs = torch.softmax(logits, 1)
    nearest = margin = None
    if ck.criterion.uses_anchors:
        with torch.no_grad():
            nearest, margin = nearest_two(ck.criterion.distances(feats))
    top_p, top_i = probs.topk(min(top_k, len(ck.classes)), 1)
    for row in range(len(tensors)):
        rec = results[good[row]]
        rec["top"] = [
            {"class": ck.classes[i], "prob": round(p, 6)}
            for p, i in zip(top_p[row].tolist(), top_i[row].tolist())
        ]
        rec["label"] = rec["top"][0]["class"]
        rec["nearest_anchor_distance"] = None if nearest is None else round(nearest[row].item(), 6)
        rec["second_anchor_margin"] = None if margin is None else round(margin[row].item(), 6)
        if reject_above is not None and nearest[row].item() > reject_above:
            rec["label"] = "unknown"  # farther than the threshold from every anchor
        if reject_below_margin is not None and rec["second_anchor_margin"] < reject_below_margin:
            rec["label"] = "unknown"  # no anchor clearly nearer than the next one
