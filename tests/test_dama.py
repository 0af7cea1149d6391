"""DAMA projection edit: linear algebra against hand computation, model behaviour against hooks,
undo / export / patch round trips on the tiny models."""

from __future__ import annotations

import pytest
import torch

from bias_lens.arch import param_ref
from bias_lens.benchmarks import load_split
from bias_lens.edit.dama import (DamaConfig, collect_last, dama_edit, default_layers, nullspace_projection,
                                 optimise_deltas, pls_weights, _subject)
from bias_lens.edit.edits import bits

ND, NL = 3, 2
CFG = DamaConfig(null_dim=ND, n_layers=NL, skip_top=0, steps=3)


@pytest.fixture(scope="module")
def train():
    return load_split("dama", "train")[:24]


def _state(lm):
    return {n: p.detach().clone() for n, p in lm.hf.named_parameters()}


def _same(a, b):
    return all(torch.equal(bits(a[n]), bits(b[n])) for n in a)


# ----------------------------------------------------------------------------- pure linear algebra
def test_pls_weights_match_hand_svd_and_deflation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 7, generator=g, dtype=torch.float64), torch.randn(40, 5, generator=g, dtype=torch.float64)
    x = x + 3.0  # centring must happen inside
    w = pls_weights(x, y, 3)
    xc, yc = x - x.mean(0), y - y.mean(0)
    w1 = torch.linalg.svd(xc.T @ yc)[0][:, 0]
    assert torch.allclose(w[:, 0].abs(), w1.abs(), atol=1e-10)
    t = xc @ w[:, 0]
    x2 = xc - torch.outer(t, t @ xc) / (t @ t)
    y2 = yc - torch.outer(t, t @ yc) / (t @ t)
    assert torch.allclose(w[:, 1].abs(), torch.linalg.svd(x2.T @ y2)[0][:, 0].abs(), atol=1e-10)
    assert torch.allclose(w.T @ w, torch.eye(3, dtype=torch.float64), atol=1e-10)  # PLS-W2A weights orthonormal
    # fewer samples than features: the n x n route gives the same first weight; stops at rank n - 1
    xs, ys = torch.randn(6, 20, generator=g, dtype=torch.float64), torch.randn(6, 20, generator=g, dtype=torch.float64)
    ws = pls_weights(xs, ys, 10)
    assert ws.shape == (20, 5)
    xsc, ysc = xs - xs.mean(0), ys - ys.mean(0)
    assert torch.allclose(ws[:, 0].abs(), torch.linalg.svd(xsc.T @ ysc)[0][:, 0].abs(), atol=1e-10)


def test_nullspace_projection_is_symmetric_idempotent_complement():
    g = torch.Generator().manual_seed(1)
    b = torch.randn(9, 3, generator=g, dtype=torch.float64)
    m = nullspace_projection(b)
    assert torch.allclose(m, m.T, atol=1e-12) and torch.allclose(m @ m, m, atol=1e-12)
    assert int(torch.linalg.matrix_rank(m)) == 6
    assert torch.allclose(m @ b, torch.zeros_like(b), atol=1e-12)  # removes span(b)
    z = torch.randn(9, generator=g, dtype=torch.float64)
    keep = z - b @ torch.linalg.solve(b.T @ b, b.T @ z)  # hand: component orthogonal to span(b)
    assert torch.allclose(m @ keep, keep, atol=1e-12) and torch.allclose(m @ z, keep, atol=1e-12)


def test_config_validation_and_default_layers():
    assert default_layers(32, 9) == tuple(range(21, 30))  # the reference's LLaMA-7B layers
    assert default_layers(30, 8) == tuple(range(20, 28))
    with pytest.raises(ValueError, match="lower n_layers"):
        default_layers(3, 3, 2)
    for kw, msg in [({"null_dim": 0}, "null_dim"), ({"n_layers": 0}, "n_layers"), ({"update": "x"}, "update"),
                    ({"pairing": "x"}, "pairing"), ({"layers": (1, 1)}, "distinct"), ({"layers": (1,)}, "n_layers")]:
        with pytest.raises(ValueError, match=msg):
            DamaConfig(**{"null_dim": 2, "n_layers": 2, **kw})


