"""quark0/darts (``cnn/model_search.py``, ``operations.py``, ``architect.py``) on fastdarts.

Change the imports of a DARTS search script::

    from fastdarts.compat.darts import Architect, Network

or patch only the mixed op of the original code base (``model_search.MixedOp = fastdarts.compat.darts.MixedOp``)
before building the network. Parameter and buffer names and shapes are the original's, so ``weights.pt`` files
saved by either load into the other. As in the original, the alphas are plain tensors, not parameters: they
are not in ``parameters()`` or the state_dict; ``.to()``, ``.cuda()`` and ``.double()`` move them in place.

One deliberate difference: the second-order step evaluates the unrolled and perturbed weights without touching
the model's BatchNorm running statistics (the original updates them on each of those three extra passes);
gradients are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar

import torch
from torch import Tensor

from fastdarts.nn import cell as _cell
from fastdarts.nn import network as _network
from fastdarts.nn.operations import OPS as _OPS
from fastdarts.search import architect as _architect
from fastdarts.select.genotype import Genotype, derive_genotype
from fastdarts.spaces import DARTS, SearchSpace

PRIMITIVES = list(DARTS.primitives)
OPS = _OPS

__all__ = ["OPS", "PRIMITIVES", "Architect", "Cell", "Genotype", "MixedOp", "Network"]


class MixedOp(_cell.MixedOp):
    """``MixedOp(C, stride)`` of DARTS: every primitive of PRIMITIVES, BatchNorm without affine."""

    def __init__(self, C: int, stride: int):
        super().__init__(C, stride, PRIMITIVES, affine=False)


class Cell(_cell.Cell):
    """``Cell(steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev)`` of DARTS."""

    def __init__(
        self, steps: int, multiplier: int, C_prev_prev: int, C_prev: int, C: int, reduction: bool,
        reduction_prev: bool,
    ):  # fmt: skip
        super().__init__(
            steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, PRIMITIVES, affine=False
        )


class Network(_network.SearchNetwork):
    """``Network(C, num_classes, layers, criterion, steps=4, multiplier=4, stem_multiplier=3)`` of DARTS.

    ``forward(input)`` -> logits, ``_loss(input, target)``, ``arch_parameters()``, ``new()``, ``genotype()``.
    """

    def __init__(
        self,
        C: int,
        num_classes: int,
        layers: int,
        criterion: Callable[[Tensor, Tensor], Tensor],
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
    ):
        space = replace(
            self._space, primitives=tuple(PRIMITIVES), steps=steps, multiplier=multiplier,
            stem_multiplier=stem_multiplier,
        )  # fmt: skip
        super().__init__(C, num_classes, layers, space, in_channels=3, **self._variant)
        self._C, self._num_classes, self._steps, self._multiplier = C, num_classes, steps, multiplier
        self._criterion = criterion
        if isinstance(criterion, torch.nn.Module):  # first, as the original assigns it before the stem: a
            # weighted criterion's weight leads the state_dict there
            module = self._modules.pop("_criterion")
            self._modules = {"_criterion": module, **self._modules}
        # plain leaf tensors, as in the original: outside parameters() and the state_dict
        arch = {id(a) for a in _network.SearchNetwork.arch_parameters(self)}
        self._arch_parameters = []
        for name in [n for n, p in self.named_parameters() if id(p) in arch]:
            tensor = getattr(self, name).detach().requires_grad_()
            delattr(self, name)
            setattr(self, name, tensor)
            self._arch_parameters.append(tensor)

    #: the core network's space and switches for a descendant code base (PC-DARTS: partial channels, edge
    #: normalisation; its ImageNet search: the ImageNet stem)
    _space: ClassVar[SearchSpace] = DARTS
    _variant: ClassVar[dict] = {}

    def arch_parameters(self) -> list[Tensor]:
        """[alphas_normal, alphas_reduce], each [num_edges, len(PRIMITIVES)] (PC-DARTS: then the betas)."""
        return self._arch_parameters

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for a in self._arch_parameters:  # in place, so an optimiser holding them keeps working
            a.data = fn(a.data)
        return self

    def criterion(self, logits: Tensor, target: Tensor) -> Tensor:
        """The ``criterion`` given to the constructor."""
        return self._criterion(logits, target)

    def _loss(self, input: Tensor, target: Tensor) -> Tensor:
        return self.loss(input, target)

    def new(self) -> Network:
        """A fresh network of the same shape (new weights) with a copy of these alphas, on their device and dtype."""
        space = self.space
        model = type(self)(
            self._C, self._num_classes, self._layers, self._criterion, space.steps, space.multiplier,
            space.stem_multiplier,
        ).to(self.alphas_normal)  # fmt: skip
        with torch.no_grad():
            for new, old in zip(model.arch_parameters(), self.arch_parameters()):
                new.copy_(old)
        return model

    def genotype(self) -> Genotype:
        """The DARTS genotype: per node the two strongest edges by their best non-`none` softmax weight (PC-DARTS:
        times the edge weight)."""
        genotype = derive_genotype(self.alphas_normal, self.alphas_reduce, self.space, self.edge_strengths())
        concat = range(2 + self._steps - self._multiplier, self._steps + 2)  # a range, as the original's
        return genotype._replace(normal_concat=concat, reduce_concat=concat)


class Architect(_architect.Architect):
    """``Architect(model, args)`` of DARTS: Adam on the alphas (lr ``args.arch_learning_rate``, betas (0.5, 0.999),
    weight decay ``args.arch_weight_decay``); the unrolled step uses ``args.momentum`` and ``args.weight_decay``.
    The Hessian-vector product is the central finite difference of DARTS (radius 0.01 / ||v||)."""

    def __init__(self, model: Network, args):
        config = _architect.ArchitectConfig(lr=args.arch_learning_rate, weight_decay=args.arch_weight_decay)
        super().__init__(model, config, args.momentum, args.weight_decay)

    def step(
        self,
        input_train: Tensor,
        target_train: Tensor,
        input_valid: Tensor,
        target_valid: Tensor,
        eta: float,
        network_optimizer: torch.optim.Optimizer,
        unrolled: bool,
    ) -> Tensor:
        """One Adam step on the alphas, second order when ``unrolled`` (eta: the weight learning rate)."""
        self.config = replace(self.config, order="second" if unrolled else "first")
        return super().step(input_train, target_train, input_valid, target_valid, eta, network_optimizer)
