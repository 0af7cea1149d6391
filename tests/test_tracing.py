"""Bias tracing (bias_lens.locate.tracing) against independent oracles on the tiny models.

Oracles: restoring every layer's block output at every position gives back the clean gap;
restoring nothing gives the corrupted gap recomputed by a plain HF forward with the noise drawn
by hand; a batched restoration equals the same restoration run alone by plain HF forward hooks
written here (not bias_lens.hooks); the noise std is 3 x the embedding std computed by hand.
"""

from __future__ import annotations

import json

import pytest
import torch

from bias_lens.locate.tracing import bias_trace, restored_gaps, trace_specs, window_layers
from bias_lens.locate.tracing_data import embedding_std, knowns, load_tracing_items, prepare_item, token_span

ITEMS = [
    {"id": "a", "data": {"anti-stereotype": {"sentence": "The nurse laughed because he was happy ."},
                         "stereotype": {"sentence": "The nurse laughed because she was happy ."}},
     "subject": ["nurse"]},
    {"id": "b", "data": {"anti-stereotype": {"sentence": "The doctor went home because she was tired ."},
                         "stereotype": {"sentence": "The doctor went home because he was tired ."}},
     "subject": ["doctor", "home"]},
]


def _blocks(lm):
    m = lm.hf
    return m.transformer.h if hasattr(m, "transformer") else m.model.layers


def _module(lm, layer, point):
    blk = _blocks(lm)[layer]
    if point == "resid_post":
        return blk
    if point == "mlp.out":
        return blk.mlp
    return blk.attn if hasattr(blk, "attn") else blk.self_attn


def _first(o):
    return o[0] if isinstance(o, tuple) else o


def _plain_scores(lm, ids, embeds=None, restore=None):
    """Mean log p of tokens 1.. with optional {(layer, point): (rows, pos, values)} restorations."""
    handles = []
    for (layer, point), (pos, vals) in (restore or {}).items():
        def hook(mod, args, out, pos=pos, vals=vals):
            h = _first(out).clone()
            h[:, pos] = vals
            return (h, *out[1:]) if isinstance(out, tuple) else h
        handles.append(_module(lm, layer, point).register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = lm.hf(inputs_embeds=embeds).logits if embeds is not None else lm.hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    return lp.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)


def _plain_clean_acts(lm, ids):
    acts, handles = {}, []
    for layer in range(lm.n_layers):
        for point in ("resid_post", "mlp.out", "attn.out"):
            def hook(mod, args, out, key=(layer, point)):
                acts[key] = _first(out).detach().clone()
            handles.append(_module(lm, layer, point).register_forward_hook(hook))
    with torch.no_grad():
        lm.hf(input_ids=ids)
    for h in handles:
        h.remove()
    return acts


def _plain_gap(lm, item, std, S, seed, spec=()):
    """Independent recomputation of one restored gap (one sentence at a time, noise by hand)."""
    scores = []
    for ids_t, spans in ((item.anti_ids, item.anti_spans), (item.stereo_ids, item.stereo_spans)):
        ids = torch.tensor([ids_t])
        acts = _plain_clean_acts(lm, ids)
        g = torch.Generator().manual_seed(seed)
        emb = lm.hf.get_input_embeddings().weight[ids[0]].detach().clone().repeat(S, 1, 1)
        for b, e in spans:
            emb[:, b:e] += (torch.randn((S, e - b, emb.shape[-1]), generator=g, dtype=torch.float64) * std).float()
        restore = {}
        for name, t in spec:
            layer, point = int(name.split(".")[0][1:]), name.split(".", 1)[1]
            pos, _ = restore.setdefault((layer, point), ([], None))
            pos.append(t)
        restore = {k: (p, acts[k][0, p]) for k, (p, _) in restore.items()}
        scores.append(_plain_scores(lm, ids.repeat(S, 1), emb, restore).mean())
    return float((scores[0] - scores[1]).abs())


def _prepared(lm):
    out = [prepare_item(lm.tokenizer, it) for it in ITEMS]
    assert all(o is not None for o in out)
    return out


