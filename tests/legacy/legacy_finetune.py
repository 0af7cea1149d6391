"""The masked fine-tuning loop as it was before the guard refactor (issue 12), kept verbatim as the
oracle of tests/test_finetune_guards.py: the refactored loop must give bit-identical edits and histories."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from bias_lens.edit.edits import Edit, layouts
from bias_lens.edit.finetune import FinetuneConfig, FinetuneResult
from bias_lens.edit.losses import get_hint_loss, get_loss
from bias_lens.edit.masks import ParamMask
from bias_lens.progress import bar

log = logging.getLogger(__name__)


def _samples_to_batches(samples: Sequence[dict], bs: int, gen: torch.Generator) -> list[list[dict]]:
    order = torch.randperm(len(samples), generator=gen).tolist()
    return [[samples[i] for i in order[s : s + bs]] for s in range(0, len(order), bs)]


def _forward_probs(lm, overrides: dict[str, Tensor], prompts: list[str], tid: Tensor) -> Tensor:
    """Differentiable ``[batch, 2]`` raw probabilities of (he, she) after each prompt."""
    from bias_lens.scoring import iter_batches, last_logits

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


def legacy_masked_finetune(
    lm,
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

    ``dev`` samples drive early stopping (dev AFGB); ``retention`` texts drive the retention
    guard (default: the benchmark's first ``retention_limit`` sentences; pass ``[]`` to disable).
    ``loss_fn(p, f)`` overrides ``config.loss``. ``hint`` (GenHintEval samples with ``prompt``,
    ``F``) feeds the anchor when ``config.hint_weight > 0``; ``hint_dev`` the UB guard when
    ``config.ub_tolerance`` is set. The model is unchanged on return; apply ``result.edit`` to
    keep the change. ``progress=True`` shows a bar over the optimisation steps (loss as postfix);
    it changes no number.
    """
    from bias_lens.edit.measure import dev_afgb, dev_ub, he_she, retention_perplexity, retention_texts

    cfg = config or FinetuneConfig()
    if not train:
        raise ValueError("no training samples given")
    if mask.size == 0:
        raise ValueError("the mask is empty; nothing to fine-tune")
    mask.check(lm.hf)
    if cfg.hint_weight > 0 and not hint:
        raise ValueError("hint_weight > 0 needs hint samples (GenHintEval train: load_split('genhinteval', 'train'))")
    if cfg.ub_tolerance is not None and not hint_dev:
        raise ValueError("ub_tolerance needs hint_dev samples (GenHintEval dev: load_split('genhinteval', 'dev'))")
    loss_fn = loss_fn or get_loss(cfg.loss)
    anchor_fn = get_hint_loss(cfg.hint_loss)
    tid = torch.as_tensor(he_she(lm).first_ids)
    chunks = _hint_chunks(lm, hint, cfg.hint_batch_size or cfg.batch_size, cfg.seed, tid) if cfg.hint_weight > 0 else []
    params = dict(lm.hf.named_parameters())
    names = mask.names
    idx = {n: mask.indices(n).to(params[n].device) for n in names}
    base = {n: params[n].detach() for n in names}
    base_vals = {n: base[n].reshape(-1)[idx[n]].clone() for n in names}
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    deltas = {n: torch.zeros(len(idx[n]), dtype=params[n].dtype, device=params[n].device, requires_grad=True) for n in names}
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
    opt = opt_cls(list(deltas.values()), lr=cfg.lr)
    lay = layouts(lm.hf)

    def current_edit(snap: dict[str, Tensor]) -> Edit:
        vals = {n: (base_vals[n] + snap[n]).detach().cpu() for n in names}
        return Edit({n: idx[n].cpu() for n in names}, vals, {n: tuple(params[n].shape) for n in names},
                    {n: params[n].dtype for n in names}, {n: lay[n] for n in names}, method,
                    {"config": cfg.to_dict()})

    dev_prompts = [s["prompt"] for s in (dev or [])][: cfg.dev_limit] if dev else []
    ret_texts = list(retention) if retention is not None else retention_texts(cfg.retention_limit)
    base_ppl = retention_perplexity(lm, ret_texts) if ret_texts else None
    best_dev = dev_afgb(lm, dev_prompts) if dev_prompts else math.inf
    ub_dev = list(hint_dev)[: cfg.hint_dev_limit] if cfg.ub_tolerance is not None else []
    base_ub = dev_ub(lm, ub_dev) if ub_dev else None
    best = {n: torch.zeros_like(d) for n, d in deltas.items()}
    history: list[dict] = [{"step": 0, "dev_afgb": best_dev, "retention_ppl": base_ppl}]
    if base_ub is not None:
        history[0]["dev_ub"] = base_ub
    best_step, bad, step, status, nan_step = 0, 0, 0, "done", None
    grad_flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)

    def check() -> str | None:
        """Dev/retention check of the current deltas; returns a stop status or None."""
        nonlocal best_dev, best_step, bad
        snap = {n: d.detach().clone() for n, d in deltas.items()}
        with current_edit(snap).applied(lm.hf):
            ppl = retention_perplexity(lm, ret_texts) if ret_texts else None
            dv = dev_afgb(lm, dev_prompts) if dev_prompts else None
            ub = dev_ub(lm, ub_dev) if ub_dev else None
        history.append({"step": step, "dev_afgb": dv, "retention_ppl": ppl})
        if ub is not None:
            history[-1]["dev_ub"] = ub
        log.info("check at step %d: dev AFGB %s, retention ppl %s, dev UB %s", step, dv, ppl, ub)
        if ppl is not None and ppl > base_ppl * (1 + cfg.retention_threshold):
            log.info("retention perplexity %.3f > %.3f * (1 + %.3f): rolling back", ppl, base_ppl, cfg.retention_threshold)
            return "retention_rollback"
        ub_ok = ub is None or ub >= base_ub - cfg.ub_tolerance
        if not ub_ok:
            log.info("dev UB %.4f fell more than %.3f below %.4f: state not accepted", ub, cfg.ub_tolerance, base_ub)
        if ub_ok and (dv is None or dv < best_dev):
            best_dev, best_step, bad = (dv if dv is not None else best_dev), step, 0
            for n in names:
                best[n].copy_(snap[n])
            return None
        bad += 1
        return "early_stopped" if bad >= cfg.patience else None

    n_steps = cfg.epochs * -(-len(train) // cfg.batch_size)
    pbar = bar(total=min(n_steps, cfg.max_steps) if cfg.max_steps else n_steps, desc="masked fine-tuning",
               enabled=progress, unit="step")
    try:
        stop = None
        for epoch in range(cfg.epochs):
            for batch in _samples_to_batches(train, cfg.batch_size, gen):
                f = torch.tensor([[s["f_he"], s["f_she"]] for s in batch], dtype=torch.float32)
                over = {n: base[n].reshape(-1).index_add(0, idx[n], deltas[n]).view_as(base[n]) for n in names}
                loss = loss_fn(_forward_probs(lm, over, [s["prompt"] for s in batch], tid), f)
                if chunks:
                    prompts_h, F_h, p0_h = chunks[step % len(chunks)]
                    anchor = anchor_fn(_forward_probs(lm, over, prompts_h, tid), F_h, p0_h)
                    history[-1].setdefault("anchor", []).append(float(anchor.detach()))
                    loss = loss + cfg.hint_weight * anchor
                step += 1
                if not torch.isfinite(loss):
                    status, nan_step = "nan", step
                    log.warning("non-finite loss at step %d; stopping and discarding the edit", step)
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(list(deltas.values()), cfg.grad_clip)
                opt.step()
                history[-1].setdefault("losses", []).append(float(loss.detach()))
                pbar.update(1)
                pbar.set_postfix(loss=f"{history[-1]['losses'][-1]:.4g}", refresh=False)
                if cfg.eval_every and step % cfg.eval_every == 0:
                    stop = check()
                if stop or (cfg.max_steps and step >= cfg.max_steps):
                    break
            if status == "nan" or stop:
                break
            if not cfg.eval_every or step % cfg.eval_every:
                stop = check()
            if stop or (cfg.max_steps and step >= cfg.max_steps):
                break
        if stop:
            status = stop
    finally:
        pbar.close()
        for n, p in params.items():
            p.requires_grad_(grad_flags[n])
    state_numel = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0)
    edit = None if status == "nan" else current_edit(best)
    return FinetuneResult(edit, status, best_step, nan_step, history, state_numel, cfg.to_dict())
