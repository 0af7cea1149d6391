"""FFN query neurons as the authors' code finds them, plus the paper's 150-neuron candidate set.

Reference: ``zepingyu0512/neuron-attribution`` (Llama notebook, "find query FFN neurons activating
attn neurons"). For an attention value neuron u = ``L{l}H{h}V{d}`` (see
:mod:`bias_lens.locate.value_neurons`) its "key" is the value row it reads, times the ln1 weight::

    k_u = g1_l * W_V[kv(h) d_head + d]          (LayerNorm: also centred)

and for every source position ``q`` the layer input's inner product with it is split over the FFN
neurons j of the layers below (l' < l) at that position, each share weighted by the piece's
log-prob increase ``inc_u,q`` (:func:`~bias_lens.locate.value_neurons.piece_increase`)::

    score_j = sum_u sum_q  inc_u,q * m_j[q] (v_j . k_u) / (x_l[q] . k_u)

(m_j the neuron's activation, v_j its down-projection column, x_l the raw layer input; the ln1
scale cancels in the ratio, a v_proj bias is ignored as in the reference). The reference runs one
prompt and its top-30 ``(l, h, d, pos)`` pieces; here u runs over the given (data-set level)
attention value neurons and q over every real position, and ``score_j`` is averaged over prompts.

``rank``: ``"target"`` (default, the reference): ``inc`` is the signed increase of one token, chosen
by ``target`` — ``"predicted"`` (per prompt the pair member the model ranks higher, the
reference's ``predict_index`` restricted to the pair) or a target word; neurons are ranked by the
signed score (most target-ward first). ``"diff"`` (the project's earlier |she - he| reading):
``inc = inc(t1) - inc(t0)`` and neurons are ranked by the magnitude.

:func:`gate_query_neurons` keeps the earlier gate-row reading as a named variant: for FFN value
neuron k of layer l with gate (or up) row ``w_k``, ``c_jk = m_j (C(g2 * w_k) . v_j) / s2_l`` at the
last position (the edge weight :mod:`bias_lens.locate.circuit` uses for neuron -> neuron edges).
It agrees with the reference on only a few of the top 50 and is not the paper's method.

:func:`paper_candidates`: the paper's 150 candidates = top-50 FFN value neurons
(:func:`~bias_lens.locate.attribution.neuron_attribution`), top-50 attention value neurons
(:func:`~bias_lens.locate.value_neurons.attn_value_attribution`) and the top-50 FFN query neurons
of those attention neurons.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..arch import get_submodule, param_ref, parse_neuron_name
from ..targets import TargetSet
from .attribution import LastCache, NormParts, check_pair, collect_last, neuron_attribution, norm_parts, value_vectors
from .value_neurons import attn_pieces, attn_value_attribution, check_attn_labels, piece_increase, value_row
from .result import LocateResult

if TYPE_CHECKING:
    from ..lens import LensModel


def input_rows(lm: LensModel, layer: int, input_dir: str | None = None) -> Float[Tensor, "d_mlp d_model"]:
    """The neurons' input rows (HF ``[out, in]``): gate for gated MLPs by default, else up."""
    input_dir = input_dir or ("gate" if lm.arch.gated_mlp else "up")
    if input_dir not in ("gate", "up"):
        raise ValueError(f"input_dir must be 'gate' or 'up', got {input_dir!r}")
    if input_dir == "gate" and not lm.arch.gated_mlp:
        raise ValueError(f"the {lm.arch.family} MLP has no gate; use input_dir='up'")
    return param_ref(lm.hf, f"L{layer}.mlp.{input_dir}").weight_view(lm.hf).detach().double()


def ln2(lm: LensModel, layer: int) -> NormParts:
    """The pre-MLP norm of layer ``layer`` as :class:`NormParts` (to map neuron input rows to residual read
    directions)."""
    return norm_parts(get_submodule(lm.block(layer), lm.arch.ln2), lm.arch.norm)


