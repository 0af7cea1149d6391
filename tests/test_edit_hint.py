"""Hint-anchored masked fine-tuning (docs/edit_hint.md): anchor losses vs hand values, the anchor is
exactly 0 at step 0, the recorded anchor equals a plain-HF recomputation, the dev-UB guard, options."""

from __future__ import annotations

import pytest
import torch

from bias_lens.edit import mask_from_labels
from bias_lens.edit.finetune import FinetuneConfig, masked_finetune
from bias_lens.edit.measure import dev_ub
from bias_lens.edit.losses import anchored, get_hint_loss, hinted_drop, msme_literal, ub_drop, ub_l2
from bias_lens.edit.methods import Finetune, HintAnchor
from bias_lens.pipeline.driver import hint_samples
from bias_lens.pipeline.plan import EditPlan, Where

PROFS = ["nurse", "carpenter", "doctor", "engineer", "teacher", "secretary", "surgeon", "baker"]
TRAIN = [{"prompt": f"The {p} laughed because", "f_he": 0.5, "f_she": 0.5} for p in PROFS]
HINT = [{"prompt": f"The {p} lost {'his' if i % 2 == 0 else 'her'} keys, so", "F": 1 if i % 2 == 0 else -1}
        for i, p in enumerate(PROFS)]
DEV = [{"prompt": f"The {p} went home because", "f_he": 0.5, "f_she": 0.5} for p in PROFS]
P = torch.tensor([[0.30, 0.10], [0.05, 0.20], [0.40, 0.40]])
P0 = torch.tensor([[0.50, 0.10], [0.10, 0.30], [0.20, 0.40]])
F = torch.tensor([1.0, -1.0, 1.0])


def test_anchor_losses_match_hand_values():
    # u = F (p_he - p_she): [0.20, 0.15, 0.00]; u0: [0.40, 0.20, -0.20]
    assert ub_drop(P, F, P0).item() == pytest.approx((0.20 + 0.05 + 0.0) / 3)  # relu(u0 - u)
    assert ub_l2(P, F, P0).item() == pytest.approx((0.04 + 0.0025 + 0.04) / 3)
    # hinted pronoun: he, she, he -> p_h [0.30, 0.20, 0.40], p0_h [0.50, 0.30, 0.20]
    assert hinted_drop(P, F, P0).item() == pytest.approx((0.20 + 0.10 + 0.0) / 3)
    f = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    p = torch.tensor([[0.2, 0.1], [0.3, 0.05]])
    bias = (0.5 * 0.2 + 0.5 * 0.1 + 0.9 * 0.3 + 0.1 * 0.05) / 2
    got = anchored(msme_literal, p, f, P, F, P0, weight=2.0, anchor="ub_drop")
    assert got.item() == pytest.approx(bias + 2.0 * 0.25 / 3)
    for name in ("ub_drop", "hinted_drop", "ub_l2"):
        assert get_hint_loss(name)(P0, F, P0).item() == 0.0  # zero at the reference
    # gradient of ub_drop: -F * [1, -1] / n where u dropped, 0 elsewhere
    p = P.clone().requires_grad_(True)
    ub_drop(p, F, P0).backward()
    assert torch.allclose(p.grad, torch.tensor([[-1.0, 1.0], [1.0, -1.0], [0.0, 0.0]]) / 3)


def test_anchor_rejects_bad_shapes_and_names():
    with pytest.raises(ValueError, match="hint anchor needs"):
        ub_drop(P, F[:2], P0)
    with pytest.raises(ValueError, match="unknown hint anchor"):
        get_hint_loss("nope")
    with pytest.raises(ValueError, match="hint weight"):
        anchored(msme_literal, P, P, P, F, P0, weight=-1.0)


def _plain_probs(lm, prompts):
    """(p(he), p(she)) after each prompt by a plain HF forward, one unpadded prompt at a time."""
    ids = [lm.tokenizer(" he", add_special_tokens=False).input_ids[0], lm.tokenizer(" she", add_special_tokens=False).input_ids[0]]
    out = []
    with torch.no_grad():
        for s in prompts:
            x = lm.tokenizer(s, return_tensors="pt", add_special_tokens=False).input_ids
            out.append(torch.softmax(lm.hf(x).logits[0, -1].double(), -1)[ids])
    return torch.stack(out)


