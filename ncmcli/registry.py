"""Every name a user can type, in one place: losses, anchor methods, nets, data sets.

Each family is a table of name -> entry (its display label, and for losses the distance and
the config keys its builder reads). Config validation, "did you mean" hints, report labels and
the docs' tables are all read from these tables. The code lives where its layer is, each with
a builder table keyed by the same names, imported normally so the import graph sees it:
``nn.criteria.LOSS_BUILDERS``, ``nn.anchors.ANCHOR_BUILDERS``, ``data.datasets.DATASET_BUILDERS``
(a test checks that every table holds exactly the registered names). This module imports no
torch, so ``ncm --help`` stays instant.

To add a loss: write its criterion and a ``build_*`` function taking
``(loss_cfg, *, anchors, dim, num_classes)``, add one line to ``LOSSES`` here and one to
``LOSS_BUILDERS`` (CONTRIBUTING.md has the recipe).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    label: str  # what reports and docs show
    metric: str = ""  # losses: the anchor distance for NCM losses ("" = no anchors)
    keys: tuple[str, ...] = ()  # losses: the loss.* fields its builder reads, besides name


_NCM_KEYS = ("scale", "floor_target", "logit_adjust", "free_slots")
# -- Losses (criteria). Labels may use the loss config's fields, e.g. {margin}.
LOSSES: dict[str, Entry] = {
    "softmax": Entry("SoftMax", keys=("label_smoothing", "logit_adjust")),
    "encm": Entry("E-NCM", metric="euclidean", keys=_NCM_KEYS),
    "cncm": Entry("C-NCM", metric="cosine", keys=_NCM_KEYS),
    "sqncm": Entry("sq-NCM", metric="sqeuclidean", keys=_NCM_KEYS),
    "hinge": Entry("{hinge_label}", keys=("hinge_form",)),
    "lsoftmax": Entry(
        "L-Softmax m={margin}",
        keys=("margin", "lambda_base", "lambda_gamma", "lambda_power", "lambda_min", "label_smoothing"),
    ),
    "center": Entry(
        "Center",
        keys=("center_weight", "center_alpha", "label_smoothing"),
    ),
}
HINGE_FORMS: dict[str, Entry] = {
    "ova": Entry("Hinge"),  # Caffe's one-vs-all L1 HingeLoss: the paper's cited rows
    "weston-watkins": Entry("Hinge (WW)"),  # torch.nn.MultiMarginLoss
}
LSOFTMAX_MARGINS = (1, 2, 3, 4)
NCM_LOSSES = {name: e.metric for name, e in LOSSES.items() if e.metric}


def loss_ignores(loss_name: str, key: str) -> bool:
    """Whether a dotted config key is a ``loss.*`` field that this loss never reads (``loss.scale``
    for softmax, ``loss.lambda_gamma`` for E-NCM). Unknown losses ignore nothing."""
    entry = LOSSES.get(loss_name)
    field = key[len("loss.") :] if key.startswith("loss.") else None
    return entry is not None and field not in (None, "name") and field not in entry.keys


def keys_read(flat: dict) -> dict:
    """A dotted config (``{"loss.name": ..., "loss.scale": ...}``) without the ``loss.*`` keys its
    loss never reads: what report columns and plot legends may name."""
    name = str(flat.get("loss.name"))
    return {k: v for k, v in flat.items() if not loss_ignores(name, k)}


def loss_key_users(key: str) -> list[str]:
    """The losses that read a dotted ``loss.*`` key."""
    field = key[len("loss.") :]
    return [name for name, e in LOSSES.items() if field in e.keys]


# -- Anchor methods (ncmcli.nn.anchors implements each; files are accepted besides these).
ANCHOR_METHODS: dict[str, Entry] = {  # builders: (num_classes, dim, seed) -> (C, d) float64 rows
    "orthogonal": Entry("e_1..e_C, the paper's default"),
    "polar": Entry("the paper's angle meshgrid"),
    "simplex": Entry("regular simplex"),
    "orthoplex": Entry("±e_i"),
    "optimized": Entry("numerically maximised minimum angle"),
    "random": Entry("normalised Gaussian rows"),
    "auto": Entry("simplex, orthoplex or optimized, by C and d"),  # resolve_auto picks one of the above
}
ANCHOR_FILE_SUFFIXES = (".safetensors", ".csv")

# -- Data sets: the report's label (CIFAR-10 with augment is the paper's "CIFAR-10+").
# Builders: (data config, root, train, say) -> Dataset.
DATASETS: dict[str, Entry] = {
    "quickstart": Entry("quickstart"),
    "mnist": Entry("MNIST"),
    "fashion-mnist": Entry("Fashion-MNIST"),
    "cifar10": Entry("CIFAR-10"),
    "cifar100": Entry("CIFAR-100"),
    "folder": Entry("folder"),
}

# -- Feature heads and dropout: one definition for config and models alike.
HEADS = ("linear", "linear-bn-relu")
DROPOUT_RANGE = (0.0, 1.0)  # [low, high)


def loss_label(loss_cfg) -> str:
    """The report's name for a loss config, e.g. "L-Softmax m=2" or "Hinge (WW)"."""
    entry = LOSSES[loss_cfg.name]
    return entry.label.format(margin=loss_cfg.margin, hinge_label=HINGE_FORMS[loss_cfg.hinge_form].label)


def suggest(name: str, choices, cutoff: float = 0.6) -> str:
    """' (did you mean 'x'?)' for a close match, else ''."""
    import difflib

    close = difflib.get_close_matches(str(name)[:200], [str(c) for c in choices], n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""
