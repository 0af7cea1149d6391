"""The Gemma, Gemma-2 and Phi-3 rows of the architecture table, against plain HF computations.

Oracles are written from the HF modeling code, not from the table: hand-sliced fused weights
(Phi-3 ``qkv_proj`` = q | k | v sized by GQA, ``gate_up_proj`` = gate | up), hand-registered
forward hooks, the residual identities (resid_mid = resid_pre + attn.out, resid_post = resid_mid +
mlp.out, resid_pre[l] = hidden_states[l]), the model's own logits (Gemma-2 soft-cap included) and
the Gemma embedding scale sqrt(d_model).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import EXTRA_ARCHS, build_tiny
from transformers.activations import ACT2FN

from bias_lens.arch import MODULE_KINDS, arch_for, param_ref, weight_layouts
from bias_lens.edit.masks import mask_from_labels
from bias_lens.hooks import record_into
from bias_lens.locate.attribution import collect_last, neuron_attribution, norm_parts, value_vectors
from bias_lens.locate.gradients import row_scale
from bias_lens.locate.result import LocateResult

PROMPTS = ["The nurse laughed because", "The carpenter went home because he", "Two plus"]
ALL_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn.out", "attn.z", "mlp.in", "mlp.post", "mlp.out")


@pytest.fixture(params=EXTRA_ARCHS)
def row(request, tiny_tokenizer_dir, tmp_path):
    return build_tiny(request.param, tiny_tokenizer_dir, tmp_path / request.param)


def _ids(lm, prompt=PROMPTS[1]):
    return lm.tokenizer(prompt, return_tensors="pt").input_ids


def _hand_weights(lm, l: int) -> dict[str, torch.Tensor]:
    """Each module's [out, in] weight sliced by hand from the HF modeling code's layout."""
    blk, cfg = lm.hf.model.layers[l], lm.config
    if lm.arch.family != "phi3":
        a, m = blk.self_attn, blk.mlp
        return {"attn.q": a.q_proj.weight, "attn.k": a.k_proj.weight, "attn.v": a.v_proj.weight,
                "attn.o": a.o_proj.weight, "mlp.gate": m.gate_proj.weight, "mlp.up": m.up_proj.weight,
                "mlp.down": m.down_proj.weight}
    hd = cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd  # Phi3Attention.forward
    qkv, gu = blk.self_attn.qkv_proj.weight, blk.mlp.gate_up_proj.weight
    f = cfg.intermediate_size  # Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1)
    return {"attn.q": qkv[:q], "attn.k": qkv[q : q + kv], "attn.v": qkv[q + kv :], "attn.o": blk.self_attn.o_proj.weight,
            "mlp.gate": gu[:f], "mlp.up": gu[f:], "mlp.down": blk.mlp.down_proj.weight}


def test_weight_views_share_storage_and_are_the_right_slices(row):
    for l in range(row.n_layers):
        hand = _hand_weights(row, l)
        for kind in MODULE_KINDS:
            ref = param_ref(row.hf, f"L{l}.{kind}")
            w, p = ref.weight_view(row.hf), row.hf.get_parameter(ref.weight_name)
            assert w.untyped_storage().data_ptr() == p.untyped_storage().data_ptr(), kind
            assert w.shape == hand[kind].shape and torch.equal(w, hand[kind]), kind
            assert not ref.transposed
    # writing through a view changes exactly that slice of the fused parameter
    ref = param_ref(row.hf, "L1.attn.k")
    p = row.hf.get_parameter(ref.weight_name)
    before = p.detach().clone()
    with torch.no_grad():
        ref.weight_view(row.hf)[2, 3] += 1.0
    changed = (p.detach() != before).nonzero().tolist()
    start = ref.rows.start if ref.rows is not None else 0
    assert changed == [[start + 2, 3]]
    assert weight_layouts(row.hf) == {n: "out_in" for n, _ in row.hf.named_parameters(remove_duplicate=False)}


def test_mlp_and_attention_through_views_equal_hf(row):
    """down(act(gate x) * up x) with our views == the HF MLP; q/k/v views == the HF projections."""
    act = ACT2FN[getattr(row.config, "hidden_activation", None) or row.config.hidden_act]
    x = torch.randn(5, row.d_model, generator=torch.Generator().manual_seed(0))
    for l in range(row.n_layers):
        W = {k: param_ref(row.hf, f"L{l}.{k}").weight_view(row.hf) for k in MODULE_KINDS}
        with torch.no_grad():
            mine = (act(x @ W["mlp.gate"].T) * (x @ W["mlp.up"].T)) @ W["mlp.down"].T
            assert torch.allclose(mine, row.submodule(l, "mlp")(x[None])[0], atol=1e-5)
            if row.arch.family == "phi3":
                qkv = row.submodule(l, "attn").qkv_proj(x)
                assert torch.allclose(torch.cat([x @ W[k].T for k in ("attn.q", "attn.k", "attn.v")], -1), qkv, atol=1e-6)


def _plain_hf_record(lm, ids):
    """Activations recorded with hand-registered PyTorch hooks (module names from the HF code)."""
    got, hs = {}, []
    post_norms = lm.arch.family == "gemma2"
    for l, blk in enumerate(lm.hf.model.layers):
        attn_src = blk.post_attention_layernorm if post_norms else blk.self_attn
        mlp_src = blk.post_feedforward_layernorm if post_norms else blk.mlp
        hs += [
            attn_src.register_forward_hook(lambda m, a, o, l=l: got.__setitem__(f"L{l}.attn.out", o[0] if isinstance(o, tuple) else o)),
            mlp_src.register_forward_hook(lambda m, a, o, l=l: got.__setitem__(f"L{l}.mlp.out", o)),
            blk.mlp.register_forward_pre_hook(lambda m, a, l=l: got.__setitem__(f"L{l}.mlp.in", a[0])),
            blk.mlp.down_proj.register_forward_pre_hook(lambda m, a, l=l: got.__setitem__(f"L{l}.mlp.post", a[0])),
            blk.self_attn.o_proj.register_forward_pre_hook(lambda m, a, l=l: got.__setitem__(f"L{l}.attn.z", a[0])),
        ]
    try:
        with torch.no_grad():
            out = lm.hf(ids, output_hidden_states=True)
    finally:
        for h in hs:
            h.remove()
    return out, got


def test_hook_points_equal_plain_hf_hooks_and_residual_identities(row):
    ids = _ids(row)
    out, plain = _plain_hf_record(row, ids)
    store = {}
    points = [f"L{l}.{k}" for l in range(row.n_layers) for k in ALL_POINTS]
    with torch.no_grad(), row.hooks(record_into(store, points)):
        again = row.hf(ids).logits
    assert torch.equal(again, out.logits)
    for name, t in plain.items():
        assert torch.equal(store[name], t), name
    for l in range(row.n_layers):
        s = {k: store[f"L{l}.{k}"] for k in ALL_POINTS}
        assert torch.allclose(s["resid_pre"], out.hidden_states[l], atol=1e-6)
        assert torch.allclose(s["resid_mid"], s["resid_pre"] + s["attn.out"], atol=1e-5)
        assert torch.allclose(s["resid_post"], s["resid_mid"] + s["mlp.out"], atol=1e-5)
        W = {k: param_ref(row.hf, f"L{l}.{k}").weight_view(row.hf) for k in ("mlp.gate", "mlp.up")}
        act = ACT2FN[getattr(row.config, "hidden_activation", None) or row.config.hidden_act]
        assert torch.allclose(s["mlp.post"], act(s["mlp.in"] @ W["mlp.gate"].T) * (s["mlp.in"] @ W["mlp.up"].T), atol=1e-5)
    # block-0 input is the embedding; Gemma scales it by sqrt(d_model) inside the embedding module
    scale = math.sqrt(row.d_model) if row.arch.family.startswith("gemma") else 1.0
    raw = F.embedding(ids, row.embed.weight.detach())
    assert torch.allclose(store["L0.resid_pre"], raw * scale, atol=1e-5)


def test_final_norm_and_unembed_reproduce_model_logits(row):
    """Oracle: our final norm + unembed (+ Gemma-2 soft-cap) of the last block output == HF logits."""
    ids = _ids(row)
    store = {}
    last = f"L{row.n_layers - 1}.resid_post"
    with torch.no_grad(), row.hooks(record_into(store, [last])):
        ref = row.hf(ids).logits
        body = row.body(ids)[0]
        mine = row.logits_from_resid(store[last])
        from_body = row.logits_from_normed(body)
        uncapped = row.unembed(body)
    assert torch.allclose(mine, ref, atol=1e-5)
    assert torch.allclose(from_body, ref, atol=1e-6)
    if row.arch.family == "gemma2":
        assert row.logit_softcap == 2.0 and ref.abs().max() < 2.0
        assert not torch.allclose(uncapped, ref, atol=1e-2)  # the cap is active in this test
    else:
        assert row.logit_softcap is None and torch.allclose(uncapped, ref, atol=1e-6)
    # the norm algebra of the row's norm kind equals the module; the behavioural probe agrees
    y = store[last][0].double()
    fn = norm_parts(row.final_norm, row.arch.norm)
    with torch.no_grad():
        assert torch.allclose(fn.apply(y), row.final_norm(y.float()).double(), atol=1e-5)
    probed = norm_parts(row.final_norm)
    assert torch.equal(probed.weight, fn.weight) and probed.centered == fn.centered and probed.bias is None
    assert row.arch.norm == ("rmsnorm_1p" if row.arch.family.startswith("gemma") else "rmsnorm")


def test_mask_from_labels_marks_the_fused_slices(row):
    labels = ["L1.attn.k", "L2.mlp.gate", "L0N5"]
    mask = mask_from_labels(row.hf, labels)
    want: dict[str, torch.Tensor] = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in row.hf.named_parameters()}
    params = dict(row.hf.named_parameters())

    def mark(name: str, rows=slice(None), cols=slice(None)) -> None:
        ref = param_ref(row.hf, name)
        full = want[ref.weight_name]
        sub = full[ref.rows] if ref.rows is not None else full  # a view into `full`
        sub[rows, cols] = True

    mark("L1.attn.k")
    mark("L2.mlp.gate")
    mark("L0.mlp.down", cols=5)
    mark("L0.mlp.gate", rows=5)
    mark("L0.mlp.up", rows=5)
    want = {n: m for n, m in want.items() if m.any()}
    assert set(mask.masks) == set(want)
    for n, m in want.items():
        assert mask.masks[n].shape == params[n].shape and torch.equal(mask.masks[n], m), n
    if row.arch.family == "phi3":  # hand oracle on the fused tensors
        cfg, hd = row.config, row.d_model // row.n_heads
        q, kv, f = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
        qkv = mask.masks["model.layers.1.self_attn.qkv_proj.weight"]
        assert qkv[q : q + kv].all() and not qkv[:q].any() and not qkv[q + kv :].any()
        gu0 = mask.masks["model.layers.0.mlp.gate_up_proj.weight"]
        assert gu0.nonzero()[:, 0].unique().tolist() == [5, f + 5]


def test_lenses_construct_and_agree(row):
    """TransformerBridge (gemma1 / gemma2 / phi3 adapters) and nnsight over the same weights."""
    ids = _ids(row)
    with torch.no_grad():
        ref = row.hf(ids).logits
        out = row.bridge(ids)
        with row.nnsight.trace(ids):
            nn_out = row.nnsight.output.logits.save()
    assert torch.allclose(out, ref, atol=1e-4)
    assert torch.allclose(nn_out, ref, atol=1e-6)
    points = [f"L{l}.{k}" for l in range(row.n_layers) for k in ALL_POINTS]
    a, b = {}, {}
    with torch.no_grad():
        with row.hooks(record_into(a, points), lens="hf"):
            row.hf(ids)
        with row.hooks(record_into(b, points), lens="tl"):
            row.bridge(ids)
    bad = [p for p in points if a[p].shape != b[p].shape or not torch.allclose(a[p], b[p], atol=1e-4)]
    assert not bad, bad


def test_gemma2_refuses_linear_decomposition_and_gemma_attribution_is_exact(tiny_tokenizer_dir, tmp_path):
    g2 = build_tiny("gemma2", tiny_tokenizer_dir, tmp_path / "g2")
    with pytest.raises(ValueError, match="not linear"):
        value_vectors(g2, 0)
    g = build_tiny("gemma", tiny_tokenizer_dir, tmp_path / "g")
    # (1 + w) norm: a neuron's cached-norm score equals the exact logit-difference change
    res = neuron_attribution(g, PROMPTS, "he,she", keep_per_prompt=True, cache=collect_last(g, PROMPTS))
    tid = g.tokenizer.convert_tokens_to_ids(["Ġhe", "Ġshe"])
    l, n = 1, 7
    k = res.labels.index(f"L{l}N{n}")
    for i, prompt in enumerate(PROMPTS):
        ids = _ids(g, prompt)
        store = {}
        with torch.no_grad(), g.hooks(record_into(store, [f"L{l}.mlp.post", f"L{g.n_layers - 1}.resid_post"])):
            g.hf(ids)
        final = store[f"L{g.n_layers - 1}.resid_post"][0, -1].double()
        s = torch.sqrt(final.pow(2).mean() + g.final_norm.eps)  # the real forward's RMS ("cached")
        gain = 1.0 + g.final_norm.weight.detach().double()  # GemmaRMSNorm: output * (1 + w)
        W_U = g.unembed.weight.detach().double()
        delta = store[f"L{l}.mlp.post"][0, -1, n].double() * g.hf.model.layers[l].mlp.down_proj.weight[:, n].detach().double()
        z = lambda y: (y / s * gain) @ W_U[tid].T  # noqa: E731
        want = (z(final + delta) - z(final)) @ torch.tensor([-1.0, 1.0], dtype=torch.float64)
        assert torch.allclose(res.per_prompt[i, k].double(), want, rtol=1e-4, atol=1e-6)


def test_gradient_locators_need_a_module(tiny_llama):
    with pytest.raises(ValueError, match="needs module="):
        row_scale(tiny_llama, PROMPTS)
    located = LocateResult("module", ["L1.attn", "L2.mlp.down", "L0.attn.q"], torch.tensor([3.0, 2.0, 1.0]))
    by_result = row_scale(tiny_llama, PROMPTS, located)
    by_name = row_scale(tiny_llama, PROMPTS, "L2.mlp.down")
    assert by_result.extras.get("module") == "L2.mlp.down" or by_result.labels == by_name.labels
    assert by_result.labels == by_name.labels and torch.equal(by_result.scores, by_name.scores)


def test_gpt2_layouts_follow_the_row(tiny_tokenizer_dir, tmp_path):
    """Oracle for the table's orientation: exactly the Conv1D weights are stored [in, out]."""
    lm = build_tiny("gpt2", tiny_tokenizer_dir, tmp_path / "gpt2")
    lay = weight_layouts(lm.hf)
    for mname, mod in lm.hf.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            conv = type(mod).__name__ == "Conv1D" and pname == "weight"
            assert lay[f"{mname}.{pname}"] == ("in_out" if conv else "out_in")
    assert arch_for(lm.hf).body == "transformer" and lm.body is lm.hf.transformer


