"""LFTF as written (pipeline.lftf_sweep, scripts/measure_lftf.py, docs/lftf.md): the 7 trainings of
its rank sweep and ablation table, rank -> block against a hand-made BMI result, the ablation masks
against the block's parameter names, the he/she ablation losses by hand, one row through the driver
(only the chosen block changes, undo is bit-exact), the tables, and the main job's layer (LFTF) row
fine-tuning BMI's top block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bias_lens.arch import arch_for, block_param_names
from bias_lens.edit.losses import get_loss
from bias_lens.locate.result import LocateResult
from bias_lens.pipeline.config import FULL_ROWS, FULL_TRAINING, RunConfig
from bias_lens.pipeline.driver import apply_plan, build_mask, locate, split_samples
from bias_lens.pipeline.edit_stage import located_for
from bias_lens.pipeline.lftf_sweep import block_at_rank, lftf_rows, lftf_table, lftf_tables, located_at_rank
from bias_lens.pipeline.plan import EditPlan, Where, layer_result_name

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "lftf_results.json"
LIMITS = {"genbiaseval": 8, "genhinteval": 6, "retention": 4}
#: fast training for the tiny-model runs (2 Adam steps at a large lr so the weights move)
FAST = {"lr": 5e-2, "max_steps": 2, "batch_size": 4, "dev_limit": 4, "retention_limit": 4}
#: BMI over 5 blocks by hand: descending order L0 (0.9), L2 (0.3), L4 (0.2), L1 (0.1), L3 (0.05)
HAND_BMI = LocateResult("bmi", ["L0", "L1", "L2", "L3", "L4"], torch.tensor([0.9, 0.1, 0.3, 0.05, 0.2]))


def _bmi(scores: list[float]) -> LocateResult:
    return LocateResult("bmi", [f"L{i}" for i in range(len(scores))], torch.tensor(scores, dtype=torch.float64))


def test_rows_are_the_papers_seven_trainings():
    rows = lftf_rows(30, FULL_TRAINING)
    assert [r.key for r in rows] == ["top", "middle", "last", "no_attention", "no_mlp", "no_he", "no_she"]
    assert [r.rank for r in rows] == [0, 15, 29, 0, 0, 0, 0]
    assert [r.plan.name for r in rows] == ["LFTF, BMI rank 0 (full)", "LFTF, BMI rank 15", "LFTF, BMI rank 29",
                                           "LFTF w/o attention", "LFTF w/o MLP", "LFTF w/o he term",
                                           "LFTF w/o she term"]
    assert [r.tables for r in rows] == [("rank", "ablation"), ("rank",), ("rank",), *[("ablation",)] * 4]
    for r in rows:
        m = r.plan.method
        assert (m.paper, m.patience, m.dev_limit, r.plan.where.scale, r.plan.where.k_eff) == ("lftf", 8, 64, "layer", 1)
        assert m.config("layer", 0).lr == 1e-5  # LFTF's own learning rate at the layer scale
    assert [r.plan.method.config("layer", 0).loss for r in rows] == ["lftf"] * 5 + ["lftf_no_he", "lftf_no_she"]
    assert [r.plan.where.drop for r in rows] == [None, None, None, "attention", "mlp", None, None]
    assert [r.rank for r in lftf_rows(3)[:3]] == [0, 1, 2]
    with pytest.raises(ValueError, match="must not set 'loss'"):
        lftf_rows(30, {"loss": "gap"})


def test_rank_maps_to_the_block_bmi_ranks_there():
    assert [block_at_rank(HAND_BMI, r) for r in range(5)] == ["L0", "L2", "L4", "L1", "L3"]
    assert block_at_rank(HAND_BMI, -1) == "L3"  # the lowest BMI
    low = LocateResult("x", HAND_BMI.labels, HAND_BMI.scores, ascending=True)  # low score = important
    assert block_at_rank(low, 0) == "L3" and block_at_rank(low, -1) == "L0"
    assert block_at_rank(_bmi([0.2, 0.5, 0.5, 0.1]), 1) == "L2"  # ties keep label order: L1 (0), L2 (1)
    one = located_at_rank(HAND_BMI, 2)
    assert one.labels == ["L4"] and one.scores.tolist() == pytest.approx([0.2])
    assert one.extras["rank"] == 2 and one.extras["ranking"] == ["L0", "L2", "L4", "L1", "L3"]
    assert located_at_rank(HAND_BMI, -1).extras["rank"] == 4
    with pytest.raises(ValueError, match="out of range"):
        block_at_rank(HAND_BMI, 5)
    with pytest.raises(ValueError, match="ranks whole blocks"):
        block_at_rank(LocateResult("m", ["L1.mlp.down"], torch.ones(1)), 0)


def test_recorded_blocks_match_the_recorded_bmi():
    """docs/lftf_results.json: each row's block is the one its BMI ranks at its rank, every row ran
    and was undone bit-exactly."""
    res = json.loads(RESULTS.read_text())
    bmi = LocateResult("bmi", res["bmi"]["labels"], torch.tensor(res["bmi"]["scores"], dtype=torch.float64))
    scores = dict(zip(bmi.labels, res["bmi"]["scores"]))
    assert res["bmi"]["ranking"] == bmi.top_labels(len(bmi.labels))
    rows = {r["key"]: r for r in res["rows"]}
    assert set(rows) == {r.key for r in lftf_rows(len(bmi.labels))}
    for r in rows.values():
        assert r["block"] == block_at_rank(bmi, r["rank"]) == res["blocks"][r["key"]] == r["record"]["labels"][0]
        assert r["restored_bit_exact"] is True and r["record"]["n_changed"] > 0
    assert rows["top"]["block"] == max(scores, key=scores.get)
    assert rows["last"]["block"] == min(scores, key=scores.get)
    assert rows["middle"]["rank"] == len(bmi.labels) // 2


def test_ablation_masks_drop_the_right_tensors(tiny):
    hf, spec = tiny.hf, arch_for(tiny.hf)
    names = set(block_param_names(hf, 1))
    attn = {n for n in names if f".{spec.attn}." in n}
    mlp = {n for n in names if f".{spec.mlp}." in n}
    assert attn and mlp and attn.isdisjoint(mlp) and names - attn - mlp  # the norms are neither
    rows = {r.key: r for r in lftf_rows(3)}
    one = located_at_rank(_bmi([0.1, 0.9, 0.2]), 0)
    masks = {k: build_mask(tiny, rows[k].plan, one) for k in ("top", "no_attention", "no_mlp")}
    params = dict(hf.named_parameters())
    assert set(masks["top"].names) == names and masks["top"].size == sum(params[n].numel() for n in names)
    assert set(masks["no_attention"].names) == names - attn
    assert set(masks["no_mlp"].names) == names - mlp
    if tiny.name == "tiny-llama":  # the parameter names, spelled out once
        pre = "model.layers.1."
        assert set(masks["no_mlp"].names) == {pre + n for n in (
            "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")}


def test_he_and_she_ablation_losses_by_hand():
    p = torch.tensor([[0.3, 0.1], [0.2, 0.4]], requires_grad=True)
    f = torch.tensor([[0.5, 0.5], [0.7, 0.3]])
    rows = {r.key: r for r in lftf_rows(3)}
    loss = {k: get_loss(rows[k].plan.method.config("layer", 0).loss) for k in ("top", "no_he", "no_she")}
    assert loss["top"](p, f).item() == pytest.approx((0.3 + 0.1 + 0.2 + 0.4) / 2)
    assert loss["no_he"](p, f).item() == pytest.approx((0.1 + 0.4) / 2)  # p(she) only
    assert loss["no_she"](p, f).item() == pytest.approx((0.3 + 0.2) / 2)  # p(he) only
    (g,) = torch.autograd.grad(loss["no_he"](p, f), p)
    assert g.tolist() == [[0.0, 0.5], [0.0, 0.5]]


def test_one_row_through_the_driver_changes_only_its_block_and_undoes(tiny_llama):
    lm = tiny_llama
    snap = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}
    bmi = _bmi([0.05, 0.3, 0.9])  # rank 0 = L2, rank 1 (middle of 3) = L1
    rows = {r.key: r for r in lftf_rows(lm.n_layers, FAST)}
    for key, block in (("middle", 1), ("no_mlp", 2)):
        row = rows[key]
        plan = RunConfig.full(n_train=8).plan(row.plan)
        run = apply_plan(lm, plan, located_at_rank(bmi, row.rank), limits=LIMITS, batch_size=8)
        try:
            changed = {n for n, p in lm.hf.named_parameters() if not torch.equal(p, snap[n])}
        finally:
            run.handle.undo()
        assert all(torch.equal(p, snap[n]) for n, p in lm.hf.named_parameters())
        allowed = set(build_mask(lm, plan, located_at_rank(bmi, row.rank)).names)
        assert changed and changed <= allowed <= set(block_param_names(lm.hf, block))
        assert any(".self_attn." in n for n in changed)
        assert any(".mlp." in n for n in changed) == (key != "no_mlp")
        assert run.record.labels == [f"L{block}"] and run.record.cost_p == sum(snap[n].numel() for n in allowed)


def _rec(afgb: float, n: int = 10) -> dict:
    m = {"afgb": afgb, "afgb_renorm": 0.25, "mass": 0.3, "ub": 0.4, "perplexity": 10.1}
    return {"metrics": m, "n_changed": n, "cost_p": 12, "info": {"best_step": 2}, "labels": ["L1"]}


def test_tables_render_from_a_hand_made_results_dict():
    res = {"before": {"afgb": 0.2, "afgb_renorm": 0.25, "mass": 0.4, "ub": 0.5, "perplexity": 10.0},
           "bmi": {"labels": ["L0", "L1"], "scores": [0.9, 0.1]},
           "rows": [{"key": "top", "rank": 0, "block": "L0", "record": _rec(0.1, 1234)},
                    {"key": "no_he", "rank": 0, "block": "L0", "record": _rec(0.3)}]}
    t = lftf_table(res, "rank").splitlines()
    assert t[0] == ("| Row | Block (BMI rank) | BMI | Weights changed | AFGB | AFGB-r | p_he+p_she | UB | "
                    "PPL (neutral) | Best step |")  # FBS, MMLU, Arith: in no record, no column
    assert t[2] == "| Org (unedited) | – | – | 0 | 0.2000 | 0.2500 | 0.4000 | 0.5000 | 10.00 | – |"
    assert t[3] == ("| top | L0 (0) | 0.9000 | 1,234 of 12 | 0.1000 (-50.0%) | 0.2500 (+0.0%) | 0.3000 (-25.0%) | "
                    "0.4000 | 10.10 (+1.00%) | 2 |")
    assert t[4].startswith("| middle | not run | –") and t[5].startswith("| last | not run")
    a = lftf_table(res, "ablation").splitlines()
    assert [row.split(" | ")[0] for row in a[3:]] == ["| LFTF (attention + MLP, he + she)", "| w/o attention",
                                                      "| w/o MLP", "| w/o he term", "| w/o she term"]
    assert "0.3000 (+50.0%)" in a[6]
    both = lftf_tables(res)
    assert both.startswith("**Rank sweep") and "**Ablations" in both and both.count("| Org (unedited) |") == 2
    with pytest.raises(ValueError, match="unknown table"):
        lftf_table(res, "other")


def test_main_jobs_lftf_layer_row_uses_bmi_and_msme_the_layer_score(tiny_llama):
    rows = {r.name: r for r in FULL_ROWS}
    lftf, msme = rows["layer (LFTF)"], rows["layer (MSME)"]
    assert (layer_result_name(lftf), layer_result_name(msme)) == ("bmi", "layer")
    results = {"bmi": HAND_BMI, "layer": LocateResult("layer", ["L0", "L1"], torch.tensor([0.1, 0.9]))}
    assert located_for(lftf, results) is HAND_BMI and located_for(msme, results) is results["layer"]
    assert located_for(rows["module (LFTF)"], {"module_edit": results["layer"]}) is results["layer"]
    # without a given result the driver locates LFTF's block by BMI on the train prompts
    plan = EditPlan(lftf.method, Where("layer"), n_samples=6)
    res = locate(tiny_llama, plan, split_samples(plan)[0])
    assert res.method == "bmi" and res.labels == [f"L{i}" for i in range(tiny_llama.n_layers)]
