"""The shape of the package: imports flow one way, each name lives in one place, and the
docs list what the registry holds."""

import ast
import re
import subprocess
import sys
from pathlib import Path

from ncmcli import registry
from ncmcli.config import ANCHOR_METHODS, ARCH_NAMES, DATASETS, HINGE_FORMS, LOSSES, SCHEMA

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "ncmcli"

# cli -> commands -> {training, evaluation} -> {models, criteria, anchors, data, checkpoint, ...} -> config
LAYERS = {
    4: {"cli", "__main__"},
    3: {"engine", "report"},
    2: {"training", "evaluation"},
    1: {"models", "losses", "baselines", "anchors", "distances", "data", "batching", "images", "foldercache",
        "checkpoint", "trainstate", "runfiles", "runtime", "forward", "schedules", "diagnostics", "plots", "fakedata",
        "export", "tblog", "floors", "scoring", "subsets", "folders", "slots", "replay", "incremental", "rundir"},
    0: {"config", "presets", "registry", "netspecs", "errors", "__init__"},
}
LAYER_OF = {name: level for level, names in LAYERS.items() for name in names}


def _module(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("").parts
    return rel[0]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ncmcli"):
            parts = node.module.split(".")
            if len(parts) == 1:  # from ncmcli import x
                out |= {a.name for a in node.names if (PKG / f"{a.name}.py").exists() or (PKG / a.name).is_dir()}
            else:
                out.add(parts[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("ncmcli.")}
    return out


def test_every_module_has_a_layer():
    modules = {_module(p) for p in PKG.rglob("*.py")}
    assert modules <= set(LAYER_OF), modules - set(LAYER_OF)


def test_imports_never_go_upward():
    upward = []
    for path in PKG.rglob("*.py"):
        me = _module(path)
        for dep in _imports(path) - {me}:
            if LAYER_OF[dep] > LAYER_OF[me]:
                upward.append(f"{path.relative_to(REPO)} imports {dep}")
    assert not upward, upward


def test_no_import_cycle_between_losses_and_baselines():
    assert "baselines" not in _imports(PKG / "losses.py")


def test_config_registry_and_report_labels_agree():
    from ncmcli.config import LossConfig
    from ncmcli.netspecs import ARCHS, MLPS, RESNETS
    from ncmcli.report import METHOD_ORDER, dataset_label, method_label

    assert LOSSES == tuple(registry.LOSSES) and HINGE_FORMS == tuple(registry.HINGE_FORMS)
    assert ANCHOR_METHODS == tuple(registry.ANCHOR_METHODS) and DATASETS == tuple(registry.DATASETS)
    assert ARCH_NAMES == (*ARCHS, *MLPS, *RESNETS)
    labels = set()
    for name in registry.LOSSES:
        for form in registry.HINGE_FORMS:
            for m in registry.LSOFTMAX_MARGINS:
                labels.add(method_label(LossConfig(name=name, hinge_form=form, margin=m)))
    assert labels <= set(METHOD_ORDER), labels - set(METHOD_ORDER)
    from ncmcli.config import DataConfig

    assert {dataset_label(DataConfig(name=d)) for d in registry.DATASETS} == {e.label for e in registry.DATASETS.values()}


def test_every_registered_loss_builds_through_the_registry():
    import torch

    from ncmcli.config import LossConfig
    from ncmcli.losses import Criterion, build_criterion

    anchors = torch.eye(3, 4)
    for name, entry in registry.LOSSES.items():
        crit = build_criterion(LossConfig(name=name), anchors=anchors if entry.metric else None, dim=4, num_classes=3)
        assert isinstance(crit, Criterion) and crit.uses_anchors == bool(entry.metric)
        f = torch.randn(5, 4, requires_grad=True)
        crit(f, torch.tensor([0, 1, 2, 0, 1])).backward()
        assert f.grad is not None and crit.logits(f).shape == (5, 3)
        vectors, kind = crit.class_vectors()
        assert vectors is not None and vectors.shape == (3, 4) and kind


def test_loss_keys_are_exactly_what_each_builder_reads():
    """registry.LOSSES[...].keys drives the 'has no effect' warning, report columns and plot
    legends: it must list every loss_cfg field the builder reads, and nothing else."""
    import importlib
    import inspect
    import textwrap

    for name, entry in registry.LOSSES.items():
        module, func = entry.builder.split(":")
        tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(importlib.import_module(module), func))))
        read = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name) and node.value.id == "loss_cfg"}
        assert read - {"name"} == set(entry.keys), (name, read)


