"""Figures of the main job (``bias-lens run``): one builder per figure, drawn from the run's results.

Each builder takes the run's ``results`` mapping (locate-stage name -> :class:`LocateResult`, the
circuit as a :meth:`CircuitGraph.to_dict` dict) and returns one plotly figure made by the plot
modules (:mod:`.locate`, :mod:`.gradients`, :mod:`.attribution`, :mod:`.circuit`); which builder
runs for which result, and where the figures go, is decided by :mod:`bias_lens.pipeline.figures`.
:func:`write_figures` writes a list of figures into one folder: HTML sharing one ``plotly.min.js``,
plus PNG when a Chromium renders, every file atomically (:func:`.io.write_figure`);
:func:`figure_fragments` gives the ``<div>`` s a self-contained HTML page embeds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import plotly.graph_objects as go

from . import attribution as pa
from . import circuit as pc
from . import gradients as pg
from . import locate as pl
from .io import PLOTLYJS_FILE, chromium_path, write_figure

log = logging.getLogger(__name__)
CG_TITLE = "Layer score (MSME Eq. 2) on GenBiasPro-CG"


def _drawn_from(name: str, key: str, module: ModuleType, fn: str) -> Callable[[Mapping[str, Any]], go.Figure]:
    """A builder named ``name``: ``module.fn(results[key])`` (the plot function looked up when it runs)."""
    def build(results: Mapping[str, Any]) -> go.Figure:
        return getattr(module, fn)(results[key])

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"``{module.__name__.rsplit('.', 1)[-1]}.{fn}`` of result ``{key}``."
    return build


layer_prompt_heatmap = _drawn_from("layer_prompt_heatmap", "layer", pl, "layer_prompt_heatmap")
layer_argmax_histogram = _drawn_from("layer_argmax_histogram", "layer", pl, "argmax_histogram")
layer_scores = _drawn_from("layer_scores", "layer", pl, "layer_figure")
module_heatmap = _drawn_from("module_heatmap", "module", pl, "module_heatmap")
row_cosines = _drawn_from("row_cosines", "row", pg, "row_cosine_histogram")
neuron_entries = _drawn_from("neuron_entries", "neuron", pg, "entry_heatmap")
neuron_attribution = _drawn_from("neuron_attribution", "attribution", pa, "neuron_heatmap")
head_attribution = _drawn_from("head_attribution", "heads", pa, "head_heatmap")
layer_agreement = _drawn_from("layer_agreement", "agreement", pl, "agreement_heatmap")


def layer_scores_genbiaspro_cg(results: Mapping[str, Any]) -> go.Figure:
    """The layer score on GenBiasPro-CG prompts (result ``layer_cg``)."""
    return pl.layer_figure(results["layer_cg"], title=CG_TITLE)


def bmi(results: Mapping[str, Any]) -> go.Figure:
    """BMI, with the robustness resamples when the run computed them (``bmi_robustness``)."""
    return pl.bmi_figure(results["bmi"], results.get("bmi_robustness"))


def circuit(results: Mapping[str, Any]) -> go.Figure:
    """The traced circuit, stored by the run as a :meth:`CircuitGraph.to_dict` dict."""
    from ..locate.circuit import CircuitGraph

    return pc.circuit_figure(CircuitGraph(**results["circuit"]))


def neuron_projection(results: Mapping[str, Any]) -> go.Figure:
    """The vocabulary projection of the top attribution neurons (the paper's Table 2; result ``projection``)."""
    from .attribution import projection_table

    p = results["projection"]
    return projection_table(p["tokens"], scores=dict(zip(p["labels"], p["scores"])))


def figure_fragments(figs: Sequence[tuple[str, go.Figure]]) -> list[str]:
    """One HTML ``<div>`` per figure for embedding in a page (``report.html``): plotly.js is inlined
    in the first fragment only, so the page is self-contained and carries one copy."""
    import plotly.io as pio

    return [pio.to_html(fig, include_plotlyjs=i == 0, full_html=False) for i, (_, fig) in enumerate(figs)]


def write_figures(figs: Sequence[tuple[str, go.Figure]], folder: str | Path, png: bool = True) -> dict[str, list[str]]:
    """Write ``folder/<name>.html`` (all sharing one ``plotly.min.js`` in ``folder``) and, when
    ``png`` and a Chromium renders, ``<name>.png`` per figure; ``name -> file names written``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    can_png = png and chromium_path() is not None
    if png and not can_png:
        log.info("no Chromium found: figures written as HTML only")
    written: dict[str, list[str]] = {}
    for name, fig in figs:
        paths = write_figure(fig, folder / name, png=None if can_png else False, plotlyjs="directory")
        written[name] = [p.name for p in paths if p.name != PLOTLYJS_FILE]
    return written
