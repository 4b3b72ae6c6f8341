"""Several views (modalities) of the same cells: a MuData, or a dict ``{view: AnnData | DataFrame | array}``.

The views are read into dense float64 matrices on one common list of cells (MuData's global ``obs_names``, or the
union of the views' cells in order of appearance); a cell a view did not measure gets a row of NaN there (a
missing view). Nothing of the caller's objects is modified.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .inputs import as_matrix, input_file

__all__ = ["Views", "is_mudata", "is_multiview", "read_h5mu", "read_views", "per_view"]


@dataclass
class Views:
    """The views' names, their matrices (cells x features, float64, NaN where missing), feature names, the common
    cell names and the cells' labels (``obs``: MuData's global obs, or the first view's)."""

    names: list[str]
    matrices: list[np.ndarray]
    var_names: list[pd.Index]
    obs_names: pd.Index
    obs: pd.DataFrame | None
    genes_left_out: dict

    @property
    def sizes(self) -> list[int]:
        return [m.shape[1] for m in self.matrices]


def is_mudata(data) -> bool:
    """A MuData: its ``.mod`` is the mapping of views (a pandas DataFrame's ``.mod`` is a method)."""
    return isinstance(getattr(data, "mod", None), Mapping)


def is_multiview(data) -> bool:
    """A MuData or a dict of views (a scipy DOK matrix is a dict too, but one matrix)."""
    return (isinstance(data, dict) and not sp.issparse(data)) or is_mudata(data)


def per_view(value, names: list[str], what: str, default=None) -> dict:
    """``value`` for each view: a dict ``{view: value}`` (views it leaves out get ``default``; unknown views are an
    error) or one value for all."""
    if isinstance(value, dict):
        unknown = sorted(set(map(str, value)) - set(names))
        if unknown:
            raise ValueError(f"{what} names views {unknown} that the data do not have (views: {names})")
        return {n: value.get(n, default) for n in names}
    return {n: value if value is not None else default for n in names}


def read_views(data, layer=None, use_highly_variable: bool | None = False) -> Views:
    """Read ``data`` (MuData, dict of views, or one matrix as a single view named ``"data"``) into :class:`Views`.
    ``layer``: one layer name for every view or ``{view: layer}``. NaN entries are kept (missing)."""
    if is_mudata(data):
        views, cells, obs = dict(data.mod), pd.Index(data.obs_names), data.obs
    elif is_multiview(data):
        if not data:
            raise ValueError("the dict of views is empty; pass {view_name: AnnData, ...}")
        views, cells, obs = {str(k): v for k, v in data.items()}, None, None
    else:
        views, cells, obs = {"data": data}, None, getattr(data, "obs", None)
    names = list(views)
    layers = per_view(layer, names, "layer")
    matrices, var_names, row_names, left_out = [], [], [], {}
    for name in names:
        m = as_matrix(views[name], layers[name], dtype=np.float64, use_highly_variable=use_highly_variable,
                      allow_nan=True)
        matrices.append(m.Y)
        var_names.append(m.var_names)
        row_names.append(m.obs_names)
        left_out[name] = list(m.genes_left_out)
    if cells is None:
        cells = row_names[0]
        for rows in row_names[1:]:
            if not rows.equals(cells):
                cells = cells.append(rows.difference(cells, sort=False))
        if obs is None and hasattr(views[names[0]], "obs"):
            obs = views[names[0]].obs.reindex(cells) if not row_names[0].equals(cells) else views[names[0]].obs
    if cells.has_duplicates:
        raise ValueError("duplicate cell names across the views; make them unique (obs_names_make_unique)")
    dense = []
    for name, Y, rows in zip(names, matrices, row_names):
        if rows.has_duplicates:
            raise ValueError(f"view {name!r} has duplicate cell names; make them unique (obs_names_make_unique)")
        Y = Y.toarray() if sp.issparse(Y) else np.asarray(Y, dtype=np.float64)
        if not rows.equals(cells):
            where = cells.get_indexer(rows)
            if (where < 0).any():
                raise ValueError(f"view {name!r} has cells that are not among the data's cells")
            full = np.full((len(cells), Y.shape[1]), np.nan)
            full[where] = Y
            Y = full
        dense.append(Y)
    return Views(names, dense, var_names, cells, obs, left_out)


def read_h5mu(path):
    """Read a MuData ``.h5mu`` file (mudata is imported here). A missing path is a ``FileNotFoundError``; no mudata
    package, a directory or a file mudata cannot read is a ``ValueError`` naming the problem."""
    try:
        import mudata
    except ImportError:
        raise ValueError("reading .h5mu needs the mudata package: pip install mudata") from None
    p = input_file(path, "an .h5mu file")
    try:
        return mudata.read_h5mu(p)
    except (OSError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read {str(p)!r} as h5mu ({type(err).__name__}: {err})") from None
