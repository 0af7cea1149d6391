"""Neuron masking (interpretable-neuron-editing paper): zero or scale selected FFN and attention value neurons.

Two forms with the same effect on the forward pass:

* :func:`neuron_mask_edit` — a permanent, reversible :class:`~bias_lens.edit.edits.Edit` that
  multiplies the output-projection column each neuron writes through by ``scale``:

  - FFN neuron ``L{l}N{k}``: column k of layer l's down projection (HF ``[out, in]``; GPT-2
    Conv1D handled by the arch table). Neuron k's output is ``a_k * W_down[:, k]``, so this equals
    scaling the activation ``a_k`` exactly (up to float rounding). ``include_inputs=True`` also
    scales row k of gate/up (and the up bias); with ``scale=0`` that is the same function for
    SiLU-gated MLPs, but not for GELU MLPs with an input bias, so it is off by default.
  - attention value neuron ``L{l}H{h}V{d}``: column ``h * d_head + d`` of layer l's o_proj, the
    column query head h's value dimension d is written through. That is scaling channel
    ``h * d_head + d`` of ``L{l}.attn.z`` (the o_proj input) exactly, i.e. *only query head h's*
    contribution: under grouped-query attention the KV head ``kv(h)`` it reads is left intact for
    the other query heads sharing it (the label's reading; see :mod:`bias_lens.locate.causal`,
    whose :func:`~bias_lens.locate.causal.unit_channel` this uses). An o_proj bias is not touched.

* :func:`neuron_mask_hooks` — the temporary what-if version: :func:`bias_lens.hooks.mask_neurons`
  on ``L{l}.mlp.post`` and :func:`bias_lens.locate.causal.mask_units` on ``L{l}.attn.z``.

``scale = 0`` is the paper's masking; ``0 < scale < 1`` damps the neurons instead.
:func:`neuron_editing` runs the paper's whole pipeline (150 candidates -> ``<start>`` filter ->
causal 50, :func:`bias_lens.locate.neuron_pipeline.paper_selection`) and returns the masking edit
with every stage (:class:`NeuronEditing`). Apply the general-neuron filter of
:mod:`bias_lens.locate.general_neurons` to a locate result first (:func:`select_neurons` does when
given position statistics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..arch import param_ref
from ..labels import is_neuron, is_value_neuron
from .edits import Edit
from .masks import ParamMask, mask_from_labels, neurons_to_dict

if TYPE_CHECKING:
    from ..lens import LensModel
    from ..locate.general_neurons import PositionStats
    from ..locate.neuron_pipeline import NeuronSelection
    from ..locate.result import LocateResult
    from ..targets import TargetSet

Neurons = Mapping[int, Sequence[int]] | Sequence[str]


def _neurons(neurons: Neurons) -> dict[int, list[int]]:
    if isinstance(neurons, Mapping):
        return {int(l): [int(k) for k in ks] for l, ks in neurons.items()}
    return neurons_to_dict(list(neurons))


def _split(neurons: Neurons) -> tuple[dict[int, list[int]], list[str]]:
    """FFN neurons as ``{layer: [k, ...]}`` and the attention value neuron labels."""
    if isinstance(neurons, Mapping):
        return _neurons(neurons), []
    labels = list(neurons)
    return _neurons([lab for lab in labels if not is_value_neuron(lab)]), [lab for lab in labels if is_value_neuron(lab)]


def _columns(m: torch.nn.Module, kind: str, cols: Mapping[int, Sequence[int]], what: str) -> ParamMask:
    """Mask of columns ``cols[layer]`` of ``L{layer}.{kind}``'s ``[out, in]`` weight."""
    masks: dict[str, torch.Tensor] = {}
    for layer, ks in cols.items():
        ref = param_ref(m, f"L{layer}.{kind}")
        t = masks.setdefault(ref.weight_name, torch.zeros(m.get_parameter(ref.weight_name).shape, dtype=torch.bool))
        view = t.T if ref.transposed else t
        if max(ks) >= view.shape[1] or min(ks) < 0:
            raise ValueError(f"{what} index out of range 0..{view.shape[1] - 1} in layer {layer}")
        view[:, list(ks)] = True
    return ParamMask(masks)


def down_column_mask(model: torch.nn.Module | LensModel, neurons: Neurons) -> ParamMask:
    """Mask of the down-projection columns of the FFN neurons (what the permanent edit writes)."""
    return _columns(model.hf if hasattr(model, "hf") else model, "mlp.down", _neurons(neurons), "neuron")


def o_column_mask(lm: LensModel, labels: Sequence[str]) -> ParamMask:
    """Mask of the o_proj columns ``h * d_head + d`` of attention value neurons ``L{l}H{h}V{d}``."""
    from ..locate.causal import parse_units, unit_channel

    if not hasattr(lm, "hf"):
        raise ValueError("attention value neurons need the LensModel (n_heads, d_head), not the bare HF model; "
                         "pass load_model(...)'s result")
    cols: dict[int, list[int]] = {}
    for u in parse_units(lm, labels):
        cols.setdefault(u[0], []).append(unit_channel(lm, u)[1])
    return _columns(lm.hf, "attn.o", cols, "value neuron")


