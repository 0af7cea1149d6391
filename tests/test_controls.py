"""The located edit's controls (issue 14 item 8): ``Where(pick="lowest" | "random")`` edits the same
amount at the lowest-ranked or a seeded random place of the same ranking, trained identically.

Oracles: the picked labels against a hand sort / ``random.Random(seed).sample`` of the ranking; the
mask of a picked plan covers exactly the picked module; the main job's neuron closed-form control
locates its entries inside the picked module; bad combinations are one clear error.
"""

from __future__ import annotations

import random

import pytest
import torch

from bias_lens.edit.methods import Equalise, Masking
from bias_lens.locate.result import LocateResult
from bias_lens.pipeline.driver import apply_plan, picked_labels
from bias_lens.pipeline.plan import EditPlan, Where

RANKING = LocateResult("module", ["L0.mlp.down", "L1.mlp.down", "L2.mlp.down", "L3.mlp.down"],
                       torch.tensor([0.2, 0.9, -0.1, 0.5], dtype=torch.float64))


def test_picked_labels_against_a_hand_sort():
    by_score = sorted(RANKING.labels, key=lambda lab: -float(RANKING.scores[RANKING.labels.index(lab)]))
    assert picked_labels(RANKING, 2, "top") == by_score[:2] == ["L1.mlp.down", "L3.mlp.down"]
    assert picked_labels(RANKING, 2, "lowest") == by_score[::-1][:2] == ["L2.mlp.down", "L0.mlp.down"]
    order = RANKING.order()
    want = [RANKING.labels[i] for i in random.Random(5).sample(order, 2)]
    assert picked_labels(RANKING, 2, "random", seed=5) == want
    assert picked_labels(RANKING, 1, "middle") == [by_score[2]]  # rank n // 2 = 2
    asc = LocateResult("x", RANKING.labels, RANKING.scores, ascending=True)  # low scores = important
    assert picked_labels(asc, 1, "top") == ["L2.mlp.down"] and picked_labels(asc, 1, "lowest") == ["L1.mlp.down"]
    with pytest.raises(ValueError, match="pick must be"):
        picked_labels(RANKING, 1, "centre")


def test_a_picked_plan_edits_the_picked_module(tiny_llama):
    lm = tiny_llama
    ranking = LocateResult("module", ["L2.mlp.down", "L1.mlp.down", "L0.mlp.down"],
                           torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    for pick, want in (("top", "L2"), ("lowest", "L0")):
        plan = EditPlan(Masking(0.5), Where("module", pick=pick), n_samples=4)
        run = apply_plan(lm, plan, ranking, limits={"genbiaseval": 4}, batch_size=4)
        try:
            assert run.record.labels == [f"{want}.mlp.down"]
            assert set(run.edit.indices) == {f"model.layers.{want[1:]}.mlp.down_proj.weight"}
        finally:
            run.handle.undo()


def test_main_job_neuron_controls_are_the_lowest_or_random_entries_of_the_located_module(tiny_llama, tmp_path):
    """The closed-form neuron row's controls edit the same number of entries of the located module: its
    lowest solution shares, or seeded random ones (``solution_entries(pick=...)``, tested against a
    hand computation in test_equalise.py)."""
    from bias_lens.edit.equalise import solution_entries
    from bias_lens.pipeline.cache import StageCache
    from bias_lens.pipeline.config import RunConfig
    from bias_lens.pipeline.driver import split_samples
    from bias_lens.pipeline.edit_stage import run_row

    lm = tiny_llama
    cfg = RunConfig.quick_preset(model=lm.hf.config._name_or_path, n_train_solve=8, row_limits={"genbiaseval": 8})
    results = {"module_edit": LocateResult("module", ["L2.mlp.down", "L1.mlp.down", "L0.mlp.down"],
                                           torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))}
    for pick in ("lowest", "random"):
        row = EditPlan(Equalise(ridge=0.05, keep_hint=False), Where("neuron", k=32, pick=pick), name=f"neuron ({pick})")
        rec = run_row(lm, cfg, row, results, StageCache(tmp_path / pick, "k"))
        plan = cfg.plan(row)
        train = split_samples(plan)[0]
        want = solution_entries(lm, "L2.mlp.down", train, k=32, config=plan.method.config(), pick=pick, seed=plan.seed)
        assert rec["labels"] == want.labels[:50] and rec["cost_p"] == 32


def test_bad_picks_are_one_clear_error():
    with pytest.raises(ValueError, match="pick must be one of"):
        Where("module", pick="centre")
    with pytest.raises(ValueError, match="nesting 'flat'"):
        Where("module", nesting="msme", pick="random")
    with pytest.raises(ValueError, match="matched_random"):
        Where("attribution", pick="random")


def test_cli_pick_needs_a_scale(capsys):
    from bias_lens.cli import main

    assert main(["edit", "--method", "fpft", "--pick", "lowest"]) == 2
    assert "give --scale" in capsys.readouterr().err
