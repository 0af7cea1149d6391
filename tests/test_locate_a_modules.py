"""Module scale (MSME Eq. 3): prefix-reused zero ablations vs zeroing a copy and running it in full."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bias_lens.arch import get_submodule
from bias_lens.locate.modules import available_modules, capture_prefix, module_scale, run_block
from bias_lens.scoring import iter_batches
from bias_lens.targets import resolve_targets

PROMPTS = ["The nurse laughed because", "The carpenter went home because he was", "Two plus", "The doctor said that"]


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.hf.state_dict().items()}


def unchanged(lm, snap) -> bool:
    return all(torch.equal(v, lm.hf.state_dict()[k]) for k, v in snap.items())


def zero_in_copy(lm, model: nn.Module, layer: int, kind: str) -> None:
    """Zero module ``kind`` of ``layer`` in ``model`` straight from the arch table paths (no ParamRef)."""
    block = get_submodule(model, f"{lm.arch.layers}.{layer}")
    with torch.no_grad():
        if kind in ("attn", "mlp"):
            sub = get_submodule(block, lm.arch.attn if kind == "attn" else lm.arch.mlp)
            for p in sub.parameters():
                p.zero_()
            return
        spec = lm.arch.module(kind)
        mod = get_submodule(block, spec.path)
        if spec.out_slice is None:
            mod.weight.zero_()
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
            return
        k, n = spec.out_slice  # GPT-2 Conv1D: weight [in, 3*d], bias [3*d]
        size = mod.weight.shape[1] // n
        mod.weight[:, k * size : (k + 1) * size] = 0
        mod.bias[k * size : (k + 1) * size] = 0


def lens_and_final(lm, model: nn.Module, layer: int, tids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain full forward of all PROMPTS (tokenizer padding): target probs at block ``layer``'s output and at the output."""
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    last = enc.attention_mask.sum(1) - 1
    rows = torch.arange(len(PROMPTS))
    got = {}
    blk = get_submodule(model, f"{lm.arch.layers}.{layer}")
    h = blk.register_forward_hook(lambda m, a, o: got.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            logits = model(**enc).logits[rows, last]
    finally:
        h.remove()
    norm = get_submodule(model, lm.arch.final_norm)
    unembed = get_submodule(model, lm.arch.unembed)
    with torch.no_grad():
        block_logits = unembed(norm(got["h"][rows, last]))
    return torch.softmax(block_logits.double(), -1)[:, tids], torch.softmax(logits.double(), -1)[:, tids]


def test_module_scale_matches_full_forward_of_zeroed_copy(tiny):
    snap = snapshot(tiny)
    tids = resolve_targets(tiny.tokenizer, "he,she").first_ids
    res = module_scale(tiny, PROMPTS, batch_size=3)
    mods = available_modules(tiny)
    assert ("mlp.gate" in mods) == (tiny.arch.family != "gpt2")
    assert res.labels == [f"L{i}.{m}" for i in range(tiny.n_layers) for m in mods]
    assert unchanged(tiny, snap)
    clone = copy.deepcopy(tiny.hf)
    base = {i: lens_and_final(tiny, clone, i, tids) for i in range(tiny.n_layers)}
    want = torch.empty(len(PROMPTS), len(res.labels), dtype=torch.float64)
    want_final = torch.empty_like(want)
    for k, label in enumerate(res.labels):
        layer, kind = int(label.split(".", 1)[0][1:]), label.split(".", 1)[1]
        clone.load_state_dict(snap)
        zero_in_copy(tiny, clone, layer, kind)
        blk, fin = lens_and_final(tiny, clone, layer, tids)
        want[:, k] = (blk - base[layer][0]).abs().sum(-1)
        want_final[:, k] = (fin - base[layer][1]).abs().sum(-1)
    assert want.max() > 0
    torch.testing.assert_close(res.per_prompt, want, rtol=2e-3, atol=1e-8)
    torch.testing.assert_close(res.scores, want.mean(0), rtol=2e-3, atol=1e-8)
    torch.testing.assert_close(torch.tensor(res.extras["final_effect"], dtype=torch.float64), want_final.mean(0), rtol=2e-3, atol=1e-8)
    grid = torch.tensor(res.extras["matrix"], dtype=torch.float64)
    assert grid.shape == (tiny.n_layers, len(mods))
    torch.testing.assert_close(grid.flatten(), res.scores)


def test_layer_and_module_subset_and_final_off(tiny_llama):
    full = module_scale(tiny_llama, PROMPTS, layers=[0, 2], modules=["attn.o", "mlp.down"], batch_size=4)
    sub = module_scale(tiny_llama, PROMPTS, layers=[2, 0], modules=["mlp.down", "attn.o"], batch_size=4, final=False)
    assert sub.labels == ["L0.mlp.down", "L0.attn.o", "L2.mlp.down", "L2.attn.o"]
    assert "final_effect" not in sub.extras
    for label in sub.labels:
        assert sub.score_of(label) == pytest.approx(full.score_of(label), rel=1e-6)


def test_replaying_cached_calls_reproduces_the_forward(tiny):
    """The prefix cache replays each block's exact call: running blocks from H^(0) gives H^(L) bit for bit."""
    for b in iter_batches(tiny.tokenizer, PROMPTS, 4):
        pre = capture_prefix(tiny, b)
        h = pre.hidden[0]
        with torch.no_grad():
            for i in range(tiny.n_layers):
                h = run_block(tiny, pre, i, h)
                assert torch.equal(h, pre.hidden[i + 1])


def test_weights_restored_bit_exactly_when_a_forward_raises(tiny):
    snap = snapshot(tiny)
    calls = {"n": 0}

    def boom(module, args, output):
        calls["n"] += 1
        if calls["n"] == 4:  # baseline pass was call 1; fail inside an ablation
            raise RuntimeError("injected failure")

    h = tiny.layers[1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            module_scale(tiny, PROMPTS, layers=[1], batch_size=4)
    finally:
        h.remove()
    assert calls["n"] == 4
    assert unchanged(tiny, snap)


def test_bad_input_is_one_clear_error_and_changes_nothing(tiny):
    snap = snapshot(tiny)
    with pytest.raises(ValueError, match="no prompts"):
        module_scale(tiny, [])
    with pytest.raises(ValueError, match="unknown module"):
        module_scale(tiny, PROMPTS, modules=["mlp.fc9"])
    with pytest.raises(ValueError, match="out of range"):
        module_scale(tiny, PROMPTS, layers=[tiny.n_layers])
    with pytest.raises(ValueError, match="one token"):
        module_scale(tiny, PROMPTS, "he,giraffe")
    if tiny.arch.family == "gpt2":
        with pytest.raises(ValueError, match="unknown module"):
            module_scale(tiny, PROMPTS, modules=["mlp.gate"])
    assert unchanged(tiny, snap)


def test_module_heatmap_is_the_layer_by_module_matrix(tiny_llama):
    from bias_lens.plot.locate import module_heatmap

    res = module_scale(tiny_llama, PROMPTS, layers=[0, 1], batch_size=4)
    fig = module_heatmap(res)
    z = torch.tensor(fig.data[0].z, dtype=torch.float64)
    torch.testing.assert_close(z.flatten(), res.scores)
    assert list(fig.data[0].x) == available_modules(tiny_llama) and list(fig.data[0].y) == ["L0", "L1"]
    zf = torch.tensor(module_heatmap(res, final=True).data[0].z, dtype=torch.float64)
    torch.testing.assert_close(zf.flatten(), torch.tensor(res.extras["final_effect"], dtype=torch.float64))
    assert "final output" in module_heatmap(res, final=True).layout.title.text
