"""Row scale (MSME Eq. 4) and neuron scale (Eq. 5) against direct autograd oracles.

The oracles run the plain HF model one prompt at a time with every parameter trainable, take
``torch.autograd.grad`` of log p(t | prompt) w.r.t. the *stored* parameter and put it in
``[out, in]`` orientation by hand (GPT-2 Conv1D transposed, fused qkv sliced), independently of
``bias_lens.arch``.
"""

from __future__ import annotations

import pytest
import torch

from bias_lens.locate.gradients import neuron_scale, row_scale
from bias_lens.targets import resolve_targets

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls are ~1000x slower with 2 threads on this shared 2-core machine; restore after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PROMPTS = [
    "The nurse laughed because",
    "The carpenter went home because",
    "The doctor said that",
    "Two plus two is four . The engineer said that",
    "The baker went home because",
]
PAIRS = [
    ("The carpenter laughed because he was happy .", "The carpenter laughed because she was happy ."),
    ("The nurse went home because he was tired .", "The nurse went home because she was tired ."),
    ("The doctor said that his friend agreed", "The doctor said that her friend agreed"),
]


def _f64(lm):
    """Run the tiny model in float64 so the oracle comparison is not float32 noise."""
    lm.hf.double()
    return lm


def _stored_and_view(lm, module: str):
    """(stored parameter, function mapping its gradient to [out, in]) -- written out per family."""
    layer, kind = int(module[1:].split(".")[0]), module.split(".", 1)[1]
    block = lm.hf.transformer.h[layer] if lm.arch.family == "gpt2" else lm.hf.model.layers[layer]
    if lm.arch.family == "gpt2":
        d = lm.d_model
        if kind == "attn.q":
            return block.attn.c_attn.weight, lambda g: g.T[:d]
        if kind == "attn.v":
            return block.attn.c_attn.weight, lambda g: g.T[2 * d :]
        mod = {"mlp.down": block.mlp.c_proj, "mlp.up": block.mlp.c_fc, "attn.o": block.attn.c_proj}[kind]
        return mod.weight, lambda g: g.T
    mod = {"mlp.down": block.mlp.down_proj, "attn.q": block.self_attn.q_proj, "attn.v": block.self_attn.v_proj}[kind]
    return mod.weight, lambda g: g


def _logp(lm, text, tid):
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    return torch.log_softmax(lm.hf(ids).logits[0, -1], -1)[tid]


def _grad(lm, loss, param, view):
    return view(torch.autograd.grad(loss, param)[0]).double()


def _oracle_sum_grads(lm, module, tids):
    param, view = _stored_and_view(lm, module)
    return [_grad(lm, sum(_logp(lm, p, t) for p in PROMPTS), param, view) for t in tids]


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


@pytest.mark.parametrize("module", ["L1.mlp.down", "L2.attn.q"])
def test_row_cosines_equal_autograd(tiny, module):
    _f64(tiny)
    tids = resolve_targets(tiny.tokenizer, "he,she").first_ids
    g_he, g_she = _oracle_sum_grads(tiny, module, tids)
    res = row_scale(tiny, PROMPTS, module, "he,she", batch_size=2)
    assert res.labels == [f"{module}/row{r}" for r in range(g_he.shape[0])]
    torch.testing.assert_close(res.scores.double(), _cos(g_he, g_she), atol=1e-10, rtol=1e-9)
    # the kept half: highest cosines as written
    k = g_he.shape[0] // 2
    want = sorted(torch.argsort(_cos(g_he, g_she), descending=True)[:k].tolist())
    assert res.extras["selected_rows"] == want
    assert res.extras["selected"] == [f"{module}/row{r}" for r in want]
    assert not res.ascending and "descending" in res.variant


def test_ascending_is_reverse_ranking(tiny_llama):
    d = row_scale(tiny_llama, PROMPTS, "L1.mlp.down", keep=0.25)
    a = row_scale(tiny_llama, PROMPTS, "L1.mlp.down", order="ascending", keep=0.25)
    torch.testing.assert_close(a.scores, d.scores)
    assert a.ascending and "ascending" in a.variant
    assert a.order() == list(reversed(d.order()))  # no ties in random-weight cosines
    n = len(d.labels)
    assert a.extras["n_selected"] == round(0.25 * n)
    assert set(a.extras["selected_rows"]) == set(d.order()[n - a.extras["n_selected"] :])


