"""ncm: anchor-based Nearest Class Mean losses (Hao et al.) as a library and a CLI.

The public entry points are ``make_anchors`` and ``NCMLoss``. They are imported lazily
(PEP 562) so that ``ncm --help`` and config handling never pay for importing torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "make_anchors": ("ncmcli.anchors", "make_anchors"),
    "anchor_certificate": ("ncmcli.anchors", "anchor_certificate"),
    "NCMLoss": ("ncmcli.losses", "NCMLoss"),
    "SoftmaxLoss": ("ncmcli.losses", "SoftmaxLoss"),
    "build_net": ("ncmcli.models", "build_net"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ncmcli' has no attribute {name!r}")
