"""Stage 2 of the main job: locate at every scale on the suite's train prompts.

Order and reuse: one residual pass gives the layer score and BMI; the module scan picks the
module whose rows and entries are scored next (the top block-output score among the weight
matrices of ``RunConfig.edit_module_kinds``, as MSME narrows layer -> module -> row -> neuron); one cached last-position pass feeds
neuron/head attribution, the general-neuron filter, causal selection and the circuit trace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..locate.result import LocateResult

log = logging.getLogger(__name__)

WEIGHT_MODULES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def top_weight_module(module_result: LocateResult, kinds: tuple[str, ...] = WEIGHT_MODULES) -> str:
    """The highest-scoring single-matrix module label of one of ``kinds`` (skips whole ``attn``/``mlp``)."""
    return restrict_modules(module_result, kinds).top_labels(1)[0]


def restrict_modules(module_result: LocateResult, kinds: tuple[str, ...]) -> LocateResult:
    """The module scan restricted to single-matrix modules of ``kinds`` (what the module edit ranks).

    Zero-ablation gives equal scores to matrices whose zeroing removes the same signal (without
    biases: q = k, v = o = whole attention, gate = up = down = whole MLP), so the edit target is
    chosen among the kinds the run edits (``RunConfig.edit_module_kinds``) rather than by tie order.
    """
    bad = [k for k in kinds if k not in WEIGHT_MODULES]
    if bad:
        raise ValueError(f"unknown module kinds {bad}; choose from {', '.join(WEIGHT_MODULES)}")
    idx = [i for i, lab in enumerate(module_result.labels) if lab.split(".", 1)[1] in kinds]
    if not idx:
        raise ValueError(f"the module scan scored no module of kinds {', '.join(kinds)}")
    return LocateResult(
        module_result.method, [module_result.labels[i] for i in idx], module_result.scores[idx],
        variant=f"{module_result.variant},kinds={'+'.join(kinds)}", model=module_result.model,
        n_samples=module_result.n_samples, extras={"restricted_from": "module", "kinds": list(kinds)},
    )


def locate_all(lm, cfg, prompts: list[str], dev_prompts: list[str], cache, step: Callable[[str], None],
               cg_prompts: list[str] | None = None) -> dict[str, Any]:
    """Every locate result (cached per method); ``step(name)`` advances the progress bar."""
    from ..locate.attribution import collect_last, head_attribution, neuron_attribution
    from ..locate.causal import causal_selection
    from ..locate.circuit import trace_circuit
    from ..locate.general_neurons import detect_general, filter_general, position_stats
    from ..locate.gradients import neuron_scale, row_scale
    from ..locate.layers import bmi_robustness, layer_scale_and_bmi
    from ..locate.modules import module_scale

    out: dict[str, Any] = {}

    def cached(name: str, fn: Callable[[], LocateResult]) -> LocateResult:
        res = cache.get_result(name)
        if res is None:
            res = cache.put_result(name, fn())
        out[name] = res
        step(name)
        return res

    bs = cfg.batch_size
    if cache.get_result("layer") is None or cache.get_result("bmi") is None:
        lay, bm = layer_scale_and_bmi(lm, prompts, batch_size=bs)
        cache.put_result("layer", lay)
        cache.put_result("bmi", bm)
    cached("layer", lambda: cache.get_result("layer"))
    cached("bmi", lambda: cache.get_result("bmi"))
    if cg_prompts:
        if cache.get_result("layer_cg") is None or cache.get_result("bmi_cg") is None:
            lay, bm = layer_scale_and_bmi(lm, cg_prompts, batch_size=8)
            cache.put_result("layer_cg", lay)
            cache.put_result("bmi_cg", bm)
        cached("layer_cg", lambda: cache.get_result("layer_cg"))
        cached("bmi_cg", lambda: cache.get_result("bmi_cg"))
    if cfg.bmi_robustness:
        from ..benchmarks import load_split

        pool = [s["prompt"] for s in load_split(cfg.suite, "train")]
        cached("bmi_robustness", lambda: bmi_robustness(lm, pool, n=100, batch_size=bs))
    mod = cached("module", lambda: module_scale(lm, prompts, batch_size=bs, final=cfg.module_final))
    out["module_edit"] = restrict_modules(mod, tuple(cfg.edit_module_kinds))
    target = out["module_edit"].top_labels(1)[0]
    rows = cached("row", lambda: row_scale(lm, prompts, target, batch_size=bs))
    cached("row_ascending", lambda: row_scale(lm, prompts, target, order="ascending", batch_size=bs))
    cached("neuron", lambda: neuron_scale(lm, prompts, target, rows=rows, batch_size=bs))
    last = None

    def get_last():
        nonlocal last
        if last is None:
            last = collect_last(lm, prompts, batch_size=bs)
        return last

    attr = cached("attribution", lambda: neuron_attribution(lm, prompts, cache=get_last()))
    cached("heads", lambda: head_attribution(lm, prompts, cache=get_last()))
    stats_holder: dict[str, Any] = {}

    def stats():
        if "s" not in stats_holder:
            stats_holder["s"] = position_stats(lm, prompts, batch_size=16)
        return stats_holder["s"]

    filt = cached("attribution_filtered", lambda: filter_general(attr, stats()))
    cached("general_neurons", lambda: detect_general(stats(), model=lm.name))
    cands = filt.top_labels(cfg.causal_candidates)
    cached("causal", lambda: causal_selection(lm, cands, dev_prompts, k=cfg.causal_k))
    root = filt.top_labels(1)[0]
    graph = cache.get_json("circuit")
    if graph is None:
        graph = cache.put_json("circuit", trace_circuit(lm, root, prompts, cache=get_last(),
                                                        depth=cfg.circuit_depth).to_dict())
    out["circuit"] = graph
    step("circuit")
    return out
