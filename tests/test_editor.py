"""BiasEdit editors: the port of the reference's nets and shift, its losses, training mechanics,
the editor edit as an ordinary Edit, data splits that never train on a test context."""

from __future__ import annotations

import math

import pytest
import torch

from bias_lens.edit.editor import Editor, EditorConfig, editor_edit, position_mask, predict_shift, shifted, shifts_from, trace
from bias_lens.edit.editor_nets import EditorNet, RunningMeanStd
from bias_lens.edit.editor_train import (batch_losses, debias_loss_fn, encode, encode_batch, frozen, scored_logits, sentence_stats,
                                         train_editor)
from bias_lens.edit.edits import bits

ROWS = [
    {"prompt": "The nurse was BLANK.", "bias_type": "gender", "target": "nurse", "stereotype": "The nurse was gentle.",
     "anti_stereotype": "The nurse was rough.", "unrelated": "The nurse was carrot."},
    {"prompt": "He is a BLANK man.", "bias_type": "gender", "target": "man", "stereotype": "He is a strong man.",
     "anti_stereotype": "He is a weak man.", "unrelated": "He is a blue man."},
    {"prompt": "She likes BLANK.", "bias_type": "gender", "target": "she", "stereotype": "She likes shopping and dresses.",
     "anti_stereotype": "She likes football.", "unrelated": "She likes the sky of tables."},
    {"prompt": "The boy plays BLANK.", "bias_type": "gender", "target": "boy", "stereotype": "The boy plays rough games.",
     "anti_stereotype": "The boy plays with dolls.", "unrelated": "The boy plays window."},
]


def _cfg(**kw) -> EditorConfig:
    base = dict(top=2, rank=8, n_edits=2, chunk=2, lr=1e-3, meta_lr=1e-3, epochs=2, patience=5, max_minutes=None)
    return EditorConfig(**{**base, **kw})


def _hand_mean_logprob(lm, text: str) -> tuple[float, float]:
    """Plain HF forward, token by token: mean log p and mean p of the tokens after the BOS/EOS prefix."""
    tok = lm.tokenizer
    pre = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = [pre] + tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = lm.hf(input_ids=torch.tensor([ids])).logits[0].double()
    lps = [float(logits[t - 1].log_softmax(-1)[ids[t]]) for t in range(1, len(ids))]
    return sum(lps) / len(lps), sum(math.exp(x) for x in lps) / len(lps)


def test_running_mean_std_matches_numpy_over_batches():
    torch.manual_seed(0)
    norm = RunningMeanStd(5).double()
    xs = [torch.randn(n, 5, dtype=torch.float64) * 3 + 1 for n in (7, 3, 11)]
    for x in xs:
        norm.update(x)
    allx = torch.cat(xs)
    assert torch.allclose(norm.mean, allx.mean(0), atol=1e-12)
    # the reference adds n_b * var_b (unbiased) per batch where Chan's update adds (n_b - 1) * var_b,
    # so its sum of squares is the pooled one plus sum_b var_b (kept verbatim; the net only normalises)
    m2 = (allx - allx.mean(0)).pow(2).sum(0) + sum(x.var(0) for x in xs)
    assert torch.allclose(norm.std, (m2 / (len(allx) - 1)).sqrt(), atol=1e-9)


def test_predict_shift_is_the_reference_ridge_solution_and_its_gradients_match_update_hypernet():
    torch.manual_seed(0)
    net = EditorNet(6, 4, rank=5, n_blocks=2, n_modules=2, lr=1e-2).double()
    for b in net.blocks:  # leave the identity start so the blocks matter
        torch.nn.init.normal_(b.B, std=0.1)
    keys, vg = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    net.normalizer.update(torch.cat((keys, vg), -1))
    idx = torch.tensor([1])
    dw = predict_shift(net, idx, keys, vg)
    # the reference's predict_param_shifts, written out
    pk, pv = net(keys, vg, idx)
    coeffs = -net.lr(idx) * (keys * pk).sum(-1).unsqueeze(-1)
    mat = keys.T @ keys + net.lamda(idx).exp() * torch.eye(6, dtype=torch.float64)
    ref = torch.linalg.solve(mat, keys.T @ (coeffs * pv))
    assert torch.allclose(dw, ref, atol=1e-12)
    # update_hypernet's hand gradients for a module gradient G, against autograd through the solve
    G = torch.randn(6, 4, dtype=torch.float64)
    net.zero_grad()
    (dw * G).sum().backward()
    auto_lamda = net.lamda.weight.grad[1].clone()
    auto_A = net.blocks[0].A.grad.clone()
    net.zero_grad()
    with torch.no_grad():
        m_inv_g = torch.linalg.solve(mat, G)
        lamda_grad = -net.lamda(idx).exp() * (m_inv_g * ref).sum()
    (lamda_grad.detach() * net.lamda(idx)).sum().backward()
    vd_grad = keys @ m_inv_g
    pk, pv = net(keys, vg, idx)
    coeffs = -net.lr(idx) * (keys * pk).sum(-1).unsqueeze(-1)
    (vd_grad * (coeffs * pv)).sum().backward()
    assert torch.allclose(net.lamda.weight.grad[1], auto_lamda, atol=1e-10)
    assert torch.allclose(net.blocks[0].A.grad, auto_A, atol=1e-10)


