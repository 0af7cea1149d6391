"""General-neuron ``<start>`` filtering, a position-0 detector, and the masking-effect demo.

The interpretable-neuron-editing paper finds "general neurons" that fire at the ``<start>``
position and support all abilities (editing two of them collapses arithmetic and reading
comprehension). The paper's models start every prompt with a start token; SmolLM2's tokenizer adds
none, so without help "position 0" would be the first word. :func:`position_stats` therefore
scores prompts with the model's start token prepended (``start_token=True``, default: the BOS token,
else EOS as GPT-2 uses ``<|endoftext|>``; nothing is prepended when the tokenizer already adds
it), and position 0 is that token. ``start_token=False`` keeps the raw prompts (position 0 = first
token; the earlier behaviour). ``PositionStats.start_token`` records which: ``"bos-prepended"``,
``"eos-prepended"``, ``"bos-added-by-tokenizer"`` or ``"first-token"``.

* :func:`position_stats` — one batched pass over all positions (activations are reduced inside
  the hook per batch, never kept): for every neuron of every layer, the fraction of prompts whose
  argmax position of the neuron's contribution is 0, and the fraction where its activation at
  position 0 is *outsized*.
  Contribution (``by``): ``"activation"`` (default) = ``|m_k[pos]| * |v_k|`` (argmax over
  positions = argmax of ``|m_k|``); ``"attribution"`` = ``|m_k[pos] (w . v_k)| / s_final[pos]``,
  the cached-norm logit-difference attribution at that position.
  Outsized: ``|m_k[0]| > mean + z * std`` of ``|m_k|`` over the prompt's other real positions
  (needs >= 2 of them; shorter prompts are not eligible), default z = 3.
* :func:`filter_general` — drops neurons whose argmax is position 0 in at least ``min_frac``
  (default 0.5, i.e. majority) of prompts from an attribution result.
* :func:`detect_general` — neurons outsized at position 0 in >= ``min_frac`` (default 0.9) of
  eligible prompts.
* :func:`masking_effect` — retention after masking the top-n general neurons vs the top-n filtered
  bias neurons (see :func:`bias_lens.locate.causal.retention`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..arch import neurons_to_dict, parse_neuron_name
from ..hooks import HookInfo, mask_neurons
from ..scoring import check_prompts, iter_batches
from ..targets import TargetSet
from .attribution import base_model, check_pair, logit_diff_dir, norm_parts, value_vectors
from .result import LocateResult
from .value_neurons import attn_pieces, is_attn_neuron, kv_head, parse_attn_neuron

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..lens import LensModel


@dataclass
class PositionStats:
    """Per-neuron position statistics over prompts."""

    argmax0_frac: Float[Tensor, "layer d_mlp"]
    outsized_frac: Float[Tensor, "layer d_mlp"]
    n_prompts: int
    n_eligible: int
    by: str
    z: float
    start_token: str
    attn_argmax0_frac: Float[Tensor, "layer head d_head"] | None = None


def with_start_token(lm: LensModel, prompts: Sequence[str], start_token: bool = True) -> tuple[list[str], str]:
    """``prompts`` with the model's start token prepended (see the module docstring) and its kind."""
    prompts = check_prompts(prompts)
    if not start_token:
        return prompts, "first-token"
    tok = lm.tokenizer
    sid, kind = (tok.bos_token_id, "bos") if tok.bos_token_id is not None else (tok.eos_token_id, "eos")
    if sid is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to use as <start>; pass start_token=False")
    first = [ids[0] for ids in tok(prompts, add_special_tokens=True)["input_ids"]]
    if all(f == sid for f in first):
        return prompts, "bos-added-by-tokenizer"
    text = tok.convert_ids_to_tokens(sid)
    out = [text + p for p in prompts]
    got = [ids[0] for ids in tok(out)["input_ids"]]
    if any(g != sid for g in got):
        raise ValueError(f"prepending {text!r} does not tokenize to the start id {sid}; pass start_token=False")
    return out, f"{kind}-prepended"


