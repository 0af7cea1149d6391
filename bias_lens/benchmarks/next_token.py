"""Fast next-token log-probabilities of single-token targets for the benchmark runners.

Same numbers as :func:`bias_lens.scoring.target_logprobs` (tested against a plain per-prompt
forward), two savings that matter on CPU:

* only the last real position of each prompt goes through the unembedding (``logits_to_keep``
  with the batch's distinct last positions), instead of ``[batch, pos, d_vocab]`` logits;
* a token prefix shared by every prompt (GenBiasPro-CG's 2-shot code context, ~100 tokens) is run
  once; its key/value cache is repeated over each batch, and only the suffixes are run.

Multi-token targets fall back to the teacher-forced :func:`bias_lens.scoring.target_logprobs`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..scoring import check_prompts, iter_batches, target_logprobs, tokenize
from ..targets import TargetSet

MIN_SHARED_PREFIX = 16  # tokens; shorter shared prefixes are not worth a cache


def _shared_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix, leaving at least one token in every suffix."""
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    k = 0
    while k < n and all(s[k] == first[k] for s in seqs):
        k += 1
    return k


@torch.no_grad()
def next_token_logprobs(
    lm: Any, prompts: Sequence[str], targets: TargetSet, *, batch_size: int = 32, progress: bool = False,
    shared_prefix: bool = True,
) -> Float[Tensor, "prompt target"]:
    """float64 ``log p(target | prompt)`` at each prompt's last real token, in input order."""
    prompts = check_prompts(prompts)
    if not targets.single_token:
        return target_logprobs(lm, prompts, targets, batch_size=batch_size, progress=progress)
    ids = tokenize(lm.tokenizer, prompts)
    k = _shared_prefix_len(ids) if shared_prefix and len(ids) > 1 else 0
    cache = None
    if k >= MIN_SHARED_PREFIX:
        pre = torch.tensor([ids[0][:k]], device=lm.device)
        cache = lm.hf(input_ids=pre, use_cache=True, logits_to_keep=1).past_key_values
    else:
        k = 0
    tid = torch.as_tensor(targets.first_ids)
    out = torch.empty(len(prompts), len(targets), dtype=torch.float64)
    batches = iter_batches(lm.tokenizer, [], batch_size, device=lm.device, token_ids=[s[k:] for s in ids])
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(ids) // batch_size), desc="scoring", leave=False)
    for b in batches:
        keep = torch.unique(b.last)
        kwargs: dict[str, Any] = {"input_ids": b.input_ids, "logits_to_keep": keep}
        if cache is not None:
            n = b.input_ids.shape[0]
            c = copy.deepcopy(cache)
            c.batch_repeat_interleave(n)
            ones = torch.ones(n, k, dtype=b.attention_mask.dtype, device=lm.device)
            kwargs.update(past_key_values=c, attention_mask=torch.cat([ones, b.attention_mask], 1), use_cache=True)
        else:
            kwargs["attention_mask"] = b.attention_mask
        logits = lm.hf(**kwargs).logits  # [batch, len(keep), d_vocab]
        col = torch.searchsorted(keep, b.last)
        last = logits[torch.arange(logits.shape[0], device=logits.device), col]
        lp = torch.log_softmax(last.double(), -1)
        out[b.rows] = lp[:, tid.to(lp.device)].cpu()
    return out