def read_dirs(lm: LensModel, cache: LastCache, layer: int, idx: Sequence[int], input_dir: str | None = None) -> Tensor:
    """Per-prompt residual read directions ``C(g2 * w_k) / s2`` of neurons ``idx``: [prompt, k, d_model]."""
    fn = ln2(lm, layer)
    W = fn.read_dir(input_rows(lm, layer, input_dir)[list(idx)])
    s = fn.scale(cache.resid_mid[layer])  # [prompt, 1]
    return W[None] / s[:, :, None]


QUERY_RANKS = ("target", "diff")


def _weights(lm, inc: Tensor, ts: TargetSet, pb, rank: str, target: str) -> Tensor:
    """Per-piece weights [batch, unit, pos] from increases [batch, unit, pos, 2]."""
    if rank == "diff":
        return inc[..., 1] - inc[..., 0]
    if target == "predicted":
        fn = norm_parts(lm.final_norm, lm.arch.norm)
        ids = list(ts.first_ids)
        z = fn.apply(pb.final) @ lm.unembed.weight.detach().double()[ids].T  # [batch, 2] pair logits
        b_U = getattr(lm.unembed, "bias", None)
        pick = (z + b_U.detach().double()[ids] if b_U is not None else z).argmax(-1)
        return inc.gather(-1, pick[:, None, None, None].expand(*inc.shape[:-1], 1))[..., 0]
    return inc[..., list(ts.words).index(target)]


@torch.no_grad()
def query_neurons(
    lm: LensModel, prompts: Sequence[str], attn_value_labels: Sequence[str], targets: TargetSet | str = "he,she", *,
    rank: str = "target", target: str = "predicted", batch_size: int = 16,
) -> LocateResult:
    """FFN query neurons of the given attention value neurons (labels ``L{l}N{n}``), as the reference."""
    if rank not in QUERY_RANKS:
        raise ValueError(f"rank must be one of {QUERY_RANKS}, got {rank!r}")
    ts = check_pair(lm, targets)
    if rank == "target" and target != "predicted" and target not in ts.words:
        raise ValueError(f"target must be 'predicted' or one of {list(ts.words)}, got {target!r}")
    if not attn_value_labels:
        raise ValueError("query_neurons needs attention value neuron labels (e.g. the top of attn_value_attribution)")
    units = check_attn_labels(lm, attn_value_labels)
    top = max(u[0] for u in units)
    if top == 0:
        raise ValueError("all attention value neurons are in layer 0; there are no lower-layer FFN neurons to rank")
    keys = torch.stack([value_row(lm, *u) for u in units])  # [unit, d_model]
    # (v_j . k_u) for every lower layer, masked to layers below the unit's own: [layer, unit, d_mlp]
    vk = torch.stack([(keys @ value_vectors(lm, lj)) * torch.tensor([float(lj < u[0]) for u in units])[:, None]
                      for lj in range(top)])
    total = torch.zeros(top, lm.d_mlp, dtype=torch.float64)
    n = 0
    for pb in attn_pieces(lm, prompts, sorted({u[0] for u in units}), mlp_layers=range(top), batch_size=batch_size):
        w = _weights(lm, piece_increase(lm, pb, units, ts.first_ids), ts, pb, rank, target)  # [b, u, pos]
        inner = torch.stack([pb.resid_pre[u[0]] @ keys[i] for i, u in enumerate(units)], 1)  # [b, u, pos]
        ratio = torch.where(inner.abs() > 1e-12, w / inner, torch.zeros_like(w))
        for lj in range(top):
            total[lj] += torch.einsum("bqj,buq,uj->j", pb.mlp_post[lj], ratio, vk[lj])
        n += ratio.shape[0]
    signed = (total / n).reshape(-1)
    labels = [f"L{lj}N{j}" for lj in range(top) for j in range(lm.d_mlp)]
    tag = f"target={target}" if rank == "target" else f"diff={ts.words[1]}-{ts.words[0]}"
    return LocateResult(
        "query-neurons", labels, signed if rank == "target" else signed.abs(),
        variant=f"reference,attn-value-rows,rank={rank},{tag}", model=lm.name, n_samples=n,
        extras={"signed": signed.float(), "attn_value_neurons": list(attn_value_labels), "targets": list(ts.words)},
    )


