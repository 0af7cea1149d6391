"""The edit layer: masks from locate results, reversible in-place edits, masked fine-tuning,
neuron masking, contrastive editing, baselines, sparse patches and verified export.

Data flows one way: locate result -> :class:`ParamMask` -> :class:`Edit` (computed, no side
effects) -> ``edit.apply_(lm)`` -> :class:`EditHandle` (``undo()`` is bit-exact) ->
:func:`export_checkpoint` / :func:`save_patch`. Heavier modules (finetune, contrastive, export)
are imported from their submodules.
"""

from __future__ import annotations

from .edits import Edit, EditHandle
from .masks import ParamMask, mask_all, mask_from_labels, mask_from_result, without_attention, without_mlp

__all__ = [
    "Edit", "EditHandle", "ParamMask", "mask_all", "mask_from_labels", "mask_from_result",
    "without_attention", "without_mlp",
]