def test_sentence_stats_equal_a_token_by_token_forward(tiny):
    texts = [r["stereotype"] for r in ROWS]
    enc = encode(tiny, texts)
    ml, mp = sentence_stats(scored_logits(tiny, enc), enc)
    for i, t in enumerate(texts):
        hl, hp = _hand_mean_logprob(tiny, t)
        assert abs(float(ml[i]) - hl) < 1e-5 and abs(float(mp[i]) - hp) < 1e-6


def test_cached_prefix_forward_equals_the_full_forward(tiny):
    texts = [r["anti_stereotype"] for r in ROWS]
    full = scored_logits(tiny, encode(tiny, texts))
    enc = encode(tiny, texts, lo=1)
    part = scored_logits(tiny, enc, 1)
    assert full.shape == part.shape == (int(enc.scored.sum()), tiny.d_vocab)
    assert torch.allclose(full, part, atol=1e-5)


def test_debias_losses_by_hand():
    enc = type("E", (), {})()
    # two pairs: anti rows first, stereo rows after; stats given directly
    a_l, s_l = torch.tensor([-2.0, -3.0]), torch.tensor([-1.0, -3.5])
    a_p, s_p = torch.tensor([0.2, 0.1]), torch.tensor([0.4, 0.05])
    cfg = _cfg()
    import bias_lens.edit.editor_train as et

    orig = et.sentence_stats
    et.sentence_stats = lambda logits, e: (torch.cat([a_l, s_l]), torch.cat([a_p, s_p]))
    try:
        lit = debias_loss_fn(cfg)(enc, None)
        pair = debias_loss_fn(_cfg(loss="pair_kl"))(enc, None)
    finally:
        et.sentence_stats = orig
    hand = sum(s_p[i] * (math.log(s_p[i]) - a_l[i]) + a_p[i] * (math.log(a_p[i]) - s_l[i]) for i in range(2)) / 2
    assert abs(float(lit) - float(hand)) < 1e-6
    d = s_l - a_l
    p = torch.sigmoid(d)
    hand_pair = sum(p[i] * math.log(p[i] / (1 - p[i])) + (1 - p[i]) * math.log((1 - p[i]) / p[i]) for i in range(2)) / 2
    assert abs(float(pair) - float(hand_pair)) < 1e-6


def test_trace_keys_and_value_grads_are_the_weight_gradient_factors(tiny):
    """sum_t u_t dv_t^T over the kept positions == dLoss/dW^T when every position is kept (the
    factored gradient MEND/MALMEN rely on); 'labels' positions differ from 'predicting' by one."""
    cfg = _cfg(positions="predicting")
    ed = Editor(tiny, cfg)
    enc = encode(tiny, [r["anti_stereotype"] for r in ROWS[:2]] + [r["stereotype"] for r in ROWS[:2]])
    fn = debias_loss_fn(cfg)
    with frozen(tiny):
        traced = trace(tiny, ed, [enc], fn)
    from bias_lens.arch import param_ref

    for lab in ed.labels:
        ref = param_ref(tiny.hf, lab)
        w = dict(tiny.hf.named_parameters())[ref.weight_name]
        tiny.hf.zero_grad()
        fn(enc, scored_logits(tiny, enc)).backward()
        g = w.grad if ref.transposed else w.grad.T  # [in, out]
        k, v = traced[lab]
        assert torch.allclose(k.T @ v, g, atol=1e-6 * max(1.0, float(g.abs().max())))
    tiny.hf.zero_grad()
    lab_mask = position_mask(enc, "labels")
    assert torch.equal(position_mask(enc, "predicting")[:, :-1], lab_mask[:, 1:])


def test_shifted_forward_equals_writing_the_weights(tiny):
    cfg = _cfg()
    ed = Editor(tiny, cfg)
    torch.manual_seed(1)
    shifts = {lab: torch.randn(*ed.shapes[lab]) * 0.05 for lab in ed.labels}
    enc = encode(tiny, [r["stereotype"] for r in ROWS])
    with shifted(tiny, shifts):
        hooked = scored_logits(tiny, enc)
    from bias_lens.edit.editor import shift_edit

    edit = shift_edit(tiny, shifts, method="t", meta={})
    before = {n: p.detach().clone() for n, p in tiny.hf.named_parameters()}
    h = edit.apply_(tiny.hf)
    try:
        written = scored_logits(tiny, enc)
    finally:
        h.undo()
    assert torch.allclose(hooked, written, atol=1e-5)
    assert all(torch.equal(bits(p.detach()), bits(before[n])) for n, p in tiny.hf.named_parameters())


