"""The general-neuron experiment against plain torch: masking by hooks vs a copy of the HF model
whose down-projection columns are zeroed by hand, coefficient changes vs two hand forwards with
plain PyTorch hooks, capability scores vs a hand loop of unpadded forwards (greedy exact match of
the answer tokens; letter argmax for MMLU) with the start token put in front by id."""

from __future__ import annotations

import copy

import pytest
import torch

from bias_lens.benchmarks import capability_data as cd
from bias_lens.benchmarks import evaluate
from bias_lens.lens import LensModel
from bias_lens.locate.general_neurons import (
    capability_accuracy, capability_masking, coefficient_changes, detect_general, position_stats, rank_general,
)

MASKED = ["L0N5", "L1N17"]
PROMPTS = ["The nurse said that", "Two plus two is four . The doctor", "The capital of France is"]
LIMITS = dict(arithmetic_limit=6, mmlu_limit_per_subject=1, mmlu_limit=4, batch_size=3)


def _down_weight(hf, layer: int) -> tuple[torch.Tensor, bool]:
    """The down projection's weight and whether it is stored [in, out] (GPT-2's Conv1D)."""
    if hasattr(hf, "transformer"):
        return hf.transformer.h[layer].mlp.c_proj.weight, True
    return hf.model.layers[layer].mlp.down_proj.weight, False


def _zeroed(lm: LensModel, labels: list[str]) -> LensModel:
    """A copy of the model whose masked neurons' down-projection columns are zero."""
    hf = copy.deepcopy(lm.hf)
    with torch.no_grad():
        for lab in labels:
            layer, k = (int(x) for x in lab[1:].split("N"))
            w, t = _down_weight(hf, layer)
            (w[k] if t else w[:, k]).zero_()
    return LensModel(hf, lm.tokenizer, name="zeroed")


def _sid(lm) -> int:
    tok = lm.tokenizer
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


@pytest.fixture
def long_llama(tiny_llama):
    tiny_llama.hf.config.max_position_embeddings = 8192  # MMLU prompts; RoPE positions are computed on the fly
    return tiny_llama


@torch.no_grad()
def test_hook_masking_equals_zeroed_down_columns(tiny):
    from bias_lens.arch import neurons_to_dict
    from bias_lens.hooks import mask_neurons

    ref = _zeroed(tiny, MASKED)
    for text in PROMPTS:
        ids = torch.tensor([[_sid(tiny)] + list(tiny.tokenizer(text)["input_ids"])])
        with tiny.hooks(mask_neurons(neurons_to_dict(MASKED))):
            got = tiny.hf(input_ids=ids).logits
        want = ref.hf(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, tiny.hf(input_ids=ids).logits)


@torch.no_grad()
def _hand_scores(lm, start: bool) -> dict[str, float]:
    """Arithmetic exact match / answer log-prob and MMLU letter argmax by unpadded forwards."""
    pre = [_sid(lm)] if start else []
    enc = lambda s, sp=True: list(lm.tokenizer(s, add_special_tokens=sp)["input_ids"])  # noqa: E731

    def cont(prompt: str, c: str) -> tuple[float, bool]:
        p, a = pre + enc(prompt), enc(c, False)
        lp = torch.log_softmax(lm.hf(input_ids=torch.tensor([p + a])).logits[0].double(), -1)
        pos = range(len(p) - 1, len(p) + len(a) - 1)
        return sum(float(lp[t, x]) for t, x in zip(pos, a)), all(int(lp[t].argmax()) == x for t, x in zip(pos, a))

    arith = [cont(r["prompt"], r["answer"]) for r in cd.arithmetic_splits()["test"][:6]]
    rows = [cd.mmlu_rows(s, "val")[0] for s in cd.mmlu_subjects()[:4]]
    right, gold = [], []
    for r in rows:
        lps = [cont(cd.mmlu_prompt(r, 0), " " + x)[0] for x in "ABCD"]
        right.append("ABCD"[max(range(4), key=lambda j: lps[j])] == r["answer"])
        gold.append(lps["ABCD".index(r["answer"])])
    return {"arithmetic": sum(h for _, h in arith) / 6, "arithmetic_answer_logprob": sum(a for a, _ in arith) / 6,
            "mmlu": sum(right) / 4, "mmlu_answer_logprob": sum(gold) / 4}


def test_capability_masking_equals_hand_loop(long_llama):
    lm = long_llama
    res = capability_masking(lm, MASKED + ["L2N1"], start_token=True, **LIMITS)
    assert res.neurons == MASKED and res.start_token == "eos-prepended"
    assert res.n_items == {"arithmetic": 6, "mmlu": 4}
    before, after = _hand_scores(lm, True), _hand_scores(_zeroed(lm, MASKED), True)
    assert res.before == pytest.approx(before, rel=1e-6) and res.after == pytest.approx(after, rel=1e-6)
    assert res.before["arithmetic_answer_logprob"] != pytest.approx(res.after["arithmetic_answer_logprob"])


