"""Local contrastive editing (Lutz et al. 2024, arXiv 2410.17739): localise the weights where two
reference subnetworks differ, then edit the target model there.

References (:mod:`bias_lens.edit.references`): a stereotypical and an anti-stereotypical fine-tune
of the target's base on a counterfactual corpus, each pruned by IMP to a
:class:`~bias_lens.edit.references.Subnetwork` (values, pruned entries 0, and keep masks).

**Localisation** (a :class:`~bias_lens.edit.masks.ParamMask` over the block weight matrices,
optionally restricted to a located mask ``within``):

* :func:`mask_diff` — entries kept by one subnetwork and pruned by the other (``keep_a XOR keep_b``);
* :func:`value_diff` — the ``k`` entries with the largest ``|w_a - w_b|`` among those both keep
  (``shared=True``, the default reading: values compared inside the common subnetwork;
  ``shared=False`` ranks every entry); the paper matches ``k`` to the mask-difference size;
* :func:`random_like` — the control: as many entries per matrix as a given mask, drawn uniformly
  from the same matrices (same size and layout, seeded).

**Editing** (:func:`contrastive_edit`, a reversible :class:`~bias_lens.edit.edits.Edit` of the
target's masked entries; ``θ`` = target value, ``r`` = reference value):

* ``interpolate`` (``0 <= α <= 1``) and ``extrapolate`` (``α > 1`` past the reference, ``α < 0``
  away from it — the paper's negative α: with the *stereotypical* reference it moves toward a
  neutral model): ``θ + α (r - θ)``; with ``source`` (a second subnetwork) the move is the
  paper's target -> reference update transferred to our target, ``θ + α (r - s)``: the paper edits
  its stereotypical model itself (``s = θ``), our target is the pre-trained base, whose values are
  not the stereotypical subnetwork's;
* ``prune`` — ``0``;
* ``mask_switch`` — the reference's pruning decision: ``0`` where the reference prunes, ``θ``
  where it keeps (restoring a weight the target pruned gives it back its dense value; our dense
  target has none pruned, so kept entries keep ``θ``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .edits import Edit
from .masks import ParamMask
from .references import Subnetwork, weight_names

if TYPE_CHECKING:
    from ..lens import LensModel

MODES = ("interpolate", "extrapolate", "prune", "mask_switch")
LOCALISATIONS = ("mask_diff", "value_diff")


def check_alpha(mode: str, alpha: float) -> None:
    """``mode`` is known and ``alpha`` lies in its range (one ValueError saying how to fix it otherwise)."""
    if mode not in MODES:
        raise ValueError(f"contrastive mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "interpolate" and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"interpolation needs 0 <= alpha <= 1 (got {alpha}); use mode extrapolate")
    if mode == "extrapolate" and 0.0 <= alpha <= 1.0:
        raise ValueError(f"extrapolation needs alpha > 1 or alpha < 0 (got {alpha}); use mode interpolate")


def _names(a: Subnetwork, b: Subnetwork, within: ParamMask | None) -> list[str]:
    if sorted(a.keep) != sorted(b.keep):
        raise ValueError(f"subnetworks {a.name} and {b.name} cover different matrices; train them from one base")
    names = list(a.keep)
    return [n for n in names if n in within.masks] if within is not None else names


def _restrict(m: Tensor, name: str, within: ParamMask | None) -> Tensor:
    return m & within.masks[name].to(m.device) if within is not None else m


def mask_diff(a: Subnetwork, b: Subnetwork, *, within: ParamMask | None = None) -> ParamMask:
    """Entries one subnetwork keeps and the other prunes (inside ``within`` when given)."""
    out = {n: _restrict(a.keep[n] ^ b.keep[n], n, within) for n in _names(a, b, within)}
    return ParamMask({n: m for n, m in out.items() if bool(m.any())})


def value_diff(a: Subnetwork, b: Subnetwork, k: int, *, shared: bool = True,
               within: ParamMask | None = None) -> ParamMask:
    """The ``k`` entries with the largest ``|w_a - w_b|`` (module docstring); ties by matrix order, then index."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    names = _names(a, b, within)
    scores = []
    for n in names:
        ok = _restrict(a.keep[n] & b.keep[n] if shared else torch.ones_like(a.keep[n]), n, within)
        d = (a.weights[n].float() - b.weights[n].float()).abs()
        scores.append(torch.where(ok, d, torch.tensor(-1.0)).reshape(-1))
    flat = torch.cat(scores)
    n_ok = int((flat >= 0).sum())
    if k > n_ok:
        raise ValueError(f"k = {k} exceeds the {n_ok} comparable entries; choose k <= {n_ok}")
    top = torch.sort(flat, descending=True, stable=True).indices[:k]
    sel = torch.zeros(flat.numel(), dtype=torch.bool)
    sel[top] = True
    out, pos = {}, 0
    for n in names:
        size = a.keep[n].numel()
        out[n] = sel[pos:pos + size].view(a.keep[n].shape).clone()
        pos += size
    return ParamMask({n: m for n, m in out.items() if bool(m.any())})


