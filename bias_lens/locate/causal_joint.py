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

With ``hint`` rows (GenHintEval: prompts that name the person's gender, and its sign F) a UB guard
joins both steps: their readings come from the same passes, UB = mean F (p(t0) - p(t1)) is predicted
additively (``p(t0) - p(t1) = mass * tanh(d / 2)``) and measured on every prefix, and neither may
fall more than ``ub_tolerance`` below the unedited model's. Without it, masking the neurons that
carry *he* / *she* also deletes the model's use of an explicit gender hint (on SmolLM2: UB
0.458 -> 0.248 for a 23-neuron set that cut test AFGB-r by 49%; docs/neuron_editing.md).

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


@dataclass(frozen=True)
class HintGuard:
    """The UB guard: GenHintEval prompts' hint signs ``F`` (their readings follow the bias prompts'), and
    how far UB = mean F (p(t0) - p(t1)) may fall below the unedited model's (the project's 0.05)."""

    F: Float[Tensor, " hint"]
    tolerance: float = 0.05

    def ub(self, p: Float[Tensor, "... hint 2"]) -> Float[Tensor, "..."]:
        """UB of hint-prompt probabilities ``p``."""
        return (self.F.to(p) * (p[..., 0] - p[..., 1])).mean(-1)


def renorm_gap(d: Float[Tensor, "... prompt"]) -> Float[Tensor, "..."]:
    """Mean renormalised gap ``|q(t0) - q(t1)|`` of logit differences ``d`` (= ``|tanh(d / 2)|``)."""
    return torch.tanh(d / 2).abs().mean(-1)


def additive_path(
    base: Float[Tensor, "prompt 2"], single: Float[Tensor, "cand prompt 2"], allowed: Bool[Tensor, " cand"], *,
    k: int, min_mass_ratio: float, guard: HintGuard | None = None,
) -> AdditivePath:
    """Step 2 of the module docstring on probabilities: ``base`` unedited, ``single[j]`` with unit j masked.
    With a ``guard`` the last ``len(guard.F)`` prompts are its hint prompts: predicted as the others
    (``p(t0) - p(t1) = mass * tanh(d / 2)``) and kept within its UB tolerance, not scored."""
    h = 0 if guard is None else len(guard.F)
    n = base.shape[0] - h
    d0 = base[:, 0].log() - base[:, 1].log()
    delta = single[..., 0].log() - single[..., 1].log() - d0
    m0 = base.sum(1)
    dlogm = single.sum(2).log() - m0.log()
    cur_d, cur_m = d0.clone(), torch.zeros_like(m0)
    free, floor = allowed.clone(), min_mass_ratio * float(m0[:n].mean())
    ub_floor = None if guard is None else float(guard.ub(base[n:])) - guard.tolerance
    path = AdditivePath([], [], [])
    cur = float(renorm_gap(d0[:n]))
    while len(path.order) < k and bool(free.any()):
        d, m = cur_d + delta, m0 * (cur_m + dlogm).exp()
        score, mass = renorm_gap(d[:, :n]), m[:, :n].mean(1)
        ok = free & (mass >= floor)
        if guard is not None:
            ok &= (guard.F.to(m) * m[:, n:] * torch.tanh(d[:, n:] / 2)).mean(1) >= ub_floor
        score = torch.where(ok, score, torch.full_like(score, float("inf")))
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
                ppl_limit: float, min_mass_ratio: float, guard: HintGuard | None = None) -> int:
    """Length of the prefix with the lowest measured AFGB-r within the mass, retention (and UB) limits
    (0: none lowers it). Hint prompts, with a ``guard``, are the last ``len(guard.F)``."""
    n = base.shape[0] - (0 if guard is None else len(guard.F))
    q = joint[:, :n] / joint[:, :n].sum(-1, keepdim=True)
    afgb_r = (q[..., 0] - q[..., 1]).abs().mean(-1)
    mass = joint[:, :n].sum(-1).mean(-1)
    ok = (ppl <= ppl_limit) & (mass >= min_mass_ratio * float(base[:n].sum(1).mean()))
    if guard is not None:
        ok &= guard.ub(joint[:, n:]) >= float(guard.ub(base[n:])) - guard.tolerance
    best, best_score = 0, float((base[:n, 0] - base[:n, 1]).abs().div(base[:n].sum(1)).mean())
    for i in range(len(afgb_r)):
        if bool(ok[i]) and float(afgb_r[i]) < best_score:
            best, best_score = i + 1, float(afgb_r[i])
    return best


