"""The floor and the naive anchors every locate method is compared with.

* floor: one bare batched HF forward over the prompts (no hooks, no grad);
* forward+backward floor: the same with a backward pass of the he/she log-prob sum;
* naive TransformerLens: ``bridge.run_with_cache`` with no names filter, one prompt at a time,
  then the layer score (MSME Eq. 2) from the cached residuals;
* naive nnsight: one trace per prompt saving every layer's output, then the same score.
Both naive anchors compute the same numbers as :func:`bias_lens.locate.layer` (checked in
`benchmarks/run.py`, recorded as `anchor_max_abs_diff`), so their time is a fair "written by hand" reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bias_lens.scoring import iter_batches, last_logits


def bare_forward(lm, prompts: Sequence[str], batch_size: int = 32) -> None:
    with torch.no_grad():
        for b in iter_batches(lm.tokenizer, prompts, batch_size, device=lm.device):
            lm.hf(**b.model_inputs())


def forward_backward(lm, prompts: Sequence[str], ids: Sequence[int], batch_size: int = 32) -> None:
    """Bare forward+backward of sum log p(target) with every parameter requiring grad."""
    for b in iter_batches(lm.tokenizer, prompts, batch_size, device=lm.device):
        logits = last_logits(lm.hf(**b.model_inputs()).logits, b.last)
        torch.log_softmax(logits, -1)[:, list(ids)].sum().backward()
    lm.hf.zero_grad(set_to_none=True)


def _eq2(resids: torch.Tensor, lm, ids: Sequence[int]) -> torch.Tensor:
    """Layer score from residuals [layer+1, d_model] of one prompt's last token."""
    probs = torch.softmax(lm.logits_from_resid(resids).double(), -1)[:, list(ids)]
    return (probs[1:] - probs[:-1]).abs().sum(-1)


def naive_tl_layer_scores(lm, prompts: Sequence[str], ids: Sequence[int]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for p in prompts:
            toks = lm.tokenizer(p, return_tensors="pt").input_ids.to(lm.device)
            _, cache = lm.bridge.run_with_cache(toks)
            res = [cache[f"blocks.{i}.hook_resid_pre"][0, -1] for i in range(lm.n_layers)]
            res.append(cache[f"blocks.{lm.n_layers - 1}.hook_resid_post"][0, -1])
            out.append(_eq2(torch.stack(res), lm, ids))
            del cache
    return torch.stack(out)


def naive_nnsight_layer_scores(lm, prompts: Sequence[str], ids: Sequence[int]) -> torch.Tensor:
    out = []
    nn_model = lm.nnsight
    with torch.no_grad():
        for p in prompts:
            toks = lm.tokenizer(p, return_tensors="pt").input_ids.to(lm.device)
            saved: list = []  # mutated inside the trace (names bound in a trace body are not pushed back reliably)
            with nn_model.trace(toks):
                saved.append(nn_model.model.embed_tokens.output.save())
                for layer in nn_model.model.layers:
                    saved.append(layer.output.save())
            res = [(h[0] if isinstance(h, tuple) else h)[0, -1] for h in saved]
            out.append(_eq2(torch.stack(res), lm, ids))
    return torch.stack(out)