def test_without_start_token_equals_the_suites(long_llama):
    lm = long_llama
    got, n = capability_accuracy(lm, start_token=False, **LIMITS)
    ar = evaluate(lm, "arithmetic", "test", limit=6).metrics
    mm = evaluate(lm, "mmlu", "val", limit=4, limit_per_subject=1).metrics
    assert got["arithmetic"] == ar["accuracy"] and got["arithmetic_answer_logprob"] == pytest.approx(ar["answer_logprob"])
    assert got["mmlu"] == mm["accuracy"] and n == {"arithmetic": 6, "mmlu": 4}
    assert got == pytest.approx(_hand_scores(lm, False), rel=1e-6)


@torch.no_grad()
def _hand_coefficients(lm, prompts: list[str], first: int = 1) -> torch.Tensor:
    """Mean down-projection input (m_k) of layers ``first``.. at position 0 and last (one forward per prompt)."""
    layers = range(first, lm.n_layers)
    out = torch.zeros(2, len(layers), lm.d_mlp, dtype=torch.float64)
    for text in prompts:
        got = {}
        hs = [lm.hf.model.layers[l].mlp.down_proj.register_forward_pre_hook(
            lambda m, a, l=l: got.__setitem__(l, a[0][0].double())) for l in layers]
        lm.hf(input_ids=torch.tensor([[_sid(lm)] + list(lm.tokenizer(text)["input_ids"])]))
        for h in hs:
            h.remove()
        for i, l in enumerate(layers):
            out[0, i] += got[l][0]
            out[1, i] += got[l][-1]
    return out / len(prompts)


def test_coefficient_changes_equal_two_hand_forwards(tiny_llama):
    lm = tiny_llama
    res = coefficient_changes(lm, PROMPTS, MASKED, top_k=5, batch_size=2)
    assert res.layers == [1, 2] and res.n_prompts == 3 and res.start_token == "eos-prepended"
    before, after = _hand_coefficients(lm, PROMPTS), _hand_coefficients(_zeroed(lm, MASKED), PROMPTS)
    for p, rows in enumerate((res.start, res.last)):
        delta = (after[p] - before[p]).abs()
        delta[0, 17] = -1  # L1N17 is masked itself
        want = [f"L{int(i) // lm.d_mlp + 1}N{int(i) % lm.d_mlp}" for i in delta.reshape(-1).topk(5).indices]
        assert [c.label for c in rows] == want
        for c in rows:
            layer, k = (int(x) for x in c.label[1:].split("N"))
            assert c.before == pytest.approx(float(before[p, layer - 1, k]), abs=1e-6)
            assert c.change == pytest.approx(float(after[p, layer - 1, k] - before[p, layer - 1, k]), abs=1e-6)
        assert abs(rows[0].change) >= abs(rows[-1].change) > 0
    assert res.to_dict()["start"][0]["change"] == res.start[0].change


@torch.no_grad()
def test_rank_general_by_start_write(tiny_llama):
    lm = tiny_llama
    general = detect_general(position_stats(lm, PROMPTS, z=0.5), min_frac=0.0)
    ranked = rank_general(lm, general, PROMPTS)
    m0 = _hand_coefficients(lm, PROMPTS[:1], first=0)[0]  # position 0 = the start token alone: one prompt is enough
    want = {f"L{l}N{k}": abs(float(m0[l, k])) * float(_down_weight(lm.hf, l)[0][:, k].double().norm())
            for l in range(lm.n_layers) for k in range(lm.d_mlp)}
    assert ranked.top_labels(5) == sorted(general.labels, key=lambda x: -want[x])[:5]
    for lab in ranked.top_labels(5):
        assert ranked.score_of(lab) == pytest.approx(want[lab], rel=1e-5)
    assert ranked.labels == general.labels and ranked.extras["outsized_frac"] == general.scores.tolist()


def test_start_token_follows_the_result_and_errors(tiny_llama):
    lm = tiny_llama
    stats = position_stats(lm, PROMPTS, z=0.5, start_token=False)
    general = detect_general(stats, min_frac=0.0)
    with pytest.raises(ValueError, match="start_token=True or False"):
        capability_masking(lm, MASKED, **LIMITS)
    lims = dict(LIMITS, mmlu_limit=1)
    lm.hf.config.max_position_embeddings = 8192
    assert capability_masking(lm, general, n=1, **lims).start_token == "first-token"
    with pytest.raises(ValueError, match="at least n"):
        capability_masking(lm, MASKED, n=3, start_token=True, **lims)
    with pytest.raises(ValueError, match="no split"):
        capability_accuracy(lm, start_token=True, arithmetic_split="val")
    with pytest.raises(ValueError, match="arithmetic_limit"):
        capability_accuracy(lm, start_token=True, arithmetic_limit=0)
    with pytest.raises(ValueError, match="last layer"):
        coefficient_changes(lm, PROMPTS, ["L2N0"])
