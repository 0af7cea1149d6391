"""Explicit, reversible weight edits (GUIDE example 5).

An :class:`Edit` is data: for each HF parameter, the flat indices (stored layout, row-major) of
the entries it writes and their new values, plus the shape, dtype and layout it was computed
for. Values are held in that dtype (a wider value, e.g. a float32 master copy of a bfloat16
weight, is rounded once when the edit is built), so what is applied, counted and saved is exactly
what the model stores; undo restores the original bits in any dtype. Computing one never touches
the model. :meth:`Edit.apply_` validates everything first (so a refused edit changes nothing), then writes the entries in place and returns an
:class:`EditHandle` holding only the original values of those entries; :meth:`EditHandle.undo`
writes them back bit-exactly. Edits compose with :meth:`Edit.then` (later edit wins on overlap).

Undo order is enforced: every applied edit is logged per parameter (in apply order) until it is
undone. A handle may be undone only when no edit applied after it and still applied wrote any of
the same entries (else undoing it would write its originals over the later edit's values);
otherwise :meth:`EditHandle.undo` raises :class:`UndoOrderError` and changes nothing. Edits that
touch disjoint entries (even of the same tensor) undo in any order. The log is keyed by the
Parameter object, so it follows a parameter shared by two module trees and vanishes with it;
writes made outside :meth:`Edit.apply_` are not tracked.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..arch import weight_layouts
from .masks import ParamMask

if TYPE_CHECKING:
    from ..lens import LensModel

_INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}


class UndoOrderError(RuntimeError):
    """An undo that would overwrite a later, still-applied edit's entries (nothing was changed)."""


@dataclass(frozen=True, eq=False)
class _Write:
    """One applied edit's entries of one parameter, as kept in the undo log."""

    seq: int
    indices: Tensor | None  # None: every entry (kept compact, as a discarded handle's entry lives on)
    method: str
    handle: "weakref.ref[EditHandle]"

    def shared(self, i: Tensor, numel: int) -> int:
        """How many of the (unique) flat indices ``i`` of a ``numel``-entry tensor this write also wrote."""
        if self.indices is None:
            return int(i.numel())
        if i.numel() == numel:
            return int(self.indices.numel())
        return int(torch.isin(self.indices, i).sum())


_SEQ = itertools.count()
_LOG: dict[int, list[_Write]] = {}  # id(Parameter) -> its still-applied writes, in apply order


def _log_of(p: Tensor) -> list[_Write]:
    key = id(p)
    if key not in _LOG:
        _LOG[key] = []
        weakref.finalize(p, _LOG.pop, key, None)  # the id may be reused once p is gone
    return _LOG[key]


def _model(obj) -> nn.Module:
    return obj.hf if hasattr(obj, "hf") else obj


def bits(t: Tensor) -> Tensor:
    """Integer view of a float tensor (bitwise comparison: -0.0 != 0.0, NaN == same NaN)."""
    return t.view(_INT_OF[t.dtype]) if t.dtype in _INT_OF else t


def layouts(model: nn.Module | LensModel) -> dict[str, str]:
    """Stored layout of each parameter: ``"in_out"`` where the architecture row marks the module
    as transposed (GPT-2 Conv1D), else ``"out_in"`` (nn.Linear etc.); see :func:`bias_lens.arch.weight_layouts`."""
    return weight_layouts(_model(model))


