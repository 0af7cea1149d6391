"""Masked fine-tuning: optimise only the masked entries of the real weights (MSME / LFTF editing).

For each masked HF tensor ``W`` with masked flat indices ``i`` we optimise a small vector
``delta`` (one entry per masked weight) and run the model with ``W' = W.index_add(i, delta)``
through :func:`torch.func.functional_call`. Consequences, by construction:

* only masked entries can change (the gradient reaches nothing else);
* no model parameter gets ``requires_grad`` (all are frozen for the run and restored after), so
  no ``.grad`` of a full matrix is kept;
* the optimizer's state (Adam moments) is the size of the mask, not of the matrices;
* the model itself is never written during training: dev/retention checks apply the current
  :class:`~bias_lens.edit.edits.Edit` temporarily and undo it, and the result is an ``Edit``.

Early stopping (:mod:`bias_lens.edit.guards`) keeps the state with the lowest dev-split bias
(raw AFGB, the literal default, or ``dev_metric="afgb_renorm"``); the retention guard stops and
rolls back to the best accepted state when retention perplexity rises more than
``retention_threshold`` (relative); the UB guard (``ub_tolerance``) and the mass guard
(``mass_floor``) reject states; a NaN/inf loss stops at once, leaves the model untouched
(equivalently: undoes the edit) and reports the step.

Equalising (issue 14, opt-in): ``mass_weight > 0`` adds :func:`~bias_lens.edit.losses.mass_change`
(keep log(p_he + p_she) of every train prompt at its unedited value), so a loss can only lower
bias by moving the he/she shares, not by erasing both pronouns.

Hint anchor (opt-in: ``hint_weight > 0`` and ``hint`` samples, GenHintEval train): each step adds
``hint_weight x anchor`` (``losses.HINT_LOSSES[hint_loss]``) on one fixed chunk of hinted prompts,
relative to the unedited model's probabilities on that very chunk (computed once before training
with the same batching, so the anchor is exactly 0 at step 0). With ``ub_tolerance`` and
``hint_dev`` samples, a dev check whose dev UB-Score fell more than ``ub_tolerance`` below the
unedited one is not accepted as the best state (it counts toward ``patience``). Defaults
(``hint_weight=0``, ``ub_tolerance=None``) leave the original behaviour unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..progress import bar
from .edits import Edit, layouts
from .guards import DEV_METRICS, DevBias, EarlyStopping, mass_guard, retention_guard, ub_guard
from .losses import get_hint_loss, get_loss, mass_change
from .masks import ParamMask

if TYPE_CHECKING:
    from ..lens import LensModel

log = logging.getLogger(__name__)

#: Learning rates where LFTF's 1e-5 does not move a small mask in a couple of epochs (Adam's step
#: is ~lr per entry per step, so a few thousand entries need a larger one). Measured on SmolLM2 /
#: GenBiasEval (docs/edit.md): module 1e-4 (msme_literal, -61% test AFGB in 6 steps); neuron 1e-3
#: (2,304 entries: -70% in 7 steps; 1e-2 overshoots, +45% retention perplexity after 4 steps).
#: layer 1e-5 and row 1e-3 move slowly in 8 steps (-4% / -17%) and were not tuned further.
SCALE_LR: dict[str, float] = {
    "layer": 1e-5, "module": 1e-4, "row": 1e-3, "neuron": 1e-3, "attribution": 1e-3, "all": 1e-5,
}


@dataclass
class FinetuneConfig:
    """Hyper-parameters (defaults from LFTF: Adam, lr 1e-5, 2 epochs, batch 32)."""

    loss: str = "msme_align"
    lr: float = 1e-5
    epochs: int = 2
    batch_size: int = 32
    optimizer: str = "adam"
    seed: int = 0
    max_steps: int | None = None
    eval_every: int | None = None  # steps between dev checks; None = once per epoch
    patience: int = 2  # dev checks without improvement before stopping
    dev_limit: int | None = 128
    retention_threshold: float = 0.05
    retention_limit: int = 48
    grad_clip: float | None = 1.0
    hint_weight: float = 0.0  # > 0: add the hint anchor on GenHintEval train prompts (docs/edit_hint.md)
    hint_loss: str = "ub_drop"
    hint_batch_size: int | None = None  # hinted prompts per step (None: batch_size)
    ub_tolerance: float | None = None  # early stopping: reject states whose dev UB fell more than this
    hint_dev_limit: int = 64
    #: early-stopping objective: "afgb" (raw, the papers') or "afgb_renorm" (he/she shares only)
    dev_metric: str = "afgb"
    #: > 0: add mass_weight x losses.mass_change (keeps log(p_he + p_she) of every train prompt)
    mass_weight: float = 0.0
    #: mass guard: reject states whose dev pronoun mass fell below mass_floor x the unedited one
    mass_floor: float | None = None

    def __post_init__(self) -> None:
        get_loss(self.loss)
        if self.dev_metric not in DEV_METRICS:
            raise ValueError(f"dev_metric must be one of {', '.join(DEV_METRICS)}, got {self.dev_metric!r}")
        if self.mass_weight < 0 or (self.mass_floor is not None and not 0 < self.mass_floor <= 1):
            raise ValueError("mass_weight must be >= 0 and mass_floor in (0, 1]")
        get_hint_loss(self.hint_loss)
        if self.hint_weight < 0 or (self.ub_tolerance is not None and self.ub_tolerance < 0):
            raise ValueError("hint_weight and ub_tolerance must be >= 0")
        if (self.hint_batch_size is not None and self.hint_batch_size < 1) or self.hint_dev_limit < 1:
            raise ValueError("hint_batch_size and hint_dev_limit must be >= 1")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("lr must be > 0 and epochs, batch_size, patience >= 1")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.retention_threshold < 0:
            raise ValueError("retention_threshold is a relative increase and must be >= 0")

    @classmethod
    def for_scale(cls, scale: str, **overrides: Any) -> "FinetuneConfig":
        """LFTF defaults with the scale-specific learning rate of :data:`SCALE_LR`."""
        if scale not in SCALE_LR:
            raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALE_LR)}")
        return cls(**{"lr": SCALE_LR[scale], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Every option as a JSON-ready dict (recorded with the run)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        """The config of :meth:`to_dict`'s output; ValueError naming any unknown option."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown fine-tuning options {sorted(unknown)}")
        return cls(**d)


