"""The main job's figures: ``pipeline.figures`` picks which ``plot.run`` builder draws which result,
``plot.run.write_figures`` writes them (HTML sharing one plotly.js, atomically). The figures
themselves are compared with direct calls of the plot functions on the same hand-built results."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from bias_lens.pipeline import figures as pf
from bias_lens.plot import attribution as pa
from bias_lens.plot import circuit as pc
from bias_lens.plot import gradients as pg
from bias_lens.plot import locate as pl
from bias_lens.plot import run as pr
from test_figures_layout import (bmi_results, circuit_graph, entry_result, head_result, layer_result, module_result,
                                 neuron_result, row_result)

ROOT = Path(__file__).resolve().parents[1]


PROJECTION = {"labels": ["L1N2", "L0H1V3"], "scores": [0.5, -0.25], "source": "attribution",
              "tokens": {"L1N2": {"top": [" she", " her"], "bottom": [" he", "\n"]},
                         "L0H1V3": {"top": [" his", " him"], "bottom": [" x", " y"]}}}


def all_results() -> dict:
    from bias_lens.pipeline.locate_stage import layer_agreement

    res, rob = bmi_results()
    out = {"layer": layer_result(), "layer_cg": layer_result(), "bmi": res, "bmi_robustness": rob, "module": module_result(),
           "row": row_result(), "neuron": entry_result(), "attribution": neuron_result(), "heads": head_result(),
           "circuit": circuit_graph(), "projection": PROJECTION}
    out["agreement"] = layer_agreement(out, 4)
    return out


def test_each_figure_is_the_plot_function_on_its_result():
    from bias_lens.locate.circuit import CircuitGraph

    r = all_results()
    want = {
        "layer_prompt_heatmap": pl.layer_prompt_heatmap(r["layer"]),
        "layer_argmax_histogram": pl.argmax_histogram(r["layer"]),
        "layer_scores": pl.layer_figure(r["layer"]),
        "layer_scores_genbiaspro_cg": pl.layer_figure(r["layer_cg"], title="Layer score (MSME Eq. 2) on GenBiasPro-CG"),
        "bmi": pl.bmi_figure(r["bmi"], r["bmi_robustness"]),
        "module_heatmap": pl.module_heatmap(r["module"]),
        "row_cosines": pg.row_cosine_histogram(r["row"]),
        "neuron_entries": pg.entry_heatmap(r["neuron"]),
        "neuron_attribution": pa.neuron_heatmap(r["attribution"]),
        "head_attribution": pa.head_heatmap(r["heads"]),
        "circuit": pc.circuit_figure(CircuitGraph(**r["circuit"])),
        "neuron_projection": pa.projection_table(PROJECTION["tokens"], scores={"L1N2": 0.5, "L0H1V3": -0.25}),
        "layer_agreement": pl.agreement_heatmap(r["agreement"]),
    }
    got = pf.locate_figures(r)
    assert [n for n, _ in got] == list(want)  # report order
    for name, fig in got:
        assert fig.to_json() == want[name].to_json(), name


def test_only_results_present_are_drawn():
    r = all_results()
    got = [n for n, _ in pf.locate_figures({k: r[k] for k in ("bmi", "row", "circuit")})]
    assert got == ["bmi", "row_cosines", "circuit"]
    assert pf.locate_figures({}) == []
    # BMI without the robustness resamples is drawn without them
    assert pf.locate_figures({"bmi": r["bmi"]})[0][1].to_json() == pl.bmi_figure(r["bmi"]).to_json()


def test_write_figures_html_share_one_plotlyjs(tmp_path):
    r = all_results()
    figs = pf.locate_figures({k: r[k] for k in ("layer", "bmi")})
    written = pf.write_all(figs, tmp_path / "figures", png=False)
    names = [n for n, _ in figs]
    assert written == {n: [f"{n}.html"] for n in names}
    folder = tmp_path / "figures"
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{n}.html" for n in names] + ["plotly.min.js"])
    for n in names:
        html = (folder / f"{n}.html").read_text()
        assert '<script charset="utf-8" src="plotly.min.js"></script>' in html and "Plotly.newPlot" in html
    from plotly.offline import get_plotlyjs

    assert (folder / "plotly.min.js").read_text() == get_plotlyjs()


def test_figure_fragments_embed_plotlyjs_once():
    import plotly.io as pio

    r = all_results()
    figs = pf.locate_figures({k: r[k] for k in ("layer", "bmi")})
    frags = pr.figure_fragments(figs)
    assert frags[0].count("window.PlotlyConfig") == 1 and all("window.PlotlyConfig" not in f for f in frags[1:])
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    norm = lambda html: re.sub(uuid, "ID", html)  # noqa: E731  (each div gets a fresh random id)
    for (_, fig), frag, first in zip(figs, frags, (True, False, False, False)):
        assert norm(frag) == norm(pio.to_html(fig, include_plotlyjs=first, full_html=False))


def test_figure_orchestration_never_imports_plotly():
    """No module of ``pipeline/`` imports plotly (figures are built in ``plot/``); ``pipeline/figures.py``
    picks builders by name and every name it uses exists in ``plot.run``."""
    for path in sorted((ROOT / "bias_lens" / "pipeline").glob("*.py")):
        tree = ast.parse(path.read_text())
        mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        mods += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in mods if m.split(".")[0] == "plotly"], path.name
    assert all(callable(getattr(pr, builder, None)) for _, _, builder in pf.LOCATE_FIGURES)


def test_projection_table_cells_are_the_tokens_in_order():
    fig = pa.projection_table(PROJECTION["tokens"], scores=dict(zip(PROJECTION["labels"], PROJECTION["scores"])))
    cells = fig.data[0].cells.values
    assert list(cells[0]) == ["L1N2", "L0H1V3"] and list(cells[1]) == ["+0.5", "-0.25"]
    assert list(cells[2]) == [" she |  her", " his |  him"] and list(cells[3]) == [" he | \\n", " x |  y"]
    assert len(pa.projection_table(PROJECTION["tokens"]).data[0].cells.values) == 3  # no score column
