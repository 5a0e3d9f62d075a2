import dataclasses
import os
import re

import pytest
import yaml
from conftest import assert_clean_error, capped
from hypothesis import given, settings
from hypothesis import strategies as st

from ncmcli.config import overrides as O
from ncmcli.config import presets as P
from ncmcli.config import schema as C
from ncmcli.config.presets import resolve
from ncmcli.errors import ConfigError


def test_defaults_are_the_papers():
    cfg = P.resolve(None)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 5e-4)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.model.dropout) == (256, 90, 0.1)
    assert cfg.optim.schedule == "plateau" and cfg.optim.lr_factor == 0.1
    assert cfg.anchors.method == "orthogonal"


def test_config_is_frozen():
    cfg = P.resolve(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_public_keys_exist():
    for key in [
        "seed",
        "data.name",
        "data.root",
        "data.augment",
        "model.arch",
        "model.dropout",
        "anchors.method",
        "loss.name",
        "loss.scale",
        "train.epochs",
        "train.batch_size",
        "optim.lr",
        "optim.momentum",
        "optim.weight_decay",
    ]:
        assert key in C.SCHEMA


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        P.resolve("quickstart", ["optim.lrr=0.1"])


def test_overrides_are_coerced_against_the_schema():
    cfg = P.resolve(
        "quickstart",
        ["optim.lr=1e-3", "train.epochs=3", "data.augment=yes", "model.dropout=0.25", "description=no"],
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3 and cfg.data.augment is True and cfg.model.dropout == 0.25
    assert cfg.description == "no"  # on the command line a string stays a string


def test_yaml_quirks_are_coerced(tmp_path):
    # PyYAML reads 1e-3 as the string '1e-3' and 'no' as False.
    assert yaml.safe_load("x: 1e-3")["x"] == "1e-3"
    p = tmp_path / "p.yaml"
    p.write_text("base: quickstart\noptim:\n  lr: 1e-3\ndata:\n  augment: no\ntrain:\n  epochs: 2.0\n")
    cfg = P.resolve(str(p))
    assert cfg.optim.lr == 0.001 and cfg.data.augment is False and cfg.train.epochs == 2
    p.write_text("loss:\n  name: no\n")
    with pytest.raises(ConfigError, match="quote"):
        P.resolve(str(p))


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("train.epochs=abc", "expected int"),
        ("train.epochs=1.5", "expected int"),
        ("optim.lr=fast", "expected float"),
        ("data.augment=maybe", "expected bool"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("model.dropout=1", "dropout must be in [0, 1)"),
        ("train.batch_size=0", "batch_size"),
        ("loss.name=arcface", "loss.name"),
        ("data.name=imagenet", "data.name"),
        ("optim.lr=nan", "finite"),
        ("noequals", "key.sub=value"),
        ("model=3", "unknown key 'model'"),
    ],
)
def test_bad_values(override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        P.resolve("quickstart", [override])


def test_presets_extend_and_resolve():
    cfg = P.resolve("cifar10plus-cncm")
    assert cfg.data.name == "cifar10" and cfg.data.augment and cfg.loss.name == "cncm"
    assert cfg.model.arch == "cifar10" and cfg.optim.lr == 0.1


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError) as exc:
        P.resolve("cifar10-encn")
    assert "did you mean 'cifar10-encm'" in str(exc.value) and "quickstart" in str(exc.value)


def test_self_extending_preset(tmp_path):
    p = tmp_path / "loop.yaml"
    p.write_text(f"base: {p}\n")
    with pytest.raises(ConfigError, match="extends itself"):
        P.resolve(str(p))


def test_malformed_and_dangerous_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        P.resolve(str(p))
    p.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        P.resolve(str(p))
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        P.resolve(str(p))


def test_round_trip_through_dict_and_yaml():
    cfg = P.resolve("cifar100-encm", ["model.dropout=0.5", "seed=7"])
    assert O.from_dict(cfg.to_dict()) == cfg
    assert O.from_dict(yaml.safe_load(O.to_yaml(cfg))) == cfg


def test_every_preset_has_a_description():
    items = P.list_presets()
    assert len(items) >= 20
    for name, desc in items.items():
        assert desc and not desc.startswith("(broken"), name


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(C.SCHEMA)) | st.text(max_size=20), value=st.text(max_size=20))
def test_any_override_gives_a_config_or_a_clean_error(key, value):
    try:
        cfg = P.resolve(None, [f"{key}={value}"])
    except ConfigError:
        return
    assert isinstance(cfg, C.Config)


@settings(max_examples=200, deadline=None)
@given(
    tree=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda children: st.dictionaries(
            st.sampled_from(["data", "name", "lr", "optim", "train", "epochs", "x"]), children, max_size=3
        ),
        max_leaves=8,
    )
)
def test_any_tree_gives_a_config_or_a_clean_error(tree):
    try:
        cfg = O.from_dict(tree if isinstance(tree, dict) else {"seed": tree})
    except ConfigError:
        return
    assert isinstance(cfg, C.Config)


def test_setting_a_loss_key_the_loss_ignores_warns(cli):
    # a sweep over loss.scale that includes SoftMax would train identical SoftMax runs
    proc = cli(
        "train",
        "--preset",
        "quickstart-softmax",
        "--set",
        "loss.scale=4",
        "--set",
        "loss.scale=8",
        "--set",
        "loss.label_smoothing=0.1",
        "--print-config",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "warning: loss.scale has no effect on loss softmax (it is read by encm, cncm, sqncm)"
    ]
    assert "scale: 8.0" in proc.stdout  # still applied, so the config says what was asked
    quiet = cli("train", "--preset", "quickstart", "--set", "loss.scale=4", "--print-config")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_error_messages_quote_at_most_about_80_characters(tmp_path):
    huge = "y" * 100_000
    for args in (["--set", f"optim.lr={huge}"], ["--set", f"data.name={huge}"], ["--set", f"{huge}=1"]):
        proc = capped("train", "--preset", "quickstart", "--print-config", *args, timeout=30)
        assert_clean_error(proc, 2)
        assert len(proc.stderr) < 400, len(proc.stderr)
    with pytest.raises(ConfigError) as exc:
        resolve("quickstart", [f"model.arch={huge}"])
    assert len(str(exc.value)) < 400


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--set", f"seed={2**63}"], "seed must be in"),
        (["--set", "seed=-1"], "seed must be in"),
        (["--set", f"train.num_threads={(os.cpu_count() or 1) + 1}"], "train.num_threads"),
        (["--set", "model.arch=resnet9000"], "model.arch"),
        (["--set", "model.feature_dim=70000"], "model.feature_dim"),
    ],
)
def test_config_bounds_are_checked_when_the_config_is_resolved(args, fragment):
    assert_clean_error(
        capped("train", "--preset", "quickstart", "--print-config", *args, timeout=30), 2, fragment
    )
