"""The one edit driver: plan -> train/dev split -> located mask -> edit -> measure -> record.

:func:`apply_plan` is what ``bias-lens edit`` runs (one plan from its flags) and what every row of
``bias-lens run`` runs (the report's plans, :mod:`bias_lens.pipeline.config`):

1. ``n_samples`` seeded train samples of the plan's suite and its dev split;
2. the located weights: the given :class:`~bias_lens.locate.result.LocateResult` (the main job
   passes its locate stage's), or one computed on the train prompts by :data:`LOCATORS`; the top
   ``k`` labels as a :class:`~bias_lens.edit.masks.ParamMask` (Cost-P = its size);
3. the method's :class:`~bias_lens.edit.edits.Edit` by :data:`COMPUTE` (model unchanged);
4. the edit applied and measured by :func:`bias_lens.pipeline.measure.measure`.

It returns an :class:`EditRun`: the edit still applied (``handle.undo()`` restores the model
bit-exactly) and an :class:`EditRecord`, the one result record both commands write as JSON.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..edit.edits import Edit, EditHandle
from ..edit.masks import ParamMask
from ..edit.methods import Contrastive, Dama, EditorMethod, Equalise, Finetune, FullFinetune, Masking, Prompt, method_to_dict
from ..prefix_cache import PrefixCache, replaying
from .measure import measure
from .plan import N_LOCATE, EditPlan, layer_result_name

if TYPE_CHECKING:
    from ..lens import LensModel
    from ..locate.result import LocateResult

log = logging.getLogger(__name__)


@dataclass
class EditRecord:
    """What one plan did: metrics before/after, the mask's size and the weights really changed."""

    name: str
    plan: dict[str, Any]
    before: dict[str, float]
    metrics: dict[str, float]  # after the edit
    cost_p: int
    n_changed: int
    labels: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    prefix: str | None = None  # PB: the prompt prefix (no weights)

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (what the CLI and the run cache write)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditRecord":
        """The record of :meth:`to_dict`'s output."""
        return cls(**d)


@dataclass
class EditRun:
    """An :class:`EditRecord` plus the live edit (applied; ``handle.undo()`` reverts it)."""

    record: EditRecord
    edit: Edit | None
    handle: EditHandle | None
    located: Any = None
    artifacts: dict[str, Any] = field(default_factory=dict)  # e.g. the trained editor (``"editor"``)


def _sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded sample of ``n`` rows (all of them when ``n`` is ``None`` or not smaller)."""
    return random.Random(seed).sample(rows, n) if n is not None and n < len(rows) else rows


def split_samples(plan: EditPlan) -> tuple[list[dict], list[dict]]:
    """Seeded ``n_samples`` train samples (``None``: the whole split) and the dev split."""
    from ..benchmarks import load_split

    return _sample(load_split(plan.suite, "train"), plan.n_samples, plan.seed), load_split(plan.suite, "dev")


def hint_samples(plan: EditPlan) -> tuple[list[dict], list[dict]]:
    """Seeded ``n_samples`` GenHintEval train samples (anchor) and the GenHintEval dev split (UB guard)."""
    from ..benchmarks import load_split

    return _sample(load_split("genhinteval", "train"), plan.n_samples, plan.seed), load_split("genhinteval", "dev")


#: the paper pipeline's prompts (``Where.selection == "paper"``): candidates and ``<start>`` statistics on
#: this many of the locate prompts, causal selection on as many seeded dev prompts (docs/neuron_editing.md:
#: 64 + 64 on SmolLM2; the causal pass costs one masked forward of the dev prompts per candidate)
N_PAPER_LOCATE = 64
N_PAPER_DEV = 64
#: GenHintEval dev prompts of the joint causal rule's UB guard (``causal_mode="joint"``)
N_PAPER_HINT = 32


def _attribution(lm, prompts: list[str], plan: EditPlan):
    from ..locate.attribution import neuron_attribution
    from ..locate.general_neurons import filter_general, position_stats

    if plan.where.selection == "paper":
        return _paper_neurons(lm, prompts, plan)
    res = neuron_attribution(lm, prompts, "he,she")
    return filter_general(res, position_stats(lm, prompts)) if plan.where.general_filter else res


def _paper_neurons(lm, prompts: list[str], plan: EditPlan):
    """The interpretable-neuron-editing pipeline (:func:`~bias_lens.locate.neuron_pipeline.paper_selection`):
    its causal result, every stage in ``extras["selection"]``; ``extras["selected"]`` is the edit. The
    joint rule also keeps UB on :data:`N_PAPER_HINT` GenHintEval dev prompts (its UB guard)."""
    from ..locate.neuron_pipeline import paper_selection

    dev = [s["prompt"] for s in _sample(split_samples(plan)[1], N_PAPER_DEV, plan.seed)]
    w = plan.where
    joint = w.causal_mode == "joint"
    hint = _sample(hint_samples(plan)[1], N_PAPER_HINT, plan.seed) if joint else None
    sel = paper_selection(lm, prompts[:N_PAPER_LOCATE], dev, "he,she", k=w.k_eff, mode=w.causal_mode,
                          value=plan.method.factor if joint else 0.0, hint=hint)
    res = sel.causal
    res.extras["selection"] = {**sel.to_dict(), "n_locate": min(len(prompts), N_PAPER_LOCATE), "n_dev": len(dev),
                               "n_hint": len(hint or [])}
    return res


def _layers(lm, prompts, plan):
    """The block ranking of :func:`~bias_lens.pipeline.plan.layer_result_name`: BMI for LFTF, else MSME's layer score."""
    from ..locate.layers import bmi, layer_scale

    return bmi(lm, prompts) if layer_result_name(plan) == "bmi" else layer_scale(lm, prompts)


