"""Bias tracing (bias_lens.locate.tracing) on a hand-built two-layer Llama whose answers are known.

The model is a real ``LlamaForCausalLM`` (2 layers, d_model 16, 2 heads of 8, no GQA, SwiGLU MLP
of 32, untied unembedding, float64, the tiny test tokenizer) whose weights are random except where
set by hand. Two exact facts make it analysable:

* ``o_proj = 0`` makes a layer's attention output exactly 0 whatever its pattern, and
  ``down_proj = 0`` does the same for its MLP: that sub-block is then the identity on the residual;
* ``q_proj = 0`` makes every attention score exactly 0 (RoPE rotates the zero query to zero), so
  the causal softmax is exactly uniform: position ``t`` gets ``o_proj(mean_{u <= t} v_u)``.

A layer with live attention always has ``q_proj = 0``, so the whole forward pass is a closed
formula, written below in plain float64 torch from the weight tensors (no HF module, no bias_lens
code): RMSNorm ``x / sqrt(mean(x^2) + eps) * w``, SwiGLU, the cumulative-mean attention, final
norm, unembedding, log-softmax. The noise follows the convention of tracing.py's docstring (one
``torch.Generator`` seeded with ``seed`` per sentence, one float64 ``randn(S, e - b, d) * std``
draw per span in span order), drawn here by hand.

Cases (sentences whose token spans are checked first, the subject one token at position 3):

* **A, nothing mixes, no MLP** (every ``o_proj`` and ``down_proj`` 0): each position's logits depend
  on its own input embedding only, so the noise on the subject ``s`` changes only the prediction
  made at ``s``, and the gap only through it (the attribute follows the subject). Restoring the
  block output at ``s`` in either layer gives the clean run exactly (recovery 1), anywhere else
  the corrupted run exactly (recovery 0); every ``attn`` / ``mlp`` restoration swaps 0 for 0
  (recovery 0). The clean and corrupted gaps equal a bigram formula.
* **B, only the layer-0 MLP** (``o_proj`` 0 everywhere, ``down_proj`` 0 in layer 1): the final
  residual at ``p`` is ``x_p + MLP0(x_p)``. Restoring ``mlp`` at (layer 0, ``s``) gives
  ``x_s + noise + MLP0(clean x_s)``, computed by hand; MLP1 and off-subject restorations give 0,
  the block outputs at ``s`` give 1; ROME's window (2 layers: layer 1's window is [0, 1]) carries
  the layer-0 value to layer 1.
* **C, layer-1 attention routes the subject forward** (everything 0 but layer 1's attention; the
  embedding column 0 is non-zero only for the subject token and layer 1's ``v_proj`` reads only
  column 0, so only the subject position carries a value): position ``t >= s`` gets
  ``o_proj(v(x_s)) / (t + 1)``. The subject is far before the attribute, so its own prediction is
  the same in both sentences and the gap moves only through that routed value. Restoring the
  layer-0 block output at ``s`` cleans everything (1); restoring layer-1 attention at ``t > s``
  equals restoring layer-1's block output there; the signed recoveries of the last layer's block
  output sum to 1 over positions (each restores one disjoint row of logits); values by hand.
* **Full** (every weight random, ``q_proj = 0`` in both layers): every restoration of every
  component, layer and position, window 2, two-span subjects (overlapping in one item), both gap
  readings and both noise modes, against the hand forward pass with the restorations written in.
"""

from __future__ import annotations

import pytest
import torch

from bias_lens.locate.tracing import bias_trace, restored_gaps
from bias_lens.locate.tracing_data import prepare_item

D, F, HEADS, EPS = 16, 32, 2, 1e-5
F64 = torch.float64
SEED, S = 11, 2  # noise seed, noise samples


def _item(anti: str, stereo: str, subject: list[str]) -> dict:
    return {"id": "h", "data": {"anti-stereotype": {"sentence": anti}, "stereotype": {"sentence": stereo}},
            "subject": subject}


SHORT = _item("The nurse laughed .", "The nurse went .", ["nurse"])  # attribute right after the subject
LONG = _item("The nurse laughed because he was happy .", "The nurse laughed because he was tired .", ["nurse"])
TWO = _item("The doctor went home because she was tired .", "The doctor went home because he was tired .",
            ["doctor", "home"])
