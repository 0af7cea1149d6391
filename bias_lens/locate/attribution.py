"""Neuron and head logit attribution (Yu & Ananiadou's neuron attribution, as used by the
interpretable-neuron-editing paper).

For FFN neuron k of layer l with activation ``m_k`` at the prompt's last real token and value
vector ``v_k`` (column k of the down projection, HF ``[out, in]`` orientation), and target word w::

    importance(w) = log p(w | x + m_k v_k) - log p(w | x),   p = softmax(W_U FinalNorm(.))

with x the residual before that MLP (``resid_mid`` at the last position). For head h of layer l,
``m_k v_k`` becomes the head's output through its slice of W_O and x is the residual before
attention (``resid_pre``). The o_proj bias (GPT-2 has one) belongs to no head: by default
(``o_bias="baseline"``) it is part of x, i.e. x = resid_pre + b_O; ``o_bias="split"`` gives each
head ``b_O / n_heads`` of it instead.

The bias score is ``importance(t1) - importance(t0)`` for targets ``(t0, t1)`` = (he, she): it is
signed (> 0 pushes towards she) and its magnitude ranks neurons. Because both importances share
the same log-partition functions, the score equals the change of the logit *difference*::

    score = [l_t1 - l_t0](x + m_k v_k) - [l_t1 - l_t0](x)

so it needs no full-vocabulary log-softmax. FinalNorm modes:

* ``norm="cached"`` (default, as the paper): the RMS/LN scale is taken from the model's final
  residual at that position, so FinalNorm is affine and ``score = m_k (w . v_k) / s_final`` with
  ``w = C(g * (W_U[t1] - W_U[t0]))`` (C centres for LayerNorm, identity for RMSNorm);
* ``norm="recompute"``: the scale is recomputed on x and on x + m_k v_k (closed form from
  ``|Cx|^2``, ``Cx . Cv_k``, ``|Cv_k|^2``).

Per-target importances (which do need the log-softmax over the full vocabulary) are computed by
:func:`target_importance` in bounded-memory chunks for a chosen set of labels.

Everything comes from one forward pass that keeps only the last position of ``resid_pre``,
``resid_mid``, ``attn.z``, ``mlp.post`` and the final residual. By default it is streamed
(:func:`iter_last`: each batch is scored and reduced, then dropped, so memory does not grow with
the prompt count); :func:`collect_last` keeps it for every prompt, for callers that pass one
cache to several scores (``cache=``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..arch import param_ref
from ..hooks import record_into
from ..labels import HeadLabel, NeuronLabel, parse_as
from ..progress import bar, batch_count
from ..scoring import check_prompts, iter_batches
from ..targets import TargetSet, resolve_targets
from .result import LocateResult

if TYPE_CHECKING:
    from ..lens import LensModel

log = logging.getLogger(__name__)
NORM_MODES = ("cached", "recompute")
RANKS = ("abs", "mean_abs", "signed")


# --------------------------------------------------------------------------- norm algebra
@dataclass(frozen=True)
class NormParts:
    """A LayerNorm/RMSNorm as ``g * C y / scale(y) + b`` (C centres only for LayerNorm)."""

    weight: Float[Tensor, " d_model"]
    bias: Float[Tensor, " d_model"] | None
    eps: float
    centered: bool

    def center(self, y: Tensor) -> Tensor:
        """``C y``: ``y`` minus its mean over the last axis for LayerNorm, unchanged for RMSNorm."""
        return y - y.mean(-1, keepdim=True) if self.centered else y

    def scale(self, y: Tensor) -> Tensor:
        """``sqrt(mean((C y)^2) + eps)`` over the last axis, keepdim."""
        return torch.sqrt(self.center(y).pow(2).mean(-1, keepdim=True) + self.eps)

    def apply(self, y: Tensor, scale: Tensor | None = None) -> Tensor:
        """The norm applied to ``y``: ``C y / scale * weight (+ bias)``; ``scale`` given freezes the denominator."""
        s = self.scale(y) if scale is None else scale
        out = self.center(y) / s * self.weight.to(y)
        return out + self.bias.to(y) if self.bias is not None else out

    def read_dir(self, w: Float[Tensor, "... d_model"]) -> Tensor:
        """Direction r with ``w . (g * C y) == r . y`` (C is symmetric)."""
        return self.center(w * self.weight.to(w))


def norm_parts(module: nn.Module, kind: str | None = None) -> NormParts:
    """Weights, eps and kind of an HF norm module as :class:`NormParts`.

    ``kind`` is the architecture row's norm kind (``lm.arch.norm``: ``layernorm``, ``rmsnorm``, or
    ``rmsnorm_1p`` = Gemma's ``(1 + w)`` scaling); pass it. Without it the kind is identified
    from the module's behaviour: one probe vector is normalised and the kind whose formula
    reproduces the module's output is used (an unknown norm raises instead of being misread).
    """
    w = module.weight.detach().double()
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        raise ValueError(f"unsupported norm module {type(module).__name__}: need a LayerNorm/RMSNorm with eps")
    b = getattr(module, "bias", None)
    b = b.detach().double() if isinstance(b, Tensor) else None
    cands = {
        "layernorm": NormParts(w, b, float(eps), True),
        "rmsnorm": NormParts(w, None, float(eps), False),
        "rmsnorm_1p": NormParts(1.0 + w, None, float(eps), False),
    }
    if kind is None:
        kind = _probe_norm_kind(module, cands)
    if kind not in cands:
        raise ValueError(f"norm kind must be one of {', '.join(cands)}, got {kind!r}")
    return cands[kind]


@torch.no_grad()
def _probe_norm_kind(module: nn.Module, cands: dict[str, NormParts]) -> str:
    """The candidate kind whose formula reproduces ``module`` on one off-centre probe vector."""
    wt = module.weight
    y = torch.linspace(-1.0, 2.0, wt.shape[-1], dtype=torch.float64)
    out = module(y.to(device=wt.device, dtype=wt.dtype)[None])[0].double().cpu()
    errs = {k: float((p.apply(y) - out).abs().max()) for k, p in cands.items()}
    best = min(errs, key=errs.get)
    tol = (1e-5 if wt.dtype in (torch.float32, torch.float64) else 3e-2) * max(1.0, float(out.abs().max()))
    if errs[best] > tol:
        raise ValueError(f"norm module {type(module).__name__} matches none of {', '.join(cands)} "
                         f"(max errors {errs}); pass kind= explicitly")
    return best


# --------------------------------------------------------------------------- cache
@dataclass
class LastCache:
    """Last-position activations of every layer from one forward pass (float64, CPU)."""

    resid_pre: Float[Tensor, "layer prompt d_model"]
    resid_mid: Float[Tensor, "layer prompt d_model"]
    attn_z: Float[Tensor, "layer prompt d_z"]
    mlp_post: Float[Tensor, "layer prompt d_mlp"]
    final: Float[Tensor, "prompt d_model"]

    @property
    def n_prompts(self) -> int:
        """Number of prompts cached."""
        return self.final.shape[0]


def base_model(lm: LensModel) -> nn.Module:
    """The transformer body without the LM head (its output is already final-normed)."""
    return lm.body


LAST_KINDS = ("resid_pre", "resid_mid", "attn.z", "mlp.post")


@torch.no_grad()
def iter_last(
    lm: LensModel, prompts: Sequence[str], *, batch_size: int = 32, progress: bool = False,
    desc: str = "attribution pass",
) -> Iterator[tuple[list[int], LastCache]]:
    """The batches of :func:`collect_last` one at a time: ``(rows, cache of those rows)``.

    ``rows`` are the prompts' original indices (batches are sorted by length). Only one batch's
    float64 slices exist at a time, so a consumer that reduces each batch before the next
    (the locate functions' default path) holds memory independent of the number of prompts.
    """
    prompts = check_prompts(prompts)
    L, n = lm.n_layers, len(prompts)
    points = [f"L{l}.{k}" for l in range(L) for k in LAST_KINDS] + [f"L{L - 1}.resid_post"]
    body = base_model(lm)
    batches = iter_batches(lm.tokenizer, prompts, batch_size, device=lm.device)
    for b in bar(batches, total=batch_count(n, batch_size), desc=desc, enabled=progress, unit="batch"):
        store: dict[str, Tensor] = {}
        with lm.hooks(record_into(store, points, index=b.last)):
            body(**b.model_inputs())
        stack = lambda k: torch.stack([store[f"L{l}.{k}"].double().cpu() for l in range(L)])  # noqa: E731
        yield list(b.rows), LastCache(stack("resid_pre"), stack("resid_mid"), stack("attn.z"), stack("mlp.post"),
                                      store[f"L{L - 1}.resid_post"].double().cpu())


@torch.no_grad()
def collect_last(lm: LensModel, prompts: Sequence[str], *, batch_size: int = 32, progress: bool = False) -> LastCache:
    """One batched forward pass (body only, no unembedding) keeping last-position slices of every
    prompt (bar if ``progress``); for callers that reuse one cache across several scores.

    Its size grows with the prompt count (float64, ``layer x prompt x (3 d_model + d_mlp)``); the
    locate functions stream :func:`iter_last` instead when no cache is passed to them.
    """
    prompts = check_prompts(prompts)
    n, out = len(prompts), None
    for rows, c in iter_last(lm, prompts, batch_size=batch_size, progress=progress):
        if out is None:  # filled in place: never a second copy of the whole cache
            out = LastCache(*(torch.empty(*t.shape[:-2], n, t.shape[-1], dtype=t.dtype) for t in
                              (c.resid_pre, c.resid_mid, c.attn_z, c.mlp_post, c.final)))
        idx = torch.as_tensor(rows)
        for name in ("resid_pre", "resid_mid", "attn_z", "mlp_post"):
            getattr(out, name)[:, idx] = getattr(c, name)
        out.final[idx] = c.final
    assert out is not None
    return out


# --------------------------------------------------------------------------- weights
def check_linear_writes(lm: LensModel) -> None:
    """Refuse families whose sub-block outputs are normalised before the residual add (Gemma-2's
    post-attention / post-feedforward norms): there a neuron's write into the residual is not
    ``activation * W_down[:, n]``, so the linear residual decompositions here do not hold."""
    if lm.arch.post_sublayer_norm:
        raise ValueError(
            f"the {lm.arch.family} family normalises attention/MLP outputs before adding them to the residual, "
            "so neuron/head writes are not linear in their activations; use the gradient (row/neuron scale) "
            "or ablation-based (causal, module scale) locators for this model"
        )


def value_vectors(lm: LensModel, layer: int) -> Float[Tensor, "d_model d_mlp"]:
    """Column n = what neuron n writes into the residual per unit activation (W_down, [out, in])."""
    check_linear_writes(lm)
    return param_ref(lm.hf, f"L{layer}.mlp.down").weight_view(lm.hf).detach().double()


def head_out_weight(lm: LensModel, layer: int) -> Float[Tensor, "d_model d_z"]:
    """W_O of layer ``layer`` in ``[out, in]`` orientation, float64 (checks the writes are linear)."""
    check_linear_writes(lm)
    return param_ref(lm.hf, f"L{layer}.attn.o").weight_view(lm.hf).detach().double()


def o_bias(lm: LensModel, layer: int) -> Tensor | None:
    """The o_proj bias of layer ``layer`` as float64, or None when the model has none."""
    b = param_ref(lm.hf, f"L{layer}.attn.o").bias_view(lm.hf)
    return None if b is None else b.detach().double()


def head_outputs(lm: LensModel, cache: LastCache, layer: int) -> Float[Tensor, "prompt head d_model"]:
    """Each head's last-position output through its slice of W_O (no o_proj bias)."""
    W = head_out_weight(lm, layer).view(lm.d_model, lm.n_heads, lm.d_head)
    z = cache.attn_z[layer].view(-1, lm.n_heads, lm.d_head)
    return torch.einsum("dhe,phe->phd", W, z)


def check_pair(lm: LensModel, targets: TargetSet | str | Sequence[str]) -> TargetSet:
    """Two distinct single-token targets (the logit difference attribution decomposes)."""
    ts = targets if isinstance(targets, TargetSet) else resolve_targets(lm.tokenizer, targets)
    try:
        return ts.require(n=2, single_token=True)
    except ValueError as err:
        raise type(err)(f"attribution needs exactly two distinct single-token targets (e.g. he,she): {err}") from None


def logit_diff_dir(lm: LensModel, ts: TargetSet) -> Float[Tensor, " d_model"]:
    """``W_U[t1] - W_U[t0]`` in float64 (only the two rows are upcast, not the whole unembedding)."""
    W_U = lm.unembed.weight.detach()
    return W_U[ts.first_ids[1]].double() - W_U[ts.first_ids[0]].double()


# --------------------------------------------------------------------------- scores
def _diff_scores(fn: NormParts, u: Tensor, x: Tensor, delta: Tensor, final: Tensor, norm: str) -> Tensor:
    """score[p, k] = [l1-l0](x_p + delta[p,k]) - [l1-l0](x_p); x [p,d], delta [p,k,d] or via callback."""
    r = fn.read_dir(u)
    if norm == "cached":
        return (delta @ r) / fn.scale(final)
    xc, dc = fn.center(x), fn.center(delta)
    d = x.shape[-1]
    s0 = torch.sqrt(xc.pow(2).mean(-1) + fn.eps)
    s1 = torch.sqrt((xc.pow(2).sum(-1)[:, None] + 2 * torch.einsum("pd,pkd->pk", xc, dc) + dc.pow(2).sum(-1)) / d + fn.eps)
    a0 = x @ r
    return (a0[:, None] + delta @ r) / s1 - (a0 / s0)[:, None]


def neuron_scores(
    lm: LensModel, cache: LastCache, ts: TargetSet, layer: int, norm: str = "cached", *, rv: Tensor | None = None,
) -> Float[Tensor, "prompt d_mlp"]:
    """Signed bias score of every neuron of ``layer`` for every prompt (no per-neuron forward).

    ``rv`` (optional, ``norm="cached"``) is :func:`neuron_read` of the same layer, computed once by
    a caller that scores many batches; the result is the same as without it.
    """
    fn = norm_parts(lm.final_norm, lm.arch.norm)
    m, x = cache.mlp_post[layer], cache.resid_mid[layer]
    if norm == "cached":
        rv = neuron_read(lm, ts, layer) if rv is None else rv
        return m * rv[None, :] / fn.scale(cache.final)
    # recompute: closed form without materialising [prompt, d_mlp, d_model]
    u, V = logit_diff_dir(lm, ts), value_vectors(lm, layer)
    r = fn.read_dir(u)
    d = x.shape[-1]
    xc, Vc = fn.center(x), fn.center(V.T).T
    s0 = torch.sqrt(xc.pow(2).mean(-1) + fn.eps)
    s1 = torch.sqrt((xc.pow(2).sum(-1)[:, None] + 2 * m * (xc @ Vc) + m.pow(2) * Vc.pow(2).sum(0)[None]) / d + fn.eps)
    a0 = x @ r
    return (a0[:, None] + m * (r @ V)[None]) / s1 - (a0 / s0)[:, None]


def neuron_read(lm: LensModel, ts: TargetSet, layer: int) -> Float[Tensor, " d_mlp"]:
    """``r . v_k`` for every neuron k of ``layer``: the logit-difference read of its value vector."""
    fn = norm_parts(lm.final_norm, lm.arch.norm)
    return fn.read_dir(logit_diff_dir(lm, ts)) @ value_vectors(lm, layer)


def head_scores(
    lm: LensModel, cache: LastCache, ts: TargetSet, layer: int, norm: str = "cached", o_bias_mode: str = "baseline"
) -> Float[Tensor, "prompt head"]:
    """Signed bias score of every head of ``layer`` for every prompt."""
    fn, u = norm_parts(lm.final_norm, lm.arch.norm), logit_diff_dir(lm, ts)
    o = head_outputs(lm, cache, layer)
    x = cache.resid_pre[layer].clone()
    b = o_bias(lm, layer)
    if b is not None:
        if o_bias_mode == "split":
            o = o + b / lm.n_heads
        else:
            x = x + b
    return _diff_scores(fn, u, x, o, cache.final, norm)


def _rank(per: Tensor, rank: str) -> tuple[Tensor, Tensor]:
    signed = per.mean(0)
    score = {"abs": signed.abs(), "mean_abs": per.abs().mean(0), "signed": signed}[rank]
    return score, signed


def _check_opts(norm: str, rank: str) -> None:
    if norm not in NORM_MODES:
        raise ValueError(f"norm must be one of {NORM_MODES}, got {norm!r}")
    if rank not in RANKS:
        raise ValueError(f"rank must be one of {RANKS}, got {rank!r}")


def neuron_attribution(
    lm: LensModel, prompts: Sequence[str], targets: TargetSet | str = "he,she", *, norm: str = "cached", rank: str = "abs",
    layers: Sequence[int] | None = None, batch_size: int = 32, cache: LastCache | None = None,
    keep_per_prompt: bool = False, progress: bool = False,
) -> LocateResult:
    """Bias score ``importance(t1) - importance(t0)`` of every FFN neuron (labels ``L{l}N{k}``).

    ``rank``: ``"abs"`` ranks by |mean over prompts of the signed score| (default), ``"mean_abs"``
    by the mean of per-prompt magnitudes, ``"signed"`` by the signed mean (t1-ward first).
    ``extras["signed"]`` always holds the signed means. ``progress=True`` shows a bar over the
    forward-pass batches (the per-neuron scores are closed-form and take no extra pass).

    Without ``cache`` the pass is streamed (:func:`iter_last`): each batch's scores are added to
    per-neuron float64 sums and the batch is dropped, so memory does not grow with the prompt
    count (only ``keep_per_prompt=True``'s float32 ``[prompt, neuron]`` output does). Per-prompt
    scores are the same numbers as over a full cache; the means differ from the cache path's only
    by float64 summation order (batch sums, then a sum over batches).
    """
    _check_opts(norm, rank)
    ts = check_pair(lm, targets)
    layers = list(range(lm.n_layers)) if layers is None else _check_layers(lm, layers)
    labels = [f"L{l}N{k}" for l in layers for k in range(lm.d_mlp)]
    if cache is None:
        score, signed, per, n = _streamed_neurons(lm, prompts, ts, layers, norm, rank, batch_size, keep_per_prompt,
                                                 progress)
    else:
        per, n = None, cache.n_prompts
        if keep_per_prompt:
            per = torch.cat([neuron_scores(lm, cache, ts, l, norm) for l in layers], 1)
            score, signed = _rank(per, rank)
            per = per.float()
        else:  # reduce layer by layer: never holds the [prompt, n_layers * d_mlp] matrix (peak RSS)
            parts = [_rank(neuron_scores(lm, cache, ts, l, norm), rank) for l in layers]
            score, signed = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return LocateResult(
        "attribution", labels, score, variant=f"neurons,norm={norm},rank={rank}",
        per_prompt=per, model=lm.name, n_samples=n,
        extras={"signed": signed.float(), "targets": list(ts.words), "layers": layers, "d_mlp": lm.d_mlp},
    )


def _streamed_neurons(
    lm: LensModel, prompts: Sequence[str], ts: TargetSet, layers: list[int], norm: str, rank: str, batch_size: int,
    keep_per_prompt: bool, progress: bool,
) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """(score, signed mean, float32 per-prompt scores or None, prompt count) from per-batch sums."""
    prompts = check_prompts(prompts)
    n, d = len(prompts), lm.d_mlp
    total = torch.zeros(len(layers) * d, dtype=torch.float64)
    total_abs = torch.zeros_like(total) if rank == "mean_abs" else None
    per = torch.empty(n, len(layers) * d, dtype=torch.float32) if keep_per_prompt else None
    rvs = {l: neuron_read(lm, ts, l) for l in layers} if norm == "cached" else {}
    for rows, c in iter_last(lm, prompts, batch_size=batch_size, progress=progress):
        idx = torch.as_tensor(rows)
        for j, l in enumerate(layers):
            s, cols = neuron_scores(lm, c, ts, l, norm, rv=rvs.get(l)), slice(j * d, (j + 1) * d)
            total[cols] += s.sum(0)
            if total_abs is not None:
                total_abs[cols] += s.abs().sum(0)
            if per is not None:
                per[idx, cols] = s.float()
    signed = total / n
    score = signed.abs() if rank == "abs" else signed if rank == "signed" else total_abs / n
    return score, signed, per, n


def head_attribution(
    lm: LensModel, prompts: Sequence[str], targets: TargetSet | str = "he,she", *, norm: str = "cached", rank: str = "abs",
    o_bias_mode: str = "baseline", batch_size: int = 32, cache: LastCache | None = None, progress: bool = False,
) -> LocateResult:
    """Bias score of every attention head (labels ``L{l}H{h}``); see the module docstring (bar if ``progress``).

    Without ``cache`` the pass is streamed (:func:`iter_last`): only the ``[prompt, head]`` scores
    are kept, filled batch by batch (the per-prompt output), never the residual cache.
    """
    _check_opts(norm, rank)
    if o_bias_mode not in ("baseline", "split"):
        raise ValueError(f"o_bias_mode must be 'baseline' or 'split', got {o_bias_mode!r}")
    ts = check_pair(lm, targets)
    L = lm.n_layers
    if cache is None:
        prompts = check_prompts(prompts)
        per = torch.empty(len(prompts), L * lm.n_heads, dtype=torch.float64)
        for rows, c in iter_last(lm, prompts, batch_size=batch_size, progress=progress):
            per[torch.as_tensor(rows)] = torch.cat([head_scores(lm, c, ts, l, norm, o_bias_mode) for l in range(L)], 1)
    else:
        per = torch.cat([head_scores(lm, cache, ts, l, norm, o_bias_mode) for l in range(L)], 1)
    score, signed = _rank(per, rank)
    labels = [f"L{l}H{h}" for l in range(L) for h in range(lm.n_heads)]
    return LocateResult(
        "attribution", labels, score, variant=f"heads,norm={norm},rank={rank},o_bias={o_bias_mode}",
        per_prompt=per.float(), model=lm.name, n_samples=per.shape[0],
        extras={"signed": signed.float(), "targets": list(ts.words), "n_heads": lm.n_heads},
    )


def _check_layers(lm, layers: Sequence[int]) -> list[int]:
    bad = [l for l in layers if not 0 <= int(l) < lm.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range; the model has layers 0..{lm.n_layers - 1}")
    return [int(l) for l in layers]


# --------------------------------------------------------------------------- per-target importance
def component_delta(lm: LensModel, cache: LastCache, label: str) -> tuple[Tensor, Tensor]:
    """(x, x + contribution) at the last position for ``L{l}N{k}`` or ``L{l}H{h}`` (o_bias in x)."""
    lab = parse_as(label, NeuronLabel, HeadLabel)
    if isinstance(lab, HeadLabel):
        l, h = lab.layer, lab.head
        x = cache.resid_pre[l].clone()
        b = o_bias(lm, l)
        x = x + b if b is not None else x
        return x, x + head_outputs(lm, cache, l)[:, h]
    l, k = lab.layer, lab.index
    x = cache.resid_mid[l]
    return x, x + cache.mlp_post[l][:, k : k + 1] * value_vectors(lm, l)[:, k][None]


@torch.no_grad()
def target_importance(
    lm: LensModel, cache: LastCache, labels: Sequence[str], targets: TargetSet | str = "he,she", *, norm: str = "cached",
    max_elems: int = 2**26,
) -> Float[Tensor, "prompt label target"]:
    """``log p(w | x + delta) - log p(w | x)`` with the full-vocabulary log-softmax, in chunks of labels.

    Memory is bounded by ``max_elems`` logits per chunk (prompt x labels x d_vocab).
    """
    _check_opts(norm, "abs")
    ts = targets if isinstance(targets, TargetSet) else resolve_targets(lm.tokenizer, targets)
    if not ts.single_token:
        raise ValueError("target_importance needs single-token targets")
    fn, W_U = norm_parts(lm.final_norm, lm.arch.norm), lm.unembed.weight.detach().double()
    b_U = getattr(lm.unembed, "bias", None)
    tid = torch.as_tensor(ts.first_ids)
    s_f = fn.scale(cache.final)
    P = cache.n_prompts
    chunk = max(1, max_elems // max(1, P * W_U.shape[0]))
    out = torch.empty(P, len(labels), len(ts), dtype=torch.float64)

    def logp(y: Tensor) -> Tensor:
        z = fn.apply(y, s_f if norm == "cached" else None) @ W_U.T
        z = z + b_U.detach().double() if b_U is not None else z
        return torch.log_softmax(z, -1)[:, tid]

    for i in range(0, len(labels), chunk):
        part = labels[i : i + chunk]
        pairs = [component_delta(lm, cache, lab) for lab in part]
        y = torch.stack([pr[0] for pr in pairs] + [pr[1] for pr in pairs])  # [2n, P, d]
        n = len(part)
        lp = torch.stack([logp(y[j]) for j in range(2 * n)])  # [2n, P, t]
        out[:, i : i + n] = (lp[n:] - lp[:n]).permute(1, 0, 2)
    return out