def test_prepare_item_spans_and_bos(tiny):
    tok = tiny.tokenizer
    it = prepare_item(tok, ITEMS[1])
    assert it.anti_ids[0] == tok.eos_token_id  # the tiny tokenizer has no BOS: EOS stands in, as GPT-2's
    assert list(it.anti_ids[1:]) == tok("The doctor went home because she was tired .", add_special_tokens=False)["input_ids"]
    toks = [tok.decode([i]) for i in it.anti_ids]
    for (b, e), word in zip(it.anti_spans, ["doctor", "home"]):
        assert word in "".join(toks[b:e]) and word not in "".join(toks[b + 1:e]) and word not in "".join(toks[b:e - 1])
    assert [toks[p] for p in it.attr_positions] == [" she"]
    assert it.tokens[it.attr_positions[0]] == " she/ he"


def test_substring_span_is_literal_and_word_span_is_the_alternative(tiny):
    tok = tiny.tokenizer
    ids = tok("The nurse said he was", add_special_tokens=False)["input_ids"]
    toks = [tok.decode([i]) for i in ids]
    b, e = token_span(tok, ids, "he")  # BiasEdit's find_token_range: first character match, inside "The"
    assert "he" in "".join(toks[b:e]) and b == 0
    b, e = token_span(tok, ids, "he", span="word")
    assert "".join(toks[b:e]).strip() == "he"


def test_items_that_biasedit_skips_are_skipped(tiny):
    missing = {**ITEMS[0], "subject": ["surgeon"]}
    assert prepare_item(tiny.tokenizer, missing) is None
    longer = {"id": "c", "data": {"anti-stereotype": {"sentence": "The nurse is kind ."},
                                  "stereotype": {"sentence": "The nurse is extraordinarily kind ."}}, "subject": ["nurse"]}
    assert prepare_item(tiny.tokenizer, longer) is None


def test_all_resid_restored_is_clean_and_nothing_restored_is_corrupted(tiny):
    it = _prepared(tiny)[1]
    S, std, seed = 3, 3.0, 5
    full = tuple((f"L{l}.resid_post", t) for l in range(tiny.n_layers) for t in range(it.n_tokens))
    last = tuple((f"L{tiny.n_layers - 1}.resid_post", t) for t in range(it.n_tokens))
    clean, gaps = restored_gaps(tiny, it, [(), full, last], noise_std=std, n_noise=S, seed=seed, batch_size=4)
    a, s = (_plain_scores(tiny, torch.tensor([ids])) for ids in (it.anti_ids, it.stereo_ids))
    assert clean == pytest.approx(float((a - s).abs()), abs=1e-6)  # float32 log-softmax vs float64 here
    assert float(gaps[1]) == pytest.approx(clean, abs=1e-5)
    assert float(gaps[2]) == pytest.approx(clean, abs=1e-5)
    assert float(gaps[0]) == pytest.approx(_plain_gap(tiny, it, std, S, seed), abs=1e-5)
    assert abs(float(gaps[0]) - clean) > 1e-5  # the corruption does something


def test_batched_restorations_equal_plain_hooks_run_alone(tiny):
    it = _prepared(tiny)[1]
    S, std, seed = 2, 0.5, 1
    specs = [(("L1.resid_post", 2),), (("L0.mlp.out", 3), ("L1.mlp.out", 3)), (("L2.attn.out", 1),),
             (("L0.resid_post", 1), ("L2.mlp.out", 4)), ()]
    _, batched = restored_gaps(tiny, it, specs, noise_std=std, n_noise=S, seed=seed, batch_size=64)
    _, chunked = restored_gaps(tiny, it, specs, noise_std=std, n_noise=S, seed=seed, batch_size=1)
    for i, spec in enumerate(specs):
        alone = _plain_gap(tiny, it, std, S, seed, spec)
        assert float(batched[i]) == pytest.approx(alone, abs=1e-5), spec
    torch.testing.assert_close(batched, chunked, atol=1e-6, rtol=0)