@torch.no_grad()
def position_stats(
    lm: LensModel, prompts: Sequence[str], *, by: str = "activation", z: float = 3.0, targets: TargetSet | str = "he,she",
    batch_size: int = 16, start_token: bool = True, attention: bool = False,
) -> PositionStats:
    """Argmax-at-0 and outsized-at-0 fractions for every neuron (see module docstring)."""
    if by not in ("activation", "attribution"):
        raise ValueError(f"by must be 'activation' or 'attribution', got {by!r}")
    prompts, start_kind = with_start_token(lm, prompts, start_token)
    L = lm.n_layers
    arg0 = torch.zeros(L, lm.d_mlp, dtype=torch.float64)
    outs = torch.zeros(L, lm.d_mlp, dtype=torch.float64)
    n_elig = 0
    fn = norm_parts(lm.final_norm, lm.arch.norm)
    r = fn.read_dir(logit_diff_dir(lm, check_pair(lm, targets))) if by == "attribution" else None
    for b in iter_batches(lm.tokenizer, prompts, batch_size, device=lm.device):
        acts: dict[int, Tensor] = {}

        def keep(t: Tensor, *, hook: HookInfo) -> None:
            """keep |activations| for this batch"""
            acts[hook.layer] = t.detach().abs().double().cpu()

        def keep_final(t: Tensor, *, hook: HookInfo) -> None:
            """keep final residual scale"""
            acts[-1] = fn.scale(t.detach().double().cpu())

        hooks = [(f"L{l}.mlp.post", keep) for l in range(L)] + [(f"L{L - 1}.resid_post", keep_final)]
        with lm.hooks(hooks):
            base_model(lm)(**b.model_inputs())
        real = b.attention_mask.bool().cpu()  # [batch, pos]
        n_real = real.sum(1)
        elig = n_real >= 3
        n_elig += int(elig.sum())
        for l in range(L):
            a = acts[l]  # [batch, pos, d_mlp]
            c = a * (r @ value_vectors(lm, l)).abs() / acts[-1] if r is not None else a
            c = c.masked_fill(~real[:, :, None], -1.0)
            arg0[l] += (c.argmax(1) == 0).double().sum(0)
            other = a[:, 1:].masked_fill(~real[:, 1:, None], float("nan"))
            mu, sd = other.nanmean(1), _nanstd(other)
            out = (a[:, 0] > mu + z * sd) & elig[:, None]
            outs[l] += out.double().sum(0)
    attn0 = _attn_argmax0(lm, prompts, batch_size) if attention else None
    return PositionStats(arg0 / len(prompts), outs / max(n_elig, 1), len(prompts), n_elig, by, z, start_kind, attn0)


def _attn_argmax0(lm, prompts: list[str], batch_size: int) -> Float[Tensor, "layer head d_head"]:
    """Fraction of prompts whose largest attention value-neuron piece comes from position 0."""
    L, H, dh = lm.n_layers, lm.n_heads, lm.d_head
    kv = torch.tensor([kv_head(lm, h) for h in range(H)])
    count = torch.zeros(L, H, dh, dtype=torch.float64)
    for pb in attn_pieces(lm, prompts, range(L), batch_size=batch_size):
        for l in range(L):
            v = pb.values[l].view(*pb.values[l].shape[:2], -1, dh)[:, :, kv]  # [batch, pos, head, d_head]
            piece = pb.probs[l].transpose(1, 2)[..., None] * v  # = PieceBatch.pieces, all units at once
            count[l] += (piece.abs().argmax(1) == 0).double().sum(0)
    return count / len(prompts)


def _nanstd(x: Tensor) -> Tensor:
    """Population std over axis 1 ignoring NaN."""
    mu = x.nanmean(1, keepdim=True)
    return (x - mu).pow(2).nanmean(1).sqrt()


