"""General-neuron statistics and causal selection against straightforward per-prompt / per-neuron loops."""

from __future__ import annotations

import math

import pytest
import torch

from bias_lens.hooks import mask_neurons
from bias_lens.locate.attribution import logit_diff_dir, neuron_attribution, norm_parts, check_pair
from bias_lens.locate.causal import causal_selection, evaluate_sets, retention, retention_texts
from bias_lens.locate.general_neurons import detect_general, filter_general, masking_effect, position_stats
from bias_lens.targets import resolve_targets

PROMPTS = [
    "The nurse laughed because",
    "The carpenter went home because",
    "The doctor said that they would come",
    "Two plus",
    "The engineer went home because she was tired",
]

# causal_selection(tiny_llama, 7 candidates, PROMPTS, k=3, max_rows=12) AFGB deltas from the code
# before the scorer/metric unification (base_model + lm.unembed + double softmax, inline gap)
OLD_LLAMA_DELTAS = [-2.8645750540124294e-08, 2.8255199398512926e-08, 9.086440157598684e-08, -7.773570008006217e-07,
                    1.8377077131624632e-07, -1.4518535684438687e-06, 8.500767461791753e-07]


def _ids(lm, prompt, start=False):
    """Token ids [1, pos]; ``start`` puts the start token (tiny tokenizer: no BOS, so EOS) in front by id."""
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    return torch.cat([torch.tensor([[lm.tokenizer.eos_token_id]]), ids], 1) if start else ids


def _acts(lm, prompt, start=False):
    """All-position activations |m| [layer, pos, d_mlp] and final-residual scale [pos] by plain hooks."""
    ids = _ids(lm, prompt, start)
    got = {}
    hs = [lm.submodule(l, "mlp.down").register_forward_pre_hook(lambda m, a, l=l: got.__setitem__(l, a[0][0].double()))
          for l in range(lm.n_layers)]
    try:
        with torch.no_grad():
            out = lm.hf(ids, output_hidden_states=True)
    finally:
        for h in hs:
            h.remove()
    return torch.stack([got[l] for l in range(lm.n_layers)]), out


@pytest.mark.parametrize("by,start", [("activation", True), ("attribution", True), ("activation", False)])
def test_position_stats_match_loop(tiny, by, start):
    """start=True (the default): position 0 is the prepended start token (the tiny tokenizer has no
    BOS, so its EOS); start=False keeps the earlier first-token reading."""
    z = 1.0  # low threshold so the tiny random model has outsized neurons to count
    stats = position_stats(tiny, PROMPTS, by=by, z=z, batch_size=2, start_token=start)
    arg0 = torch.zeros(tiny.n_layers, tiny.d_mlp, dtype=torch.float64)
    outs = torch.zeros_like(arg0)
    elig = 0
    r = norm_parts(tiny.final_norm).read_dir(logit_diff_dir(tiny, check_pair(tiny, "he,she")))
    for p in PROMPTS:
        m, out = _acts(tiny, p, start)
        n = m.shape[1]
        for l in range(tiny.n_layers):
            for k in range(tiny.d_mlp):
                a = m[l, :, k].abs()
                if by == "attribution":
                    v = tiny.submodule(l, "mlp.down")
                    vk = (v(torch.eye(tiny.d_mlp)[k : k + 1]) - v(torch.zeros(1, tiny.d_mlp))).double()[0].detach()
                    # raw final residual = hidden state before ln_f: rebuild scale from the last block output via the hook-free path
                    c = (m[l, :, k] * float(r @ vk)).abs() / _final_scale(tiny, p, start)
                else:
                    c = a
                arg0[l, k] += float(int(c.argmax()) == 0)
                if n >= 3:
                    rest = a[1:]
                    outs[l, k] += float(a[0] > rest.mean() + z * rest.std(unbiased=False))
        elig += n >= 3
    assert torch.allclose(stats.argmax0_frac, arg0 / len(PROMPTS))
    assert torch.allclose(stats.outsized_frac, outs / elig)
    assert stats.n_eligible == elig and stats.start_token == ("eos-prepended" if start else "first-token")