#: the edit's module scan scores the block-output effect only, as the main job's locate stage does
#: (``bias-lens locate module`` adds the final-output effect at ~5x the cost)
MODULE_FINAL = False


def _modules(lm, prompts, plan):
    """The module scan; the closed-form equalise edit ranks only FFN down projections (its
    last-position linearisation is a single matrix's, docs/equalise.md)."""
    from ..locate.modules import module_scale
    from .locate_stage import restrict_modules

    res = module_scale(lm, prompts, final=MODULE_FINAL)
    return restrict_modules(res, ("mlp.down",)) if isinstance(plan.method, Equalise) else res


def _rows(lm, prompts, plan):
    from ..locate.gradients import row_scale

    return row_scale(lm, prompts, _top_module(lm, prompts), order=plan.where.row_order)


def _neurons(lm, prompts, plan, module: str | None = None):
    """MSME Eq. 5 entries of ``module`` (default: the top module of a module scan on ``prompts``); for
    the closed-form equalise edit, the entries of that module with the largest share of its
    whole-matrix solution (:func:`~bias_lens.edit.equalise.solution_entries`)."""
    from ..edit.equalise import solution_entries
    from ..locate.gradients import neuron_scale

    module = module or _top_module(lm, prompts)
    if isinstance(plan.method, Equalise):
        hint = hint_samples(plan)[0] if plan.method.keep_hint else None
        return solution_entries(lm, module, [{"prompt": p} for p in prompts], k=plan.where.k_eff, hint=hint,
                                config=plan.method.config(), pick=plan.where.pick, seed=plan.seed)
    return neuron_scale(lm, prompts, module, order=plan.where.row_order, keep=plan.where.row_keep)


def _top_module(lm, prompts) -> str:
    """Row/neuron scales rank inside one module: the module scale's top FFN down projection."""
    from ..locate.modules import module_scale
    from .locate_stage import restrict_modules

    return restrict_modules(module_scale(lm, prompts, final=MODULE_FINAL), ("mlp.down",)).top_labels(1)[0]


def entries_of(module: str) -> Callable:
    """A ``locate_fn`` for :func:`apply_plan`: the neuron-scale entries of an already located
    ``module`` (the main job passes its module scan's top, instead of scanning again)."""
    def locate_entries(lm, plan: EditPlan, train: list[dict]) -> LocateResult:
        return _neurons(lm, [s["prompt"] for s in train], plan, module)

    return locate_entries


