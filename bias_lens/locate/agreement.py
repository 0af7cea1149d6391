"""Do the locate methods agree on *which layers* carry the bias? (issue 14, item 8)

No seed paper compares its locator with the others. Every locate result here names components
inside layers (a layer, a module, a row or entry, an FFN neuron, a head, a traced position), so each
one gives a per-layer score; the Spearman rank correlation of two methods' per-layer scores says
whether they point at the same layers.

Per-layer score of a result (the literal, documented reduction): a layer label's own score; for
labels inside a layer, the **maximum** |score| over that layer's labels (one strong component
locates a layer, as the module scan's argmax does), with ``reduce="sum"`` as the alternative
(total attribution mass). Layers a result does not cover (e.g. a top-50 neuron list) are NaN and
rank below every covered layer (tied). Results ranked ascending (lower = more important) are
negated first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from jaxtyping import Float

from ..labels import LabelError, parse

if TYPE_CHECKING:
    from .result import LocateResult


@dataclass
class Agreement:
    """Per-layer scores of each method and their pairwise Spearman correlations."""

    methods: list[str]
    per_layer: Float[np.ndarray, "method layer"]
    spearman: Float[np.ndarray, "method method"]
    reduce: str = "max"
    top_layer: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form (uncovered layers as ``None``), as the main job writes ``locate/agreement.json``."""
        per = [[None if np.isnan(v) else float(v) for v in row] for row in self.per_layer]
        return {"methods": self.methods, "per_layer": per, "spearman": self.spearman.tolist(),
                "reduce": self.reduce, "top_layer": self.top_layer}


def ranks(x: Float[np.ndarray, " n"]) -> Float[np.ndarray, " n"]:
    """Ranks 1..n of ``x`` with ties given their average rank (as Spearman's rho needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(a: Float[np.ndarray, " n"], b: Float[np.ndarray, " n"]) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (NaN if either is constant);
    NaN entries (uncovered layers) rank lowest, tied."""
    ra, rb = (ranks(np.where(np.isnan(x), -np.inf, x)) for x in (np.asarray(a, float), np.asarray(b, float)))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _layer_of(label: str) -> int | None:
    """The layer a label lies in; the module scan's whole-sublayer labels ``L{l}.attn`` / ``L{l}.mlp``
    (ablating every weight of the sublayer) are not in the label grammar and are read here."""
    try:
        return getattr(parse(label), "layer", None)
    except LabelError:
        head, _, kind = label.partition(".")
        if kind in ("attn", "mlp") and head[:1] == "L" and head[1:].isdigit():
            return int(head[1:])
        raise


def layer_scores(result: LocateResult, n_layers: int, reduce: str = "max") -> Float[np.ndarray, " layer"]:
    """One score per layer from ``result``'s labels (module docstring)."""
    if reduce not in ("max", "sum"):
        raise ValueError(f"reduce must be 'max' or 'sum', got {reduce!r}")
    sign = -1.0 if result.ascending else 1.0
    out = np.full(n_layers, np.nan)
    for label, s in zip(result.labels, result.scores.double().tolist()):
        layer = _layer_of(label)
        if layer is None:
            raise ValueError(f"label {label!r} of {result.method!r} names no layer")
        if not 0 <= layer < n_layers:
            raise ValueError(f"label {label!r} lies outside layers 0..{n_layers - 1}")
        v = sign * s if (result.ascending or label == f"L{layer}") else abs(s)
        old = out[layer]
        out[layer] = v if np.isnan(old) else (max(old, v) if reduce == "max" else old + v)
    return out


def agreement(results: dict[str, LocateResult], n_layers: int, reduce: str = "max") -> Agreement:
    """Per-layer scores and the Spearman matrix of the named results (at least two)."""
    if len(results) < 2:
        raise ValueError(f"agreement compares at least two locate results, got {list(results)}")
    methods = list(results)
    per = np.stack([layer_scores(results[m], n_layers, reduce) for m in methods])
    rho = np.array([[spearman(per[i], per[j]) for j in range(len(methods))] for i in range(len(methods))])
    return Agreement(methods, per, rho, reduce, {m: int(np.nanargmax(per[i])) for i, m in enumerate(methods)})
