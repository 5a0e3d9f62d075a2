"""The CUDA-only breakers, tested as logic on the CPU: the device a torchrun rank takes, one
CUDA RNG state per rank in the train state, the fp16 loss scale across a resume, data
prepared on rank 0 first, and what train.deterministic sets."""

import pytest
import torch

from ncmcli.runs import trainstate
from ncmcli.errors import ConfigError, UsageError
from ncmcli.config.presets import resolve
from ncmcli.runtime import torchrun_device


def test_torchrun_honours_cuda_n_and_never_falls_back_silently():
    assert torchrun_device("cuda:1", 0, True, 4) == (torch.device("cuda", 1), "nccl")
    assert torchrun_device("cuda:1", 2, True, 4) == (torch.device("cuda", 3), "nccl")  # rank r on N + r
    assert torchrun_device("cuda", 1, True, 2) == (torch.device("cuda", 1), "nccl")
    assert torchrun_device("auto", 0, True, 1) == (torch.device("cuda", 0), "nccl")
    assert torchrun_device("auto", 3, False, 0) == (torch.device("cpu"), "gloo")
    assert torchrun_device("cpu", 1, True, 8) == (torch.device("cpu"), "gloo")
    with pytest.raises(UsageError, match="needs cuda:4"):
        torchrun_device("cuda:3", 1, True, 4)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        torchrun_device("cuda:0", 0, False, 0)
    with pytest.raises(UsageError, match="use auto, cpu, cuda or cuda:N"):
        torchrun_device("cuda:x", 0, True, 1)


def _state(**kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    base = dict(progress=trainstate.Progress(epoch=1), optimizer=opt.state_dict(), scheduler=None,
                data_rng=torch.Generator().get_state(), torch_rng=torch.get_rng_state())
    base.update(kw)
    return trainstate.TrainState(**base)


def _roundtrip(tmp_path, state):
    from safetensors.torch import save_file

    tensors, meta = trainstate.pack(state)
    path = tmp_path / "last.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "ncm-checkpoint", "format_version": "1", "train_state": meta})
    return trainstate.unpack(path)


def test_one_cuda_rng_state_per_rank_and_each_rank_takes_its_own(tmp_path):
    states = [torch.randint(0, 255, (16,), dtype=torch.uint8, generator=torch.Generator().manual_seed(r))
              for r in range(12)]
    back = _roundtrip(tmp_path, _state(cuda_rng=states))
    assert len(back.cuda_rng) == 12 and all(torch.equal(a, b) for a, b in zip(states, back.cuda_rng))  # 10 after 9
    assert torch.equal(trainstate.rng_for_rank(back.cuda_rng, 11), states[11])
    assert trainstate.rng_for_rank(back.cuda_rng, 12) is None  # resumed with more ranks: a fresh RNG, no IndexError
    assert trainstate.rng_for_rank([], 0) is None  # written on the CPU, resumed on a GPU


def test_the_fp16_loss_scale_survives_a_resume(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    for _ in range(4):  # a few steps move the growth tracker and the scale
        opt.zero_grad()
        scaler.scale((w * w).sum()).backward()
        scaler.step(opt)
        scaler.update()
    back = _roundtrip(tmp_path, _state(scaler=scaler.state_dict()))
    fresh = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(back.scaler)
    assert fresh.get_scale() == scaler.get_scale() != 65536.0
    assert fresh.state_dict() == scaler.state_dict()
    assert _roundtrip(tmp_path, _state()).scaler is None  # fp32 runs store none


def _rank(rank, folder, results):
    import torch.distributed as dist

    from ncmcli.runtime import rank0_first

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    marker = folder / "prepared"

    def prepare():
        existed = marker.exists()
        if rank == 0:
            import time

            time.sleep(0.5)  # a slow download: rank 1 must not start before it ends
            marker.write_text("done")
        return existed

    try:
        (folder / f"rank{rank}").write_text(str(rank0_first(prepare)))
    finally:
        dist.destroy_process_group()


def test_data_is_prepared_on_rank_0_first(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_rank, args=(tmp_path, None), nprocs=2, start_method="spawn", join=True)
    assert (tmp_path / "rank0").read_text() == "False"  # rank 0 found nothing prepared
    assert (tmp_path / "rank1").read_text() == "True"  # rank 1 started after rank 0 had finished


def test_deterministic_sets_cublas_or_refuses_by_name():
    from ncmcli.train.setup import deterministic_setup

    env = {}
    deterministic_setup(resolve("quickstart", ["train.deterministic=true"]), "cuda", env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    env = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    deterministic_setup(resolve("quickstart", ["train.deterministic=true"]), "cuda", env)
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the user's own setting stays
    env = {}
    deterministic_setup(resolve("quickstart", ["train.deterministic=true"]), "cpu", env)
    assert env == {}
    with pytest.raises(ConfigError, match="adaptive_avg_pool2d"):
        deterministic_setup(resolve("quickstart", ["train.deterministic=true", "model.arch=resnet18-cifar"]), "cuda", {})


def test_cuda_rng_states_restore_in_numeric_order(tmp_path):
    from safetensors.torch import save_file

    from ncmcli.runs import ckfile, trainstate

    state = trainstate.TrainState(trainstate.Progress(), {"state": {}, "param_groups": []}, None,
                                  torch.zeros(3, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8),
                                  [torch.full((2,), i, dtype=torch.uint8) for i in range(12)])
    tensors, meta = trainstate.pack(state)
    path = tmp_path / "last.safetensors"
    save_file(tensors, str(path), metadata={"train_state": meta, "format": ckfile.FORMAT,
                                            "format_version": str(ckfile.FORMAT_VERSION)})
    back = trainstate.unpack(path)
    assert [int(t[0]) for t in back.cuda_rng] == list(range(12))
