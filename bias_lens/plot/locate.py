"""Plotly figures for layer-scale, BMI and module-scale results (MSME Figs. 3-4, LFTF Fig. 2).

Each function takes a :class:`~bias_lens.locate.result.LocateResult` and returns a ``go.Figure``
whose title names the method and whose subtitle names the variant, model and sample count
(wrapped to the canvas by :func:`.layout.titled`); nothing is shown or written here (see :mod:`.io`).
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..locate.result import LocateResult
from .layout import titled


def _need(result: LocateResult, method: str) -> None:
    if result.method != method:
        raise ValueError(f"expected a {method!r} result, got {result.method!r}")


def _who(result: LocateResult, note: str = "") -> str:
    """Subtitle: variant; model, n (and an optional note)."""
    who = f"{result.model}, n={result.n_samples}" if result.model else f"n={result.n_samples}"
    return f"{result.variant}; {who}{note}"


def layer_prompt_heatmap(result: LocateResult, *, title: str | None = None) -> go.Figure:
    """Prompt x layer heatmap of MSME Eq. 2 scores (needs ``per_prompt``)."""
    _need(result, "layer")
    if result.per_prompt is None:
        raise ValueError("this layer result has no per_prompt matrix; rerun layer_scale")
    z = result.per_prompt.double()
    fig = go.Figure(go.Heatmap(z=z.tolist(), x=result.labels, y=list(range(z.shape[0])), colorscale="Viridis",
                               colorbar={"title": "I(L_i)"}))
    fig.update_layout(xaxis_title="layer", yaxis_title="prompt")
    return titled(fig, title or "Layer importance per prompt (MSME Eq. 2)", _who(result))


def argmax_histogram(result: LocateResult, *, title: str | None = None) -> go.Figure:
    """How many prompts have each layer as their most important one (MSME Fig. 3 right)."""
    _need(result, "layer")
    counts = result.extras.get("per_sample_argmax")
    if counts is None:
        raise ValueError("this layer result has no per_sample_argmax extra")
    fig = go.Figure(go.Bar(x=result.labels, y=list(counts)))
    fig.update_layout(xaxis_title="layer", yaxis_title="prompts")
    return titled(fig, title or "Most important layer per prompt (MSME Eq. 2 argmax)", _who(result))


def layer_figure(result: LocateResult, *, title: str | None = None) -> go.Figure:
    """MSME Fig. 3: prompt x layer heatmap above the mean score and the argmax-layer histogram."""
    _need(result, "layer")
    fig = make_subplots(rows=2, cols=2, row_heights=[0.6, 0.4], specs=[[{"colspan": 2}, None], [{}, {}]],
                        subplot_titles=("per prompt", "mean over prompts", "argmax layer count"))
    hm = layer_prompt_heatmap(result).data[0]
    hm.colorbar = {"title": "I(L_i)", "len": 0.55, "y": 0.75}
    fig.add_trace(hm, row=1, col=1)
    fig.add_trace(go.Bar(x=result.labels, y=result.scores.tolist(), name="mean"), row=2, col=1)
    fig.add_trace(go.Bar(x=result.labels, y=list(result.extras.get("per_sample_argmax", [])), name="argmax"), row=2, col=2)
    fig.update_layout(showlegend=False)
    return titled(fig, title or "Layer scale (MSME Eq. 2)", _who(result), height=780)


def bmi_figure(result: LocateResult, robustness: LocateResult | None = None, *, title: str | None = None) -> go.Figure:
    """LFTF Fig. 2: BMI per block, with +-1 std error bars across seeds when a robustness result is given."""
    _need(result, "bmi")
    rob = robustness if robustness is not None else (result if "std" in result.extras else None)
    err = None
    if rob is not None:
        if rob.labels != result.labels:
            raise ValueError("robustness result does not have the same blocks as the BMI result")
        err = {"type": "data", "array": list(rob.extras["std"]), "visible": True}
    fig = go.Figure(go.Bar(x=result.labels, y=result.scores.tolist(), error_y=err, name="BMI"))
    note = f"; error bars: std over {len(rob.extras['seeds'])} seeds x {rob.extras['n']}" if rob is not None else ""
    fig.update_layout(xaxis_title="block", yaxis_title="BMI = 1 - cos(H_i, H_i+1)")
    return titled(fig, title or "Block modification intensity (LFTF Eq. 4)", _who(result, note))


def module_heatmap(result: LocateResult, *, final: bool = False, title: str | None = None) -> go.Figure:
    """MSME Fig. 4: layer x module importance (block-output score, or the final-output effect)."""
    _need(result, "module")
    key = "matrix_final" if final else "matrix"
    if key not in result.extras:
        raise ValueError(f"this module result has no {key!r}; rerun module_scale{' with final=True' if final else ''}")
    z = torch.as_tensor(result.extras[key], dtype=torch.float64)
    fig = go.Figure(go.Heatmap(z=z.tolist(), x=list(result.extras["module_names"]),
                               y=[f"L{i}" for i in result.extras["layers"]], colorscale="Viridis",
                               colorbar={"title": "I(M)"}))
    where = "final output" if final else "block output"
    fig.update_layout(xaxis_title="module", yaxis_title="layer")
    return titled(fig, title or f"Module importance at the {where} (MSME Eq. 3)", _who(result),
                  height=max(420, 18 * z.shape[0] + 190))


def agreement_heatmap(agreement: dict, *, title: str | None = None) -> go.Figure:
    """Spearman rho of the locate methods' per-layer scores (an ``Agreement.to_dict()``), with each
    method's top layer in its axis label: do the locators point at the same layers?"""
    names = [f"{m} (top L{agreement['top_layer'][m]})" for m in agreement["methods"]]
    z = agreement["spearman"]
    fig = go.Figure(go.Heatmap(z=z, x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu", colorbar={"title": "rho"},
                               text=[[f"{v:.2f}" for v in row] for row in z], texttemplate="%{text}"))
    fig.update_layout(yaxis_autorange="reversed")
    return titled(fig, title or "Do the locators agree on the layers? (Spearman over layers)",
                  f"per-layer score = {agreement['reduce']} |score| over a layer's components", height=560)
