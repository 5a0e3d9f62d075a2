"""The shape of the package: imports flow one way, each name lives in one place, and the
docs list what the registry holds."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ncmcli import registry
from ncmcli.config.schema import ANCHOR_METHODS, ARCH_NAMES, DATASETS, HINGE_FORMS, LOSSES, SCHEMA

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "ncmcli"

# Each unit (a folder of ncmcli/, or a top-level module) imports only from its own layer or
# below, counting imports inside functions. ncmcli.nn, the torch-only library, sits on the
# torch-free leaves alone.
LAYERS = {
    6: {"cli", "__main__"},
    5: {"commands"},
    4: {"train", "reports"},
    3: {"runs"},
    2: {"data"},
    1: {"nn"},
    0: {"config", "registry", "netspecs", "errors", "storage", "__init__"},
}
LAYER_OF = {name: level for level, names in LAYERS.items() for name in names}


def _name(path: Path) -> str:
    """ncmcli/nn/losses.py -> ncmcli.nn.losses; ncmcli/nn/__init__.py -> ncmcli.nn."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in PKG.rglob("*.py")}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """The ncmcli modules ``path`` imports anywhere in it (inside functions too)."""

    def known(name):
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ncmcli":
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in MODULES else known(node.module))
        elif isinstance(node, ast.Import):
            out |= {known(a.name) for a in node.names if a.name.split(".")[0] == "ncmcli"}
    return out - {_name(path)}


GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in MODULES}
    assert units <= set(LAYER_OF), units - set(LAYER_OF)


def test_imports_never_go_upward():
    upward = [
        f"{m} imports {d}"
        for m, deps in GRAPH.items()
        for d in deps
        if LAYER_OF[_unit(d)] > LAYER_OF[_unit(m)]
    ]
    assert not upward, upward


def test_the_import_graph_has_no_cycle():
    """Over every ncmcli module, imports inside functions included."""
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(GRAPH.get(m, ())):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_the_graph_sees_imports_inside_functions():
    """The control: the graph holds imports made only inside a function."""
    assert "ncmcli.commands.evaluate" in GRAPH["ncmcli.cli.evaluate"]
    assert "ncmcli.commands.train" in GRAPH["ncmcli.cli.train"]


def test_the_library_imports_no_app_module():
    """ncmcli.nn needs torch alone: importing it in a fresh process loads no config, data,
    run-folder, training or CLI module, and none of yaml, typer and rich."""
    code = (
        "import sys, ncmcli.nn\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('yaml', 'typer', 'rich') or\n"
        "       m.startswith(('ncmcli.config', 'ncmcli.data', 'ncmcli.runs', 'ncmcli.train', 'ncmcli.cli',\n"
        "                     'ncmcli.commands', 'ncmcli.reports'))]\n"
        "print(bad, 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "[] True", proc.stdout + proc.stderr
    # Statically as well, imports inside functions included.
    outside = {
        d
        for m, deps in GRAPH.items()
        if _unit(m) == "nn"
        for d in deps
        if _unit(d) not in ("nn", "registry", "netspecs", "errors", "storage", "__init__")
    }
    assert not outside, outside


def test_the_library_raises_no_cli_error():
    """ncmcli.nn's constructors raise ValueError/TypeError, never ncm's exit-coded errors: the
    app turns them into a ConfigError where it hands values over (errors.config_boundary)."""
    cli_errors = {"NcmError", "UsageError", "ConfigError", "DataError", "CheckpointError", "ImageError"}
    named = {}
    for path in (PKG / "nn").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name) and node.id in cli_errors:
                named.setdefault(path.name, set()).add(node.id)
            elif isinstance(node, ast.alias) and node.name in cli_errors:
                named.setdefault(path.name, set()).add(node.name)
    assert named == {}, named


def test_nets_and_criteria_are_built_only_inside_the_library():
    """``Classifier.from_config`` is the one builder: no module outside ncmcli/nn calls
    build_net or build_criterion."""
    callers = set()
    for m, path in MODULES.items():
        if _unit(m) == "nn":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in ("build_net", "build_criterion"):
                    callers.add(m)
    assert not callers, callers


def test_config_registry_and_report_labels_agree():
    from ncmcli.config.schema import LossConfig
    from ncmcli.netspecs import ARCHS, MLPS, RESNETS
    from ncmcli.reports.paper import METHOD_ORDER, dataset_label, method_label

    assert LOSSES == tuple(registry.LOSSES) and HINGE_FORMS == tuple(registry.HINGE_FORMS)
    assert ANCHOR_METHODS == tuple(registry.ANCHOR_METHODS) and DATASETS == tuple(registry.DATASETS)
    assert ARCH_NAMES == (*ARCHS, *MLPS, *RESNETS)
    labels = set()
    for name in registry.LOSSES:
        for form in registry.HINGE_FORMS:
            for m in registry.LSOFTMAX_MARGINS:
                labels.add(method_label(LossConfig(name=name, hinge_form=form, margin=m)))
    assert labels <= set(METHOD_ORDER), labels - set(METHOD_ORDER)
    from ncmcli.config.schema import DataConfig

    assert {dataset_label(DataConfig(name=d)) for d in registry.DATASETS} == {
        e.label for e in registry.DATASETS.values()
    }


def test_every_registered_loss_builds_through_the_registry():
    import torch

    from ncmcli.config.schema import LossConfig
    from ncmcli.nn.criteria import build_criterion
    from ncmcli.nn.criterion import Criterion

    anchors = torch.eye(3, 4)
    for name, entry in registry.LOSSES.items():
        crit = build_criterion(
            LossConfig(name=name), anchors=anchors if entry.metric else None, dim=4, num_classes=3
        )
        assert isinstance(crit, Criterion) and crit.uses_anchors == bool(entry.metric)
        f = torch.randn(5, 4, requires_grad=True)
        crit(f, torch.tensor([0, 1, 2, 0, 1])).backward()
        assert f.grad is not None and crit.logits(f).shape == (5, 3)
        vectors, kind = crit.class_vectors()
        assert vectors is not None and vectors.shape == (3, 4) and kind


def test_loss_keys_are_exactly_what_each_builder_reads():
    """registry.LOSSES[...].keys drives the 'has no effect' warning, report columns and plot
    legends: it must list every loss_cfg field the builder reads, and nothing else."""
    import inspect
    import textwrap

    from ncmcli.nn.criteria import LOSS_BUILDERS

    for name, entry in registry.LOSSES.items():
        tree = ast.parse(textwrap.dedent(inspect.getsource(LOSS_BUILDERS[name])))
        read = {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "loss_cfg"
        }
        assert read - {"name"} == set(entry.keys), (name, read)


def test_loss_fields_a_loss_does_not_read_change_nothing():
    """Changing a field outside a loss's keys leaves its parameters and its loss untouched."""
    import dataclasses

    import torch

    from ncmcli.config.schema import LossConfig
    from ncmcli.nn.criteria import build_criterion

    other = {
        "scale": 3.0,
        "hinge_form": "weston-watkins",
        "margin": 3,
        "lambda_base": 10.0,
        "lambda_gamma": 0.5,
        "lambda_power": 2.0,
        "lambda_min": 0.5,
        "center_weight": 0.5,
        "center_alpha": 0.1,
        "label_smoothing": 0.2,
        "floor_target": 0.5,
        "logit_adjust": 1.0,
        "free_slots": "masked",
    }
    fields = {f.name for f in dataclasses.fields(LossConfig)} - {"name"}
    assert set(other) == fields, "give every new LossConfig field a second value here"
    anchors = torch.nn.functional.normalize(
        torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), dim=1
    )
    f = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])

    def loss_of(cfg):
        torch.manual_seed(0)
        crit = build_criterion(
            cfg, anchors=anchors if registry.LOSSES[cfg.name].metric else None, dim=6, num_classes=4
        )
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


