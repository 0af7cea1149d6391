"""Joint causal selection: a unit set whose masking *together* equalises, from one pass of single masks.

The interpretable-neuron-editing paper keeps the ``k`` candidates whose mask *alone* lowers AFGB
most (:func:`bias_lens.locate.causal.causal_selection`, ``mode="independent"``, the default). On
SmolLM2 those single masks nearly all push the same way (toward *she*, the model leans *he*), so
masked together they overshoot: 50 of them flip every dev prompt to *she* (docs/neuron_editing.md).
Greedy selection fixes that but costs one masked pass per candidate per step.

``mode="joint"`` keeps the cost of the independent pass and selects for the set:

1. **single masks** (:func:`~bias_lens.locate.causal.set_readings`): every candidate masked (or
   scaled by ``value``) alone, keeping each dev prompt's p(t0), p(t1) and the retention perplexity;
2. **additive greedy**, in logit-difference space: with ``d_i = log p_i(t0) - log p_i(t1)`` and
   ``delta_{j,i}`` the change of ``d_i`` when unit j is masked, a set S is predicted to give
   ``d_i + sum_{j in S} delta_{j,i}``, and the renormalised gap of a prompt is exactly
   ``|q_i(t0) - q_i(t1)| = |tanh(d_i / 2)|``; the pronoun mass adds the same way in log space.
   Grow S one unit at a time (the unit whose addition gives the lowest predicted AFGB-r, among units
   whose single mask keeps retention within ``max_ppl_increase`` and whose addition keeps the
   predicted mass >= ``min_mass_ratio`` x base) until ``k`` units or no improvement;
3. **verified jointly**: every prefix of S masked together for real (one pass of ``|S|`` sets);
   the selection is the prefix with the lowest *measured* AFGB-r whose measured mass and retention
   stay within the same limits (none if no prefix lowers it).

The criterion is the renormalised gap (AFGB-r) with the pronoun mass guarded, the project's
definition of an edit that equalises rather than erases; the independent mode keeps the paper's
raw AFGB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .result import LocateResult

if TYPE_CHECKING:
    from ..lens import LensModel
    from ..targets import TargetSet
    from .causal import Unit


@dataclass(frozen=True)
class AdditivePath:
    """The additive greedy's choice (indices into the candidates, in order) and its predictions per step."""

    order: list[int]
    afgb_renorm: list[float]  # predicted AFGB-r after each step
    mass: list[float]  # predicted mean pronoun mass after each step


def renorm_gap(d: Float[Tensor, "... prompt"]) -> Float[Tensor, "..."]:
    """Mean renormalised gap ``|q(t0) - q(t1)|`` of logit differences ``d`` (= ``|tanh(d / 2)|``)."""
    return torch.tanh(d / 2).abs().mean(-1)


def additive_path(
    base: Float[Tensor, "prompt 2"], single: Float[Tensor, "cand prompt 2"], allowed: Bool[Tensor, " cand"], *,
    k: int, min_mass_ratio: float,
) -> AdditivePath:
    """Step 2 of the module docstring on probabilities: ``base`` unedited, ``single[j]`` with unit j masked."""
    d0 = base[:, 0].log() - base[:, 1].log()
    delta = single[..., 0].log() - single[..., 1].log() - d0
    m0 = base.sum(1)
    dlogm = single.sum(2).log() - m0.log()
    cur_d, cur_m = d0.clone(), torch.zeros_like(m0)
    free, floor = allowed.clone(), min_mass_ratio * float(m0.mean())
    path = AdditivePath([], [], [])
    cur = float(renorm_gap(d0))
    while len(path.order) < k and bool(free.any()):
        score = renorm_gap(cur_d + delta)
        mass = (m0 * (cur_m + dlogm).exp()).mean(1)
        score = torch.where(free & (mass >= floor), score, torch.full_like(score, float("inf")))
        j = int(torch.argmin(score))
        if not float(score[j]) < cur:
            break
        free[j] = False
        cur_d, cur_m, cur = cur_d + delta[j], cur_m + dlogm[j], float(score[j])
        path.order.append(j)
        path.afgb_renorm.append(cur)
        path.mass.append(float(mass[j]))
    return path


