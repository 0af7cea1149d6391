"""Batched next-token scoring of target words at each prompt's last real token.

Prompts of uneven length are right-padded, so real tokens keep positions ``0..n-1`` and never
attend to padding; the last real token of row b is ``attention_mask[b].sum() - 1``. Prompts are
sorted by length before batching (less padding) and results put back in input order. Only the
``[batch, n_targets]`` result of each batch is kept, so 10,000 prompts never hold more than one
batch of activations.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
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
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


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
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]


@torch.no_grad()
def target_logprobs(
    lm: Any,
    prompts: Sequence[str],
    targets: TargetSet,
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> Float[Tensor, "prompt target"]:
    """log p(target | prompt) for every prompt and target word, in input order.

    Single-token targets read one distribution at the last real token. Multi-token targets are
    teacher-forced: the prompt is extended with each target's tokens but the last, and the
    target's log-prob is the sum over its tokens.
    """
    prompts = check_prompts(prompts)
    out = torch.empty(len(prompts), len(targets), dtype=torch.float64)
    model = lm.hf
    batches = iter_batches(lm.tokenizer, prompts, batch_size, device=lm.device)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(prompts) // batch_size), desc="scoring", leave=False)
    if targets.single_token:
        tid = torch.as_tensor(targets.first_ids)
        for b in batches:
            logits = model(**b.model_inputs()).logits
            lp = torch.log_softmax(last_logits(logits, b.last).double(), -1)
            out[b.rows] = lp[:, tid.to(lp.device)].cpu()
        return out
    for b in batches:
        out[b.rows] = _multi_token_batch(lm, b, targets).cpu()
    return out


def _multi_token_batch(lm: Any, b: Batch, targets: TargetSet) -> Tensor:
    """Teacher-forced summed log-probs for a batch and all targets (one forward per batch)."""
    seqs, starts = [], []
    for i in range(b.input_ids.shape[0]):
        n = int(b.last[i]) + 1
        base = b.input_ids[i, :n].tolist()
        for t in targets.token_ids:
            seqs.append(base + list(t[:-1]))
            starts.append(n - 1)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids, mask = pad_right(seqs, pad, lm.device)
    lp = torch.log_softmax(lm.hf(input_ids=ids, attention_mask=mask).logits.double(), -1)
    res = torch.zeros(len(seqs), dtype=torch.float64, device=lp.device)
    k = len(targets)
    for j, s in enumerate(starts):
        t = targets.token_ids[j % k]
        pos = torch.arange(s, s + len(t), device=lp.device)
        res[j] = lp[j, pos, torch.as_tensor(t, device=lp.device)].sum()
    return res.view(-1, k)


def target_probs(
    lm: Any, prompts: Sequence[str], targets: TargetSet, *, batch_size: int = 32, progress: bool = False
) -> Float[Tensor, "prompt target"]:
    """Raw next-token probabilities p(target | prompt) (not renormalised over the targets)."""
    return target_logprobs(lm, prompts, targets, batch_size=batch_size, progress=progress).exp()
