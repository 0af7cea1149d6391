"""Query neurons: lower-layer FFN neurons that drive the inputs of the top value (bias) neurons.

For a value neuron k of layer l with input row ``w_k`` (row k of ``gate_proj`` for a gated MLP by
default, ``up_proj``/GPT-2 ``c_fc`` with ``input_dir="up"``) and a lower-layer neuron j (layer
l' < l) with output ``m_j v_j`` at the last position, the contribution of j to k's pre-activation
under the linearisation of ``ln2`` at the actual residual (its scale ``s2`` taken from
``resid_mid`` of layer l, i.e. frozen) is::

    c_jk = m_j * (C(g2 * w_k) . v_j) / s2_l

(C centres for LayerNorm, identity for RMSNorm; the ln2 bias and the MLP input bias do not depend
on j). The query score of j is ``mean_prompts sum_{k in top, layer(k) > l'} c_jk``, ranked by its
magnitude (``extras["signed"]`` keeps the sign). This is the same edge weight
:mod:`bias_lens.locate.circuit` uses for neuron -> neuron edges.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..arch import get_submodule, param_ref, parse_neuron_name
from .attribution import LastCache, norm_parts, value_vectors
from .result import LocateResult


def input_rows(lm, layer: int, input_dir: str | None = None) -> Float[Tensor, "d_mlp d_model"]:
    """The neurons' input rows (HF ``[out, in]``): gate for gated MLPs by default, else up."""
    input_dir = input_dir or ("gate" if lm.arch.gated_mlp else "up")
    if input_dir not in ("gate", "up"):
        raise ValueError(f"input_dir must be 'gate' or 'up', got {input_dir!r}")
    if input_dir == "gate" and not lm.arch.gated_mlp:
        raise ValueError(f"the {lm.arch.family} MLP has no gate; use input_dir='up'")
    return param_ref(lm.hf, f"L{layer}.mlp.{input_dir}").weight_view(lm.hf).detach().double()


def ln2(lm, layer: int):
    return norm_parts(get_submodule(lm.block(layer), lm.arch.ln2))


def read_dirs(lm, cache: LastCache, layer: int, idx: Sequence[int], input_dir: str | None = None) -> Tensor:
    """Per-prompt residual read directions ``C(g2 * w_k) / s2`` of neurons ``idx``: [prompt, k, d_model]."""
    fn = ln2(lm, layer)
    W = fn.read_dir(input_rows(lm, layer, input_dir)[list(idx)])
    s = fn.scale(cache.resid_mid[layer])  # [prompt, 1]
    return W[None] / s[:, :, None]


def query_neurons(
    lm, cache: LastCache, value_labels: Sequence[str], *, input_dir: str | None = None,
) -> LocateResult:
    """Rank every neuron below the deepest value neuron by its drive of the value neurons' inputs."""
    if not value_labels:
        raise ValueError("query_neurons needs at least one value neuron label (e.g. the top of neuron_attribution)")
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
        "query-neurons", labels, signed.abs(), variant=f"input={input_dir or ('gate' if lm.arch.gated_mlp else 'up')},ln2=frozen-scale",
        model=lm.name, n_samples=cache.n_prompts, extras={"signed": signed.float(), "value_neurons": list(value_labels)},
    )
