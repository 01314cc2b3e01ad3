import pytest
import torch

from fastdarts.select import Genotype, derive_genotype
from fastdarts.spaces import DARTS

P = DARTS.primitives


def _alphas_with(choices: dict[int, tuple[str, float]]) -> torch.Tensor:
    """alphas of zeros, except edge e gets `value` on op `name`."""
    a = torch.zeros(14, 8)
    for edge, (name, value) in choices.items():
        a[edge, P.index(name)] = value
    return a


def test_two_strongest_edges_per_node_with_their_best_op():
    # node 0: edges 0, 1; node 1: edges 2-4; node 2: edges 5-8; node 3: edges 9-13
    a = _alphas_with({0: ("sep_conv_3x3", 2.0), 1: ("skip_connect", 1.0), 3: ("dil_conv_5x5", 3.0),
                      4: ("max_pool_3x3", 2.5), 2: ("avg_pool_3x3", 0.5), 8: ("sep_conv_5x5", 1.0),
                      6: ("dil_conv_3x3", 1.5), 13: ("skip_connect", 4.0), 9: ("sep_conv_3x3", 3.0)})  # fmt: skip
    g = derive_genotype(a, a, DARTS)
    assert g.normal == [
        ("sep_conv_3x3", 0), ("skip_connect", 1),
        ("dil_conv_5x5", 1), ("max_pool_3x3", 2),
        ("dil_conv_3x3", 1), ("sep_conv_5x5", 3),
        ("skip_connect", 4), ("sep_conv_3x3", 0),
    ]  # fmt: skip
    assert g.normal_concat == [2, 3, 4, 5] and g.reduce == g.normal


def test_none_is_never_chosen_even_when_strongest():
    a = torch.zeros(14, 8)
    a[:, 0] = 10.0  # `none` dominates every edge
    a[:, P.index("avg_pool_3x3")] = 1.0
    g = derive_genotype(a, a, DARTS)
    assert all(op == "avg_pool_3x3" for op, _ in g.normal)


def test_ties_keep_the_first_edge_and_op():
    g = derive_genotype(torch.zeros(14, 8), torch.zeros(14, 8), DARTS)
    assert g.normal[:4] == [
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 1),
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 1),
    ]


def test_json_round_trip():
    g = derive_genotype(torch.randn(14, 8), torch.randn(14, 8), DARTS)
    assert Genotype.from_json(g.to_json()) == g


def test_wrong_alpha_shape_names_the_shape():
    with pytest.raises(ValueError, match=r"alphas_reduce has shape \(14, 7\), expected \(14, 8\)"):
        derive_genotype(torch.zeros(14, 8), torch.zeros(14, 7), DARTS)
