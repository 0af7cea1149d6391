"""Circuits across positions (bias_lens.locate.circuit_positions) against a hand-built model whose path is
known and against a plain-torch forward pass of tiny random models (no lens, no bias_lens hooks).

Hand-built model: a real two-layer ``LlamaForCausalLM`` (float64, d_model 16, 2 query heads sharing
one KV head, d_head 8, MLP of 8) with random weights except where set by hand, so that exactly one
path reaches the root neuron L1N4 at the last position:

* embedding columns A, B, C are 0 for every token, except column C of the token "nurse" (2.5);
* layer 0: attention dead (``o_proj = 0``); MLP ``down_proj = 0`` except column n0 = 2, which is
  ``alpha e_A``; neuron n0 reads only column C (gate and up rows), so it fires only at "nurse" (p);
* layer 1: ``q_proj = 0`` (uniform causal attention, a = 1/T); value row d0 = 6 of the KV head reads
  only column A (``beta e_A``); W_O row B is 0 except column ``1 * d_head + d0`` (= gamma: head 1 via
  the grouped KV head 0); the root's gate row is ``delta e_B``.

So the root's gate input at the last position is carried by L1H1 alone, L1H1 by its value neuron d0
at p alone, and that one by L0N2 at p alone; the values below are written out in plain float64 torch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F_

from bias_lens.locate.attribution import collect_last
from bias_lens.locate.circuit import trace_circuit, upstream_contributions
from bias_lens.locate.circuit_positions import (
    collect_positions, head_pieces, trace_circuit_positions, value_neuron_contributions,
)
from bias_lens.locate.value_neurons import kv_head
from bias_lens.plot.circuit import circuit_positions_figure
from conftest import build_tiny
from test_figures_layout import check

F64 = torch.float64
D, FF, EPS = 16, 8, 1e-5
A, B, C = 3, 5, 7
N0, K1, D0, H1 = 2, 4, 6, 1
ALPHA, BETA, GAMMA, DELTA = 1.7, 1.3, 0.9, 1.1
PROMPT = "The nurse said that"
#: HF computes RMSNorm and the softmax in float32 even for a float64 model: the cached forward agrees with
#: the float64 hand formulas to ~1e-7 relative
REL = 1e-6


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def handbuilt(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    from bias_lens.lens import LensModel

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=D, intermediate_size=FF, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, rms_norm_eps=EPS, attention_bias=False, mlp_bias=False)
    model = LlamaForCausalLM(cfg).to(F64).eval()
    g = torch.Generator().manual_seed(3)
    nurse = tok(PROMPT)["input_ids"][2]
    assert tok.decode([nurse]) == "nurse"
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=F64) if "norm" in name
                    else torch.randn(p.shape, generator=g, dtype=F64) / (p.shape[1] ** 0.5 if p.ndim == 2 else 1))
        emb = model.model.embed_tokens.weight
        emb.mul_(D ** 0.5)
        emb[:, [A, B, C]] = 0.0
        emb[nurse, C] = 2.5
        l0, l1 = model.model.layers
        l0.self_attn.o_proj.weight.zero_()
        l0.mlp.down_proj.weight.zero_()
        l0.mlp.down_proj.weight[A, N0] = ALPHA
        for w, val in ((l0.mlp.gate_proj.weight, 2.0), (l0.mlp.up_proj.weight, 1.5)):
            w[N0] = 0.0
            w[N0, C] = val
        l1.self_attn.q_proj.weight.zero_()
        l1.self_attn.v_proj.weight[D0] = 0.0
        l1.self_attn.v_proj.weight[D0, A] = BETA
        l1.self_attn.o_proj.weight[B] = 0.0
        l1.self_attn.o_proj.weight[B, H1 * 8 + D0] = GAMMA
        l1.mlp.gate_proj.weight[K1] = 0.0
        l1.mlp.gate_proj.weight[K1, B] = DELTA
    return LensModel(model, tok, name="handbuilt")


def _rms(x, w):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def _s(x):
    return torch.sqrt(x.pow(2).mean(-1) + EPS)


def _hand(lm, tok):
    """Every number of the known path, from the weight tensors in plain float64 torch."""
    W = {k: v.detach() for k, v in lm.hf.state_dict().items()}
    L = "model.layers.{}.".format
    ids = tok(PROMPT)["input_ids"]
    T, p = len(ids), 2
    x0 = W["model.embed_tokens.weight"][ids]  # layer-0 input (attention 0 dead -> also resid_mid)
    h0 = _rms(x0, W[L(0) + "post_attention_layernorm.weight"])
    gate0 = h0 @ W[L(0) + "mlp.gate_proj.weight"].T
    m0 = F_.silu(gate0) * (h0 @ W[L(0) + "mlp.up_proj.weight"].T)
    x1 = x0 + m0 @ W[L(0) + "mlp.down_proj.weight"].T
    v = _rms(x1, W[L(1) + "input_layernorm.weight"]) @ W[L(1) + "self_attn.v_proj.weight"].T  # [T, 8], one KV head
    z = torch.cat([v.mean(0), v.mean(0)])  # uniform attention at the last position, both heads read KV head 0
    x1mid = x1[-1] + W[L(1) + "self_attn.o_proj.weight"] @ z
    h1 = _rms(x1mid, W[L(1) + "post_attention_layernorm.weight"])
    gate1 = h1 @ W[L(1) + "mlp.gate_proj.weight"].T
    m1 = F_.silu(gate1) * (h1 @ W[L(1) + "mlp.up_proj.weight"].T)
    final = x1mid + W[L(1) + "mlp.down_proj.weight"] @ m1
    he, she = (tok(w)["input_ids"][0] for w in (" he", " she"))
    u = W["lm_head.weight"][she] - W["lm_head.weight"][he]
    score = float(m1[K1] * (W["model.norm.weight"] * u) @ W[L(1) + "mlp.down_proj.weight"][:, K1] / _s(final))
    g1A = W[L(1) + "input_layernorm.weight"][A]
    v_p = BETA * g1A * x1[p, A] / _s(x1[p])
    return {
        "T": T, "p": p, "v_p": float(v_p), "v_p_from_weights": float(v[p, D0]), "piece": float(v_p / T),
        "query_edge": float(BETA * g1A * ALPHA * m0[p, N0] / _s(x1[p]) / T), "query_gate": float(gate0[p, N0]),
        "query_act": float(m0[p, N0]), "root": float(gate1[K1]), "root_act": float(m1[K1]), "score": score,
        "root_by_path": float(DELTA * W[L(1) + "post_attention_layernorm.weight"][B] * GAMMA * v_p / T / _s(x1mid)),
    }


def test_handbuilt_path_is_recovered_with_hand_values(handbuilt, tok):
    lm = handbuilt
    hand = _hand(lm, tok)
    T, p = hand["T"], hand["p"]
    assert kv_head(lm, H1) == 0 and hand["v_p"] == pytest.approx(hand["v_p_from_weights"], rel=1e-12)
    assert hand["root"] == pytest.approx(hand["root_by_path"], rel=1e-10)  # the path is the root's whole input
    g = trace_circuit_positions(lm, "L1N4", PROMPT, targets="he,she", depth=3)
    root, head, piece, query = f"L1N4@{T - 1}", f"L1H1@{T - 1}", f"L1H1V{D0}@{p}>{T - 1}", f"L0N{N0}@{p}"
    assert [(e["source"], e["target"]) for e in g.edges] == [(head, root), (piece, head), (query, piece)]
    w = {e["source"]: e["weight"] for e in g.edges}
    assert w[head] == pytest.approx(hand["root"], rel=REL)
    assert w[piece] == pytest.approx(hand["root"], rel=REL)  # the head's one piece carries all of it
    assert {n["id"]: n for n in g.nodes}[head]["value"] == pytest.approx(hand["root"], rel=REL)
    assert w[query] == pytest.approx(hand["query_edge"], rel=REL)
    nodes = {n["id"]: n for n in g.nodes}
    assert set(nodes) == {root, head, piece, query}
    assert nodes[root]["value"] == pytest.approx(hand["root"], rel=REL)
    assert nodes[root]["activation"] == pytest.approx(hand["root_act"], rel=REL)
    assert nodes[piece]["value"] == pytest.approx(hand["piece"], rel=REL)
    assert nodes[piece]["attention"] == pytest.approx(1 / T, rel=REL)
    assert nodes[query]["value"] == pytest.approx(hand["query_gate"], rel=REL)
    assert nodes[query]["activation"] == pytest.approx(hand["query_act"], rel=REL)
    assert hand["query_edge"] == pytest.approx(hand["piece"], rel=REL)  # the query neuron is the piece's whole value
    # one in-edge per node, each equal to the node's value: every share is 1, so every score is the root's
    for n in g.nodes:
        assert n["score"] == pytest.approx(hand["score"], rel=REL)
        if n["expanded"]:
            assert abs(n["rest"]) < 1e-12
    assert [n["kind"] for n in (nodes[root], nodes[head], nodes[piece], nodes[query])] == \
        ["ffn-value", "head", "attn-value", "ffn-query"]
    assert nodes[query]["token"] == "nurse" and nodes[query]["position"] == p and nodes[piece]["dest"] == T - 1
    res = g.to_result()
    assert set(res.labels) == {"L1H1", f"L1H1V{D0}", f"L0N{N0}"}
    assert res.score_of(f"L0N{N0}") == pytest.approx(abs(hand["score"]), rel=REL)


# --------------------------------------------------------------------------- plain torch on random models
@torch.no_grad()
def _oracle(lm, prompt):
    """Gate outputs, activations, value states, o_proj inputs and attention probabilities of every layer from
    plain torch hooks on the HF modules (eager attention)."""
    hf, store, hs = lm.hf, {}, []
    put = lambda key: lambda m, a, o=None: store.__setitem__(key, (o if o is not None else a[0])[0].double())  # noqa: E731
    for l, layer in enumerate(hf.model.layers):
        hs.append(layer.mlp.gate_proj.register_forward_hook(put(f"gate{l}")))
        hs.append(layer.mlp.down_proj.register_forward_pre_hook(put(f"act{l}")))
        hs.append(layer.self_attn.v_proj.register_forward_hook(put(f"v{l}")))
        hs.append(layer.self_attn.o_proj.register_forward_pre_hook(put(f"z{l}")))
    prev = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        out = hf(**lm.tokenizer([prompt], return_tensors="pt"), output_attentions=True)
    finally:
        hf.set_attn_implementation(prev)
        for h in hs:
            h.remove()
    store["attn"] = [a[0].double() for a in out.attentions]
    return store


@pytest.fixture(params=["llama", "qwen2"])
def tiny_gqa(request, tiny_tokenizer_dir, tmp_path):
    """Tiny Llama / Qwen2 (4 query heads on 2 KV heads; Qwen2 has q/k/v biases)."""
    return build_tiny(request.param, tiny_tokenizer_dir, tmp_path / request.param)


PLAIN = "The carpenter laughed because he"


def test_node_values_match_a_plain_torch_forward(tiny_gqa):
    lm = tiny_gqa
    o = _oracle(lm, PLAIN)
    g = trace_circuit_positions(lm, ["L2N7", "L2N40"], PLAIN, top_heads=2, top_pieces=2, top_neurons=4, depth=4)
    kinds = {n["kind"] for n in g.nodes}
    assert {"ffn-value", "head", "attn-value", "ffn-query"} <= kinds
    assert any(n["kind"] == "head" and n["position"] < len(g.tokens[0]) - 1 and n["expanded"] for n in g.nodes)
    dh, pc = lm.d_head, collect_positions(lm, PLAIN)
    for n in g.nodes:
        l, pos = n["layer"], n["position"]
        if n["kind"].startswith("ffn"):
            k = int(n["label"].split("N")[1])
            assert n["value"] == pytest.approx(float(o[f"gate{l}"][pos, k]), abs=1e-5)
            assert n["activation"] == pytest.approx(float(o[f"act{l}"][pos, k]), abs=1e-5)
        elif n["kind"] == "attn-value":
            h, d = (int(s) for s in n["label"].split("H")[1].split("V"))
            a = float(o["attn"][l][h, n["dest"], pos])
            assert n["attention"] == pytest.approx(a, abs=1e-6)
            assert n["value"] == pytest.approx(a * float(o[f"v{l}"][pos, kv_head(lm, h) * dh + d]), abs=1e-5)
        elif n["kind"] == "head":
            h = int(n["label"].split("H")[1])
            pieces = head_pieces(lm, pc, l, h, pos)[0]  # [d_head, q]
            assert torch.allclose(pieces.sum(1), o[f"z{l}"][pos, h * dh : (h + 1) * dh], atol=1e-5)
            out = sum(e["weight"] for e in g.edges if e["source"] == n["id"])
            assert n["value"] == pytest.approx(out, abs=1e-5)  # a head's value is its flow into the graph


def test_contributions_sum_to_node_values_and_edges_are_the_top_columns(tiny_gqa):
    lm = tiny_gqa
    pc = collect_positions(lm, PLAIN)
    o = _oracle(lm, PLAIN)
    g = trace_circuit_positions(lm, "L2N7", cache=pc, top_heads=2, top_pieces=2, top_neurons=3, depth=3)
    T = pc.n_pos
    for n in (n for n in g.nodes if n["expanded"]):
        into = [e for e in g.edges if e["target"] == n["id"]]
        assert sum(e["weight"] for e in into) + n["rest"] == pytest.approx(n["value"], abs=1e-12)
        assert all(abs(e["share"] - e["weight"] / n["value"]) < 1e-9 for e in into)
    # the full value-neuron decomposition (every component) sums to the plain-torch a * v at every (q, p)
    for l, h, d in ((2, 3, 5), (1, 1, 0), (2, 0, 11)):
        for src, dest in ((0, T - 1), (2, T - 1), (1, 3)):
            labels, contrib, _ = value_neuron_contributions(lm, pc, l, h, d, src, dest)
            want = float(o["attn"][l][h, dest, src] * o[f"v{l}"][src, kv_head(lm, h) * lm.d_head + d])
            assert float(contrib.sum()) == pytest.approx(want, abs=1e-5)
            assert len(labels) == 2 + l * (lm.n_heads + lm.d_mlp)
    # the root's in-edges are the top columns of the last-position decomposition (trace_circuit's numbers;
    # its cache comes from the default sdpa attention, this one from eager: float32 rounding apart)
    labels, contrib, total = upstream_contributions(lm, collect_last(lm, [PLAIN]), "L2N7")
    root = next(n for n in g.nodes if n["id"] == f"L2N7@{T - 1}")
    assert root["value"] == pytest.approx(float(total[0]), abs=1e-6)
    into = {e["source"].split("@")[0]: e["weight"] for e in g.edges if e["target"] == root["id"]}
    heads = [i for i, lab in enumerate(labels) if "H" in lab]
    other = [i for i, lab in enumerate(labels) if "H" not in lab]
    want = {labels[i] for grp, k in ((heads, 2), (other, 3)) for i in sorted(grp, key=lambda i: -abs(float(contrib[0, i])))[:k]}
    assert set(into) == want
    assert all(into[lab] == pytest.approx(float(contrib[0, labels.index(lab)]), abs=1e-6) for lab in into)
    old = trace_circuit(lm, "L2N7", cache=collect_last(lm, [PLAIN]), top_k=3, depth=1)
    assert all(into.get(e["source"], e["weight"]) == pytest.approx(e["weight"], abs=1e-6) for e in old.edges)


def test_several_prompts_are_means_aligned_by_token_index(tiny_llama):
    lm = tiny_llama
    two = ["The nurse said that", "The doctor said that"]
    g = trace_circuit_positions(lm, "L2N7", two, top_heads=2, top_pieces=2, top_neurons=2, depth=2)
    singles = [trace_circuit_positions(lm, "L2N7", p, top_heads=2, top_pieces=2, top_neurons=2, depth=2) for p in two]
    root = g.roots[0]
    val = lambda gr, nid: next(n["value"] for n in gr.nodes if n["id"] == nid)  # noqa: E731
    assert val(g, root) == pytest.approx(sum(val(s, root) for s in singles) / 2, abs=1e-12)
    compared = 0
    for e in g.edges:  # an edge is the mean of the per-prompt contributions
        per = [value_or_edge(s, e) for s in singles]
        if all(x is not None for x in per):
            assert e["weight"] == pytest.approx(sum(per) / 2, abs=1e-12)
            compared += 1
    assert compared >= 3
    pc = collect_positions(lm, two)
    assert pc.token(2) == "nurse/doctor" and pc.token(0) == "The"
    assert all(n["token"] == pc.token(n["position"]) for n in g.nodes)
    assert g.n_prompts == 2 and g.prompts == two and "align=token-index" in g.variant
    with pytest.raises(ValueError, match="different lengths"):
        trace_circuit_positions(lm, "L2N7", ["The nurse said that", "Two plus two is four ."])


def value_or_edge(graph, edge):
    """The weight of the same edge in another graph, or None when that graph did not keep it."""
    return next((e["weight"] for e in graph.edges if (e["source"], e["target"]) == (edge["source"], edge["target"])), None)


def test_bad_input_raises_one_clear_error(tiny_llama):
    lm = tiny_llama
    with pytest.raises(ValueError, match="neuron"):
        trace_circuit_positions(lm, "L1H2", PLAIN)
    with pytest.raises(ValueError, match="out of range"):
        trace_circuit_positions(lm, "L5N1", PLAIN)
    with pytest.raises(ValueError, match="top_pieces"):
        trace_circuit_positions(lm, "L2N7", PLAIN, top_pieces=0)
    with pytest.raises(ValueError, match="prompts or a cache"):
        trace_circuit_positions(lm, "L2N7")
    pc = collect_positions(lm, PLAIN)
    with pytest.raises(ValueError, match="causal"):
        value_neuron_contributions(lm, pc, 1, 0, 0, 3, 2)


# --------------------------------------------------------------------------- figure
def test_figure_hover_carries_top_tokens_and_edges_match_the_graph(tiny_llama):
    lm = tiny_llama
    g = trace_circuit_positions(lm, "L2N7", PLAIN, targets="he,she", top_heads=2, top_pieces=2, top_neurons=2, depth=3)
    fig = circuit_positions_figure(g)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert [t.name for t in lines] == [f"{e['source']} -> {e['target']}" for e in g.edges]
    wmax = max(abs(e["weight"]) for e in g.edges)
    for t, e in zip(lines, g.edges):
        assert t.line.width == pytest.approx(0.5 + 6 * abs(e["weight"]) / wmax)
        assert t.line.color == ("#c0392b" if e["weight"] > 0 else "#2471a3")
    marks = [t for t in fig.data if t.mode == "markers"]
    ids = [i for t in marks for i in t.customdata]
    assert sorted(ids) == sorted(n["id"] for n in g.nodes)
    xy = {i: (x, y) for t in marks for i, x, y in zip(t.customdata, t.x, t.y)}
    hover = {i: h for t in marks for i, h in zip(t.customdata, t.hovertext)}
    nodes = {n["id"]: n for n in g.nodes}
    for e, t in zip(g.edges, lines):  # each line joins its two nodes' markers
        assert (t.x[0], t.y[0]) == xy[e["source"]] and (t.x[1], t.y[1]) == xy[e["target"]]
    for i, n in nodes.items():
        assert abs(xy[i][1] - n["position"]) < 0.5
        if n["kind"] not in ("embed", "bias"):
            assert n["top"] and all(repr(tok) in hover[i] for tok in n["top"]), i
            assert f"score={n['score']:+.4g}" in hover[i]
    proj_top = next(n for n in g.nodes if n["id"] == g.root)["top"]
    from bias_lens.locate.projection import neuron_vocab_projection

    assert proj_top == neuron_vocab_projection(lm, ["L2N7"], 5)["L2N7"]["top"]
    assert not math.isnan(fig.layout.yaxis.range[0]) and fig.layout.yaxis.range[0] > fig.layout.yaxis.range[1]
    labelled = {a.text for a in fig.layout.annotations if a.xref == "x"}
    ranked = sorted((n for n in g.nodes if n["kind"] in ("ffn-value", "ffn-query", "head") and n["id"] != g.root),
                    key=lambda n: -abs(n["score"]))
    assert labelled == {"L2N7"} | {n["label"] for n in ranked[:12]}
    check(fig)  # titles fit, labels clear of each other and of the markers (the shared layout test)


def test_layernorm_and_biases_gpt2(tiny_tokenizer_dir, tmp_path):
    """GPT-2 (LayerNorm with bias, fused c_attn with a value bias, o_proj / MLP biases): the value-neuron
    decomposition (constant in ``bias``) equals the piece from the forward's own value path, the pieces sum
    to the o_proj input the model computed, and the FFN decomposition sums to the real pre-activation."""
    lm = build_tiny("gpt2", tiny_tokenizer_dir, tmp_path / "gpt2")
    pc = collect_positions(lm, PLAIN)
    T, dh = pc.n_pos, lm.d_head
    for l, h in ((1, 2), (2, 0)):
        for pos in (T - 1, 3):
            pieces = head_pieces(lm, pc, l, h, pos)[0]  # [d_head, q]
            assert torch.allclose(pieces.sum(1), pc.at(pos).attn_z[l][0, h * dh : (h + 1) * dh], atol=1e-5)
            for d, src in ((0, 0), (5, pos), (11, 1)):
                labels, contrib, _ = value_neuron_contributions(lm, pc, l, h, d, src, pos)
                assert abs(float(contrib[0, -1])) > 0 and labels[-1] == "bias"
                assert float(contrib.sum()) == pytest.approx(float(pieces[d, src]), abs=1e-6)
    g = trace_circuit_positions(lm, "L2N7", cache=pc, top_heads=2, top_pieces=2, top_neurons=2, depth=3)
    with torch.no_grad():
        ids = lm.tokenizer([PLAIN], return_tensors="pt")
        store = {}
        hs = [blk.mlp.c_fc.register_forward_hook(lambda m, a, o, l=l: store.__setitem__(l, o[0].double()))
              for l, blk in enumerate(lm.hf.transformer.h)]
        try:
            lm.hf(**ids)
        finally:
            for hk in hs:
                hk.remove()
    for n in (n for n in g.nodes if n["kind"].startswith("ffn")):
        k = int(n["label"].split("N")[1])
        assert n["value"] == pytest.approx(float(store[n["layer"]][n["position"], k]), abs=1e-5)
