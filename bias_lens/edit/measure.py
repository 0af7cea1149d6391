"""Metrics the edit layer needs: the benchmark metrics before/after an edit, and cheap in-loop ones.

:func:`model_metrics` is the reported set (keys ``afgb``, ``fbs``, ``ub``, ``perplexity``,
``probe_accuracy``; plus ``afgb_renorm``, ``fbs_renorm`` and the pronoun ``mass``), computed by :func:`bias_lens.benchmarks.runners.evaluate` on the bias suite
(AFGB/FBS), GenHintEval (UB) and the retention suite (perplexity, probe accuracy). A prompt
``prefix`` (the PB baseline) is prepended to every bias-suite prompt through a tokenizer wrapper,
so PB runs through the very same scoring code; retention is scored without it (PB edits no
weights, so retention is unchanged by construction).

The in-loop helpers (:func:`dev_afgb`, :func:`retention_perplexity`) are the same quantities on
small fixed subsets, used for early stopping and the retention guard.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class _PrefixTokenizer:
    """Delegates to a tokenizer, prepending ``prefix`` to every text it is called on."""

    def __init__(self, tok: Any, prefix: str) -> None:
        self._tok, self._prefix = tok, prefix

    def __call__(self, text, *args: Any, **kw: Any):
        if isinstance(text, str):
            text = self._prefix + text
        else:
            text = [self._prefix + t for t in text]
        return self._tok(text, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


class PrefixedModel:
    """A view of a LensModel whose prompts all get ``prefix`` (same weights, no copy)."""

    def __init__(self, lm: Any, prefix: str) -> None:
        self._lm, self.prefix = lm, prefix
        self.tokenizer = _PrefixTokenizer(lm.tokenizer, prefix)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lm, name)


def _evaluate():
    try:
        from ..benchmarks import evaluate  # type: ignore[attr-defined]
    except ImportError:
        from ..benchmarks.runners import evaluate
    return evaluate


def model_metrics(
    lm: Any,
    suite: str = "genbiaseval",
    split: str = "test",
    *,
    limit: int | None = None,
    ub_limit: int | None = None,
    retention_limit: int | None = None,
    prefix: str = "",
    batch_size: int = 32,
) -> dict[str, float]:
    """Bias suite: raw ``afgb``, ``fbs`` (the papers'), ``afgb_renorm``, ``fbs_renorm`` and the pronoun
    ``mass``; ``ub`` (GenHintEval); retention: ``perplexity`` (gender-neutral corpus), ``probe_accuracy``."""
    evaluate = _evaluate()
    biased = PrefixedModel(lm, prefix) if prefix else lm
    bias = evaluate(biased, suite, split, limit=limit, batch_size=batch_size).metrics
    out = {k: float(bias[k]) for k in ("afgb", "afgb_renorm", "mass", "fbs", "fbs_renorm") if k in bias}
    if "ub" in bias:
        out["ub"] = float(bias["ub"])
    else:
        out["ub"] = float(evaluate(biased, "genhinteval", split, limit=ub_limit or limit, batch_size=batch_size).metrics["ub"])
    ret = evaluate(lm, "retention", "test", limit=retention_limit, batch_size=batch_size).metrics
    out["perplexity"] = float(ret["perplexity"])
    out["probe_accuracy"] = float(ret["probe_accuracy"])
    return out


def he_she(lm: Any):
    from ..targets import resolve_targets

    ts = resolve_targets(lm.tokenizer, "he,she")
    if not ts.single_token:
        raise ValueError("the edit losses need single-token he/she targets for this tokenizer")
    return ts


@torch.no_grad()
def dev_afgb(lm: Any, prompts: Sequence[str], *, batch_size: int = 32) -> float:
    """Raw AFGB (mean |p(he) - p(she)|) on ``prompts``: the early-stopping metric."""
    from ..scoring import target_probs

    p = target_probs(lm, list(prompts), he_she(lm), batch_size=batch_size)
    return float((p[:, 0] - p[:, 1]).abs().mean())


def dev_ub(lm: Any, samples: Sequence[dict], *, batch_size: int = 32) -> float:
    """Raw UB-Score (LFTF Eq. 2-3) on GenHintEval ``samples`` (``prompt``, ``F``): the UB guard metric."""
    from ..benchmarks.metrics import ub
    from ..scoring import target_probs

    p = target_probs(lm, [s["prompt"] for s in samples], he_she(lm), batch_size=batch_size)
    return ub(p, [float(s["F"]) for s in samples])


def retention_texts(limit: int = 64) -> list[str]:
    """The first ``limit`` retention sentences of the benchmark's fixed order."""
    from ..benchmarks.external import retention_sentences

    return retention_sentences()[:limit]


@torch.no_grad()
def retention_perplexity(lm: Any, texts: Sequence[str], *, batch_size: int = 32) -> float:
    """Perplexity of ``texts`` (BOS/EOS-prefixed, every token scored), as the retention benchmark."""
    from ..benchmarks.metrics import perplexity
    from ..benchmarks.sentence_scoring import token_logprobs

    return float(perplexity(token_logprobs(lm, list(texts), batch_size=batch_size)))
