"""Stage 3 of the main job: every edit row, measured, saved as a sparse patch, then undone.

Each row runs :mod:`bias_lens.edit.pipeline`'s pieces (train/dev split, mask from the locate
result of its scale, the method's edit) but is measured with :func:`row_metrics`, the full set
of the report's columns. The model is restored bit-exactly after every row.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..locate.result import LocateResult

log = logging.getLogger(__name__)

#: which locate result feeds which scale
SCALE_RESULT = {"layer": "layer", "module": "module_edit", "row": "row", "neuron": "neuron",
                "attribution": "causal_selected"}


def causal_selected(causal) -> "LocateResult":
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


#: genbiaseval metrics kept per row: the papers' raw scores, their renormalised companions, the mass
GBE_KEYS = ("afgb", "afgb_renorm", "mass", "fbs", "fbs_renorm", "afgb_word", "afgb_phrase", "afgb_sentence")


def row_metrics(lm, limits: dict[str, int | None], *, prefix: str = "", batch_size: int = 32,
                details: bool = False) -> dict[str, Any]:
    """The report's columns for the current weights (``prefix``: the PB baseline's prompt prefix).

    genbiaseval -> :data:`GBE_KEYS`; genhinteval -> ``ub``, ``ub_renorm``; genbiaspro-cg ->
    ``fbs_cg``, ``fbs_cg_renorm``, ``mass_cg`` (MSME's FBS on code prompts); stereoset -> ``ss``,
    ``lms``, ``icat``; crows-pairs -> ``crows``; retention (never prefixed) -> ``perplexity`` on the
    gender-neutral corpus; mmlu (limit = questions per subject, 0-shot, test) -> ``mmlu``;
    arithmetic (limit = items, test) -> ``arithmetic``. Capability suites are never prefixed either.
    """
    from ..benchmarks import evaluate
    from ..edit.measure import PrefixedModel

    biased = PrefixedModel(lm, prefix) if prefix else lm
    m: dict[str, Any] = {}

    def run(suite: str, model=biased, **kw):
        return evaluate(model, suite, "test", batch_size=kw.pop("batch_size", batch_size), **kw)

    if "genbiaseval" in limits:
        r = run("genbiaseval", limit=limits["genbiaseval"])
        m.update({k: r.metrics[k] for k in GBE_KEYS if k in r.metrics})
        if details:
            m["_details"] = [{"profession": d.get("profession"), "p_he": d["p_he"], "p_she": d["p_she"]} for d in r.details]
    if "genhinteval" in limits:
        r = run("genhinteval", limit=limits["genhinteval"])
        m.update(ub=r.metrics["ub"], ub_renorm=r.metrics["ub_renorm"])
    if "genbiaspro-cg" in limits:
        r = run("genbiaspro-cg", limit=limits["genbiaspro-cg"], batch_size=8)
        m.update(fbs_cg=r.metrics["fbs"], fbs_cg_renorm=r.metrics["fbs_renorm"], mass_cg=r.metrics["mass"])
    if "stereoset" in limits:
        r = run("stereoset", limit=limits["stereoset"])
        m.update({k: r.metrics[k] for k in ("ss", "lms", "icat")})
    if "crows-pairs" in limits:
        m["crows"] = run("crows-pairs", limit=limits["crows-pairs"]).metrics["crows"]
    if "retention" in limits:
        m["perplexity"] = run("retention", model=lm, limit=limits["retention"]).metrics["perplexity"]
    if "mmlu" in limits:
        # small batches: MMLU prompt lengths vary 10x, and a batch pads to its longest prompt
        m["mmlu"] = run("mmlu", model=lm, limit_per_subject=limits["mmlu"], batch_size=8).metrics["accuracy"]
    if "arithmetic" in limits:
        m["arithmetic"] = run("arithmetic", model=lm, limit=limits["arithmetic"]).metrics["accuracy"]
    return m


def row_plan(cfg, row):
    """The :class:`~bias_lens.edit.pipeline.EditPlan` of one report row under run config ``cfg``."""
    from ..edit.pipeline import EditPlan

    return EditPlan(method=row.method, scale=row.scale, suite=cfg.suite, n_samples=cfg.n_train, seed=cfg.seed,
                    k=row.k, loss=row.loss, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
                    hint_anchor=row.hint_anchor, hint_loss=row.hint_loss, lr=row.lr, epochs=row.epochs,
                    eval_every=row.eval_every, patience=row.patience if row.patience is not None else cfg.patience,
                    dev_limit=cfg.dev_limit)


def run_row(lm, cfg, row, results: dict[str, Any], cache) -> dict[str, Any]:
    """Compute, measure, save and undo one edit row; returns its JSON record (cached)."""
    from ..edit.baselines import PB_PREFIX
    from ..edit.patch import save_patch
    from ..edit.pipeline import build_mask, compute_edit, split_samples

    rec = cache.get_json(f"edit_{row.name}")
    if rec is not None:
        return rec
    plan = row_plan(cfg, row)
    rec = {"row": row.to_dict(), "plan": plan.to_dict()}
    if row.method == "prompt":
        rec.update(metrics=row_metrics(lm, cfg.row_limits, prefix=PB_PREFIX, batch_size=cfg.batch_size),
                   cost_p=0, n_changed=0, prefix=PB_PREFIX)
        return cache.put_json(f"edit_{row.name}", rec)
    train, dev = split_samples(plan)
    mask = None
    if row.method != "fpft":
        result = (causal_selected(results["causal"]) if row.scale == "attribution"
                  else results[SCALE_RESULT[row.scale]])
        mask = build_mask(lm, plan, result)
        rec["labels"] = (result.top_labels(min(plan.k_eff, len(result.labels))) if row.scale != "attribution"
                         else mask_neuron_labels(result, plan))[:50]
    edit, info = compute_edit(lm, plan, mask, train, dev)
    n_changed = int(sum(edit.changed_counts(lm.hf).values()))
    handle = edit.apply_(lm.hf)
    try:
        metrics = row_metrics(lm, cfg.row_limits, batch_size=cfg.batch_size)
        save_patch(edit, cache.patch_dir(f"edit_{row.name}"), originals=handle.originals, base_name=lm.name, force=True)
    finally:
        handle.undo()
    cost = mask.size if mask is not None else sum(p.numel() for p in lm.hf.parameters())
    info.pop("history", None)
    rec.update(metrics=metrics, cost_p=int(cost), n_changed=n_changed, info=info)
    return cache.put_json(f"edit_{row.name}", rec)


def mask_neuron_labels(result, plan) -> list[str]:
    from ..edit.neuron_masking import select_neurons

    return select_neurons(result, plan.k_eff)


def choose_best(org: dict[str, float], rows: list[dict[str, Any]], *, max_ppl: float = 0.05,
                max_ub: float = 0.1) -> dict[str, Any] | None:
    """The weight edit with the lowest AFGB among those keeping perplexity within ``+max_ppl``
    (relative) and UB within ``max_ub`` of the original; ``None`` when no weight edit qualifies."""
    ok = [r for r in rows if r["n_changed"] > 0
          and r["metrics"]["perplexity"] <= org["perplexity"] * (1 + max_ppl)
          and abs(r["metrics"]["ub"] - org["ub"]) <= max_ub]
    return min(ok, key=lambda r: r["metrics"]["afgb"]) if ok else None
