"""Causal selection and masking over mixed FFN / attention value neurons (issue 16 A.4).

Oracles: plain HF forwards with the masked channel scaled by hand in a raw torch pre-hook on the
module that reads it (down_proj for ``L{l}N{k}``, o_proj for ``L{l}H{h}V{d}``: input slice
``h * d_head + d``), per prompt / per sentence, AFGB and perplexity written out again; the weight
edit against the same hand hook; undo by bits; the pipeline against its stages called one by one.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from bias_lens.arch import param_ref
from bias_lens.edit.edits import bits
from bias_lens.edit.neuron_masking import neuron_editing, neuron_mask_edit, neuron_mask_hooks, o_column_mask
from bias_lens.locate.causal import causal_selection, evaluate_sets, parse_units, retention_texts
from bias_lens.locate.neuron_pipeline import dedupe_candidates, matched_random, paper_selection
from bias_lens.locate.result import LocateResult
from bias_lens.targets import resolve_targets

PROMPTS = ["The nurse laughed because", "The carpenter went home because", "The doctor said that they would come",
           "The engineer went home because she was tired"]
TEXTS = retention_texts()[:3]


@contextlib.contextmanager
def hand_mask(lm, labels, scale=0.0):
    """Scale each unit's input channel of down_proj / o_proj by hand (raw torch pre-hooks)."""
    cols: dict[tuple[int, str], list[int]] = {}
    for lab in labels:
        if "V" in lab:  # L{l}H{h}V{d}
            l, rest = lab[1:].split("H")
            h, d = map(int, rest.split("V"))
            cols.setdefault((int(l), "attn.o"), []).append(h * lm.d_head + d)
        else:
            l, k = lab[1:].split("N")
            cols.setdefault((int(l), "mlp.down"), []).append(int(k))

    def pre(idx):
        def hook(module, args):
            x = args[0].clone()
            x[..., idx] = x[..., idx] * scale
            return (x,)
        return hook

    handles = [lm.submodule(l, kind).register_forward_pre_hook(pre(idx)) for (l, kind), idx in cols.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def afgb_by_hand(lm, ts):
    out = 0.0
    for prompt in PROMPTS:
        with torch.no_grad():
            logits = lm.hf(lm.tokenizer(prompt, return_tensors="pt").input_ids).logits[0, -1].double()
        p = logits.softmax(-1)[list(ts.first_ids)]
        out += abs(float(p[0] - p[1]))
    return out / len(PROMPTS)


def ppl_by_hand(lm):
    start = lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else lm.tokenizer.eos_token_id
    nll, n = 0.0, 0
    for t in TEXTS:
        ids = [start] + lm.tokenizer(t, add_special_tokens=False).input_ids
        with torch.no_grad():
            lp = lm.hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        nll -= sum(float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1))
        n += len(ids) - 1
    return math.exp(nll / n)


def _ids(lm):
    return lm.tokenizer(["The nurse laughed because he", "The doctor went"], return_tensors="pt", padding=True)


# --------------------------------------------------------------------------- units and hooks
def test_units_map_to_the_o_proj_input_channel_of_the_query_head(tiny):
    lm = tiny
    got = parse_units(lm, ["L1N5", "L2H3V1", "L0H0V0"])
    assert got == [(1, 5), (2, 3, 1), (0, 0, 0)]
    labels = ["L2H3V1", "L0H1V4", "L1N7"]
    ids = _ids(lm)
    with torch.no_grad():
        with hand_mask(lm, labels, 0.3):
            want = lm.hf(**ids).logits
        with lm.hooks(neuron_mask_hooks(labels, scale=0.3, lm=lm)):
            hooked = lm.hf(**ids).logits
        base = lm.hf(**ids).logits
    torch.testing.assert_close(hooked, want, rtol=0, atol=1e-6)
    assert not torch.allclose(hooked, base, atol=1e-6)