def test_bad_input_changes_nothing(tiny_llama, train):
    before = _state(tiny_llama)
    with pytest.raises(ValueError, match="d_model"):
        dama_edit(tiny_llama, train, DamaConfig(null_dim=tiny_llama.d_model, n_layers=1, skip_top=0))
    with pytest.raises(ValueError, match="out of range"):
        dama_edit(tiny_llama, train, DamaConfig(null_dim=2, n_layers=1, layers=(7,)))
    with pytest.raises(ValueError, match="train_samples"):
        dama_edit(tiny_llama, train[:1], CFG)
    assert _same(before, _state(tiny_llama))


# ----------------------------------------------------------------------------- the edit on tiny models
def test_edit_is_projection_folded_into_down_weight(tiny, train):
    before = _state(tiny)
    edit = dama_edit(tiny, train, CFG)
    assert _same(before, _state(tiny))  # computing the edit leaves the model as it was
    layers = default_layers(tiny.n_layers, NL, 0)
    assert edit.meta["layers"] == list(layers)
    refs = [param_ref(tiny.hf, f"L{layer}.mlp.down") for layer in layers]
    names = {r.weight_name for r in refs} | {r.bias_name for r in refs if r.bias_name}
    assert set(edit.indices) == names  # only the edited layers' down-projections
    old = {layer: (r.weight_view(tiny.hf).detach().clone(), r.bias_view(tiny.hf)) for layer, r in zip(layers, refs)}
    old = {k: (w, None if b is None else b.detach().clone()) for k, (w, b) in old.items()}
    h = edit.apply_(tiny.hf)
    try:
        for layer, r in zip(layers, refs):
            m = edit.projections[layer]
            assert torch.allclose(m, m.T, atol=1e-12) and torch.allclose(m @ m, m, atol=1e-10)
            assert int(torch.linalg.matrix_rank(m)) == tiny.d_model - ND
            w, b = old[layer]
            assert torch.equal(r.weight_view(tiny.hf), (m @ w.double()).to(w.dtype))  # W <- P W, exact
            if b is not None:
                assert torch.equal(r.bias_view(tiny.hf), (m @ b.double()).to(b.dtype))
    finally:
        h.undo()
    assert _same(before, _state(tiny))  # undo bit-exact


def test_mlp_output_has_no_component_on_removed_directions(tiny, train):
    edit = dama_edit(tiny, train, CFG)
    layers = edit.meta["layers"]
    store: dict[int, torch.Tensor] = {}

    def rec(t, *, hook):
        store[hook.layer] = t.detach().double()

    prompts = ["The nurse said that", "The engineer went home because he"]
    ids = tiny.tokenizer(prompts[1], return_tensors="pt")
    with edit.applied(tiny.hf), tiny.hooks([(f"L{layer}.mlp.out", rec) for layer in layers]):
        tiny.hf(**ids)
    for layer in layers:
        removed = torch.eye(tiny.d_model, dtype=torch.float64) - edit.projections[layer]
        out = store[layer][0]
        assert (out @ removed).norm() <= 1e-5 * out.norm()
    # and before the edit it did have such a component (the test is not vacuous)
    with tiny.hooks([(f"L{layers[0]}.mlp.out", rec)]):
        tiny.hf(**ids)
    removed = torch.eye(tiny.d_model, dtype=torch.float64) - edit.projections[layers[0]]
    assert (store[layers[0]][0] @ removed).norm() > 1e-3 * store[layers[0]][0].norm()
    # the same numbers from the record helper (last token)
    with edit.applied(tiny.hf):
        last = collect_last(tiny, prompts, f"L{layers[-1]}.mlp.out")
    assert last.shape == (2, tiny.d_model)
    removed = torch.eye(tiny.d_model, dtype=torch.float64) - edit.projections[layers[-1]]
    assert (last @ removed).norm() <= 1e-5 * last.norm()


def test_iterative_layer_sees_earlier_edit(tiny_llama, train):
    """Layer l's projection is computed with layer l-1 already projected: recompute it by hand."""
    edit = dama_edit(tiny_llama, train, CFG)
    l0, l1 = edit.meta["layers"]
    single = dama_edit(tiny_llama, train, DamaConfig(null_dim=ND, n_layers=1, layers=(l1,), steps=3))
    from bias_lens.edit.dama import layer_edit

    with layer_edit(tiny_llama, l0, edit.projections[l0]).applied(tiny_llama.hf):
        again = dama_edit(tiny_llama, train, DamaConfig(null_dim=ND, n_layers=1, layers=(l1,), steps=3))
    assert torch.allclose(again.projections[l1], edit.projections[l1], atol=1e-6)
    assert not torch.allclose(single.projections[l1], edit.projections[l1], atol=1e-6)


