"""TensorBoard logs (ncmcli/runs/tblog.py) that mirror metrics.jsonl."""

import pytest
import torch

from ncmcli.config.presets import resolve


def test_tensorboard_scalars_mirror_metrics_jsonl(tmp_path):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ncmcli.train.loop import train
    from ncmcli.train.reporter import Reporter

    cfg = resolve(
        "quickstart",
        ["data.limit_train=256", "data.limit_test=64", "train.epochs=2", "train.tensorboard=true"],
    )
    train(cfg, run_dir=tmp_path, device=torch.device("cpu"), reporter=Reporter())
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/train_loss",
        "test/test_acc",
        "optim/lr",
        "optim/images_per_s",
        "features/compactness_mean_own_distance",
        "features/separation_mean_nearest_other",
    } <= tags
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [(e.step, e.value) for e in acc.Scalars("test/test_acc")]
    assert logged == [(m["epoch"], pytest.approx(m["test_acc"], abs=1e-6)) for m in lines]
