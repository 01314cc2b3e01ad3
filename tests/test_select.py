import pytest
import torch

from fastdarts.select import Genotype, derive_genotype
from fastdarts.select.genotype import parse_cell
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


def test_edge_strength_products_are_rounded_in_the_weights_dtype_as_in_pc_darts():
    # Node 1's edges from inputs 1 and 2 tie in float32 (PC-DARTS multiplies in float32 and keeps the lower input
    # on a tie), though in float64 the edge from input 2 is stronger.
    a, s1, b, s2 = 0.6095694, 0.31582937, 0.60956943, 0.31582934
    weights = torch.tensor([[0, 0.5], [0, 0.4], [0, 0.9], [0, a], [0, b]], dtype=torch.float32)
    strength = torch.tensor([1, 1, 1, s1, s2], dtype=torch.float32)
    assert (weights[3, 1] * strength[3]).item() == (weights[4, 1] * strength[4]).item()
    w64, s64 = weights.double(), strength.double()
    assert w64[3, 1] * s64[3] < w64[4, 1] * s64[4]
    gene = parse_cell(weights, ("none", "sep_conv_3x3"), 2, strength)
    assert gene[2:] == [("sep_conv_3x3", 0), ("sep_conv_3x3", 1)]
