"""``write_figure``'s plotly.js modes: one shared bundle (directory), CDN, or embedded (inline).

The oracle for the bundle is plotly's own :func:`plotly.offline.get_plotlyjs`.
"""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from bias_lens.plot.io import write_figure


def _fig(n: int) -> go.Figure:
    return go.Figure(go.Bar(x=list(range(n)), y=list(range(n))))


def test_directory_writes_one_shared_bundle(tmp_path):
    bundle = get_plotlyjs()
    first = write_figure(_fig(3), tmp_path / "a", png=False, plotlyjs="directory")
    second = write_figure(_fig(4), tmp_path / "b", png=False, plotlyjs="directory")
    assert first == [tmp_path / "a.html", tmp_path / "plotly.min.js"]
    assert second == [tmp_path / "b.html"]  # the bundle is already there
    assert (tmp_path / "plotly.min.js").read_text() == bundle
    for name in ("a.html", "b.html"):
        html = (tmp_path / name).read_text()
        assert 'src="plotly.min.js"' in html and bundle not in html and len(html) < len(bundle) // 100


def test_cdn_and_inline(tmp_path):
    bundle = get_plotlyjs()
    write_figure(_fig(3), tmp_path / "c", png=False, plotlyjs="cdn")
    assert "https://cdn.plot.ly/plotly-" in (tmp_path / "c.html").read_text()
    write_figure(_fig(3), tmp_path / "i", png=False)  # default: self-contained, as before
    assert bundle in (tmp_path / "i.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.html", "i.html"]


def test_unknown_mode_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="plotlyjs"):
        write_figure(_fig(3), tmp_path / "x", png=False, plotlyjs="embed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode,js", [("cdn", False), ("inline", False), ("directory", True)])
def test_locate_plotlyjs_option(tiny_tokenizer_dir, tmp_path, capsys, mode, js):
    from bias_lens.cli import main
    from conftest import build_tiny

    build_tiny("llama", tiny_tokenizer_dir, tmp_path / "m")
    (tmp_path / "p.txt").write_text("The nurse said that\n")
    out = tmp_path / "o"
    assert main(["locate", "bmi", "--model", str(tmp_path / "m"), "--prompts-file", str(tmp_path / "p.txt"),
                 "--out", str(out), "--plotlyjs", mode]) == 0
    assert (out / "plotly.min.js").exists() is js
    assert (get_plotlyjs() in (out / "bmi.html").read_text()) is (mode == "inline")
