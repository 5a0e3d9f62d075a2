"""ncm: anchor-based Nearest Class Mean losses (Hao et al.) as a library and a CLI.

The library lives in ``ncmcli.nn`` (torch only) and is re-exported here: ``Classifier``,
``make_anchors``, ``anchor_certificate``, the criteria (``NCMLoss`` with an
injected distance, ``SoftmaxLoss`` and the baselines), the distances, ``loss_floor``,
``build_net`` and ``load_checkpoint``. They are imported lazily (PEP 562) so that ``ncm --help``
and config handling never pay for importing torch, and none of them imports typer, rich or
yaml.
"""

__version__ = "0.3.0"

_LAZY = {
    "make_anchors": ("ncmcli.nn", "make_anchors"),
    "anchor_certificate": ("ncmcli.nn", "anchor_certificate"),
    "NCMLoss": ("ncmcli.nn", "NCMLoss"),
    "SoftmaxLoss": ("ncmcli.nn", "SoftmaxLoss"),
    "Criterion": ("ncmcli.nn", "Criterion"),
    "HingeLoss": ("ncmcli.nn", "HingeLoss"),
    "LSoftmaxLoss": ("ncmcli.nn", "LSoftmaxLoss"),
    "CenterLoss": ("ncmcli.nn", "CenterLoss"),
    "euclidean": ("ncmcli.nn", "euclidean"),
    "cosine": ("ncmcli.nn", "cosine"),
    "squared_euclidean": ("ncmcli.nn", "squared_euclidean"),
    "loss_floor": ("ncmcli.nn", "loss_floor"),
    "scale_for_floor": ("ncmcli.nn", "scale_for_floor"),
    "build_net": ("ncmcli.nn", "build_net"),
    "Classifier": ("ncmcli.nn", "Classifier"),
    "load_checkpoint": ("ncmcli.runs.checkpoint", "load"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ncmcli' has no attribute {name!r}")