OVERLAP = _item("The secretary laughed because he was happy .", "The secretary laughed because she was happy .",
                ["secretary", "secret"])


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _build(tok, *, attn=(False, False), mlp=(False, False), route_token=None, seed=0):
    """The hand-built Llama: layer l's attention (``o_proj``) / MLP (``down_proj``) live iff ``attn[l]``
    / ``mlp[l]``; a live attention has ``q_proj = 0`` (uniform), a dead one keeps a random ``q``.
    ``route_token``: embedding column 0 is 0 except for that token, and layer 1's ``v_proj`` reads
    column 0 only. Returns the LensModel and the weights as float64 tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bias_lens.lens import LensModel

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=D, intermediate_size=F, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=64,
                      tie_word_embeddings=False, rms_norm_eps=EPS, attention_bias=False, mlp_bias=False)
    model = LlamaForCausalLM(cfg).to(F64).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=F64))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / (p.shape[1] ** 0.5 if p.ndim == 2 else 1))
        emb = model.model.embed_tokens.weight
        emb.mul_(D ** 0.5)  # entries ~ N(0, 1)
        for layer, blk in enumerate(model.model.layers):
            if attn[layer]:
                blk.self_attn.q_proj.weight.zero_()
            else:
                blk.self_attn.o_proj.weight.zero_()
            if not mlp[layer]:
                blk.mlp.down_proj.weight.zero_()
        if route_token is not None:
            emb[:, 0] = 0.0
            emb[route_token, 0] = 2.5
            model.model.layers[1].self_attn.v_proj.weight[:, 1:] = 0.0
    W = {k: v.detach().to(F64).clone() for k, v in model.state_dict().items()}
    return LensModel(model, tok, name="handbuilt"), W


# --------------------------------------------------------------------------- by hand
def _rms(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * w


def _mlp(W, layer, h):
    p = f"model.layers.{layer}."
    n = _rms(h, W[p + "post_attention_layernorm.weight"])
    gate, up = n @ W[p + "mlp.gate_proj.weight"].T, n @ W[p + "mlp.up_proj.weight"].T
    return (gate * torch.sigmoid(gate) * up) @ W[p + "mlp.down_proj.weight"].T


def _attn(W, layer, h):
    """``o_proj`` of the causal mean of the values: exact when ``q_proj = 0`` (uniform) or ``o_proj = 0``."""
    p = f"model.layers.{layer}."
    v = _rms(h, W[p + "input_layernorm.weight"]) @ W[p + "self_attn.v_proj.weight"].T
    mean = v.cumsum(-2) / torch.arange(1, h.shape[-2] + 1, dtype=F64)[:, None]
    return mean @ W[p + "self_attn.o_proj.weight"].T


def _forward(W, x, restore=None, clean=None):
    """Final residual ``[S, T, d]`` and the activations; ``restore[(layer, kind)]`` = positions whose
    ``clean[(layer, kind)]`` values ``[T, d]`` are written back (kind: attn, mlp, resid)."""
    acts = {}

    def put(v, key):
        for t in (restore or {}).get(key, ()):
            v = v.clone()
            v[:, t] = clean[key][t]
        acts[key] = v
        return v

    h = x
    for layer in range(2):
        h = h + put(_attn(W, layer, h), (layer, "attn"))
        h = h + put(_mlp(W, layer, h), (layer, "mlp"))
        h = put(h, (layer, "resid"))
    return h, acts


def _score(W, final, ids):
    """Mean over noise samples of the mean log p of tokens 1.. (BOS first): ``final`` is ``[S, T, d]``."""
    logits = _rms(final, W["model.norm.weight"]) @ W["lm_head.weight"].T
    lp = torch.log_softmax(logits[:, :-1], -1)
    tg = torch.tensor(ids[1:])
    return float(lp[:, torch.arange(len(tg)), tg].mean())


def _noisy(W, ids, spans, std, mode="add"):
    """``[S, T, d]`` input embeddings with the subject noise of tracing.py's convention, by hand."""
    x = W["model.embed_tokens.weight"][torch.tensor(ids)].repeat(S, 1, 1)
    g = torch.Generator().manual_seed(SEED)
    for b, e in spans:
        z = torch.randn((S, e - b, D), generator=g, dtype=F64) * std
        x[:, b:e] = z if mode == "replace" else x[:, b:e] + z
    return x


def _gap(anti, stereo, gap="abs"):
    return abs(anti - stereo) if gap == "abs" else stereo - anti


def _both(it, fn, gap="abs"):
    """Gap of ``fn(ids, spans) -> score`` over the two sentences."""
    return _gap(fn(it.anti_ids, it.anti_spans), fn(it.stereo_ids, it.stereo_spans), gap)


def _prepare(tok, raw):
    it = prepare_item(tok, raw)
    assert it is not None
    return it


