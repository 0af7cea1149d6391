"""The end-to-end edit pipeline behind ``bias-lens edit``: locate -> mask -> edit -> measure.

:class:`EditPlan` (a validated dataclass) says what to do; :func:`run_edit` does it on a loaded
:class:`~bias_lens.lens.LensModel`:

1. train / dev samples of the suite (train subsampled to ``n_samples`` with ``seed``);
2. a :class:`~bias_lens.locate.result.LocateResult` for the scale (given, or computed on the
   train prompts: layer / module / row / neuron scales by the scale locators of
   :mod:`bias_lens.locate`, imported lazily; attribution scale by
   :func:`~bias_lens.locate.attribution.neuron_attribution` after the general-neuron filter);
3. a :class:`~bias_lens.edit.masks.ParamMask` of its top ``k`` labels (Cost-P = ``mask.size``);
4. an :class:`~bias_lens.edit.edits.Edit` by the method — ``msme`` (masked fine-tuning with the
   MSME loss: Eq. 6-8 as written, ``msme_literal``, unless ``loss`` says otherwise), ``lftf`` (LFTF Eq. 5 loss or its
   he/she ablations; ``drop`` removes attention or MLP tensors from the mask), ``mask`` (scale the
   masked entries by ``mask_scale``; for the attribution scale only the neurons' down-projection
   columns, i.e. neuron masking), ``contrastive`` (reference fine-tuned toward anti-stereotypical
   targets over the mask, then top-``contrastive_k`` value-difference entries edited by
   ``contrastive_mode``/``alpha``), ``fpft`` (every parameter) or ``prompt`` (PB, no weights);
5. metrics before and after on the test split plus retention (:func:`~bias_lens.edit.measure.model_metrics`).

``hint_anchor=True`` (msme / lftf) adds the hint anchor of docs/edit_hint.md: ``n_samples`` seeded
GenHintEval *train* samples in the loss (``hint_weight`` x ``hint_loss``) and, with ``ub_tolerance``,
a dev-UB guard on ``hint_dev_limit`` GenHintEval dev samples in early stopping.

The edit is left applied on return (``EditRun.handle.undo()`` restores the model bit-exactly).
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from .edits import Edit, EditHandle
from .finetune import SCALE_LR, FinetuneConfig
from .masks import ParamMask

log = logging.getLogger(__name__)

SCALES = ("layer", "module", "row", "neuron", "attribution")
METHODS = ("msme", "lftf", "mask", "contrastive", "fpft", "prompt")
WEIGHTLESS = ("fpft", "prompt")  # methods that do not use a located mask
#: Default number of located labels per scale (a block, a module, rows, entries, FFN neurons).
DEFAULT_K = {"layer": 1, "module": 1, "row": 4, "neuron": 4096, "attribution": 8}
#: msme: MSME Eq. 6-8 as written (see losses.py and docs/edit.md for the measured reason);
#: contrastive: the reference is aligned toward anti-stereotypical shares, which needs msme_align.
METHOD_LOSS = {"msme": "msme_literal", "lftf": "lftf", "contrastive": "msme_align", "fpft": "msme_literal"}
#: Where the scale locators live (written by the locate layer; imported lazily).
LOCATORS = {
    "layer": ("bias_lens.locate.layers", "layer_scale"),
    "module": ("bias_lens.locate.modules", "module_scale"),
    "row": ("bias_lens.locate.gradients", "row_scale"),
    "neuron": ("bias_lens.locate.gradients", "neuron_scale"),
}
PROFESSION_SUITES = ("genbiaseval", "genbiaspro-cg", "dama")


@dataclass
class EditPlan:
    """What ``bias-lens edit`` does (see the module docstring). ``None`` = the method/scale default."""

    method: str
    scale: str | None = None
    suite: str = "genbiaseval"
    n_samples: int = 256
    seed: int = 0
    k: int | None = None
    loss: str | None = None
    lr: float | None = None
    epochs: int | None = None
    max_steps: int | None = None
    eval_every: int | None = None  # steps between dev/retention checks (None: once per epoch)
    patience: int = 2
    batch_size: int = 32
    dev_limit: int = 128
    retention_limit: int = 48
    retention_threshold: float = 0.05
    limit: int | None = None  # test-split samples scored before/after (None = all)
    ub_limit: int | None = None
    neuron_params: str = "all"  # attribution scale, msme/lftf: "all" (down col + gate/up rows) or "down"
    general_filter: bool = True
    drop: str | None = None  # LFTF ablation: "attention" or "mlp"
    mask_scale: float = 0.0
    contrastive_mode: str = "interpolate"
    alpha: float = 1.0
    contrastive_k: int = 5000
    hint_anchor: bool = False  # msme/lftf: anchor UB on GenHintEval train prompts (docs/edit_hint.md)
    hint_weight: float = 1.0
    hint_loss: str = "ub_drop"
    ub_tolerance: float | None = 0.05  # with hint_anchor: dev-UB guard in early stopping (None: off)
    hint_dev_limit: int = 64

    def __post_init__(self) -> None:
        from .contrastive import MODES
        from .losses import get_loss

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.scale is None and self.method not in WEIGHTLESS:
            raise ValueError(f"method {self.method!r} needs --scale ({'|'.join(SCALES)})")
        if self.scale is not None and self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; choose one of {', '.join(SCALES)}")
        if self.suite not in PROFESSION_SUITES:
            raise ValueError(f"editing needs a profession suite with real-world shares: {', '.join(PROFESSION_SUITES)}")
        for name in ("n_samples", "batch_size", "dev_limit", "contrastive_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("k", "epochs", "max_steps", "limit", "ub_limit", "eval_every", "patience"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {v}")
        if self.retention_limit < 0:
            raise ValueError("retention-limit must be >= 0")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.loss is not None:
            get_loss(self.loss)
        if self.neuron_params not in ("all", "down"):
            raise ValueError(f"neuron-params must be 'all' or 'down', got {self.neuron_params!r}")
        if self.drop not in (None, "attention", "mlp"):
            raise ValueError(f"drop must be 'attention' or 'mlp', got {self.drop!r}")
        if self.hint_anchor:
            from .losses import get_hint_loss

            get_hint_loss(self.hint_loss)
            if self.method not in ("msme", "lftf"):
                raise ValueError(f"hint-anchor applies to the msme and lftf methods, not {self.method!r}")
            if not self.hint_weight > 0:
                raise ValueError(f"hint-weight must be > 0 with hint-anchor, got {self.hint_weight}")
            if self.ub_tolerance is not None and self.ub_tolerance < 0:
                raise ValueError(f"ub-tolerance must be >= 0, got {self.ub_tolerance}")
            if self.hint_dev_limit < 1:
                raise ValueError(f"hint-dev-limit must be >= 1, got {self.hint_dev_limit}")
        if self.contrastive_mode not in MODES:
            raise ValueError(f"contrastive mode must be one of {', '.join(MODES)}")
        if self.contrastive_mode == "mask_switch":
            raise ValueError("mask_switch needs pruning masks; use the library's contrastive.mask_diff_mask")
        if self.contrastive_mode == "interpolate" and not 0 <= self.alpha <= 1:
            raise ValueError(f"interpolation needs 0 <= alpha <= 1 (got {self.alpha}); use --contrastive-mode extrapolate")

    @property
    def k_eff(self) -> int:
        return self.k if self.k is not None else DEFAULT_K[self.scale or "layer"]

    def finetune_config(self) -> FinetuneConfig:
        scale = self.scale if self.method != "fpft" else "all"
        over: dict[str, Any] = {"loss": self.loss or METHOD_LOSS.get(self.method, "msme_align"), "seed": self.seed,
                                "batch_size": self.batch_size, "dev_limit": self.dev_limit,
                                "retention_limit": self.retention_limit, "retention_threshold": self.retention_threshold,
                                "max_steps": self.max_steps, "eval_every": self.eval_every, "patience": self.patience}
        if self.lr is not None:
            over["lr"] = self.lr
        if self.epochs is not None:
            over["epochs"] = self.epochs
        if self.hint_anchor:
            over.update(hint_weight=self.hint_weight, hint_loss=self.hint_loss, ub_tolerance=self.ub_tolerance,
                        hint_dev_limit=self.hint_dev_limit)
        return FinetuneConfig.for_scale(scale if scale in SCALE_LR else "all", **over)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EditRun:
    """What :func:`run_edit` produced (the edit is applied to the model; ``handle.undo()`` reverts)."""

    plan: EditPlan
    before: dict[str, float]
    after: dict[str, float]
    edit: Edit | None
    handle: EditHandle | None
    mask_size: int
    n_changed: int
    locate: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def split_samples(plan: EditPlan) -> tuple[list[dict], list[dict]]:
    """Seeded ``n_samples`` train samples and the dev split."""
    from ..benchmarks import load_split

    train = load_split(plan.suite, "train")
    if plan.n_samples < len(train):
        train = random.Random(plan.seed).sample(train, plan.n_samples)
    return train, load_split(plan.suite, "dev")


def hint_samples(plan: EditPlan) -> tuple[list[dict], list[dict]]:
    """Seeded ``n_samples`` GenHintEval train samples (anchor) and the GenHintEval dev split (UB guard)."""
    from ..benchmarks import load_split

    hint = load_split("genhinteval", "train")
    if plan.n_samples < len(hint):
        hint = random.Random(plan.seed).sample(hint, plan.n_samples)
    return hint, load_split("genhinteval", "dev")


def locate(lm, plan: EditPlan, train: list[dict]):
    """The scale's locate result on the train prompts (lazy import of the scale locator)."""
    import importlib

    prompts = [s["prompt"] for s in train]
    if plan.scale == "attribution":
        from ..locate.attribution import neuron_attribution

        res = neuron_attribution(lm, prompts, "he,she")
        if plan.general_filter:
            from ..locate.general_neurons import filter_general, position_stats

            res = filter_general(res, position_stats(lm, prompts))
        return res
    mod_name, fn_name = LOCATORS[plan.scale]
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"no {plan.scale}-scale locator ({mod_name}.{fn_name}) is available in this install; "
                         "pass a saved locate result with --locate-json") from err
    return fn(lm, prompts)


