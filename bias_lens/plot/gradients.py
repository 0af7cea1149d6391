"""Plotly figures for gradient locating: row-cosine distribution and neuron-entry heatmaps."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from ..labels import EntryLabel, RowLabel, parse_all
from ..locate.result import LocateResult
from .layout import titled


def row_cosine_histogram(result: LocateResult, *, n_bins: int = 60, title: str | None = None) -> go.Figure:
    """Histogram of the row cosines, kept rows and the rest as two overlaid traces (MSME Eq. 4)."""
    parsed = parse_all(result.labels, RowLabel)
    if not result.labels or parsed is None:
        raise ValueError("row_cosine_histogram needs a row_scale result (labels like L3.mlp.down/row7)")
    cos = result.scores.double()
    sel = torch.zeros(len(cos), dtype=torch.bool)
    sel[torch.as_tensor(result.extras.get("selected_rows", []), dtype=torch.long)] = True
    lo, hi = float(cos.min()), float(cos.max())
    size = (hi - lo) / n_bins if hi > lo else 1.0
    bins = {"start": lo, "end": hi + size, "size": size}
    fig = go.Figure()
    fig.add_trace(go.Histogram(x=cos[~sel].tolist(), xbins=bins, name=f"other rows ({int((~sel).sum())})", marker_color="#9aa5b1"))
    fig.add_trace(go.Histogram(x=cos[sel].tolist(), xbins=bins, name=f"selected rows ({int(sel.sum())})", marker_color="#d1495b"))
    module = result.extras.get("module", str(parsed[0].module))
    fig.update_layout(barmode="overlay", xaxis_title="cosine of the two target gradients (row)", yaxis_title="rows",
                      legend={"orientation": "h", "x": 0, "y": 1.0, "yanchor": "bottom"})
    fig.update_traces(opacity=0.8)
    return titled(fig, title or f"Row cosines cos(grad he, grad she) of {module} (MSME Eq. 4)", result.variant)


def row_cosine_strip(result: LocateResult, *, title: str | None = None) -> go.Figure:
    """Cosine per row index (selected rows highlighted): where in the weight the kept rows sit."""
    parsed = parse_all(result.labels, RowLabel)
    if parsed is None:
        raise ValueError("row_cosine_strip needs a row_scale result")
    rows = [r.row for r in parsed]
    sel = set(result.extras.get("selected_rows", []))
    colour = ["#d1495b" if r in sel else "#9aa5b1" for r in rows]
    fig = go.Figure(go.Scattergl(x=rows, y=result.scores.tolist(), mode="markers", marker={"color": colour, "size": 4}))
    fig.update_layout(xaxis_title="row", yaxis_title="cosine")
    return titled(fig, title or "Row cosine by row index", f"{result.variant}; red: selected rows")


def entry_heatmap(result: LocateResult, *, value: str = "count", max_cols: int = 256, title: str | None = None) -> go.Figure:
    """Selected rows x columns heatmap of a neuron_scale result.

    ``value``: ``"count"`` (prompts choosing the entry, the score), ``"max"`` or ``"mean"``
    importance |g_he - g_she|. Columns are binned to at most ``max_cols`` (a cell shows the largest
    value in its bin); empty cells are blank.
    """
    if value not in ("count", "max", "mean"):
        raise ValueError(f"value must be 'count', 'max' or 'mean', got {value!r}")
    parsed = parse_all(result.labels, EntryLabel)
    if not parsed:
        raise ValueError("entry_heatmap needs a neuron_scale result (labels like L3.mlp.down/row7/col3)")
    vals = result.scores if value == "count" else result.extras[f"{value}_importance"]
    vals = torch.as_tensor(vals, dtype=torch.float64).tolist()
    rows = sorted({e.row for e in parsed})
    n_cols = int(result.extras.get("n_cols") or max(e.col for e in parsed) + 1)
    width = -(-n_cols // min(max_cols, n_cols))
    n_bins = -(-n_cols // width)
    grid = torch.full((len(rows), n_bins), float("nan"), dtype=torch.float64)
    at = {r: i for i, r in enumerate(rows)}
    for e, v in zip(parsed, vals):
        i, j = at[e.row], e.col // width
        if torch.isnan(grid[i, j]) or v > grid[i, j]:
            grid[i, j] = v
    x = [str(j * width) if width == 1 else f"{j * width}-{min(n_cols, (j + 1) * width) - 1}" for j in range(n_bins)]
    fig = go.Figure(go.Heatmap(z=grid.tolist(), x=x, y=[f"row{r}" for r in rows], colorscale="Viridis",
                               colorbar={"title": "prompts" if value == "count" else f"{value} |g_he-g_she|"}))
    n = result.extras.get("n_entries", len(result.labels))
    fig.update_layout(xaxis_title="column" + (f" bin (width {width})" if width > 1 else ""), yaxis_title="selected row")
    module = result.extras.get("module", str(parsed[0].module))
    return titled(fig, title or f"Weight entries of {module} chosen per prompt (MSME Eq. 5)",
                  f"{n} entries in {len(rows)} rows; cell = {value}; {result.variant}")