# --------------------------------------------------------------------------- tests
def test_items_tokenize_as_assumed(tok):
    short, long_, two, over = (_prepare(tok, x) for x in (SHORT, LONG, TWO, OVERLAP))
    assert short.tokens == ("<|endoftext|>", "The", " ", "nurse", " laughed/ went", " .")
    assert short.anti_spans == short.stereo_spans == ((3, 4),) and short.attr_positions == (4,)
    assert long_.tokens[3] == "nurse" and long_.anti_spans == long_.stereo_spans == ((3, 4),)
    assert long_.attr_positions == (8,) and long_.n_tokens == 10
    assert list(long_.anti_ids).count(long_.anti_ids[3]) == 1  # the subject token occurs once
    assert two.anti_spans == two.stereo_spans == ((3, 4), (5, 6)) and two.attr_positions == (7,)
    assert over.tokens[3:5] == ("secret", "ary")
    assert over.anti_spans == over.stereo_spans == ((3, 5), (3, 4))  # overlapping: position 3 gets both draws


def test_no_mixing_no_mlp_the_effect_sits_in_the_residual_at_the_subject(tok):
    lm, W = _build(tok, seed=1)
    it = _prepare(tok, SHORT)
    s, std = 3, 1.5
    res = bias_trace(lm, [it], n_noise=S, noise_std=0.5, noise_scale=3.0, window=2, seed=SEED, batch_size=8)
    tr = res.items[0]
    # bigram formula: logits at p = W_U rms(embedding of token p); the noise only at the subject
    assert tr.clean_gap == pytest.approx(_both(it, lambda ids, sp: _score(W, _noisy(W, ids, (), std), ids)), abs=1e-6)
    assert tr.corrupted_gap == pytest.approx(_both(it, lambda ids, sp: _score(W, _noisy(W, ids, sp, std), ids)),
                                             abs=1e-6)
    assert abs(tr.clean_gap - tr.corrupted_gap) > 1e-2
    want = torch.zeros(3, 2, it.n_tokens, dtype=F64)
    want[0, :, s] = 1.0  # resid at the subject, either layer
    torch.testing.assert_close(tr.recovery, want, atol=1e-6, rtol=0)


def test_only_the_layer0_mlp_matters(tok):
    lm, W = _build(tok, mlp=(True, False), seed=3)
    it = _prepare(tok, SHORT)
    s, std = 3, 1.5

    def final(ids, spans, restore_mlp0_at_s=False):
        x = _noisy(W, ids, spans, std)
        m = _mlp(W, 0, x)
        if restore_mlp0_at_s:
            m[:, s] = _mlp(W, 0, _noisy(W, ids, (), std))[0, s]
        return x + m

    clean = _both(it, lambda ids, sp: _score(W, final(ids, ()), ids))
    corrupted = _both(it, lambda ids, sp: _score(W, final(ids, sp), ids))
    by_hand = _both(it, lambda ids, sp: _score(W, final(ids, sp, True), ids))
    frac = (by_hand - corrupted) / (clean - corrupted)
    assert abs(clean - corrupted) > 1e-2 and 0.05 < abs(frac) and abs(frac - 1) > 0.05  # a partial recovery

    specs = [(), (("L0.mlp.out", s),), (("L1.mlp.out", s),), (("L0.mlp.out", s + 1),), (("L0.mlp.out", s - 1),),
             (("L0.resid_post", s),), (("L1.resid_post", s),), (("L0.attn.out", s),), (("L1.attn.out", s),)]
    cg, g = restored_gaps(lm, it, specs, noise_std=std, n_noise=S, seed=SEED, batch_size=8)
    assert cg == pytest.approx(clean, abs=1e-6)
    assert float(g[0]) == pytest.approx(corrupted, abs=1e-6)
    assert float(g[1]) == pytest.approx(by_hand, abs=1e-6)
    for k in (2, 3, 4, 7, 8):  # MLP1 is 0; off the subject the MLP input is clean anyway; attention is 0
        assert float(g[k]) == pytest.approx(float(g[0]), abs=1e-9), specs[k]
    assert float(g[5]) == pytest.approx(cg, abs=1e-9) and float(g[6]) == pytest.approx(cg, abs=1e-9)

    # bias_trace, window 2: mlp at layer 0 restores [L0]; at layer 1 ROME's window is [L0, L1]
    tr = bias_trace(lm, [it], components=("mlp",), n_noise=S, noise_std=std, noise_scale=1.0, window=2,
                    seed=SEED, batch_size=8).items[0]
    want = torch.zeros(2, it.n_tokens, dtype=F64)
    want[:, s] = frac
    torch.testing.assert_close(tr.recovery[0], want, atol=1e-6, rtol=0)


