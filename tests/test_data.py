import numpy as np
import pytest
import torch
from helpers_data import make_cifar, make_folder, make_mnist

from ncmcli.config.presets import resolve
from ncmcli.config.schema import DataConfig
from ncmcli.data.augment import augment, draw_augment
from ncmcli.data.batching import batches, channel_stats, normalize
from ncmcli.data.datasets import load_dataset
from ncmcli.data.sources import DEBIAN_FASHION_DIR
from ncmcli.data.subsets import imbalance_counts, imbalanced_indices
from ncmcli.errors import ConfigError, DataError

CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # Cao et al.'s CIFAR-10-LT, 12,406


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files(tmp_path, compress):
    ref = make_mnist(tmp_path, compress=compress)
    ds = load_dataset(DataConfig(name="mnist", root=str(tmp_path), download=False))
    assert ds.train.images.shape == (30, 1, 28, 28) and ds.train.images.dtype == torch.uint8
    assert np.array_equal(ds.train.images[:, 0].numpy(), ref["train"][0])
    assert ds.test.labels.tolist() == ref["test"][1].tolist()
    assert ds.classes == [str(i) for i in range(10)]


def test_fashion_mnist_layout(tmp_path):
    make_mnist(tmp_path, folder="FashionMNIST")
    ds = load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path), download=False))
    assert ds.classes[0] == "T-shirt/top" and len(ds.train) == 30


@pytest.mark.skipif(not DEBIAN_FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist(tmp_path):
    ds = load_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path), download=False))
    assert ds.train.images.shape == (60000, 1, 28, 28) and len(ds.test) == 10000
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_pickle_format(tmp_path, kind):
    ref = make_cifar(tmp_path, kind)
    ds = load_dataset(DataConfig(name=kind, root=str(tmp_path), download=False))
    n_train = 20 if kind == "cifar10" else 4
    assert ds.train.images.shape == (n_train, 3, 32, 32) and len(ds.test) == 4
    first = ref["train"][0][0][0].reshape(3, 32, 32)  # CIFAR rows are channel-major
    assert np.array_equal(ds.train.images[0].numpy(), first)
    assert ds.test.labels.tolist() == ref["test"][0][1]
    assert len(ds.classes) == (10 if kind == "cifar10" else 100) and ds.classes[1] == "class1"


@pytest.mark.parametrize(
    "name,files",
    [
        ("mnist", "train-images-idx3-ubyte"),
        ("fashion-mnist", "t10k-labels-idx1-ubyte"),
        ("cifar10", "data_batch_1..5"),
        ("cifar100", "meta"),
    ],
)
def test_missing_data_offline_names_folder_and_files(tmp_path, name, files, monkeypatch):
    if name == "fashion-mnist":
        monkeypatch.setattr("ncmcli.data.sources.DEBIAN_FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(name=name, root=str(tmp_path), download=False))
    msg = str(exc.value)
    assert name in msg and str(tmp_path) in msg and files in msg


def test_failed_download_explains_what_to_do(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.utils as tvu

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tvu, "_urlretrieve", offline)
    with pytest.raises(DataError) as exc:
        load_dataset(DataConfig(name="mnist", root=str(tmp_path), download=True))
    msg = str(exc.value)
    assert "download failed" in msg and "Offline?" in msg and str(tmp_path / "MNIST" / "raw") in msg


def test_image_folder(tmp_path):
    make_folder(tmp_path, size=(20, 12))
    ds = load_dataset(DataConfig(name="folder", root=str(tmp_path), image_size=16, channels=1))
    assert ds.classes == ["cat", "dog", "eel"]
    assert ds.train.images.shape == (9, 1, 16, 16) and ds.test.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    rgb = load_dataset(DataConfig(name="folder", root=str(tmp_path), image_size=32))
    assert rgb.input_shape == (3, 32, 32)
    # image_size 0: the side suits the images (median shorter side 12: a multiple of 4, which
    # every net builds at, so it is kept rather than rounded up to 16).
    auto = load_dataset(DataConfig(name="folder", root=str(tmp_path)))
    assert auto.input_shape == (3, 12, 12) and any("12x12" in n for n in auto.notes)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="train/<class>"):
        load_dataset(DataConfig(name="folder", root=str(tmp_path)))
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(DataConfig(name="folder", root=str(tmp_path)))