def _z(lm, layer, hooks=(), v_dim=None):
    """o_proj input of ``layer`` (raw pre-hook registered last, so it sees what o_proj reads), with
    ``hooks`` installed and, if ``v_dim``, that v_proj output dim zeroed (the KV reading)."""
    ids, z = _ids(lm), {}
    zero_v = lambda m, a, out: out.index_fill(-1, torch.tensor([v_dim]), 0.0)  # noqa: E731
    with torch.no_grad(), lm.hooks(list(hooks)):
        hs = [lm.submodule(layer, "attn.o").register_forward_pre_hook(lambda m, a: z.__setitem__("z", a[0].clone()))]
        if v_dim is not None:
            hs.append(lm.submodule(layer, "attn.v").register_forward_hook(zero_v))
        try:
            lm.hf(**ids)
        finally:
            for h in hs:
                h.remove()
    return z["z"]


def test_masking_a_query_head_leaves_the_heads_sharing_its_kv_head(tiny_llama):
    """GQA (4 query heads on 2 KV heads): masking L1H0V2 changes only z[h=0, d=2]; zeroing the v_proj
    dim of the KV head it reads (kv(0) = 0, shared with query head 1) would change heads 0 and 1."""
    from bias_lens.locate.value_neurons import kv_head

    lm = tiny_llama
    dh = lm.d_head
    base = _z(lm, 1)
    ours = _z(lm, 1, neuron_mask_hooks(["L1H0V2"], lm=lm))
    assert (base != ours).any(0).any(0).nonzero().flatten().tolist() == [0 * dh + 2]
    assert not ours[..., 2].any()
    kv = _z(lm, 1, v_dim=kv_head(lm, 0) * dh + 2)
    assert kv_head(lm, 1) == kv_head(lm, 0)
    assert (base != kv).any(0).any(0).nonzero().flatten().tolist() == [0 * dh + 2, 1 * dh + 2]


def test_parse_units_rejects_bad_labels(tiny_llama):
    with pytest.raises(ValueError, match="out of range"):
        parse_units(tiny_llama, ["L1H9V0"])
    with pytest.raises(ValueError, match="out of range"):
        parse_units(tiny_llama, ["L1H0V99"])
    with pytest.raises(ValueError):
        parse_units(tiny_llama, ["L1H0"])
    with pytest.raises(ValueError, match="lm="):
        neuron_mask_hooks(["L1H0V2"])


# --------------------------------------------------------------------------- weight edit
@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_value_neuron_edit_equals_hand_hook_and_undoes_bit_exactly(tiny, scale):
    lm = tiny
    labels = ["L2H3V1", "L0H1V4", "L0H2V0", "L1N7", "L2N40"]
    ids = _ids(lm)
    before = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}
    with torch.no_grad():
        with hand_mask(lm, labels, scale):
            want = lm.hf(**ids).logits
        edit = neuron_mask_edit(lm, labels, scale=scale)
        assert edit.size == 5 * lm.d_model
        h = edit.apply_(lm)
        got = lm.hf(**ids).logits
        h.undo()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for n, p in lm.hf.named_parameters():
        assert torch.equal(bits(p.detach()), bits(before[n])), n
    # exactly the o_proj columns h * d_head + d (HF [out, in]; GPT-2 Conv1D stores [in, out])
    mask = o_column_mask(lm, ["L0H1V4"])
    (name,) = mask.names
    m = mask.masks[name]
    cols = m.T if param_ref(lm.hf, "L0.attn.o").transposed else m
    assert cols.any(0).nonzero().flatten().tolist() == [1 * lm.d_head + 4] and bool(cols[:, 1 * lm.d_head + 4].all())
    assert edit.meta["value_neurons"] == ["L2H3V1", "L0H1V4", "L0H2V0"]


def test_ffn_only_edit_meta_and_mask_are_unchanged(tiny_llama):
    """FFN labels give the same mask and meta as before value neurons were added (no value key)."""
    from bias_lens.edit.neuron_masking import down_column_mask

    e = neuron_mask_edit(tiny_llama, ["L0N1", "L2N5"])
    assert set(e.meta) == {"neurons", "scale", "include_inputs"}
    assert e.counts() == down_column_mask(tiny_llama, {0: [1], 2: [5]}).counts()
    with pytest.raises(ValueError, match="LensModel"):
        neuron_mask_edit(tiny_llama.hf, ["L0H1V1"])


