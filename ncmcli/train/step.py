"""The training step and what guards it: ``TrainStep`` (the net under autocast, the criterion
in fp32, as one module DDP can wrap), the speed settings that wrap it (``build_step``:
channels-last, cuDNN autotuning, ``torch.compile``, DDP), the EMA of the weights, and the
finiteness check that keeps bad weights out of checkpoints."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ncmcli.config.schema import Config
from ncmcli.errors import ConfigError as NcmConfigError
from ncmcli.errors import NcmError
from ncmcli.train.runtime import dist_info


class TrainingDiverged(NcmError):
    """The loss became NaN or Inf."""


class TrainStep(nn.Module):
    """One forward for training: the net under autocast, then the criterion in fp32. A single
    module so that DDP synchronises the criterion's parameters (softmax/hinge heads) too."""

    def __init__(self, net, criterion, amp_dtype, memory_format):
        super().__init__()
        self.net, self.criterion = net, criterion
        self.amp_dtype, self.memory_format = amp_dtype, memory_format

    def forward(self, x, y):
        with torch.autocast(
            x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            feats = self.net(x.contiguous(memory_format=self.memory_format))
        return self.criterion(feats, y), feats  # outside autocast: distances and the loss stay fp32


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_finite(model: nn.Module, criterion: nn.Module, where: str) -> None:
    """Raise TrainingDiverged if any floating-point weight or buffer is NaN or infinite."""
    flags = [
        torch.isfinite(t).all()
        for m in (model, criterion)
        for t in m.state_dict().values()
        if t.is_floating_point()
    ]
    if flags and not bool(torch.stack(flags).all()):
        raise TrainingDiverged(f"the weights became NaN or infinite at {where}; try a lower optim.lr")


def build_step(cfg: Config, model: nn.Module, criterion: nn.Module, device: torch.device):
    """(the module a step calls, the autocast dtype): the speed settings, none of which changes
    the maths beyond the autocast rounding, then the compiled and DDP wrappers, which only run
    steps (checkpoints save the plain modules)."""
    amp_dtype = resolve_precision(cfg.train.precision, device)
    channels_last = cfg.train.channels_last == "true" or (
        cfg.train.channels_last == "auto" and device.type == "cuda"
    )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    if device.type == "cuda" and not cfg.train.deterministic:
        torch.backends.cudnn.benchmark = True
    step = TrainStep(
        torch.compile(model) if cfg.train.compile else model, criterion, amp_dtype, memory_format
    )
    if dist_info()[1] > 1:
        if cfg.model.freeze_backbone_epochs:  # DDP expects a gradient for every parameter it wraps
            raise NcmConfigError(
                "model.freeze_backbone_epochs is not supported under torchrun (DDP); train the "
                "frozen epochs in one process, then --resume under torchrun"
            )
        step = nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if device.type == "cuda" else None
        )
    return step, amp_dtype


class EMA(nn.Module):
    """An exponential moving average of a module's parameters, as torch.optim.swa_utils'
    AveragedModel with get_ema_multi_avg_fn computes it (the first update copies, each later
    one is one ``torch._foreach_lerp_`` by 1 - decay), with buffers copied from the live
    module. Its counter is a Python int, so an update costs no host sync (AveragedModel
    tests its tensor counter against 0 on every update)."""

    def __init__(self, live: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(live)
        self.decay = float(decay)
        self.n_averaged = 0

    @torch.no_grad()
    def update(self, live: nn.Module) -> None:
        mine = [p.detach() for p in self.module.parameters()]
        theirs = [p.detach() for p in live.parameters()]
        if self.n_averaged == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            torch._foreach_lerp_(mine, theirs, 1.0 - self.decay)
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(live.buffers()))
        self.n_averaged += 1