def test_anchor_zero_at_step0_and_equals_plain_recomputation(tiny):
    mask = mask_from_labels(tiny.hf, ["L2.mlp.down", "L1.mlp.down"])
    cfg = FinetuneConfig(loss="lftf", lr=5e-2, epochs=5, batch_size=8, hint_weight=1.0, hint_loss="ub_l2",
                         hint_batch_size=len(HINT), eval_every=1, patience=10)
    one = masked_finetune(tiny, mask, TRAIN, None, FinetuneConfig(**{**cfg.to_dict(), "max_steps": 1}),
                          retention=[], hint=HINT)
    two = masked_finetune(tiny, mask, TRAIN, None, FinetuneConfig(**{**cfg.to_dict(), "max_steps": 2}),
                          retention=[], hint=HINT)
    assert one.history[0]["anchor"] == [0.0]  # relative to the unedited model: exactly 0 at step 0
    anchor_at_2 = two.history[1]["anchor"][0]  # the anchor seen at step 2 = on the state after step 1
    p0 = _plain_probs(tiny, [s["prompt"] for s in HINT])
    F_ = torch.tensor([float(s["F"]) for s in HINT], dtype=torch.float64)
    with one.edit.applied(tiny.hf):
        p1 = _plain_probs(tiny, [s["prompt"] for s in HINT])
    expect = float(((F_ * (p1[:, 0] - p1[:, 1]) - F_ * (p0[:, 0] - p0[:, 1])) ** 2).mean())
    assert expect > 0
    assert anchor_at_2 == pytest.approx(expect, rel=1e-3, abs=1e-12)
    # the total loss of step 2 = bias loss + weight * anchor (bias part: lftf on the full batch of 8)
    with one.edit.applied(tiny.hf):
        pt = _plain_probs(tiny, [s["prompt"] for s in TRAIN])
    total = float(pt.sum(1).mean()) + 1.0 * expect
    assert two.history[1]["losses"][0] == pytest.approx(total, rel=1e-4)


def test_zero_weight_is_the_default_behaviour(tiny_llama):
    mask = mask_from_labels(tiny_llama.hf, ["L2.mlp.down"])
    cfg = FinetuneConfig(lr=5e-2, epochs=2, batch_size=4, patience=10)
    assert cfg.hint_weight == 0.0 and cfg.ub_tolerance is None
    a = masked_finetune(tiny_llama, mask, TRAIN, DEV, cfg, retention=[])
    b = masked_finetune(tiny_llama, mask, TRAIN, DEV, cfg, retention=[], hint=HINT, hint_dev=HINT)
    for n in a.edit.values:
        assert torch.equal(a.edit.values[n], b.edit.values[n])
    assert "anchor" not in b.history[0] and "dev_ub" not in b.history[0]


def test_ub_guard_rejects_states_that_lose_ub(tiny_llama):
    """Training p(he) - p(she) down on male-hinted prompts lowers their UB: with tolerance 0 no
    state after step 0 is accepted; without the guard one is."""
    hint_dev = [{"prompt": s["prompt"].replace("her", "his"), "F": 1} for s in HINT]
    train = [{"prompt": s["prompt"], "f_he": 0.5, "f_she": 0.5} for s in hint_dev]
    mask = mask_from_labels(tiny_llama.hf, ["L2.mlp.down"])

    def he_minus_she(p, f):
        return (p[:, 0] - p[:, 1]).mean()

    kw = dict(lr=5e-2, epochs=4, batch_size=8, eval_every=1, patience=10)
    guarded = masked_finetune(tiny_llama, mask, train, None, FinetuneConfig(ub_tolerance=0.0, **kw), retention=[],
                              loss_fn=he_minus_she, hint_dev=hint_dev)
    free = masked_finetune(tiny_llama, mask, train, None, FinetuneConfig(**kw), retention=[], loss_fn=he_minus_she)
    base = guarded.history[0]["dev_ub"]
    # the recorded dev UB is the plain-HF UB on the dev prompts
    p0 = _plain_probs(tiny_llama, [s["prompt"] for s in hint_dev])
    assert base == pytest.approx(float((p0[:, 0] - p0[:, 1]).mean()), rel=1e-5)
    assert dev_ub(tiny_llama, hint_dev) == pytest.approx(base, rel=1e-9)
    assert all(h["dev_ub"] < base for h in guarded.history[1:])
    assert guarded.best_step == 0 and free.best_step > 0
    assert all(torch.equal(v, tiny_llama.hf.get_parameter(n).detach().reshape(-1)[guarded.edit.indices[n]])
               for n, v in guarded.edit.values.items())


