"""Resumable training state, pickle-free: tensors (momentum buffers, RNG states) go into
the ``last.safetensors`` checkpoint under ``state.*``, scalars into its ``train_state``
JSON metadata. One file, written atomically, so the weights and the state that goes with
them can never disagree."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ncmcli.errors import CheckpointError
from ncmcli.runs.ckfile import CheckpointFile
from ncmcli.storage import bounded_json

PREFIX = "state."


@dataclass
class Progress:
    """Where a run stands: ``epoch`` epochs are complete and ``step`` batches of the next."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    train_time: float = 0.0
    train_images: int = 0
    best: dict | None = None

    def end_epoch(self, epoch: int) -> None:
        """``epoch`` is complete: the counters of a part-trained epoch start again at zero."""
        self.epoch, self.step, self.loss_sum, self.correct, self.seen = epoch, 0, 0.0, 0, 0


@dataclass
class TrainState:
    progress: Progress
    optimizer: dict  # a torch optimizer state_dict
    scheduler: dict | None
    data_rng: torch.Tensor  # the data generator's state at the start of epoch ``epoch + 1``
    torch_rng: torch.Tensor
    cuda_rng: list = field(default_factory=list)  # one CUDA RNG state per rank (rank order)
    # With EMA on, the checkpoint's model is the average; the live weights travel here.
    raw: dict = field(default_factory=dict)  # "model.<key>" / "criterion.<key>" -> tensor
    scaler: dict | None = None  # the fp16 GradScaler's state (its loss scale and growth tracker)


def rng_for_rank(cuda_rng: list, rank: int):
    """This rank's CUDA RNG state, or None when the checkpoint has none for it (resumed with
    more processes than it was written with: that rank starts its CUDA RNG afresh)."""
    return cuda_rng[rank] if 0 <= rank < len(cuda_rng) else None


def _jsonable(obj):
    """A scheduler state_dict as plain JSON (lr lambdas are code, never stored)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if k != "lr_lambdas"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in the train state")


def pack(state: TrainState) -> tuple[dict, str]:
    tensors = {f"{PREFIX}rng.data": state.data_rng, f"{PREFIX}rng.torch": state.torch_rng}
    for i, t in enumerate(state.cuda_rng):
        tensors[f"{PREFIX}rng.cuda.{i}"] = t
    for key, t in state.raw.items():
        tensors[f"{PREFIX}raw.{key}"] = t
    for idx, per_param in state.optimizer["state"].items():
        for name, t in per_param.items():
            if isinstance(t, torch.Tensor):
                tensors[f"{PREFIX}optim.{idx}.{name}"] = t
    meta = {
        "progress": state.progress.__dict__,
        "param_groups": _jsonable(state.optimizer["param_groups"]),
        "scheduler": None if state.scheduler is None else _jsonable(state.scheduler),
        "scaler": None if not state.scaler else _jsonable(state.scaler),
    }
    return tensors, json.dumps(meta)


def unpack(path) -> TrainState:
    """The train state stored in a ``last.safetensors`` (a path, or a ``CheckpointFile``
    already read), or a clear error."""

    file = path if isinstance(path, CheckpointFile) else CheckpointFile.read(path)
    path, meta = file.path, file.meta
    if "train_state" not in meta:
        raise CheckpointError(f"{path} holds no train state (only last.safetensors of a run can resume)")
    try:
        doc = bounded_json(meta["train_state"])
        progress = Progress(**doc["progress"])
        tensors = {k: v for k, v in file.tensors().items() if k.startswith(PREFIX)}
        optim_state: dict = {}
        for key, t in tensors.items():
            parts = key[len(PREFIX) :].split(".")
            if parts[0] == "optim":
                optim_state.setdefault(int(parts[1]), {})[parts[2]] = t
        raw = {k[len(PREFIX) + 4 :]: t for k, t in tensors.items() if k.startswith(f"{PREFIX}raw.")}
        cuda_keys = [k for k in tensors if k.startswith(f"{PREFIX}rng.cuda.")]
        # Numerically: with 11 or more GPUs a string sort would restore ".10" before ".2".
        cuda = [tensors[k] for k in sorted(cuda_keys, key=lambda k: int(k.rsplit(".", 1)[1]))]
        return TrainState(
            progress,
            {"state": optim_state, "param_groups": doc["param_groups"]},
            doc["scheduler"],
            tensors[f"{PREFIX}rng.data"],
            tensors[f"{PREFIX}rng.torch"],
            cuda,
            raw,
            doc.get("scaler"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged train state ({exc})") from None


def restore_scheduler(scheduler, state: dict | None) -> None:
    if scheduler is not None and state is not None:
        scheduler.load_state_dict({**scheduler.state_dict(), **state})  # keeps the lr lambdas
