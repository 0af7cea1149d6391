"""Layer-scale bias localisation: the MSME logit-lens score (Eq. 2) and LFTF's BMI (Eq. 4).

Notation: block i maps the residual H^(i) to H^(i+1); H^(0) is the embedding output and H^(L)
the raw output of the last block. The logit lens reads

    p^(i) = softmax(W_U FinalNorm(H^(i)))   at the prompt's last real token,

with the final norm applied exactly once, so p^(L) is the model's own output distribution.

* :func:`layer_scale` — MSME Eq. 2, ``I(L_i) = sum_t |p^(i+1)[t] - p^(i)[t]|`` over the targets
  (he, she), i = 0..L-1, per prompt; mean over prompts; argmax-layer counts (MSME Fig. 3).
* :func:`bmi` — LFTF Eq. 4, ``BMI_i = 1 - cos(H^(i)_l, H^(i+1)_l)`` at every real position l,
  mean over positions then over prompts. :func:`bmi_robustness` repeats it on seeded subsamples
  (LFTF appendix A.1).

Both come from one batched forward pass (:func:`residual_pass`) whose hooks reduce each block's
``[batch, pos, d_model]`` input/output at once to last-token slices and per-position cosines;
no full activation cache is ever kept, and the scores are streamed: each batch's last-token
residuals go through the lens as soon as the batch is done and are dropped, so the pass holds
one batch of residuals whatever the prompt count (only per-prompt ``[prompt, layer]`` scores
grow with it). Three interchangeable lenses run that pass: ``"hf"``
(PyTorch forward hooks on the HF blocks), ``"tl"`` (TransformerLens bridge hook points
``resid_pre``/``resid_post``) and ``"nnsight"`` (a trace reading each block's input/output).
Prompts are right-padded, so real tokens never attend to padding and padding is masked out of
BMI.

The logit lens (:func:`lens_probs`) stacks the last-token residuals of every layer and prompt
of a batch into one unembedding matmul, chunked to :data:`LENS_LOGIT_BUDGET` logits in one reused buffer,
with the log-sum-exp in cache-sized row blocks: the layer score then costs about its FLOP bound
(body + n_layers+1 unembeddings per prompt; docs/performance.md). Half-precision models are
upcast to float32 before the final norm, the unembedding and the softmax (:func:`lens_dtype`; a
no-op for float32); BMI's cosines are taken in float64.

Targets must be single tokens: Eq. 2 compares next-token probabilities layer by layer, and a
multi-token word has no single per-layer probability (cutting it to its first token would
silently score another word), so multi-token targets are refused with a ValueError.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from ..arch import tl_hook_name
from ..hooks import module_hooks
from ..progress import bar, batch_count
from ..scoring import Batch, check_prompts, iter_batches
from ..targets import TargetSet, resolve_targets
from .attribution import base_model, norm_parts
from .result import LocateResult

if TYPE_CHECKING:
    from ..lens import LensModel

log = logging.getLogger(__name__)
LENSES = ("hf", "tl", "nnsight")
NORM_MODES = ("recompute", "cached")
#: observer(block i, H^(i) [batch,pos,d], H^(i+1) [batch,pos,d]) — called once per block, in order.
Observer = Callable[[int, Tensor, Tensor], None]


# --------------------------------------------------------------------------- the pass
@dataclass
class ResidualPass:
    """What one pass keeps: last-token residuals of every layer (unless streamed), per-prompt BMI,
    and (when the pass was given targets) the logit-lens target probabilities."""

    last: Float[Tensor, "layer1 prompt d_model"] | None  # H^(0..L) at the last real token (model dtype)
    bmi: Float[Tensor, "prompt layer"] | None  # 1 - cos(H^(i), H^(i+1)), mean over real positions
    probs: Float[Tensor, "layer1 prompt target"] | None = None  # p^(0..L) of the targets, float64


def _check_lens(lens: str) -> None:
    if lens not in LENSES:
        raise ValueError(f"lens must be one of {', '.join(LENSES)}; got {lens!r}")


def _out(t: object) -> Tensor:
    return t[0] if isinstance(t, tuple) else t  # type: ignore[return-value]


def _run_hf(lm, b: Batch, observe: Observer) -> None:
    def make(i: int) -> Callable:
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            observe(i, x, _out(output))

        return hook

    with module_hooks(forward=[(blk, make(i)) for i, blk in enumerate(lm.layers)]):
        base_model(lm)(**b.model_inputs(), use_cache=False)


def _run_tl(lm, b: Batch, observe: Observer) -> None:
    pre: dict[int, Tensor] = {}

    def make(i: int, kind: str) -> Callable:
        def hook(t: Tensor, hook) -> None:
            if kind == "pre":
                pre[i] = t
            else:
                observe(i, pre.pop(i), t)

        return hook

    fwd = []
    for i in range(lm.n_layers):
        fwd.append((tl_hook_name(lm.hf, f"L{i}.resid_pre"), make(i, "pre")))
        fwd.append((tl_hook_name(lm.hf, f"L{i}.resid_post"), make(i, "post")))
    lm.bridge.run_with_hooks(b.input_ids, fwd_hooks=fwd, attention_mask=b.attention_mask, return_type=None)


def _run_nnsight(lm, b: Batch, observe: Observer) -> None:
    layers = functools.reduce(getattr, lm.arch.layers.split("."), lm.nnsight)
    with lm.nnsight.trace(b.input_ids, attention_mask=b.attention_mask):
        for i in range(lm.n_layers):  # forward order: input, then output, block by block
            x = layers[i].input
            y = _out(layers[i].output)
            observe(i, x, y)


_RUNNERS = {"hf": _run_hf, "tl": _run_tl, "nnsight": _run_nnsight}


@torch.no_grad()
def residual_pass(
    lm: LensModel, prompts: Sequence[str], *, lens: str = "hf", batch_size: int = 32, bmi: bool = False,
    progress: bool = False, keep_last: bool = True, target_ids: Sequence[int] | None = None,
    norm: str = "recompute",
) -> ResidualPass:
    """One batched forward pass keeping H^(0..L) at the last real token and, if ``bmi``, per-prompt BMI.

    ``target_ids`` given: each batch's last-token residuals go through the logit lens
    (:func:`lens_probs` with ``norm``, the final residual of the same batch for ``"cached"``) as
    soon as the batch is done, into ``probs``. ``keep_last=False`` then drops them batch by batch
    (``last`` is None), so the pass holds one batch of residuals whatever the prompt count: what
    :func:`layer_scale` and :func:`bmi` do. ``progress=True`` shows a bar over the batches.
    """
    _check_lens(lens)
    prompts = check_prompts(prompts)
    L, n, dt = lm.n_layers, len(prompts), lm.embed.weight.dtype
    last = torch.empty(L + 1, n, lm.d_model, dtype=dt) if keep_last else None
    per = torch.zeros(n, L, dtype=torch.float64) if bmi else None
    probs = torch.empty(L + 1, n, len(target_ids), dtype=torch.float64) if target_ids is not None else None
    lw = lens_weights(lm, (L + 1) * min(n, batch_size), dt) if probs is not None else None  # once per pass
    batches = iter_batches(lm.tokenizer, prompts, batch_size, device=lm.device)
    desc = "residual pass + BMI" if bmi else "residual pass"
    for b in bar(batches, total=batch_count(n, batch_size), desc=desc, enabled=progress, unit="batch"):
        rows = torch.as_tensor(b.rows)
        mask = b.attention_mask.bool()
        n_real = mask.sum(1).double()
        blast = torch.empty(L + 1, len(b.rows), lm.d_model, dtype=dt)  # this batch's H^(0..L) at the last token

        def observe(i: int, x: Tensor, y: Tensor) -> None:
            ar = torch.arange(x.shape[0], device=x.device)
            idx = b.last.to(x.device)
            if i == 0:
                blast[0] = x[ar, idx].detach().to("cpu", dt)
            blast[i + 1] = y[ar, idx].detach().to("cpu", dt)
            if per is not None:
                cos = F.cosine_similarity(x.detach().double(), y.detach().double(), dim=-1)  # [batch, pos]
                m = mask.to(cos.device)
                per[rows, i] = ((1 - cos) * m).sum(1).cpu() / n_real

        _RUNNERS[lens](lm, b, observe)
        if last is not None:
            last[:, rows] = blast
        if probs is not None:
            probs[:, rows] = lens_probs(lm, blast, target_ids, norm=norm, final=blast[-1], weights=lw)
    return ResidualPass(last, per, probs)


# --------------------------------------------------------------------------- logit lens
def single_token_targets(lm: LensModel, targets: TargetSet | str | Sequence[str], what: str) -> TargetSet:
    """Resolve targets and refuse multi-token words (see the module docstring for why)."""
    ts = targets if isinstance(targets, TargetSet) else resolve_targets(lm.tokenizer, targets)
    try:
        return ts.require(single_token=True)
    except ValueError as err:
        raise type(err)(f"{what} compares next-token probabilities per layer: {err}") from None


#: Logits the lens holds at once (elements, 128 MiB in float32): the residual rows of every layer
#: and prompt are stacked and unembedded in chunks of ``LENS_LOGIT_BUDGET // d_vocab`` rows.
LENS_LOGIT_BUDGET = 1 << 25
#: Rows per log-sum-exp on CPU: a 16 x d_vocab block stays in cache (same result as one call).
LSE_BLOCK_CPU = 16


def lens_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the logit lens computes in: float32 for half-precision (bf16/fp16) models, else ``dtype``.

    A bf16 logit has ~3 significant digits, too few for a softmax over the vocabulary (and for the
    cosines of BMI), so half-precision residuals are upcast; for float32 this is a no-op, so float32
    results are bit-identical to a lens without the upcast.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _normed(lm, h: Tensor, scale: Tensor | None) -> Tensor:
    """The final norm of rows ``h``: the model's own module (recompute), or with a frozen ``scale``."""
    if scale is None and h.dtype == lm.final_norm.weight.dtype:
        return lm.final_norm(h)
    fn = norm_parts(lm.final_norm, lm.arch.norm)  # upcast path, or the cached scale
    if scale is None:
        return fn.apply(h)
    normed = fn.center(h) / scale * fn.weight.to(h)
    return normed + fn.bias.to(h) if fn.bias is not None else normed


