"""Early stopping for masked fine-tuning: one objective (dev bias) and guards, each a small object.

Every check applies the current :class:`~bias_lens.edit.edits.Edit` temporarily and asks each
monitor for one number on the edited model. A :class:`Guard` has ``measure(lm)``, a ``base`` (its
value on the unedited model, measured once by :meth:`EarlyStopping.baseline`) and ``verdict(value)``:

* ``"stop"`` — roll back to the best accepted state and stop (the retention guard: neutral
  perplexity rose more than ``threshold``, relative);
* ``"reject"`` — this state may not become the best one; it counts toward ``patience`` (the UB
  guard: dev UB fell more than ``tolerance``; the mass guard: dev pronoun mass fell below
  ``floor`` x its baseline);
* ``"ok"``.

The objective (:class:`DevBias`) is the quantity early stopping minimises: raw dev AFGB (the
papers' metric, the literal default) or its renormalised companion ``afgb_renorm`` (the
equalising reading: only the he/she *shares* count, not how much of the pronouns is left). All
numbers come from the shared metric code of :mod:`bias_lens.edit.measure` /
:mod:`bias_lens.benchmarks.metrics`, the very functions the reports use.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DEV_METRICS = ("afgb", "afgb_renorm")


@dataclass
class DevBias:
    """The early-stopping objective on dev prompts (lower is better)."""

    prompts: list[str]
    metric: str = "afgb"
    #: (he, she) probabilities of the last measurement (the mass guard reads them: one dev pass per check)
    last_probs: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.metric not in DEV_METRICS:
            raise ValueError(f"dev metric must be one of {', '.join(DEV_METRICS)}, got {self.metric!r}")

    @property
    def key(self) -> str:
        """History key of the objective (``dev_afgb`` or ``dev_<metric>``)."""
        return "dev_afgb" if self.metric == "afgb" else f"dev_{self.metric}"

    def measure(self, lm: Any) -> float | None:
        """The dev bias (AFGB or renormalised AFGB) of ``lm`` on the dev prompts; None without dev prompts."""
        from ..benchmarks.metrics import afgb_t
        from .measure import dev_probs

        if not self.prompts:
            return None
        self.last_probs = dev_probs(lm, self.prompts)
        return float(afgb_t(self.last_probs, renorm=self.metric == "afgb_renorm"))


@dataclass
class Guard:
    """One guard: ``fn(lm)`` -> value; a value past ``limit(base)`` (above it when ``above``, else
    below it) gets ``on_fail`` (``"stop"`` or ``"reject"``). ``base`` is set by ``EarlyStopping.baseline``."""

    key: str
    fn: Callable[[Any], float | None]
    limit: Callable[[float], float]
    above: bool
    on_fail: str
    base: float | None = None

    def measure(self, lm: Any) -> float | None:
        """The guarded value of ``lm`` (``fn(lm)``)."""
        return self.fn(lm)

    def verdict(self, value: float | None) -> str:
        """``"ok"``, or ``on_fail`` when ``value`` is past ``limit(base)`` (logged with the numbers)."""
        if value is None or self.base is None:
            return "ok"
        bound = self.limit(self.base)
        if (value > bound) if self.above else (value < bound):
            log.info("%s %.4f %s %.4f (unedited %.4f): %s", self.key, value, ">" if self.above else "<", bound,
                     self.base, "rolling back" if self.on_fail == "stop" else "state not accepted")
            return self.on_fail
        return "ok"


def retention_guard(texts: Sequence[str], threshold: float = 0.05, base: float | None = None) -> Guard:
    """Stop (and roll back) when neutral-text perplexity rises more than ``threshold`` (relative)."""
    from .measure import retention_perplexity

    texts = list(texts)
    return Guard("retention_ppl", lambda lm: retention_perplexity(lm, texts) if texts else None,
                 lambda b: b * (1 + threshold), True, "stop", base)


def ub_guard(samples: Sequence[dict], tolerance: float = 0.05, base: float | None = None) -> Guard:
    """Reject states whose dev UB-Score (GenHintEval) fell more than ``tolerance`` below baseline."""
    from .measure import dev_ub

    samples = list(samples)
    return Guard("dev_ub", lambda lm: dev_ub(lm, samples) if samples else None, lambda b: b - tolerance, False,
                 "reject", base)


def mass_guard(prompts: Sequence[str], floor: float = 0.9, base: float | None = None, *,
               objective: DevBias | None = None) -> Guard:
    """Reject states whose dev pronoun mass ``p(he) + p(she)`` fell below ``floor`` x baseline.

    With ``objective`` (the :class:`DevBias` on the same prompts, measured first in each check) the
    mass is read from its probabilities instead of a second pass over the dev prompts."""
    from ..benchmarks.metrics import mass_t
    from .measure import dev_mass

    prompts = list(prompts)

    def fn(lm: Any) -> float | None:
        if not prompts:
            return None
        if objective is not None and objective.prompts == prompts and objective.last_probs is not None:
            return float(mass_t(objective.last_probs))
        return dev_mass(lm, prompts)

    return Guard("dev_mass", fn, lambda b: floor * b, False, "reject", base)


@dataclass
class EarlyStopping:
    """Keeps the best accepted state: the lowest objective among states no guard rejected.

    ``check`` returns ``"retention_rollback"`` (a guard said stop), ``"early_stopped"``
    (``patience`` checks without an accepted improvement) or ``None``; ``accepted`` tells whether
    the last checked state became the best one."""

    objective: DevBias
    guards: Sequence[Any]
    patience: int = 2
    best: float = math.inf
    best_step: int = 0
    bad: int = 0
    accepted: bool = False
    history: list[dict] = field(default_factory=list)

    def _measure(self, lm: Any, step: int) -> tuple[dict[str, Any], float | None, list[float | None]]:
        # the objective first: the mass guard reads its dev probabilities (every number is pure)
        self.objective.last_probs = None
        dv = self.objective.measure(lm)
        values = [g.measure(lm) for g in self.guards]
        rec: dict[str, Any] = {"step": step, self.objective.key: dv}
        for g, v in zip(self.guards, values):
            if v is not None or g.key == "retention_ppl":
                rec[g.key] = v
        return rec, dv, values

    def baseline(self, lm: Any) -> dict[str, Any]:
        """Measure the unedited model: each guard's base and the objective's starting best."""
        rec, dv, values = self._measure(lm, 0)
        for g, v in zip(self.guards, values):
            g.base = v
        self.best = dv if dv is not None else math.inf
        rec[self.objective.key] = self.best
        self.history = [rec]
        return rec

    def check(self, lm: Any, step: int) -> str | None:
        """Judge the model as it is now (the caller applied the candidate edit)."""
        rec, dv, values = self._measure(lm, step)
        self.history.append(rec)
        log.info("check at step %d: %s", step, {k: v for k, v in rec.items() if k != "step"})
        verdicts = [g.verdict(v) for g, v in zip(self.guards, values)]
        self.accepted = False
        if "stop" in verdicts:
            return "retention_rollback"
        if "reject" not in verdicts and (dv is None or dv < self.best):
            self.best = dv if dv is not None else self.best
            self.best_step, self.bad, self.accepted = step, 0, True
            return None
        self.bad += 1
        return "early_stopped" if self.bad >= self.patience else None
