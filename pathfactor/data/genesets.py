"""Named gene sets: read (GMT / JSON), match to a data set's genes, filter, mask, merge.

A :class:`GeneSets` object is an ordered, read-only collection ``name -> tuple of gene
symbols`` with an optional one-line description per set. Every method that changes the
collection returns a new object.

Matching to data is case-insensitive by default (symbols are compared with
``str.upper()``), so human symbols such as ``CCNB1`` match mouse genes such as ``Ccnb1``.
That is the approximation f-scLVM uses for mouse data with human gene sets; it misses
genes whose orthologue has a different name.
"""
from __future__ import annotations

import gzip
import json
import zlib
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .inputs import input_file

__all__ = ["GeneSets", "as_gene_sets", "annotation_mask"]

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
_SUFFIXES = (".gmt", ".gmt.gz", ".json", ".json.gz")
MERGE_SEP = "|"


# ----------------------------------------------------------------------------- helpers
def _open_text(path: Path, mode: str = "rt"):
    """Open ``path`` as text; gzip is detected from the magic bytes (reading) or suffix (writing). Reading
    drops a UTF-8 byte-order mark (Excel and Windows tools write one)."""
    if "r" in mode:
        with open(path, "rb") as fh:
            gz = fh.read(2) == _GZIP_MAGIC
    else:
        gz = path.name.lower().endswith(".gz")
    encoding = "utf-8-sig" if "r" in mode else "utf-8"
    if gz:
        return gzip.open(path, mode, encoding=encoding, newline="")
    return open(path, mode, encoding=encoding, newline="")


#: what a corrupt or truncated gzip stream raises while it is read
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def _bad_gzip(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} is not a valid gzip file ({type(err).__name__}: {err}); it is corrupt or "
                      "truncated: download or compress it again")


def _existing(path) -> Path:
    return input_file(path, "the path of a .gmt or .json file", what="gene set file", advice="; check the path")


def _check_text(value: str, what: str) -> None:
    if "\t" in value or "\n" in value or "\r" in value:
        raise ValueError(
            f"{what} {value!r} contains a tab or newline, which GMT cannot store; "
            "remove those characters"
        )


def _as_var_index(var_names) -> pd.Index:
    """``var_names`` (list, Index, array or an AnnData) as a checked pandas Index."""
    if hasattr(var_names, "var_names") and not isinstance(var_names, pd.Index):
        var_names = var_names.var_names
    if isinstance(var_names, str):
        raise ValueError(
            "var_names is a single string; pass a list / pandas Index of gene names "
            "(e.g. adata.var_names)"
        )
    idx = pd.Index(var_names)
    if idx.ndim != 1:
        raise ValueError("var_names must be one-dimensional (e.g. adata.var_names)")
    if len(idx) == 0:
        raise ValueError("var_names is empty; pass the data's gene names (e.g. adata.var_names)")
    if not idx.is_unique:
        dup = idx[idx.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"var_names contain {int(idx.duplicated().sum())} duplicates (e.g. {dup}); "
            "make them unique first (adata.var_names_make_unique())"
        )
    return idx


def _keys(values, case_sensitive: bool) -> np.ndarray:
    s = pd.Index(values).astype(str)
    return np.asarray(s if case_sensitive else s.str.upper(), dtype=object)


