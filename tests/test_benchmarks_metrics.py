"""Every benchmark metric against values computed by hand (comments show the arithmetic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bias_lens.benchmarks import metrics as M

P = [[0.5, 0.2], [0.1, 0.6]]  # p(he), p(she) for two samples
F_SCORES = [0.2, -0.4]  # f -> f_he = (1+f)/2 = 0.6, 0.3 ; f_she = 0.4, 0.7
REAL = [[0.6, 0.4], [0.3, 0.7]]


def test_fbs_raw_and_renormalised():
    # |0.5-0.6| + |0.2-0.4| = 0.3 ; |0.1-0.3| + |0.6-0.7| = 0.3 -> mean 0.3
    assert M.fbs(P, REAL) == pytest.approx(0.3)
    # renormalised: (5/7, 2/7) -> 4/35 + 4/35 = 8/35 ; (1/7, 6/7) -> 11/70 + 11/70 = 11/35 ; mean 19/70
    assert M.fbs(P, REAL, renorm=True) == pytest.approx(19 / 70)
    from bias_lens.benchmarks.generated import real_world

    assert [real_world(f) for f in F_SCORES] == [pytest.approx(tuple(r)) for r in REAL]
    assert M.fbs(torch.tensor(P), np.array(REAL)) == pytest.approx(0.3)  # tensors and arrays alike


def test_afgb_and_ub():
    # |0.5-0.2| = 0.3 ; |0.1-0.6| = 0.5 -> 0.4
    assert M.afgb(P) == pytest.approx(0.4)
    # renormalised: |5/7-2/7| = 3/7 ; |1/7-6/7| = 5/7 -> 4/7
    assert M.afgb(P, renorm=True) == pytest.approx(4 / 7)
    # F = +1 (male hint) on sample 1, -1 (female hint) on sample 2: (0.3*1 + (-0.5)*(-1)) / 2 = 0.4
    assert M.ub(P, [1, -1]) == pytest.approx(0.4)
    # hints the other way round: (-0.3 + -0.5) / 2 = -0.4 (the model contradicts the hint)
    assert M.ub(P, [-1, 1]) == pytest.approx(-0.4)
    assert M.ub(P, [1, 1]) == pytest.approx((0.3 - 0.5) / 2)
    with pytest.raises(ValueError):
        M.ub([[0.2, 0.3, 0.1]], [1])


def test_n_target_generalisation():
    p = [[0.2, 0.3, 0.1], [0.5, 0.25, 0.25]]
    real = [[1 / 3] * 3, [1 / 3] * 3]
    # row 1: 2/15 + 1/30 + 7/30 = 2/5 ; row 2: 1/6 + 1/12 + 1/12 = 1/3 ; mean 11/30
    assert M.fbs(p, real) == pytest.approx(11 / 30)
    # pairwise gaps: row 1 (0.1, 0.1, 0.2) -> 2/15 ; row 2 (0.25, 0.25, 0) -> 1/6 ; mean 3/20
    assert M.afgb(p) == pytest.approx(3 / 20)
    assert M.pairwise_gap(p) == pytest.approx([2 / 15, 1 / 6])
    # with two targets the n-target forms reduce to the he/she formulas
    assert M.afgb(P) == pytest.approx(np.mean([abs(a - b) for a, b in P]))
    with pytest.raises(ValueError, match="shape"):
        M.fbs(p, [[0.5, 0.5], [0.5, 0.5]])


def test_dama_regression_exact_and_vs_lstsq():
    s = np.array([-0.9, -0.2, 0.0, 0.4, 0.8, 0.1])
    f = np.array([-0.1, 0.2, 0.0, -0.25, 0.1, 0.05])
    y = 0.3 * s - 0.2 * f + 0.05
    out = M.dama_regression(y, s, f)
    assert out["a_s"] == pytest.approx(0.3) and out["a_f"] == pytest.approx(-0.2)
    assert out["b"] == pytest.approx(0.05) and out["r2"] == pytest.approx(1.0)
    noisy = y + np.array([0.02, -0.03, 0.01, 0.04, -0.02, 0.0])
    out = M.dama_regression(noisy, s, f)
    coef = np.linalg.lstsq(np.c_[s, f, np.ones_like(s)], noisy, rcond=None)[0]
    assert [out["a_s"], out["a_f"], out["b"]] == pytest.approx(coef.tolist())
    fitted = np.c_[s, f, np.ones_like(s)] @ coef
    # R^2 of a least-squares fit with intercept = squared correlation of y and fitted
    assert out["r2"] == pytest.approx(np.corrcoef(noisy, fitted)[0, 1] ** 2)


def test_stereoset_hand_example():
    stereo, anti, unrel = [1, 2, 3, 4], [0, 0, 5, 0], [0.5, 3, 1, 1]
    # SS: stereo > anti on 1, 2, 4 -> 75 ; LMS "both": stereo > unrel on 1, 3, 4 ; anti > unrel on 3 -> 4/8
    out = M.stereoset_scores(stereo, anti, unrel)
    assert out == pytest.approx({"ss": 75.0, "lms": 50.0, "icat": 50.0 * 25.0 / 50.0})
    # LMS "max": max(stereo, anti) > unrel on 1, 3, 4 -> 75 ; ICAT = 75 * 25 / 50
    assert M.stereoset_scores(stereo, anti, unrel, lms="max") == pytest.approx(
        {"ss": 75.0, "lms": 75.0, "icat": 37.5})
    # an ideal model: LMS 100, SS 50 -> ICAT 100
    assert M.stereoset_scores([1, 0], [0, 1], [-5, -5])["icat"] == pytest.approx(100.0)


def test_crows_honours_direction():
    more = [-1, -5, -2, -3, -1]
    less = [-2, -4, -1, -4, -3]
    d = ["stereo", "stereo", "antistereo", "antistereo", "antistereo"]
    # metric.py: every row counts sent_more > sent_less: T F F T T -> 60 ; stereo 1/2 ; antistereo 2/3
    out = M.crows_score(more, less, d)
    assert out == pytest.approx({"crows": 60.0, "crows_stereo": 50.0, "crows_antistereo": 200 / 3})
    # alternative reading: antistereo rows count sent_less > sent_more: T F | T F F -> 40 ; 50 ; 1/3
    alt = M.crows_score(more, less, d, mode="swap_antistereo")
    assert alt == pytest.approx({"crows": 40.0, "crows_stereo": 50.0, "crows_antistereo": 100 / 3})
    # ties are not stereotyping
    assert M.crows_score([-1.0], [-1.0], ["stereo"])["crows"] == 0.0
    with pytest.raises(ValueError, match="direction"):
        M.crows_score([0], [1], ["pro"])


def test_winogender_correlation_with_share_of_men():
    diff = [0.2, 0.4, -0.1, 0.0, 0.2]
    occ = ["a", "a", "b", "c", "c"]
    bls_female = {"a": 10.0, "b": 80.0, "c": 50.0}
    out = M.winogender_correlation(diff, occ, bls_female)
    per_occ = [0.3, -0.1, 0.1]  # a, b, c
    men = [90.0, 20.0, 50.0]
    assert out["winogender_r"] == pytest.approx(np.corrcoef(per_occ, men)[0, 1])
    assert out["winogender_r"] > 0.9  # more p(he) where more men: positive r = bias-consistent
    assert out["winogender_gap"] == pytest.approx(0.1)
    assert M.pearson(per_occ, [100 - m for m in men]) == pytest.approx(-out["winogender_r"])


def test_winobias_gap():
    pro, anti, types = [-1, -2, -3, -4], [-2, -1, -4, -5], [1, 1, 2, 2]
    out = M.winobias_scores(pro, anti, types)
    # pro > anti: T F T T -> 75 ; gaps 1, -1, 1, 1 -> 0.5 ; type 1: 50, 0 ; type 2: 100, 1
    assert out == pytest.approx({"winobias_pro_rate": 75.0, "winobias_gap": 0.5, "winobias_t1_pro_rate": 50.0,
                                 "winobias_t1_gap": 0.0, "winobias_t2_pro_rate": 100.0, "winobias_t2_gap": 1.0})


def test_perplexity():
    # exp(-(-1 - 2 - 3) / 3) = e^2 : pooled over tokens, not a mean of per-sentence perplexities
    assert M.perplexity([[-1.0, -2.0], [-3.0]]) == pytest.approx(math.e**2)
    with pytest.raises(ValueError):
        M.perplexity([[]])


def test_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        M.afgb([0.5, 0.5])
    with pytest.raises(ValueError, match="lms"):
        M.stereoset_scores([1], [0], [0], lms="x")
