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
q, k and v as three slices of the output dimension (:attr:`ModuleSpec.out_slice`); Phi-3's fused
``qkv_proj`` (GQA-sized slices) and ``gate_up_proj`` are sliced the same way.

Everything else a method needs to know about a family is a field of its row too: the body path,
the norm kind (Gemma's ``(1 + w)`` RMSNorm), the HF and TransformerLens hook maps, the final
logit soft-cap (Gemma-2) and whether sub-block outputs are normed before the residual add.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass, field, replace

import torch
from torch import nn

from .labels import HeadLabel, HookLabel, ModuleLabel, NeuronLabel, parse_as

MODULE_KINDS: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
HOOK_KINDS: tuple[str, ...] = (
    "resid_pre", "resid_mid", "resid_post", "attn.out", "attn.z", "mlp.in", "mlp.post", "mlp.out",
)


@dataclass(frozen=True)
class ModuleSpec:
    """Where one of our modules lives inside a block.

    ``path`` is relative to the block (``self_attn.q_proj``). ``out_slice`` is ``(k, n)``: the module
    is the k-th of n slices of the output dimension of a fused weight (GPT-2's ``c_attn``, Phi-3's
    ``qkv_proj`` and ``gate_up_proj``). ``split`` says how the slices are sized: ``"equal"`` (n equal
    parts) or ``"qkv"`` (q = ``n_heads * d_head`` rows, k = v = ``n_kv_heads * d_head`` rows, for a
    fused projection under grouped-query attention). ``transposed`` is True when the stored weight
    is ``[in, out]`` (GPT-2 Conv1D): the weight orientation of the row.
    """

    path: str
    transposed: bool = False
    out_slice: tuple[int, int] | None = None
    split: str = "equal"


#: Norm kinds: ``layernorm`` (centred, with bias), ``rmsnorm`` (``w * y / rms(y)``), ``rmsnorm_1p``
#: (Gemma: the stored weight w is applied as ``(1 + w) * y / rms(y)``).
NORM_KINDS: tuple[str, ...] = ("layernorm", "rmsnorm", "rmsnorm_1p")
#: How a hook point is implemented on the HF modules: a forward pre-hook on the module's input
#: (``pre``), the same but read-only (``pre_ro``: the tensor has no module boundary to replace it
#: at), or a forward hook on its output (``fwd``).
HOOK_HOWS: tuple[str, ...] = ("pre", "pre_ro", "fwd")


@dataclass(frozen=True)
class ArchSpec:
    """One row of the architecture table.

    Paths: ``body`` (the transformer without the LM head; its output is already final-normed),
    ``layers`` / ``embed`` / ``final_norm`` / ``unembed`` relative to the HF model; ``attn``,
    ``mlp``, ``ln1`` (norm before attention) and ``ln2`` (norm before the MLP) relative to a block.
    ``norm`` is the kind (:data:`NORM_KINDS`) of every norm of the family, the final one included.
    ``hf_hooks`` maps each hook kind to ``(module path relative to the block, "" = the block itself;
    how)`` (:data:`HOOK_HOWS`); ``tl_hooks`` maps it to the TransformerLens bridge hook name.
    ``logit_softcap_attr`` names the config attribute of a final ``cap * tanh(logits / cap)``
    (Gemma-2). ``post_sublayer_norm``: attention and MLP outputs pass through a norm before they
    are added to the residual (Gemma-2), so a neuron's write into the residual is not linear in
    its activation.
    """

    family: str
    body: str
    layers: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    mlp: str
    ln1: str
    ln2: str
    modules: dict[str, ModuleSpec]
    hf_hooks: dict[str, tuple[str, str]]
    norm: str = "rmsnorm"
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str | None = "num_key_value_heads"
    gated_mlp: bool = True
    #: TransformerLens splits a fused qkv weight into copies that must be re-linked as views.
    tl_split_qkv: bool = False
    tl_hooks: dict[str, str] = field(default_factory=dict)
    logit_softcap_attr: str | None = None
    post_sublayer_norm: bool = False

    def __post_init__(self) -> None:
        if self.norm not in NORM_KINDS:
            raise ValueError(f"{self.family}: norm kind {self.norm!r} is not one of {NORM_KINDS}")
        if set(self.hf_hooks) != set(HOOK_KINDS) or any(h not in HOOK_HOWS for _, h in self.hf_hooks.values()):
            raise ValueError(f"{self.family}: hf_hooks must map every one of {HOOK_KINDS} to (path, {HOOK_HOWS})")

    def module(self, kind: str) -> ModuleSpec:
        """The :class:`ModuleSpec` of ``kind`` (``attn.q`` ... ``mlp.down``); KeyError naming the family's kinds if
        absent."""
        if kind not in self.modules:
            have = ", ".join(sorted(self.modules))
            raise KeyError(f"module kind {kind!r} does not exist in the {self.family} family (has: {have})")
        return self.modules[kind]

    def transposed_paths(self) -> frozenset[str]:
        """Block-relative module paths whose ``weight`` is stored ``[in, out]``."""
        return frozenset(m.path for m in self.modules.values() if m.transposed)


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

#: HF hook points of a pre-norm block (Llama, Qwen2, Mistral, Gemma, Phi-3, GPT-2 by its own names).
def _prenorm_hooks(attn: str, mlp: str, ln2: str, attn_o: str, mlp_down: str) -> dict[str, tuple[str, str]]:
    return {
        "resid_pre": ("", "pre"),
        "resid_post": ("", "fwd"),
        "resid_mid": (ln2, "pre_ro"),
        "attn.out": (attn, "fwd"),
        "attn.z": (attn_o, "pre"),
        "mlp.in": (mlp, "pre"),
        "mlp.post": (mlp_down, "pre"),
        "mlp.out": (mlp, "fwd"),
    }


def _prenorm_paths(body: str, *, layers: str, embed: str, final_norm: str, attn: str, mlp: str, ln1: str, ln2: str,
                   attn_o: str, mlp_down: str, unembed: str = "lm_head") -> dict:
    """The path fields of a pre-norm row, plus its ``hf_hooks``: ``layers`` / ``embed`` /
    ``final_norm`` are given relative to ``body``, ``attn_o`` / ``mlp_down`` relative to ``attn`` / ``mlp``."""
    return dict(
        body=body, layers=f"{body}.{layers}", embed=f"{body}.{embed}", final_norm=f"{body}.{final_norm}",
        unembed=unembed, attn=attn, mlp=mlp, ln1=ln1, ln2=ln2,
        hf_hooks=_prenorm_hooks(attn, mlp, ln2, f"{attn}.{attn_o}", f"{mlp}.{mlp_down}"),
    )


_LLAMA_LIKE = ArchSpec(
    family="llama",
    **_prenorm_paths("model", layers="layers", embed="embed_tokens", final_norm="norm", attn="self_attn", mlp="mlp",
                     ln1="input_layernorm", ln2="post_attention_layernorm", attn_o="o_proj", mlp_down="down_proj"),
    modules={
        "attn.q": ModuleSpec("self_attn.q_proj"),
        "attn.k": ModuleSpec("self_attn.k_proj"),
        "attn.v": ModuleSpec("self_attn.v_proj"),
        "attn.o": ModuleSpec("self_attn.o_proj"),
        "mlp.gate": ModuleSpec("mlp.gate_proj"),
        "mlp.up": ModuleSpec("mlp.up_proj"),
        "mlp.down": ModuleSpec("mlp.down_proj"),
    },
    norm="rmsnorm",
    tl_hooks=_TL_HOOKS,
)

#: Gemma: the Llama layout with (1 + w) RMSNorms, GeGLU MLP (gate/up/down) and the sqrt(d_model)
#: embedding scale inside the embedding module itself (``GemmaTextScaledWordEmbedding``), so
#: ``embed(ids)`` is already the block-0 input.
_GEMMA = replace(_LLAMA_LIKE, family="gemma", norm="rmsnorm_1p")

#: Gemma-2: like Gemma plus a norm after attention and around the MLP (``post_attention_layernorm``
#: is applied to the attention output before the residual add; the MLP input norm is
#: ``pre_feedforward_layernorm``); attn.out / mlp.out are the normed sub-block outputs, i.e. what is
#: added to the residual (so resid_mid = resid_pre + attn.out, resid_post = resid_mid + mlp.out).
#: Final logits are soft-capped: ``cap * tanh(logits / cap)``.
_GEMMA2 = replace(
    _GEMMA,
    family="gemma2",
    ln2="pre_feedforward_layernorm",
    hf_hooks={
        **_prenorm_hooks("self_attn", "mlp", "pre_feedforward_layernorm", "self_attn.o_proj", "mlp.down_proj"),
        "attn.out": ("post_attention_layernorm", "fwd"),
        "mlp.out": ("post_feedforward_layernorm", "fwd"),
    },
    logit_softcap_attr="final_logit_softcapping",
    post_sublayer_norm=True,
)

#: Phi-3: the Llama layout with a fused ``qkv_proj`` (q, then k, then v; sized by GQA) and a fused
#: ``gate_up_proj`` (gate = first half, up = second half, as ``Phi3MLP`` chunks it).
_PHI3 = replace(
    _LLAMA_LIKE,
    family="phi3",
    modules={
        "attn.q": ModuleSpec("self_attn.qkv_proj", out_slice=(0, 3), split="qkv"),
        "attn.k": ModuleSpec("self_attn.qkv_proj", out_slice=(1, 3), split="qkv"),
        "attn.v": ModuleSpec("self_attn.qkv_proj", out_slice=(2, 3), split="qkv"),
        "attn.o": ModuleSpec("self_attn.o_proj"),
        "mlp.gate": ModuleSpec("mlp.gate_up_proj", out_slice=(0, 2)),
        "mlp.up": ModuleSpec("mlp.gate_up_proj", out_slice=(1, 2)),
        "mlp.down": ModuleSpec("mlp.down_proj"),
    },
)

_GPT2 = ArchSpec(
    family="gpt2",
    **_prenorm_paths("transformer", layers="h", embed="wte", final_norm="ln_f", attn="attn", mlp="mlp",
                     ln1="ln_1", ln2="ln_2", attn_o="c_proj", mlp_down="c_proj"),
    modules={
        "attn.q": ModuleSpec("attn.c_attn", transposed=True, out_slice=(0, 3), split="qkv"),
        "attn.k": ModuleSpec("attn.c_attn", transposed=True, out_slice=(1, 3), split="qkv"),
        "attn.v": ModuleSpec("attn.c_attn", transposed=True, out_slice=(2, 3), split="qkv"),
        "attn.o": ModuleSpec("attn.c_proj", transposed=True),
        "mlp.up": ModuleSpec("mlp.c_fc", transposed=True),
        "mlp.down": ModuleSpec("mlp.c_proj", transposed=True),
    },
    norm="layernorm",
    n_heads_attr="n_head",
    n_kv_heads_attr=None,
    gated_mlp=False,
    tl_split_qkv=True,
    tl_hooks=_TL_HOOKS,
)

#: Config class name -> architecture row. Llama, Qwen2, Mistral and Qwen3 share one layout.
ARCH_TABLE: dict[str, ArchSpec] = {
    "LlamaConfig": _LLAMA_LIKE,
    "Qwen2Config": _LLAMA_LIKE,
    "MistralConfig": _LLAMA_LIKE,
    "Qwen3Config": _LLAMA_LIKE,
    "GemmaConfig": _GEMMA,
    "Gemma2Config": _GEMMA2,
    "Phi3Config": _PHI3,
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


def _fields_parser(cls: type, fn_name: str, doc: str) -> Callable[[str], tuple]:
    """A ``parse_*_name`` function: the fields of ``parse_as(name, cls)`` as a tuple
    (``(layer, kind)``, ``(layer, index)`` ...); any other label is refused like :func:`parse_as`."""
    def parser(name: str) -> tuple:
        return astuple(parse_as(name, cls))

    parser.__name__ = parser.__qualname__ = fn_name
    parser.__doc__ = doc
    return parser


#: The label grammar lives in :mod:`bias_lens.labels`; these give the plain tuples.
parse_module_name: Callable[[str], tuple[int, str]] = _fields_parser(
    ModuleLabel, "parse_module_name", '``"L12.mlp.down"`` -> ``(12, "mlp.down")``.')
parse_neuron_name: Callable[[str], tuple[int, int]] = _fields_parser(
    NeuronLabel, "parse_neuron_name", '``"L12N1021"`` -> ``(12, 1021)``.')
parse_head_name: Callable[[str], tuple[int, int]] = _fields_parser(
    HeadLabel, "parse_head_name", '``"L12H3"`` -> ``(12, 3)``.')
parse_hook_name: Callable[[str], tuple[int, str]] = _fields_parser(
    HookLabel, "parse_hook_name", '``"L3.mlp.post"`` -> ``(3, "mlp.post")``.')


def neurons_to_dict(labels: Iterable[str]) -> dict[int, list[int]]:
    """``["L3N7", "L3N9", "L5N1"]`` -> ``{3: [7, 9], 5: [1]}`` (the form :func:`bias_lens.hooks.mask_neurons` takes)."""
    out: dict[int, list[int]] = {}
    for lab in labels:
        layer, k = parse_neuron_name(lab)
        out.setdefault(layer, []).append(k)
    return out


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
        """The bias entries of this module in ``model`` (fused qkv: its rows), or None when it has no bias."""
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
        sizes = _slice_sizes(model, spec, mspec, out_dim)
        rows = slice(sum(sizes[:k]), sum(sizes[: k + 1]))
    return ParamRef(name, f"{prefix}.weight", bias_name, mspec.transposed, rows)


def _slice_sizes(model: nn.Module, spec: ArchSpec, mspec: ModuleSpec, out_dim: int) -> list[int]:
    """Output sizes of the parts of a fused weight (equal parts, or q / k / v under GQA)."""
    _, n = mspec.out_slice  # type: ignore[misc]
    if mspec.split == "qkv":
        cfg = model.config
        n_q = int(getattr(cfg, spec.n_heads_attr))
        n_kv = getattr(cfg, spec.n_kv_heads_attr, None) if spec.n_kv_heads_attr else None
        n_kv = n_q if n_kv is None else int(n_kv)
        d_head, rem = divmod(out_dim, n_q + 2 * n_kv)
        if rem or n != 3:
            raise ValueError(f"{mspec.path}: fused qkv of {out_dim} rows does not split into {n_q}+2x{n_kv} heads")
        return [n_q * d_head, n_kv * d_head, n_kv * d_head]
    if mspec.split != "equal" or out_dim % n:
        raise ValueError(f"{mspec.path}: cannot split {out_dim} output rows into {n} {mspec.split!r} parts")
    return [out_dim // n] * n


def block_param_names(model: nn.Module, layer: int) -> list[str]:
    """All HF parameter names of block ``layer``."""
    spec = arch_for(model)
    prefix = f"{spec.layers}.{layer}."
    return [n for n, _ in model.named_parameters() if n.startswith(prefix)]


def tl_hook_name(model: nn.Module, hook: str) -> str:
    """Translate one of our hook points to the TransformerLens bridge's hook name."""
    layer, kind = parse_hook_name(hook)
    return arch_for(model).tl_hooks[kind].format(l=layer)


def hf_hook_target(model: nn.Module, hook: str) -> tuple[nn.Module, str]:
    """The HF module implementing one of our hook points and how (:data:`HOOK_HOWS`)."""
    layer, kind = parse_hook_name(hook)
    spec = arch_for(model)
    path, how = spec.hf_hooks[kind]
    block = get_submodule(model, f"{spec.layers}.{layer}")
    return (get_submodule(block, path) if path else block), how


def weight_layouts(model: nn.Module) -> dict[str, str]:
    """Stored layout of every parameter: ``"in_out"`` for the weights the row marks as transposed
    (GPT-2 Conv1D), ``"out_in"`` for all others (nn.Linear, embeddings, norms, biases)."""
    spec = arch_for(model)
    paths = spec.transposed_paths()
    prefix = spec.layers + "."
    out = {}
    for name, _ in model.named_parameters(remove_duplicate=False):  # tied aliases too (lm_head.weight)
        rel = name[len(prefix):].split(".", 1)[1] if name.startswith(prefix) else ""
        out[name] = "in_out" if rel.endswith(".weight") and rel[: -len(".weight")] in paths else "out_in"
    return out


def norm_kind_of(model: nn.Module) -> str:
    """The norm kind (:data:`NORM_KINDS`) of every norm of ``model``'s family."""
    return arch_for(model).norm