def test_pair_texts_equal_autograd(tiny):
    _f64(tiny)
    module = "L0.mlp.down"
    param, view = _stored_and_view(tiny, module)

    def loglik(text):
        ids = tiny.tokenizer(text, return_tensors="pt").input_ids
        lp = torch.log_softmax(tiny.hf(ids).logits[0, :-1], -1)
        return lp.gather(1, ids[0, 1:, None]).sum()

    g_m = _grad(tiny, sum(loglik(m) for m, _ in PAIRS), param, view)
    g_f = _grad(tiny, sum(loglik(f) for _, f in PAIRS), param, view)
    res = row_scale(tiny, None, module, pair_texts=PAIRS, batch_size=2)
    torch.testing.assert_close(res.scores.double(), _cos(g_m, g_f), atol=1e-10, rtol=1e-9)
    assert res.variant.startswith("pair-texts")
    with pytest.raises(ValueError, match="not both"):
        row_scale(tiny, PROMPTS, module, pair_texts=PAIRS)
    with pytest.raises(ValueError, match="two non-empty"):
        row_scale(tiny, None, module, pair_texts=[("a b c", "")])


@pytest.mark.parametrize("given_rows", [False, True])
def test_neuron_scale_per_prompt_equals_autograd(tiny, given_rows):
    _f64(tiny)
    module = "L1.mlp.down"
    tids = resolve_targets(tiny.tokenizer, "he,she").first_ids
    param, view = _stored_and_view(tiny, module)
    rows = row_scale(tiny, PROMPTS, module, batch_size=2) if not given_rows else [0, 3, 5, 17, 40]
    res = neuron_scale(tiny, PROMPTS, module, rows=None if not given_rows else rows, batch_size=3)
    sel = rows.extras["selected_rows"] if not given_rows else rows
    assert res.extras["rows"] == sel
    want_cols, want_union = [], {}
    for p in PROMPTS:
        g = [_grad(tiny, _logp(tiny, p, t), param, view) for t in tids]
        imp = (g[0] - g[1]).abs()[sel]
        val, col = imp.max(1)
        want_cols.append(col)
        for r, c, v in zip(sel, col.tolist(), val.tolist()):
            want_union.setdefault(f"{module}/row{r}/col{c}", []).append(v)
    assert torch.equal(res.extras["choices"], torch.stack(want_cols))
    assert sorted(res.labels) == sorted(want_union)
    assert res.extras["n_entries"] == len(want_union) and res.extras["n_rows"] == len(sel)
    for i, lab in enumerate(res.labels):
        assert res.scores[i] == len(want_union[lab])
        assert res.extras["max_importance"][i].item() == pytest.approx(max(want_union[lab]), rel=1e-9, abs=1e-12)
        assert res.extras["mean_importance"][i].item() == pytest.approx(sum(want_union[lab]) / len(want_union[lab]), rel=1e-9, abs=1e-12)


def test_gpt2_fused_qkv_neuron_scale(tiny_tokenizer_dir, tmp_path):
    from conftest import build_tiny

    lm = _f64(build_tiny("gpt2", tiny_tokenizer_dir, tmp_path / "g"))
    module, rows = "L2.attn.v", [1, 2, 30, 47]
    tids = resolve_targets(lm.tokenizer, "he,she").first_ids
    param, view = _stored_and_view(lm, module)
    res = neuron_scale(lm, PROMPTS, module, rows=rows, batch_size=4)
    for i, p in enumerate(PROMPTS):
        g = [_grad(lm, _logp(lm, p, t), param, view) for t in tids]
        assert torch.equal(res.extras["choices"][i], (g[0] - g[1]).abs()[rows].argmax(1))


def test_no_grad_left_and_flags_restored(tiny_llama):
    hf = tiny_llama.hf
    hf.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a mixed starting state
    before = {n: p.requires_grad for n, p in hf.named_parameters()}
    weights = {n: p.detach().clone() for n, p in hf.named_parameters()}
    row_scale(tiny_llama, PROMPTS, "L1.mlp.down")
    neuron_scale(tiny_llama, PROMPTS, "L2.attn.q")
    assert {n: p.requires_grad for n, p in hf.named_parameters()} == before
    assert all(p.grad is None for p in hf.parameters())
    assert all(torch.equal(p, weights[n]) for n, p in hf.named_parameters())
    assert not hf.training


