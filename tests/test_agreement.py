"""Cross-method agreement over layers: ranks and Spearman against hand computations, the per-layer
reduction of every label kind, and the figure/report built from it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bias_lens.locate.agreement import agreement, layer_scores, ranks, spearman
from bias_lens.locate.result import LocateResult


def test_ranks_average_ties_and_spearman_by_hand():
    assert ranks(np.array([10.0, 30.0, 20.0, 30.0])).tolist() == [1.0, 3.5, 2.0, 3.5]
    a, b = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)); d = (1, 1, 1, 1, 0) -> 1 - 24/120 = 0.8
    assert spearman(a, b) == pytest.approx(0.8, abs=1e-12)
    assert spearman(a, -a) == pytest.approx(-1.0, abs=1e-12)
    assert spearman(a, 3 * a**3 + 1) == pytest.approx(1.0, abs=1e-12)  # monotone: ranks only
    # with ties: Pearson of the average ranks, by hand: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4)
    x, y = np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])
    rx, ry = np.array([1, 2.5, 2.5, 4]) - 2.5, np.array([1, 2, 3, 4]) - 2.5
    assert spearman(x, y) == pytest.approx(float((rx * ry).sum() / math.sqrt((rx**2).sum() * (ry**2).sum())), abs=1e-12)
    assert math.isnan(spearman(np.ones(4), y))


def _res(method, labels, scores, ascending=False):
    return LocateResult(method, labels, torch.tensor(scores, dtype=torch.float64), ascending=ascending)


def test_layer_scores_reduce_each_label_kind():
    n = 3
    assert layer_scores(_res("layer", ["L0", "L1", "L2"], [0.1, -0.5, 0.3]), n).tolist() == [0.1, -0.5, 0.3]
    mod = _res("module", ["L0.attn.q", "L0.mlp", "L1.mlp.down", "L2.attn"], [0.2, -0.7, 0.4, 0.1])
    assert layer_scores(mod, n).tolist() == [0.7, 0.4, 0.1]  # max |score| in the layer
    assert layer_scores(mod, n, "sum").tolist() == pytest.approx([0.9, 0.4, 0.1])
    heads = _res("attribution", ["L2H1", "L2H0", "L0N5", "L0.mlp.down/row3/col1"], [0.5, -0.6, 0.2, 0.9])
    got = layer_scores(heads, n)
    assert got[[0, 2]].tolist() == [0.9, 0.6] and np.isnan(got[1])  # L1 not covered
    asc = _res("row", ["L1.mlp.down/row0", "L2.mlp.down/row1"], [0.2, 0.5], ascending=True)
    got = layer_scores(asc, n)
    assert np.isnan(got[0]) and got[1:].tolist() == [-0.2, -0.5]  # lower = more important
    # uncovered layers rank below every covered one, tied: (nan, 2, 1, nan) ~ ranks (1.5, 4, 3, 1.5)
    assert spearman(np.array([np.nan, 2.0, 1.0, np.nan]), np.array([0.0, 4.0, 3.0, 0.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside layers"):
        layer_scores(_res("layer", ["L5"], [1.0]), n)
    with pytest.raises(ValueError, match="reduce"):
        layer_scores(mod, n, "mean")


def test_agreement_matrix_and_its_figure_and_report_line():
    from bias_lens.pipeline.report import agreement_line
    from bias_lens.plot.locate import agreement_heatmap

    rs = {"layer": _res("layer", ["L0", "L1", "L2", "L3"], [0.1, 0.2, 0.4, 0.3]),
          "module": _res("module", ["L0.mlp.down", "L1.attn.o", "L2.mlp.up", "L3.mlp"], [0.0, 0.3, 0.5, 0.4]),
          "bmi": _res("bmi", ["L0", "L1", "L2", "L3"], [0.9, 0.5, 0.2, 0.1])}
    a = agreement(rs, 4)
    assert a.methods == ["layer", "module", "bmi"] and a.top_layer == {"layer": 2, "module": 2, "bmi": 0}
    assert a.spearman[0, 1] == pytest.approx(1.0) and a.spearman[0, 2] == pytest.approx(spearman(
        np.array([0.1, 0.2, 0.4, 0.3]), np.array([0.9, 0.5, 0.2, 0.1])))
    assert np.allclose(a.spearman, a.spearman.T) and np.allclose(np.diag(a.spearman), 1)
    d = a.to_dict()
    fig = agreement_heatmap(d)
    assert np.allclose(np.array(fig.data[0].z), a.spearman) and fig.data[0].x[2] == "bmi (top L0)"
    line = agreement_line(d)
    assert "layer~module 1.00" in line and "bmi L0" in line
    with pytest.raises(ValueError, match="at least two"):
        agreement({"layer": rs["layer"]}, 4)