def neuron_column_mask(model: torch.nn.Module | LensModel, neurons: Neurons) -> ParamMask:
    """Mask of the output-projection columns the neurons write through: down-projection columns of FFN
    neurons, o_proj columns of attention value neurons (these need the LensModel)."""
    nd, values = _split(neurons)
    if not any(nd.values()) and not values:
        raise ValueError("no neurons given")
    masks = ([down_column_mask(model, nd)] if any(nd.values()) else []) + ([o_column_mask(model, values)] if values else [])
    mask = masks[0]
    for extra in masks[1:]:
        mask = mask | extra
    return mask


def neuron_mask_edit(model: torch.nn.Module | LensModel, neurons: Neurons, *, scale: float = 0.0,
                     include_inputs: bool = False) -> Edit:
    """Permanent masking edit of the neurons (``{layer: [k, ...]}``, or labels ``L{l}N{k}`` and/or
    ``L{l}H{h}V{d}``; value neurons need the LensModel). ``include_inputs`` applies to FFN neurons."""
    nd, values = _split(neurons)
    mask = neuron_column_mask(model, neurons)
    if include_inputs and any(nd.values()):
        mask = mask | mask_from_labels(model, [f"L{l}N{k}" for l, ks in nd.items() for k in ks])
    meta: dict[str, Any] = {"neurons": {str(l): ks for l, ks in nd.items()}, "scale": scale, "include_inputs": include_inputs}
    if values:
        meta["value_neurons"] = values
    return Edit.scale(model, mask, scale, method="neuron_mask", meta=meta)


def neuron_mask_hooks(neurons: Neurons, *, scale: float = 0.0, lm: LensModel | None = None) -> list:
    """Temporary version: hooks scaling the neurons' activations (use with ``lm.hooks(...)``);
    attention value neuron labels need ``lm``."""
    from ..hooks import mask_neurons

    nd, values = _split(neurons)
    hooks = mask_neurons(nd, scale=scale)
    if values:
        if lm is None:
            raise ValueError("attention value neurons (L{l}H{h}V{d}) need lm= to map them to L{l}.attn.z channels")
        from ..locate.causal import mask_units, parse_units

        hooks += mask_units(lm, parse_units(lm, values), scale=scale)
    return hooks


def select_neurons(result: LocateResult, k: int, *, stats: PositionStats | None = None, min_frac: float = 0.5) -> list[str]:
    """Top-``k`` neuron labels of a locate result, after removing general neurons when ``stats`` is given."""
    if stats is not None:
        from ..locate.general_neurons import filter_general

        result = filter_general(result, stats, min_frac=min_frac)
    labels = [lab for lab in (result.labels[i] for i in result.order()) if is_neuron(lab)]
    if not labels:
        raise ValueError(f"locate result {result.method!r} has no neuron labels (L{{l}}N{{k}})")
    return labels[:k]


@dataclass(frozen=True)
class NeuronEditing:
    """The paper's pipeline as an edit: every selection stage and the masking edit of the selected neurons."""

    selection: NeuronSelection
    edit: Edit
    scale: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the selection's stages and counts, the scale and the edit's size per tensor."""
        return {**self.selection.to_dict(), "scale": self.scale, "edit_size": self.edit.size,
                "edit_counts": self.edit.counts()}


def neuron_editing(
    lm: LensModel, locate_prompts: Sequence[str], dev_prompts: Sequence[str], targets: TargetSet | str = "he,she", *,
    scale: float = 0.0, selection: NeuronSelection | None = None, **select: Any,
) -> NeuronEditing:
    """Candidates (locate prompts) -> ``<start>`` filter -> causal selection (dev prompts) -> masking edit.

    ``scale`` in [0, 1): 0 masks (the paper), between 0 and 1 damps. ``selection``: a
    :func:`~bias_lens.locate.neuron_pipeline.paper_selection` result to reuse (e.g. for a second
    scale); else ``select`` are its keywords. The edit is computed, not applied.
    """
    if not 0 <= scale < 1:
        raise ValueError(f"scale must be in [0, 1) (0 = masking, in between = damping), got {scale}")
    if selection is None:
        from ..locate.neuron_pipeline import paper_selection

        selection = paper_selection(lm, locate_prompts, dev_prompts, targets, **select)
    if not selection.selected:
        raise ValueError(f"causal selection kept none of the {len(selection.filtered)} candidates (no mask lowered "
                         "AFGB within the retention limit); raise max_ppl_increase or use more dev prompts")
    return NeuronEditing(selection, neuron_mask_edit(lm, selection.selected, scale=scale), scale)
