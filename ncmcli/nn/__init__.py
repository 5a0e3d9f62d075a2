"""The paper as a torch-only library: distances, fixed anchors and their certificate, loss
floors, the criteria (``NCMLoss`` and the baselines), the nets, and ``Classifier``, the one
model object. Nothing here imports the config, data, run-folder, training or CLI modules, nor
yaml, typer or rich (``tests/test_structure.py`` checks it in a fresh process).

    from ncmcli.nn import Classifier, NCMLoss, make_anchors, cosine
    crit = NCMLoss(make_anchors("orthonormal", 10, 16), distance=cosine, scale=4.0)
"""

from ncmcli.nn.anchors import make_anchors
from ncmcli.nn.baselines import CenterLoss, HingeLoss, LSoftmaxLoss
from ncmcli.nn.certificate import anchor_certificate
from ncmcli.nn.classifier import Classifier
from ncmcli.nn.criterion import Criterion
from ncmcli.nn.distances import cosine, euclidean, squared_euclidean
from ncmcli.nn.floors import loss_floor, scale_for_floor
from ncmcli.nn.losses import NCMLoss, SoftmaxLoss
from ncmcli.nn.models import build_net

__all__ = [
    "Classifier",
    "Criterion",
    "NCMLoss",
    "SoftmaxLoss",
    "HingeLoss",
    "LSoftmaxLoss",
    "CenterLoss",
    "make_anchors",
    "anchor_certificate",
    "euclidean",
    "cosine",
    "squared_euclidean",
    "loss_floor",
    "scale_for_floor",
    "build_net",
]
