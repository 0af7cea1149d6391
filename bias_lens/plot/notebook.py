"""One call at the top of every notebook: figures that show in JupyterLab *and* in exported HTML.

Plotly's JupyterLab default (``plotly_mimetype``) stores only the figure JSON, which JupyterLab
draws but an nbconvert HTML export (or GitHub's viewer) shows as nothing. ``"plotly_mimetype+
notebook"`` stores both the JSON and an HTML ``<div>`` + ``Plotly.newPlot`` script; the
``notebook`` renderer embeds plotly.js itself once per kernel (no CDN), so the exported HTML
draws every figure offline.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
#: JupyterLab's JSON mime bundle plus offline HTML (plotly.js embedded, not fetched from a CDN).
NOTEBOOK_RENDERER = "plotly_mimetype+notebook"


def setup_notebook(renderer: str | None = None) -> str:
    """Set plotly's default renderer for notebooks and return it.

    ``renderer`` wins; else the ``PLOTLY_RENDERER`` environment variable if set (a deliberate
    user choice); else :data:`NOTEBOOK_RENDERER`.
    """
    import plotly.io as pio

    chosen = renderer or os.environ.get("PLOTLY_RENDERER") or NOTEBOOK_RENDERER
    pio.renderers.default = chosen
    log.info("plotly renderer: %s", chosen)
    return chosen
