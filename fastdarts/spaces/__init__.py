"""Search spaces as data: primitives, cell shape and macro layout, no code paths."""

from fastdarts.spaces.darts import DARTS, DARTS_IMAGENET, SPACES, SearchSpace, get_space

__all__ = ["DARTS", "DARTS_IMAGENET", "SPACES", "SearchSpace", "get_space"]