def test_loss_fields_a_loss_does_not_read_change_nothing():
    """Changing a field outside a loss's keys leaves its parameters and its loss untouched."""
    import dataclasses

    import torch

    from ncmcli.config import LossConfig
    from ncmcli.losses import build_criterion

    other = {"scale": 3.0, "hinge_form": "weston-watkins", "margin": 3, "lambda_base": 10.0,
             "lambda_gamma": 0.5, "lambda_power": 2.0, "lambda_min": 0.5, "center_weight": 0.5,
             "center_alpha": 0.1, "label_smoothing": 0.2, "floor_target": 0.5, "logit_adjust": 1.0,
             "free_slots": "masked"}
    fields = {f.name for f in dataclasses.fields(LossConfig)} - {"name"}
    assert set(other) == fields, "give every new LossConfig field a second value here"
    anchors = torch.nn.functional.normalize(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    f = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])

    def loss_of(cfg):
        torch.manual_seed(0)
        crit = build_criterion(cfg, anchors=anchors if registry.LOSSES[cfg.name].metric else None,
                               dim=6, num_classes=4)
        return crit(f, y).item(), {k: v.clone() for k, v in crit.state_dict().items()}

    checked = 0
    for name in registry.LOSSES:
        base_loss, base_state = loss_of(LossConfig(name=name))
        for field in sorted(fields):
            changed = LossConfig(name=name, **{field: other[field]})
            ignored = registry.loss_ignores(name, f"loss.{field}")
            assert ignored == (field not in registry.LOSSES[name].keys)
            if ignored:
                loss, state = loss_of(changed)
                assert loss == base_loss and state.keys() == base_state.keys(), (name, field)
                assert all(torch.equal(state[k], base_state[k]) for k in state), (name, field)
                checked += 1
    assert checked > 40


def test_readme_tables_list_every_registered_name():
    text = (REPO / "README.md").read_text()
    baselines = text[text.index("## Baselines"):text.index("## Speed")]
    for name in registry.LOSSES:
        assert f"`{name}`" in baselines, name
    anchors = text[text.index("### `ncm anchors`"):text.index("## Presets")]
    for name in registry.ANCHOR_METHODS:
        assert f"| `{name}` |" in anchors, name
    nets = text[text.index("## The nets"):text.index("## Development")]
    for name in ARCH_NAMES:
        assert re.search(rf"\| `{re.escape(name)}`", nets), name
    for name in registry.DATASETS:
        assert f"`{name}`" in text[text.index("| `data.name`"):], name
    for key in SCHEMA:
        assert f"`{key}`" in text, key


def test_cli_start_up_imports_no_torch():
    code = "import sys; import ncmcli.cli, ncmcli.config, ncmcli.registry; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_modules_stay_small_or_say_why():
    for path in PKG.rglob("*.py"):
        lines = path.read_text().splitlines()
        if len(lines) > 330:
            head = "\n".join(lines[:15]).lower()
            assert "long because" in head, f"{path.name}: {len(lines)} lines and no reason at its top"


def test_train_reads_at_a_glance():
    text = (PKG / "training.py").read_text()
    start = text.index("def train(")
    end = text.index("\ndef ", start + 1)
    assert len(text[start:end].splitlines()) <= 140


def test_no_module_level_getattr_outside_the_package_init():
    """Names live where they are defined: no module re-exports another's through __getattr__."""
    for path in PKG.rglob("*.py"):
        if path == PKG / "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), path.name


def test_run_folder_file_names_are_spelled_in_runfiles_only():
    """RunDir owns the run folder: no other module spells one of its file names as a string."""
    from ncmcli import runfiles

    names = {runfiles.CONFIG, runfiles.METRICS, runfiles.BEST, runfiles.LAST, runfiles.RESULT, runfiles.REPLAY,
             runfiles.PARENT, runfiles.LOCK}
    spelled = {}
    for path in PKG.rglob("*.py"):
        if path.name == "runfiles.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled.setdefault(path.name, []).append(node.value)
    assert spelled == {}, spelled
