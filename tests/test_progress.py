"""Progress bars (issue 17 item 7): ``progress=True`` draws a tqdm bar on stderr, ``progress=False``
writes nothing, and the numbers are bit-identical either way; ``sample_prompts`` warns once when
asked for more prompts than the split has."""

from __future__ import annotations

import logging
from typing import Any

import torch

from bias_lens.progress import NullBar, bar, batch_count

PROMPTS = [
    "The nurse said that", "The carpenter said that", "The doctor went home because",
    "The engineer laughed because", "The teacher told the class that", "The secretary thinks",
    "The surgeon finished and", "The baker smiled because",
]


def same(a: Any, b: Any) -> bool:
    """Bit-equality through dataclasses, dicts, lists and tensors (NaN == NaN)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num())
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return a == b


def check_bar(capsys, fn, desc: str) -> None:
    """fn(progress) twice: silent and identical without the bar; the bar (named ``desc``) on stderr with it."""
    capsys.readouterr()
    quiet = fn(False)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""
    loud = fn(True)
    out = capsys.readouterr()
    assert desc in out.err and "100%" in out.err, out.err[-500:]
    assert out.out == ""
    assert same(quiet, loud)


def test_bar_helper_is_transparent_when_disabled(capsys):
    items = [3, 1, 2]
    assert bar(items, total=3, desc="x") is items  # the iterable itself, not a wrapper
    null = bar(total=5, desc="x")
    assert isinstance(null, NullBar)
    with null as b:
        b.update(2)
        b.set_postfix(loss=1.0)
    assert capsys.readouterr().err == ""
    assert list(bar(iter(items), total=3, desc="shown", enabled=True)) == items
    err = capsys.readouterr().err
    assert "shown" in err and "3/3" in err
    assert [batch_count(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]


def test_layer_bmi_module_bars(tiny_llama, capsys):
    from bias_lens.locate.layers import bmi, bmi_robustness, layer_scale, layer_scale_and_bmi
    from bias_lens.locate.modules import module_scale

    lm = tiny_llama
    check_bar(capsys, lambda p: layer_scale(lm, PROMPTS, batch_size=3, progress=p), "residual pass")
    check_bar(capsys, lambda p: bmi(lm, PROMPTS, batch_size=3, progress=p), "residual pass + BMI")
    check_bar(capsys, lambda p: layer_scale_and_bmi(lm, PROMPTS, batch_size=3, progress=p), "residual pass + BMI")
    check_bar(capsys, lambda p: bmi_robustness(lm, PROMPTS, seeds=(0, 1), n=4, batch_size=3, progress=p), "BMI")
    check_bar(capsys, lambda p: module_scale(lm, PROMPTS, layers=[0, 2], batch_size=5, progress=p), "module scan")
    # the module bar counts (batch, module) ablations: 2 batches x 2 layers x |modules|
    module_scale(lm, PROMPTS, layers=[0, 2], modules=["attn.o", "mlp"], batch_size=5, progress=True)
    assert "8/8" in capsys.readouterr().err


def test_attribution_causal_bars(tiny_llama, capsys):
    from bias_lens.locate.attribution import head_attribution, neuron_attribution
    from bias_lens.locate.causal import causal_selection

    lm = tiny_llama
    check_bar(capsys, lambda p: neuron_attribution(lm, PROMPTS, batch_size=3, progress=p), "attribution pass")
    check_bar(capsys, lambda p: head_attribution(lm, PROMPTS, batch_size=3, progress=p), "attribution pass")
    cands = ["L0N1", "L1N5", "L2N7", "L2N9"]
    check_bar(capsys, lambda p: causal_selection(lm, cands, PROMPTS, k=2, max_ppl_increase=10.0, max_rows=16,
                                                 progress=p), "causal masking")
    check_bar(capsys, lambda p: causal_selection(lm, cands, PROMPTS, k=2, max_ppl_increase=10.0, mode="greedy",
                                                 progress=p), "greedy causal selection")


def test_gradient_bars(tiny, capsys):
    from bias_lens.locate.gradients import neuron_scale, row_scale

    check_bar(capsys, lambda p: row_scale(tiny, PROMPTS, "L2.mlp.down", batch_size=3, progress=p), "row gradients L2.mlp.down")
    check_bar(capsys, lambda p: neuron_scale(tiny, PROMPTS, "L2.attn.o", batch_size=3, progress=p), "entry gradients L2.attn.o")
    check_bar(capsys, lambda p: neuron_scale(tiny, PROMPTS, "L1.mlp.up", rows=[0, 3], batch_size=3, progress=p), "entry gradients")


def test_finetune_bar(tiny_llama, capsys):
    from bias_lens.edit import mask_from_labels
    from bias_lens.edit.finetune import FinetuneConfig, masked_finetune

    train = [{"prompt": p, "f_he": 0.5, "f_she": 0.5} for p in PROMPTS]
    mask = mask_from_labels(tiny_llama.hf, ["L2.mlp.down"])
    cfg = FinetuneConfig(loss="lftf", lr=1e-2, epochs=2, batch_size=3, max_steps=5)
    before = {n: p.detach().clone() for n, p in tiny_llama.hf.named_parameters()}

    def run(p: bool):
        r = masked_finetune(tiny_llama, mask, train, train[:4], cfg, retention=[], progress=p)
        return r.edit.values, r.history, r.status, r.best_step

    check_bar(capsys, run, "masked fine-tuning")
    masked_finetune(tiny_llama, mask, train, None, cfg, retention=[], progress=True)
    assert "5/5" in capsys.readouterr().err  # total = min(max_steps, epochs x batches)
    assert all(torch.equal(before[n], p) for n, p in tiny_llama.hf.named_parameters())


def test_sample_prompts_warns_once_when_n_exceeds_split(caplog):
    from bias_lens.benchmarks import sample_prompts, split_sizes

    size = split_sizes("genbiaseval")["dev"]
    with caplog.at_level(logging.WARNING, logger="bias_lens.benchmarks"):
        exact = sample_prompts("genbiaseval", "dev", n=size)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        more = sample_prompts("genbiaseval", "dev", n=size + 50)
    warns = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warns) == 1
    assert f"only {size}" in warns[0].getMessage() and str(size + 50) in warns[0].getMessage()
    assert more == exact and len(more) == size

