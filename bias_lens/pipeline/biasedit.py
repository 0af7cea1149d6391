"""BiasEdit's two ways of scoring an editor on StereoSet (docs/biasedit.md).

* :func:`protocol_eval` — the paper's test-time protocol (``zjunlp/BiasEdit`` ``editor/base.py``
  ``valid``/``test``): the test items are cut into consecutive batches of ``n_edits``; each batch
  edits the model from its *own* items, its items are scored on the edited model, and the edit is
  undone before the next batch. The shift never sees another batch, but it does see the items it is
  scored on.
* :func:`transfer_eval` — the exported edit's reading: one shift from ``n_edits`` *train*
  requests, applied once, every test item scored. This is what ``bias-lens edit --method editor``
  exports and what every other suite measures.

Both score sentences with the same scorer as the ``stereoset`` suite
(:func:`~bias_lens.benchmarks.sentence_scoring.sentence_scores`, mean token log-probability after
the BOS by default) and the same :func:`~bias_lens.benchmarks.metrics.stereoset_scores`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..benchmarks.metrics import stereoset_scores
from ..benchmarks.sentence_scoring import sentence_scores
from ..edit.editor import editor_edit
from ..edit.editor_train import batches

if TYPE_CHECKING:
    from ..edit.editor import Editor
    from ..lens import LensModel

log = logging.getLogger(__name__)


def item_scores(lm: LensModel, rows: Sequence[dict], *, reduce: str = "mean",
                batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stereotype, anti-stereotype, unrelated) sentence scores of StereoSet ``rows``."""
    n = len(rows)
    texts = [r["stereotype"] for r in rows] + [r["anti_stereotype"] for r in rows] + [r["unrelated"] for r in rows]
    sc = sentence_scores(lm, texts, reduce=reduce, batch_size=batch_size).numpy()
    return sc[:n], sc[n : 2 * n], sc[2 * n :]


def protocol_eval(lm: LensModel, editor: Editor, rows: Sequence[dict], *, n_edits: int | None = None,
                  reduce: str = "mean", batch_size: int = 32) -> dict[str, Any]:
    """SS / LMS / ICAT under the paper's protocol (see the module docstring); model unchanged on return."""
    n = n_edits or editor.config.n_edits
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for batch in batches(list(rows), n, drop_last=False):
        handle = editor_edit(lm, editor, batch, method="editor(protocol)").apply_(lm.hf)
        try:
            parts.append(item_scores(lm, batch, reduce=reduce, batch_size=batch_size))
        finally:
            handle.undo()
    st, an, un = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return {**stereoset_scores(st, an, un), "n": len(rows), "n_edits": n, "n_batches": len(parts)}


def transfer_eval(lm: LensModel, editor: Editor, requests: Sequence[dict], rows: Sequence[dict], *,
                  reduce: str = "mean", batch_size: int = 32) -> dict[str, Any]:
    """SS / LMS / ICAT of ``rows`` after one edit from ``requests``; model unchanged on return."""
    handle = editor_edit(lm, editor, requests, method="editor").apply_(lm.hf)
    try:
        st, an, un = item_scores(lm, rows, reduce=reduce, batch_size=batch_size)
    finally:
        handle.undo()
    return {**stereoset_scores(st, an, un), "n": len(rows), "n_requests": len(requests)}
