"""Bilevel search: the architect (first and second order) and the search loop with checkpoints."""

from fastdarts.search.architect import Architect, ArchitectConfig
from fastdarts.search.loop import Search, SearchConfig, SearchResult, run_search

__all__ = ["Architect", "ArchitectConfig", "Search", "SearchConfig", "SearchResult", "run_search"]
