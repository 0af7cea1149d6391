"""Closed-form equalising edit: the solvers against explicit least squares, the linearisation
against the model, the edit's behaviour on tiny models, the driver/CLI path, and (SmolLM2) the cut
on templates and professions the edit never saw."""

from __future__ import annotations

import json
import random

import pytest
import torch

from bias_lens.benchmarks import load_split
from bias_lens.edit.edits import bits
from bias_lens.edit.equalise import (EqualiseConfig, equalise_edit, input_moment, linearise, solution_entries,
                                     solve_dense, solve_entries)
from bias_lens.edit.masks import ParamMask, mask_from_labels
from bias_lens.edit.measure import dev_probs, he_she


def _state(lm):
    return {n: p.detach().clone() for n, p in lm.hf.named_parameters()}


def _same(a, b):
    return all(torch.equal(bits(a[n]), bits(b[n])) for n in a)


def _problem(n=7, d_out=5, d_in=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    k = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    t = torch.randn(n, generator=g, dtype=torch.float64)
    r = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    return u, k, t, r @ r.T + 0.5 * torch.eye(d_in, dtype=torch.float64)


def test_dense_solution_is_the_weighted_ridge_minimiser():
    u, k, t, c = _problem()
    d_out = u.shape[1]
    ridge = 0.3
    dw = solve_dense(u, k, t, torch.linalg.inv(c), ridge)
    # explicit: unknowns vec(dW) row-major, X_j = vec(u_j k_j^T), penalty lam vec^T (I_out (x) C) vec
    x = torch.stack([torch.outer(u[j], k[j]).reshape(-1) for j in range(len(t))])
    a = (u @ u.T) * (k @ torch.linalg.inv(c) @ k.T)
    lam = ridge * float(a.diagonal().mean())
    explicit = torch.linalg.solve(x.T @ x + lam * torch.kron(torch.eye(d_out, dtype=c.dtype), c), x.T @ t)
    assert torch.allclose(dw.reshape(-1), explicit, atol=1e-10)
    # and the first-order effect it predicts is X dW
    assert torch.allclose(torch.einsum("jo,oi,ji->j", u, dw, k), x @ explicit, atol=1e-10)


def test_entry_solution_is_the_diagonal_ridge_minimiser():
    u, k, t, c = _problem(seed=1)
    rows, cols = torch.tensor([0, 0, 2, 4, 3]), torch.tensor([1, 3, 0, 2, 2])
    ridge = 0.2
    delta = solve_entries(u, k, t, rows, cols, c, ridge)
    x = u[:, rows] * k[:, cols]
    dinv = 1 / c.diagonal()[cols]
    lam = ridge * float(((x * dinv) @ x.T).diagonal().mean())
    explicit = torch.linalg.solve(x.T @ x + lam * torch.diag(c.diagonal()[cols]), x.T @ t)
    assert torch.allclose(delta, explicit, atol=1e-10)
    # "block": B = C restricted to each output row's own columns (row 0 holds columns 1 and 3)
    b = torch.zeros(len(rows), len(rows), dtype=c.dtype)
    for i in range(len(rows)):
        for j in range(len(rows)):
            if rows[i] == rows[j]:
                b[i, j] = c[cols[i], cols[j]]
    assert b[0, 1] != 0 and b[0, 2] == 0
    delta = solve_entries(u, k, t, rows, cols, c, ridge, "block")
    binv = torch.linalg.inv(b)
    lam = ridge * float((x @ binv @ x.T).diagonal().mean())
    explicit = torch.linalg.solve(x.T @ x + lam * b, x.T @ t)
    assert torch.allclose(delta, explicit, atol=1e-10)
    with pytest.raises(ValueError, match="penalty must be"):
        solve_entries(u, k, t, rows, cols, c, ridge, "full")


def _last_down(lm):
    name = f"L{lm.n_layers - 1}.mlp.down"
    mask = mask_from_labels(lm.hf, [name])
    pname = mask.names[0]
    return mask, pname, lm.hf.get_submodule(pname.removesuffix(".weight"))


def test_linearisation_predicts_the_change_of_the_last_block(tiny_llama):
    lm = tiny_llama
    mask, pname, module = _last_down(lm)
    prompts = [s["prompt"] for s in load_split("genbiaseval", "train")[:6]]
    tid = torch.as_tensor(he_she(lm).first_ids)
    lin = linearise(lm, module, prompts, tid, batch_size=4)
    # hand: d and log-mass from a plain forward, one prompt at a time
    for i, p in enumerate(prompts[:3]):
        with torch.no_grad():
            lp = torch.log_softmax(lm.hf(**lm.tokenizer(p, return_tensors="pt")).logits[0, -1].double(), -1)[tid]
        assert abs(float(lp[0] - lp[1]) - float(lin.d[i])) < 1e-5
        assert abs(float(torch.logsumexp(lp, 0)) - float(lin.logm[i])) < 1e-5
    dw = 1e-3 * torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    predicted = torch.einsum("jo,oi,ji->j", lin.g, dw, lin.k)
    with torch.no_grad():
        module.weight.add_(dw.float())
    try:
        after = linearise(lm, module, prompts, tid, batch_size=4)
    finally:
        with torch.no_grad():
            module.weight.sub_(dw.float())
    actual = after.d - lin.d
    assert torch.allclose(actual, predicted, rtol=5e-2, atol=2e-5)


def test_input_moment_is_mean_outer_product_over_real_tokens(tiny_llama):
    lm = tiny_llama
    _, _, module = _last_down(lm)
    texts = ["The nurse laughed because she was happy .", "Two plus two is four ."]
    c = input_moment(lm, module, texts, batch_size=2)
    ks = []
    h = module.register_forward_hook(lambda m, a, o: ks.append(a[0][0].detach().double()))
    with torch.no_grad():
        for t in texts:  # one text per forward: no padding
            lm.hf(**lm.tokenizer(t, return_tensors="pt"))
    h.remove()
    k = torch.cat(ks)
    assert torch.allclose(c, k.T @ k / len(k), atol=1e-9)


def test_edit_equalises_train_prompts_keeps_mass_and_model(tiny):
    """Every architecture; GPT-2's c_proj has a bias, solved as one more input column of ones."""
    lm = tiny
    mask, pname, _ = _last_down(lm)
    train = load_split("genbiaseval", "train")[:12]
    before = _state(lm)
    p0 = dev_probs(lm, [s["prompt"] for s in train])
    edit = equalise_edit(lm, mask, train, retention=["The capital of France is Paris ."],
                         config=EqualiseConfig(ridge=1e-6, n_iter=3))
    assert _same(before, _state(lm))  # computing it changes nothing
    assert set(edit.indices) == set(mask.names) and sum(len(i) for i in edit.indices.values()) == mask.size
    with edit.applied(lm.hf):
        p1 = dev_probs(lm, [s["prompt"] for s in train])
        changed = {n for n, p in lm.hf.named_parameters() if not torch.equal(bits(p.detach()), bits(before[n]))}
    assert changed == set(mask.names) and pname in changed
    gap0, gap1 = (p0[:, 0].log() - p0[:, 1].log()).abs(), (p1[:, 0].log() - p1[:, 1].log()).abs()
    assert float(gap1.max()) < 0.05 * float(gap0.mean())  # equal shares on the train prompts
    assert torch.allclose(p1.sum(1).log(), p0.sum(1).log(), atol=0.02)  # mass kept ("non-zero")
    assert _same(before, _state(lm))  # undone bit-exactly


def test_entry_mask_changes_only_its_entries_and_hint_rows_hold(tiny_llama):
    lm = tiny_llama
    _, pname, module = _last_down(lm)
    w = module.weight
    flat = torch.zeros(w.numel(), dtype=torch.bool)
    flat[torch.randperm(w.numel(), generator=torch.Generator().manual_seed(1))[:300]] = True
    mask = ParamMask({pname: flat.view_as(w)})
    train, hint = load_split("genbiaseval", "train")[:8], load_split("genhinteval", "train")[:6]
    ph0 = dev_probs(lm, [s["prompt"] for s in hint])
    edit = equalise_edit(lm, mask, train, hint=hint, retention=["Two plus two is four ."],
                         config=EqualiseConfig(ridge=1e-4, n_iter=2))
    before = w.detach().clone()
    with edit.applied(lm.hf):
        diff = (w.detach() != before).reshape(-1)
        ph1 = dev_probs(lm, [s["prompt"] for s in hint])
    assert not bool(diff[~flat].any()) and int(diff.sum()) > 0
    d0, d1 = ph0[:, 0].log() - ph0[:, 1].log(), ph1[:, 0].log() - ph1[:, 1].log()
    assert torch.allclose(d1, d0, atol=0.05)  # the hinted prompts keep their log-odds


def test_solution_entries_are_the_top_shares_of_the_dense_edit_in_any_layout(tiny):
    """Oracle: the dense edit's own change, read back through the labels' mask in the stored layout
    (``[in, out]`` for GPT-2's Conv1D), scored by |dW| x rms(input) by hand; the top-k agree."""
    lm = tiny
    mask, pname, module = _last_down(lm)
    train, texts = load_split("genbiaseval", "train")[:10], ["The river runs past the old mill .", "Cats sleep ."]
    cfg = EqualiseConfig(ridge=0.1, n_iter=1)
    edit = equalise_edit(lm, mask, train, retention=texts, config=cfg)
    w = module.weight.detach()
    dw = (edit.values[pname].double() - w.reshape(-1)[edit.indices[pname]].double()).view(w.shape)
    out_in = dw.T if type(module).__name__ == "Conv1D" else dw
    rms = input_moment(lm, module, texts).diagonal().sqrt()
    hand = out_in.abs() * rms[None, :]
    k = 25
    res = solution_entries(lm, f"L{lm.n_layers - 1}.mlp.down", train, k=k, retention=texts, config=cfg,
                           share="retention")
    assert len(res.labels) == k and res.method == "equalise_entries"
    got = mask_from_labels(lm.hf, list(res.labels)).masks[pname]  # stored layout
    want = torch.zeros(hand.numel(), dtype=torch.bool)
    want[hand.reshape(-1).topk(k).indices] = True
    want = want.view(hand.shape)
    assert torch.equal(got, want.T if type(module).__name__ == "Conv1D" else want)
    assert torch.allclose(torch.tensor(res.extras["share"], dtype=torch.float64), hand.reshape(-1).topk(k).values, rtol=1e-4)
    assert res.top_labels(k) == res.labels  # the result ranks in picked order
    # the controls: the k lowest shares, and k seeded random entries of the same matrix
    low = solution_entries(lm, f"L{lm.n_layers - 1}.mlp.down", train, k=k, retention=texts, config=cfg, pick="lowest",
                           share="retention")
    want = torch.zeros(hand.numel(), dtype=torch.bool)
    want[hand.reshape(-1).topk(k, largest=False).indices] = True
    want = want.view(hand.shape)
    got = mask_from_labels(lm.hf, list(low.labels)).masks[pname]
    assert torch.equal(got, want.T if type(module).__name__ == "Conv1D" else want)
    rnd = solution_entries(lm, f"L{lm.n_layers - 1}.mlp.down", train, k=k, retention=texts, config=cfg, pick="random",
                           seed=3)
    idx = torch.randperm(hand.numel(), generator=torch.Generator().manual_seed(3))[:k]
    assert rnd.labels == [f"L{lm.n_layers - 1}.mlp.down/row{int(i) // hand.shape[1]}/col{int(i) % hand.shape[1]}" for i in idx]
    # share="train" (default): |dW| x rms over the constraint rows (gap rows, then mass rows) of u_j[r] k_j[c]
    from bias_lens.edit.measure import he_she

    lin = linearise(lm, module, [s["prompt"] for s in train], torch.as_tensor(he_she(lm).first_ids))
    u, kk = torch.cat([lin.g, lin.m]), torch.cat([lin.k, lin.k])
    size = torch.stack([torch.stack([(u[:, r] * kk[:, c]).pow(2).mean().sqrt() for c in range(kk.shape[1])])
                        for r in range(u.shape[1])])
    hand = out_in.abs() * size
    res = solution_entries(lm, f"L{lm.n_layers - 1}.mlp.down", train, k=k, retention=texts, config=cfg)
    want = torch.zeros(hand.numel(), dtype=torch.bool)
    want[hand.reshape(-1).topk(k).indices] = True
    want = want.view(hand.shape)
    got = mask_from_labels(lm.hf, list(res.labels)).masks[pname]
    assert torch.equal(got, want.T if type(module).__name__ == "Conv1D" else want)
    assert torch.allclose(torch.tensor(res.extras["share"], dtype=torch.float64), hand.reshape(-1).topk(k).values,
                          rtol=1e-6)


def test_driver_neuron_scale_edits_the_solution_entries(tiny_llama):
    """The neuron closed-form row: located entries = solution_entries of the driver's top module,
    the edit changes only those entries, and it equalises the train prompts more than nothing."""
    from bias_lens.edit.methods import Equalise
    from bias_lens.pipeline.driver import apply_plan
    from bias_lens.pipeline.plan import EditPlan, Where

    lm = tiny_llama
    before = _state(lm)
    run = apply_plan(lm, EditPlan(Equalise(ridge=0.05), Where("neuron", k=200), n_samples=16), limits={"genbiaseval": 16})
    try:
        labels = run.located.top_labels(200)
        assert run.located.method == "equalise_entries" and run.record.labels == labels[:50]
        assert len(labels) == 200 and all("mlp.down/row" in lab and "/col" in lab for lab in labels)
        module = labels[0].split("/")[0]
        assert all(lab.startswith(module + "/") for lab in labels)
        allowed = mask_from_labels(lm.hf, labels)
        for n, p in lm.hf.named_parameters():
            diff = ~torch.eq(bits(p.detach()), bits(before[n]))
            assert not bool(diff[~allowed.masks[n]].any()) if n in allowed.masks else not bool(diff.any())
        assert 0 < run.record.n_changed <= 200
    finally:
        run.handle.undo()
    assert _same(before, _state(lm))


def test_bad_input_is_refused_unchanged(tiny_llama):
    lm = tiny_llama
    before = _state(lm)
    train = load_split("genbiaseval", "train")[:4]
    with pytest.raises(ValueError, match="one weight matrix"):
        equalise_edit(lm, mask_from_labels(lm.hf, ["L1"]), train)
    with pytest.raises(ValueError, match="no training samples"):
        equalise_edit(lm, _last_down(lm)[0], [])
    for bad in ({"gamma": 0}, {"gamma": 1.5}, {"ridge": 0}, {"n_iter": 0}):
        with pytest.raises(ValueError):
            EqualiseConfig(**bad)
    assert _same(before, _state(lm))


def test_driver_and_cli_run_equalise(tiny_llama, tmp_path, capsys):
    from bias_lens.cli import main
    from bias_lens.edit.methods import Equalise, method_from_dict, method_to_dict
    from bias_lens.pipeline.driver import apply_plan
    from bias_lens.pipeline.plan import EditPlan, Where

    m = Equalise(ridge=0.05)
    assert method_from_dict(method_to_dict(m)) == m
    plan = EditPlan(m, Where("module"), n_samples=16)
    run = apply_plan(tiny_llama, plan, limits={"genbiaseval": 16})
    try:
        assert run.record.labels[0].endswith("mlp.down") and run.record.n_changed > 0
        assert run.record.metrics["afgb_renorm"] != run.record.before["afgb_renorm"]
    finally:
        run.handle.undo()
    model = tiny_llama.hf.config._name_or_path
    out = tmp_path / "out"
    rc = main(["edit", "--model", model, "--scale", "module", "--method", "equalise", "--ridge", "0.05",
               "--n-samples", "16", "--limit", "16", "--retention-limit", "8", "--out", str(out), "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert rc == 0 and payload["method"] == "equalise" and payload["n_params_edited"] > 0 and (out / "patch").is_dir()
    assert payload["plan"]["method"]["ridge"] == 0.05
    # a fine-tuning flag does not apply: one line, exit 2
    assert main(["edit", "--model", model, "--scale", "module", "--method", "equalise", "--lr", "1e-3"]) == 2
    assert "--lr apply to the fine-tuning methods" in capsys.readouterr().err
    assert main(["edit", "--model", model, "--scale", "module", "--method", "msme", "--solver", "finetune", "--ridge", "1"]) == 2


@pytest.mark.integration
def test_smollm2_cut_holds_on_held_out_templates(smol):
    """The library defaults (``--method msme``'s closed form at the located module) trained on 6 GenBiasEval
    templates x train professions, tested on the other 3 templates x test professions: the renormalised
    gap falls by at least a quarter and the pronoun mass stays (docs/equalise.md)."""
    lm = smol
    train = random.Random(0).sample(load_split("genbiaseval-heldout", "train"), 342)
    hint = random.Random(0).sample(load_split("genhinteval", "train"), 171)
    test = [s["prompt"] for s in load_split("genbiaseval-heldout", "test")]
    assert not {s["template"] for s in train} & {s["template"] for s in load_split("genbiaseval-heldout", "test")}
    from bias_lens.benchmarks.metrics import afgb_t, mass_t

    p0 = dev_probs(lm, test)
    edit = equalise_edit(lm, mask_from_labels(lm.hf, ["L29.mlp.down"]), train, hint=hint)
    with edit.applied(lm.hf):
        p1 = dev_probs(lm, test)
    r0, r1 = float(afgb_t(p0, renorm=True)), float(afgb_t(p1, renorm=True))
    assert r1 < 0.75 * r0, (r0, r1)
    assert float(mass_t(p1)) >= 0.9 * float(mass_t(p0))


def test_main_job_neuron_closed_form_uses_the_located_module(tiny_llama, tmp_path, monkeypatch):
    """``run_row`` locates the closed-form entries in the locate stage's module (no second module scan)."""
    from bias_lens.edit.methods import Equalise
    from bias_lens.locate.result import LocateResult
    from bias_lens.pipeline import driver
    from bias_lens.pipeline.cache import StageCache
    from bias_lens.pipeline.config import RunConfig
    from bias_lens.pipeline.edit_stage import run_row
    from bias_lens.pipeline.plan import EditPlan, Where

    def no_scan(*a, **k):
        raise AssertionError("the module scan ran again")

    monkeypatch.setattr(driver, "_top_module", no_scan)
    lm = tiny_llama
    before = _state(lm)
    cfg = RunConfig.quick_preset(model=lm.hf.config._name_or_path, n_train=8, row_limits={"genbiaseval": 8})
    results = {"module_edit": LocateResult("module", ["L1.mlp.down", "L2.mlp.down"], torch.tensor([2.0, 1.0]))}
    rec = run_row(lm, cfg, EditPlan(Equalise(ridge=0.05), Where("neuron", k=64), name="neuron (closed form)"), results,
                  StageCache(tmp_path / "cache", "k"))
    assert rec["labels"] and all(lab.startswith("L1.mlp.down/row") for lab in rec["labels"])
    assert 0 < rec["n_changed"] <= 64
    assert _same(before, _state(lm))