@dataclass
class FinetuneResult:
    edit: Edit | None
    status: str  # done | early_stopped | retention_rollback | nan
    best_step: int
    nan_step: int | None
    history: list[dict] = field(default_factory=list)
    optimizer_state_numel: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    #: the master copy (:func:`master_dtype`) of the masked entries of the returned edit, flat in mask
    #: order per parameter; ``edit.values`` are these rounded once to the model's dtype
    master: dict[str, Tensor] | None = None


def _samples_to_batches(samples: Sequence[dict], bs: int, gen: torch.Generator) -> list[list[dict]]:
    order = torch.randperm(len(samples), generator=gen).tolist()
    return [[samples[i] for i in order[s : s + bs]] for s in range(0, len(order), bs)]


def _forward_probs(lm, overrides: dict[str, Tensor], prompts: list[str], tid: Tensor) -> Tensor:
    """Differentiable ``[batch, 2]`` raw probabilities of (he, she) after each prompt."""
    from ..scoring import iter_batches, last_logits

    b = next(iter_batches(lm.tokenizer, prompts, len(prompts), device=lm.device, sort=False))
    out = torch.func.functional_call(lm.hf, overrides, args=(), kwargs=b.model_inputs(), tie_weights=True)
    logits = last_logits(out.logits, b.last).float()
    return torch.softmax(logits, -1)[:, tid.to(logits.device)]


