"""Circuit tracing: which upstream components write a neuron's input, a few levels deep.

Linearisation. FFN neuron k of layer l reads ``a_k = w_k . ln2(x) + b_k`` at the last real
token, with ``w_k`` its input row (gate row for gated MLPs by default, up row / GPT-2 ``c_fc``
otherwise) and x = ``resid_mid`` of layer l. With ln2's scale ``s2`` frozen at its actual value
(exact at the point itself), ``a_k`` is linear in x::

    a_k = (C(g2 * w_k) / s2) . x + (w_k . b2 + b_k)

and x is the sum of: the embedding output (``embed``: token + position embeddings), every head
output through its W_O slice of layers <= l (``L{l'}H{h}``; layer l's attention is before its
MLP), every neuron's ``m_j v_j`` of layers < l (``L{l'}N{j}``), and the o_proj / down_proj biases.
Those biases and the constant ``w_k . b2 + b_k`` form one ``bias`` node, so the contributions sum
exactly to ``a_k`` (tested). Edge weights are means over prompts; :func:`trace_circuit` keeps the
``top_k`` upstream components by |weight| per node and recurses into upstream neurons
``depth`` levels deep (heads, ``embed`` and ``bias`` are leaves; expanding a head would need its
attention pattern and all positions, which this last-position trace does not keep: that is
:func:`bias_lens.locate.circuit_positions.trace_circuit_positions`, which reuses
:func:`residual_contributions` at every position).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..arch import param_ref, parse_neuron_name
from ..labels import HeadLabel, NeuronLabel, parse_as, try_parse
from .attribution import LastCache, collect_last, head_out_weight, o_bias, value_vectors
from .query_neurons import input_rows, ln2
from .result import LocateResult

if TYPE_CHECKING:
    from ..lens import LensModel


def _bias_vec(lm, name: str) -> Tensor | None:
    b = param_ref(lm.hf, name).bias_view(lm.hf)
    return None if b is None else b.detach().double()


def check_neuron(lm: LensModel, label: str) -> tuple[int, int]:
    """``(layer, index)`` of FFN neuron ``label`` (``L{l}N{k}``); ValueError when it is out of the model's range."""
    l, k = parse_neuron_name(label)
    if not (0 <= l < lm.n_layers and 0 <= k < lm.d_mlp):
        raise ValueError(f"{label}: out of range (layers 0..{lm.n_layers - 1}, neurons 0..{lm.d_mlp - 1})")
    return l, k


def residual_contributions(
    lm: LensModel, cache: LastCache, r: Float[Tensor, "prompt d_model"], layer: int, *, mid: bool = True,
) -> tuple[list[str], Float[Tensor, "prompt component"]]:
    """Labels and per-prompt inner products ``r . c`` of every component c of a residual read.

    The residual is ``resid_mid`` of ``layer`` (``mid``: heads of layers <= ``layer``) or its
    ``resid_pre`` (heads of layers < ``layer``); neurons of layers < ``layer``. Columns: ``embed``,
    per layer its heads ``L{l}H{h}`` then its neurons ``L{l}N{j}``, last ``bias`` (o_proj and
    down_proj biases). One read direction per cache row, so callers that read another position or
    another unit (attention value rows) pass a cache of those rows and their own ``r``.
    """
    labels, cols = ["embed"], [(cache.resid_pre[0] * r).sum(-1, keepdim=True)]
    bias = torch.zeros(r.shape[0], dtype=torch.float64)
    H, dh = lm.n_heads, lm.d_head
    for lp in range(layer + 1 if mid else layer):
        rz = r @ head_out_weight(lm, lp)  # [prompt, H*dh]
        cols.append((cache.attn_z[lp] * rz).view(-1, H, dh).sum(-1))
        labels += [f"L{lp}H{h}" for h in range(H)]
        bo = o_bias(lm, lp)
        bias += r @ bo if bo is not None else 0.0
        if lp < layer:
            cols.append(cache.mlp_post[lp] * (r @ value_vectors(lm, lp)))
            labels += [f"L{lp}N{j}" for j in range(lm.d_mlp)]
            bd = _bias_vec(lm, f"L{lp}.mlp.down")
            bias += r @ bd if bd is not None else 0.0
    cols.append(bias[:, None])
    labels.append("bias")
    return labels, torch.cat(cols, 1)