def _nested_modules(lm, prompts, plan):
    """MSME Eq. 3 inside Eq. 2's located blocks: the module scan of every weight matrix (``attn.q|k|v|o``,
    ``mlp.gate|up|down``; whole sub-blocks are not editable matrices) of the ``n_layers`` top layers.
    ``extras["chain"]`` starts the located chain (layer scores, every scanned module, the exact ties)."""
    from ..labels import LayerLabel, parse_as
    from ..locate.modules import available_modules, module_scale
    from .locate_stage import WEIGHT_MODULES

    n = plan.where.n_layers
    if n > lm.n_layers:
        raise ValueError(f"n-layers {n} exceeds the model's {lm.n_layers} layers")
    lay = _layers(lm, prompts, plan)
    top = lay.top_labels(n)
    layers = [parse_as(lab, LayerLabel).layer for lab in top]
    res = module_scale(lm, prompts, layers=layers, modules=[m for m in available_modules(lm) if m in WEIGHT_MODULES])
    best = res.top_labels(1)[0]
    res.extras["chain"] = {
        "nesting": "msme", "layer_result": lay.variant, "layers": top, "layer_scores": [lay.score_of(t) for t in top],
        "modules": dict(zip(res.labels, res.scores.tolist())), "module": res.top_labels(plan.where.k_eff),
        # zero-ablation ties exactly (no biases: q = k, v = o, gate = up = down); the stable rank keeps scan order
        "module_ties": [lab for lab in res.labels if res.score_of(lab) == res.score_of(best)],
    }
    return res


def _nested_rows(lm, prompts, plan):
    """MSME Eq. 4 inside the nested scan's top module: ``row_keep`` of its rows, in ``row_order``."""
    from ..locate.gradients import row_scale

    mod = _nested_modules(lm, prompts, plan)
    w = plan.where
    rows = row_scale(lm, prompts, mod.top_labels(1)[0], order=w.row_order, keep=w.row_keep)
    x = rows.extras
    rows.extras["chain"] = {**mod.extras["chain"], "module": x["module"], "rows": {
        k: x[k] for k in ("order", "keep", "n_rows", "n_selected", "selected_rows")}}
    return rows


def _nested_neurons(lm, prompts, plan):
    """MSME Eq. 5 inside the kept rows of :func:`_nested_rows` (the whole entry set is the edit)."""
    from ..locate.gradients import neuron_scale

    rows = _nested_rows(lm, prompts, plan)
    ent = neuron_scale(lm, prompts, rows.extras["module"], rows=rows)
    ent.extras["chain"] = {**rows.extras["chain"], "entries": {
        "n_entries": ent.extras["n_entries"], "n_rows": ent.extras["n_rows"], "top": ent.top_labels(10)}}
    return ent


#: scale -> locator on the train prompts (when no locate result is given); ``NESTED_LOCATORS``:
#: the same scales nested as MSME writes them (``Where.nesting == "msme"``)
LOCATORS: dict[str, Callable] = {"layer": _layers, "module": _modules, "row": _rows, "neuron": _neurons,
                                 "attribution": _attribution}
NESTED_LOCATORS: dict[str, Callable] = {"module": _nested_modules, "row": _nested_rows, "neuron": _nested_neurons}


def locate(lm: LensModel, plan: EditPlan, train: list[dict]) -> LocateResult:
    """The plan scale's locate result on the train prompts (nested when ``plan.where.nesting == "msme"``)."""
    table = NESTED_LOCATORS if plan.where.nesting == "msme" else LOCATORS
    return table[plan.scale](lm, [s["prompt"] for s in train], plan)


def located_labels(plan: EditPlan, result: LocateResult) -> list[str]:
    """The top ``k`` labels of ``result`` (attribution: neuron labels only, in rank order). MSME
    nesting: every kept row of the row result (its ``extras["n_selected"]``) and every entry of the
    neuron result, in rank order."""
    if plan.scale == "attribution" and plan.where.selection == "paper":
        picked = list(result.extras.get("selected", []))
        if not picked:
            raise RuntimeError(f"causal selection kept none of the {len(result.labels)} candidates (no mask lowered the "
                               "dev bias within the retention limits), so there is nothing to mask")
        return picked
    if plan.scale == "attribution":
        from ..edit.neuron_masking import select_neurons

        return select_neurons(result, plan.where.k_eff)
    if plan.where.nesting == "msme" and plan.scale in ("row", "neuron"):
        n = result.extras.get("n_selected") if plan.scale == "row" else len(result.labels)
        if n is None:
            raise ValueError("an msme-nested row plan needs a row_scale result (its extras['n_selected'] kept rows)")
        return result.top_labels(n)
    if plan.scale == "neuron" and isinstance(plan.method, Equalise):
        return result.top_labels(plan.where.k_eff)  # solution_entries already picked (it ranks every entry)
    return picked_labels(result, min(plan.where.k_eff, len(result.labels)), plan.where.pick, plan.seed)


