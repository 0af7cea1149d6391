"""Local contrastive editing: localise and edit by comparing the model with a reference model.

A *reference* model has the same architecture and differs in the bias: :func:`make_reference`
fine-tunes a copy toward anti-stereotypical targets on the train split (renormalised target
shares ``((1 - s)/2, (1 + s)/2)`` for a profession with stereotype score ``s`` and no factual
gender, its factual ``(f_he, f_she)`` otherwise).

Localisation (a :class:`~bias_lens.edit.masks.ParamMask`):

* :func:`value_diff_mask` — the ``k`` entries with the largest ``|θ_ref - θ|``;
* :func:`mask_diff_mask` — magnitude-pruning masks at ``sparsity`` for both models (per tensor,
  keep the largest ``1 - sparsity`` fraction of ``|θ|``); entries kept in one and pruned in the
  other.

Editing (:func:`contrastive_edit`, an :class:`~bias_lens.edit.edits.Edit`): ``interpolate`` /
``extrapolate`` ``θ + α(θ_ref - θ)`` (interpolation needs 0 <= α <= 1), ``prune`` (set to 0),
``mask_switch`` (take the reference's pruning decision: entries pruned in the reference are set to
0, entries it keeps keep θ — the literal "switch the mask" reading for an unpruned target).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .edits import Edit
from .finetune import FinetuneConfig, masked_finetune
from .masks import ParamMask, mask_all

if TYPE_CHECKING:
    from ..lens import LensModel

MODES = ("interpolate", "extrapolate", "prune", "mask_switch")


def anti_stereotypical(samples: Sequence[dict]) -> list[dict]:
    """Samples with anti-stereotypical target shares (see the module docstring)."""
    out = []
    for s in samples:
        if float(s.get("f", 0.0)) == 0.0 and "s" in s:
            st = float(s["s"])
            out.append({**s, "f_he": (1 - st) / 2, "f_she": (1 + st) / 2})
        else:
            out.append(dict(s))
    return out


def weight_names(lm: LensModel) -> list[str]:
    """Block weight matrices (2-D parameters inside the layers): the default contrastive search space."""
    prefix = lm.arch.layers + "."
    return [n for n, p in lm.hf.named_parameters() if n.startswith(prefix) and p.ndim == 2]


def make_reference(lm: LensModel, train: Sequence[dict], config: FinetuneConfig | None = None, *, mask: ParamMask | None = None,
                   dev: Sequence[dict] | None = None) -> LensModel:
    """A fine-tuned copy of ``lm`` (a new LensModel; ``lm`` is unchanged) toward anti-stereotypical targets."""
    from ..lens import LensModel

    ref = LensModel(copy.deepcopy(lm.hf), lm.tokenizer, name=f"{lm.name}-reference")
    names = set(weight_names(lm))
    mask = mask if mask is not None else mask_all(ref.hf, include=lambda n: n in names)
    cfg = config or FinetuneConfig(lr=1e-5, epochs=1, retention_threshold=float("inf"))
    res = masked_finetune(ref, mask, anti_stereotypical(train), dev, cfg, retention=[], method="reference")
    if res.edit is None:
        raise RuntimeError(f"reference fine-tuning failed ({res.status} at step {res.nan_step})")
    res.edit.apply_(ref.hf)
    return ref


def _pairs(lm, ref, names: Sequence[str] | None):
    a, b = dict(lm.hf.named_parameters()), dict(ref.hf.named_parameters())
    names = list(names) if names is not None else weight_names(lm)
    for n in names:
        if n not in b or a[n].shape != b[n].shape or a[n].dtype != b[n].dtype:
            raise ValueError(f"reference model has no matching {n}; it must have the target's architecture")
        yield n, a[n].detach(), b[n].detach()


def value_diff_mask(lm: LensModel, ref: LensModel, k: int, *, names: Sequence[str] | None = None) -> ParamMask:
    """The ``k`` entries with the largest ``|θ_ref - θ|`` over ``names`` (default: block weight matrices)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cand = []  # per tensor top-k, then a global top-k over the candidates
    for n, a, b in _pairs(lm, ref, names):
        d = (b - a).abs().reshape(-1).float()
        v, i = torch.topk(d, min(k, d.numel()))
        cand.append((n, v, i, a.shape))
    allv = torch.cat([c[1] for c in cand])
    thr_idx = torch.topk(allv, min(k, allv.numel())).indices
    owner = torch.cat([torch.full((len(c[1]),), j) for j, c in enumerate(cand)])
    masks: dict[str, Tensor] = {}
    for j in owner[thr_idx].unique().tolist():
        n, v, i, shape = cand[j]
        sel = thr_idx[owner[thr_idx] == j] - sum(len(c[1]) for c in cand[:j])
        m = torch.zeros(shape, dtype=torch.bool)
        m.view(-1)[i[sel].cpu()] = True
        masks[n] = m
    return ParamMask(masks)


def keep_mask(t: Tensor, sparsity: float) -> Tensor:
    """Magnitude-pruning keep mask: the largest ``1 - sparsity`` fraction of ``|t|`` (ties by index)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    flat = t.detach().abs().reshape(-1)
    n_keep = flat.numel() - int(round(sparsity * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat.float(), n_keep).indices.cpu()] = True
    return keep.view(t.shape)


def mask_diff_mask(lm: LensModel, ref: LensModel, sparsity: float, *, names: Sequence[str] | None = None) -> ParamMask:
    """Entries kept by magnitude pruning in one model and pruned in the other."""
    masks = {n: keep_mask(a, sparsity) ^ keep_mask(b, sparsity) for n, a, b in _pairs(lm, ref, names)}
    return ParamMask({n: m for n, m in masks.items() if bool(m.any())})


def contrastive_edit(lm: LensModel, ref: LensModel, mask: ParamMask, mode: str = "interpolate", *, alpha: float = 1.0,
                     sparsity: float | None = None) -> Edit:
    """Edit ``lm``'s masked entries using ``ref`` (see the module docstring for the modes)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "interpolate" and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"interpolation needs 0 <= alpha <= 1 (got {alpha}); use mode='extrapolate'")
    if mode == "mask_switch" and sparsity is None:
        raise ValueError("mask_switch needs the sparsity the pruning masks were computed at")
    refp = dict(ref.hf.named_parameters())
    mask.check(ref.hf)

    def new_values(name: str, old: Tensor) -> Tensor:
        r = refp[name].detach().reshape(-1)[mask.indices(name).to(refp[name].device)].to(old)
        if mode in ("interpolate", "extrapolate"):
            return old + alpha * (r - old)
        if mode == "prune":
            return torch.zeros_like(old)
        keep_ref = keep_mask(refp[name], sparsity).reshape(-1)[mask.indices(name)]
        return torch.where(keep_ref.to(old.device), old, torch.zeros_like(old))

    return Edit.from_fn(lm, mask, new_values, method=f"contrastive_{mode}",
                        meta={"mode": mode, "alpha": alpha, "sparsity": sparsity, "reference": ref.name})
