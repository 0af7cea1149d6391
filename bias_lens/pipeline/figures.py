"""Figures of the main job (plotly; analysis code never imports plotly, this module only draws)."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def locate_figures(results: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(name, figure)`` for every locate result present."""
    from ..plot import attribution as pa
    from ..plot import circuit as pc
    from ..plot import gradients as pg
    from ..plot import locate as pl

    figs: list[tuple[str, Any]] = []
    add = figs.append
    if "layer" in results:
        add(("layer_prompt_heatmap", pl.layer_prompt_heatmap(results["layer"])))
        add(("layer_argmax_histogram", pl.argmax_histogram(results["layer"])))
        add(("layer_scores", pl.layer_figure(results["layer"])))
    if "layer_cg" in results:
        add(("layer_scores_genbiaspro_cg", pl.layer_figure(results["layer_cg"], title="Layer score (MSME Eq. 2) on GenBiasPro-CG")))
    if "bmi" in results:
        add(("bmi", pl.bmi_figure(results["bmi"], results.get("bmi_robustness"))))
    if "module" in results:
        add(("module_heatmap", pl.module_heatmap(results["module"])))
    if "row" in results:
        add(("row_cosines", pg.row_cosine_histogram(results["row"])))
    if "neuron" in results:
        add(("neuron_entries", pg.entry_heatmap(results["neuron"])))
    if "attribution" in results:
        add(("neuron_attribution", pa.neuron_heatmap(results["attribution"])))
    if "heads" in results:
        add(("head_attribution", pa.head_heatmap(results["heads"])))
    if "circuit" in results:
        from ..locate.circuit import CircuitGraph

        add(("circuit", pc.circuit_figure(CircuitGraph(**results["circuit"]))))
    return figs


def profession_bars(before: list[dict], after: list[dict], label: str, k: int = 20):
    """Per-profession mean p(he) - p(she) before vs after, for the ``k`` largest |change|."""
    import plotly.graph_objects as go

    def per_prof(rows: list[dict]) -> dict[str, float]:
        acc: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            acc[r["profession"]].append(r["p_he"] - r["p_she"])
        return {p: sum(v) / len(v) for p, v in acc.items()}

    b, a = per_prof(before), per_prof(after)
    common = sorted(set(b) & set(a), key=lambda p: -abs(a[p] - b[p]))[:k]
    fig = go.Figure([go.Bar(name="original", x=common, y=[b[p] for p in common]),
                     go.Bar(name=label, x=common, y=[a[p] for p in common])])
    fig.update_layout(barmode="group", title=f"p(he) - p(she) per profession, before vs after '{label}' "
                      f"(GenBiasEval test, {k} largest changes)", yaxis_title="mean p(he) - p(she)")
    return fig


def table_figure(org: dict[str, float], rows: list[dict[str, Any]]):
    """AFGB vs perplexity of every edit row (the trade-off at a glance)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[org["perplexity"]], y=[org["afgb"]], mode="markers+text", text=["Org"],
                             textposition="top center", marker=dict(size=12, symbol="star")))
    fig.add_trace(go.Scatter(x=[r["metrics"]["perplexity"] for r in rows], y=[r["metrics"]["afgb"] for r in rows],
                             mode="markers+text", text=[r["row"]["name"] for r in rows], textposition="top center"))
    fig.update_layout(title="Bias (AFGB, GenBiasEval test) vs retention perplexity per edit", showlegend=False,
                      xaxis_title="retention perplexity", yaxis_title="AFGB")
    return fig


def write_all(figs: list[tuple[str, Any]], folder: Path, png: bool = True) -> dict[str, list[str]]:
    """HTML (sharing one ``plotly.min.js`` in ``folder``) and PNG (when a Chromium renders) per figure."""
    from ..io import atomic_write_bytes
    from ..plot.io import _png_bytes, chromium_path

    folder.mkdir(parents=True, exist_ok=True)
    can_png = png and chromium_path() is not None
    if png and not can_png:
        log.info("no Chromium found: figures written as HTML only")
    written: dict[str, list[str]] = {}
    for name, fig in figs:
        fig.write_html(folder / f"{name}.html", include_plotlyjs="directory", full_html=True)
        written[name] = [f"{name}.html"]
        if can_png:
            data = _png_bytes(fig)
            if data is not None:
                atomic_write_bytes(folder / f"{name}.png", data)
                written[name].append(f"{name}.png")
    return written
