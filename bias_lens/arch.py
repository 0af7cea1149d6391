"""Architecture knowledge in one table.

Every lookup of "where is the final norm / the unembedding / block i's down projection" goes
through :data:`ARCH_TABLE`, keyed by the Hugging Face *config class name* (never by a substring of
a model name). Adding a model family means adding one row.

Our naming scheme:

* blocks ``L{l}``; sub-blocks ``L{l}.attn`` and ``L{l}.mlp``;
* modules ``L{l}.attn.q|k|v|o`` and ``L{l}.mlp.gate|up|down``;
* FFN neurons ``L{l}N{n}`` (neuron n = column n of the down projection in HF ``[out, in]``
  orientation, row n of gate/up), attention heads ``L{l}H{h}``;
* hook points ``L{l}.resid_pre``, ``L{l}.resid_mid``, ``L{l}.resid_post``, ``L{l}.attn.out``,
  ``L{l}.attn.z`` (per-head outputs before W_O, concatenated), ``L{l}.mlp.in`` (normalised MLP
  input), ``L{l}.mlp.post`` (neuron activations, the input of the down projection),
  ``L{l}.mlp.out``.

Weights are always presented in HF ``nn.Linear`` orientation ``[out, in]``. GPT-2's ``Conv1D``
stores ``[in, out]``; :class:`ModuleSpec.transposed` records that, and its fused ``c_attn`` holds
q, k and v as three slices of the output dimension (:attr:`ModuleSpec.out_slice`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

MODULE_KINDS: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
HOOK_KINDS: tuple[str, ...] = (
    "resid_pre", "resid_mid", "resid_post", "attn.out", "attn.z", "mlp.in", "mlp.post", "mlp.out",
)


@dataclass(frozen=True)
class ModuleSpec:
    """Where one of our modules lives inside a block.

    ``path`` is relative to the block (``self_attn.q_proj``). ``out_slice`` is ``(k, n)``: the module
    is the k-th of n equal slices of the output dimension (GPT-2's fused qkv). ``transposed`` is
    True when the stored weight is ``[in, out]`` (GPT-2 Conv1D).
    """

    path: str
    transposed: bool = False
    out_slice: tuple[int, int] | None = None


@dataclass(frozen=True)
class ArchSpec:
    """One row of the architecture table."""

    family: str
    layers: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    mlp: str
    ln1: str
    ln2: str
    modules: dict[str, ModuleSpec]
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str | None = "num_key_value_heads"
    gated_mlp: bool = True
    #: TransformerLens splits a fused qkv weight into copies that must be re-linked as views.
    tl_split_qkv: bool = False
    tl_hooks: dict[str, str] = field(default_factory=dict)

    def module(self, kind: str) -> ModuleSpec:
        if kind not in self.modules:
            have = ", ".join(sorted(self.modules))
            raise KeyError(f"module kind {kind!r} does not exist in the {self.family} family (has: {have})")
        return self.modules[kind]


_TL_HOOKS = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "attn.out": "blocks.{l}.hook_attn_out",
    "attn.z": "blocks.{l}.attn.o.hook_in",
    "mlp.in": "blocks.{l}.mlp.hook_in",
    "mlp.post": "blocks.{l}.mlp.out.hook_in",
    "mlp.out": "blocks.{l}.hook_mlp_out",
}

_LLAMA_LIKE = ArchSpec(
    family="llama",
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    mlp="mlp",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    modules={
        "attn.q": ModuleSpec("self_attn.q_proj"),
        "attn.k": ModuleSpec("self_attn.k_proj"),
        "attn.v": ModuleSpec("self_attn.v_proj"),
        "attn.o": ModuleSpec("self_attn.o_proj"),
        "mlp.gate": ModuleSpec("mlp.gate_proj"),
        "mlp.up": ModuleSpec("mlp.up_proj"),
        "mlp.down": ModuleSpec("mlp.down_proj"),
    },
    tl_hooks=_TL_HOOKS,
)

_GPT2 = ArchSpec(
    family="gpt2",
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    attn="attn",
    mlp="mlp",
    ln1="ln_1",
    ln2="ln_2",
    modules={
        "attn.q": ModuleSpec("attn.c_attn", transposed=True, out_slice=(0, 3)),
        "attn.k": ModuleSpec("attn.c_attn", transposed=True, out_slice=(1, 3)),
        "attn.v": ModuleSpec("attn.c_attn", transposed=True, out_slice=(2, 3)),
        "attn.o": ModuleSpec("attn.c_proj", transposed=True),
        "mlp.up": ModuleSpec("mlp.c_fc", transposed=True),
        "mlp.down": ModuleSpec("mlp.c_proj", transposed=True),
    },
    n_heads_attr="n_head",
    n_kv_heads_attr=None,
    gated_mlp=False,
    tl_split_qkv=True,
    tl_hooks=_TL_HOOKS,
)

#: Config class name -> architecture row. Llama, Qwen2, Mistral (and Qwen3/Gemma-style Llama
#: layouts) share one layout.
ARCH_TABLE: dict[str, ArchSpec] = {
    "LlamaConfig": _LLAMA_LIKE,
    "Qwen2Config": _LLAMA_LIKE,
    "MistralConfig": _LLAMA_LIKE,
    "Qwen3Config": _LLAMA_LIKE,
    "GPT2Config": _GPT2,
}


def arch_for(model: nn.Module) -> ArchSpec:
    """The architecture row for an HF model, or a clear error naming the supported families."""
    name = type(model.config).__name__
    if name not in ARCH_TABLE:
        raise ValueError(
            f"bias_lens has no architecture row for {name}; supported: {', '.join(sorted(ARCH_TABLE))}. "
            "Add a row to bias_lens.arch.ARCH_TABLE to support this family."
        )
    return ARCH_TABLE[name]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule`` with a message that names the missing path."""
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise KeyError(f"module path {path!r} not found in {type(root).__name__}") from err


_MODULE_RE = re.compile(r"^L(\d+)\.((?:attn|mlp)\.[a-z]+)$")
_NEURON_RE = re.compile(r"^L(\d+)N(\d+)$")
_HEAD_RE = re.compile(r"^L(\d+)H(\d+)$")
_HOOK_RE = re.compile(r"^L(\d+)\.(resid_pre|resid_mid|resid_post|attn\.out|attn\.z|mlp\.in|mlp\.post|mlp\.out)$")


def parse_module_name(name: str) -> tuple[int, str]:
    """``"L12.mlp.down"`` -> ``(12, "mlp.down")``."""
    m = _MODULE_RE.match(name)
    if not m or m.group(2) not in MODULE_KINDS:
        raise ValueError(
            f"{name!r} is not a module name; use L{{layer}}.{{kind}} with kind one of {', '.join(MODULE_KINDS)}"
        )
    return int(m.group(1)), m.group(2)


def parse_neuron_name(name: str) -> tuple[int, int]:
    """``"L12N1021"`` -> ``(12, 1021)``."""
    m = _NEURON_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a neuron name; use L{{layer}}N{{index}}, e.g. L12N1021")
    return int(m.group(1)), int(m.group(2))


def parse_head_name(name: str) -> tuple[int, int]:
    """``"L12H3"`` -> ``(12, 3)``."""
    m = _HEAD_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a head name; use L{{layer}}H{{head}}, e.g. L12H3")
    return int(m.group(1)), int(m.group(2))


def parse_hook_name(name: str) -> tuple[int, str]:
    """``"L3.mlp.post"`` -> ``(3, "mlp.post")``."""
    m = _HOOK_RE.match(name)
    if not m:
        raise ValueError(
            f"{name!r} is not a hook point; use L{{layer}}.{{point}} with point one of {', '.join(HOOK_KINDS)}"
        )
    return int(m.group(1)), m.group(2)


@dataclass(frozen=True)
class ParamRef:
    """One of our modules resolved to the HF parameters that hold it.

    ``weight_name``/``bias_name`` are full HF parameter names (``model.layers.3.mlp.down_proj.weight``).
    ``rows`` selects the module's output rows inside a fused weight (GPT-2 qkv), in ``[out, in]``
    orientation; ``None`` means the whole tensor.
    """

    name: str
    weight_name: str
    bias_name: str | None
    transposed: bool
    rows: slice | None

    def weight_view(self, model: nn.Module) -> torch.Tensor:
        """The weight in ``[out, in]`` orientation, as a view that shares storage with the model."""
        w = resident_parameter(model, self.weight_name)
        w = w.T if self.transposed else w
        return w[self.rows] if self.rows is not None else w

    def bias_view(self, model: nn.Module) -> torch.Tensor | None:
        if self.bias_name is None:
            return None
        b = resident_parameter(model, self.bias_name)
        return b[self.rows] if self.rows is not None else b


def resident_parameter(model: nn.Module, name: str) -> torch.Tensor:
    """``model.get_parameter(name)``, or, when accelerate offloaded it (meta device; ``device_map``
    with "cpu"/"disk" offload), the value read from the offload store.

    The offloaded value is a read-only copy (it does not share storage with the model): fine for
    the methods that read weights (attribution, circuits, gradients' orientation); in-place edits
    refuse meta parameters (see :meth:`bias_lens.edit.Edit.validate`).
    """
    p = model.get_parameter(name)
    if not p.is_meta:
        return p
    mod_name, _, attr = name.rpartition(".")
    hook = getattr(model.get_submodule(mod_name), "_hf_hook", None)
    wmap = getattr(hook, "weights_map", None)
    if wmap is None:
        raise ValueError(f"{name} is on the meta device and no accelerate offload store holds it; "
                         "load the model with real weights (no init_empty_weights without dispatch)")
    dev = getattr(hook, "execution_device", None)
    return wmap[attr].to(dev if dev is not None else "cpu")


def param_ref(model: nn.Module, name: str) -> ParamRef:
    """Resolve ``L{l}.{kind}`` to the HF parameters that hold it."""
    layer, kind = parse_module_name(name)
    spec = arch_for(model)
    n_layers = len(get_submodule(model, spec.layers))
    if not 0 <= layer < n_layers:
        raise ValueError(f"{name!r}: layer {layer} out of range; the model has layers 0..{n_layers - 1}")
    mspec = spec.module(kind)
    prefix = f"{spec.layers}.{layer}.{mspec.path}"
    mod = get_submodule(model, prefix)
    bias_name = f"{prefix}.bias" if getattr(mod, "bias", None) is not None else None
    rows = None
    if mspec.out_slice is not None:
        k, n = mspec.out_slice
        out_dim = mod.weight.shape[1] if mspec.transposed else mod.weight.shape[0]
        size = out_dim // n
        rows = slice(k * size, (k + 1) * size)
    return ParamRef(name, f"{prefix}.weight", bias_name, mspec.transposed, rows)


def block_param_names(model: nn.Module, layer: int) -> list[str]:
    """All HF parameter names of block ``layer``."""
    spec = arch_for(model)
    prefix = f"{spec.layers}.{layer}."
    return [n for n, _ in model.named_parameters() if n.startswith(prefix)]


def tl_hook_name(model: nn.Module, hook: str) -> str:
    """Translate one of our hook points to the TransformerLens bridge's hook name."""
    layer, kind = parse_hook_name(hook)
    return arch_for(model).tl_hooks[kind].format(l=layer)
