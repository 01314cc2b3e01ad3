"""The search algorithms as switches on the one DARTS supernet and loop.

- ``darts`` (Liu et al., 2019): every candidate on every channel of every edge.
- ``pcdarts`` (Xu et al., 2020): partial channels (1 / K of each edge's channels through its candidates, the
  rest passed by, channels shuffled) and edge normalisation (betas).
- ``rf-darts`` / ``rf-pcdarts`` (random features, seed 000 in ../shared/seeds): the same supernets with every
  convolution (and the classifier) frozen at its random initialisation; only the BatchNorm affine weights and the
  architecture parameters train, so BatchNorm affine is switched on in the cells. The pooling candidates' BatchNorm
  stays without affine, as in DARTS.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fastdarts.errors import UsageError
from fastdarts.nn import SearchNetwork


@dataclass(frozen=True)
class Algorithm:
    """What an algorithm changes in the supernet.

    Attributes:
        name: the name used on the command line.
        partial_channels: PC-DARTS' partial-channel edges (K from --partial-channels or the space's default).
        edge_normalization: PC-DARTS' betas.
        random_features: RF-DARTS: only BatchNorm affine weights and architecture parameters train.
    """

    name: str
    partial_channels: bool = False
    edge_normalization: bool = False
    random_features: bool = False


ALGORITHMS = {
    a.name: a
    for a in (
        Algorithm("darts"),
        Algorithm("pcdarts", partial_channels=True, edge_normalization=True),
        Algorithm("rf-darts", random_features=True),
        Algorithm("rf-pcdarts", partial_channels=True, edge_normalization=True, random_features=True),
    )
}


def freeze_random_features(model: SearchNetwork) -> list[nn.Parameter]:
    """Freezes every weight of ``model`` but the BatchNorm affine weights (requires_grad False), in place.

    Returns:
        The weights that still train: the BatchNorm weights and biases, in ``named_parameters`` order.
    """
    if not any(
        m.affine
        for cell in model.cells
        for m in cell.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ):
        raise UsageError(
            "random features train the cells' BatchNorm affine weights, but this supernet's cells have none: "
            "build it with affine=True (dataclasses.replace(space, affine=True))"
        )
    batch_norm = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  for p in m.parameters(recurse=False)}  # fmt: skip
    for p in model.weight_parameters():
        p.requires_grad_(id(p) in batch_norm)
    return [p for p in model.weight_parameters() if p.requires_grad]