def best_prefix(joint: Float[Tensor, "prefix prompt 2"], ppl: Float[Tensor, " prefix"], base: Float[Tensor, "prompt 2"],
                ppl_limit: float, min_mass_ratio: float) -> int:
    """Length of the prefix with the lowest measured AFGB-r within the mass and retention limits (0: none lowers it)."""
    q = joint / joint.sum(-1, keepdim=True)
    afgb_r = (q[..., 0] - q[..., 1]).abs().mean(-1)
    mass = joint.sum(-1).mean(-1)
    best, best_score = 0, float((base[:, 0] - base[:, 1]).abs().div(base.sum(1)).mean())
    for i in range(len(afgb_r)):
        if float(ppl[i]) <= ppl_limit and float(mass[i]) >= min_mass_ratio * float(base.sum(1).mean()) \
                and float(afgb_r[i]) < best_score:
            best, best_score = i + 1, float(afgb_r[i])
    return best


def joint_selection(
    lm: LensModel, candidates: Sequence[str], units: Sequence[Unit], prompts: Sequence[str], targets: TargetSet,
    texts: Sequence[str], *, k: int, max_ppl_increase: float, min_mass_ratio: float = 0.9, value: float = 0.0,
    max_rows: int = 256, progress: bool = False,
) -> LocateResult:
    """The module docstring's three steps (called by ``causal_selection(..., mode="joint")``).

    Labels: the additive path in order; scores: predicted AFGB-r after each step;
    ``extras["selected"]``: the verified prefix; ``extras["joint"]``: each prefix's measured
    AFGB-r, mass and perplexity."""
    from .causal import set_readings

    p0, ppl0 = set_readings(lm, [[]], prompts, targets, texts, max_rows=max_rows)
    single, ppl1 = set_readings(lm, [[u] for u in units], prompts, targets, texts, value=value, max_rows=max_rows,
                                progress=progress)
    limit = float(ppl0[0]) * (1 + max_ppl_increase)
    path = additive_path(p0[0], single, ppl1 <= limit, k=k, min_mass_ratio=min_mass_ratio)
    prefixes = [[units[j] for j in path.order[: i + 1]] for i in range(len(path.order))]
    joint, pplj = set_readings(lm, prefixes, prompts, targets, texts, value=value, max_rows=max_rows) if prefixes \
        else (torch.zeros(0, len(prompts), 2, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    n = best_prefix(joint, pplj, p0[0], limit, min_mass_ratio)
    labels = [candidates[j] for j in path.order]
    qj = joint / joint.sum(-1, keepdim=True)
    q0 = p0[0] / p0[0].sum(-1, keepdim=True)
    extras = {
        "afgb_base": float((p0[0, :, 0] - p0[0, :, 1]).abs().mean()), "ppl_base": float(ppl0[0]),
        "afgb_renorm_base": float((q0[:, 0] - q0[:, 1]).abs().mean()), "mass_base": float(p0[0].sum(1).mean()),
        "max_ppl_increase": max_ppl_increase, "min_mass_ratio": min_mass_ratio, "value": value, "k": k,
        "selected": labels[:n], "predicted": {"afgb_renorm": path.afgb_renorm, "mass": path.mass},
        "joint": {"afgb_renorm": (qj[..., 0] - qj[..., 1]).abs().mean(-1).tolist(),
                  "mass": joint.sum(-1).mean(-1).tolist(), "ppl": pplj.tolist()},
        "single": {"afgb_renorm": {c: float((s[:, 0] - s[:, 1]).abs().div(s.sum(1)).mean())
                                   for c, s in zip(candidates, single)},
                   "ppl": dict(zip(candidates, ppl1.tolist()))},
    }
    return LocateResult("causal", labels, torch.tensor(path.afgb_renorm, dtype=torch.float64),
                        variant=f"joint,afgb_renorm,ppl<=+{max_ppl_increase:g},mass>={min_mass_ratio:g},scale={value:g}",
                        ascending=True, model=lm.name, n_samples=len(prompts), extras=extras)
