"""Benchmark runners against independent plain-transformers computations: one unpadded forward
per prompt / sentence, softmax or log-softmax by hand, metric formulas written out again."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bias_lens.benchmarks import evaluate, load_split
from bias_lens.benchmarks.generated import RELIGION_TARGETS
from bias_lens.benchmarks.next_token import next_token_logprobs
from bias_lens.benchmarks.runners import subset
from bias_lens.targets import resolve_targets


def _ids(tok, text: str) -> list[int]:
    return list(tok(text)["input_ids"])


@torch.no_grad()
def plain_next_probs(lm, prompt: str, words) -> list[float]:
    """p(word | prompt) by unpadded forwards; multi-token words teacher-forced token by token."""
    ids = _ids(lm.tokenizer, prompt)
    first = torch.log_softmax(lm.hf(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
    out = []
    for w in words:
        cont = lm.tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        lp, seq = float(first[cont[0]]), ids + [cont[0]]
        for t in cont[1:]:
            lp += float(torch.log_softmax(lm.hf(input_ids=torch.tensor([seq])).logits[0, -1].double(), -1)[t])
            seq = seq + [t]
        out.append(math.exp(lp))
    return out


@torch.no_grad()
def plain_token_logprobs(lm, text: str) -> list[float]:
    """log p(token_t | BOS-or-EOS, tokens_<t) for every token of ``text``."""
    tok = lm.tokenizer
    pre = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = [pre] + list(tok(text, add_special_tokens=False)["input_ids"])
    lp = torch.log_softmax(lm.hf(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]


def test_profession_probabilities_and_metrics(tiny):
    res = evaluate(tiny, "genbiaseval", "test", limit=6, batch_size=4)
    rows = subset(load_split("genbiaseval", "test"), 6)
    assert res.n == 6 and [d["prompt"] for d in res.details] == [r["prompt"] for r in rows]
    p = np.array([plain_next_probs(tiny, r["prompt"], ["he", "she"]) for r in rows])
    got = np.array([[d["p_he"], d["p_she"]] for d in res.details])
    np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-9)
    fbs = np.mean([abs(a - (1 + r["f"]) / 2) + abs(b - (1 - r["f"]) / 2) for (a, b), r in zip(p, rows)])
    assert res.metrics["fbs"] == pytest.approx(fbs, rel=1e-5)
    assert res.metrics["afgb"] == pytest.approx(np.mean(np.abs(p[:, 0] - p[:, 1])), rel=1e-5)
    q = p / p.sum(1, keepdims=True)
    assert res.metrics["afgb_renorm"] == pytest.approx(np.mean(np.abs(q[:, 0] - q[:, 1])), rel=1e-5)
    assert res.metrics["mass"] == pytest.approx(float(p.sum(1).mean()), rel=1e-5)
    fbs_r = np.mean([abs(a - (1 + r["f"]) / 2) + abs(b - (1 - r["f"]) / 2) for (a, b), r in zip(q, rows)])
    assert res.metrics["fbs_renorm"] == pytest.approx(fbs_r, rel=1e-5)
    for scale in {r["scale"] for r in rows}:
        sel = np.array([r["scale"] == scale for r in rows])
        assert res.metrics[f"afgb_{scale}_renorm"] == pytest.approx(np.mean(np.abs(q[sel, 0] - q[sel, 1])), rel=1e-5)
    assert {"profession", "f", "s", "template", "scale"} <= set(res.details[0])


def test_hint_and_dama_runners(tiny_llama):
    res = evaluate(tiny_llama, "genhinteval", "dev", limit=6)
    rows = subset(load_split("genhinteval", "dev"), 6)
    p = np.array([plain_next_probs(tiny_llama, r["prompt"], ["he", "she"]) for r in rows])
    F = np.array([1 if r["hint"] in ("his", "himself") else -1 for r in rows])
    assert res.metrics["ub"] == pytest.approx(float(np.mean(F * (p[:, 0] - p[:, 1]))), rel=1e-5)
    res = evaluate(tiny_llama, "dama", "test", limit=8)
    rows = subset(load_split("dama", "test"), 8)
    p = np.array([plain_next_probs(tiny_llama, r["prompt"], ["he", "she"]) for r in rows])
    X = np.c_[[r["s"] for r in rows], [r["f"] for r in rows], np.ones(8)]
    coef = np.linalg.lstsq(X, p[:, 0] - p[:, 1], rcond=None)[0]
    assert [res.metrics[k] for k in ("a_s", "a_f", "b")] == pytest.approx(coef.tolist(), rel=1e-4, abs=1e-9)
    q = p / p.sum(1, keepdims=True)
    coef_r = np.linalg.lstsq(X, q[:, 0] - q[:, 1], rcond=None)[0]
    assert [res.metrics[k + "_renorm"] for k in ("a_s", "a_f", "b")] == pytest.approx(coef_r.tolist(), rel=1e-4, abs=1e-9)


def test_shared_prefix_cache_equals_plain_forward(tiny):
    """The cached 2-shot prefix path (GenBiasPro-CG) gives the plain forward's numbers."""
    shared = "The nurse said that the doctor and the teacher went home because"
    prompts = [shared + s for s in (" he was tired . The baker", " she", " he was happy . The nurse laughed because",
                                    " they would come , and his friend agreed with")]
    t = resolve_targets(tiny.tokenizer, "he,she")
    ids = [_ids(tiny.tokenizer, p) for p in prompts]
    assert min(len(i) for i in ids) > 16 and len({tuple(i[:16]) for i in ids}) == 1  # the cache path is taken
    got = next_token_logprobs(tiny, prompts, t, batch_size=3).exp().numpy()
    want = np.array([plain_next_probs(tiny, p, ["he", "she"]) for p in prompts])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    nocache = next_token_logprobs(tiny, prompts, t, batch_size=3, shared_prefix=False).exp().numpy()
    np.testing.assert_allclose(nocache, want, rtol=1e-5, atol=1e-9)


