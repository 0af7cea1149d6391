"""The labelled result every locating method returns.

A :class:`LocateResult` holds a score tensor whose leading axis lines up with ``labels``
(``L12``, ``L12.mlp.down``, ``L12.mlp.down/row7``, ``L12.mlp.down/row7/col3``, ``L12N1021``,
``L12H3``), the method name, which reading of an ambiguous formula produced it (``variant``),
optional per-prompt scores and method-specific extras (``per_sample_argmax``, ``selected`` ...).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    import pandas as pd

#: File name of the result inside a folder written by :meth:`LocateResult.save_dir`.
RESULT_FILE = "result.json"


def check_out_dir(out: str | Path, force: bool = False, *, force_hint: str = "force=True") -> Path:
    """``out`` as a Path if a result folder may be written there, else ValueError saying why.

    Allowed: a missing folder whose parent exists, an empty folder, or (``force``) a non-empty
    folder, which :meth:`LocateResult.save_dir` then replaces as a whole. ``force_hint`` names the
    switch in the error (the CLI passes ``"--force"``). Checks only; writes nothing.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{out} exists and is not a folder; choose a folder path")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ValueError(f"{out} exists and is not empty; choose another folder or pass {force_hint}")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise ValueError(f"parent folder {parent} does not exist; create it first")
    return path


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
        """The ``k`` most important labels, most important first."""
        return [label for label, _ in self.top(k)]

    def score_of(self, label: str) -> float:
        """The score of ``label`` (ValueError if it is not in the result)."""
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

    def to_frame(self) -> pd.DataFrame:
        """A pandas DataFrame with ``label`` and ``score`` columns, most important first."""
        import pandas as pd

        idx = self.order()
        return pd.DataFrame({"label": [self.labels[i] for i in idx], "score": [float(self.scores[i]) for i in idx]})

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON atomically (per-prompt matrix included when present)."""
        from ..io import atomic_write_text

        data = self.to_dict()
        if self.per_prompt is not None:
            data["per_prompt"] = _jsonable(self.per_prompt)
        data["ascending"] = self.ascending
        return atomic_write_text(Path(path), json.dumps(data))

    def save_dir(self, out: str | Path, *, force: bool = False,
                 extra: Callable[[Path], list[Path]] | None = None) -> list[Path]:
        """Write the folder ``out``: ``result.json`` (:meth:`save`) plus the files ``extra(folder)``
        writes into the folder it is given (e.g. figures); returns the paths under ``out``.

        ``out`` must be new or empty unless ``force`` (:func:`check_out_dir`). Everything is built in
        a temporary sibling and moved onto ``out`` with :func:`bias_lens.io.replace_dir`, so ``out``
        never mixes an earlier run's files with this one's and an error leaves it untouched.
        """
        from ..io import make_temp_dir, replace_dir

        out = check_out_dir(out, force)
        tmp = make_temp_dir(out.absolute().parent, f".{out.name}.tmp")
        try:
            written = [self.save(tmp / RESULT_FILE)]
            if extra is not None:
                written += extra(tmp)
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return [out / p.relative_to(tmp) for p in written]

    @classmethod
    def load(cls, path: str | Path) -> "LocateResult":
        """Read a result written by :meth:`save` (unknown keys go to ``extras``)."""
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
