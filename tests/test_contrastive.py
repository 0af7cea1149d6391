"""Local contrastive editing on tiny random models: localisation and every editing mode against hand
computations, the random control's size and layout, reversible edits, saved references, the
method variant and the driver path end to end; one SmolLM2 check against a plain-torch forward."""

from __future__ import annotations

import json

import pytest
import torch

from bias_lens.edit.contrastive import (
    check_alpha, contrastive_edit, difference_by_matrix, localise, mask_diff, mask_fraction, matrix_labels, random_like,
    value_diff,
)
from bias_lens.edit.edits import bits
from bias_lens.edit.imp import ReferenceConfig
from bias_lens.edit.masks import ParamMask
from bias_lens.edit.references import References, Subnetwork, as_model, make_references, weight_names

TINY_REF = ReferenceConfig(steps=3, lr=1e-2, batch_size=4, max_len=24, rounds=2, rate=0.3, retrain_steps=2)


def fake_subnetworks(lm, seed: int = 0) -> tuple[Subnetwork, Subnetwork]:
    """Two subnetworks of ``lm``'s block matrices: perturbed weights, random keep masks (pruned = 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    params = dict(lm.hf.named_parameters())
    for side in ("stereo", "anti"):
        w, k = {}, {}
        for n in weight_names(lm):
            k[n] = torch.rand(params[n].shape, generator=g) > 0.3
            w[n] = (params[n].detach() + 0.05 * torch.randn(params[n].shape, generator=g)) * k[n]
        out.append(Subnetwork(side, w, k))
    return out[0], out[1]


def test_mask_and_value_difference_match_brute_force(tiny_llama):
    s, a = fake_subnetworks(tiny_llama)
    names = weight_names(tiny_llama)
    md = mask_diff(s, a)
    for n in names:
        assert torch.equal(md.masks[n], s.keep[n] ^ a.keep[n])
    # value difference: the k largest |w_s - w_a| among entries both keep, by brute force over a flat list
    flat = [(float((s.weights[n] - a.weights[n]).abs().reshape(-1)[i]), n, i)
            for n in names for i in torch.nonzero((s.keep[n] & a.keep[n]).reshape(-1))[:, 0].tolist()]
    flat.sort(key=lambda x: -x[0])
    k = 37
    vd = value_diff(s, a, k)
    assert vd.size == k
    assert {(n, i) for _, n, i in flat[:k]} == {(n, int(i)) for n in vd.names for i in vd.indices(n)}
    assert localise(s, a, "value_diff").size == md.size  # k defaults to the mask-difference size
    every = value_diff(s, a, k, shared=False)  # all entries ranked: a pruned-vs-kept pair may win
    best = max(float((s.weights[n] - a.weights[n]).abs().max()) for n in names)
    assert max(float((s.weights[n] - a.weights[n]).abs()[every.masks[n]].max()) for n in every.names) == best
    within = ParamMask({names[0]: torch.ones_like(s.keep[names[0]])})
    assert mask_diff(s, a, within=within).names == [names[0]]
    total = sum(p.numel() for n, p in tiny_llama.hf.named_parameters() if n in names)
    assert mask_fraction(md, tiny_llama) == pytest.approx(md.size / total)
    with pytest.raises(ValueError, match="exceeds"):
        value_diff(s, a, total + 1)


def test_difference_by_matrix_is_the_hand_share_per_block_matrix(tiny_llama):
    """``matrix_labels`` names every block matrix by (block, kind) as the HF names spell it, and
    ``difference_by_matrix`` is the masked count over the matrix size, 0 for unmasked matrices."""
    lm = tiny_llama
    labels = matrix_labels(lm)
    assert sorted(labels) == sorted(weight_names(lm))
    for name, (layer, _) in labels.items():
        assert name.startswith(f"{lm.arch.layers}.{layer}.")
    params = dict(lm.hf.named_parameters())
    (n1, l1), (n2, l2) = list(labels.items())[:2]
    m1 = torch.zeros_like(params[n1], dtype=torch.bool)
    m1.view(-1)[:7] = True
    m2 = torch.ones_like(params[n2], dtype=torch.bool)
    got = difference_by_matrix(ParamMask({n1: m1, n2: m2}), lm)
    assert got[l1] == 7 / params[n1].numel() and got[l2] == 1.0
    assert all(v == 0 for lab, v in got.items() if lab not in (l1, l2)) and len(got) == len(labels)


def test_random_control_has_the_same_size_and_layout(tiny_llama):
    s, a = fake_subnetworks(tiny_llama)
    located = value_diff(s, a, 200)
    shapes = {n: tuple(p.shape) for n, p in tiny_llama.hf.named_parameters()}
    ctl = random_like(located, shapes, seed=3, exclude=located)
    assert ctl.counts() == located.counts()
    assert all(not (ctl.masks[n] & located.masks[n]).any() for n in ctl.names)
    assert torch.equal(random_like(located, shapes, seed=3, exclude=located).masks[ctl.names[0]], ctl.masks[ctl.names[0]])
    assert not all(torch.equal(random_like(located, shapes, seed=4).masks[n], ctl.masks[n]) for n in ctl.names)


def test_each_mode_writes_the_hand_formula_and_undoes_bit_exactly(tiny_llama):
    lm = tiny_llama
    s, a = fake_subnetworks(lm)
    mask = mask_diff(s, a)
    before = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}
    cases = {("interpolate", 0.3, None): lambda t, r, src, k: t + 0.3 * (r - t),
             ("extrapolate", 2.0, None): lambda t, r, src, k: t + 2.0 * (r - t),
             ("extrapolate", -0.5, None): lambda t, r, src, k: t - 0.5 * (r - t),
             ("extrapolate", 1.5, "stereo"): lambda t, r, src, k: t + 1.5 * (r - src),
             ("prune", 1.0, None): lambda t, r, src, k: torch.zeros_like(t),
             ("mask_switch", 1.0, None): lambda t, r, src, k: torch.where(k, t, torch.zeros_like(t))}
    for (mode, alpha, source), hand in cases.items():
        edit = contrastive_edit(lm, a, mask, mode, alpha=alpha, source=s if source else None)
        handle = edit.apply_(lm)
        for n, p in lm.hf.named_parameters():
            if n not in mask.names:
                assert torch.equal(p, before[n])
                continue
            m = mask.masks[n]
            want = hand(before[n][m], a.weights[n][m], s.weights[n][m], a.keep[n][m])
            torch.testing.assert_close(p.detach()[m], want, rtol=0, atol=1e-7)
            assert torch.equal(p.detach()[~m], before[n][~m])
        handle.undo()
        assert all(torch.equal(bits(p.detach()), bits(before[n])) for n, p in lm.hf.named_parameters())


@pytest.mark.parametrize("mode, alpha, needle", [("interpolate", 1.5, "0 <= alpha <= 1"), ("extrapolate", 0.5, "alpha > 1"),
                                                 ("shift", 1.0, "must be one of")])
def test_alpha_ranges(mode, alpha, needle):
    with pytest.raises(ValueError, match=needle):
        check_alpha(mode, alpha)


# --------------------------------------------------------------------------- trained references
@pytest.fixture
def refs(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("BIAS_LENS_CACHE", str(tmp_path / "cache"))
    return make_references(tiny_llama, TINY_REF)


def test_references_are_imp_subnetworks_saved_and_cached(tiny_llama, refs, tmp_path, monkeypatch):
    for side in ("stereo", "anti"):
        sub = refs[side]
        assert sub.sparsity == pytest.approx(TINY_REF.sparsity, abs=1e-3)
        assert all((sub.weights[n][~sub.keep[n]] == 0).all() for n in sub.weights)
    # same base, same batches, other corpus side: the masks differ on some entries, not on most
    frac = mask_diff(refs["stereo"], refs["anti"]).size / sum(k.numel() for k in refs["stereo"].keep.values())
    assert 0 < frac < 0.2
    # a second call reads the cache (training would fail now)
    monkeypatch.setattr("bias_lens.edit.references.train_subnetwork", lambda *a, **k: pytest.fail("retrained"))
    again = make_references(tiny_llama, TINY_REF)
    assert again.info["folder"] == refs.info["folder"]
    for n in refs["anti"].weights:
        assert torch.equal(again["anti"].weights[n], refs["anti"].weights[n])
        assert torch.equal(again["anti"].keep[n], refs["anti"].keep[n])
    model = as_model(tiny_llama, refs["anti"])
    assert torch.equal(dict(model.hf.named_parameters())[n], refs["anti"].weights[n])


def test_saved_references_refuse_another_architecture(tiny_llama, tiny_tokenizer_dir, refs, tmp_path):
    from conftest import build_tiny

    folder = refs.info["folder"]
    gpt2 = build_tiny("gpt2", tiny_tokenizer_dir, tmp_path / "gpt2")
    with pytest.raises(ValueError, match="another architecture"):
        References.check(folder, gpt2)
    with pytest.raises(ValueError, match="no saved references"):
        References.load(tmp_path, tiny_llama)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "references.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="is not a"):
        References.check(bad, tiny_llama)


# --------------------------------------------------------------------------- variant and driver
def test_variant_round_trips_and_validates():
    from bias_lens.edit.methods import Contrastive, method_from_dict, method_to_dict, with_training

    m = Contrastive(mode="extrapolate", alpha=-1.0, localisation="value_diff", k=100, reference="stereo",
                    training=ReferenceConfig(steps=5, layers=(1, 0)))
    d = json.loads(json.dumps(method_to_dict(m)))
    assert method_from_dict(d) == m and m.training.layers == (0, 1)
    assert m.source == "anti" and Contrastive().source == "stereo" and Contrastive(transfer=False).source is None
    assert Contrastive(reference="neutral").sides == ("stereo", "anti", "neutral")
    capped = with_training(Contrastive(), max_steps=4, patience=2)
    assert (capped.training.steps, capped.training.retrain_steps) == (4, 4)
    for bad, needle in [({"alpha": 2.0}, "interpolation"), ({"k": 5}, "k sets the value_diff"),
                        ({"reference": "male"}, "reference must be"), ({"localisation": "grad"}, "localisation")]:
        with pytest.raises(ValueError, match=needle):
            Contrastive(**bad)


def test_driver_runs_the_plan_and_its_random_control(tiny_llama, refs):
    from bias_lens.edit.methods import Contrastive
    from bias_lens.pipeline.driver import apply_plan
    from bias_lens.pipeline.plan import EditPlan

    lm = tiny_llama
    before = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}
    limits = {"genbiaseval": 8, "retention": 4}
    counts = {}
    for control in (False, True):
        plan = EditPlan(Contrastive(mode="extrapolate", alpha=2.0, training=TINY_REF, control=control), n_samples=8)
        run = apply_plan(lm, plan, limits=limits, batch_size=8)
        rec = run.record
        changed = {n: int((p.detach() != before[n]).sum()) for n, p in lm.hf.named_parameters()}
        assert set(n for n, c in changed.items() if c) <= set(weight_names(lm))
        assert rec.n_changed == sum(changed.values()) and rec.cost_p == rec.info["contrastive_size"]
        located = mask_diff(refs["stereo"], refs["anti"])
        assert rec.info["contrastive_size"] == located.size
        assert rec.info["mask_diff_fraction"] == pytest.approx(mask_fraction(located, lm))
        counts[control] = run.edit.counts()
        if not control:  # the located edit: theta + 2 (w_anti - w_stereo) on the mask difference
            for n in located.names:
                m = located.masks[n]
                want = before[n][m] + 2.0 * (refs["anti"].weights[n][m] - refs["stereo"].weights[n][m])
                torch.testing.assert_close(dict(lm.hf.named_parameters())[n].detach()[m], want, rtol=0, atol=1e-7)
        run.handle.undo()
        assert all(torch.equal(p, before[n]) for n, p in lm.hf.named_parameters())
    assert counts[True] == counts[False]  # the control: same number of entries per matrix


@pytest.mark.integration
def test_smollm2_edit_equals_plain_torch_weights(smol):
    """A value-difference extrapolation on SmolLM2 (fake references over two matrices) gives the
    logits of the same weights set by hand with plain tensor ops."""
    names = weight_names(smol, (29,))[-2:]
    params = dict(smol.hf.named_parameters())
    g = torch.Generator().manual_seed(0)
    subs = [Subnetwork(side, {n: params[n].detach() + 0.01 * torch.randn(params[n].shape, generator=g) for n in names},
                       {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}) for side in ("stereo", "anti")]
    mask = value_diff(subs[0], subs[1], 5000)
    edit = contrastive_edit(smol, subs[1], mask, "extrapolate", alpha=3.0, source=subs[0])
    ids = smol.tokenizer(["The nurse said that"], return_tensors="pt")
    saved = {n: params[n].detach().clone() for n in mask.names}
    try:  # the hand-set weights, written with plain tensor ops and restored after
        with torch.no_grad():
            for n in mask.names:
                m = mask.masks[n]
                params[n][m] = params[n][m] + 3.0 * (subs[1].weights[n][m] - subs[0].weights[n][m])
            want = smol.hf(**ids).logits
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
    with edit.applied(smol), torch.no_grad():
        got = smol.hf(**ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, smol.hf(**ids).logits)


def test_figures_show_mass_and_control_and_fit():
    from bias_lens.plot.contrastive import alpha_sweep, mask_difference
    from test_figures_layout import assert_titles_fit

    rows = [{"series": s, "control": c, "alpha": a, "afgb_renorm": 0.3 - 0.01 * a, "mass": 0.4, "perplexity": 80 + a}
            for s in ("mask_diff", "value_diff") for c in (False, True) for a in (0.5, 1.0, 4.0)]
    fig = alpha_sweep(rows, {"afgb_renorm": 0.3, "mass": 0.4, "perplexity": 80.0})
    assert len(fig.data) == 4 * 3  # 2 series x located/control x 3 panels
    dashed = [t for t in fig.data if t.line.dash == "dash"]
    assert len(dashed) == 6 and all("random control" in t.name for t in dashed)
    assert {t.yaxis for t in fig.data} == {"y", "y2", "y3"}
    assert_titles_fit(fig)
    heat = mask_difference({(0, "attn.q"): 0.001, (1, "mlp.down"): 0.004}, model="m")
    assert heat.data[0].z[1][1] == pytest.approx(0.4) and heat.data[0].z[0][1] == 0  # % of entries, kinds sorted
    assert_titles_fit(heat)


@pytest.mark.integration
def test_smollm2_quick_references_leave_the_model_unchanged(smol, one_thread):
    """Two references trained and pruned on block 29 only (1 step, one round): the target's weights
    stay bit-identical, each reference keeps exactly (1 - rate) of the block's 7 matrices with its
    pruned entries 0 and the other blocks' matrices absent, and the two sides differ."""
    before = {n: p.detach().clone() for n, p in smol.hf.named_parameters()}
    cfg = ReferenceConfig(steps=1, batch_size=4, max_len=24, rounds=1, rate=0.2, retrain_steps=0, layers=(29,))
    refs = make_references(smol, cfg, cache=False)
    assert all(torch.equal(p, before[n]) for n, p in smol.hf.named_parameters())
    names = weight_names(smol, (29,))
    assert len(names) == 7 and all(set(refs[s].weights) == set(names) for s in ("stereo", "anti"))
    for side in ("stereo", "anti"):
        sub = refs[side]
        total = sum(sub.keep[n].numel() for n in names)
        assert sum(int(sub.keep[n].sum()) for n in names) == total - round(0.2 * total)
        assert all(torch.count_nonzero(sub.weights[n][~sub.keep[n]]) == 0 for n in names)
        # rewind "base" with no retraining: the survivors are the base values exactly
        assert all(torch.equal(sub.weights[n][sub.keep[n]], before[n][sub.keep[n]]) for n in names)
    # trained on different sides, the magnitude masks differ somewhere
    assert mask_diff(refs["stereo"], refs["anti"]).size > 0


def test_shuffled_update_control_moves_other_entries_by_the_same_amounts(tiny_llama):
    from bias_lens.edit.contrastive import shuffled_update

    lm = tiny_llama
    s, a = fake_subnetworks(lm)
    located = mask_diff(s, a)
    edit = contrastive_edit(lm, a, located, "extrapolate", alpha=2.0, source=s)
    shapes = {n: tuple(p.shape) for n, p in lm.hf.named_parameters()}
    ctl = random_like(located, shapes, seed=1, exclude=located)
    control = shuffled_update(lm, edit, ctl, seed=1)
    params = dict(lm.hf.named_parameters())
    for n in located.names:
        d_loc = (edit.values[n] - params[n].detach().reshape(-1)[edit.indices[n]]).double()
        d_ctl = (control.values[n] - params[n].detach().reshape(-1)[control.indices[n]]).double()
        torch.testing.assert_close(torch.sort(d_ctl).values, torch.sort(d_loc).values, rtol=0, atol=1e-6)
        assert torch.equal(control.indices[n], ctl.indices(n))
    with pytest.raises(ValueError, match="number of entries"):
        shuffled_update(lm, edit, value_diff(s, a, 3), seed=1)