def test_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="order"):
        row_scale(tiny_llama, PROMPTS, "L1.mlp.down", order="up")
    with pytest.raises(ValueError, match="keep"):
        row_scale(tiny_llama, PROMPTS, "L1.mlp.down", keep=0)
    with pytest.raises(ValueError, match="out of range"):
        row_scale(tiny_llama, PROMPTS, "L9.mlp.down")
    with pytest.raises(ValueError, match="exactly two"):
        row_scale(tiny_llama, PROMPTS, "L1.mlp.down", targets="he,she,they")
    with pytest.raises(ValueError, match="row indices"):
        neuron_scale(tiny_llama, PROMPTS, "L1.mlp.down", rows=[999])
    r = row_scale(tiny_llama, PROMPTS, "L1.mlp.down")
    with pytest.raises(ValueError, match="module="):
        neuron_scale(tiny_llama, PROMPTS, "L2.mlp.down", rows=r)
    with pytest.raises(ValueError, match="no prompts"):
        row_scale(tiny_llama, [], "L1.mlp.down")


@pytest.mark.integration
def test_smol_row_cosines_equal_autograd(smol):
    prompts = PROMPTS[:4]
    tids = resolve_targets(smol.tokenizer, "he,she").first_ids
    w = smol.hf.model.layers[29].mlp.down_proj.weight
    flags = [p.requires_grad for p in smol.hf.parameters()]
    try:
        for p in smol.hf.parameters():
            p.requires_grad_(p is w)
        ids = [smol.tokenizer(p, return_tensors="pt").input_ids for p in prompts]
        grads = []
        for t in tids:
            loss = sum(torch.log_softmax(smol.hf(i).logits[0, -1].float(), -1)[t] for i in ids)
            grads.append(torch.autograd.grad(loss, w)[0].double())
    finally:
        for p, f in zip(smol.hf.parameters(), flags):
            p.requires_grad_(f)
    res = row_scale(smol, prompts, "L29.mlp.down", batch_size=4)
    torch.testing.assert_close(res.scores.double(), _cos(*grads), atol=1e-4, rtol=1e-3)
    assert res.extras["n_selected"] == 288


def test_figures_show_the_result(tiny_llama):
    from bias_lens.plot.gradients import entry_heatmap, row_cosine_histogram, row_cosine_strip

    r = row_scale(tiny_llama, PROMPTS, "L1.mlp.down", keep=0.25)
    fig = row_cosine_histogram(r)
    sel = set(r.extras["selected_rows"])
    other, chosen = fig.data
    assert sorted(chosen.x) == sorted(float(r.scores[i]) for i in sel)
    assert sorted(other.x) == sorted(float(r.scores[i]) for i in range(len(r.labels)) if i not in sel)
    assert list(row_cosine_strip(r).data[0].y) == r.scores.tolist()
    ne = neuron_scale(tiny_llama, PROMPTS, "L1.mlp.down", rows=r)
    hm = entry_heatmap(ne).data[0]
    z = torch.tensor(hm.z, dtype=torch.float64)
    assert list(hm.y) == [f"row{q}" for q in ne.extras["rows"]] and z.shape[1] == tiny_llama.d_mlp
    for lab, count in zip(ne.labels, ne.scores.tolist()):
        rr, cc = int(lab.split("/row")[1].split("/")[0]), int(lab.split("/col")[1])
        assert z[ne.extras["rows"].index(rr), cc] == count
    assert int((~torch.isnan(z)).sum()) == len(ne.labels)
    with pytest.raises(ValueError, match="neuron_scale result"):
        entry_heatmap(r)


def test_same_scores_inside_no_grad(tiny_llama):
    """A caller inside ``torch.no_grad()`` (a notebook cell, a benchmark harness) gets the same scores."""
    a = row_scale(tiny_llama, PROMPTS, "L1.mlp.down")
    an = neuron_scale(tiny_llama, PROMPTS, "L1.mlp.down")
    with torch.no_grad():
        b = row_scale(tiny_llama, PROMPTS, "L1.mlp.down")
        bn = neuron_scale(tiny_llama, PROMPTS, "L1.mlp.down")
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(b.scores, a.scores)
    torch.testing.assert_close(bn.scores, an.scores)
