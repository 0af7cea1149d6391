"""Layer scale (MSME Eq. 2) and BMI (LFTF Eq. 4) against independent plain-torch oracles."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bias_lens.locate.layers import (
    bmi,
    bmi_robustness,
    layer_scale,
    layer_scale_and_bmi,
    lens_probs,
    residual_pass,
)
from bias_lens.scoring import iter_batches, last_logits
from bias_lens.targets import resolve_targets

PROMPTS = [
    "The nurse laughed because",
    "The carpenter went home because he was tired and",
    "Two plus",
    "The doctor said that",
    "def find_best_bakers ( bakers , gender ) : return",
]


# --------------------------------------------------------------------------- oracles
def raw_residuals(lm, prompt: str) -> list[torch.Tensor]:
    """H^(0..L) of one unpadded prompt, float64: hidden_states for 0..L-1, a hook for the raw H^(L)."""
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    got = {}
    h = lm.layers[-1].register_forward_hook(lambda m, a, o: got.__setitem__("L", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            hs = lm.hf(ids, output_hidden_states=True).hidden_states
    finally:
        h.remove()
    return [x[0].double() for x in hs[:-1]] + [got["L"][0].double()]


def manual_norm(lm, x: torch.Tensor, scale_from: torch.Tensor | None = None) -> torch.Tensor:
    """The final norm written out by hand (float64); ``scale_from`` fixes the scale (cached mode)."""
    mod = lm.final_norm
    w = mod.weight.detach().double()
    if isinstance(mod, nn.LayerNorm):
        src = x if scale_from is None else scale_from
        s = torch.sqrt(src.var(-1, unbiased=False, keepdim=True) + mod.eps)
        return (x - x.mean(-1, keepdim=True)) / s * w + mod.bias.detach().double()
    src = x if scale_from is None else scale_from
    s = torch.sqrt(src.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
    return x / s * w


def oracle_layer_scores(lm, prompt: str, tids: list[int], cached: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    H = raw_residuals(lm, prompt)
    W = lm.unembed.weight.detach().double()
    fin = H[-1][-1]
    probs = []
    for h in H:
        x = h[-1]
        logits = manual_norm(lm, x, fin if cached else None) @ W.T
        probs.append(torch.softmax(logits, -1)[tids])
    p = torch.stack(probs)  # [L+1, t]
    return (p[1:] - p[:-1]).abs().sum(-1), p


def oracle_bmi(lm, prompt: str) -> torch.Tensor:
    H = raw_residuals(lm, prompt)
    return torch.stack([(1 - F.cosine_similarity(H[i], H[i + 1], dim=-1)).mean() for i in range(len(H) - 1)])


# --------------------------------------------------------------------------- layer scale
@pytest.mark.parametrize("norm", ["recompute", "cached"])
def test_layer_scale_matches_plain_torch_loop(tiny, norm):
    tids = resolve_targets(tiny.tokenizer, "he,she").first_ids
    res = layer_scale(tiny, PROMPTS, "he,she", norm=norm, batch_size=2)
    want = torch.stack([oracle_layer_scores(tiny, p, tids, cached=norm == "cached")[0] for p in PROMPTS])
    assert res.labels == [f"L{i}" for i in range(tiny.n_layers)]
    assert res.per_prompt.shape == (len(PROMPTS), tiny.n_layers)
    torch.testing.assert_close(res.per_prompt, want, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(res.scores, want.mean(0), rtol=1e-4, atol=1e-9)
    assert res.variant == f"norm={norm}"
    counts = torch.bincount(want.argmax(1), minlength=tiny.n_layers).tolist()
    assert res.extras["per_sample_argmax"] == counts and sum(counts) == len(PROMPTS)
    p_mean = torch.stack([oracle_layer_scores(tiny, p, tids, norm == "cached")[1] for p in PROMPTS]).mean(0)
    torch.testing.assert_close(torch.tensor(res.extras["p_targets"], dtype=torch.float64), p_mean, rtol=1e-4, atol=1e-9)


def test_cached_and_recompute_differ_but_agree_at_last_layer(tiny_llama):
    a = layer_scale(tiny_llama, PROMPTS, norm="recompute")
    b = layer_scale(tiny_llama, PROMPTS, norm="cached")
    assert not torch.allclose(a.per_prompt, b.per_prompt)
    pa, pb = torch.tensor(a.extras["p_targets"]), torch.tensor(b.extras["p_targets"])
    torch.testing.assert_close(pa[-1], pb[-1], rtol=1e-5, atol=1e-9)  # final scale == own scale at layer L


def test_last_lens_layer_equals_model_output(tiny):
    """p^(L) over the whole vocabulary equals the model's own next-token distribution (batched, padded)."""
    rp = residual_pass(tiny, PROMPTS, batch_size=3)
    all_ids = list(range(tiny.d_vocab))
    for norm in ("recompute", "cached"):
        p_lens = lens_probs(tiny, rp.last[-1], all_ids, norm=norm, final=rp.last[-1])
        for b in iter_batches(tiny.tokenizer, PROMPTS, 3):
            with torch.no_grad():
                ref = torch.softmax(last_logits(tiny.hf(**b.model_inputs()).logits, b.last).double(), -1)
            torch.testing.assert_close(p_lens[b.rows], ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("lens", ["tl", "nnsight"])
def test_lenses_agree(tiny, lens):
    ref_l, ref_b = layer_scale_and_bmi(tiny, PROMPTS, batch_size=2)
    got = layer_scale(tiny, PROMPTS, lens=lens, batch_size=2)
    torch.testing.assert_close(got.per_prompt, ref_l.per_prompt, rtol=1e-4, atol=1e-9)
    gb = bmi(tiny, PROMPTS, lens=lens, batch_size=2)
    torch.testing.assert_close(gb.per_prompt, ref_b.per_prompt, rtol=1e-5, atol=1e-7)
    assert got.extras["lens"] == lens


def test_one_pass_equals_separate_calls(tiny_llama):
    a, b = layer_scale_and_bmi(tiny_llama, PROMPTS, batch_size=2)
    assert torch.equal(a.per_prompt, layer_scale(tiny_llama, PROMPTS, batch_size=2).per_prompt)
    assert torch.equal(b.per_prompt, bmi(tiny_llama, PROMPTS, batch_size=2).per_prompt)


# --------------------------------------------------------------------------- BMI
def test_bmi_matches_hidden_state_cosines_with_padding_excluded(tiny):
    res = bmi(tiny, PROMPTS, batch_size=5)  # one batch: the short prompts carry lots of padding
    want = torch.stack([oracle_bmi(tiny, p) for p in PROMPTS])
    torch.testing.assert_close(res.per_prompt, want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(res.scores, want.mean(0), rtol=1e-6, atol=1e-9)
    assert res.extras["ranking"] == torch.argsort(want.mean(0), descending=True).tolist()


def test_bmi_robustness_per_seed_equals_subsample_bmi(tiny_llama):
    pool = [f"The {w} went home because" for w in ("nurse", "doctor", "baker", "surgeon", "teacher", "engineer")] + PROMPTS
    res = bmi_robustness(tiny_llama, pool, seeds=(0, 1, 2), n=4, batch_size=3)
    per_seed = torch.tensor(res.extras["per_seed"], dtype=torch.float64)
    for k, s in enumerate((0, 1, 2)):
        sub = [pool[i] for i in random.Random(s).sample(range(len(pool)), 4)]
        torch.testing.assert_close(per_seed[k], bmi(tiny_llama, sub).scores, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(res.scores, per_seed.mean(0))
    var = per_seed.var(0, unbiased=True)
    torch.testing.assert_close(torch.tensor(res.extras["variance"], dtype=torch.float64), var)
    assert res.extras["mean_variance"] == pytest.approx(float(var.mean()))
    assert all(-1 <= t <= 1 for t in res.extras["kendall_tau"])


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_one_clear_error(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.hf.state_dict().items()}
    with pytest.raises(ValueError, match="no prompts"):
        layer_scale(tiny_llama, [])
    with pytest.raises(ValueError, match="one token"):
        layer_scale(tiny_llama, PROMPTS, "he,giraffe")
    with pytest.raises(ValueError, match="norm must be"):
        layer_scale(tiny_llama, PROMPTS, norm="folded")
    with pytest.raises(ValueError, match="lens must be"):
        bmi(tiny_llama, PROMPTS, lens="pyvene")
    with pytest.raises(ValueError, match="pool size"):
        bmi_robustness(tiny_llama, PROMPTS, n=50)
    assert all(torch.equal(v, tiny_llama.hf.state_dict()[k]) for k, v in before.items())


# --------------------------------------------------------------------------- SmolLM2
@pytest.mark.integration
def test_smol_last_layer_is_model_output_and_tl_agrees(smol):
    from bias_lens.benchmarks import sample_prompts

    prompts = sample_prompts("genbiaseval", "train", 8, seed=0)
    tids = resolve_targets(smol.tokenizer, "he,she").first_ids
    res = layer_scale(smol, prompts, batch_size=8)
    with torch.no_grad():
        b = next(iter_batches(smol.tokenizer, prompts, 8))
        ref = torch.softmax(last_logits(smol.hf(**b.model_inputs()).logits, b.last).double(), -1)[:, tids]
    p_last = torch.tensor(res.extras["p_targets"], dtype=torch.float64)[-1]
    torch.testing.assert_close(p_last, ref.mean(0), rtol=1e-4, atol=1e-7)
    tl = layer_scale(smol, prompts, lens="tl", batch_size=8)
    torch.testing.assert_close(tl.per_prompt, res.per_prompt, rtol=1e-3, atol=1e-6)


# --------------------------------------------------------------------------- figures
def test_layer_and_bmi_figures_show_the_result(tiny_llama, tmp_path, monkeypatch):
    from bias_lens.plot import io as plot_io
    from bias_lens.plot.locate import argmax_histogram, bmi_figure, layer_figure, layer_prompt_heatmap

    lay, bm = layer_scale_and_bmi(tiny_llama, PROMPTS, norm="cached")
    hm = layer_prompt_heatmap(lay)
    assert torch.equal(torch.tensor(hm.data[0].z, dtype=torch.float64), lay.per_prompt)
    assert "norm=cached" in hm.layout.title.subtitle.text  # the variant is the subtitle (issue 17: titles fit)
    assert list(argmax_histogram(lay).data[0].y) == lay.extras["per_sample_argmax"]
    assert len(layer_figure(lay).data) == 3
    rob = bmi_robustness(tiny_llama, PROMPTS, seeds=(0, 1), n=3)
    fig = bmi_figure(bm, rob)
    assert list(fig.data[0].y) == bm.scores.tolist() and list(fig.data[0].error_y.array) == rob.extras["std"]
    with pytest.raises(ValueError, match="expected a 'bmi'"):
        bmi_figure(lay)
    # HTML always; PNG skipped (not failed) without a Chromium
    monkeypatch.setattr(plot_io, "chromium_path", lambda: None)
    paths = plot_io.write_figure(fig, tmp_path / "bmi")
    assert [p.name for p in paths] == ["bmi.html"]
    text = paths[0].read_text()
    assert "plotly" in text and "<script" in text and len(text) > 100_000  # plotly.js embedded
    assert not list(tmp_path.glob(".*tmp"))  # no temporary leftovers
