"""Attention value neurons (Yu & Ananiadou's neuron attribution, as the authors' code defines them).

An *attention value neuron* is one dimension ``d`` of one head ``h``'s value/output path in layer
``l``: its label is ``L{l}H{h}V{d}`` (``0 <= d < d_head``). At the last query position its output
is the value-state entry ``v[pos, kv(h) * d_head + d]`` weighted by the attention probability
``a[h, last, pos]`` and written through column ``h * d_head + d`` of W_O::

    out(l, h, d, pos) = a[h, last, pos] * v[pos, kv(h) d_head + d] * W_O[:, h d_head + d]

``kv(h) = h // (n_heads / n_kv_heads)`` maps a query head to its grouped KV head (HF's
``repeat_kv``). The reference notebook (``zepingyu0512/neuron-attribution``, "attn neuron
increase") scores each ``(l, h, d, pos)`` piece separately by
``log p(w | x + out) - log p(w | x)`` with x the layer input at the last position and the final
RMSNorm scale kept from the real forward ("cached"). Summed over source positions, the pieces give
the neuron's whole last-position output ``z[h d_head + d] * W_O[:, h d_head + d]`` (z = o_proj
input), which is the unit an edit of that neuron removes: :func:`attn_value_attribution` ranks
neurons by the project's bias score (change of the t1 - t0 logit difference, which is exactly the
sum over positions of the pieces' difference scores under the cached norm).

:func:`attn_pieces` gives the per-position pieces (it needs the attention probabilities, so it runs
the model with eager attention, restoring the previous implementation in ``finally``);
:func:`piece_increase` the reference's per-target log-prob increase of each piece (full-vocabulary
log-softmax, bounded memory).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..arch import get_submodule, param_ref
from ..hooks import module_hooks
from ..labels import ValueNeuronLabel, is_value_neuron, parse_as
from ..scoring import Batch, check_prompts, iter_batches
from ..targets import TargetSet
from .attribution import (
    LastCache, base_model, check_pair, collect_last, head_out_weight, logit_diff_dir, norm_parts, o_bias,
)
from .result import LocateResult

if TYPE_CHECKING:
    from ..lens import LensModel


def parse_attn_neuron(label: str) -> tuple[int, int, int]:
    """``"L12H3V7"`` -> ``(12, 3, 7)`` (grammar in :mod:`bias_lens.labels`)."""
    lab = parse_as(label, ValueNeuronLabel)
    return lab.layer, lab.head, lab.dim


def is_attn_neuron(label: str) -> bool:
    """True for an attention value neuron label ``L{l}H{h}V{d}``."""
    return is_value_neuron(label)


def n_kv_heads(lm: LensModel) -> int:
    """Number of key/value heads (grouped-query attention), else ``n_heads``."""
    attr = lm.arch.n_kv_heads_attr
    n = getattr(lm.hf.config, attr, None) if attr else None
    return int(n) if n else lm.n_heads


def kv_head(lm: LensModel, h: int) -> int:
    """The grouped KV head a query head reads (HF ``repeat_kv``)."""
    return h // (lm.n_heads // n_kv_heads(lm))


def check_attn_labels(lm: LensModel, labels: Sequence[str]) -> list[tuple[int, int, int]]:
    """``(layer, head, dim)`` of each value-neuron label; ValueError naming the first out of range."""
    out = []
    for lab in labels:
        l, h, d = parse_attn_neuron(lab)
        if not (0 <= l < lm.n_layers and 0 <= h < lm.n_heads and 0 <= d < lm.d_head):
            raise ValueError(f"{lab}: out of range (layers < {lm.n_layers}, heads < {lm.n_heads}, dims < {lm.d_head})")
        out.append((l, h, d))
    return out


def value_weight(lm: LensModel, layer: int) -> tuple[Float[Tensor, "d_kv d_model"], Tensor | None]:
    """W_V of layer ``layer`` (``[d_kv, d_model]``, float64) and its bias (or None)."""
    ref = param_ref(lm.hf, f"L{layer}.attn.v")
    b = ref.bias_view(lm.hf)
    return ref.weight_view(lm.hf).detach().double(), (None if b is None else b.detach().double())


def value_row(lm: LensModel, l: int, h: int, d: int) -> Float[Tensor, " d_model"]:
    """The reference's value-neuron "key": W_V row of (kv(h), d) read through ln1's weight (and centring)."""
    W, _ = value_weight(lm, l)
    fn = norm_parts(get_submodule(lm.block(l), lm.arch.ln1), lm.arch.norm)
    return fn.read_dir(W[kv_head(lm, h) * lm.d_head + d])


# --------------------------------------------------------------------------- last-position scores
def attn_value_scores(lm: LensModel, cache: LastCache, ts: TargetSet, layer: int) -> Float[Tensor, "prompt neuron"]:
    """Signed cached-norm bias score of every value neuron of ``layer`` (index ``h * d_head + d``)."""
    fn = norm_parts(lm.final_norm, lm.arch.norm)
    r = fn.read_dir(logit_diff_dir(lm, ts))
    return cache.attn_z[layer] * (r @ head_out_weight(lm, layer))[None] / fn.scale(cache.final)


def attn_value_attribution(
    lm: LensModel, prompts: Sequence[str], targets: TargetSet | str = "he,she", *, rank: str = "abs",
    batch_size: int = 32, cache: LastCache | None = None,
) -> LocateResult:
    """Bias score (t1 - t0 log-prob increase, cached norm) of every attention value neuron ``L{l}H{h}V{d}``.

    ``rank``: ``"abs"`` |mean signed score| (default, as :func:`neuron_attribution`), ``"mean_abs"``,
    ``"signed"``. ``extras["signed"]`` holds the signed means.
    """
    if rank not in ("abs", "mean_abs", "signed"):
        raise ValueError(f"rank must be 'abs', 'mean_abs' or 'signed', got {rank!r}")
    ts = check_pair(lm, targets)
    cache = cache if cache is not None else collect_last(lm, prompts, batch_size=batch_size)
    per = torch.cat([attn_value_scores(lm, cache, ts, l) for l in range(lm.n_layers)], 1)
    signed = per.mean(0)
    score = {"abs": signed.abs(), "mean_abs": per.abs().mean(0), "signed": signed}[rank]
    labels = [f"L{l}H{h}V{d}" for l in range(lm.n_layers) for h in range(lm.n_heads) for d in range(lm.d_head)]
    return LocateResult(
        "attribution", labels, score, variant=f"attn-value-neurons,norm=cached,rank={rank},positions=sum",
        model=lm.name, n_samples=cache.n_prompts,
        extras={"signed": signed.float(), "targets": list(ts.words), "d_head": lm.d_head, "n_heads": lm.n_heads},
    )


# --------------------------------------------------------------------------- per-position pieces
@contextmanager
def eager_attention(lm: LensModel) -> Iterator[None]:
    """Temporarily switch the HF model to eager attention (the only one that returns probabilities)."""
    prev = lm.hf.config._attn_implementation
    if prev != "eager":
        lm.hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        if prev != "eager":
            lm.hf.set_attn_implementation(prev)


@dataclass
class PieceBatch:
    """One batch of per-position activations (float64, CPU)."""

    batch: Batch
    probs: dict[int, Float[Tensor, "batch head pos"]]  # last-query attention probabilities
    values: dict[int, Float[Tensor, "batch pos d_kv"]]
    resid_pre: dict[int, Float[Tensor, "batch pos d_model"]]
    mlp_post: dict[int, Float[Tensor, "batch pos d_mlp"]]
    final: Float[Tensor, "batch d_model"]  # final residual at the last real position

    def pieces(self, lm: LensModel, units: Sequence[tuple[int, int, int]]) -> Float[Tensor, "batch unit pos"]:
        """``a[h, last, pos] * v[pos, kv(h) d_head + d]`` for each unit (0 on padding)."""
        cols = [self.probs[l][:, h] * self.values[l][:, :, kv_head(lm, h) * lm.d_head + d] for l, h, d in units]
        return torch.stack(cols, 1)


@torch.no_grad()
def attn_pieces(
    lm: LensModel, prompts: Sequence[str], layers: Sequence[int], *, mlp_layers: Sequence[int] = (), batch_size: int = 16,
) -> Iterator[PieceBatch]:
    """Batches of last-query attention probabilities, value states, full ``resid_pre`` of ``layers``
    and full ``mlp.post`` of ``mlp_layers`` (one eager forward pass per batch)."""
    prompts = check_prompts(prompts)
    L = lm.n_layers
    layers, mlp_layers = sorted(set(layers)), sorted(set(mlp_layers))
    with eager_attention(lm):
        for b in iter_batches(lm.tokenizer, prompts, batch_size, device=lm.device):
            acts: dict[str, Tensor] = {}

            def keep(t: Tensor, *, hook) -> None:
                """keep the full activation"""
                acts[hook.name] = t.detach().double().cpu()

            def keep_probs(module, args, kwargs, out, l=None) -> None:
                acts[f"probs{l}"] = out[1].detach().double().cpu()

            points = [f"L{l}.resid_pre" for l in layers] + [f"L{l}.mlp.post" for l in mlp_layers] + [f"L{L - 1}.resid_post"]
            probs_hooks = [(get_submodule(lm.block(l), lm.arch.attn), lambda m, a, kw, o, l=l: keep_probs(m, a, kw, o, l))
                           for l in layers]
            with module_hooks(forward=probs_hooks), lm.hooks([(p, keep) for p in points]):
                base_model(lm)(**b.model_inputs())
            last = b.last.cpu()
            rows = torch.arange(len(last))
            probs, values = {}, {}
            for l in layers:
                p = acts.get(f"probs{l}")
                if p is None:
                    raise RuntimeError(f"layer {l}'s attention returned no probabilities under eager attention")
                probs[l] = p[rows, :, last]  # [batch, head, pos]
                W, bv = value_weight(lm, l)
                fn = norm_parts(get_submodule(lm.block(l), lm.arch.ln1), lm.arch.norm)
                v = fn.apply(acts[f"L{l}.resid_pre"]) @ W.T
                values[l] = v + bv if bv is not None else v
            yield PieceBatch(
                b, probs, values, {l: acts[f"L{l}.resid_pre"] for l in layers},
                {l: acts[f"L{l}.mlp.post"] for l in mlp_layers}, acts[f"L{L - 1}.resid_post"][rows, last],
            )


def piece_increase(
    lm: LensModel, pb: PieceBatch, units: Sequence[tuple[int, int, int]], target_ids: Sequence[int], *, max_elems: int = 2**25,
) -> Float[Tensor, "batch unit pos target"]:
    """The reference's ``log p(t | x + piece) - log p(t | x)`` for every unit, source position and
    target id; x = layer input at the last position plus the o_proj bias (cached final-norm scale)."""
    fn = norm_parts(lm.final_norm, lm.arch.norm)
    W_U = lm.unembed.weight.detach().double()
    b_U = getattr(lm.unembed, "bias", None)
    s_f = fn.scale(pb.final)  # [batch, 1]
    c = pb.pieces(lm, units)  # [batch, unit, pos]
    B, U, P = c.shape
    tid = torch.as_tensor(list(target_ids))
    out = torch.zeros(B, U, P, len(tid), dtype=torch.float64)
    rows = torch.arange(B)
    for l in sorted({u[0] for u in units}):
        idx = [i for i, u in enumerate(units) if u[0] == l]
        x = pb.resid_pre[l][rows, pb.batch.last.cpu()]
        ob = o_bias(lm, l)
        x = x + ob if ob is not None else x
        z0 = fn.apply(x, s_f) @ W_U.T
        z0 = z0 + b_U.detach().double() if b_U is not None else z0
        lp0 = torch.log_softmax(z0, -1)[:, tid]  # [batch, target]
        W_O = head_out_weight(lm, l)
        e = (fn.center(W_O[:, [units[i][1] * lm.d_head + units[i][2] for i in idx]].T) * fn.weight) @ W_U.T  # [u, vocab]
        chunk = max(1, max_elems // max(1, P * W_U.shape[0]))
        for b0 in range(B):
            for i0 in range(0, len(idx), chunk):
                part = idx[i0 : i0 + chunk]
                cc = c[b0, part] / s_f[b0]  # [u, pos]
                z = z0[b0][None, None] + cc[:, :, None] * e[[idx.index(i) for i in part]][:, None]  # [u, pos, vocab]
                out[b0, part] = torch.log_softmax(z, -1)[..., tid] - lp0[b0]
    return out
