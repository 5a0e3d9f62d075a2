"""ncm: anchor-based Nearest Class Mean losses (Hao et al.) as a library and a CLI.

The library: ``make_anchors``, ``anchor_certificate``, the criteria (``NCMLoss`` with an
injected distance, ``SoftmaxLoss`` and the baselines), the distances, ``loss_floor``,
``build_net`` and ``load_checkpoint``. They are imported lazily (PEP 562) so that ``ncm --help``
and config handling never pay for importing torch, and none of them imports typer, rich or
yaml.
"""

__version__ = "0.1.0"

_LAZY = {
    "make_anchors": ("ncmcli.anchors", "make_anchors"),
    "anchor_certificate": ("ncmcli.anchors", "anchor_certificate"),
    "NCMLoss": ("ncmcli.losses", "NCMLoss"),
    "SoftmaxLoss": ("ncmcli.losses", "SoftmaxLoss"),
    "Criterion": ("ncmcli.losses", "Criterion"),
    "HingeLoss": ("ncmcli.baselines", "HingeLoss"),
    "LSoftmaxLoss": ("ncmcli.baselines", "LSoftmaxLoss"),
    "CenterLoss": ("ncmcli.baselines", "CenterLoss"),
    "euclidean": ("ncmcli.distances", "euclidean"),
    "cosine": ("ncmcli.distances", "cosine"),
    "squared_euclidean": ("ncmcli.distances", "squared_euclidean"),
    "loss_floor": ("ncmcli.floors", "loss_floor"),
    "scale_for_floor": ("ncmcli.floors", "scale_for_floor"),
    "build_net": ("ncmcli.models", "build_net"),
    "load_checkpoint": ("ncmcli.checkpoint", "load"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ncmcli' has no attribute {name!r}")