def _gap_r(p: Float[Tensor, "... prompt 2"]) -> Float[Tensor, "..."]:
    """Mean renormalised gap of probabilities ``p``."""
    return ((p[..., 0] - p[..., 1]).abs() / p.sum(-1)).mean(-1)


def joint_selection(
    lm: LensModel, candidates: Sequence[str], units: Sequence[Unit], prompts: Sequence[str], targets: TargetSet,
    texts: Sequence[str], *, k: int, max_ppl_increase: float, min_mass_ratio: float = 0.9, value: float = 0.0,
    hint: Sequence[dict] | None = None, ub_tolerance: float = 0.05, max_rows: int = 256, progress: bool = False,
) -> LocateResult:
    """The module docstring's three steps (called by ``causal_selection(..., mode="joint")``).

    ``hint``: GenHintEval rows (``prompt``, ``F``) read with the dev prompts; the path and the chosen
    prefix then keep their UB within ``ub_tolerance`` of the unedited model's (:class:`HintGuard`).
    Labels: the additive path in order; scores: predicted AFGB-r after each step;
    ``extras["selected"]``: the verified prefix; ``extras["joint"]``: each prefix's measured
    AFGB-r, mass, perplexity (and UB)."""
    from .causal import set_readings

    n = len(prompts)
    guard = None if not hint else HintGuard(torch.tensor([float(r["F"]) for r in hint], dtype=torch.float64), ub_tolerance)
    everything = list(prompts) + [r["prompt"] for r in hint or []]
    p0, ppl0 = set_readings(lm, [[]], everything, targets, texts, max_rows=max_rows)
    single, ppl1 = set_readings(lm, [[u] for u in units], everything, targets, texts, value=value, max_rows=max_rows,
                                progress=progress)
    limit = float(ppl0[0]) * (1 + max_ppl_increase)
    path = additive_path(p0[0], single, ppl1 <= limit, k=k, min_mass_ratio=min_mass_ratio, guard=guard)
    prefixes = [[units[j] for j in path.order[: i + 1]] for i in range(len(path.order))]
    joint, pplj = set_readings(lm, prefixes, everything, targets, texts, value=value, max_rows=max_rows) if prefixes \
        else (torch.zeros(0, len(everything), 2, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    chosen = best_prefix(joint, pplj, p0[0], limit, min_mass_ratio, guard)
    labels = [candidates[j] for j in path.order]
    extras = {
        "afgb_base": float((p0[0, :n, 0] - p0[0, :n, 1]).abs().mean()), "ppl_base": float(ppl0[0]),
        "afgb_renorm_base": float(_gap_r(p0[0, :n])), "mass_base": float(p0[0, :n].sum(1).mean()),
        "max_ppl_increase": max_ppl_increase, "min_mass_ratio": min_mass_ratio, "value": value, "k": k,
        "selected": labels[:chosen], "predicted": {"afgb_renorm": path.afgb_renorm, "mass": path.mass},
        "joint": {"afgb_renorm": _gap_r(joint[:, :n]).tolist(), "mass": joint[:, :n].sum(-1).mean(-1).tolist(),
                  "ppl": pplj.tolist()},
        "single": {"afgb_renorm": dict(zip(candidates, _gap_r(single[:, :n]).tolist())),
                   "ppl": dict(zip(candidates, ppl1.tolist()))},
    }
    variant = f"joint,afgb_renorm,ppl<=+{max_ppl_increase:g},mass>={min_mass_ratio:g},scale={value:g}"
    if guard is not None:
        extras.update(ub_base=float(guard.ub(p0[0, n:])), ub_tolerance=ub_tolerance, n_hint=len(guard.F))
        extras["joint"]["ub"] = guard.ub(joint[:, n:]).tolist()
        extras["single"]["ub"] = dict(zip(candidates, guard.ub(single[:, n:]).tolist()))
        variant += f",ub>=base-{ub_tolerance:g}"
    return LocateResult("causal", labels, torch.tensor(path.afgb_renorm, dtype=torch.float64), variant=variant,
                        ascending=True, model=lm.name, n_samples=n, extras=extras)
