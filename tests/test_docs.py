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
    from ncmcli.config import SCHEMA

    text = (REPO / "README.md").read_text()
    for cmd in ("ncm train", "ncm eval", "ncm predict", "ncm anchors", "ncm presets"):
        assert cmd in text, cmd
    for key in SCHEMA:
        assert f"`{key}`" in text, key


def test_readme_config_table_is_the_generated_one():
    import subprocess
    import sys

    from conftest import REPO as root

    generated = subprocess.run([sys.executable, str(root / "scripts" / "config_table.py")], capture_output=True,
                               text=True, check=True).stdout.strip()
    text = (root / "README.md").read_text()
    start = text.index("<!-- config-table:start")
    start = text.index("-->", start) + 3
    assert text[start:text.index("<!-- config-table:end -->")].strip() == generated, \
        "README's config table is stale: run python scripts/config_table.py --write"
    for name in ("tiny", "resnet34-cifar", "lsoftmax", "center", "sqncm"):  # every arch and loss is listed
        assert f"`{name}`" in generated
