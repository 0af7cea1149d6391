"""The one edit driver (pipeline.driver.apply_plan) against its mechanisms called by hand: the
record's numbers are the mechanism's, the edit is left applied and undoes bit-exactly, plans and
records round-trip through JSON, and every method variant (incl. DAMA) runs through it."""

from __future__ import annotations

import json

import pytest
import torch

from bias_lens.edit.finetune import masked_finetune
from bias_lens.edit.masks import mask_from_labels
from bias_lens.edit.methods import Dama, Finetune, Masking, Prompt, method_from_dict, method_to_dict
from bias_lens.locate.result import LocateResult
from bias_lens.pipeline.driver import EditRecord, apply_plan, split_samples
from bias_lens.pipeline.measure import measure
from bias_lens.pipeline.plan import EditPlan, Where

LIMITS = {"genbiaseval": 8, "genhinteval": 6, "retention": 4}


def _snapshot(lm):
    return {n: p.detach().clone() for n, p in lm.hf.named_parameters()}


def _unchanged(lm, snap) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in lm.hf.named_parameters())


def test_finetune_plan_equals_the_mechanism_called_by_hand(tiny):
    located = LocateResult("fixed", ["L1.mlp.down"], torch.ones(1))
    plan = EditPlan(Finetune(lr=5e-2, epochs=1, batch_size=4, dev_limit=4, retention_limit=4), Where("module"),
                    n_samples=8)
    snap = _snapshot(tiny)
    run = apply_plan(tiny, plan, located, limits=LIMITS, batch_size=8)
    try:
        after = measure(tiny, LIMITS, batch_size=8)
        applied = {n: p.detach().clone() for n, p in tiny.hf.named_parameters()}
    finally:
        run.handle.undo()
    assert _unchanged(tiny, snap)
    train, dev = split_samples(plan)
    res = masked_finetune(tiny, mask_from_labels(tiny.hf, ["L1.mlp.down"]), train, dev,
                          plan.method.config("module", 0), method="msme(module)")
    with res.edit.applied(tiny.hf):
        assert all(torch.equal(p, applied[n]) for n, p in tiny.hf.named_parameters())
    rec = run.record
    assert rec.metrics == after and rec.before == measure(tiny, LIMITS, batch_size=8)
    assert rec.n_changed == int(sum(res.edit.changed_counts(tiny.hf).values())) and rec.cost_p == res.edit.size
    assert rec.info["status"] == res.status and rec.labels == ["L1.mlp.down"]
    assert EditRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_prompt_and_masking_plans(tiny_llama):
    snap = _snapshot(tiny_llama)
    pb = apply_plan(tiny_llama, EditPlan(Prompt(prefix="Be fair. ")), limits=LIMITS, batch_size=8)
    assert pb.edit is None and pb.record.n_changed == 0 and pb.record.prefix == "Be fair. "
    assert pb.record.metrics["perplexity"] == pb.record.before["perplexity"]  # retention is never prefixed
    assert pb.record.metrics["afgb"] == measure(tiny_llama, {"genbiaseval": 8}, prefix="Be fair. ", batch_size=8)["afgb"]
    located = LocateResult("attr", ["L2N3", "L1N5", "L2.mlp.down"], torch.tensor([3.0, 2.0, 1.0]))
    run = apply_plan(tiny_llama, EditPlan(Masking(), Where("attribution", 2)), located, limits=LIMITS, batch_size=8)
    try:
        down = dict(tiny_llama.hf.named_parameters())["model.layers.2.mlp.down_proj.weight"]
        assert torch.all(down[:, 3] == 0) and run.record.labels == ["L2N3", "L1N5"]
        assert run.record.cost_p == 2 * tiny_llama.d_model == run.record.n_changed
    finally:
        run.handle.undo()
    assert _unchanged(tiny_llama, snap)


def test_dama_plan_runs_through_the_driver(tiny_llama):
    plan = EditPlan(Dama(null_dim=4, n_layers=1, update="mixed", steps=2, max_requests=8))
    snap = _snapshot(tiny_llama)
    run = apply_plan(tiny_llama, plan, limits=LIMITS, batch_size=8)
    try:
        layer = run.record.info["layers"][0]
        w = dict(tiny_llama.hf.named_parameters())[f"model.layers.{layer}.mlp.down_proj.weight"]
        assert not torch.equal(w, snap[f"model.layers.{layer}.mlp.down_proj.weight"]) and run.record.n_changed > 0
        # Cost-P of a maskless edit: the weights it writes (here the one projected down matrix)
        assert run.record.info["config"]["null_dim"] == 4 and run.record.cost_p == w.numel()
    finally:
        run.handle.undo()
    assert _unchanged(tiny_llama, snap)
    d = Dama().config(576, 30, 0)
    assert (d.null_dim, d.n_layers) == (18, 10)  # 128/4096 of d and 11/32 of the layers, as the reference's run script


@pytest.mark.parametrize("method", [Finetune(paper="lftf", lr=1e-3, hint=None), Masking(0.5), Prompt(),
                                    Dama(null_dim=3), Finetune(dev_metric="afgb_renorm", mass_weight=2.0, mass_floor=0.9)])
def test_method_variants_round_trip(method):
    assert method_from_dict(json.loads(json.dumps(method_to_dict(method)))) == method


def test_bad_plans_are_one_clear_error():
    with pytest.raises(ValueError, match="needs --scale"):
        EditPlan(Finetune())
    with pytest.raises(ValueError, match="drop --scale"):
        EditPlan(Dama(), Where("module"))
    with pytest.raises(ValueError, match="unknown edit method kind"):
        method_from_dict({"kind": "nope"})
    with pytest.raises(ValueError, match="unknown options"):
        method_from_dict({"kind": "mask", "alpha": 1})
    with pytest.raises(ValueError, match="dama update"):
        Dama(update="nope")