def picked_labels(result: LocateResult, k: int, pick: str = "top", seed: int = 0) -> list[str]:
    """``k`` labels of ``result``: its best-ranked (``top``), those from rank ``n // 2`` on (``middle``),
    the lowest-ranked (``lowest``, lowest first) or a seeded random sample (``random``); the controls
    of :class:`~bias_lens.pipeline.plan.Where`."""
    order = result.order()
    if pick == "top":
        idx = order[:k]
    elif pick == "middle":
        idx = order[len(order) // 2:][:k]
    elif pick == "lowest":
        idx = order[::-1][:k]
    elif pick == "random":
        idx = random.Random(seed).sample(order, k)
    else:
        raise ValueError(f"pick must be one of top, middle, lowest, random, got {pick!r}")
    return [result.labels[i] for i in idx]


def located_chain(plan: EditPlan, located: LocateResult | None) -> dict[str, Any]:
    """``{"located_chain": ...}`` for an msme-nested plan (layer -> module -> rows -> entries, as located;
    a given result without one records its own method), ``{"neuron_selection": ...}`` (every stage) for
    the paper's neuron selection, else ``{}``."""
    if plan.where is not None and plan.where.selection == "paper" and located is not None:
        return {"neuron_selection": located.extras.get("selection", {"given_result": located.method})}
    if plan.where is None or plan.where.nesting != "msme" or located is None:
        return {}
    return {"located_chain": located.extras.get("chain", {"nesting": "msme", "given_result": located.method})}


def build_mask(lm: LensModel, plan: EditPlan, result: LocateResult) -> ParamMask:
    """The plan's mask: the located labels (attribution neurons: down columns only if asked)."""
    from ..edit.masks import mask_from_labels, without_attention, without_mlp
    from ..edit.neuron_masking import neuron_column_mask

    labels = located_labels(plan, result)
    down = plan.scale == "attribution" and plan.down_only
    mask = neuron_column_mask(lm, labels) if down else mask_from_labels(lm.hf, labels)
    drop = plan.where.drop
    mask = without_attention(mask, lm.hf) if drop == "attention" else without_mlp(mask, lm.hf) if drop == "mlp" else mask
    if mask.size == 0:
        raise ValueError(f"the mask of {labels[:3]} is empty after dropping {drop}; choose other labels")
    return mask


@dataclass
class EditData:
    """The samples a method trains on: train, dev, and (hint anchor) GenHintEval train/dev."""

    train: list[dict]
    dev: list[dict]
    plan: EditPlan


def _finetune(lm, m: Finetune, mask: ParamMask | None, data: EditData) -> tuple[Edit | None, dict[str, Any]]:
    from ..edit.baselines import fpft
    from ..edit.finetune import masked_finetune

    cfg = m.config(data.plan.scale, data.plan.seed)
    if isinstance(m, FullFinetune):
        res = fpft(lm, data.train, data.dev, cfg)
    else:
        hint, hint_dev = hint_samples(data.plan) if m.hint is not None else (None, None)
        res = masked_finetune(lm, mask, data.train, data.dev, cfg, method=f"{m.name}({data.plan.scale})", hint=hint,
                              hint_dev=hint_dev)
    if res.edit is None:
        raise RuntimeError(f"fine-tuning failed: non-finite loss at step {res.nan_step}; the model is unchanged")
    info = {"status": res.status, "best_step": res.best_step, "optimizer_state_numel": res.optimizer_state_numel,
            "history": [{k: v for k, v in h.items() if k != "losses"} for h in res.history], "config": res.config}
    return res.edit, info


def _masking(lm, m: Masking, mask: ParamMask | None, data: EditData) -> tuple[Edit, dict[str, Any]]:
    return Edit.scale(lm.hf, mask, m.factor, method=f"mask({data.plan.scale})"), {}


def _contrastive(lm, m: Contrastive, mask: ParamMask | None, data: EditData) -> tuple[Edit, dict[str, Any]]:
    """Local contrastive editing: the references (loaded from ``m.reference_dir`` or trained / read
    from the cache), the stereo/anti localisation (or its random control), the edit of the target."""
    from ..edit.contrastive import contrastive_edit, mask_diff, mask_fraction, random_like, value_diff
    from ..edit.references import References, make_references

    refs = References.load(m.reference_dir, lm) if m.reference_dir else make_references(lm, m.training, sides=m.sides)
    differ = mask_diff(refs["stereo"], refs["anti"])
    if m.localisation == "mask_diff":
        located = differ
    else:
        if m.k is None and differ.size == 0:
            raise RuntimeError("the references' masks do not differ, so value_diff has no default size; pass k")
        try:
            located = value_diff(refs["stereo"], refs["anti"], m.k or differ.size)
        except ValueError as err:  # k larger than the comparable entries: known only once the model is loaded
            raise RuntimeError(f"contrastive value_diff: {err}") from err
    where = located
    if m.control:
        shapes = {n: tuple(p.shape) for n, p in lm.hf.named_parameters()}
        where = random_like(located, shapes, seed=data.plan.seed, exclude=located)
    source = refs[m.source] if m.source is not None else None
    edit = contrastive_edit(lm, refs[m.reference], where, m.mode, alpha=m.alpha, source=source)
    info = {"config": {**method_to_dict(m), "training": refs.config}, "contrastive_size": where.size,
            "fraction": mask_fraction(where, lm), "mask_diff_fraction": mask_fraction(differ, lm),
            "reference_sparsity": {s: sub.sparsity for s, sub in refs.subnets.items()},
            "reference_fingerprint": refs.fingerprint, "reference_dir": refs.info.get("folder"), "control": m.control}
    return edit, info


def _dama(lm, m: Dama, mask: ParamMask | None, data: EditData) -> tuple[Edit, dict[str, Any]]:
    from ..benchmarks import load_split
    from ..edit.dama import dama_edit

    cfg = m.config(lm.d_model, lm.n_layers, data.plan.seed)
    edit = dama_edit(lm, load_split(m.train_suite, "train"), cfg)
    return edit, {"config": asdict(cfg), "layers": edit.meta.get("layers"), "variant": cfg.variant,
                  "per_layer": edit.meta.get("per_layer")}


def _equalise(lm, m: Equalise, mask: ParamMask | None, data: EditData) -> tuple[Edit, dict[str, Any]]:
    from ..edit.equalise import equalise_edit

    hint = hint_samples(data.plan)[0] if m.keep_hint else None
    edit = equalise_edit(lm, mask, data.train, hint=hint, config=m.config(), method=f"equalise({data.plan.scale})")
    return edit, {"config": edit.meta["config"]}


def editor_requests(bias: str, n: int, seed: int, train: list[dict] | None = None) -> list[dict]:
    """``n`` seeded StereoSet train items of type ``bias`` (disjoint from every test context): the
    requests one exported editor edit is computed from. ``train``: the split already loaded
    (default: ``editor_splits(seed)[0]``)."""
    from ..benchmarks.stereoset_train import editor_splits

    pool = [r for r in (train if train is not None else editor_splits(seed)[0]) if r["bias_type"] == bias]
    if not pool:
        raise ValueError(f"the StereoSet train split has no {bias} items to edit from")
    return random.Random(seed).sample(pool, min(n, len(pool)))


def _editor(lm, m: EditorMethod, mask: ParamMask | None, data: EditData) -> tuple[Edit, dict[str, Any]]:
    """BiasEdit: train (or load) the editors, then one shift from ``n_edits`` train requests of the bias."""
    from ..benchmarks.stereoset_train import editor_splits
    from ..edit.editor import Editor, editor_edit
    from ..edit.editor_train import train_editor

    seed = data.plan.seed
    info: dict[str, Any] = {"bias": m.bias}
    train = None
    if m.editor_dir is not None:
        editor = Editor.load(lm, m.editor_dir)
        info["editor_dir"] = m.editor_dir
    else:
        train, dev = editor_splits(seed)
        res = train_editor(lm, train, dev, m.config(seed))
        editor = res.editor
        info.update(status=res.status, best_epoch=res.best_epoch, train_seconds=res.seconds, history=res.history,
                    n_train=len(train), n_dev=len(dev), unedited_dev=res.unedited, beats_unedited=res.beats_unedited)
    requests = editor_requests(m.bias, m.n_edits or editor.config.n_edits, seed, train)
    edit = editor_edit(lm, editor, requests, method=f"biasedit({m.bias})", scale=m.shift_scale)
    info.update(config=asdict(editor.config), modules=list(editor.labels), n_requests=len(requests),
                artifacts={"editor": editor})
    return edit, info


#: method variant -> the function computing its Edit (model unchanged on return) and run information
COMPUTE: dict[type, Callable] = {Finetune: _finetune, FullFinetune: _finetune, Masking: _masking,
                                 Contrastive: _contrastive, Dama: _dama, Equalise: _equalise, EditorMethod: _editor}


def compute_edit(lm: LensModel, plan: EditPlan, mask: ParamMask | None, train: list[dict],
                 dev: list[dict]) -> tuple[Edit | None, dict[str, Any]]:
    """The plan method's edit and run information (model unchanged)."""
    fn = COMPUTE.get(type(plan.method))
    if fn is None:
        raise ValueError(f"method {plan.method.name!r} computes no weight edit")
    return fn(lm, plan.method, mask, EditData(train, dev, plan))


def _nothing_selected(lm, plan: EditPlan, located: LocateResult, limits, before, batch_size: int) -> EditRun:
    """The record of a paper-pipeline plan whose causal selection kept no neuron: no edit, 0 weights
    changed (``bias-lens edit`` exits 3 on it; the main job reports the row as unchanged)."""
    before = dict(before) if before is not None else measure(lm, limits, batch_size=batch_size)
    info = {"status": "empty_selection", **located_chain(plan, located)}
    log.warning("%s: causal selection kept none of the %d candidates; nothing to mask", plan.label, len(located.labels))
    return EditRun(EditRecord(plan.label, plan.to_dict(), before, dict(before), 0, 0, [], info), None, None, located)


def apply_plan(lm: LensModel, plan: EditPlan, located: LocateResult | None = None, *, limits: dict[str, int | None], before: dict[str, float] | None = None,
               batch_size: int = 32, locate_fn: Callable | None = None, prefix_cache: PrefixCache | None = None) -> EditRun:
    """Run ``plan`` on ``lm`` (see the module docstring); the edit is left applied on return.

    ``located``: the scale's locate result (default: located on the train prompts by ``locate_fn``
    or :func:`locate`); ``before``: already-measured metrics of the unedited model on ``limits``;
    ``prefix_cache``: block inputs recorded while measuring the unedited model on ``limits``
    (:mod:`bias_lens.prefix_cache`): the edited model's measurement replays the blocks before the
    first edited one (same numbers, bit for bit; ``info["replayed_from_block"]``)."""
    train, dev = split_samples(plan)
    mask, labels = None, []
    if plan.where is not None:
        if located is None:
            located = (locate_fn or locate)(lm, plan, _sample(train, N_LOCATE, plan.seed))
        if plan.where.selection == "paper" and not located.extras.get("selected"):
            return _nothing_selected(lm, plan, located, limits, before, batch_size)
        mask = build_mask(lm, plan, located)
        labels = located_labels(plan, located)
    before = dict(before) if before is not None else measure(lm, limits, batch_size=batch_size)
    if isinstance(plan.method, Prompt):
        after = measure(lm, limits, prefix=plan.method.text, batch_size=batch_size)
        rec = EditRecord(plan.label, plan.to_dict(), before, after, 0, 0, prefix=plan.method.text)
        return EditRun(rec, None, None, located)
    edit, info = compute_edit(lm, plan, mask, train, dev)
    artifacts = info.pop("artifacts", {})
    info.update(located_chain(plan, located))
    n_changed = int(sum(edit.changed_counts(lm.hf).values()))
    handle = edit.apply_(lm.hf)
    try:
        with replaying(lm, prefix_cache, edit.indices) as block:
            after = measure(lm, limits, batch_size=batch_size)
        if block is not None:
            info["replayed_from_block"] = block
    except BaseException:
        handle.undo()
        raise
    # Cost-P: the located mask, or for maskless methods the weights the edit writes (BiasEdit: its
    # matrices; DAMA: its projected matrices; FPFT: every weight)
    cost = mask.size if mask is not None else sum(int(idx.numel()) for idx in edit.indices.values())
    rec = EditRecord(plan.label, plan.to_dict(), before, after, int(cost), n_changed, labels[:50], info)
    return EditRun(rec, edit, handle, located, artifacts)
