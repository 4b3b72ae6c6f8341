"""Bundled real data: ``pf.datasets.mesc()``, ``pf.datasets.gene_sets("hallmark")``."""
from .data.datasets import available, gene_sets, mesc

__all__ = ["mesc", "gene_sets", "available"]
