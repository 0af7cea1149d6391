"""Training BiasEdit's editors (the reference's ``BaseEditor.train`` / ``valid``), and its test protocol.

The language model is frozen; only the editors learn. Each training step takes one batch of
``n_edits`` StereoSet requests: trace the debiasing gradient of the unedited model
(:func:`bias_lens.edit.editor.trace`), update the editors' normalisers, predict the shifts, run the
edited model on the requests' sentences (debiasing loss) and on their unrelated sentences
(retention loss, weight ``loc_coef``), and backpropagate both into the editors through the shifts
(clipped to ``max_grad_norm``, Adam at ``meta_lr``). Early stopping on the dev batches' total loss
(the reference's ``edit/loss``) with ``patience`` epochs, and a wall-time cap ``max_minutes``.

Speed: an edit changes only blocks >= the lowest edited block ``lo``, so every sentence's input to
block ``lo`` (and the exact call arguments of the blocks above) is computed once
(:func:`encode`), and every later forward runs only blocks ``lo..L-1`` and the head
(:func:`logits_of`; equal to the full forward, tested).

Scores: a sentence's tokens after the prefix (``prefix="bos"``: the tokenizer's BOS/EOS is put
first, as the reference does for GPT-2, so every word is scored; ``"none"``: its first token is
unscored, as the reference does for Llama) give the mean log-probability and the mean token
probability of the sentence (the reference's ``get_score``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .editor import Editor, EditorConfig, shifted, shifts_from, trace

if TYPE_CHECKING:
    from ..lens import LensModel

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """Sentences as right-padded ids, their scored tokens and (optionally) their cached block-``lo`` input."""

    ids: Int[Tensor, "batch pos"]
    attn: Int[Tensor, "batch pos"]
    scored: Bool[Tensor, "batch pos"]  # target tokens scored: real tokens after the first
    lo: int | None = None
    prefix: Any = None  # bias_lens.locate.modules.Prefix holding only block lo's input and calls >= lo
    pre: Tensor | None = None  # unrelated sentences: the unedited mean token probability (retention target)


@contextmanager
def frozen(lm: LensModel) -> Iterator[None]:
    """Every model parameter with ``requires_grad=False`` inside (restored after)."""
    params = list(lm.hf.parameters())
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)


@torch.no_grad()
def encode(lm: LensModel, texts: Sequence[str], prefix: str = "bos", lo: int | None = None) -> Encoded:
    """Tokenise ``texts`` (after :func:`~bias_lens.benchmarks.sentence_scoring.prefix_ids`) and, with
    ``lo``, cache their input to block ``lo`` and the call arguments of blocks ``lo..L-1``."""
    from ..benchmarks.sentence_scoring import sentence_ids
    from ..scoring import Batch, pad_right

    seqs = sentence_ids(lm.tokenizer, texts, prefix)
    if any(len(s) < 2 for s in seqs):
        raise ValueError("every sentence needs two tokens or more (with its prefix) to be scored")
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids, attn = pad_right(seqs, pad, lm.device)
    scored = attn.bool() & (torch.arange(ids.shape[1], device=ids.device) >= 1)
    enc = Encoded(ids, attn, scored)
    if lo is not None:
        from ..locate.modules import Prefix, capture_prefix

        full = capture_prefix(lm, Batch(ids, attn, attn.sum(1) - 1, list(range(len(seqs)))))
        enc.lo = lo
        enc.prefix = Prefix([None] * lo + [full.hidden[lo]], [None] * lo + full.calls[lo:])
    return enc


def scored_logits(lm: LensModel, enc: Encoded, lo: int | None = None) -> Float[Tensor, "token d_vocab"]:
    """The logits that predict ``enc``'s scored tokens (row-major), nothing else: blocks ``lo..L-1``
    from the cached input when ``enc`` holds block ``lo``'s, and the head only at those positions
    (padding and the last position never reach the 49k-wide unembedding); else the full forward."""
    pred = enc.scored[:, 1:]  # position p predicts token p + 1
    if enc.prefix is None or lo is None or enc.lo != lo:
        return lm.hf(input_ids=enc.ids, attention_mask=enc.attn, use_cache=False).logits[:, :-1][pred]
    from ..locate.modules import run_block

    h = enc.prefix.hidden[lo]
    for i in range(lo, lm.n_layers):
        h = run_block(lm, enc.prefix, i, h)
    return lm.logits_from_resid(h[:, :-1][pred])


def sentence_stats(logits: Float[Tensor, "token d_vocab"], enc: Encoded) -> tuple[Tensor, Tensor]:
    """Per sentence: (mean log-probability, mean probability) of its scored tokens, from
    :func:`scored_logits`' output."""
    pred = enc.scored[:, 1:]
    lp = logits.float().log_softmax(-1).gather(-1, enc.ids[:, 1:][pred][:, None]).squeeze(-1)
    seg = torch.arange(pred.shape[0], device=lp.device)[:, None].expand_as(pred)[pred]
    n = pred.sum(1).to(lp.dtype)
    zeros = torch.zeros(pred.shape[0], dtype=lp.dtype, device=lp.device)
    return zeros.index_add(0, seg, lp) / n, zeros.index_add(0, seg, lp.exp()) / n