def _logits_into(lm, normed: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> Tensor:
    """``normed @ W_U.T (+ b)`` written into ``out`` (reused across chunks), then the family's soft-cap:
    :meth:`LensModel.logits_from_normed` in place, the same operations without a new logits tensor."""
    if b is None:
        torch.mm(normed, w.T, out=out)
    else:
        torch.addmm(b, normed, w.T, out=out)
    cap = lm.logit_softcap
    return out.div_(cap).tanh_().mul_(cap) if cap is not None else out


def _target_probs(logits: Tensor, tid: Tensor) -> Float[Tensor, "row target"]:
    """``softmax(logits)[:, tid]`` (float64): float32 log-sum-exp, in cache-sized row blocks on CPU."""
    step = LSE_BLOCK_CPU if logits.device.type == "cpu" else max(logits.shape[0], 1)
    out = torch.empty(logits.shape[0], len(tid), dtype=torch.float64, device=logits.device)
    for s in range(0, logits.shape[0], step):
        x = logits[s : s + step].float()
        out[s : s + step] = (x[:, tid] - torch.logsumexp(x, -1, keepdim=True)).double().exp()
    return out


@torch.no_grad()
def lens_probs(
    lm: LensModel,
    resid: Float[Tensor, "... d_model"],
    target_ids: Sequence[int],
    *,
    norm: str = "recompute",
    final: Float[Tensor, "... d_model"] | None = None,
    weights: LensWeights | None = None,
) -> Float[Tensor, "... target"]:
    """Target probabilities of the logit lens ``softmax(W_U FinalNorm(resid))`` (float64).

    ``norm="recompute"`` runs the model's own final-norm module on ``resid``; ``norm="cached"``
    keeps its weight/bias/centering but divides by the scale of ``final`` (the final residual at
    the same position, broadcastable to ``resid``), so the norm is affine in ``resid``.

    All rows of ``resid`` (e.g. every layer x prompt) share one unembedding matmul, chunked to
    :data:`LENS_LOGIT_BUDGET` logits; half-precision models are upcast first (:func:`lens_dtype`).
    ``weights`` (from :func:`lens_weights`) are the unembedding in the lens dtype and the logits
    buffer, made once by a caller that lenses batch after batch (a half-precision ``W_U`` is then
    upcast, and the buffer page-faulted, once per pass, not once per batch); same numbers without.
    """
    if norm not in NORM_MODES:
        raise ValueError(f"norm must be one of {', '.join(NORM_MODES)}; got {norm!r}")
    if norm == "cached" and final is None:
        raise ValueError("norm='cached' needs the final residual to take the scale from")
    dev, dt = lm.final_norm.weight.device, lens_dtype(resid.dtype)
    lead, rows = resid.shape[:-1], resid.reshape(-1, resid.shape[-1])
    scale = None
    if final is not None and norm == "cached":
        s = norm_parts(lm.final_norm, lm.arch.norm).scale(final.to(dev).double()).to(dt)
        scale = torch.broadcast_to(s, (*lead, 1)).reshape(-1, 1)
    if weights is None or weights.w.dtype != dt:
        weights = lens_weights(lm, rows.shape[0], resid.dtype)
    w, b, chunk = weights.w, weights.b, weights.rows
    tid = torch.as_tensor(list(target_ids), device=w.device)
    n_buf = min(chunk, rows.shape[0]) * w.shape[0]
    buf = weights.buf if weights.buf.numel() >= n_buf else torch.empty(n_buf, dtype=dt, device=w.device)
    buf = buf[:n_buf].view(-1, w.shape[0])
    out = torch.empty(rows.shape[0], len(tid), dtype=torch.float64)
    for s0 in range(0, rows.shape[0], chunk):
        h = rows[s0 : s0 + chunk].to(dev).to(dt)
        normed = _normed(lm, h, None if scale is None else scale[s0 : s0 + chunk])
        logits = _logits_into(lm, normed.to(w.device), w, b, buf[: h.shape[0]])
        out[s0 : s0 + chunk] = _target_probs(logits, tid).cpu()
    return out.view(*lead, len(tid))


@dataclass(frozen=True)
class LensWeights:
    """The unembedding in the lens dtype (a view of the model's own unless upcast) and one reused
    logits buffer of ``rows`` rows (at most :data:`LENS_LOGIT_BUDGET` logits)."""

    w: Float[Tensor, "d_vocab d_model"]
    b: Float[Tensor, " d_vocab"] | None
    buf: Tensor  # flat, rows * d_vocab elements
    rows: int  # chunk of residual rows per matmul


def lens_weights(lm: LensModel, n_rows: int, dtype: torch.dtype) -> LensWeights:
    """:class:`LensWeights` for lensing up to ``n_rows`` residual rows of ``dtype`` per call."""
    dt = lens_dtype(dtype)
    w = lm.unembed.weight.detach().to(dt)  # no copy unless upcast
    b = getattr(lm.unembed, "bias", None)
    b = b.detach().to(dt) if b is not None else None
    chunk = max(1, LENS_LOGIT_BUDGET // w.shape[0])
    return LensWeights(w, b, torch.empty(min(chunk, max(1, n_rows)) * w.shape[0], dtype=dt, device=w.device), chunk)


def _layer_probs(lm, rp: ResidualPass, ts: TargetSet, norm: str) -> Float[Tensor, "layer1 prompt target"]:
    """p^(0..L) of the targets for every prompt: those the pass streamed, else all (L+1) x prompt
    rows of the kept residuals in one chunked lens."""
    if rp.probs is not None:
        return rp.probs
    assert rp.last is not None
    return lens_probs(lm, rp.last, ts.first_ids, norm=norm, final=rp.last[-1])


def layer_labels(n_layers: int) -> list[str]:
    """The layer labels ``L0 .. L{n_layers-1}``."""
    return [f"L{i}" for i in range(n_layers)]


def _layer_result(lm, rp: ResidualPass, ts: TargetSet, norm: str, lens: str) -> LocateResult:
    p = _layer_probs(lm, rp, ts, norm)  # [L+1, prompt, target]
    per = (p[1:] - p[:-1]).abs().sum(-1).T.contiguous()  # [prompt, layer]
    L = per.shape[1]
    counts = torch.bincount(per.argmax(1), minlength=L)
    return LocateResult(
        method="layer",
        labels=layer_labels(L),
        scores=per.mean(0),
        variant=f"norm={norm}",
        per_prompt=per,
        extras={
            "per_sample_argmax": counts.tolist(),
            "p_targets": p.mean(1).tolist(),
            "targets": list(ts.words),
            "lens": lens,
            "norm": norm,
        },
        model=getattr(lm, "name", ""),
        n_samples=per.shape[0],
    )


def _layer_pass(lm, prompts, targets, norm: str, lens: str, batch_size: int, progress: bool,
                bmi: bool) -> tuple[ResidualPass, TargetSet]:
    """Check the layer-scale arguments, then the one residual pass (with BMI when ``bmi``)."""
    if norm not in NORM_MODES:
        raise ValueError(f"norm must be one of {', '.join(NORM_MODES)}; got {norm!r}")
    _check_lens(lens)
    ts = single_token_targets(lm, targets, "layer_scale")
    rp = residual_pass(lm, prompts, lens=lens, batch_size=batch_size, bmi=bmi, progress=progress, keep_last=False,
                       target_ids=ts.first_ids, norm=norm)
    return rp, ts


def layer_scale(lm: LensModel, prompts: Sequence[str], targets: TargetSet | str | Sequence[str] = "he,she", *,
                norm: str = "recompute", lens: str = "hf", batch_size: int = 32,
                progress: bool = False) -> LocateResult:
    """MSME Eq. 2 layer importance ``I(L_i) = sum_t |p^(i+1)[t] - p^(i)[t]|`` (see module docstring).

    ``norm="recompute"`` (default, the literal reading) recomputes the final norm on each H^(i);
    ``norm="cached"`` uses the RMS/LN scale of the final residual for every layer. ``extras``:
    ``per_sample_argmax`` (prompts whose largest score is at each layer, aligned with labels) and
    ``p_targets`` (mean target probabilities per lens layer 0..L, ``[layer+1, target]``).
    """
    rp, ts = _layer_pass(lm, prompts, targets, norm, lens, batch_size, progress, bmi=False)
    return _layer_result(lm, rp, ts, norm, lens)


def _bmi_result(lm, per: Tensor, lens: str, variant: str = "1-cos, mean over real positions then prompts") -> LocateResult:
    return LocateResult(
        method="bmi",
        labels=layer_labels(per.shape[1]),
        scores=per.mean(0),
        variant=variant,
        per_prompt=per,
        extras={"lens": lens, "ranking": torch.argsort(per.mean(0), descending=True).tolist()},
        model=getattr(lm, "name", ""),
        n_samples=per.shape[0],
    )


def bmi(lm: LensModel, prompts: Sequence[str], *, lens: str = "hf", batch_size: int = 32, progress: bool = False) -> LocateResult:
    """LFTF Eq. 4 block modification intensity ``1 - cos(H^(i)_l, H^(i+1)_l)`` per block.

    Mean over each prompt's real (non-padding) positions, then over prompts; cosines are taken
    in float64 inside the hooks, so no residual stack is stored.
    """
    _check_lens(lens)
    rp = residual_pass(lm, prompts, lens=lens, batch_size=batch_size, bmi=True, progress=progress, keep_last=False)
    assert rp.bmi is not None
    return _bmi_result(lm, rp.bmi, lens)


def layer_scale_and_bmi(lm: LensModel, prompts: Sequence[str], targets: TargetSet | str | Sequence[str] = "he,she", *,
                        norm: str = "recompute", lens: str = "hf", batch_size: int = 32,
                        progress: bool = False) -> tuple[LocateResult, LocateResult]:
    """Both results from ONE forward pass (same numbers as calling each function separately)."""
    rp, ts = _layer_pass(lm, prompts, targets, norm, lens, batch_size, progress, bmi=True)
    assert rp.bmi is not None
    return _layer_result(lm, rp, ts, norm, lens), _bmi_result(lm, rp.bmi, lens)


# --------------------------------------------------------------------------- robustness
def _kendall_tau(a: Tensor, b: Tensor) -> float:
    """Kendall's tau-a between two score vectors (ties count as neither concordant nor discordant)."""
    da = torch.sign(a[:, None] - a[None, :])
    db = torch.sign(b[:, None] - b[None, :])
    n = a.shape[0]
    return float((da * db).sum() / (n * (n - 1))) if n > 1 else 1.0


def bmi_robustness(
    lm: LensModel,
    pool: Sequence[str],
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    n: int = 100,
    batch_size: int = 32,
    progress: bool = False,
) -> LocateResult:
    """LFTF appendix A.1: BMI on ``len(seeds)`` subsamples of ``n`` prompts drawn from ``pool``.

    Each seed draws ``n`` distinct prompts with ``random.Random(seed).sample``. Every distinct
    prompt is run once; per-seed scores are means of its rows. ``scores`` is the mean of the
    per-seed scores. ``extras``: ``per_seed`` ``[seed, layer]``, ``variance`` per block
    (unbiased variance across seeds), ``mean_variance``, ``std`` (for error bars), ``kendall_tau``
    of each seed's block ranking vs the pooled ranking, and ``top1_agreement`` / ``top3_overlap``.
    """
    pool = check_prompts(pool)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("bmi_robustness needs at least one seed")
    if not 1 <= n <= len(pool):
        raise ValueError(f"n={n} must be between 1 and the pool size {len(pool)}; pass a larger pool or a smaller n")
    draws = [random.Random(s).sample(range(len(pool)), n) for s in seeds]
    uniq = sorted({i for d in draws for i in d})
    pos = {i: k for k, i in enumerate(uniq)}
    rp = residual_pass(lm, [pool[i] for i in uniq], batch_size=batch_size, bmi=True, progress=progress,
                       keep_last=False)
    assert rp.bmi is not None
    per_seed = torch.stack([rp.bmi[[pos[i] for i in d]].mean(0) for d in draws])  # [seed, layer]
    scores = per_seed.mean(0)
    var = per_seed.var(0, unbiased=True) if len(seeds) > 1 else torch.zeros_like(scores)
    top = set(torch.argsort(scores, descending=True)[:3].tolist())
    return LocateResult(
        method="bmi",
        labels=layer_labels(per_seed.shape[1]),
        scores=scores,
        variant=f"1-cos, robustness {len(seeds)} seeds x {n} samples",
        per_prompt=None,
        extras={
            "seeds": seeds,
            "n": n,
            "per_seed": per_seed.tolist(),
            "variance": var.tolist(),
            "std": var.sqrt().tolist(),
            "mean_variance": float(var.mean()),
            "kendall_tau": [_kendall_tau(s, scores) for s in per_seed],
            "top1_agreement": float(sum(int(s.argmax() == scores.argmax()) for s in per_seed) / len(seeds)),
            "top3_overlap": [len(top & set(torch.argsort(s, descending=True)[:3].tolist())) / 3 for s in per_seed],
        },
        model=getattr(lm, "name", ""),
        n_samples=len(uniq),
    )
