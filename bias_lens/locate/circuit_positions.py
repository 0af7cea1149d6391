"""Circuits across positions: FFN value neurons <- heads <- attention value neurons <- FFN query neurons.

The interpretable-neuron-editing paper (arXiv 2501.14457; reference code
``zepingyu0512/neuron-attribution``) reads a circuit across positions: shallow FFN *query* neurons at
source positions write into the residual there, an attention head's *value neurons* ``L{l}H{h}V{d}``
read it at that source position and carry it to the last position, where deep FFN *value* neurons
read it. :func:`trace_circuit_positions` follows that path back from FFN neurons at the last
position; :mod:`bias_lens.locate.circuit` is the last-position-only trace (heads as leaves).

Linearisation (exact at the point itself). Every norm's scale is frozen at its actual value at the
position where it is applied, and every attention probability is frozen; then each unit's
*coefficient* is a sum of the upstream components' contributions, with a ``bias`` node holding the
constants, so the contributions into a node sum exactly to its value (tested):

* FFN neuron k of layer l at position p (``L{l}N{k}``): its input ``w_k . ln2(x) + b_k`` (gate row
  by default) = ``(C(g2 w_k) / s2(p)) . x_l^mid(p) + const``, split by
  :func:`~bias_lens.locate.circuit.upstream_contributions` over ``embed``, the heads of layers <= l
  at p, the neurons of layers < l at p and ``bias``.
* attention value neuron d of head h of layer l, reading source position q for query position p
  (``L{l}H{h}V{d}@q>p``): its coefficient ``a[h, p, q] * v[q, kv(h) d_head + d]`` (the reference's
  "subvalue"), with ``v = W_V ln1(x) + b_V`` = ``(value_row / s1(q)) . x_l^pre(q) + W_V.b1 + b_V``
  (:func:`~bias_lens.locate.value_neurons.value_row`; grouped KV heads through ``kv_head``), split
  over ``embed``, the heads and neurons of layers < l at q and ``bias``. Its share of an FFN query
  neuron ``m_j (v_j . k_u) / (x . k_u)`` is the reference's query-neuron weight (the reference's x
  has no b_V; Llama has none).
* head h of layer l at position p (``L{l}H{h}@p``): the sum of its pieces, ``R . W_O[:, h] z_h(p)``
  with ``z_h(p)[d] = sum_q a[h, p, q] v[q, d]``. A head has no scalar of its own, so ``R`` is the sum
  of the read directions of the graph nodes that took an edge from it: the head's value is the sum
  of its out-edges (in the units of those nodes' coefficients), and the piece ``(d, q)`` gets the
  edge ``a v[q, d] (R . W_O[:, h d_head + d])``; these sum to the head's value.

Edge ``weight`` = mean over prompts of the source's contribution to the target's coefficient;
``share`` = weight / target value. Node ``score``: the root's importance (``targets`` given: its
cached-norm bias score, the t1 - t0 logit-difference change of
:func:`~bias_lens.locate.attribution.neuron_scores`; else 1) passed down by shares,
``score(src) = sum over edges share * score(target)``: the reference's reading (an FFN query neuron's
score = its share of the attention value neuron's inner product x its importance).

Positions. The reference traces one prompt; that is the default reading (pass one prompt). Several
prompts are allowed only if they tokenise to the same length (one template with one-token slots):
positions are then aligned by token index, every number is a mean over prompts, and a node's
``token`` lists the distinct tokens at its position joined by ``/``. Prompts of different lengths
raise (trace them one at a time). The cache is one eager forward pass keeping every position.

Selection. In topological order (layer descending; within a layer FFN, then heads, then value
neurons), every node within ``depth`` edges of a root is expanded: FFN and value-neuron nodes keep
their ``top_heads`` heads and ``top_neurons`` other components (FFN neurons, ``embed``, ``bias``) by
|weight|; heads keep their ``top_pieces`` pieces. Exactly-zero contributions are never edges. An
expanded node's ``rest`` = value - sum of its kept in-edges.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..arch import get_submodule
from ..hooks import module_hooks, record_into
from ..labels import HeadLabel, NeuronLabel, ValueNeuronLabel, parse_as
from ..scoring import check_prompts, iter_batches, tokenize
from ..targets import TargetSet
from .attribution import LastCache, base_model, check_pair, head_out_weight, neuron_scores, norm_parts
from .circuit import CircuitGraph, check_neuron, residual_contributions, upstream_contributions
from .projection import neuron_vocab_projection, projection_logits
from .query_neurons import read_dirs
from .result import LocateResult
from .value_neurons import eager_attention, kv_head, value_row, value_weight

if TYPE_CHECKING:
    from ..lens import LensModel

_KINDS = ("resid_pre", "resid_mid", "attn.z", "mlp.post")


# --------------------------------------------------------------------------- cache
@dataclass
class PositionCache:
    """Every position's activations of one or more equal-length prompts (float64, CPU).

    ``flat`` is a :class:`LastCache` whose row ``prompt * n_pos + pos`` is that prompt's position;
    ``probs[l]`` the attention probabilities ``[prompt, head, query, key]`` of layer l.
    """

    flat: LastCache
    probs: Float[Tensor, "layer prompt head pos pos"]
    tokens: list[list[str]]
    prompts: list[str] = field(default_factory=list)
    _rows: dict[int, LastCache] = field(default_factory=dict, repr=False)

    @property
    def n_prompts(self) -> int:
        """Number of prompts."""
        return len(self.tokens)

    @property
    def n_pos(self) -> int:
        """Tokens per prompt (the same for every prompt)."""
        return len(self.tokens[0])

    def at(self, pos: int) -> LastCache:
        """The cache of position ``pos`` of every prompt (rows = prompts), as the last-position code reads it."""
        if not 0 <= pos < self.n_pos:
            raise ValueError(f"position {pos} out of range 0..{self.n_pos - 1}")
        if pos not in self._rows:
            r = torch.arange(self.n_prompts) * self.n_pos + pos
            c = self.flat
            self._rows[pos] = LastCache(c.resid_pre[:, r], c.resid_mid[:, r], c.attn_z[:, r], c.mlp_post[:, r], c.final[r])
        return self._rows[pos]

    def token(self, pos: int) -> str:
        """The distinct tokens at ``pos`` over prompts, joined by ``/``."""
        return "/".join(dict.fromkeys(t[pos] for t in self.tokens))


def _prob_hooks(lm: LensModel, into: dict[int, Tensor]) -> list:
    def keep(layer: int):
        def fn(module, args, kwargs, out) -> None:
            if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
                raise RuntimeError(f"layer {layer}'s attention returned no probabilities under eager attention")
            into[layer] = out[1].detach().double().cpu()
        return fn
    return [(get_submodule(lm.block(l), lm.arch.attn), keep(l)) for l in range(lm.n_layers)]


@torch.no_grad()
def collect_positions(lm: LensModel, prompts: str | Sequence[str], *, batch_size: int = 16) -> PositionCache:
    """One eager forward pass keeping every position of every layer (residuals, z, neuron activations,
    attention probabilities); prompts must tokenise to the same length (positions align by index)."""
    prompts = check_prompts([prompts] if isinstance(prompts, str) else prompts)
    ids = tokenize(lm.tokenizer, prompts)
    if len({len(i) for i in ids}) > 1:
        lens = {p: len(i) for p, i in zip(prompts, ids)}
        raise ValueError(f"prompts tokenise to different lengths {lens}; positions are aligned by token index, so "
                         "trace prompts of one length together (one template) or one prompt at a time")
    L = lm.n_layers
    points = [f"L{l}.{k}" for l in range(L) for k in _KINDS] + [f"L{L - 1}.resid_post"]
    parts: dict[str, list[Tensor]] = {p: [] for p in points}
    probs: list[Tensor] = []
    with eager_attention(lm):
        for b in iter_batches(lm.tokenizer, prompts, batch_size, device=lm.device, sort=False, token_ids=ids):
            store: dict[str, Tensor] = {}
            pr: dict[int, Tensor] = {}
            with module_hooks(forward=_prob_hooks(lm, pr)), lm.hooks(record_into(store, points)):
                base_model(lm)(**b.model_inputs())
            for p in points:
                parts[p].append(store[p].double().cpu())
            probs.append(torch.stack([pr[l] for l in range(L)]))
    flat = {p: torch.cat(v).flatten(0, 1) for p, v in parts.items()}  # [prompt * pos, d]
    stack = lambda k: torch.stack([flat[f"L{l}.{k}"] for l in range(L)])  # noqa: E731
    cache = LastCache(stack("resid_pre"), stack("resid_mid"), stack("attn.z"), stack("mlp.post"),
                      flat[f"L{L - 1}.resid_post"])
    toks = [[lm.tokenizer.decode([t]) for t in row] for row in ids]
    return PositionCache(cache, torch.cat(probs, 1), toks, prompts)


# --------------------------------------------------------------------------- per-unit decompositions
def head_pieces(lm: LensModel, pc: PositionCache, layer: int, head: int, pos: int) -> Float[Tensor, "prompt d_head pos"]:
    """``a[h, pos, q] * v[q, kv(h) d_head + d]`` of head ``head`` for every dim d and source ``q <= pos``:
    the pieces whose sum over q is ``z_h(pos)`` (the head's o_proj input)."""
    P, T, dh = pc.n_prompts, pc.n_pos, lm.d_head
    x = pc.flat.resid_pre[layer].view(P, T, -1)[:, : pos + 1]
    W, bv = value_weight(lm, layer)
    rows = slice(kv_head(lm, head) * dh, (kv_head(lm, head) + 1) * dh)
    fn = norm_parts(get_submodule(lm.block(layer), lm.arch.ln1), lm.arch.norm)
    v = fn.apply(x) @ W[rows].T  # [prompt, q, d_head]
    v = v + bv[rows] if bv is not None else v
    a = pc.probs[layer][:, head, pos, : pos + 1]  # [prompt, q]
    return (a[:, :, None] * v).transpose(1, 2)


def value_neuron_contributions(
    lm: LensModel, pc: PositionCache, layer: int, head: int, dim: int, src: int, dest: int,
) -> tuple[list[str], Float[Tensor, "prompt component"], Float[Tensor, "prompt d_model"]]:
    """Labels and per-prompt contributions to ``a[h, dest, src] * v[src, kv(h) d_head + dim]``, and the
    read direction ``a * value_row / s1(src)`` (for the heads it reads)."""
    if not 0 <= src <= dest < pc.n_pos:
        raise ValueError(f"need 0 <= src <= dest < {pc.n_pos} (causal attention), got src={src}, dest={dest}")
    c = pc.at(src)
    fn = norm_parts(get_submodule(lm.block(layer), lm.arch.ln1), lm.arch.norm)
    a = pc.probs[layer][:, head, dest, src][:, None]  # [prompt, 1]
    r = a * value_row(lm, layer, head, dim)[None] / fn.scale(c.resid_pre[layer])
    labels, contrib = residual_contributions(lm, c, r, layer, mid=False)
    W, bv = value_weight(lm, layer)
    row = kv_head(lm, head) * lm.d_head + dim
    const = (float(W[row] @ fn.bias) if fn.bias is not None else 0.0) + (float(bv[row]) if bv is not None else 0.0)
    contrib[:, -1] += a[:, 0] * const
    return labels, contrib, r


# --------------------------------------------------------------------------- units
_STAGE = {"value": 0, "head": 1, "ffn": 2, "embed": -1, "bias": -1}  # order inside a layer (attention before MLP)


@dataclass(frozen=True)
class _Unit:
    """A graph unit: a labelled component at a position (value neurons: source ``pos``, query ``dest``)."""

    kind: str  # ffn | head | value | embed | bias
    lab: NeuronLabel | HeadLabel | ValueNeuronLabel | None
    pos: int
    dest: int = -1

    @property
    def layer(self) -> int:
        return self.lab.layer if self.lab is not None else -1

    @property
    def label(self) -> str:
        return str(self.lab) if self.lab is not None else self.kind

    @property
    def id(self) -> str:
        return f"{self.label}@{self.pos}" + (f">{self.dest}" if self.kind == "value" else "")

    def key(self) -> tuple:
        return (-self.layer, -_STAGE[self.kind], self.id)


def _component(label: str, pos: int) -> _Unit:
    """The unit a column of :func:`residual_contributions` names, at position ``pos``."""
    if label in ("embed", "bias"):
        return _Unit(label, None, pos)
    lab = parse_as(label, HeadLabel, NeuronLabel)
    return _Unit("head" if isinstance(lab, HeadLabel) else "ffn", lab, pos)


def _select(labels: list[str], mean: Tensor, n_heads: int, n_other: int) -> list[int]:
    """Indices of the ``n_heads`` heads and ``n_other`` other components of largest |mean| (never exact zeros)."""
    out, heads, other = [], 0, 0
    for i in torch.argsort(mean.abs(), descending=True, stable=True).tolist():
        if float(mean[i]) == 0.0 or (heads >= n_heads and other >= n_other):
            break
        is_head = labels[i] not in ("embed", "bias") and isinstance(parse_as(labels[i], HeadLabel, NeuronLabel), HeadLabel)
        if is_head and heads < n_heads:
            heads += 1
            out.append(i)
        elif not is_head and other < n_other:
            other += 1
            out.append(i)
    return out


# --------------------------------------------------------------------------- trace
@dataclass
class _Trace:
    """Topological expansion state: nodes, edges, heads' accumulated read directions, depths, scores."""

    lm: LensModel
    pc: PositionCache
    top_heads: int
    top_pieces: int
    top_neurons: int
    depth: int
    input_dir: str | None
    nodes: dict[_Unit, dict] = field(default_factory=dict)
    edges: list[dict] = field(default_factory=list)
    reads: dict[_Unit, Tensor] = field(default_factory=dict)
    level: dict[_Unit, int] = field(default_factory=dict)
    score: dict[_Unit, float] = field(default_factory=dict)
    out_sum: dict[_Unit, float] = field(default_factory=dict)
    heap: list = field(default_factory=list)

    def add(self, u: _Unit, level: int, score: float = 0.0) -> None:
        if u not in self.level:
            self.level[u], self.score[u] = level, score
            heapq.heappush(self.heap, (u.key(), u))
        else:
            self.level[u] = min(self.level[u], level)

    def link(self, src: _Unit, tgt: _Unit, weight: float, value: float, read: Tensor | None) -> None:
        share = weight / value if abs(value) > 1e-12 else None  # None: the target's value is 0 (JSON-safe)
        self.edges.append({"source": src.id, "target": tgt.id, "weight": weight, "share": share})
        self.add(src, self.level[tgt] + 1)
        self.score[src] += share * self.score[tgt] if share is not None else 0.0
        self.out_sum[src] = self.out_sum.get(src, 0.0) + weight
        if src.kind == "head":
            self.reads[src] = self.reads[src] + read if src in self.reads else read.clone()

    def run(self) -> None:
        while self.heap:
            _, u = heapq.heappop(self.heap)
            node = {"id": u.id, "label": u.label, "kind": u.kind, "layer": u.layer, "position": u.pos,
                    "token": self.pc.token(u.pos), "score": self.score[u], "depth": self.level[u]}
            self.nodes[u] = node
            expand = self.level[u] < self.depth and u.kind not in ("embed", "bias")
            node["expanded"] = expand
            {"ffn": self._ffn, "value": self._value, "head": self._head}.get(u.kind, self._leaf)(u, node, expand)

    def _leaf(self, u: _Unit, node: dict, expand: bool) -> None:
        node["value"] = self.out_sum.get(u, 0.0)

    def _columns(self, u: _Unit, node: dict, labels: list[str], contrib: Tensor, read: Tensor) -> None:
        mean = contrib.mean(0)
        kept = _select(labels, mean, self.top_heads, self.top_neurons)
        for i in kept:
            self.link(_component(labels[i], u.pos), u, float(mean[i]), node["value"], read)
        node["rest"] = node["value"] - sum(float(mean[i]) for i in kept)

    def _ffn(self, u: _Unit, node: dict, expand: bool) -> None:
        c = self.pc.at(u.pos)
        labels, contrib, total = upstream_contributions(self.lm, c, u.label, input_dir=self.input_dir)
        node["kind"] = "ffn-value" if u.pos == self.pc.n_pos - 1 else "ffn-query"
        node["value"] = float(total.mean())
        node["activation"] = float(c.mlp_post[u.layer][:, u.lab.index].mean())
        if expand:
            self._columns(u, node, labels, contrib, read_dirs(self.lm, c, u.layer, [u.lab.index], self.input_dir)[:, 0])

    def _value(self, u: _Unit, node: dict, expand: bool) -> None:
        lab = u.lab
        labels, contrib, read = value_neuron_contributions(self.lm, self.pc, lab.layer, lab.head, lab.dim, u.pos, u.dest)
        node.update(kind="attn-value", head=str(lab.head_label), dest=u.dest, value=float(contrib.sum(1).mean()),
                    attention=float(self.pc.probs[lab.layer][:, lab.head, u.dest, u.pos].mean()))
        if expand:
            self._columns(u, node, labels, contrib, read)

    def _head(self, u: _Unit, node: dict, expand: bool) -> None:
        l, h, dh = u.layer, u.lab.head, self.lm.d_head
        c = head_pieces(self.lm, self.pc, l, h, u.pos)  # [prompt, d_head, q]
        wo = self.reads[u] @ head_out_weight(self.lm, l)[:, h * dh : (h + 1) * dh]  # [prompt, d_head]
        w = (c * wo[:, :, None]).mean(0)  # [d_head, q]
        node["value"] = float(w.sum())
        if not expand:
            return
        flat = w.flatten()
        kept = [i for i in torch.argsort(flat.abs(), descending=True, stable=True)[: self.top_pieces].tolist()
                if float(flat[i]) != 0.0]
        for i in kept:
            d, q = divmod(i, w.shape[1])
            self.link(_Unit("value", ValueNeuronLabel(l, h, d), q, u.pos), u, float(flat[i]), node["value"], None)
        node["rest"] = node["value"] - sum(float(flat[i]) for i in kept)


def _add_vocab(lm: LensModel, pc: PositionCache, nodes: dict[_Unit, dict], k: int) -> None:
    """``top`` / ``bottom`` tokens of each unit's output direction through the unembedding (FFN and value
    neurons: their fixed directions; a head: its actual output ``W_O z_h`` at its position, mean over prompts)."""
    labels = sorted({u.label for u in nodes if u.kind in ("ffn", "value")})
    proj = neuron_vocab_projection(lm, labels, k) if labels else {}
    dh = lm.d_head
    for u, node in nodes.items():
        if u.kind in ("ffn", "value"):
            node.update(proj[u.label])
        elif u.kind == "head":
            h = u.lab.head
            z = pc.at(u.pos).attn_z[u.layer][:, h * dh : (h + 1) * dh].mean(0)  # [d_head]
            logits = z @ projection_logits(lm, [str(ValueNeuronLabel(u.layer, h, d)) for d in range(dh)])
            dec = lambda ids: [lm.tokenizer.decode([int(i)]) for i in ids]  # noqa: E731
            node.update(top=dec(logits.topk(k).indices), bottom=dec((-logits).topk(k).indices))


@dataclass
class PositionGraph(CircuitGraph):
    """A circuit across positions: nodes keyed by ``id`` (``L{l}N{k}@pos``, ``L{l}H{h}@pos``,
    ``L{l}H{h}V{d}@src>dest``, ``embed@pos``, ``bias@pos``), edges between ids (see the module docstring).
    ``root`` is the first root's id; ``tokens`` the prompts' tokens by position."""

    roots: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    tokens: list[list[str]] = field(default_factory=list)

    def to_result(self) -> LocateResult:
        """Every unit label of the graph except the roots, ``embed`` and ``bias`` (a unit at several positions
        is one label, its node scores summed); scores = |summed score|, ``extras["signed"]`` the sums."""
        total: dict[str, float] = {}
        pos: dict[str, list[int]] = {}
        kind: dict[str, str] = {}
        for n in self.nodes:
            if n["id"] in self.roots or n["kind"] in ("embed", "bias"):
                continue
            total[n["label"]] = total.get(n["label"], 0.0) + n["score"]
            pos.setdefault(n["label"], []).append(n["position"])
            kind.setdefault(n["label"], n["kind"])
        labels = list(total)
        signed = torch.tensor([total[lab] for lab in labels], dtype=torch.float64)
        return LocateResult(
            "circuit-positions", labels, signed.abs(), variant=self.variant, model=self.model, n_samples=self.n_prompts,
            extras={"signed": signed.tolist(), "roots": list(self.roots), "kind": [kind[lab] for lab in labels],
                    "positions": [pos[lab] for lab in labels], "graph": self.to_dict()},
        )


def _check_roots(lm: LensModel, roots: Sequence[str]) -> list[tuple[int, int]]:
    if not roots:
        raise ValueError("pass at least one root FFN neuron L{l}N{k} (e.g. the top of neuron_attribution)")
    for r in roots:
        parse_as(r, NeuronLabel)  # names the label's kind if it is a head or a value neuron
    return [check_neuron(lm, r) for r in roots]


def trace_circuit_positions(
    lm: LensModel, roots: str | Sequence[str], prompts: str | Sequence[str] | None = None, *,
    cache: PositionCache | None = None, targets: TargetSet | str | None = None, top_heads: int = 3,
    top_pieces: int = 3, top_neurons: int = 3, depth: int = 3, input_dir: str | None = None, vocab_k: int = 5,
) -> PositionGraph:
    """Trace FFN neurons at the last position back through heads, their per-source-position attention value
    neurons and the FFN (query) neurons at those positions (see the module docstring for every definition).

    ``roots``: FFN neuron labels ``L{l}N{k}`` read at the last position. ``prompts``: one prompt (the
    reference's reading) or several of one token length (means over prompts); or pass ``cache``
    (:func:`collect_positions`). ``depth`` counts edges from a root (3 = root <- head <- value neuron
    <- query neuron). ``targets`` (a pair such as ``"he,she"``) sets the roots' scores to their bias score.
    """
    if top_heads < 0 or top_neurons < 0 or top_pieces < 1 or depth < 1 or vocab_k < 1:
        raise ValueError("need top_heads >= 0, top_neurons >= 0, top_pieces >= 1, depth >= 1 and vocab_k >= 1")
    roots = [roots] if isinstance(roots, str) else list(roots)
    units = _check_roots(lm, roots)
    if cache is None:
        if prompts is None:
            raise ValueError("pass prompts or a cache from collect_positions")
        cache = collect_positions(lm, prompts)
    last = cache.n_pos - 1
    ts = check_pair(lm, targets) if targets is not None else None
    tr = _Trace(lm, cache, top_heads, top_pieces, top_neurons, depth, input_dir)
    for l, k in units:
        score = float(neuron_scores(lm, cache.at(last), ts, l)[:, k].mean()) if ts is not None else 1.0
        tr.add(_Unit("ffn", NeuronLabel(l, k), last), 0, score)
    tr.run()
    _add_vocab(lm, cache, tr.nodes, vocab_k)
    in_dir = input_dir or ("gate" if lm.arch.gated_mlp else "up")
    score = f"bias-score({ts.words[1]}-{ts.words[0]})" if ts is not None else "share"
    ids = [_Unit("ffn", NeuronLabel(l, k), last).id for l, k in units]
    return PositionGraph(
        ids[0], list(tr.nodes.values()), tr.edges, model=lm.name, n_prompts=cache.n_prompts,
        variant=f"positions,frozen-norms+attention,input={in_dir},score={score},align=token-index,"
                f"top={top_heads}h/{top_pieces}p/{top_neurons}n,depth={depth}",
        roots=ids, prompts=list(cache.prompts), tokens=cache.tokens,
    )
