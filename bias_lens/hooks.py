"""Small hook factories with one signature, composed by list concatenation.

A hook is ``(hook_point, fn)`` where ``hook_point`` is one of our names (``L3.mlp.post``, see
:mod:`bias_lens.arch`) and ``fn(tensor, *, hook) -> tensor | None``: returning ``None`` leaves the
activation as it is, returning a tensor replaces it. ``hook`` is a :class:`HookInfo` with the
point's name, layer and kind, whichever lens runs it. Lists of hooks compose by ``+``::

    with lm.hooks(record_into(store, ["L3.mlp.post"]) + mask_neurons({5: [7, 9]})):
        lm.hf(**batch)

:func:`apply_hooks` installs them on one lens and always removes them in ``finally``:

* ``lens="hf"`` (also what runs inside an nnsight trace, which executes the same HF modules):
  PyTorch forward hooks on the HF modules;
* ``lens="tl"``: the TransformerLens bridge's hook points, names translated by the arch table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .arch import hf_hook_target, parse_hook_name, tl_hook_name


@dataclass(frozen=True)
class HookInfo:
    """What a hook function is told about where it runs."""

    name: str
    layer: int
    kind: str
    lens: str


class HookFn(Protocol):
    def __call__(self, tensor: Tensor, *, hook: HookInfo) -> Tensor | None: ...


Hook = tuple[str, HookFn]


def describe(hooks: Sequence[Hook]) -> list[str]:
    """One line per hook: ``"L3.mlp.post <- mask_neurons(2 neurons, scale=0.0)"``."""
    return [f"{name} <- {getattr(fn, '__doc__', None) or getattr(fn, '__name__', repr(fn))}".strip() for name, fn in hooks]


# --------------------------------------------------------------------------- installation
def _first_tensor_out(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, new: Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _pre_hook(fn: HookFn, info: HookInfo, *, read_only: bool = False) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if args:
            x, rest_args, key = args[0], args[1:], None
        else:
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            x, rest_args = kwargs[key], ()
        out = fn(x, hook=info)
        if out is None:
            return None
        if read_only:
            raise NotImplementedError(
                f"{info.name} is read-only on the {info.lens} lens (the residual there has no module "
                "boundary); patch L{l}.attn.out instead, or use lens='tl'"
            )
        if key is None:
            return (out, *rest_args), kwargs
        return args, {**kwargs, key: out}

    return hook


def _fwd_hook(fn: HookFn, info: HookInfo) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        out = fn(_first_tensor_out(output), hook=info)
        return None if out is None else _replace_first(output, out)

    return hook


def _hf_target(lm: Any, layer: int, kind: str) -> tuple[torch.nn.Module, str]:
    """Module and hook type ('pre', 'fwd', 'pre_ro') implementing a hook point on the HF model
    (the table is the architecture row's ``hf_hooks``)."""
    return hf_hook_target(lm.hf, f"L{layer}.{kind}")


@contextlib.contextmanager
def apply_hooks(lm: Any, hooks: Sequence[Hook], *, lens: str = "hf") -> Iterator[None]:
    """Install ``hooks`` on one lens for the duration of the block; always removed afterwards."""
    if lens not in ("hf", "nnsight", "tl"):
        raise ValueError(f"lens must be 'hf', 'nnsight' or 'tl', got {lens!r}")
    parsed = []
    for name, fn in hooks:
        layer, kind = parse_hook_name(name)
        if not 0 <= layer < lm.n_layers:
            raise ValueError(f"hook point {name!r}: layer out of range 0..{lm.n_layers - 1}")
        parsed.append((name, layer, kind, fn))
    if lens == "tl":
        fwd = []
        for name, layer, kind, fn in parsed:
            info = HookInfo(name, layer, kind, "tl")
            fwd.append((tl_hook_name(lm.hf, name), _tl_adapter(fn, info)))
        with lm.bridge.hooks(fwd_hooks=fwd):
            yield
        return
    handles = []
    try:
        for name, layer, kind, fn in parsed:
            info = HookInfo(name, layer, kind, lens)
            module, how = _hf_target(lm, layer, kind)
            if how == "fwd":
                handles.append(module.register_forward_hook(_fwd_hook(fn, info)))
            else:
                handles.append(
                    module.register_forward_pre_hook(
                        _pre_hook(fn, info, read_only=how == "pre_ro"), with_kwargs=True
                    )
                )
        yield
    finally:
        for h in handles:
            h.remove()


def _tl_adapter(fn: HookFn, info: HookInfo) -> Callable:
    def tl_fn(tensor: Tensor, hook: Any) -> Tensor | None:
        if info.kind == "attn.z" and tensor.ndim == 4:  # TL gives [batch, pos, head, d_head]
            out = fn(tensor.flatten(-2), hook=info)
            return None if out is None else out.view(tensor.shape)
        return fn(tensor, hook=info)

    tl_fn.__name__ = getattr(fn, "__name__", "hook")
    return tl_fn


# --------------------------------------------------------------------------- factories
def identity(points: Iterable[str]) -> list[Hook]:
    """Hooks that return their input unchanged (an oracle: they must change nothing)."""

    def identity_hook(t: Tensor, *, hook: HookInfo) -> Tensor:
        """identity"""
        return t

    return [(p, identity_hook) for p in points]


def record_into(
    store: dict[str, Tensor],
    points: Iterable[str],
    *,
    index: Tensor | None = None,
    detach: bool = True,
) -> list[Hook]:
    """Record activations into ``store[point]``.

    ``index`` (a LongTensor ``[batch]``) keeps only one position per row (e.g. the last real
    token), so a scan over thousands of prompts never keeps full ``[batch, pos, d]`` activations.
    """

    def record(t: Tensor, *, hook: HookInfo) -> None:
        """record activations"""
        v = t[torch.arange(t.shape[0], device=t.device), index.to(t.device)] if index is not None else t
        store[hook.name] = v.detach() if detach else v
        return None

    return [(p, record) for p in points]


def zero_ablate(points: Iterable[str]) -> list[Hook]:
    """Replace the activation by zeros."""

    def zero(t: Tensor, *, hook: HookInfo) -> Tensor:
        """zero ablation"""
        return torch.zeros_like(t)

    return [(p, zero) for p in points]


def mean_ablate(means: Mapping[str, Tensor]) -> list[Hook]:
    """Replace the activation at each point by a precomputed mean (broadcast over batch/pos)."""

    def mean(t: Tensor, *, hook: HookInfo) -> Tensor:
        """mean ablation"""
        return means[hook.name].to(t).expand_as(t).clone()

    return [(p, mean) for p in means]


def mask_neurons(neurons: Mapping[int, Sequence[int]], *, scale: float = 0.0) -> list[Hook]:
    """Scale FFN neuron activations (``L{l}.mlp.post`` channels) by ``scale`` (0 = masking)."""
    idx = {layer: torch.as_tensor(list(ns), dtype=torch.long) for layer, ns in neurons.items() if len(ns)}

    def mask(t: Tensor, *, hook: HookInfo) -> Tensor:
        """mask neurons"""
        out = t.clone()
        i = idx[hook.layer].to(t.device)
        out[..., i] = out[..., i] * scale
        return out

    mask.__doc__ = f"mask_neurons({sum(len(v) for v in idx.values())} neurons, scale={scale})"
    return [(f"L{layer}.mlp.post", mask) for layer in idx]


def patch_from(store: Mapping[str, Tensor], *, positions: Tensor | None = None) -> list[Hook]:
    """Replace activations with those recorded from another run (same shapes).

    With ``positions`` (``[batch]``), only that position of each row is patched and ``store``
    holds ``[batch, d]`` values, as written by :func:`record_into` with ``index``.
    """

    def patch(t: Tensor, *, hook: HookInfo) -> Tensor:
        """patch from store"""
        src = store[hook.name].to(t)
        if positions is None:
            return src.clone()
        out = t.clone()
        out[torch.arange(t.shape[0], device=t.device), positions.to(t.device)] = src
        return out

    return [(p, patch) for p in store]


def add_vector(vectors: Mapping[str, Tensor]) -> list[Hook]:
    """Add a fixed vector at each point (steering / what-if)."""

    def add(t: Tensor, *, hook: HookInfo) -> Tensor:
        """add vector"""
        return t + vectors[hook.name].to(t)

    return [(p, add) for p in vectors]


# --------------------------------------------------------------------------- raw module hooks
@contextlib.contextmanager
def module_hooks(
    forward: Iterable[tuple[Any, Callable]] = (), pre: Iterable[tuple[Any, Callable]] = ()
) -> Iterator[None]:
    """Install raw torch hooks on HF modules for the block; always removed afterwards.

    For observers that need what :func:`apply_hooks`' tensor hook points do not give: a block's
    call arguments, an attention module's probability output. ``forward``: ``(module, fn)`` with
    ``fn(module, args, kwargs, output)``; ``pre``: ``(module, fn)`` with ``fn(module, args, kwargs)``
    (both registered ``with_kwargs=True``; a return value other than None replaces the output /
    the ``(args, kwargs)`` as torch defines).
    """
    handles = []
    try:
        for module, fn in pre:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        for module, fn in forward:
            handles.append(module.register_forward_hook(fn, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
