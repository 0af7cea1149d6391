"""Parameter masks: which entries of which real HF weights an edit may touch.

A :class:`ParamMask` maps HF parameter names (``model.layers.3.mlp.down_proj.weight``) to boolean
tensors of the parameter's *stored* shape (GPT-2 Conv1D stays ``[in, out]``). Builders translate
our labels (parsed by :mod:`bias_lens.labels`) into entries through :func:`bias_lens.arch.param_ref`,
so orientation and fused qkv slicing are decided in one place:

* ``L{i}`` (layer): every parameter of block i (weights, biases, norms);
* ``L{i}.attn.q`` ... ``L{i}.mlp.down`` (module): the module's weight (its rows of a fused qkv)
  and bias;
* ``L{i}.mlp.down/row{r}``: row r of the ``[out, in]`` weight (no bias);
* ``L{i}.mlp.down/row{r}/col{c}``: one weight entry (MSME's "neuron" scale);
* ``L{i}N{k}`` (FFN neuron): column k of the down projection plus row k (and bias entry k) of
  gate/up — everything that reads or writes neuron k;
* ``L{i}H{h}`` (head): the head's rows of the query projection (and q bias) plus its columns of
  the output projection. K/V rows are shared by a group of heads under GQA and are excluded by
  default (``head_kv=True`` includes the group's K/V rows).

``mask.size`` is the number of editable entries, the papers' Cost-P.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..arch import block_param_names, param_ref
from ..arch import neurons_to_dict as neurons_to_dict  # re-exported: its home is arch (locate uses it too)
from ..labels import EntryLabel, HeadLabel, LayerLabel, ModuleLabel, NeuronLabel, RowLabel, parse_as

if TYPE_CHECKING:
    from ..lens import LensModel
    from ..locate.result import LocateResult

#: the label kinds a mask can be built from (value neurons and hook points name activations, not weights)
MASK_LABELS = (LayerLabel, ModuleLabel, RowLabel, EntryLabel, NeuronLabel, HeadLabel)


def _model(obj) -> nn.Module:
    return obj.hf if hasattr(obj, "hf") else obj


@dataclass
class ParamMask:
    """HF parameter name -> boolean mask of the parameter's stored shape."""

    masks: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, m in self.masks.items():
            if m.dtype != torch.bool:
                raise ValueError(f"mask for {name} must be a bool tensor, got {m.dtype}")

    # ------------------------------------------------------------------ size / views
    @property
    def size(self) -> int:
        """Number of masked entries (Cost-P)."""
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def names(self) -> list[str]:
        """Parameter names with at least one masked entry."""
        return [n for n, m in self.masks.items() if bool(m.any())]

    def counts(self) -> dict[str, int]:
        """Masked entries per parameter (parameters with none left out)."""
        return {n: int(m.sum()) for n, m in self.masks.items() if bool(m.any())}

    def indices(self, name: str) -> Tensor:
        """Flat (row-major, stored layout) indices of the masked entries of ``name``."""
        return torch.nonzero(self.masks[name].reshape(-1), as_tuple=False)[:, 0]

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"ParamMask({len(self.names)} tensors, {self.size} entries)"

    # ------------------------------------------------------------------ algebra
    def _combine(self, other: "ParamMask", op: Callable[[Tensor, Tensor], Tensor], keep_missing: bool) -> "ParamMask":
        out: dict[str, Tensor] = {}
        for name in set(self.masks) | set(other.masks):
            a, b = self.masks.get(name), other.masks.get(name)
            if a is not None and b is not None:
                if a.shape != b.shape:
                    raise ValueError(f"masks for {name} have different shapes {tuple(a.shape)} and {tuple(b.shape)}")
                out[name] = op(a, b)
            elif keep_missing:
                out[name] = (a if a is not None else b).clone()
        return ParamMask({n: m for n, m in out.items() if bool(m.any())})

    def union(self, other: "ParamMask") -> "ParamMask":
        """Entries masked in either mask (also ``|``)."""
        return self._combine(other, torch.logical_or, keep_missing=True)

    def intersection(self, other: "ParamMask") -> "ParamMask":
        """Entries masked in both masks (also ``&``)."""
        return self._combine(other, torch.logical_and, keep_missing=False)

    __or__ = union
    __and__ = intersection

    def filter(self, keep: Callable[[str], bool]) -> "ParamMask":
        """Only the tensors whose HF name satisfies ``keep`` (e.g. drop attention for an ablation)."""
        return ParamMask({n: m.clone() for n, m in self.masks.items() if keep(n)})

    def check(self, model: nn.Module | LensModel) -> None:
        """Raise ValueError unless every masked tensor exists in ``model`` with the mask's shape."""
        params = dict(_model(model).named_parameters())
        for name, m in self.masks.items():
            if name not in params:
                raise ValueError(f"mask names parameter {name!r}, which this model does not have")
            if tuple(params[name].shape) != tuple(m.shape):
                raise ValueError(
                    f"mask for {name} has shape {tuple(m.shape)} but the parameter is {tuple(params[name].shape)}"
                )