# --------------------------------------------------------------------------- causal selection
CANDS = ["L0N3", "L2H1V2", "L1N7", "L2H3V0", "L1H0V5", "L2N5", "L0H2V3"]


def test_causal_mixed_independent_matches_hand_loop(tiny_llama):
    lm = tiny_llama
    ts = resolve_targets(lm.tokenizer, "he,she")
    res = causal_selection(lm, CANDS, PROMPTS, ts, k=3, max_ppl_increase=0.5, texts=TEXTS, max_rows=8)  # 2 per forward
    a0, p0 = afgb_by_hand(lm, ts), ppl_by_hand(lm)
    assert res.extras["afgb_base"] == pytest.approx(a0, abs=1e-9)
    assert res.extras["ppl_base"] == pytest.approx(p0, rel=1e-6)
    loop = {}
    for c in CANDS:
        with hand_mask(lm, [c]):
            loop[c] = (afgb_by_hand(lm, ts) - a0, ppl_by_hand(lm))
        i = res.labels.index(c)
        assert float(res.scores[i]) == pytest.approx(loop[c][0], abs=1e-9)
        assert float(res.extras["ppl"][i]) == pytest.approx(loop[c][1], rel=1e-6)
    ok = sorted((v[0], c) for c, v in loop.items() if v[0] < 0 and v[1] <= p0 * 1.5)
    assert res.extras["selected"] == [c for _, c in ok[:3]]
    assert any("V" in c for c in CANDS if abs(loop[c][0]) > 1e-9)  # value neurons really move the gap


def test_causal_mixed_greedy_matches_hand_loop(tiny_llama):
    lm = tiny_llama
    ts = resolve_targets(lm.tokenizer, "he,she")
    cands = CANDS[:5]
    res = causal_selection(lm, cands, PROMPTS, ts, k=2, max_ppl_increase=1.0, mode="greedy", texts=TEXTS)
    chosen, cur, limit = [], afgb_by_hand(lm, ts), 2.0 * ppl_by_hand(lm)
    for _ in range(2):
        trials = []
        for c in (c for c in cands if c not in chosen):
            with hand_mask(lm, chosen + [c]):
                if ppl_by_hand(lm) <= limit:
                    trials.append((afgb_by_hand(lm, ts), c))
        a, c = min(trials)
        if a >= cur:
            break
        chosen, cur = chosen + [c], a
    assert res.labels == chosen and res.extras["afgb"][-1] == pytest.approx(cur, abs=1e-7)


def test_evaluate_sets_scale_of_sets_with_both_kinds(tiny_llama):
    """One replica masking an FFN and a value neuron together equals the hand mask of both."""
    lm = tiny_llama
    ts = resolve_targets(lm.tokenizer, "he,she")
    a, p = evaluate_sets(lm, [[(1, 7), (2, 1, 2)], []], PROMPTS, ts, TEXTS, max_rows=8)
    with hand_mask(lm, ["L1N7", "L2H1V2"]):
        assert float(a[0]) == pytest.approx(afgb_by_hand(lm, ts), abs=1e-9)
        assert float(p[0]) == pytest.approx(ppl_by_hand(lm), rel=1e-6)
    assert float(a[1]) == pytest.approx(afgb_by_hand(lm, ts), abs=1e-9)


# --------------------------------------------------------------------------- pipeline
def test_dedupe_keeps_first_kind():
    cand = LocateResult("paper-candidates", ["L1N2", "L0H1V1", "L1N2", "L0N4"], torch.tensor([3.0, 2.0, 1.0, 0.5]),
                        extras={"kind": ["ffn-value", "attn-value", "ffn-query", "ffn-query"]})
    out, n = dedupe_candidates(cand)
    assert n == 1 and out.labels == ["L1N2", "L0H1V1", "L0N4"]
    assert out.extras["kind"] == ["ffn-value", "attn-value", "ffn-query"] and out.scores.tolist() == [3.0, 2.0, 0.5]