def test_bias_trace_matches_restored_gaps_and_windows(tiny_llama):
    lm = tiny_llama
    res = bias_trace(lm, ITEMS, n_noise=2, noise_std=0.4, window=2, seed=3, batch_size=16)
    assert res.n_skipped == 0 and res.noise_std == pytest.approx(1.2)
    it = _prepared(lm)[0]
    tr = res.items[0]
    assert tr.restored.shape == (3, lm.n_layers, it.n_tokens)
    assert list(window_layers(0, 3, 2)) == [0] and list(window_layers(1, 3, 2)) == [0, 1]
    assert list(window_layers(5, 30, 10)) == list(range(0, 10)) and list(window_layers(29, 30, 10)) == [24, 25, 26, 27, 28, 29]
    for c, comp in enumerate(("resid", "mlp", "attn")):
        for layer in (0, 2):
            t = it.attr_positions[0]
            spec = trace_specs([comp], lm.n_layers, it.n_tokens, 2)[layer * it.n_tokens + t]
            _, g = restored_gaps(lm, it, [spec], noise_std=1.2, n_noise=2, seed=3)
            assert float(tr.restored[c, layer, t]) == pytest.approx(float(g[0]), abs=1e-9)
            assert float(tr.recovery[c, layer, t]) == pytest.approx(
                (float(g[0]) - tr.corrupted_gap) / (tr.clean_gap - tr.corrupted_gap), abs=1e-9)
    loc = res.to_locate_result("mlp")
    roles = res.by_role()
    names = [r for r in roles if r != "all"]
    for layer in range(lm.n_layers):
        assert loc.scores[layer].item() == pytest.approx(max(float(roles[r]["recovery"][1, layer]) for r in names))
    assert loc.labels == [f"L{l}" for l in range(lm.n_layers)] and loc.method == "bias_trace"
    # the role mean is over (item, position) pairs, computed here by hand for 'subject'
    pairs = [(t_, it_.restored[:, :, p]) for it_ in res.items for p in it_.corrupted_positions for t_ in [it_]]
    torch.testing.assert_close(roles["subject"]["restored"], torch.stack([v for _, v in pairs]).mean(0))
    json.dumps(res.to_dict())


def test_noise_is_three_times_the_embedding_std_by_hand(tiny):
    texts = knowns()
    assert len(texts) == 1209
    w = tiny.hf.get_input_embeddings().weight.detach()
    rows = torch.cat([w[torch.tensor(tiny.tokenizer(t)["input_ids"])] for t in texts])
    by_hand = float(rows.std())
    assert embedding_std(tiny, texts) == pytest.approx(by_hand, rel=1e-6)
    res = bias_trace(tiny, ITEMS[:1], components=("resid",), n_noise=1, batch_size=64)
    assert res.noise_std == pytest.approx(3 * by_hand, rel=1e-6)


def test_seeded_determinism(tiny_llama):
    kw = dict(components=("resid",), n_noise=2, noise_std=0.5, batch_size=32)
    a = bias_trace(tiny_llama, ITEMS, seed=7, **kw)
    b = bias_trace(tiny_llama, ITEMS, seed=7, **kw)
    c = bias_trace(tiny_llama, ITEMS, seed=8, **kw)
    for x, y in zip(a.items, b.items):
        assert torch.equal(x.restored, y.restored) and x.corrupted_gap == y.corrupted_gap
    assert a.items[0].corrupted_gap != c.items[0].corrupted_gap


def test_bad_arguments_are_one_clear_error(tiny_llama):
    with pytest.raises(ValueError, match="components"):
        bias_trace(tiny_llama, ITEMS, components=("ffn",))
    with pytest.raises(ValueError, match="n_noise"):
        bias_trace(tiny_llama, ITEMS, n_noise=0)
    with pytest.raises(ValueError, match="no traceable item"):
        bias_trace(tiny_llama, [{**ITEMS[0], "subject": ["surgeon"]}], noise_std=1.0)
    with pytest.raises(ValueError, match="gender"):
        load_tracing_items("race")


def test_shipped_data_is_biasedit_format():
    items = load_tracing_items("gender")
    assert len(items) == 1026
    first = items[0]
    assert first["subject"] == ["female", "she"]
    assert first["data"]["stereotype"]["sentence"].endswith("hysterical.")
    assert len(load_tracing_items("gender", limit=5)) == 5


