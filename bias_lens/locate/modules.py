"""Module-scale bias localisation: MSME Eq. 3 zero-ablation scan with prefix reuse.

For module M of block i (``attn.q|k|v|o``, ``mlp.gate|up|down``, and the whole ``attn`` / ``mlp``
sub-blocks) every parameter of M — weight and bias, or the q/k/v slice of GPT-2's fused
``c_attn`` — is set to zero temporarily and

    I(M) = sum_t |p^(i+1)_{w/o M}[t] - p^(i+1)[t]|        (t in he, she)

is read with the logit lens (final norm recomputed, as in :func:`~.layers.layer_scale`) at the
output of the block that contains M, at each prompt's last real token. ``final=True`` also
records the same score on the model's final output distribution (``extras["final_effect"]``).

Prefix reuse: one baseline pass per batch caches every block's input H^(i) (all positions: the
attention of later blocks needs them) together with the exact positional arguments/keyword
arguments the HF model passed to that block (attention mask, rotary position embeddings,
position ids — captured with a forward pre-hook, so any architecture in the table is replayed
faithfully). An ablation in block i then runs only block i from the cached H^(i) (block score)
and, for ``final=True``, blocks i+1..L-1 after it. Cost per ablation: 1/L of a body pass for the
block score, (L-i)/L with the final effect.

Zeroing never leaks: :func:`zeroed` restores the saved original values bit-exactly in a
``finally`` even if a forward pass raises. All input is validated before any weight is touched.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..arch import param_ref
from ..hooks import module_hooks
from ..progress import bar, batch_count
from ..scoring import Batch, check_prompts, iter_batches
from ..targets import TargetSet
from .attribution import base_model
from .layers import lens_probs, single_token_targets
from .result import LocateResult

if TYPE_CHECKING:
    from ..lens import LensModel

log = logging.getLogger(__name__)
#: Module kinds in scan order; ``attn`` / ``mlp`` are the whole sub-blocks.
BLOCK_MODULES: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "attn", "mlp")


def available_modules(lm: LensModel) -> list[str]:
    """The module kinds this architecture has, in scan order (GPT-2 has no ``mlp.gate``)."""
    return [m for m in BLOCK_MODULES if m in ("attn", "mlp") or m in lm.arch.modules]


def module_views(lm: LensModel, layer: int, module: str) -> list[Tensor]:
    """Views (sharing storage) of every parameter of ``L{layer}.{module}``: weight and bias slices."""
    if module in ("attn", "mlp"):
        return list(lm.submodule(layer, module).parameters())
    ref = param_ref(lm.hf, f"L{layer}.{module}")
    bias = ref.bias_view(lm.hf)
    return [ref.weight_view(lm.hf)] + ([bias] if bias is not None else [])


@contextlib.contextmanager
def zeroed(views: Sequence[Tensor]) -> Iterator[None]:
    """Zero ``views`` in place for the duration of the block; restore them bit-exactly in ``finally``."""
    saved = [v.detach().clone() for v in views]
    try:
        with torch.no_grad():
            for v in views:
                v.zero_()
        yield
    finally:
        with torch.no_grad():
            for v, s in zip(views, saved):
                v.copy_(s)


@dataclass
class Prefix:
    """One batch's cached baseline: every block's input and the exact call it received."""

    hidden: list[Float[Tensor, "batch pos d_model"]]  # H^(0..L)
    calls: list[tuple[tuple, dict[str, Any], str | None]]  # (args after hidden, kwargs, key of hidden in kwargs)


@torch.no_grad()
def capture_prefix(lm: LensModel, b: Batch) -> Prefix:
    """Run the body once, caching each block's input H^(i), its call arguments, and H^(L)."""
    L = lm.n_layers
    hidden: list[Tensor | None] = [None] * (L + 1)
    calls: list[Any] = [None] * L

    def pre(i: int):
        def hook(module, args, kwargs):
            if args:
                hidden[i], calls[i] = args[0], (args[1:], dict(kwargs), None)
            else:
                hidden[i], calls[i] = kwargs["hidden_states"], ((), dict(kwargs), "hidden_states")

        return hook

    def post(module, args, kwargs, output):
        hidden[L] = output[0] if isinstance(output, tuple) else output

    with module_hooks(forward=[(lm.layers[L - 1], post)], pre=[(blk, pre(i)) for i, blk in enumerate(lm.layers)]):
        base_model(lm)(**b.model_inputs(), use_cache=False)
    return Prefix(hidden, calls)  # type: ignore[arg-type]


