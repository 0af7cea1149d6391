"""One quantity, one mechanism: the torch metrics, the losses built on them, the one next-token
scorer (fast path inside), the one sequence log-likelihood and the raw-module hook facility, each
against an independent oracle (hand computation, plain transformers forward) and the old formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bias_lens.benchmarks import metrics
from bias_lens.benchmarks.next_token import next_token_logprobs
from bias_lens.benchmarks.sentence_scoring import batch_token_logprobs, sentence_ids, token_logprobs  # re-export
from bias_lens.edit import losses
from bias_lens.hooks import mask_neurons, module_hooks
from bias_lens.scoring import iter_batches, target_logprobs
from bias_lens.targets import TargetError, resolve_targets

PROMPTS = ["The nurse laughed because", "The carpenter went home because", "The doctor said that they would come",
           "Two plus", "The engineer went home because she was tired"]


def _p_f_F():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(7, 2, generator=g, dtype=torch.float64) * 0.5
    f = torch.rand(7, 2, generator=g, dtype=torch.float64)
    return p, f / f.sum(1, keepdim=True), torch.tensor([1.0, -1, 1, 1, -1, -1, 1], dtype=torch.float64)


def test_torch_metrics_hand_values_and_numpy_wrappers():
    p = torch.tensor([[0.3, 0.1], [0.2, 0.4]], dtype=torch.float64)
    F = torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert float(metrics.afgb_t(p)) == pytest.approx((0.2 + 0.2) / 2)
    assert float(metrics.afgb_t(p, renorm=True)) == pytest.approx((0.5 + 1 / 3) / 2)
    assert float(metrics.ub_t(p, F)) == pytest.approx((0.2 + 0.2) / 2)
    assert float(metrics.mass_t(p)) == pytest.approx((0.4 + 0.6) / 2)
    assert torch.allclose(metrics.renorm_t(p), torch.tensor([[0.75, 0.25], [1 / 3, 2 / 3]], dtype=torch.float64))
    assert float(metrics.fbs_t(p, torch.full_like(p, 0.5))) == pytest.approx((0.6 + 0.4) / 2)
    p3 = torch.tensor([[0.5, 0.2, 0.1]], dtype=torch.float64)
    assert float(metrics.afgb_t(p3)) == pytest.approx((0.3 + 0.4 + 0.1) / 3)
    # the report functions are the same code in float64 (identical numbers)
    assert metrics.afgb(p.numpy()) == float(metrics.afgb_t(p)) and metrics.ub(p.tolist(), F.tolist()) == float(metrics.ub_t(p, F))
    assert metrics.mass(p) == float(metrics.mass_t(p))
    np.testing.assert_array_equal(metrics.renormalise(p), metrics.renorm_t(p).numpy())
    # dtype and device are kept; gradients flow
    q = p.float().requires_grad_(True)
    out = metrics.afgb_t(q)
    out.backward()
    assert out.dtype == torch.float32 and torch.equal(q.grad, torch.tensor([[0.5, -0.5], [-0.5, 0.5]]))
    with pytest.raises(ValueError, match="samples, 2"):
        metrics.ub_t(p3, F[:1])
    with pytest.raises(ValueError, match="one F per sample"):
        metrics.ub_t(p, F[:1])


def test_losses_bit_identical_to_pre_unification_formulas():
    """Old inline formulas (copied from losses.py before it called the metric functions)."""
    p, f, F = _p_f_F()
    p0 = p.flip(0).clone()
    old = {
        "renorm": lambda p: p / p.sum(1, keepdim=True).clamp_min(1e-12),
        "gap": lambda p: (p[:, 0] - p[:, 1]).abs().mean(),
        "lftf": lambda p: (p[:, 0] * 1.0 + p[:, 1] * 1.0).mean(),
        "ub_terms": lambda p: F.to(p) * (p[:, 0] - p[:, 1]),
    }
    new = {"renorm": losses.renorm, "gap": losses.gap, "lftf": losses.lftf, "ub_terms": lambda p: losses.ub_terms(p, F)}
    for dtype in (torch.float64, torch.float32):
        for name in old:
            a, b = (p.detach().to(dtype).clone().requires_grad_(True) for _ in range(2))
            va, vb = old[name](a), new[name](b)
            va.sum().backward()
            vb.sum().backward()
            assert torch.equal(va, vb) and torch.equal(a.grad, b.grad), name
        q = p.to(dtype)
        assert torch.equal(losses.ub_drop(q, F, p0), torch.relu(old["ub_terms"](p0.to(q)) - old["ub_terms"](q)).mean())
        kl = (torch.xlogy(f.to(q), f.to(q)) - f.to(q) * torch.log(old["renorm"](q).clamp_min(1e-12))).sum(1).mean()
        assert torch.equal(losses.msme_align(q, f), kl)
    assert torch.equal(losses.gap(p), metrics.afgb_t(p)) and float(losses.gap(p)) == metrics.afgb(p.numpy())


def _plain_last_logprobs(lm, prompt):
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return torch.log_softmax(lm.hf(ids).logits[0, -1].double(), -1)


def test_one_scorer_fast_path_and_benchmark_entry(tiny):
    ts = resolve_targets(tiny.tokenizer, "he,she")
    got = target_logprobs(tiny, PROMPTS, ts, batch_size=2)
    want = torch.stack([_plain_last_logprobs(tiny, p)[ts.first_ids] for p in PROMPTS])
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    # the benchmark entry point is the same function with the shared-prefix cache on
    assert torch.equal(next_token_logprobs(tiny, PROMPTS, ts, batch_size=2),
                       target_logprobs(tiny, PROMPTS, ts, batch_size=2, shared_prefix=True))
    # hooks apply on the fast path as on a plain forward
    with tiny.hooks(mask_neurons({1: [0, 5, 9]})):
        hooked = target_logprobs(tiny, PROMPTS, ts, batch_size=3)
        ref = torch.stack([_plain_last_logprobs(tiny, p)[ts.first_ids] for p in PROMPTS])
    assert torch.allclose(hooked, ref, rtol=0, atol=1e-5) and not torch.allclose(hooked, got, rtol=0, atol=1e-7)


def test_one_sequence_loglik_against_plain_forward(tiny_llama):
    lm = tiny_llama
    texts = ["Two plus two equals four.", "The train leaves at nine."]
    seqs = sentence_ids(lm.tokenizer, texts)
    assert all(s[0] == lm.tokenizer.eos_token_id for s in seqs)  # no BOS in the tiny tokenizer: EOS
    lps = token_logprobs(lm, texts)
    b = next(iter_batches(lm.tokenizer, [], 2, device=lm.device, token_ids=seqs, sort=False))
    with torch.no_grad():
        lp, ok = batch_token_logprobs(lm, b)
    for i, s in enumerate(seqs):
        ids = torch.tensor([s])
        with torch.no_grad():
            logits = lm.hf(ids).logits[0, :-1].double()
        ref = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        assert torch.allclose(lps[i], ref, rtol=0, atol=1e-5)
        assert torch.allclose(lp[i, : len(s) - 1], ref, rtol=0, atol=1e-5)
        assert torch.equal(ok[i, : len(s) - 1], logits.argmax(-1) == ids[0, 1:])
    assert metrics.perplexity(lps) == pytest.approx(math.exp(-sum(float(t.sum()) for t in lps) / sum(len(t) for t in lps)))


def test_module_hooks_observe_and_always_remove(tiny_llama):
    lm = tiny_llama
    ids = lm.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    seen_in, seen_out = {}, {}

    def count():  # transformers installs (and keeps) output-capturing hooks of its own on first use
        return [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in lm.layers]

    with torch.no_grad():
        lm.hf(ids, output_hidden_states=True)
    before = count()

    def pre(i):
        return lambda m, args, kwargs: seen_in.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone())

    def post(m, args, kwargs, out):
        seen_out[0] = (out[0] if isinstance(out, tuple) else out).clone()

    with torch.no_grad(), module_hooks(forward=[(lm.layers[0], post)], pre=[(blk, pre(i)) for i, blk in enumerate(lm.layers)]):
        hs = lm.hf(ids, output_hidden_states=True).hidden_states
    for i in range(lm.n_layers):
        assert torch.equal(seen_in[i], hs[i])
    assert torch.equal(seen_out[0], hs[1])
    assert count() == before

    def boom(m, args, kwargs, out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), module_hooks(forward=[(lm.layers[1], boom)]):
        lm.hf(ids)
    assert count() == before


def test_causal_uses_the_one_target_check(tiny_llama):
    from bias_lens.locate.causal import causal_selection

    with pytest.raises(TargetError, match="exactly 2"):
        causal_selection(tiny_llama, ["L0N1"], PROMPTS, "he,she,nurse")
    multi = [w for w in ("carpenter", "engineer") if len(resolve_targets(tiny_llama.tokenizer, [w, "he"]).token_ids[0]) > 1]
    with pytest.raises(TargetError, match="several tokens"):
        causal_selection(tiny_llama, ["L0N1"], PROMPTS, [multi[0], "he"])
