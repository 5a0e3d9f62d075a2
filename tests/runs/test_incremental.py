"""Class-incremental training: pre-allocated anchor slots, --extend, replay memory, tasks."""

import json
import math

import pytest
import torch
from conftest import StopAfter, assert_clean_error
from safetensors import safe_open
from safetensors.torch import load_file

from ncmcli.config.presets import resolve
from ncmcli.data import replay
from ncmcli.data.batching import Split
from ncmcli.nn.anchors import make_anchors
from ncmcli.nn.floors import slot_floor
from ncmcli.nn.losses import NCMLoss
from ncmcli.nn.slots import assign_slots, grow_head
from ncmcli.train.loop import train
from ncmcli.train.reporter import Reporter
from ncmcli.train.stopping import Interrupted

SMALL = [
    "data.limit_train=400",
    "data.limit_test=200",
    "train.batch_size=50",
    "train.num_threads=1",
    "train.epochs=1",
    "train.deterministic=true",
]


def _train(tmp, name, over, *, extend=None, resume=False, stop=None):
    cfg = resolve("quickstart", SMALL + list(over))
    run = tmp / name
    run.mkdir(exist_ok=True)
    return train(
        cfg,
        run_dir=run,
        device=torch.device("cpu"),
        reporter=Reporter(),
        extend=extend,
        resume=resume,
        stop=stop,
    )


# -- Slots and the loss, against references


def _farthest_by_hand(a, used, count):
    a = a.double()
    used, out = list(used), []
    for _ in range(count):
        best, pick = -1.0, None
        for i in range(len(a)):
            if i in used:
                continue
            gap = min(float((a[i] - a[j]).norm()) for j in used) if used else 0.0
            if gap > best + 1e-9:
                best, pick = gap, i
        used.append(pick)
        out.append(pick)
    return out


def test_new_classes_take_the_free_slot_farthest_from_the_used_ones():
    ortho = make_anchors("orthogonal", 10, 16)
    assert assign_slots(ortho, [], 3) == [0, 1, 2]  # equiangular: every free slot ties, lowest first
    assert assign_slots(ortho, [0, 1], 2) == [2, 3]
    crowded = make_anchors("optimized", 12, 3, seed=1)  # not equiangular: the choice matters
    for used in ([], [0], [4, 7]):
        assert assign_slots(crowded, used, 4) == _farthest_by_hand(crowded, used, 4)
    with pytest.raises(ValueError, match="2 of the 10 are free"):
        assign_slots(ortho, list(range(8)), 3)


@pytest.mark.parametrize("free", ["softmax", "masked"])
def test_slot_loss_matches_a_per_sample_float64_loop(free):
    torch.manual_seed(0)
    slots = make_anchors("random", 7, 5, seed=3).double()
    class_slots = torch.tensor([3, 0, 5])
    crit = NCMLoss(slots, scale=2.5, class_slots=class_slots, free_slots=free).double()
    f = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    rows = range(7) if free == "softmax" else class_slots.tolist()
    ref = 0.0
    for i in range(6):
        num = math.exp(-2.5 * float((f.detach()[i] - slots[class_slots[y[i]]]).norm()))
        den = sum(math.exp(-2.5 * float((f.detach()[i] - slots[j]).norm())) for j in rows)
        ref += -math.log(num / den) / 6
    assert crit(f, y).item() == pytest.approx(ref, rel=1e-10)
    assert torch.autograd.gradcheck(lambda x: crit(x, y), (f,))
    # Logits, distances and predictions cover the classes in use only, in class order.
    assert crit.logits(f).shape == (6, 3)
    torch.testing.assert_close(crit.anchors.double(), slots[class_slots])


def test_prediction_never_returns_a_free_slot_even_for_a_feature_on_one():
    slots = make_anchors("orthogonal", 10, 10)
    crit = NCMLoss(slots, class_slots=torch.tensor([0, 1, 2, 3]))
    on_free = slots[4:]  # features exactly on each unused anchor
    pred = crit.predict(torch.cat([on_free, torch.randn(500, 10)]))
    assert pred.max().item() <= 3 and crit.logits(on_free).shape == (6, 4)


def test_slot_floor_is_the_loss_with_each_feature_on_its_anchor():
    slots = make_anchors("optimized", 9, 4, seed=2)
    class_slots = torch.tensor([2, 5, 7])
    crit = NCMLoss(slots, scale=3.0, class_slots=class_slots)
    on_anchor = crit(slots[class_slots].double(), torch.arange(3)).item()
    assert slot_floor(slots, class_slots, "euclidean", 3.0) == pytest.approx(on_anchor, rel=1e-6)
    assert crit.loss_floor() == pytest.approx(on_anchor, rel=1e-6)


