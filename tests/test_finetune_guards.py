"""The refactored masked fine-tuning loop (step loop + guard objects) against the loop as it was
(tests/legacy/legacy_finetune.py, kept verbatim): same edit values bit for bit, same history, same
status, for the plain, early-stopping, retention-rollback, hint-anchor and eval_every paths."""

from __future__ import annotations

import math

import pytest
import torch

from bias_lens.edit.finetune import FinetuneConfig, masked_finetune
from bias_lens.edit.guards import DevBias, EarlyStopping, mass_guard, retention_guard, ub_guard
from bias_lens.edit.losses import mass_change
from bias_lens.edit.masks import mask_from_labels
from legacy.legacy_finetune import legacy_masked_finetune

PROMPTS = ["The doctor said that", "The nurse said that", "The engineer thinks", "The teacher knows",
           "The pilot told me", "The cook asked"]
TRAIN = [{"prompt": p, "f_he": 0.5 + 0.05 * i, "f_she": 0.5 - 0.05 * i} for i, p in enumerate(PROMPTS)]
DEV = [{"prompt": p + " maybe"} for p in PROMPTS[:4]]
RET = ["The weather was calm today.", "A list of numbers follows."]
HINT = [{"prompt": p, "F": 1.0 if i % 2 else -1.0} for i, p in enumerate(PROMPTS)]


def _same(a, b) -> None:
    assert a.status == b.status and a.best_step == b.best_step and a.nan_step == b.nan_step
    assert a.optimizer_state_numel == b.optimizer_state_numel and a.config == b.config
    assert a.history == b.history
    if a.edit is None:
        assert b.edit is None
        return
    assert sorted(a.edit.values) == sorted(b.edit.values)
    for n in a.edit.values:
        assert torch.equal(a.edit.values[n], b.edit.values[n]) and torch.equal(a.edit.indices[n], b.edit.indices[n])


