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