def test_cli_trace_writes_result_trace_and_figures(tiny_llama, tmp_path, capsys):
    import argparse

    from bias_lens.cli.trace import main, register_trace
    from bias_lens.locate.result import LocateResult

    items = tmp_path / "items.json"
    items.write_text(json.dumps(ITEMS))
    out = tmp_path / "out"
    model = tiny_llama.hf.config._name_or_path
    argv = ["--model", model, "--items-file", str(items), "--n-noise", "2", "--noise-std", "0.4", "--window", "2",
            "--out", str(out), "--plotlyjs", "cdn"]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "result.json" in names and "trace.json" in names and "roles_mlp.html" in names and "item0_attn.html" in names
    expected = bias_trace(tiny_llama, ITEMS, n_noise=2, noise_std=0.4, window=2).to_locate_result("mlp")
    got = LocateResult.load(out / "result.json")
    assert got.labels == expected.labels
    torch.testing.assert_close(got.scores, expected.scores.double(), atol=1e-9, rtol=0)
    trace = json.loads((out / "trace.json").read_text())
    assert trace["n_items"] == 2 and len(trace["items"][0]["restored"]) == 3
    # a bad option: one line, exit 2, nothing written
    bad = tmp_path / "bad"
    assert main(argv[:-4] + ["--components", "ffn", "--out", str(bad)]) == 2
    assert "--components" in capsys.readouterr().err and not bad.exists()
    # the parser registers under a locate-style subparsers action
    ap = argparse.ArgumentParser()
    register_trace(ap.add_subparsers(dest="method"))
    args = ap.parse_args(["trace", "--limit", "3", "--components", "resid"])
    assert args.method == "trace" and args.limit == 3 and callable(args.func)


def test_roles_positions_equal_the_full_trace_there(tiny_llama):
    kw = dict(components=("resid", "attn"), n_noise=2, noise_std=0.5, window=2, batch_size=24)
    full = bias_trace(tiny_llama, ITEMS, **kw)
    part = bias_trace(tiny_llama, ITEMS, positions="roles", **kw)
    for f, p in zip(full.items, part.items):
        want = sorted({t for r, ps in f.role_positions().items() if r != "all" for t in ps})
        traced = [t for t in range(len(f.tokens)) if not torch.isnan(p.restored[:, :, t]).any()]
        assert traced == want
        torch.testing.assert_close(p.restored[:, :, want], f.restored[:, :, want], atol=1e-9, rtol=0)
    for role in ("subject", "attr", "last"):
        torch.testing.assert_close(part.by_role()[role]["recovery"], full.by_role()[role]["recovery"])
    assert "null" in json.dumps(part.to_dict()) and "NaN" not in json.dumps(part.to_dict())


def test_restoring_the_last_position_changes_nothing(tiny):
    # the sentence score never reads the prediction made at the last position (causal model)
    res = bias_trace(tiny, ITEMS[:1], components=("resid", "mlp"), n_noise=2, noise_std=2.0, window=2, batch_size=48)
    it = res.items[0]
    torch.testing.assert_close(it.restored[:, :, -1], torch.full_like(it.restored[:, :, -1], it.corrupted_gap),
                               atol=1e-6, rtol=0)


def test_attach_to_a_positional_locate_parser(tiny_llama, tmp_path):
    import argparse

    from bias_lens.cli import locate as cli_locate
    from bias_lens.cli.trace import attach_to_locate

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    cli_locate.register(sub)  # register() attaches trace itself (cli/locate.py)
    assert callable(attach_to_locate)
    items = tmp_path / "items.json"
    items.write_text(json.dumps(ITEMS[:1]))
    args = ap.parse_args(["locate", "trace", "--model", tiny_llama.hf.config._name_or_path, "--items-file", str(items),
                          "--components", "resid", "--n-noise", "1", "--noise-std", "0.5", "--json"])
    assert args.method == "trace" and args.func.__wrapped__ is cli_locate.run
    assert args.func(args) == 0
    assert ap.parse_args(["locate", "layer"]).method == "layer"
