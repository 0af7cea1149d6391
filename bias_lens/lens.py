"""The model object: one set of real HF weights, seen through TransformerLens and nnsight.

:class:`LensModel` owns the Hugging Face model (the single source of truth for every weight) and
its tokenizer. Two views are built lazily over exactly the same ``nn.Parameter`` objects:

* :attr:`LensModel.bridge` — a TransformerLens 4.x ``TransformerBridge`` booted on a structural
  copy of the HF module tree whose parameters *are* the HF model's parameters (the bridge
  rewrites the tree it is handed, so it must not get the original). An in-place edit of an HF
  weight is seen by the bridge without a rebuild, and the HF model still saves cleanly.
  Compatibility mode (weight folding) is never enabled: folded weights must never be edited or
  exported.
* :attr:`LensModel.nnsight` — an nnsight ``TransformersModel`` over the HF model itself.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .arch import ArchSpec, arch_for, get_submodule, param_ref
from .loading import load_hf

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

log = logging.getLogger(__name__)


def _row_module(path_field: str, doc: str | None = None) -> property:
    """A read-only property: the HF submodule at the architecture row's ``path_field`` path."""
    def get(self: LensModel) -> nn.Module:
        return get_submodule(self.hf, getattr(self.arch, path_field))

    return property(get, doc=doc or f"The HF module at the architecture row's ``{path_field}`` path.")