def debias_loss_fn(cfg: EditorConfig) -> Any:
    """``fn(enc, logits)`` of the debiasing loss on an edit batch (anti-stereotype rows, then stereotype rows)."""

    def fn(enc: Encoded, logits: Tensor) -> Tensor:
        ml, mp = sentence_stats(logits, enc)
        h = ml.shape[0] // 2
        a_l, s_l, a_p, s_p = ml[:h], ml[h:], mp[:h], mp[h:]
        if cfg.loss == "mean_prob_kl":  # the reference: KLDivLoss(input=log-mean, target=prob-mean), both ways
            return F.kl_div(a_l, s_p, reduction="batchmean") + F.kl_div(s_l, a_p, reduction="batchmean")
        p = torch.sigmoid(s_l - a_l)  # pair_kl: the two-sentence distribution softmax(s_l, a_l) vs its swap
        return ((2 * p - 1) * (s_l - a_l)).mean()

    return fn


def retention_loss(lm: LensModel, cfg: EditorConfig, enc: Encoded, lo: int, base: Tensor | None = None) -> Tensor:
    """The retention loss on unrelated sentences ``enc`` (call inside :func:`~bias_lens.edit.editor.shifted`).
    ``base``: the unedited log-softmax at the scored positions (``token_kl`` only)."""
    logits = scored_logits(lm, enc, lo)
    if cfg.retention == "mean_prob_kl":
        return F.kl_div(sentence_stats(logits, enc)[0], enc.pre, reduction="batchmean")
    post = logits.float().log_softmax(-1)
    return F.kl_div(post, base, reduction="batchmean", log_target=True)


def _base_logprobs(lm: LensModel, enc: Encoded, lo: int) -> Tensor:
    with torch.no_grad():
        return scored_logits(lm, enc, lo).float().log_softmax(-1)


@dataclass
class RequestBatch:
    """One batch of ``n_edits`` requests: edit chunks (anti then stereo rows) and unrelated chunks."""

    edit: list[Encoded]
    unrelated: list[Encoded]
    rows: list[dict]


def encode_edit(lm: LensModel, rows: Sequence[dict], cfg: EditorConfig, prefix_from: int | None = None) -> list[Encoded]:
    """The edit chunks of ``rows``: per ``chunk`` requests, anti-stereotype then stereotype sentences."""
    return [encode(lm, [r["anti_stereotype"] for r in part] + [r["stereotype"] for r in part], cfg.prefix, prefix_from)
            for part in _chunks(rows, cfg.chunk)]


def encode_batch(lm: LensModel, rows: Sequence[dict], cfg: EditorConfig, lo: int) -> RequestBatch:
    """A :class:`RequestBatch` with cached block-``lo`` inputs and the unedited retention targets."""
    unrel = []
    for part in _chunks(rows, cfg.chunk):
        enc = encode(lm, [r["unrelated"] for r in part], cfg.prefix, lo)
        with torch.no_grad():
            enc.pre = sentence_stats(scored_logits(lm, enc, lo), enc)[1]
        unrel.append(enc)
    return RequestBatch(encode_edit(lm, rows, cfg, lo), unrel, list(rows))


def _chunks(rows: Sequence[dict], n: int) -> list[list[dict]]:
    return [list(rows[i : i + n]) for i in range(0, len(rows), n)]


def batches(rows: Sequence[dict], n_edits: int, drop_last: bool) -> list[list[dict]]:
    """Consecutive batches of ``n_edits`` rows (the reference's DataLoader: no shuffle; train drops the last)."""
    out = _chunks(rows, n_edits)
    return out[:-1] if drop_last and out and len(out[-1]) < n_edits else out


