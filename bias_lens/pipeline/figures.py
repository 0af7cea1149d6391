"""Figures of the main job: which figure is drawn from which result, and where they are written.

The builders live in :mod:`bias_lens.plot.run` (locate-stage figures) and :mod:`bias_lens.plot.edits`
(edit-stage ones); this module only picks them and says where they go. Nothing here imports
plotly: the plot modules are imported lazily, when a figure is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# figures are plotly Figures typed ``Any``: pipeline/ never imports plotly, not even for type checking

#: (figure name, result it is drawn from, builder in :mod:`bias_lens.plot.run`), in report order;
#: a figure is drawn only when the run has its result.
LOCATE_FIGURES: tuple[tuple[str, str, str], ...] = (
    ("layer_prompt_heatmap", "layer", "layer_prompt_heatmap"),
    ("layer_argmax_histogram", "layer", "layer_argmax_histogram"),
    ("layer_scores", "layer", "layer_scores"),
    ("layer_scores_genbiaspro_cg", "layer_cg", "layer_scores_genbiaspro_cg"),
    ("bmi", "bmi", "bmi"),
    ("module_heatmap", "module", "module_heatmap"),
    ("row_cosines", "row", "row_cosines"),
    ("neuron_entries", "neuron", "neuron_entries"),
    ("neuron_attribution", "attribution", "neuron_attribution"),
    ("head_attribution", "heads", "head_attribution"),
    ("circuit", "circuit", "circuit"),
    ("neuron_projection", "projection", "neuron_projection"),
    ("layer_agreement", "agreement", "layer_agreement"),
)


def locate_figures(results: dict[str, Any]) -> list[tuple[str, Any]]:
    """``(name, figure)`` for every locate result present (:data:`LOCATE_FIGURES`)."""
    from ..plot import run as pr

    return [(name, getattr(pr, builder)(results)) for name, key, builder in LOCATE_FIGURES if key in results]


def profession_bars(before: list[dict], after: list[dict], label: str, k: int = 20) -> Any:
    """Per-profession gap and pronoun mass before vs after (:func:`bias_lens.plot.edits.profession_before_after`)."""
    from ..plot.edits import profession_before_after

    return profession_before_after(before, after, label, k)


def table_figure(org: dict[str, float], rows: list[dict[str, Any]]) -> Any:
    """Bias vs retention of every edit row (:func:`bias_lens.plot.edits.edits_tradeoff`)."""
    from ..plot.edits import edits_tradeoff

    return edits_tradeoff(org, rows)


def write_all(figs: list[tuple[str, Any]], folder: Path, png: bool = True) -> dict[str, list[str]]:
    """Write every figure into ``folder`` (:func:`bias_lens.plot.run.write_figures`: HTML sharing one
    ``plotly.min.js``, PNG when a Chromium renders); ``name -> file names written``."""
    from ..plot.run import write_figures

    return write_figures(figs, folder, png=png)