CASES = {
    "plain": dict(cfg=dict(lr=5e-2, epochs=3, batch_size=4, patience=10), kw=dict(retention=RET)),
    "early_stop": dict(cfg=dict(lr=3e-1, epochs=4, batch_size=2, patience=1), kw=dict(retention=[])),
    "rollback": dict(cfg=dict(lr=1.0, epochs=2, batch_size=4, retention_threshold=0.0), kw=dict(retention=RET)),
    "eval_every": dict(cfg=dict(loss="lftf", lr=5e-2, epochs=2, batch_size=2, eval_every=2, max_steps=5),
                       kw=dict(retention=RET)),
    "hint": dict(cfg=dict(loss="gap", lr=5e-2, epochs=2, batch_size=3, hint_weight=1.0, hint_loss="ub_l2",
                          ub_tolerance=0.01), kw=dict(retention=RET, hint=HINT, hint_dev=HINT)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refactored_loop_equals_legacy(tiny, case):
    mask = mask_from_labels(tiny.hf, ["L1.mlp.down", "L2.attn.v"])
    spec = CASES[case]
    cfg = FinetuneConfig(**spec["cfg"])
    before = {n: p.detach().clone() for n, p in tiny.hf.named_parameters()}
    new = masked_finetune(tiny, mask, TRAIN, DEV, cfg, **spec["kw"])
    old = legacy_masked_finetune(tiny, mask, TRAIN, DEV, cfg, **spec["kw"])
    _same(new, old)
    for n, p in tiny.hf.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed by training"


def test_statuses_are_reached(tiny_llama):
    """The legacy comparison above is only meaningful if the cases take the paths they are named after."""
    mask = mask_from_labels(tiny_llama.hf, ["L1.mlp.down", "L2.attn.v"])
    got = {c: masked_finetune(tiny_llama, mask, TRAIN, DEV, FinetuneConfig(**s["cfg"]), **s["kw"]).status
           for c, s in CASES.items()}
    assert got["rollback"] == "retention_rollback" and got["early_stop"] == "early_stopped"
    assert got["plain"] == "done"


def test_mass_change_term_by_hand():
    p = torch.tensor([[0.2, 0.1], [0.05, 0.05]])
    p0 = torch.tensor([[0.1, 0.2], [0.3, 0.1]])
    want = ((math.log(0.3) - math.log(0.3)) ** 2 + (math.log(0.1) - math.log(0.4)) ** 2) / 2
    assert mass_change(p, p0).item() == pytest.approx(want, rel=1e-6)
    assert mass_change(p0.flip(1), p0).item() == 0.0  # swapping the shares keeps the mass: no penalty


def test_mass_term_keeps_mass_where_the_literal_loss_erases_it(tiny_llama):
    """LFTF's loss p(he) + p(she) alone drives the pronoun mass down; with the mass term it is kept."""
    from bias_lens.edit.measure import dev_mass

    mask = mask_from_labels(tiny_llama.hf, ["L2.mlp.down"])
    prompts = [s["prompt"] for s in TRAIN]
    base = dev_mass(tiny_llama, prompts)
    kw = dict(loss="lftf", lr=5e-2, epochs=6, batch_size=6, patience=100)
    free = masked_finetune(tiny_llama, mask, TRAIN, None, FinetuneConfig(**kw), retention=[])
    kept = masked_finetune(tiny_llama, mask, TRAIN, None, FinetuneConfig(mass_weight=100.0, **kw), retention=[])
    with free.edit.applied(tiny_llama.hf):
        m_free = dev_mass(tiny_llama, prompts)
    with kept.edit.applied(tiny_llama.hf):
        m_kept = dev_mass(tiny_llama, prompts)
    assert m_free < 0.8 * base
    assert abs(m_kept - base) < abs(m_free - base) / 3


class _Const:
    """A monitor returning scripted values (oracle for the EarlyStopping bookkeeping)."""

    def __init__(self, key, values, verdicts):
        self.key, self.values, self.verdicts, self.base = key, list(values), dict(verdicts), None

    def measure(self, lm):
        return self.values.pop(0)

    def verdict(self, v):
        return self.verdicts.get(v, "ok")


class _Obj(_Const):
    metric = "afgb"

    def __init__(self, values):
        super().__init__("dev_afgb", values, {})


def test_early_stopping_bookkeeping():
    obj = _Obj([0.5, 0.4, 0.45, 0.3, 0.2, 0.1])
    guard = _Const("dev_ub", [1.0, 1.0, 1.0, 0.0, 1.0, 1.0], {0.0: "reject"})
    es = EarlyStopping(obj, [guard], patience=2)
    es.baseline(None)
    assert es.best == 0.5 and guard.base == 1.0
    assert es.check(None, 1) is None and es.accepted and es.best_step == 1   # 0.4 < 0.5
    assert es.check(None, 2) is None and not es.accepted                      # 0.45: no improvement (bad 1)
    assert es.check(None, 3) == "early_stopped" and es.best == 0.4            # 0.3 rejected by the guard: bad 2
    stop = _Const("retention_ppl", [10.0, 99.0], {99.0: "stop"})
    es2 = EarlyStopping(_Obj([0.5, 0.1]), [stop], patience=5)
    es2.baseline(None)
    assert es2.check(None, 1) == "retention_rollback" and es2.best_step == 0


def test_guard_verdicts_by_hand():
    r = retention_guard([], threshold=0.1, base=10.0)
    assert r.verdict(11.0) == "ok" and r.verdict(11.01) == "stop" and r.verdict(None) == "ok"
    u = ub_guard([], tolerance=0.05, base=0.5)
    assert u.verdict(0.45) == "ok" and u.verdict(0.449) == "reject"
    m = mass_guard([], floor=0.9, base=0.4)
    assert m.verdict(0.3601) == "ok" and m.verdict(0.359) == "reject"
    with pytest.raises(ValueError, match="dev metric"):
        DevBias([], "fbs")
    with pytest.raises(ValueError, match="mass_weight"):
        FinetuneConfig(mass_floor=1.5)


def test_mass_guard_reads_the_objectives_pass(tiny_llama, monkeypatch):
    """The mass guard takes p(he) + p(she) from the objective's dev pass (one pass per check), and
    the number equals a separate dev_mass computation."""
    import bias_lens.edit.measure as measure

    prompts = [s["prompt"] for s in DEV]
    obj = DevBias(prompts, "afgb_renorm")
    guard = mass_guard(prompts, 0.9, objective=obj)
    want = measure.dev_mass(tiny_llama, prompts)
    assert obj.measure(tiny_llama) == measure.dev_afgb_renorm(tiny_llama, prompts)
    calls = []
    monkeypatch.setattr(measure, "dev_probs", lambda *a, **k: calls.append(1))
    assert guard.measure(tiny_llama) == pytest.approx(want, abs=0, rel=1e-15) and calls == []