def build_mask(lm, plan: EditPlan, result) -> ParamMask:
    """Top-``k`` labels of ``result`` as a mask (attribution neurons: down columns only if asked)."""
    from .masks import mask_from_labels, without_attention, without_mlp
    from .neuron_masking import down_column_mask, select_neurons

    if plan.scale == "attribution":
        labels = select_neurons(result, plan.k_eff)
        down_only = plan.method == "mask" or plan.neuron_params == "down"
        mask = down_column_mask(lm, labels) if down_only else mask_from_labels(lm.hf, labels)
    else:
        labels = result.top_labels(min(plan.k_eff, len(result.labels)))
        mask = mask_from_labels(lm.hf, labels)
    if plan.drop == "attention":
        mask = without_attention(mask, lm.hf)
    elif plan.drop == "mlp":
        mask = without_mlp(mask, lm.hf)
    if mask.size == 0:
        raise ValueError(f"the mask of {labels[:3]} is empty after dropping {plan.drop}; choose other labels")
    return mask


def compute_edit(lm, plan: EditPlan, mask: ParamMask | None, train, dev) -> tuple[Edit | None, dict[str, Any]]:
    """The method's edit (model unchanged on return) and run information."""
    from .finetune import masked_finetune

    if plan.method == "mask":
        return Edit.scale(lm.hf, mask, plan.mask_scale, method=f"mask({plan.scale})"), {}
    cfg = plan.finetune_config()
    if plan.method == "fpft":
        from .baselines import fpft

        res = fpft(lm, train, dev, cfg)
    elif plan.method == "contrastive":
        from .contrastive import contrastive_edit, make_reference, value_diff_mask

        ref = make_reference(lm, train, cfg, mask=mask)  # no dev early stop: the reference is meant to move
        names = mask.names
        where = value_diff_mask(lm, ref, min(plan.contrastive_k, mask.size), names=names) & mask
        edit = contrastive_edit(lm, ref, where, plan.contrastive_mode, alpha=plan.alpha)
        return edit, {"contrastive_size": where.size, "config": cfg.to_dict()}
    else:
        hint, hint_dev = hint_samples(plan) if plan.hint_anchor else (None, None)
        res = masked_finetune(lm, mask, train, dev, cfg, method=f"{plan.method}({plan.scale})", hint=hint,
                              hint_dev=hint_dev)
    if res.edit is None:
        raise RuntimeError(f"fine-tuning failed: non-finite loss at step {res.nan_step}; the model is unchanged")
    info = {"status": res.status, "best_step": res.best_step, "optimizer_state_numel": res.optimizer_state_numel,
            "history": [{k: v for k, v in h.items() if k != "losses"} for h in res.history], "config": res.config}
    return res.edit, info