@dataclass
class Edit:
    """New values for the masked entries of some HF parameters (no model attached)."""

    indices: dict[str, Tensor]
    values: dict[str, Tensor]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    layouts: dict[str, str]
    method: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # values in the parameter's dtype, rounded once here (a float32 master copy of a bfloat16 weight),
        # so apply_, changed_counts and patches see the bits that are written; a new dict: the caller's is kept
        self.values = {n: v.to(self.dtypes[n]) if n in self.dtypes else v for n, v in self.values.items()}
        for name, idx in self.indices.items():
            v = self.values[name]
            if idx.ndim != 1 or v.ndim != 1 or idx.shape != v.shape:
                raise ValueError(f"edit of {name}: indices {tuple(idx.shape)} and values {tuple(v.shape)} must be equal 1-D")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= _numel(self.shapes[name])):
                raise ValueError(f"edit of {name}: an index lies outside a tensor of shape {self.shapes[name]}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_fn(
        cls, model: nn.Module | LensModel, mask: ParamMask, fn: Callable[[str, Tensor], Tensor], *, method: str = "", meta: dict | None = None
    ) -> "Edit":
        """New value of each masked entry = ``fn(param_name, old_values_1d)`` (the model is not changed)."""
        m = _model(model)
        mask.check(m)
        params, lay = dict(m.named_parameters()), layouts(m)
        idx, vals, shapes, dtypes = {}, {}, {}, {}
        for name in mask.names:
            p = params[name]
            i = mask.indices(name).to(p.device)
            old = p.detach().reshape(-1)[i].clone()
            new = torch.as_tensor(fn(name, old.clone())).to(p.dtype)
            if new.shape != old.shape:
                raise ValueError(f"edit function returned shape {tuple(new.shape)} for {name}, expected {tuple(old.shape)}")
            idx[name], vals[name] = i.cpu(), new.detach().cpu()
            shapes[name], dtypes[name] = tuple(p.shape), p.dtype
        return cls(idx, vals, shapes, dtypes, {n: lay[n] for n in idx}, method, dict(meta or {}))

    @classmethod
    def from_tensors(cls, model: nn.Module | LensModel, mask: ParamMask, new: Mapping[str, Tensor], **kw: Any) -> "Edit":
        """Take the masked entries of full new tensors (e.g. a fine-tuned copy's weights)."""
        missing = [n for n in mask.names if n not in new]
        if missing:
            raise ValueError(f"no new tensor given for {missing[:3]}")
        return cls.from_fn(model, mask, lambda n, _old: new[n].detach().reshape(-1)[mask.indices(n).to(new[n].device)], **kw)

    @classmethod
    def scale(cls, model: nn.Module | LensModel, mask: ParamMask, factor: float, **kw: Any) -> "Edit":
        """Multiply the masked entries by ``factor`` (0 = zeroing / pruning)."""
        kw.setdefault("method", f"scale({factor})")
        return cls.from_fn(model, mask, lambda _n, old: old * factor, **kw)

    # ------------------------------------------------------------------ info
    @property
    def size(self) -> int:
        """Number of edited entries over all parameters."""
        return int(sum(i.numel() for i in self.indices.values()))

    def counts(self) -> dict[str, int]:
        """Edited entries per parameter name."""
        return {n: int(i.numel()) for n, i in self.indices.items()}

    def changed_counts(self, model: nn.Module | LensModel) -> dict[str, int]:
        """Entries whose new value differs bitwise from ``model``'s current value, per parameter."""
        params = dict(_model(model).named_parameters())
        out = {}
        for n, i in self.indices.items():
            cur = params[n].detach().reshape(-1)[i.to(params[n].device)].cpu()
            out[n] = int((bits(cur) != bits(self.values[n])).sum())
        return out

    def __repr__(self) -> str:
        return f"Edit({self.method!r}, {len(self.indices)} tensors, {self.size} entries)"

    # ------------------------------------------------------------------ composition
    def then(self, other: "Edit") -> "Edit":
        """One edit doing ``self`` then ``other`` (``other``'s value wins where both write)."""
        names = list(dict.fromkeys([*self.indices, *other.indices]))
        idx, vals, shapes, dtypes, lay = {}, {}, {}, {}, {}
        for n in names:
            for e in (self, other):
                if n in e.indices:
                    if n in shapes and (shapes[n], dtypes[n], lay[n]) != (e.shapes[n], e.dtypes[n], e.layouts[n]):
                        raise ValueError(f"cannot compose edits of {n}: they were computed for different shapes/dtypes/layouts")
                    shapes[n], dtypes[n], lay[n] = e.shapes[n], e.dtypes[n], e.layouts[n]
            parts = [(e.indices[n], e.values[n]) for e in (self, other) if n in e.indices]
            i = torch.cat([p[0] for p in parts])
            v = torch.cat([p[1] for p in parts])
            order = torch.argsort(i, stable=True)
            i, v = i[order], v[order]
            last = torch.ones_like(i, dtype=torch.bool)
            last[:-1] = i[1:] != i[:-1]  # keep the last write of each index (other's, by stable order)
            idx[n], vals[n] = i[last], v[last]
        return Edit(idx, vals, shapes, dtypes, lay, f"{self.method}+{other.method}", {"parts": [self.meta, other.meta]})

    __add__ = then

    # ------------------------------------------------------------------ apply
    def validate(self, model: nn.Module | LensModel) -> None:
        """Raise ValueError (changing nothing) unless every tensor matches name, shape, dtype and layout."""
        m = _model(model)
        params, lay = dict(m.named_parameters()), layouts(m)
        for n in self.indices:
            if n not in params:
                raise ValueError(f"edit writes {n!r}, which this model does not have; was it computed for another architecture?")
            p = params[n]
            if p.is_meta:
                raise ValueError(f"{n} is offloaded by accelerate (meta device), so it cannot be edited in place; "
                                 "load the model with a device_map that keeps the edited layers on a real device")
            if tuple(p.shape) != tuple(self.shapes[n]):
                raise ValueError(f"edit of {n} was computed for shape {tuple(self.shapes[n])}, the model has {tuple(p.shape)}")
            if p.dtype != self.dtypes[n]:
                raise ValueError(f"edit of {n} was computed for dtype {self.dtypes[n]}, the model has {p.dtype}; load it in that dtype")
            if lay[n] != self.layouts[n]:
                raise ValueError(
                    f"edit of {n} was computed for layout {self.layouts[n]} but the model stores it as {lay[n]} "
                    "(Conv1D [in,out] vs Linear [out,in]); recompute the edit on this model"
                )
            if not p.is_contiguous():
                raise ValueError(f"parameter {n} is not contiguous; cannot edit it in place")

    def apply_(self, model: nn.Module | LensModel) -> "EditHandle":
        """Write the new values into the real weights in place; returns the handle to undo it."""
        self.validate(model)
        params = dict(_model(model).named_parameters())
        originals: dict[str, Tensor] = {}
        with torch.no_grad():
            for n, i in self.indices.items():
                flat = params[n].data.view(-1)
                di = i.to(flat.device)
                originals[n] = flat[di].clone()
                flat[di] = self.values[n].to(flat.device)
        handle = EditHandle(_model(model), {n: i.clone() for n, i in self.indices.items()}, originals, self,
                            seq=next(_SEQ))
        for n, i in handle.indices.items():
            every = i.numel() == params[n].numel()
            _log_of(params[n]).append(_Write(handle.seq, None if every else i, self.method, weakref.ref(handle)))
        return handle

    @contextlib.contextmanager
    def applied(self, model: nn.Module | LensModel) -> Iterator["EditHandle"]:
        """Temporary edit: applied for the block, undone in ``finally``."""
        h = self.apply_(model)
        try:
            yield h
        finally:
            h.undo()


