"""Helpers shared by the benchmark scripts (not part of the package): one timing helper, one
way to take a training step (the product's own ``TrainStep``), and ``--dry-run`` sizes."""

from __future__ import annotations

import argparse
import time

import torch

from ncmcli.config.presets import resolve
from ncmcli.nn.classifier import Classifier
from ncmcli.train.schedules import make_optimizer
from ncmcli.train.step import TrainStep


def parse(description: str, **extra) -> argparse.Namespace:
    """Every benchmark takes --dry-run: tiny sizes, to prove it runs (a test does so)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes; the numbers mean nothing")
    for flag, (kind, default, text) in extra.items():
        ap.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=default, help=text)
    return ap.parse_args()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, *, reps: int, warmup: int = 1, device="cpu") -> float:
    """Seconds per call of ``fn``, after ``warmup`` calls, synchronising a GPU around the clock."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


class Trainer:
    """One training step exactly as ``ncm train`` takes it: ``TrainStep`` (net under autocast,
    criterion in fp32), backward, SGD step."""

    def __init__(
        self,
        preset: str,
        overrides: list[str],
        shape,
        classes: int,
        *,
        device="cpu",
        amp: torch.dtype | None = None,
        memory_format=torch.contiguous_format,
        compile: bool = False,
    ):
        self.cfg = resolve(preset, overrides)
        torch.manual_seed(0)
        self.model, self.crit = Classifier.from_config(self.cfg, classes, shape).parts()
        self.model.to(device).to(memory_format=memory_format).train()
        self.crit.to(device).train()
        net = torch.compile(self.model) if compile else self.model
        self.step_module = TrainStep(net, self.crit, amp, memory_format)
        self.opt = make_optimizer(self.cfg, self.model, self.crit)

    def step(self, x, y) -> torch.Tensor:
        loss, _ = self.step_module(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss


def forward_flops(model, shape) -> float:
    """Multiply-adds x 2 of every conv and linear layer for one image (forward only)."""
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        total += (
            out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        )

    def lin_hook(m, inp, out):
        nonlocal total
        total += m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [m.register_forward_hook(lin_hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *shape, device=next(model.parameters()).device))
    model.train(was)
    for h in hooks:
        h.remove()
    return 2.0 * total


def model_only_rate(
    preset: str,
    overrides: list[str],
    shape,
    classes: int,
    batch: int,
    steps: int,
    device="cpu",
    warmup: int = 2,
) -> float:
    """Images/s of training steps on one fixed in-memory batch: the ceiling for a pipeline."""
    trainer = Trainer(preset, overrides, shape, classes, device=device)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    return batch / timed(lambda: trainer.step(x, y), reps=steps, warmup=warmup, device=device)
