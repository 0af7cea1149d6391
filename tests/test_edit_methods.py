"""Masked fine-tuning, neuron masking and baselines on tiny models (contrastive: test_contrastive.py)."""

from __future__ import annotations

import math

import pytest
import torch

from bias_lens.edit import mask_from_labels
from bias_lens.edit.baselines import fpft
from bias_lens.edit.finetune import FinetuneConfig, masked_finetune
from bias_lens.edit.measure import PrefixedModel, dev_afgb
from bias_lens.edit.neuron_masking import neuron_mask_edit, neuron_mask_hooks
from bias_lens.scoring import target_probs
from bias_lens.targets import resolve_targets

PROFS = ["nurse", "carpenter", "doctor", "engineer", "teacher", "secretary", "surgeon", "baker"]
TRAIN = [{"prompt": f"The {p} laughed because", "f_he": 0.5, "f_she": 0.5, "f": 0.0, "s": s}
         for p, s in zip(PROFS, [-0.8, 0.8, 0.4, 0.6, -0.2, -0.7, 0.5, 0.1])]
DEV = [{"prompt": f"The {p} went home because", "f_he": 0.5, "f_she": 0.5} for p in PROFS]
RET = ["The capital of France is Paris .", "Two plus two is four ."]


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]), n


def test_masked_finetune_touches_only_mask_and_keeps_small_optimizer_state(tiny):
    hf = tiny.hf
    snap = snapshot(hf)
    mask = mask_from_labels(hf, ["L1.mlp.down/row2", "L2N7", "L0.attn.o/row1"])
    cfg = FinetuneConfig(lr=5e-2, epochs=3, batch_size=4, patience=10)
    res = masked_finetune(tiny, mask, TRAIN, DEV, cfg, retention=[])
    assert_same(hf, snap)  # training never writes the model
    assert all(p.grad is None for p in hf.parameters())
    assert all(p.requires_grad for p in hf.parameters())  # flags restored
    assert res.optimizer_state_numel == 2 * mask.size  # Adam moments only for the masked entries
    assert res.status == "done" and res.edit is not None
    h = res.edit.apply_(tiny)
    moved = 0
    for n, p in hf.named_parameters():
        d = p.detach() != snap[n]
        assert not (d & ~mask.masks.get(n, torch.zeros_like(d))).any(), n
        moved += int(d.sum())
    assert moved > 0
    # the applied edit reproduces the dev metric recorded at the chosen step
    best = next(r for r in res.history if r["step"] == res.best_step)
    assert dev_afgb(tiny, [s["prompt"] for s in DEV]) == pytest.approx(best["dev_afgb"], rel=1e-6)
    assert best["dev_afgb"] == min(r["dev_afgb"] for r in res.history)
    h.undo()
    assert_same(hf, snap)


def test_nan_loss_stops_reports_step_and_leaves_model(tiny_llama):
    snap = snapshot(tiny_llama.hf)
    calls = {"n": 0}

    def bad_loss(p, f):
        calls["n"] += 1
        loss = p.sum()
        return loss * math.nan if calls["n"] == 2 else loss

    mask = mask_from_labels(tiny_llama.hf, ["L1.mlp.down"])
    res = masked_finetune(tiny_llama, mask, TRAIN, DEV, FinetuneConfig(lr=1e-2, batch_size=2), retention=[], loss_fn=bad_loss)
    assert res.status == "nan" and res.nan_step == 2 and res.edit is None
    assert_same(tiny_llama.hf, snap)


def test_retention_guard_rolls_back(tiny_llama):
    snap = snapshot(tiny_llama.hf)
    mask = mask_from_labels(tiny_llama.hf, ["L1"])
    cfg = FinetuneConfig(lr=1.0, epochs=2, batch_size=4, retention_threshold=0.0)
    # collapse the output onto " he": the retention texts' perplexity must rise
    res = masked_finetune(tiny_llama, mask, TRAIN, DEV, cfg, retention=RET,
                          loss_fn=lambda p, f: -torch.log(p[:, 0]).mean())
    assert res.status == "retention_rollback"
    assert res.history[-1]["retention_ppl"] > res.history[0]["retention_ppl"]
    assert res.best_step == 0 and sum(res.edit.changed_counts(tiny_llama.hf).values()) == 0
    assert_same(tiny_llama.hf, snap)


def test_config_validation_and_scale_defaults():
    assert FinetuneConfig().lr == 1e-5 and FinetuneConfig().epochs == 2 and FinetuneConfig().batch_size == 32
    assert FinetuneConfig.for_scale("neuron").lr > FinetuneConfig.for_scale("layer").lr
    c = FinetuneConfig(loss="lftf", seed=3)
    assert FinetuneConfig.from_dict(c.to_dict()) == c
    for bad in [dict(loss="x"), dict(lr=0), dict(optimizer="lion")]:
        with pytest.raises(ValueError):
            FinetuneConfig(**bad)


def test_fpft_state_covers_every_parameter(tiny_llama):
    res = fpft(tiny_llama, TRAIN, None, FinetuneConfig(lr=1e-3, max_steps=1, batch_size=4), retention=[])
    n = sum(p.numel() for p in tiny_llama.hf.parameters())
    assert res.optimizer_state_numel == 2 * n and res.edit.size == n


# --------------------------------------------------------------------------- neuron masking
def test_neuron_mask_edit_equals_hook(tiny):
    neurons = {0: [1, 5, 9], 2: [0, 40]}
    ids = tiny.tokenizer(["The nurse laughed because he"], return_tensors="pt")
    with torch.no_grad():
        with tiny.hooks(neuron_mask_hooks(neurons, scale=0.25)):
            hooked = tiny.hf(**ids).logits
        snap = snapshot(tiny.hf)
        edit = neuron_mask_edit(tiny, neurons, scale=0.25)
        assert edit.size == 5 * tiny.d_model
        h = edit.apply_(tiny)
        edited = tiny.hf(**ids).logits
        h.undo()
    torch.testing.assert_close(edited, hooked, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(edited, tiny.hf(**ids).logits.detach())
    assert_same(tiny.hf, snap)


# contrastive editing: tests/test_contrastive.py


# --------------------------------------------------------------------------- prompt baseline
def test_prefixed_model_scores_prefixed_prompts(tiny_llama):
    ts = resolve_targets(tiny_llama.tokenizer, "he,she")
    prompts = [s["prompt"] for s in TRAIN]
    via = target_probs(PrefixedModel(tiny_llama, "The baker said that "), prompts, ts)
    direct = target_probs(tiny_llama, ["The baker said that " + p for p in prompts], ts)
    assert torch.equal(via, direct)
    assert not torch.equal(via, target_probs(tiny_llama, prompts, ts))