def test_training_changes_only_editors_and_lowers_the_train_loss(tiny_llama):
    lm = tiny_llama
    cfg = _cfg(epochs=6, lr=1e-2, meta_lr=3e-3)
    before = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}
    res = train_editor(lm, ROWS, ROWS[:2], cfg)
    assert all(torch.equal(bits(p.detach()), bits(before[n])) for n, p in lm.hf.named_parameters())
    assert all(p.requires_grad for p in lm.hf.parameters())  # the model's flags are restored
    assert len(res.history) >= 1 and res.best_epoch >= 0
    # the editors moved: some block's B is no longer zero
    assert any(float(b.B.abs().max()) > 0 for net in res.editor.nets.values() for b in net.blocks)
    # the trained editor's shift lowers the debiasing loss on its own train batch vs no shift
    batch = encode_batch(lm, ROWS[:2], cfg, res.editor.lowest_layer)
    with frozen(lm), torch.no_grad():
        traced = trace(lm, res.editor, batch.edit, debias_loss_fn(cfg))
        shifts = {k: v.detach() for k, v in shifts_from(res.editor, traced).items()}
        zero = {k: torch.zeros_like(v) for k, v in shifts.items()}
        g1, _ = batch_losses(lm, res.editor, batch, shifts)
        g0, _ = batch_losses(lm, res.editor, batch, zero)
    assert float(g1) < float(g0)


def test_editor_edit_is_reversible_and_save_load_round_trips(tiny_llama, tmp_path):
    lm = tiny_llama
    cfg = _cfg(lr=1e-2)
    ed = Editor(lm, cfg)
    for net in ed.nets.values():
        for b in net.blocks:
            torch.nn.init.normal_(b.B, std=0.01)
    with frozen(lm):
        tr = [encode_batch(lm, ROWS, cfg, ed.lowest_layer)]
        for b in tr:  # fill the normaliser as training would
            for lab, (k, g) in trace(lm, ed, b.edit, debias_loss_fn(cfg)).items():
                ed.net_of(lab)[0].normalizer.update(torch.cat((k, g), -1))
    edit = editor_edit(lm, ed, ROWS)
    assert edit.size == sum(a * b for a, b in ed.shapes.values())
    assert sum(edit.changed_counts(lm.hf).values()) > 0
    before = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}
    h = edit.apply_(lm.hf)
    h.undo()
    assert all(torch.equal(bits(p.detach()), bits(before[n])) for n, p in lm.hf.named_parameters())
    ed.save(tmp_path / "ed")
    assert not list((tmp_path / "ed").glob("*.pt*")) and (tmp_path / "ed" / "editor.safetensors").is_file()
    back = Editor.load(lm, tmp_path / "ed")
    again = editor_edit(lm, back, ROWS)
    for n in edit.values:
        assert torch.equal(edit.values[n], again.values[n])


def test_bad_editor_options_are_one_clear_error(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="loss"):
        EditorConfig(loss="nope")
    with pytest.raises(ValueError, match="loc-coef"):
        EditorConfig(loc_coef=-1)
    with pytest.raises(ValueError, match="fused|slice|unknown|module"):
        Editor(tiny_llama, _cfg(modules=("L0.attn.nope",)))
    with pytest.raises(ValueError, match="no saved editor"):
        Editor.load(tiny_llama, tmp_path)
    with pytest.raises(ValueError, match="n-edits"):
        train_editor(tiny_llama, ROWS[:1], ROWS[:1], _cfg())


def test_editor_splits_never_train_on_a_test_context():
    from bias_lens.benchmarks import stereoset
    from bias_lens.benchmarks.stereoset_train import editor_pool, editor_splits, norm_context

    test = {norm_context(r["prompt"]) for ax in stereoset.SELECTION_AXES for r in stereoset.selection(ax)}
    # the robustness sets' contexts too (the reversal of "My mother is very BLANK." is a trainable context)
    test |= {norm_context(r["prompt"]) for sp, axes in stereoset.ROBUST_SPLITS.items() for ax in axes
             for r in stereoset.robust(sp, ax)}
    assert "my father is very blank." in test
    train, dev = editor_splits(seed=0)
    tr_ctx = {norm_context(r["prompt"]) for r in train}
    dv_ctx = {norm_context(r["prompt"]) for r in dev}
    assert not tr_ctx & test and not dv_ctx & test and not tr_ctx & dv_ctx
    assert len(train) + len(dev) == len(editor_pool())
    assert 0.08 < len(dev) / (len(train) + len(dev)) < 0.16  # the reference's 8:1
    lit = editor_pool("official_rest")
    assert {r["source"] for r in lit} == {"official_dev"} and sum(r["bias_type"] == "gender" for r in lit) <= 5
    assert editor_splits(seed=0) == (train, dev) and editor_splits(seed=1) != (train, dev)