def _frac_of(stats: PositionStats, label: str) -> float:
    if is_attn_neuron(label):
        if stats.attn_argmax0_frac is None:
            raise ValueError(f"{label} is an attention value neuron: compute the stats with position_stats(..., attention=True)")
        l, h, d = parse_attn_neuron(label)
        return float(stats.attn_argmax0_frac[l, h, d])
    l, k = parse_neuron_name(label)
    return float(stats.argmax0_frac[l, k])


ALIGNED_LIST_EXTRAS = ("kind",)  # list extras that line up with the labels (paper_candidates)


def _take(v, idx: Tensor, key: str, n: int):
    if isinstance(v, Tensor) and v.shape[:1] == (n,):
        return v[idx]
    if key in ALIGNED_LIST_EXTRAS and isinstance(v, list) and len(v) == n:
        return [v[int(i)] for i in idx]
    return v


def filter_general(result: LocateResult, stats: PositionStats, *, min_frac: float = 0.5) -> LocateResult:
    """``result`` without neurons whose argmax position is 0 (the start token) in >= ``min_frac`` of prompts."""
    keep, general = [], []
    for i, lab in enumerate(result.labels):
        (general if _frac_of(stats, lab) >= min_frac else keep).append(i)
    idx = torch.as_tensor(keep, dtype=torch.long)
    extras = {k: _take(v, idx, k, len(result.labels)) for k, v in result.extras.items()}
    general_sorted = [result.labels[i] for i in result.order() if i in set(general)]
    extras.update({"general_excluded": general_sorted, "n_removed": len(general), "n_before": len(result.labels),
                   "min_frac": min_frac, "start_token": stats.start_token, "by": stats.by})
    return LocateResult(
        result.method, [result.labels[i] for i in keep], result.scores[idx], variant=f"{result.variant},general-filtered",
        per_prompt=result.per_prompt[:, idx] if result.per_prompt is not None else None, extras=extras,
        ascending=result.ascending, model=result.model, n_samples=result.n_samples,
    )


def detect_general(stats: PositionStats, *, min_frac: float = 0.9, model: str = "") -> LocateResult:
    """Neurons outsized at position 0 in >= ``min_frac`` of eligible prompts, most frequent first."""
    L, D = stats.outsized_frac.shape
    flat = stats.outsized_frac.reshape(-1)
    sel = torch.nonzero(flat >= min_frac).flatten()
    labels = [f"L{int(i) // D}N{int(i) % D}" for i in sel]
    return LocateResult(
        "general-neurons", labels, flat[sel], variant=f"outsized>mean+{stats.z}sd,min_frac={min_frac}",
        model=model, n_samples=stats.n_prompts,
        extras={"n_eligible": stats.n_eligible, "start_token": stats.start_token,
                "argmax0_frac": [float(stats.argmax0_frac.reshape(-1)[i]) for i in sel]},
    )


def masking_effect(
    lm: LensModel, general: Sequence[str], bias: Sequence[str], *, n: int = 2,
    retention_fn: Callable[[LensModel], tuple[float, str]] | None = None,
) -> dict[str, float | str | list[str]]:
    """Retention with nothing masked, with the top-n general neurons masked, and with the top-n
    (general-filtered) bias neurons masked. ``retention_fn(lm) -> (value, name)``; default
    :func:`bias_lens.locate.causal.retention`."""
    from .causal import retention

    retention_fn = retention_fn or retention
    base, name = retention_fn(lm)
    out: dict[str, float | str | list[str]] = {"metric": name, "base": base, "n": n}
    for key, labels in (("general", list(general)[:n]), ("bias", list(bias)[:n])):
        with lm.hooks(mask_neurons(neurons_to_dict(labels))):
            out[key] = retention_fn(lm)[0]
        out[f"{key}_neurons"] = labels
    return out
