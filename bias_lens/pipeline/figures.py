"""Figures of the main job: which plot function draws each result, and writing them all.

The figure builders live in :mod:`bias_lens.plot` (edit-stage ones in :mod:`bias_lens.plot.edits`);
this module only picks and writes them (plot modules are imported lazily).
"""

from __future__ import annotations

import logging
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
    """Per-profession gap and pronoun mass before vs after (:func:`bias_lens.plot.edits.profession_before_after`)."""
    from ..plot.edits import profession_before_after

    return profession_before_after(before, after, label, k)


def table_figure(org: dict[str, float], rows: list[dict[str, Any]]):
    """Bias vs retention of every edit row (:func:`bias_lens.plot.edits.edits_tradeoff`)."""
    from ..plot.edits import edits_tradeoff

    return edits_tradeoff(org, rows)


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
