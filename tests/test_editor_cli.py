"""BiasEdit through the one driver and ``bias-lens edit --method editor`` on a tiny Llama.

Oracles: the exported checkpoint equals ``W + dW^T`` with ``dW`` recomputed by hand from the saved
editor and the same seeded train requests (:func:`shifts_from` of :func:`trace`); the paper's
test-time protocol equals a hand loop (edit from the batch, score the batch by plain HF forwards,
undo); bad input exits 2 and writes nothing; a NaN in training names its step and leaves the model
bit-for-bit unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bias_lens.cli import main
from bias_lens.edit.editor import Editor, EditorConfig, editor_edit
from bias_lens.edit.edits import bits
from bias_lens.edit.methods import EditorMethod, method_from_dict, method_to_dict
from bias_lens.pipeline.driver import editor_requests

from conftest import build_tiny

TINY = dict(top=2, rank=8, n_edits=4, chunk=4, lr=1e-3, meta_lr=1e-3, epochs=1, patience=1, max_minutes=None)
# the tiny model's 128 positions do not fit MMLU's longest questions: capability measured on arithmetic only
MEASURE = ["--n-samples", "8", "--limit", "8", "--ub-limit", "4", "--retention-limit", "4", "--mmlu-limit", "0",
           "--arithmetic-limit", "8"]


@pytest.fixture
def base_dir(tiny_tokenizer_dir, tmp_path) -> Path:
    build_tiny("llama", tiny_tokenizer_dir, tmp_path / "base")
    return tmp_path / "base"


@pytest.fixture
def editor_dir(base_dir, tmp_path) -> Path:
    """An untrained editor of the tiny model's top two mlp.down matrices, saved (its nets are
    random-initialised, so its shift is a deterministic non-zero function of the requests)."""
    from bias_lens import load_model

    lm = load_model(str(base_dir))
    Editor(lm, EditorConfig(**TINY)).save(tmp_path / "ed")
    return tmp_path / "ed"


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def test_editor_variant_round_trips_and_validates():
    m = EditorMethod(bias="race", layers=(29, 27), n_edits=16, loc_coef=0.0)
    assert method_from_dict(json.loads(json.dumps(method_to_dict(m)))) == m
    assert m.config(seed=3).modules == ("L27.mlp.down", "L29.mlp.down") and m.config().loc_coef == 0.0
    assert m.config(seed=3).seed == 3 and m.config().n_edits == 16
    assert EditorMethod().config() == EditorConfig()  # unset options: EditorConfig's defaults
    for bad in (dict(bias="age"), dict(layers=(1, 1)), dict(layers=(-1,)), dict(n_edits=0), dict(loc_coef=-1.0),
                dict(loss="mse"), dict(retention="kl")):
        with pytest.raises(ValueError):
            EditorMethod(**bad)


def test_cli_editor_exports_w_plus_shift_and_the_editor(base_dir, editor_dir, tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["edit", "--method", "editor", "--model", str(base_dir), "--editor", str(editor_dir), "--batch-size", "4",
               *MEASURE, "--out", str(out), "--json"])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["method"] == "biasedit" and rec["out"] == str(out) and rec["info"]["n_requests"] == 4
    assert {"ss", "lms", "icat", "crows", "afgb", "ub", "perplexity", "arithmetic"} <= set(rec["after"])
    assert "mmlu" not in rec["after"]
    # oracle: the shift recomputed by hand from the saved editor and the same seeded requests
    from bias_lens import load_model

    lm = load_model(str(base_dir))
    editor = Editor.load(lm, editor_dir)
    requests = editor_requests("gender", 4, seed=0)
    assert all(r["bias_type"] == "gender" for r in requests)
    handle = editor_edit(lm, editor, requests).apply_(lm.hf)
    want = {k: v.detach().clone() for k, v in lm.hf.state_dict().items()}
    handle.undo()
    base, got = _state(base_dir), _state(out)
    changed = {k for k in base if not torch.equal(base[k], got[k])}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)}
    for k in base:
        assert torch.equal(got[k], want[k]), k
    assert rec["n_params_edited"] == sum(int((base[k] != got[k]).sum()) for k in changed) > 0
    # the exported editor is the one used
    again = Editor.load(lm, out / "editor")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), editor.state_dict().values()))
    assert (out / "patch").is_dir()


def test_cli_editor_trains_when_no_editor_is_given(base_dir, tmp_path, capsys, monkeypatch):
    """Training through the CLI (tiny train/dev pool so it runs in seconds): history recorded, editor saved."""
    import bias_lens.benchmarks.stereoset_train as st

    full = st.editor_splits
    monkeypatch.setattr(st, "editor_splits", lambda seed=0, **kw: tuple(
        [r for r in x if r["bias_type"] == "gender"][:8] for x in full(seed, **kw)))
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["edit", "--method", "editor", "--model", str(base_dir), "--layers", "1,2", "--batch-size", "4",
               "--epochs", "1", "--meta-lr", "1e-3", "--editor-loss", "pair_kl", "--retention-loss", "token_kl", *MEASURE,
               "--out", str(out), "--json"])
    assert rc == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["info"]["status"] == "epochs" and len(rec["info"]["history"]) == 1
    assert rec["info"]["modules"] == ["L1.mlp.down", "L2.mlp.down"] and rec["info"]["n_train"] == 8
    saved = json.loads((out / "editor" / "editor.json").read_text())["config"]
    assert saved["meta_lr"] == 1e-3 and saved["loss"] == "pair_kl" and saved["retention"] == "token_kl"
    assert rec["info"]["unedited_dev"]["loss"] > 0 and isinstance(rec["info"]["beats_unedited"], bool)


@pytest.mark.parametrize("case", ["layers", "corrupt", "shape", "deeper", "flag", "bias"])
def test_cli_editor_bad_input_exits_2_and_writes_nothing(case, base_dir, editor_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["edit", "--method", "editor", "--model", str(base_dir), *MEASURE, "--out", str(out)]
    if case == "layers":
        argv += ["--layers", "1,7"]
    elif case == "corrupt":
        (editor_dir / "editor.safetensors").write_bytes(b"not a safetensors file")
        argv += ["--editor", str(editor_dir)]
    elif case == "shape":  # an editor of other matrices: mlp.up's nets, relabelled as mlp.down (shapes differ)
        from bias_lens import load_model

        Editor(load_model(str(base_dir)), EditorConfig(**{**TINY, "modules": ("L1.mlp.up",)})).save(tmp_path / "ed3")
        meta = json.loads((tmp_path / "ed3" / "editor.json").read_text())
        meta["config"]["modules"] = ["L1.mlp.down"]
        (tmp_path / "ed3" / "editor.json").write_text(json.dumps(meta))
        argv += ["--editor", str(tmp_path / "ed3")]
    elif case == "deeper":  # an editor of a deeper model's blocks
        meta = json.loads((editor_dir / "editor.json").read_text())
        meta["config"]["modules"] = ["L6.mlp.down", "L7.mlp.down"]
        (editor_dir / "editor.json").write_text(json.dumps(meta))
        argv += ["--editor", str(editor_dir)]
    elif case == "flag":
        argv = ["edit", "--method", "msme", "--scale", "module", "--model", str(base_dir), "--bias", "gender"]
    before = {p: p.stat().st_mtime_ns for p in base_dir.iterdir()}
    capsys.readouterr()
    if case == "bias":
        with pytest.raises(SystemExit) as err:
            main([*argv, "--bias", "age"])
        assert err.value.code == 2
    else:
        assert main(argv) == 2
        msg = capsys.readouterr().err.strip().splitlines()
        assert len(msg) == 1 and ("editor" in msg[0] or "layers" in msg[0]), msg
    assert not out.exists()
    assert before == {p: p.stat().st_mtime_ns for p in base_dir.iterdir()}


def test_nan_in_editor_training_names_the_step_and_leaves_the_model(base_dir, monkeypatch):
    from bias_lens import load_model
    from bias_lens.benchmarks.stereoset_train import editor_splits
    from bias_lens.edit import editor_train

    lm = load_model(str(base_dir))
    before = {k: bits(v).clone() for k, v in lm.hf.state_dict().items()}
    real = editor_train.debias_loss_fn
    calls = {"n": 0}

    def poisoned(cfg):
        fn = real(cfg)

        def loss(enc, logits):
            calls["n"] += 1
            return fn(enc, logits) * (math.nan if calls["n"] > 3 else 1.0)
        return loss

    monkeypatch.setattr(editor_train, "debias_loss_fn", poisoned)
    train, dev = editor_splits(0)
    with pytest.raises(editor_train.NonFiniteError, match=r"step \d"):
        editor_train.train_editor(lm, train[:12], dev[:4], EditorConfig(**{**TINY, "epochs": 2}))
    assert all(torch.equal(bits(v), before[k]) for k, v in lm.hf.state_dict().items())


def _hand_scores(lm, texts: list[str], mean_prob: bool = False, total: bool = False) -> list[float]:
    """Mean teacher-forced log-prob (or, ``mean_prob``, mean token probability: BiasEdit's reading;
    ``total``: the summed log-prob, CrowS' default) after the BOS (EOS if none), plain HF forward per sentence."""
    tok = lm.tokenizer
    pre = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out = []
    for text in texts:
        ids = [pre] + tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = lm.hf(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
        tok_lp = [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]
        out.append(sum(tok_lp) if total else sum(math.exp(x) if mean_prob else x for x in tok_lp) / len(tok_lp))
    return out


def test_protocol_eval_is_edit_score_undo_per_batch(base_dir, editor_dir):
    from bias_lens import load_model
    from bias_lens.benchmarks.datasets import load_split
    from bias_lens.pipeline.biasedit import protocol_eval, transfer_eval

    lm = load_model(str(base_dir))
    editor = Editor.load(lm, editor_dir)
    rows = load_split("stereoset", "test", axis="gender")[:10]
    before = {k: bits(v).clone() for k, v in lm.hf.state_dict().items()}
    got = protocol_eval(lm, editor, rows, n_edits=4)
    assert all(torch.equal(bits(v), before[k]) for k, v in lm.hf.state_dict().items())
    wins, lms, wins_mp = [], [], []
    for i in range(0, 10, 4):  # batches of 4, 4, 2
        batch = rows[i : i + 4]
        h = editor_edit(lm, editor, batch).apply_(lm.hf)
        st = _hand_scores(lm, [r["stereotype"] for r in batch])
        an = _hand_scores(lm, [r["anti_stereotype"] for r in batch])
        un = _hand_scores(lm, [r["unrelated"] for r in batch])
        st_mp = _hand_scores(lm, [r["stereotype"] for r in batch], mean_prob=True)
        an_mp = _hand_scores(lm, [r["anti_stereotype"] for r in batch], mean_prob=True)
        h.undo()
        wins += [a > b for a, b in zip(st, an)]
        wins_mp += [a > b for a, b in zip(st_mp, an_mp)]
        lms += [a > c for a, c in zip(st, un)] + [b > c for b, c in zip(an, un)]
    assert got["n_batches"] == 3 and got["ss"] == pytest.approx(100 * sum(wins) / 10)
    assert got["ss_mean_prob"] == pytest.approx(100 * sum(wins_mp) / 10)
    assert got["lms"] == pytest.approx(100 * sum(lms) / 20)
    assert got["icat"] == pytest.approx(got["lms"] * min(got["ss"], 100 - got["ss"]) / 50)
    # the shift scale multiplies the predicted shift exactly
    e1, e2 = editor_edit(lm, editor, rows[:4]), editor_edit(lm, editor, rows[:4], scale=2.5)
    params = dict(lm.hf.named_parameters())
    for name, idx in e1.indices.items():
        w0 = params[name].detach().reshape(-1)[idx].double()
        assert torch.equal(e2.indices[name], idx)
        assert torch.allclose(e2.values[name].double() - w0, 2.5 * (e1.values[name].double() - w0), atol=1e-6)
    tr = transfer_eval(lm, editor, rows[:4], rows)
    h = editor_edit(lm, editor, rows[:4]).apply_(lm.hf)
    st, an = _hand_scores(lm, [r["stereotype"] for r in rows]), _hand_scores(lm, [r["anti_stereotype"] for r in rows])
    h.undo()
    assert tr["ss"] == pytest.approx(100 * sum(a > b for a, b in zip(st, an)) / 10)


def test_time_cap_is_checked_per_step(base_dir):
    """A wall-time cap shorter than one step stops after that step (not at the end of the epoch)."""
    from bias_lens import load_model
    from bias_lens.benchmarks.stereoset_train import editor_splits
    from bias_lens.edit.editor_train import train_editor

    lm = load_model(str(base_dir))
    train, dev = editor_splits(0)
    res = train_editor(lm, train[:16], dev[:4], EditorConfig(**{**TINY, "epochs": 3, "max_minutes": 1e-9}))
    assert res.status == "time_limit" and [h["steps"] for h in res.history] == [1] and res.best_epoch == 0



def test_crows_protocol_eval_is_edit_score_undo_per_batch(base_dir, editor_dir):
    """CrowS-Pairs under the protocol: each batch's requests are its own pairs with ``sent_more`` as the
    stereotype (the metric's reading), scored by summed token log-prob (the suite's default); with no
    editor it is the plain score; the swap reading flips the antistereo requests."""
    from bias_lens import load_model
    from bias_lens.benchmarks.datasets import load_split
    from bias_lens.pipeline.biasedit import crows_protocol_eval, crows_requests

    lm = load_model(str(base_dir))
    editor = Editor.load(lm, editor_dir)
    rows = load_split("crows-pairs", "test", axis="gender")[:9]
    before = {k: bits(v).clone() for k, v in lm.hf.state_dict().items()}
    got = crows_protocol_eval(lm, editor, rows, n_edits=4)
    assert all(torch.equal(bits(v), before[k]) for k, v in lm.hf.state_dict().items())
    wins = []
    for i in range(0, 9, 4):  # batches of 4, 4, 1
        batch = rows[i : i + 4]
        reqs = [{"stereotype": r["sent_more"], "anti_stereotype": r["sent_less"]} for r in batch]
        h = editor_edit(lm, editor, reqs).apply_(lm.hf)
        more = _hand_scores(lm, [r["sent_more"] for r in batch], total=True)
        less = _hand_scores(lm, [r["sent_less"] for r in batch], total=True)
        h.undo()
        wins += [a > b for a, b in zip(more, less)]
    assert got["n_batches"] == 3 and got["crows"] == pytest.approx(100 * sum(wins) / 9)
    plain = crows_protocol_eval(lm, None, rows)
    more = _hand_scores(lm, [r["sent_more"] for r in rows], total=True)
    less = _hand_scores(lm, [r["sent_less"] for r in rows], total=True)
    assert plain["crows"] == pytest.approx(100 * sum(a > b for a, b in zip(more, less)) / 9)
    swapped = [dict(r, direction="antistereo") for r in rows[:2]]
    assert [(q["stereotype"], q["anti_stereotype"]) for q in crows_requests(swapped, mode="swap_antistereo")] == \
        [(r["sent_less"], r["sent_more"]) for r in swapped]
    assert [q["stereotype"] for q in crows_requests(swapped)] == [r["sent_more"] for r in swapped]
    with pytest.raises(ValueError, match="mode must be"):
        crows_requests(rows, mode="nope")
