"""Vocabulary projection of neurons (the interpretable-neuron-editing paper's Table 2).

A neuron's output direction ``u`` is read through the unembedding as the reference notebook's
``get_bsvalues`` does (``zepingyu0512/neuron-attribution``: ``lm_head(u * rsqrt(final_var + eps)
* norm.weight)``)::

    logits(u) = W_U (g * C u)

with g the final norm's weight (C centres for LayerNorm, identity for RMSNorm). The reference's
positive scale ``rsqrt(final_var + eps)`` does not change the order and is left out, and so is an
unembedding bias (it belongs to no direction). Directions:

* FFN neuron ``L{l}N{n}`` (value or query neuron): column n of the down projection;
* attention value neuron ``L{l}H{h}V{d}``: column ``h * d_head + d`` of W_O
  (see :mod:`bias_lens.locate.value_neurons`).

``top`` lists the k highest-logit tokens (highest first), ``bottom`` the k lowest (lowest first,
as the reference's ``sort[-10:][::-1]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..arch import parse_neuron_name
from .attribution import head_out_weight, norm_parts, value_vectors
from .value_neurons import check_attn_labels, is_attn_neuron

if TYPE_CHECKING:
    from ..lens import LensModel


def output_direction(lm: LensModel, label: str) -> Float[Tensor, " d_model"]:
    """The residual-stream direction a neuron writes (float64)."""
    if is_attn_neuron(label):
        ((l, h, d),) = check_attn_labels(lm, [label])
        return head_out_weight(lm, l)[:, h * lm.d_head + d]
    try:
        l, n = parse_neuron_name(label)
    except ValueError:
        raise ValueError(f"{label!r}: use an FFN neuron L{{l}}N{{n}} or an attention value neuron L{{l}}H{{h}}V{{d}}") from None
    if not (0 <= l < lm.n_layers and 0 <= n < lm.d_mlp):
        raise ValueError(f"{label}: out of range (layers < {lm.n_layers}, neurons < {lm.d_mlp})")
    return value_vectors(lm, l)[:, n]


@torch.no_grad()
def projection_logits(lm: LensModel, labels: Sequence[str]) -> Float[Tensor, "neuron d_vocab"]:
    """Logits of each labelled neuron's output direction through the final norm's gain/centring and the unembedding
    (float64)."""
    fn = norm_parts(lm.final_norm, lm.arch.norm)
    U = torch.stack([fn.center(output_direction(lm, lab)) for lab in labels]) * fn.weight  # g * C u
    return U @ lm.unembed.weight.detach().double().T


def neuron_vocab_projection(lm: LensModel, labels: Sequence[str], k: int = 10) -> dict[str, dict[str, list[str]]]:
    """``{label: {"top": [k tokens], "bottom": [k tokens]}}`` of each neuron's unembedding projection."""
    labels = list(labels)
    if not labels:
        raise ValueError("neuron_vocab_projection needs at least one neuron label")
    if not 1 <= k <= lm.d_vocab:
        raise ValueError(f"k must be in 1..{lm.d_vocab}, got {k}")
    z = projection_logits(lm, labels)
    top = z.topk(k, -1).indices
    bottom = (-z).topk(k, -1).indices
    dec = lambda ids: [lm.tokenizer.decode([int(i)]) for i in ids]  # noqa: E731
    return {lab: {"top": dec(top[i]), "bottom": dec(bottom[i])} for i, lab in enumerate(labels)}