def _final_scale(lm, prompt, start=False):
    ids = _ids(lm, prompt, start)
    got = {}
    h = lm.block(lm.n_layers - 1).register_forward_hook(lambda m, a, o: got.__setitem__("x", (o[0] if isinstance(o, tuple) else o)[0].double()))
    try:
        with torch.no_grad():
            lm.hf(ids)
    finally:
        h.remove()
    return norm_parts(lm.final_norm).scale(got["x"])[:, 0]


def test_filter_and_detect(tiny_llama):
    lm = tiny_llama
    stats = position_stats(lm, PROMPTS, z=1.0)
    res = neuron_attribution(lm, PROMPTS)
    filt = filter_general(res, stats, min_frac=0.5)
    excluded = set(filt.extras["general_excluded"])
    flat = stats.argmax0_frac.reshape(-1)
    expect = {res.labels[i] for i in range(len(res.labels)) if flat[i] >= 0.5}
    assert excluded == expect and excluded  # the random model has some
    assert set(filt.labels) == set(res.labels) - expect
    assert torch.allclose(filt.extras["signed"], torch.stack([res.extras["signed"][res.labels.index(x)] for x in filt.labels]))
    det = detect_general(stats, min_frac=0.6)
    assert set(det.labels) == {f"L{i // lm.d_mlp}N{i % lm.d_mlp}" for i in range(flat.numel()) if stats.outsized_frac.reshape(-1)[i] >= 0.6}


def _ppl_loop(lm, texts=None):
    """Retention oracle: one plain HF forward per sentence, start token (BOS, else EOS) put in front
    by id, every sentence token scored in float64."""
    texts = retention_texts() if texts is None else texts
    start = lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else lm.tokenizer.eos_token_id
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([[start] + lm.tokenizer(t, add_special_tokens=False).input_ids])
        with torch.no_grad():
            lp = torch.log_softmax(lm.hf(ids).logits[0, :-1].double(), -1)
        nll -= float(lp.gather(-1, ids[0, 1:, None]).sum())
        n += ids.shape[1] - 1
    return math.exp(nll / n)


def _afgb_loop(lm, ts):
    """AFGB oracle: one plain HF forward per prompt, full logits, hand-written |p0 - p1| mean."""
    gaps = []
    for prompt in PROMPTS:
        ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            p = torch.softmax(lm.hf(ids).logits[0, -1].double(), -1)[ts.first_ids]
        gaps.append(abs(float(p[0] - p[1])))
    return sum(gaps) / len(gaps)


def test_retention_texts_are_the_benchmark_corpus(tiny_llama):
    """Causal selection's retention is the retention benchmark's definition (same corpus, same
    BOS prefix, same per-token scores) on its first sentences."""
    from bias_lens.benchmarks.external import retention_sentences
    from bias_lens.benchmarks.sentence_scoring import token_logprobs

    texts = retention_texts()
    assert texts == retention_sentences()[: len(texts)] and len(texts) == 8
    lps = token_logprobs(tiny_llama, texts)
    want = math.exp(-sum(float(t.sum()) for t in lps) / sum(len(t) for t in lps))
    assert retention(tiny_llama)[0] == pytest.approx(want, rel=1e-12)
    # the replicated, per-row-masked batch path of causal selection gives the same perplexity
    _, p = evaluate_sets(tiny_llama, [[], [(0, 1)]], PROMPTS[:2], resolve_targets(tiny_llama.tokenizer, "he,she"),
                         max_rows=4)
    assert float(p[0]) == pytest.approx(want, rel=1e-7)  # other batch layout: float32 logit rounding
    with tiny_llama.hooks(mask_neurons({0: [1]})):
        assert float(p[1]) == pytest.approx(_ppl_loop(tiny_llama), rel=1e-6)