def run_block(lm: LensModel, prefix: Prefix, i: int, h: Tensor) -> Tensor:
    """Block i applied to ``h`` with exactly the arguments the full forward gave it."""
    args, kwargs, key = prefix.calls[i]
    out = lm.layers[i](**{**kwargs, key: h}) if key else lm.layers[i](h, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _last(h: Tensor, last: Tensor) -> Tensor:
    return h[torch.arange(h.shape[0], device=h.device), last.to(h.device)]


def _validate(lm, layers: Sequence[int] | None, modules: Sequence[str] | None) -> tuple[list[int], list[str]]:
    L = lm.n_layers
    layers = list(range(L)) if layers is None else [int(x) for x in layers]
    if not layers:
        raise ValueError("layers is empty; pass None to scan every layer or a list like [0, 5]")
    bad = [x for x in layers if not 0 <= x < L]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range; the model has layers 0..{L - 1}")
    have = available_modules(lm)
    modules = list(have) if modules is None else [str(m) for m in modules]
    if not modules:
        raise ValueError(f"modules is empty; pass None for all or some of {', '.join(have)}")
    unknown = [m for m in modules if m not in have]
    if unknown:
        raise ValueError(
            f"unknown module name(s) {unknown} for the {lm.arch.family} family; choose from {', '.join(have)}"
        )
    return sorted(set(layers)), list(dict.fromkeys(modules))


@torch.no_grad()
def module_scale(
    lm: LensModel,
    prompts: Sequence[str],
    targets: TargetSet | str | Sequence[str] = "he,she",
    *,
    layers: Sequence[int] | None = None,
    modules: Sequence[str] | None = None,
    batch_size: int = 32,
    final: bool = True,
    progress: bool = False,
) -> LocateResult:
    """MSME Eq. 3 zero-ablation importance of every (layer, module) pair; see the module docstring.

    Labels are ``L{i}.{module}`` (layer-major). ``per_prompt`` is ``[prompt, label]``. ``extras``:
    ``final_effect`` (mean score on the final output, aligned with labels; only with
    ``final=True``), ``matrix`` ``[layer, module]`` of block scores (and ``matrix_final``),
    ``layers``, ``module_names``, ``targets``. ``final=False`` skips blocks i+1..L-1 (the scan
    then costs about one body pass per module kind). ``progress=True`` shows a bar over
    (batch, module) ablations.
    """
    prompts = check_prompts(prompts)
    ts = single_token_targets(lm, targets, "module_scale")
    layers, modules = _validate(lm, layers, modules)
    pairs = [(i, m) for i in layers for m in modules]
    labels = [f"L{i}.{m}" for i, m in pairs]
    views = {p: module_views(lm, *p) for p in pairs}
    tid = ts.first_ids
    n = len(prompts)
    per = torch.empty(n, len(pairs), dtype=torch.float64)
    per_final = torch.empty(n, len(pairs), dtype=torch.float64) if final else None
    pbar = bar(total=batch_count(n, batch_size) * len(pairs), desc="module scan", enabled=progress, unit="ablation")
    for b in iter_batches(lm.tokenizer, prompts, batch_size, device=lm.device):
        _scan_batch(lm, b, pairs, views, tid, per, per_final, pbar)
    pbar.close()
    scores = per.mean(0)
    return _module_result(lm, labels, scores, per, per_final, layers, modules, ts, final)


def _scan_batch(lm, b: Batch, pairs: list[tuple[int, str]], views: dict[tuple[int, str], list[Tensor]], tid: Tensor,
                per: Float[Tensor, "prompt label"], per_final: Float[Tensor, "prompt label"] | None, pbar) -> None:
    """One batch of the scan: a cached baseline pass, then every ablation in ``pairs`` from it.

    Writes the block score of ablation ``k`` into ``per[b.rows, k]`` (and the final-output score
    into ``per_final`` when given); ticks ``pbar`` once per ablation.
    """
    L = lm.n_layers
    pre = capture_prefix(lm, b)
    base = lens_probs(lm, torch.stack([_last(h, b.last) for h in pre.hidden]), tid)  # [L+1, batch, t]
    for k, (i, m) in enumerate(pairs):
        with zeroed(views[(i, m)]):
            h = run_block(lm, pre, i, pre.hidden[i])
            per[b.rows, k] = (lens_probs(lm, _last(h, b.last), tid) - base[i + 1]).abs().sum(-1)
            if per_final is not None:
                for j in range(i + 1, L):
                    h = run_block(lm, pre, j, h)
                per_final[b.rows, k] = (lens_probs(lm, _last(h, b.last), tid) - base[L]).abs().sum(-1)
        pbar.update(1)
    del pre


def _module_result(lm, labels: list[str], scores: Tensor, per: Tensor, per_final: Tensor | None,
                   layers: list[int], modules: list[str], ts: TargetSet, final: bool) -> LocateResult:
    """The scan's :class:`LocateResult` with its ``[layer, module]`` grids in ``extras``."""
    n = per.shape[0]
    grid = lambda s: s.view(len(layers), len(modules)).tolist()  # noqa: E731
    extras: dict[str, Any] = {
        "layers": layers,
        "module_names": modules,
        "matrix": grid(scores),
        "targets": list(ts.words),
        "final": final,
    }
    if per_final is not None:
        fe = per_final.mean(0)
        extras.update(final_effect=fe.tolist(), matrix_final=grid(fe), per_prompt_final=per_final.tolist())
    return LocateResult(
        method="module",
        labels=labels,
        scores=scores,
        variant="zero weights+biases; block-output logit lens (norm=recompute)" + ("; final effect" if final else ""),
        per_prompt=per,
        extras=extras,
        model=getattr(lm, "name", ""),
        n_samples=n,
    )