def test_paper_selection_equals_its_stages_and_the_edit(tiny_llama):
    from bias_lens.locate.general_neurons import filter_general, position_stats
    from bias_lens.locate.query_neurons import paper_candidates

    lm = tiny_llama
    ts = resolve_targets(lm.tokenizer, "he,she")
    cand = paper_candidates(lm, PROMPTS, ts, k=4, batch_size=2)
    stats = position_stats(lm, PROMPTS, targets=ts, batch_size=2, attention=True)
    sel = paper_selection(lm, PROMPTS, PROMPTS[:3], ts, k_candidates=4, k=3, max_ppl_increase=0.5, texts=TEXTS,
                          max_rows=8)
    uniq = list(dict.fromkeys(cand.labels))
    assert sel.candidates == uniq and sel.n_duplicates == len(cand.labels) - len(uniq)
    filt = filter_general(dedupe_candidates(cand)[0], stats)
    assert sel.filtered == filt.labels and set(sel.general) == set(filt.extras["general_excluded"])
    causal = causal_selection(lm, filt.labels, PROMPTS[:3], ts, k=3, max_ppl_increase=0.5, texts=TEXTS, max_rows=8)
    assert sel.selected == causal.extras["selected"] and torch.equal(sel.causal.scores, causal.scores)
    c = sel.counts()
    assert c["raw"] == 12 and c["candidates"] == c["removed"] + c["filtered"] and c["selected"] == len(sel.selected)
    assert sum(c["by_kind"]["candidates"].values()) == c["candidates"]
    assert c["by_kind"]["candidates"]["attn-value"] == 4  # value neurons never collide with FFN labels
    assert sel.to_dict()["counts"] == c
    if sel.selected:  # the edit masks exactly the selected neurons; their Table 2 rides along
        from bias_lens.locate.projection import neuron_vocab_projection

        assert sel.causal.extras["projection"] == neuron_vocab_projection(lm, sel.selected, k=10)
        assert sel.to_dict()["projection"] == sel.causal.extras["projection"]
        ed = neuron_editing(lm, [], [], ts, scale=0.5, selection=sel)
        ref = neuron_mask_edit(lm, sel.selected, scale=0.5)
        assert ed.edit.counts() == ref.counts() and all(torch.equal(ed.edit.values[n], ref.values[n]) for n in ref.values)
        assert ed.to_dict()["edit_size"] == len(sel.selected) * lm.d_model


def test_neuron_editing_rejects_bad_scale_and_empty_selection(tiny_llama):
    from bias_lens.locate.neuron_pipeline import NeuronSelection

    with pytest.raises(ValueError, match="scale"):
        neuron_editing(tiny_llama, PROMPTS, PROMPTS, scale=1.0)
    empty = NeuronSelection(["L0N1"], ["ffn-value"], 0, [], ["L0N1"], [], LocateResult("causal", ["L0N1"], torch.zeros(1)),
                            "eos-prepended", 0.5)
    with pytest.raises(ValueError, match="kept none"):
        neuron_editing(tiny_llama, PROMPTS, PROMPTS, selection=empty)


def test_matched_random_same_kinds_and_layers(tiny_llama):
    lm = tiny_llama
    labels = ["L2N5", "L1H3V2", "L2H0V0", "L0N1", "L2N6"]
    r = matched_random(lm, labels, seed=3, exclude=["L0N2"])
    assert r == matched_random(lm, labels, seed=3, exclude=["L0N2"]) and r != matched_random(lm, labels, seed=4)
    assert len(set(r)) == len(r) and not set(r) & set(labels + ["L0N2"])
    units = parse_units(lm, r)
    for lab, u, v in zip(labels, parse_units(lm, labels), units):
        assert len(u) == len(v) and u[0] == v[0]
    with pytest.raises(ValueError, match="no unused"):
        matched_random(lm, ["L0N0"], exclude=[f"L0N{k}" for k in range(1, lm.d_mlp)])