def test_deltas_push_towards_their_pronoun(tiny_llama, train):
    from bias_lens.scoring import target_logprobs
    from bias_lens.targets import resolve_targets

    lm, pts = tiny_llama, train[:6]
    prompts = [s["prompt"] for s in pts]
    cfg = DamaConfig(null_dim=2, n_layers=1, steps=10, kl_factor=0.0, weight_decay=0.0)
    d = optimise_deltas(lm, prompts, [_subject(s) for s in pts], "L1.mlp.out", cfg)
    tg = resolve_targets(lm.tokenizer, ["he", "she"])
    gap = []
    for g in range(2):
        for i, p in enumerate(prompts):
            ids = lm.tokenizer(p, return_tensors="pt")["input_ids"]
            n = ids.shape[1]

            def add(t, *, hook, _v=d[i, g]):
                t = t.clone()
                t[0, n - 1] += _v.to(t.dtype)
                return t

            with lm.hooks([("L1.mlp.out", add)]):
                lp = target_logprobs(lm, [p], tg)[0]
            gap.append(float(lp[0] - lp[1]))
    he, she = torch.tensor(gap[:6]), torch.tensor(gap[6:])
    assert bool((he > she).all())


@pytest.mark.parametrize("kw", [{"update": "mixed"}, {"pairing": "stack"}, {"project_bias": False}])
def test_variants_are_projections(tiny_llama, train, kw):
    edit = dama_edit(tiny_llama, train, DamaConfig(null_dim=ND, n_layers=NL, skip_top=0, steps=2, **kw))
    for m in edit.projections.values():
        assert torch.allclose(m @ m, m, atol=1e-10) and int(torch.linalg.matrix_rank(m)) == tiny_llama.d_model - ND
    assert edit.meta["variant"] == DamaConfig(null_dim=ND, n_layers=NL, **kw).variant


def test_export_and_patch_roundtrip(tiny, train, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from bias_lens.edit.export import export_checkpoint
    from bias_lens.edit.patch import apply_patch, save_patch

    edit = dama_edit(tiny, train, CFG)
    base_dir = tiny.hf.config._name_or_path
    h = edit.apply_(tiny.hf)
    try:
        edited = _state(tiny)
        out = export_checkpoint(tiny, tmp_path / "exp", method="dama", hyperparams=edit.meta["config"])
        save_patch(edit, tmp_path / "patch", originals=h.originals, base_name=tiny.name)
        ids = tiny.tokenizer("The nurse said that", return_tensors="pt")
        with torch.no_grad():
            ref_logits = tiny.hf(**ids).logits
    finally:
        h.undo()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**ids).logits, ref_logits)
    for n, p in reloaded.named_parameters():
        assert torch.equal(bits(p.detach()), bits(edited[n])), n
    patched = apply_patch(base_dir, tmp_path / "patch", tmp_path / "patched")
    new: dict[str, torch.Tensor] = {}
    for f in patched.glob("*.safetensors"):
        new.update(load_file(str(f)))
    exported: dict[str, torch.Tensor] = {}
    for f in out.glob("*.safetensors"):
        exported.update(load_file(str(f)))
    assert set(new) == set(exported) and all(torch.equal(bits(new[k]), bits(exported[k])) for k in new)


def test_mixed_deltas_reuse_equals_recompute(tiny_llama, train):
    cfg = DamaConfig(null_dim=ND, n_layers=NL, skip_top=0, steps=2, update="mixed")
    first = dama_edit(tiny_llama, train, cfg)
    again = dama_edit(tiny_llama, train, cfg, deltas=first.deltas)
    other = dama_edit(tiny_llama, train, DamaConfig(null_dim=ND + 1, n_layers=1, skip_top=0, steps=2, update="mixed"),
                      deltas=first.deltas)
    for layer, m in first.projections.items():
        assert torch.equal(m, again.projections[layer])
    assert int(torch.linalg.matrix_rank(other.projections[2])) == tiny_llama.d_model - ND - 1
    with pytest.raises(ValueError, match="update='mixed'"):
        dama_edit(tiny_llama, train, CFG, deltas=first.deltas)
    with pytest.raises(ValueError, match="same train samples"):
        dama_edit(tiny_llama, train[:10], cfg, deltas=first.deltas)
