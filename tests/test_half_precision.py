"""Half precision end to end (docs/half_precision.md): loading and ``--dtype``, scores that stay
stable in bfloat16, float32-vs-bfloat16 agreement of the locators, and bfloat16 edits.

Tolerances are derived from bfloat16's precision, not fitted to the measurements:

* ``U = 2**-8``: bfloat16 keeps 8 significant bits (~2.4 decimal digits); one rounding moves a
  value by at most ``U/2`` of its size.
* The residual stream is written ``2L + 1`` times (embedding, then attention and MLP outputs of
  each block), each write rounded. Worst case (errors add): a residual is known to
  ``eps = (2L + 1) U / 2`` of its size (tiny model, L = 3: 3.5 U = 1.4 %). Over 30 layers the
  worst case is vacuous, so the SmolLM2 test uses the typical (random-walk) accumulation
  ``eps = sqrt(2L + 1) U / 2`` (3.9 U = 1.5 %).
* From ``eps``: a logit-lens logit ``W_U[v] . x`` moves by at most ``eps * Lam`` with
  ``Lam = max_v |W_U[v]| * |x|``, so ``|d log p| <= 2 eps Lam`` (target logit and log-partition)
  and ``|dp| <= p * expm1(2 eps Lam)``; a layer score ``sum_t |p' - p|`` moves by at most that
  relative amount of ``sum_t (p' + p)``. A cosine moves by at most ``2 eps`` per vector, so
  ``|d BMI| <= 4 eps``. An attribution score ``m (r . v) / s`` (an activation that is a product
  of two rounded projections of the residual, divided by the final norm's scale) moves by at
  most ``(3 eps + 3 U)`` of the prompt's largest score. Rankings: a label can leave the top 20
  only if its score is within the tolerance of the 20th; we require >= 16 of 20 (0.8).

The stability tests hold a bfloat16 model's scores against a float64 recomputation from that
same model's own activations (plain torch / transformers): scoring adds no error of its own.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from bias_lens.cli import DTYPE_NAMES, main
from bias_lens.edit.edits import Edit, bits
from bias_lens.edit.export import MANIFEST, export_checkpoint
from bias_lens.edit.finetune import FinetuneConfig, masked_finetune
from bias_lens.edit.masks import mask_from_labels
from bias_lens.lens import load_model
from bias_lens.loading import DTYPES, resolve_dtype
from bias_lens.locate.attribution import neuron_attribution
from bias_lens.locate.gradients import row_scale
from bias_lens.locate.layers import layer_scale_and_bmi, residual_pass
from bias_lens.locate.modules import module_scale
from bias_lens.scoring import target_logprobs
from bias_lens.targets import resolve_targets
from conftest import PROFESSIONS, build_tiny

U = 2.0**-8
BF16 = torch.bfloat16
TOP_K, MIN_OVERLAP = 20, 0.8
PROMPTS = [f"The {p} laughed because" for p in PROFESSIONS] + [f"The {p} went home because" for p in PROFESSIONS]


def eps_worst(n_layers: int) -> float:
    """Worst-case relative error of a bf16 residual after 2L + 1 rounded writes."""
    return (2 * n_layers + 1) * U / 2


def eps_typical(n_layers: int) -> float:
    """Typical (random-walk) relative error of a bf16 residual after 2L + 1 rounded writes."""
    return math.sqrt(2 * n_layers + 1) * U / 2


@pytest.fixture
def pair(tiny_tokenizer_dir, tmp_path):
    """(float32 tiny Llama, the same checkpoint loaded in bfloat16, its folder)."""
    folder = tmp_path / "llama"
    lm32 = build_tiny("llama", tiny_tokenizer_dir, folder)
    return lm32, load_model(folder, dtype="bfloat16"), folder


def _overlap(a, b, k: int = TOP_K) -> float:
    return len(set(a.top_labels(k)) & set(b.top_labels(k))) / k


# --------------------------------------------------------------------------- loading and the CLI
def test_resolve_dtype_accepts_names_and_dtypes_and_names_the_choices():
    assert resolve_dtype(None) is torch.float32
    for name, dt in DTYPES.items():
        assert resolve_dtype(name) is dt and resolve_dtype(dt) is dt
    assert tuple(DTYPES) == DTYPE_NAMES == ("float32", "bfloat16", "float16")  # the CLI's list is the library's
    for bad in ("bf16", "int8", torch.int8, torch.float64, 16):
        with pytest.raises(ValueError, match="float32, bfloat16, float16"):
            resolve_dtype(bad)


def test_load_in_bf16_rounds_the_float32_checkpoint_once(pair):
    lm32, lm16, _ = pair
    assert lm16.dtype is BF16 and lm32.dtype is torch.float32
    p32 = lm32.named_parameters()
    for n, p in lm16.named_parameters().items():
        assert p.dtype is BF16 and torch.equal(bits(p), bits(p32[n].detach().to(BF16))), n


def test_cli_dtype_flag_loads_bf16_and_rejects_bad_values(pair, capsys):
    _, lm16, folder = pair
    prompts = PROMPTS[:3]
    assert main(["probe", "--model", str(folder), "--dtype", "bfloat16", "--json", *prompts]) == 0
    rows = json.loads(capsys.readouterr().out)
    want = target_logprobs(lm16, prompts, resolve_targets(lm16.tokenizer, "he,she")).exp()
    assert [[r["probs"][w] for w in ("he", "she")] for r in rows] == want.tolist()
    assert main(["probe", "--model", str(folder), "--dtype", "int8", *prompts]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "float32, bfloat16, float16" in err


def test_logits_from_normed_runs_a_wider_input_in_the_wider_dtype(pair):
    _, lm16, _ = pair
    x = torch.randn(3, lm16.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = lm16.logits_from_normed(x.to(BF16))
        wide = lm16.logits_from_normed(x)
        assert same.dtype is BF16 and torch.equal(same, lm16.hf.lm_head(x.to(BF16)))
        assert wide.dtype is torch.float32 and torch.equal(wide, F.linear(x, lm16.hf.lm_head.weight.float()))


# --------------------------------------------------------------------------- stability: no error added
def test_bf16_scores_equal_a_float64_recomputation_of_the_same_activations(pair):
    _, lm16, _ = pair
    ts = resolve_targets(lm16.tokenizer, "he,she")
    enc = lm16.tokenizer(PROMPTS[:8])
    same_len = [p for p, ids in zip(PROMPTS[:8], enc["input_ids"]) if len(ids) == len(enc["input_ids"][0])]
    ids = torch.tensor(lm16.tokenizer(same_len)["input_ids"])
    store: dict[str, torch.Tensor] = {}
    hooks = [lm16.hf.model.layers[2].mlp.down_proj.register_forward_hook(lambda m, a, o: store.update(m=a[0])),
             lm16.hf.model.layers[-1].register_forward_hook(lambda m, a, o: store.update(h=o[0] if isinstance(o, tuple) else o))]
    try:
        with torch.no_grad():  # the scorer's forward: attention mask, only the last position unembedded
            logits = lm16.hf(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1).logits[:, -1]
    finally:
        for h in hooks:
            h.remove()
    lp = torch.log_softmax(logits.double(), -1)[:, list(ts.first_ids)]
    assert torch.allclose(target_logprobs(lm16, same_len, ts), lp, rtol=0, atol=1e-12)
    # neuron attribution, layer 2: m * (g * (W_U[she] - W_U[he])) . W_down[:, k] / rms(final), all in float64
    m, h = store["m"][:, -1].double(), store["h"][:, -1].double()
    W_U, g = lm16.hf.lm_head.weight.detach().double(), lm16.hf.model.norm.weight.detach().double()
    r = g * (W_U[ts.first_ids[1]] - W_U[ts.first_ids[0]])
    s = torch.sqrt(h.pow(2).mean(-1, keepdim=True) + lm16.config.rms_norm_eps)
    want = m * (r @ lm16.hf.model.layers[2].mlp.down_proj.weight.detach().double()) / s
    got = neuron_attribution(lm16, same_len, layers=[2], keep_per_prompt=True).per_prompt
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))  # per_prompt is float32


def test_bf16_row_cosines_equal_plain_autograd_in_float64(pair):
    _, lm16, _ = pair
    ts = resolve_targets(lm16.tokenizer, "he,she")
    prompt = [PROMPTS[0]]
    W = lm16.hf.model.layers[1].mlp.down_proj.weight
    ids = torch.tensor(lm16.tokenizer(prompt)["input_ids"])
    grads = []
    for t in ts.first_ids:
        Wl = W.detach().clone().requires_grad_(True)
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        h = torch.func.functional_call(lm16.hf.model, {"layers.1.mlp.down_proj.weight": Wl}, args=(), kwargs=kw)[0]
        torch.log_softmax(lm16.hf.lm_head(h[:, -1]).float(), -1)[0, t].backward()
        grads.append(Wl.grad.double())
    want = F.cosine_similarity(grads[0], grads[1], dim=1)
    got = row_scale(lm16, prompt, "L1.mlp.down").scores
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- agreement: float32 vs bfloat16
def _lens_rho(lm32, prompts, eps: float) -> float:
    """``expm1(2 eps Lam)``: the relative error bound of a logit-lens probability (module docstring)."""
    with torch.no_grad():
        x = lm32.final_norm(residual_pass(lm32, prompts).last)
    lam = float(lm32.unembed.weight.norm(dim=1).max() * x.norm(dim=-1).max())
    return math.expm1(2 * eps * lam)


def test_tiny_layer_scores_and_bmi_agree(pair):
    lm32, lm16, _ = pair
    eps = eps_worst(lm32.n_layers)
    rho = _lens_rho(lm32, PROMPTS, eps)
    (la, ba), (lb, bb) = layer_scale_and_bmi(lm32, PROMPTS), layer_scale_and_bmi(lm16, PROMPTS)
    pa, pb = torch.tensor(la.extras["p_targets"]), torch.tensor(lb.extras["p_targets"])  # [L+1, target]
    assert ((pb - pa).abs() <= rho * pa).all()
    bound = rho * (pa[1:] + pa[:-1]).sum(-1)
    assert ((lb.scores - la.scores).abs() <= bound).all(), ((lb.scores - la.scores).abs() / bound).max()
    assert ((bb.scores - ba.scores).abs() <= 4 * eps).all()


def test_tiny_attribution_ranks_agree(pair):
    lm32, lm16, _ = pair
    eps = eps_worst(lm32.n_layers)
    a = neuron_attribution(lm32, PROMPTS, keep_per_prompt=True)
    b = neuron_attribution(lm16, PROMPTS, keep_per_prompt=True)
    pa, pb = a.per_prompt.double(), b.per_prompt.double()
    scale = pa.abs().max(1, keepdim=True).values
    assert ((pb - pa).abs() <= (3 * eps + 3 * U) * scale).all()
    assert _overlap(a, b) >= MIN_OVERLAP


def test_tiny_module_ablation_order_agrees(pair):
    lm32, lm16, _ = pair
    eps = eps_worst(lm32.n_layers)
    rho = _lens_rho(lm32, PROMPTS, eps)
    a, b = module_scale(lm32, PROMPTS, final=False), module_scale(lm16, PROMPTS, final=False)
    p_base = torch.tensor(layer_scale_and_bmi(lm32, PROMPTS)[0].extras["p_targets"]).sum(-1)  # [L+1]
    block = torch.tensor([int(lab.split(".")[0][1:]) for lab in a.labels])
    # score = sum_t |p_ablated - p_base| at block i+1; p_ablated <= p_base + score, so both are within rho of
    # their size: |d score| <= rho * (2 p_base + score)
    tol = rho * (2 * p_base[block + 1] + a.scores)
    assert ((b.scores - a.scores).abs() <= tol).all()
    for i in range(len(a.labels)):  # every pair separated by more than both tolerances keeps its order
        for j in range(len(a.labels)):
            if a.scores[i] - a.scores[j] > tol[i] + tol[j]:
                assert b.scores[i] > b.scores[j], (a.labels[i], a.labels[j])


# --------------------------------------------------------------------------- edits on a bfloat16 model
def test_bf16_edit_is_written_in_bf16_and_undone_bit_exactly(pair):
    _, lm16, _ = pair
    before = {n: bits(p.detach().clone()) for n, p in lm16.named_parameters().items()}
    mask = mask_from_labels(lm16.hf, ["L1N3", "L2N7"])
    edit = Edit.scale(lm16, mask, 0.5)
    assert all(v.dtype is BF16 for v in edit.values.values())
    # values given in float32 (a master copy) are rounded once to the parameter's dtype
    wide = {n: v.float() * 1.001 for n, v in edit.values.items()}
    e2 = Edit(edit.indices, wide, edit.shapes, edit.dtypes, edit.layouts, "wide")
    assert all(torch.equal(bits(e2.values[n]), bits(wide[n].to(BF16))) for n in wide)
    with e2.applied(lm16):
        params = lm16.named_parameters()
        for n, i in e2.indices.items():
            assert torch.equal(bits(params[n].detach().reshape(-1)[i]), bits(wide[n].to(BF16)))
        changed = sum(int((bits(p.detach()) != before[n]).sum()) for n, p in params.items())
        assert 0 < changed <= e2.size
    h = edit.apply_(lm16)
    h.undo()
    assert all(torch.equal(bits(p.detach()), before[n]) for n, p in lm16.named_parameters().items())


def test_bf16_export_keeps_dtype_and_diffs_against_the_float32_base(pair, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    _, lm16, folder = pair
    edit = Edit.scale(lm16, mask_from_labels(lm16.hf, ["L1N3"]), 0.5)
    counts = edit.changed_counts(lm16)
    with edit.applied(lm16):
        out = export_checkpoint(lm16, tmp_path / "out", method="scale", prompts=PROMPTS[:2])
        man = json.loads((out / MANIFEST).read_text())
        assert man["dtype"] == "bfloat16" and man["params"] == {n: k for n, k in counts.items() if k}
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        back = AutoModelForCausalLM.from_pretrained(out)
        assert back.dtype is BF16
        mine = lm16.named_parameters()
        assert all(torch.equal(bits(p), bits(mine[n].detach())) for n, p in back.named_parameters())
    unedited = export_checkpoint(lm16, tmp_path / "plain", method="none", prompts=PROMPTS[:2])
    assert json.loads((unedited / MANIFEST).read_text())["n_changed"] == 0


def test_bf16_finetune_accumulates_tiny_steps_in_a_float32_master(pair):
    """SGD steps each below half a bf16 ulp of every masked weight (a bf16 update would lose all of
    them) add up in the float32 master copy; the written weights are the master rounded once.
    Oracle: the same SGD loop written out with plain torch on a float32 master."""
    _, lm16, _ = pair
    name = "model.layers.1.mlp.down_proj.weight"
    mask = mask_from_labels(lm16.hf, ["L1.mlp.down"])
    idx = mask.indices(name)
    train = [{"prompt": PROMPTS[0], "f_he": 0.5, "f_she": 0.5}]
    tid = list(resolve_targets(lm16.tokenizer, "he,she").first_ids)
    ids = torch.tensor(lm16.tokenizer([PROMPTS[0]])["input_ids"])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # as the training forward passes them
    W = lm16.named_parameters()[name].detach()

    def loss_fn(p, f):
        return -torch.log(p[:, 1]).mean()

    def grad(master):
        Wl = W.reshape(-1).index_copy(0, idx, master.to(BF16)).view_as(W).requires_grad_(True)
        out = torch.func.functional_call(lm16.hf, {name: Wl}, args=(), kwargs=inputs)
        loss_fn(torch.softmax(out.logits[:, -1].float(), -1)[:, tid], None).backward()
        return Wl.grad.reshape(-1)[idx].float()

    def half_ulp(w):  # half the distance to the nearer bf16 neighbour
        up, down = (torch.nextafter(w, torch.tensor(v, dtype=BF16)).float() for v in (math.inf, -math.inf))
        return torch.minimum(up - w.float(), w.float() - down) / 2

    base = W.reshape(-1)[idx].float()
    g = grad(base)
    lr = 0.4 * float((half_ulp(W.reshape(-1)[idx])[g != 0] / g[g != 0].abs()).min())
    n = 8
    master = base.clone()
    for _ in range(n):
        step = lr * grad(master)
        w = master.to(BF16)
        assert (step.abs() < half_ulp(w)).all() and torch.equal((w.float() - step).to(BF16), w)  # lost in bf16
        master = master - step
    cfg = FinetuneConfig(optimizer="sgd", lr=lr, epochs=n, batch_size=1, grad_clip=None, patience=n + 1)
    res = masked_finetune(lm16, mask, train, None, cfg, retention=[], loss_fn=loss_fn)
    got = res.master[name]
    assert got.dtype is torch.float32 and res.status == "done"
    assert torch.allclose(got, master, rtol=0, atol=4 * n * 2.0**-24 * float(base.abs().max()))
    assert torch.equal(bits(res.edit.values[name]), bits(got.to(BF16)))  # written = master rounded once
    assert res.edit.changed_counts(lm16)[name] > 0  # the tiny steps added up to a visible change


# --------------------------------------------------------------------------- SmolLM2
@pytest.mark.integration
def test_smollm2_bf16_layer_scores_and_attribution_agree(smol, one_thread):
    lm16 = load_model("smollm2-135m", dtype="bfloat16")
    prompts = [f"The {p} said that" for p in PROFESSIONS] + [f"The {p} went home because" for p in PROFESSIONS]
    eps = eps_typical(smol.n_layers)
    (la, ba), (lb, bb) = layer_scale_and_bmi(smol, prompts), layer_scale_and_bmi(lm16, prompts)
    # each layer score is a difference of lens probabilities known to ~2 eps of their size; the largest
    # layer score is of the size of those probabilities: |d score| <= 4 eps * max score
    assert ((lb.scores - la.scores).abs() <= 4 * eps * la.scores.max()).all()
    assert ((bb.scores - ba.scores).abs() <= 4 * eps).all()
    a = neuron_attribution(smol, prompts, keep_per_prompt=True)
    b = neuron_attribution(lm16, prompts, keep_per_prompt=True)
    pa, pb = a.per_prompt.double(), b.per_prompt.double()
    assert ((pb - pa).abs() <= (3 * eps + 3 * U) * pa.abs().max(1, keepdim=True).values).all()
    assert _overlap(a, b) >= MIN_OVERLAP
