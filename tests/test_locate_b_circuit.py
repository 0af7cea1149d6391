"""Circuit tracing: the decomposition sums to the neuron's real pre-activation; edges are consistent."""

from __future__ import annotations

import json

import pytest
import torch

from bias_lens.hooks import record_into
from bias_lens.locate.attribution import collect_last
from bias_lens.locate.circuit import trace_circuit, upstream_contributions
from bias_lens.locate.query_neurons import ln2
from bias_lens.scoring import iter_batches

PROMPTS = ["The nurse laughed because", "The carpenter went home because she", "Two plus"]


def _real_input(lm, layer, kind):
    """Pre-activations of every neuron of ``layer`` at the last token, via the model's own module."""
    out = torch.empty(len(PROMPTS), lm.d_mlp, dtype=torch.float64)
    for b in iter_batches(lm.tokenizer, PROMPTS, 8):
        store = {}
        with torch.no_grad(), lm.hooks(record_into(store, [f"L{layer}.mlp.in"], index=b.last)):
            lm.hf(**b.model_inputs())
        mod = lm.submodule(layer, f"mlp.{kind}")
        with torch.no_grad():
            out[b.rows] = mod(store[f"L{layer}.mlp.in"]).double()
    return out


def test_contributions_sum_to_preactivation(tiny):
    lm = tiny
    cache = collect_last(lm, PROMPTS)
    kind = "gate" if lm.arch.gated_mlp else "up"
    for l in (0, 2):
        real = _real_input(lm, l, kind)
        for k in (0, 13, 95):
            labels, contrib, total = upstream_contributions(lm, cache, f"L{l}N{k}")
            assert len(labels) == contrib.shape[1] == 2 + (l + 1) * lm.n_heads + l * lm.d_mlp
            assert torch.allclose(total, real[:, k], atol=1e-4)
    if lm.arch.gated_mlp:
        real_up = _real_input(lm, 2, "up")
        _, _, total = upstream_contributions(lm, cache, "L2N5", input_dir="up")
        assert torch.allclose(total, real_up[:, 5], atol=1e-4)


def test_single_head_contribution(tiny_llama):
    lm = tiny_llama
    cache = collect_last(lm, PROMPTS)
    labels, contrib, _ = upstream_contributions(lm, cache, "L2N7")
    fn = ln2(lm, 2)
    w = lm.submodule(2, "mlp.gate").weight.detach().double()[7]
    o = lm.submodule(1, "attn.o")
    dh = lm.d_head
    for i in range(len(PROMPTS)):
        z = cache.attn_z[1, i].float().clone()
        z[: 2 * dh] = 0
        z[3 * dh :] = 0  # keep head 2 only
        with torch.no_grad():
            oh = o(z).double()
        expect = float(w @ (fn.weight * oh)) / float(fn.scale(cache.resid_mid[2, i]))
        assert abs(float(contrib[i, labels.index("L1H2")]) - expect) < 1e-6


def test_trace_graph(tiny_llama):
    lm = tiny_llama
    cache = collect_last(lm, PROMPTS)
    g = trace_circuit(lm, "L2N7", cache=cache, top_k=3, depth=2)
    labels, contrib, total = upstream_contributions(lm, cache, "L2N7")
    mean = contrib.mean(0)
    top = [labels[i] for i in torch.argsort(mean.abs(), descending=True)[:3].tolist()]
    into_root = [e["source"] for e in g.edges if e["target"] == "L2N7"]
    assert into_root == top
    expanded = {e["target"] for e in g.edges}
    assert expanded <= {"L2N7"} | {t for t in top if "N" in t and t.startswith("L")}
    assert all(len([e for e in g.edges if e["target"] == t]) == 3 for t in expanded)
    data = json.loads(g.to_json())
    assert data["root"] == "L2N7" and {n["label"] for n in data["nodes"]} >= set(top)
    assert g.to_result().top_labels(1)[0] == top[0]
    with pytest.raises(ValueError, match="head"):
        trace_circuit(lm, "L1H2", cache=cache)
    with pytest.raises(ValueError, match="out of range"):
        trace_circuit(lm, "L5N1", cache=cache)


def test_figures(tiny_llama):
    from bias_lens.locate.attribution import head_attribution, neuron_attribution
    from bias_lens.plot.attribution import head_heatmap, neuron_heatmap
    from bias_lens.plot.circuit import circuit_figure

    lm = tiny_llama
    cache = collect_last(lm, PROMPTS)
    nres = neuron_attribution(lm, PROMPTS, cache=cache)
    fig = neuron_heatmap(nres, n_bins=8)
    z = torch.tensor(fig.data[0].z)
    # each cell is the max score of its 12-neuron bin
    assert z.shape == (3, 8) and abs(float(z[1, 2]) - float(nres.scores[96 + 24 : 96 + 36].max())) < 1e-6
    hres = head_attribution(lm, PROMPTS, cache=cache)
    hz = torch.tensor(head_heatmap(hres).data[0].z)
    assert abs(float(hz[2, 3]) - float(hres.extras["signed"][2 * 4 + 3])) < 1e-6
    g = trace_circuit(lm, "L2N7", cache=cache, top_k=2, depth=2)
    fig = circuit_figure(g)
    assert len(fig.data) == len(g.edges) + 1 and set(fig.data[-1].text) == {n["label"] for n in g.nodes}
