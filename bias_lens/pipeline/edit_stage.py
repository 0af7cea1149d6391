"""Stage 3 of the main job: every edit row, measured, saved as a sparse patch, then undone.

Each row is an :class:`~bias_lens.pipeline.plan.EditPlan` run by the one driver,
:func:`~bias_lens.pipeline.driver.apply_plan`, on the locate stage's result for its scale and
measured by :func:`~bias_lens.pipeline.measure.measure` on ``RunConfig.row_limits``. The model
is restored bit-exactly after every row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .plan import EditPlan, layer_result_name

if TYPE_CHECKING:
    from ..lens import LensModel
    from ..locate.result import LocateResult
    from ..prefix_cache import PrefixCache
    from .cache import StageCache
    from .config import RunConfig

log = logging.getLogger(__name__)

#: which locate result feeds which scale
SCALE_RESULT = {"layer": "layer", "module": "module_edit", "row": "row", "neuron": "neuron",
                "attribution": "causal_selected"}


def causal_selected(causal: LocateResult) -> LocateResult:
    """The causally selected neurons (attribution -> general-neuron filter -> causal selection), in
    selection order: the interpretable-neuron-editing paper's pipeline. Ranking by |attribution|
    alone mixes neurons pushing toward either target, and masking those raises AFGB (measured)."""
    import torch

    from ..locate.result import LocateResult

    sel = list(causal.extras.get("selected") or [])
    if not sel:
        raise ValueError("causal selection kept no neuron (none lowered AFGB within the retention bound)")
    scores = torch.tensor([-causal.score_of(lab) for lab in sel], dtype=torch.float64)
    return LocateResult("causal-selected", sel, scores, variant=causal.variant, model=causal.model,
                        n_samples=causal.n_samples, extras={"source": "causal"})


def located_for(row: EditPlan, results: dict[str, Any]) -> LocateResult | None:
    """The locate stage's result that feeds ``row``'s scale (``None`` for maskless methods)."""
    if row.where is None:
        return None
    if row.scale == "neuron" and row.method.kind == "equalise":
        return None  # its entries are located from the closed-form solution in the module scan's top (run_row)
    if row.scale == "attribution" and row.where.selection == "paper":
        return None  # the paper pipeline locates on the row's own train / dev prompts (driver._paper_neurons)
    if row.scale == "layer":
        return results[layer_result_name(row)]  # LFTF fine-tunes BMI's top block, MSME its layer score's
    return causal_selected(results["causal"]) if row.scale == "attribution" else results[SCALE_RESULT[row.scale]]


def run_row(lm: LensModel, cfg: RunConfig, row: EditPlan, results: dict[str, Any], cache: StageCache,
            org: dict[str, float] | None = None, prefix_cache: PrefixCache | None = None) -> dict[str, Any]:
    """Run one report row through :func:`~bias_lens.pipeline.driver.apply_plan`, save its patch, undo;
    returns its :class:`~bias_lens.pipeline.driver.EditRecord` as JSON (cached), with the row's wall
    time in ``info["seconds"]``. ``prefix_cache``: the unedited measurement's block inputs
    (:mod:`bias_lens.prefix_cache`), replayed when the row's edit leaves the early blocks alone."""
    from ..edit.patch import save_patch
    from .driver import apply_plan

    key = f"edit_{row.label}"
    rec = cache.get_json(key)
    if rec is not None:
        return rec
    located = located_for(row, results)
    locate_fn = None
    if row.scale == "neuron" and located is None:  # neuron closed form: entries of the located module
        from .driver import entries_of

        locate_fn = entries_of(results["module_edit"].top_labels(1)[0])
    t0 = time.perf_counter()
    run = apply_plan(lm, cfg.plan(row), located, limits=cfg.row_limits, before=org, batch_size=cfg.batch_size,
                     locate_fn=locate_fn, prefix_cache=prefix_cache)
    if run.handle is not None:
        try:
            save_patch(run.edit, cache.patch_dir(key), originals=run.handle.originals, base_name=lm.name, force=True)
        finally:
            run.handle.undo()
    run.record.info.pop("history", None)
    run.record.info["seconds"] = round(time.perf_counter() - t0, 1)
    return cache.put_json(key, run.record.to_dict())