def upstream_contributions(
    lm: LensModel, cache: LastCache, label: str, *, input_dir: str | None = None,
) -> tuple[list[str], Float[Tensor, "prompt component"], Float[Tensor, " prompt"]]:
    """Labels, per-prompt contributions to neuron ``label``'s input, and the input itself."""
    l, k = check_neuron(lm, label)
    fn = ln2(lm, l)
    w = input_rows(lm, l, input_dir)[k]
    r = fn.read_dir(w)[None] / fn.scale(cache.resid_mid[l])  # [prompt, d_model]
    labels, contrib = residual_contributions(lm, cache, r, l, mid=True)
    const = float(w @ fn.bias) if fn.bias is not None else 0.0
    b_in = _bias_vec(lm, f"L{l}.mlp.{input_dir or ('gate' if lm.arch.gated_mlp else 'up')}")
    const += float(b_in[k]) if b_in is not None else 0.0
    contrib[:, -1] += const
    return labels, contrib, contrib.sum(1)


@dataclass
class CircuitGraph:
    """Nodes (``label``, ``layer``, ``kind``, mean input ``value`` for neurons) and weighted edges."""

    root: str
    nodes: list[dict] = field(default_factory=list)
    edges: list[dict] = field(default_factory=list)
    variant: str = ""
    n_prompts: int = 0
    model: str = ""

    def to_dict(self) -> dict:
        """The graph as plain dicts and lists (JSON-ready)."""
        return asdict(self)

    def to_json(self, **kw: Any) -> str:
        """The graph as a JSON string (``kw`` is passed to :func:`json.dumps`)."""
        return json.dumps(self.to_dict(), **kw)

    def to_result(self) -> LocateResult:
        """Edges into the root as a LocateResult (scores = |mean contribution|)."""
        into = [e for e in self.edges if e["target"] == self.root]
        return LocateResult(
            "circuit", [e["source"] for e in into], torch.tensor([abs(e["weight"]) for e in into], dtype=torch.float64),
            variant=self.variant, model=self.model, n_samples=self.n_prompts,
            extras={"signed": [e["weight"] for e in into], "root": self.root, "graph": self.to_dict()},
        )


def _node(label: str) -> dict:
    if label in ("embed", "bias"):
        return {"label": label, "layer": -1, "kind": label}
    lab = parse_as(label, HeadLabel, NeuronLabel)
    return {"label": label, "layer": lab.layer, "kind": lab.KIND}


def trace_circuit(
    lm: LensModel, root: str, prompts: Sequence[str] | None = None, *, cache: LastCache | None = None, top_k: int = 5,
    depth: int = 2, input_dir: str | None = None, batch_size: int = 32,
) -> CircuitGraph:
    """Recursive top-``top_k`` upstream trace from neuron ``root`` (``L{l}N{k}``)."""
    if top_k < 1 or depth < 1:
        raise ValueError("top_k and depth must be >= 1")
    if isinstance(try_parse(root), HeadLabel):
        raise ValueError(f"{root}: tracing from a head is not supported (heads are leaves); start from a neuron L{{l}}N{{k}}")
    parse_as(root, NeuronLabel)  # a clear error before the cache pass
    if cache is None:
        if prompts is None:
            raise ValueError("pass prompts or a cache")
        cache = collect_last(lm, prompts, batch_size=batch_size)
    g = CircuitGraph(root, variant=f"last-position,ln2-frozen-scale,input={input_dir or ('gate' if lm.arch.gated_mlp else 'up')}",
                     n_prompts=cache.n_prompts, model=lm.name)
    seen: dict[str, dict] = {}
    frontier = [root]
    for _ in range(depth):
        nxt = []
        for label in frontier:
            labels, contrib, total = upstream_contributions(lm, cache, label, input_dir=input_dir)
            seen.setdefault(label, _node(label))["value"] = float(total.mean())
            mean = contrib.mean(0)
            for i in torch.argsort(mean.abs(), descending=True, stable=True)[:top_k].tolist():
                src = labels[i]
                g.edges.append({"source": src, "target": label, "weight": float(mean[i])})
                if src not in seen:
                    seen[src] = _node(src)
                    if seen[src]["kind"] == "neuron":
                        nxt.append(src)
        frontier = nxt
    g.nodes = list(seen.values())
    return g
