"""Neuron vocabulary projection against the reference's get_bsvalues written in plain torch."""

from __future__ import annotations

import pytest
import torch

from bias_lens.locate.projection import neuron_vocab_projection

LABELS = ["L0N5", "L2N90", "L1H2V7", "L2H0V0"]


def _plain(lm, label: str, k: int) -> dict[str, list[str]]:
    """lm_head(u * rsqrt(var + eps) * norm.weight) (GPT-2: LayerNorm centres u first), then argsort."""
    hf = lm.hf
    gpt2 = hasattr(hf, "transformer")
    layer = hf.transformer.h[int(label[1])] if gpt2 else hf.model.layers[int(label[1])]
    if "V" in label:
        h, d = int(label.split("H")[1].split("V")[0]), int(label.split("V")[1])
        col = h * lm.d_head + d
        u = layer.attn.c_proj.weight[col, :] if gpt2 else layer.self_attn.o_proj.weight[:, col]
    else:
        n = int(label.split("N")[1])
        u = layer.mlp.c_proj.weight[n, :] if gpt2 else layer.mlp.down_proj.weight[:, n]
    u = u.detach().double()
    norm = hf.transformer.ln_f if gpt2 else hf.model.norm
    if gpt2:
        u = u - u.mean()
    u = u * torch.rsqrt(torch.tensor(3.7) + 1e-6) * norm.weight.detach().double()  # positive scale: order unchanged
    z = u @ hf.lm_head.weight.detach().double().T
    order = torch.argsort(z, descending=True)
    dec = lambda ids: [lm.tokenizer.decode([int(i)]) for i in ids]  # noqa: E731
    return {"top": dec(order[:k]), "bottom": dec(order[-k:].tolist()[::-1])}


def test_projection_matches_plain_torch(tiny):
    got = neuron_vocab_projection(tiny, LABELS, k=7)
    assert list(got) == LABELS
    for lab in LABELS:
        assert got[lab] == _plain(tiny, lab, 7), lab


def test_projection_errors(tiny_llama):
    with pytest.raises(ValueError, match="L\\{l\\}N\\{n\\}"):
        neuron_vocab_projection(tiny_llama, ["L1H2"])
    with pytest.raises(ValueError, match="out of range"):
        neuron_vocab_projection(tiny_llama, ["L1N96"])
    with pytest.raises(ValueError, match="out of range"):
        neuron_vocab_projection(tiny_llama, ["L1H1V12"])
    with pytest.raises(ValueError, match="k must"):
        neuron_vocab_projection(tiny_llama, ["L1N3"], k=0)