@dataclass(frozen=True)
class ExportRule:
    """Which row the main job exports: the lowest ``objective`` among weight edits that lower it by
    at least ``min_cut`` (relative) and pass every guard (issue 14's equalising criteria, the default):
    pronoun mass >= ``min_mass`` x original, perplexity <= original x (1 + ``max_ppl``), UB >=
    original - ``max_ub_drop``, MMLU / arithmetic accuracy >= original - ``max_acc_drop`` (1 point).

    ``ExportRule.raw()`` is the rule of the earlier runs: lowest raw AFGB with perplexity within
    +5% and |UB change| <= 0.1, mass and capability unguarded (it exported edits that lower both
    pronouns)."""

    objective: str = "afgb_renorm"
    #: the objective must fall at least this much (relative): a 0.01% move is noise, not an edit that equalises
    min_cut: float = 0.05
    min_mass: float | None = 0.9
    max_ppl: float = 0.05
    max_ub_drop: float | None = 0.05
    max_ub_change: float | None = None
    max_acc_drop: float | None = 0.01

    def describe(self) -> str:
        """One line: what this rule exports."""
        keep = [f"perplexity <= +{self.max_ppl:.0%}"]
        if self.min_mass is not None:
            keep.insert(0, f"mass >= {self.min_mass} x Org")
        if self.max_ub_drop is not None:
            keep.append(f"UB >= Org - {self.max_ub_drop}")
        if self.max_ub_change is not None:
            keep.append(f"|UB change| <= {self.max_ub_change}")
        if self.max_acc_drop is not None:
            keep.append(f"MMLU / arithmetic >= Org - {self.max_acc_drop:g}")
        lowers = f" that lower it by >= {self.min_cut:.0%}" if self.min_cut > 0 else ""
        return f"lowest {self.objective} among weight edits{lowers} keeping {', '.join(keep)}"

    @classmethod
    def raw(cls) -> "ExportRule":
        """The rule of runs that recorded none: raw AFGB objective, no mass or accuracy bounds."""
        return cls(objective="afgb", min_cut=0.0, min_mass=None, max_ub_drop=None, max_ub_change=0.1, max_acc_drop=None)

    def failures(self, org: dict[str, float], row: dict[str, Any]) -> list[str]:
        """Why ``row`` may not be exported (empty: it may)."""
        m, why = row["metrics"], []
        if row["n_changed"] == 0:
            return ["changes no weights"]
        if self.min_cut > 0 and not m[self.objective] <= org[self.objective] * (1 - self.min_cut):
            why.append(f"{self.objective} {m[self.objective]:.3f} not {self.min_cut:.0%} below {org[self.objective]:.3f}")
        if self.min_mass is not None and "mass" in m and m["mass"] < self.min_mass * org["mass"]:
            why.append(f"mass {m['mass']:.3f} < {self.min_mass} x {org['mass']:.3f}")
        if m["perplexity"] > org["perplexity"] * (1 + self.max_ppl):
            why.append(f"perplexity {m['perplexity']:.2f} > {org['perplexity']:.2f} x {1 + self.max_ppl}")
        if self.max_ub_drop is not None and m["ub"] < org["ub"] - self.max_ub_drop:
            why.append(f"UB {m['ub']:.3f} < {org['ub']:.3f} - {self.max_ub_drop}")
        if self.max_ub_change is not None and abs(m["ub"] - org["ub"]) > self.max_ub_change:
            why.append(f"|UB change| {abs(m['ub'] - org['ub']):.3f} > {self.max_ub_change}")
        for k in ("mmlu", "arithmetic"):
            if self.max_acc_drop is not None and k in m and k in org and m[k] < org[k] - self.max_acc_drop:
                why.append(f"{k} {m[k]:.3f} < {org[k]:.3f} - {self.max_acc_drop}")
        return why


def is_control(row: dict[str, Any]) -> bool:
    """Whether a row record is a located edit's control (``Where.pick`` other than ``top``)."""
    where = (row.get("plan") or {}).get("where") or {}
    return where.get("pick", "top") != "top"


def choose_best(org: dict[str, float], rows: list[dict[str, Any]], rule: ExportRule | None = None) -> dict[str, Any] | None:
    """The row ``rule`` exports (default :class:`ExportRule`); ``None`` when no weight edit passes.
    Controls (:func:`is_control`) are never exported: they answer whether locating matters."""
    rule = rule or ExportRule()
    ok = [r for r in rows if not is_control(r) and not rule.failures(org, r)]
    return min(ok, key=lambda r: r["metrics"][rule.objective]) if ok else None