def _hint_chunks(lm, hint: Sequence[dict], bs: int, seed: int, tid: Tensor) -> list[tuple[list[str], Tensor, Tensor]]:
    """Fixed seeded chunks (prompts, F, p0) of hinted samples; p0 by the training forward itself."""
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for chunk in _samples_to_batches(hint, bs, gen):
        prompts = [s["prompt"] for s in chunk]
        with torch.no_grad():
            p0 = _forward_probs(lm, {}, prompts, tid)
        out.append((prompts, torch.tensor([float(s["F"]) for s in chunk]), p0))
    return out


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the trainable master copy of masked entries stored in ``dtype``: at least float32.

    A bfloat16 weight moves in steps of 2^-8 of its size, so an Adam step of ~lr (1e-5 .. 1e-3)
    written into it directly would mostly round away; the master copy keeps every step, and the
    weights the forward pass uses are the master rounded once. For float32 this is float32 itself
    (nothing changes)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class _Deltas:
    """The trainable state: one delta vector per masked tensor, over frozen base weights.

    ``base_vals + delta`` (both :func:`master_dtype`: float32 for a half-precision model) is the
    master copy of the masked entries only; the model never holds a float32 copy of a matrix.
    """

    names: list[str]
    params: dict[str, Tensor]
    idx: dict[str, Tensor]
    base: dict[str, Tensor]
    base_vals: dict[str, Tensor]
    deltas: dict[str, Tensor]
    layout: dict[str, str]

    @classmethod
    def build(cls, lm, mask: ParamMask) -> "_Deltas":
        params = dict(lm.hf.named_parameters())
        names = mask.names
        idx = {n: mask.indices(n).to(params[n].device) for n in names}
        base = {n: params[n].detach() for n in names}
        vals = {n: base[n].reshape(-1)[idx[n]].to(master_dtype(params[n].dtype)) for n in names}
        lay = layouts(lm.hf)
        deltas = {n: torch.zeros(len(idx[n]), dtype=vals[n].dtype, device=params[n].device, requires_grad=True)
                  for n in names}
        return cls(names, params, idx, base, vals, deltas, {n: lay[n] for n in names})

    def master(self, deltas: dict[str, Tensor]) -> dict[str, Tensor]:
        """The master copy ``base_vals + delta`` of the masked entries (float32 for a half-precision model)."""
        return {n: self.base_vals[n] + deltas[n] for n in self.names}

    def overrides(self) -> dict[str, Tensor]:
        """Differentiable full tensors for :func:`torch.func.functional_call`: ``W`` with its masked
        entries set to the master copy rounded once to ``W``'s dtype (float32: ``W + scatter(delta)``)."""
        master = self.master(self.deltas)
        return {n: self.base[n].reshape(-1).index_copy(0, self.idx[n], master[n].to(self.base[n].dtype))
                .view_as(self.base[n]) for n in self.names}

    def snapshot(self) -> dict[str, Tensor]:
        return {n: d.detach().clone() for n, d in self.deltas.items()}

    def edit(self, snap: dict[str, Tensor], method: str, cfg: FinetuneConfig) -> Edit:
        """The :class:`Edit` writing the master copy of ``snap`` rounded once to each weight's dtype."""
        n_ = self.names
        master = self.master(snap)
        vals = {n: master[n].detach().to(self.params[n].dtype).cpu() for n in n_}
        return Edit({n: self.idx[n].cpu() for n in n_}, vals, {n: tuple(self.params[n].shape) for n in n_},
                    {n: self.params[n].dtype for n in n_}, dict(self.layout), method, {"config": cfg.to_dict()})


@contextmanager
def _frozen(params: dict[str, Tensor]) -> Iterator[None]:
    """No model parameter requires grad inside (restored after): gradients reach only the deltas."""
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])


