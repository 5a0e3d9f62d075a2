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
