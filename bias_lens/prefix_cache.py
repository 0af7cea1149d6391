"""Replay of an unedited prefix: block inputs recorded once, reused while only later blocks change.

Why: the main job measures every edit row on the same fixed test subsets (about two minutes per
row on 2 CPU cores), and most rows edit only late blocks (``L29.mlp.down``, the top blocks'
attention). For an edit that touches only blocks ``>= L``, the input of block ``L`` on every
measured batch is the unedited model's. :func:`record` stores it once, during the unedited
measurement, keyed by the batch's exact ``input_ids`` / ``attention_mask`` / ``position_ids``;
:func:`replay` then skips blocks ``0..L-1`` for a batch it has seen and hands block ``L`` the
stored tensor. A batch it has not seen (another prompt set, the PB prefix) runs every block as
usual.

Exactness: a replayed batch is the same token ids and mask as the recorded one, and the stored
tensor is what blocks ``0..L-1`` computed for it with the same weights, so every score equals the
uncached one bit for bit (tested). :func:`first_edited_layer` says which ``L`` an edit allows
(``None`` when it touches anything outside the blocks: embeddings, the final norm, the head).
Replay swaps block modules for the duration of the context; use it for scoring only (hidden-state
capture of skipped blocks, e.g. ``output_hidden_states``, would see the stubs).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jaxtyping import Float
from torch import Tensor, nn

if TYPE_CHECKING:
    from .lens import LensModel

log = logging.getLogger(__name__)


@dataclass
class PrefixCache:
    """Recorded inputs of the ``layers`` blocks, per batch key (see the module docstring)."""

    layers: tuple[int, ...]
    store: dict[int, dict[bytes, Float[Tensor, "batch pos d_model"]]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    def __post_init__(self) -> None:
        if not self.layers or any(layer < 1 for layer in self.layers):
            raise ValueError(f"prefix-cache layers must be block indices >= 1 (block 0's input is the embedding), "
                             f"got {list(self.layers)}")
        self.layers = tuple(sorted(set(self.layers)))

    def best_layer(self, first_edited: int | None) -> int | None:
        """The deepest recorded block at or before ``first_edited`` (``None``: nothing to replay)."""
        ok = [layer for layer in self.layers if first_edited is not None and layer <= first_edited and self.store.get(layer)]
        return max(ok) if ok else None

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded tensors."""
        return sum(t.numel() * t.element_size() for per in self.store.values() for t in per.values())