class LensModel:
    """An HF causal LM plus tokenizer, with lazily built TransformerLens and nnsight views."""

    def __init__(self, hf_model: nn.Module, tokenizer: Any, name: str = "model") -> None:
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.name = name
        self.arch: ArchSpec = arch_for(hf_model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"

    # ------------------------------------------------------------------ structure
    @property
    def config(self) -> Any:
        """The HF model's config."""
        return self.hf.config

    #: the block list (``ModuleList``) at the row's ``layers`` path
    layers = _row_module("layers")

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.layers)

    @property
    def d_model(self) -> int:
        """Residual stream width (the embedding's second dimension)."""
        return self.embed.weight.shape[1]

    @property
    def d_mlp(self) -> int:
        """MLP hidden width (number of neurons per layer), read from the down projection."""
        w = get_submodule(self.layers[0], self.arch.module("mlp.down").path).weight
        return w.shape[0] if self.arch.module("mlp.down").transposed else w.shape[1]

    @property
    def d_vocab(self) -> int:
        """Vocabulary size (rows of the unembedding)."""
        return self.unembed.weight.shape[0]

    @property
    def n_heads(self) -> int:
        """Number of attention (query) heads."""
        return int(getattr(self.config, self.arch.n_heads_attr))

    @property
    def d_head(self) -> int:
        """Width of one attention head (``head_dim`` or ``d_model // n_heads``)."""
        return int(getattr(self.config, "head_dim", None) or self.d_model // self.n_heads)

    embed = _row_module("embed")
    body = _row_module("body", "The transformer body without the LM head (its output is already final-normed).")
    final_norm = _row_module("final_norm")
    unembed = _row_module("unembed")

    def block(self, layer: int) -> nn.Module:
        """The HF transformer block ``layer``."""
        return self.layers[layer]

    def submodule(self, layer: int, kind: str) -> nn.Module:
        """The HF module of ``L{layer}.{kind}`` (``attn``, ``mlp``, ``attn.q`` ... ``mlp.down``)."""
        if kind == "attn":
            return get_submodule(self.layers[layer], self.arch.attn)
        if kind == "mlp":
            return get_submodule(self.layers[layer], self.arch.mlp)
        return get_submodule(self.layers[layer], self.arch.module(kind).path)

    @property
    def device(self) -> torch.device:
        """Device of the input embedding (where token ids must go); weights may be sharded."""
        return self.embed.weight.device

    @property
    def logit_softcap(self) -> float | None:
        """The final logit soft-cap of the family (Gemma-2: ``cap * tanh(logits / cap)``), or None."""
        attr = self.arch.logit_softcap_attr
        cap = getattr(self.config, attr, None) if attr else None
        return float(cap) if cap else None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored and run in (the input embedding's)."""
        return self.embed.weight.dtype

    def logits_from_normed(self, normed: torch.Tensor) -> torch.Tensor:
        """Unembedding (and the family's final soft-cap) of an already final-normed residual, e.g.
        the body's output: what the HF LM head computes from it.

        In the model's dtype this is the LM head itself. A wider input (float32 ``normed`` on a
        bfloat16 model: the logit lens asking for unrounded logits) is not cast down: the
        unembedding runs in the wider dtype, so the logits skip the half-precision rounding.
        """
        w = self.unembed.weight
        x = normed.to(w.device)
        if x.dtype == w.dtype:
            logits = self.unembed(x)
        else:
            dt = torch.promote_types(x.dtype, w.dtype)
            b = getattr(self.unembed, "bias", None)
            logits = torch.nn.functional.linear(x.to(dt), w.to(dt), None if b is None else b.to(dt))
        cap = self.logit_softcap
        return torch.tanh(logits / cap) * cap if cap is not None else logits

    def logits_from_resid(self, resid: torch.Tensor) -> torch.Tensor:
        """Final norm then unembedding (and soft-cap) of a raw residual stream (each applied once)."""
        return self.logits_from_normed(self.final_norm(resid.to(self.final_norm.weight.device)))

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The HF model's parameters by name (the real weights, not copies)."""
        return dict(self.hf.named_parameters())

    # ------------------------------------------------------------------ views
    @cached_property
    def bridge(self) -> Any:
        """A TransformerLens ``TransformerBridge`` sharing this model's ``nn.Parameter`` objects."""
        from transformer_lens.model_bridge import TransformerBridge

        memo = {id(p): p for p in self.hf.parameters()}
        memo.update({id(b): b for b in self.hf.buffers()})
        clone = copy.deepcopy(self.hf, memo=memo)
        path = getattr(self.hf.config, "_name_or_path", "") or ""
        tmpdir = None
        if not os.path.isdir(path):
            # TL reads the config/tokenizer name; give it a folder it can open.
            tmpdir = tempfile.mkdtemp(prefix="bias_lens_bridge_")
            self.hf.config.save_pretrained(tmpdir)
            self.tokenizer.save_pretrained(tmpdir)
            path = tmpdir
        bridge = TransformerBridge.boot_transformers(
            path, hf_model=clone, tokenizer=self.tokenizer, dtype=self.embed.weight.dtype
        )
        bridge.eval()
        if self.arch.tl_split_qkv:
            _relink_split_qkv(self, bridge)
        storages = {p.untyped_storage().data_ptr() for p in self.hf.parameters()}
        if not all(p.untyped_storage().data_ptr() in storages for p in bridge.parameters()):
            raise RuntimeError("TransformerBridge copied weights instead of sharing them; refusing to use it")
        return bridge

    @cached_property
    def nnsight(self) -> Any:
        """An nnsight ``TransformersModel`` over the HF model itself (same parameters)."""
        from nnsight import TransformersModel

        return TransformersModel(self.hf, tokenizer=self.tokenizer, task="text-generation")

    # ------------------------------------------------------------------ convenience
    def hooks(self, hooks: list, *, lens: str = "hf") -> AbstractContextManager[None]:
        """Context manager running ``[(hook_point, fn), ...]`` through one lens; see :mod:`bias_lens.hooks`."""
        from .hooks import apply_hooks

        return apply_hooks(self, hooks, lens=lens)

    def __repr__(self) -> str:
        return (
            f"LensModel({self.name!r}, family={self.arch.family}, layers={self.n_layers}, "
            f"d_model={self.d_model}, d_mlp={self.d_mlp}, d_vocab={self.d_vocab})"
        )


def _relink_split_qkv(lm: LensModel, bridge: Any) -> None:
    """Make the bridge's split q/k/v Linears views of the fused HF weight (GPT-2's ``c_attn``).

    TransformerLens splits a fused qkv projection into three new ``nn.Linear`` copies; we replace
    their parameters by views of the HF storage so in-place edits of the real weights stay visible.
    """
    for layer in range(lm.n_layers):
        for kind in ("attn.q", "attn.k", "attn.v"):
            ref = param_ref(lm.hf, f"L{layer}.{kind}")
            lin = bridge.blocks[layer].attn.get_submodule(kind.split(".")[1])._original_component
            w, b = ref.weight_view(lm.hf), ref.bias_view(lm.hf)
            if lin.weight.shape != w.shape or not torch.equal(lin.weight, w):
                raise RuntimeError(f"unexpected TransformerLens qkv split layout at L{layer}.{kind}")
            lin.weight = nn.Parameter(w.detach(), requires_grad=False)
            if b is not None:
                lin.bias = nn.Parameter(b.detach(), requires_grad=False)


def load_model(
    spec: str | os.PathLike[str] = "smollm2-135m",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> LensModel:
    """Load a model as a :class:`LensModel`.

    ``spec`` is the embedded name ``"smollm2-135m"``, a local HF checkpoint folder, or a hub id that
    is already in the local Hugging Face cache (anything else fails at once, with no network
    access, naming what is missing). ``device``, ``dtype`` and ``device_map`` pass through to
    transformers (``device_map="auto"`` shards a large model with accelerate). ``dtype`` is
    ``torch.float32`` (default), ``torch.bfloat16`` or ``torch.float16``, or their names
    (``"bfloat16"``); see ``docs/half_precision.md`` for what is computed in which precision.
    """
    model, tok, name = load_hf(
        spec, device=device, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code
    )
    return LensModel(model, tok, name=name)
