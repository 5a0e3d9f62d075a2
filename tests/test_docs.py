from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_install_and_test_commands_that_ci_runs():
    lines = (REPO / "README.md").read_text().splitlines()
    assert lines[0] == "```"
    install, test = lines[1], lines[2]
    assert "pip install" in install and "ncm train --preset quickstart" in install
    assert "pytest" in test
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci


def test_readme_documents_every_command_and_config_key():
    from ncmcli.config.schema import SCHEMA

    text = (REPO / "README.md").read_text()
    for cmd in ("ncm train", "ncm eval", "ncm predict", "ncm anchors", "ncm presets"):
        assert cmd in text, cmd
    for key in SCHEMA:
        assert f"`{key}`" in text, key


def test_readme_config_table_is_the_generated_one():
    import subprocess
    import sys

    from conftest import REPO as root

    generated = subprocess.run(
        [sys.executable, str(root / "scripts" / "config_table.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    text = (root / "README.md").read_text()
    start = text.index("<!-- config-table:start")
    start = text.index("-->", start) + 3
    assert text[start : text.index("<!-- config-table:end -->")].strip() == generated, (
        "README's config table is stale: run python scripts/config_table.py --write"
    )
    for name in ("tiny", "resnet34-cifar", "lsoftmax", "center", "sqncm"):  # every arch and loss is listed
        assert f"`{name}`" in generated


def test_the_readme_python_api_example_runs_without_typer_rich_or_yaml():
    import subprocess
    import sys

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API") : text.index("## The nets")]
    code = section[section.index("```python") + len("```python") :]
    code = code[: code.index("```")]
    check = (
        "\nimport sys\nfrom ncmcli import load_checkpoint, anchor_certificate, Criterion, HingeLoss\n"
        "assert round(floor, 3) == 1.159, floor\n"
        "print(sorted(m for m in ('typer', 'rich', 'yaml') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_library_constructors_raise_value_and_type_errors():
    import pytest
    import torch

    from ncmcli import NCMLoss, build_net, make_anchors

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
    from ncmcli.errors import NcmError

    assert not isinstance(exc.value, NcmError)  # a plain ValueError: no exit code from a library