@dataclass
class EditHandle:
    """The original values of exactly the entries an applied edit overwrote."""

    model: nn.Module
    indices: dict[str, Tensor]
    originals: dict[str, Tensor]
    edit: Edit
    undone: bool = False
    seq: int | None = None  # position in the undo log (None: built by hand, not logged)

    @property
    def size(self) -> int:
        """Number of entries this handle restores on :meth:`undo`."""
        return int(sum(i.numel() for i in self.indices.values()))

    def undo(self) -> None:
        """Restore every overwritten entry bit-exactly (once).

        Raises :class:`UndoOrderError`, changing nothing, while an edit applied later and not yet
        undone wrote some of the same entries: undo that one first (reverse order of applying).
        """
        if self.undone:
            raise RuntimeError("this edit was already undone")
        params = dict(self.model.named_parameters())
        self._check_order(params)
        with torch.no_grad():
            for n, i in self.indices.items():
                flat = params[n].data.view(-1)
                flat[i.to(flat.device)] = self.originals[n]
        for n in self.indices:
            log = _LOG.get(id(params[n]), [])
            log[:] = [w for w in log if w.seq != self.seq]
        self.undone = True

    def _check_order(self, params: dict[str, nn.Parameter]) -> None:
        if self.seq is None:
            return
        for n, i in self.indices.items():
            for w in _LOG.get(id(params[n]), []):
                shared = w.shared(i, params[n].numel()) if w.seq > self.seq else 0
                if shared:
                    how = ("undo it first (undo in reverse order of applying)" if w.handle() is not None
                           else "its handle was discarded, so it is permanent; reload the model for the base weights")
                    raise UndoOrderError(
                        f"cannot undo edit {self.edit.method or '(unnamed)'!r}: edit {w.method or '(unnamed)'!r}, "
                        f"applied after it, also wrote {shared} of its entries of {n}; {how}"
                    )

    def as_edit(self) -> Edit:
        """The inverse edit (writes the originals back), e.g. to save a revert patch."""
        e = self.edit
        return Edit(dict(self.indices), {n: v.cpu() for n, v in self.originals.items()}, e.shapes, e.dtypes, e.layouts,
                    f"undo({e.method})")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