def without_attention(mask: ParamMask, model: nn.Module | LensModel) -> ParamMask:
    """LFTF ablation "w/o attention": drop every tensor inside an attention sub-block."""
    from ..arch import arch_for

    attn = arch_for(_model(model)).attn
    return mask.filter(lambda n: f".{attn}." not in n)


def without_mlp(mask: ParamMask, model: nn.Module | LensModel) -> ParamMask:
    """LFTF ablation "w/o MLP": drop every tensor inside an MLP sub-block."""
    from ..arch import arch_for

    mlp = arch_for(_model(model)).mlp
    return mask.filter(lambda n: f".{mlp}." not in n)


# --------------------------------------------------------------------------- builders
class _Builder:
    """Accumulates True entries into zero masks of each parameter's stored shape."""

    def __init__(self, model) -> None:
        self.model = _model(model)
        self.params = dict(self.model.named_parameters())
        self.masks: dict[str, Tensor] = {}

    def tensor(self, name: str) -> Tensor:
        if name not in self.masks:
            self.masks[name] = torch.zeros(self.params[name].shape, dtype=torch.bool)
        return self.masks[name]

    def oriented(self, module: str) -> tuple[Tensor, Tensor | None]:
        """Weight mask and bias mask of ``module`` as ``[out, in]`` / ``[out]`` views."""
        ref = param_ref(self.model, module)
        w = self.tensor(ref.weight_name)
        w = w.T if ref.transposed else w
        w = w[ref.rows] if ref.rows is not None else w
        b = None
        if ref.bias_name is not None:
            b = self.tensor(ref.bias_name)
            b = b[ref.rows] if ref.rows is not None else b
        return w, b

    def done(self) -> ParamMask:
        return ParamMask({n: m for n, m in self.masks.items() if bool(m.any())})


def _n_layers(model: nn.Module) -> int:
    from ..arch import arch_for, get_submodule

    return len(get_submodule(model, arch_for(model).layers))


def _add_label(b: _Builder, label: str, *, head_kv: bool) -> None:
    lab = parse_as(label, *MASK_LABELS)
    if isinstance(lab, LayerLabel):
        layer = lab.layer
        if not 0 <= layer < _n_layers(b.model):
            raise ValueError(f"{label!r}: layer out of range 0..{_n_layers(b.model) - 1}")
        for name in block_param_names(b.model, layer):
            b.tensor(name).fill_(True)
        return
    if isinstance(lab, (RowLabel, EntryLabel)):
        w, _ = b.oriented(str(lab.module))
        r = lab.row
        if not 0 <= r < w.shape[0]:
            raise ValueError(f"{label!r}: row {r} out of range 0..{w.shape[0] - 1}")
        if isinstance(lab, RowLabel):
            w[r] = True
        else:
            c = lab.col
            if not 0 <= c < w.shape[1]:
                raise ValueError(f"{label!r}: column {c} out of range 0..{w.shape[1] - 1}")
            w[r, c] = True
        return
    if isinstance(lab, NeuronLabel):
        layer, k = lab.layer, lab.index
        w, _ = b.oriented(f"L{layer}.mlp.down")
        if not 0 <= k < w.shape[1]:
            raise ValueError(f"{label!r}: neuron {k} out of range 0..{w.shape[1] - 1}")
        w[:, k] = True
        from ..arch import arch_for

        kinds = ("mlp.gate", "mlp.up") if arch_for(b.model).gated_mlp else ("mlp.up",)
        for kind in kinds:
            wi, bi = b.oriented(f"L{layer}.{kind}")
            wi[k] = True
            if bi is not None:
                bi[k] = True
        return
    if isinstance(lab, HeadLabel):
        _add_head(b, lab, head_kv=head_kv)
        return
    w, bias = b.oriented(label)  # ModuleLabel
    w.fill_(True)
    if bias is not None:
        bias.fill_(True)


