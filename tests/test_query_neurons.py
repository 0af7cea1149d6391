"""Attention value neurons and FFN query neurons against the reference notebook's formulas
(zepingyu0512/neuron-attribution, Llama notebook cells "attn neuron increase" and "find query FFN
neurons activating attn neurons"), written out again in plain torch over the HF modules, one prompt
at a time (no padding), on tiny Llama and Qwen2 models with grouped KV heads (4 query heads, 2 KV)."""

from __future__ import annotations

import pytest
import torch

from bias_lens.locate.attribution import collect_last, neuron_attribution
from bias_lens.locate.query_neurons import paper_candidates, query_neurons
from bias_lens.locate.value_neurons import (
    attn_pieces, attn_value_attribution, kv_head, parse_attn_neuron, piece_increase,
)
from bias_lens.targets import resolve_targets
from conftest import build_tiny

PROMPTS = ["The nurse laughed because", "The carpenter went home because he", "The doctor said that"]
UNITS = ["L2H3V5", "L2H0V1", "L1H2V11", "L1H1V0", "L2H1V7"]


def _oracle_run(lm, prompt: str):
    """Reference-style activations of one prompt from the HF modules (eager attention)."""
    hf = lm.hf
    ids = lm.tokenizer([prompt], return_tensors="pt")["input_ids"]
    store = {}
    hs = [hf.model.norm.register_forward_pre_hook(lambda m, a: store.__setitem__("final", a[0][0].double()))]
    for l, layer in enumerate(hf.model.layers):
        hs.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, l=l: store.__setitem__(f"coef{l}", a[0][0].double())))
    prev = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = hf(ids, output_attentions=True, output_hidden_states=True)
    finally:
        hf.set_attn_implementation(prev)
        for h in hs:
            h.remove()
    return out, store


def _bsvalues(lm, vec, final_var):
    """The notebook's get_bsvalues (eps = the model's RMSNorm eps)."""
    eps = lm.hf.model.norm.variance_epsilon
    w = lm.hf.model.norm.weight.detach().double()
    return (vec * torch.rsqrt(final_var + eps) * w) @ lm.hf.lm_head.weight.detach().double().T


