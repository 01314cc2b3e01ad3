"""Turning a searched supernet into a discrete architecture."""

from fastdarts.select.genotype import Genotype, derive_genotype

__all__ = ["Genotype", "derive_genotype"]
