"""Stage 2 of the main job: locate at every scale on the suite's train prompts.

Order and reuse: one residual pass gives the layer score and BMI; the module scan picks the
module whose rows and entries are scored next (the top block-output score among the weight
matrices of ``RunConfig.edit_module_kinds``, as MSME narrows layer -> module -> row -> neuron); one cached last-position pass feeds
neuron/head attribution, the general-neuron filter, causal selection and the circuit trace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..labels import ModuleLabel, try_parse
from ..locate.result import LocateResult

if TYPE_CHECKING:
    from ..lens import LensModel
    from .cache import StageCache
    from .config import RunConfig

log = logging.getLogger(__name__)

#: the results compared layer by layer (:mod:`bias_lens.locate.agreement`), when the run has them
AGREEMENT_RESULTS = ("layer", "layer_cg", "bmi", "module", "heads", "attribution")
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
    idx = [i for i, lab in enumerate(module_result.labels)
           if isinstance(m := try_parse(lab), ModuleLabel) and m.kind in kinds]
    if not idx:
        raise ValueError(f"the module scan scored no module of kinds {', '.join(kinds)}")
    return LocateResult(
        module_result.method, [module_result.labels[i] for i in idx], module_result.scores[idx],
        variant=f"{module_result.variant},kinds={'+'.join(kinds)}", model=module_result.model,
        n_samples=module_result.n_samples, extras={"restricted_from": "module", "kinds": list(kinds)},
    )


def locate_all(lm: LensModel, cfg: RunConfig, prompts: list[str], dev_prompts: list[str], cache: StageCache, step: Callable[[str], None],
               cg_prompts: list[str] | None = None) -> dict[str, Any]:
    """Every locate result (cached per method); ``step(name)`` advances the progress bar."""
    out: dict[str, Any] = {}

    def cached(name: str, fn: Callable[[], LocateResult]) -> LocateResult:
        res = cache.get_result(name)
        if res is None:
            res = cache.put_result(name, fn())
        out[name] = res
        step(name)
        return res

    _locate_layers(lm, cfg, prompts, cache, cached, cg_prompts)
    _locate_module(lm, cfg, prompts, cached, out)
    _locate_neurons(lm, cfg, prompts, dev_prompts, cache, cached, step, out)
    out["agreement"] = layer_agreement(out, lm.n_layers)
    return out


def layer_agreement(results: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Spearman agreement over layers of the :data:`AGREEMENT_RESULTS` present (a JSON-ready dict)."""
    from ..locate.agreement import agreement

    return agreement({k: results[k] for k in AGREEMENT_RESULTS if k in results}, n_layers).to_dict()


def _layer_pass(lm, prompts: list[str], cache, names: tuple[str, str], batch_size: int) -> dict[str, LocateResult]:
    """The layer score and BMI under ``names``: from the cache, else one residual pass for both
    (returned, not re-read from the cache: with the cache off, ``--no-cache``, nothing is stored)."""
    from ..locate.layers import layer_scale_and_bmi

    got = {n: cache.get_result(n) for n in names}
    if any(r is None for r in got.values()):
        lay, bm = layer_scale_and_bmi(lm, prompts, batch_size=batch_size)
        got = {names[0]: cache.put_result(names[0], lay), names[1]: cache.put_result(names[1], bm)}
    return got


def _locate_layers(lm, cfg, prompts: list[str], cache, cached, cg_prompts: list[str] | None) -> None:
    """Layer score and BMI (on ``prompts`` and on ``cg_prompts``), then the BMI robustness check."""
    got = _layer_pass(lm, prompts, cache, ("layer", "bmi"), cfg.batch_size)
    if cg_prompts:
        got |= _layer_pass(lm, cg_prompts, cache, ("layer_cg", "bmi_cg"), 8)
    for name, res in got.items():
        cached(name, lambda res=res: res)
    if cfg.bmi_robustness:
        from ..benchmarks import load_split
        from ..locate.layers import bmi_robustness

        pool = [s["prompt"] for s in load_split(cfg.suite, "train")]
        cached("bmi_robustness", lambda: bmi_robustness(lm, pool, n=100, batch_size=cfg.batch_size))


def _locate_module(lm, cfg, prompts: list[str], cached, out: dict[str, Any]) -> str:
    """Module scan, its restriction to the edited kinds, and row/entry scores of the top module (returned)."""
    from ..locate.gradients import neuron_scale, row_scale
    from ..locate.modules import module_scale

    bs = cfg.batch_size
    mod = cached("module", lambda: module_scale(lm, prompts, batch_size=bs, final=cfg.module_final))
    out["module_edit"] = restrict_modules(mod, tuple(cfg.edit_module_kinds))
    target = out["module_edit"].top_labels(1)[0]
    rows = cached("row", lambda: row_scale(lm, prompts, target, batch_size=bs))
    cached("row_ascending", lambda: row_scale(lm, prompts, target, order="ascending", batch_size=bs))
    cached("neuron", lambda: neuron_scale(lm, prompts, target, rows=rows, batch_size=bs))
    return target


def _locate_neurons(lm, cfg, prompts: list[str], dev_prompts: list[str], cache, cached,
                    step: Callable[[str], None], out: dict[str, Any]) -> None:
    """Attribution (one cached last-position pass, computed only if needed), general neurons, causal, circuit."""
    from ..locate.attribution import collect_last, head_attribution, neuron_attribution
    from ..locate.causal import causal_selection
    from ..locate.circuit import trace_circuit
    from ..locate.general_neurons import detect_general, filter_general, position_stats

    bs = cfg.batch_size
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
    out["projection"] = _projection(lm, filt, cache)
    step("projection")


#: neurons of the vocabulary-projection table (the filtered attribution ranking's top) and tokens per side
N_PROJECTED, K_TOKENS = 12, 8


def _projection(lm, ranked, cache) -> dict[str, Any]:
    """The interpretable-neuron-editing paper's Table 2 for the top :data:`N_PROJECTED` neurons of
    ``ranked``: each one's top / bottom tokens through the unembedding, with its attribution score."""
    from ..locate.projection import neuron_vocab_projection

    proj = cache.get_json("projection")
    if proj is None:
        labels = ranked.top_labels(N_PROJECTED)
        tokens = neuron_vocab_projection(lm, labels, k=K_TOKENS)
        proj = cache.put_json("projection", {"labels": labels, "scores": [ranked.score_of(lab) for lab in labels],
                                             "source": ranked.method, "tokens": tokens})
    return proj
