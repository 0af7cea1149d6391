"""The in-loop metrics of the edit layer and the prompt-prefix view of the PB baseline.

The guards of :mod:`bias_lens.edit.guards` call :func:`dev_afgb`, :func:`dev_afgb_renorm`,
:func:`dev_mass`, :func:`dev_ub` and :func:`retention_perplexity`: the benchmark quantities on
small fixed subsets (early stopping, retention / UB / mass guards). The reported before/after
metrics are :func:`bias_lens.pipeline.measure.measure` (one function for ``bias-lens edit`` and
``bias-lens run``). :class:`PrefixedModel` prepends a prompt prefix (the PB baseline) to every
bias-suite prompt through a tokenizer wrapper, so PB runs through the very same scoring code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..targets import TargetSet


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


def he_she(lm: Any) -> TargetSet:
    """The (he, she) targets of the edit losses and guards: two distinct single tokens."""
    from ..targets import resolve_targets

    return resolve_targets(lm.tokenizer, "he,she").require(n=2, single_token=True)


@torch.no_grad()
def dev_probs(lm: Any, prompts: Sequence[str], *, batch_size: int = 32) -> Tensor:
    """``[prompt, 2]`` raw next-token probabilities of (he, she) after each prompt."""
    from ..scoring import target_probs

    return target_probs(lm, list(prompts), he_she(lm), batch_size=batch_size)


def dev_afgb(lm: Any, prompts: Sequence[str], *, batch_size: int = 32) -> float:
    """Raw AFGB (mean |p(he) - p(she)|) on ``prompts``: the papers' early-stopping metric."""
    from ..benchmarks.metrics import afgb_t

    return float(afgb_t(dev_probs(lm, prompts, batch_size=batch_size)))


def dev_afgb_renorm(lm: Any, prompts: Sequence[str], *, batch_size: int = 32) -> float:
    """AFGB on (he, she) renormalised to sum to 1: the equalising early-stopping metric."""
    from ..benchmarks.metrics import afgb_t

    return float(afgb_t(dev_probs(lm, prompts, batch_size=batch_size), renorm=True))


def dev_mass(lm: Any, prompts: Sequence[str], *, batch_size: int = 32) -> float:
    """Mean pronoun mass ``p(he) + p(she)`` on ``prompts`` (the mass guard's number)."""
    from ..benchmarks.metrics import mass_t

    return float(mass_t(dev_probs(lm, prompts, batch_size=batch_size)))


def dev_ub(lm: Any, samples: Sequence[dict], *, batch_size: int = 32) -> float:
    """Raw UB-Score (LFTF Eq. 2-3) on GenHintEval ``samples`` (``prompt``, ``F``): the UB guard metric."""
    from ..benchmarks.metrics import ub_t

    p = dev_probs(lm, [s["prompt"] for s in samples], batch_size=batch_size)
    return float(ub_t(p, torch.tensor([float(s["F"]) for s in samples], dtype=torch.float64)))


def retention_texts(limit: int = 64) -> list[str]:
    """The first ``limit`` retention sentences (:func:`bias_lens.benchmarks.external.retention_texts`)."""
    from ..benchmarks.external import retention_texts as texts

    return texts(limit)


@torch.no_grad()
def retention_perplexity(lm: Any, texts: Sequence[str], *, batch_size: int = 32) -> float:
    """Perplexity of ``texts`` (BOS/EOS-prefixed, every token scored), as the retention benchmark."""
    from ..benchmarks.metrics import perplexity
    from ..benchmarks.sentence_scoring import token_logprobs

    return float(perplexity(token_logprobs(lm, list(texts), batch_size=batch_size)))
