"""Where training runs: device selection and torchrun's process group (DDP set-up and
tear-down). The commands call these; training and evaluation ask ``dist_info``."""

from __future__ import annotations

import torch

from ncmcli.errors import UsageError


def pick_device(name: str = "auto"):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    bad = UsageError(f"unknown device {name[:80]!r}; use auto, cpu, cuda, cuda:N or mps")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise bad from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise bad
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for, but MPS is not available")
    return dev


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def setup_distributed(device: str):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU)
    and return (device, rank, world); otherwise (pick_device(device), 0, 1)."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return pick_device(device), 0, 1
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    available = torch.cuda.is_available()
    dev, backend = torchrun_device(device, local, available, torch.cuda.device_count() if available else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return dev, rank, world


def torchrun_device(device: str, local_rank: int, cuda_available: bool, device_count: int):
    """(this rank's device, the process-group backend) under torchrun. ``auto`` and ``cuda``
    put local rank r on cuda:r (NCCL) when there are GPUs, else the CPU (gloo); ``cuda:N``
    starts the ranks at GPU N (rank r on cuda:N+r), so that ``--device cuda:1`` on a
    one-process run trains on GPU 1 rather than silently on the CPU; ``cpu`` is gloo."""
    if device == "cpu" or (device == "auto" and not cuda_available):
        return torch.device("cpu"), "gloo"
    if device in ("auto", "cuda"):
        first = 0
    elif device.startswith("cuda:") and device[5:].isdigit():
        first = int(device[5:])
    else:
        raise UsageError(f"--device {device[:40]!r} under torchrun: use auto, cpu, cuda or cuda:N")
    if not cuda_available:
        raise UsageError(f"--device {device} was asked for under torchrun, but no CUDA GPU is available")
    index = first + local_rank
    if index >= device_count:
        raise UsageError(
            f"--device {device} with local rank {local_rank} needs cuda:{index}, but there are only "
            f"{device_count} CUDA devices"
        )
    return torch.device("cuda", index), "nccl"


def rank0_first(fn):
    """Run ``fn`` on rank 0 first, then on the other ranks (a barrier between): data
    preparation that downloads or caches into a shared folder happens once, not racing."""
    rank, world = dist_info()
    if world > 1 and rank != 0:
        torch.distributed.barrier()
    try:
        return fn()
    finally:
        if world > 1 and rank == 0:
            torch.distributed.barrier()


def gather_rng(state: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Every rank's CUDA RNG state (a CPU byte tensor), in rank order, on every rank: the
    checkpoint (written by rank 0) keeps one per rank, so each resumes its own."""
    rank, world = dist_info()
    if world == 1:
        return [state]
    on = state.to(device) if device.type == "cuda" else state
    parts = [torch.empty_like(on) for _ in range(world)]
    torch.distributed.all_gather(parts, on)
    return [p.cpu() for p in parts]


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


def distributed_run(fn):
    """Run ``fn()`` and leave the process group afterwards, however it ends."""
    try:
        result = fn()
    except BaseException:
        teardown_distributed(ok=False)
        raise
    teardown_distributed(ok=True)
    return result
