"""Foundation oracles: the two lenses agree with plain HF, share its weights, and scoring is exact."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bias_lens.arch import param_ref, parse_module_name, tl_hook_name
from bias_lens.hooks import identity, record_into
from bias_lens.scoring import target_logprobs
from bias_lens.targets import TargetError, resolve_targets

PROMPTS = ["The nurse laughed because", "The carpenter went home because he", "Two plus", "The doctor said that"]


def hf_last_logprobs(lm, prompt: str) -> torch.Tensor:
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return torch.log_softmax(lm.hf(ids).logits[0, -1].double(), -1)


def test_bridge_logits_match_hf(tiny):
    ids = tiny.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = tiny.hf(ids).logits
        out = tiny.bridge(ids)
    assert torch.allclose(out, ref, atol=1e-4)


def test_nnsight_logits_match_hf(tiny):
    ids = tiny.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = tiny.hf(ids).logits
        with tiny.nnsight.trace(ids):
            out = tiny.nnsight.output.logits.save()
    assert torch.allclose(out, ref, atol=1e-5)


def test_views_share_parameters_and_see_edits(tiny, tmp_path):
    hf_params = {id(p) for p in tiny.hf.parameters()}
    storages = {p.untyped_storage().data_ptr() for p in tiny.hf.parameters()}
    # Same Parameter objects (GPT-2's split q/k/v: views of the same storage).
    assert all(id(p) in hf_params or p.untyped_storage().data_ptr() in storages for p in tiny.bridge.parameters())
    assert all(id(p) in hf_params for p in tiny.nnsight.parameters())
    ids = tiny.tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    ref = param_ref(tiny.hf, "L1.attn.v")
    with torch.no_grad():
        before_b = tiny.bridge(ids)
        ref.weight_view(tiny.hf)[3, 5] += 2.0  # in place on the real HF weight
        after_hf = tiny.hf(ids).logits
        after_b = tiny.bridge(ids)
        with tiny.nnsight.trace(ids):
            after_nn = tiny.nnsight.output.logits.save()
    assert not torch.allclose(before_b, after_b)
    assert torch.allclose(after_b, after_hf, atol=1e-4)
    assert torch.allclose(after_nn, after_hf, atol=1e-6)
    # The HF model still exports cleanly after both views were built.
    tiny.hf.save_pretrained(tmp_path / "out", safe_serialization=True)
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for (n, p), (n2, q) in zip(tiny.hf.state_dict().items(), back.state_dict().items()):
        assert n == n2 and torch.equal(p, q), n


@pytest.mark.parametrize("lens", ["hf", "tl"])
def test_identity_hooks_change_nothing(tiny, lens):
    ids = tiny.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    run = (lambda: tiny.hf(ids).logits) if lens == "hf" else (lambda: tiny.bridge(ids))
    points = [f"L{l}.{k}" for l in range(tiny.n_layers) for k in ("resid_pre", "resid_post", "attn.out", "attn.z", "mlp.in", "mlp.post", "mlp.out")]
    with torch.no_grad():
        ref = run()
        with tiny.hooks(identity(points), lens=lens):
            out = run()
    assert torch.equal(out, ref) if lens == "hf" else torch.allclose(out, ref, atol=1e-6)


def test_hook_points_agree_across_lenses(tiny):
    ids = tiny.tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    points = [f"L{l}.{k}" for l in range(tiny.n_layers) for k in ("resid_pre", "resid_mid", "resid_post", "attn.out", "attn.z", "mlp.post", "mlp.out")]
    a, b = {}, {}
    with torch.no_grad():
        with tiny.hooks(record_into(a, points), lens="hf"):
            tiny.hf(ids)
        with tiny.hooks(record_into(b, points), lens="tl"):
            tiny.bridge(ids)
    for p in points:
        assert a[p].shape == b[p].shape, p
        assert torch.allclose(a[p], b[p], atol=1e-4), p


def test_resid_stream_oracle(tiny):
    """HF hidden_states[i] equals our resid_pre of block i (embedding output at i=0)."""
    ids = tiny.tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    store = {}
    with torch.no_grad(), tiny.hooks(record_into(store, [f"L{l}.resid_pre" for l in range(tiny.n_layers)])):
        hs = tiny.hf(ids, output_hidden_states=True).hidden_states
    for l in range(tiny.n_layers):
        assert torch.allclose(store[f"L{l}.resid_pre"], hs[l], atol=1e-6)


def test_batched_scoring_equals_unbatched(tiny):
    targets = resolve_targets(tiny.tokenizer, "he,she")
    batched = target_logprobs(tiny, PROMPTS, targets, batch_size=3)
    for i, p in enumerate(PROMPTS):
        ref = hf_last_logprobs(tiny, p)[list(targets.first_ids)]
        assert torch.allclose(batched[i], ref, atol=1e-5)


def test_multi_token_target_is_teacher_forced(tiny):
    words = ["carpenter", "he"]
    targets = resolve_targets(tiny.tokenizer, words)
    multi = [t for t in targets.token_ids if len(t) > 1]
    assert multi, "fixture tokenizer should split ' carpenter' for this test"
    got = target_logprobs(tiny, PROMPTS[:2], targets, batch_size=2)
    for i, p in enumerate(PROMPTS[:2]):
        for j, t in enumerate(targets.token_ids):
            ids = tiny.tokenizer(p).input_ids
            total = 0.0
            for tok in t:
                total += float(hf_last_logprobs_ids(tiny, ids)[tok])
                ids = ids + [tok]
            assert abs(float(got[i, j]) - total) < 1e-5


def hf_last_logprobs_ids(lm, ids):
    with torch.no_grad():
        return torch.log_softmax(lm.hf(torch.tensor([ids])).logits[0, -1].double(), -1)


def test_target_errors(tiny):
    with pytest.raises(TargetError):
        resolve_targets(tiny.tokenizer, "he,")
    with pytest.raises(TargetError):
        resolve_targets(tiny.tokenizer, ["he"])


def test_arch_table_orientation(tiny):
    ref = param_ref(tiny.hf, "L0.mlp.down")
    w = ref.weight_view(tiny.hf)
    assert w.shape == (tiny.d_model, tiny.d_mlp)  # [out, in]
    q = param_ref(tiny.hf, "L0.attn.q").weight_view(tiny.hf)
    assert q.shape[1] == tiny.d_model
    assert parse_module_name("L2.attn.o") == (2, "attn.o")
    assert tl_hook_name(tiny.hf, "L1.mlp.post") == "blocks.1.mlp.out.hook_in"
    with pytest.raises(ValueError):
        parse_module_name("L2.mlp.bogus")


def test_load_model_errors(tmp_path):
    from bias_lens.loading import ModelLoadError
    from bias_lens import load_model

    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
        load_model("someone/not-cached-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="missing config.json"):
        load_model(tmp_path / "empty")


def test_load_local_folder(tiny, tmp_path):
    from bias_lens import load_model

    folder = tiny.hf.config._name_or_path
    lm = load_model(folder)
    ids = tiny.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(lm.hf(ids).logits, tiny.hf(ids).logits, atol=1e-6)


# ----------------------------------------------------------------------------- SmolLM2
@pytest.mark.integration
def test_smollm2_stereotypes(smol):
    t = resolve_targets(smol.tokenizer, "he,she")
    p = target_logprobs(smol, ["The nurse laughed because", "The carpenter went home because"], t).exp()
    assert p[0, 1] > p[0, 0]  # nurse: she > he
    assert p[1, 0] > p[1, 1]  # carpenter: he > she
    assert abs(float(p[0, 1]) - 0.317) < 0.01 and abs(float(p[1, 0]) - 0.369) < 0.01


@pytest.mark.integration
def test_smollm2_views_agree(smol):
    ids = smol.tokenizer("The nurse laughed because", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = smol.hf(ids).logits
        assert torch.allclose(smol.bridge(ids), ref, atol=1e-3)
        with smol.nnsight.trace(ids):
            out = smol.nnsight.output.logits.save()
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.integration
def test_cli_probe_json_matches_transformers(smol):
    prompts = ["The nurse laughed because", "The engineer was late because it"]
    res = subprocess.run(
        [sys.executable, "-m", "bias_lens", "probe", "--json", *prompts],
        capture_output=True, text=True, check=True,
    )
    rows = json.loads(res.stdout)
    for row, p in zip(rows, prompts):
        lp = hf_last_logprobs(smol, p).exp()
        for w in ("he", "she"):
            tid = smol.tokenizer(" " + w, add_special_tokens=False).input_ids[0]
            assert abs(row["probs"][w] - float(lp[tid])) < 1e-4
    bad = subprocess.run([sys.executable, "-m", "bias_lens", "probe", "--model", "nope/nope", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "error" in bad.stderr