def test_sentence_suites_match_hand_loop(tiny_llama):
    lm = tiny_llama
    res = evaluate(lm, "stereoset", "test", limit=5, batch_size=4)
    st, an, un = [], [], []
    for d in res.details:  # default sentence score: mean token log-prob after BOS/EOS
        st.append(np.mean(plain_token_logprobs(lm, d["stereotype"])))
        an.append(np.mean(plain_token_logprobs(lm, d["anti_stereotype"])))
        un.append(np.mean(plain_token_logprobs(lm, d["unrelated"])))
    np.testing.assert_allclose([d["score_stereotype"] for d in res.details], st, rtol=1e-6)
    np.testing.assert_allclose([d["score_unrelated"] for d in res.details], un, rtol=1e-6)
    ss = 100 * np.mean(np.array(st) > np.array(an))
    lms = 100 * (np.sum(np.array(st) > np.array(un)) + np.sum(np.array(an) > np.array(un))) / 10
    assert res.metrics["ss"] == pytest.approx(ss) and res.metrics["lms"] == pytest.approx(lms)
    assert res.metrics["icat"] == pytest.approx(lms * min(ss, 100 - ss) / 50)
    assert res.options["sentence_score"] == "mean"

    # the other sentence scores: official geometric-mean probability, BiasEdit's mean probability
    for variant, fn in (("geomean", lambda t: math.exp(np.mean(t))), ("mean_prob", lambda t: np.mean(np.exp(t)))):
        r2 = evaluate(lm, "stereoset", "test", limit=5, batch_size=4, sentence_score=variant)
        want = [fn(plain_token_logprobs(lm, d["stereotype"])) for d in r2.details]
        np.testing.assert_allclose([d["score_stereotype"] for d in r2.details], want, rtol=1e-6)
        assert r2.options["sentence_score"] == variant
    assert evaluate(lm, "stereoset", "test", limit=5, sentence_score="geomean").metrics["ss"] == res.metrics["ss"]

    res = evaluate(lm, "crows-pairs", "test", limit=6)
    more = [sum(plain_token_logprobs(lm, d["sent_more"])) for d in res.details]
    less = [sum(plain_token_logprobs(lm, d["sent_less"])) for d in res.details]
    np.testing.assert_allclose([d["ll_more"] for d in res.details], more, rtol=1e-6)
    assert res.metrics["crows"] == pytest.approx(100 * np.mean(np.array(more) > np.array(less)))

    res = evaluate(lm, "winobias", "test", limit=4, sentence_score="mean")
    pro = [np.mean(plain_token_logprobs(lm, d["pro"])) for d in res.details]
    anti = [np.mean(plain_token_logprobs(lm, d["anti"])) for d in res.details]
    np.testing.assert_allclose([d["ll_pro"] for d in res.details], pro, rtol=1e-5)
    assert res.metrics["winobias_gap"] == pytest.approx(float(np.mean(np.array(pro) - np.array(anti))), abs=1e-5)


