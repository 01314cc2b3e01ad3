"""Checks shared by the compat tests: a compat model against the oracle of its original code base."""

import torch


def assert_state_dict_loads_both_ways(ours, orig, fresh, orig_loss) -> None:
    """orig's state_dict (after one training pass, so the running statistics moved) loads into ours, and ours
    loads into a fresh oracle (built from another seed) with every tensor equal."""
    orig_loss().backward()
    ours.load_state_dict(orig.state_dict())
    fresh.load_state_dict(ours.state_dict())
    loaded = fresh.state_dict()
    for k, v in orig.state_dict().items():
        assert torch.equal(loaded[k], v), k


def assert_same_training_pass(ours, orig, ours_loss, orig_loss) -> None:
    """The losses, every named parameter's gradient and the state after the pass (running statistics) agree
    within fp32 tolerances (rtol 1e-5; atol 1e-5, 1e-6 for the state)."""
    lo, lr = ours_loss(), orig_loss()
    torch.testing.assert_close(lo, lr, rtol=1e-5, atol=1e-5)
    lo.backward(), lr.backward()
    named = dict(orig.named_parameters())
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, named[n].grad, rtol=1e-5, atol=1e-5, msg=n)
    state = ours.state_dict()
    for k, v in orig.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=k)