def test_quickstart_is_balanced_and_small():
    from ncmcli.data.sources import QUICKSTART_FILE

    ds = load_dataset(DataConfig(name="quickstart"))
    assert QUICKSTART_FILE.stat().st_size <= 3_000_000
    assert torch.bincount(ds.train.labels).tolist() == [500] * 10
    assert torch.bincount(ds.test.labels).tolist() == [100] * 10
    assert ds.input_shape == (1, 28, 28)


def test_normalisation_is_zero_mean_unit_variance():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 8, 8), generator=g, dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = normalize(images, mean, std).double()
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 97, 1 << 24])
def test_channel_stats_in_chunks_equal_a_float64_reference(chunk):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (23, 3, 5, 7), generator=g, dtype=torch.uint8)
    images[:, 1] //= 3
    x = images.double() / 255
    mean, std = channel_stats(images, chunk_values=chunk)
    assert mean == pytest.approx(x.mean((0, 2, 3)).tolist(), rel=1e-12)
    assert std == pytest.approx(x.std((0, 2, 3)).tolist(), rel=1e-12)
    g_mean, g_std = channel_stats(images, per_channel=False, chunk_values=chunk)
    assert g_mean == pytest.approx([x.mean().item()] * 3, rel=1e-12)
    assert g_std == pytest.approx([x.std().item()] * 3, rel=1e-12)
    assert channel_stats(torch.full((4, 1, 3, 3), 7, dtype=torch.uint8))[1] == [1e-6]  # constant: no 0 std


def test_batched_augmentation_equals_torchvision_per_sample():
    import torchvision.transforms.v2.functional as TF

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    oy, ox, flip = draw_augment(16, torch.Generator().manual_seed(1))
    assert flip.any() and (~flip).any() and (oy != 4).any()
    out = augment(images, oy, ox, flip)
    for i in range(16):
        ref = TF.pad(images[i], [4], fill=0)  # torchvision's RandomCrop(32, padding=4)
        ref = TF.crop(ref, int(oy[i]), int(ox[i]), 32, 32)
        if flip[i]:
            ref = TF.horizontal_flip(ref)  # RandomHorizontalFlip
        assert torch.equal(out[i], ref), i