def test_layer1_attention_routes_the_subject_to_later_positions(tok):
    it = _prepare(tok, LONG)
    s, a, T, std = 3, 8, it.n_tokens, 1.5
    lm, W = _build(tok, attn=(False, True), route_token=it.anti_ids[s], seed=1)
    o1 = W["model.layers.1.self_attn.o_proj.weight"]
    v1 = W["model.layers.1.self_attn.v_proj.weight"]
    n1 = W["model.layers.1.input_layernorm.weight"]

    def final(ids, spans, restore=()):
        """x_t + [t >= s] o(v(rms(x_s))) / (t + 1); ``restore`` = positions whose routed value is clean."""
        x = _noisy(W, ids, spans, std)
        routed = (_rms(x[:, s], n1) @ v1.T) @ o1.T  # [S, d]
        clean_routed = (_rms(_noisy(W, ids, (), std)[0, s], n1) @ v1.T) @ o1.T
        add = torch.zeros_like(x)
        for t in range(s, T):
            add[:, t] = (clean_routed if t in restore else routed) / (t + 1)
        return x + add

    clean = _both(it, lambda ids, sp: _score(W, final(ids, ()), ids), "signed")
    corrupted = _both(it, lambda ids, sp: _score(W, final(ids, sp), ids), "signed")
    assert abs(clean - corrupted) > 1e-3

    res = bias_trace(lm, [it], n_noise=S, noise_std=std, noise_scale=1.0, window=1, seed=SEED, batch_size=12,
                     gap="signed")
    tr = res.items[0]
    assert tr.clean_gap == pytest.approx(clean, abs=1e-6) and tr.corrupted_gap == pytest.approx(corrupted, abs=1e-6)
    rec = tr.recovery
    resid, mlp, attn = rec[0], rec[1], rec[2]
    # layer-0 block output at the subject: every later position is clean again
    want0 = torch.zeros(T, dtype=F64)
    want0[s] = 1.0
    torch.testing.assert_close(resid[0], want0, atol=1e-6, rtol=0)
    # only the predictions at a - 1 and a differ between the sentences; last-layer rows are disjoint
    assert resid[1].sum().item() == pytest.approx(1.0, abs=1e-6)
    others = [t for t in range(T) if t not in (a - 1, a)]
    torch.testing.assert_close(resid[1, others], torch.zeros(len(others), dtype=F64), atol=1e-6, rtol=0)
    assert min(abs(resid[1, a - 1].item()), abs(resid[1, a].item())) > 1e-3
    # attention at t > s carries the only corrupted thing at t; at s the residual stays noisy
    torch.testing.assert_close(attn[1, s + 1:], resid[1, s + 1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(attn[1, :s + 1], torch.zeros(s + 1, dtype=F64), atol=1e-6, rtol=0)
    torch.testing.assert_close(attn[0], torch.zeros(T, dtype=F64), atol=1e-6, rtol=0)
    torch.testing.assert_close(mlp, torch.zeros(2, T, dtype=F64), atol=1e-6, rtol=0)
    for t in (a - 1, a):  # the restored gaps themselves, by the routed-value formula
        by_hand = _both(it, lambda ids, sp, t=t: _score(W, final(ids, sp, (t,)), ids), "signed")
        assert tr.restored[2, 1, t].item() == pytest.approx(by_hand, abs=1e-6)


@pytest.mark.parametrize("raw,gap,mode", [(OVERLAP, "abs", "add"), (TWO, "signed", "replace")])
def test_every_restoration_matches_the_hand_forward(tok, raw, gap, mode):
    lm, W = _build(tok, attn=(True, True), mlp=(True, True), seed=2)
    it = _prepare(tok, raw)
    std = 1.5
    res = bias_trace(lm, [it], n_noise=S, noise_std=std, noise_scale=1.0, window=2, seed=SEED, batch_size=16,
                     gap=gap, noise_mode=mode)
    tr = res.items[0]

    def run(restore, corrupt=True):
        def one(ids, spans):
            _, clean_acts = _forward(W, _noisy(W, ids, (), std))
            clean_acts = {k: v[0] for k, v in clean_acts.items()}
            final, _ = _forward(W, _noisy(W, ids, spans if corrupt else (), std, mode), restore, clean_acts)
            return _score(W, final, ids)
        return _both(it, one, gap)

    assert tr.clean_gap == pytest.approx(run({}, corrupt=False), abs=1e-6)
    assert tr.corrupted_gap == pytest.approx(run({}), abs=1e-6)
    windows = {0: [0], 1: [0, 1]}  # ROME's [l - 1, l + 1) clipped to the 2 layers
    for c, kind in enumerate(("resid", "mlp", "attn")):
        for layer in range(2):
            layers = [layer] if kind == "resid" else windows[layer]
            for t in range(it.n_tokens):
                want = run({(m, kind): [t] for m in layers})
                assert tr.restored[c, layer, t].item() == pytest.approx(want, abs=1e-6), (kind, layer, t)
    assert abs(tr.clean_gap - tr.corrupted_gap) > 1e-3
