"""ncmcli/train/loop.py: the step loop makes no host<->device transfer and no host sync between its log reads.

CPU tests cannot see CUDA's streams, so a TorchFunctionMode keeps the books instead: tensors
made on the host (from Python data, a CPU generator, or only from other host tensors,
without ``device=``) are host tensors; everything else (the split, the weights, gradients,
whatever is computed from them) counts as device tensors. On CUDA, each of these events
would copy or wait:

- a transfer: ``.to(device)`` or ``copy_`` of a host tensor, ``torch.tensor(data, device=)``,
  or a host tensor of more than one element mixed into an op on device tensors;
- a sync: ``item``, ``tolist``, ``bool``/``float``/``int``, ``cpu``, ``numpy`` of a device
  tensor, and ops whose output size depends on the data (``nonzero``, ``unique``,
  ``bincount``, ``masked_select``).

Every step but the last (whose log read and epoch end are the loop's one sync point) must
count zero of both.
"""

import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ncmcli.config.presets import resolve
from ncmcli.train.loop import train
from ncmcli.train.reporter import Reporter

SYNCS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.nonzero,
    torch.Tensor.nonzero,
    torch.unique,
    torch.Tensor.unique,
    torch.bincount,
    torch.Tensor.bincount,
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.equal,
    torch.Tensor.equal,
}
FROM_DATA = {torch.tensor, torch.as_tensor, torch.from_numpy}


class HostDeviceBooks(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.host: dict[int, weakref.ref] = {}  # id -> weak reference (tensors compare by value)
        self.step = 0
        self.events: list[tuple[int, str, str]] = []  # (step, kind, function)

    def _is_host(self, t) -> bool:
        ref = self.host.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        host_in = [t for t in tensors if self._is_host(t)]
        device_in = [t for t in tensors if not self._is_host(t)]
        name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
        to_device = func in (torch.Tensor.to, torch.Tensor.cuda) and (
            "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:])
        )
        if func in SYNCS and device_in:
            self.events.append((self.step, "sync", name))
        elif to_device and host_in:
            self.events.append((self.step, "transfer", name))
        elif func in FROM_DATA and "device" in kwargs:
            self.events.append((self.step, "transfer", name))
        elif func is torch.Tensor.copy_ and device_in[:1] and args and not self._is_host(args[0]) and host_in:
            self.events.append((self.step, "transfer", name))
        elif device_in and any(t.numel() > 1 for t in host_in):
            self.events.append((self.step, "transfer", f"{name} (a host tensor mixed in)"))
        out = func(*args, **kwargs)
        made_on_host = (not device_in) and "device" not in kwargs and not to_device
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                if made_on_host:
                    self.host[id(t)] = weakref.ref(t)
                else:  # on the device now (``.to`` of a CPU tensor to the CPU returns the tensor itself)
                    self.host.pop(id(t), None)
        return out


CASES = {
    "encm-augment": ["loss.name=encm", "data.augment=true"],
    "softmax": ["loss.name=softmax"],
    "lsoftmax": ["loss.name=lsoftmax"],
    "center": ["loss.name=center"],
    "ema": ["loss.name=encm", "train.ema_decay=0.9"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_transfer_and_no_sync_inside_the_step(case, tmp_path, monkeypatch):
    from ncmcli.train import loop as training

    cfg = resolve(
        "quickstart",
        [
            "data.limit_train=192",
            "data.limit_test=32",
            "train.batch_size=32",
            "train.epochs=1",
            "train.num_threads=1",
            "train.log_every_steps=1000",
            *CASES[case],
        ],
    )
    books = HostDeviceBooks()
    built = training.build_run

    def build_and_count_steps(*a, **kw):
        run = built(*a, **kw)

        def next_step(module, inputs):
            if module.training:
                books.step += 1

        run.model.register_forward_pre_hook(next_step)
        return run

    monkeypatch.setattr(training, "build_run", build_and_count_steps)
    with books:
        train(cfg, run_dir=tmp_path, device=torch.device("cpu"), reporter=Reporter())
    steps = 192 // 32
    assert books.step == steps
    inside = [e for e in books.events if 1 <= e[0] < steps]
    assert inside == [], inside
    # The books do see what they look for: the epoch's start (step 0) copies the order and
    # draws over, and the last step reads the totals.
    assert any(kind == "transfer" for s, kind, _ in books.events if s == 0)
    assert any(kind == "sync" for s, kind, _ in books.events if s == steps)


def test_the_books_count_the_old_step_s_per_batch_copies():
    """A step written as the loop used to be (stats and draws copied per batch, a loss read
    per step) counts its events: the test can fail."""
    books = HostDeviceBooks()
    images = torch.randint(0, 255, (8, 1, 4, 4), dtype=torch.uint8)
    w = torch.randn(16, 3, requires_grad=True)
    with books:
        books.step = 1
        mean = torch.tensor([0.5], device="cpu").view(1, -1, 1, 1)  # per batch, from Python data
        flips = (torch.rand(8, generator=torch.Generator().manual_seed(0)) < 0.5).to("cpu")
        x = torch.where(flips[:, None, None, None], images.flip(3), images).float() - mean
        loss = (x.flatten(1) @ w).pow(2).mean()
        loss.item()
        counts = torch.bincount(torch.arange(8) % 3 + (x.flatten(1)[:, 0] > 1e9).long())
    names = [(kind, name.split(".")[-1].split(" ")[0]) for _, kind, name in books.events]
    assert names == [
        ("transfer", "tensor"),
        ("transfer", "to"),
        ("sync", "item"),
        ("transfer", "add"),
        ("sync", "bincount"),
    ], books.events
    assert counts.sum().item() == 8