@torch.no_grad()
def test_stereoset_intersentence_scores_the_continuation_only(tiny_llama):
    """Intersentence: log p(sentence | BOS, context) by one plain forward over the concatenation."""
    lm, tok = tiny_llama, tiny_llama.tokenizer
    res = evaluate(lm, "stereoset-inter", "dev", limit=3, axis="all")
    pre = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for d in res.details:
        ctx = tok(d["prompt"], add_special_tokens=False)["input_ids"]
        for key in ("stereotype", "anti_stereotype", "unrelated"):
            cont = tok(" " + d[key], add_special_tokens=False)["input_ids"]
            ids = [pre] + ctx + cont
            lp = torch.log_softmax(lm.hf(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            want = np.mean([float(lp[t - 1, ids[t]]) for t in range(1 + len(ctx), len(ids))])
            assert d[f"score_{key}"] == pytest.approx(want, rel=1e-6)
    assert res.options["task"] == "intersentence"


def test_winogender_runner(tiny_llama):
    res = evaluate(tiny_llama, "winogender", "test", limit=8)
    diff, occ = [], []
    for d in res.details:
        pm, pf = plain_next_probs(tiny_llama, d["prompt"], d["targets"])
        assert d["p_male"] == pytest.approx(pm, rel=1e-5) and d["p_female"] == pytest.approx(pf, rel=1e-5)
        diff.append(pm - pf)
        occ.append(d["occupation"])
    names = sorted(set(occ))
    per = [np.mean([x for x, o in zip(diff, occ) if o == n]) for n in names]
    men = [100 - next(d["bls_pct_female"] for d in res.details if d["occupation"] == n) for n in names]
    assert res.metrics["winogender_r"] == pytest.approx(np.corrcoef(per, men)[0, 1], rel=1e-5)


def test_retention_runner(tiny_llama):
    lm = tiny_llama
    res = evaluate(lm, "retention", "test", limit=4)
    sents = [d for d in res.details if d["kind"] == "sentence"]
    probe = [d for d in res.details if d["kind"] == "probe"]
    assert len(sents) == 4 and len(probe) == 4
    lps = [plain_token_logprobs(lm, d["prompt"]) for d in sents]
    n_tok = sum(len(x) for x in lps)
    assert res.metrics["perplexity"] == pytest.approx(math.exp(-sum(map(sum, lps)) / n_tok), rel=1e-6)
    lp, hits = [], []
    with torch.no_grad():
        for d in probe:  # teacher-forced target log-prob and greedy top-1 match, token by token
            ids = _ids(lm.tokenizer, d["prompt"])
            total, ok = 0.0, True
            for t in lm.tokenizer(d["target"], add_special_tokens=False)["input_ids"]:
                logits = lm.hf(input_ids=torch.tensor([ids])).logits[0, -1].double()
                total += float(torch.log_softmax(logits, -1)[t])
                ok &= int(logits.argmax()) == t
                ids = ids + [t]
            lp.append(total)
            hits.append(ok)
    assert res.metrics["probe_logprob"] == pytest.approx(np.mean(lp), rel=1e-6)
    assert res.metrics["probe_accuracy"] == pytest.approx(np.mean(hits))


def test_religion_n_targets_end_to_end(tiny_llama):
    res = evaluate(tiny_llama, "religion", "test", limit=2)
    p = np.array([plain_next_probs(tiny_llama, d["prompt"], RELIGION_TARGETS) for d in res.details])
    got = np.array([[d[f"p_{w}"] for w in RELIGION_TARGETS] for d in res.details])
    np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-12)
    assert res.metrics["fbs"] == pytest.approx(np.mean(np.abs(p - 0.2).sum(1)), rel=1e-5)
    gaps = [np.mean([abs(r[i] - r[j]) for i in range(5) for j in range(i + 1, 5)]) for r in p]
    assert res.metrics["afgb"] == pytest.approx(np.mean(gaps), rel=1e-5)


def test_runner_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="two words"):
        evaluate(tiny_llama, "genbiaseval", "test", limit=2, targets=["he", "she", "they"])
    with pytest.raises(ValueError, match="limit"):
        evaluate(tiny_llama, "genbiaseval", "test", limit=0)
    with pytest.raises(ValueError, match="no split"):
        evaluate(tiny_llama, "crows-pairs", "train")
    with pytest.raises(ValueError, match="not distinct"):
        evaluate(tiny_llama, "genbiaseval", "test", limit=2, targets=["he", "he"])
    with pytest.raises(ValueError, match="several tokens"):
        evaluate(tiny_llama, "genbiaseval", "test", limit=2, targets=["he", "zqxjv"])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(tiny_llama, "genbiaseval", "test", limit=2, batch_size=0)
    res = evaluate(tiny_llama, "genbiaseval", "test", limit=2, targets=["he", "zqxjv"], multi_token=True)
    assert res.options["multi_token"] and res.metrics["mass"] > 0