def test_batches_cover_the_split_once_and_shuffle():
    from ncmcli.data.batching import Split

    split = Split(
        torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).clone(), torch.arange(10)
    )
    g = torch.Generator().manual_seed(0)
    ys = [y for _, y in batches(split, 4, mean=[0.0], std=[1 / 255], device="cpu", generator=g)]
    assert [len(y) for y in ys] == [4, 4, 2]
    order = torch.cat(ys)
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
    x, y = next(batches(split, 10, mean=[0.0], std=[1 / 255], device="cpu"))
    assert torch.equal(x[:, 0, 0, 0], y.float())  # images stay paired with labels


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_path_trains_exactly_like_the_tensor_path(tmp_path, workers):
    """A folder decoded per batch by DataLoader workers sees the same batches, augmentation
    and normalisation as the same folder held in memory: identical weights after training."""
    from safetensors.torch import load_file

    from ncmcli.config.presets import resolve
    from ncmcli.data.batching import FileSplit
    from ncmcli.train.loop import train
    from ncmcli.train.reporter import Reporter

    make_folder(tmp_path / "imgs", per_class=12, size=(20, 20))
    results = {}
    for loader in ("tensor", "dataloader"):
        cfg = resolve(
            "quickstart",
            [
                "data.name=folder",
                f"data.root={tmp_path / 'imgs'}",
                "data.image_size=16",
                f"data.loader={loader}",
                f"data.workers={workers}",
                "data.augment=true",
                "train.epochs=2",
                "train.batch_size=8",
                "train.deterministic=true",
            ],
        )
        if loader == "dataloader":
            assert isinstance(load_dataset(cfg.data).train, FileSplit)
        run = tmp_path / loader
        run.mkdir()
        results[loader] = train(cfg, run_dir=run, device=torch.device("cpu"), reporter=Reporter())
    a, b = (
        load_file(str(tmp_path / "tensor" / "last.safetensors")),
        load_file(str(tmp_path / "dataloader" / "last.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert results["tensor"]["final"] == results["dataloader"]["final"]


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_a_sharded_file_split_keeps_one_loader_and_closes_its_workers(tmp_path):
    """Under DDP every evaluation shards the test split: the shard (and its DataLoader
    workers) is made once, not once per epoch, and close() leaves no worker behind."""
    import multiprocessing

    from ncmcli.data.batching import FileSplit, batches

    make_folder(tmp_path, per_class=4, size=(8, 8))
    split = load_dataset(DataConfig(name="folder", root=str(tmp_path), loader="dataloader", workers=2)).test
    assert isinstance(split, FileSplit)
    seen = []
    for _ in range(3):  # three "epochs" of evaluation on rank 1 of 2
        part = split.shard(1, 2)
        seen.append(sum(len(y) for _, y in batches(part, 4, mean=[0.5] * 3, std=[0.25] * 3, device="cpu")))
    assert split.shard(1, 2) is part and seen == [len(part)] * 3 and len(part) == len(split) // 2
    assert multiprocessing.active_children()  # its 2 persistent workers
    split.close()
    import gc

    gc.collect()
    for child in multiprocessing.active_children():
        child.join(timeout=10)
    assert multiprocessing.active_children() == []


def test_data_workers_default_to_the_cores_shared_among_local_ranks(monkeypatch):
    import os

    from ncmcli.data.sources import worker_count

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    assert worker_count(-1, {}) == 12 and worker_count(-1, {"LOCAL_WORLD_SIZE": "4"}) == 3
    assert worker_count(-1, {"LOCAL_WORLD_SIZE": "32"}) == 1 and worker_count(3, {}) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert worker_count(-1, {}) == 16 and worker_count(0, {}) == 0
    assert DataConfig().workers == -1


def test_auto_loader_follows_the_memory_budget(tmp_path):
    from ncmcli.data.batching import FileSplit, Split

    make_folder(tmp_path, per_class=2, size=(8, 8))
    small = load_dataset(DataConfig(name="folder", root=str(tmp_path), loader="auto", memory_budget_gb=1.0))
    tiny_budget = load_dataset(
        DataConfig(name="folder", root=str(tmp_path), loader="auto", memory_budget_gb=1e-9)
    )
    assert isinstance(small.train, Split) and isinstance(tiny_budget.train, FileSplit)
    assert tiny_budget.input_shape == (3, 8, 8)  # the images' own side (image_size 0)


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_folder_with_val_and_no_test_trains_with_a_note(tmp_path, ncm):
    import shutil

    make_folder(tmp_path / "ab", classes=("ants", "bees"), per_class=6, size=(28, 28), mode="L")
    shutil.move(str(tmp_path / "ab" / "test"), str(tmp_path / "ab" / "val"))
    (tmp_path / "ab" / "train" / "ants" / "placeholder.gif").write_bytes(b"GIF89a")
    proc = ncm(
        "train",
        "--preset",
        "folder",
        "--set",
        f"data.root={tmp_path / 'ab'}",
        "--set",
        "train.epochs=1",
        "--set",
        "data.val_split=0",
        "--out",
        tmp_path / "run",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert "val/ is the held-out split" in proc.stderr
    assert "skipped 1 files that are not images (1 .gif)" in proc.stderr
    assert "grayscale images: 1 channel" in proc.stderr
    assert "median shorter side is 28 px" in proc.stderr  # 28 kept, not rounded to 32
    from ncmcli.runs import checkpoint

    assert checkpoint.load(tmp_path / "run" / "best.safetensors").input_shape == (1, 28, 28)
    # data.extensions reads the .gif too (and fails on it, being no image: a clear error)
    proc = ncm(
        "train",
        "--preset",
        "folder",
        "--set",
        f"data.root={tmp_path / 'ab'}",
        "--set",
        "data.extensions=png",
        "--set",
        "data.test_dir=val",
        "--set",
        "train.epochs=1",
        "--set",
        "data.val_split=0",
        "--out",
        tmp_path / "r2",
    )
    assert proc.returncode == 0 and "skipped 1 files" in proc.stderr, proc.stderr


def test_folder_layout_errors_say_what_is_there(tmp_path, cli):
    from conftest import assert_clean_error

    assert_clean_error(
        cli("train", "--preset", "folder", "--set", f"data.root={tmp_path / 'nope'}"), 1, "does not exist"
    )
    (tmp_path / "f" / "train" / "a").mkdir(parents=True)
    (tmp_path / "f" / "holdout").mkdir()
    proc = cli("train", "--preset", "folder", "--set", f"data.root={tmp_path / 'f'}")
    assert_clean_error(proc, 1, "it holds holdout/, train/")
    assert_clean_error(
        cli(
            "train",
            "--preset",
            "folder",
            "--set",
            f"data.root={tmp_path / 'f'}",
            "--set",
            "data.test_dir=elsewhere",
        ),
        1,
        "data.test_dir=elsewhere",
    )


def test_first_decode_is_announced_before_the_wait(tmp_path, monkeypatch):
    from ncmcli.data import datasets as data
    from ncmcli.data import foldercache

    make_folder(tmp_path / "f", per_class=2, size=(16, 16))
    said, real = [], foldercache.decode_all

    def decode(*a, **k):
        said.append("decode started")
        return real(*a, **k)

    monkeypatch.setattr(foldercache, "decode_all", decode)
    monkeypatch.setenv("NCM_CACHE", str(tmp_path / "cache"))
    from ncmcli.config.presets import resolve

    cfg = resolve("folder", [f"data.root={tmp_path / 'f'}"]).data
    data.load_dataset(cfg, say=said.append)
    assert said[0].startswith("decoding 6 images of") and said[1] == "decode started"
    said.clear()
    data.load_dataset(cfg, say=said.append)  # cached now: nothing to announce
    assert said == []


@pytest.mark.slow
def test_data_classes_filters_every_split_and_names_the_valid_ones(tmp_path, ncm):
    from conftest import assert_clean_error

    from ncmcli.config.presets import resolve
    from ncmcli.data.datasets import load_dataset

    make_folder(tmp_path / "f", classes=("ant", "bee", "cat", "dog"), per_class=3, size=(12, 12))
    ds = load_dataset(
        resolve("folder", [f"data.root={tmp_path / 'f'}", "data.classes=dog,1", "data.val_split=0"]).data
    )
    assert ds.classes == ["bee", "dog"]  # original order, relabelled 0..k-1
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    q = load_dataset(resolve("quickstart", ["data.classes=0,1,2,4,5,9", "data.limit_train=600"]).data)
    assert len(q.classes) == 6 and len(q.train) == 600 and q.test.labels.max().item() == 5
    proc = ncm("train", "--preset", "quickstart", "--set", "data.classes=Trousr,3")
    assert_clean_error(proc, 2, "did you mean 'Trouser'")
    assert "T-shirt/top" in proc.stderr
    assert_clean_error(
        ncm("train", "--preset", "quickstart", "--set", "data.classes=3"), 2, "at least 2 classes"
    )


@pytest.mark.slow
def test_training_on_a_per_batch_folder_stops_its_workers(tmp_path, monkeypatch):
    """train() closes the splits it read per batch on its way out (a collected DataLoader
    waits out a join timeout per worker instead): every FileSplit it built is closed."""
    from ncmcli.config.presets import resolve
    from ncmcli.data import batching
    from ncmcli.train.loop import train
    from ncmcli.train.reporter import Reporter

    closed, real = [], batching.FileSplit.close
    monkeypatch.setattr(batching.FileSplit, "close", lambda self: (closed.append(id(self)), real(self))[1])
    make_folder(tmp_path / "imgs", per_class=6, size=(20, 20))
    cfg = resolve(
        "quickstart",
        [
            "data.name=folder",
            f"data.root={tmp_path / 'imgs'}",
            "data.image_size=16",
            "data.loader=dataloader",
            "data.workers=1",
            "train.epochs=1",
            "train.batch_size=8",
        ],
    )
    made = []
    real_to = batching.FileSplit.to

    def to(self, device):
        moved = real_to(self, device)
        made.append(id(moved))
        return moved

    monkeypatch.setattr(batching.FileSplit, "to", to)
    train(cfg, run_dir=tmp_path / "run", device=torch.device("cpu"), reporter=Reporter())
    assert made and set(made) <= set(closed)


def test_exp_profile_matches_cao_et_al_on_cifar10_shaped_labels():
    labels = torch.arange(10).repeat_interleave(5000)[
        torch.randperm(50000, generator=torch.Generator().manual_seed(3))
    ]
    idx = imbalanced_indices(labels, 10, "exp", 100.0, seed=0)
    counts = torch.bincount(labels[idx], minlength=10).tolist()
    assert counts == CIFAR10_LT_100 and len(idx) == 12406
    assert imbalance_counts(5000, 10, "exp", 100.0) == CIFAR10_LT_100
    # Seeded: the same seed picks the same images, another seed others.
    assert torch.equal(idx, imbalanced_indices(labels, 10, "exp", 100.0, seed=0))
    assert not torch.equal(idx, imbalanced_indices(labels, 10, "exp", 100.0, seed=1))
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == len(idx)


def test_step_profile_and_small_classes():
    assert imbalance_counts(1000, 10, "step", 10.0) == [1000] * 5 + [100] * 5
    assert imbalance_counts(1000, 5, "step", 4.0) == [1000, 1000, 250, 250, 250]
    # A class with fewer images than its share keeps them all; none vanishes.
    labels = torch.tensor([0] * 100 + [1] * 3 + [2] * 50)
    counts = torch.bincount(labels[imbalanced_indices(labels, 3, "exp", 1000.0)], minlength=3).tolist()
    assert counts == [100, 3, 1]


def test_imbalance_config_is_checked():
    assert resolve("quickstart", ["data.imbalance=exp:100"]).data.imbalance == "exp:100"
    for bad in ("exp", "exp:0.5", "log:10", "step:x", "exp:1e9"):
        with pytest.raises(ConfigError, match="data.imbalance"):
            resolve("quickstart", [f"data.imbalance={bad}"])
    with pytest.raises(ConfigError, match="logit_adjust applies"):
        resolve("quickstart", ["loss.name=hinge", "loss.logit_adjust=1"])


def test_imbalance_applies_after_limit_and_before_a_stratified_validation_split():
    from ncmcli.data.datasets import load_dataset

    cfg = resolve("quickstart", ["data.limit_train=2000", "data.imbalance=exp:10", "data.val_split=0.1"]).data
    ds = load_dataset(cfg)
    total = [a + b for a, b in zip(ds.train_counts, torch.bincount(ds.val.labels, minlength=10).tolist())]
    assert total == imbalance_counts(200, 10, "exp", 10.0)  # n_max = the largest class after the limit
    val = torch.bincount(ds.val.labels, minlength=10).tolist()
    assert sum(val) == round(0.1 * sum(total)) and val[0] > val[-1]  # stratified: the tail stays a tail
    assert (
        torch.bincount(ds.test.labels, minlength=10).tolist() == [100] * 10
    )  # the test split stays balanced
    assert any("long-tailed (exp:10" in n for n in ds.notes)
