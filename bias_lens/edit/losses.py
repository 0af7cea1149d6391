"""Debiasing losses on next-token probabilities of (he, she) at each prompt's last token.

Every loss takes ``p``: ``[batch, 2]`` raw next-token probabilities ``(p(he), p(she))`` (not
renormalised) and, where needed, the real-world shares ``f``: ``[batch, 2]`` = ``(f_he, f_she)``;
it returns the batch mean (a scalar). Names are the keys of :data:`LOSSES`.

* ``msme_literal`` (what the pipeline uses for ``--method msme``) — MSME Eq. 6-8 *as written*:
  ``f_he * p(he) + f_she * p(she)``. MSME wants it driven to equal non-zero values, but
  minimising it pushes both raw probabilities down (no minimum at the real-world distribution).
  Measured on SmolLM2 (docs/edit.md) that is exactly what cuts the raw AFGB the issue targets
  (test AFGB -61% at module scale, +4.7% retention perplexity) — at the price of UB-Score, which
  also scales with the raw pronoun mass.
* ``msme_align`` — the well-posed reading: with ``q = p / (p(he) + p(she))`` renormalised over the
  targets, ``KL(f || q)``, minimal (0) exactly at ``q = f``; ``msme_align_l2`` is the squared-error
  variant ``sum_i (q_i - f_i)^2``. It leaves the pronoun mass free, and on SmolLM2 it barely moves
  raw AFGB (dev -1% after 8 steps at lr 1e-4, +92% at lr 1e-3); use it when the renormalised
  metrics (``afgb_renorm``, ``fbs_renorm``) are the target.
* ``lftf`` — LFTF Eq. 5 as written: ``p(he) + p(she)``; ablations ``lftf_no_he`` (``p(she)``) and
  ``lftf_no_she`` (``p(he)``). (Its "w/o attention / w/o MLP" ablations are mask changes, see
  :func:`bias_lens.edit.masks.without_attention`.)
* ``gap`` — ``|p(he) - p(she)|``, the AFGB quantity itself, as a direct alternative.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

_EPS = 1e-12


def _check(p: Tensor, f: Tensor | None = None) -> None:
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"expected probabilities [batch, 2] for (he, she), got {tuple(p.shape)}")
    if f is not None and f.shape != p.shape:
        raise ValueError(f"real-world shares must have shape {tuple(p.shape)}, got {tuple(f.shape)}")


def msme_literal(p: Float[Tensor, "batch 2"], f: Float[Tensor, "batch 2"]) -> Tensor:
    """MSME Eq. 6-8 literally: mean of ``f_he p(he) + f_she p(she)``."""
    _check(p, f)
    return (f.to(p) * p).sum(1).mean()


def renorm(p: Float[Tensor, "batch 2"]) -> Float[Tensor, "batch 2"]:
    return p / p.sum(1, keepdim=True).clamp_min(_EPS)


def msme_align(p: Float[Tensor, "batch 2"], f: Float[Tensor, "batch 2"]) -> Tensor:
    """``KL(f || renorm(p))`` averaged over the batch (0 exactly when renormalised p equals f)."""
    _check(p, f)
    q, f = renorm(p).clamp_min(_EPS), f.to(p)
    return (torch.xlogy(f, f) - f * torch.log(q)).sum(1).mean()


def msme_align_l2(p: Float[Tensor, "batch 2"], f: Float[Tensor, "batch 2"]) -> Tensor:
    """Squared-error alignment ``sum_i (renorm(p)_i - f_i)^2`` averaged over the batch."""
    _check(p, f)
    return ((renorm(p) - f.to(p)) ** 2).sum(1).mean()


def lftf(p: Float[Tensor, "batch 2"], f: Tensor | None = None, *, he: bool = True, she: bool = True) -> Tensor:
    """LFTF Eq. 5: mean of ``p(he) + p(she)``; ``he=False``/``she=False`` drop a term (ablations)."""
    _check(p)
    if not (he or she):
        raise ValueError("the LFTF loss needs at least one of the he and she terms")
    return (p[:, 0] * float(he) + p[:, 1] * float(she)).mean()


def gap(p: Float[Tensor, "batch 2"], f: Tensor | None = None) -> Tensor:
    """Mean ``|p(he) - p(she)|`` (the raw AFGB quantity)."""
    _check(p)
    return (p[:, 0] - p[:, 1]).abs().mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "msme_literal": msme_literal,
    "msme_align": msme_align,
    "msme_align_l2": msme_align_l2,
    "lftf": lftf,
    "lftf_no_he": lambda p, f=None: lftf(p, he=False),
    "lftf_no_she": lambda p, f=None: lftf(p, she=False),
    "gap": gap,
}


def get_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