@pytest.mark.parametrize(("arch", "module"), [("phi3", "L1.mlp.gate"), ("phi3", "L2.attn.k"), ("gemma2", "L1.mlp.down")])
def test_gradients_on_fused_slices_and_softcap_equal_autograd(arch, module, tiny_tokenizer_dir, tmp_path):
    """Row cosines and per-prompt entry choices vs autograd of the HF model's own logits (Gemma-2:
    soft-capped) w.r.t. the hand-sliced weight."""
    from bias_lens.locate.gradients import neuron_scale

    lm = build_tiny(arch, tiny_tokenizer_dir, tmp_path / arch)
    lm.hf.double()
    l, kind = int(module[1:].split(".")[0]), module.split(".", 1)[1]
    hand = _hand_weights(lm, l)[kind]
    param = next(p for p in lm.hf.parameters() if p.untyped_storage().data_ptr() == hand.untyped_storage().data_ptr())
    off = (hand.data_ptr() - param.data_ptr()) // param.element_size() // param.shape[1]
    tid = lm.tokenizer.convert_tokens_to_ids(["Ġhe", "Ġshe"])

    def grad(prompts, t):
        lp = sum(torch.log_softmax(lm.hf(_ids(lm, p)).logits[0, -1], -1)[t] for p in prompts)
        return torch.autograd.grad(lp, param)[0][off : off + hand.shape[0]]

    g0, g1 = grad(PROMPTS, tid[0]), grad(PROMPTS, tid[1])
    res = row_scale(lm, PROMPTS, module, batch_size=2)
    cos = torch.nn.functional.cosine_similarity(g0, g1, dim=1)
    got = torch.tensor([res.scores[res.labels.index(f"{module}/row{r}")] for r in range(hand.shape[0])])
    assert torch.allclose(got.double(), cos, atol=1e-9)
    rows = [0, 3, 5]
    ent = neuron_scale(lm, PROMPTS, module, rows=rows, batch_size=2)
    for i, p in enumerate(PROMPTS):
        d = (grad([p], tid[0]) - grad([p], tid[1])).abs()[rows]
        assert torch.equal(ent.extras["choices"][i], d.argmax(1))
