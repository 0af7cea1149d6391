"""The labelled result every locating method returns.

A :class:`LocateResult` holds a score tensor whose leading axis lines up with ``labels``
(``L12``, ``L12.mlp.down``, ``L12.mlp.down/row7``, ``L12.mlp.down/row7/col3``, ``L12N1021``,
``L12H3``), the method name, which reading of an ambiguous formula produced it (``variant``),
optional per-prompt scores and method-specific extras (``per_sample_argmax``, ``selected`` ...).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    return v


@dataclass
class LocateResult:
    """Scores aligned with labels, plus provenance.

    ``scores[i]`` belongs to ``labels[i]``; higher means more important unless ``ascending`` is
    set (then :meth:`top` returns the lowest scores first). ``per_prompt`` (``[prompt, label]``)
    is kept when the method defines per-prompt scores.
    """

    method: str
    labels: list[str]
    scores: Tensor
    variant: str = ""
    per_prompt: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    ascending: bool = False
    model: str = ""
    n_samples: int = 0

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores).detach().cpu()
        if self.scores.shape[0] != len(self.labels):
            raise ValueError(f"{self.method}: {self.scores.shape[0]} scores for {len(self.labels)} labels")
        if self.per_prompt is not None:
            self.per_prompt = self.per_prompt.detach().cpu()
            if self.per_prompt.shape[-1] != len(self.labels):
                raise ValueError(f"{self.method}: per_prompt last axis must match labels")

    def __len__(self) -> int:
        return len(self.labels)

    def order(self) -> list[int]:
        """Indices from most to least important (respecting ``ascending``)."""
        s = self.scores.double()
        s = torch.nan_to_num(s, nan=math.inf if self.ascending else -math.inf)
        return torch.argsort(s, descending=not self.ascending, stable=True).tolist()

    def top(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` most important ``(label, score)`` pairs."""
        return [(self.labels[i], float(self.scores[i])) for i in self.order()[:k]]

    def top_labels(self, k: int) -> list[str]:
        return [label for label, _ in self.top(k)]

    def score_of(self, label: str) -> float:
        return float(self.scores[self.labels.index(label)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in the CLI's schema (``method``, ``model``, ``n_samples``, ``labels``, ``scores`` ...)."""
        out: dict[str, Any] = {
            "method": self.method,
            "model": self.model,
            "n_samples": self.n_samples,
            "variant": self.variant,
            "labels": list(self.labels),
            "scores": _jsonable(self.scores),
        }
        out.update({k: _jsonable(v) for k, v in self.extras.items()})
        return out

    def to_frame(self):
        """A pandas DataFrame with ``label`` and ``score`` columns, most important first."""
        import pandas as pd

        idx = self.order()
        return pd.DataFrame({"label": [self.labels[i] for i in idx], "score": [float(self.scores[i]) for i in idx]})

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON atomically (per-prompt matrix included when present)."""
        path = Path(path)
        data = self.to_dict()
        if self.per_prompt is not None:
            data["per_prompt"] = _jsonable(self.per_prompt)
        data["ascending"] = self.ascending
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LocateResult":
        data = json.loads(Path(path).read_text())
        known = {"method", "model", "n_samples", "variant", "labels", "scores", "per_prompt", "ascending"}
        extras = {k: v for k, v in data.items() if k not in known}
        per = data.get("per_prompt")
        return cls(
            method=data["method"],
            labels=list(data["labels"]),
            scores=torch.tensor([math.nan if s is None else s for s in data["scores"]], dtype=torch.float64),
            variant=data.get("variant", ""),
            per_prompt=torch.tensor(per) if per is not None else None,
            extras=extras,
            ascending=bool(data.get("ascending", False)),
            model=data.get("model", ""),
            n_samples=int(data.get("n_samples", 0)),
        )
