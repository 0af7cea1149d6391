"""Streamed locate passes (issue 18 item 2) against the full-cache code they replaced as the default.

Oracles: the previous ``collect_last`` / ``neuron_attribution`` / ``head_attribution`` kept here
verbatim (they built the whole float64 last-position cache first), and the layer score's lens run
over the kept ``[layer+1, prompt, d_model]`` residual stack (``residual_pass(keep_last=True)``).
Tolerances, and why:

* per-prompt neuron scores with ``norm="cached"``, BMI, and ``collect_last``: bit-identical (the
  same element-wise operations on the same numbers, batch by batch);
* means over prompts: 1e-12 relative (float64; the streamed path sums each batch, then the batch
  sums, instead of one sum over all prompts: another summation order);
* ``norm="recompute"`` / head outputs: 1e-12 relative in float64, one float32 ulp in the
  ``per_prompt`` output (a matmul over one batch may block its rows differently from one over all);
* the layer score: 1e-6 relative, as any other chunking of the lens (``tests/test_layer_floor.py``).

Memory: :class:`PeakTensorBytes` counts the bytes of live tensor storages created inside it
(deterministic, unlike RSS). From N to 4N prompts a streamed method may grow by its per-prompt
outputs only, less than one float64 ``d_model`` row per prompt; the full cache grows by more
than 90% of its size, which shows the counter sees it.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import build_tiny

from bias_lens.hooks import record_into
from bias_lens.locate import attribution as A
from bias_lens.locate.attribution import LastCache, collect_last, head_attribution, iter_last, neuron_attribution
from bias_lens import load_model
from bias_lens.locate.layers import bmi, layer_scale, layer_scale_and_bmi, lens_probs, lens_weights, residual_pass
from bias_lens.scoring import check_prompts, iter_batches
from bias_lens.targets import resolve_targets

PROMPTS = [
    "The nurse laughed because",
    "The carpenter went home because he was tired and",
    "Two plus",
    "The doctor said that",
    "def find_best_bakers ( bakers , gender ) : return",
    "The surgeon went home because",
    "The teacher said that she",
]
F32_ULP = 2.0**-23


# --------------------------------------------------------------------------- the previous code (oracle)
@torch.no_grad()
def old_collect_last(lm, prompts, *, batch_size=32):
    """``collect_last`` before streaming (verbatim, progress bar dropped)."""
    prompts = check_prompts(prompts)
    L, n = lm.n_layers, len(prompts)
    kinds = ("resid_pre", "resid_mid", "attn.z", "mlp.post")
    points = [f"L{l}.{k}" for l in range(L) for k in kinds] + [f"L{L - 1}.resid_post"]
    out = {}
    body = A.base_model(lm)
    for b in iter_batches(lm.tokenizer, prompts, batch_size, device=lm.device):
        store = {}
        with lm.hooks(record_into(store, points, index=b.last)):
            body(**b.model_inputs())
        for p, v in store.items():
            if p not in out:
                out[p] = torch.empty(n, v.shape[-1], dtype=torch.float64)
            out[p][b.rows] = v.double().cpu()
    stack = lambda k: torch.stack([out[f"L{l}.{k}"] for l in range(L)])  # noqa: E731
    return LastCache(stack("resid_pre"), stack("resid_mid"), stack("attn.z"), stack("mlp.post"), out[f"L{L - 1}.resid_post"])


def old_neuron_scores(lm, cache, ts, layer, norm="cached"):
    """``neuron_scores`` before the per-layer read was hoisted (verbatim)."""
    fn, u, V = A.norm_parts(lm.final_norm, lm.arch.norm), A.logit_diff_dir(lm, ts), A.value_vectors(lm, layer)
    m, x = cache.mlp_post[layer], cache.resid_mid[layer]
    r = fn.read_dir(u)
    if norm == "cached":
        return m * (r @ V)[None, :] / fn.scale(cache.final)
    d = x.shape[-1]
    xc, Vc = fn.center(x), fn.center(V.T).T
    s0 = torch.sqrt(xc.pow(2).mean(-1) + fn.eps)
    s1 = torch.sqrt((xc.pow(2).sum(-1)[:, None] + 2 * m * (xc @ Vc) + m.pow(2) * Vc.pow(2).sum(0)[None]) / d + fn.eps)
    a0 = x @ r
    return (a0[:, None] + m * (r @ V)[None]) / s1 - (a0 / s0)[:, None]


def old_neuron_attribution(lm, prompts, *, norm="cached", rank="abs", layers=None, batch_size=32):
    """(score, signed, float32 per-prompt) of the previous ``neuron_attribution`` over a full cache."""
    ts = A.check_pair(lm, "he,she")
    layers = list(range(lm.n_layers)) if layers is None else layers
    cache = old_collect_last(lm, prompts, batch_size=batch_size)
    per = torch.cat([old_neuron_scores(lm, cache, ts, l, norm) for l in layers], 1)
    signed = per.mean(0)
    score = {"abs": signed.abs(), "mean_abs": per.abs().mean(0), "signed": signed}[rank]
    return score, signed, per.float()


def old_head_attribution(lm, prompts, *, norm="cached", o_bias_mode="baseline", batch_size=32):
    """(score, float32 per-prompt) of the previous ``head_attribution`` (abs rank) over a full cache."""
    ts = A.check_pair(lm, "he,she")
    cache = old_collect_last(lm, prompts, batch_size=batch_size)
    per = torch.cat([A.head_scores(lm, cache, ts, l, norm, o_bias_mode) for l in range(lm.n_layers)], 1)
    return per.mean(0).abs(), per.float()


def close64(got, want):
    """Equal up to float64 summation order: 1e-12 of the largest magnitude."""
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-12, atol=1e-12 * float(want.abs().max()))


# --------------------------------------------------------------------------- the cache and its batches
def test_collect_last_unchanged(tiny):
    """Assembled from :func:`iter_last`'s batches, the cache is bit-identical to the previous one."""
    got, want = collect_last(tiny, PROMPTS, batch_size=3), old_collect_last(tiny, PROMPTS, batch_size=3)
    for name in ("resid_pre", "resid_mid", "attn_z", "mlp_post", "final"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_iter_last_rows_cover_each_prompt_once(tiny_llama):
    full = collect_last(tiny_llama, PROMPTS, batch_size=3)
    seen = []
    for rows, c in iter_last(tiny_llama, PROMPTS, batch_size=3):
        assert c.mlp_post.shape[1] == len(rows) <= 3
        assert torch.equal(c.mlp_post, full.mlp_post[:, rows]) and torch.equal(c.final, full.final[rows])
        seen += rows
    assert sorted(seen) == list(range(len(PROMPTS)))


# --------------------------------------------------------------------------- neurons and heads
@pytest.mark.parametrize("rank", ["abs", "mean_abs", "signed"])
@pytest.mark.parametrize("norm", ["cached", "recompute"])
def test_streamed_neurons_equal_full_cache(tiny, norm, rank):
    score, signed, per = old_neuron_attribution(tiny, PROMPTS, norm=norm, rank=rank, batch_size=3)
    res = neuron_attribution(tiny, PROMPTS, norm=norm, rank=rank, batch_size=3, keep_per_prompt=True)
    if norm == "cached":
        assert torch.equal(res.per_prompt, per)
    else:
        torch.testing.assert_close(res.per_prompt, per, rtol=F32_ULP, atol=F32_ULP * float(per.abs().max()))
    close64(res.scores, score)
    close64(res.extras["signed"], signed.float())
    assert res.n_samples == len(PROMPTS)
    short = neuron_attribution(tiny, PROMPTS, norm=norm, rank=rank, batch_size=3)  # no per-prompt matrix
    assert short.per_prompt is None and torch.equal(short.scores, res.scores)


@pytest.mark.parametrize("norm", ["cached", "recompute"])
def test_cache_path_unchanged(tiny, norm):
    """A caller passing a cache gets the previous numbers exactly (it runs the previous reduction)."""
    for rank in ("abs", "mean_abs"):
        score, signed, per = old_neuron_attribution(tiny, PROMPTS, norm=norm, rank=rank, layers=[0, 2])
        res = neuron_attribution(tiny, PROMPTS, norm=norm, rank=rank, layers=[0, 2], keep_per_prompt=True,
                                 cache=collect_last(tiny, PROMPTS))
        assert torch.equal(res.scores, score) and torch.equal(res.per_prompt, per)
        assert torch.equal(res.extras["signed"], signed.float())


def test_streamed_neurons_batch_of_one(tiny_llama):
    """One prompt per batch (every batch a different length); the oracle runs the same batches (the
    forward's float32 activations depend on the batch shapes)."""
    score, _, _ = old_neuron_attribution(tiny_llama, PROMPTS, rank="mean_abs", layers=[1], batch_size=1)
    res = neuron_attribution(tiny_llama, PROMPTS, batch_size=1, layers=[1], rank="mean_abs")
    close64(res.scores, score)
    assert res.labels == [f"L1N{k}" for k in range(tiny_llama.d_mlp)]


@pytest.mark.parametrize("o_bias_mode", ["baseline", "split"])
@pytest.mark.parametrize("norm", ["cached", "recompute"])
def test_streamed_heads_equal_full_cache(tiny, norm, o_bias_mode):
    score, per = old_head_attribution(tiny, PROMPTS, norm=norm, o_bias_mode=o_bias_mode, batch_size=3)
    res = head_attribution(tiny, PROMPTS, norm=norm, o_bias_mode=o_bias_mode, batch_size=3)
    torch.testing.assert_close(res.per_prompt, per, rtol=F32_ULP, atol=F32_ULP * float(per.abs().max()))
    close64(res.scores, score)
    cached = head_attribution(tiny, PROMPTS, norm=norm, o_bias_mode=o_bias_mode,
                              cache=collect_last(tiny, PROMPTS, batch_size=3))
    assert torch.equal(cached.scores, score) and torch.equal(cached.per_prompt, per)


# --------------------------------------------------------------------------- layer score and BMI
@pytest.mark.parametrize("norm", ["recompute", "cached"])
def test_streamed_layer_score_equals_kept_stack(tiny, norm):
    """The lens per batch equals the lens over the whole kept residual stack (the previous path)."""
    ids = resolve_targets(tiny.tokenizer, "he,she").first_ids
    rp = residual_pass(tiny, PROMPTS, batch_size=3, bmi=True)
    p = lens_probs(tiny, rp.last, ids, norm=norm, final=rp.last[-1])
    per = (p[1:] - p[:-1]).abs().sum(-1).T
    res = layer_scale(tiny, PROMPTS, norm=norm, batch_size=3)
    torch.testing.assert_close(res.per_prompt, per, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(torch.tensor(res.extras["p_targets"], dtype=torch.float64), p.mean(1), rtol=1e-6, atol=1e-12)
    lay, blk = layer_scale_and_bmi(tiny, PROMPTS, norm=norm, batch_size=3)
    assert torch.equal(lay.per_prompt, res.per_prompt)
    assert torch.equal(blk.per_prompt, rp.bmi) and torch.equal(bmi(tiny, PROMPTS, batch_size=3).per_prompt, rp.bmi)


@pytest.mark.parametrize("norm", ["recompute", "cached"])
def test_streamed_layer_score_bf16(tiny_tokenizer_dir, tmp_path, norm):
    """Half precision: the streamed lens reuses one float32 upcast of W_U across batches and gives
    the numbers of the float32 lens over the whole kept bf16 stack (1e-6: chunking, as above)."""
    build_tiny("llama", tiny_tokenizer_dir, tmp_path / "llama")
    lm = load_model(tmp_path / "llama", dtype="bfloat16")
    ids = resolve_targets(lm.tokenizer, "he,she").first_ids
    rp = residual_pass(lm, PROMPTS, batch_size=3)
    assert rp.last.dtype == torch.bfloat16
    p = lens_probs(lm, rp.last, ids, norm=norm, final=rp.last[-1])
    torch.testing.assert_close(layer_scale(lm, PROMPTS, norm=norm, batch_size=3).per_prompt,
                               (p[1:] - p[:-1]).abs().sum(-1).T, rtol=1e-6, atol=1e-12)
    lw = lens_weights(lm, 4, torch.bfloat16)  # smaller than the rows below: lens_probs makes its own buffer
    assert lw.w.dtype == torch.float32 and torch.equal(lens_probs(lm, rp.last, ids, norm=norm, final=rp.last[-1],
                                                                  weights=lw), p)


def test_residual_pass_streamed_fields(tiny_llama):
    ids = resolve_targets(tiny_llama.tokenizer, "he,she").first_ids
    kept = residual_pass(tiny_llama, PROMPTS, batch_size=2, target_ids=ids)
    streamed = residual_pass(tiny_llama, PROMPTS, batch_size=2, target_ids=ids, keep_last=False)
    assert streamed.last is None and streamed.bmi is None and kept.last is not None
    assert torch.equal(streamed.probs, kept.probs)
    assert residual_pass(tiny_llama, PROMPTS).probs is None  # the default pass is unchanged


# --------------------------------------------------------------------------- memory held vs prompt count
class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of live CPU tensor storages created by the ops run inside (views counted once)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors on it]
        self.cur = self.peak = 0

    def _release(self, key: int) -> None:
        ent = self.live.get(key)
        if ent is not None:
            ent[1] -= 1
            if ent[1] == 0:
                self.cur -= ent[0]
                del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr():
                st = t.untyped_storage()
                ent = self.live.setdefault(st.data_ptr(), [st.nbytes(), 0])
                if ent[1] == 0:
                    self.cur += ent[0]
                    self.peak = max(self.peak, self.cur)
                ent[1] += 1
                weakref.finalize(t, self._release, st.data_ptr())
        return out


def peak_bytes(fn) -> int:
    with PeakTensorBytes() as m:
        out = fn()
    del out
    return m.peak


CALLS = {
    "neuron_attribution": lambda lm, P: neuron_attribution(lm, P, batch_size=4),
    "head_attribution": lambda lm, P: head_attribution(lm, P, batch_size=4),
    "layer_scale": lambda lm, P: layer_scale(lm, P, batch_size=4),
    "bmi": lambda lm, P: bmi(lm, P, batch_size=4),
    "layer_scale_and_bmi": lambda lm, P: layer_scale_and_bmi(lm, P, batch_size=4),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_memory_held_does_not_grow_with_prompts(tiny_llama, name):
    """N -> 4N prompts: growth below one float64 d_model row per extra prompt (per-prompt outputs only)."""
    lm, n = tiny_llama, 8
    few, many = PROMPTS[:4] * 2, PROMPTS[:4] * 8  # same prompts, so the same batch shapes
    grow = peak_bytes(lambda: CALLS[name](lm, many)) - peak_bytes(lambda: CALLS[name](lm, few))
    assert grow < 3 * n * lm.d_model * 8, f"{name} holds {grow / (3 * n):.0f} more bytes per extra prompt"


def test_memory_counter_sees_the_full_cache(tiny_llama):
    """The full cache (the path for callers passing one) grows by its float64 size: the counter sees it;
    ``keep_per_prompt=True`` grows by its float32 output only."""
    lm, n = tiny_llama, 8
    few, many = PROMPTS[:4] * 2, PROMPTS[:4] * 8
    row = (lm.n_layers * (2 * lm.d_model + lm.n_heads * lm.d_head + lm.d_mlp) + lm.d_model) * 8  # one prompt's cache
    via_cache = lambda P: neuron_attribution(lm, P, cache=collect_last(lm, P, batch_size=4))  # noqa: E731
    assert peak_bytes(lambda: via_cache(many)) - peak_bytes(lambda: via_cache(few)) >= 0.9 * 3 * n * row
    keep = lambda P: neuron_attribution(lm, P, batch_size=4, keep_per_prompt=True)  # noqa: E731
    out_row = lm.n_layers * lm.d_mlp * 4
    grow = peak_bytes(lambda: keep(many)) - peak_bytes(lambda: keep(few))
    assert 0.9 * 3 * n * out_row <= grow < 3 * n * (out_row + lm.d_model * 8)


# --------------------------------------------------------------------------- SmolLM2 (real vocabulary)
@pytest.mark.integration
def test_smol_streamed_equal_full(smol, one_thread):
    """On the real 49,152-token vocabulary the per-batch lens chunks differ from the whole-stack ones."""
    prompts = [f"The {p} said that" for p in ("nurse", "doctor", "engineer", "secretary", "baker")] * 6
    ids = resolve_targets(smol.tokenizer, "he,she").first_ids
    rp = residual_pass(smol, prompts, batch_size=16)
    p = lens_probs(smol, rp.last, ids, final=rp.last[-1])
    torch.testing.assert_close(layer_scale(smol, prompts, batch_size=16).per_prompt,
                               (p[1:] - p[:-1]).abs().sum(-1).T, rtol=1e-6, atol=1e-12)
    a = neuron_attribution(smol, prompts, batch_size=16, layers=[3, 29])
    b = neuron_attribution(smol, prompts, cache=collect_last(smol, prompts, batch_size=16), layers=[3, 29])
    close64(a.scores, b.scores)
