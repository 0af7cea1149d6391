"""Writing plotly figures: HTML always, PNG when a Chrome/Chromium is available.

``plotlyjs`` says where the HTML finds plotly.js (4.8 MB): ``"inline"`` embeds it in every file
(self-contained, the default); ``"directory"`` writes ``plotly.min.js`` once beside the HTML and
each file loads it by relative path (opens offline, several figures share one copy; keep the
file with the HTML); ``"cdn"`` loads it from the plotly CDN (smallest, needs a network).

PNG export goes through kaleido, which drives a Chrome/Chromium; :func:`chromium_path` looks for
one once per process (kaleido's own ``BROWSER_PATH``/``CHROME_PATH`` variables, then the usual
executable names) and when none is found PNGs are skipped with a log message, never an error. Every file is written atomically.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import plotly.graph_objects as go

from ..io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)
PLOTLYJS_MODES = ("inline", "directory", "cdn")
PLOTLYJS_FILE = "plotly.min.js"
_CANDIDATES = (
    "chromium", "chromium-browser", "chromium-headless-shell", "chrome-headless-shell",
    "google-chrome", "google-chrome-stable", "chrome",
)


@functools.lru_cache(maxsize=1)
def chromium_path() -> str | None:
    """Path of a Chrome/Chromium executable kaleido can drive, or None (looked up once)."""
    for var in ("BROWSER_PATH", "CHROME_PATH"):
        p = os.environ.get(var)
        if p and os.access(p, os.X_OK):
            return p
    for name in _CANDIDATES:
        p = shutil.which(name)
        if p:
            return p
    return None


def _png_bytes(fig: go.Figure) -> bytes | None:
    exe = chromium_path()
    if exe is None:
        log.info("PNG skipped: no Chrome/Chromium found (install Debian's chromium or set BROWSER_PATH)")
        return None
    os.environ.setdefault("BROWSER_PATH", exe)
    try:
        return fig.to_image(format="png", scale=2)
    except Exception as err:  # kaleido/browser failures must not lose the HTML figure
        log.warning("PNG skipped: kaleido could not render with %s (%s: %s)", exe, type(err).__name__, err)
        return None


def ensure_plotlyjs(folder: str | os.PathLike) -> Path | None:
    """Write ``folder/plotly.min.js`` (the bundle plotly ships) unless it is already there; the
    path when written, else None."""
    from plotly.offline import get_plotlyjs

    path = Path(folder) / PLOTLYJS_FILE
    data = get_plotlyjs().encode("utf-8")
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return None
    return atomic_write_bytes(path, data)


def write_figure(fig: go.Figure, path_without_ext: str | os.PathLike, png: bool | None = None,
                 plotlyjs: str = "inline") -> list[Path]:
    """Write ``<path>.html`` and, if possible, ``<path>.png``; return the paths written.

    ``plotlyjs`` is one of :data:`PLOTLYJS_MODES` (module docstring); with ``"directory"`` the
    shared ``plotly.min.js`` is among the paths returned when this call wrote it. ``png=None``
    writes a PNG when a Chromium is available; ``png=False`` never does; ``png=True`` also only
    writes one when a Chromium is available (logging why otherwise). The parent folder must exist.
    """
    if plotlyjs not in PLOTLYJS_MODES:
        raise ValueError(f"plotlyjs must be one of {', '.join(PLOTLYJS_MODES)}, got {plotlyjs!r}")
    base = Path(path_without_ext)
    html = base.with_name(base.name + ".html")
    include = {"inline": True, "directory": "directory", "cdn": "cdn"}[plotlyjs]
    written = [atomic_write_text(html, fig.to_html(include_plotlyjs=include, full_html=True))]
    if plotlyjs == "directory":
        js = ensure_plotlyjs(html.parent)
        written += [js] if js is not None else []
    if png is False:
        return written
    data = _png_bytes(fig)
    if data is not None:
        written.append(atomic_write_bytes(base.with_name(base.name + ".png"), data))
    return written