def test_a_grown_head_keeps_its_old_rows_and_initialises_the_new_ones():
    from ncmcli.nn.losses import SoftmaxLoss

    torch.manual_seed(0)
    old = SoftmaxLoss(8, 3)
    torch.manual_seed(1)
    new = SoftmaxLoss(8, 5)
    fresh = new.fc.weight.detach().clone()
    assert sorted(grow_head(old, new, 3)) == ["fc.bias", "fc.weight"]
    assert torch.equal(new.fc.weight[:3], old.fc.weight) and torch.equal(new.fc.bias[:3], old.fc.bias)
    assert torch.equal(new.fc.weight[3:], fresh[3:])
    f = torch.randn(4, 8)
    torch.testing.assert_close(new.logits(f)[:, :3], old.logits(f))  # old classes score as before


# -- The whole path: train 2 classes in 10 slots, extend with 2 more


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("incremental")
    first = _train(tmp, "t1", ["anchors.slots=10", "data.classes=0,1", "train.replay=60", "loss.scale=auto"])
    second = _train(
        tmp,
        "t2",
        ["anchors.slots=10", "data.classes=Pullover,3", "train.replay=60", "loss.scale=auto"],
        extend=tmp / "t1",
    )
    return tmp, first, second


def test_extend_keeps_old_anchors_bit_identical_and_gives_new_classes_free_slots(two_tasks):
    tmp, _, second = two_tasks
    a, b = load_file(str(tmp / "t1" / "best.safetensors")), load_file(str(tmp / "t2" / "best.safetensors"))
    assert torch.equal(a["criterion.slot_anchors"], b["criterion.slot_anchors"])  # every slot, bit for bit
    assert torch.equal(b["anchors"][:2], a["anchors"])
    old, new = a["criterion.class_slots"].tolist(), b["criterion.class_slots"].tolist()
    assert old == [0, 1] and new[:2] == old and set(new[2:]).isdisjoint(old) and len(set(new)) == 4
    assert torch.equal(b["anchors"], b["criterion.slot_anchors"][b["criterion.class_slots"]])
    with safe_open(str(tmp / "t2" / "best.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["tasks"]) == [["T-shirt/top", "Trouser"], ["Pullover", "Dress"]]
    sha = second["parent"]["sha256"]
    import hashlib

    assert sha == hashlib.sha256((tmp / "t1" / "best.safetensors").read_bytes()).hexdigest()
    assert second["parent"]["path"] == str((tmp / "t1" / "best.safetensors").resolve())


def test_eval_json_lists_the_tasks_and_predict_only_the_classes_in_use(two_tasks, cli):
    tmp, _, _ = two_tasks
    proc = cli("eval", tmp / "t2", "--json")
    assert proc.returncode == 0, proc.stderr
    ev = json.loads(proc.stdout)
    tasks = ev["tasks"]
    assert [t["classes"] for t in tasks] == [["T-shirt/top", "Trouser"], ["Pullover", "Dress"]]
    assert [t["new"] for t in tasks] == [False, True] and sum(t["n"] for t in tasks) == ev["n"]
    conf = torch.tensor(ev["confusion"], dtype=torch.float64)  # the per-task accuracy, by hand
    for task, rows in zip(tasks, ([0, 1], [2, 3])):  # right among all four classes, over the task's images
        hits = sum(conf[r, r].item() for r in rows)
        assert task["accuracy"] == pytest.approx(hits / conf[rows].sum().item())
    assert ev["classes"] == ["T-shirt/top", "Trouser", "Pullover", "Dress"]
    from ncmcli.runs import checkpoint

    ck = checkpoint.load(tmp / "t2" / "best.safetensors")
    x = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8)
    from ncmcli.data.batching import normalize

    with torch.no_grad():
        pred = ck.criterion.predict(ck.model(normalize(x, ck.mean, ck.std)))
    assert pred.max().item() < 4 and len(ck.criterion.slot_anchors) == 10


def test_replay_memory_is_balanced_seeded_and_safetensors(two_tasks):
    tmp, first, second = two_tasks
    path = tmp / "t2" / "replay.safetensors"
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header (u64 length, then JSON), not a pickle
    mem = replay.load(path, (1, 28, 28))
    assert mem.classes == ["T-shirt/top", "Trouser", "Pullover", "Dress"]
    assert torch.bincount(mem.labels, minlength=4).tolist() == [15, 15, 15, 15]  # 60 // 4 each
    assert second["replay"]["kept"]["from_parent_memory"] == 30
    assert second["replay"]["mixed_in"]["per_class"] == {"T-shirt/top": 30, "Trouser": 30}
    assert first["replay"]["kept"]["per_class"] == {"T-shirt/top": 30, "Trouser": 30}
    # The old classes' images in the new memory come from the parent's memory.
    parent = replay.load(tmp / "t1" / "replay.safetensors", (1, 28, 28))
    parent_rows = {bytes(img.numpy()) for img in parent.images}
    assert all(bytes(img.numpy()) in parent_rows for img in mem.images[mem.labels < 2])
    # Seeded: the same seed picks the same images, another seed others.
    pool = Split(
        torch.arange(200, dtype=torch.uint8).view(200, 1, 1, 1).expand(200, 1, 2, 2).contiguous(),
        torch.arange(200) % 4,
    )
    a = replay.select(pool, list("abcd"), 40, seed=0)
    assert torch.equal(a.images, replay.select(pool, list("abcd"), 40, seed=0).images)
    assert not torch.equal(a.images, replay.select(pool, list("abcd"), 40, seed=1).images)
    assert torch.bincount(a.labels).tolist() == [10, 10, 10, 10]


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_extend_refuses_a_mismatched_net_other_anchors_and_no_free_slot(two_tasks, ncm, tmp_path):
    tmp, _, _ = two_tasks
    base = [
        "train",
        "--preset",
        "quickstart",
        "--extend",
        str(tmp / "t1"),
        "--set",
        "data.classes=4,5",
        "--set",
        "train.epochs=1",
        "--set",
        "data.limit_train=100",
        "--runs",
        str(tmp_path),
    ]
    cases = [
        (["--set", "anchors.slots=10", "--set", "model.arch=small"], "model.arch is tiny"),
        (["--set", "anchors.slots=10", "--set", "anchors.method=simplex"], "anchors.method is orthogonal"),
        (["--set", "anchors.slots=12"], "anchors.slots is 10"),
    ]
    for extra, fragment in cases:
        assert_clean_error(ncm(*base, *extra), 2, fragment)
    full = _train(tmp_path, "full", ["data.classes=0,1"])  # no spare slot: 2 classes in 2 anchors
    proc = ncm(*base[:3], "--extend", full["run_dir"], *base[5:])
    assert_clean_error(proc, 2, "no free anchor slot left")
    assert "anchors.slots" in proc.stderr
    proc = ncm(*base, "--set", "anchors.slots=10", "--set", "data.classes=Trouser,5")
    assert_clean_error(proc, 2, "already a class of the checkpoint")
    assert list(tmp_path.glob("quickstart-*")) == []  # refused runs leave no folder


def test_a_softmax_head_grows_and_an_extended_run_resumes_exactly(tmp_path):
    over = ["loss.name=softmax", "optim.schedule=plateau", "train.epochs=2"]
    _train(tmp_path, "p", over + ["data.classes=0,1,2", "train.epochs=1"])
    straight = _train(tmp_path, "s", over + ["data.classes=3,4"], extend=tmp_path / "p")
    with pytest.raises(Interrupted):
        _train(tmp_path, "r", over + ["data.classes=3,4"], extend=tmp_path / "p", stop=StopAfter(10))
    resumed = _train(tmp_path, "r", over + ["data.classes=3,4"], resume=True)
    a, b = (
        load_file(str(tmp_path / "s" / "last.safetensors")),
        load_file(str(tmp_path / "r" / "last.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["criterion.fc.weight"].shape == (5, 32)
    assert straight["tasks"][-1]["classes"] == ["Dress", "Coat"] == resumed["tasks"][-1]["classes"]
    assert resumed["parent"] == straight["parent"]


def test_replay_without_a_parent_memory_is_a_config_error(tmp_path):
    from ncmcli.errors import ConfigError

    _train(tmp_path, "p", ["anchors.slots=4", "data.classes=0,1"])
    with pytest.raises(ConfigError, match="has no replay.safetensors"):
        _train(
            tmp_path, "c", ["anchors.slots=4", "data.classes=2,3", "train.replay=10"], extend=tmp_path / "p"
        )


@pytest.mark.slow  # over 7 s: subprocess runs of the CLI (the full suite runs it)
def test_the_guides_two_step_example_runs(tmp_path, ncm):
    from pathlib import Path

    section = (Path(__file__).resolve().parents[2] / "docs" / "guides" / "adding-classes.md").read_text()
    block = section[section.index("```sh") + 5 :]
    commands = [line.split() for line in block[: block.index("```")].strip().splitlines()]
    assert [c[:2] for c in commands] == [["ncm", "train"], ["ncm", "train"], ["ncm", "eval"]]
    for argv in commands:
        proc = ncm(*argv[1:], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    tasks = json.loads(proc.stdout)["tasks"]
    assert [t["classes"] for t in tasks] == [["T-shirt/top", "Trouser"], ["Pullover", "Dress"]]
    assert (tmp_path / "runs" / "task2" / "replay.safetensors").is_file()


def test_auto_scale_reads_every_slot_and_result_json_reports_the_slot_floor(two_tasks):
    from ncmcli.nn.floors import scale_for_floor

    _, first, second = two_tasks
    slots = make_anchors("orthogonal", 10, 32)
    assert first["scale"]["initial"] == pytest.approx(scale_for_floor(slots, "euclidean", 0.1))
    assert second["scale"]["initial"] == first["scale"]["value"]  # every task at the parent's scale
    # The floor with both used classes on their anchors and all 10 slots in the softmax: 0.1.
    assert (
        first["scale"]["floor"]
        == pytest.approx(0.1, rel=1e-6)
        == pytest.approx(first["loss_floor"], rel=1e-6)
    )
