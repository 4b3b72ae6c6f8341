"""Small real data sets bundled with pathfactor (no downloads).

* :func:`mesc` -- Buettner et al. 2015 mouse embryonic stem cells with FACS-sorted
  cell-cycle stage (182 cells x 6635 genes, log-normalised expression).
* :func:`gene_sets` -- ``"hallmark"`` (MSigDB Hallmark v7.5.1, 50 sets, human symbols) and
  ``"reactome_mouse"`` (30-set Reactome subset in mouse symbols, from Bioconductor slalom).

Sources and licences: ``pathfactor/data/files/LICENSES.md``.
"""
from __future__ import annotations

from importlib import resources

import anndata as ad

from pathfactor.data.genesets import BUNDLED, GeneSets, bundled_gene_sets

__all__ = ["mesc", "gene_sets", "available"]

_MESC_FILE = "buettner2015_mesc_cellcycle.h5ad"


def _file(name: str):
    return resources.files("pathfactor.data").joinpath("files", name)


def mesc() -> ad.AnnData:
    """Buettner et al. 2015 mouse ESC data (182 cells x 6635 genes).

    ``X`` is dense float32 log-transformed normalised expression (not counts);
    ``obs["cell_cycle_stage"]`` is categorical G1 / S / G2M (59 / 58 / 65 cells) and
    ``obs["stage_code"]`` is 1 / 2 / 3. Every call reads the file again, so the result is a
    fresh object that may be modified freely.
    """
    with resources.as_file(_file(_MESC_FILE)) as path:
        adata = ad.read_h5ad(path)
    return adata


def available() -> list[str]:
    """Names accepted by :func:`gene_sets`."""
    return list(BUNDLED)


def gene_sets(name: str) -> GeneSets:
    """A bundled gene set collection: ``"hallmark"`` or ``"reactome_mouse"``.

    Human sets apply to mouse data through the case-insensitive matching of
    :meth:`GeneSets.filter` / :meth:`GeneSets.match`.
    """
    return bundled_gene_sets(name)