class GeneSets:
    """An ordered collection of named gene sets.

    Parameters
    ----------
    sets
        Mapping ``name -> iterable of gene symbols``. Duplicate symbols inside a set are
        dropped (first occurrence kept); surrounding whitespace is stripped. Sets may be empty.
    descriptions
        Optional mapping ``name -> one-line description``; missing names get ``""``.

    Attributes
    ----------
    match_report : dict or None
        Set by :meth:`filter`: ``n_sets_in``, ``n_sets_kept``, ``n_genes_matched`` (data
        genes in at least one kept set) and ``n_genes_data``. ``None`` otherwise.

    Examples
    --------
    >>> gs = GeneSets({"A": ["CCNB1", "CDK1"], "B": ["MKI67"]})
    >>> gs.match(["Ccnb1", "Cdk1", "Actb"])["A"]
    ('Ccnb1', 'Cdk1')
    """

    __slots__ = ("_sets", "_descriptions", "match_report")

    def __init__(
        self,
        sets: Mapping[str, Iterable[str]],
        descriptions: Mapping[str, str] | None = None,
    ):
        if isinstance(sets, GeneSets):
            descriptions = {**sets._descriptions, **(descriptions or {})}
            sets = sets._sets
        if not isinstance(sets, Mapping):
            raise ValueError(
                f"sets must be a mapping name -> list of genes, got {type(sets).__name__}; "
                "for a genes x terms table use GeneSets.from_mask"
            )
        clean: dict[str, tuple[str, ...]] = {}
        for name, genes in sets.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"gene set names must be non-empty strings, got {name!r}")
            _check_text(name, "gene set name")
            if isinstance(genes, (str, bytes)) or not isinstance(genes, Iterable):
                raise ValueError(
                    f"genes of set {name!r} must be a list of symbols, got "
                    f"{type(genes).__name__} {genes!r:.60}; wrap a single gene in a list"
                )
            seen: dict[str, None] = {}
            for g in genes:
                if not isinstance(g, str):
                    raise ValueError(
                        f"set {name!r} contains {g!r} ({type(g).__name__}); gene symbols must "
                        "be strings (drop missing values first)"
                    )
                g = g.strip()
                if not g:
                    raise ValueError(f"set {name!r} contains an empty gene symbol; remove it")
                _check_text(g, f"gene in set {name!r}")
                seen.setdefault(g, None)
            clean[name] = tuple(seen)
        desc: dict[str, str] = {n: "" for n in clean}
        for name, d in (descriptions or {}).items():
            if name not in clean:
                raise ValueError(
                    f"description given for {name!r}, which is not one of the gene sets; "
                    "give descriptions only for names in `sets`"
                )
            d = "" if d is None else str(d)
            _check_text(d, f"description of {name!r}")
            desc[name] = d
        self._sets = clean
        self._descriptions = desc
        self.match_report: dict | None = None

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return len(self._sets)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sets)

    def __contains__(self, name) -> bool:
        return name in self._sets

    def __getitem__(self, name: str) -> tuple[str, ...]:
        try:
            return self._sets[name]
        except (KeyError, TypeError):
            hint = [n for n in self._sets if str(name).upper() in n.upper()][:3]
            raise KeyError(
                f"no gene set named {name!r}" + (f"; similar names: {hint}" if hint else "")
            ) from None

    def __eq__(self, other) -> bool:
        if not isinstance(other, GeneSets):
            return NotImplemented
        return (
            list(self._sets.items()) == list(other._sets.items())
            and self._descriptions == other._descriptions
        )

    __hash__ = None  # equality is by content; not meant as a dict key

    def __repr__(self) -> str:
        n = len(self)
        if n == 0:
            return "GeneSets(0 sets)"
        sizes = self.sizes
        head = ", ".join(self.names[:2]) + (", ..." if n > 2 else "")
        return (
            f"GeneSets({n} sets, {len(self.genes)} genes, sizes {sizes.min()}-{sizes.max()}: "
            f"{head})"
        )

    @property
    def names(self) -> list[str]:
        """Set names in order."""
        return list(self._sets)

    @property
    def sizes(self) -> pd.Series:
        """Number of genes per set (index = names)."""
        return pd.Series(
            [len(g) for g in self._sets.values()], index=pd.Index(self.names), dtype=int, name="size"
        )

    @property
    def genes(self) -> list[str]:
        """All distinct genes over all sets, in order of first appearance."""
        return list(dict.fromkeys(g for genes in self._sets.values() for g in genes))

    @property
    def descriptions(self) -> dict[str, str]:
        """Copy of the ``name -> description`` mapping."""
        return dict(self._descriptions)

    def items(self):
        """Iterate over ``(name, genes)`` pairs."""
        return iter(self._sets.items())

    def to_dict(self) -> dict[str, list[str]]:
        """Plain ``{name: [genes]}`` copy."""
        return {n: list(g) for n, g in self._sets.items()}

    # ------------------------------------------------------------------ combining
    def union(self, other: GeneSets | Mapping[str, Iterable[str]]) -> GeneSets:
        """Combine two collections (``self`` first).

        A name present in both is kept once if the gene lists are identical; otherwise a
        ``ValueError`` names it.
        """
        if not isinstance(other, GeneSets):
            other = GeneSets(other)
        sets = dict(self._sets)
        desc = dict(self._descriptions)
        clash = [n for n in other if n in sets and sets[n] != other[n]]
        if clash:
            raise ValueError(
                f"{len(clash)} set name(s) occur in both collections with different genes "
                f"(e.g. {clash[:3]}); rename or drop them before combining"
            )
        for name, genes in other.items():
            if name not in sets:
                sets[name] = genes
                desc[name] = other._descriptions[name]
            elif not desc[name]:
                desc[name] = other._descriptions[name]
        return GeneSets(sets, desc)

    def __add__(self, other):
        if not isinstance(other, (GeneSets, Mapping)):
            return NotImplemented
        return self.union(other)

    def subset(self, names: Iterable[str]) -> GeneSets:
        """Collection restricted to ``names`` (in the given order)."""
        names = list(names)
        missing = [n for n in names if n not in self._sets]
        if missing:
            raise ValueError(f"unknown gene set name(s) {missing[:5]}; see .names for the known ones")
        return GeneSets({n: self._sets[n] for n in names}, {n: self._descriptions[n] for n in names})

    # ------------------------------------------------------------------ I/O
    @classmethod
    def read_gmt(cls, path: str | PathLike) -> GeneSets:
        """Read a GMT file (plain or gzip): ``name<TAB>description<TAB>gene...`` per line.

        Blank lines, trailing tabs and empty gene fields are ignored. A name occurring twice
        is an error unless both lines list the same genes.
        """
        p = _existing(path)
        sets: dict[str, list[str]] = {}
        desc: dict[str, str] = {}
        where: dict[str, int] = {}
        try:
            with _open_text(p) as fh:
                for lineno, line in enumerate(fh, 1):
                    line = line.rstrip("\r\n")
                    if not line.strip():
                        continue
                    if "\t" not in line:
                        raise ValueError(
                            f"{p}: line {lineno} has no tab; GMT lines are tab-separated "
                            "'name<TAB>description<TAB>gene...' (is this really a GMT file?)"
                        )
                    fields = line.split("\t")
                    name = fields[0].strip()
                    if not name:
                        raise ValueError(f"{p}: line {lineno} has an empty set name; fix the file")
                    genes = [g.strip() for g in fields[2:] if g.strip()]
                    if name in sets:
                        if list(dict.fromkeys(genes)) != list(dict.fromkeys(sets[name])):
                            raise ValueError(
                                f"{p}: set {name!r} occurs on lines {where[name]} and {lineno} "
                                "with different genes; rename one of them"
                            )
                        continue
                    sets[name] = genes
                    desc[name] = fields[1].strip() if len(fields) > 1 else ""
                    where[name] = lineno
        except UnicodeDecodeError as e:
            raise ValueError(f"{p} is not UTF-8 text ({e}); is this really a GMT file?") from None
        except _GZIP_ERRORS as e:
            raise _bad_gzip(p, e) from None
        return cls(sets, desc)

    @classmethod
    def read_json(cls, path: str | PathLike) -> GeneSets:
        """Read JSON (plain or gzip): flat ``{name: [genes]}`` or nested ``{group: {name: [genes]}}``.

        Nested sets are named ``group/name`` and get the group as description; empty groups
        are skipped. Both forms may be mixed at the top level.
        """
        p = _existing(path)
        try:
            with _open_text(p) as fh:
                data = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p} is not valid JSON ({e})") from None
        except RecursionError:  # Python's parser recurses once per level of nesting
            raise ValueError(f"{p} nests JSON arrays or objects too deeply to parse; a gene-set file is at most "
                             "{group: {name: [genes]}} (three levels)") from None
        except _GZIP_ERRORS as e:
            raise _bad_gzip(p, e) from None
        if not isinstance(data, dict):
            raise ValueError(
                f"{p}: expected a JSON object {{name: [genes]}} or {{group: {{name: [genes]}}}}, "
                f"got a JSON {type(data).__name__}"
            )
        sets: dict[str, list[str]] = {}
        desc: dict[str, str] = {}
        for key, value in data.items():
            if isinstance(value, list):
                sets[key] = value
                desc[key] = ""
            elif isinstance(value, dict):
                for name, genes in value.items():
                    if not isinstance(genes, list):
                        raise ValueError(
                            f"{p}: {key}/{name} is a {type(genes).__name__}, expected a list of "
                            "genes (only one level of grouping is supported)"
                        )
                    full = f"{key}/{name}"
                    if full in sets:
                        raise ValueError(f"{p}: set name {full!r} occurs twice; rename one of them")
                    sets[full] = genes
                    desc[full] = key
            else:
                raise ValueError(
                    f"{p}: value of {key!r} is a {type(value).__name__}; expected a list of genes "
                    "or an object {name: [genes]}"
                )
        return cls(sets, desc)

    @classmethod
    def read(cls, path: str | PathLike) -> GeneSets:
        """Read a ``.gmt``, ``.gmt.gz``, ``.json`` or ``.json.gz`` file (chosen by suffix)."""
        p = Path(path)
        low = p.name.lower()
        if not low.endswith(_SUFFIXES):
            raise ValueError(
                f"cannot tell the format of {str(p)!r} from its suffix; use one of "
                f"{', '.join(_SUFFIXES)} (or call read_gmt / read_json directly)"
            )
        _existing(p)
        if low.endswith((".gmt", ".gmt.gz")):
            return cls.read_gmt(p)
        return cls.read_json(p)

    def write_gmt(self, path: str | PathLike) -> None:
        """Write GMT (gzip if ``path`` ends in ``.gz``); round-trips with :meth:`read_gmt`."""
        p = Path(path)
        with _open_text(p, "wt") as fh:
            for name, genes in self._sets.items():
                fh.write("\t".join([name, self._descriptions[name], *genes]) + "\n")

    @classmethod
    def from_mask(cls, mask: pd.DataFrame) -> GeneSets:
        """Build sets from a genes x terms boolean (or 0/1) DataFrame; genes keep the index order."""
        if not isinstance(mask, pd.DataFrame):
            raise ValueError(
                f"mask must be a pandas DataFrame (genes x terms), got {type(mask).__name__}"
            )
        if not mask.columns.is_unique:
            dup = mask.columns[mask.columns.duplicated()].unique()[:3].tolist()
            raise ValueError(f"mask has duplicate term columns {dup}; make the columns unique")
        if not mask.index.is_unique:
            raise ValueError("mask has duplicate gene index entries; make the index unique")
        values = mask.to_numpy()
        if values.dtype != bool:
            try:
                num = values.astype(float)
            except (TypeError, ValueError):
                raise ValueError("mask must hold booleans or 0/1 values") from None
            if not np.isin(num, (0.0, 1.0)).all():
                raise ValueError(
                    "mask must hold booleans or 0/1 values (found other numbers or NaN); "
                    "threshold it first, e.g. mask > 0"
                )
            values = num.astype(bool)
        genes = np.asarray(mask.index.astype(str), dtype=object)
        rows, cols = np.nonzero(values.T)  # term-major, genes in index order
        bounds = np.searchsorted(rows, np.arange(values.shape[1] + 1))
        names = [str(c) for c in mask.columns]
        return cls({n: genes[cols[bounds[j] : bounds[j + 1]]].tolist() for j, n in enumerate(names)})

    # ------------------------------------------------------------------ matching to data
    def _pairs(self, var: pd.Index, case_sensitive: bool) -> pd.DataFrame:
        """(term, var position) pairs of matches, ordered by term, gene order in set, var position."""
        n_per = np.fromiter((len(g) for g in self._sets.values()), dtype=np.int64, count=len(self))
        flat = [g for genes in self._sets.values() for g in genes]
        left = pd.DataFrame(
            {
                "term": np.repeat(np.arange(len(self)), n_per),
                "order": np.arange(len(flat)),
                "key": _keys(flat, case_sensitive) if flat else np.empty(0, dtype=object),
            }
        )
        right = pd.DataFrame({"key": _keys(var, case_sensitive), "pos": np.arange(len(var))})
        pairs = left.merge(right, on="key", how="inner")
        pairs = pairs.sort_values(["order", "pos"], kind="stable")
        return pairs.drop_duplicates(["term", "pos"])[["term", "pos"]]

    def match(self, var_names, case_sensitive: bool = False) -> GeneSets:
        """Replace each symbol by the matching name(s) in ``var_names``.

        Parameters
        ----------
        var_names
            The data's gene names (list, pandas Index or an AnnData).
        case_sensitive
            If False (default) compare ``str.upper()`` so human symbols match mouse genes.
            A symbol may then match several var_names (e.g. ``Zfp936`` and ``ZFP936``).

        Returns
        -------
        GeneSets
            Same names and order; genes absent from the data are dropped, so sets can be empty.
        """
        var = _as_var_index(var_names)
        pairs = self._pairs(var, case_sensitive)
        var_str = np.asarray(var.astype(str), dtype=object)
        terms = pairs["term"].to_numpy()
        genes = var_str[pairs["pos"].to_numpy()]
        bounds = np.searchsorted(terms, np.arange(len(self) + 1)) if len(terms) else None
        # pairs are sorted by gene order, which is term-major, so terms are sorted
        out = {}
        for j, name in enumerate(self._sets):
            out[name] = genes[bounds[j] : bounds[j + 1]].tolist() if bounds is not None else []
        return GeneSets(out, self._descriptions)

    def filter(
        self,
        var_names,
        min_size: int = 15,
        max_size: int = 500,
        min_fraction: float = 0.0,
        case_sensitive: bool = False,
    ) -> GeneSets:
        """Match to ``var_names`` and keep sets of usable size.

        Parameters
        ----------
        var_names
            The data's gene names (list, pandas Index or an AnnData).
        min_size, max_size
            Keep sets with ``min_size <= n matched genes <= max_size``.
        min_fraction
            Keep sets whose matched fraction (matched / original size) is at least this.
        case_sensitive
            See :meth:`match`.

        Returns
        -------
        GeneSets
            Matched sets (genes are var_names), with ``match_report`` set.

        Raises
        ------
        ValueError
            If no set passes, with the best match and what to change.
        """
        if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
            raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}")
        if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < min_size:
            raise ValueError(
                f"max_size must be an integer >= min_size ({min_size}), got {max_size!r}"
            )
        if not (isinstance(min_fraction, (int, float, np.number)) and 0.0 <= min_fraction <= 1.0):
            raise ValueError(f"min_fraction must be a number in [0, 1], got {min_fraction!r}")
        if len(self) == 0:
            raise ValueError("the gene set collection is empty; read or build some sets first")
        var = _as_var_index(var_names)
        matched = self.match(var, case_sensitive=case_sensitive)
        n = matched.sizes.to_numpy()
        orig = self.sizes.to_numpy()
        frac = np.divide(n, orig, out=np.zeros(len(n), dtype=float), where=orig > 0)
        keep = (n >= min_size) & (n <= max_size) & (frac >= min_fraction)
        if not keep.any():
            best = int(n.max())
            msg = (
                f"none of the {len(self)} gene sets has between {min_size} and {max_size} genes "
                f"among the data's {len(var)} var_names"
            )
            if min_fraction > 0:
                msg += f" and at least {min_fraction:.0%} of its genes matched"
            msg += f" (best match: {best} genes"
            if min_fraction > 0:
                msg += f", best fraction {frac.max():.0%}"
            msg += "); "
            if best == 0 or best < min_size:
                msg += (
                    "check that gene identifiers are symbols of the same kind (e.g. not Ensembl "
                    f"IDs{'' if not case_sensitive else ', or use case_sensitive=False'}) "
                    "or lower min_size"
                )
            elif ((n >= min_size) & (n <= max_size)).any():
                msg += "lower min_fraction"
            else:
                msg += "raise max_size"
            raise ValueError(msg)
        kept = matched.subset([nm for nm, k in zip(matched.names, keep) if k])
        n_genes = len(kept.genes)
        dropped = {str(nm): (int(a), int(b)) for nm, a, b, k in zip(matched.names, n, orig, keep) if not k}
        kept.match_report = {
            "n_sets_in": len(self),
            "n_sets_kept": len(kept),
            "n_genes_matched": n_genes,
            "n_genes_data": len(var),
            "dropped": dropped,  # name -> (genes matched, genes in the set)
        }
        if dropped:
            closest = sorted(dropped.items(), key=lambda item: -item[1][0])
            named = ", ".join(f"{nm} ({a} of {b} genes matched)" for nm, (a, b) in closest[:10])
            more = f" and {len(dropped) - 10} more" if len(dropped) > 10 else ""
            warnings.warn(f"{len(dropped)} of {len(self)} gene sets were dropped (a set needs {min_size} to {max_size} "
                          f"genes among the data's{f', and {min_fraction:.0%} of its own,' if min_fraction else ''} genes): "
                          f"{named}{more}; change min_size / max_size to keep them (match_report['dropped'] lists "
                          "all)", UserWarning, stacklevel=2)
        logger.info(
            "kept %d of %d gene sets; %d of the data's %d genes are in at least one kept set",
            len(kept), len(self), n_genes, len(var),
        )
        return kept

    def to_mask(self, var_names, case_sensitive: bool = False) -> pd.DataFrame:
        """Genes x terms boolean DataFrame.

        Index = ``var_names`` in the given order, columns = set names. A set matching no gene
        gives an all-False column (use :meth:`filter` to drop such sets).
        """
        var = _as_var_index(var_names)
        pairs = self._pairs(var, case_sensitive)
        mask = np.zeros((len(var), len(self)), dtype=bool)
        mask[pairs["pos"].to_numpy(), pairs["term"].to_numpy()] = True
        return pd.DataFrame(mask, index=var, columns=pd.Index(self.names))

    # ------------------------------------------------------------------ redundancy
    def _incidence(self) -> sp.csr_matrix:
        """Sets x genes sparse 0/1 matrix over the collection's own (exact) symbols."""
        flat = [g for genes in self._sets.values() for g in genes]
        codes, _ = pd.factorize(pd.Index(flat, dtype=object)) if flat else (np.empty(0, int), None)
        n_per = [len(g) for g in self._sets.values()]
        rows = np.repeat(np.arange(len(self)), n_per)
        n_genes = int(codes.max()) + 1 if len(codes) else 0
        return sp.csr_matrix(
            (np.ones(len(codes), dtype=np.int64), (rows, codes)), shape=(len(self), n_genes)
        )

    def jaccard(self) -> sp.csr_matrix:
        """Sparse sets x sets Jaccard index (only pairs sharing at least one gene are stored)."""
        B = self._incidence()
        inter = (B @ B.T).tocoo()
        size = np.asarray(B.sum(axis=1)).ravel()
        union = size[inter.row] + size[inter.col] - inter.data
        return sp.csr_matrix((inter.data / union, (inter.row, inter.col)), shape=inter.shape)

    def merge_similar(self, threshold: float = 0.8) -> GeneSets:
        """Merge near-duplicate sets (Jaccard index >= ``threshold``).

        Greedy: sets are visited from largest to smallest (ties in collection order); each
        set not yet merged becomes a leader and absorbs every not-yet-merged set whose
        Jaccard index *with the leader* is >= ``threshold``. A merged set is named
        ``"LEADER|OTHER1|OTHER2"`` (leader first, then the absorbed sets largest first),
        holds the union of their genes (leader's genes first) and has the description
        ``"merged: LEADER, OTHER1, ..."``. Unmerged sets keep their name; the output keeps the
        order of the leaders in the collection. Symbols are compared exactly (case-sensitive),
        so match sets to the data first.

        Parameters
        ----------
        threshold
            Jaccard index in (0, 1]; 1 merges only identical sets.
        """
        if not (isinstance(threshold, (int, float, np.number)) and 0.0 < threshold <= 1.0):
            raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
        if len(self) < 2:
            return GeneSets(self._sets, self._descriptions)
        J = self.jaccard()
        J.data[J.data < threshold - 1e-12] = 0
        J.eliminate_zeros()
        J = J.tocsr()
        names = self.names
        sizes = self.sizes.to_numpy()
        order = np.lexsort((np.arange(len(self)), -sizes))
        rank = np.empty(len(self), dtype=np.int64)
        rank[order] = np.arange(len(self))
        done = np.zeros(len(self), dtype=bool)
        groups: dict[int, list[int]] = {}
        for i in order:
            if done[i]:
                continue
            done[i] = True
            nb = J.indices[J.indptr[i] : J.indptr[i + 1]]
            nb = nb[~done[nb] & (sizes[nb] > 0)]
            nb = nb[np.argsort(rank[nb], kind="stable")]
            done[nb] = True
            groups[int(i)] = [int(i), *nb.tolist()]
        sets, desc = {}, {}
        for leader in sorted(groups):
            members = groups[leader]
            if len(members) == 1:
                sets[names[leader]] = self._sets[names[leader]]
                desc[names[leader]] = self._descriptions[names[leader]]
                continue
            new = MERGE_SEP.join(names[m] for m in members)
            if new in sets or new in self._sets:
                raise ValueError(
                    f"merged name {new!r} clashes with an existing set name; rename that set"
                )
            sets[new] = [g for m in members for g in self._sets[names[m]]]
            desc[new] = "merged: " + ", ".join(names[m] for m in members)
        return GeneSets(sets, desc)


