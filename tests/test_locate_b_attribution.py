"""Neuron/head attribution and query neurons against per-component brute-force recomputation."""

from __future__ import annotations

import pytest
import torch

from bias_lens.locate.attribution import (
    collect_last,
    head_attribution,
    neuron_attribution,
    norm_parts,
    target_importance,
)
from bias_lens.locate.query_neurons import gate_query_neurons
from bias_lens.targets import resolve_targets

PROMPTS = ["The nurse laughed because", "The carpenter went home because", "The doctor said that", "Two plus"]


def _hf_reference(lm, prompt):
    """Plain HF run: hidden states (block inputs) and the recorded module inputs at the last token."""
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    got = {}
    hs = []
    for l in range(lm.n_layers):
        hs.append(lm.submodule(l, "mlp.down").register_forward_pre_hook(lambda m, a, l=l: got.__setitem__(("post", l), a[0][0, -1].double())))
        hs.append(lm.submodule(l, "attn.o").register_forward_pre_hook(lambda m, a, l=l: got.__setitem__(("z", l), a[0][0, -1].double())))
        hs.append(lm.submodule(l, "attn").register_forward_hook(lambda m, a, o, l=l: got.__setitem__(("attn", l), o[0][0, -1].double())))
    try:
        with torch.no_grad():
            out = lm.hf(ids, output_hidden_states=True)
    finally:
        for h in hs:
            h.remove()
    return out, got


def _brute_logp(lm, y, s_final, norm, tid):
    """log p(targets) from a raw residual y [d] via the real modules (recompute) or a cached scale."""
    with torch.no_grad():
        if norm == "recompute":
            logits = lm.logits_from_resid(y.float()[None]).double()[0]
        else:
            fn = norm_parts(lm.final_norm)
            normed = fn.center(y) / s_final * fn.weight + (fn.bias if fn.bias is not None else 0)
            logits = lm.unembed(normed.float()[None]).double()[0]
    return torch.log_softmax(logits, -1)[tid]


@pytest.mark.parametrize("norm", ["cached", "recompute"])
def test_neuron_attribution_equals_brute_force(tiny, norm):
    ts = resolve_targets(tiny.tokenizer, "he,she")
    tid = torch.as_tensor(ts.first_ids)
    cache = collect_last(tiny, PROMPTS, batch_size=3)
    res = neuron_attribution(tiny, PROMPTS, ts, norm=norm, cache=cache, keep_per_prompt=True)
    imp = target_importance(tiny, cache, res.labels, ts, norm=norm, max_elems=5000)
    fn = norm_parts(tiny.final_norm)
    for i, prompt in enumerate(PROMPTS):
        out, got = _hf_reference(tiny, prompt)
        final = out.hidden_states[-1]  # already final-normed by HF: check our cached scale reproduces it
        raw_final = cache.final[i]
        assert torch.allclose(fn.apply(raw_final), final[0, -1].double(), atol=1e-4)
        s_final = fn.scale(raw_final)
        for l in range(tiny.n_layers):
            pre = out.hidden_states[l][0, -1].double()
            x = pre + got[("attn", l)]  # residual before the MLP, rebuilt from the block input + attention output
            assert torch.allclose(cache.resid_mid[l, i], x, atol=1e-5)
            m = got[("post", l)]
            down = tiny.submodule(l, "mlp.down")
            with torch.no_grad():
                eye = torch.diag(m.float())  # row k = m_k e_k
                contrib = (down(eye) - down(torch.zeros_like(eye))).double()  # row k = m_k v_k
            base = _brute_logp(tiny, x, s_final, norm, tid)
            for k in range(tiny.d_mlp):
                d = _brute_logp(tiny, x + contrib[k], s_final, norm, tid) - base
                j = l * tiny.d_mlp + k
                assert torch.allclose(imp[i, j], d, atol=2e-5, rtol=1e-4)
                assert abs(float(res.per_prompt[i, j]) - float(d[1] - d[0])) < 2e-5
    signed = res.per_prompt.double().mean(0)
    assert torch.allclose(res.scores.double(), signed.abs(), atol=1e-6)