def _add_head(b: _Builder, label: HeadLabel, *, head_kv: bool) -> None:
    from ..arch import arch_for

    layer, h = label.layer, label.head
    spec = arch_for(b.model)
    cfg = b.model.config
    n_heads = int(getattr(cfg, spec.n_heads_attr))
    if not 0 <= h < n_heads:
        raise ValueError(f"{str(label)!r}: head {h} out of range 0..{n_heads - 1}")
    wq, bq = b.oriented(f"L{layer}.attn.q")
    d_head = wq.shape[0] // n_heads
    sl = slice(h * d_head, (h + 1) * d_head)
    wq[sl] = True
    if bq is not None:
        bq[sl] = True
    wo, _ = b.oriented(f"L{layer}.attn.o")
    wo[:, sl] = True
    if head_kv:
        n_kv = int(getattr(cfg, spec.n_kv_heads_attr) or n_heads) if spec.n_kv_heads_attr else n_heads
        g = h // (n_heads // n_kv)
        for kind in ("attn.k", "attn.v"):
            wk, bk = b.oriented(f"L{layer}.{kind}")
            ksl = slice(g * d_head, (g + 1) * d_head)
            wk[ksl] = True
            if bk is not None:
                bk[ksl] = True


def mask_from_labels(model: nn.Module | LensModel, labels: Iterable[str], *, head_kv: bool = False) -> ParamMask:
    """A mask covering every label (layer, module, row, entry, neuron or head; may be mixed)."""
    b = _Builder(model)
    labels = list(labels)
    if not labels:
        raise ValueError("no labels given; pass at least one label such as L3.mlp.down or L3N17")
    for label in labels:
        _add_label(b, str(label), head_kv=head_kv)
    return b.done()


def mask_from_result(model: nn.Module | LensModel, result: LocateResult, k: int | None = None, *, head_kv: bool = False) -> ParamMask:
    """A mask of the ``k`` most important labels of a :class:`~bias_lens.locate.result.LocateResult`.

    ``k=None`` takes ``result.extras["selected"]`` when the method made a selection, else all labels.
    """
    if k is None:
        sel = result.extras.get("selected") if isinstance(result.extras, dict) else None
        labels = list(sel) if sel else list(result.labels)
    else:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        labels = result.top_labels(k)
    return mask_from_labels(model, labels, head_kv=head_kv)


def mask_all(model: nn.Module | LensModel, *, include: Callable[[str], bool] | None = None) -> ParamMask:
    """Every (optionally filtered) parameter entry: full-parameter fine-tuning (FPFT)."""
    return ParamMask({
        n: torch.ones(p.shape, dtype=torch.bool)
        for n, p in _model(model).named_parameters()
        if include is None or include(n)
    })


def mask_from_neurons(model: nn.Module | LensModel, neurons: Mapping[int, Sequence[int]]) -> ParamMask:
    """A mask of the neurons ``{layer: [index, ...]}`` (same as their ``L{l}N{k}`` labels)."""
    return mask_from_labels(model, [f"L{l}N{k}" for l, ks in neurons.items() for k in ks])
