"""The layer score's shared, chunked lens (issue 18 item 3) against the implementation it replaced,
its half-precision upcast against a float64 lens on the same residuals, and the benchmark's FLOP
bound against torch's own FLOP counter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bias_lens.locate import layers
from bias_lens.locate.layers import bmi, layer_scale, layer_scale_and_bmi, lens_dtype, lens_probs, residual_pass
from bias_lens.locate.value_neurons import eager_attention
from bias_lens.targets import resolve_targets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from anchors import bare_forward  # noqa: E402
from harness import flop_counts  # noqa: E402
from test_locate_a_layers import PROMPTS, raw_residuals  # noqa: E402  (the prompts, the plain-HF residuals)



# --------------------------------------------------------------------------- the previous lens (oracle)
@torch.no_grad()
def old_lens_probs(lm, resid, target_ids, *, norm="recompute", final=None):
    """``lens_probs`` as it was before the shared chunked matmul (verbatim, float32 models)."""
    h = resid.to(lm.final_norm.weight.device)
    if norm == "recompute":
        normed = lm.final_norm(h)
    else:
        fn = layers.norm_parts(lm.final_norm, lm.arch.norm)
        scale = fn.scale(final.double()).to(h.dtype)
        normed = fn.center(h) / scale * fn.weight.to(h)
        normed = normed + fn.bias.to(h) if fn.bias is not None else normed
    logits = lm.logits_from_normed(normed)
    lse = torch.logsumexp(logits.float(), -1, keepdim=True)
    tid = torch.as_tensor(list(target_ids), device=logits.device)
    return (logits[..., tid].float() - lse).double().exp().cpu()


def old_layer_probs(lm, rp, tids, norm, chunk):
    out = torch.empty(rp.last.shape[0], rp.last.shape[1], len(tids), dtype=torch.float64)
    for s in range(0, rp.last.shape[1], chunk):
        h = rp.last[:, s : s + chunk]
        out[:, s : s + chunk] = old_lens_probs(lm, h, tids, norm=norm, final=h[-1:].expand_as(h))
    return out


def scores_from(p):
    return (p[1:] - p[:-1]).abs().sum(-1).T


# --------------------------------------------------------------------------- float32: today's numbers
@pytest.mark.parametrize("norm", ["recompute", "cached"])
def test_bit_identical_to_previous_lens_when_chunks_coincide(tiny, norm):
    """One chunk holding every (layer, prompt) row: the same matmul as before, so the same bits."""
    tids = resolve_targets(tiny.tokenizer, "he,she").first_ids
    rp = residual_pass(tiny, PROMPTS, batch_size=2)
    want = old_layer_probs(tiny, rp, tids, norm, len(PROMPTS))
    res = layer_scale(tiny, PROMPTS, norm=norm, batch_size=2)
    assert torch.equal(res.per_prompt, scores_from(want))
    assert res.extras["p_targets"] == want.mean(1).tolist()


@pytest.mark.parametrize("norm", ["recompute", "cached"])
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_small_chunks_match_previous_lens(tiny, norm, rows, monkeypatch):
    """Chunks of 1, 3, 7 rows (uneven last chunk, chunks cutting across layers) vs the old lens."""
    monkeypatch.setattr(layers, "LENS_LOGIT_BUDGET", rows * tiny.d_vocab)
    monkeypatch.setattr(layers, "LSE_BLOCK_CPU", 2)
    tids = resolve_targets(tiny.tokenizer, "he,she").first_ids
    rp = residual_pass(tiny, PROMPTS, batch_size=2)
    want = old_layer_probs(tiny, rp, tids, norm, 2)
    got = layer_scale(tiny, PROMPTS, norm=norm, batch_size=2)
    # a 1-row chunk is a matrix-vector product (another summation order): probabilities agree to
    # ~1e-6 relative; the score, a difference of probabilities, to that error of the probabilities
    p_got = torch.tensor(got.extras["p_targets"], dtype=torch.float64)
    torch.testing.assert_close(p_got, want.mean(1), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(got.per_prompt, scores_from(want), rtol=0, atol=4e-6 * float(want.max()))
    all_ids = list(range(tiny.d_vocab))  # the whole distribution, every row
    torch.testing.assert_close(lens_probs(tiny, rp.last, all_ids, norm=norm, final=rp.last[-1]),
                               old_layer_probs(tiny, rp, all_ids, norm, 2), rtol=1e-6, atol=1e-12)


def test_module_scan_shape_unchanged(tiny_llama):
    """``lens_probs`` keeps its contract for other callers: any leading shape, ``final`` broadcast."""
    rp = residual_pass(tiny_llama, PROMPTS)
    tids = resolve_targets(tiny_llama.tokenizer, "he,she").first_ids
    one = lens_probs(tiny_llama, rp.last[3], tids)  # [prompt, target]
    assert one.shape == (len(PROMPTS), 2) and one.dtype == torch.float64
    torch.testing.assert_close(one, old_lens_probs(tiny_llama, rp.last[3], tids), rtol=1e-6, atol=1e-12)
    vec = lens_probs(tiny_llama, rp.last[3, 0], tids, norm="cached", final=rp.last[-1, 0])
    torch.testing.assert_close(vec, old_lens_probs(tiny_llama, rp.last[3, 0], tids, norm="cached",
                                                   final=rp.last[-1, 0]), rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="final residual"):
        lens_probs(tiny_llama, rp.last, tids, norm="cached")


def test_lens_dtype():
    assert lens_dtype(torch.float32) is torch.float32 and lens_dtype(torch.float64) is torch.float64
    assert lens_dtype(torch.bfloat16) is torch.float32 and lens_dtype(torch.float16) is torch.float32


# --------------------------------------------------------------------------- half precision: upcast
def hf_residuals(lm, prompt):
    """H^(0..L) of one unpadded prompt in the model's dtype, ``[L+1, pos, d]`` (the float64 oracle's
    residuals cast back: exact, they are half-precision values)."""
    return torch.stack(raw_residuals(lm, prompt)).to(lm.embed.weight.dtype)


def f64_lens(lm, H, tids, cached):
    """softmax(W_U norm(H)) in float64 from the (half-precision) residuals, by hand (RMSNorm)."""
    x = H.double()
    src = x[-1:] if cached else x
    w = lm.final_norm.weight.detach().double()
    normed = x / torch.sqrt(src.pow(2).mean(-1, keepdim=True) + lm.final_norm.variance_epsilon) * w
    return torch.softmax(normed @ lm.unembed.weight.detach().double().T, -1)[..., tids]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", ["recompute", "cached"])
def test_half_precision_lens_is_float32(tiny_llama, dtype, norm):
    """bf16/fp16 models: the lens upcasts before the norm, unembedding and softmax, so it matches a
    float64 lens on the same residuals to float32 precision; a lens left in half precision does not."""
    lm = tiny_llama
    lm.hf.to(dtype)
    tids = resolve_targets(lm.tokenizer, "he,she").first_ids
    rtol = 2e-6  # float32 logits; a half-precision lens is ~1e-4 off on this model (checked below)
    got, got_bmi = layer_scale_and_bmi(lm, PROMPTS, norm=norm, batch_size=1)  # unpadded: same residuals as HF
    for k, prompt in enumerate(PROMPTS):
        H = hf_residuals(lm, prompt)[:, -1]  # [L+1, d] at the last token, half precision
        want = f64_lens(lm, H, tids, norm == "cached")  # [L+1, target]
        p = lens_probs(lm, H, tids, norm=norm, final=H[-1])
        torch.testing.assert_close(p, want, rtol=rtol, atol=0)
        torch.testing.assert_close(got.per_prompt[k], scores_from(want[:, None])[0], rtol=0,
                                   atol=2 * len(H) * rtol * float(want.max()))
        Hs = hf_residuals(lm, prompt)
        cos = F.cosine_similarity(Hs[:-1].double(), Hs[1:].double(), dim=-1)  # [L, pos]
        torch.testing.assert_close(got_bmi.per_prompt[k], (1 - cos).mean(-1), rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        half = torch.softmax(lm.unembed(lm.final_norm(H)).double(), -1)[:, tids]  # no upcast
    assert ((half - want).abs() / want).max() > 10 * rtol
    assert torch.equal(bmi(lm, PROMPTS, batch_size=1).per_prompt, got_bmi.per_prompt)


# --------------------------------------------------------------------------- the FLOP bound
def test_flop_counts_match_torch_flop_counter(tiny_llama):
    """harness.flop_counts == torch.utils.flop_counter on the bare forward and on the layer score
    (eager attention, so the attention matmuls are counted too)."""
    from torch.utils.flop_counter import FlopCounterMode

    want = flop_counts(tiny_llama, PROMPTS, batch_size=2)
    with eager_attention(tiny_llama):
        with FlopCounterMode(display=False) as fwd:
            bare_forward(tiny_llama, PROMPTS, batch_size=2)
        with FlopCounterMode(display=False) as lay:
            layer_scale(tiny_llama, PROMPTS, batch_size=2)
    assert want["forward"] == fwd.get_total_flops()
    assert want["layer_score"] == lay.get_total_flops()
    assert want["bound_ratio"] == want["layer_score"] / want["forward"]