def test_causal_scores_unchanged_by_unification(tiny_llama):
    """Regression against the pre-unification implementation (base model + unembed, double softmax;
    values recorded by running the old code on this fixture, seed 0): AFGB deltas agree to 1e-10."""
    ts = resolve_targets(tiny_llama.tokenizer, "he,she")
    cands = ["L0N3", "L1N7", "L2N0", "L2N5", "L1N40", "L0N90", "L2N77"]
    res = causal_selection(tiny_llama, cands, PROMPTS, ts, k=3, max_ppl_increase=0.5, max_rows=12)
    old = torch.tensor(OLD_LLAMA_DELTAS, dtype=torch.float64)
    assert torch.allclose(res.scores, old, rtol=0, atol=1e-10)
    assert res.extras["afgb_base"] == pytest.approx(0.00024466463970634694, abs=1e-10)  # as the deltas: float32 forwards differ by ~1e-12 across CPUs
    assert res.extras["selected"] == ["L0N90", "L2N5", "L0N3"]
    assert res.extras["retention"] == "retention_sentences[:8],bos"


def test_masking_effect_and_retention(tiny_llama):
    lm = tiny_llama
    assert abs(retention(lm)[0] - _ppl_loop(lm)) < 1e-6 * _ppl_loop(lm)
    eff = masking_effect(lm, ["L0N1", "L1N2"], ["L2N3", "L2N4"], n=2)
    with lm.hooks(mask_neurons({0: [1], 1: [2]})):
        g = _ppl_loop(lm)
    assert abs(eff["general"] - g) < 1e-6 * g and abs(eff["base"] - _ppl_loop(lm)) < 1e-6 * g


def test_causal_independent_matches_loop(tiny):
    lm = tiny
    ts = resolve_targets(lm.tokenizer, "he,she")
    cands = ["L0N3", "L1N7", "L2N0", "L2N5", "L1N40", "L0N90", "L2N77"]
    res = causal_selection(lm, cands, PROMPTS, ts, k=3, max_ppl_increase=0.5, max_rows=12)  # 2 candidates per forward
    a0, p0 = _afgb_loop(lm, ts), _ppl_loop(lm)
    assert abs(res.extras["afgb_base"] - a0) < 1e-9 and abs(res.extras["ppl_base"] - p0) < 1e-6 * p0
    loop = {}
    for c in cands:
        l, k = int(c[1]), int(c.split("N")[1])
        with lm.hooks(mask_neurons({l: [k]})):
            loop[c] = (_afgb_loop(lm, ts) - a0, _ppl_loop(lm))
        i = res.labels.index(c)
        assert abs(float(res.scores[i]) - loop[c][0]) < 1e-9
        assert abs(float(res.extras["ppl"][i]) - loop[c][1]) < 1e-6 * p0
    ok = sorted((v[0], c) for c, v in loop.items() if v[0] < 0 and v[1] <= p0 * 1.5)
    assert res.extras["selected"] == [c for _, c in ok[:3]]


def test_causal_greedy_matches_loop(tiny_llama):
    lm = tiny_llama
    ts = resolve_targets(lm.tokenizer, "he,she")
    cands = ["L0N3", "L1N7", "L2N0", "L2N5", "L1N40", "L2N77"]
    res = causal_selection(lm, cands, PROMPTS, ts, k=3, max_ppl_increase=1.0, mode="greedy")
    chosen, cur = [], _afgb_loop(lm, ts)
    limit = _ppl_loop(lm) * 2.0
    for _ in range(3):
        trials = []
        for c in cands:
            if c in chosen:
                continue
            mask = {}
            for x in chosen + [c]:
                mask.setdefault(int(x[1]), []).append(int(x.split("N")[1]))
            with lm.hooks(mask_neurons(mask)):
                a, p = _afgb_loop(lm, ts), _ppl_loop(lm)
            if p <= limit:
                trials.append((a, c))
        a, c = min(trials)
        if a >= cur:
            break
        chosen.append(c)
        cur = a
    assert res.labels == chosen
    assert abs(res.extras["afgb"][-1] - cur) < 1e-7