def _check_inputs(lm, mask: ParamMask, train, cfg: FinetuneConfig, hint, hint_dev) -> None:
    if not train:
        raise ValueError("no training samples given")
    if mask.size == 0:
        raise ValueError("the mask is empty; nothing to fine-tune")
    mask.check(lm.hf)
    if cfg.hint_weight > 0 and not hint:
        raise ValueError("hint_weight > 0 needs hint samples (GenHintEval train: load_split('genhinteval', 'train'))")
    if cfg.ub_tolerance is not None and not hint_dev:
        raise ValueError("ub_tolerance needs hint_dev samples (GenHintEval dev: load_split('genhinteval', 'dev'))")


def early_stopping(lm: LensModel, cfg: FinetuneConfig, dev: Sequence[dict] | None, retention: Sequence[str] | None,
                   hint_dev: Sequence[dict] | None) -> EarlyStopping:
    """The objective (dev bias) and guards (retention, UB, mass) of ``cfg``, baselines measured."""
    from .measure import retention_texts

    dev_prompts = [s["prompt"] for s in (dev or [])][: cfg.dev_limit] if dev else []
    texts = list(retention) if retention is not None else retention_texts(cfg.retention_limit)
    guards = [retention_guard(texts, cfg.retention_threshold)]
    if cfg.ub_tolerance is not None:
        guards.append(ub_guard(list(hint_dev)[: cfg.hint_dev_limit], cfg.ub_tolerance))
    objective = DevBias(dev_prompts, cfg.dev_metric)
    if cfg.mass_floor is not None and dev_prompts:
        guards.append(mass_guard(dev_prompts, cfg.mass_floor, objective=objective))
    stopper = EarlyStopping(objective, guards, cfg.patience)
    stopper.baseline(lm)
    return stopper


@dataclass
class _Objective:
    """The training loss of one step: the bias loss, plus the hint anchor and the mass term."""

    lm: Any
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    cfg: FinetuneConfig
    tid: Tensor
    chunks: list[tuple[list[str], Tensor, Tensor]]
    p0: dict[str, Tensor]

    def __call__(self, over: dict[str, Tensor], batch: list[dict], step: int, rec: dict) -> Tensor:
        f = torch.tensor([[s["f_he"], s["f_she"]] for s in batch], dtype=torch.float32)
        prompts = [s["prompt"] for s in batch]
        p = _forward_probs(self.lm, over, prompts, self.tid)
        loss = self.loss_fn(p, f)
        if self.chunks:
            prompts_h, F_h, p0_h = self.chunks[step % len(self.chunks)]
            anchor = get_hint_loss(self.cfg.hint_loss)(_forward_probs(self.lm, over, prompts_h, self.tid), F_h, p0_h)
            rec.setdefault("anchor", []).append(float(anchor.detach()))
            loss = loss + self.cfg.hint_weight * anchor
        if self.cfg.mass_weight > 0:
            p0 = torch.stack([self.p0[q] for q in prompts])
            loss = loss + self.cfg.mass_weight * mass_change(p, p0)
        return loss


def _train_p0(lm, train: Sequence[dict], cfg: FinetuneConfig, tid: Tensor) -> dict[str, Tensor]:
    """Unedited (he, she) probabilities of every train prompt (only for the mass term)."""
    if cfg.mass_weight <= 0:
        return {}
    prompts = sorted({s["prompt"] for s in train})
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for i in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[i : i + cfg.batch_size]
            out.update(zip(chunk, _forward_probs(lm, {}, chunk, tid)))
    return out