def batch_losses(lm: LensModel, editor: Editor, batch: RequestBatch, shifts: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(debiasing loss, retention loss) of ``batch`` under ``shifts``, summed over chunks as the
    reference's per-chunk ``backward`` calls do. Differentiable in ``shifts``."""
    cfg, lo = editor.config, editor.lowest_layer
    fn = debias_loss_fn(cfg)
    bases = [_base_logprobs(lm, e, lo) if cfg.retention == "token_kl" else None for e in batch.unrelated]
    with shifted(lm, shifts):
        gen = sum(fn(e, scored_logits(lm, e, lo)) for e in batch.edit)
        loc = sum(retention_loss(lm, cfg, e, lo, b) for e, b in zip(batch.unrelated, bases)) if cfg.loc_coef > 0 else torch.zeros(())
    return gen, loc


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or shift during editor training (the language model is frozen: never changed)."""


def meta_step(lm: LensModel, editor: Editor, batch: RequestBatch, opt: torch.optim.Optimizer,
              step: int = 0) -> dict[str, float]:
    """One training step on ``batch`` (see the module docstring); returns its losses. A non-finite
    loss or shift raises :class:`NonFiniteError` naming ``step`` before any editor weight changes."""
    cfg = editor.config
    traced = trace(lm, editor, batch.edit, debias_loss_fn(cfg))
    for label, (k, g) in traced.items():
        editor.net_of(label)[0].normalizer.update(torch.cat((k, g), -1))
    shifts = shifts_from(editor, traced)
    leaves = {lab: s.detach().requires_grad_() for lab, s in shifts.items()}
    gen, loc = batch_losses(lm, editor, batch, leaves)
    loss = gen + cfg.loc_coef * loc
    bad = [lab for lab, s in shifts.items() if not torch.isfinite(s).all()]
    if bad or not torch.isfinite(loss):
        raise NonFiniteError(f"non-finite {'shift of ' + bad[0] if bad else 'loss'} in editor training "
                             f"(step {step}); the editors are not saved and the model is unchanged")
    loss.backward()
    opt.zero_grad()
    torch.autograd.backward([shifts[lab] for lab in editor.labels], [leaves[lab].grad for lab in editor.labels])
    torch.nn.utils.clip_grad_norm_(editor.parameters(), cfg.max_grad_norm)
    opt.step()
    return {"gen": float(gen.detach()), "loc": float(loc.detach()), "loss": float(loss.detach())}


def dev_loss(lm: LensModel, editor: Editor, dev: Sequence[RequestBatch], unedited: bool = False) -> dict[str, float]:
    """Mean over dev batches of the edited debiasing, retention and total loss (no training);
    ``unedited=True``: the same losses with zero shifts (the baseline an editor must beat)."""
    cfg, tot = editor.config, {"gen": 0.0, "loc": 0.0}
    for b in dev:
        with torch.no_grad():
            if unedited:
                shifts = {lab: torch.zeros(editor.shapes[lab]) for lab in editor.labels}
            else:
                shifts = {k: v.detach() for k, v in shifts_from(editor, trace(lm, editor, b.edit, debias_loss_fn(cfg))).items()}
            gen, loc = batch_losses(lm, editor, b, shifts)
        tot["gen"] += float(gen) / len(dev)
        tot["loc"] += float(loc) / len(dev)
    return {**tot, "loss": tot["gen"] + cfg.loc_coef * tot["loc"]}


@dataclass
class TrainResult:
    """A trained editor (best dev state), its per-epoch history and why training stopped."""

    editor: Editor
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    status: str = ""
    seconds: float = 0.0
    unedited: dict[str, float] = field(default_factory=dict)  # dev losses with zero shifts (the baseline)

    @property
    def beats_unedited(self) -> bool:
        """Whether the best epoch's dev loss is below the zero-shift dev loss."""
        best = self.history[self.best_epoch]["dev_loss"] if self.history else float("inf")
        return bool(self.unedited) and best < self.unedited["loss"]


def train_editor(lm: LensModel, train: Sequence[dict], dev: Sequence[dict], cfg: EditorConfig) -> TrainResult:
    """Train editors on StereoSet ``train`` rows, early-stopped on ``dev`` rows (model unchanged)."""
    if len(train) < cfg.n_edits:
        raise ValueError(f"training needs at least n-edits={cfg.n_edits} train items, got {len(train)}")
    if not dev:
        raise ValueError("training needs dev items for early stopping")
    t0 = time.monotonic()
    editor = Editor(lm, cfg)
    lo = editor.lowest_layer
    with frozen(lm):
        tr = [encode_batch(lm, b, cfg, lo) for b in batches(train, cfg.n_edits, drop_last=True)]
        dv = [encode_batch(lm, b, cfg, lo) for b in batches(dev, cfg.n_edits, drop_last=False)]
        opt = torch.optim.Adam(editor.parameters(), cfg.meta_lr)
        res = TrainResult(editor)
        res.unedited = dev_loss(lm, editor, dv, unedited=True)
        log.info("editor dev losses with zero shifts: %s", res.unedited)
        best, best_state = float("inf"), None
        for epoch in range(cfg.epochs):
            steps = []
            for i, b in enumerate(tr):  # the wall-time cap is checked per step: one epoch can be long
                steps.append(meta_step(lm, editor, b, opt, epoch * len(tr) + i))
                if cfg.max_minutes is not None and time.monotonic() - t0 > 60 * cfg.max_minutes:
                    break
            d = dev_loss(lm, editor, dv)
            res.history.append({"epoch": epoch, "steps": len(steps), "train_loss": sum(s["loss"] for s in steps) / len(steps), **{f"dev_{k}": v for k, v in d.items()}})
            log.info("editor epoch %d: %s", epoch, res.history[-1])
            if d["loss"] < best:
                best, res.best_epoch = d["loss"], epoch
                best_state = {k: v.detach().clone() for k, v in editor.state_dict().items()}
            if epoch - res.best_epoch >= cfg.patience:
                res.status = "early_stop"
                break
            if cfg.max_minutes is not None and time.monotonic() - t0 > 60 * cfg.max_minutes:
                res.status = "time_limit"
                break
        else:
            res.status = "epochs"
        editor.load_state_dict(best_state)
    res.seconds = time.monotonic() - t0
    return res