def test_causal_rejects_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="no candidate"):
        causal_selection(tiny_llama, [], PROMPTS)
    with pytest.raises(ValueError, match="out of range"):
        causal_selection(tiny_llama, ["L9N1"], PROMPTS)
    with pytest.raises(ValueError, match="mode"):
        causal_selection(tiny_llama, ["L0N1"], PROMPTS, mode="x")


def test_attention_start_stats_and_candidate_filter(tiny_llama):
    """Attention value neurons' important position (largest |a[h,last,pos] v[pos,d]|) against
    eager-attention HF outputs, and the start filter on the paper's mixed candidate set."""
    from bias_lens.locate.query_neurons import paper_candidates
    from bias_lens.locate.value_neurons import kv_head

    lm = tiny_llama
    stats = position_stats(lm, PROMPTS, z=1.0, attention=True, batch_size=2)
    H, dh = lm.n_heads, lm.d_head
    want = torch.zeros(lm.n_layers, H, dh, dtype=torch.float64)
    prev = lm.hf.config._attn_implementation
    lm.hf.set_attn_implementation("eager")
    try:
        for p in PROMPTS:
            with torch.no_grad():
                out = lm.hf(_ids(lm, p, True), output_attentions=True, output_hidden_states=True)
            for l, layer in enumerate(lm.hf.model.layers):
                with torch.no_grad():
                    v = layer.self_attn.v_proj(layer.input_layernorm(out.hidden_states[l][0])).double()
                for h in range(H):
                    a = out.attentions[l][0, h, -1].double()
                    for d in range(dh):
                        want[l, h, d] += float(int((a * v[:, kv_head(lm, h) * dh + d]).abs().argmax()) == 0)
    finally:
        lm.hf.set_attn_implementation(prev)
    assert torch.allclose(stats.attn_argmax0_frac, want / len(PROMPTS))
    cand = paper_candidates(lm, PROMPTS, k=6, batch_size=2)
    with pytest.raises(ValueError, match="attention=True"):
        filter_general(cand, position_stats(lm, PROMPTS, z=1.0))
    filt = filter_general(cand, stats, min_frac=0.5)

    def frac(lab):
        if "V" in lab:
            l, h, d = (int(x) for x in lab[1:].replace("H", " ").replace("V", " ").split())
            return float(want[l, h, d] / len(PROMPTS))
        return float(stats.argmax0_frac[int(lab[1:].split("N")[0]), int(lab.split("N")[1])])

    removed = [i for i, lab in enumerate(cand.labels) if frac(lab) >= 0.5]
    assert filt.extras["n_removed"] == len(removed) > 0 and filt.extras["n_before"] == 18
    kept = [i for i in range(18) if i not in removed]
    assert filt.labels == [cand.labels[i] for i in kept]
    assert filt.extras["kind"] == [cand.extras["kind"][i] for i in kept]


@pytest.mark.integration
def test_smollm2_start_token_is_prepended(smol):
    """SmolLM2's tokenizer adds no BOS: the filter scores prompts with its BOS in front."""
    from bias_lens.locate.general_neurons import with_start_token

    assert smol.tokenizer("The nurse is a")["input_ids"][0] != smol.tokenizer.bos_token_id
    out, kind = with_start_token(smol, ["The nurse is a", "Two plus"])
    ids = smol.tokenizer(out)["input_ids"]
    assert kind == "bos-prepended"
    assert [i[0] for i in ids] == [smol.tokenizer.bos_token_id] * 2
    assert [i[1:] for i in ids] == smol.tokenizer(["The nurse is a", "Two plus"])["input_ids"]
    assert with_start_token(smol, ["The nurse is a"], start_token=False) == (["The nurse is a"], "first-token")
