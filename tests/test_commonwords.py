"""CommonWords: word list rules, prompt builder, splits, metric against hand computation, scoring
against plain HF forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bias_lens.benchmarks.commonwords import (
    CATEGORIES, TEMPLATES, build_commonwords, commonwords_metrics, commonwords_probs, prompts_for, run_commonwords, words,
)
from bias_lens.benchmarks.sources import gender_specific_words, professions


def test_word_lists_follow_the_rules():
    ws = words()
    assert tuple(ws) == CATEGORIES and all(len(v) == len(set(v)) == 100 for v in ws.values())
    flat = [w for v in ws.values() for w in v]
    assert len(set(flat)) == 500  # no word in two categories
    profs = {p[0].replace("_", " ").lower() for p in professions()}
    gendered = gender_specific_words()
    assert not set(flat) & profs
    assert not {t for w in flat for t in w.split()} & gendered


def test_prompt_builder():
    rows = prompts_for("teal", "colours")
    assert [r["prompt"] for r in rows] == [t.format(w="teal") for pair in ("noun", "pronoun") for t in TEMPLATES["colours"][pair]]
    assert [r["targets"] for r in rows] == [["man", "woman"]] * 2 + [["he", "she"]] * 2
    assert rows[0] == {"prompt": "The person whose favourite colour is teal is a", "word": "teal", "category": "colours",
                       "template": "colours/noun/0", "targets": ["man", "woman"]}
    assert all(len(TEMPLATES[c][p]) >= 2 for c in CATEGORIES for p in ("noun", "pronoun"))
    with pytest.raises(ValueError, match="category"):
        prompts_for("teal", "colors")


def test_splits_disjoint_by_word_and_seeded():
    s0, s0b, s1 = build_commonwords(0), build_commonwords(0), build_commonwords(1)
    assert s0 == s0b and s0 != s1
    assert {k: len(v) for k, v in s0.items()} == {"train": 1200, "dev": 400, "test": 400}
    by_split = {k: {(r["category"], r["word"]) for r in v} for k, v in s0.items()}
    assert not (by_split["train"] & by_split["dev"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["dev"] & by_split["test"])
    for split, n in (("train", 60), ("dev", 20), ("test", 20)):
        for c in CATEGORIES:
            assert sum(1 for cat, _ in by_split[split] if cat == c) == n
    # every word keeps all four templates inside its split
    for v in s0.values():
        per_word: dict = {}
        for r in v:
            per_word.setdefault((r["category"], r["word"]), []).append(r["template"])
        assert all(len(t) == 4 for t in per_word.values())


def test_metrics_by_hand():
    rows = [{"category": "traits"}, {"category": "traits"}, {"category": "colours"}]
    p = np.array([[0.3, 0.1], [0.05, 0.15], [0.2, 0.2]])
    m = commonwords_metrics(p, rows)
    # by hand: gaps .2, .1, 0; masses .4, .2, .4; renormalised gaps .5, .5, 0
    assert m["bias"] == pytest.approx(0.1)
    assert m["bias_renorm"] == pytest.approx(1 / 3)
    assert m["mass"] == pytest.approx(1.0 / 3)
    assert m["signed_renorm"] == pytest.approx((0.5 - 0.5 + 0) / 3)
    assert m["bias_traits"] == pytest.approx(0.15) and m["bias_traits_renorm"] == pytest.approx(0.5)
    assert m["bias_colours"] == pytest.approx(0.0) and m["bias_colours_renorm"] == pytest.approx(0.0)
    assert m["mass_traits"] == pytest.approx(0.3) and "bias_hobbies" not in m
    with pytest.raises(ValueError, match=r"\[n_rows, 2\]"):
        commonwords_metrics(p[:2], rows)
    with pytest.raises(ValueError, match="positive"):
        commonwords_metrics(np.zeros((3, 2)), rows)


def _plain_prob(lm, prompt: str, word: str) -> float:
    """p(" word" | prompt) by teacher forcing the word's tokens through the HF model."""
    ids = lm.tokenizer(prompt)["input_ids"]
    w = lm.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(lm.hf(torch.tensor([ids + w])).logits[0].double(), -1)
    return float(np.exp(sum(float(lp[len(ids) - 1 + i, t]) for i, t in enumerate(w))))


def test_scoring_matches_plain_forward(tiny_llama):
    lm = tiny_llama
    rows = prompts_for("teal", "colours") + prompts_for("barista", "professions")
    p = commonwords_probs(lm, rows, batch_size=3, multi_token=True)  # ' man' / ' woman' are several tokens here
    for i, r in enumerate(rows):
        for j in range(2):
            assert p[i, j] == pytest.approx(_plain_prob(lm, r["prompt"], r["targets"][j]), rel=1e-5)
    m, details = run_commonwords(lm, rows, batch_size=3, multi_token=True)
    assert m == commonwords_metrics(p, rows) and details[0]["p_male"] == p[0, 0]
    with pytest.raises(Exception, match="token"):
        commonwords_probs(lm, rows)  # multi-token targets are refused unless asked


@pytest.mark.integration
def test_smollm2_targets_single_token_and_scores(smol):
    rows = build_commonwords(0)["test"][:12]
    p = commonwords_probs(smol, rows, batch_size=12)  # single-token on SmolLM2: no multi_token needed
    for i in (0, 3, 7):
        r = rows[i]
        assert p[i, 1] == pytest.approx(_plain_prob(smol, r["prompt"], r["targets"][1]), rel=1e-4)
