"""Batched next-token scoring of target words at each prompt's last real token.

Prompts of uneven length are right-padded, so real tokens keep positions ``0..n-1`` and never
attend to padding; the last real token of row b is ``attention_mask[b].sum() - 1``. Prompts are
sorted by length before batching (less padding) and results put back in input order. Only the
``[batch, n_targets]`` result of each batch is kept, so 10,000 prompts never hold more than one
batch of activations.

This is the one next-token scorer (the benchmark runners' :func:`bias_lens.benchmarks.next_token.
next_token_logprobs` and causal selection call it). Its fast path, for single-token targets:

* only the last real position of each prompt goes through the unembedding (``logits_to_keep``
  with the batch's distinct last positions), instead of ``[batch, pos, d_vocab]`` logits;
* ``shared_prefix=True``: a token prefix shared by every prompt (GenBiasPro-CG's 2-shot code
  context, ~100 tokens) is run once; its key/value cache is repeated over each batch and only the
  suffixes are run. Off by default: hooks that address positions (``record_into`` at the last
  index, ``patch_from``) would see suffix positions, and the prefix is run without the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import copy

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .targets import TargetSet


@dataclass
class Batch:
    """One right-padded batch: ids, mask, index of the last real token, and original row order."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    last: Int[Tensor, " batch"]
    rows: list[int]

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments of the HF forward pass (input ids and attention mask)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def repeat(self, r: int) -> "Batch":
        """The batch stacked ``r`` times (replica j = rows ``j*n .. (j+1)*n-1``; per-row hooks tell them apart)."""
        return Batch(self.input_ids.repeat(r, 1), self.attention_mask.repeat(r, 1), self.last.repeat(r), self.rows * r)


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """Validate prompts: a non-empty list of non-empty strings."""
    if isinstance(prompts, str):
        raise TypeError("pass a list of prompts, not a single string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} is empty; every prompt needs some text")
    return prompts


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt with the tokenizer's defaults (BOS only if it adds one)."""
    return [list(ids) for ids in tokenizer(list(prompts))["input_ids"]]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` of ``seqs`` right-padded with ``pad_id`` to the longest."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def iter_batches(
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int = 32,
    *,
    device: torch.device | str = "cpu",
    sort: bool = True,
    token_ids: Sequence[Sequence[int]] | None = None,
) -> Iterator[Batch]:
    """Yield right-padded batches (sorted by length when ``sort``), remembering original rows."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    ids = list(token_ids) if token_ids is not None else tokenize(tokenizer, check_prompts(prompts))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if sort else list(range(len(ids)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, mask = pad_right([ids[r] for r in rows], pad, device)
        yield Batch(input_ids, mask, mask.sum(1) - 1, rows)


def last_logits(logits: Float[Tensor, "batch pos d_vocab"], last: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_vocab"]:
    """Each row's logits at its last real position ``last`` (right padding)."""
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]


MIN_SHARED_PREFIX = 16  # tokens; shorter shared prefixes are not worth a cache


def shared_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix, leaving at least one token in every suffix."""
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    k = 0
    while k < n and all(s[k] == first[k] for s in seqs):
        k += 1
    return k


@dataclass
class PrefixCache:
    """Key/value cache of ``n`` prompt tokens shared by every prompt."""

    past: Any
    n: int


def prefix_cache(lm: Any, ids: Sequence[Sequence[int]]) -> PrefixCache | None:
    """Cache of the prompts' common prefix when it is at least :data:`MIN_SHARED_PREFIX` tokens."""
    k = shared_prefix_len(ids) if len(ids) > 1 else 0
    if k < MIN_SHARED_PREFIX:
        return None
    pre = torch.tensor([list(ids[0][:k])], device=lm.device)
    return PrefixCache(lm.hf(input_ids=pre, use_cache=True, logits_to_keep=1).past_key_values, k)


def batch_last_logits(lm: Any, b: Batch, cache: PrefixCache | None = None) -> Float[Tensor, "batch d_vocab"]:
    """Logits at each row's last real token from one forward of ``b`` (a suffix batch after
    ``cache`` when given); only the distinct last positions go through the unembedding."""
    keep = torch.unique(b.last)
    kwargs: dict[str, Any] = {"input_ids": b.input_ids, "logits_to_keep": keep}
    if cache is not None:
        n = b.input_ids.shape[0]
        c = copy.deepcopy(cache.past)
        c.batch_repeat_interleave(n)
        ones = torch.ones(n, cache.n, dtype=b.attention_mask.dtype, device=b.attention_mask.device)
        kwargs.update(past_key_values=c, attention_mask=torch.cat([ones, b.attention_mask], 1), use_cache=True)
    else:
        kwargs["attention_mask"] = b.attention_mask
    logits = lm.hf(**kwargs).logits  # [batch, len(keep), d_vocab]
    return last_logits(logits, torch.searchsorted(keep, b.last))


def batch_target_logprobs(
    lm: Any, b: Batch, targets: TargetSet, cache: PrefixCache | None = None
) -> Float[Tensor, "batch target"]:
    """float64 ``log p(target | row)`` of single-token targets at each row's last real token."""
    lp = torch.log_softmax(batch_last_logits(lm, b, cache).double(), -1)
    return lp[:, torch.as_tensor(targets.first_ids, device=lp.device)]


@torch.no_grad()
def target_logprobs(
    lm: Any,
    prompts: Sequence[str],
    targets: TargetSet,
    *,
    batch_size: int = 32,
    progress: bool = False,
    shared_prefix: bool = False,
) -> Float[Tensor, "prompt target"]:
    """log p(target | prompt) for every prompt and target word, in input order.

    Single-token targets read one distribution at the last real token (fast path, see the module
    docstring; ``shared_prefix=True`` also caches a common prompt prefix). Multi-token targets are
    teacher-forced: the prompt is extended with each target's tokens but the last, and the
    target's log-prob is the sum over its tokens.
    """
    prompts = check_prompts(prompts)
    out = torch.empty(len(prompts), len(targets), dtype=torch.float64)
    ids = tokenize(lm.tokenizer, prompts)
    cache = prefix_cache(lm, ids) if shared_prefix and targets.single_token else None
    k = cache.n if cache is not None else 0
    batches = iter_batches(lm.tokenizer, [], batch_size, device=lm.device, token_ids=[s[k:] for s in ids])
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(prompts) // batch_size), desc="scoring", leave=False)
    for b in batches:
        lp = batch_target_logprobs(lm, b, targets, cache) if targets.single_token else _multi_token_batch(lm, b, targets)
        out[b.rows] = lp.cpu()
    return out


def batch_token_logprobs(lm: Any, b: Batch) -> tuple[Float[Tensor, "batch pos_1"], Bool[Tensor, "batch pos_1"]]:
    """One forward of ``b``: float64 ``log p(ids[t+1] | ids[:t+1])`` at positions ``0..pos-2`` and
    whether each of those tokens is the argmax.

    The one sequence log-likelihood: multi-token targets here, sentence / completion scores and
    the retention perplexity (:mod:`bias_lens.benchmarks.sentence_scoring`) and causal selection's
    retention guard all read it. Padded positions hold garbage; mask them with
    ``attention_mask[:, 1:]``. (A float32 logsumexp and a gather: no full log-softmax copy.)
    """
    logits = lm.hf(**b.model_inputs()).logits[:, :-1].float()
    nxt = b.input_ids[:, 1:]
    lp = (logits.gather(-1, nxt[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)).double()
    return lp, logits.argmax(-1) == nxt


def _multi_token_batch(lm: Any, b: Batch, targets: TargetSet) -> Tensor:
    """Teacher-forced summed log-probs for a batch and all targets (one forward per batch)."""
    seqs, starts = [], []
    for i in range(b.input_ids.shape[0]):
        n = int(b.last[i]) + 1
        base = b.input_ids[i, :n].tolist()
        for t in targets.token_ids:
            seqs.append(base + list(t))
            starts.append(n - 1)  # the prediction of the target's first token sits at position n-1
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids, mask = pad_right(seqs, pad, lm.device)
    lp, _ = batch_token_logprobs(lm, Batch(ids, mask, mask.sum(1) - 1, list(range(len(seqs)))))
    k = len(targets)
    res = torch.stack([lp[j, s : s + len(targets.token_ids[j % k])].sum() for j, s in enumerate(starts)])
    return res.view(-1, k)


def target_probs(
    lm: Any, prompts: Sequence[str], targets: TargetSet, *, batch_size: int = 32, progress: bool = False
) -> Float[Tensor, "prompt target"]:
    """Raw next-token probabilities p(target | prompt) (not renormalised over the targets)."""
    return target_logprobs(lm, prompts, targets, batch_size=batch_size, progress=progress).exp()
