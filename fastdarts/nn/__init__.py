"""Search-space building blocks on top of fastdarts.ops."""

from fastdarts.nn.cell import Cell, MixedOp, PartialMixedOp
from fastdarts.nn.network import SearchNetwork
from fastdarts.nn.operations import OPS

__all__ = ["OPS", "Cell", "MixedOp", "PartialMixedOp", "SearchNetwork"]
