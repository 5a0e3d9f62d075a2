"""The docs: README.md as a landing page, docs/ as the reference, CONTRIBUTING.md's recipes.
Each runnable block (```python, and ```sh for commands that run offline) runs here as it
stands; a plain ``` block is an illustration that needs data, a GPU or a checkpoint path."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").rglob("*.md"))]
MAX_README_LINES = 250


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_readme_opens_with_the_install_and_test_commands_that_ci_runs():
    lines = (REPO / "README.md").read_text().splitlines()
    assert lines[0] == "```"
    install, test = lines[1], lines[2]
    assert "pip install" in install and "ncm train --preset quickstart" in install
    assert "pytest" in test
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci


def test_readme_is_a_landing_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    for part in ("## Commands", "## Five examples", "## Python API", "## Documentation", "p(c | x)"):
        assert part in text, part


def _registered_commands() -> list[str]:
    from ncmcli.cli import app

    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    return names + [g.name for g in app.registered_groups]


def test_docs_cli_has_one_section_per_registered_command():
    """docs/cli.md holds a section for each command the app registers, in ``ncm --help``'s
    order, and none for a command that does not exist."""
    sections = re.findall(r"^## `ncm (\w+)`", (REPO / "docs" / "cli.md").read_text(), flags=re.M)
    assert sections == _registered_commands()


def test_the_command_list_is_read_from_the_app():
    """The control for the rule above: the app's list has every command the README names."""
    readme = (REPO / "README.md").read_text()
    commands = _registered_commands()
    assert len(commands) == 9 and all(f"`ncm {c}" in readme for c in commands)


def test_docs_config_table_is_the_generated_one():
    generated = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "config_table.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    text = (REPO / "docs" / "config.md").read_text()
    start = text.index("<!-- config-table:start")
    start = text.index("-->", start) + 3
    assert text[start : text.index("<!-- config-table:end -->")].strip() == generated, (
        "docs/config.md's table is stale: run python scripts/config_table.py --write"
    )
    for name in ("tiny", "resnet34-cifar", "lsoftmax", "center", "sqncm"):  # every arch and loss is listed
        assert f"`{name}`" in generated


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if (
                not target.startswith(("http://", "https://", "mailto:"))
                and not (path.parent / target).exists()
            ):
                broken.append(f"{path.relative_to(REPO)} -> {target}")
    assert broken == []


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_the_python_api_blocks_run_without_typer_rich_or_yaml(doc):
    (code,) = _blocks(REPO / doc, "python")[:1]
    check = (
        "\nimport sys\nassert round(floor, 3) == 1.159, floor\n"
        "print(sorted(m for m in ('typer', 'rich', 'yaml') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def _sh_blocks():
    return [
        pytest.param(path, i, block, id=f"{path.relative_to(REPO)}#{i}")
        for path in DOCS
        for i, block in enumerate(_blocks(path, "sh"))
    ]


def test_there_are_runnable_shell_blocks():
    """The control for the test below: the README's examples are among the blocks it runs."""
    assert any(p.values[0].name == "README.md" for p in _sh_blocks())


@pytest.mark.slow  # trains the quickstart model a few times
@pytest.mark.parametrize("path,index,block", _sh_blocks())
def test_every_shell_block_runs_offline(path, index, block, tmp_path):
    """Each ```sh block runs as it stands, in a fresh folder, with ncm from this install."""
    env_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={
            "PATH": env_path,
            "HOME": str(tmp_path),
            "NCM_DATA": str(tmp_path / "data"),
            "OMP_NUM_THREADS": "1",
        },
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_library_constructors_raise_value_and_type_errors():
    import torch

    from ncmcli import NCMLoss, build_net, make_anchors
    from ncmcli.errors import NcmError

    anchors = make_anchors("orthogonal", 4, 4)
    with pytest.raises(ValueError):
        make_anchors("orthogonal", 5, 3)
    with pytest.raises(ValueError):
        NCMLoss(anchors, distance="manhattan")
    with pytest.raises(TypeError):
        NCMLoss(anchors, distance=3)
    with pytest.raises(ValueError):
        build_net("tiny", in_channels=1, image_size=28, dropout=2.0)
    with pytest.raises(ValueError) as exc:
        NCMLoss(torch.ones(1, 4))
    assert not isinstance(exc.value, NcmError)  # a plain ValueError: no exit code from a library


def _recipe_paths() -> list[str]:
    """Every repository path CONTRIBUTING.md names in backticks (``ncmcli/...``, ``tests/...``)."""
    text = (REPO / "CONTRIBUTING.md").read_text()
    return re.findall(r"`((?:ncmcli|tests|docs|presets|scripts|benchmarks)/[\w./-]+)`", text)


def test_contributing_names_only_paths_that_exist():
    paths = _recipe_paths()
    assert len(paths) >= 15
    missing = [p for p in paths if not (REPO / p).exists()]
    assert missing == []


def test_contributing_has_a_recipe_for_each_kind_of_addition():
    text = (REPO / "CONTRIBUTING.md").read_text()
    for kind in ("a loss", "an anchor method", "a net", "a data set", "a command"):
        assert re.search(rf"^## Adding {kind}$", text, flags=re.M | re.I), kind