def paper_candidates(
    lm: LensModel, prompts: Sequence[str], targets: TargetSet | str = "he,she", *, k: int = 50, query_rank: str = "target",
    target: str = "predicted", batch_size: int = 16, cache: LastCache | None = None,
) -> LocateResult:
    """The paper's candidate set: top-k FFN value + top-k attention value + top-k FFN query neurons.

    ``scores`` are each method's own score (not comparable across kinds); ``extras["kind"]`` says
    which of ``ffn-value``, ``attn-value``, ``ffn-query`` each label came from (a label found both as
    FFN value and FFN query neuron appears once per kind), in that order.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ts = check_pair(lm, targets)
    cache = cache if cache is not None else collect_last(lm, prompts, batch_size=batch_size)
    ffn = neuron_attribution(lm, prompts, ts, cache=cache).top(k)
    attn = attn_value_attribution(lm, prompts, ts, cache=cache).top(k)
    qres = query_neurons(lm, prompts, [lab for lab, _ in attn], ts, rank=query_rank, target=target, batch_size=batch_size)
    parts = (("ffn-value", ffn), ("attn-value", attn), ("ffn-query", qres.top(k)))
    return LocateResult(
        "paper-candidates", [lab for _, top in parts for lab, _ in top],
        torch.tensor([sc for _, top in parts for _, sc in top], dtype=torch.float64),
        variant=f"k={k},ffn-value+attn-value+ffn-query({qres.variant})", model=lm.name, n_samples=cache.n_prompts,
        extras={"kind": [kind for kind, top in parts for _ in top], "targets": list(ts.words)},
    )


def gate_query_neurons(
    lm: LensModel, cache: LastCache, value_labels: Sequence[str], *, input_dir: str | None = None,
) -> LocateResult:
    """Named variant (the project's earlier reading): rank every FFN neuron below the deepest FFN value
    neuron by its drive of those neurons' gate/up rows at the last position (see the variant note above)."""
    if not value_labels:
        raise ValueError("gate_query_neurons needs at least one value neuron label (e.g. the top of neuron_attribution)")
    by_layer: dict[int, list[int]] = defaultdict(list)
    for lab in value_labels:
        l, k = parse_neuron_name(lab)
        if not 0 <= l < lm.n_layers or not 0 <= k < lm.d_mlp:
            raise ValueError(f"{lab}: out of range (layers 0..{lm.n_layers - 1}, neurons 0..{lm.d_mlp - 1})")
        by_layer[l].append(k)
    top = max(by_layer)
    # summed read direction over value neurons of each layer: [prompt, d_model]
    reads = {l: read_dirs(lm, cache, l, ks, input_dir).sum(1) for l, ks in by_layer.items()}
    labels, per = [], []
    for lj in range(top):
        drive = sum((reads[l] for l in reads if l > lj), torch.zeros_like(cache.final))
        per.append(cache.mlp_post[lj] * (drive @ value_vectors(lm, lj)))  # [prompt, d_mlp]
        labels += [f"L{lj}N{j}" for j in range(lm.d_mlp)]
    if not per:
        raise ValueError("all value neurons are in layer 0; there are no lower-layer neurons to rank")
    per_t = torch.cat(per, 1)
    signed = per_t.mean(0)
    return LocateResult(
        "query-neurons", labels, signed.abs(), variant=f"gate-rows,input={input_dir or ('gate' if lm.arch.gated_mlp else 'up')},ln2=frozen-scale",
        model=lm.name, n_samples=cache.n_prompts, extras={"signed": signed.float(), "value_neurons": list(value_labels)},
    )