def batch_key(args: tuple, kwargs: dict[str, Any]) -> bytes | None:
    """The identity of one forward call: its token ids, attention mask and position ids (``None``
    when the call passes embeddings instead of ids, reads a KV cache, or asks for one with
    ``use_cache=True``: such calls are never replayed — a skipped block writes no keys/values, so a
    later call reading the cache, e.g. the suffix batches after :func:`bias_lens.scoring.prefix_cache`,
    would attend to nothing in those blocks)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if (ids is None or kwargs.get("past_key_values") is not None or kwargs.get("inputs_embeds") is not None
            or kwargs.get("use_cache") is True):
        return None
    h = hashlib.sha1()
    for name, t in (("ids", ids), ("mask", kwargs.get("attention_mask")), ("pos", kwargs.get("position_ids"))):
        if t is not None:
            t = t.detach().cpu().contiguous()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.numpy().tobytes())
    return h.digest()


@contextmanager
def _keyed(lm: LensModel) -> Iterator[dict[str, bytes | None]]:
    """Track the key of the forward call in progress (``holder["key"]``)."""
    holder: dict[str, bytes | None] = {"key": None}

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        holder["key"] = batch_key(args, kwargs)

    def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        holder["key"] = None

    handles = [lm.hf.register_forward_pre_hook(pre, with_kwargs=True),
               lm.hf.register_forward_hook(post, with_kwargs=True)]
    try:
        yield holder
    finally:
        for h in handles:
            h.remove()


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def record(lm: LensModel, cache: PrefixCache) -> Iterator[PrefixCache]:
    """Store the input of every ``cache.layers`` block for each keyed forward call inside the context."""
    blocks = lm.layers
    bad = [layer for layer in cache.layers if layer >= len(blocks)]
    if bad:
        raise ValueError(f"prefix-cache layers {bad} do not exist; {lm.name} has blocks 0..{len(blocks) - 1}")
    with _keyed(lm) as holder:
        def make(layer: int):
            def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                if holder["key"] is not None:
                    cache.store.setdefault(layer, {})[holder["key"]] = _hidden(args, kwargs).detach().clone()
            return pre

        handles = [blocks[layer].register_forward_pre_hook(make(layer), with_kwargs=True) for layer in cache.layers]
        try:
            yield cache
        finally:
            for h in handles:
                h.remove()
    log.info("prefix cache: %d batches x %d layers recorded (%.0f MB)", len(next(iter(cache.store.values()), {})),
             len(cache.store), cache.nbytes / 2**20)


class _Skip(nn.Module):
    """Stands in for block ``i < layer`` while replaying: for a recorded batch, pass the hidden states
    through (the last stub returns the stored input of ``layer``); otherwise run the real block."""

    def __init__(self, real: nn.Module, holder: dict, stored: dict[bytes, Tensor], last: bool) -> None:
        super().__init__()
        self.real, self.holder, self.stored, self.last = real, holder, stored, last

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        got = self.stored.get(self.holder["key"]) if self.holder["key"] is not None else None
        if got is None or got.shape[:2] != hidden_states.shape[:2]:
            return self.real(hidden_states, *args, **kwargs)
        return got if self.last else hidden_states


@contextmanager
def replay(lm: LensModel, cache: PrefixCache, layer: int) -> Iterator[PrefixCache]:
    """Inside the context, recorded batches skip blocks ``0..layer-1`` (see the module docstring)."""
    stored = cache.store.get(layer)
    if not stored:
        raise ValueError(f"no inputs of block {layer} were recorded; record with layers including {layer}")
    blocks = lm.layers
    originals = [blocks[i] for i in range(layer)]
    with _keyed(lm) as holder:
        def count(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if holder["key"] is not None and holder["key"] in stored:
                cache.hits += 1
            else:
                cache.misses += 1

        h = lm.hf.register_forward_pre_hook(count, with_kwargs=True)
        try:
            for i, real in enumerate(originals):
                blocks[i] = _Skip(real, holder, stored, last=i == layer - 1)
            yield cache
        finally:
            for i, real in enumerate(originals):
                blocks[i] = real
            h.remove()


def checkpoints(n_layers: int) -> tuple[int, ...]:
    """Default recorded blocks for an ``n_layers`` model: dense near the top, where most edits are
    (SmolLM2, 30 blocks: 10, 14, 18, 22, 24, 26, 28, 29)."""
    return tuple(sorted(x for x in {n_layers - d for d in (1, 2, 4, 6, 8, 12, 16)} | {n_layers // 3} if x >= 1))


def first_edited_layer(lm: LensModel, names: Iterable[str]) -> int | None:
    """The lowest block index among the parameter ``names`` an edit writes; ``None`` when one of them
    lies outside the blocks (embedding, final norm, head: nothing before them can be replayed)."""
    prefix = lm.arch.layers + "."
    layers = []
    for n in names:
        if not n.startswith(prefix):
            return None
        layers.append(int(n[len(prefix):].split(".", 1)[0]))
    return min(layers) if layers else None


@contextmanager
def replaying(lm: LensModel, cache: PrefixCache | None, names: Iterable[str]) -> Iterator[int | None]:
    """:func:`replay` at the deepest recorded block before the first edited one (a no-op context when
    there is none); yields the block replayed from or ``None``."""
    layer = cache.best_layer(first_edited_layer(lm, names)) if cache is not None else None
    if layer is None:
        yield None
        return
    with replay(lm, cache, layer):
        yield layer
