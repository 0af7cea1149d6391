"""Neuron masking (interpretable-neuron-editing paper): zero or scale selected FFN neurons.

Two forms with the same effect on the forward pass:

* :func:`neuron_mask_edit` — a permanent, reversible :class:`~bias_lens.edit.edits.Edit` that
  multiplies column k of layer l's down projection (HF ``[out, in]``; GPT-2 Conv1D handled by the
  arch table) by ``scale``. Neuron k's output is ``a_k * W_down[:, k]``, so this equals scaling
  the activation ``a_k`` exactly (up to float rounding). ``include_inputs=True`` also scales
  row k of gate/up (and the up bias); with ``scale=0`` that is the same function for SiLU-gated
  MLPs, but not for GELU MLPs with an input bias, so it is off by default.
* :func:`neuron_mask_hooks` — the temporary what-if version, :func:`bias_lens.hooks.mask_neurons`
  on ``L{l}.mlp.post``.

Apply the general-neuron filter of :mod:`bias_lens.locate.general_neurons` to the locate result
first (:func:`select_neurons` does when given position statistics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from ..arch import param_ref
from ..labels import is_neuron
from .edits import Edit
from .masks import ParamMask, mask_from_labels, neurons_to_dict

if TYPE_CHECKING:
    from ..lens import LensModel
    from ..locate.general_neurons import PositionStats
    from ..locate.result import LocateResult


def _neurons(neurons: Mapping[int, Sequence[int]] | Sequence[str]) -> dict[int, list[int]]:
    if isinstance(neurons, Mapping):
        return {int(l): [int(k) for k in ks] for l, ks in neurons.items()}
    return neurons_to_dict(list(neurons))


def down_column_mask(model: torch.nn.Module | LensModel, neurons: Mapping[int, Sequence[int]] | Sequence[str]) -> ParamMask:
    """Mask of the down-projection columns of the neurons (what the permanent edit writes)."""
    m = model.hf if hasattr(model, "hf") else model
    masks: dict[str, torch.Tensor] = {}
    for layer, ks in _neurons(neurons).items():
        ref = param_ref(m, f"L{layer}.mlp.down")
        t = masks.setdefault(ref.weight_name, torch.zeros(m.get_parameter(ref.weight_name).shape, dtype=torch.bool))
        view = t.T if ref.transposed else t
        if max(ks) >= view.shape[1] or min(ks) < 0:
            raise ValueError(f"neuron index out of range 0..{view.shape[1] - 1} in layer {layer}")
        view[:, ks] = True
    return ParamMask(masks)


def neuron_mask_edit(
    model: torch.nn.Module | LensModel, neurons: Mapping[int, Sequence[int]] | Sequence[str], *, scale: float = 0.0, include_inputs: bool = False
) -> Edit:
    """Permanent masking edit of the neurons (``{layer: [k, ...]}`` or labels ``L{l}N{k}``)."""
    nd = _neurons(neurons)
    if not any(nd.values()):
        raise ValueError("no neurons given")
    mask = down_column_mask(model, nd)
    if include_inputs:
        mask = mask | mask_from_labels(model, [f"L{l}N{k}" for l, ks in nd.items() for k in ks])
    return Edit.scale(model, mask, scale, method="neuron_mask",
                      meta={"neurons": {str(l): ks for l, ks in nd.items()}, "scale": scale, "include_inputs": include_inputs})


def neuron_mask_hooks(neurons: Mapping[int, Sequence[int]] | Sequence[str], *, scale: float = 0.0) -> list:
    """Temporary version: hooks scaling the neurons' activations (use with ``lm.hooks(...)``)."""
    from ..hooks import mask_neurons

    return mask_neurons(_neurons(neurons), scale=scale)


def select_neurons(result: LocateResult, k: int, *, stats: PositionStats | None = None, min_frac: float = 0.5) -> list[str]:
    """Top-``k`` neuron labels of a locate result, after removing general neurons when ``stats`` is given."""
    if stats is not None:
        from ..locate.general_neurons import filter_general

        result = filter_general(result, stats, min_frac=min_frac)
    labels = [lab for lab in (result.labels[i] for i in result.order()) if is_neuron(lab)]
    if not labels:
        raise ValueError(f"locate result {result.method!r} has no neuron labels (L{{l}}N{{k}})")
    return labels[:k]
