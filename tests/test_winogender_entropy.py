"""WinoGender entropy difference against hand computations: entropies of hand-made probability
rows written out with ``math.log2``, and the runner's value recomputed from plain unpadded
``lm.hf`` forwards with a softmax by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bias_lens.benchmarks import evaluate
from bias_lens.benchmarks import metrics as M


def _h(*q: float) -> float:
    return -sum(x * math.log2(x) for x in q if x > 0)


def test_entropy_difference_by_hand():
    # renormalised rows: (0.75, 0.25), (0.5, 0.5), (1, 0)
    p = [[0.3, 0.1], [0.2, 0.2], [0.5, 0.0]]
    h = [0.75 * math.log2(4 / 3) + 0.25 * 2.0, 1.0, 0.0]
    assert _h(0.75, 0.25) == pytest.approx(h[0])
    out = M.winogender_entropy(p)
    assert out["winogender_entropy_max"] == 1.0
    assert out["winogender_entropy_mean"] == pytest.approx(sum(h) / 3)
    assert out["winogender_entropy"] == pytest.approx(1.0 - sum(h) / 3)
    # of_mean: mean renormalised row = (0.75, 0.25)
    assert M.winogender_entropy(p, reading="of_mean")["winogender_entropy"] == pytest.approx(1.0 - h[0])


def test_entropy_difference_extremes_and_three_pronouns():
    assert M.winogender_entropy([[0.2, 0.2], [0.01, 0.01]])["winogender_entropy"] == pytest.approx(0.0)
    assert M.winogender_entropy([[0.4, 0.0], [0.0, 0.3]])["winogender_entropy"] == pytest.approx(1.0)
    # decisive per sentence but balanced overall: the two readings disagree
    assert M.winogender_entropy([[0.4, 0.0], [0.0, 0.3]], reading="of_mean")["winogender_entropy"] == pytest.approx(0.0)
    three = M.winogender_entropy(torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.1, 0.1]]))
    assert three["winogender_entropy_max"] == pytest.approx(math.log2(3))
    assert three["winogender_entropy"] == pytest.approx(math.log2(3) - (math.log2(3) + _h(0.5, 0.25, 0.25)) / 2)


@pytest.mark.parametrize("bad, msg", [
    ([[0.5, -0.1]], ">= 0"), ([[0.0, 0.0]], "positive sum"), ([0.5, 0.5], "shape"),
])
def test_entropy_rejects_bad_rows(bad, msg):
    with pytest.raises(ValueError, match=msg):
        M.winogender_entropy(bad)
    with pytest.raises(ValueError, match="reading"):
        M.winogender_entropy([[0.5, 0.5]], reading="after_minus_before")


@torch.no_grad()
def test_runner_attaches_entropy_from_plain_forwards(tiny_llama):
    lm = tiny_llama
    res = evaluate(lm, "winogender", "test", limit=8)
    h = []
    for d in res.details:
        ids = list(lm.tokenizer(d["prompt"])["input_ids"])
        probs = torch.softmax(lm.hf(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        pm, pf = (float(probs[lm.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]]) for w in d["targets"])
        h.append(_h(pm / (pm + pf), pf / (pm + pf)))
    assert res.metrics["winogender_entropy"] == pytest.approx(1.0 - np.mean(h), rel=1e-6, abs=1e-9)
    assert res.metrics["winogender_entropy_mean"] == pytest.approx(np.mean(h), rel=1e-6)
    assert {"winogender_r", "winogender_gap", "winogender_r_renorm", "mass"} <= set(res.metrics)
