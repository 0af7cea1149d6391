"""BiasEdit's two ways of scoring an editor on StereoSet (docs/biasedit.md).

* :func:`protocol_eval` — the paper's test-time protocol (``zjunlp/BiasEdit`` ``editor/base.py``
  ``valid``/``test``): the test items are cut into consecutive batches of ``n_edits``; each batch
  edits the model from its *own* items, its items are scored on the edited model, and the edit is
  undone before the next batch. The shift never sees another batch, but it does see the items it is
  scored on.
* :func:`transfer_eval` — the exported edit's reading: one shift from ``n_edits`` *train*
  requests, applied once, every test item scored. This is what ``bias-lens edit --method editor``
  exports and what every other suite measures.

CrowS-Pairs (the cross-benchmark set) is scored under the same protocol by :func:`crows_protocol_eval`:
each pair becomes one request whose stereotype sentence is the one the CrowS metric counts as
stereotyping (:func:`crows_requests`), and the suite's own scorer and metric are used.

Both score sentences with the ``stereoset`` suite's own scorer (the teacher-forced token
log-probabilities after the BOS, :func:`~bias_lens.benchmarks.runners.stereoset_sentence_scores`)
and the same :func:`~bias_lens.benchmarks.metrics.stereoset_scores`, under two readings from one
forward: ``ss``/``lms``/``icat`` with the mean token log-probability (the official StereoSet
scorer's geometric-mean probability ranks sentences identically; the suite's default) and
``*_mean_prob`` with the arithmetic mean token probability (BiasEdit's evaluator).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..benchmarks.metrics import crows_score, stereoset_scores
from ..benchmarks.runners import crows_sentence_scores, stereoset_sentence_scores
from ..edit.editor import editor_edit
from ..edit.editor_train import batches

if TYPE_CHECKING:
    from ..edit.editor import Editor
    from ..lens import LensModel

log = logging.getLogger(__name__)


#: sentence-score readings reported side by side: key suffix -> reduce of reduce_logprobs
READINGS = {"": "mean", "_mean_prob": "mean_prob"}


def item_scores(lm: LensModel, rows: Sequence[dict], *, reduce: str = "mean",
                batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stereotype, anti-stereotype, unrelated) sentence scores of StereoSet ``rows``."""
    return reading_scores(lm, rows, {"": reduce}, batch_size=batch_size)[""]


