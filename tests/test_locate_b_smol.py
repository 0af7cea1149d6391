"""SmolLM2 checks of attribution, circuit decomposition and general-neuron stats against recomputation."""

from __future__ import annotations

import pytest
import torch

from bias_lens.locate.attribution import collect_last, head_attribution, neuron_attribution, norm_parts, target_importance
from bias_lens.locate.circuit import upstream_contributions
from bias_lens.scoring import target_logprobs
from bias_lens.targets import resolve_targets

pytestmark = pytest.mark.integration
PROMPTS = ["The nurse said that", "The mechanic fixed the car because", "The secretary was late because", "My doctor told me that"]


@pytest.fixture(scope="module")
def smol_cache(smol):
    return collect_last(smol, PROMPTS, batch_size=4)


def test_cache_final_gives_model_output(smol, smol_cache):
    ts = resolve_targets(smol.tokenizer, "he,she")
    ref = target_logprobs(smol, PROMPTS, ts)
    with torch.no_grad():
        lp = torch.log_softmax(smol.logits_from_resid(smol_cache.final.float()).double(), -1)
    assert torch.allclose(lp[:, ts.first_ids], ref, atol=1e-4)


@pytest.mark.parametrize("norm", ["cached", "recompute"])
def test_attribution_spot_check(smol, smol_cache, norm):
    ts = resolve_targets(smol.tokenizer, "he,she")
    tid = torch.as_tensor(ts.first_ids)
    res = neuron_attribution(smol, PROMPTS, ts, norm=norm, cache=smol_cache, keep_per_prompt=True)
    fn = norm_parts(smol.final_norm)
    g = torch.Generator().manual_seed(0)
    picks = [(l, int(k)) for l in (0, 14, 29) for k in torch.randint(0, smol.d_mlp, (4,), generator=g)]
    picks.append(tuple(int(x) for x in res.top_labels(1)[0][1:].split("N")))
    labels = [f"L{l}N{k}" for l, k in picks]
    imp = target_importance(smol, smol_cache, labels, ts, norm=norm)
    for j, (l, k) in enumerate(picks):
        down = smol.submodule(l, "mlp.down")
        for i in range(len(PROMPTS)):
            x = smol_cache.resid_mid[l, i]
            with torch.no_grad():
                m = smol_cache.mlp_post[l, i, k].float()
                v = down.weight[:, k].double()
                ys = torch.stack([x, x + float(m) * v]).float()
                if norm == "recompute":
                    logits = smol.logits_from_resid(ys).double()
                else:
                    logits = smol.unembed((fn.apply(ys.double(), fn.scale(smol_cache.final[i]))).float()).double()
            d = torch.log_softmax(logits, -1)[:, tid]
            d = d[1] - d[0]
            assert torch.allclose(imp[i, j], d, atol=5e-4)
            assert abs(float(res.per_prompt[i, res.labels.index(labels[j])]) - float(d[1] - d[0])) < 5e-4


def test_heads_and_circuit(smol, smol_cache):
    hres = head_attribution(smol, PROMPTS, cache=smol_cache)
    assert len(hres.labels) == 30 * 9
    # cached norm is linear: summing all heads' and neurons' signed scores of a layer plus the
    # (bias-free) rest reproduces the layer's total logit-diff change from resid_pre to resid_post
    nres = neuron_attribution(smol, PROMPTS, cache=smol_cache, keep_per_prompt=True, layers=[10])
    ts = resolve_targets(smol.tokenizer, "he,she")
    fn = norm_parts(smol.final_norm)
    W = smol.unembed.weight.detach().double()
    r = fn.read_dir(W[ts.first_ids[1]] - W[ts.first_ids[0]])
    post = smol_cache.resid_pre[11]
    total = ((post - smol_cache.resid_pre[10]) @ r) / fn.scale(smol_cache.final)[:, 0]
    got = nres.per_prompt.double().sum(1) + hres.per_prompt.double()[:, 90:99].sum(1)
    assert torch.allclose(got, total, atol=1e-3)
    store = {}
    from bias_lens.hooks import record_into
    from bias_lens.scoring import iter_batches

    for b in iter_batches(smol.tokenizer, PROMPTS, 4):
        with torch.no_grad(), smol.hooks(record_into(store, ["L20.mlp.in"], index=b.last)):
            smol.hf(**b.model_inputs())
        with torch.no_grad():
            real = smol.submodule(20, "mlp.gate")(store["L20.mlp.in"]).double()[:, 100]
        _, _, tot = upstream_contributions(smol, smol_cache, "L20N100")
        assert torch.allclose(tot[b.rows], real, atol=1e-3)
