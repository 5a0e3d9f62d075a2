"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fake-data writers

from ncmcli.config import resolve  # noqa: E402
from ncmcli.schedules import make_optimizer  # noqa: E402
from ncmcli.training import build_from_config  # noqa: E402


def forward_flops(model, shape) -> float:
    """Multiply-adds x 2 of every conv and linear layer for one image (forward only)."""
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def lin_hook(m, inp, out):
        nonlocal total
        total += m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [m.register_forward_hook(lin_hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    model.train(was)
    for h in hooks:
        h.remove()
    return 2.0 * total


def model_only_rate(preset: str, overrides: list[str], shape, classes: int, batch: int, steps: int,
                    device="cpu", warmup: int = 2) -> float:
    """Images/s of forward + backward + SGD step on one fixed in-memory batch: the ceiling."""
    cfg = resolve(preset, overrides)
    torch.manual_seed(0)
    model, _, crit = build_from_config(cfg, classes, shape)
    model.to(device).train()
    crit.to(device).train()
    opt = make_optimizer(cfg, model, crit)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device != "cpu":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)
