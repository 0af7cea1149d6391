"""Debiasing losses on next-token probabilities of (he, she) at each prompt's last token.

Every loss takes ``p``: ``[batch, 2]`` raw next-token probabilities ``(p(he), p(she))`` (not
renormalised) and, where needed, the real-world shares ``f``: ``[batch, 2]`` = ``(f_he, f_she)``;
it returns the batch mean (a scalar). Names are the keys of :data:`LOSSES`. The metric quantities
(AFGB gap, pronoun mass, renormalisation, UB term) are the torch metric functions of
:mod:`bias_lens.benchmarks.metrics`, so a loss and the number reported for it are one formula.

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
* ``equal`` — MSME's stated target ("equal" he/she probabilities) on the renormalised shares:
  ``KL(u || renorm(p))`` with ``u = (1/2, 1/2)``, i.e. ``-log 2 - (log q_he + log q_she) / 2``,
  0 exactly at ``q_he = q_she``. Unlike ``msme_align`` (which pulls the shares toward the
  profession's real-world ``f``, keeping a gap that AFGB-r counts) its minimum is AFGB-r = 0;
  it says nothing about the mass, so it is paired with ``mass_change`` (the "non-zero" part).

Hint anchors (opt-in, ``FinetuneConfig(hint_weight > 0)``; docs/edit_hint.md). Every bias loss
above lowers the pronoun mass everywhere, hinted prompts included, so UB-Score collapses with it.
An anchor term on GenHintEval *train* prompts (hinted: "... forgot his umbrella ...", ``F`` = +1
for a male hint, -1 for a female one) penalises that, relative to the *unedited* model's
probabilities ``p0`` (precomputed once, so the anchor is exactly 0 at step 0):

* ``ub_drop`` (default) — ``mean(relu(u0 - u))`` with ``u = F (p(he) - p(she))``: only a *drop*
  of the per-prompt UB term is penalised (it may grow freely); linear, so its gradient does not
  vanish near the anchor the way a squared penalty's does.
* ``hinted_drop`` — ``mean(relu(p0_h - p_h))`` with ``p_h`` the hinted pronoun's probability
  (he for F=+1, she for F=-1): keeps the hinted pronoun, leaves the other one free.
* ``ub_l2`` — ``mean((u - u0)^2)``: two-sided squared deviation of the UB term.

:func:`anchored` combines them: ``bias_loss(p, f) + weight * anchor(p_hint, F, p0)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from ..benchmarks.metrics import afgb_t, mass_t, renorm_t, ub_terms_t

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
    """``p`` renormalised over the targets (:func:`bias_lens.benchmarks.metrics.renorm_t`, denominator >= 1e-12)."""
    return renorm_t(p, eps=_EPS)


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
    if he and she:
        return mass_t(p)  # the pronoun mass metric itself
    return (p[:, 0] * float(he) + p[:, 1] * float(she)).mean()


def gap(p: Float[Tensor, "batch 2"], f: Tensor | None = None) -> Tensor:
    """Mean ``|p(he) - p(she)|``: the raw AFGB metric itself (:func:`bias_lens.benchmarks.metrics.afgb_t`)."""
    _check(p)
    return afgb_t(p)


def equal(p: Float[Tensor, "batch 2"], f: Tensor | None = None) -> Tensor:
    """``KL(u || renorm(p))`` with ``u = (1/2, 1/2)`` averaged over the batch (0 exactly at equal shares)."""
    _check(p)
    q = renorm(p).clamp_min(_EPS)
    return (-math.log(2.0) - 0.5 * torch.log(q).sum(1)).mean()


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "msme_literal": msme_literal,
    "msme_align": msme_align,
    "msme_align_l2": msme_align_l2,
    "lftf": lftf,
    "lftf_no_he": lambda p, f=None: lftf(p, he=False),
    "lftf_no_she": lambda p, f=None: lftf(p, she=False),
    "gap": gap,
    "equal": equal,
}


def _hint_check(p: Tensor, F: Tensor, p0: Tensor) -> None:
    _check(p)
    if F.shape != (p.shape[0],) or p0.shape != p.shape:
        raise ValueError(f"hint anchor needs F [batch] and reference p0 {tuple(p.shape)}, "
                         f"got {tuple(F.shape)} and {tuple(p0.shape)}")


def ub_terms(p: Float[Tensor, "batch 2"], F: Float[Tensor, " batch"]) -> Float[Tensor, " batch"]:
    """Per-prompt UB term ``F (p(he) - p(she))`` (LFTF Eq. 2-3 before the mean; :func:`bias_lens.benchmarks.metrics.ub_terms_t`)."""
    return ub_terms_t(p, F)


def ub_drop(p: Float[Tensor, "batch 2"], F: Float[Tensor, " batch"], p0: Float[Tensor, "batch 2"]) -> Tensor:
    """``mean(relu(u0 - u))``, ``u = F (p(he) - p(she))``, ``u0`` the same on the unedited ``p0``."""
    _hint_check(p, F, p0)
    return torch.relu(ub_terms(p0.to(p), F) - ub_terms(p, F)).mean()


def hinted_drop(p: Float[Tensor, "batch 2"], F: Float[Tensor, " batch"], p0: Float[Tensor, "batch 2"]) -> Tensor:
    """``mean(relu(p0_h - p_h))`` with ``p_h`` the hinted pronoun (he if F > 0, she if F < 0)."""
    _hint_check(p, F, p0)
    male = F.to(p.device) > 0
    ph, ph0 = torch.where(male, p[:, 0], p[:, 1]), torch.where(male, p0[:, 0], p0[:, 1]).to(p)
    return torch.relu(ph0 - ph).mean()


def ub_l2(p: Float[Tensor, "batch 2"], F: Float[Tensor, " batch"], p0: Float[Tensor, "batch 2"]) -> Tensor:
    """``mean((u - u0)^2)``: squared deviation of the per-prompt UB term from the unedited one."""
    _hint_check(p, F, p0)
    return ((ub_terms(p, F) - ub_terms(p0.to(p), F)) ** 2).mean()


HINT_LOSSES: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "ub_drop": ub_drop,
    "hinted_drop": hinted_drop,
    "ub_l2": ub_l2,
}


def get_hint_loss(name: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The hint anchor term named ``name``; ValueError listing the choices otherwise."""
    if name not in HINT_LOSSES:
        raise ValueError(f"unknown hint anchor {name!r}; choose one of {', '.join(HINT_LOSSES)}")
    return HINT_LOSSES[name]