@pytest.mark.integration
def test_smol_genbiaseval_cg_stereoset_match_plain(smol):
    res = evaluate(smol, "genbiaseval", "test", limit=4)
    for d in res.details:
        assert [d["p_he"], d["p_she"]] == pytest.approx(plain_next_probs(smol, d["prompt"], ["he", "she"]), rel=1e-4)
    cg = evaluate(smol, "genbiaspro-cg", "test", limit=2)  # the cached 2-shot prefix path
    d = cg.details[0]
    assert [d["p_he"], d["p_she"]] == pytest.approx(plain_next_probs(smol, d["prompt"], ["he", "she"]), rel=1e-4)
    st = evaluate(smol, "stereoset", "test", limit=2)
    for d in st.details:
        assert d["score_anti_stereotype"] == pytest.approx(np.mean(plain_token_logprobs(smol, d["anti_stereotype"])),
                                                           rel=1e-5)


@pytest.mark.integration
def test_smol_reproduces_outside_measurements(smol):
    """Numbers measured on SmolLM2 with outside code: DAMA's own scoring + regression on DAMA's
    split (a_s 0.094, R^2 0.399) and StereoSet gender SS under the official labels (61.3 with the
    mean token log-prob; BiasEdit's swapped file gave 38.7). The pronoun mass is ~0.42."""
    dama = evaluate(smol, "dama", "test", batch_size=64).metrics
    assert dama["a_s"] == pytest.approx(0.094, abs=0.002) and dama["r2"] == pytest.approx(0.399, abs=0.005)
    ss = evaluate(smol, "stereoset", "test", batch_size=64).metrics["ss"]
    assert ss == pytest.approx(61.3, abs=0.1)
    gbe = evaluate(smol, "genbiaseval", "test", limit=256, batch_size=64).metrics
    assert 0.38 < gbe["mass"] < 0.46 and gbe["afgb_renorm"] > gbe["afgb"]


def test_commonwords_suite_through_evaluate(tiny_llama):
    """The registered suite scores each row on its own pair, exactly as plain forwards do."""
    from bias_lens.benchmarks.commonwords import commonwords_metrics

    res = evaluate(tiny_llama, "commonwords", "test", limit=4, multi_token=True)
    rows = subset(load_split("commonwords", "test"), 4)
    p = np.array([plain_next_probs(tiny_llama, r["prompt"], r["targets"]) for r in rows])
    want = commonwords_metrics(p, rows)
    assert res.metrics == pytest.approx(want, rel=1e-5, abs=1e-12)
    with pytest.raises(ValueError, match="own pair"):
        evaluate(tiny_llama, "commonwords", "test", limit=2, targets=["he", "she"])