def reading_scores(lm: LensModel, rows: Sequence[dict], readings: dict[str, str] = READINGS, *,
                   batch_size: int = 32) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per reading, (stereotype, anti-stereotype, unrelated) scores of ``rows``, from one forward
    (the ``stereoset`` suite's scorer, :func:`~bias_lens.benchmarks.runners.stereoset_sentence_scores`)."""
    return stereoset_sentence_scores(lm, rows, readings, batch_size=batch_size)


def reading_metrics(parts: Sequence[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]) -> dict[str, float]:
    """SS / LMS / ICAT of every reading over the concatenated ``parts`` (keys ``ss``, ``ss_mean_prob``, ...)."""
    out: dict[str, float] = {}
    for key in parts[0]:
        st, an, un = (np.concatenate([p[key][i] for p in parts]) for i in range(3))
        out.update({f"{k}{key}": v for k, v in stereoset_scores(st, an, un).items()})
    return out


def protocol_eval(lm: LensModel, editor: Editor, rows: Sequence[dict], *, n_edits: int | None = None,
                  readings: dict[str, str] = READINGS, batch_size: int = 32, scale: float = 1.0) -> dict[str, Any]:
    """SS / LMS / ICAT under the paper's protocol (see the module docstring); model unchanged on
    return. ``scale``: the shift multiplier of :func:`~bias_lens.edit.editor.editor_edit`."""
    n = n_edits or editor.config.n_edits
    parts = per_batch(lm, editor, rows, n, lambda b: reading_scores(lm, b, readings, batch_size=batch_size), scale=scale)
    return {**reading_metrics(parts), "n": len(rows), "n_edits": n, "n_batches": len(parts), "scale": scale}


def per_batch(lm: LensModel, editor: Editor | None, rows: Sequence[dict], n: int, score: Callable[[list[dict]], Any], *,
              requests: Callable[[list[dict]], list[dict]] | None = None, scale: float = 1.0) -> list[Any]:
    """The test-time protocol's loop: per consecutive batch of ``n`` rows, edit the model from the batch's
    own requests (``requests(batch)``, default the rows themselves), ``score(batch)``, undo. ``editor=None``
    scores without editing. Model unchanged on return."""
    out = []
    for batch in batches(list(rows), n, drop_last=False):
        handle = None
        if editor is not None:
            reqs = requests(batch) if requests is not None else batch
            handle = editor_edit(lm, editor, reqs, method="editor(protocol)", scale=scale).apply_(lm.hf)
        try:
            out.append(score(batch))
        finally:
            if handle is not None:
                handle.undo()
    return out


def transfer_eval(lm: LensModel, editor: Editor, requests: Sequence[dict], rows: Sequence[dict], *,
                  readings: dict[str, str] = READINGS, batch_size: int = 32, scale: float = 1.0) -> dict[str, Any]:
    """SS / LMS / ICAT of ``rows`` after one edit from ``requests`` (shift times ``scale``); model
    unchanged on return."""
    handle = editor_edit(lm, editor, requests, method="editor", scale=scale).apply_(lm.hf)
    try:
        scores = reading_scores(lm, rows, readings, batch_size=batch_size)
    finally:
        handle.undo()
    return {**reading_metrics([scores]), "n": len(rows), "n_requests": len(requests), "scale": scale}


def unedited_eval(lm: LensModel, rows: Sequence[dict], *, readings: dict[str, str] = READINGS,
                  batch_size: int = 32) -> dict[str, Any]:
    """SS / LMS / ICAT of ``rows`` on the current weights, every reading."""
    return {**reading_metrics([reading_scores(lm, rows, readings, batch_size=batch_size)]), "n": len(rows)}


def crows_requests(rows: Sequence[dict], *, mode: str = "metric_py") -> list[dict]:
    """CrowS-Pairs rows as editor requests: ``stereotype`` = the sentence :func:`~bias_lens.benchmarks.metrics.crows_score`
    counts as stereotyping (``sent_more``; with ``mode="swap_antistereo"`` ``sent_less`` on ``antistereo`` rows)."""
    if mode not in ("metric_py", "swap_antistereo"):
        raise ValueError(f"mode must be 'metric_py' or 'swap_antistereo', got {mode!r}")
    out = []
    for r in rows:
        swap = mode == "swap_antistereo" and r["direction"] == "antistereo"
        st, an = (r["sent_less"], r["sent_more"]) if swap else (r["sent_more"], r["sent_less"])
        out.append({"stereotype": st, "anti_stereotype": an, "id": r.get("id")})
    return out


def crows_protocol_eval(lm: LensModel, editor: Editor | None, rows: Sequence[dict], *, n_edits: int | None = None,
                        mode: str = "metric_py", reduce: str = "sum", batch_size: int = 32,
                        scale: float = 1.0) -> dict[str, Any]:
    """CrowS-Pairs score (``crows``, ``crows_stereo``, ``crows_antistereo``) under the test-time protocol:
    consecutive batches of ``n_edits`` pairs, each edited from its own pairs, scored, undone. ``editor=None``
    scores the unedited model (the same batches, no edit). Model unchanged on return."""
    n = n_edits or (editor.config.n_edits if editor is not None else len(rows))
    parts = per_batch(lm, editor, rows, n, lambda b: crows_sentence_scores(lm, b, reduce=reduce, batch_size=batch_size),
                      requests=lambda b: crows_requests(b, mode=mode), scale=scale)
    more, less = (np.concatenate([p[i] for p in parts]) for i in range(2))
    out = crows_score(more, less, [r["direction"] for r in rows], mode=mode)
    return {**out, "n": len(rows), "n_edits": n, "n_batches": len(parts), "scale": scale}