def random_like(mask: ParamMask, shapes: dict[str, tuple[int, ...]], seed: int = 0, *,
                exclude: ParamMask | None = None) -> ParamMask:
    """The control: per matrix of ``mask``, as many entries drawn uniformly (seeded) from that
    matrix (``shapes``), avoiding ``exclude``'s entries when given (e.g. the located ones)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, count in mask.counts().items():
        numel = int(torch.Size(shapes[n]).numel())
        pool = torch.arange(numel)
        if exclude is not None and n in exclude.masks:
            pool = pool[~exclude.masks[n].reshape(-1).cpu()]
        if count > pool.numel():
            raise ValueError(f"{n}: cannot draw {count} random entries from {pool.numel()}")
        pick = pool[torch.randperm(pool.numel(), generator=g)[:count]]
        m = torch.zeros(numel, dtype=torch.bool)
        m[pick] = True
        out[n] = m.view(shapes[n])
    return ParamMask(out)


def shuffled_update(lm: LensModel, edit: Edit, control: ParamMask, seed: int = 0) -> Edit:
    """The magnitude-matched control of ``edit``: per matrix, the located updates (new − old) in a
    seeded random order, added at ``control``'s entries (same counts per matrix, e.g. :func:`random_like`).
    It changes as much weight as the located edit, only elsewhere ("does *where* matter?")."""
    if control.counts() != {n: int(i.numel()) for n, i in edit.indices.items() if i.numel()}:
        raise ValueError("the control mask must have the edit's number of entries in each matrix (use random_like)")
    params = dict(lm.hf.named_parameters())
    g = torch.Generator().manual_seed(seed)
    delta = {}
    for n, idx in edit.indices.items():
        d = edit.values[n].double() - params[n].detach().reshape(-1)[idx.to(params[n].device)].cpu().double()
        delta[n] = d[torch.randperm(d.numel(), generator=g)]

    def new_values(name: str, old: Tensor) -> Tensor:
        return (old.double() + delta[name].to(old.device)).to(old.dtype)

    return Edit.from_fn(lm, control, new_values, method=f"{edit.method}_shuffled_control",
                        meta={**edit.meta, "control": "shuffled_update", "seed": seed})


def localise(a: Subnetwork, b: Subnetwork, how: str, *, k: int | None = None, shared: bool = True,
             within: ParamMask | None = None) -> ParamMask:
    """``mask_diff`` or ``value_diff`` of the pair (``k`` None: the mask-difference size, the paper's match)."""
    if how not in LOCALISATIONS:
        raise ValueError(f"localisation must be one of {', '.join(LOCALISATIONS)}, got {how!r}")
    if how == "mask_diff":
        return mask_diff(a, b, within=within)
    if k is None:
        k = mask_diff(a, b, within=within).size
        if k == 0:
            raise ValueError("the subnetworks' masks do not differ, so k cannot default to their difference; pass k")
    return value_diff(a, b, k, shared=shared, within=within)


def mask_fraction(mask: ParamMask, lm: LensModel, names: Sequence[str] | None = None) -> float:
    """``mask.size`` as a share of the block weight matrices' entries (the paper's "< 0.5%")."""
    params = dict(lm.hf.named_parameters())
    total = sum(params[n].numel() for n in (names if names is not None else weight_names(lm)))
    return mask.size / total


def matrix_labels(lm: LensModel) -> dict[str, tuple[int, str]]:
    """HF parameter name -> (block, module kind ``attn.q`` ... ``mlp.down``) for every block matrix
    (a fused matrix, GPT-2's qkv, gets its first kind)."""
    from ..arch import param_ref

    out: dict[str, tuple[int, str]] = {}
    for layer in range(lm.n_layers):
        for kind in lm.arch.modules:
            out.setdefault(param_ref(lm.hf, f"L{layer}.{kind}").weight_name, (layer, kind))
    return out


def difference_by_matrix(mask: ParamMask, lm: LensModel) -> dict[tuple[int, str], float]:
    """``(block, kind) -> share of the matrix's entries in mask`` (the mask-difference heatmap's data)."""
    params = dict(lm.hf.named_parameters())
    return {lab: (int(mask.masks[n].sum()) if n in mask.masks else 0) / params[n].numel()
            for n, lab in matrix_labels(lm).items()}


def contrastive_edit(lm: LensModel, reference: Subnetwork, mask: ParamMask, mode: str = "interpolate", *,
                     alpha: float = 1.0, source: Subnetwork | None = None) -> Edit:
    """Edit ``lm``'s masked entries using ``reference`` (module docstring); the model is not changed."""
    check_alpha(mode, alpha)
    unknown = [n for n in mask.names if n not in reference.weights]
    if unknown:
        raise ValueError(f"the reference has no {unknown[0]}; masks must lie in its block matrices")

    def new_values(name: str, old: Tensor) -> Tensor:
        idx = mask.indices(name)
        r = reference.weights[name].reshape(-1)[idx].to(old)
        if mode in ("interpolate", "extrapolate"):
            start = source.weights[name].reshape(-1)[idx].to(old) if source is not None else old
            return old + alpha * (r - start)
        if mode == "prune":
            return torch.zeros_like(old)
        keep = reference.keep[name].reshape(-1)[idx].to(old.device)
        return torch.where(keep, old, torch.zeros_like(old))

    meta = {"mode": mode, "alpha": alpha, "reference": reference.name,
            "source": source.name if source is not None else None,
            "formula": "theta + alpha * (r - s)" if source is not None else "theta + alpha * (r - theta)"}
    return Edit.from_fn(lm, mask, new_values, method=f"contrastive_{mode}", meta=meta)
