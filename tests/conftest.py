from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """The real data of ../shared/data, or a skip saying why."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="module")
def torch_one_thread():
    """Small matrices: one torch thread for the module (two stall on fork/join when the cores are busy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_line_error(capsys):
    """``check(*words)``: stderr is one ``pathfactor: error: ...`` line, no traceback, naming every word."""
    def check(*words) -> str:
        err = capsys.readouterr().err.strip()
        assert err.startswith("pathfactor: error: "), err
        assert "\n" not in err, err
        assert "Traceback" not in err
        for word in words:
            assert word.lower() in err.lower(), err
        return err
    return check


@pytest.fixture
def figures(monkeypatch):
    """The report's drawing replaced by a stub that records each figure's plot function and arguments (fast
    structure tests)."""
    from pathfactor.report import html as report_html

    calls = []

    def fake(draw, *args, alt, **kwargs):
        calls.append((draw.__name__, args, kwargs))
        return f'<img src="data:image/png;base64,AAAA" alt="{alt}">'

    monkeypatch.setattr(report_html, "figure", fake)
    return calls


def _tiny_mudata(seed: int = 0, missing: bool = True, n: int = 120, g_rna: int = 30, g_bin: int = 12):
    """Two views of ``n`` cells sharing 2 factors: 'rna' (Gaussian; 10 % NaN when ``missing``) and 'acc' (0/1),
    with a 'group' column in obs."""
    import warnings

    import anndata as ad
    import mudata as md
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    W1 = rng.normal(size=(g_rna, 2)) * (rng.random((g_rna, 2)) < 0.6)
    W2 = 2 * rng.normal(size=(g_bin, 2))
    Y1 = (X @ W1.T + 0.5 * rng.normal(size=(n, g_rna))).astype(np.float32)
    Y2 = (rng.random((n, g_bin)) < 1 / (1 + np.exp(-(X @ W2.T)))).astype(np.float32)
    hidden = rng.random(Y1.shape) < 0.1
    if missing:
        Y1[hidden] = np.nan
    rna, acc = ad.AnnData(Y1), ad.AnnData(Y2)
    rna.obs_names = acc.obs_names = [f"c{i}" for i in range(n)]
    rna.var_names = [f"g{j}" for j in range(g_rna)]
    acc.var_names = [f"p{j}" for j in range(g_bin)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.MuData({"rna": rna, "acc": acc})
    mdata.obs["group"] = pd.Categorical(np.where(X[:, 0] > 0, "high", "low"))
    return mdata


@pytest.fixture(scope="session")
def tiny_mudata():
    """The builder of a tiny two-view MuData (``_tiny_mudata``); needs mudata."""
    pytest.importorskip("mudata")
    return _tiny_mudata