@torch.no_grad()
def _v_rep(lm, out, l: int):
    """Value states of layer l repeated to the query heads (HF repeat_kv): [pos, head, d_head]."""
    layer = lm.hf.model.layers[l]
    H, dh = lm.n_heads, lm.d_head
    v = layer.self_attn.v_proj(layer.input_layernorm(out.hidden_states[l][0])).double()  # [pos, kv*dh]
    n_rep = H // lm.hf.config.num_key_value_heads
    return v.view(-1, H // n_rep, dh).repeat_interleave(n_rep, dim=1)


@torch.no_grad()
def _oracle(lm, prompt: str, units, tid):
    """(increase [unit, pos, target], subvalue pieces, query scores {label: [target]})."""
    out, store = _oracle_run(lm, prompt)
    H, dh = lm.n_heads, lm.d_head
    final_var = store["final"][-1].pow(2).mean(-1, keepdim=True)
    incs, query = [], {}
    for lab in units:
        l, h, d = parse_attn_neuron(lab)
        layer = lm.hf.model.layers[l]
        x_in = out.hidden_states[l][0].double()  # layer input, all positions
        v_rep = _v_rep(lm, out, l)  # [pos, H, dh]
        attn = out.attentions[l][0].double()  # [H, q, k]
        sub = attn[:, -1, :].T[:, :, None] * v_rep  # [pos, H, dh]
        o_split = layer.self_attn.o_proj.weight.detach().double().T.view(H, dh, -1)
        piece = o_split[h, d][None] * sub[:, h, d][:, None]  # [pos, d_model]
        x_last = x_in[-1]
        origin = torch.log_softmax(_bsvalues(lm, x_last, final_var), -1)[tid]
        inc = torch.log_softmax(_bsvalues(lm, piece + x_last, final_var), -1)[:, tid] - origin  # [pos, target]
        incs.append(inc)
        key = layer.self_attn.v_proj.weight.detach().double()[kv_head(lm, h) * dh + d] * layer.input_layernorm.weight.detach().double()
        for pos in range(x_in.shape[0]):
            inner_all = x_in[pos] @ key
            for li in range(l):
                W_down = lm.hf.model.layers[li].mlp.down_proj.weight.detach().double()
                share = ((store[f"coef{li}"][pos][None] * W_down).T @ key) / inner_all  # [d_mlp]
                for j in range(lm.d_mlp):
                    query.setdefault(f"L{li}N{j}", torch.zeros(len(tid), dtype=torch.float64))
                    query[f"L{li}N{j}"] += share[j] * inc[pos]
    return torch.stack(incs), query


@pytest.fixture(params=["llama", "qwen2"])
def gqa(request, tiny_tokenizer_dir, tmp_path):
    lm = build_tiny(request.param, tiny_tokenizer_dir, tmp_path / request.param)
    assert lm.hf.config.num_key_value_heads < lm.n_heads
    return lm


def test_piece_increase_matches_reference(gqa):
    lm = gqa
    ts = resolve_targets(lm.tokenizer, "he,she")
    tid = list(ts.first_ids)
    units = [parse_attn_neuron(u) for u in UNITS]
    got = {}
    for pb in attn_pieces(lm, PROMPTS, sorted({u[0] for u in units}), batch_size=2):
        inc = piece_increase(lm, pb, units, tid, max_elems=4000)  # small chunks: exercises the chunking
        for i, row in enumerate(pb.batch.rows):
            got[int(row)] = (inc[i], int(pb.batch.last[i]) + 1)
    assert sorted(got) == list(range(len(PROMPTS)))
    for i, p in enumerate(PROMPTS):
        want, _ = _oracle(lm, p, UNITS, tid)
        inc, n = got[i]
        assert torch.allclose(inc[:, :n], want, atol=1e-8, rtol=1e-6)  # the model runs in float32
        assert float(inc[:, n:].abs().sum()) == 0.0  # padding positions carry nothing


def test_query_neurons_match_reference(gqa):
    lm = gqa
    ts = resolve_targets(lm.tokenizer, "he,she")
    tid = list(ts.first_ids)
    oracle = [_oracle(lm, p, UNITS, tid)[1] for p in PROMPTS]
    labels = sorted(oracle[0])
    for rank, target in (("target", "she"), ("target", "he"), ("diff", "predicted"), ("target", "predicted")):
        res = query_neurons(lm, PROMPTS, UNITS, ts, rank=rank, target=target, batch_size=2)
        assert set(res.labels) == set(labels) and all(lab.startswith(("L0", "L1")) for lab in res.labels)
        for lab in labels:
            if rank == "diff":
                want = abs(sum(float(o[lab][1] - o[lab][0]) for o in oracle) / len(PROMPTS))
            elif target == "predicted":
                want = 0.0
                for p, o in zip(PROMPTS, oracle):
                    with torch.no_grad():
                        logits = lm.hf(**lm.tokenizer([p], return_tensors="pt")).logits[0, -1]
                    want += float(o[lab][int(logits[tid].argmax())])
                want /= len(PROMPTS)
            else:
                want = sum(float(o[lab][ts.words.index(target)]) for o in oracle) / len(PROMPTS)
            assert abs(res.score_of(lab) - want) < 1e-7 * max(1.0, abs(want)), (rank, target, lab)
        if rank == "target":  # the reference ranks by the signed increase: most target-ward first
            assert res.top(1)[0][1] == float(res.scores.max())


def test_attn_value_attribution_sums_reference_pieces(gqa):
    """Per neuron: cached-norm (she - he) logit change of the whole last-position output = oracle."""
    lm = gqa
    ts = resolve_targets(lm.tokenizer, "he,she")
    tid = list(ts.first_ids)
    res = attn_value_attribution(lm, PROMPTS, ts, rank="signed")
    assert len(res.labels) == lm.n_layers * lm.n_heads * lm.d_head and res.labels[lm.d_head + 1] == "L0H1V1"
    o_bias = [lm.hf.model.layers[l].self_attn.o_proj.bias for l in range(lm.n_layers)]
    assert all(b is None for b in o_bias)
    for lab in UNITS + ["L0H3V4"]:
        l, h, d = parse_attn_neuron(lab)
        want = 0.0
        for p in PROMPTS:
            out, store = _oracle_run(lm, p)
            final_var = store["final"][-1].pow(2).mean(-1, keepdim=True)
            zd = (out.attentions[l][0, h, -1].double() * _v_rep(lm, out, l)[:, h, d]).sum()
            x = out.hidden_states[l][0, -1].double()
            w_o = lm.hf.model.layers[l].self_attn.o_proj.weight.detach().double()[:, h * lm.d_head + d]
            z1, z0 = _bsvalues(lm, x + zd * w_o, final_var), _bsvalues(lm, x, final_var)
            want += float((z1[tid[1]] - z1[tid[0]]) - (z0[tid[1]] - z0[tid[0]]))
        assert abs(res.score_of(lab) - want / len(PROMPTS)) < 1e-6


def test_paper_candidates_and_errors(tiny_llama):
    lm = tiny_llama
    cache = collect_last(lm, PROMPTS)
    res = paper_candidates(lm, PROMPTS, "he,she", k=4, cache=cache, batch_size=2)
    kinds = res.extras["kind"]
    assert kinds == ["ffn-value"] * 4 + ["attn-value"] * 4 + ["ffn-query"] * 4
    assert res.labels[:4] == neuron_attribution(lm, PROMPTS, cache=cache).top_labels(4)
    attn_top = attn_value_attribution(lm, PROMPTS, cache=cache).top_labels(4)
    assert res.labels[4:8] == attn_top
    assert res.labels[8:] == query_neurons(lm, PROMPTS, attn_top, batch_size=2).top_labels(4)
    with pytest.raises(ValueError, match="attention value neuron"):
        query_neurons(lm, PROMPTS, ["L2N3"])
    with pytest.raises(ValueError, match="out of range"):
        query_neurons(lm, PROMPTS, ["L2H9V0"])
    with pytest.raises(ValueError, match="layer 0"):
        query_neurons(lm, PROMPTS, ["L0H1V2"])
    with pytest.raises(ValueError, match="target must be"):
        query_neurons(lm, PROMPTS, UNITS, target="they")
    assert lm.hf.config._attn_implementation == "sdpa"  # eager switch was undone