def anchored(
    bias_loss: Callable[[Tensor, Tensor], Tensor],
    p: Float[Tensor, "batch 2"],
    f: Float[Tensor, "batch 2"],
    p_hint: Float[Tensor, "hint 2"],
    F: Float[Tensor, " hint"],
    p0_hint: Float[Tensor, "hint 2"],
    *,
    weight: float = 1.0,
    anchor: str = "ub_drop",
) -> Tensor:
    """Bias objective on neutral prompts + ``weight`` x hint anchor on hinted prompts."""
    if weight < 0:
        raise ValueError(f"hint weight must be >= 0, got {weight}")
    return bias_loss(p, f) + weight * get_hint_loss(anchor)(p_hint, F, p0_hint)


def get_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The debiasing loss named ``name``; ValueError listing the choices otherwise."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


def mass_change(p: Float[Tensor, "batch 2"], p0: Float[Tensor, "batch 2"]) -> Tensor:
    """Mass-keeping term: mean ``(log(p_he + p_she) - log(p0_he + p0_she))^2`` against the unedited
    model's probabilities ``p0``. 0 when the pronoun mass of every prompt is unchanged, whatever the
    he/she shares do, so adding it to a bias loss rules out lowering bias by erasing both pronouns."""
    _check(p, p0)
    m, m0 = p.sum(1).clamp_min(_EPS), p0.to(p).sum(1).clamp_min(_EPS)
    return ((m.log() - m0.log()) ** 2).mean()
