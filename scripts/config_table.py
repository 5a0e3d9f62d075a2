"""docs/config.md's config-key table, generated from the schema: each key's default from the
dataclasses in ncmcli/config/schema.py, its meaning from the comment beside or above its field, and,
for keys with a fixed set of values, the names from the registry.

    python scripts/config_table.py           # print the table
    python scripts/config_table.py --write   # replace the table between docs/config.md's markers

tests/test_docs.py checks that docs/config.md holds exactly what this prints.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "ncmcli" / "config" / "schema.py"
README = REPO / "docs" / "config.md"
START, END = "<!-- config-table:start (scripts/config_table.py writes it) -->", "<!-- config-table:end -->"


def _comments(source: str) -> dict[int, str]:
    """Line number -> the comment text on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def field_comments() -> dict[str, str]:
    """'section.key' (or 'key' at the top) -> its comment: the one on the field's line, after
    the comment block right above it."""
    source = CONFIG.read_text()
    comments = _comments(source)
    lines = source.splitlines()
    sections = {
        "DataConfig": "data",
        "ModelConfig": "model",
        "AnchorsConfig": "anchors",
        "LossConfig": "loss",
        "TrainConfig": "train",
        "OptimConfig": "optim",
        "Config": "",
    }
    out = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.ClassDef) and node.name in sections):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above, n = [], item.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, comments.get(n, ""))
                n -= 1
            text = " ".join(above + ([comments[item.lineno]] if item.lineno in comments else []))
            prefix = sections[node.name]
            out[f"{prefix}.{item.target.id}" if prefix else item.target.id] = text
    return out


def _default(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return '""'
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]" if value else "[]"
    return str(value)


def choices() -> dict[str, tuple]:
    from ncmcli import registry
    from ncmcli.config import schema as c
    from ncmcli.config import values as c_values

    return {
        "data.name": c.DATASETS,
        "data.normalization": c.NORMALIZATIONS,
        "data.loader": c.LOADERS,
        "data.resize": ("crop", "squash"),
        "model.arch": c.ARCH_NAMES,
        "model.head": c.HEADS,
        "anchors.method": tuple(registry.ANCHOR_METHODS) + ("FILE.safetensors", "FILE.csv"),
        "loss.name": c.LOSSES,
        "loss.hinge_form": c.HINGE_FORMS,
        "loss.scale": ("a number",) + c_values.SCALE_WORDS,
        "train.precision": c.PRECISIONS,
        "train.channels_last": c.TRISTATE,
        "optim.name": c.OPTIMIZERS,
        "optim.schedule": c.SCHEDULES,
        "optim.milestone_unit": c.MILESTONE_UNITS,
        "data.imbalance": ("exp:IF", "step:IF", '""'),
        "data.augment": ("false", "true", "randomresizedcrop"),
        "loss.free_slots": c.FREE_SLOTS,
    }


def table() -> str:
    sys.path.insert(0, str(REPO))
    from ncmcli.config.schema import SCHEMA, Config

    defaults = {}
    for f in dataclasses.fields(Config):
        value = getattr(Config(), f.name)
        if dataclasses.is_dataclass(value):
            defaults.update({f"{f.name}.{g.name}": getattr(value, g.name) for g in dataclasses.fields(value)})
        else:
            defaults[f.name] = value
    comments, names = field_comments(), choices()
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key in SCHEMA:
        meaning = comments.get(key, "").replace("|", "\\|")
        if key in names:
            if meaning and not meaning.endswith("."):
                meaning += "."
            meaning += (
                (" " if meaning else "")
                + "Values: "
                + ", ".join(v if v == "a number" else f"`{v}`" for v in names[key])
                + "."
            )
        rows.append(f"| `{key}` | {_default(defaults[key])} | {meaning} |")
    return "\n".join(rows)


def readme_table(text: str) -> str:
    return text[text.index(START) + len(START) : text.index(END)].strip("\n")


def main(argv: list[str]) -> int:
    generated = table()
    if "--write" not in argv:
        print(generated)
        return 0
    text = README.read_text()
    README.write_text(
        text[: text.index(START) + len(START)] + "\n" + generated + "\n" + text[text.index(END) :]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
