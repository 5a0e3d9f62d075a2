"""Self-contained exported models: ONNX or TorchScript, with the checkpoint's preprocessing
baked in.

The exported model takes a **raw uint8 batch** (B, C, H, W) in [0, 255], the checkpoint's
channels and size, and returns ``logits`` (B, C classes), ``prediction`` (B,) int64 and, for
anchor models, ``distances`` (B, C) to every anchor (the prediction is the nearest). The
batch size is dynamic. Nothing of ncm is needed to run it: onnxruntime or torch.jit alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ncmcli.errors import UsageError
from ncmcli.runs import checkpoint
from ncmcli.runs.runfiles import resolve_checkpoint
from ncmcli.storage import atomic_write, remove_stale_temps

FORMATS = ("onnx", "torchscript")


class Exported(nn.Module):
    """uint8 images -> (logits, prediction[, distances]), normalisation included."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval()
        self.criterion = classifier.criterion
        self.with_distances = bool(self.criterion.uses_anchors)

    def forward(self, images: torch.Tensor):
        feats = self.classifier.features(images)  # (B, d): normalised inside, as ncm's batches
        if self.with_distances:
            dist = self.criterion.distances(feats)  # (B, C)
            logits = self.criterion.logits_of(dist)
            return logits, dist.argmin(1), dist
        logits = self.criterion.logits(feats)  # (B, C)
        return logits, logits.argmax(1)


def output_names(with_distances: bool) -> list[str]:
    return ["logits", "prediction", *(["distances"] if with_distances else [])]


def client_metadata(ck, names: list[str]) -> dict[str, str]:
    """What a client needs to use the ONNX file alone (its ``metadata_props``): class names,
    the input's shape, type and channel order, the resize rule and the normalisation (built
    in), as the strings ONNX metadata holds."""
    import json

    c, h, w = ck.input_shape
    resize = ck.config.data.resize
    rule = (
        f"shorter side to {h} px (bilinear), then a centre crop to {h}x{w}"
        if resize == "crop"
        else f"stretch to {h}x{w} px (bilinear)"
    )
    meta = {
        "ncm.classes": json.dumps(list(ck.classes)),
        "ncm.input_shape": json.dumps(["B", c, h, w]),
        "ncm.input_dtype": "uint8",
        "ncm.channel_order": "L (grayscale)" if c == 1 else "RGB",
        "ncm.layout": "NCHW",
        "ncm.resize": rule,
        "ncm.normalization": json.dumps(
            {
                "built_in": True,
                "mean": list(ck.mean),
                "std": list(ck.std),
                "applied_as": "(x / 255 - mean) / std",
            }
        ),
        "ncm.outputs": json.dumps(names),
        "ncm.loss": ck.config.loss.name,
    }
    if ck.criterion.uses_anchors:
        meta["ncm.scale"] = repr(ck.criterion.scale_value())
    return meta


def input_description(ck) -> str:
    c, h, w = ck.input_shape
    return f"(B, {c}, {h}, {w}) uint8, {'grayscale' if c == 1 else 'RGB'}"


def export(ck, fmt: str, out: Path) -> Path:
    """Write ``ck`` (a loaded checkpoint) as ``fmt`` to ``out``, atomically."""

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    wrapper = Exported(ck.classifier.cpu().float()).eval()
    example = torch.randint(0, 256, (2, *ck.input_shape), dtype=torch.uint8)
    names = output_names(wrapper.with_distances)
    if fmt == "torchscript":
        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            # torch marks TorchScript deprecated in favour of torch.export; it still loads
            # everywhere torch does, which is why it is offered.
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        atomic_write(out, lambda tmp: traced.save(str(tmp)))
        return out
    import importlib.util

    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        raise UsageError("ONNX export needs the export extra: pip install 'ncmcli[export]'")

    def write(tmp: Path) -> None:
        import onnx

        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.onnx.export(
            wrapper,
            (example,),
            input_names=["images"],
            output_names=names,
            dynamic_shapes={"images": {0: batch}},
            dynamo=True,
            verbose=False,
        )
        program.save(str(tmp))
        model = onnx.load(str(tmp))
        for key, value in client_metadata(ck, names).items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(tmp))

    atomic_write(out, write)
    return out


def export_command(target: Path, *, fmt: str, out: Path | None, which: str = "best") -> tuple[Path, str]:
    """Export a checkpoint (or a run folder's best) as ONNX or TorchScript; returns the file
    and its input, e.g. ``(B, 3, 64, 64) uint8, RGB``."""

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = resolve_checkpoint(Path(target), which)
    if out is None:
        out = path.with_suffix(".onnx" if fmt == "onnx" else ".torchscript.pt")
    elif Path(out).is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name")
    if Path(out).parent.is_dir() and not os.access(Path(out).parent, os.W_OK):
        raise UsageError(f"cannot write --out {out}: permission denied on {Path(out).parent}")
    ck = checkpoint.load(path, "cpu")
    remove_stale_temps(Path(out).parent, target=Path(out).name)  # of exports killed mid-write
    return export(ck, fmt, Path(out)), input_description(ck)