@pytest.mark.parametrize("o_bias_mode", ["baseline", "split"])
def test_head_attribution_equals_brute_force(tiny, o_bias_mode):
    ts = resolve_targets(tiny.tokenizer, "he,she")
    tid = torch.as_tensor(ts.first_ids)
    cache = collect_last(tiny, PROMPTS, batch_size=2)
    for norm in ("cached", "recompute"):
        res = head_attribution(tiny, PROMPTS, ts, norm=norm, cache=cache, o_bias_mode=o_bias_mode)
        fn = norm_parts(tiny.final_norm)
        H, dh = tiny.n_heads, tiny.d_head
        for i, prompt in enumerate(PROMPTS):
            out, got = _hf_reference(tiny, prompt)
            s_final = fn.scale(cache.final[i])
            for l in range(tiny.n_layers):
                o_proj = tiny.submodule(l, "attn.o")
                z = got[("z", l)].float()
                with torch.no_grad():
                    bias = o_proj(torch.zeros_like(z)).double()
                    x = out.hidden_states[l][0, -1].double()
                    for h in range(H):
                        zh = torch.zeros_like(z)
                        zh[h * dh : (h + 1) * dh] = z[h * dh : (h + 1) * dh]
                        oh = o_proj(zh).double() - bias
                        if o_bias_mode == "baseline":
                            x0, x1 = x + bias, x + bias + oh
                        else:
                            x0, x1 = x, x + oh + bias / H
                        d = _brute_logp(tiny, x1, s_final, norm, tid) - _brute_logp(tiny, x0, s_final, norm, tid)
                        assert abs(float(res.per_prompt[i, l * H + h]) - float(d[1] - d[0])) < 2e-5
        # heads sum: with o_bias baseline and cached norm, scores of all heads add up to the attention's logit-diff change
    assert res.labels[0] == "L0H0" and len(res.labels) == tiny.n_layers * tiny.n_heads


def test_gate_query_neurons_formula(tiny_llama):
    lm = tiny_llama
    cache = collect_last(lm, PROMPTS)
    values = ["L2N3", "L2N17", "L1N5"]
    res = gate_query_neurons(lm, cache, values, input_dir="gate")
    ln2 = [norm_parts(lm.block(l).post_attention_layernorm) for l in range(lm.n_layers)]
    for j_label in ("L0N7", "L1N11", "L0N90"):
        lj, j = int(j_label[1]), int(j_label.split("N")[1])
        total = torch.zeros(len(PROMPTS), dtype=torch.float64)
        for v in values:
            l, k = int(v[1]), int(v.split("N")[1])
            if l <= lj:
                continue
            gate = lm.submodule(l, "mlp.gate").weight.detach().double()[k]
            vj = lm.submodule(lj, "mlp.down").weight.detach().double()[:, j]
            for i in range(len(PROMPTS)):
                x = cache.resid_mid[l, i]
                y = cache.mlp_post[lj, i, j] * vj
                # gate pre-activation change when y is added to the residual, ln2 scale frozen at x
                s = ln2[l].scale(x)
                total[i] += float(gate @ (ln2[l].weight * y / s))
        assert abs(res.score_of(j_label) - abs(float(total.mean()))) < 1e-8
    assert all(not lab.startswith("L2") for lab in res.labels)


def test_attribution_rejects_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="norm must be"):
        neuron_attribution(tiny_llama, PROMPTS, norm="bogus")
    with pytest.raises(ValueError, match="exactly two"):
        neuron_attribution(tiny_llama, PROMPTS, "he,she,they")
    with pytest.raises(ValueError, match="out of range"):
        neuron_attribution(tiny_llama, PROMPTS, layers=[7])


@pytest.mark.parametrize("rank", ["abs", "mean_abs", "signed"])
def test_layerwise_reduction_equals_full_matrix(tiny, rank):
    """Without per-prompt scores the ranking is reduced layer by layer (lower peak memory): same numbers."""
    cache = collect_last(tiny, PROMPTS, batch_size=3)
    full = neuron_attribution(tiny, PROMPTS, cache=cache, rank=rank, keep_per_prompt=True)
    lean = neuron_attribution(tiny, PROMPTS, cache=cache, rank=rank)
    assert lean.per_prompt is None and lean.labels == full.labels
    torch.testing.assert_close(lean.scores, full.scores)
    torch.testing.assert_close(lean.extras["signed"], full.extras["signed"])
    signed = full.per_prompt.double().mean(0)  # the oracle: reduce the full matrix by hand
    want = {"abs": signed.abs(), "mean_abs": full.per_prompt.double().abs().mean(0), "signed": signed}[rank]
    torch.testing.assert_close(lean.scores.double(), want, atol=1e-6, rtol=1e-5)