def masked_finetune(
    lm: LensModel,
    mask: ParamMask,
    train: Sequence[dict],
    dev: Sequence[dict] | None = None,
    config: FinetuneConfig | None = None,
    *,
    retention: Sequence[str] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    method: str = "masked_finetune",
    hint: Sequence[dict] | None = None,
    hint_dev: Sequence[dict] | None = None,
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune only ``mask``'s entries on ``train`` samples (dicts with ``prompt``, ``f_he``, ``f_she``).

    ``dev`` samples drive early stopping (dev AFGB, or ``config.dev_metric``); ``retention`` texts
    drive the retention guard (default: the benchmark's first ``retention_limit`` sentences; pass
    ``[]`` to disable). ``loss_fn(p, f)`` overrides ``config.loss``. ``hint`` (GenHintEval samples
    with ``prompt``, ``F``) feeds the anchor when ``config.hint_weight > 0``; ``hint_dev`` the UB
    guard when ``config.ub_tolerance`` is set. The model is unchanged on return; apply
    ``result.edit`` to keep the change. ``progress=True`` shows a bar over the optimisation steps
    (loss as postfix); it changes no number.
    """
    from .measure import he_she

    cfg = config or FinetuneConfig()
    _check_inputs(lm, mask, train, cfg, hint, hint_dev)
    tid = torch.as_tensor(he_she(lm).first_ids)
    chunks = _hint_chunks(lm, hint, cfg.hint_batch_size or cfg.batch_size, cfg.seed, tid) if cfg.hint_weight > 0 else []
    state = _Deltas.build(lm, mask)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD)(list(state.deltas.values()), lr=cfg.lr)
    stopper = early_stopping(lm, cfg, dev, retention, hint_dev)
    objective = _Objective(lm, loss_fn or get_loss(cfg.loss), cfg, tid, chunks, _train_p0(lm, train, cfg, tid))
    best = {n: torch.zeros_like(d) for n, d in state.deltas.items()}
    n_steps = cfg.epochs * -(-len(train) // cfg.batch_size)
    pbar = bar(total=min(n_steps, cfg.max_steps) if cfg.max_steps else n_steps, desc="masked fine-tuning",
               enabled=progress, unit="step")
    with _frozen(state.params):
        try:
            status, nan_step = _loop(lm, state, opt, objective, stopper, best, train, gen, cfg, method, pbar)
        finally:
            pbar.close()
    state_numel = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0)
    edit = None if status == "nan" else state.edit(best, method, cfg)
    master = None if edit is None else {n: v.detach().cpu() for n, v in state.master(best).items()}
    return FinetuneResult(edit, status, stopper.best_step, nan_step, stopper.history, state_numel, cfg.to_dict(), master)


def _check(lm, state: _Deltas, stopper: EarlyStopping, best: dict[str, Tensor], step: int, method: str,
           cfg: FinetuneConfig) -> str | None:
    """One dev/guard check of the current deltas; a newly accepted state is copied into ``best``."""
    snap = state.snapshot()
    with state.edit(snap, method, cfg).applied(lm.hf):
        stop = stopper.check(lm, step)
    if stopper.accepted:
        for n in state.names:
            best[n].copy_(snap[n])
    return stop


def _loop(lm, state: _Deltas, opt, objective: _Objective, stopper: EarlyStopping, best: dict[str, Tensor],
          train: Sequence[dict], gen: torch.Generator, cfg: FinetuneConfig, method: str, pbar) -> tuple[str, int | None]:
    """The epochs x batches step loop; returns (status, nan_step)."""
    step, stop = 0, None
    for _ in range(cfg.epochs):
        for batch in _samples_to_batches(train, cfg.batch_size, gen):
            rec = stopper.history[-1]
            loss = objective(state.overrides(), batch, step, rec)
            step += 1
            if not torch.isfinite(loss):
                log.warning("non-finite loss at step %d; stopping and discarding the edit", step)
                return "nan", step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(state.deltas.values()), cfg.grad_clip)
            opt.step()
            rec.setdefault("losses", []).append(float(loss.detach()))
            pbar.update(1)
            pbar.set_postfix(loss=f"{rec['losses'][-1]:.4g}", refresh=False)
            if cfg.eval_every and step % cfg.eval_every == 0:
                stop = _check(lm, state, stopper, best, step, method, cfg)
            if stop or (cfg.max_steps and step >= cfg.max_steps):
                break
        if stop:
            break
        if not cfg.eval_every or step % cfg.eval_every:
            stop = _check(lm, state, stopper, best, step, method, cfg)
        if stop or (cfg.max_steps and step >= cfg.max_steps):
            break
    return stop or "done", None