def test_options_are_validated(tiny_llama):
    mask = mask_from_labels(tiny_llama.hf, ["L2.mlp.down"])
    with pytest.raises(ValueError, match="needs hint samples"):
        masked_finetune(tiny_llama, mask, TRAIN, None, FinetuneConfig(hint_weight=1.0), retention=[])
    with pytest.raises(ValueError, match="needs hint_dev"):
        masked_finetune(tiny_llama, mask, TRAIN, None, FinetuneConfig(ub_tolerance=0.1), retention=[])
    with pytest.raises(ValueError):
        FinetuneConfig(hint_weight=-1.0)
    with pytest.raises(ValueError, match="unknown hint anchor"):
        FinetuneConfig(hint_loss="nope")
    with pytest.raises(ValueError, match="hint-weight"):
        HintAnchor(weight=0.0)
    with pytest.raises(ValueError, match="ub-tolerance"):
        HintAnchor(ub_tolerance=-0.1)


def test_cli_refuses_hint_flags_outside_msme_lftf(capsys):
    from bias_lens.cli import main

    assert main(["edit", "--method", "mask", "--scale", "module", "--hint-anchor"]) == 2
    assert "--hint-anchor apply to --method msme and lftf, not to --method mask" in capsys.readouterr().err
    assert main(["edit", "--method", "msme", "--solver", "finetune", "--scale", "module", "--hint-weight", "2"]) == 2
    assert "--hint-weight apply to --hint-anchor, not to --method msme without" in capsys.readouterr().err


def test_plan_passes_anchor_options_and_samples():
    plan = EditPlan(Finetune(hint=HintAnchor(weight=2.0, ub_tolerance=0.03)), Where("module"), n_samples=16)
    cfg = plan.method.config("module", 0)
    assert (cfg.hint_weight, cfg.hint_loss, cfg.ub_tolerance, cfg.hint_dev_limit) == (2.0, "ub_drop", 0.03, 64)
    off = EditPlan(Finetune(), Where("module")).method.config("module", 0)
    assert off.hint_weight == 0.0 and off.ub_tolerance is None
    hint, dev = hint_samples(plan)
    assert len(hint) == 16 and all(s["F"] in (1, -1) and s["prompt"] for s in hint)
    assert hint == hint_samples(plan)[0]  # seeded
    from bias_lens.benchmarks import load_split

    train = {s["prompt"] for s in load_split("genhinteval", "train")}
    assert all(s["prompt"] in train for s in hint) and not ({s["prompt"] for s in dev} & train)


FAST = ["--n-samples", "16", "--limit", "16", "--ub-limit", "8", "--retention-limit", "4", "--dev-limit", "8",
        "--batch-size", "8", "--lr", "5e-2", "--epochs", "1", "--eval-every", "1", "--patience", "4", "--json"]


def test_cli_hint_anchor_flag(tiny_tokenizer_dir, tmp_path, capsys):
    import json

    from bias_lens.cli import main
    from bias_lens.locate.result import LocateResult

    from conftest import build_tiny

    build_tiny("llama", tiny_tokenizer_dir, tmp_path / "base")
    loc = tmp_path / "loc.json"
    LocateResult("test", ["L2.mlp.down"], torch.ones(1, dtype=torch.float64)).save(loc)
    argv = ["edit", "--scale", "module", "--method", "msme", "--solver", "finetune", "--model", str(tmp_path / "base"), "--locate-json", str(loc),
            *FAST]
    runs = []
    for extra in ([], ["--hint-anchor", "--hint-weight", "5", "--ub-tolerance", "0.5"]):
        capsys.readouterr()
        rc = main(argv + extra)
        runs.append(json.loads(capsys.readouterr().out))
        # an edit whose guards kept no step is a failure (exit 3, status "unchanged"), not a success
        assert (rc, runs[-1]["status"] == "unchanged") in ((0, False), (3, True))
        assert (rc == 3) == (runs[-1]["n_params_edited"] == 0)
    assert runs[0]["before"] == runs[1]["before"]
    assert runs[0]["after"] != runs[1]["after"]  # the anchor reached the training loop
    assert main(["edit", "--scale", "module", "--method", "mask", "--hint-anchor"]) == 2
    assert "msme and lftf" in capsys.readouterr().err
