"""Joint causal selection (``causal_selection(..., mode="joint")``, bias_lens.locate.causal_joint).

Oracles: the additive greedy against a plain-Python loop over the same numbers (math.tanh, no
torch in the loop); every reading of the tiny-model run (single masks, each verified prefix, the
chosen prefix) against plain HF forwards with the channels scaled by hand (``hand_mask`` of
test_causal_mixed), renormalised gap and mass written out again; the identity
``|q0 - q1| = |tanh(d / 2)|``.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_causal_mixed import CANDS, PROMPTS, TEXTS, hand_mask, ppl_by_hand

from bias_lens.locate.causal import causal_selection, parse_units, set_readings
from bias_lens.locate.causal_joint import additive_path, best_prefix, renorm_gap
from bias_lens.targets import resolve_targets


def probs_by_hand(lm, ts) -> list[tuple[float, float]]:
    out = []
    for prompt in PROMPTS:
        with torch.no_grad():
            logits = lm.hf(lm.tokenizer(prompt, return_tensors="pt").input_ids).logits[0, -1].double()
        p = logits.softmax(-1)[list(ts.first_ids)]
        out.append((float(p[0]), float(p[1])))
    return out


def renorm_by_hand(pairs) -> float:
    return sum(abs(a - b) / (a + b) for a, b in pairs) / len(pairs)


def test_renorm_gap_is_the_renormalised_gap():
    p = torch.tensor([[0.3, 0.1], [0.02, 0.05], [0.4, 0.4]], dtype=torch.float64)
    d = p[:, 0].log() - p[:, 1].log()
    assert float(renorm_gap(d)) == pytest.approx(renorm_by_hand(p.tolist()), abs=1e-12)


def _path_by_hand(base, single, allowed, k, ratio, F=(), tol=0.05):
    """The additive greedy in plain Python; the last ``len(F)`` prompts are hint prompts (UB guard)."""
    N, h = len(base), len(F)
    n = N - h
    d0 = [math.log(a) - math.log(b) for a, b in base]
    delta = [[math.log(s[i][0]) - math.log(s[i][1]) - d0[i] for i in range(N)] for s in single]
    dm = [[math.log(s[i][0] + s[i][1]) - math.log(sum(base[i])) for i in range(N)] for s in single]
    floor = ratio * sum(sum(b) for b in base[:n]) / n
    ub_floor = sum(f * (base[n + i][0] - base[n + i][1]) for i, f in enumerate(F)) / h - tol if h else None
    cur_d, cur_m, chosen = list(d0), [0.0] * N, []
    cur = sum(abs(math.tanh(x / 2)) for x in d0[:n]) / n
    while len(chosen) < k:
        best = None
        for j in range(len(single)):
            if j in chosen or not allowed[j]:
                continue
            score = sum(abs(math.tanh((cur_d[i] + delta[j][i]) / 2)) for i in range(n)) / n
            mass = sum(sum(base[i]) * math.exp(cur_m[i] + dm[j][i]) for i in range(n)) / n
            if h:  # p(he) - p(she) of a hint prompt: its mass times (sigmoid(d) - sigmoid(-d))
                mi = [sum(base[n + i]) * math.exp(cur_m[n + i] + dm[j][n + i]) for i in range(h)]
                di = [cur_d[n + i] + delta[j][n + i] for i in range(h)]
                sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
                ub = sum(f * mi[i] * (sig(di[i]) - sig(-di[i])) for i, f in enumerate(F)) / h
                if ub < ub_floor:
                    continue
            if mass >= floor and (best is None or score < best[0]):
                best = (score, j)
        if best is None or not best[0] < cur:
            break
        cur, j = best
        chosen.append(j)
        cur_d = [cur_d[i] + delta[j][i] for i in range(n)]
        cur_m = [cur_m[i] + dm[j][i] for i in range(n)]
    return chosen


def test_additive_path_matches_a_plain_loop_and_stops_before_overshooting():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(12, 2, generator=g, dtype=torch.float64) * 0.4 + 0.05
    single = (base[None] * torch.exp(torch.randn(9, 12, 2, generator=g, dtype=torch.float64) * 0.3)).clamp(1e-4, 0.99)
    allowed = torch.tensor([True] * 7 + [False, True])
    for ratio in (0.0, 0.9):
        path = additive_path(base, single, allowed, k=5, min_mass_ratio=ratio)
        assert path.order == _path_by_hand(base.tolist(), single.tolist(), allowed.tolist(), 5, ratio)
        assert 7 not in path.order and path.afgb_renorm == sorted(path.afgb_renorm, reverse=True)
    # every unit pushes the same way: the path takes only what lowers the gap, not all of them
    lean = torch.tensor([[0.3, 0.1]] * 4, dtype=torch.float64)
    push = lean[None].repeat(6, 1, 1) * torch.tensor([1.0, 1.6], dtype=torch.float64)
    path = additive_path(lean, push, torch.ones(6, dtype=torch.bool), k=6, min_mass_ratio=0.0)
    assert 1 <= len(path.order) < 6 and path.afgb_renorm[-1] < renorm_by_hand(lean.tolist())


def test_additive_path_ub_guard_matches_a_plain_loop():
    """With hint prompts appended (the last 4), the path keeps the predicted UB within the tolerance."""
    from bias_lens.locate.causal_joint import HintGuard

    g = torch.Generator().manual_seed(1)
    base = torch.rand(10, 2, generator=g, dtype=torch.float64) * 0.4 + 0.05
    single = (base[None] * torch.exp(torch.randn(12, 10, 2, generator=g, dtype=torch.float64) * 0.5)).clamp(1e-4, 0.99)
    F = [1.0, -1.0, 1.0, -1.0]
    allowed = torch.ones(12, dtype=torch.bool)
    for tol in (0.0, 0.01, 1.0):
        guard = HintGuard(torch.tensor(F, dtype=torch.float64), tol)
        path = additive_path(base, single, allowed, k=6, min_mass_ratio=0.0, guard=guard)
        assert path.order == _path_by_hand(base.tolist(), single.tolist(), [True] * 12, 6, 0.0, F, tol), tol
    loose = additive_path(base, single, allowed, k=6, min_mass_ratio=0.0, guard=HintGuard(guard.F, 1.0))
    assert loose.order == _path_by_hand(base[:6].tolist(), single[:, :6].tolist(), [True] * 12, 6, 0.0)


@pytest.mark.parametrize("value", [0.0, 0.5])
def test_joint_selection_matches_hand_masks(tiny_llama, value):
    lm = tiny_llama
    ts = resolve_targets(lm.tokenizer, "he,she")
    res = causal_selection(lm, CANDS, PROMPTS, ts, k=4, max_ppl_increase=0.5, mode="joint", texts=TEXTS,
                           max_rows=8, min_mass_ratio=0.5, value=value)
    base, ppl0 = probs_by_hand(lm, ts), ppl_by_hand(lm)
    x = res.extras
    assert x["afgb_renorm_base"] == pytest.approx(renorm_by_hand(base), rel=1e-6)
    assert x["mass_base"] == pytest.approx(sum(a + b for a, b in base) / len(base), abs=1e-9)
    assert x["ppl_base"] == pytest.approx(ppl0, rel=1e-6)
    single = []
    for c in CANDS:
        with hand_mask(lm, [c], value):
            single.append(probs_by_hand(lm, ts))
            assert x["single"]["ppl"][c] == pytest.approx(ppl_by_hand(lm), rel=1e-6)
        assert x["single"]["afgb_renorm"][c] == pytest.approx(renorm_by_hand(single[-1]), rel=1e-6)
    allowed = [x["single"]["ppl"][c] <= ppl0 * 1.5 for c in CANDS]
    order = _path_by_hand(base, single, allowed, 4, 0.5)
    assert res.labels == [CANDS[j] for j in order] and order
    best, best_score = 0, renorm_by_hand(base)
    for i in range(len(order)):
        with hand_mask(lm, res.labels[: i + 1], value):
            pairs, ppl = probs_by_hand(lm, ts), ppl_by_hand(lm)
        assert x["joint"]["afgb_renorm"][i] == pytest.approx(renorm_by_hand(pairs), rel=1e-6)
        assert x["joint"]["ppl"][i] == pytest.approx(ppl, rel=1e-6)
        mass = sum(a + b for a, b in pairs) / len(pairs)
        assert x["joint"]["mass"][i] == pytest.approx(mass, abs=1e-9)
        if ppl <= ppl0 * 1.5 and mass >= 0.5 * x["mass_base"] and renorm_by_hand(pairs) < best_score:
            best, best_score = i + 1, renorm_by_hand(pairs)
    assert x["selected"] == res.labels[:best]
    assert res.variant == f"joint,afgb_renorm,ppl<=+0.5,mass>=0.5,scale={value:g}"


def test_best_prefix_respects_the_limits():
    base = torch.tensor([[0.3, 0.1], [0.3, 0.1]], dtype=torch.float64)  # AFGB-r 0.5, mass 0.4
    joint = torch.tensor([[[0.25, 0.12]] * 2, [[0.1, 0.1]] * 2, [[0.2, 0.2]] * 2], dtype=torch.float64)
    assert best_prefix(joint, torch.tensor([1.0, 1.0, 1.0]), base, 2.0, 0.9) == 3  # prefix 2 loses mass
    assert best_prefix(joint, torch.tensor([1.0, 1.0, 3.0]), base, 2.0, 0.9) == 1  # prefix 3 over the perplexity limit
    assert best_prefix(joint, torch.tensor([1.0, 1.0, 3.0]), base, 2.0, 0.0) == 2
    assert best_prefix(joint[:0], torch.zeros(0), base, 2.0, 0.9) == 0
    # one hint prompt (F = +1, base UB 0.2) appended: prefix 3 (UB 0) falls more than 0.05 below it
    from bias_lens.locate.causal_joint import HintGuard

    hb = torch.cat([base, torch.tensor([[0.3, 0.1]], dtype=torch.float64)])
    hj = torch.cat([joint, torch.tensor([[[0.3, 0.1]], [[0.3, 0.1]], [[0.2, 0.2]]], dtype=torch.float64)], 1)
    guard = HintGuard(torch.tensor([1.0], dtype=torch.float64), 0.05)
    assert best_prefix(hj, torch.tensor([1.0, 1.0, 1.0]), hb, 2.0, 0.9, guard) == 1
    assert best_prefix(hj, torch.tensor([1.0, 1.0, 1.0]), hb, 2.0, 0.9, HintGuard(guard.F, 0.25)) == 3


def test_set_readings_agree_with_evaluate_sets(tiny_llama):
    from bias_lens.locate.causal import evaluate_sets

    lm = tiny_llama
    ts = resolve_targets(lm.tokenizer, "he,she")
    sets = [[], parse_units(lm, CANDS[:2]), parse_units(lm, CANDS[2:5])]
    p, ppl = set_readings(lm, sets, PROMPTS, ts, TEXTS, max_rows=8)
    a, ppl2 = evaluate_sets(lm, sets, PROMPTS, ts, TEXTS, max_rows=8)
    assert torch.allclose((p[..., 0] - p[..., 1]).abs().mean(-1), a, atol=1e-7)
    assert torch.allclose(ppl, ppl2, rtol=1e-9)
    # per-prompt readings come back in the prompts' order (the batches are sorted by length)
    shuffled = [PROMPTS[i] for i in (3, 0, 2, 1)]
    p, _ = set_readings(lm, [[]], shuffled, ts, TEXTS, max_rows=2)
    for i, prompt in enumerate(shuffled):
        with torch.no_grad():
            logits = lm.hf(lm.tokenizer(prompt, return_tensors="pt").input_ids).logits[0, -1].double()
        assert torch.allclose(p[0, i], logits.softmax(-1)[list(ts.first_ids)], atol=1e-9)


def test_joint_mode_errors(tiny_llama):
    with pytest.raises(ValueError, match="mode 'joint' only"):
        causal_selection(tiny_llama, CANDS, PROMPTS, value=0.5)
    with pytest.raises(ValueError, match="must be in \\[0, 1\\)"):
        causal_selection(tiny_llama, CANDS, PROMPTS, mode="joint", value=1.0)
    with pytest.raises(ValueError, match="min_mass_ratio"):
        causal_selection(tiny_llama, CANDS, PROMPTS, mode="joint", min_mass_ratio=1.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        causal_selection(tiny_llama, CANDS, PROMPTS, mode="both")


def test_joint_selection_ub_guard_matches_hand_masks(tiny_llama):
    """The UB readings (base, single masks, every prefix) against plain forwards; the chosen prefix keeps UB."""
    lm = tiny_llama
    ts = resolve_targets(lm.tokenizer, "he,she")
    hint = [{"prompt": "The woman said that", "F": -1.0}, {"prompt": "My father told me that", "F": 1.0}]
    res = causal_selection(lm, CANDS, PROMPTS, ts, k=4, max_ppl_increase=0.5, mode="joint", texts=TEXTS, max_rows=8,
                           min_mass_ratio=0.5, hint=hint, ub_tolerance=0.0)
    x = res.extras

    def ub(labels):
        with hand_mask(lm, labels):
            pairs = []
            for r in hint:
                with torch.no_grad():
                    logits = lm.hf(lm.tokenizer(r["prompt"], return_tensors="pt").input_ids).logits[0, -1].double()
                p = logits.softmax(-1)[list(ts.first_ids)]
                pairs.append(r["F"] * float(p[0] - p[1]))
        return sum(pairs) / len(pairs)

    assert x["ub_base"] == pytest.approx(ub([]), abs=1e-9) and x["n_hint"] == 2
    for c in CANDS:
        assert x["single"]["ub"][c] == pytest.approx(ub([c]), abs=1e-9)
    for i in range(len(res.labels)):
        assert x["joint"]["ub"][i] == pytest.approx(ub(res.labels[: i + 1]), abs=1e-9)
    assert x["afgb_renorm_base"] == pytest.approx(renorm_by_hand(probs_by_hand(lm, ts)), rel=1e-6)  # dev prompts only
    if x["selected"]:
        assert ub(x["selected"]) >= x["ub_base"] - 1e-9
    assert res.variant.endswith(",ub>=base-0")
    with pytest.raises(ValueError, match="mode 'joint' only"):
        causal_selection(lm, CANDS, PROMPTS, hint=hint)