#: gene-set collections shipped with pathfactor: name -> (file in pathfactor/data/files, description)
BUNDLED = {
    "hallmark": ("hallmark_v7.5.1.gmt", "MSigDB Hallmark v7.5.1, 50 sets, human symbols"),
    "reactome_mouse": ("reactome_subset_mouse.gmt", "Reactome subset from Bioconductor slalom, 30 sets, mouse symbols"),
}


def bundled_gene_sets(name: str) -> GeneSets:
    """A bundled collection by name (see :data:`BUNDLED`), case-insensitively."""
    from importlib import resources

    key = name.lower() if isinstance(name, str) else name
    if key not in BUNDLED:
        known = ", ".join(f"{k!r} ({d})" for k, (_, d) in BUNDLED.items())
        raise ValueError(f"unknown gene set collection {name!r}; known ones: {known}")
    with resources.as_file(resources.files("pathfactor.data").joinpath("files", BUNDLED[key][0])) as path:
        return GeneSets.read_gmt(path)


def as_gene_sets(annotations) -> GeneSets | None:
    """GeneSets from a GeneSets, a {name: genes} mapping, a genes x terms boolean DataFrame, a file path, the name
    of a bundled collection (``"hallmark"``, ``"reactome_mouse"``: a file of that name wins), or a list of those
    (merged)."""
    if annotations is None:
        return None
    if isinstance(annotations, GeneSets):
        return annotations
    if isinstance(annotations, str) and annotations.lower() in BUNDLED and not Path(annotations).exists():
        return bundled_gene_sets(annotations)
    if isinstance(annotations, (str, PathLike)):
        return GeneSets.read(annotations)
    if isinstance(annotations, pd.DataFrame):
        return GeneSets.from_mask(annotations)
    if isinstance(annotations, dict):
        return GeneSets(annotations)
    if isinstance(annotations, (list, tuple)):
        if not annotations:
            raise ValueError("annotations is an empty list; pass None to fit without gene sets, or list "
                             "GeneSets / {name: genes} / GMT or JSON paths")
        parts = [as_gene_sets(a) for a in annotations]
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out
    raise ValueError(f"annotations must be GeneSets, a dict, a genes x terms DataFrame or a GMT/JSON path, "
                     f"got {type(annotations).__name__}")


def annotation_mask(annotations, var_names, min_size: int = 15, max_size: int = 500,
                    min_fraction: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """The genes x terms boolean mask (numpy) and term names of ``annotations`` (anything :func:`as_gene_sets`
    takes) after matching to ``var_names`` and filtering by size; an empty mask when ``annotations`` is None."""
    sets = as_gene_sets(annotations)
    if sets is None:
        return np.zeros((len(var_names), 0), dtype=bool), []
    sets = sets.filter(var_names, min_size=min_size, max_size=max_size, min_fraction=min_fraction)
    return sets.to_mask(var_names).to_numpy(), list(sets.names)