def run_edit(lm, plan: EditPlan, result=None, *, locate_fn=None, before: dict[str, float] | None = None) -> EditRun:
    """Locate (unless ``result``), edit on train with dev early stopping, measure before/after.

    ``before`` reuses already-measured metrics of the unedited model (same plan limits)."""
    from .measure import model_metrics

    kw = {"limit": plan.limit, "ub_limit": plan.ub_limit, "retention_limit": plan.retention_limit or None}
    train, dev = split_samples(plan)
    mask, loc = None, {}
    if plan.method not in WEIGHTLESS:
        if result is None:
            result = (locate_fn or locate)(lm, plan, train)
        mask = build_mask(lm, plan, result)
        loc = {"method": result.method, "variant": result.variant, "labels": _mask_labels(result, plan)}
    before = dict(before) if before is not None else model_metrics(lm, plan.suite, "test", **kw)
    if plan.method == "prompt":
        from .baselines import pb_metrics

        return EditRun(plan, before, pb_metrics(lm, plan.suite, "test", **kw), None, None, 0, 0, loc)
    edit, info = compute_edit(lm, plan, mask, train, dev)
    n_changed = int(sum(edit.changed_counts(lm.hf).values()))
    handle = edit.apply_(lm.hf)
    try:
        after = model_metrics(lm, plan.suite, "test", **kw)
    except BaseException:
        handle.undo()
        raise
    size = mask.size if mask is not None else sum(p.numel() for p in lm.hf.parameters())
    return EditRun(plan, before, after, edit, handle, size, n_changed, loc, info)


def _mask_labels(result, plan: EditPlan) -> list[str]:
    if plan.scale == "attribution":
        from .neuron_masking import select_neurons

        return select_neurons(result, plan.k_eff)
    return result.top_labels(min(plan.k_eff, len(result.labels)))