def test_the_docs_tables_list_every_registered_name():
    docs = REPO / "docs"
    baselines = (docs / "guides" / "reproducing.md").read_text()
    for name in registry.LOSSES:
        assert f"`{name}`" in baselines, name
    cli = (docs / "cli.md").read_text()
    anchors = cli[cli.index("## `ncm anchors`") : cli.index("## `ncm presets`")]
    for name in registry.ANCHOR_METHODS:
        assert f"| `{name}` |" in anchors, name
    nets = (docs / "models.md").read_text()
    for name in ARCH_NAMES:
        assert re.search(rf"\| `{re.escape(name)}`", nets), name
    config = (docs / "config.md").read_text()
    for name in registry.DATASETS:
        assert f"`{name}`" in config[config.index("| `data.name`") :], name
    for key in SCHEMA:
        assert f"`{key}`" in config, key


def test_cli_start_up_imports_no_torch():
    code = (
        "import sys; import ncmcli.cli, ncmcli.config.schema, ncmcli.registry; print('torch' in sys.modules)"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_TRAIN_LINES = 300, 60, 80


def test_the_caps_count_formatted_code():
    """The caps below hold on the layout ``ruff format`` gives, not on packed lines: the
    package is formatted (``.ci/run`` checks the whole repository)."""
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    proc = subprocess.run([ruff, "format", "--check", str(PKG)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_modules_are_at_most_300_lines():
    long = {
        str(p.relative_to(PKG)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, long


def _function_lengths():
    """(path, name, lines) of every function: its body, docstring included, as ``ruff format``
    lays it out. The signature is left out: the formatter puts each parameter of a long one on
    its own line, and a CLI command's typer options are declarations, not logic."""
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node.name, node.end_lineno - node.body[0].lineno + 1


def test_functions_are_at_most_60_lines_and_train_80():
    long = {
        f"{p.relative_to(PKG)}:{name}": n
        for p, name, n in _function_lengths()
        if n
        > (
            MAX_TRAIN_LINES
            if (p.parent.name, p.name, name) == ("train", "loop.py", "train")
            else MAX_FUNCTION_LINES
        )
    }
    assert not long, long


def test_train_is_found_where_the_length_rule_looks():
    """The control for the rule above: train() is where its exception names it."""
    lengths = {(p.parent.name, p.name, name): n for p, name, n in _function_lengths()}
    assert 20 < lengths[("train", "loop.py", "train")] <= MAX_TRAIN_LINES


def test_no_module_level_getattr_outside_the_package_init():
    """Names live where they are defined: no module re-exports another's through __getattr__."""
    for path in PKG.rglob("*.py"):
        if path == PKG / "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), (
            path.name
        )


def test_run_folder_file_names_are_spelled_in_runfiles_only():
    """RunDir owns the run folder: no other module spells one of its file names as a string."""
    from ncmcli.runs import runfiles

    names = {
        runfiles.CONFIG,
        runfiles.METRICS,
        runfiles.BEST,
        runfiles.LAST,
        runfiles.RESULT,
        runfiles.REPLAY,
        runfiles.PARENT,
        runfiles.LOCK,
    }
    spelled = {}
    for path in PKG.rglob("*.py"):
        if path.name == "runfiles.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                spelled.setdefault(path.name, []).append(node.value)
    assert spelled == {}, spelled


def test_every_builder_table_holds_exactly_the_registered_names():
    """The registry names things; each layer's builder table (imported normally, so the import
    graph sees it) holds a callable for exactly those names. "auto" anchors are resolved to one
    of the others by resolve_auto."""
    from ncmcli.data.sources import DATASET_BUILDERS
    from ncmcli.nn.anchors import ANCHOR_BUILDERS
    from ncmcli.nn.criteria import LOSS_BUILDERS

    assert set(LOSS_BUILDERS) == set(registry.LOSSES)
    assert set(DATASET_BUILDERS) == set(registry.DATASETS)
    assert set(ANCHOR_BUILDERS) == set(registry.ANCHOR_METHODS) - {"auto"}
    for table in (LOSS_BUILDERS, DATASET_BUILDERS, ANCHOR_BUILDERS):
        assert all(callable(b) for b in table.values())


def test_the_registry_names_no_module():
    """No "module:function" strings: the registry imports nothing of the layers above it."""
    text = (PKG / "registry.py").read_text()
    assert "importlib" not in text and not re.search(r'"ncmcli\.[\w.]+:\w+"', text)


def test_data_sets_and_anchor_methods_dispatch_through_their_tables():
    """The two dispatchers compare against no registered name (no if-chains to keep in step)."""
    import inspect
    import textwrap

    from ncmcli.data.datasets import load_dataset
    from ncmcli.nn.anchors import make_anchors

    for fn, names in ((load_dataset, registry.DATASETS), (make_anchors, registry.ANCHOR_METHODS)):
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        spelled = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names}
        assert spelled <= {"auto"}, (fn.__name__, spelled)


def _tested_path(test_file: Path) -> Path | None:
    """What a test file tests: tests/<folders>/test_<name>.py tests ncmcli/<folders>/<name>.py
    or the folder ncmcli/<folders>/<name>/; at the top, also a repository folder (benchmarks,
    docs) or one of the two cross-cutting files. None: it names nothing."""
    rel = test_file.relative_to(REPO / "tests")
    name = rel.stem[len("test_") :]
    for cand in (PKG / rel.parent / f"{name}.py", PKG / rel.parent / name):
        if cand.exists():
            return cand
    if rel.parent == Path(".") and ((REPO / name).is_dir() or name in ("end_to_end", "structure")):
        return REPO / name
    return None


def test_test_files_mirror_the_package():
    """tests/ mirrors ncmcli/: a unit's tests are at the same path, so a newcomer finds them,
    and a test file named after a feature or a session's history is refused."""
    stray = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if _tested_path(p) is None
    )
    assert stray == [], stray


def test_the_test_file_rule_refuses_a_feature_name():
    """The control for the rule above: history-named files, or a module's tests in the wrong
    folder, are refused."""
    tests = REPO / "tests"
    for bad in ("test_sweeps.py", "test_hardening.py", "nn/test_loop.py", "test_losses.py"):
        assert _tested_path(tests / bad) is None, bad
    for good in ("nn/test_losses.py", "train/test_loop.py", "test_benchmarks.py", "test_cli.py"):
        assert _tested_path(tests / good) is not None, good


def _imports_inside_functions():
    """(module path, line, source line) of every import of an ncmcli module inside a function."""
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        lines = text.splitlines()
        for fn in ast.walk(ast.parse(text)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                own = (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ncmcli")) or (
                    isinstance(node, ast.Import) and any(a.name.startswith("ncmcli") for a in node.names)
                )
                if own:
                    yield path.relative_to(PKG), node.lineno, lines[node.lineno - 1]


def test_own_imports_inside_functions_only_defer_a_start_up_or_give_a_reason():
    """An import of an ncm module inside a function hides the dependency graph; it is allowed
    only where it keeps a fast path fast (the CLI's start-up: cli/ and the package __init__),
    or with a comment on its line that says why."""
    allowed = {Path("__init__.py")}
    hidden = [
        f"{p}:{n}"
        for p, n, line in _imports_inside_functions()
        if p.parts[0] != "cli" and p not in allowed and "#" not in line
    ]
    assert not hidden, hidden


def test_the_deferred_import_rule_sees_the_cli():
    """The control: the rule above finds the CLI's deferred imports."""
    assert any(p.parts[0] == "cli" for p, _, _ in _imports_inside_functions())


def test_the_package_top_level_holds_only_the_torch_free_leaves():
    """Everything else lives in the folder of its layer."""
    top = {p.stem for p in PKG.glob("*.py")}
    assert top == {"__init__", "__main__", "errors", "storage", "registry", "netspecs"}


def test_each_command_has_one_cli_module_and_one_commands_module_of_the_same_name():
    """cli/X.py holds command X's options and rendering, commands/X.py its work; console is the
    CLI's shared renderer and __init__ registers the commands."""
    cli = {p.stem for p in (PKG / "cli").glob("*.py")} - {"__init__", "console"}
    commands = {p.stem for p in (PKG / "commands").glob("*.py")} - {"__init__"}
    assert cli == commands and len(cli) == 9
    for name in cli:
        assert f"ncmcli.commands.{name}" in GRAPH[f"ncmcli.cli.{name}"], name
